"""``lowmem estimate``: the memory a recipe needs, from its model built on the meta device.

The recipe is parsed exactly as ``lowmem fit`` would parse it (:func:`~lowmem_lightning.cli.app.parse_fit_config`),
the model is built without weights (:func:`build_meta_model`), and
:func:`~lowmem_lightning.estimate.estimate_memory` sizes parameters, gradients and every optimizer's
state from the optimizers' own ``state_layout()``. Activations come from the recipe's ``data.batch_size``,
``data.seq_len``, ``model.gradient_checkpointing``, ``trainer.precision``, ``data.pack`` and
``data.isolate_documents`` (packed documents kept apart add their mask) (the flags that set them in
``lowmem fit`` set them here: ``--data.seq_len 1024``) through
:func:`~lowmem_lightning.estimate.model_activation_bytes` (full-weight decoders, and LoRA / QLoRA runs through
:func:`~lowmem_lightning.estimate.lora_activation_bytes`), and join every device total.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Sequence

from jsonargparse import Namespace
from lightning.pytorch import LightningModule

from lowmem_lightning.cli.app import parse_fit_config
from lowmem_lightning.cli.config_edits import import_class, init_args, is_optimizer_callback
from lowmem_lightning.cli.messages import for_terminal, short, usage_error
from lowmem_lightning.optim.registry import available_optimizers

__all__ = ["build_meta_model", "estimate_main"]


def _callback_entries(cfg: Namespace) -> list:
    """The recipe's ``trainer.callbacks`` entries, as a list (a single entry is one)."""
    callbacks = cfg.trainer.get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _configured_optimizer(cfg: Namespace) -> tuple[str, dict] | None:
    """``(name, kwargs)`` of the run's optimizer: the LowMemOptimizerCallback's, else the module's."""
    for entry in _callback_entries(cfg):
        if is_optimizer_callback(entry):
            init = init_args(entry)
            return init.get("optimizer") or "adamw_8bit", dict(init.get("optimizer_kwargs") or {})
    init = cfg.model.get("init_args") or Namespace()
    name = init.get("optimizer")
    if isinstance(name, str) and name in available_optimizers():
        return name, dict(init.get("optimizer_kwargs") or {})
    return None


def _optimizer_callback_args(cfg: Namespace) -> Namespace:
    """The init args of the recipe's (first) LowMemOptimizerCallback; empty when it has none."""
    for entry in _callback_entries(cfg):
        if is_optimizer_callback(entry):
            return init_args(entry)
    return Namespace()


def _configured_fp32_state(cfg: Namespace):
    """The recipe's ``fp32_state``: its LowMemOptimizerCallback's, else the module's; None when neither sets it."""
    value = _optimizer_callback_args(cfg).get("fp32_state")
    return value if value is not None else (cfg.model.get("init_args") or Namespace()).get("fp32_state")


def _callbacks_of(cfg: Namespace, kind: type) -> list[tuple[str, Namespace]]:
    """``(class name, init args)`` of each of the recipe's callbacks of class ``kind`` (or a subclass)."""
    found = []
    for entry in _callback_entries(cfg):
        cls = import_class(entry.get("class_path", "")) if isinstance(entry, Namespace) else None
        if isinstance(cls, type) and issubclass(cls, kind):
            found.append((cls.__name__, entry.get("init_args") or Namespace()))
    return found


def _averaging_callbacks(cfg: Namespace) -> list[tuple[str, Namespace]]:
    """``(class name, init args)`` of each of the recipe's ``WeightAveraging`` callbacks (``EMAWeightAveraging``)."""
    from lightning.pytorch.callbacks import WeightAveraging

    return _callbacks_of(cfg, WeightAveraging)


def _average_bytes(model, use_buffers: bool, shared: bool) -> int:
    """Bytes of an average of ``model`` that are its own: everything, or (``shared``) all but what
    :func:`~lowmem_lightning.callbacks.averaging.shareable_parts` shares."""
    from torch import nn

    from lowmem_lightning.callbacks.averaging import shareable_parts

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    if shared:
        for obj in shareable_parts(model, use_buffers).objects(model):
            for t in [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else [obj]:
                tensors.pop(id(t), None)
    return sum(t.nbytes for t in tensors.values())


def _averages_share(cfg: Namespace) -> bool:
    """Whether a weight average of the recipe shares the frozen base: a LowMemOptimizerCallback or a LowMemModule
    brings :class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen`."""
    from lowmem_lightning.modules.base import LowMemModule

    module = import_class(cfg.model.class_path)
    with_callback = any(is_optimizer_callback(entry) for entry in _callback_entries(cfg))
    return with_callback or (isinstance(module, type) and issubclass(module, LowMemModule))


def _weight_average(cfg: Namespace, model) -> tuple[int, str]:
    """``(device bytes, what they are)`` of the averages the recipe's averaging callbacks keep. A ``WeightAveraging``
    callback's (``EMAWeightAveraging``) is a copy of what trains, the frozen base shared (``LowMemOptimizerCallback``
    and ``LowMemModule`` bring :class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen`), else of the whole
    model (Lightning's); ``StochasticWeightAveraging``'s is a copy of the whole module, in host memory by default. One
    kept in host memory (``device: cpu`` on another accelerator) counts nothing on the device: its detail says how
    much it takes there. ``(0, "")`` without such a callback."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from lowmem_lightning.estimate import count_model, size_text

    averagings, swas = _averaging_callbacks(cfg), _callbacks_of(cfg, StochasticWeightAveraging)
    if not averagings and not swas:
        return 0, ""
    sharing = _averages_share(cfg)
    on_cpu = str(cfg.trainer.get("accelerator") or "auto") == "cpu"
    device_bytes, details, count = 0, [], count_model(model)
    for name, init, swa in [*((n, i, False) for n, i in averagings), *((n, i, True) for n, i in swas)]:
        use_buffers = True if swa else init.get("use_buffers", True)
        device = init.get("device", "cpu") if swa else init.get("device")  # SWA's default: the CPU
        if device is not None and str(device).startswith("cpu") and not on_cpu:
            details.append(f"{name}: {size_text(_average_bytes(model, use_buffers, False))} in host memory (device "
                           "cpu), a copy of the whole model")
            continue
        own = _average_bytes(model, use_buffers, sharing and not swa)
        device_bytes += own
        frozen = count.params > count.trainable_params
        details.append(f"{name}: a copy of " + (
            "the whole model" if swa else
            "the whole model (no LowMemOptimizerCallback shares its frozen part)" if not sharing
            else "what trains, the frozen weights shared" if frozen else "the weights (all train)"))
    return device_bytes, "; ".join(details)


def _checkpoints_frozen(cfg: Namespace) -> bool:
    """Whether the run's checkpoints hold the frozen weights: not when its module (``CausalLMModule``) or its
    LowMemOptimizerCallback sets ``checkpoint_frozen`` false."""
    module = (cfg.model.get("init_args") or Namespace()).get("checkpoint_frozen", True)
    return module is not False and _optimizer_callback_args(cfg).get("checkpoint_frozen", True) is not False


def _checkpoint_weights(cfg: Namespace, model) -> tuple[int, str]:
    """:func:`~lowmem_lightning.estimate.checkpoint_weights` of the recipe: its ``checkpoint_frozen`` setting, and
    each weight average's own tensors (what trains when the average shares the frozen base or the checkpoint leaves
    it out, else the whole model)."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    from lowmem_lightning.estimate import checkpoint_weights

    frozen_in = _checkpoints_frozen(cfg)
    sharing = _averages_share(cfg)
    average = sum(_average_bytes(model, init.get("use_buffers", True), sharing or not frozen_in)
                  for _, init in _averaging_callbacks(cfg))
    swa = len(_callbacks_of(cfg, StochasticWeightAveraging))  # each writes a copy of the module's weights
    average += swa * checkpoint_weights(model, frozen_in)[0]
    return checkpoint_weights(model, frozen_in, average)


def _configured_release(cfg: Namespace) -> bool:
    """Whether the recipe's LowMemOptimizerCallback sets ``step_in_backward``."""
    return bool(_optimizer_callback_args(cfg).get("step_in_backward"))


def _configured_bucket_bytes(cfg: Namespace) -> int:
    """The release's ``bucket_bytes`` of the recipe's LowMemOptimizerCallback (default 25 MiB)."""
    from lowmem_lightning.estimate import RELEASE_BUCKET_BYTES

    value = _optimizer_callback_args(cfg).get("bucket_bytes")
    return RELEASE_BUCKET_BYTES if value is None else value


def _activations(cfg: Namespace, model) -> tuple[int, str]:
    """``(bytes, what they are of)`` of the run's activations: ``data.batch_size`` x ``data.seq_len`` with
    ``model.gradient_checkpointing`` under ``trainer.precision``, and the mask of packed documents kept apart
    where ``data.pack`` and ``data.isolate_documents`` are both set (``TextDataModule``'s defaults); ``(0, why
    not)`` when the recipe does not say or the formula does not model the run."""
    from lowmem_lightning.data.text import _check_int
    from lowmem_lightning.estimate import model_activation_bytes

    data = (cfg.get("data") or Namespace()).get("init_args") or Namespace()
    batch, seq = data.get("batch_size"), data.get("seq_len")
    if batch is None or seq is None:
        return 0, "not estimated: the data module sets no batch_size / seq_len"
    _check_int(batch, "batch_size", 1)
    _check_int(seq, "seq_len", 2)
    checkpointing = bool((cfg.model.get("init_args") or Namespace()).get("gradient_checkpointing"))
    isolate = data.get("pack") is True and data.get("isolate_documents") is True
    nbytes, detail = model_activation_bytes(model, batch, seq, checkpointing, cfg.trainer.get("precision"),
                                            isolate_documents=isolate)
    return nbytes or 0, detail


def _data_vocab_size(cfg: Namespace) -> int | None:
    data = cfg.get("data")
    tokenizer = ((data or Namespace()).get("init_args") or Namespace()).get("tokenizer")
    if not isinstance(tokenizer, str) or tokenizer == "byte":
        return None
    with contextlib.suppress(Exception):
        from lowmem_lightning.data.tokenizer import load_tokenizer
        from lowmem_lightning.remote_code import trusting_remote_code

        with trusting_remote_code(bool(data.init_args.get("trust_remote_code"))):
            return load_tokenizer(tokenizer).vocab_size
    return None


def build_meta_model(cfg: Namespace):
    """The model of a parsed ``fit`` config built on the meta device (no weights are read or allocated).

    ``CausalLMModule`` (and subclasses) go through ``build_causal_lm(..., device="meta")``, which reads
    only ``config.json`` (an NF4 run's checkpoint is first checked from its safetensors headers as ``lowmem fit``'s
    loader checks it: :func:`~lowmem_lightning.quant.loading.check_pretrained_checkpoint`, ``ModelFileError``);
    any other LightningModule is instantiated under ``torch.device("meta")`` and
    its ``configure_model`` is called.
    """
    import torch

    from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm, validate_model_args
    from lowmem_lightning.remote_code import trusting_remote_code

    cls = import_class(cfg.model.class_path)
    init = (cfg.model.get("init_args") or Namespace()).as_dict()
    if isinstance(cls, type) and issubclass(cls, CausalLMModule):
        trusted = init.get("trust_remote_code", False)
        # what `lowmem fit` refuses of the model's arguments, named as it names them, before any file is read
        validate_model_args(init.get("model_name_or_path"), init.get("config"), init.get("quantize"),
                            init.get("lora"), init.get("torch_dtype"))
        if init.get("quantize") == "nf4" and init.get("model_name_or_path") is not None:
            from lowmem_lightning.quant.loading import check_pretrained_checkpoint

            # what the NF4 loader of ``lowmem fit`` refuses from the headers (shapes, missing tensors, ...)
            with trusting_remote_code(trusted):
                check_pretrained_checkpoint(init["model_name_or_path"], "nf4",
                                            init.get("torch_dtype") or torch.get_default_dtype())
        return build_causal_lm(
            init.get("model_name_or_path"), init.get("config"), init.get("quantize"), init.get("lora"),
            device="meta", torch_dtype=init.get("torch_dtype"), vocab_size=_data_vocab_size(cfg),
            resize_embeddings=init.get("resize_embeddings", False), token_ids=init.get("untrained_token_ids"),
            attn_implementation=init.get("attn_implementation"), trust_remote_code=trusted,
            host_embeddings=init.get("host_embeddings", False),
        )
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model")
    with torch.device("meta"):
        parsed = parser.parse_object({"model": cfg.model.as_dict()})
        # ``instantiate`` since jsonargparse 4.49 (``instantiate_classes``: deprecated there, gone in 5.0)
        model = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(parsed).model
        model.configure_model()
    return model


def _untrained_rows_note(cfg: Namespace, model) -> str | None:
    """The note that the trainable count leaves out the checkpoint's untrained token rows the data uses, for a LoRA
    run on a checkpoint with ``resize_embeddings`` and no ``untrained_token_ids`` list: ``lowmem fit`` finds those
    rows from the weights and the data, which an estimate reads neither of (a full fine-tune trains every row anyway,
    so its count is exact); the note says where a fit records the ids it found. ``None`` otherwise."""
    init = cfg.model.get("init_args") or Namespace()
    if not (init.get("model_name_or_path") and init.get("lora") and init.get("resize_embeddings")) or (
            init.get("untrained_token_ids") is not None or not hasattr(model, "get_input_embeddings")):
        return None
    embedding, head = (getattr(layer, "original_module", layer)  # through peft's wrapper of grown rows
                       for layer in (model.get_input_embeddings(), model.get_output_embeddings()))
    per_token = embedding.weight.shape[1] * (1 if head is None or head.weight is embedding.weight else 2)
    return (f"trainable params: + {per_token:,} per untrained checkpoint row the data uses (lowmem fit finds them "
            "and records their ids as untrained_token_ids in the run's hparams.yaml and in its checkpoints' "
            "hyper_parameters: copy that list into --model.untrained_token_ids to count them)")


PROG = "lowmem estimate"
"""The command's name in its messages (``lowmem estimate: error: ...``)."""

MAX_BUDGET_GB = 1e6
"""The largest ``--budget-gb`` taken (a petabyte: any larger figure is a typo)."""


class _OneLineErrors(argparse.ArgumentParser):
    """argparse with the ``lowmem`` style of error: one line and a hint to ``--help`` (no usage dump), exit 2."""

    def error(self, message: str):
        """Print ``lowmem estimate: error: MESSAGE`` and the ``--help`` hint, exit with code 2."""
        self.exit(2, for_terminal(f"{self.prog}: error: {message}\n(all options: {self.prog} --help)") + "\n")


def estimate_main(argv: Sequence[str]) -> int:
    """``lowmem estimate``: parse the recipe, build its model on the meta device, print the estimate."""
    from lowmem_lightning.estimate import GB, estimate_memory, format_json, format_table

    parser = _OneLineErrors(
        prog=PROG,
        description="Memory a recipe needs: parameters, frozen weights (by dtype / NF4), gradients, activations "
        "and the state of every optimizer, from the model built on the meta device (no weights, no download). "
        "Other options (e.g. --model.model_name_or_path DIR, --optim NAME) are applied as in 'lowmem fit'; "
        "activations are of the recipe's --data.batch_size, --data.seq_len, --model.gradient_checkpointing, "
        "--trainer.precision, --model.attn_implementation (sdpa, eager), --data.pack and --data.isolate_documents "
        "(decoders of the Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-NeoX, OLMo 2/3, GLM-4, EXAONE 4, Granite, "
        "SmolLM3, Seed-OSS and Hunyuan dense families, and the language models of Gemma 3, Ministral 3, LLaVA, "
        "Qwen2-VL, Qwen2.5-VL and Qwen3-VL: full-weight, or LoRA on "
        "every linear projection or the attention ones of a 4-bit or frozen base; Mixtral, Qwen2-MoE, Qwen3-MoE and "
        "OLMoE under QLoRA; packed documents kept apart add their attention mask; what is not modelled is left out "
        "and said so).",
    )
    parser.add_argument("-c", "--config", required=True, help="Recipe: a YAML file or a bundled recipe name.")
    parser.add_argument("--budget-gb", type=float, default=None, help="Device memory budget in GB (10**9 bytes).")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="Output format.")
    parser.add_argument(
        "--step-in-backward", action="store_true", default=None,
        help="Count the gradients as released in backward (only the fullest bucket alive); default: the "
        "recipe's LowMemOptimizerCallback step_in_backward.",
    )
    parser.add_argument(
        "--fp32-state", default=None, metavar="SPEC",
        help="Params that keep 32-bit optimizer state in every row, comma-separated: 'embeddings' (nn.Embedding), "
        "a module class path ('torch.nn.Embedding') or a name pattern ('*embed_tokens*,lm_head'); default: the "
        "recipe's LowMemOptimizerCallback (or module) fp32_state.",
    )
    known, extra = parser.parse_known_args(list(argv))
    if known.budget_gb is not None and not (0 < known.budget_gb <= MAX_BUDGET_GB and math.isfinite(known.budget_gb)):
        parser.error(f"argument --budget-gb: invalid value {known.budget_gb!r}: expected a number of GB in "
                     f"(0, {MAX_BUDGET_GB:g}].")
    try:
        cfg = parse_fit_config(["--config", known.config, *extra], prog=PROG)
    except ValueError as err:
        return usage_error(str(err), PROG)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        model = build_meta_model(cfg)
        budget = None if known.budget_gb is None else int(known.budget_gb * GB)
        release = known.step_in_backward if known.step_in_backward is not None else _configured_release(cfg)
        checkpointing = bool((cfg.model.get("init_args") or Namespace()).get("gradient_checkpointing"))
        activations, detail = _activations(cfg, model)
        fp32_state = known.fp32_state.split(",") if known.fp32_state is not None else _configured_fp32_state(cfg)
        average, average_detail = _weight_average(cfg, model)
        estimate = estimate_memory(model, budget_bytes=budget, configured=_configured_optimizer(cfg),
                                   step_in_backward=release, gradient_checkpointing=checkpointing,
                                   bucket_bytes=_configured_bucket_bytes(cfg), activations=activations,
                                   activation_detail=detail, fp32_state=fp32_state, average_bytes=average,
                                   average_detail=average_detail)
        estimate.checkpoint_weight_bytes, estimate.checkpoint_detail = _checkpoint_weights(cfg, model)
        note = _untrained_rows_note(cfg, model)
        if note is not None:
            estimate.notes.append(note)
    except (ValueError, TypeError) as err:
        return usage_error(short(err), PROG)
    print(format_json(estimate) if known.format == "json" else format_table(estimate))
    return 0
