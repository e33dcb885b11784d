"""Trainable token rows (peft's ``trainable_token_indices``, what ``CausalLMModule(resize_embeddings=True)`` trains
under LoRA) make no ``vocab x hidden`` copy of the embedding or head weight: peft's layer builds one per forward
per layer (the head's is saved for backward, across the loss peak) and a dense ``vocab x hidden`` gradient of it in
backward; ``add_lora``'s layers (``lowmem_lightning.quant.token_rows``) give peft's logits (bit for bit but the
trained columns in training), its gradients within fp32 rounding, and an adapter ``PeftModel.from_pretrained`` loads
to the same logits. Tiny Llama, tied and untied head, with and without gradient checkpointing; memory from torch's
profiler and ``saved_tensors_hooks`` on CPU; what remains at the peak is what ``lowmem estimate`` adds to the
activations (``token_rows_activation_bytes``), exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import DispatchedOps
from peft import PeftModel
from peft.tuners.trainable_tokens import TrainableTokensLayer
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_lightning.estimate import model_activation_bytes
from lowmem_lightning.quant import add_lora
from lowmem_lightning.quant.token_rows import CopyFreeTokensLayer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, BATCH, SEQ = 4000, 64, 2, 24
ROWS = [7, VOCAB - 2, VOCAB - 1]


def _base(tied: bool, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


def _lora(base: LlamaForCausalLM, rows: bool = True):
    """``add_lora`` as ``build_causal_lm`` calls it: the rows on the embedding (a tied head follows), or on the
    embedding and the untied head by name."""
    tied = base.lm_head.weight is base.model.embed_tokens.weight
    indices = None if not rows else ROWS if tied else {"model.embed_tokens": ROWS, "lm_head": ROWS}
    model = add_lora(base, 8, 16, 0.0, adapter_dtype=torch.float32, trainable_token_indices=indices)
    with torch.no_grad():  # trained rows away from their start and LoRA B off zero, so a wrong gradient shows
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _as_peft(model):
    """A copy of ``model`` whose token layers run peft's own forward (the full-size copy)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, CopyFreeTokensLayer):
            module.__class__ = TrainableTokensLayer
    return twin


def _ids() -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = torch.tensor([VOCAB - 1, 7, VOCAB - 2, VOCAB - 1])
    return ids


def _grads(model) -> dict[str, torch.Tensor]:
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_equal_peft_and_gradients_within_rounding(tied):
    """Bit for bit but the trained rows' logit columns in training (1 ulp: a ``hidden x rows`` product, not peft's
    ``hidden x vocab``), in fp32 and under bf16 autocast; gradients of every trained param within fp32 rounding."""
    model = _lora(_base(tied))
    assert sum(isinstance(m, CopyFreeTokensLayer) for m in model.modules()) == 2
    peft_twin = _as_peft(model)
    others = [row for row in range(VOCAB) if row not in ROWS]
    for autocast, rounding in ((False, 1e-6), (True, 1e-2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():  # validation, generation: the head runs peft's forward, bit for bit
                assert torch.equal(model(input_ids=_ids()).logits, peft_twin(input_ids=_ids()).logits)
            ours, theirs = model(input_ids=_ids()).logits, peft_twin(input_ids=_ids()).logits
        assert torch.equal(ours[..., others], theirs[..., others])  # training: only the trained columns may round
        torch.testing.assert_close(ours[..., ROWS], theirs[..., ROWS], rtol=rounding, atol=rounding)
    with torch.no_grad():  # int32 ids too
        embedded = model.get_input_embeddings()(_ids().int())
        assert torch.equal(embedded, peft_twin.get_input_embeddings()(_ids().int()))
    ours, theirs = _grads(model), _grads(peft_twin)
    assert ours.keys() == theirs.keys() and any("trainable_tokens_delta" in name for name in ours)
    for name, grad in ours.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, theirs[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_adapter_loads_with_peft_to_the_same_logits(tmp_path, tied):
    base = _base(tied)
    fresh = copy.deepcopy(base)
    model = _lora(base)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert not any(isinstance(m, CopyFreeTokensLayer) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, loaded(input_ids=_ids()).logits)


def _step_memory(model, checkpointing: bool) -> tuple[int, int, list[int]]:
    """``(bytes saved for backward, peak live bytes, sizes of allocations >= vocab x hidden)`` of one
    forward + backward in bf16: tensors saved beyond the model's own parameters (``saved_tensors_hooks``), and
    the allocator's events (torch's profiler, as tests/test_load_memory.py reads them)."""
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = _ids()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in own:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    big = sorted({e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage >= VOCAB * HIDDEN * 2})
    return sum(saved.values()), peak, big


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_no_vocab_by_hidden_copy_is_made_or_saved(tied, checkpointing):
    """peft's layers add one bf16 ``vocab x hidden`` copy (512,000 bytes here) to the saved tensors and to the
    peak, and allocate 4 such tensors per step; ours allocate none. What they save beyond LoRA alone is
    activation-sized, exactly: the head's input (``n x hidden``, bf16: the trained rows' gradient needs it; peft
    saves it too), the embedding's row slots (int64) and trained-position mask (bool), the ids and the bf16 rows,
    and without checkpointing the first decoder layer's fp32 norm input and its rsqrt (the embedding output now
    needs a gradient; with checkpointing LoRA alone saves them already)."""
    copy_bytes = VOCAB * HIDDEN * 2
    logits_bytes = BATCH * SEQ * VOCAB * 4  # the fp32 logits / log-softmax, the only tensors this size without rows
    n, rows = BATCH * SEQ, len(ROWS)
    remaining = n * HIDDEN * 2 + n * (8 + 1) + rows * (8 + HIDDEN * 2) + (0 if checkpointing else n * (HIDDEN + 1) * 4)
    lora_only, with_rows = _lora(_base(tied, torch.bfloat16), rows=False), _lora(_base(tied, torch.bfloat16))
    estimated = {model: model_activation_bytes(model, BATCH, SEQ, checkpointing)[0] for model in (lora_only, with_rows)}
    saved_lora, peak_lora, big_lora = _step_memory(lora_only, checkpointing)
    saved, peak, big = _step_memory(with_rows, checkpointing)
    assert big == big_lora == [logits_bytes]
    assert saved - saved_lora == remaining
    assert peak - peak_lora <= remaining + rows * 8 < copy_bytes / 25
    # at the peak (the loss) the head's input is live without rows too: lowmem estimate adds the rest and the
    # embedding's int64 ids (made in the first step, kept: not saved for backward), exactly
    assert estimated[with_rows] - estimated[lora_only] == peak - peak_lora == remaining - n * HIDDEN * 2 + rows * 8
    assert peak - peak_lora == (864 if checkpointing else 13_344)  # the figures README.md quotes
    assert "trained token rows" in model_activation_bytes(with_rows, BATCH, SEQ, checkpointing)[1]


def test_a_step_builds_no_index_tensor_from_the_python_list_after_the_first():
    """The trained rows' index is made once per layer and device, not from ``token_indices`` (a Python list) on every
    forward: on a GPU that is a pageable host-to-device copy, which waits for the device (a host sync per step).
    Seen on CPU as the ``lift_fresh`` op ``torch.tensor`` dispatches."""
    def fresh_tensors(rows: bool) -> tuple[int, list[str]]:
        model = _lora(_base(tied=False), rows=rows)
        _grads(model)  # the first step makes the index
        with DispatchedOps() as ops:
            _grads(model)
        return sum("lift_fresh" in name for name in ops.names), ops.names

    with_rows, names = fresh_tensors(rows=True)
    assert any("index_copy" in name for name in names)  # the copy-free head ran
    assert with_rows == fresh_tensors(rows=False)[0]  # transformers' own tensors only (rotary, positions)


def _token_layers(model) -> tuple[TrainableTokensLayer, TrainableTokensLayer]:
    """The input embedding's and the untied head's token layers of ``model`` (ours, or peft's in a twin)."""
    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    embedding = next(m for m in layers if isinstance(m.base_layer, torch.nn.Embedding))
    head = next(m for m in layers if isinstance(m.base_layer, torch.nn.Linear))
    return embedding, head


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16_autocast"])
def test_cuda_token_layers_match_peft_without_sync_or_copy(autocast):
    """On a GPU, a bf16 base: the copy-free embedding and head give peft's outputs and gradients (bf16 rounding),
    their forward + backward never synchronise with the host (sync debug mode ``error``, after the first step made
    the index), and the head's peak holds no ``vocab x hidden`` copy where peft's holds one."""
    model = _lora(_base(tied=False, dtype=torch.bfloat16)).cuda()
    twin = _as_peft(model)
    ids = _ids().cuda()
    hidden = torch.randn(BATCH, SEQ, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(layers) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]:
        embedding, head = layers
        for layer in layers:
            layer.trainable_tokens_delta["default"].grad = None
        hidden.grad = None
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            embedded, logits = embedding(ids), head(hidden)
        (embedded.float().square().sum() + logits.float().logsumexp(-1).sum()).backward()
        peak = torch.cuda.max_memory_allocated() - start
        grads = {"hidden": hidden.grad, **{f"delta{i}": layer.trainable_tokens_delta["default"].grad
                                           for i, layer in enumerate(layers)}}
        return embedded, logits, grads, peak

    ours_layers = _token_layers(model)
    step(ours_layers)  # the first step makes each layer's index
    torch.cuda.set_sync_debug_mode("error")
    try:
        embedded, logits, grads, peak = step(ours_layers)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    peft_embedded, peft_logits, peft_grads, peft_peak = step(_token_layers(twin))
    assert torch.equal(embedded, peft_embedded)
    torch.testing.assert_close(logits, peft_logits, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.float(), peft_grads[name].float(), rtol=2e-2, atol=2e-2, msg=name)
    copy_bytes = VOCAB * HIDDEN * 2
    assert peak + copy_bytes <= peft_peak, (peak, peft_peak)
