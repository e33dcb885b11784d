"""peft's adapter methods on a 4-bit base: ours (``quantize_model``) and bitsandbytes' (``BitsAndBytesConfig``), side by
side, on the CPU.

For each method of the installed peft, a toy Llama (hidden 64, 2 layers) is quantized to NF4 and wrapped by
``get_peft_model``; every trainable tensor is set to the same random values in it and in a *dense twin* (the same
model holding the weights the 4-bit layers decode to). The columns, per 4-bit backend:

- ``forward``: max |logit difference| against the dense twin with the same adapter (0 = the method computes on the
  4-bit weights what it computes on them dense), or the error ``get_peft_model`` / the forward raised;
- ``merge`` and ``safe merge``: ``merge_and_unload(safe_merge=False / True)``, max |logit difference| between the
  merged model and the adapter model before the merge (what a merge must keep), or the error.

    python benchmarks/peft_methods_4bit.py              # ~1 minute; the bitsandbytes columns only where it imports
    python benchmarks/peft_methods_4bit.py VeRA AdaLoRA
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings

import torch

TARGETS = ["q_proj", "v_proj"]
VOCAB = 128

METHODS = {
    "LoRA": ("LoraConfig", dict(r=4, target_modules=TARGETS)),
    "DoRA": ("LoraConfig", dict(r=4, target_modules=TARGETS, use_dora=True)),
    "PiSSA": ("LoraConfig", dict(r=4, target_modules=TARGETS, init_lora_weights="pissa")),
    "OLoRA": ("LoraConfig", dict(r=4, target_modules=TARGETS, init_lora_weights="olora")),
    "LoHa": ("LoHaConfig", dict(r=4, target_modules=TARGETS)),
    "LoKr": ("LoKrConfig", dict(r=4, target_modules=TARGETS)),
    "AdaLoRA": ("AdaLoraConfig", dict(init_r=4, target_r=2, target_modules=TARGETS, total_step=10)),
    "IA3": ("IA3Config", dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "OFT": ("OFTConfig", dict(r=0, oft_block_size=16, target_modules=TARGETS)),
    "BOFT": ("BOFTConfig", dict(boft_block_size=4, target_modules=TARGETS)),
    "VeRA": ("VeraConfig", dict(r=4, target_modules=TARGETS)),
    "FourierFT": ("FourierFTConfig", dict(n_frequency=16, target_modules=TARGETS)),
    "HRA": ("HRAConfig", dict(r=4, target_modules=TARGETS)),
    "LN tuning": ("LNTuningConfig", dict(target_modules=["input_layernorm"])),
    "SHiRA": ("ShiraConfig", dict(r=4, target_modules=TARGETS)),
    "C3A": ("C3AConfig", dict(block_size=16, target_modules=TARGETS)),
    "RoAd": ("RoadConfig", dict(target_modules=TARGETS)),
    "MiSS": ("MissConfig", dict(r=4, target_modules=TARGETS)),
    "WaveFT": ("WaveFTConfig", dict(target_modules=TARGETS)),
    "DeLoRA": ("DeloraConfig", dict(r=4, target_modules=TARGETS)),
    "GraLoRA": ("GraloraConfig", dict(r=4, target_modules=TARGETS)),
}
"""name -> (peft config class, its settings)."""


def dense_llama():
    """The toy full-precision model every row quantizes a copy of."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def ours(dense):
    """(4-bit model, its dense twin) with our NF4."""
    from lowmem_lightning.quant import dequantize_model, quantize_model

    nf4 = quantize_model(copy.deepcopy(dense))
    return nf4, dequantize_model(copy.deepcopy(nf4))


def bnb_4bit(dense, directory):
    """(4-bit model, its dense twin) with bitsandbytes' NF4 (double quantization), loaded as its users load it."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, device_map="cpu",
                                                 dtype=torch.float32)
    decoded = {name: bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
               for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    return model, _twin(dense, decoded)


def _twin(dense, decoded: dict):
    twin = copy.deepcopy(dense)
    for name, weight in decoded.items():
        twin.get_submodule(name).weight.data.copy_(weight)
    return twin


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:100]}"


def _adapted(config, model, generator_seed=5):
    """``model`` wrapped with ``config``, its trainable tensors set to seeded random values."""
    from peft import get_peft_model

    torch.manual_seed(3)
    wrapped = get_peft_model(model, copy.deepcopy(config))
    generator = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for _, param in sorted((n, p) for n, p in wrapped.named_parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return wrapped.eval()


def row(config, build, ids) -> list[str]:
    """forward, merge, safe merge for one method on one backend (``build()``: a fresh (4-bit, twin) pair)."""
    try:
        model, twin = build()
        wrapped = _adapted(config, model)
        logits = wrapped(input_ids=ids).logits
        forward = f"{(logits - _adapted(config, twin)(input_ids=ids).logits).abs().max().item():.1e}"
    except Exception as exc:  # noqa: BLE001 - the row reports what the user would see
        return [_error(exc), "-", "-"]
    merges = []
    for safe in (False, True):
        try:
            again = _adapted(config, build()[0])
            merged = again.merge_and_unload(safe_merge=safe)
            merges.append(f"{(merged(input_ids=ids).logits - logits).abs().max().item():.1e}")
        except Exception as exc:  # noqa: BLE001
            merges.append(_error(exc))
    return [forward, *merges]


def main(argv: list[str] | None = None) -> int:
    import peft

    warnings.filterwarnings("ignore")
    names = (argv if argv is not None else sys.argv[1:]) or list(METHODS)
    dense = dense_llama()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    backends = {"ours": lambda: ours(dense)}
    directory = tempfile.TemporaryDirectory()
    try:
        import bitsandbytes  # noqa: F401

        dense.save_pretrained(directory.name)
        backends["bitsandbytes"] = lambda: bnb_4bit(dense, directory.name)
    except ImportError:
        print("bitsandbytes is not installed: its columns are left out")
    print(f"peft {peft.__version__}, torch {torch.__version__}")
    for name in names:
        cls_name, settings = METHODS[name]
        cls = getattr(peft, cls_name, None)
        if cls is None:
            print(f"{name}: not in this peft")
            continue
        try:
            config = cls(**settings)
        except Exception as exc:  # noqa: BLE001 - e.g. a method needing an extra package
            print(f"{name}: config refused here: {_error(exc)}")
            continue
        for backend, build in backends.items():
            forward, merge, safe = row(config, build, ids)
            print(f"{name} | {backend} | forward {forward} | merge {merge} | safe merge {safe}")
    directory.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
