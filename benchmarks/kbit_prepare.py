"""What peft's ``prepare_model_for_kbit_training`` costs on our NF4 models, against ``prepare_for_kbit_training``.

A tiny Llama (hidden 256, intermediate 688, 2 layers, vocab 32000, untied head) in bf16, quantized with
``quantize_model``, prepared by each function, with peft LoRA r=8 on every linear layer. Printed: the bytes of its
weights and buffers, the dtypes of its frozen params, and the peak CPU bytes of one forward + backward at batch 2 x
seq 256 (torch's profiler, as ``benchmarks/lora_activations.py`` measures it). Deterministic: one run.

    python benchmarks/kbit_prepare.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_activations import profiled_peak  # noqa: E402

VOCAB = 32000


def prepared_lora(prepare: str, hidden: int = 256, layers: int = 2):
    """The LoRA model of the tiny NF4 Llama, prepared by ``prepare`` (``"peft"`` or ``"ours"``)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_lightning.quant import prepare_for_kbit_training, quantize_model

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 43 // 16, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, tie_word_embeddings=False)
    model = quantize_model(LlamaForCausalLM(config).to(torch.bfloat16))
    model = prepare_model_for_kbit_training(model) if prepare == "peft" else prepare_for_kbit_training(model)
    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def main(argv=None) -> int:
    print("| prepared with | weights and buffers | frozen dtypes | step peak |")
    print("|---|---:|---|---:|")
    labels = {"peft": "peft's `prepare_model_for_kbit_training`", "ours": "`prepare_for_kbit_training`"}
    for prepare, label in labels.items():
        model = prepared_lora(prepare)
        nbytes = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
        dtypes = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                                   if not p.requires_grad}))
        peak = profiled_peak(model, VOCAB, 2, 256)
        print(f"| {label} | {nbytes:,} B | {dtypes} | {peak:,} B |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
