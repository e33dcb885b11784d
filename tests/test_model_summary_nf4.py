"""Lightning's model summary counts a QLoRA model's NF4 weights (buffers, which ``parameters()`` misses): before, a
tiny Llama of 3.3M parameters showed "Total params: 478 K" and a 7B ~300M. With ``CausalLMModule`` (its ``setup``)
and with a user's own LightningModule under ``LowMemOptimizerCallback``, NF4 experts included: total = the dense
model's parameters + the adapters, non-trainable = total - trainable, the model's row likewise; the estimated size
counts the NF4 bytes as stored. A model without NF4 keeps Lightning's summary."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelSummary
from torch.utils.data import DataLoader

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.modules.causal_lm import CausalLMModule

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 259}
LORA = {"r": 4, "alpha": 8, "target_modules": "all-linear"}


def _batches():
    ids = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=2)


def _summarized(module: L.LightningModule, root, callbacks=()) -> dict:
    """The figures the Trainer's ModelSummary callback prints for ``module`` (one training step, files under
    ``root``)."""
    summary, seen = ModelSummary(max_depth=1), {}

    def record(data, total, trainable, size, modes, total_flops=0, **_):
        seen.update(rows=dict(zip(dict(data)["Name"], dict(data)["Params"], strict=True)), total=total,
                    trainable=trainable, size=size)

    summary.summarize = record
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=root,
                        enable_progress_bar=False, callbacks=[summary, *callbacks], limit_val_batches=0)
    trainer.fit(module, _batches())
    return seen


def _dense_params() -> int:
    from lowmem_lightning.modules.causal_lm import make_config

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(make_config(LLAMA)).num_parameters()


def test_causal_lm_module_counts_its_nf4_weights(tmp_path):
    module = CausalLMModule(config=LLAMA, quantize="nf4", lora=LORA, lr=1e-3)
    seen = _summarized(module, tmp_path)
    adapters = sum(p.numel() for n, p in module.model.named_parameters() if "lora_" in n)
    assert seen["trainable"] == adapters
    assert seen["total"] == _dense_params() + adapters  # before: the embeddings, norms and head only
    assert seen["rows"]["model"] == L.pytorch.utilities.model_summary.get_human_readable_count(seen["total"])
    nf4_bytes = sum(b.numel() * b.element_size() for n, b in module.model.named_buffers() if "rotary" not in n)
    params = sum(p.numel() for p in module.parameters())  # fp32: 4 bytes each
    assert seen["size"] == pytest.approx((4 * params + nf4_bytes) * 1e-6)


def test_a_users_module_under_the_callback_counts_nf4_experts(tmp_path):
    import transformers

    from lowmem_lightning.quant import Experts4bit, quantize_model

    config = transformers.MixtralConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2)
    dense = transformers.AutoModelForCausalLM.from_config(config)
    total = dense.num_parameters()

    class Mine(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = quantize_model(dense, skip=("lm_head",))

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    module = Mine()
    assert any(isinstance(m, Experts4bit) for m in module.modules())
    seen = _summarized(module, tmp_path, [LowMemOptimizerCallback("adamw_8bit")])
    assert seen["total"] == total and seen["trainable"] == sum(p.numel() for p in module.parameters()
                                                               if p.requires_grad)


def test_a_model_without_nf4_keeps_lightnings_summary(tmp_path):
    module = CausalLMModule(config=LLAMA, lr=1e-3)
    seen = _summarized(module, tmp_path)
    assert seen["total"] == seen["trainable"] == _dense_params()
    assert seen["size"] == pytest.approx(_dense_params() * 4e-6)
