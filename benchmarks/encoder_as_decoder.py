"""Which causal-LM model types of the installed transformers attend to later tokens when built from a config whose
``is_decoder`` is off (an encoder checkpoint's), and whether :func:`lowmem_lightning.multimodal.as_causal_decoder`
(what every builder of the package calls) stops it.

For every ``model_type`` that ``AutoModelForCausalLM`` maps and whose config has an ``is_decoder`` switch, a toy model
is built twice from ``AutoConfig.for_model`` (two layers, width 64): as transformers builds it, and after
``as_causal_decoder``. Each line gives, for both builds, the largest change of the logits at positions 0-7 when the
token at position 8 changes (0: causal), or why it was not built; the last line counts the model types with a switch
and those that, with it off, attend to later tokens.

    python benchmarks/encoder_as_decoder.py            # ~1 minute on one core
    python benchmarks/encoder_as_decoder.py roberta bert
"""

from __future__ import annotations

import sys
import warnings

import torch

TOY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=300,
           embedding_size=64, attention_type="original_full", d_model=64, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
"""Size settings given to every config (each takes those it knows)."""


def later_token_effect(model) -> float:
    """Max |change| of the first 8 positions' logits when the token at position 8 changes."""
    ids = torch.randint(5, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[0, 8] = 7
    model.eval()
    with torch.no_grad():
        return float((model(input_ids=ids).logits[0, :8] - model(input_ids=later).logits[0, :8]).abs().max())


def row(model_type: str) -> tuple[str, bool] | None:
    """The line of ``model_type`` and whether, with the switch off, it attends to later tokens; None when its config
    has no ``is_decoder`` switch."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem_lightning.multimodal import as_causal_decoder

    try:
        config = AutoConfig.for_model(model_type, **TOY)
    except Exception as err:  # noqa: BLE001 - a config that refuses the toy sizes
        try:
            switch = hasattr(AutoConfig.for_model(model_type), "is_decoder")
        except Exception:  # noqa: BLE001 - nor its defaults
            switch = False
        return (f"{model_type:24} not built at the toy size ({type(err).__name__})", False) if switch else None
    if not hasattr(config, "is_decoder"):
        return None
    effects = []
    for build in (lambda c: c, as_causal_decoder):
        try:
            torch.manual_seed(0)
            effects.append(later_token_effect(AutoModelForCausalLM.from_config(build(config))))
        except Exception as err:  # noqa: BLE001 - a model the toy sizes cannot run
            effects.append(f"not run ({type(err).__name__})")
    text = [f"{e:.1e}" if isinstance(e, float) else e for e in effects]
    later = isinstance(effects[0], float) and effects[0] > 0
    return f"{model_type:24} is_decoder off: {text[0]:>12}   as_causal_decoder: {text[1]}", later


def main(argv: list[str]) -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    switched = later = 0
    try:
        for model_type in argv or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            found = row(model_type)
            if found is not None:
                switched, later = switched + 1, later + found[1]
                print(found[0], flush=True)
    finally:  # as it was: this also runs inside a test process
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)
    print(f"model types with an is_decoder switch: {switched}; attending to later tokens with it off: {later}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
