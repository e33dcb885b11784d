"""QLoRA users' complaints (bitsandbytes 4-bit + peft + transformers) as requirements: each test reproduces one
reported situation against our NF4 layers.

The issue each test follows is named in its docstring (``owner/repo#N``); the situation is the user's (their
calls, made tiny and on the CPU), the assertion is what the user expected. Complaints already guarded elsewhere
(deep copy, gradient checkpointing, merge / unmerge in ``test_field_peer_complaints.py``; the recipe as written in
``test_peft_native.py``) and those that do not apply to us are not here; the triage is in the task report.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lowmem_lightning.quant import (
    Linear4bit,
    ModelFileError,
    dequantize_model,
    load_pretrained_causal_lm,
    quantize_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128


@pytest.fixture(scope="module")
def dense_qwen2():
    """A tiny Qwen2 (q/k/v projections with biases, untied head), full precision, non-zero biases: every test
    quantizes a copy, so two bases hold identical codes."""
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def _base(dense, dtype=torch.float32):
    return quantize_model(copy.deepcopy(dense).to(dtype))


def _ids(length=12):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def _train(model, steps=3):
    ids = _ids()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _logits(model, ids=None):
    return model(input_ids=_ids() if ids is None else ids).logits.float()


def _codes(model):
    return {f"{n}.{b}": t.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)
            for b, t in m.named_buffers(recurse=False)}


# ---------------------------------------------------------------------------------------------- save / reload
def test_adapters_with_trained_biases_and_head_reload_and_merge_to_the_same_outputs(dense_qwen2, tmp_path):
    """huggingface/peft#1815 and #1678 (a QLoRA adapter reloaded with ``PeftModel.from_pretrained`` gave other
    outputs), huggingface/peft#602 (``modules_to_save`` with a 4-bit base trained the original head, not the saved
    copy) and huggingface/transformers#31293 (``merge_and_unload`` of a 4-bit model ruined its quality). Here with
    ``bias="all"`` too, so the 4-bit layers' own biases train. Trained, saved, reloaded on a fresh 4-bit base: the
    same logits; merged, made dense and saved with ``save_pretrained``: ``from_pretrained`` gives them back."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], bias="all",
                        modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(_base(dense_qwen2), config)
    codes = _codes(model)
    _train(model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, Linear4bit)
    assert not torch.equal(q_proj.bias, dense_qwen2.model.layers[0].self_attn.q_proj.bias)
    head = model.base_model.model.lm_head
    assert torch.equal(head.original_module.weight, dense_qwen2.lm_head.weight)  # the copy trained, not the original
    assert not torch.equal(head.modules_to_save["default"].weight, dense_qwen2.lm_head.weight)
    assert all(torch.equal(t, codes[k]) for k, t in _codes(model).items())
    adapted = _logits(model)
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(_base(dense_qwen2), tmp_path / "adapter").eval()
    assert torch.equal(_logits(reloaded), adapted)

    merged = dequantize_model(reloaded.merge_and_unload())
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(exported), adapted, rtol=0, atol=1e-5)


def test_save_pretrained_of_a_4bit_model_loads_back_in_4bit(dense_qwen2, tmp_path):
    """bitsandbytes-foundation/bitsandbytes#1123 and #738 (a model saved in 4 bits could not be loaded back as it was
    saved; huggingface/peft#508 asked whether the quantization state is saved at all). ``save_pretrained`` of our
    4-bit model writes the NF4 codes and scales; ``load_pretrained_causal_lm`` of that directory gives the same
    codes and the same logits (it refused it as 'a checkpoint of another model'), and its fp32 scales are not
    rounded to a bf16 load dtype. Loaded without ``quantize``,
    the refusal says the file holds NF4 codes and how it loads."""
    model = _base(dense_qwen2)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained_causal_lm(tmp_path, torch_dtype=torch.float32)
    saved = _codes(model)
    assert _codes(loaded).keys() == saved.keys()
    assert all(torch.equal(t, saved[k]) and t.dtype == saved[k].dtype for k, t in _codes(loaded).items())
    assert all(m.is_quantized for m in loaded.modules() if isinstance(m, Linear4bit))
    assert torch.equal(_logits(loaded), _logits(model))
    in_bf16 = _codes(load_pretrained_causal_lm(tmp_path, torch_dtype=torch.bfloat16))  # the fp32 scales as stored
    assert all(torch.equal(t, saved[k]) and t.dtype == saved[k].dtype for k, t in in_bf16.items())
    with pytest.raises(ModelFileError, match=r"holds NF4 codes \(e\.g\. 'model\.layers\.0\..*qweight'\).*'nf4'"):
        load_pretrained_causal_lm(tmp_path, quantize=None, torch_dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- dtypes / generate
def test_generate_with_a_bf16_base_fp32_norms_and_fp32_adapters(dense_qwen2):
    """huggingface/trl#4457 (``prepare_model_for_kbit_training``'s fp32 upcast of norms then 'expected scalar type
    Float but found Half' in a linear layer), haotian-liu/LLaVA#1712 ('expected scalar type BFloat16 but found
    Float' in QLoRA training). A bf16 4-bit base, norms upcast to fp32 by peft, fp32 adapters: a training step and
    greedy ``generate`` (with and without the KV cache, giving the same tokens) run, with and without bf16
    autocast."""
    model = prepare_model_for_kbit_training(_base(dense_qwen2, torch.bfloat16))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(m.weight_dtype == torch.bfloat16 and m.is_quantized for m in layers)
    ids = _ids(6)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            assert torch.isfinite(loss)
            model.eval()
            with torch.no_grad():
                cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                        do_sample=False, use_cache=True, pad_token_id=0)
                uncached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                          do_sample=False, use_cache=False, pad_token_id=0)
        assert cached.shape == (2, 10) and torch.equal(cached, uncached)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_compute_follows_the_input_dtype_unless_a_compute_dtype_is_set():
    """bitsandbytes-foundation/bitsandbytes#1177 (with ``bnb_4bit_compute_dtype`` left at its float32 default, fp16
    inputs were computed in fp32: 'slow inference', bigcode-project/bigcode-evaluation-harness#192). Ours computes in
    the input's dtype by default (fp16 in, fp16 math and out), and in ``compute_dtype`` when one is set (the output
    then back in the input's dtype)."""
    linear = nn.Linear(128, 64)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    default = Linear4bit.from_linear(linear)
    weight = default.dequantize(torch.float32)
    out = default(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, x.half() @ weight.half().t() + linear.bias.detach().half())
    in_bf16 = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    out = in_bf16(x)
    assert out.dtype == torch.float32
    expected = (x.bfloat16() @ weight.bfloat16().t() + linear.bias.detach().bfloat16()).float()
    torch.testing.assert_close(out, expected)


def test_to_half_and_back_keeps_the_codes_and_moves_only_the_compute_dtype(dense_qwen2):
    """bitsandbytes-foundation/bitsandbytes#547 ('``.to`` is not supported for 4-bit models') and #738 (``model.to(
    torch.bfloat16)`` raised on a 4-bit model). ``.to(bf16)``, ``.half()`` and ``.float()`` of our 4-bit model keep
    every NF4 code and scale bit for bit, change the decode dtype and the dense params, and the model still computes
    the same function (within the rounding of the dense params, embeddings and norms, which these casts round)."""
    model = _base(dense_qwen2)
    codes, reference = _codes(model), _logits(model)
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (nn.Module.half, torch.float16),
                        (nn.Module.float, torch.float32)):
        cast(model)
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        assert all(m.weight_dtype == dtype and (m.bias is None or m.bias.dtype == dtype) for m in layers)
        assert model.model.embed_tokens.weight.dtype == dtype
        after = _codes(model)
        assert after.keys() == codes.keys()
        assert all(torch.equal(t, codes[k]) and t.dtype == codes[k].dtype for k, t in after.items())
        torch.testing.assert_close(_logits(model), reference, rtol=0, atol=0.05)  # the dense params' rounding


# ---------------------------------------------------------------------------------------------- vocabulary
def test_resized_vocabulary_trains_with_saved_embeddings_and_reloads(dense_qwen2, tmp_path):
    """huggingface/peft#2290 (after ``resize_token_embeddings``, reloading the adapter failed: 'size mismatch for
    ...embed_tokens.base_layer.weight') on a 4-bit model with ``modules_to_save=["embed_tokens", "lm_head"]``. The
    head stays dense after quantizing, so the resize reaches both tables; the adapter reloads on a fresh base resized
    the same way and gives the same logits, new tokens included."""
    def resized():
        torch.manual_seed(3)  # the resize draws the new rows
        model = _base(dense_qwen2)
        model.resize_token_embeddings(VOCAB + 8, mean_resizing=False)
        return model

    model = resized()
    assert model.get_output_embeddings().weight.shape == (VOCAB + 8, 64)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"],
                        task_type="CAUSAL_LM")
    model = _train(get_peft_model(model, config))
    ids = torch.randint(VOCAB - 4, VOCAB + 8, (2, 12), generator=torch.Generator().manual_seed(2))
    adapted = _logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(resized(), tmp_path).eval()
    assert torch.equal(_logits(reloaded, ids), adapted)


# ---------------------------------------------------------------------------------------------- copies / resume
@pytest.mark.usefixtures("bitsandbytes_flag")
def test_4bit_classifier_with_lora_copies_resumes_and_reloads(dense_qwen2, tmp_path):
    """huggingface/accelerate#2248 (``copy.deepcopy`` of a 4-bit peft sequence classifier failed; TRL deep-copies
    the model for a reference model), huggingface/peft#602 (a 4-bit classifier's ``score`` head in
    ``modules_to_save`` trained the original, not the saved copy) and huggingface/peft#508 (is the 4-bit state in
    the ``state_dict`` at all?). A 4-bit Qwen2 classifier with LoRA (``task_type="SEQ_CLS"``): its deep copy and its
    ``torch.save``/``torch.load`` give the same logits and are independent (merging the original leaves the copy
    4-bit), the trained ``score`` is the saved copy, and the whole ``state_dict`` (a Lightning checkpoint) and the
    saved adapter both restore the same logits on a fresh 4-bit base."""
    import io

    from transformers import Qwen2ForSequenceClassification

    def classifier():
        torch.manual_seed(4)
        dense = Qwen2ForSequenceClassification(dense_qwen2.config.__class__(**{**dense_qwen2.config.to_dict(),
                                                                               "num_labels": 3, "pad_token_id": 0}))
        dense.model.load_state_dict(dense_qwen2.model.state_dict())
        return quantize_model(dense.eval())

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = get_peft_model(classifier(), config)
    score = model.base_model.model.score
    assert type(score.original_module) is nn.Linear  # kept dense by quantize_model, trained whole by peft
    before = score.original_module.weight.clone()
    ids, labels = _ids(), torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert torch.equal(score.original_module.weight, before)
    assert not torch.equal(score.modules_to_save["default"].weight, before)
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        inner = other.base_model.model
        assert inner.is_loaded_in_4bit and inner.is_loaded_in_4bit._model is inner
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids).logits, trained)

    resumed = get_peft_model(classifier(), config)
    result = resumed.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(classifier(), tmp_path)
    for other in (resumed, reloaded):
        with torch.no_grad():
            assert torch.equal(other.eval()(input_ids=ids).logits, trained)

    model.merge_and_unload()
    inner = twin.base_model.model
    assert inner.is_loaded_in_4bit and all(m.is_quantized for m in inner.modules() if isinstance(m, Linear4bit))


def test_layers_peft_trains_whole_for_a_classifier_stay_dense():
    """huggingface/peft#1720 ('only Tensors of floating point dtype can require gradients' for QLoRA on DistilBERT:
    peft's ``task_type="SEQ_CLS"`` puts every module whose name ends with ``classifier`` in ``modules_to_save``,
    ``pre_classifier`` too, and that layer was 4-bit). With our NF4 layer the same situation trained nothing but its
    bias, silently. ``quantize_model`` keeps ``pre_classifier`` dense, so peft's copy of it trains whole."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=VOCAB, num_labels=2)
    model = quantize_model(DistilBertForSequenceClassification(config))
    assert isinstance(model.distilbert.transformer.layer[0].attention.q_lin, Linear4bit)
    assert type(model.pre_classifier) is nn.Linear and type(model.classifier) is nn.Linear
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS"))
    pre = model.base_model.model.pre_classifier.modules_to_save["default"]
    assert pre.weight.requires_grad
    before = pre.weight.detach().clone()
    model.train()
    model(input_ids=_ids(), labels=torch.tensor([0, 1])).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(pre.weight, before)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_ranks(rank, seed_by_rank):
    """One forked rank: a 4-bit model built from this rank's own seed, its NF4 buffers kept out of DDP's buffer sync;
    returns the codes after the one broadcast, the buffers DDP syncs and the bytes broadcast by a training forward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lowmem_lightning.quant import ddp_skip_nf4_buffers

    torch.manual_seed(rank if seed_by_rank else 0)
    model = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)))
    model[2] = get_peft_model(nn.Sequential(model[2]), LoraConfig(r=4, target_modules=["0"]))
    names = ddp_skip_nf4_buffers(model)
    ddp = DistributedDataParallel(model)
    synced = [name for name, b in model.named_buffers() if any(b is s for s in ddp.modules_buffers)]
    sent, broadcast = [], dist._broadcast_coalesced

    def counting(group, tensors, *args, **kwargs):
        sent.append(sum(t.numel() * t.element_size() for t in tensors))
        return broadcast(group, tensors, *args, **kwargs)

    dist._broadcast_coalesced = counting
    try:
        ddp.train()
        ddp(torch.randn(4, 64)).sum().backward()
    finally:
        dist._broadcast_coalesced = broadcast
    return {"names": names, "codes": _codes(model), "synced": synced, "sent": sum(sent)}


def test_ddp_does_not_broadcast_the_frozen_4bit_base_at_every_step(tmp_path):
    """artidoro/qlora#12 and huggingface/trl#921 (multi-GPU QLoRA under DDP: GPUs under-used, slower than one). DDP
    broadcasts every buffer of the wrapped module before each training forward, and our NF4 codes and scales are
    buffers: the whole frozen base crossed the network at every step (bitsandbytes' frozen 4-bit parameters are sent
    once, at wrapping). ``ddp_skip_nf4_buffers`` keeps them out of DDP's buffer sync after one broadcast from rank 0,
    so two ranks that built their base from different seeds hold rank 0's codes, and a training forward sends no
    NF4 byte."""
    from forked_ranks import forked_ranks

    results = forked_ranks(tmp_path, 2, _ddp_ranks, True, timeout_s=120)
    names = results[0]["names"]
    assert len(names) == 2 * 4 and all(name.rsplit(".", 1)[1] in ("qweight", "qscale", "scale_step", "scale_mean")
                                       for name in names)
    for result in results:
        assert not set(result["synced"]) & set(names) and result["sent"] == 0
        assert result["codes"].keys() == results[0]["codes"].keys()
        assert all(torch.equal(t, results[0]["codes"][k]) for k, t in result["codes"].items())


def test_causal_lm_module_under_ddp_keeps_its_nf4_buffers_out_of_the_buffer_sync():
    """artidoro/qlora#12, through ``CausalLMModule`` (``lowmem fit --trainer.strategy ddp``): with QLoRA under the
    DDP strategy, the module DDP wraps lists every NF4 buffer in ``_ddp_params_and_buffers_to_ignore``, so DDP syncs
    none of them; the LoRA weights are still the parameters DDP reduces."""
    import lightning as L

    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 128}
    from torch.nn.parallel import DistributedDataParallel

    class SyncedBuffers(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            ddp = trainer.strategy.model
            assert isinstance(ddp, DistributedDataParallel)
            self.names = {name for name, b in module.named_buffers() if any(b is s for s in ddp.modules_buffers)}

    module = CausalLMModule(config=tiny, quantize="nf4", lora={"r": 4}, optimizer="adamw", lr=1e-3)
    seen = SyncedBuffers()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[seen])
    environ = dict(os.environ)
    try:
        trainer.fit(module, TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.02, seed=0))
    finally:  # the strategy's process group and environment would outlive the test: later forked ranks could not
        if torch.distributed.is_initialized():  # init_process_group ("trying to initialize ... twice")
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    nf4 = {f"{n}.{b}" for n, m in module.named_modules() if isinstance(m, Linear4bit)
           for b, _ in m.named_buffers(recurse=False)}
    assert nf4 and nf4 <= set(module._ddp_params_and_buffers_to_ignore)
    assert not seen.names & nf4
    reduced = {name for name, p in module.named_parameters() if p.requires_grad}
    assert reduced and all("lora_" in name for name in reduced)


def test_dequantize_first_then_merge_keeps_the_adapted_outputs(dense_qwen2, tmp_path):
    """huggingface/peft#2321 ('Merge lora module to 4-bit linear may get different generations': the advice is to
    dequantize the base, then merge). ``dequantize_model`` of the peft model (adapters still unmerged) keeps its
    outputs (to bf16 rounding); ``merge_and_unload`` then rounds once to bf16, and the saved model loads in bf16 with
    those outputs."""
    model = get_peft_model(_base(dense_qwen2, torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapted = _logits(model)
    dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    assert not model.base_model.model.is_loaded_in_4bit
    # bf16 roundings only: nn.Linear adds its bias inside the matmul, Linear4bit after it; the merge rounds once
    torch.testing.assert_close(_logits(model), adapted, rtol=0, atol=0.02)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged), adapted, rtol=0, atol=0.02)
    merged.save_pretrained(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert exported.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(exported), adapted, rtol=0, atol=0.02)


# ------------------------------------------------------------------------------ prepare_model_for_kbit_training upcast
FROZEN_DENSE = 2 * VOCAB * 64 + 5 * 64 + 2 * (64 + 32 + 32)
"""Elements of the tiny Qwen2's frozen params beside its NF4 layers: embeddings and head, 5 norms, 2 x q/k/v biases."""


def _frozen_dense_bytes(model) -> int:
    return sum(p.nbytes for p in model.parameters() if not p.requires_grad)


@pytest.mark.usefixtures("bitsandbytes_flag")
def test_prepare_for_kbit_training_prepares_as_peft_without_the_fp32_copies(dense_qwen2):
    """bitsandbytes-foundation/bitsandbytes#1569 ("QLoRA with prepare_model_for_kbit_training uses more memory than
    bf16 LoRA": 81 GB against 63 without it), huggingface/peft#816, #1149: peft's function casts every frozen 16-bit
    param (embeddings, head, norms) to fp32, twice their memory for weights nothing trains. Ours freezes, turns on
    gradient checkpointing and input gradients as peft's does, casts nothing, and the LoRA model trains."""
    from lowmem_lightning.quant import prepare_for_kbit_training

    theirs = prepare_model_for_kbit_training(_base(dense_qwen2, torch.bfloat16))
    base = _base(dense_qwen2, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.25's old checkpointing name warns
        ours = prepare_for_kbit_training(base)
    for model in (theirs, ours):
        assert model.is_gradient_checkpointing and not any(p.requires_grad for p in model.parameters())
    assert ours.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}  # torch's advice
    reentrant = prepare_for_kbit_training(_base(dense_qwen2, torch.bfloat16), True, {"use_reentrant": True})
    assert reentrant.get_input_embeddings()(_ids()).requires_grad  # reentrant needs one
    assert {p.dtype for p in theirs.parameters()} == {torch.float32}
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert _frozen_dense_bytes(theirs) == 2 * _frozen_dense_bytes(ours) == 2 * 2 * FROZEN_DENSE
    codes = {n: b for n, b in ours.named_buffers()}
    assert all(torch.equal(codes[n], b) for n, b in theirs.named_buffers())  # the same NF4 layers
    lora = get_peft_model(ours, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    loss = lora(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for n, p in lora.named_parameters() if "lora_A" in n)
    unprepared = prepare_for_kbit_training(_base(dense_qwen2, torch.bfloat16), use_gradient_checkpointing=False)
    assert not unprepared.is_gradient_checkpointing


def _lightning_qlora(dense, prepare):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            base = prepare(_base(dense, torch.bfloat16))
            self.model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def train_dataloader(self):
            return DataLoader(TensorDataset(_ids()), batch_size=2)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    return Module()


@pytest.mark.parametrize("prepare, warned", [(prepare_model_for_kbit_training, True), ("ours", False)])
def test_the_callback_says_when_peft_cast_the_frozen_weights_up(dense_qwen2, prepare, warned):
    """A user's LightningModule written as the QLoRA tutorials write it (quantize, prepare_model_for_kbit_training,
    get_peft_model) under ``LowMemOptimizerCallback``: one warning at fit start names the fp32 frozen bytes, the
    extra over bf16 and ``prepare_for_kbit_training``; prepared with that one, nothing is said."""
    import warnings

    import lightning as L

    from lowmem_lightning.callbacks import LowMemOptimizerCallback
    from lowmem_lightning.lowmem_warning import LowMemWarning
    from lowmem_lightning.quant import prepare_for_kbit_training

    module = _lightning_qlora(dense_qwen2, prepare_for_kbit_training if prepare == "ours" else prepare)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    notes = [str(w.message) for w in caught if issubclass(w.category, LowMemWarning) and "float32" in str(w.message)]
    assert trainer.global_step == 1 and len(notes) == int(warned), notes
    if warned:
        assert notes[0].startswith(f"The 13 frozen params outside the NF4 layers are float32 "
                                   f"({4 * FROZEN_DENSE / 2**20:,.1f} MiB, largest ")
        assert "bfloat16 weights: peft's prepare_model_for_kbit_training casts" in notes[0]
        assert "lowmem_lightning.quant.prepare_for_kbit_training(model)" in notes[0]
