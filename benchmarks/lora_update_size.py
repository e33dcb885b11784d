"""How far one optimizer step moves peft's LoRA factors: element RMS of the update, in units of the lr.

Muon orthogonalizes each 2-D update, so a LoRA factor's step size follows its shape, not its gradient:
with the default ``adjust_lr_fn`` (``lr * sqrt(max(1, rows / cols))``) an orthogonal update of a ``rows x
cols`` matrix has element RMS ``lr / sqrt(cols)``: ``lora_A`` (r x in) moves by ~lr / sqrt(in), ``lora_B``
(out x r) by ~lr / sqrt(r). ``adjust_lr_fn="match_rms_adamw"`` scales both to ~0.2 lr, AdamW's typical size.
This script measures it on a tiny Llama (transformers, built from a config) wrapped by ``get_peft_model``
(LoRA r 8 on q/v/down), 4 steps on a fixed batch, lr 1e-3, no weight decay: the RMS of ``(p_after -
p_before) / lr`` at step 4, averaged over the ``lora_A`` and over the ``lora_B`` tensors.

    python benchmarks/lora_update_size.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

ROWS = {
    "adamw_8bit": ("adamw_8bit", {}),
    "muon": ("muon", {}),
    "muon_match_rms_adamw": ("muon", {"adjust_lr_fn": "match_rms_adamw"}),
}
"""Row name -> (optimizer, extra arguments)."""


def lora_model(width: int, rank: int, seed: int):
    """A 2-layer Llama of ``width`` with peft LoRA of ``rank`` on q_proj, v_proj and down_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=128, max_position_embeddings=64)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(LlamaForCausalLM(cfg), lora)


def update_rms(name: str, kwargs: dict, width: int, rank: int, steps: int, lr: float) -> dict[str, float]:
    """``{"lora_A": ..., "lora_B": ...}``: mean over those tensors of the element RMS of the last step / lr."""
    from lowmem_lightning.optim import build_optimizer

    model = lora_model(width, rank, seed=0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(name, named, lr=lr, weight_decay=0.0, **kwargs)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    before = {}
    for _ in range(steps):
        before = {n: p.detach().clone() for n, p in named}
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    sizes: dict[str, list[float]] = {"lora_A": [], "lora_B": []}
    for n, p in named:
        part = "lora_A" if ".lora_A." in n else "lora_B" if ".lora_B." in n else None
        if part:
            sizes[part].append(((p.detach() - before[n]) / lr).pow(2).mean().sqrt().item())
    return {part: statistics.fmean(vals) for part, vals in sizes.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    print(f"LoRA update size after {args.steps} steps, element RMS / lr (width {args.width}, r {args.rank}; "
          f"Muon's default predicts lora_A {args.width ** -0.5:.3f}, lora_B {args.rank ** -0.5:.3f})")
    print("| optimizer | lora_A | lora_B |\n|---|---:|---:|")
    for row, (name, kwargs) in ROWS.items():
        rms = update_rms(name, kwargs, args.width, args.rank, args.steps, args.lr)
        print(f"| {row} | {rms['lora_A']:.3f} | {rms['lora_B']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
