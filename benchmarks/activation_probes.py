"""Probes behind the estimator's special cases, printing the profiled figures RESULTS.md quotes.

torch's CPU profiler, one thread; ``benchmarks/lora_activations.py`` builds and profiles the models.

    python benchmarks/activation_probes.py --tied          # a tied embedding's gradient, with and without release
    python benchmarks/activation_probes.py --sliding       # sliding-window masks against the bool mask
    python benchmarks/activation_probes.py --multimodal    # a multimodal Gemma 3 on text against its text model
    python benchmarks/activation_probes.py --tokens        # the full-weight bf16 formula at 128-384 tokens
    python benchmarks/activation_probes.py --packed        # packed documents kept apart: Gemma 3 against Llama
    python benchmarks/activation_probes.py --eager         # eager attention: packed documents, eager less SDPA
    python benchmarks/activation_probes.py --softcap       # Gemma 2's soft-capping, each cap off in turn
    python benchmarks/activation_probes.py --before        # the Llama layer formula on Phi-3, Gemma 2, GPT-NeoX
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys

import torch
from lora_activations import (
    LAYER_ATTENTION,
    LAYER_CHECK,
    _formula,
    _gemma2,
    _gemma3,
    _llama_layer_formula,
    _phi3,
    _width_config,
    _width_settings,
    build_full_model,
    profiled_peak,
    profiled_setting,
)
from profiler_peak import peak_bytes

from lowmem_lightning.estimate import activation_bytes, estimate_memory


def _tied_llama(tied: bool, vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=64)
    return config, LlamaForCausalLM(config).to(dtype)


def _backward_peak(model, vocab: int, release: bool) -> int:
    """Profiled peak of the second forward + backward of ``model`` (SGD, 64 KiB release buckets when ``release``)."""
    from lowmem_lightning.callbacks.release import GradientRelease
    from lowmem_lightning.optim import build_optimizer

    opt = build_optimizer("sgd", model.parameters(), lr=1e-4)
    hooks = GradientRelease(opt, bucket_bytes=64 * 2**10).attach() if release else None
    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        gc.collect()
        gc.disable()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            model(input_ids=ids, labels=ids).loss.backward()
            if hooks is not None:
                hooks.finish_step()
        gc.enable()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return peak_bytes(prof)


def tied() -> None:
    """A tied embedding's gradient: the estimate against the profiled peak, tied and untied.

    Llama h256, 4 layers, 1 x 32 tokens: the profiled peak of backward, the tied weight's bytes, and the estimate
    (activations + gradients) over the peak."""
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in (16000, 32000):
            for release in (True, False):
                for is_tied in (False, True):
                    config, model = _tied_llama(is_tied, vocab, dtype)
                    peak = _backward_peak(model, vocab, release)
                    est = estimate_memory(model, configured=("sgd", {"lr": 1e-4}), step_in_backward=release,
                                          bucket_bytes=64 * 2**10)
                    predicted = activation_bytes(config, 1, 32, dtype.itemsize, False) + est.gradient_device_bytes
                    print(f"{str(dtype):>14} V{vocab} release={release!s:5} tied={is_tied!s:5}: peak {peak:>11,} B "
                          f"(tied weight {vocab * 256 * dtype.itemsize:,} B), estimate / peak "
                          f"{predicted / peak:.3f}", flush=True)


def sliding() -> None:
    """Sliding-window masks (Gemma 3, Mistral, Qwen2, Phi-3), in units of the bool mask.

    What a window of 64 adds against one of 4096, over ``batch * seq**2``: a Gemma 3 (h256, 3 layers, 2 sliding) per
    setting and shape; Mistral and Phi-3 (every layer slides) and Qwen2 (``use_sliding_window``, 2 of 3) in bf16."""
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    for batch, seq in ((2, 192), (1, 256)):
        for setting, targets, ckpt in ((("full", 2), None, True), (("full", 2), None, False), (("full", 4), None, True),
                                       (("full", 4), None, False), (("lora", "nf4", "bf16-mixed", True), "all", True),
                                       (("lora", "nf4", "fp32", False), "all", True)):
            peaks = [profiled_setting({**_gemma3(256, 512, 3, 4, 1, 64, 600), "sliding_window": window,
                                       "layer_types": types}, batch, seq, setting, targets, ckpt)
                     for window in (4096, 64)]
            print(f"{batch}x{seq} {str(setting):>38} {'ckpt' if ckpt else 'full'}: window 64 adds "
                  f"{(peaks[1] - peaks[0]) / (batch * seq * seq):.3f} x the bool mask", flush=True)
    base = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "vocab_size": 600}
    for model_type, config in (("mistral", _width_config("mistral", 4, 1, 64, base)),
                               ("qwen2", {**_width_config("qwen2", 4, 1, 64, base), "use_sliding_window": True,
                                          "max_window_layers": 1}),
                               ("phi3", _phi3(256, 512, 3, 4, 1, 600))):
        for ckpt in (False, True):
            peaks = [profiled_setting({**config, "sliding_window": window}, 1, 256, ("full", 2), None, ckpt)
                     for window in (4096, 64)]
            print(f"{model_type} 1x256 bf16 {'ckpt' if ckpt else 'full'}: window 64 adds "
                  f"{(peaks[1] - peaks[0]) / 256**2:.3f} x the bool mask", flush=True)


def multimodal() -> None:
    """A multimodal Gemma 3 on text against the text-only Gemma 3 of its language config.

    A one-layer vision tower, bf16, batch 2 x seq 96."""
    import transformers

    from lowmem_lightning.modules.causal_lm import _enable_checkpointing

    text = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 600, "max_position_embeddings": 96,
            "tie_word_embeddings": False}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    for ckpt in (True, False):
        peaks = []
        for build in (lambda: transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
                text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=False)),
                      lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text))):
            torch.manual_seed(0)
            model = build().to(torch.bfloat16)
            model.config._attn_implementation = "sdpa"
            if ckpt:
                _enable_checkpointing(model)
            peaks.append(profiled_peak(model, 600, 2, 96))
        print(f"{'checkpointing' if ckpt else 'no checkpointing'}: multimodal {peaks[0]:,} B, text-only {peaks[1]:,} B",
              flush=True)


def tokens() -> None:
    """The full-weight bf16 formula with checkpointing over the profiled peak at 128-384 tokens.

    Llama decoders (q = kv = h), h192 and h320."""
    for base, heads in (({"hidden_size": 192, "intermediate_size": 640, "num_hidden_layers": 3, "vocab_size": 700}, 6),
                        ({"hidden_size": 320, "intermediate_size": 768, "num_hidden_layers": 2, "vocab_size": 500}, 5)):
        for batch, seq in ((2, 64), (1, 160), (2, 96), (2, 192)):
            config = _width_config("llama", heads, heads, base["hidden_size"] // heads, base)
            peak = profiled_peak(build_full_model(config, seq, torch.bfloat16, True), base["vocab_size"], batch, seq)
            print(f"h{base['hidden_size']} {batch}x{seq}: formula / profiled "
                  f"{_formula(config, batch, seq, ('full', 2), None, True) / peak:.3f}", flush=True)


def packed() -> None:
    """What packed documents kept apart add to a Gemma 3 and to a Llama of the same shapes.

    Three documents per row (``position_ids`` restarting), h256, 2 layers, batch 2 x seq 192, in bytes."""
    positions = _three_documents()
    for model_type in ("llama", "gemma3_text"):
        config = {**_width_config(model_type, 4, 1, 64, {"hidden_size": 256, "intermediate_size": 512,
                                                          "num_hidden_layers": 2, "vocab_size": 600}),
                  "tie_word_embeddings": False}
        for ckpt in (True, False):
            added = [profiled_peak(build_full_model(config, 192, torch.bfloat16, ckpt), 600, 2, 192, False, pos)
                     for pos in (None, positions)]
            print(f"{model_type:>11} bf16 {'ckpt' if ckpt else 'full'}: packed documents add {added[1] - added[0]:,} B",
                  flush=True)


def _three_documents() -> torch.Tensor:
    """``position_ids`` of 2 rows x 192 tokens, three documents a row (restarting at 0 at 64 and 101)."""
    cuts = [0, 64, 101, 192]
    row = torch.cat([torch.arange(end - start) for start, end in zip(cuts, cuts[1:])])
    return torch.stack([row, row])


def eager() -> None:
    """Eager attention: what packed documents add under it, and eager less SDPA for Phi-3 and Llama.

    Llama h256 (4 heads, 1 key/value head, 2 layers) at 2 x 192, bf16 and fp32: packed documents (three a row) add, in
    bytes, against the formula; then eager's peak less SDPA's with checkpointing for a Phi-3 and a Llama of one shape
    (h256, 4 / 2 heads, 2 x 128, bf16)."""
    config = _width_config("llama", 4, 1, 64, {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                               "vocab_size": 600})
    for dtype, d in ((torch.bfloat16, 2), (torch.float32, 4)):
        for ckpt in (True, False):
            peaks = [profiled_peak(build_full_model(config, 192, dtype, ckpt, "eager"), 600, 2, 192, False, pos)
                     for pos in (None, _three_documents())]
            formula = [activation_bytes(config, 2, 192, d, ckpt, packed, "eager") for packed in (False, True)]
            print(f"eager d{d} {'ckpt' if ckpt else 'full'}: packed documents add {peaks[1] - peaks[0]:,} B (formula "
                  f"{formula[1] - formula[0]:,} B)", flush=True)
    for config in (_phi3(256, 512, 2, 4, 2, 600), _width_config("llama", 4, 2, 64, {
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "vocab_size": 600})):
        eager_less_sdpa = [profiled_setting(config, 2, 128, ("full", 2), None, True, attention)
                           for attention in ("eager", "sdpa")]
        print(f"{config['model_type']} bf16 ckpt 2x128: eager less SDPA {eager_less_sdpa[0] - eager_less_sdpa[1]:,} B",
              flush=True)


def softcap() -> None:
    """Gemma 2's soft-capping, each cap turned off in turn: the bytes it adds per score and per logit.

    h256, 4 / 2 heads, under eager attention; vocabularies of 600 (a layer is the peak with checkpointing) and 5000
    (the loss is); full weights and LoRA in bf16, bf16-mixed, fp32 and a bf16 base under fp32 adapters."""
    settings = ((("full", 2), None), (("full", 4), None), (("lora", "nf4", "bf16-mixed", True), "all"),
                (("lora", "nf4", "fp32", False), "all"),
                (("lora", "dense", "bf16-base-fp32-adapters", True), "attention"))
    for vocab, batch, seq in ((600, 2, 128), (5000, 1, 128)):
        config = _gemma2(256, 512, 2, 4, 2, 64, vocab)
        for (setting, targets), ckpt in itertools.product(settings, (True, False)):
            capped, no_score_cap, no_logit_cap = (
                profiled_setting({**config, **caps}, batch, seq, setting, targets, ckpt, "eager")
                for caps in ({}, {"attn_logit_softcapping": None}, {"final_logit_softcapping": None}))
            scores = batch * 4 * seq * seq * (1 if ckpt else 2)
            print(f"V{vocab} {batch}x{seq} {str(setting):>42} {'ckpt' if ckpt else 'full'}: the score cap adds "
                  f"{(capped - no_score_cap) / scores:.2f} B/score, the logit cap "
                  f"{(capped - no_logit_cap) / (batch * seq * vocab):.2f} B/logit", flush=True)

def before() -> None:
    """The Llama layer formula without a family's table against the profiler: the range over every setting.

    The first ``LAYER_CHECK`` decoder of Phi-3, Gemma 2 (eager) and GPT-NeoX; the formula counts the model's own
    adapters, attention and soft-capping, not its layer's table (what the estimate would say with the Llama terms)."""
    for model_type in ("phi3", "gemma2", "gpt_neox"):
        config, batch, seq = LAYER_CHECK[model_type][0]
        attention = LAYER_ATTENTION.get(model_type, "sdpa")
        ratios = [_llama_layer_formula(config, batch, seq, setting, targets, ckpt, attention)
                  / profiled_setting(config, batch, seq, setting, targets, ckpt, attention)
                  for setting, targets, ckpt in _width_settings()]
        print(f"{model_type} h{config['hidden_size']} {batch}x{seq}: Llama layer formula / profiled "
              f"{min(ratios):.3f}-{max(ratios):.3f} ({len(ratios)} settings)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in PROBES:
        parser.add_argument(f"--{name}", action="store_true", help=globals()[name].__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in PROBES:
        if getattr(args, name):
            globals()[name]()
    return 0


PROBES = ("tied", "sliding", "multimodal", "tokens", "packed", "eager", "softcap", "before")

if __name__ == "__main__":
    sys.exit(main())
