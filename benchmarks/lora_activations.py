"""Activation peak of LoRA decoders under torch's CPU profiler, and the fit of
:data:`lowmem_lightning.estimate.LORA_ACTIVATION_COEFFICIENTS`.

Every entry of the table (base ``nf4``/``dense`` x :data:`~lowmem_lightning.estimate.LORA_MODES` x dropout
0 / 0.05 x all seven / attention projections), with and without gradient checkpointing, is profiled on
HF Llama decoders of the :data:`FIT` sizes (batch 2 x seq 96, rank 16, one CPU thread); ``--fit`` solves
each entry's coefficients by least squares (the rank terms and the CPU's NF4 decode transient taken out
first) and prints the table; ``--check`` profiles the :data:`CHECK` sizes (other batch, seq, dropout 0.1,
one size above the fitted range) and prints the formula's ratio to each profiled peak.

    python benchmarks/lora_activations.py --fit      # ~4 minutes on one core
    python benchmarks/lora_activations.py --check    # ~3 minutes

``--moe`` does the same for :data:`~lowmem_lightning.estimate.MOE_LORA_ACTIVATION_COEFFICIENTS`: QLoRA on the
attention projections of Mixtral decoders (NF4 experts, ``Experts4bit``) of the :data:`MOE_FIT` sizes, each mode,
with and without checkpointing, fitted with the Llama layer's attention terms and the decode transient of one
expert's ``gate_up`` matrix taken out; then the :data:`MOE_CHECK` sizes against the formula.

    python benchmarks/lora_activations.py --moe      # ~6 minutes on one core
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys

import numpy as np
import torch
from profiler_peak import peak_bytes  # a sibling module: run as a script, or from tests with benchmarks/ on sys.path

from lowmem_lightning.estimate import (
    LORA_ACTIVATION_COEFFICIENTS,
    LORA_MODES,
    LORA_TARGET_SETS,
    LOSS_BYTES_PER_VOCAB,
    NF4_DEQUANTIZE_BYTES,
    lora_activation_bytes,
)

FIT = {
    "h192": ({"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 3,
              "vocab_size": 700}, 2, 96),
    "h128-loss": ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "vocab_size": 3000}, 2, 96),
    "h256": ({"hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 500}, 2, 96),
    "h160": ({"hidden_size": 160, "intermediate_size": 640, "num_hidden_layers": 4, "num_attention_heads": 5,
              "vocab_size": 600}, 2, 96),
}
"""Sizes the coefficients are fitted on: ``name -> (config, batch, seq)`` (the loss-bound one only sets the
no-checkpointing rest term)."""

CHECK = {
    "h224": ({"hidden_size": 224, "intermediate_size": 448, "num_hidden_layers": 2, "num_attention_heads": 2,
              "vocab_size": 900}, 1, 160),
    "h144": ({"hidden_size": 144, "intermediate_size": 576, "num_hidden_layers": 3, "num_attention_heads": 3,
              "vocab_size": 500}, 3, 64),
    "h320": ({"hidden_size": 320, "intermediate_size": 896, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 800}, 2, 80),
}
"""Sizes the coefficients are checked on (not fitted): ``name -> (config, batch, seq)``."""

RANK = 16


def build_lora_model(config: dict, seq: int, base: str, mode: str, dropout: float, targets: str, checkpointing: bool):
    """A CPU LoRA decoder of ``config`` as a run in ``mode`` trains it: NF4 or frozen dense base, rank-16 adapters
    on the :data:`~lowmem_lightning.estimate.LORA_TARGET_SETS` ``targets``; returns ``(model, autocast)``."""
    from lowmem_lightning.modules.causal_lm import _enable_checkpointing, build_causal_lm

    torch.manual_seed(0)
    dtype = "float32" if mode == "fp32" else "bfloat16"
    lora = {"r": RANK, "alpha": 2 * RANK, "dropout": dropout, "target_modules": sorted(LORA_TARGET_SETS[targets])}
    model = build_causal_lm(None, {**config, "max_position_embeddings": seq}, "nf4" if base == "nf4" else None, lora,
                            device="cpu", torch_dtype=dtype)
    if mode == "bf16":
        model.to(torch.bfloat16)  # what Lightning's bf16-true does to base and adapters
    if checkpointing:
        _enable_checkpointing(model)
    return model, mode == "bf16-mixed"


def profiled_peak(model, vocab: int, batch: int, seq: int, autocast: bool = False, position_ids=None) -> int:
    """Peak CPU bytes allocated during one forward + backward of ``model`` (gradients freed as they arrive), from
    torch's profiler; bf16 autocast around the forward when ``autocast``; ``position_ids`` (``[batch, seq]``,
    restarting at each document: packed documents kept apart) given to the model with ``use_cache=False``, as
    ``CausalLMModule`` calls it. Python's garbage collector is run before
    and held off during the profile: a collection inside it frees tensors of earlier models (peft and HF modules
    hold reference cycles), which the profiler counts as frees and so lowers the peak by up to 20%."""
    model.train()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                packed = {} if position_ids is None else {"position_ids": position_ids, "use_cache": False}
                loss = model(input_ids=ids, labels=ids, **packed).loss
            loss.backward()
    finally:
        gc.enable()
    return peak_bytes(prof)


def measure(sizes: dict, dropout: float) -> list[dict]:
    """Profiled peaks of every table entry, with and without checkpointing, at ``sizes``."""
    rows = []
    for (name, (config, batch, seq)), base, mode, drop, targets, ckpt in itertools.product(
            sizes.items(), ("nf4", "dense"), LORA_MODES, (0.0, dropout), LORA_TARGET_SETS, (True, False)):
        model, autocast = build_lora_model(config, seq, base, mode, drop, targets, ckpt)
        peak = profiled_peak(model, config["vocab_size"], batch, seq, autocast)
        rows.append({"size": name, "base": base, "mode": mode, "dropout": drop, "targets": targets, "ckpt": ckpt,
                     "peak": peak})
        print(rows[-1], flush=True)
    return rows


def fit(rows: list[dict]) -> dict:
    """Least-squares coefficients ``(full_h, full_i, rest_h, layer_h, layer_i)`` per table entry."""
    table = {}
    for key in sorted({(r["base"], r["mode"], r["dropout"] > 0, r["targets"]) for r in rows}):
        base, mode, _, targets = key
        d = 4 if mode == "fp32" else 2
        rank_bytes = len(LORA_TARGET_SETS[targets]) * RANK * (2 if mode in ("bf16", "bf16-mixed") else 4)
        full, full_b, layer, layer_b = [], [], [], []
        for r in (r for r in rows if (r["base"], r["mode"], r["dropout"] > 0, r["targets"]) == key):
            config, batch, seq = FIT[r["size"]]
            h, i, L, V = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
            n = batch * seq
            if not r["ckpt"]:
                full.append([L * h, L * i, h])
                full_b.append(r["peak"] / n - L * rank_bytes - LOSS_BYTES_PER_VOCAB * V)
            elif not r["size"].endswith("-loss"):
                transient = NF4_DEQUANTIZE_BYTES["cpu"][d] * h * i if base == "nf4" else 0
                layer.append([h, i])
                layer_b.append((r["peak"] - transient) / n - (L + 1) * d * h - rank_bytes)
        x = np.linalg.lstsq(np.array(full, float), np.array(full_b), rcond=None)[0]
        y = np.linalg.lstsq(np.array(layer, float), np.array(layer_b), rcond=None)[0]
        table[key] = tuple(round(float(v), 1) for v in (*x, *y))
    return table


def check(rows: list[dict]) -> float:
    """Print the formula / profiled ratio of every row; return the largest ``|ratio - 1|``."""
    worst = 0.0
    for r in rows:
        config, batch, seq = CHECK[r["size"]]
        predicted = lora_activation_bytes(config, batch, seq, base=r["base"], mode=r["mode"], dropout=r["dropout"],
                                          targets=r["targets"], rank=RANK, gradient_checkpointing=r["ckpt"],
                                          device="cpu")
        worst = max(worst, abs(predicted / r["peak"] - 1))
        print(f"{r['size']:>5} {r['base']:>5} {r['mode']:>23} dropout {r['dropout']:<4} {r['targets']:>9} "
              f"{'ckpt' if r['ckpt'] else 'full':>4}: profiled {r['peak']:>10,} B, formula/profiled "
              f"{predicted / r['peak']:.3f}")
    return worst


def _mixtral(h: int, i: int, layers: int, experts: int, top_k: int, vocab: int, heads: int, kv: int | None = None):
    return {"model_type": "mixtral", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv or heads, "vocab_size": vocab,
            "num_local_experts": experts, "num_experts_per_tok": top_k}


MOE_FIT = [_mixtral(192, 256, 3, 4, 2, 700, 3), _mixtral(128, 384, 2, 8, 2, 500, 2),
           _mixtral(256, 192, 2, 8, 4, 600, 4), _mixtral(160, 512, 3, 16, 2, 500, 5),
           _mixtral(224, 320, 2, 8, 2, 900, 7), _mixtral(128, 128, 2, 32, 8, 400, 4, 2),
           _mixtral(192, 448, 2, 4, 1, 600, 3), _mixtral(160, 256, 4, 12, 3, 500, 5)]
"""Mixtral decoders the MoE coefficients are fitted on (experts, top-k and sizes varied)."""

MOE_CHECK = [_mixtral(208, 352, 2, 8, 2, 650, 4, 2), _mixtral(144, 288, 3, 6, 3, 550, 3),
             _mixtral(240, 160, 2, 16, 4, 700, 6, 3)]
"""Mixtral decoders they are checked on (not fitted)."""

MOE_SHAPES = [(2, 96, True), (2, 96, False), (3, 64, True), (1, 160, False)]
"""``(batch, seq, checkpointing)`` profiled at each MoE size."""


def measure_moe(configs: list[dict], mode: str) -> list[dict]:
    """Profiled peaks of QLoRA (rank 16, attention projections, NF4 experts) on ``configs`` in ``mode``."""
    rows = []
    for config, (batch, seq, ckpt) in itertools.product(configs, MOE_SHAPES):
        model, autocast = build_lora_model(config, seq, "nf4", mode, 0.0, "attention", ckpt)
        rows.append({"config": config, "batch": batch, "seq": seq, "ckpt": ckpt,
                     "peak": profiled_peak(model, config["vocab_size"], batch, seq, autocast)})
    return rows


def _moe_known(row: dict, mode: str) -> tuple[float, list[float]]:
    """``(what the Llama attention terms and the decode transient account for, per token, the MoE terms' features)``
    of a profiled row: the features are ``K * i``, ``K * h`` and ``E`` (per layer without checkpointing)."""
    config = row["config"]
    h, i, layers, vocab = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    top_k, experts = config["num_experts_per_tok"], config["num_local_experts"]
    full_h, _, rest_h, layer_h, _ = LORA_ACTIVATION_COEFFICIENTS[("nf4", mode, False, "attention")]
    d = 4 if mode == "fp32" else 2
    rank_bytes = len(LORA_TARGET_SETS["attention"]) * RANK * (2 if mode in ("bf16", "bf16-mixed") else 4)
    n = row["batch"] * row["seq"]
    transient = NF4_DEQUANTIZE_BYTES["cpu"][d] * h * 2 * i  # one expert's gate_up matrix
    if row["ckpt"]:
        return (layers + 1) * d * h + layer_h * h + rank_bytes + transient / n, [top_k * i, top_k * h, experts]
    known = layers * (full_h * h + rank_bytes) + rest_h * h + max(LOSS_BYTES_PER_VOCAB * vocab, transient / n)
    return known, [layers * top_k * i, layers * top_k * h, layers * experts]


def fit_moe(rows: list[dict], mode: str) -> tuple[float, ...]:
    """``(full_ki, full_kh, full_e, layer_ki, layer_kh, layer_e)``: least squares of the MoE terms per token over
    ``rows`` without and with checkpointing; a negative expert-count term is dropped (refitted without it)."""
    coefficients = []
    for ckpt in (False, True):
        known, features, per_token = [], [], []
        for row in (r for r in rows if r["ckpt"] == ckpt):
            k, f = _moe_known(row, mode)
            known.append(k)
            features.append(f)
            per_token.append(row["peak"] / (row["batch"] * row["seq"]))
        x, y = np.array(features, float), np.array(per_token) - np.array(known)
        found = np.linalg.lstsq(x, y, rcond=None)[0]
        if found[2] < 0:
            found = np.append(np.linalg.lstsq(x[:, :2], y, rcond=None)[0], 0.0)
        coefficients += [round(float(v), 1) for v in found]
    return tuple(coefficients)


def check_moe(rows: list[dict], mode: str) -> float:
    """Print the formula / profiled ratio of every MoE row; return the largest ``|ratio - 1|``."""
    worst = 0.0
    for r in rows:
        predicted = lora_activation_bytes(r["config"], r["batch"], r["seq"], base="nf4", mode=mode, targets="attention",
                                          rank=RANK, gradient_checkpointing=r["ckpt"], device="cpu")
        worst = max(worst, abs(predicted / r["peak"] - 1))
        c = r["config"]
        print(f"h{c['hidden_size']} i{c['intermediate_size']} E{c['num_local_experts']} k{c['num_experts_per_tok']} "
              f"{mode:>23} {'ckpt' if r['ckpt'] else 'full'}: profiled {r['peak']:>10,} B, formula/profiled "
              f"{predicted / r['peak']:.3f}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="profile the FIT sizes and print the coefficients")
    parser.add_argument("--check", action="store_true", help="profile the CHECK sizes against the formula")
    parser.add_argument("--moe", action="store_true", help="fit the Mixtral (NF4 experts) terms, then check them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.moe:
        for mode in LORA_MODES:
            print(f"    {mode!r}: {fit_moe(measure_moe(MOE_FIT, mode), mode)},", flush=True)
        worst = max(check_moe(measure_moe(MOE_CHECK, mode), mode) for mode in LORA_MODES)
        print(f"largest |formula / profiled - 1| (MoE): {worst:.3f}")
    if args.fit:
        for key, value in fit(measure(FIT, 0.05)).items():
            print(f"    {key!r}: {value},")
    if args.check:
        worst = check(measure(CHECK, 0.1))
        print(f"largest |formula / profiled - 1|: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
