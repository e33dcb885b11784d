"""Packed blocks without attention across documents: ``TextDataModule(isolate_documents=True)`` (the default with
``pack=True``) gives ``position_ids`` restarting at each document and no ``attention_mask``; a tiny Llama built
from a config then computes, for every document of a packed block, the logits it computes for the document alone
(sdpa and eager), and the loss of the block is the token-weighted loss of its documents run alone."""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lowmem_lightning.data.blocks import document_position_ids, pack_blocks
from lowmem_lightning.data.text import TextDataModule
from lowmem_lightning.data.tokens import IGNORE_INDEX
from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lowmem_lightning.modules.packed_attention import _flatten, packed_call

ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64}


def _records(tmp_path: Path) -> Path:
    """Documents of several lengths (plain text, instruction records, a conversation) in one JSONL file."""
    rows = [{"text": "a" * n + " short doc"} for n in (3, 17, 5, 29, 1)]
    rows += [{"instruction": "Say hi.", "output": "hi there"}, {"text": "the last one, longer than a block " * 2}]
    rows += [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_llama(attn: str):
    torch.manual_seed(0)
    model = build_causal_lm(config=ARCH, device="cpu", torch_dtype="float32")
    model.set_attn_implementation(attn)
    return model.eval()


def _documents(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of positions that restarts at 0 (a document, or the padding) in one row."""
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return list(zip(starts[:-1], starts[1:]))


def test_positions_restart_at_each_document_block_and_the_padding():
    assert document_position_ids([3, 5, 2], 4).tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    # a tokenizer without bos: every token is a label; the first of each document (and of each block) is not.
    encoded = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7, 8], [4, 5, 6, 7, 8]), ([9, 10], [9, 10])]
    blocks = pack_blocks(encoded, seq_len=4, pad_id=0, isolate_documents=True)
    assert blocks["labels"].tolist() == [[-100, 2, 3, -100], [-100, 6, 7, 8], [-100, 10, -100, -100]]
    assert blocks["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 1]]
    mixed = pack_blocks(encoded, seq_len=4, pad_id=0)  # documents attend across: labels untouched, no positions
    assert "position_ids" not in mixed and mixed["labels"][0].tolist() == [1, 2, 3, 4]
    alone = pack_blocks(encoded, seq_len=4, pad_id=0, pack=False, isolate_documents=True)
    assert "position_ids" not in alone  # documents never share a block


def test_batches_carry_position_ids_by_default_and_attention_mask_otherwise(tmp_path):
    path = _records(tmp_path)
    keys = {}
    for kwargs in ({}, {"isolate_documents": False}, {"pack": False}):
        dm = TextDataModule(str(path), seq_len=24, batch_size=2, val_fraction=0.0, **kwargs)
        keys[str(kwargs)] = set(next(iter(dm.train_dataloader())))
    assert keys == {"{}": {"input_ids", "labels", "position_ids"},
                    "{'isolate_documents': False}": {"input_ids", "labels", "attention_mask"},
                    "{'pack': False}": {"input_ids", "labels", "attention_mask"}}
    with pytest.raises(TypeError, match=r"isolate_documents='yes': expected True or False"):
        TextDataModule(str(path), isolate_documents="yes")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_packed_document_gives_its_logits_and_loss_alone(attn, tmp_path):
    dm = TextDataModule(str(_records(tmp_path)), seq_len=40, batch_size=3, val_fraction=0.0)
    dm.setup()
    blocks = dm.train_dataset.blocks
    batch = {k: blocks[k][:3] for k in ("input_ids", "labels", "position_ids")}
    model = _tiny_llama(attn)
    with torch.no_grad():
        packed = model(**batch, use_cache=False)  # as a user calls the HF model on our batch
        checked = 0
        loss_sum, n_targets = 0.0, 0
        for row in range(3):
            for start, end in _documents(batch["position_ids"][row]):
                ids, labels = batch["input_ids"][row, start:end], batch["labels"][row, start:end]
                alone = model(input_ids=ids[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed.logits[row, start:end], alone, rtol=0, atol=2e-5)
                checked += end - start > 1
                targets = int((labels[1:] != IGNORE_INDEX).sum())
                if targets:
                    loss_sum += float(model(input_ids=ids[None], labels=labels[None], use_cache=False).loss) * targets
                    n_targets += targets
        assert checked >= 4
        assert float(packed.loss) == pytest.approx(loss_sum / n_targets, rel=1e-6)
        # Without the restarts, or with a cache (config.use_cache=True makes one), later documents see earlier ones.
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits
        cached = model(**batch).logits
        for other in (mixed, cached):
            assert (other - packed.logits).abs().amax() > 1e-3


def test_causal_lm_module_trains_tests_and_predicts_on_isolated_documents(tmp_path):
    dm = TextDataModule(str(_records(tmp_path)), seq_len=32, batch_size=2, val_fraction=0.3)
    module = CausalLMModule(config=ARCH, optimizer="adamw", lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        module.eval()
        out = module(**batch)
        reference = module.model(**batch, use_cache=False)
    torch.testing.assert_close(out.logits, reference.logits)
    assert math.isfinite(trainer.test(module, datamodule=dm, verbose=False)[0]["test_loss"])
    assert trainer.predict(module, datamodule=dm)[0][0].keys() == {"prompt", "continuation"}


def test_flash_attention_batches_are_flattened_to_one_row(tmp_path):
    """flash_attention_* find documents from position_ids only at batch size 1 (transformers'
    ``_is_packed_sequence``): the module flattens the batch; the flattened call gives the same logits and loss
    (checked here with sdpa, which honours both forms)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    dm = TextDataModule(str(_records(tmp_path)), seq_len=40, batch_size=3, val_fraction=0.0)
    dm.setup()
    blocks = dm.train_dataset.blocks
    batch = {k: blocks[k][:3].clone() for k in ("input_ids", "labels", "position_ids")}
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # never a target in its row; joined, it would be one
    flat = _flatten(**batch)
    assert not _is_packed_sequence(batch["position_ids"], 3) and _is_packed_sequence(flat["position_ids"], 1)
    model = _tiny_llama("sdpa")
    with torch.no_grad():
        rows = model(**batch, use_cache=False)
        joined = model(**flat, use_cache=False)
    torch.testing.assert_close(joined.logits.view_as(rows.logits), rows.logits, rtol=0, atol=2e-5)
    assert float(joined.loss) == pytest.approx(float(rows.loss), rel=1e-6)


def test_an_attention_kernel_without_the_packed_mask_is_refused(tmp_path):
    """A kernel registered by name gets no mask from transformers: the documents would attend to each other."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("unmasked_sdpa_test", sdpa_attention_forward)
    dm = TextDataModule(str(_records(tmp_path)), seq_len=40, batch_size=2, val_fraction=0.0)
    dm.setup()
    batch = {k: dm.train_dataset.blocks[k][:2] for k in ("input_ids", "labels", "position_ids")}
    model = _tiny_llama("sdpa")
    with torch.no_grad():
        isolated = model(**batch, use_cache=False).logits
        model.set_attn_implementation("unmasked_sdpa_test")
        assert (model(**batch, use_cache=False).logits - isolated).abs().amax() > 1e-3  # what is refused
        with pytest.raises(ValueError, match=r"'unmasked_sdpa_test' for packed documents .* isolate_documents=False"):
            packed_call(model, **batch)


def test_the_packed_mask_adds_the_memory_the_readme_states():
    """SDPA with the block-diagonal mask (CPU profiler): about ``batch * seq**2 * (1 + d)`` bytes more with
    gradient checkpointing and ``batch * seq**2 * layers * d`` without (d: the weights' element size)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from profiler_peak import peak_bytes
    from transformers import LlamaConfig, LlamaForCausalLM

    batch, seq, layers = 2, 256, 3
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(seq // 4), torch.arange(seq - seq // 4)]).expand(batch, -1)
    for dtype, checkpointing in ((torch.float32, False), (torch.bfloat16, True)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=layers, num_attention_heads=4)).to(dtype).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        peaks = []
        for extra in ({}, {"position_ids": positions}):
            gc.collect()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                model(input_ids=ids, labels=ids, use_cache=False, **extra).loss.backward()
            model.zero_grad(set_to_none=True)
            peaks.append(peak_bytes(prof))
        d = dtype.itemsize
        stated = batch * seq**2 * ((1 + d) if checkpointing else layers * d)
        assert peaks[1] - peaks[0] == pytest.approx(stated, rel=0.15), (dtype, checkpointing, peaks)


class _SeenBatches(L.Callback):
    def __init__(self):
        self.input_ids = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.input_ids.append(batch["input_ids"].clone())


def _fit(path: Path, root: Path, max_steps: int, ckpt_path: str | None = None, **data_kwargs) -> _SeenBatches:
    seen = _SeenBatches()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[seen, L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2,
                                                                             save_top_k=-1)])
    dm = TextDataModule(str(path), seq_len=16, batch_size=2, val_fraction=0.0, **data_kwargs)
    trainer.fit(CausalLMModule(config=ARCH, optimizer="adamw", lr=1e-3), datamodule=dm, ckpt_path=ckpt_path)
    return seen


def test_a_checkpoint_of_attention_mask_batches_resumes_at_its_position(tmp_path):
    """A checkpoint written before position_ids (batches with attention_mask) resumes with isolated documents at
    the batch the checkpoint's run would have taken next."""
    path = _records(tmp_path)
    whole = _fit(path, tmp_path / "whole", 4)
    _fit(path, tmp_path / "old", 2, isolate_documents=False)
    resumed = _fit(path, tmp_path / "resumed", 4, ckpt_path=str(tmp_path / "old" / "epoch=0-step=2.ckpt"))
    assert len(resumed.input_ids) == 2
    for got, expected in zip(resumed.input_ids, whole.input_ids[2:]):
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_flex_attention_keeps_packed_documents_apart():
    """flex_attention (a compiled block mask: ~40 s on the CPU) honours the restarts as sdpa does."""
    model = _tiny_llama("flex_attention")
    a, b = torch.randint(0, 200, (1, 7)), torch.randint(0, 200, (1, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = packed_call(model, torch.cat([a, b], 1), None, positions).logits
        torch.testing.assert_close(packed[:, 7:], model(input_ids=b, use_cache=False).logits, rtol=0, atol=2e-5)


QWEN_VL_TEXT = {**ARCH, "vocab_size": 259, "head_dim": 8,
                "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}}
QWEN_VL = {  # name: (config class, settings): vision-language models whose rotary positions have sections
    "qwen2_vl": ("Qwen2VLConfig", {"vision_config": {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2}}),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", {"vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32,
                                                           "num_heads": 2, "out_hidden_size": 32}}),
    "qwen3_vl": ("Qwen3VLConfig", {"vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32,
                                                      "num_heads": 2, "out_hidden_size": 32,
                                                      "deepstack_visual_indexes": [0]}}),
}


def _separate_and_packed(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of two documents run alone, packed through ``packed_call``, and packed in a plain call."""
    a, b = torch.randint(0, 200, (1, 7)), torch.randint(0, 200, (1, 9))
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
        packed = packed_call(model, torch.cat([a, b], 1), None, positions).logits
        plain = model(input_ids=torch.cat([a, b], 1), position_ids=positions, use_cache=False).logits
    return alone, packed, plain


@pytest.mark.parametrize("name", list(QWEN_VL))
def test_models_with_multimodal_rotary_keep_packed_documents_apart(name):
    """Qwen2-VL / Qwen2.5-VL (and GLM-4V) widen ``[batch, seq]`` position ids to their three rotary rows and build no
    document mask from them: packed documents attended to each other there (before). ``packed_call`` passes the text
    row too (``[4, batch, seq]``): each document's logits are its logits alone, on every Qwen VL generation."""
    import transformers

    from lowmem_lightning.multimodal import causal_lm_auto_class

    cls, settings = QWEN_VL[name]
    config = getattr(transformers, cls)(text_config=QWEN_VL_TEXT, image_token_id=250, video_token_id=251,
                                        vision_start_token_id=252, **settings)
    torch.manual_seed(0)
    model = causal_lm_auto_class(config).from_config(config).eval()
    alone, packed, plain = _separate_and_packed(model)
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)
    leaks = (plain - alone).abs().amax() > 1e-3
    assert leaks == (name != "qwen3_vl"), "Qwen3-VL builds the four rows itself"


QWEN3_5 = {**ARCH, "num_hidden_layers": 4, "head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 2,
           "linear_key_head_dim": 8, "linear_value_head_dim": 8, "model_type": "qwen3_5_text"}
"""A Qwen3.5 text model: three linear-attention layers, then one of full attention."""


def test_layers_that_carry_state_across_documents_are_refused_before_the_build(tmp_path):
    """Qwen3.5's linear-attention layers (a recurrent state and a causal convolution, run through the whole block in
    transformers' PyTorch path) mix the documents of a packed block whatever the position ids: ``isolate_documents``
    trained them as one text without a word (before). Refused, naming the layers and what to set: by ``packed_call``,
    and by ``CausalLMModule`` from the config, before a weight exists; without ``isolate_documents`` it trains."""
    from lowmem_lightning.modules.packed_attention import layers_across_documents

    torch.manual_seed(0)
    model = build_causal_lm(config=QWEN3_5, device="cpu", torch_dtype="float32").eval()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.arange(7)[None]).logits,
                           model(input_ids=torch.arange(9)[None]).logits], 1)
        plain = model(input_ids=torch.cat([torch.arange(7), torch.arange(9)])[None],
                      position_ids=torch.cat([torch.arange(7), torch.arange(9)])[None], use_cache=False).logits
    assert (plain - alone).abs().amax() > 1e-3  # what is refused
    match = (r"Invalid isolate_documents=True for this qwen3_5_text model: its linear_attention layers \(3 of 4\) "
             r"carry state .* --data.init_args.isolate_documents false .* --data.init_args.pack false")
    with pytest.raises(ValueError, match=match):
        packed_call(model, torch.arange(16)[None], None, torch.cat([torch.arange(7), torch.arange(9)])[None])
    for isolate in (True, False):
        module = CausalLMModule(config=QWEN3_5, lr=1e-3)
        dm = TextDataModule(str(_records(tmp_path)), seq_len=40, batch_size=2, val_fraction=0.0,
                            isolate_documents=isolate)
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        if isolate:
            with pytest.raises(ValueError, match=match):
                trainer.fit(module, dm)
            assert module.model is None, "refused from the config, before the build"
        else:
            trainer.fit(module, dm)
            assert trainer.global_step == 1
    assert layers_across_documents(_tiny_llama("sdpa").config) == []
    llama = _tiny_llama("sdpa")
    llama.model.layers[0].mixer = torch.nn.Conv1d(4, 4, 3, groups=4)  # a token convolution no layer type names
    assert layers_across_documents(llama.config, llama) == ["token convolutions (model.layers.0.mixer, ...: 1 in all)"]



def test_recurrent_models_without_layer_types_are_refused():
    """RWKV and xLSTM carry state through every layer and list no ``layer_types``: ``isolate_documents`` is refused for
    them as for Qwen3.5 (before: RWKV's packed documents mixed, max |logit difference| 1.4,
    ``benchmarks/packed_documents_sweep.py``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_lightning.modules.packed_attention import packed_documents_problem

    config = AutoConfig.for_model("rwkv", hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                  intermediate_size=64, vocab_size=259)
    model = AutoModelForCausalLM.from_config(config).eval()
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with pytest.raises(ValueError, match=r"this rwkv model: its RWKV time-mixing layers \(2 of 2\) carry state"):
        packed_call(model, torch.arange(16)[None], None, positions)
    assert "its xLSTM layers (32 of 32) carry state" in packed_documents_problem(AutoConfig.for_model("xlstm"))


@pytest.mark.parametrize("model_type", ["openai-gpt", "xlm", "cpmant"])
def test_models_whose_masks_ignore_the_positions_are_refused(model_type):
    """transformers 5's OpenAI GPT, XLM and CPM-Ant build their attention masks without the mask functions that read
    restarting ``position_ids`` (their modeling modules import none): their packed documents mixed (max |logit
    difference| 5.8e-4 to 29 at the sweep's toy size, ``benchmarks/packed_documents_sweep.py``); ``isolate_documents``
    is now refused for them, naming what to set, and a model that calls the functions (GPT-2) is not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    toy = dict(n_embd=32, n_layer=2, n_head=4, emb_dim=32, n_layers=2, n_heads=4, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, dim_model=32, num_layers=2, dim_head=8, dim_ff=64, vocab_size=259)
    config = AutoConfig.for_model(model_type, **toy)
    model = AutoModelForCausalLM.from_config(config).eval()
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    refusal = rf"this {model_type} model: it builds its attention mask without transformers' mask functions"
    with pytest.raises(ValueError, match=refusal + r".*isolate_documents false"):
        packed_call(model, torch.arange(16)[None] + 3, None, positions)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **toy)).eval()
    assert packed_call(gpt2, torch.arange(16)[None] + 3, None, positions).logits.shape == (1, 16, 259)


def test_moe_and_mlp_layers_listed_among_the_mixers_are_not_taken_for_state():
    """Nemotron-H lists its MoE and MLP layers in ``layer_types`` beside its Mamba (``linear_attention``) and attention
    layers: the refusal named them as carrying state across documents too (before); they mix no tokens."""
    from transformers import NemotronHConfig

    from lowmem_lightning.modules.packed_attention import layers_across_documents

    config = NemotronHConfig(**{**ARCH, "layers_block_type": ["mamba", "moe", "attention", "mlp"], "head_dim": 8})
    assert layers_across_documents(config) == ["linear_attention layers (1 of 4)"]


def test_gemma4_keeps_packed_documents_apart_through_windows_shared_kv_and_per_layer_inputs():
    """Gemma 4 (E2B-like: sliding and full layers, the last layers reusing earlier layers' keys and values, per-layer
    input embeddings) builds its masks from restarting position ids: each of two packed documents longer than the
    window gives its logits alone."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    config = Gemma4TextConfig(**{**ARCH, "num_hidden_layers": 4, "head_dim": 8, "global_head_dim": 16,
                                 "vocab_size": 259, "sliding_window": 8, "num_kv_shared_layers": 2,
                                 "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 259,
                                 "layer_types": ["sliding_attention", "full_attention"] * 2})
    torch.manual_seed(0)
    packed, alone, _ = _packed_and_alone(AutoModelForCausalLM.from_config(config).eval(), low=0)
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)


def _packed_and_alone(model, low: int = 3):
    """``model``'s logits for two random documents of 20 and 23 tokens (ids from ``low``) packed in one row through
    ``packed_call``, the same documents' logits each alone, and the joined row's logits from the model's own call."""
    a, b = torch.randint(low, 250, (1, 20)), torch.randint(low, 250, (1, 23))
    positions = torch.cat([torch.arange(20), torch.arange(23)])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
        packed = packed_call(model, torch.cat([a, b], 1), None, positions).logits
        joined = model(input_ids=torch.cat([a, b], 1)).logits
    return packed, alone, joined



SMALL = {**ARCH, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 259}
MASKS_WITHOUT_POSITIONS = {
    # transformers 5 builds these models' masks without the position ids (BioGPT: from an all-ones mask it makes)
    "gpt_oss": {**SMALL, "num_hidden_layers": 4, "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
                "layer_types": ["sliding_attention", "full_attention"] * 2},
    "afmoe": {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "num_dense_layers": 1,
              "layer_types": ["full_attention"] * 2},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 259,
            "word_embed_proj_dim": 32},
    "bloom": {"hidden_size": 32, "n_layer": 2, "n_head": 4, "vocab_size": 259},
    "biogpt": {**ARCH, "vocab_size": 259},
    "xglm": {"d_model": 32, "ffn_dim": 64, "num_layers": 2, "attention_heads": 4, "vocab_size": 259},
}


@pytest.mark.parametrize("model_type", list(MASKS_WITHOUT_POSITIONS))
def test_models_that_build_their_masks_without_positions_keep_packed_documents_apart(model_type):
    """gpt-oss (eager attention with a sink per head, a sliding window in every other layer), AFMoE, OPT, BLOOM, BioGPT
    and XGLM build their attention masks without the position ids (transformers 5), so their own call lets the documents
    of a packed block see each other; ``packed_call`` hands the positions to their mask factories: each of two packed
    documents, longer than gpt-oss's window, gives its logits alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **MASKS_WITHOUT_POSITIONS[model_type]))
    model.eval()
    if model_type == "gpt_oss":
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()  # transformers starts them at 0
    packed, alone, after = _packed_and_alone(model)  # after: outside packed_call its masks are as transformers makes
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)
    assert (after[:, 20:] - alone[:, 20:]).abs().amax() > 1e-3  # one causal mask over both documents


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta", "camembert", "bert"])
def test_encoder_families_built_as_causal_lms_keep_packed_documents_apart(model_type):
    """Built as the package builds them (``is_decoder`` on: ``tests/test_encoder_as_decoder.py``). The RoBERTa family
    numbers positions after its padding index, so ``packed_call`` shifts the restarting positions by
    ``padding_idx + 1`` (before: RoBERTa, XLM-R, CamemBERT, Data2Vec-text, RoBERTa-PreLayerNorm gave other logits
    packed than alone, max |difference| 0.44-0.46 in ``benchmarks/packed_documents_sweep.py``); BERT's start at 0."""
    from lowmem_lightning.modules.causal_lm import build_causal_lm
    from lowmem_lightning.modules.packed_attention import position_offset

    torch.manual_seed(0)
    arch = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "vocab_size": 259}
    model = build_causal_lm(config={"model_type": model_type, **arch}, device="cpu").eval()
    assert position_offset(model) == (0 if model_type == "bert" else model.config.pad_token_id + 1)
    packed, alone, _ = _packed_and_alone(model)
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)
