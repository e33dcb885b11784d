"""Rotary position frequencies stay fp32 under bf16 weights (lowmem_lightning/rotary.py).

Lightning's ``bf16-true`` casts the module with ``.to(torch.bfloat16)``, which rounded transformers' fp32
``inv_freq`` buffers to bf16: the fine-tune trained on rotation angles off by up to 1.25 rad at position 1024
(head dim 128), and the model it saved was then served by ``from_pretrained(dtype=torch.bfloat16)`` with the fp32
frequencies it never trained with (its logits differed)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lowmem_lightning.modules import CausalLMModule
from lowmem_lightning.rotary import keep_rotary_fp32, rotary_buffers

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 512}


def _module(**kwargs) -> CausalLMModule:
    module = CausalLMModule(config=dict(LLAMA), **kwargs)
    module.configure_model()
    return module


def _fp32_reference(model) -> dict[str, torch.Tensor]:
    fresh = AutoModelForCausalLM.from_config(model.config)
    return {f"{type(m).__name__}.{n}": m._buffers[n] for m, n in rotary_buffers(fresh)}


@pytest.mark.parametrize("cast", ["to", "bfloat16", "bf16-true"])
def test_a_bf16_module_keeps_fp32_rotary_frequencies(cast, tmp_path):
    """Each way the module gets bf16 weights (``.to``, ``.bfloat16()``, a Trainer with ``bf16-true``): the weights
    are bf16, every rotary frequency buffer is fp32 and equals a freshly built model's."""
    module = _module(torch_dtype="bfloat16") if cast == "bf16-true" else _module()
    if cast == "to":
        module.to(torch.bfloat16)
    elif cast == "bfloat16":
        module.bfloat16()
    else:
        trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
        trainer.strategy.connect(module)
        trainer.strategy.precision_plugin.convert_module(module)
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    buffers = {f"{type(m).__name__}.{n}": m._buffers[n] for m, n in rotary_buffers(module.model)}
    assert set(buffers) == {"LlamaRotaryEmbedding.inv_freq", "LlamaRotaryEmbedding.original_inv_freq"}
    reference = _fp32_reference(module.model)
    for name, buffer in buffers.items():
        assert buffer.dtype == torch.float32, name
        assert torch.equal(buffer, reference[name]), name


def test_the_saved_bf16_model_computes_what_was_trained(tmp_path):
    """A bf16 module's model saved with ``save_pretrained`` and loaded as users load it
    (``from_pretrained(dtype=torch.bfloat16)``) gives the very logits the module computed, at positions up to 400."""
    module = _module(torch_dtype="bfloat16").to(torch.bfloat16)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 400), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = module.model(input_ids=ids).logits
    module.model.save_pretrained(tmp_path / "model")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids).logits, trained)


def test_layer_type_frequencies_and_meta_buffers():
    """Gemma 3 keeps one frequency pair per layer type (sliding and full attention): all restored; a model on the
    meta device (``lowmem estimate``) gets fp32 meta buffers; an fp32 model is left as it is (nothing restored)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300)
    model = Gemma3ForCausalLM(config)
    reference = {n: b.clone() for m, n in rotary_buffers(model) for b in [m._buffers[n]]}
    assert keep_rotary_fp32(model) == 0
    model.to(torch.bfloat16)
    assert keep_rotary_fp32(model) == len(reference) >= 4
    assert all(torch.equal(m._buffers[n], reference[n]) for m, n in rotary_buffers(model))
    with torch.device("meta"):
        meta = Gemma3ForCausalLM(config).to(torch.bfloat16)
    keep_rotary_fp32(meta)
    assert all(m._buffers[n].is_meta and m._buffers[n].dtype == torch.float32 for m, n in rotary_buffers(meta))


class _OwnProject(L.LightningModule):
    """A user's own module around an HF Llama (not a LowMemModule), with its own AdamW."""

    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_the_callback_keeps_a_projects_rotary_frequencies_fp32_under_bf16_true(tmp_path):
    """An existing project's module under ``bf16-true`` with ``LowMemOptimizerCallback``: after fit (and after a
    ``trainer.validate``, which casts the module again) its rotary buffers are fp32 and exact, its weights bf16."""
    from torch.utils.data import DataLoader, TensorDataset

    from lowmem_lightning.callbacks import LowMemOptimizerCallback

    module = _OwnProject()
    reference = _fp32_reference(module.model)
    data = DataLoader(TensorDataset(torch.randint(0, LLAMA["vocab_size"], (4, 32))), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)])
    trainer.fit(module, data, data)
    module.model.to(torch.bfloat16)  # a cast between stages, as a user's code might do: validate restores it
    trainer.validate(module, data, verbose=False)
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    for m, name in rotary_buffers(module.model):
        assert m._buffers[name].dtype == torch.float32, name
        assert torch.equal(m._buffers[name], reference[f"{type(m).__name__}.{name}"]), name
