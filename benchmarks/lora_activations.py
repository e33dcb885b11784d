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

``--qwen2-moe`` fits :data:`~lowmem_lightning.estimate.SHARED_EXPERT_ACTIVATION_BYTES` (Qwen2-MoE's shared expert,
with LoRA on the attention or on the attention and the shared expert) from the :data:`SHARED_EXPERT_FIT` decoders
against the MoE formula, every mode, dropout and targets; then the :data:`SHARED_EXPERT_CHECK` decoders.

    python benchmarks/lora_activations.py --qwen2-moe   # ~10 minutes on one core

``--widths`` fits what the Llama-only tables leave out, on decoders whose attention is not ``hidden_size`` wide:
:data:`~lowmem_lightning.estimate.ATTENTION_WIDTH_BYTES` and
:data:`~lowmem_lightning.estimate.LORA_ATTENTION_WIDTH_BYTES` (bytes per token per element by which the query width
``heads * head_dim`` and the key/value width ``kv_heads * head_dim`` differ from ``hidden_size``: grouped-query
attention, a ``head_dim`` of its own) from Llama decoders of the :data:`WIDTH_HEADS` shapes, each against the
``q = kv = h`` one; and :data:`~lowmem_lightning.estimate.QK_NORM_BYTES` (Qwen3's per-head RMSNorm on queries and
keys) from Qwen3 decoders of the same shapes against the Llama ones. Every full-weight dtype and LoRA entry (dropout 0
and 0.05), with and without checkpointing; then the :data:`WIDTH_CHECK` decoders (Llama, Qwen3, Qwen3-MoE, not
fitted) against the formulas.

    python benchmarks/lora_activations.py --widths   # ~6 minutes on one core

``--gemma3`` fits :data:`~lowmem_lightning.estimate.GEMMA3_ACTIVATION_BYTES` (Gemma 3's layer beyond Llama's with
the width terms: q/k norms, a norm after the attention and after the MLP, the scaled embedding) from Gemma 3 text
decoders of the :data:`LAYER_FIT` shapes against the formula for a Llama of the same shapes, every setting as
``--widths``; then the :data:`LAYER_CHECK` decoders. ``--phi3`` does the same for
:data:`~lowmem_lightning.estimate.PHI3_ACTIVATION_BYTES` (Phi-3's fused ``qkv_proj`` and ``gate_up_proj``, with LoRA
on them: one adapter each; its rotary embedding's copies of the queries and keys).

    python benchmarks/lora_activations.py --gemma3   # ~5 minutes on one core
    python benchmarks/lora_activations.py --phi3     # ~5 minutes on one core

``--gemma2`` fits :data:`~lowmem_lightning.estimate.GEMMA2_ACTIVATION_BYTES` the same way under eager attention (the
one transformers runs Gemma 2 with), its soft-capping counted by the formula
(:data:`~lowmem_lightning.estimate.SOFTCAP_MODEL_TYPES`).

    python benchmarks/lora_activations.py --gemma2   # ~6 minutes on one core

``--neox`` does the same for :data:`~lowmem_lightning.estimate.NEOX_ACTIVATION_BYTES` (GPT-NeoX, Pythia: the parallel
attention and MLP block, with LoRA on its 4 projections).

    python benchmarks/lora_activations.py --neox     # ~6 minutes on one core

``--olmo2`` does the same for :data:`~lowmem_lightning.estimate.OLMO2_ACTIVATION_BYTES` (OLMo 2: a norm after the
attention and after the MLP instead of before, q/k norms over the whole query and key widths).

    python benchmarks/lora_activations.py --olmo2    # ~6 minutes on one core

``--glm4`` does the same for :data:`~lowmem_lightning.estimate.GLM4_ACTIVATION_BYTES` (GLM-4-0414: a norm after the
attention and after the MLP beside Llama's two, a fused ``gate_up_proj``, rotary on half of each head).

    python benchmarks/lora_activations.py --glm4     # ~6 minutes on one core

``--exaone4`` does the same for :data:`~lowmem_lightning.estimate.EXAONE4_ACTIVATION_BYTES` (EXAONE 4: OLMo 2's norms
after the attention and the MLP, q/k norms per head).

    python benchmarks/lora_activations.py --exaone4  # ~6 minutes on one core

``--granite`` fits nothing either: it checks :data:`~lowmem_lightning.estimate.GRANITE_ACTIVATION_BYTES` (one more
``hidden_size``-wide tensor than Llama's layer, measured exact) on the :data:`LAYER_CHECK` Granite decoders, every
setting as ``--widths``.

    python benchmarks/lora_activations.py --granite  # ~3 minutes on one core

``--gpt-oss`` fits :data:`~lowmem_lightning.estimate.GPT_OSS_ACTIVATION_BYTES` (gpt-oss under its eager attention, NF4
experts, LoRA on the attention) from the :data:`GPT_OSS_FIT` decoders against the MoE formula, every mode, then checks
the :data:`GPT_OSS_CHECK` ones; ``--gpt-oss-scale`` checks it beyond them (:data:`GPT_OSS_SCALE`: more layers,
gpt-oss-20b's widths) and on packed documents.

    python benchmarks/lora_activations.py --gpt-oss         # ~6 minutes on one core
    python benchmarks/lora_activations.py --gpt-oss-scale   # ~12 minutes on one core

``--kin`` fits nothing: it profiles the decoders whose layer is another's under another name (:data:`KIN_MODEL_TYPES`:
Ministral 3 and 8B, InternLM3, Seed-OSS, SmolLM3, Hunyuan dense, OLMo 3, the language models of Qwen2-VL, Qwen2.5-VL
and Qwen3-VL) and the Llama, Qwen2, Qwen3 or OLMo 2 decoder of the same shapes at the :data:`KIN_SHAPES`, every setting
as ``--widths``, and prints each peak's ratio to its reference's and the formula's ratio to it: the check behind their
place in :data:`~lowmem_lightning.estimate.ACTIVATION_MODEL_TYPES`.

    python benchmarks/lora_activations.py --kin      # ~15 minutes on one core

``--eager`` fits :data:`~lowmem_lightning.estimate.EAGER_ATTENTION_BYTES` (what transformers' eager attention holds
beyond SDPA: the ``seq**2`` scores, the repeated key/value heads, one float mask) from the profiled peak of eager less
SDPA's on the :data:`EAGER_FIT` Llama decoders, every :data:`EAGER_SETTINGS` entry with and without checkpointing;
then checks the formula on the :data:`EAGER_CHECK` decoders (Llama, Qwen3, Phi-3, Gemma 3).

    python benchmarks/lora_activations.py --eager    # ~3 minutes on one core

``--dora`` fits :data:`~lowmem_lightning.estimate.DORA_ACTIVATION_BYTES` (what DoRA, ``use_dora``, adds on an NF4
base) from the :data:`DORA_FIT` decoders: each mode, dropout 0 / 0.05, all seven or the attention projections, DoRA's
profiled peak minus plain LoRA's, by least squares (the checkpointed rows give the layer and transient terms, the
others the per-layer term); then checks the whole formula against DoRA's profiled peak on the :data:`CHECK` sizes
(dropout 0.1).

    python benchmarks/lora_activations.py --dora     # ~3 minutes on one core

``--dora-scale`` checks the DoRA terms (nothing fitted) on a wider Llama with grouped-query attention (hidden 1024,
2 kv heads, 1 x 256, dropout 0.05) and on Phi-3's fused projections (hidden 192, 2 x 80).

    python benchmarks/lora_activations.py --dora-scale   # ~1 minute
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
    DORA_ACTIVATION_BYTES,
    GPT_OSS_ACTIVATION_BYTES,
    LAYER_ACTIVATION_BYTES,
    LORA_ACTIVATION_COEFFICIENTS,
    LORA_MODES,
    LORA_TARGET_SETS,
    LOSS_BYTES_PER_VOCAB,
    NF4_DEQUANTIZE_BYTES,
    SHARED_EXPERT_ACTIVATION_BYTES,
    _loss_bytes_per_vocab,
    activation_bytes,
    attention_extra_bytes,
    attention_widths,
    dora_projection_terms,
    lora_activation_bytes,
    lora_target_sets,
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


def build_lora_model(config: dict, seq: int, base: str, mode: str, dropout: float, targets: str, checkpointing: bool,
                     attention: str = "sdpa", dora: bool = False):
    """A CPU LoRA decoder of ``config`` as a run in ``mode`` trains it: NF4 or frozen dense base, rank-16 adapters
    (DoRA with ``dora``) on the ``targets`` projections (:func:`~lowmem_lightning.estimate.lora_target_sets`: in the
    names of ``config``'s ``model_type``), transformers' ``attention``; returns ``(model, autocast)``."""
    from lowmem_lightning.modules.causal_lm import _enable_checkpointing, build_causal_lm

    torch.manual_seed(0)
    dtype = "float32" if mode == "fp32" else "bfloat16"
    lora = {"r": RANK, "alpha": 2 * RANK, "dropout": dropout,
            "target_modules": sorted(lora_target_sets(config)[targets]), "use_dora": dora}
    model = build_causal_lm(None, _as_built(config, seq), "nf4" if base == "nf4" else None, lora,
                            device="cpu", torch_dtype=dtype, attn_implementation=attention)
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


DORA_FIT = {
    "h192": ({"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 3,
              "vocab_size": 700}, 2, 96),
    "h192-short": ({"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 3,
                    "vocab_size": 700}, 1, 48),
    "h256": ({"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 500}, 2, 64),
    "h128": ({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
              "vocab_size": 400}, 4, 64),
}
"""Sizes :data:`~lowmem_lightning.estimate.DORA_ACTIVATION_BYTES` is fitted on (tokens and projection sizes varied
apart, so the per-token and the per-weight terms separate): ``name -> (config, batch, seq)``."""


def _dora_settings():
    return itertools.product(LORA_MODES, (False, True), LORA_TARGET_SETS, (True, False))


def _dora_peak(config: dict, batch: int, seq: int, mode: str, dropout: float, targets: str, ckpt: bool,
               dora: bool) -> int:
    model, autocast = build_lora_model(config, seq, "nf4", mode, dropout, targets, ckpt, dora=dora)
    return profiled_peak(model, config["vocab_size"], batch, seq, autocast)


def fit_dora() -> dict:
    """``(mode, dropout > 0, targets) -> (full, layer, transient)`` by least squares over DoRA's profiled peak minus
    plain LoRA's on the :data:`DORA_FIT` sizes."""
    rows = {}
    for mode, drop, targets, ckpt in _dora_settings():
        for config, batch, seq in DORA_FIT.values():
            dropout = 0.05 if drop else 0.0
            extra = (_dora_peak(config, batch, seq, mode, dropout, targets, ckpt, True)
                     - _dora_peak(config, batch, seq, mode, dropout, targets, ckpt, False))
            out, largest = dora_projection_terms(config, targets)
            n, layers = batch * seq, config["num_hidden_layers"]
            rows.setdefault((mode, drop, targets, ckpt), []).append(
                ([n * out, largest] if ckpt else [n * layers * out], extra))
        print(mode, drop, targets, ckpt, [extra for _, extra in rows[(mode, drop, targets, ckpt)]], flush=True)
    table = {}
    for mode, drop, targets in sorted({key[:3] for key in rows}):
        layer, transient = _least_squares(rows[(mode, drop, targets, True)])
        (full,) = _least_squares(rows[(mode, drop, targets, False)])
        table[(mode, drop, targets)] = (round(full, 2), round(layer, 2), round(transient, 2))
    return table


def check_dora() -> float:
    """Print the formula / profiled ratio of DoRA's peak on the :data:`CHECK` sizes (dropout 0.1 and 0), every mode,
    targets and checkpointing; return the largest ``|ratio - 1|``."""
    worst = 0.0
    for (mode, drop, targets, ckpt), (name, (config, batch, seq)) in itertools.product(_dora_settings(),
                                                                                         CHECK.items()):
        dropout = 0.1 if drop else 0.0
        peak = _dora_peak(config, batch, seq, mode, dropout, targets, ckpt, True)
        predicted = lora_activation_bytes(config, batch, seq, base="nf4", mode=mode, dropout=dropout, targets=targets,
                                          rank=RANK, gradient_checkpointing=ckpt, device="cpu", dora=True)
        worst = max(worst, abs(predicted / peak - 1))
        print(f"{name:>5} {mode:>23} dropout {dropout:<4} {targets:>9} {'ckpt' if ckpt else 'full':>4}: profiled "
              f"{peak:>10,} B, formula/profiled {predicted / peak:.3f}", flush=True)
    return worst


DORA_SCALE = [
    ({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 2, "num_attention_heads": 8,
      "num_key_value_heads": 2, "vocab_size": 2000}, 1, 256,
     [(mode, 0.05, "all", ckpt) for mode in ("bf16-mixed", "bf16") for ckpt in (True, False)]),
]
"""``(config, batch, seq, [(mode, dropout, targets, checkpointing), ...])`` of :func:`check_dora_scale` beyond the
fitted sizes; the Phi-3 decoder is added there (its builder is defined below)."""


def check_dora_scale() -> float:
    """Print the formula / profiled ratio of DoRA's peak on :data:`DORA_SCALE` and on a Phi-3 decoder (fused
    ``qkv_proj`` / ``gate_up_proj``), and plain LoRA's formula's beside it; return the largest ``|ratio - 1|``."""
    phi3 = (_phi3(192, 512, 2, 4, 4, 600), 2, 80,
            [(mode, dropout, targets, ckpt) for mode, dropout, ckpt in (("bf16-mixed", 0.05, True),
                                                                        ("bf16-mixed", 0.0, False),
                                                                        ("fp32", 0.1, True), ("bf16", 0.0, True))
             for targets in ("all", "attention")])
    worst = 0.0
    for config, batch, seq, settings in [*DORA_SCALE, phi3]:
        for mode, dropout, targets, ckpt in settings:
            peak = _dora_peak(config, batch, seq, mode, dropout, targets, ckpt, True)
            predicted, plain = (lora_activation_bytes(config, batch, seq, base="nf4", mode=mode, dropout=dropout,
                                                      targets=targets, rank=RANK, gradient_checkpointing=ckpt,
                                                      device="cpu", dora=dora) for dora in (True, False))
            worst = max(worst, abs(predicted / peak - 1))
            print(f"{config.get('model_type', 'llama'):>6} h{config['hidden_size']} {mode:>10} dropout {dropout:<4} "
                  f"{targets:>9} {'ckpt' if ckpt else 'full':>4}: profiled {peak:>11,} B, formula/profiled "
                  f"{predicted / peak:.3f} (plain LoRA's formula {plain / peak:.3f})", flush=True)
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
    attention = attention_extra_bytes(config, ("nf4", mode, False))  # grouped-query attention
    if row["ckpt"]:
        return ((layers + 1) * d * h + layer_h * h + rank_bytes + attention + transient / n,
                [top_k * i, top_k * h, experts])
    known = (layers * (full_h * h + rank_bytes + attention) + rest_h * h
             + max(LOSS_BYTES_PER_VOCAB * vocab, transient / n))
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


def _qwen2_moe(h: int, i: int, shared: int, layers: int, experts: int, top_k: int, vocab: int, heads: int, kv: int):
    return {"model_type": "qwen2_moe", "hidden_size": h, "intermediate_size": shared, "moe_intermediate_size": i,
            "shared_expert_intermediate_size": shared, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "num_experts": experts, "num_experts_per_tok": top_k}


SHARED_EXPERT_FIT = [_qwen2_moe(192, 128, 384, 2, 8, 2, 600, 4, 2), _qwen2_moe(256, 96, 256, 3, 32, 4, 600, 4, 4),
                     _qwen2_moe(160, 160, 640, 2, 4, 1, 500, 5, 1), _qwen2_moe(128, 64, 256, 2, 48, 2, 500, 2, 2),
                     _qwen2_moe(224, 64, 640, 2, 16, 4, 700, 7, 1), _qwen2_moe(192, 256, 192, 3, 4, 2, 600, 6, 2),
                     _qwen2_moe(256, 128, 768, 2, 24, 1, 600, 4, 2), _qwen2_moe(160, 96, 320, 4, 64, 3, 500, 5, 5)]
"""Qwen2-MoE decoders :data:`~lowmem_lightning.estimate.SHARED_EXPERT_ACTIVATION_BYTES` is fitted on (experts from 4
to 64, top-k, expert and shared-expert widths, heads varied; the expert count not tied to the shared width)."""

SHARED_EXPERT_SHAPES = [(2, 96), (3, 64)]
"""``(batch, seq)`` profiled at each Qwen2-MoE size, with and without checkpointing."""

SHARED_EXPERT_CHECK = [(_qwen2_moe(208, 112, 416, 2, 8, 2, 650, 4, 2), 2, 160),
                       (_qwen2_moe(144, 144, 288, 3, 6, 3, 550, 3, 1), 3, 64),
                       (_qwen2_moe(240, 80, 560, 2, 16, 4, 700, 6, 3), 1, 224),
                       (_qwen2_moe(192, 48, 768, 2, 60, 4, 600, 4, 4), 2, 96)]  # Qwen1.5-MoE's: 60 small experts
"""``(config, batch, seq)`` the shared-expert terms are checked on (not fitted)."""


def _shared_expert_entries():
    """Every :data:`~lowmem_lightning.estimate.SHARED_EXPERT_ACTIVATION_BYTES` entry: ``(mode, dropout > 0,
    targets)``."""
    return list(itertools.product(LORA_MODES, (False, True), ("all", "attention")))


def _shared_expert_formula(config: dict, batch: int, seq: int, entry: tuple, ckpt: bool,
                           without_table: bool = False) -> int:
    """The QLoRA formula for a Qwen2-MoE ``config`` trained as ``entry`` (dropout 0.05, or 0.1 at batch 1 or 3); with
    ``without_table`` its shared-expert terms left out."""
    mode, dropped, targets = entry
    saved = SHARED_EXPERT_ACTIVATION_BYTES[entry]
    if without_table:
        SHARED_EXPERT_ACTIVATION_BYTES[entry] = (0.0,) * len(saved)
    try:
        return lora_activation_bytes(config, batch, seq, base="nf4", mode=mode, targets=targets, rank=RANK,
                                     dropout=(0.05 if batch == 2 else 0.1) if dropped else 0.0,
                                     gradient_checkpointing=ckpt, device="cpu")
    finally:
        SHARED_EXPERT_ACTIVATION_BYTES[entry] = saved


def _shared_expert_peak(config: dict, batch: int, seq: int, entry: tuple, ckpt: bool) -> int:
    mode, dropped, targets = entry
    dropout = (0.05 if batch == 2 else 0.1) if dropped else 0.0
    model, autocast = build_lora_model(config, seq, "nf4", mode, dropout, targets, ckpt)
    return profiled_peak(model, config["vocab_size"], batch, seq, autocast)


def fit_shared_expert() -> dict:
    """``entry -> (full_h, full_s, full_ki, full_kh, full_e, layer_h, layer_s, layer_ki, layer_kh, layer_e)``: least
    squares of what each :data:`SHARED_EXPERT_FIT` decoder at each :data:`SHARED_EXPERT_SHAPES` holds per token beyond
    the MoE formula, against ``[L * h, L * s, L * K * i, L * K * h, L * E]`` without checkpointing and the same with
    one layer (``L = 1``) with it."""
    table = {}
    for entry in _shared_expert_entries():
        pairs: dict[bool, list] = {False: [], True: []}
        for config, (batch, seq), ckpt in itertools.product(SHARED_EXPERT_FIT, SHARED_EXPERT_SHAPES, (False, True)):
            peak = _shared_expert_peak(config, batch, seq, entry, ckpt)
            base = _shared_expert_formula(config, batch, seq, entry, ckpt, without_table=True)
            h, layers, top_k = config["hidden_size"], config["num_hidden_layers"], config["num_experts_per_tok"]
            held = 1 if ckpt else layers
            features = [h, config["shared_expert_intermediate_size"], top_k * config["moe_intermediate_size"],
                        top_k * h, config["num_experts"]]
            pairs[ckpt].append(([held * f for f in features], (peak - base) / (batch * seq)))
        table[entry] = _least_squares(pairs[False]) + _least_squares(pairs[True])
        print(f"    {entry!r}: {table[entry]},", flush=True)
    return table


def check_shared_expert() -> float:
    """Profile the :data:`SHARED_EXPERT_CHECK` decoders, every entry with and without checkpointing, against the
    formula; print each ratio, return the largest ``|ratio - 1|``."""
    worst = 0.0
    for (config, batch, seq), entry, ckpt in itertools.product(SHARED_EXPERT_CHECK, _shared_expert_entries(),
                                                               (False, True)):
        peak = _shared_expert_peak(config, batch, seq, entry, ckpt)
        ratio = _shared_expert_formula(config, batch, seq, entry, ckpt) / peak
        worst = max(worst, abs(ratio - 1))
        print(f"qwen2_moe h{config['hidden_size']} i{config['moe_intermediate_size']} "
              f"s{config['shared_expert_intermediate_size']} E{config['num_experts']} k{config['num_experts_per_tok']} "
              f"{batch}x{seq} {str(entry):>42} {'ckpt' if ckpt else 'full'}: profiled {peak:>10,} B, "
              f"formula/profiled {ratio:.3f}", flush=True)
    return worst


def _gpt_oss(h: int, i: int, layers: int, experts: int, top_k: int, vocab: int, heads: int, kv: int, head_dim: int,
             window: int = 32) -> dict:
    """A gpt-oss decoder config: a sliding-window layer, then a full one, ... (gpt-oss-20b's pattern)."""
    types = ["sliding_attention" if j % 2 == 0 else "full_attention" for j in range(layers)]
    return {"model_type": "gpt_oss", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab,
            "num_local_experts": experts, "num_experts_per_tok": top_k, "sliding_window": window,
            "layer_types": types}


GPT_OSS_FIT = [_gpt_oss(192, 256, 2, 4, 2, 700, 4, 2, 48), _gpt_oss(128, 384, 2, 8, 2, 500, 8, 2, 32),
               _gpt_oss(256, 192, 2, 8, 4, 600, 4, 1, 64), _gpt_oss(160, 512, 3, 16, 2, 500, 2, 2, 80, 48),
               _gpt_oss(224, 320, 2, 8, 2, 900, 8, 4, 32), _gpt_oss(128, 128, 2, 32, 4, 400, 4, 2, 64),
               _gpt_oss(192, 448, 2, 4, 1, 600, 6, 2, 32, 64), _gpt_oss(160, 256, 4, 12, 3, 500, 4, 4, 40)]
"""gpt-oss decoders the :data:`~lowmem_lightning.estimate.GPT_OSS_ACTIVATION_BYTES` are fitted on (experts, top-k,
heads, key/value heads, head widths, windows and sizes varied)."""

GPT_OSS_SHAPES = [(2, 96), (1, 160), (3, 64)]
"""``(batch, seq)`` profiled at each :data:`GPT_OSS_FIT` decoder, with and without checkpointing, dropout 0 and 0.05."""

GPT_OSS_CHECK = [(_gpt_oss(208, 352, 2, 8, 2, 650, 4, 2, 64), 2, 112, 0.1),
                 (_gpt_oss(144, 288, 3, 6, 3, 550, 6, 2, 48, 24), 1, 192, 0.0),
                 (_gpt_oss(240, 160, 2, 16, 4, 700, 8, 8, 32, 64), 3, 80, 0.05),
                 (_gpt_oss(96, 192, 2, 8, 2, 6000, 4, 2, 32), 2, 64, 0.0)]
"""``(config, batch, seq, LoRA dropout)`` the gpt-oss terms are checked on (not fitted); the last is bound by the loss
under checkpointing."""


def _gpt_oss_formula(config: dict, batch: int, seq: int, mode: str, dropout: float, ckpt: bool,
                     without_table: bool = False, packed: bool = False) -> int:
    """The QLoRA formula (LoRA on the attention, NF4 experts, eager attention) for a gpt-oss ``config``; with
    ``without_table`` its :data:`~lowmem_lightning.estimate.GPT_OSS_ACTIVATION_BYTES` terms left out; ``packed``:
    packed documents kept apart (``isolate_documents``)."""
    saved = GPT_OSS_ACTIVATION_BYTES[mode]
    if without_table:
        GPT_OSS_ACTIVATION_BYTES[mode] = (0.0,) * len(saved)
    try:
        return lora_activation_bytes(config, batch, seq, base="nf4", mode=mode, targets="attention", rank=RANK,
                                     dropout=dropout, gradient_checkpointing=ckpt, device="cpu", attention="eager",
                                     isolate_documents=packed)
    finally:
        GPT_OSS_ACTIVATION_BYTES[mode] = saved


def _gpt_oss_peak(config: dict, batch: int, seq: int, mode: str, dropout: float, ckpt: bool,
                  packed: bool = False) -> int:
    """The profiled peak of that run; ``packed``: three documents per row (``position_ids`` restarting)."""
    model, autocast = build_lora_model(config, seq, "nf4", mode, dropout, "attention", ckpt, attention="eager")
    positions = torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)]).repeat(batch, 1) if packed else None
    return profiled_peak(model, config["vocab_size"], batch, seq, autocast, position_ids=positions)


def _gpt_oss_features(config: dict, batch: int, seq: int, ckpt: bool) -> list[float]:
    """Per token: ``[L * h, L * K * i, L * K * h, L * E, L * heads * seq, seq]`` (``L`` the held layers: 1 under
    checkpointing): the table's per-layer terms, its per-score term (``batch * heads * seq**2`` scores over ``batch *
    seq`` tokens) and its once-per-model mask term (``batch * seq**2`` elements)."""
    held = 1 if ckpt else config["num_hidden_layers"]
    top_k = config["num_experts_per_tok"]
    per_layer = [config["hidden_size"], top_k * config["intermediate_size"], top_k * config["hidden_size"],
                 config["num_local_experts"], config["num_attention_heads"] * seq]
    return [held * f for f in per_layer] + [seq]


def fit_gpt_oss() -> dict:
    """``mode -> (full_h, full_ki, full_kh, full_e, full_score, full_mask, layer_h, ..., layer_mask)``: least squares of
    what each :data:`GPT_OSS_FIT` decoder at each :data:`GPT_OSS_SHAPES` holds per token beyond the MoE formula with
    eager attention (:func:`_gpt_oss_formula` without the table), against :func:`_gpt_oss_features`; LoRA dropout 0 and
    0.05 pooled (the attention adapters' dropout is the Llama terms')."""
    table = {}
    for mode in LORA_MODES:
        pairs: dict[bool, list] = {False: [], True: []}
        for config, (batch, seq), ckpt, dropout in itertools.product(GPT_OSS_FIT, GPT_OSS_SHAPES, (False, True),
                                                                     (0.0, 0.05)):
            peak = _gpt_oss_peak(config, batch, seq, mode, dropout, ckpt)
            base = _gpt_oss_formula(config, batch, seq, mode, dropout, ckpt, without_table=True)
            pairs[ckpt].append((_gpt_oss_features(config, batch, seq, ckpt), (peak - base) / (batch * seq)))
        x = {ckpt: np.linalg.lstsq(np.array([f for f, _ in p], float), np.array([v for _, v in p]), rcond=None)[0]
             for ckpt, p in pairs.items()}
        table[mode] = tuple(round(float(v), 2) + 0.0 for v in (*x[False], *x[True]))  # + 0.0: no -0.0
        print(f"    {mode!r}: {table[mode]},", flush=True)
    return table


def check_gpt_oss() -> float:
    """Profile the :data:`GPT_OSS_CHECK` decoders, every mode with and without checkpointing, against the formula;
    print each ratio, return the largest ``|ratio - 1|``."""
    worst = 0.0
    for (config, batch, seq, dropout), mode, ckpt in itertools.product(GPT_OSS_CHECK, LORA_MODES, (False, True)):
        peak = _gpt_oss_peak(config, batch, seq, mode, dropout, ckpt)
        ratio = _gpt_oss_formula(config, batch, seq, mode, dropout, ckpt) / peak
        worst = max(worst, abs(ratio - 1))
        print(f"gpt_oss h{config['hidden_size']} i{config['intermediate_size']} E{config['num_local_experts']} "
              f"k{config['num_experts_per_tok']} H{config['num_attention_heads']} {batch}x{seq} dropout {dropout} "
              f"{mode:>23} {'ckpt' if ckpt else 'full'}: profiled {peak:>10,} B, formula/profiled {ratio:.3f}",
              flush=True)
    return worst


GPT_OSS_SCALE = [(_gpt_oss(128, 128, 8, 8, 2, 500, 4, 2, 32), 1, 160, (("fp32", False), ("bf16-mixed", False),
                                                                     ("bf16-mixed", True))),
                 (_gpt_oss(160, 192, 12, 4, 2, 500, 8, 2, 32, 48), 2, 96, (("fp32", False), ("bf16-mixed", False),
                                                                          ("bf16-mixed", True))),
                 (_gpt_oss(1024, 1024, 2, 32, 4, 2000, 16, 4, 64, 128), 1, 512, (("bf16-mixed", True),
                                                                                ("bf16-mixed", False), ("bf16", True))),
                 (_gpt_oss(2880, 2880, 2, 32, 4, 2000, 64, 8, 64, 128), 1, 256, (("bf16-mixed", True),
                                                                                ("bf16-mixed", False), ("bf16", True))),
                 (_gpt_oss(2880, 2880, 2, 32, 4, 2000, 64, 8, 64, 128), 1, 1024, (("bf16-mixed", True),
                                                                                 ("bf16-mixed", False)))]
"""``(config, batch, seq, (mode, checkpointing) settings)`` beyond the fitted sizes: 8 and 12 layers, a hidden size of
1024, and gpt-oss-20b's own widths (2880, 32 experts, top-4, 64 heads, 8 key/value heads, window 128) in two layers
at seq 256 and 1024 (~10 minutes on one core); dropout 0.05, the recipe's."""


def check_gpt_oss_scale() -> float:
    """Profile the :data:`GPT_OSS_SCALE` decoders against the formula, and the first three :data:`GPT_OSS_CHECK` ones
    with packed documents (three per row, kept apart) against the formula with ``isolate_documents``; print each
    ratio, return the largest ``|ratio - 1|``."""
    worst = 0.0
    for config, batch, seq, settings in GPT_OSS_SCALE:
        for mode, ckpt in settings:
            ratio = _gpt_oss_formula(config, batch, seq, mode, 0.05, ckpt) / _gpt_oss_peak(config, batch, seq, mode,
                                                                                             0.05, ckpt)
            worst = max(worst, abs(ratio - 1))
            print(f"gpt_oss h{config['hidden_size']} L{config['num_hidden_layers']} {batch}x{seq} {mode:>10} "
                  f"{'ckpt' if ckpt else 'full'}: formula/profiled {ratio:.3f}", flush=True)
    for (config, batch, seq, dropout), mode, ckpt in itertools.product(
            GPT_OSS_CHECK[:3], ("bf16-mixed", "fp32"), (True, False)):
        ratio = (_gpt_oss_formula(config, batch, seq, mode, dropout, ckpt, packed=True)
                 / _gpt_oss_peak(config, batch, seq, mode, dropout, ckpt, packed=True))
        worst = max(worst, abs(ratio - 1))
        print(f"gpt_oss h{config['hidden_size']} {batch}x{seq} packed {mode:>10} {'ckpt' if ckpt else 'full'}: "
              f"formula/profiled {ratio:.3f}", flush=True)
    return worst


WIDTH_BASE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 600}
"""The decoder the width terms are fitted on (batch 2 x seq 96), with the :data:`WIDTH_HEADS` attention shapes."""

WIDTH_HEADS = [(4, 4, 64), (4, 1, 64), (8, 8, 64), (8, 2, 64), (2, 2, 64)]
"""``(heads, kv_heads, head_dim)`` of the fit; the first is Llama's ``q = kv = h``, the reference of the others."""

WIDTH_MODEL_TYPES = ("llama", "qwen3")


def _width_config(model_type: str, heads: int, kv_heads: int, head_dim: int, base: dict = WIDTH_BASE) -> dict:
    return {"model_type": model_type, **base, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim}


WIDTH_CHECK = [
    (_width_config("llama", 6, 2, 48, {"hidden_size": 192, "intermediate_size": 640, "num_hidden_layers": 3,
                                       "vocab_size": 700}), 2, 96),
    (_width_config("qwen3", 4, 1, 128, {"hidden_size": 320, "intermediate_size": 768, "num_hidden_layers": 2,
                                        "vocab_size": 500}), 1, 160),
    (_width_config("qwen3", 6, 3, 32, {"hidden_size": 224, "intermediate_size": 576, "num_hidden_layers": 3,
                                       "vocab_size": 650}), 3, 64),
    ({**_width_config("qwen3_moe", 8, 2, 32, {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                                              "vocab_size": 600}),
      "moe_intermediate_size": 128, "num_experts": 16, "num_experts_per_tok": 4}, 2, 96),
    ({**_width_config("olmoe", 4, 2, 48, {"hidden_size": 192, "intermediate_size": 64, "num_hidden_layers": 2,
                                          "vocab_size": 600}),
      "num_experts": 64, "num_experts_per_tok": 8}, 1, 192),
]
"""``(config, batch, seq)`` the width and norm terms are checked on (not fitted): grouped-query Llama with a
narrower ``head_dim``, Qwen3 with wider and narrower attention than ``hidden_size``, a Qwen3-MoE and an OLMoE (64
experts, top-8, as OLMoE-1B-7B; QLoRA only)."""


def build_full_model(config: dict, seq: int, dtype: torch.dtype, checkpointing: bool, attention: str = "sdpa"):
    """A CPU transformers decoder of ``config`` (its ``model_type``) in ``dtype``, every weight trained, transformers'
    ``attention``."""
    from transformers import AutoConfig

    from lowmem_lightning.modules.causal_lm import _enable_checkpointing
    from lowmem_lightning.multimodal import causal_lm_auto_class

    torch.manual_seed(0)
    built = AutoConfig.for_model(**_as_built(config, seq))
    model = causal_lm_auto_class(built).from_config(built, attn_implementation=attention).to(dtype)
    if checkpointing:
        _enable_checkpointing(model)
    return model


def _width_settings():
    """Every full-weight dtype and LoRA entry (dropout 0 and 0.05), with and without checkpointing."""
    for d, ckpt in itertools.product((2, 4), (True, False)):
        yield ("full", d), None, ckpt
    for base, mode, dropout, targets, ckpt in itertools.product(("nf4", "dense"), LORA_MODES, (0.0, 0.05),
                                                                LORA_TARGET_SETS, (True, False)):
        yield ("lora", base, mode, dropout > 0), targets, ckpt


def profiled_setting(config: dict, batch: int, seq: int, setting: tuple, targets: str | None, ckpt: bool,
                     attention: str = "sdpa") -> int:
    """Profiled peak of ``config`` trained as ``setting`` (``("full", dtype bytes)`` or ``("lora", base, mode,
    dropout > 0)``, dropout 0.05 or, at batch 1 or 3, 0.1) on ``targets``, with transformers' ``attention``
    implementation."""
    if setting[0] == "full":
        model = build_full_model(config, seq, torch.bfloat16 if setting[1] == 2 else torch.float32, ckpt, attention)
        return profiled_peak(model, config["vocab_size"], batch, seq)
    _, base, mode, dropped = setting
    dropout = (0.05 if batch == 2 else 0.1) if dropped else 0.0
    model, autocast = build_lora_model(config, seq, base, mode, dropout, targets, ckpt, attention)
    return profiled_peak(model, config["vocab_size"], batch, seq, autocast)


def measure_widths() -> list[dict]:
    """Profiled peaks of every :func:`_width_settings` on the :data:`WIDTH_HEADS` x :data:`WIDTH_MODEL_TYPES`
    decoders (batch 2 x seq 96)."""
    rows = []
    for model_type, shape in itertools.product(WIDTH_MODEL_TYPES, WIDTH_HEADS):
        config = _width_config(model_type, *shape)
        for setting, targets, ckpt in _width_settings():
            rows.append({"config": config, "setting": setting, "targets": targets, "ckpt": ckpt,
                         "peak": profiled_setting(config, 2, 96, setting, targets, ckpt)})
    return rows


def _width_deltas(rows: list[dict], model_type: str, reference) -> dict:
    """``setting -> [(features, per-token delta)]``: each ``model_type`` row against its ``reference(row)`` row
    (the same setting, targets and checkpointing), per layer that holds it (1 with checkpointing, ``L`` without)."""
    index = {(r["config"]["model_type"], r["config"]["num_attention_heads"], r["config"]["num_key_value_heads"],
              r["setting"], r["targets"], r["ckpt"]): r["peak"] for r in rows}
    n, layers, h = 2 * 96, WIDTH_BASE["num_hidden_layers"], WIDTH_BASE["hidden_size"]
    deltas: dict = {}
    for r in (r for r in rows if r["config"]["model_type"] == model_type):
        other = reference(r)
        if other is None:
            continue
        q, kv = attention_widths(r["config"])
        per = n * (1 if r["ckpt"] else layers)
        features = [q - h, kv - h] if model_type == "llama" else [q + kv]
        deltas.setdefault(r["setting"], []).append((features, (r["peak"] - index[(*other, r["setting"], r["targets"],
                                                                                  r["ckpt"])]) / per))
    return deltas


def _least_squares(pairs: list) -> tuple[float, ...]:
    x, y = np.array([f for f, _ in pairs], float), np.array([v for _, v in pairs])
    return tuple(round(float(v), 1) + 0.0 for v in np.linalg.lstsq(x, y, rcond=None)[0])  # + 0.0: no -0.0


def fit_widths(rows: list[dict]) -> tuple[dict, dict]:
    """``(width table, norm table)``: per full-weight dtype bytes or LoRA ``(base, mode, dropout > 0)``, the
    ``(per q element, per kv element)`` bytes per token per layer, pooled over targets and checkpointing; per dtype
    bytes or LoRA mode, the bytes per ``q + kv`` element of Qwen3's q/k norms (pooled over the rest)."""
    first = WIDTH_HEADS[0][:2]
    widths = _width_deltas(rows, "llama", lambda r: None if (
        r["config"]["num_attention_heads"], r["config"]["num_key_value_heads"]) == first else ("llama", *first))
    norms = _width_deltas(rows, "qwen3", lambda r: ("llama", r["config"]["num_attention_heads"],
                                                    r["config"]["num_key_value_heads"]))
    width_table = {(s[1] if s[0] == "full" else s[1:]): _least_squares(p) for s, p in widths.items()}
    pooled: dict = {}
    for setting, pairs in norms.items():
        pooled.setdefault(setting[1] if setting[0] == "full" else setting[2], []).extend(pairs)
    return width_table, {key: _least_squares(p)[0] for key, p in pooled.items()}


def _formula(config: dict, batch: int, seq: int, setting: tuple, targets: str | None, ckpt: bool,
             attention: str = "sdpa") -> int:
    if setting[0] == "full":
        return activation_bytes(config, batch, seq, setting[1], ckpt, attention=attention)
    _, base, mode, dropped = setting
    dropout = (0.05 if batch == 2 else 0.1) if dropped else 0.0
    return lora_activation_bytes(config, batch, seq, base=base, mode=mode, dropout=dropout, targets=targets,
                                 rank=RANK, gradient_checkpointing=ckpt, device="cpu", attention=attention)


KIN_MODEL_TYPES = {"ministral3": ("llama", {}), "ministral": ("llama", {}), "internlm3": ("llama", {}),
                   "seed_oss": ("llama", {"attention_dropout": 0.0, "residual_dropout": 0.0}),
                   "smollm3": ("llama", {"pad_token_id": None, "tie_word_embeddings": False}),
                   "hunyuan_v1_dense": ("qwen3", {}), "olmo3": ("olmo2", {"sliding_window": 4096}),
                   "qwen2_vl_text": ("qwen2", {}), "qwen2_5_vl_text": ("qwen2", {}), "qwen3_vl_text": ("qwen3", {})}
"""``model_type -> (reference model type, settings)`` of the decoders
:data:`~lowmem_lightning.estimate.ACTIVATION_MODEL_TYPES` takes as Llama's layer (Ministral 3, Ministral-8B-2410's
`ministral`, InternLM3; Seed-OSS, with the dropout its config defaults to turned off: with it, not modelled; SmolLM3,
with a layer in four without rotary) or Qwen3's (Hunyuan dense: q/k norms per head, after the rotary embedding,
:data:`~lowmem_lightning.estimate.QK_NORM_MODEL_TYPES`) or OLMo 2's (OLMo 3, its sliding windows longer than the
sequence here: :data:`~lowmem_lightning.estimate.OLMO2_ACTIVATION_BYTES`). Nothing is fitted on them. Embeddings untied
as the references' (a tied one is counted with the gradients:
:func:`~lowmem_lightning.estimate.gradient_peak_bytes`). The language models of Qwen2-VL, Qwen2.5-VL (Qwen2's layer)
and Qwen3-VL (Qwen3's) are profiled inside their whole vision-language model (:data:`VISION_LANGUAGE_KIN`), on text,
with multimodal rotary sections over each head (:func:`_as_built`)."""

VISION_LANGUAGE_KIN = {
    "qwen2_vl_text": ("qwen2_vl", {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2}),
    "qwen2_5_vl_text": ("qwen2_5_vl", {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                       "out_hidden_size": 64}),
    "qwen3_vl_text": ("qwen3_vl", {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                   "out_hidden_size": 64, "deepstack_visual_indexes": [0]}),
}
"""``text model_type -> (vision-language model_type, its vision config)``: a language model transformers builds only
inside its vision-language model (there is no causal LM class of it); the vision tower is tiny and never run."""


WIDTH_HEAD_DIM = ("qwen2_vl_text", "qwen2_5_vl_text")
"""Text models whose attention takes ``head_dim = hidden_size / num_attention_heads`` (a ``head_dim`` setting is not
read): ``--kin`` profiles them and their reference at that ``head_dim``."""


def kin_heads(model_type: str, heads: tuple[int, int, int], sizes: dict) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` a :data:`KIN_SHAPES` entry's decoder of ``model_type`` and its reference are
    profiled at: ``head_dim`` ``hidden_size / heads`` for :data:`WIDTH_HEAD_DIM`'s, else as given."""
    if model_type not in WIDTH_HEAD_DIM:
        return heads
    return heads[0], heads[1], sizes["hidden_size"] // heads[0]


def _mrope_section(head_dim: int) -> list[int]:
    """Multimodal rotary sections (time, height, width) over ``head_dim / 2`` frequencies, in Qwen2.5-VL's proportions
    (16, 24, 24 of 64)."""
    half = head_dim // 2
    height = width = 3 * half // 8
    return [half - height - width, height, width]


def _as_built(config: dict, seq: int) -> dict:
    """``config`` with ``max_position_embeddings`` ``seq``, as a model is built from it: a
    :data:`VISION_LANGUAGE_KIN` language model nested in its vision-language config (its rotary in sections)."""
    config = {**config, "max_position_embeddings": seq}
    if config.get("model_type") not in VISION_LANGUAGE_KIN:
        return config
    outer, vision = VISION_LANGUAGE_KIN[config["model_type"]]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope_section(head_dim)}
    text = {key: value for key, value in config.items() if key != "model_type"}
    vocab = config["vocab_size"]
    return {"model_type": outer, "text_config": {**text, "rope_parameters": rope}, "vision_config": vision,
            "image_token_id": vocab - 1, "video_token_id": vocab - 2, "vision_start_token_id": vocab - 3}

KIN_SHAPES = [
    ({"hidden_size": 192, "intermediate_size": 640, "num_hidden_layers": 3, "vocab_size": 700}, (6, 2, 48), 2, 96),
    ({"hidden_size": 240, "intermediate_size": 576, "num_hidden_layers": 3, "vocab_size": 650}, (6, 3, 32), 3, 64),
    ({"hidden_size": 160, "intermediate_size": 480, "num_hidden_layers": 2, "vocab_size": 5000}, (2, 1, 80), 3, 64),
]
"""``(sizes, (heads, kv_heads, head_dim), batch, seq)`` each :data:`KIN_MODEL_TYPES` decoder and its reference are
profiled at: grouped-query attention wider and narrower than ``hidden_size``, the last bound by the loss under
checkpointing."""


def check_kin() -> tuple[float, float]:
    """Profile every :data:`KIN_MODEL_TYPES` decoder and its reference at every :data:`KIN_SHAPES` entry in every
    :func:`_width_settings` setting; print the ratio of the two peaks and the formula's ratio to the decoder's; return
    the largest ``|peak / reference peak - 1|`` and ``|formula / peak - 1|``."""
    reference_peaks: dict = {}
    worst_peak = worst_formula = 0.0
    for (model_type, (reference, settings)), (sizes, heads, batch, seq) in itertools.product(KIN_MODEL_TYPES.items(),
                                                                                           KIN_SHAPES):
        heads = kin_heads(model_type, heads, sizes)
        config = {**_width_config(model_type, *heads, sizes), **settings}
        for setting, targets, ckpt in _width_settings():
            key = (reference, sizes["hidden_size"], heads, setting, targets, ckpt)
            if key not in reference_peaks:
                reference_peaks[key] = profiled_setting(_width_config(reference, *heads, sizes), batch, seq, setting,
                                                        targets, ckpt)
            peak = profiled_setting(config, batch, seq, setting, targets, ckpt)
            same, ratio = peak / reference_peaks[key], _formula(config, batch, seq, setting, targets, ckpt) / peak
            worst_peak, worst_formula = max(worst_peak, abs(same - 1)), max(worst_formula, abs(ratio - 1))
            print(f"{model_type:>16} h{sizes['hidden_size']} {str(setting):>42} {targets or '':>9} "
                  f"{'ckpt' if ckpt else 'full'}: profiled {peak:>10,} B, {same:.3f} x {reference}'s, formula/profiled "
                  f"{ratio:.3f}", flush=True)
    return worst_peak, worst_formula


def check_widths() -> float:
    """Profile :data:`WIDTH_CHECK` (a Qwen3-MoE: QLoRA on the attention only) against the formulas; print each
    ratio and return the largest ``|ratio - 1|``."""
    worst = 0.0
    for config, batch, seq in WIDTH_CHECK:
        moe = config["model_type"] not in WIDTH_MODEL_TYPES
        for setting, targets, ckpt in _width_settings():
            if moe and (setting[0] == "full" or setting[1] == "dense" or targets != "attention"):
                continue
            peak = profiled_setting(config, batch, seq, setting, targets, ckpt)
            ratio = _formula(config, batch, seq, setting, targets, ckpt) / peak
            worst = max(worst, abs(ratio - 1))
            q, kv = attention_widths(config)
            print(f"{config['model_type']:>9} h{config['hidden_size']} q{q} kv{kv} {str(setting):>42} "
                  f"{targets or '':>9} {'ckpt' if ckpt else 'full'}: profiled {peak:>10,} B, formula/profiled "
                  f"{ratio:.3f}", flush=True)
    return worst


def _decoder(model_type: str, h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
             **settings) -> dict:
    """A ``model_type`` decoder config of these sizes and attention shape, with ``settings`` beyond them."""
    return {**_width_config(model_type, heads, kv_heads, head_dim, {"hidden_size": h, "intermediate_size": i,
                                                                     "num_hidden_layers": layers, "vocab_size": vocab}),
            **settings}


def _gemma3(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """A Gemma 3 text config, its embeddings untied as the Llama fits' (a tied embedding adds the same to both)."""
    return _decoder("gemma3_text", h, i, layers, heads, kv_heads, head_dim, vocab, tie_word_embeddings=False)


def _phi3(h: int, i: int, layers: int, heads: int, kv_heads: int, vocab: int, rotary: float = 1.0) -> dict:
    """A Phi-3 config (``head_dim`` is ``h // heads``), no sliding window, its token ids inside the vocabulary;
    ``rotary`` the ``partial_rotary_factor`` (Phi-4-mini's 0.75)."""
    return {"model_type": "phi3", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
            "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary}}


def _gemma2(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """A Gemma 2 config with its released soft-capping (scores at 50, logits at 30), embeddings untied as the Llama
    fits'; transformers runs it under eager attention."""
    return _decoder("gemma2", h, i, layers, heads, kv_heads, head_dim, vocab, tie_word_embeddings=False,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


def _olmo2(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """An OLMo 2 config (its token ids inside the vocabulary), embeddings untied as OLMo 2's."""
    return _decoder("olmo2", h, i, layers, heads, kv_heads, head_dim, vocab, pad_token_id=1, bos_token_id=None,
                    eos_token_id=2)


def _glm4(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """A GLM-4 config as GLM-4-9B-0414's (q/k/v biases, rotary on half of each head), its token ids inside the
    vocabulary."""
    return _decoder("glm4", h, i, layers, heads, kv_heads, head_dim, vocab, pad_token_id=0, eos_token_id=1,
                    bos_token_id=None)


def _exaone4(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """An EXAONE 4 config (its token ids inside the vocabulary), its sliding windows (three layers in four) longer than
    the sequences profiled."""
    return _decoder("exaone4", h, i, layers, heads, kv_heads, head_dim, vocab, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, sliding_window=4096)


def _neox(h: int, i: int, layers: int, heads: int, vocab: int, rotary: float = 0.25) -> dict:
    """A GPT-NeoX config as Pythia's: parallel residual, rotary on ``rotary`` of each head (Pythia's 0.25)."""
    return {"model_type": "gpt_neox", "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
            "num_attention_heads": heads, "vocab_size": vocab, "use_parallel_residual": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary}}


def _granite(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> dict:
    """A Granite config with multipliers of the released Granite models' size (the embedding times 12, each residual
    branch times 0.22, the logits divided by 16, the attention scaled by 1/128)."""
    return _decoder("granite", h, i, layers, heads, kv_heads, head_dim, vocab, embedding_multiplier=12.0,
                    residual_multiplier=0.22, logits_scaling=16.0, attention_multiplier=0.0078125)


LAYER_ATTENTION = {"gemma2": "eager"}
"""The attention each family's table is fitted and checked under (SDPA where not named): Gemma 2 runs eagerly."""

LAYER_FIT = {
    "gemma3_text": [_gemma3(256, 512, 2, 4, 4, 64, 600), _gemma3(256, 1024, 3, 4, 1, 64, 600),
                    _gemma3(384, 512, 2, 6, 2, 64, 600), _gemma3(192, 768, 3, 2, 1, 128, 600),
                    _gemma3(256, 512, 2, 8, 4, 64, 600), _gemma3(256, 512, 2, 4, 4, 64, 8000),
                    _gemma3(192, 384, 3, 3, 1, 64, 8000)],
    "phi3": [_phi3(256, 512, 2, 4, 4, 600), _phi3(256, 1024, 3, 4, 1, 600), _phi3(384, 512, 2, 6, 2, 600),
             _phi3(192, 768, 3, 2, 1, 600), _phi3(256, 512, 2, 8, 2, 600), _phi3(256, 512, 2, 4, 4, 8000),
             _phi3(192, 384, 3, 3, 1, 8000)],
    "gemma2": [_gemma2(256, 512, 2, 4, 4, 64, 600), _gemma2(256, 1024, 3, 4, 1, 64, 600),
               _gemma2(384, 512, 2, 6, 2, 64, 600), _gemma2(192, 768, 3, 2, 1, 128, 600),
               _gemma2(256, 512, 2, 8, 4, 64, 600), _gemma2(256, 512, 2, 4, 4, 64, 8000),
               _gemma2(192, 384, 3, 3, 1, 64, 8000)],
    "gpt_neox": [_neox(256, 1024, 2, 4, 600), _neox(256, 512, 3, 4, 600), _neox(384, 1536, 2, 6, 600),
                 _neox(192, 768, 3, 2, 600), _neox(256, 1024, 2, 8, 600), _neox(256, 1024, 2, 4, 8000),
                 _neox(192, 768, 3, 3, 8000)],
    "olmo2": [_olmo2(256, 512, 2, 4, 4, 64, 600), _olmo2(256, 1024, 3, 4, 1, 64, 600),
              _olmo2(384, 512, 2, 6, 2, 64, 600), _olmo2(192, 768, 3, 2, 1, 128, 600),
              _olmo2(256, 512, 2, 8, 4, 64, 600), _olmo2(256, 512, 2, 4, 4, 64, 8000),
              _olmo2(192, 384, 3, 3, 1, 64, 8000)],
    "glm4": [_glm4(256, 512, 2, 4, 4, 64, 600), _glm4(256, 1024, 3, 4, 1, 64, 600), _glm4(384, 512, 2, 6, 2, 64, 600),
             _glm4(192, 768, 3, 2, 1, 128, 600), _glm4(256, 512, 2, 8, 4, 64, 600), _glm4(256, 512, 2, 4, 4, 64, 8000),
             _glm4(192, 384, 3, 3, 1, 64, 8000)],
    "exaone4": [_exaone4(256, 512, 2, 4, 4, 64, 600), _exaone4(256, 1024, 3, 4, 1, 64, 600),
                _exaone4(384, 512, 2, 6, 2, 64, 600), _exaone4(192, 768, 3, 2, 1, 128, 600),
                _exaone4(256, 512, 2, 8, 4, 64, 600), _exaone4(256, 512, 2, 4, 4, 64, 8000),
                _exaone4(192, 384, 3, 3, 1, 64, 8000)],
}
"""Decoders each :data:`~lowmem_lightning.estimate.LAYER_ACTIVATION_BYTES` table is fitted on (batch 2 x seq 96):
layers, widths and heads varied, the last two bound by the loss (a vocabulary of 8000) so that the once-per-model term
shows with checkpointing."""

LAYER_CHECK = {
    "gemma3_text": [(_gemma3(320, 640, 2, 5, 1, 128, 700), 1, 160), (_gemma3(224, 896, 3, 4, 2, 64, 700), 3, 64),
                    (_gemma3(160, 480, 2, 2, 1, 128, 5000), 2, 80)],
    "phi3": [(_phi3(320, 640, 2, 5, 1, 700), 1, 160), (_phi3(224, 896, 3, 4, 2, 700), 3, 64),
             (_phi3(160, 480, 2, 2, 1, 5000), 2, 80), (_phi3(256, 768, 2, 4, 2, 600, rotary=0.75), 2, 96)],
    "gemma2": [(_gemma2(320, 640, 2, 5, 1, 128, 700), 1, 160), (_gemma2(224, 896, 3, 4, 2, 64, 700), 3, 64),
               (_gemma2(160, 480, 2, 2, 1, 128, 5000), 2, 80)],
    "gpt_neox": [(_neox(320, 1280, 2, 5, 700), 1, 160), (_neox(224, 896, 3, 4, 700), 3, 64),
                 (_neox(160, 640, 2, 2, 5000), 2, 80), (_neox(256, 1024, 2, 4, 600, rotary=1.0), 2, 96)],
    "granite": [(_granite(256, 512, 2, 4, 2, 64, 600), 2, 96), (_granite(192, 640, 3, 6, 2, 48, 700), 2, 96),
                (_granite(160, 480, 2, 2, 1, 80, 5000), 3, 64)],
    "olmo2": [(_olmo2(320, 640, 2, 5, 1, 128, 700), 1, 160), (_olmo2(240, 896, 3, 4, 2, 64, 700), 3, 64),
              (_olmo2(160, 480, 2, 2, 1, 128, 5000), 2, 80)],
    "glm4": [(_glm4(320, 640, 2, 5, 1, 128, 700), 1, 160), (_glm4(240, 896, 3, 4, 2, 64, 700), 3, 64),
             (_glm4(160, 480, 2, 2, 1, 128, 5000), 2, 80)],
    "exaone4": [(_exaone4(320, 640, 2, 5, 1, 128, 700), 1, 160), (_exaone4(240, 896, 3, 4, 2, 64, 700), 3, 64),
                (_exaone4(160, 480, 2, 2, 1, 128, 5000), 2, 80)],
}
"""``(config, batch, seq)`` each table is checked on (not fitted); Phi-3's last has Phi-4-mini's partial rotary.
Granite's table is not fitted at all (:data:`~lowmem_lightning.estimate.GRANITE_ACTIVATION_BYTES`): only checked."""

def _loss_bound(config: dict, setting: tuple) -> bool:
    """Whether the loss, not a recomputed layer, is the peak of ``config`` under checkpointing (the Llama formula's
    two branches)."""
    h, i, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = setting[1] if setting[0] == "full" else (4 if setting[2] == "fp32" else 2)
    return _loss_bytes_per_vocab(config, d) * vocab + 2 * d * h > 60 * h + 25 * i


def _llama_layer_formula(config: dict, batch: int, seq: int, setting: tuple, targets: str | None, ckpt: bool,
                         attention: str = "sdpa") -> int:
    """:func:`_formula` for ``config`` with its model type's :data:`~lowmem_lightning.estimate.LAYER_ACTIVATION_BYTES`
    table left out: the Llama layer with the width terms and the model's own adapters."""
    table = LAYER_ACTIVATION_BYTES.pop(config["model_type"], None)
    try:
        return _formula(config, batch, seq, setting, targets, ckpt, attention)
    finally:
        if table is not None:
            LAYER_ACTIVATION_BYTES[config["model_type"]] = table


def fit_layer_terms(model_type: str) -> dict:
    """``entry -> (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)`` per full-weight
    dtype bytes or LoRA ``(base, mode, dropout > 0, targets)``: least squares of what each :data:`LAYER_FIT` decoder of
    ``model_type`` holds above the Llama layer formula (:func:`_llama_layer_formula`) per token, against ``[L * h, L *
    i, L * (q + kv), h]`` without checkpointing and ``[h, i, q + kv, h]`` (the first three on layer-bound decoders
    only) with it."""
    pairs: dict = {}
    attention = LAYER_ATTENTION.get(model_type, "sdpa")
    for config, (setting, targets, ckpt) in itertools.product(LAYER_FIT[model_type], list(_width_settings())):
        peak = profiled_setting(config, 2, 96, setting, targets, ckpt, attention)
        residual = (peak - _llama_layer_formula(config, 2, 96, setting, targets, ckpt, attention)) / (2 * 96)
        h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
        qk = sum(attention_widths(config))
        per_layer = (0 if _loss_bound(config, setting) else 1) if ckpt else layers
        key = setting[1] if setting[0] == "full" else (*setting[1:], targets)
        pairs.setdefault((key, ckpt), []).append(([per_layer * h, per_layer * i, per_layer * qk, h], residual))
    return {key: _least_squares(pairs[(key, False)]) + _least_squares(pairs[(key, True)])
            for key in dict.fromkeys(k for k, _ in pairs)}


def check_layer_terms(model_type: str) -> float:
    """Profile the :data:`LAYER_CHECK` decoders of ``model_type`` against the formula; print each ratio, return the
    largest ``|ratio - 1|``."""
    worst = 0.0
    attention = LAYER_ATTENTION.get(model_type, "sdpa")
    for (config, batch, seq), (setting, targets, ckpt) in itertools.product(LAYER_CHECK[model_type],
                                                                           list(_width_settings())):
        peak = profiled_setting(config, batch, seq, setting, targets, ckpt, attention)
        ratio = _formula(config, batch, seq, setting, targets, ckpt, attention) / peak
        worst = max(worst, abs(ratio - 1))
        print(f"{model_type} h{config['hidden_size']} i{config['intermediate_size']} V{config['vocab_size']} "
              f"{batch}x{seq} {str(setting):>42} {targets or '':>9} {'ckpt' if ckpt else 'full'}: profiled "
              f"{peak:>10,} B, formula/profiled {ratio:.3f}", flush=True)
    return worst


def _llama(h: int, i: int, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int = 600) -> dict:
    return _decoder("llama", h, i, layers, heads, kv_heads, head_dim, vocab)


EAGER_SETTINGS = [(("full", 2), None), (("full", 4), None), (("lora", "nf4", "bf16-mixed", True), "all"),
                  (("lora", "nf4", "fp32", False), "all"), (("lora", "dense", "bf16", False), "attention")]
"""The settings ``--eager`` profiles: both full-weight dtypes and LoRA in bf16 (autocast or not) and fp32."""

EAGER_FIT = [(_llama(256, 512, 2, 4, 4, 64), 1, 256), (_llama(256, 512, 2, 4, 4, 64), 2, 160),
             (_llama(256, 512, 3, 8, 2, 32), 1, 192), (_llama(192, 384, 2, 2, 1, 96), 2, 128),
             (_llama(256, 512, 2, 8, 8, 32), 1, 128), (_llama(128, 384, 3, 4, 1, 64), 1, 320)]
"""``(config, batch, seq)`` the eager-attention terms are fitted on: Llama decoders with heads, grouped key/value heads,
layers and sequence lengths varied, every one bound by a layer under checkpointing."""

EAGER_CHECK = [(_llama(320, 640, 2, 5, 1, 64), 1, 224), (_llama(224, 448, 3, 7, 7, 32), 2, 112),
               ({**_width_config("qwen3", 4, 2, 64, {"hidden_size": 192, "intermediate_size": 512,
                                                     "num_hidden_layers": 2, "vocab_size": 600})}, 1, 256),
               (_phi3(256, 512, 2, 4, 2, 600), 2, 128), (_gemma3(256, 512, 2, 4, 1, 64, 600), 1, 192)]
"""``(config, batch, seq)`` the eager terms are checked on (not fitted): Llama, Qwen3, Phi-3 and Gemma 3."""


def _eager_design(config: dict, batch: int, seq: int, ckpt: bool) -> list[float]:
    """``[layers * B*H*S^2, layers * B*S*2*(H - kv)*head_dim, B*S^2]``: the scores of each held layer, the key and
    value heads ``repeat_kv`` copies, the float causal mask made once (``layers`` is 1 under checkpointing)."""
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    layers = 1 if ckpt else config["num_hidden_layers"]
    return [layers * batch * heads * seq * seq, layers * batch * seq * 2 * (heads - kv) * head_dim, batch * seq * seq]


def fit_eager() -> dict:
    """``(compute element size, checkpointing) -> (per score, per repeated key/value element, per mask element)``:
    least squares of eager's profiled peak less sdpa's over :func:`_eager_design`, for :data:`EAGER_FIT` x
    :data:`EAGER_SETTINGS`."""
    pairs: dict = {}
    for (config, batch, seq), (setting, targets), ckpt in itertools.product(EAGER_FIT, EAGER_SETTINGS, (True, False)):
        eager, sdpa = (profiled_setting(config, batch, seq, setting, targets, ckpt, attention)
                       for attention in ("eager", "sdpa"))
        d = setting[1] if setting[0] == "full" else (4 if setting[2] == "fp32" else 2)
        pairs.setdefault((d, ckpt), []).append((_eager_design(config, batch, seq, ckpt), eager - sdpa))
    return {key: _least_squares(value) for key, value in sorted(pairs.items())}


def check_eager() -> float:
    """Profile :data:`EAGER_CHECK` x :data:`EAGER_SETTINGS` under eager attention against the formula; print each
    ratio, return the largest ``|ratio - 1|``."""
    worst = 0.0
    for (config, batch, seq), (setting, targets), ckpt in itertools.product(EAGER_CHECK, EAGER_SETTINGS, (True, False)):
        peak = profiled_setting(config, batch, seq, setting, targets, ckpt, "eager")
        ratio = _formula(config, batch, seq, setting, targets, ckpt, "eager") / peak
        worst = max(worst, abs(ratio - 1))
        print(f"eager {config['model_type']} h{config['hidden_size']} H{config['num_attention_heads']} "
              f"kv{config.get('num_key_value_heads')} {batch}x{seq} {str(setting):>42} {targets or '':>9} "
              f"{'ckpt' if ckpt else 'full'}: profiled {peak:>10,} B, formula/profiled {ratio:.3f}", flush=True)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="profile the FIT sizes and print the coefficients")
    parser.add_argument("--check", action="store_true", help="profile the CHECK sizes against the formula")
    parser.add_argument("--moe", action="store_true", help="fit the Mixtral (NF4 experts) terms, then check them")
    parser.add_argument("--qwen2-moe", action="store_true",
                        help="fit the Qwen2-MoE shared-expert terms, then check them")
    parser.add_argument("--gemma3", action="store_true", help="fit the Gemma 3 terms, then check them")
    parser.add_argument("--phi3", action="store_true", help="fit the Phi-3 terms, then check them")
    parser.add_argument("--gemma2", action="store_true", help="fit the Gemma 2 terms (eager), then check them")
    parser.add_argument("--neox", action="store_true", help="fit the GPT-NeoX (Pythia) terms, then check them")
    parser.add_argument("--olmo2", action="store_true", help="fit the OLMo 2 terms, then check them")
    parser.add_argument("--glm4", action="store_true", help="fit the GLM-4 terms, then check them")
    parser.add_argument("--exaone4", action="store_true", help="fit the EXAONE 4 terms, then check them")
    parser.add_argument("--eager", action="store_true", help="fit the eager-attention terms, then check them")
    parser.add_argument("--dora", action="store_true", help="fit the DoRA terms (NF4 base), then check them")
    parser.add_argument("--dora-scale", action="store_true",
                        help="check the DoRA terms on a wider GQA Llama and on Phi-3 (nothing fitted)")
    parser.add_argument("--gpt-oss", action="store_true",
                        help="fit the gpt-oss terms (eager attention, NF4 experts), then check them")
    parser.add_argument("--gpt-oss-scale", action="store_true",
                        help="check the gpt-oss terms at more layers, gpt-oss-20b's widths and packed documents")
    parser.add_argument("--granite", action="store_true",
                        help="check the Granite terms (one more hidden-wide tensor; nothing fitted)")
    parser.add_argument("--kin", action="store_true",
                        help="check the decoders taken as Llama's or Qwen3's layer under other names (nothing fitted)")
    parser.add_argument("--widths", action="store_true",
                        help="fit the attention-width and Qwen3 q/k-norm terms, then check them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.moe:
        for mode in LORA_MODES:
            print(f"    {mode!r}: {fit_moe(measure_moe(MOE_FIT, mode), mode)},", flush=True)
        worst = max(check_moe(measure_moe(MOE_CHECK, mode), mode) for mode in LORA_MODES)
        print(f"largest |formula / profiled - 1| (MoE): {worst:.3f}")
    if args.qwen2_moe:
        SHARED_EXPERT_ACTIVATION_BYTES.update(fit_shared_expert())  # checked as fitted (the table pasted from it)
        print(f"largest |formula / profiled - 1| (qwen2_moe): {check_shared_expert():.3f}")
    if args.gpt_oss:
        GPT_OSS_ACTIVATION_BYTES.update(fit_gpt_oss())  # checked as fitted (the table pasted from it)
        print(f"largest |formula / profiled - 1| (gpt_oss): {check_gpt_oss():.3f}")
    if args.gpt_oss_scale:
        print(f"largest |formula / profiled - 1| (gpt_oss scale): {check_gpt_oss_scale():.3f}")
    if args.widths:
        width_table, norm_table = fit_widths(measure_widths())
        for key, value in width_table.items():
            print(f"    {key!r}: {value},")
        print(f"q/k norms: {norm_table}", flush=True)
        print(f"largest |formula / profiled - 1| (widths): {check_widths():.3f}")
    for model_type, chosen in (("gemma3_text", args.gemma3), ("phi3", args.phi3), ("gemma2", args.gemma2),
                               ("gpt_neox", args.neox), ("olmo2", args.olmo2), ("glm4", args.glm4),
                               ("exaone4", args.exaone4)):
        if chosen:
            for key, value in fit_layer_terms(model_type).items():
                print(f"    {key!r}: {value},", flush=True)
            print(f"largest |formula / profiled - 1| ({model_type}): {check_layer_terms(model_type):.3f}")
    if args.granite:
        print(f"largest |formula / profiled - 1| (granite): {check_layer_terms('granite'):.3f}")
    if args.kin:
        same, formula = check_kin()
        print(f"largest |profiled / reference's - 1| (kin): {same:.3f}; largest |formula / profiled - 1|: "
              f"{formula:.3f}")
    if args.eager:
        for key, value in fit_eager().items():
            print(f"    {key!r}: {value},", flush=True)
        print(f"largest |formula / profiled - 1| (eager): {check_eager():.3f}")
    if args.dora:
        DORA_ACTIVATION_BYTES.update(fit_dora())  # checked as fitted (the table pasted from it)
        for key, value in DORA_ACTIVATION_BYTES.items():
            print(f"    {key!r}: {value},", flush=True)
        print(f"largest |formula / profiled - 1| (dora): {check_dora():.3f}")
    if args.dora_scale:
        print(f"largest |formula / profiled - 1| (dora scale): {check_dora_scale():.3f}")
    if args.fit:
        for key, value in fit(measure(FIT, 0.05)).items():
            print(f"    {key!r}: {value},")
    if args.check:
        worst = check(measure(CHECK, 0.1))
        print(f"largest |formula / profiled - 1|: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
