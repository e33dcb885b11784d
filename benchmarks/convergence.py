"""Convergence study: does a low-memory optimizer train as well as what it replaces?

A small Llama (transformers, built from a config) is trained from scratch, byte-level, on a real corpus
present on every machine: the Python standard library's own ``.py`` files. Every optimizer of ours
runs beside the reference implementation of the same algorithm at matched settings (same model
init, data order, LR schedule), over several seeds:

=====================  ==========================================
ours                   reference
=====================  ==========================================
adamw_8bit             torch AdamW (fp32) and bitsandbytes AdamW8bit
adamw_4bit             torch AdamW (fp32) and torchao AdamW4bit
paged_adamw_8bit       adamw_8bit (must be identical)
adafactor (+int8 mom)  transformers Adafactor
came (+int8 mom)       came_pytorch CAME (official)
sgd (+int8 mom)        torch SGD
muon (+8-bit mom)      torch.optim.Muon + torch AdamW on the same split (hidden matrices / the rest)
lion_8bit              lion (ours, fp32 momentum; lr 3x below AdamW's, as the Lion paper advises)
ademamix_8bit          ademamix (ours, fp32 moments), without and with the paper's warmups
=====================  ==========================================

Then a QLoRA-style fine-tune: the model pretrained with fp32 AdamW is frozen in NF4 with LoRA on
every projection and fine-tuned on held-out stdlib files with ``adamw`` vs ``adamw_8bit``.

Reports final validation loss, its ratio to fp32 AdamW and to each algorithm's reference, as a
markdown table (stdout and ``--out``/convergence.md), CSV rows appended to ``benchmarks/results.csv``
and loss curves as a PNG.

    python benchmarks/convergence.py --steps 300 --seeds 0,1,2

Sweeps: ``--lr-scale X`` multiplies every peak lr; ``--beta1 B`` sets ``betas = (B, 0.999)`` of the AdamW-family
runs (fp32, 8-bit, 4-bit, bitsandbytes, torchao), so they can be compared at fp32 AdamW's tuned settings.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# (name, builder key, reference name for the ratio, kwargs)
RUNS = [
    ("adamw", "torch_adamw", None, {}),
    ("adamw_8bit", "ours:adamw_8bit", "adamw", {}),
    ("bnb_adamw_8bit", "bnb_adamw_8bit", "adamw", {}),
    ("adamw_4bit", "ours:adamw_4bit", "adamw", {}),
    ("torchao_adamw_4bit", "torchao_adamw_4bit", "adamw", {}),
    ("paged_adamw_8bit", "ours:paged_adamw_8bit", "adamw_8bit", {}),
    ("hf_adafactor", "hf_adafactor", None, {}),
    ("adafactor", "ours:adafactor", "hf_adafactor", {}),
    ("hf_adafactor_beta1", "hf_adafactor", None, {"beta1": 0.9}),
    ("adafactor_beta1", "ours:adafactor", "hf_adafactor_beta1", {"beta1": 0.9}),
    ("adafactor_beta1_int8", "ours:adafactor", "adafactor_beta1", {"beta1": 0.9, "momentum_dtype": "int8"}),
    ("lion", "ours:lion", None, {}),
    ("lion_8bit", "ours:lion_8bit", "lion", {}),
    ("ademamix", "ours:ademamix", None, {}),
    ("ademamix_8bit", "ours:ademamix_8bit", "ademamix", {}),
    ("ademamix_warmup", "ours:ademamix", None, {"t_alpha": 300, "t_beta3": 300}),  # the paper's schedules
    ("ademamix_8bit_warmup", "ours:ademamix_8bit", "ademamix_warmup", {"t_alpha": 300, "t_beta3": 300}),
    # Muon hybrids (hidden matrices Muon, embeddings/head/norms AdamW; adjust_lr_fn="match_rms_adamw" so both
    # share AdamW's lr, Moonshot's recipe), ours against torch.optim.Muon + torch.optim.AdamW on the same split
    ("torch_muon", "torch_muon_hybrid", None, {}),
    ("muon", "ours:muon", "torch_muon", {}),
    ("muon_8bit", "ours:muon_8bit", "muon", {}),
    ("came_pytorch", "came_pytorch", None, {}),
    ("came", "ours:came", "came_pytorch", {}),
    ("came_int8", "ours:came", "came", {"momentum_dtype": "int8"}),
    ("torch_sgd", "torch_sgd", None, {"momentum": 0.9}),
    ("sgd", "ours:sgd", "torch_sgd", {"momentum": 0.9}),
    ("sgd_int8", "ours:sgd", "sgd", {"momentum": 0.9, "momentum_dtype": "int8"}),
    # bf16 params (``param_dtype``: the model cast to bf16, no fp32 master copy): torch AdamW (its bf16 moments,
    # round-to-nearest stores), ours with stochastic rounding (the default) and with bf16_rounding="nearest"
    ("adamw_bf16", "torch_adamw", "adamw", {"param_dtype": "bf16"}),
    ("adamw_8bit_bf16", "ours:adamw_8bit", "adamw", {"param_dtype": "bf16"}),
    ("adamw_8bit_nearest", "ours:adamw_8bit", "adamw_8bit_bf16", {"param_dtype": "bf16", "bf16_rounding": "nearest"}),
    # gradient release (step_in_backward) against the same optimizer stepped after backward; both clip
    # by value per tensor (clipping by the global norm needs every gradient at once)
    ("adamw_8bit_clipvalue", "ours:adamw_8bit", "adamw_8bit", {"clip": "value"}),
    ("adamw_8bit_release", "ours:adamw_8bit", "adamw_8bit_clipvalue", {"clip": "value", "release": True}),
    ("came_int8_clipvalue", "ours:came", "came_int8", {"momentum_dtype": "int8", "clip": "value"}),
    ("came_int8_release", "ours:came", "came_int8_clipvalue",
     {"momentum_dtype": "int8", "clip": "value", "release": True}),
    # 32-bit state for chosen params (``fp32_state``: quantize_state=False groups), as bitsandbytes' optim_bits=32
    # override and HF Trainer's rule for nn.Embedding; ratios against fp32 AdamW, compare with the all-quantized row
    ("adamw_8bit_fp32emb", "ours:adamw_8bit", "adamw", {"fp32_state": ["torch.nn.Embedding"]}),
    ("adamw_8bit_fp32emb_head", "ours:adamw_8bit", "adamw", {"fp32_state": ["torch.nn.Embedding", "lm_head"]}),
    ("adamw_4bit_fp32emb", "ours:adamw_4bit", "adamw", {"fp32_state": ["torch.nn.Embedding"]}),
    ("adamw_4bit_fp32emb_head", "ours:adamw_4bit", "adamw", {"fp32_state": ["torch.nn.Embedding", "lm_head"]}),
    # the same with the lm_head tied to the embedding (one 256 x hidden table, both roles)
    ("adamw_tied", "torch_adamw", None, {"tied": True}),
    ("adamw_8bit_tied", "ours:adamw_8bit", "adamw_tied", {"tied": True}),
    ("adamw_8bit_tied_fp32emb", "ours:adamw_8bit", "adamw_tied", {"tied": True, "fp32_state": ["torch.nn.Embedding"]}),
    ("adamw_4bit_tied", "ours:adamw_4bit", "adamw_tied", {"tied": True}),
    ("adamw_4bit_tied_fp32emb", "ours:adamw_4bit", "adamw_tied", {"tied": True, "fp32_state": ["torch.nn.Embedding"]}),
]
"""``(name, builder, reference row, kwargs)``; ``clip`` ("norm" by default, "value": per tensor at 1.0),
``release`` (gradient release: each tensor stepped in backward) and ``param_dtype`` ("bf16": the model's params
cast to bf16) and ``tied`` (the lm_head tied to the embedding) are training options, not optimizer arguments;
``fp32_state`` (module classes or name patterns, as ``LowMemOptimizerCallback(fp32_state=...)``) is resolved on the
model by :func:`build` into ``quantize_state=False`` param groups."""

LR = {"adamw": 3e-3, "adafactor": 3e-3, "came": 1e-3, "sgd": 0.3, "lion": 1e-3, "ademamix": 3e-3, "muon": 3e-3}
"""Peak learning rate per algorithm family (same for ours and its reference)."""


def family(builder: str) -> str:
    key = builder.split(":")[-1]
    for name in ("came", "adafactor", "sgd", "lion", "ademamix", "muon", "adamw"):
        if name in key:
            return name
    raise ValueError(builder)


# ----------------------------------------------------------------------------------------- data
def stdlib_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's .py files: (train, val, finetune) uint8 tensors.

    Files are sorted by path; every 10th file goes to validation, every 10th+5 to the fine-tune set.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "ft": []}
    sizes = dict.fromkeys(parts, 0)
    limits = {"train": max_bytes, "val": max_bytes // 8, "ft": max_bytes // 4}
    for i, path in enumerate(files):
        split = "val" if i % 10 == 0 else "ft" if i % 10 == 5 else "train"
        if sizes[split] >= limits[split]:
            continue
        data = path.read_bytes()
        parts[split].append(data)
        sizes[split] += len(data)
    return tuple(torch.frombuffer(bytearray(b"".join(parts[k])[: limits[k]]), dtype=torch.uint8).long()
                 for k in ("train", "val", "ft"))


def batches(tokens: torch.Tensor, batch: int, seq: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        chunk = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------- model
def tiny_llama(seed: int, hidden: int, layers: int, seq: int, tied: bool = False):
    """The study's small Llama (vocab 256: bytes), built from a config under ``seed``; ``tied``: the lm_head shares
    the embedding's weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1), num_key_value_heads=max(hidden // 32, 1),
        max_position_embeddings=seq, tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


ADAMW_BUILDERS = ("torch_adamw", "ours:adamw_8bit", "ours:paged_adamw_8bit", "ours:adamw_4bit", "bnb_adamw_8bit",
                  "torchao_adamw_4bit")
"""Builders of the AdamW family: ``--beta1`` sets their ``betas[0]`` (``betas = (beta1, 0.999)``)."""


def _fp32_state_groups(params, fp32_state) -> list[dict]:
    """Param groups of ``params`` (an ``nn.Module``: its trainable params) with the params ``fp32_state`` selects in
    a ``quantize_state=False`` group (:mod:`lowmem_lightning.optim.state_precision`, what the callback uses)."""
    from lowmem_lightning.optim.state_precision import fp32_state_params, parse_fp32_state, split_param_groups

    if not isinstance(params, torch.nn.Module):
        raise ValueError(f"fp32_state={fp32_state!r} needs the model (its module classes and names), not its params")
    ids, unmatched = fp32_state_params(params, parse_fp32_state(fp32_state))
    if unmatched:
        raise ValueError(f"fp32_state entries {unmatched} select no param of {type(params).__name__}")
    return split_param_groups([p for p in params.parameters() if p.requires_grad], ids)[0]


def build(builder: str, params, lr: float, kwargs: dict):
    """Build the optimizer for ``builder``; raises ImportError when a peer is not installed. ``params``: what the
    optimizer takes, or the model itself (its parameters; needed by ``kwargs["fp32_state"]``)."""
    kwargs = dict(kwargs)
    fp32_state = kwargs.pop("fp32_state", None)
    if fp32_state is not None:
        params = _fp32_state_groups(params, fp32_state)
    elif isinstance(params, torch.nn.Module):
        params = params.parameters()
    if builder.startswith("ours:"):
        from lowmem_lightning.optim import build_optimizer

        name = builder.split(":", 1)[1]
        if builder in ADAMW_BUILDERS:  # ours default to weight decay 0.01; the torch and peer AdamW rows use none
            kwargs = {"weight_decay": 0.0, **kwargs}
        if "muon" in name:  # params are model.named_parameters(): the split finds embeddings and head by name
            kwargs = {"weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw", "adamw_betas": (0.9, 0.999), **kwargs}
        if name == "adafactor":
            kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
        return build_optimizer(name, params, lr=lr, **kwargs)
    if builder == "torch_adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **kwargs)
    if builder == "torch_muon_hybrid":
        return _TorchMuonHybrid(params, lr)
    if builder == "torch_sgd":
        return torch.optim.SGD(params, lr=lr, **kwargs)
    if builder == "bnb_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, **kwargs)
    if builder == "torchao_adamw_4bit":
        from torchao.optim import AdamW4bit

        return AdamW4bit(params, lr=lr, weight_decay=0.0, **kwargs)
    if builder == "hf_adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, **kwargs)
    if builder == "came_pytorch":
        from came_pytorch import CAME

        return CAME(params, lr=lr)
    raise ValueError(builder)


class _TorchMuonHybrid:
    """torch.optim.Muon on the hidden matrices and torch.optim.AdamW on the rest (the split of
    ``lowmem_lightning.optim.muon.uses_muon``), stepped together; no weight decay, Moonshot's lr rule."""

    def __init__(self, named_params, lr: float):
        from lowmem_lightning.optim.muon import uses_muon

        named = list(named_params)
        hidden = [p for n, p in named if uses_muon(p, n)]
        rest = [p for n, p in named if not uses_muon(p, n)]
        self.parts = [torch.optim.Muon(hidden, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
                      torch.optim.AdamW(rest, lr=lr, weight_decay=0.0)]
        self.param_groups = [g for opt in self.parts for g in opt.param_groups]

    def step(self):
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, args) -> float:
    model.eval()
    fixed = batches(val, args.batch, args.seq, args.eval_batches, 1234)
    losses = [model(input_ids=x, labels=x).loss.item() for x, _ in fixed]
    model.train()
    return statistics.fmean(losses)


def train(model, opt, data: torch.Tensor, val: torch.Tensor, args, seed: int, peak: float,
          clip: str = "norm", release: bool = False) -> tuple[list[float], float]:
    """``args.steps`` steps; gradients clipped at 1.0 by global norm or per tensor by value; with
    ``release`` each tensor is stepped inside backward (``lowmem_lightning.callbacks.release``)."""
    from lowmem_lightning.callbacks.release import GradientRelease

    hooks = GradientRelease(opt, clip_value=1.0).attach() if release else None
    curve = []
    for step, (x, _) in enumerate(batches(data, args.batch, args.seq, args.steps, seed)):
        for group in opt.param_groups:
            lr = lr_at(step, args.steps, peak, args.warmup)
            if isinstance(group["lr"], torch.Tensor):  # torchao's optimizers keep lr as a tensor, changed in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if hooks is not None:
            hooks.finish_step()
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(loss.item())
    if hooks is not None:
        hooks.detach()
    return curve, evaluate(model, val, args)


# ------------------------------------------------------------------------------------- studies
def pretraining_study(args, train_data, val_data):
    results: dict[str, list[float]] = {}
    curves: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    for name, builder, _, kwargs in RUNS:
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            options = dict(kwargs)
            model = tiny_llama(seed, args.hidden, args.layers, args.seq, tied=options.pop("tied", False))
            clip, release = options.pop("clip", "norm"), options.pop("release", False)
            if options.pop("param_dtype", None) == "bf16":
                model = model.to(torch.bfloat16)
            peak = LR[family(builder)] * args.lr_scale
            if args.beta1 is not None and builder in ADAMW_BUILDERS:
                options["betas"] = (args.beta1, 0.999)
            try:
                params = model.named_parameters() if "muon" in builder else model
                opt = build(builder, params, peak, options)
            except (ImportError, ValueError) as err:
                notes[name] = f"not available: {type(err).__name__}: {err}"[:120]
                break
            start = time.perf_counter()
            curve, val = train(model, opt, train_data, val_data, args, seed, peak, clip, release)
            results.setdefault(name, []).append(val)
            curves.setdefault(name, curve)
            print(f"{name:22s} seed {seed}: val loss {val:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return results, curves, notes


def finetune_study(args, train_data, val_data, ft_data):
    """Pretrain with fp32 AdamW, then NF4 + LoRA fine-tune with adamw vs adamw_8bit."""
    from lowmem_lightning.optim import build_optimizer
    from lowmem_lightning.quant import add_lora, quantize_model

    ft_train, ft_val = ft_data[: int(ft_data.numel() * 0.9)], ft_data[int(ft_data.numel() * 0.9) :]
    base = tiny_llama(0, args.hidden, args.layers, args.seq)
    opt = torch.optim.AdamW(base.parameters(), lr=LR["adamw"], weight_decay=0.0)
    train(base, opt, train_data, val_data, args, 0, LR["adamw"])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    results = {}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name in ("adamw", "adamw_8bit"):
        model = tiny_llama(0, args.hidden, args.layers, args.seq)
        model.load_state_dict(state)
        before = evaluate(model, ft_val, args)
        # r=32: every LoRA matrix has >= 4096 elements, so adamw_8bit really keeps 8-bit state
        model = add_lora(quantize_model(model), r=32, alpha=64, dropout=0.0, target_modules=targets)
        params = [p for p in model.parameters() if p.requires_grad]
        ft_opt = build_optimizer(name, params, lr=1e-3)
        ft_args = argparse.Namespace(**{**vars(args), "steps": args.steps // 2})
        _, after = train(model, ft_opt, ft_train, ft_val, ft_args, 0, 1e-3)
        results[name] = (before, after)
        print(f"NF4+LoRA fine-tune {name:12s}: val loss {before:.4f} -> {after:.4f}", flush=True)
    return results


# ------------------------------------------------------------------------------------- reporting
def table(results, notes) -> str:
    base = statistics.fmean(results["adamw"]) if "adamw" in results else float("nan")
    refs = {name: ref for name, _, ref, _ in RUNS}
    lines = [
        "| optimizer | final val loss (mean ± sd) | vs fp32 AdamW | reference | vs reference |",
        "|---|---|---|---|---|",
    ]
    for name, *_ in RUNS:
        if name in notes and name not in results:
            lines.append(f"| {name} | {notes[name]} | | | |")
            continue
        if name not in results:
            continue
        vals = results[name]
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ref = refs[name]
        ref_ratio = f"{mean / statistics.fmean(results[ref]):.4f}x" if ref in results else "-"
        lines.append(f"| {name} | {mean:.4f} ± {sd:.4f} | {mean / base:.4f}x | {ref or '-'} | {ref_ratio} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, curve in curves.items():
        k = max(1, len(curve) // 50)
        smooth = [statistics.fmean(curve[i : i + k]) for i in range(0, len(curve) - k + 1, k)]
        ax.plot([i * k for i in range(len(smooth))], smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_title("Tiny Llama on stdlib .py bytes, seed 0")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores"


def append_csv(results, args) -> None:
    path = HERE / "results.csv"
    header = ["date", "benchmark", "device", "torch", "optimizer", "metric", "value", "seeds", "steps"]
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        metric = "val_loss" if args.lr_scale == 1.0 else f"val_loss_lr_x{args.lr_scale:g}"
        metric += "" if args.beta1 is None else f"_beta1_{args.beta1:g}"
        for name, vals in results.items():
            row = [dt.date.today().isoformat(), "convergence", device_name(), torch.__version__, name, metric,
                   f"{statistics.fmean(vals):.5f}", len(vals), args.steps]
            writer.writerow(row)


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--lr-scale must be a finite number > 0, got {text!r}")
    return value


def _beta1(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--beta1 must be in [0, 1), got {text!r}")
    return value


def add_model_and_data_args(parser: argparse.ArgumentParser) -> None:
    """The study's model and data options (batch, sequence length, model size, warmup, evaluation, corpus), shared
    with the studies built on it (``three_bytes.py``)."""
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    add_model_and_data_args(parser)
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated run names")
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--lr-scale", type=_positive_float, default=1.0,
                        help="multiplies every run's peak learning rate (an lr sweep; 1.0: the LR table as is)")
    parser.add_argument("--beta1", type=_beta1, default=None,
                        help="betas = (BETA1, 0.999) for the AdamW-family runs (ADAMW_BUILDERS); default: 0.9")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    args.out.mkdir(parents=True, exist_ok=True)
    train_data, val_data, ft_data = stdlib_corpus(args.corpus_bytes)
    print(f"corpus: {train_data.numel():,} train / {val_data.numel():,} val / {ft_data.numel():,} fine-tune bytes "
          f"from {sysconfig.get_paths()['stdlib']} (Python {sys.version.split()[0]})")
    results, curves, notes = pretraining_study(args, train_data, val_data)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = [f"# Convergence study ({dt.date.today().isoformat()}, {device_name()}, torch {torch.__version__})", "",
              f"Command: `python benchmarks/convergence.py {command}`", "", table(results, notes)]
    if not args.no_finetune:
        ft = finetune_study(args, train_data, val_data, ft_data)
        report += ["", "| NF4 + LoRA fine-tune | val loss before | after | vs adamw |", "|---|---|---|---|"]
        for name, (before, after) in ft.items():
            report.append(f"| {name} | {before:.4f} | {after:.4f} | {after / ft['adamw'][1]:.4f}x |")
    text = "\n".join(report)
    print(text)
    (args.out / "convergence.md").write_text(text + "\n")
    plot(curves, args.out / "convergence.png")
    if not args.no_csv:
        append_csv(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
