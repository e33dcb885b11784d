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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="profile the FIT sizes and print the coefficients")
    parser.add_argument("--check", action="store_true", help="profile the CHECK sizes against the formula")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.fit:
        for key, value in fit(measure(FIT, 0.05)).items():
            print(f"    {key!r}: {value},")
    if args.check:
        worst = check(measure(CHECK, 0.1))
        print(f"largest |formula / profiled - 1|: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
