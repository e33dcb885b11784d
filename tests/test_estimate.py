"""``lowmem estimate``: exact counts from meta models, state bytes equal to the real optimizers'."""

from __future__ import annotations

import json

import pytest
import torch
from optim_helpers import count_state_once
from torch import nn

from lowmem_lightning.cli import bundled_recipes, main, parse_fit_config
from lowmem_lightning.estimate import (
    OPTIMIZER_VARIANTS,
    count_model,
    estimate_memory,
    format_json,
    format_table,
    optimizer_state_bytes,
)
from lowmem_lightning.optim import build_optimizer, state_memory

SHAPES = [(4097,), (7,), (64, 80), (3, 5), (1000, 3), (2, 3, 700)]
"""Quantized and fp32-fallback sizes (4096 elements is the 8-bit threshold), 1-D, 2-D and 3-D."""


def _params(dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return [
        nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device))
        for shape in SHAPES
    ]


def _measured(name: str, kwargs: dict, dtype=torch.float32) -> tuple[int, int, list[int]]:
    """``(device_bytes, host_bytes, page_bytes_per_param)`` of the real optimizer after one step.

    Resident paging buffers (device copies of host pages, bounded by the paging budget) are left out
    of the device bytes; ``page_bytes_per_param`` lists each param's host-page bytes (paged only).
    """
    params = _params(dtype)
    opt = build_optimizer(name, params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    mem = state_memory(opt)
    resident = sum(r.nbytes for r in getattr(opt, "_resident", {}).values())
    pages = []
    if getattr(opt, "is_paged", False):
        for state in opt.state.values():
            page = sum(v.numel() * v.element_size() for k, v in state.items() if k.endswith(("_codes", "_absmax")))
            pages += [page] if page else []
    return mem.device_bytes - resident, mem.host_bytes, pages


@pytest.mark.parametrize("row", sorted(OPTIMIZER_VARIANTS))
def test_state_bytes_equal_real_optimizer_after_one_step(row):
    name, kwargs = OPTIMIZER_VARIANTS[row]
    meta = [nn.Parameter(p.to("meta")) for p in _params()]
    device, host = optimizer_state_bytes(name, meta, **kwargs)
    real_device, real_host, pages = _measured(name, kwargs)
    assert host == real_host
    if "paged" in name:
        # the estimate adds the pages in flight: the current tensor's and the prefetched next one's
        assert len(pages) == sum(p.numel() >= 4096 for p in meta) and sum(pages) == real_host
        assert device == real_device + sum(sorted(pages)[-2:])
    else:
        assert device == real_device


def test_bf16_params_same_layout_as_measured():
    meta = [nn.Parameter(p.to("meta")) for p in _params(torch.bfloat16)]
    for name in ("adamw", "adamw_8bit", "sgd"):
        kwargs = OPTIMIZER_VARIANTS[name][1]
        assert optimizer_state_bytes(name, meta, **kwargs) == _measured(name, kwargs, torch.bfloat16)[:2]


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.LayerNorm(4)
        self.norm.requires_grad_(False)
        self.register_buffer("table", torch.zeros(3, dtype=torch.float16))


def test_count_model_dedupes_tied_and_splits_frozen_by_dtype():
    count = count_model(_Tied())
    assert count.params == 10 * 4 + 4 + 4
    assert count.trainable_params == 40
    assert count.frozen_bytes_by_dtype == {"float16": 6, "float32": 32}
    assert count.gradient_bytes == count.trainable_bytes == 160


def test_nf4_and_lora_counts_on_a_tiny_llama():
    from lowmem_lightning.modules.causal_lm import build_causal_lm
    from lowmem_lightning.quant import Linear4bit, linear4bit_bytes

    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 300}
    full = build_causal_lm(None, cfg, device="meta")
    qlora = build_causal_lm(None, cfg, "nf4", {"r": 4, "alpha": 8}, device="meta")
    base, count = count_model(full), count_model(qlora)
    assert count.params == base.params == sum(p.numel() for p in full.parameters())
    layers = [m for m in qlora.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 2 * 7
    assert count.frozen_bytes_by_dtype["nf4"] == sum(linear4bit_bytes(m.in_features, m.out_features) for m in layers)
    # r * (in + out) per adapted projection
    expected_lora = 2 * 4 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert count.adapter_params == count.trainable_params == expected_lora


def test_recommendation_follows_the_decision_rule():
    """Per-tensor release (bucket_bytes=0): the released totals keep only the largest tensor's gradient."""
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(12)])
    free = estimate_memory(model, bucket_bytes=0)
    rows = {name: row.total_device_bytes for name, row in free.optimizers.items()}
    assert free.recommendation is None and all(r.fits is None for r in free.optimizers.values())
    assert rows["adamw"] > rows["adamw_8bit"] > rows["adafactor_beta1_int8"] > rows["paged_adamw_8bit"]
    assert rows["paged_adamw_8bit"] > rows["adafactor"]

    # the order among the other rows (adamw_4bit, below 8-bit AdamW in the order, has the smallest state of
    # them on these 128x128 layers and would take every pick below: tests/test_adamw4bit.py checks it)
    others = {name: row for name, row in OPTIMIZER_VARIANTS.items() if name != "adamw_4bit"}

    def pick(budget):
        return estimate_memory(model, budget_bytes=budget, bucket_bytes=0, variants=others).recommendation

    assert pick(rows["adamw"]) == "adamw"
    assert pick(rows["adamw"] - 1) == "adamw_8bit"
    assert rows["came"] > rows["adamw_8bit"] > rows["came_int8"]  # fp32 momentum: 4 B/param
    assert pick(rows["adamw_8bit"] - 1) == "came_int8"
    assert pick(rows["came_int8"] - 1) == "adafactor_beta1_int8"
    # a full fine-tune that fits nothing with its gradient buffer: the same order with gradient release
    released = {name: row.released_device_bytes for name, row in free.optimizers.items()}
    largest = 128 * 128 * 4
    assert all(rows[name] - released[name] == free.model.gradient_bytes - largest for name in rows)
    assert released["adamw"] > rows["adafactor_beta1_int8"] > released["adamw_8bit"]
    assert pick(rows["adafactor_beta1_int8"] - 1) == "adamw_8bit + step_in_backward"
    assert pick(released["adamw_8bit"] - 1) == "came_int8 + step_in_backward"
    assert pick(released["came_int8"] - 1) == "adafactor_beta1_int8 + step_in_backward"
    assert rows["paged_adamw_8bit"] > released["adafactor_beta1_int8"] > released["paged_adamw_8bit"]
    assert pick(released["adafactor_beta1_int8"] - 1) == "paged_adamw_8bit + gradient checkpointing + step_in_backward"
    assert pick(released["paged_adamw_8bit"] - 1) == "adafactor + step_in_backward"
    assert pick(released["adafactor"] - 1).startswith("nothing fits")
    # without a release option (its totals above the budget) the old rule holds
    assert rows["paged_adamw_8bit"] > rows["adafactor"]
    released_run = estimate_memory(model, budget_bytes=released["came_int8"], step_in_backward=True, bucket_bytes=0,
                                   variants=others)
    assert released_run.optimizers["came_int8"].total_device_bytes == released["came_int8"]
    assert released_run.recommendation == "came_int8"  # the run releases already: not advised again
    assert released_run.as_dict()["gradient_device_bytes"] == largest


def test_json_and_table_outputs():
    est = estimate_memory(nn.Linear(100, 100), budget_bytes=10**9, configured=("came", {"lr": 5e-4}))
    data = json.loads(format_json(est))
    assert data["params"] == data["trainable_params"] == 10100
    assert data["configured_optimizer"] == "came"
    for row in OPTIMIZER_VARIANTS:
        assert isinstance(data["optimizers"][row]["state_bytes"], int)
    table = format_table(est)
    assert "came *" in table and "recommended: adamw (the configured came fits too)" in table
    tight = estimate_memory(nn.Linear(100, 100), budget_bytes=est.optimizers["came"].total_device_bytes - 1,
                            configured=("came", {"lr": 5e-4}))
    assert "fits too" not in format_table(tight)  # the configured optimizer does not fit: nothing to add
    same = estimate_memory(nn.Linear(100, 100), budget_bytes=10**9, configured=("adamw", {}))
    assert "recommended: adamw\n" in format_table(same) + "\n" and "fits too" not in format_table(same)


QLORA_PARAMS = 6_738_415_616
QLORA_TRAINABLE = 39_976_960


def test_qlora_7b_recipe_exact_counts(capsys):
    from lowmem_lightning.cli import main

    assert main(["estimate", "--config", "qlora_7b.yaml", "--format", "json", "--budget-gb", "6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == QLORA_PARAMS
    assert data["trainable_params"] == QLORA_TRAINABLE
    assert 3.8e9 < data["frozen_bytes"] < 3.95e9  # ~3.9 GB: NF4 linear layers + bf16 embeddings/head/norms
    assert data["frozen_bytes_by_dtype"]["nf4"] > 3.3e9
    paged = data["optimizers"]["paged_adamw_8bit"]
    assert 78e6 < paged["state_bytes"] < 84e6  # ~80 MB
    assert paged["host_state_bytes"] == data["optimizers"]["adamw_8bit"]["state_bytes"] - 448 * 4
    assert data["optimizers"]["adamw"]["state_bytes"] == 8 * QLORA_TRAINABLE + 448 * 4
    assert data["configured_optimizer"] == "paged_adamw_8bit"
    assert data["recommendation"] == "adamw"


def test_estimate_errors_are_short(capsys):
    from lowmem_lightning.cli import main

    assert main(["estimate", "--config", "no_such_recipe.yaml"]) == 2
    err = capsys.readouterr().err
    assert "no_such_recipe.yaml" in err and "tiny.yaml" in err and "Traceback" not in err
    assert main(["estimate", "--config", "tiny.yaml", "--format", "xml"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", bundled_recipes())
def test_estimator_never_advises_what_the_recipe_already_does(recipe, capsys, monkeypatch):
    """At every budget that changes the answer (each row's totals, minus a byte, and 1 GB), the advice
    never proposes the recipe's own 4-bit base, LoRA adapters, gradient release or checkpointing.

    The budget changes only the verdicts and the advice, not the state bytes: each optimizer's state over the one
    model is counted once and handed to the later calls (the 7B QLoRA recipe: 30 estimates of ~18 optimizers over
    ~450 params, 13 of the test's 21 s)."""
    from lowmem_lightning.cli.estimate import _configured_release, build_meta_model

    count_state_once(monkeypatch)
    cfg = parse_fit_config(["--config", recipe])
    init = cfg.model.init_args
    release, checkpointing = _configured_release(cfg), bool(init.get("gradient_checkpointing"))
    model = build_meta_model(cfg)
    free = estimate_memory(model, step_in_backward=release)
    budgets = {10**9} | {b - 1 for r in free.optimizers.values() for b in (r.total_device_bytes,
                                                                           r.released_device_bytes)}
    done = {"quantize the base": init.get("quantize") == "nf4", "train LoRA": bool(init.get("lora")),
            "+ step_in_backward": release, "+ gradient checkpointing": checkpointing}
    for budget in sorted(budgets):
        advice = estimate_memory(model, budget_bytes=budget, step_in_backward=release,
                                 gradient_checkpointing=checkpointing).recommendation
        for words, already in done.items():
            assert not (already and words in advice), (recipe, budget, advice)


def _advice(out: str) -> str:
    """The recommendation of a printed table, its wrapped lines joined."""
    text = out[out.index("budget "):]
    return " ".join(text.split())


def test_qlora_recipe_at_2_gb_is_not_told_to_quantize(capsys):
    assert main(["estimate", "--config", "qlora_7b.yaml", "--budget-gb", "2"]) == 0
    advice = _advice(capsys.readouterr().out)
    assert "nothing fits" in advice and "already 4-bit NF4" in advice
    assert "quantize the base" not in advice and "train LoRA" not in advice
    assert main(["estimate", "--config", "full_finetune_7b.yaml", "--budget-gb", "2"]) == 0
    assert "quantize the base (quantize: nf4) and train LoRA adapters" in _advice(capsys.readouterr().out)


# ============================================================================== released buckets, live bytes
def test_release_bucket_default_is_the_callbacks():
    from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES
    from lowmem_lightning.estimate import RELEASE_BUCKET_BYTES

    assert RELEASE_BUCKET_BYTES == DEFAULT_BUCKET_BYTES


def test_released_gradient_bytes_replays_the_bucket_rule():
    from lowmem_lightning.estimate import released_gradient_bytes

    sizes = [10, 30, 5, 5, 40, 2]  # parameter order; backward takes them in reverse: 2, 40, 5, 5, 30, 10
    assert released_gradient_bytes(sizes, 0) == 40  # each tensor alone
    assert released_gradient_bytes(sizes, 20) == 42  # 2 + 40 closes the first bucket
    assert released_gradient_bytes(sizes, 50) == 52  # 2 + 40 + 5 + 5 closes it, then 30 + 10
    assert released_gradient_bytes(sizes, 10**6) == sum(sizes)  # one bucket: every gradient at once
    with pytest.raises(ValueError, match="bucket_bytes=-1"):
        released_gradient_bytes(sizes, -1)


TINY_ARCH = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 2,
             "vocab_size": 320}
"""Small, with tensors above and below the 4096-element 8-bit threshold."""


def _recipe_setting(recipe: str) -> dict:
    from lowmem_lightning.cli.estimate import _configured_optimizer, _configured_release

    cfg = parse_fit_config(["--config", recipe])
    init = cfg.model.init_args
    name, kwargs = _configured_optimizer(cfg)
    return {"optimizer": name, "kwargs": {"lr": 1e-4, **kwargs}, "release": _configured_release(cfg),
            "quantize": init.quantize, "lora": init.lora, "torch_dtype": init.torch_dtype}


def _live_bytes(model, setting: dict, bucket_bytes: int) -> dict:
    """Train ``model`` two steps as the setting does; bytes of the live params + buffers, of the optimizer
    state and of the most gradients alive at once (counted in a hook that runs before the release's)."""
    from lowmem_lightning.callbacks.release import GradientRelease
    from lowmem_lightning.optim import state_memory

    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(setting["optimizer"], params, **setting["kwargs"])
    peak = [0]

    def count(_):
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    release = GradientRelease(opt, bucket_bytes=bucket_bytes).attach() if setting["release"] else None
    batch = torch.randint(0, TINY_ARCH["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        if release is not None:
            release.finish_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mem = state_memory(opt)
    seen, weights = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            weights += t.numel() * t.element_size()
    return {"weights": weights, "state": mem.device_bytes + mem.host_bytes, "gradients": peak[0]}


@pytest.mark.parametrize("recipe", ["full_finetune_7b.yaml", "full_finetune_1b.yaml", "qlora_7b.yaml", "tiny.yaml"])
def test_estimate_equals_live_tensor_bytes_for_each_recipe_setting(recipe):
    """A small model trained with the recipe's optimizer, dtype, quantization, LoRA and release setting
    (release buckets of 64 KiB, so several buckets fill): weights + state + gradients held at peak, counted
    from the live tensors, within 10% of the estimate made on the meta device (each part shown)."""
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    setting = _recipe_setting(recipe)
    build = dict(config=TINY_ARCH, quantize=setting["quantize"], lora=setting["lora"],
                 torch_dtype=setting["torch_dtype"])
    torch.manual_seed(0)
    model = build_causal_lm(**build, device="cpu")
    if setting["lora"] and setting["lora"].get("dropout"):
        model.eval()  # no dropout randomness: the counts do not depend on it
    bucket = 64 * 2**10
    live = _live_bytes(model, setting, bucket)
    est = estimate_memory(build_causal_lm(**build, device="meta"), configured=(setting["optimizer"], setting["kwargs"]),
                          step_in_backward=setting["release"], bucket_bytes=bucket)
    row = est.optimizers[est.configured_optimizer]
    predicted = {"weights": est.model.trainable_bytes + est.model.frozen_bytes, "state": row.state_bytes,
                 "gradients": est.gradient_device_bytes}
    assert predicted["weights"] == live["weights"] and predicted["state"] == live["state"], (predicted, live)
    assert abs(predicted["gradients"] / live["gradients"] - 1) <= 0.10, (predicted, live)
    assert abs(sum(predicted.values()) / sum(live.values()) - 1) <= 0.10
    if setting["release"]:
        assert live["gradients"] < est.model.gradient_bytes  # buckets free gradients before backward ends


# ============================================================================== activations
def _profiled_activation_peak(arch: dict, batch: int, seq: int, dtype, checkpointing: bool, model=None,
                              position_ids=None) -> int:
    """Peak CPU bytes allocated in one forward + backward (gradients freed as they arrive), torch's profiler
    (``benchmarks/lora_activations.py`` ``profiled_peak``); of an HF Llama of ``arch`` in ``dtype``, or of ``model``
    (built by the caller, checkpointing already set) when given; ``position_ids``: packed documents kept apart."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if model is None:
        model = LlamaForCausalLM(LlamaConfig(**arch, max_position_embeddings=seq)).to(dtype)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    return _lora_bench().profiled_peak(model, arch["vocab_size"], batch, seq, position_ids=position_ids)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", [
    {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 3,
     "vocab_size": 700},  # a layer's recompute is the larger phase
    {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
     "vocab_size": 3000},  # the loss is
], ids=["layer-bound", "loss-bound"])
def test_activation_formula_within_10_percent_of_the_profiler(arch, dtype, checkpointing):
    """Sizes the coefficients were not fitted on, batch 2 x seq 96."""
    from lowmem_lightning.estimate import activation_bytes

    torch.set_num_threads(1)
    measured = _profiled_activation_peak(arch, 2, 96, dtype, checkpointing)
    predicted = activation_bytes(arch, 2, 96, torch.finfo(dtype).bits // 8, checkpointing)
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def _document_positions(batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]`` position_ids of packed blocks as ``TextDataModule`` makes them (restarting at each document
    of a third, a half, one and one more block)."""
    from lowmem_lightning.data.blocks import document_position_ids

    return document_position_ids([seq // 3, seq // 2, seq, seq], seq)[:batch]


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch, batch, seq", [
    ({"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 3,
      "vocab_size": 700}, 1, 384),  # a layer's recompute is the larger phase: it carries the float mask
    ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
      "vocab_size": 3000}, 3, 160),  # the loss is: only the bool mask; three rows of rotary tables
], ids=["layer-bound-1x384", "loss-bound-3x160"])
def test_packed_document_mask_is_what_the_profiler_measures(arch, batch, seq, dtype, checkpointing):
    """Packed documents kept apart (position_ids restarting at each document, SDPA) at sizes the mask was not
    measured at (tests/test_data_packing.py: batch 2 x seq 256): what they add to the peak (packed minus plain)
    within 15% of activation_bytes(isolate_documents=True) minus its plain figure, the whole within the formula's
    10% of the packed peak."""
    from lowmem_lightning.estimate import activation_bytes

    torch.set_num_threads(1)
    d = torch.finfo(dtype).bits // 8
    plain = _profiled_activation_peak(arch, batch, seq, dtype, checkpointing)
    packed = _profiled_activation_peak(arch, batch, seq, dtype, checkpointing,
                                       position_ids=_document_positions(batch, seq))
    predicted = activation_bytes(arch, batch, seq, d, checkpointing, isolate_documents=True)
    added = predicted - activation_bytes(arch, batch, seq, d, checkpointing)
    assert abs(added / (packed - plain) - 1) <= 0.15, (added, packed - plain)
    assert abs(predicted / packed - 1) <= 0.10, (predicted, packed)


def test_packed_document_mask_of_a_qlora_run_is_what_the_profiler_measures():
    """The QLoRA recipe's setting (NF4 base, LoRA on seven projections, bf16 autocast, checkpointing) on packed
    documents kept apart, at a size of benchmarks/lora_activations.py's CHECK with a longer sequence: what they add
    within 15% of the profiler's, the whole within the LoRA formula's 10%."""
    from lowmem_lightning.estimate import lora_activation_bytes

    bench = _lora_bench()
    torch.set_num_threads(1)
    config, batch, seq = bench.CHECK["h144"]
    seq *= 3  # a mask that weighs: batch * seq**2 bytes
    peaks, predicted = [], []
    for positions in (None, _document_positions(batch, seq)):
        model, autocast = bench.build_lora_model(config, seq, "nf4", "bf16-mixed", 0.1, "all", True)
        peaks.append(bench.profiled_peak(model, config["vocab_size"], batch, seq, autocast, positions))
        predicted.append(lora_activation_bytes(config, batch, seq, base="nf4", mode="bf16-mixed", dropout=0.1,
                                               targets="all", rank=bench.RANK, device="cpu",
                                               isolate_documents=positions is not None))
    assert abs((predicted[1] - predicted[0]) / (peaks[1] - peaks[0]) - 1) <= 0.15, (predicted, peaks)
    assert abs(predicted[1] / peaks[1] - 1) <= 0.10, (predicted, peaks)


def _lora_bench():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import lora_activations

    return lora_activations


def _lora_check(size: str, base: str, mode: str, dropout: float, targets: str, checkpointing: bool) -> tuple[int, int]:
    """``(profiled, formula)`` activation peak of a LoRA decoder at a size of ``benchmarks/lora_activations.py``'s
    ``CHECK`` (not fitted on), rank 16, on the CPU (the formula with the CPU's NF4 decode transient)."""
    from lowmem_lightning.estimate import lora_activation_bytes

    bench = _lora_bench()
    torch.set_num_threads(1)
    config, batch, seq = bench.CHECK[size]
    model, autocast = bench.build_lora_model(config, seq, base, mode, dropout, targets, checkpointing)
    measured = bench.profiled_peak(model, config["vocab_size"], batch, seq, autocast)
    predicted = lora_activation_bytes(config, batch, seq, base=base, mode=mode, dropout=dropout, targets=targets,
                                      rank=bench.RANK, gradient_checkpointing=checkpointing, device="cpu")
    return measured, predicted


@pytest.mark.parametrize("size, base, mode, dropout, targets, checkpointing", [
    ("h224", "nf4", "bf16-mixed", 0.1, "all", True),  # qlora_7b.yaml's setting
    ("h320", "nf4", "bf16-mixed", 0.0, "all", True),  # gpu_check's qlora_7b part; above the fitted sizes
    ("h144", "nf4", "bf16-base-fp32-adapters", 0.1, "all", True),  # each adapter's own fp32 copy
    ("h144", "nf4", "bf16", 0.0, "attention", False),
    ("h224", "dense", "fp32", 0.0, "attention", False),
    ("h320", "dense", "bf16", 0.0, "all", True),
    ("h144", "dense", "bf16-mixed", 0.1, "all", False),
    ("h224", "nf4", "fp32", 0.1, "attention", True),
])
def test_lora_activation_formula_within_10_percent_of_the_profiler(size, base, mode, dropout, targets, checkpointing):
    """Sizes, batch x seq and a dropout the coefficients were not fitted on (``benchmarks/lora_activations.py
    --check`` sweeps every entry)."""
    measured, predicted = _lora_check(size, base, mode, dropout, targets, checkpointing)
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


@pytest.mark.parametrize("size, mode, dropout, targets, checkpointing", [
    ("h224", "bf16-mixed", 0.1, "all", True),  # qlora_7b.yaml with use_dora: true
    ("h320", "bf16-mixed", 0.0, "all", False),
    ("h144", "bf16-base-fp32-adapters", 0.1, "all", True),
    ("h224", "fp32", 0.0, "attention", True),
    ("h144", "bf16", 0.1, "attention", False),
])
def test_dora_activation_formula_within_10_percent_of_the_profiler(size, mode, dropout, targets, checkpointing):
    """QDoRA (``use_dora`` on an NF4 base) at sizes :data:`DORA_ACTIVATION_BYTES` was not fitted on; without its
    terms the formula (plain LoRA's) falls far short of DoRA's peaks (0.69-0.71 of them at width 1024:
    ``benchmarks/lora_activations.py --dora-scale``)."""
    from lowmem_lightning.estimate import lora_activation_bytes

    bench = _lora_bench()
    torch.set_num_threads(1)
    config, batch, seq = bench.CHECK[size]
    measured = bench._dora_peak(config, batch, seq, mode, dropout, targets, checkpointing, True)
    predicted = lora_activation_bytes(config, batch, seq, base="nf4", mode=mode, dropout=dropout, targets=targets,
                                      rank=bench.RANK, gradient_checkpointing=checkpointing, device="cpu", dora=True)
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_dora_terms_refuse_what_they_do_not_model():
    from lowmem_lightning.estimate import dora_projection_terms, lora_activation_bytes

    llama = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 100}
    assert dora_projection_terms(llama, "all") == (64 + 32 + 32 + 64 + 160 + 160 + 64, 64 * 160)
    assert dora_projection_terms(llama, "attention") == (64 + 32 + 32 + 64, 64 * 64)
    with pytest.raises(ValueError, match="not modelled on dense, dense_4h_to_h"):
        dora_projection_terms({**llama, "model_type": "gpt_neox"}, "all")
    with pytest.raises(ValueError, match="model_type 'mixtral'"):
        dora_projection_terms({**llama, "model_type": "mixtral", "num_local_experts": 4}, "all")
    with pytest.raises(ValueError, match="Invalid base='dense' with dora=True"):
        lora_activation_bytes(llama, 1, 16, base="dense", dora=True)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, False])
def test_every_lora_entry_within_10_percent_of_the_profiler(checkpointing):
    """Every table entry at one unfitted size (h144, batch 3 x seq 64, dropout 0.1 where on)."""
    from lowmem_lightning.estimate import LORA_ACTIVATION_COEFFICIENTS

    misses = []
    for base, mode, dropout, targets in LORA_ACTIVATION_COEFFICIENTS:
        measured, predicted = _lora_check("h144", base, mode, 0.1 if dropout else 0.0, targets, checkpointing)
        if abs(predicted / measured - 1) > 0.10:
            misses.append((base, mode, dropout, targets, predicted, measured))
    assert not misses, misses


@pytest.mark.parametrize("check, mode, dropout, batch, seq, checkpointing", [
    (0, "bf16-mixed", 0.05, 1, 128, True),  # the QLoRA recipe's setting on Mixtral
    (1, "bf16-mixed", 0.0, 2, 80, False),
    (2, "bf16", 0.1, 2, 72, True),  # above the fitted top-k
    (1, "fp32", 0.0, 3, 48, True),
    (0, "bf16-base-fp32-adapters", 0.0, 1, 144, False),
])
def test_moe_lora_activation_formula_within_10_percent_of_the_profiler(check, mode, dropout, batch, seq,
                                                                       checkpointing):
    """QLoRA on the attention of Mixtral decoders with NF4 experts at sizes, shapes and dropouts the MoE coefficients
    were not fitted on (``benchmarks/lora_activations.py --moe`` checks every mode)."""
    from lowmem_lightning.estimate import lora_activation_bytes

    bench = _lora_bench()
    torch.set_num_threads(1)
    config = bench.MOE_CHECK[check]
    model, autocast = bench.build_lora_model(config, seq, "nf4", mode, dropout, "attention", checkpointing)
    measured = bench.profiled_peak(model, config["vocab_size"], batch, seq, autocast)
    predicted = lora_activation_bytes(config, batch, seq, base="nf4", mode=mode, dropout=dropout,
                                      targets="attention", rank=bench.RANK, gradient_checkpointing=checkpointing,
                                      device="cpu")
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_moe_activations_are_modelled_for_qlora_on_the_attention_over_nf4_experts():
    """``lowmem estimate``'s figure for the QLoRA recipe on Mixtral and Qwen3-MoE is the MoE formula's (Qwen3-MoE: its
    own config keys, its q/k norms); Mixtral without LoRA, LoRA on other layers, or a Qwen-MoE with dense layers among
    its experts say why not."""
    from lowmem_lightning.estimate import lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    mixtral = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    qwen = {**mixtral, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 32, "head_dim": 32}
    for arch in (mixtral, qwen):
        model = build_causal_lm(None, arch, "nf4", lora, device="meta", torch_dtype="bfloat16")
        nbytes, detail = model_activation_bytes(model, 1, 128, True, "bf16-mixed", "cuda")
        config = {**arch, "vocab_size": model.config.vocab_size}
        assert nbytes == lora_activation_bytes(config, 1, 128, mode="bf16-mixed", dropout=0.05, targets="attention")
        assert "LoRA r=16 on 4 projections" in detail
    as_mixtral = {**mixtral, "intermediate_size": 32, "num_local_experts": 4, "vocab_size": model.config.vocab_size}
    assert lora_activation_bytes(config, 1, 128, targets="attention") > lora_activation_bytes(
        as_mixtral, 1, 128, targets="attention")  # q/k norms, q 128 wide
    for built in (build_causal_lm(None, {**qwen, "mlp_only_layers": [0]}, "nf4", lora, device="meta"),
                  build_causal_lm(None, {**qwen, "decoder_sparse_step": 2}, "nf4", lora, device="meta"),
                  build_causal_lm(None, mixtral, None, None, device="meta", torch_dtype="bfloat16")):
        nbytes, detail = model_activation_bytes(built, 1, 128, True, "bf16-mixed", "cuda")
        assert nbytes is None and detail.startswith("not modelled"), detail
    assert "dense layers among its experts (mlp_only_layers=[0])" in model_activation_bytes(
        build_causal_lm(None, {**qwen, "mlp_only_layers": [0]}, "nf4", lora, device="meta"), 1, 8, True)[1]
    with pytest.raises(ValueError, match="attention projections over NF4 experts"):
        lora_activation_bytes(config, 1, 128, targets="all")
    with pytest.raises(ValueError, match=r"Invalid config decoder_sparse_step=2: .* experts in every layer"):
        lora_activation_bytes({**config, "decoder_sparse_step": 2}, 1, 128, targets="attention")


@pytest.mark.parametrize("check, entry, checkpointing", [
    (0, ("bf16-mixed", True, "all"), True),  # the QLoRA recipe's setting: its seven names adapt the shared expert
    (0, ("bf16-mixed", True, "all"), False),
    (1, ("fp32", False, "attention"), True),
    (2, ("bf16", True, "all"), False),
    (2, ("bf16-base-fp32-adapters", False, "attention"), True),
])
def test_shared_expert_lora_activation_formula_within_10_percent_of_the_profiler(check, entry, checkpointing):
    """QLoRA on Qwen2-MoE decoders (NF4 experts, a shared expert with or without LoRA) at sizes its terms were not
    fitted on (``benchmarks/lora_activations.py --qwen2-moe`` checks every entry)."""
    bench = _lora_bench()
    torch.set_num_threads(1)
    config, batch, seq = bench.SHARED_EXPERT_CHECK[check]
    measured = bench._shared_expert_peak(config, batch, seq, entry, checkpointing)
    predicted = bench._shared_expert_formula(config, batch, seq, entry, checkpointing)
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_qwen2_moe_activations_are_modelled_for_the_qlora_recipe():
    """``lowmem estimate``'s figure for the QLoRA recipe on Qwen2-MoE (the seven names adapt its attention and shared
    expert) and for LoRA on its attention alone is the MoE formula's with the shared-expert terms; its largest decoded
    matrix is the shared expert's where that is wider than an expert's gate_up."""
    from lowmem_lightning.estimate import _moe_terms, lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    arch = {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2}
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the recipes' names
    for targets, key, count in ((seven, "all", 7), (seven[:4], "attention", 4)):
        lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": targets}
        model = build_causal_lm(None, arch, "nf4", lora, device="meta", torch_dtype="bfloat16")
        nbytes, detail = model_activation_bytes(model, 1, 128, True, "bf16-mixed", "cuda")
        config = {**arch, "vocab_size": model.config.vocab_size}
        assert nbytes == lora_activation_bytes(config, 1, 128, mode="bf16-mixed", dropout=0.05, targets=key)
        assert f"LoRA r=16 on {count} projections" in detail, detail
    assert _moe_terms(config, "nf4", "bf16-mixed", "all", True)[2] == 64 * 128  # the shared expert's, not 2 * 64 * 32
    mixtral = {**config, "model_type": "mixtral", "intermediate_size": 32, "num_local_experts": 4}
    assert lora_activation_bytes(config, 1, 128, targets="all", gradient_checkpointing=False) > lora_activation_bytes(
        mixtral, 1, 128, targets="attention", gradient_checkpointing=False)
    with pytest.raises(ValueError, match="attention projections over NF4 experts only"):
        lora_activation_bytes(mixtral, 1, 128, targets="all")  # no shared expert: the seven names are not fitted


@pytest.mark.parametrize("check, mode, checkpointing", [
    (0, "bf16-mixed", True),  # the QLoRA recipe's setting (dropout 0.1 here)
    (1, "bf16-mixed", False),
    (2, "fp32", True),
    (1, "bf16", True),
    (2, "bf16-base-fp32-adapters", False),
    (3, "bf16-mixed", True),  # bound by the loss
])
def test_gpt_oss_lora_activation_formula_within_10_percent_of_the_profiler(check, mode, checkpointing):
    """QLoRA on the attention of gpt-oss decoders (NF4 experts with biases, eager attention with sinks, a sliding window
    shorter than the sequence in every other layer) at sizes, shapes and dropouts its terms were not fitted on
    (``benchmarks/lora_activations.py --gpt-oss`` checks every mode)."""
    bench = _lora_bench()
    torch.set_num_threads(1)
    config, batch, seq, dropout = bench.GPT_OSS_CHECK[check]
    measured = bench._gpt_oss_peak(config, batch, seq, mode, dropout, checkpointing)
    predicted = bench._gpt_oss_formula(config, batch, seq, mode, dropout, checkpointing)
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


def test_gpt_oss_activations_are_modelled_for_the_qlora_recipe_under_eager_attention():
    """``lowmem estimate``'s figure for the QLoRA recipe on gpt-oss (the seven names fall back to its attention) is the
    MoE formula's with the gpt-oss terms under the eager attention transformers builds it with; another attention, a
    bf16 base without NF4 experts and a full fine-tune say why not."""
    from lowmem_lightning.estimate import lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    arch = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
            "num_experts_per_tok": 2, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]}
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the recipes' names
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": seven}
    with pytest.warns(UserWarning, match="gate_proj, up_proj, down_proj"):
        model = build_causal_lm(None, arch, "nf4", lora, device="meta", torch_dtype="bfloat16")
    assert model.config._attn_implementation == "eager"
    nbytes, detail = model_activation_bytes(model, 1, 128, True, "bf16-mixed", "cuda")
    config = {**arch, "vocab_size": model.config.vocab_size}
    assert nbytes == lora_activation_bytes(config, 1, 128, mode="bf16-mixed", dropout=0.05, targets="attention",
                                           attention="eager")
    assert "LoRA r=16 on 4 projections" in detail and "eager attention" in detail, detail
    with pytest.raises(ValueError, match=r"gpt-oss under attention 'sdpa' \(fitted to 'eager'"):
        lora_activation_bytes(config, 1, 128, targets="attention")
    model.config._attn_implementation = "flash_attention_2"
    assert model_activation_bytes(model, 1, 128, True, "bf16-mixed", "cuda") == (
        None, "not modelled for gpt-oss under attention 'flash_attention_2' (fitted to 'eager', the one transformers "
              "runs it with)")
    for built in (build_causal_lm(None, arch, None, {**lora, "target_modules": seven[:4]}, device="meta",
                                  torch_dtype="bfloat16"),
                  build_causal_lm(None, arch, None, None, device="meta", torch_dtype="bfloat16")):
        nbytes, detail = model_activation_bytes(built, 1, 128, True, "bf16-mixed", "cuda")
        assert nbytes is None and detail.startswith("not modelled for this gpt_oss model"), detail


def test_olmoe_is_modelled_as_qwen3_moe_layers_and_clip_qkv_is_said_not_modelled():
    """OLMoE under the QLoRA recipe gets the MoE formula with the q/k-norm terms (its norms span the whole query and key
    widths: as many elements as Qwen3's per-head ones); a config with ``clip_qkv`` says why not."""
    from lowmem_lightning.estimate import lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    arch = {"model_type": "olmoe", "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2}
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    model = build_causal_lm(None, arch, "nf4", lora, device="meta", torch_dtype="bfloat16")
    nbytes, detail = model_activation_bytes(model, 1, 128, False, "bf16-mixed", "cuda")
    config = {**arch, "vocab_size": model.config.vocab_size}
    assert nbytes == lora_activation_bytes(config, 1, 128, dropout=0.05, targets="attention",
                                           gradient_checkpointing=False)
    as_qwen3 = {**config, "model_type": "qwen3_moe", "moe_intermediate_size": 32, "head_dim": 16}
    assert nbytes == lora_activation_bytes(as_qwen3, 1, 128, dropout=0.05, targets="attention",
                                           gradient_checkpointing=False)
    clipped = build_causal_lm(None, {**arch, "clip_qkv": 8.0}, "nf4", lora, device="meta", torch_dtype="bfloat16")
    nbytes, detail = model_activation_bytes(clipped, 1, 128, True, "bf16-mixed", "cuda")
    assert nbytes is None and "OLMoE with clip_qkv=8.0" in detail, detail


KIN_CASES = [
    # (model type, shape index, setting, targets, checkpointing)
    ("ministral3", 0, ("full", 2), None, True),
    ("ministral3", 1, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the QLoRA recipe's setting
    ("seed_oss", 0, ("lora", "nf4", "bf16-mixed", True), "all", False),  # q/k/v biases: nothing held
    ("seed_oss", 2, ("full", 4), None, True),  # bound by the loss
    ("smollm3", 0, ("full", 2), None, False),  # a layer in four without rotary
    ("smollm3", 1, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("hunyuan_v1_dense", 0, ("full", 2), None, False),  # q/k norms after the rotary embedding
    ("hunyuan_v1_dense", 1, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("olmo3", 0, ("full", 2), None, True),  # OLMo 2's layer, sliding windows longer than the sequence here
    ("olmo3", 1, ("lora", "nf4", "bf16-mixed", True), "all", False),
    ("ministral", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),  # Ministral-8B-2410: windows in layer_types
    ("internlm3", 1, ("full", 2), None, True),
    ("qwen2_5_vl_text", 0, ("full", 2), None, True),  # inside Qwen2.5-VL: multimodal rotary sections
    ("qwen2_5_vl_text", 1, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("qwen3_vl_text", 0, ("lora", "nf4", "bf16-mixed", True), "all", False),  # Qwen3's q/k norms
    ("qwen3_vl_text", 2, ("full", 4), None, True),
]


@pytest.mark.parametrize("model_type, shape, setting, targets, checkpointing", KIN_CASES)
def test_llama_and_qwen3_kin_hold_what_their_reference_holds(model_type, shape, setting, targets, checkpointing):
    """Ministral 3 and 8B, InternLM3, Seed-OSS and SmolLM3 hold what Llama holds, Hunyuan dense what Qwen3 holds, OLMo 3
    what OLMo 2 holds, Qwen2.5-VL's and Qwen3-VL's language models (built inside their vision-language model) what
    Qwen2 and Qwen3 hold, at the same shapes (torch's profiler, within 1%), and the formula they take from it is within
    10% of the profiler (``benchmarks/lora_activations.py --kin`` checks every setting)."""
    bench = _lora_bench()
    reference, settings = bench.KIN_MODEL_TYPES[model_type]
    sizes, heads, batch, seq = bench.KIN_SHAPES[shape]
    heads = bench.kin_heads(model_type, heads, sizes)
    config = {**bench._width_config(model_type, *heads, sizes), **settings}
    torch.set_num_threads(1)
    ours = bench.profiled_setting(config, batch, seq, setting, targets, checkpointing)
    theirs = bench.profiled_setting(bench._width_config(reference, *heads, sizes), batch, seq, setting, targets,
                                    checkpointing)
    assert abs(ours / theirs - 1) <= 0.01, (ours, theirs)
    predicted = bench._formula(config, batch, seq, setting, targets, checkpointing)
    assert abs(predicted / ours - 1) <= 0.10, (predicted, ours)
    assert predicted == bench._formula({**config, "model_type": reference}, batch, seq, setting, targets, checkpointing)


def test_kin_configs_estimate_as_their_reference_and_seed_oss_dropout_is_said_not_modelled():
    """``lowmem estimate``'s path (a meta model from the config) gives a Ministral, InternLM3, SmolLM3 or Seed-OSS model
    Llama's figure, a Hunyuan dense one Qwen3's, Qwen2.5-VL and Qwen3-VL (their language models) Qwen2's and Qwen3's;
    Seed-OSS as released (dropout 0.1) and Granite are said apart."""
    from lowmem_lightning.estimate import model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320, "pad_token_id": None}
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]}

    def figures(model_type: str, **extra) -> tuple:
        return built({**sizes, "model_type": model_type, **extra})

    def inside(model_type: str, vision: dict) -> tuple:  # a language model inside its vision-language model
        text = {**sizes, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}}
        return built({"model_type": model_type, "text_config": text, "vision_config": vision, "image_token_id": 300,
                      "video_token_id": 301, "vision_start_token_id": 302})

    def built(arch: dict) -> tuple:
        qlora = build_causal_lm(None, arch, "nf4", lora, device="meta", torch_dtype="bfloat16")
        full = build_causal_lm(None, arch, None, None, device="meta", torch_dtype="bfloat16")
        return (model_activation_bytes(qlora, 1, 128, True, "bf16-mixed", "cuda"),
                model_activation_bytes(full, 2, 64, True, "bf16-true", "cuda"))

    llama, qwen3 = figures("llama"), figures("qwen3")
    assert figures("ministral3") == llama
    assert figures("ministral") == figures("internlm3") == llama
    assert figures("smollm3", tie_word_embeddings=False) == llama
    assert figures("seed_oss", attention_dropout=0.0, residual_dropout=0.0) == llama
    assert figures("hunyuan_v1_dense") == qwen3
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64}
    assert inside("qwen2_5_vl", vision) == figures("qwen2")
    assert inside("qwen3_vl", {**vision, "deepstack_visual_indexes": [0]}) == qwen3
    for nbytes, detail in figures("seed_oss"):  # its config's defaults: the release's dropout 0.1
        assert nbytes is None and "Seed-OSS with dropout (attention_dropout=0.1, residual_dropout=0.1)" in detail
    layer_bound = {"intermediate_size": 512, "vocab_size": 128}  # a recomputed layer, not the loss, is the peak
    llama = figures("llama", **layer_bound)
    granite = figures("granite", residual_multiplier=0.22, embedding_multiplier=12.0, **layer_bound)
    assert granite[0][0] == llama[0][0] + 2 * (2 * 128 * 64)  # QLoRA: a bf16 hidden-wide tensor recomputed, one held
    assert granite[1][0] == llama[1][0] + 2 * 64 * 2 * 64  # full weights: the recomputed one alone (2 x 64 tokens)


WIDTH_CASES = [
    # (check index, setting, targets, checkpointing)
    (0, ("full", 2), None, False),  # grouped-query Llama, head_dim 48 (q 1.5 h, kv h / 2)
    (0, ("full", 4), None, True),
    (0, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the QLoRA recipe's setting
    (1, ("full", 2), None, False),  # Qwen3, q 1.6 h: q/k norms
    (1, ("lora", "nf4", "bf16-mixed", True), "all", False),
    (2, ("lora", "dense", "fp32", False), "attention", True),  # Qwen3, q / kv narrower than h
    (2, ("full", 4), None, False),
    (1, ("full", 4), None, True),
    (3, ("lora", "nf4", "bf16-mixed", True), "attention", True),  # Qwen3-MoE under QLoRA
    (3, ("lora", "nf4", "fp32", False), "attention", False),
    (4, ("lora", "nf4", "bf16-mixed", True), "attention", True),  # OLMoE: Qwen3-MoE's layer, 64 experts, top-8
    (4, ("lora", "nf4", "fp32", False), "attention", False),
]


@pytest.mark.parametrize("check, setting, targets, checkpointing", WIDTH_CASES)
def test_attention_widths_and_qk_norms_within_10_percent_of_the_profiler(check, setting, targets, checkpointing):
    """Decoders whose attention is not ``hidden_size`` wide (grouped-query, a ``head_dim`` of their own), Qwen3's q/k
    norms and Qwen3-MoE, at sizes the width terms were not fitted on (``benchmarks/lora_activations.py --widths``
    checks every setting)."""
    _assert_formula_within_10_percent(*_lora_bench().WIDTH_CHECK[check], setting, targets, checkpointing)


def _assert_formula_within_10_percent(config: dict, batch: int, seq: int, setting: tuple, targets: str | None,
                                      checkpointing: bool, attention: str = "sdpa", over: float = 0.10) -> int:
    """The activation formula against torch's profiler (``benchmarks/lora_activations.py``) for ``config`` trained
    as ``setting`` (``("full", dtype bytes)`` or ``("lora", base, mode, dropout > 0)``) on ``targets`` under
    transformers' ``attention``, at most 10% under it and ``over`` above it; returns the formula's figure."""
    bench = _lora_bench()
    torch.set_num_threads(1)
    measured = bench.profiled_setting(config, batch, seq, setting, targets, checkpointing, attention)
    predicted = bench._formula(config, batch, seq, setting, targets, checkpointing, attention)
    assert -0.10 <= predicted / measured - 1 <= over, (predicted, measured)
    return predicted


LAYER_FAMILY_CASES = [
    # (model type, check index, setting, targets, checkpointing)
    ("gemma3_text", 0, ("full", 2), None, True),
    ("gemma3_text", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the QLoRA recipe's setting
    ("gemma3_text", 1, ("full", 4), None, False),
    ("gemma3_text", 1, ("lora", "nf4", "bf16-mixed", True), "all", False),
    ("gemma3_text", 2, ("full", 2), None, True),  # bound by the loss, as Gemma 3's 262k vocabulary makes every run
    ("gemma3_text", 2, ("lora", "dense", "fp32", False), "attention", True),
    ("phi3", 0, ("full", 2), None, True),
    ("phi3", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the QLoRA recipe's, on qkv/o/gate_up/down_proj
    ("phi3", 1, ("full", 4), None, False),
    ("phi3", 1, ("lora", "nf4", "bf16", False), "attention", False),
    ("phi3", 2, ("lora", "dense", "bf16-mixed", True), "all", True),
    ("phi3", 3, ("full", 2), None, True),  # Phi-4-mini's partial rotary
    ("phi3", 3, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("gemma2", 0, ("full", 2), None, True),  # eager attention, scores and logits soft-capped
    ("gemma2", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("gemma2", 1, ("full", 4), None, False),
    ("gemma2", 2, ("lora", "nf4", "bf16-mixed", True), "all", False),  # bound by the loss
    ("gpt_neox", 0, ("full", 2), None, True),  # Pythia: parallel residual, rotary on a quarter of each head
    ("gpt_neox", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("gpt_neox", 1, ("full", 4), None, False),
    ("gpt_neox", 3, ("lora", "dense", "bf16", False), "attention", False),  # rotary on all of each head
    ("granite", 0, ("full", 2), None, True),  # Granite-3.3's multipliers: one more hidden-wide tensor, not fitted
    ("granite", 1, ("lora", "nf4", "bf16-mixed", True), "all", True),
    ("granite", 1, ("lora", "nf4", "fp32", False), "attention", True),
    ("granite", 2, ("lora", "dense", "bf16", True), "all", True),  # bound by the loss: the once term alone
    ("olmo2", 0, ("full", 2), None, True),  # norms after the attention and the MLP, q/k norms over the whole width
    ("olmo2", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the QLoRA recipe's setting
    ("olmo2", 1, ("full", 4), None, False),
    ("olmo2", 2, ("lora", "nf4", "bf16-mixed", True), "all", False),  # bound by the loss
    ("glm4", 0, ("full", 2), None, True),  # two more norms, a fused gate_up_proj, rotary on half of each head
    ("glm4", 0, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the recipe's: LoRA on gate_up_proj, decoded 2hi
    ("glm4", 1, ("full", 4), None, False),
    ("glm4", 2, ("lora", "dense", "bf16", False), "attention", False),  # bound by the loss
    ("exaone4", 0, ("full", 2), None, False),  # OLMo 2's norms, q/k norms per head
    ("exaone4", 1, ("lora", "nf4", "bf16-mixed", True), "all", True),  # the QLoRA recipe's setting
]


@pytest.mark.parametrize("model_type, check, setting, targets, checkpointing", LAYER_FAMILY_CASES)
def test_layer_family_within_10_percent_of_the_profiler(model_type, check, setting, targets, checkpointing):
    """Gemma 3 text, Phi-3, Gemma 2 (under its eager attention), GPT-NeoX, Granite, OLMo 2, GLM-4 and EXAONE 4 decoders
    at sizes their layer terms were not fitted on (``benchmarks/lora_activations.py --gemma3`` / ``--phi3`` /
    ``--gemma2`` / ``--neox`` / ``--granite`` / ``--olmo2`` / ``--glm4`` / ``--exaone4`` check every setting)."""
    bench = _lora_bench()
    _assert_formula_within_10_percent(*bench.LAYER_CHECK[model_type][check], setting, targets, checkpointing,
                                      bench.LAYER_ATTENTION.get(model_type, "sdpa"))


@pytest.mark.parametrize("model_type, setting, targets, checkpointing, batch, seq", [
    ("gemma3_text", ("full", 2), None, True, 1, 256),
    ("gemma3_text", ("full", 4), None, False, 2, 160),
    ("gemma3_text", ("lora", "nf4", "bf16-mixed", True), "all", True, 1, 256),
    ("gemma3_text", ("lora", "nf4", "fp32", False), "attention", False, 2, 160),
    ("mistral", ("full", 2), None, False, 1, 256),  # Mistral v0.1: every layer slides
    ("mistral", ("lora", "nf4", "bf16-mixed", True), "all", True, 2, 160),
    ("qwen2", ("full", 4), None, False, 1, 256),  # use_sliding_window: the layers from max_window_layers on
    ("phi3", ("full", 2), None, True, 1, 256),  # Phi-3-mini-4k's sliding_window: every layer slides
    ("phi3", ("lora", "nf4", "bf16-mixed", True), "all", False, 2, 160),
    ("olmo3", ("full", 2), None, True, 1, 256),  # OLMo 3: layer_types, as Gemma 3's
    ("olmo3", ("lora", "nf4", "bf16-mixed", True), "all", True, 2, 160),
    ("exaone4", ("full", 2), None, True, 1, 256),  # EXAONE 4: layer_types too
])
def test_sliding_window_shorter_than_the_sequence_within_10_percent(model_type, setting, targets, checkpointing,
                                                                    batch, seq):
    """Layers sliding with a window of 64 (each builds a ``seq**2`` mask, as packed documents): the formula with
    :func:`sliding_window_layers` against the profiler; Gemma 3, OLMo 3, EXAONE 4 and Qwen2 say which layers slide
    (2 of 3 here), Mistral and Phi-3 slide in all."""
    from lowmem_lightning.estimate import sliding_window_layers

    checks = _lora_bench().LAYER_CHECK
    config = {**checks["phi3" if model_type == "phi3" else "gemma3_text"][1][0], "model_type": model_type,
              "sliding_window": 64}
    if model_type in ("gemma3_text", "olmo3", "exaone4"):
        config["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    if model_type == "qwen2":
        config.update(use_sliding_window=True, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    assert sliding_window_layers(config, seq) == (3 if model_type in ("mistral", "phi3") else 2)
    # Phi-3's full bf16 layer, recomputed, is CPU-dependent: the machine of its fit read 0.952-1.007 for full weights,
    # an AMD EPYC with avx512_bf16 reads 1.08-1.09 at the --phi3 check sizes and 1.111 here (RESULTS: gpt-oss section)
    over = 0.12 if (model_type, setting, checkpointing) == ("phi3", ("full", 2), True) else 0.10
    _assert_formula_within_10_percent(config, batch, seq, setting, targets, checkpointing, over=over)


def test_gemma3_is_modelled_for_its_language_model():
    """A multimodal Gemma 3 (its vision tower's config comes first) is estimated by its language model's config, as
    a text-only Gemma 3 of that config (profiled equal on text); sequences above the sliding window add its layers'
    masks, said in the detail; logit soft-capping is not modelled, said by name."""
    from transformers import Gemma3Config, Gemma3TextConfig

    from lowmem_lightning.estimate import activation_bytes, lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 300, "sliding_window": 256}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    multimodal = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4).to_dict()
    model = build_causal_lm(None, multimodal, None, None, device="meta", torch_dtype="bfloat16")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    nbytes, detail = model_activation_bytes(model, 2, 128, True, "bf16-true")
    assert nbytes == activation_bytes(Gemma3TextConfig(**text), 2, 128, 2, True) and detail.startswith("batch 2")
    nbytes, detail = model_activation_bytes(model, 1, 512, True, "bf16-true")
    assert nbytes == activation_bytes(Gemma3TextConfig(**text), 1, 512, 2, True) > activation_bytes(
        Gemma3TextConfig(**{**text, "sliding_window": 512}), 1, 512, 2, True)
    assert detail.endswith(", sliding-window mask in 2 layers"), detail
    assert model_activation_bytes(model, 1, 512, True, "bf16-true", isolate_documents=True)[1].endswith(
        "document mask"), "packed documents mask every layer already"
    with pytest.raises(ValueError, match=r"activations are not modelled for Gemma 3 with logit soft-capping"):
        lora_activation_bytes({**text, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, 1, 64)
    capped = build_causal_lm(None, {**text, "model_type": "gemma3_text", "final_logit_softcapping": 30.0}, None, None,
                             device="meta")
    assert model_activation_bytes(capped, 1, 64, True)[1] == ("not modelled for Gemma 3 with logit soft-capping "
                                                              "(final_logit_softcapping=30.0)")


EAGER_CASES = [
    # (check index, setting, targets, checkpointing)
    (0, ("full", 2), None, True),  # Llama, 5 heads sharing one key/value head
    (0, ("lora", "nf4", "bf16-mixed", True), "all", False),
    (1, ("full", 4), None, False),
    (2, ("lora", "nf4", "bf16-mixed", True), "all", True),  # Qwen3
    (3, ("full", 2), None, False),  # Phi-3 (with checkpointing it reads up to 1.17: RESULTS)
    (4, ("lora", "dense", "fp32", False), "attention", True),  # Gemma 3
]


@pytest.mark.parametrize("check, setting, targets, checkpointing", EAGER_CASES)
def test_eager_attention_within_10_percent_of_the_profiler(check, setting, targets, checkpointing):
    """transformers' eager attention (the ``seq**2`` scores held, the key/value heads repeated, one float mask) at
    sizes its terms were not fitted on (``benchmarks/lora_activations.py --eager`` checks every setting)."""
    bench = _lora_bench()
    config, batch, seq = bench.EAGER_CHECK[check]
    eager = _assert_formula_within_10_percent(config, batch, seq, setting, targets, checkpointing, "eager")
    assert eager > bench._formula(config, batch, seq, setting, targets, checkpointing)


def test_gemma2_soft_capping_holds_one_more_score_and_logit_of_the_compute_size():
    """Gemma 2's ``cap * tanh(x / cap)`` on the eager scores and on the logits: exactly ``d`` bytes per score in each
    held layer and per logit at the loss (profiled 2.00 / 4.00 B in bf16 / fp32); a config without capping, none;
    Gemma 2 runs eagerly, so an SDPA figure for it is refused."""
    from lowmem_lightning.estimate import activation_bytes, lora_activation_bytes

    capped = _lora_bench()._gemma2(64, 128, 2, 4, 2, 16, 300)
    plain = {**capped, "attn_logit_softcapping": None, "final_logit_softcapping": None}
    batch, seq, heads, layers, vocab = 2, 32, 4, 2, 300
    for d in (2, 4):
        added = activation_bytes(capped, batch, seq, d, False, attention="eager") - activation_bytes(
            plain, batch, seq, d, False, attention="eager")
        assert added == layers * d * batch * heads * seq**2 + d * batch * seq * vocab
    added = lora_activation_bytes(capped, batch, seq, mode="fp32", gradient_checkpointing=False, attention="eager") - (
        lora_activation_bytes(plain, batch, seq, mode="fp32", gradient_checkpointing=False, attention="eager"))
    assert added == layers * 4 * batch * heads * seq**2 + 4 * batch * seq * vocab


def test_phi3_is_modelled_with_its_fused_projections():
    """Phi-3's LoRA targets in its own names: its four projections (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
    ``down_proj``) are all of them, one rank-r activation each; Llama's seven names are refused naming Phi-3's; a
    config with dropout is not modelled, said by name; a sliding window shorter than the sequence masks every layer,
    said in the detail."""
    from lowmem_lightning.estimate import activation_bytes, lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    config = _lora_bench()._phi3(64, 128, 2, 4, 2, 300)
    fused = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_activation_bytes(config, 1, 64, targets=fused) == lora_activation_bytes(config, 1, 64, targets="all")
    saved = {rank: lora_activation_bytes(config, 1, 64, targets="all", rank=rank, gradient_checkpointing=False)
             for rank in (16, 32)}
    assert saved[32] - saved[16] == 64 * 2 * 4 * 16 * 2  # tokens x layers x four adapters' rank-r activations, bf16
    with pytest.raises(ValueError, match=r"all 4 projections \(down_proj, gate_up_proj, o_proj, qkv_proj\)"):
        lora_activation_bytes(config, 1, 64, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"not modelled for Phi-3 with dropout \(resid_pdrop=0.1\)"):
        activation_bytes({**config, "resid_pdrop": 0.1}, 1, 64)
    dropped = build_causal_lm(None, {**config, "attention_dropout": 0.05}, None, None, device="meta")
    assert model_activation_bytes(dropped, 1, 64, True)[1] == ("not modelled for Phi-3 with dropout "
                                                               "(attention_dropout=0.05)")
    sliding = build_causal_lm(None, {**config, "sliding_window": 32}, None, None, device="meta",
                              torch_dtype="bfloat16")
    nbytes, detail = model_activation_bytes(sliding, 1, 64, True, "bf16-true")
    assert nbytes == activation_bytes({**config, "sliding_window": 32}, 1, 64) > activation_bytes(config, 1, 64)
    assert detail.endswith(", sliding-window mask in 2 layers"), detail


def test_width_terms_change_nothing_for_llama_2_and_follow_the_widths():
    """Llama-2's attention (q = kv = hidden_size) adds nothing to the fitted tables, nor does a config without its
    heads; grouped-query attention lowers the figure, a wider ``head_dim`` raises it, Qwen3's q/k norms add to the
    same shapes."""
    from lowmem_lightning.estimate import activation_bytes, attention_extra_bytes, attention_widths

    llama2 = json.loads(_llama_2_7b_config())
    assert attention_widths(llama2) == (4096, 4096) and attention_extra_bytes(llama2, 2) == 0
    assert attention_extra_bytes(llama2, ("nf4", "bf16-mixed", True)) == 0
    gqa = {**llama2, "num_key_value_heads": 8}  # Llama-3-8B's attention
    assert attention_widths(gqa) == (4096, 1024)
    wide = {**gqa, "head_dim": 160}  # Mistral-Nemo-like: q wider than h
    qwen3 = {**wide, "model_type": "qwen3"}
    assert attention_extra_bytes({key: llama2[key] for key in ("hidden_size", "intermediate_size")}, 2) == 0
    figures = [activation_bytes(c, 1, 512, 2, False) for c in (gqa, wide, qwen3)]
    assert figures == sorted(figures) and len(set(figures)) == 3 and figures[0] < activation_bytes(llama2, 1, 512, 2,
                                                                                                     False)


def test_qlora_activations_need_the_lora_formula(capsys):
    """On a 4-bit base with the qlora recipe's adapters (r=16 on all seven projections, dropout 0.05), bf16 base
    under fp32 adapters, checkpointing, the full-weight formula gives about half of the profiled peak (each adapter
    keeps its own fp32 copy of the input and its dropout mask); the LoRA formula is within 10%."""
    from lowmem_lightning.estimate import activation_bytes, lora_activation_bytes
    from lowmem_lightning.modules.causal_lm import _enable_checkpointing, build_causal_lm

    torch.set_num_threads(1)
    arch = {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 3,
            "vocab_size": 700}
    lora = {"r": 16, "alpha": 32, "dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    torch.manual_seed(0)
    model = build_causal_lm(None, {**arch, "max_position_embeddings": 96}, "nf4", lora, device="cpu",
                            torch_dtype="bfloat16")
    _enable_checkpointing(model)
    measured = _profiled_activation_peak(arch, 2, 96, torch.bfloat16, True, model=model)
    full = activation_bytes(arch, 2, 96, 2, True)
    lora_formula = lora_activation_bytes(arch, 2, 96, base="nf4", mode="bf16-base-fp32-adapters", dropout=0.05,
                                         targets=lora["target_modules"], gradient_checkpointing=True, device="cpu")
    with capsys.disabled():
        print(f"\nqlora-style h192 L3 bf16 checkpointing: profiled {measured:,} B, full-weight formula "
              f"{full / measured:.3f}x, LoRA formula {lora_formula / measured:.3f}x")
    assert full / measured < 0.9, (full, measured)
    assert abs(lora_formula / measured - 1) <= 0.10, (lora_formula, measured)


def test_nf4_decode_transient_is_what_the_cpu_reference_allocates():
    """The CPU row of ``NF4_DEQUANTIZE_BYTES``: the peak of one ``Linear4bit.dequantize`` per weight."""
    from lowmem_lightning.estimate import NF4_DEQUANTIZE_BYTES
    from lowmem_lightning.quant import Linear4bit

    layer = Linear4bit.from_linear(nn.Linear(512, 768, bias=False).to(torch.bfloat16))
    for dtype in (torch.bfloat16, torch.float32):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            del_me = layer.dequantize(dtype)
            del del_me
        live = peak = 0
        for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                            key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        assert abs(peak / (512 * 768) - NF4_DEQUANTIZE_BYTES["cpu"][dtype.itemsize]) < 0.1, (dtype, peak)


def test_lora_activation_terms():
    """Dropout, more targets, a larger rank and no checkpointing each add; the CUDA decode transient is one dense
    weight in the compute dtype."""
    from lowmem_lightning.estimate import lora_activation_bytes

    arch = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 1000}
    est = lambda **kw: lora_activation_bytes(arch, 1, 512, **kw)  # noqa: E731  (a layer, not the loss, is the peak)
    base = est()
    assert est(dropout=0.05) > base > est(targets="attention")
    assert abs(est(rank=64) - base - 512 * 7 * (64 - 16) * 2) <= 1
    assert est(gradient_checkpointing=False) > 3 * base
    assert abs(est(device="cpu") - base - (10 - 2) * 4096 * 11008) <= 1
    assert est(base="dense", mode="fp32") > est(base="dense", mode="bf16")


def test_lora_activation_bytes_refuses_bad_input():
    from lowmem_lightning.estimate import lora_activation_bytes

    for kwargs, match in [({"base": "int8"}, "base='int8'"), ({"mode": "fp8"}, "mode='fp8'"),
                          ({"dropout": 1.0}, "dropout=1.0"), ({"rank": 0}, "rank=0"), ({"device": "mps"}, "device="),
                          ({"targets": ["q_proj", "v_proj"]}, "all 7 projections")]:
        with pytest.raises(ValueError, match=match):
            lora_activation_bytes(TINY_ARCH, 1, 8, **kwargs)


def test_model_activation_bytes_reads_the_lora_run_from_the_model_and_precision():
    """The mode from the weights, the adapters and the precision; the base, rank, dropout and targets from the
    modules; what the formula does not model says so."""
    from lowmem_lightning.estimate import lora_activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    lora = {"r": 8, "alpha": 16, "dropout": 0.05}
    qlora = build_causal_lm(None, TINY_ARCH, "nf4", lora, device="meta", torch_dtype="bfloat16")

    def expect(model, precision, **kw):
        nbytes, detail = model_activation_bytes(model, 2, 16, True, precision)
        assert nbytes == lora_activation_bytes(TINY_ARCH, 2, 16, rank=8, **kw), (precision, detail)
        return detail

    detail = expect(qlora, "bf16-mixed", base="nf4", mode="bf16-mixed", dropout=0.05)
    assert detail == ("batch 2 x seq 16, bf16-mixed, checkpointing, LoRA r=8 on 7 projections, dropout 0.05, "
                      "NF4 base")
    expect(qlora, None, base="nf4", mode="bf16-base-fp32-adapters", dropout=0.05)
    expect(qlora, "bf16-true", base="nf4", mode="bf16", dropout=0.05)
    dense = build_causal_lm(None, TINY_ARCH, None, {**lora, "dropout": 0.0, "target_modules": ["q_proj", "k_proj",
                            "v_proj", "o_proj"]}, device="meta")
    assert "4 projections, frozen base" in expect(dense, "32-true", base="dense", mode="fp32", targets="attention")
    nbytes, why = model_activation_bytes(dense, 2, 16, True, "bf16-mixed")  # fp32 base under autocast
    assert nbytes is None and "precision='bf16-mixed'" in why
    two = build_causal_lm(None, TINY_ARCH, "nf4", {**lora, "target_modules": ["q_proj", "v_proj"]}, device="meta")
    nbytes, why = model_activation_bytes(two, 2, 16, True)
    assert nbytes is None and "q_proj, v_proj" in why


def test_activation_bytes_refuses_bad_input():
    from lowmem_lightning.estimate import activation_bytes

    with pytest.raises(ValueError, match="dtype_bytes=1"):
        activation_bytes(TINY_ARCH, 1, 8, dtype_bytes=1)
    with pytest.raises(ValueError, match="seq_len=0"):
        activation_bytes(TINY_ARCH, 1, 0)
    with pytest.raises(ValueError, match="vocab_size=None"):
        activation_bytes({k: v for k, v in TINY_ARCH.items() if k != "vocab_size"}, 1, 8)


def test_activations_join_every_total():
    base = estimate_memory(nn.Linear(100, 100))
    more = estimate_memory(nn.Linear(100, 100), activations=10**6)
    assert all(more.optimizers[r].total_device_bytes - base.optimizers[r].total_device_bytes == 10**6
               for r in base.optimizers)
    assert "activations" in format_table(more) and "(activations left out)" in format_table(base)
    assert "(activations left out)" not in format_table(more)
    with pytest.raises(ValueError, match="activations=-1"):
        estimate_memory(nn.Linear(2, 2), activations=-1)


# ============================================================================== activations in lowmem estimate
def _estimate_json(capsys, *args: str) -> dict:
    assert main(["estimate", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_cli_gives_the_numbers_gpu_check_measures_against(capsys):
    """``lowmem estimate --config full_finetune_7b.yaml --data.seq_len 1024`` (the fit CLI's flag) shows the
    activations, weights, released gradients, state and total that ``benchmarks/gpu_check.py``'s
    ``full_ft_7b`` part puts beside the measured peak, to the byte."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    expected = gpu_check.full_ft_estimate("recipe", 1024, False)
    # gpu_check's batches carry an attention_mask (documents not kept apart): no packed-document mask
    data = _estimate_json(capsys, "--config", "full_finetune_7b.yaml", "--data.seq_len", "1024",
                          "--data.isolate_documents", "false")
    row = data["optimizers"][data["configured_optimizer"]]
    shown = {"weights": data["frozen_bytes"] + data["trainable_bytes"], "state": row["device_state_bytes"],
             "gradients": data["gradient_device_bytes"], "activations": data["activation_bytes"],
             "total": row["total_device_bytes"]}
    assert shown == expected
    assert sum(v for k, v in shown.items() if k != "total") == shown["total"]
    assert data["activation_detail"] == "batch 1 x seq 1024, bf16, checkpointing"


def test_estimate_cli_takes_batch_seq_and_checkpointing_like_fit(capsys):
    """The recipe's data.batch_size / data.seq_len / model.gradient_checkpointing / data.pack /
    data.isolate_documents, and the flags that change them in ``lowmem fit``, give ``activation_bytes`` of the
    model's config (packed documents kept apart, TextDataModule's default: with their mask, said in the detail); the
    activations join every total."""
    from lowmem_lightning.estimate import activation_bytes

    cfg = parse_fit_config(["--config", "tiny.yaml"])
    arch, data = cfg.model.init_args.config, cfg.data.init_args
    arch = {**arch, "vocab_size": 259}  # the byte tokenizer's
    assert data.pack is True and data.isolate_documents is True  # the defaults the recipe keeps
    recipe = _estimate_json(capsys, "--config", "tiny.yaml")
    packed = activation_bytes(arch, data.batch_size, data.seq_len, 4, False, isolate_documents=True)
    plain = activation_bytes(arch, data.batch_size, data.seq_len, 4, False)
    batch, seq, head_dim = data.batch_size, data.seq_len, arch["hidden_size"] // arch["num_attention_heads"]
    # a float mask per layer, kept for backward; each row's rotary cos and sin tables
    assert packed - plain == arch["num_hidden_layers"] * 4 * batch * seq**2 + 2 * (batch - 1) * seq * head_dim * 4
    assert recipe["activation_bytes"] == packed
    assert recipe["activation_detail"] == (f"batch {data.batch_size} x seq {data.seq_len}, fp32, no checkpointing, "
                                           "+1.16 MiB document mask")
    for flag in ("--data.isolate_documents", "--data.pack"):
        assert _estimate_json(capsys, "--config", "tiny.yaml", flag, "false")["activation_bytes"] == plain, flag
    flags = _estimate_json(capsys, "--config", "tiny.yaml", "--data.batch_size", "3", "--data.seq_len", "40",
                           "--model.gradient_checkpointing", "true", "--trainer.precision", "bf16-true",
                           "--data.isolate_documents", "false")
    assert flags["activation_bytes"] == activation_bytes(arch, 3, 40, 2, True)
    assert flags["activation_detail"] == "batch 3 x seq 40, bf16, checkpointing"
    assert main(["estimate", "--config", "tiny.yaml"]) == 0
    shown = capsys.readouterr().out
    assert sum("+1.16 MiB document mask" in line for line in shown.splitlines()) == 2  # model lines, run's peak
    for name, row in recipe["optimizers"].items():
        state = row["device_state_bytes"]
        weights_grads = recipe["trainable_bytes"] + recipe["frozen_bytes"] + recipe["gradient_bytes"]
        assert row["total_device_bytes"] == weights_grads + state + recipe["activation_bytes"], name


def test_estimate_cli_gives_the_qlora_recipes_activations(capsys):
    """QLoRA (4-bit base, LoRA r=16 on the seven projections, dropout 0.05, bf16-mixed, checkpointing): the LoRA
    formula's activations join the total; under an autocast dtype that is not the weights' they are left out."""
    from lowmem_lightning.estimate import lora_activation_bytes

    arch = json.loads(_llama_2_7b_config())
    data = _estimate_json(capsys, "--config", "qlora_7b.yaml")
    assert data["activation_bytes"] == lora_activation_bytes(arch, 1, 512, base="nf4", mode="bf16-mixed",
                                                             dropout=0.05, targets="all", rank=16)
    assert data["activation_detail"].startswith("batch 1 x seq 512, bf16-mixed, checkpointing, LoRA r=16")
    row = data["optimizers"][data["configured_optimizer"]]
    assert row["total_device_bytes"] == (data["frozen_bytes"] + data["trainable_bytes"] + data["gradient_bytes"]
                                         + row["device_state_bytes"] + data["activation_bytes"])
    assert main(["estimate", "--config", "qlora_7b.yaml", "--budget-gb", "6"]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.strip().startswith("total "))
    assert "+ activations" not in total and "fits the 6 GB budget" in total
    assert "(activations left out)" not in out
    fp16 = _estimate_json(capsys, "--config", "qlora_7b.yaml", "--trainer.precision", "16-mixed")
    assert fp16["activation_bytes"] == 0 and "precision='16-mixed'" in fp16["activation_detail"]


def _llama_2_7b_config() -> str:
    """The shipped Llama-2-7B architecture (``configs/llama-2-7b/config.json``) as JSON text."""
    from lowmem_lightning.cli import RECIPES_DIR

    return (RECIPES_DIR / "llama-2-7b" / "config.json").read_text()


def test_model_activation_bytes_says_what_it_does_not_model():
    from lowmem_lightning.estimate import activation_bytes, model_activation_bytes
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    llama = build_causal_lm(None, TINY_ARCH, device="meta")
    assert model_activation_bytes(llama, 2, 16, False) == (activation_bytes(TINY_ARCH, 2, 16, 4, False),
                                                           "batch 2 x seq 16, fp32, no checkpointing")
    assert model_activation_bytes(llama, 2, 16, True, "16-true")[1] == "batch 2 x seq 16, fp16, checkpointing"
    nbytes, why = model_activation_bytes(llama, 2, 16, True, "bf16-mixed")
    assert nbytes is None and "precision='bf16-mixed'" in why
    nbytes, why = model_activation_bytes(nn.Linear(4, 4), 2, 16, True)
    assert nbytes is None and "Llama-style config" in why
    with pytest.raises(ValueError, match="seq_len=0"):
        model_activation_bytes(llama, 2, 0, True)
    packed, detail = model_activation_bytes(llama, 2, 16, False, isolate_documents=True)
    assert packed == activation_bytes(TINY_ARCH, 2, 16, 4, False, isolate_documents=True) > activation_bytes(
        TINY_ARCH, 2, 16, 4, False) and detail.endswith("document mask")
    llama.set_attn_implementation("eager")  # its one float mask is the packed one: only the rotary tables join
    nbytes, detail = model_activation_bytes(llama, 2, 16, False, isolate_documents=True)
    assert nbytes == activation_bytes(TINY_ARCH, 2, 16, 4, False, True, "eager") and ", eager attention" in detail
    llama.config._attn_implementation = "flash_attention_2"  # what a meta build for a GPU run records
    nbytes, why = model_activation_bytes(llama, 2, 16, False)
    assert nbytes is None and why == "not modelled for attention 'flash_attention_2' (fitted to 'sdpa', 'eager')"


@pytest.mark.parametrize("recipe", ["full_finetune_7b.yaml", "qlora_7b.yaml"])
def test_estimate_table_fits_an_80_by_24_terminal(recipe, capsys):
    """No line over 80 columns; the optimizer table, its header and the recommendation are the last 22 lines,
    so the screen a 24-line terminal is left with after the command shows all of them; the run's own peak, part
    by part, above it."""
    assert main(["estimate", "--config", recipe, "--budget-gb", "24"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer "))
    assert len(lines) - header <= 22, len(lines) - header
    peak = lines.index(next(line for line in lines if line.startswith("peak on the device")))
    block = lines[peak + 1:lines.index("", peak)]
    labels = [line.split()[0] for line in block if not line.startswith("   ")]  # deeper: a wrapped note
    assert labels == ["weights", "gradients", "optimizer", "activations", "total"]


@pytest.mark.parametrize("bucket", [None, 0, 150000])
def test_estimate_cli_takes_the_recipes_release_bucket_bytes(bucket, tmp_path, capsys):
    """A recipe's ``LowMemOptimizerCallback(step_in_backward=True, bucket_bytes=N)``: the gradients on the device are
    the fullest bucket of that size (the tiny model's ~1 MiB of gradients is one 25 MiB bucket by default)."""
    from lowmem_lightning.cli import RECIPES_DIR
    from lowmem_lightning.estimate import released_gradient_bytes

    extra = "        step_in_backward: true\n" + ("" if bucket is None else f"        bucket_bytes: {bucket}\n")
    text = (RECIPES_DIR / "tiny.yaml").read_text().replace("        plot: true\n", "        plot: true\n" + extra)
    (tmp_path / "recipe.yaml").write_text(text)
    data = _estimate_json(capsys, "--config", str(tmp_path / "recipe.yaml"))
    assert data["bucket_bytes"] == (25 * 2**20 if bucket is None else bucket)
    expected = {None: data["gradient_bytes"], 0: data["largest_gradient_bytes"],
                150000: released_gradient_bytes(data["trainable_nbytes"], 150000)}[bucket]
    assert data["gradient_device_bytes"] == expected
    assert data["largest_gradient_bytes"] < released_gradient_bytes(data["trainable_nbytes"], 150000) < data[
        "gradient_bytes"]


@pytest.mark.parametrize("flag, value, minimum", [("--data.seq_len", "1", 2), ("--data.batch_size", "0", 1)])
def test_estimate_cli_refuses_the_batch_and_seq_fit_refuses(flag, value, minimum, capsys):
    """What ``lowmem fit`` refuses (a 1-token sequence, an empty batch) ``lowmem estimate`` refuses too,
    with the same message, exit 2, nothing on stdout."""
    assert main(["estimate", "--config", "tiny", flag, value]) == 2
    out, err = capsys.readouterr()
    name = flag.removeprefix("--data.")
    assert out == ""
    assert err.splitlines()[0] == f"lowmem estimate: error: Invalid {name}={value}: expected an integer >= {minimum}."


def test_gpu_check_qlora_part_sets_the_estimate_beside_its_peak():
    """``benchmarks/gpu_check.py``'s qlora_7b estimate: the LoRA formula for its step (dropout 0, bf16 autocast,
    CUDA decode transient) and the parts adding to the total, under the README's 6 GB; its meta model counts the
    same weights as the model the part trains (built for real at the dry-run size)."""
    import sys
    from pathlib import Path

    from lowmem_lightning.estimate import lora_activation_bytes
    from lowmem_lightning.quant import add_lora, random_causal_lm

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    est = gpu_check.qlora_estimate(False, 512)
    arch = json.loads(_llama_2_7b_config())
    assert est["activations"] == lora_activation_bytes(arch, 1, 512, base="nf4", mode="bf16-mixed", dropout=0.0,
                                                       targets="all", rank=16, device="cuda")
    assert est["total"] == est["weights"] + est["gradients"] + est["state"] + est["activations"] < 6e9
    assert "LoRA r=16 on 7 projections, NF4 base" in est["detail"] and "dropout" not in est["detail"]
    dry = gpu_check.qlora_estimate(True, 32)
    real = add_lora(random_causal_lm(gpu_check._llama_config(True), "nf4", torch.bfloat16, device="cpu"), r=16,
                    alpha=32)
    count = count_model(real)
    assert dry["gradients"] == count.gradient_bytes == count.trainable_bytes
    # the same NF4 codes and adapters; only the rotary inv_freq buffer differs (fp32 when built, bf16 on meta)
    assert abs(dry["weights"] - count.frozen_bytes - count.trainable_bytes) <= 256


@pytest.mark.parametrize("release", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_embeddings_gradient_is_counted_three_times_as_backward_ends(tied, release):
    """A trainable input embedding tied to the head (Llama 3.2 1B/3B, Qwen2.5 small, Gemma): autograd holds the head's
    gradient until the embedding's arrives and sums the two, so three copies of it exist at once; under gradient
    release the estimate counted one and fell to half the profiled peak. Now activations + gradients cover the peak
    of one forward + backward (torch's profiler, fp32, no checkpointing) tied or not, within 1.5x of it."""
    from lowmem_lightning.estimate import activation_bytes

    _lora_bench()  # benchmarks/ on sys.path
    import activation_probes

    torch.set_num_threads(1)
    config, model = activation_probes._tied_llama(tied, 16000, torch.float32)
    peak = activation_probes._backward_peak(model, 16000, release)  # SGD: no step transients, the gradients alone
    est = estimate_memory(model, configured=("sgd", {"lr": 1e-4}), step_in_backward=release,
                          bucket_bytes=64 * 2**10)
    assert est.model.tied_gradient_bytes == (16000 * 256 * 4 if tied else 0)
    predicted = activation_bytes(config, 1, 32, 4, False) + est.gradient_device_bytes
    assert 1.0 <= predicted / peak <= 1.5, (predicted, peak)
