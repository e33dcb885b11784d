"""QDoRA's training step against QLoRA's on the same NF4 model, and against peft's DoRA on the weights held dense.

A Llama of ``--hidden`` width and ``--layers`` layers (intermediate 2.75x, 8 heads) is quantized to NF4 and
given r=16 adapters on its seven projections (``--dropout``, 0.05) by ``add_lora``: plain LoRA, and DoRA
(``use_dora=True``); a dense twin holding the decoded weights gets peft's own DoRA. Each step is forward +
backward + ``adamw_8bit`` on a batch of ``--batch`` x ``--seq`` tokens. The three are timed in turn,
``--repeats`` rounds of ``--steps`` steps each (after one warm-up round), and the medians printed with the ratios
to QLoRA. One thread by default: the ratio, not the absolute time, is the figure (machines are noisy).

    python benchmarks/qdora_step.py                      # ~25 s on one core
    python benchmarks/qdora_step.py --dropout 0
    python benchmarks/qdora_step.py --hidden 1024 --layers 4 --threads 2
    python benchmarks/qdora_step.py --eval       # generate 16 tokens, and an eval forward, instead of training steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch


def build(hidden: int, layers: int, dropout: float):
    """(QLoRA model, QDoRA model, peft DoRA on the dense twin), each in train mode."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_lightning.quant import Linear4bit, add_lora, quantize_model

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=8, vocab_size=1024, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config)
    nf4 = quantize_model(copy.deepcopy(dense))
    for name, module in nf4.named_modules():
        if isinstance(module, Linear4bit):
            dense.get_submodule(name).weight.data.copy_(module.dequantize(torch.float32))
    lora = add_lora(copy.deepcopy(nf4), r=16, alpha=32, dropout=dropout)
    qdora = add_lora(nf4, r=16, alpha=32, dropout=dropout, use_dora=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    dora = peft.get_peft_model(dense, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets,
                                                      use_dora=True, task_type="CAUSAL_LM"))
    return {"QLoRA (ours)": lora.train(), "QDoRA (ours)": qdora.train(), "DoRA on dense (peft)": dora.train()}


def stepper(model, batch: torch.Tensor):
    """A function running one training step of ``model`` on ``batch`` with ``adamw_8bit``."""
    from lowmem_lightning.optim import build_optimizer

    optimizer = build_optimizer("adamw_8bit", [p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def evaluator(model, batch: torch.Tensor):
    """A function running ``model`` in eval mode without gradients: 16 greedy tokens after ``batch``'s first row's
    first 16 tokens, then a forward of the whole ``batch``."""
    model.eval()

    @torch.no_grad()
    def run() -> None:
        model.generate(input_ids=batch[:1, :16], max_new_tokens=16, do_sample=False)
        model(input_ids=batch)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--eval", action="store_true", help="time generation and an eval forward, not training")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    batch = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    make = evaluator if args.eval else stepper
    steps = {name: make(model, batch) for name, model in build(args.hidden, args.layers, args.dropout).items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) / args.steps)
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, {args.threads} thread(s), "
          f"dropout {args.dropout:g}, {'eval: generate 16 + forward' if args.eval else 'training'}, "
          f"torch {torch.__version__}")
    base = statistics.median(times["QLoRA (ours)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:22s} {median * 1e3:8.1f} ms/step   x{median / base:.2f} of QLoRA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
