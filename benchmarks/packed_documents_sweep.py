"""Which causal LMs of the installed transformers keep packed documents apart through ``packed_call``.

For every ``model_type`` that ``AutoModelForCausalLM`` maps, a toy model is built from ``AutoConfig.for_model`` with
small sizes (two layers, width 32; a type whose config refuses them, or that takes over 20 s, is listed as not built),
two documents of 20 and 23 tokens are run packed in one row (``position_ids`` restarting) through
:func:`lowmem_lightning.modules.packed_attention.packed_call`, and each document's logits are compared with its logits
alone: ``OK`` (max |difference| < 1e-4), ``MIXED`` (a document saw another), ``refused`` (layers that carry state
across documents, or masks built without transformers' mask functions:
:func:`~lowmem_lightning.modules.packed_attention.packed_documents_problem`), or the build error. A
``MIXED`` model trains on documents that see each other under ``isolate_documents: true``.

    python benchmarks/packed_documents_sweep.py            # ~3 minutes on one core
    python benchmarks/packed_documents_sweep.py gpt_oss opt
"""

from __future__ import annotations

import signal
import sys
import warnings

import torch

TOY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=8, vocab_size=259, n_embd=32, n_layer=2, n_head=4, d_model=32, n_layers=2, n_heads=4,
           num_layers=2, ffn_dim=64, moe_intermediate_size=16, num_experts=4, num_local_experts=4,
           num_experts_per_tok=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
"""Size settings given to every config (each takes those it knows)."""


class _TimedOut(Exception):
    pass


def _raise_timeout(*_):
    raise _TimedOut


def check(model_type: str) -> str:
    """The verdict for ``model_type`` (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_lightning.modules.packed_attention import packed_call, packed_documents_problem
    from lowmem_lightning.multimodal import as_causal_decoder

    config = as_causal_decoder(AutoConfig.for_model(model_type, **TOY))  # as the package's builders build it
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    problem = packed_documents_problem(config, model)
    if problem:
        why = "no mask from the positions" if "mask functions" in problem else "state across documents"
        return f"refused ({why})"
    a, b = torch.randint(3, 250, (1, 20)), torch.randint(3, 250, (1, 23))
    positions = torch.cat([torch.arange(20), torch.arange(23)])[None]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], 1)
        packed = packed_call(model, torch.cat([a, b], 1), None, positions).logits
    difference = float((packed.float() - alone.float()).abs().amax())
    verdict = "OK" if difference < 1e-4 else "MIXED"
    return f"{verdict} {difference:.1e} ({model.config._attn_implementation})"


def main(argv: list[str]) -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    handler = signal.signal(signal.SIGALRM, _raise_timeout)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    try:
        for model_type in argv or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            verdict = _timed_verdict(model_type)
            counts[verdict.split()[0]] = counts.get(verdict.split()[0], 0) + 1
            print(f"{model_type:28} {verdict}", flush=True)
    finally:  # as it was: the sweep also runs inside a test process
        signal.signal(signal.SIGALRM, handler)
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
    print(", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items())))
    return 0


def _timed_verdict(model_type: str) -> str:
    """:func:`check` of ``model_type``, or why its toy model was not built (an error, or over 20 s)."""
    signal.alarm(20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check(model_type)
    except _TimedOut:
        return "not built (over 20 s)"
    except Exception as error:  # a toy size its config refuses, a package it needs
        return f"not built ({type(error).__name__}: {str(error).splitlines()[0][:80]})"
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
