"""``CausalLMModule``: a Hugging Face causal LM (local checkpoint or architecture config), optionally
NF4-quantized with LoRA adapters (QLoRA), trained with a low-memory optimizer.

``build_causal_lm`` is the model factory shared with ``lowmem estimate``: it builds the same model the
module trains, on the meta device when asked (no weights, exact parameter counts).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelPruning, StochasticWeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from lowmem_lightning.data.tokenizer import BYTE_VOCAB_SIZE
from lowmem_lightning.kept_fp32 import cast_keeping_fp32
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.modules.base import LowMemModule, Scheduler
from lowmem_lightning.multimodal import (
    as_causal_decoder,
    causal_lm_auto_class,
    freeze_outside_language_model,
    text_config,
)
from lowmem_lightning.remote_code import remote_code_trusted, trusting_remote_code, unknown_model_type_problem
from lowmem_lightning.rotary import keep_rotary_fp32

__all__ = [
    "CausalLMModule",
    "build_causal_lm",
    "check_resize_embeddings",
    "make_config",
    "validate_model_args",
    "LLAMA_PROJECTIONS",
    "QUANTIZE_CHOICES",
    "DTYPES",
    "Quantize",
    "TorchDtype",
    "AttnImplementation",
    "check_attn_implementation",
]

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The seven linear projections of a Llama decoder layer: LoRA's default ``target_modules``."""

Quantize = Literal["nf4"]
"""The quantizations ``quantize`` names (or ``None``: none): ``"nf4"``, 4-bit NormalFloat weights (QLoRA)."""

QUANTIZE_CHOICES: tuple[str | None, ...] = (None, *get_args(Quantize))
"""Values accepted for ``quantize``."""

TorchDtype = Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
"""The names ``torch_dtype`` accepts (the keys of :data:`DTYPES`), or ``None``."""

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
"""Names accepted for ``torch_dtype`` (``None``: the default dtype, float32 unless the Trainer's
``precision="bf16-true"`` / ``"16-true"`` sets another while the model is built)."""

AttnImplementation = Literal["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                             "flash_attention_4"]
"""transformers' attention implementations ``attn_implementation`` names (``None``: transformers' default for the
model, ``sdpa`` where it supports it)."""

_ON_GPUS = " (flash attention runs on CUDA GPUs only)"
_ATTENTION_PACKAGES = {
    "flash_attention_2": ("is_flash_attn_2_available", "flash-attn", _ON_GPUS),
    "flash_attention_3": ("is_flash_attn_3_available", "flash-attn 3 (flash_attn_interface)", _ON_GPUS),
    "flash_attention_4": ("is_flash_attn_4_available", "flash-attn 4 (flash_attn.cute)", _ON_GPUS),
    "flex_attention": ("is_torch_flex_attn_available", "a torch with flex attention", ""),
}
"""``implementation -> (transformers' availability check, what it needs, where it runs)`` for those that need more
than torch."""


def check_attn_implementation(attn_implementation, installed: bool = True) -> None:
    """``ValueError`` naming ``attn_implementation`` unless it is ``None`` or one of :data:`AttnImplementation`; with
    ``installed``, also when this machine lacks what it needs (the flash-attn package, which runs on CUDA GPUs only):
    a fit is refused before it starts, while ``lowmem estimate`` (``installed=False``) describes a run elsewhere."""
    allowed = get_args(AttnImplementation)
    if attn_implementation is not None and attn_implementation not in allowed:
        raise ValueError(f"Invalid attn_implementation={attn_implementation!r}: expected one of "
                         f"{', '.join(allowed)}, or None (transformers' default: sdpa where the model supports it).")
    if not installed or attn_implementation not in _ATTENTION_PACKAGES:
        return
    import transformers.utils

    check, needs, where = _ATTENTION_PACKAGES[attn_implementation]
    if not getattr(transformers.utils, check)():
        raise ValueError(f"Invalid attn_implementation={attn_implementation!r}: it needs {needs}, which this "
                         f"Python does not have{where}; 'sdpa' runs everywhere and uses flash kernels on the GPU where "
                         "it can.")


def _set_attention(model: nn.Module, attn_implementation: str | None, device: torch.device) -> None:
    """Switch ``model`` to ``attn_implementation`` (``None``: leave transformers' choice). On the meta device the
    config only records it (``lowmem estimate`` reads it; nothing runs there, so nothing is checked)."""
    if attn_implementation is None:
        return
    if device.type == "meta":
        for module in model.modules():  # a multimodal model's language model has a config of its own
            if getattr(module, "config", None) is not None:
                module.config._attn_implementation = attn_implementation
        return
    try:
        model.set_attn_implementation(attn_implementation)
    except (ImportError, ValueError) as err:  # a model class without it (Gemma 2 has no sdpa), a missing package
        raise ValueError(f"Invalid attn_implementation={attn_implementation!r} for this "
                         f"{getattr(model.config, 'model_type', type(model).__name__)} model: {err}") from None


LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": LLAMA_PROJECTIONS, "use_dora": False}
"""LoRA settings used for keys missing from the ``lora`` dict."""

IGNORE_INDEX = -100

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")
"""The batch keys :class:`CausalLMModule`'s steps give the model (``TextDataModule``'s, and a Hugging Face
collator's)."""


def model_inputs(batch, accepted: tuple[str, ...] | None = MODEL_INPUTS) -> dict[str, torch.Tensor]:
    """The model inputs of a training / evaluation batch of a data module of the user's own: a dict with
    ``input_ids`` ``[batch, seq]`` and any of ``accepted`` (the keys the module's ``forward`` takes: by default
    ``attention_mask``, ``labels``, ``position_ids``; ``None``: any key, a ``forward`` taking ``**kwargs``). Without
    ``labels`` the tokens are their own labels (``-100`` where ``attention_mask`` is 0), as transformers'
    ``DataCollatorForLanguageModeling(mlm=False)`` makes them. ``ValueError`` naming what the batch holds otherwise
    (a tuple or list, no ``input_ids``, other keys such as a tokenizer's ``token_type_ids``)."""
    if not isinstance(batch, Mapping):
        kind = type(batch).__name__
        shape = f"a {kind} of {len(batch)}" if isinstance(batch, (list, tuple)) else kind
        raise ValueError(f"CausalLMModule: a batch must be a dict with 'input_ids' (and 'labels', 'attention_mask', "
                         f"'position_ids' if any), got {shape}: return dicts from your dataset or collate_fn.")
    other = sorted(set(batch) - set(accepted)) if accepted is not None else []
    if "input_ids" not in batch or other:
        problem = "no 'input_ids'" if "input_ids" not in batch else f"keys it does not take: {other}"
        takes = ", ".join(accepted) if accepted is not None else "any keys"
        raise ValueError(f"CausalLMModule: the batch has {problem}; it takes {takes} "
                         f"(got {sorted(batch)}): drop the others in your collate_fn.")
    inputs = dict(batch)
    if inputs.get("labels") is None:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        inputs["labels"] = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    return inputs


@functools.cache
def _forward_keys(cls: type) -> tuple[str, ...] | None:
    """The batch keys ``cls.forward`` takes (a subclass's own ``forward`` may take more); ``None`` for ``**kwargs``."""
    import inspect

    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.kind is not p.VAR_POSITIONAL)


def _resolve_dtype(torch_dtype: str | None) -> torch.dtype:
    if torch_dtype is None:
        return torch.get_default_dtype()
    if torch_dtype not in DTYPES:
        raise ValueError(f"Invalid torch_dtype={torch_dtype!r}: expected None or one of {', '.join(DTYPES)}.")
    return DTYPES[torch_dtype]


def _check_lora(lora: dict | None) -> dict | None:
    """``lora`` with defaults filled in, or ``None``; ``ValueError`` naming the bad key."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise ValueError(f"Invalid lora={lora!r}: expected None (full fine-tune) or a dict with keys "
                         f"{', '.join(LORA_DEFAULTS)}.")
    unknown = sorted(set(lora) - set(LORA_DEFAULTS))
    if unknown:
        raise ValueError(f"Invalid lora={lora!r}: unknown key(s) {unknown}; allowed: {', '.join(LORA_DEFAULTS)}.")
    out = {**LORA_DEFAULTS, **lora}
    r, alpha, dropout, targets = out["r"], out["alpha"], out["dropout"], out["target_modules"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"Invalid lora['r']={r!r}: expected an integer >= 1 (adapter rank).")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"Invalid lora['alpha']={alpha!r}: expected a number > 0 (scale = alpha / r).")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid lora['dropout']={dropout!r}: expected a number in [0, 1).")
    if not isinstance(out["use_dora"], bool):
        raise ValueError(f"Invalid lora['use_dora']={out['use_dora']!r}: expected true or false (DoRA: a trained "
                         "magnitude per output row).")
    if isinstance(targets, str):
        targets = [targets] if targets != "all-linear" else targets
    if targets != "all-linear" and (
        not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(f"Invalid lora['target_modules']={targets!r}: expected a non-empty list of module "
                         "names (e.g. ['q_proj', 'v_proj']) or 'all-linear'.")
    out["target_modules"] = targets if isinstance(targets, str) else list(targets)
    return out


CONFIG_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "head_dim")
"""Architecture settings that count something (width, layers, heads, positions): integers >= 1."""


def check_config_sizes(config: dict) -> None:
    """``ValueError`` naming the setting when a size of ``config`` (:data:`CONFIG_SIZES`) is not an integer >= 1,
    or the heads do not divide (``hidden_size`` by ``num_attention_heads`` without ``head_dim``,
    ``num_attention_heads`` by ``num_key_value_heads``): caught here, not as a shape error inside the model."""
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"Invalid config.{key}={value!r}: expected an integer >= 1.")
    hidden, heads, kv = config.get("hidden_size"), config.get("num_attention_heads"), config.get("num_key_value_heads")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise ValueError(f"Invalid config.num_attention_heads={heads}: it must divide config.hidden_size={hidden} "
                         "(or give config.head_dim).")
    if heads and kv and heads % kv:
        raise ValueError(f"Invalid config.num_key_value_heads={kv}: it must divide config.num_attention_heads={heads}.")


def validate_model_args(
    model_name_or_path: str | None,
    config: dict | None,
    quantize: Quantize | None,
    lora: dict | None,
    torch_dtype: TorchDtype | None = None,
) -> dict | None:
    """Check the model-defining arguments; returns ``lora`` with its defaults filled in.

    Exactly one of ``model_name_or_path`` (a local directory, or a Hub repo id ``org/name[@revision]`` whose
    ``config.json`` is fetched or found in the cache: :mod:`lowmem_lightning.hub`) and ``config`` (a dict) must be
    given; ``quantize`` is ``None`` or ``"nf4"``, and ``"nf4"`` needs ``lora`` (4-bit weights are frozen,
    so adapters are what trains). Raises ``ValueError`` naming the argument.
    """
    if (model_name_or_path is None) == (config is None):
        raise ValueError(
            f"Invalid model_name_or_path={model_name_or_path!r}, config={config!r}: give exactly one, a local "
            "checkpoint directory or Hub repo id (org/name), or an architecture dict (e.g. {'hidden_size': 64, ...} "
            "for a Llama)."
        )
    if model_name_or_path is not None:
        _check_model_source(model_name_or_path)
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"Invalid config={config!r}: expected a dict of architecture settings.")
    if config is not None:
        check_config_sizes(config)
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"Invalid quantize={quantize!r}: expected None or 'nf4'.")
    lora = _check_lora(lora)
    if quantize is not None and lora is None:
        raise ValueError(
            f"Invalid quantize={quantize!r} with lora=None: 4-bit weights are frozen, so a quantized model "
            "needs LoRA adapters to train; pass lora={'r': 16, ...} or quantize=None."
        )
    _resolve_dtype(torch_dtype)
    return lora


def _check_model_source(model_name_or_path) -> None:
    """``ValueError`` unless ``model_name_or_path`` is a local directory or a Hub repo id whose ``config.json``
    resolves (:func:`~lowmem_lightning.hub.resolve_pretrained`: downloaded, or found in the cache when offline)."""
    from lowmem_lightning.hub import resolve_pretrained

    if not isinstance(model_name_or_path, (str, Path)) or not str(model_name_or_path):
        raise ValueError(f"Invalid model_name_or_path={model_name_or_path!r}: expected a local model directory or a "
                         "Hugging Face Hub repo id (org/name or org/name@revision).")
    path = resolve_pretrained(model_name_or_path, "model_name_or_path", need="config")
    if not path.is_dir():
        raise ValueError(f"Invalid model_name_or_path={model_name_or_path!r}: {path} is not a directory; expected "
                         "a local model directory (config.json + weights, as written by save_pretrained) or a "
                         "Hugging Face Hub repo id (org/name).")


def make_config(config: dict, vocab_size: int | None = None):
    """A transformers config from an architecture dict: ``model_type`` picks the family (default
    ``"llama"``); a missing ``vocab_size`` becomes ``vocab_size`` (or the byte tokenizer's 259)."""
    from transformers import AutoConfig

    settings = dict(config)
    model_type = settings.pop("model_type", "llama")
    if problem := unknown_model_type_problem(model_type):
        raise ValueError(f"Invalid config={config!r}: it {problem}")
    settings.setdefault("vocab_size", vocab_size or BYTE_VOCAB_SIZE)
    try:
        return AutoConfig.for_model(model_type, **settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid config={config!r}: {err}") from err


def _load_pretrained(model_name_or_path: str, quantize: str | None, dtype: torch.dtype,
                     device: torch.device, host_tables_for: dict | None = None) -> nn.Module:
    """The checkpoint of local directory or Hub repo id ``model_name_or_path`` (its safetensors downloaded first
    when not cached); a model from the Hub is named by its repo id (``config._name_or_path``, as transformers
    does), so a LoRA adapter saved from it names its base model portably. ``host_tables_for`` (the ``lora`` of a
    ``host_embeddings`` build): the embedding tables that LoRA leaves frozen go to host memory before the model goes
    to ``device``."""
    from lowmem_lightning.hub import resolve_pretrained, split_repo_id

    path = resolve_pretrained(model_name_or_path, "model_name_or_path", need="weights")
    if quantize == "nf4":
        from lowmem_lightning.quant import load_pretrained_causal_lm

        model = load_pretrained_causal_lm(str(path), quantize="nf4", torch_dtype=dtype, skip=("lm_head",),
                                          device=device, host_embeddings=host_tables_for is not None,
                                          lora_targets=(host_tables_for or {}).get("target_modules"))
    else:
        from lowmem_lightning.quant.loading import read_model_config

        config = as_causal_decoder(read_model_config(path))
        model = causal_lm_auto_class(config).from_pretrained(
            str(path), config=config, dtype=dtype, local_files_only=True, trust_remote_code=remote_code_trusted(),
            **_dequantized(path))
        if host_tables_for is not None:
            _hold_tables_on_host(model, host_tables_for, device, check_frozen=False)
        cast_keeping_fp32(model, dtype, device)  # the routers transformers loads in fp32 stay so
    repo = split_repo_id(str(model_name_or_path)) if not Path(model_name_or_path).expanduser().exists() else None
    if repo is not None:
        model.name_or_path = model.config._name_or_path = repo[0]
        model.hub_revision = path.name  # the snapshot's commit: an adapter names the base weights it was trained on
    return model


def _hold_tables_on_host(model: nn.Module, lora: dict, device: torch.device, check_frozen: bool = True) -> None:
    """Hold the embedding tables LoRA ``lora`` leaves frozen in host memory
    (:func:`~lowmem_lightning.quant.host_embeddings.hold_embeddings_on_host`), for a model that runs on ``device``."""
    from lowmem_lightning.quant.host_embeddings import hold_embeddings_on_host, host_table_names

    hold_embeddings_on_host(model, host_table_names(model, lora["target_modules"], check_frozen), device)


def _check_host_embeddings(host_embeddings, lora: dict | None, resize_embeddings: bool | int) -> None:
    """``ValueError`` naming ``host_embeddings`` when it is not a bool, or is set where the embeddings train."""
    _check_bool(host_embeddings, "host_embeddings")
    if host_embeddings and lora is None:
        raise ValueError("Invalid host_embeddings=True with lora=None: a full fine-tune trains the embedding tables; "
                         "host_embeddings keeps frozen ones in host memory, for LoRA and QLoRA (set lora, or "
                         "host_embeddings=False).")
    if host_embeddings and resize_embeddings:
        raise ValueError(f"Invalid host_embeddings=True with resize_embeddings={resize_embeddings!r}: the new token "
                         "rows train, so the input embedding stays on the device; pass one of the two.")


def _check_checkpoint_frozen(checkpoint_frozen, lora: dict | None, model_name_or_path) -> None:
    """``ValueError`` naming ``checkpoint_frozen`` when it is not a bool, or is ``False`` where the frozen weights
    cannot be rebuilt from a checkpoint (no ``model_name_or_path``) or are not frozen (no ``lora``)."""
    _check_bool(checkpoint_frozen, "checkpoint_frozen")
    if not checkpoint_frozen and (lora is None or model_name_or_path is None):
        raise ValueError(f"Invalid checkpoint_frozen=False with lora={lora!r}, model_name_or_path="
                         f"{model_name_or_path!r}: checkpoints leave out only a frozen base that is rebuilt from a "
                         "checkpoint, so it needs LoRA (lora) on a pretrained model (model_name_or_path).")


def _dequantized(path: Path) -> dict:
    """``from_pretrained`` options that load a checkpoint stored with MXFP4 experts (gpt-oss's Hub release) or
    fine-grained FP8 weights (DeepSeek-V3, Qwen3-FP8, Ministral 3) decoded to full precision
    (``Mxfp4Config`` / ``FineGrainedFP8Config(dequantize=True)``: trainable, on any device) instead of transformers'
    GPU kernels (inference only); none for other checkpoints."""
    from lowmem_lightning.quant.fp8 import FP8_METHOD
    from lowmem_lightning.quant.loading import read_model_config
    from lowmem_lightning.quant.mxfp4 import MXFP4_METHOD, declared_quant_method

    method = declared_quant_method(read_model_config(path))
    if method not in (MXFP4_METHOD, FP8_METHOD):
        return {}
    from transformers import FineGrainedFP8Config, Mxfp4Config

    config = Mxfp4Config(dequantize=True) if method == MXFP4_METHOD else FineGrainedFP8Config(dequantize=True)
    return {"quantization_config": config}


@torch.no_grad()
def _materialize_quantized(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Give a meta model whose linears are meta ``Linear4bit`` layers real, freshly initialized weights
    on ``device``, one layer at a time: each linear's weight is drawn (the model's own ``_init_weights``:
    normal(0, initializer_range)), quantized and freed before the next, so peak memory is the 4-bit
    model plus one dense layer, never the dense model (a 7B config fits a small GPU this way). Each module is drawn
    by the ``_init_weights`` of the innermost transformers model holding it, as transformers' own initialization
    dispatches (Gemma 3n's text model initializes its per-layer projection scale from its own ``hidden_size``)."""
    from lowmem_lightning.quant import Experts4bit, Linear4bit

    owners = _init_owners(model)
    for module in model.modules():
        init = owners.get(module, model)._init_weights
        if isinstance(module, Experts4bit):
            _materialize_experts(module, device, dtype, model.config.get_text_config().initializer_range)
        elif isinstance(module, Linear4bit):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=device, dtype=dtype)
            init(dense)
            module.quantize_weight_(dense.weight)
            if module.bias is not None:
                module.bias = nn.Parameter(dense.bias.detach(), requires_grad=False)
            del dense
        elif any(t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
            module.to_empty(device=device, recurse=False)
            init(module)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _init_owners(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Each module of ``model`` -> the innermost module holding it (itself included) that has an ``_init_weights``
    (a transformers ``PreTrainedModel``: a causal LM's inner text model, a VLM's language model)."""
    owners = {}
    for owner in model.modules():  # outer before inner: an inner model's modules are taken over by it
        if hasattr(owner, "_init_weights"):
            owners.update(dict.fromkeys(owner.modules(), owner))
    return owners


def _from_config(cfg, quantize: str | None, dtype: torch.dtype, device: torch.device) -> nn.Module:
    if quantize is None:
        with torch.device(device):
            return cast_keeping_fp32(_built(cfg), dtype)
    from lowmem_lightning.quant import quantize_model

    with torch.device("meta"):
        model = cast_keeping_fp32(_built(cfg), dtype)
    model = quantize_model(model, skip=("lm_head",), block_size=64, double_quant=True)
    if device.type == "meta":
        return model
    return _materialize_quantized(model, device, dtype)


def _built(cfg) -> nn.Module:
    """The model of transformers config ``cfg`` (:func:`~lowmem_lightning.multimodal.causal_lm_auto_class`), or a
    ``ValueError`` in a line or two when transformers cannot build it as a causal LM (its own message lists every
    model type it knows)."""
    from lowmem_lightning.quant.loading import _brief

    try:
        return causal_lm_auto_class(cfg).from_config(as_causal_decoder(cfg), trust_remote_code=remote_code_trusted())
    except ValueError as err:
        raise ValueError(f"Invalid config of model_type {getattr(cfg, 'model_type', None)!r}: transformers cannot "
                         f"build it as a causal LM ({_brief(err)}).") from None


def _materialize_experts(experts: nn.Module, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Fill a meta :class:`~lowmem_lightning.quant.Experts4bit` on ``device``: each expert's matrix drawn from
    normal(0, ``std``) (transformers' init of 3-D experts) and quantized before the next; biases zero."""
    experts.to_empty(device=device, recurse=False)
    for param in experts.parameters(recurse=False):
        param.zero_()
    for proj in experts.nf4_shapes:
        _, *shape = experts.layout_shape(proj)
        for expert in range(experts.layout_shape(proj)[0]):
            experts.quantize_expert_(proj, expert, torch.empty(shape, device=device, dtype=dtype).normal_(0, std))


def check_resize_embeddings(resize_embeddings: bool | int) -> None:
    """``ValueError`` naming the value unless ``resize_embeddings`` is ``True``, ``False`` or a row count >= 1."""
    if isinstance(resize_embeddings, bool):
        return
    if not isinstance(resize_embeddings, int) or resize_embeddings < 1:
        raise ValueError(f"Invalid resize_embeddings={resize_embeddings!r}: expected True (grow the embeddings to the "
                         "tokenizer's length), False (keep them), or a number of rows >= 1.")


def _resize_target(resize_embeddings: bool | int, vocab_size: int | None) -> int | None:
    """The number of embedding rows ``resize_embeddings`` asks for (``True``: ``vocab_size``), or ``None``."""
    if resize_embeddings is True:
        return vocab_size
    return resize_embeddings or None


def _embedding_rows(model: nn.Module) -> int:
    """The number of rows of ``model``'s input embeddings (through peft's wrapper of trained token rows)."""
    layer = model.get_input_embeddings()
    return getattr(layer, "original_module", layer).num_embeddings


@torch.no_grad()
def _grow_embeddings(model: nn.Module, rows: int, seen_rows: int | None = None) -> None:
    """Resize ``model``'s input embeddings and output head to ``rows`` rows (transformers'
    ``resize_token_embeddings``: ``config.vocab_size`` follows, a tied head stays tied). Each new row is the mean of
    its layer's trained old rows (:func:`~lowmem_lightning.modules.untrained_tokens.trained_row_mean`: zero or
    near-zero rows and rows at or past ``seen_rows``, the checkpoint tokenizer's length, left out), where untrained
    rows start too: what transformers' ``mean_resizing`` draws around, taken exactly, so every rank and every rebuild
    (resume, export) gets the same rows without sharing a random seed."""
    from lowmem_lightning.modules.untrained_tokens import trained_row_mean

    old = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows, mean_resizing=False)
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    for weight in {id(layer.weight): layer.weight for layer in layers if layer is not None}.values():
        weight[old:] = trained_row_mean(weight[:old], seen_rows).to(weight.dtype)


def _new_token_rows(model: nn.Module, old_rows: int,
                    untrained: Iterable[int] = ()) -> list[int] | dict[str, list[int]] | None:
    """peft's ``trainable_token_indices`` for the ``untrained`` rows and the rows added past ``old_rows``: a list
    (input embedding; a tied head follows it) or ``{embedding name: ids, head name: ids}`` for an untied head;
    ``None`` when there are none."""
    embedding = model.get_input_embeddings()
    ids = [*untrained, *range(old_rows, embedding.num_embeddings)]
    head = model.get_output_embeddings()
    if not ids or head is None or head.weight is embedding.weight:
        return ids or None
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(embedding)]: ids, names[id(head)]: ids}


def build_causal_lm(
    model_name_or_path: str | None = None,
    config: dict | None = None,
    quantize: Quantize | None = None,
    lora: dict | None = None,
    device: str | torch.device | None = None,
    torch_dtype: TorchDtype | None = None,
    vocab_size: int | None = None,
    resize_embeddings: bool | int = False,
    token_ids: Mapping[int, str] | Iterable[int] | None = None,
    row_start_notes: bool = True,
    attn_implementation: AttnImplementation | None = None,
    trust_remote_code: bool = False,
    host_embeddings: bool = False,
) -> nn.Module:
    """Build the causal LM that ``CausalLMModule`` trains, then apply NF4 quantization and LoRA.

    A vision-language checkpoint or config is built whole with its own class
    (:func:`~lowmem_lightning.multimodal.causal_lm_auto_class`), its vision encoder and projector frozen
    (:func:`~lowmem_lightning.multimodal.freeze_outside_language_model`): its language model trains on text.

    Args:
        model_name_or_path: Local checkpoint directory or Hugging Face Hub repo id ``org/name[@revision]``
            (loaded, NF4 shard by shard when quantizing; only its ``config.json`` is read, and fetched, when
            ``device="meta"``).
        config: Architecture dict for a from-scratch model (see :func:`make_config`). With
            ``quantize="nf4"`` the model is built on the meta device and each linear layer is drawn,
            quantized and freed in turn, so the dense model never exists in memory.
        quantize: ``"nf4"``: every ``nn.Linear`` but ``lm_head`` becomes a frozen 4-bit ``Linear4bit``.
        lora: ``{r, alpha, dropout, target_modules, use_dora}``: wrap in a peft model with trainable adapters
            (fp32); ``None`` leaves every weight trainable.
        device: Where to create tensors; ``"meta"`` builds shapes only (no memory, no weights), which
            is what ``lowmem estimate`` uses to count frozen and trainable parameters exactly.
            ``None`` uses the current default device (the Trainer's device inside ``configure_model``).
        torch_dtype: Weight dtype name (``"bfloat16"``, ...); ``None``: ``torch.get_default_dtype()``.
        vocab_size: Used for a ``config`` without ``vocab_size`` (default: the byte tokenizer's 259), and as the
            row count ``resize_embeddings=True`` grows to (the tokenizer's length, added tokens included).
        resize_embeddings: ``True`` (to ``vocab_size``) or a number of rows: a model with fewer rows gets its input
            embeddings and output head grown to that many (tied heads stay tied; never shrunk), each new row the
            mean of the trained old rows (see :func:`_grow_embeddings`), and ``config.vocab_size`` follows. Those rows
            train: with ``lora`` through peft's ``trainable_token_indices`` (one ``new rows x hidden`` fp32 tensor
            per untied layer; the old rows stay frozen); the NF4 quantizer never touches embeddings or ``lm_head``.
        token_ids: Ids the fine-tune meets that a checkpoint may never have trained (the data's special tokens; a
            mapping gives their text for messages). Those whose rows are untrained
            (:func:`~lowmem_lightning.modules.untrained_tokens.untrained_token_ids`: near-zero rows, and ids at or
            past the length of the tokenizer the checkpoint ships, when it ships a ``tokenizer.json``) are, with
            ``resize_embeddings``, set to the mean of the trained rows and train like grown rows; without it, under
            ``lora`` (where they stay frozen), a ``LowMemWarning`` names them and the option. The ids found are the
            model's ``untrained_token_ids`` attribute (``[]`` when none or not asked for). On the meta device (no
            weights to check) a list (not a mapping: the ids a fit recorded) is taken as found, so ``lowmem
            estimate`` counts those rows.
        row_start_notes: Say (``rank_zero_info``, an informational line) where grown or untrained token rows start
            and that they train. ``False`` for a build whose weights a checkpoint then replaces (a resume, an
            evaluation or export of a checkpoint): there the rows are the checkpoint's, and the notes would be
            untrue.
        attn_implementation: transformers' attention implementation (:data:`AttnImplementation`), set on the model
            before LoRA wraps it; ``None`` keeps transformers' default (``sdpa`` where the model supports it).
        trust_remote_code: Run the code a checkpoint ships for a ``model_type`` transformers does not have (its
            ``config.json``'s ``auto_map``), as transformers' ``trust_remote_code=True``; ``False`` refuses such a
            checkpoint at once, naming this option (transformers itself would ask on the terminal).
        host_embeddings: With ``lora``: hold the embedding tables LoRA leaves frozen and no output head shares (an
            untied model's input embedding, Gemma 3n's / Gemma 4's per-layer embeddings) in host memory, each step
            gathering only its batch's rows onto the device
            (:class:`~lowmem_lightning.quant.host_embeddings.HostEmbedding`); a checkpoint's tables are read
            straight into host memory. Refused without ``lora`` and with ``resize_embeddings`` (those rows train).
    """
    _check_bool(trust_remote_code, "trust_remote_code")
    try:
        with trusting_remote_code(trust_remote_code):
            return _build_causal_lm(model_name_or_path, config, quantize, lora, device, torch_dtype, vocab_size,
                                    resize_embeddings, token_ids, row_start_notes, attn_implementation,
                                    host_embeddings)
    except ImportError as err:
        raise ValueError(_missing_package(model_name_or_path, config, err)) from err


def _missing_package(model_name_or_path, config, err: ImportError) -> str:
    """The refusal of a model transformers cannot build without a package this environment lacks (Gemma 3n's vision
    tower needs ``timm``): transformers' own words, on one line, naming the argument."""
    said = " ".join(str(err).split()).split(" Please note")[0]
    what = f"model_name_or_path={model_name_or_path!r}" if model_name_or_path is not None else "config"
    return f"Invalid {what}: transformers cannot build this model in this environment: {said}"


def _check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}: expected True or False.")


def _build_causal_lm(model_name_or_path, config, quantize, lora, device, torch_dtype, vocab_size, resize_embeddings,
                     token_ids, row_start_notes, attn_implementation, host_embeddings=False) -> nn.Module:
    """:func:`build_causal_lm` with the remote-code setting in force."""
    lora = validate_model_args(model_name_or_path, config, quantize, lora, torch_dtype)
    check_attn_implementation(attn_implementation, installed=False)
    check_resize_embeddings(resize_embeddings)
    _check_host_embeddings(host_embeddings, lora, resize_embeddings)
    target = _resize_target(resize_embeddings, vocab_size)
    dtype = _resolve_dtype(torch_dtype)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if model_name_or_path is not None and device.type != "meta":
        # from_pretrained hands the model over in eval mode, and Lightning keeps each module's mode at fit start:
        # dropout would be off and transformers' gradient checkpointing (active only while training) silently
        # skipped, so activations would take their full memory.
        model = _load_pretrained(model_name_or_path, quantize, dtype, device,
                                 lora if host_embeddings else None).train()
        old_rows = _embedding_rows(model)
        from lowmem_lightning.modules.untrained_tokens import checkpoint_tokenizer_length

        seen_rows = checkpoint_tokenizer_length(model_name_or_path) if resize_embeddings or token_ids else None
        untrained = _treat_untrained_rows(model, token_ids, bool(resize_embeddings), lora is not None, seen_rows,
                                          row_start_notes)
        if target is not None and target > old_rows:
            _grow_embeddings(model, target, seen_rows)
    else:
        if config is not None:
            cfg = make_config(config, vocab_size)
        else:  # config.json only, checked as loading checks it (a bad file is named)
            from lowmem_lightning.quant.loading import read_model_config

            cfg = read_model_config(model_name_or_path)
        text = text_config(cfg)
        old_rows = text.vocab_size
        if target is not None and target > old_rows:
            text.vocab_size = target  # the shapes _grow_embeddings gives a loaded model
        model = _from_config(cfg, quantize, dtype, device)
        untrained = _recorded_untrained(model_name_or_path, token_ids, resize_embeddings, old_rows)
    _set_attention(model, attn_implementation, device)
    freeze_outside_language_model(model)
    added = _new_token_rows(model, old_rows, untrained)
    model.untrained_token_ids = untrained
    if old_rows < _embedding_rows(model) and device.type != "meta" and row_start_notes:
        rows = _embedding_rows(model)
        how = "they train through peft's trainable_token_indices, the old rows stay frozen" if lora else "they train"
        rank_zero_info(f"resize_embeddings: the input embeddings and output head grew from {old_rows} to {rows} "
                       f"rows for the tokenizer's added tokens (each new row the mean of the trained old rows; {how}).")
    if lora is not None:
        from lowmem_lightning.quant import add_lora

        revision = getattr(model, "hub_revision", None)
        on_meta = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
        with on_meta:  # a meta build's adapters are shapes too (not allocated and drawn on the host)
            model = add_lora(model, lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"],
                             adapter_dtype=torch.float32, trainable_token_indices=added, use_dora=lora["use_dora"])
        if revision is not None:  # adapter_config.json's revision: AutoPeftModel loads that commit of the base
            for peft_config in model.peft_config.values():
                peft_config.revision = revision
    if host_embeddings:  # the tables still on the device (a model built from a config; a loaded one's are held)
        _hold_tables_on_host(model, lora, device)
        if device.type != "meta":
            _say_what_is_held(model, row_start_notes)
    return model


def _say_what_is_held(model: nn.Module, note: bool) -> None:
    """With ``note`` (a fit's own build), one line naming the embedding tables ``host_embeddings`` holds in host memory
    and their bytes; a ``LowMemWarning`` when the model has none it could hold (a tied input embedding, no per-layer
    table)."""
    from lowmem_lightning.quant.host_embeddings import host_table_bytes, host_tables

    held = host_tables(model)
    if not held:
        rank_zero_warn("host_embeddings=True: this model has no frozen embedding table that no output head shares "
                       "(its input embedding is tied to the head, or trains), so nothing was moved to host memory.",
                       category=LowMemWarning)
        return
    if not note:
        return
    names = ", ".join(name.removeprefix("base_model.model.") for name in held)
    total = host_table_bytes(model)
    size = f"{total / 1e9:.3f} GB" if total >= 10**8 else f"{total / 2**20:.2f} MiB"
    rank_zero_info(f"host_embeddings: {size} of frozen embedding tables in host memory ({names}); each step gathers "
                   "its batch's rows.")


def _treat_untrained_rows(model: nn.Module, token_ids: Mapping[int, str] | Iterable[int] | None, resize: bool,
                          lora: bool, seen_rows: int | None = None, note: bool = True) -> list[int]:
    """The ids of ``token_ids`` whose rows ``model`` (a loaded checkpoint) never trained (near zero, or at or past
    ``seen_rows``, the checkpoint tokenizer's length): with ``resize`` they are set to the mean of the trained rows
    and returned (they train; with ``note``, an informational line says so); otherwise, under ``lora``, a
    ``LowMemWarning`` names them and ``[]`` is returned (nothing changes; a full fine-tune trains every row anyway)."""
    from lowmem_lightning.modules.untrained_tokens import (
        describe_tokens,
        initialize_untrained_rows,
        untrained_token_ids,
    )

    if not token_ids or not (resize or lora):
        return []
    ids = untrained_token_ids(model, token_ids, seen_rows)
    if not ids:
        return []
    names = describe_tokens(ids, token_ids if isinstance(token_ids, Mapping) else None)
    past = "" if seen_rows is None or ids[-1] < seen_rows else f", or past the {seen_rows} ids of its own tokenizer"
    if not resize:
        warnings.warn(f"{len(ids)} token(s) the data uses have untrained (zero or near-zero{past}) rows in the "
                      f"checkpoint's input embeddings or output head: {names}. Under LoRA those rows stay frozen, so "
                      "the model cannot learn to read or emit them (huge losses, replies that never stop). Pass "
                      "resize_embeddings=True (--model.resize_embeddings true) to start them at the mean of the "
                      "trained rows and train them.", LowMemWarning, stacklevel=3)
        return []
    initialize_untrained_rows(model, ids, seen_rows)
    how = "they train through peft's trainable_token_indices, the other rows stay frozen" if lora else "they train"
    if note:
        rank_zero_info(f"resize_embeddings: {len(ids)} token(s) the data uses had untrained rows in the checkpoint "
                       f"({names}); each row set to the mean of the trained rows ({how}).")
    return ids


def _recorded_untrained(model_name_or_path: str | None, token_ids, resize_embeddings: bool | int,
                        old_rows: int) -> list[int]:
    """For a checkpoint built on the meta device with ``resize_embeddings``: the ids of a recorded list
    ``token_ids`` inside its ``old_rows`` rows, taken as untrained unchecked; ``[]`` otherwise."""
    if model_name_or_path is None or not resize_embeddings or token_ids is None or isinstance(token_ids, Mapping):
        return []
    return sorted({int(i) for i in token_ids if int(i) < old_rows})


def _check_untrained_token_ids(untrained_token_ids, resize_embeddings: bool | int) -> None:
    """``ValueError`` naming the value unless ``untrained_token_ids`` is ``None`` or a list of token ids >= 0, given
    with ``resize_embeddings`` (which is what trains those rows) when not empty."""
    if untrained_token_ids is None:
        return
    if not isinstance(untrained_token_ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in untrained_token_ids):
        raise ValueError(f"Invalid untrained_token_ids={untrained_token_ids!r}: expected None (found from the data) "
                         "or a list of token ids >= 0.")
    if untrained_token_ids and not resize_embeddings:
        raise ValueError(f"Invalid untrained_token_ids={untrained_token_ids!r} with resize_embeddings="
                         f"{resize_embeddings!r}: those rows train only with resize_embeddings=True "
                         "(--model.resize_embeddings true).")


def _wraps_in_ddp(trainer) -> bool:
    """Whether ``trainer``'s strategy wraps the module in ``DistributedDataParallel`` (DDP and its spawn / fork
    variants; not DeepSpeed, which subclasses it)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    strategy = getattr(trainer, "strategy", None)
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)


def _show_callbacks_the_model(module: L.LightningModule) -> None:
    """Callbacks that look at the module in their ``setup``, before ``configure_model`` builds the model, saw no
    weights. ``StochasticWeightAveraging`` copied the module: its average would average nothing and, at the end,
    transfer nothing (the fit would end on the last weights, silently); each such copy gets a copy of the model
    just built, made on the device SWA keeps its average on (:func:`_copy_on`). ``ModelPruning`` collected no layer
    to prune (``torch.cat`` of an empty list at its first pruning); its ``setup`` runs again, now on the model."""
    trainer = module._trainer
    for callback in getattr(trainer, "callbacks", None) or ():
        if isinstance(callback, StochasticWeightAveraging):
            average = getattr(callback, "_average_model", None)
            if isinstance(average, type(module)) and getattr(average, "model", None) is None:
                average.model = _copy_on(module.model, getattr(callback, "_device", None))
        elif isinstance(callback, ModelPruning) and getattr(callback, "_parameters_to_prune", None) == []:
            callback.setup(trainer, module, "fit")


def _copy_on(model: nn.Module, device) -> nn.Module:
    """``copy.deepcopy(model)`` with each param and buffer made directly on ``device`` (``None``: where it is).
    ``StochasticWeightAveraging`` keeps its average there (the CPU by default) and moves it only at its first epoch: a
    copy of a model built on the GPU, made there, held a second model (a QLoRA's whole NF4 base) on the GPU until
    then. Tied tensors stay tied; a tensor of another class than ``Tensor`` / ``Parameter`` is deep-copied as it is."""
    if device is None:
        return copy.deepcopy(model)
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if type(tensor) in (torch.Tensor, nn.Parameter):
            clone = tensor.detach().to(device, copy=True)
            memo[id(tensor)] = nn.Parameter(clone, tensor.requires_grad) if type(tensor) is nn.Parameter else clone
    return copy.deepcopy(model, memo)


@contextlib.contextmanager
def _build_warnings_on_rank_zero():
    """Our warnings while the model is built (the LoRA target names it resolved, checkpoint tensors it skipped) and
    transformers' (its logger's warnings, such as a checkpoint's load report, its Python warnings and its "Loading
    weights" progress bar) are shown by rank 0 only (``rank_zero_only.rank``, as ``rank_zero_warn``): every rank
    builds the same model from the same files, so under ``ddp_spawn`` / ``ddp_fork`` / ``ddp`` each would say it
    again. Errors still come from every rank (raised, or logged by transformers at ``ERROR``)."""
    if rank_zero_only.rank == 0:
        yield
        return
    with warnings.catch_warnings(), _transformers_quiet():
        warnings.simplefilter("ignore", LowMemWarning)
        warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
        yield


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' logger at ``ERROR`` (unless set higher) and its progress bars off; both as before afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(max(verbosity, hf_logging.ERROR))
    try:
        with _no_transformers_progress_bar():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _enable_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing (non-reentrant, so frozen embeddings need no input grads)."""
    from lowmem_lightning.quant.convert import enable_activation_checkpointing

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable_activation_checkpointing(base, {"use_reentrant": False})
    base.config.use_cache = False


class CausalLMModule(LowMemModule):
    """Train a Hugging Face causal LM: full fine-tune, LoRA, or QLoRA (NF4 base + LoRA), by arguments.

    The model is built in ``configure_model`` (under the Trainer's device and precision context), so
    constructing the module is cheap and validates everything first. Logs ``train_loss`` (per step,
    progress bar), ``val_loss`` (mean over target tokens) and ``val_ppl`` (``exp(val_loss)``), with
    torchmetrics aggregating across batches and devices. Batches are dicts with ``input_ids``,
    ``labels`` (-100 = no loss) and ``attention_mask`` or, for packed documents kept apart, ``position_ids``
    (restarting at 0 at each document), as ``TextDataModule`` makes them; a data module of your own may leave
    ``labels`` out (the tokens are then their own labels, padding excepted: :func:`model_inputs`).

    Args:
        model_name_or_path: Local directory of a Hugging Face causal LM (config.json + safetensors), or its
            Hub repo id ``org/name`` / ``org/name@revision`` (downloaded into the HF cache, or found there when
            ``HF_HUB_OFFLINE=1``; kept as given in the hyperparameters). Exactly one of this and ``config``.
        config: Architecture dict for a from-scratch model, e.g. ``{"hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}`` (a Llama;
            add ``model_type`` for another family). Without ``vocab_size`` it takes the datamodule's
            (259 for the byte tokenizer).
        quantize: ``"nf4"`` freezes every linear layer but ``lm_head`` as 4-bit NormalFloat (QLoRA);
            needs ``lora``. ``None`` keeps full-precision weights.
        lora: LoRA adapters ``{"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": [...], "use_dora": false}``
            (missing keys take these defaults; targets default to the seven Llama projections; ``use_dora``: DoRA,
            QDoRA on a 4-bit base). ``None`` trains every weight (full fine-tune).
        gradient_checkpointing: Recompute decoder-layer activations in backward (less memory, ~30%
            more compute).
        torch_dtype: Weight dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` takes the
            default dtype (float32, or the Trainer's with ``precision="bf16-true"``). LoRA adapters are
            created in float32.
        save_dir: Directory to write when training ends (before any callback's end-of-fit work, and
            even when a callback fails after training finished): the LoRA adapter (``save_pretrained``), the
            merged model when ``save_merged``, or the full model without LoRA; ``None`` writes nothing.
        save_merged: With LoRA, merge the adapters into full-precision weights and save that model
            instead of the adapter (the module keeps the merged model afterwards).
        resize_embeddings: ``True``: when the datamodule's tokenizer has more ids than the checkpoint embeds
            (special tokens added, e.g. ChatML's ``<|im_start|>`` / ``<|im_end|>`` on a base model), grow the input
            embeddings and output head to the tokenizer's length, each new row the mean of the trained old rows; the
            new rows train (with LoRA / QLoRA through peft's ``trainable_token_indices``, the old rows frozen). The row
            count is recorded in the hyperparameters (an int here), so resuming and ``load_from_checkpoint``
            rebuild the same shapes. ``False`` (default): such a tokenizer is refused, naming this option.
            With ``True`` (or a count) the checkpoint's untrained rows of the special tokens the data uses (a Llama-3
            base's ``<|eot_id|>``, tokens added into Qwen2's padding rows) start at the mean of the trained rows and
            train too; without it, under LoRA, a ``LowMemWarning`` names them. See :func:`build_causal_lm`.
        untrained_token_ids: The token ids whose untrained checkpoint rows ``resize_embeddings`` trains. ``None``
            (default): found when the model is built, among the data module's special tokens that occur in its data
            (``special_tokens_in_data()``), and recorded here as a list (in the checkpoint and the run's logged
            ``hparams.yaml``), so resuming and ``load_from_checkpoint`` rebuild the same trainable rows. A list: these
            ids are checked instead (needs ``resize_embeddings``).
        predict_new_tokens: Tokens :meth:`predict_step` (``lowmem predict``) generates per prompt at most (greedy),
            >= 1; it may differ from the checkpoint's (``--model.predict_new_tokens 256`` at predict time).
        optimizer, lr, weight_decay, optimizer_kwargs, warmup_steps, scheduler, min_lr_ratio, fp32_state: see
            ``LowMemModule``.
        attn_implementation: transformers' attention: ``"sdpa"``, ``"eager"``, ``"flex_attention"`` or
            ``"flash_attention_2"`` / ``_3`` / ``_4`` (needs the flash-attn package and a CUDA GPU; refused here
            otherwise, before the run starts). Packed documents kept apart run flattened into one row under flash
            attention (no ``seq x seq`` mask). ``None`` (default): transformers' choice, ``sdpa`` where the model
            supports it (Gemma 2: ``eager``).
        trust_remote_code: Run the code a checkpoint ships of its own (``auto_map`` for a ``model_type``
            transformers does not have: InternLM2, MiniCPM, ...), as transformers' ``trust_remote_code=True``; read
            it first. ``False`` (default) refuses such a checkpoint at once, naming this option.
        host_embeddings: With ``lora``: keep the embedding tables LoRA leaves frozen and no output head shares in
            host memory (an untied model's input embedding, ``vocab x hidden``; Gemma 3n's and Gemma 4's per-layer
            embeddings, ``vocab x layers x 256``: several GB), each step gathering only its batch's rows onto the
            GPU (see :func:`build_causal_lm`); ``lowmem estimate`` counts them as host memory. Checkpoints and exports
            are the same files. Refused without ``lora`` and with ``resize_embeddings``.
        checkpoint_frozen: Whether Lightning checkpoints hold the frozen weights too (default). ``False``, for LoRA /
            QLoRA on ``model_name_or_path``: they hold what trains (adapters, trained token rows) and any frozen
            tensor changed since the build; the frozen base (a 7B's NF4 codes: 3.9 GB a save) is rebuilt from
            ``model_name_or_path`` at resume, ``lowmem export`` and ``load_from_checkpoint``, checked against
            checksums the checkpoint records (another base is refused, naming a tensor that differs;
            :mod:`~lowmem_lightning.frozen_base`). Not under sharded strategies (FSDP2: the checkpoint stays
            whole).
    """

    rows_from_checkpoint: bool = False
    """Whether a checkpoint's weights replace the model this module builds (a resume, an evaluation or export of a
    checkpoint; the ``lowmem`` command sets it once the checkpoint is known): the build then leaves out its notes on
    where grown or untrained token rows start, which would be untrue. An attribute of the module, so it reaches the
    processes ``ddp_spawn`` starts with the module."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict | None = None,
        quantize: Quantize | None = None,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        torch_dtype: TorchDtype | None = None,
        save_dir: str | None = None,
        save_merged: bool = False,
        resize_embeddings: bool | int = False,
        untrained_token_ids: list[int] | None = None,
        predict_new_tokens: int = 32,
        optimizer: str = "adamw_8bit",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        optimizer_kwargs: dict | None = None,
        warmup_steps: int = 0,
        scheduler: Scheduler | None = None,
        min_lr_ratio: float = 0.1,
        fp32_state: str | list[str] | None = None,
        attn_implementation: AttnImplementation | None = None,
        trust_remote_code: bool = False,
        host_embeddings: bool = False,
        checkpoint_frozen: bool = True,
    ) -> None:
        super().__init__(
            optimizer=optimizer, lr=lr, weight_decay=weight_decay, optimizer_kwargs=optimizer_kwargs,
            warmup_steps=warmup_steps, scheduler=scheduler, min_lr_ratio=min_lr_ratio, fp32_state=fp32_state,
        )
        self.lora = validate_model_args(model_name_or_path, config, quantize, lora, torch_dtype)
        _check_bool(gradient_checkpointing, "gradient_checkpointing")
        if save_dir is not None and not isinstance(save_dir, (str, Path)):
            raise ValueError(f"Invalid save_dir={save_dir!r}: expected a directory path or None.")
        if not isinstance(save_merged, bool) or (save_merged and self.lora is None):
            raise ValueError(f"Invalid save_merged={save_merged!r}: expected True or False, and True only with lora.")
        check_resize_embeddings(resize_embeddings)
        _check_untrained_token_ids(untrained_token_ids, resize_embeddings)
        check_attn_implementation(attn_implementation)
        _check_bool(trust_remote_code, "trust_remote_code")
        _check_host_embeddings(host_embeddings, self.lora, resize_embeddings)
        _check_checkpoint_frozen(checkpoint_frozen, self.lora, model_name_or_path)
        if isinstance(predict_new_tokens, bool) or not isinstance(predict_new_tokens, int) or predict_new_tokens < 1:
            raise ValueError(f"Invalid predict_new_tokens={predict_new_tokens!r}: expected an integer >= 1 (tokens "
                             "lowmem predict generates per prompt at most).")
        self.save_hyperparameters()
        self.predict_new_tokens = predict_new_tokens
        self.model: nn.Module | None = None
        # nan_strategy=nan: a batch whose loss is NaN makes val_loss NaN (torchmetrics' default drops it with a warning,
        # so a mean over the other batches would pass for the model's loss). Not 'disable': torchmetrics then drops the
        # weights (every batch counts 1), and val_loss would no longer be the per-token mean.
        self.val_loss = torchmetrics.MeanMetric(nan_strategy=float("nan"))
        self._saved = False  # the model of this fit was written (save_model runs once per fit)
        self._frozen_baseline: dict | None = None  # digests of the frozen tensors as built (checkpoint_frozen=False)

    # -- model -------------------------------------------------------------------------------------

    def _datamodule(self):
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _datamodule_vocab(self) -> int | None:
        return getattr(self._datamodule(), "vocab_size", None)

    def _token_ids_to_check(self) -> dict[int, str] | list[int] | None:
        """The ids whose checkpoint rows the build checks for untrained ones: the recorded ``untrained_token_ids``,
        else the data module's ``special_tokens_in_data()`` (id -> text), else ``None``. Asked of the data module
        only when the answer is used: a pretrained model with ``resize_embeddings``, or with ``lora`` in a fit (for
        the warning; an export or evaluation of the run would only repeat it)."""
        hp = self.hparams
        if hp.get("untrained_token_ids") is not None:
            return list(hp.untrained_token_ids)
        special = getattr(self._datamodule(), "special_tokens_in_data", None)
        fitting = getattr(getattr(self._trainer, "state", None), "fn", None) == "fit"
        if hp.model_name_or_path is None or not (hp.resize_embeddings or (self.lora is not None and fitting)) or (
                not callable(special)):
            return None
        return dict(special())

    def _planned_config(self, data_vocab: int | None):
        """The transformers config of the model to build: ``config`` made into one, or the checkpoint's
        ``config.json`` (no weights read)."""
        hp = self.hparams
        if hp.config is not None:
            return make_config(hp.config, data_vocab)
        from lowmem_lightning.quant.loading import read_model_config

        return read_model_config(hp.model_name_or_path)

    def _planned_rows(self, data_vocab: int | None, cfg) -> int | None:
        """The embedding rows the model of config ``cfg`` will have after ``resize_embeddings``; ``None`` when the
        config does not say."""
        hp = self.hparams
        rows = getattr(text_config(cfg), "vocab_size", None)
        target = _resize_target(hp.resize_embeddings, data_vocab)
        return max(rows, target) if rows is not None and target is not None else rows

    def _check_vocabulary(self, data_vocab: int | None, rows: int | None) -> None:
        """``ValueError`` when the datamodule's tokenizer has more ids than the model's ``rows`` embeddings: the fix
        named is ``resize_embeddings`` for a checkpoint, ``config['vocab_size']`` for a model built from a config."""
        if data_vocab is None or rows is None or data_vocab <= rows:
            return
        hp = self.hparams
        if hp.model_name_or_path is None:
            fix = f"; set config['vocab_size'] >= {data_vocab} (or leave it out to take the tokenizer's)"
        else:
            fix = (f" (resize_embeddings={hp.resize_embeddings!r}); pass resize_embeddings=True "
                   f"(--model.resize_embeddings true) to grow the embeddings and output head to "
                   f"{data_vocab} rows for the tokens the tokenizer added (they train, with LoRA too)")
        raise ValueError(f"Vocabulary mismatch: the datamodule's tokenizer has {data_vocab} token ids but the model "
                         f"embeds only {rows}{fix}, or use the tokenizer the checkpoint was trained with.")

    def _check_positions(self, cfg) -> None:
        """``ValueError`` naming ``seq_len`` when the data module's blocks give the model of config ``cfg`` position
        ids past its learned position table; a ``LowMemWarning`` when they go past the positions a pretrained RoPE
        checkpoint saw (:func:`~lowmem_lightning.modules.positions.position_problem`). Nothing without a data
        module that says its positions (``max_position_id``)."""
        from lowmem_lightning.modules.positions import position_limit, position_problem

        data = self._datamodule()
        ask, seq_len = getattr(data, "max_position_id", None), getattr(data, "seq_len", None)
        limit = position_limit(cfg)
        if not callable(ask) or limit is None or isinstance(seq_len, int) and seq_len <= limit:
            return  # no position of a seq_len-token block can pass the limit: the blocks are not read
        needed = ask()
        if needed is None:
            return
        seq_len = seq_len if isinstance(seq_len, int) else needed + 1
        error, warning = position_problem(cfg, needed, seq_len, pretrained=self.hparams.model_name_or_path is not None)
        if error:
            raise ValueError(error)
        if warning:
            rank_zero_warn(warning, category=LowMemWarning)

    def _check_packed_documents(self, cfg, model: nn.Module | None = None) -> None:
        """``ValueError`` when the data module keeps packed documents apart (``isolate_documents``) and the model of
        config ``cfg`` (``model``, once built) has layers that would carry state across them
        (:func:`~lowmem_lightning.modules.packed_attention.packed_documents_problem`): said before any weight is read
        when the config lists them, else right after the build, instead of at the first step."""
        from lowmem_lightning.modules.packed_attention import packed_documents_problem

        if not getattr(self._datamodule(), "isolate_documents", False):
            return
        problem = packed_documents_problem(cfg, model)
        if problem:
            raise ValueError(problem)

    def _resolved_hparams(self, token_ids, data_vocab: int | None, rows: int) -> dict:
        """What the build resolved, to record so that ``load_from_checkpoint`` (no datamodule) rebuilds the same
        model: the ids whose untrained rows train (``untrained_token_ids``, when ``resize_embeddings`` checked
        ``token_ids``), the embedding ``rows`` ``resize_embeddings=True`` grew to, and a ``config``'s vocabulary."""
        hp, resolved = self.hparams, {}
        if hp.resize_embeddings and token_ids is not None:  # rebuilt without the data: the same rows train
            resolved["untrained_token_ids"] = list(self.model.untrained_token_ids)
        if hp.config is not None and "vocab_size" not in hp.config:
            resolved["config"] = {**hp.config, "vocab_size": self.model.config.vocab_size}
        if hp.resize_embeddings is True and data_vocab is not None:
            resolved["resize_embeddings"] = rows
        return resolved

    def _record_resolved(self, resolved: dict) -> None:
        """Put ``resolved`` init args in the hyperparameters the checkpoint saves and in those the loggers write
        (``hparams.yaml``: Lightning logs ``hparams_initial`` after ``configure_model``), so both say the same."""
        self.hparams.update(resolved)
        self._hparams_initial.update(copy.deepcopy(resolved))

    def configure_model(self) -> None:
        """Build the model (once) on the Trainer's device; check the data's vocabulary fits it."""
        if self.model is not None:
            return
        hp = self.hparams
        with trusting_remote_code(hp.get("trust_remote_code", False)):
            self._build_model()

    def _build_model(self) -> None:
        """:meth:`configure_model`'s build, with the remote-code setting in force."""
        hp = self.hparams
        data_vocab = self._datamodule_vocab()
        cfg = self._planned_config(data_vocab)
        self._check_vocabulary(data_vocab, self._planned_rows(data_vocab, cfg))  # before any weight is read
        self._check_positions(cfg)
        self._check_packed_documents(cfg)
        token_ids = self._token_ids_to_check()
        with _build_warnings_on_rank_zero():
            self.model = build_causal_lm(hp.model_name_or_path, hp.config, hp.quantize, self.lora,
                                         torch_dtype=hp.torch_dtype, vocab_size=data_vocab,
                                         resize_embeddings=hp.resize_embeddings, token_ids=token_ids,
                                         row_start_notes=not self.rows_from_checkpoint,
                                         attn_implementation=hp.get("attn_implementation"),
                                         trust_remote_code=hp.get("trust_remote_code", False),
                                         host_embeddings=hp.get("host_embeddings", False))
        keep_rotary_fp32(self.model)  # the builders cast the whole model, rotary frequencies too
        self._check_packed_documents(self.model.config, self.model)
        rows = _embedding_rows(self.model)
        self._record_resolved(self._resolved_hparams(token_ids, data_vocab, rows))
        self._check_vocabulary(data_vocab, rows)
        if hp.gradient_checkpointing:
            _enable_checkpointing(self.model)
        if not hp.get("checkpoint_frozen", True):
            from lowmem_lightning.frozen_base import tensor_digests

            trainable = self._trainable_keys()
            self._frozen_baseline = tensor_digests({k: v for k, v in self.state_dict().items() if k not in trainable})
        if hp.quantize == "nf4" and _wraps_in_ddp(self._trainer):
            from lowmem_lightning.quant import ddp_skip_nf4_buffers

            ddp_skip_nf4_buffers(self)  # the frozen 4-bit base would otherwise be broadcast at every step
        _show_callbacks_the_model(self)

    def _trainable_keys(self) -> set[str]:
        """The state dict keys of the parameters that train now."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With ``checkpoint_frozen=False``, leave out of the checkpoint the frozen tensors unchanged since the build,
        recording their checksums (:func:`~lowmem_lightning.frozen_base.drop_unchanged`): out of its
        ``state_dict``, out of the training weights a weight-averaging callback moved to ``current_model_state``, and
        out of ``StochasticWeightAveraging``'s average (:func:`~lowmem_lightning.frozen_base.model_states`)."""
        super().on_save_checkpoint(checkpoint)
        if self._frozen_baseline is None or _is_sharded(self.model):
            return
        from lowmem_lightning.frozen_base import FROZEN_BASE_KEY, drop_unchanged, model_states

        trainable, dropped, seen = self._trainable_keys(), {}, {}
        for container, key in model_states(checkpoint):
            dropped.update(drop_unchanged(container[key], trainable, self._frozen_baseline, seen))
        checkpoint[FROZEN_BASE_KEY] = {"model_name_or_path": str(self.hparams.model_name_or_path),
                                       "tensors": {k: list(d) for k, d in dropped.items()}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint that left out the frozen base gets it back from the model this run built, checked against its
        checksums (:meth:`with_frozen_base`), before Lightning loads it."""
        from lowmem_lightning.frozen_base import model_states

        super().on_load_checkpoint(checkpoint)
        checked: set[str] = set()  # the base is read once, however many state dicts the checkpoint holds
        for container, key in model_states(checkpoint):  # none in a sharded (FSDP) load: read apart
            container[key] = self.with_frozen_base(container[key], checkpoint, checked)

    def with_frozen_base(self, state: dict, checkpoint: dict, checked: set[str] | None = None) -> dict:
        """``state`` (a state dict of ``checkpoint``) with the frozen tensors the checkpoint left out
        (``checkpoint_frozen=False``) taken from this module's model (built first if need be); ``ValueError`` when
        they differ from those it trained on. ``state`` itself for a whole checkpoint. ``checked``: the names an
        earlier state dict of the same checkpoint checked already (:func:`~lowmem_lightning.frozen_base.differing`)."""
        from lowmem_lightning.frozen_base import FROZEN_BASE_KEY, restore_dropped

        record = checkpoint.get(FROZEN_BASE_KEY)
        if record is None:
            return state
        if self.model is None:
            self.configure_model()
        path = self.hparams.model_name_or_path

        def refusal(differ: list[str], left_out: int) -> str:
            return (f"Invalid checkpoint: it holds the trained weights only (checkpoint_frozen=False), and the frozen "
                    f"base this run built from model_name_or_path={path!r} is not the one it trained on (from "
                    f"{record.get('model_name_or_path')!r}): {len(differ)} of its {left_out} frozen tensors differ, "
                    f"e.g. {differ[0]!r}. Resume, export or load it with the base checkpoint it was trained on.")

        return restore_dropped(state, record, self.state_dict(), refusal, checked)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """The Hugging Face model's output (``.loss`` when ``labels`` are given, ``.logits``
        ``[batch, seq_len, vocab]``), without a KV cache. ``position_ids`` without ``attention_mask`` (packed
        documents, ``TextDataModule(isolate_documents=True)``) keeps each document of a block apart
        (:func:`~lowmem_lightning.modules.packed_attention.packed_call`: ``ValueError`` for an attention
        implementation that would not)."""
        if position_ids is not None and attention_mask is None:
            from lowmem_lightning.modules.packed_attention import packed_call

            return packed_call(self.model, input_ids, labels, position_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          position_ids=position_ids, use_cache=False)

    # -- steps -------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean cross-entropy over the batch's target tokens; logged as ``train_loss``."""
        batch = model_inputs(batch, _forward_keys(type(self)))
        loss = self(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the loss weighted by target tokens, so ``val_loss`` is the per-token mean."""
        batch = model_inputs(batch, _forward_keys(type(self)))
        loss = self(**batch).loss
        n_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if n_targets > 0:
            self.val_loss.update(loss.detach().float(), weight=n_targets.float())

    def on_validation_epoch_end(self) -> None:
        """Log ``val_loss`` and ``val_ppl = exp(val_loss)`` for the epoch, then reset."""
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()  # torchmetrics has reduced it over the ranks already: the same on each
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)  # sync_dist: says so to Lightning (no DDP warning)
        self.log("val_ppl", torch.exp(loss), sync_dist=True)
        self.val_loss.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """As :meth:`validation_step` (per-token mean loss over the test set, ``lowmem test``)."""
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        """Log ``test_loss`` and ``test_ppl = exp(test_loss)`` (per target token), then reset."""
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()  # reduced over the ranks (see on_validation_epoch_end)
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_ppl", torch.exp(loss), sync_dist=True)
        self.val_loss.reset()

    predict_new_tokens: int = 32
    """Tokens :meth:`predict_step` generates per prompt at most (greedy); the constructor's ``predict_new_tokens``."""

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy generation for each prompt of the batch (``input_ids``/``attention_mask``, left-padded, e.g. from
        ``TextDataModule.predict_dataloader``), decoded with the data module's tokenizer (lists of token ids when
        there is none); ``lowmem predict`` prints them. A batch with ``reference`` (held-out instruction or chat
        records) gives ``{"prompt", "generated", "reference"}`` per row: the reply is cut before the first eos or
        data-module ``predict_stop_sequences`` entry (the chat end-of-turn marker) and decoded without special
        tokens. Other batches give ``{"prompt", "continuation"}``: ``predict_new_tokens`` tokens, as generated."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        datamodule = getattr(self._trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        decode = tokenizer.decode if tokenizer is not None else (lambda row: row)
        eos = getattr(tokenizer, "eos_token_id", None)  # the data's, not the config default (Llama's id 2)
        if "reference" not in batch:
            out = self._generate(ids, mask, eos=eos)
            return [{"prompt": decode(p.tolist()), "continuation": decode(c.tolist())}
                    for p, c in zip(ids, out[:, ids.shape[1]:])]
        stops = [list(s) for s in getattr(datamodule, "predict_stop_sequences", [])]
        stops += [[eos]] if eos is not None and [eos] not in stops else []
        out = self._generate(ids, mask, StopSequences(stops, ids.shape[1]) if stops else None, eos)
        return [{"prompt": prompt, "generated": decode(cut_at_stop(row.tolist(), stops)), "reference": reference}
                for prompt, row, reference in zip(batch["prompt"], out[:, ids.shape[1]:], batch["reference"])]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor | None, stop=None,
                  eos: int | None = None) -> torch.Tensor:
        """``model.generate`` greedy, ``predict_new_tokens`` at most, stopping rows where ``stop`` says so; ``eos``
        replaces the model's generation-config eos (which, for a model built from a config, is the architecture's
        default id, not the tokenizer's)."""
        pad = getattr(self.model.config, "pad_token_id", None)
        criteria = None
        if stop is not None:
            from transformers import StoppingCriteriaList

            criteria = StoppingCriteriaList([stop])
        return self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.predict_new_tokens,
                                   do_sample=False, pad_token_id=pad if pad is not None else 0,
                                   stopping_criteria=criteria, **({} if eos is None else {"eos_token_id": eos}))

    # -- saving ----------------------------------------------------------------------------------

    def configure_callbacks(self) -> list:
        """:meth:`LowMemModule.configure_callbacks`'s, and a guard that still saves the trained model when a callback
        fails after training ended."""
        return [*super().configure_callbacks(), *([_SaveOnFailure()] if self.hparams.save_dir is not None else [])]

    def on_fit_start(self) -> None:
        """A new fit saves again; ``save_merged`` of a sharded (FSDP2) model and a weight-averaging callback that
        would average the NF4 codes (:func:`~lowmem_lightning.callbacks.param_checks.averaged_codes_refusal`)
        are refused before training."""
        self._saved = False
        from lowmem_lightning.callbacks.param_checks import averaged_codes_refusal

        reason = averaged_codes_refusal(self)
        if reason is not None:
            raise ValueError(reason)
        if (self.hparams.save_dir is not None and self.hparams.save_merged and self.model is not None
                and _is_sharded(self.model)):
            raise ValueError(
                "Invalid save_merged=True for a model sharded with FSDP2 (DTensor params): merging the LoRA "
                "adapters needs the whole weights on one process. Save the adapter (save_merged=False) and merge "
                "it after training (peft's merge_and_unload on the loaded model)."
            )

    def on_train_end(self) -> None:
        """Save the model as soon as training ends (see :meth:`save_model`).

        Saving here, not in ``on_fit_end``, keeps the save ahead of every callback's ``on_fit_end``
        (plots, summaries: Lightning runs the callbacks' ``on_fit_end`` before the module's), so a
        failing end-of-fit callback cannot cost the model."""
        self.save_model()

    def save_model(self) -> str | None:
        """Write the adapter / merged model / full model (and an HF tokenizer) to ``save_dir``, once per
        fit, on global rank 0; returns the directory, or ``None`` when nothing was written.

        The files are written complete into a temporary directory next to ``save_dir``, then renamed into
        it one by one (:func:`_move_into`): a failed or killed save leaves no partial file under ``save_dir``
        (other files there are kept; shard files of an earlier save that the new one does not replace are
        removed, as ``save_pretrained`` does). A model sharded with FSDP2 (DTensor params) is gathered first:
        every rank joins ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, rank 0 writes
        the full tensors, and every rank waits for the write (a failed write raises on every rank).

        The adapter of a model whose embeddings grew (``resize_embeddings``) carries the whole resized input
        embedding and head (peft's ``save_embedding_layers``) beside the trained rows: load it on the base grown to
        the same length (``resize_token_embeddings(len(tokenizer))``, then ``PeftModel.from_pretrained``). Untrained
        rows trained in place (``untrained_token_ids``) are in the adapter alone: it loads on the unchanged base."""
        save_dir = self.hparams.save_dir
        if save_dir is None or self._saved or self.model is None:
            return None
        self._saved = True
        if not _is_sharded(self.model):
            if not self.trainer.is_global_zero:
                return None
            if self.lora is not None and self.hparams.save_merged:
                from lowmem_lightning.quant import dequantize_model

                self.model = dequantize_model(self.model.merge_and_unload())  # layers without adapters too
                self._restore_outside_language_model()
            self._write(str(save_dir), state_dict=None)
            return str(save_dir)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        error = None
        if self.trainer.is_global_zero:
            try:
                self._write(str(save_dir), state_dict=state)
            except Exception as err:  # noqa: BLE001 - raised below, after every rank has heard of it
                error = err
        del state
        if self.trainer.strategy.broadcast(error is not None):  # every rank waits for rank 0's write
            if error is not None:
                raise error
            raise RuntimeError(f"CausalLMModule: rank 0 could not write the model to {save_dir} (its error is "
                               "in rank 0's output).")
        return str(save_dir) if self.trainer.is_global_zero else None

    def _restore_outside_language_model(self) -> None:
        """In a merged model of a vision-language checkpoint loaded in NF4, put the vision (and audio) encoders and
        projectors back as the checkpoint holds them: text never ran through them and no adapter touched them, so
        their dequantized NF4 approximation would be written in their place."""
        from lowmem_lightning.multimodal import outside_language_model
        from lowmem_lightning.quant.loading import read_checkpoint_modules

        outside = outside_language_model(self.model)
        if not outside or self.hparams.quantize != "nf4" or self.hparams.model_name_or_path is None:
            return
        held = next(self.model.get_submodule(outside[0]).parameters())  # dequantized: the load dtype, the device
        read_checkpoint_modules(self.model, self.hparams.model_name_or_path, outside, held.dtype, held.device)

    def _embeddings_grew(self) -> bool:
        """Whether the model embeds more rows than its checkpoint's ``config.json`` says (``resize_embeddings`` grew
        them); rows trained in place (untrained ones) need no copy of the layers in the adapter."""
        from lowmem_lightning.quant.loading import read_model_config

        if self.hparams.model_name_or_path is None:
            return False
        rows = getattr(text_config(read_model_config(self.hparams.model_name_or_path)), "vocab_size", None)
        return rows is None or _embedding_rows(self.model) > rows

    def _write(self, save_dir: str, state_dict: dict | None) -> None:
        """``save_pretrained`` of the model (with ``state_dict`` when given: the gathered full tensors) and of
        the data module's HF tokenizer, into a temporary directory moved into ``save_dir``."""
        from lowmem_lightning.callbacks.checkpoint_io import CheckpointWriteError

        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        tokenizer = getattr(tokenizer, "tokenizer", None)
        path = os.path.abspath(save_dir)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
        try:
            kwargs = {} if state_dict is None else {"state_dict": state_dict}
            if _trains_token_rows(self.model) and self._embeddings_grew():  # the resized layers go with the adapter
                kwargs["save_embedding_layers"] = True
            with _no_transformers_progress_bar():  # "Writing model shards": a bar over the run's own output
                self.model.save_pretrained(tmp, **kwargs)
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(tmp)
            _move_into(tmp, path)
        except OSError as err:
            raise CheckpointWriteError(path, err.errno, err.strerror or str(err), "model") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _trains_token_rows(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model training some embedding rows (``trainable_token_indices``)."""
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(config, "trainable_token_indices", None) for config in configs.values())


def _is_sharded(model: nn.Module) -> bool:
    """Whether any param of ``model`` is a DTensor (FSDP2's ``fully_shard``, tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


_SHARD_FILE = re.compile(r".*-\d{5}-of-\d{5}\.(safetensors|bin)")


def _move_into(tmp: str, path: str) -> None:
    """Move every file of the complete directory ``tmp`` into ``path`` (``os.replace``, atomic per file, after
    an fsync of each); shard files (``*-00001-of-00002.safetensors``) in ``path`` that the new save does not
    replace are removed, so a loader never mixes shards of two saves."""
    from lowmem_lightning.callbacks.checkpoint_io import _fsync_dir, _fsync_tree

    _fsync_tree(tmp)
    new = {os.path.relpath(os.path.join(root, name), tmp) for root, _, files in os.walk(tmp) for name in files}
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if _SHARD_FILE.fullmatch(name) and name not in new and os.path.isfile(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    mode = _created_file_mode()
    for relative in sorted(new):
        target = os.path.join(path, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.chmod(os.path.join(tmp, relative), mode)  # transformers 5 writes the weights 0600; others get 0644
        os.replace(os.path.join(tmp, relative), target)
        _fsync_dir(os.path.dirname(target))


def _created_file_mode() -> int:
    """The permission bits a newly created file gets under the process's umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _no_transformers_progress_bar():
    """transformers' tqdm bars off while inside (restored to what they were)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class _SaveOnFailure(L.Callback):
    """Saves ``CausalLMModule``'s model when fit fails after training finished (a callback raising in
    ``on_train_end`` before the module's hook ran); a run stopped mid-training is not saved (its
    checkpoint, not a half-trained model, is what to resume from)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == "fit"  # fit_loop.done asserts outside fit (a failed test / validate)
        if isinstance(pl_module, CausalLMModule) and fitting and trainer.fit_loop.done:
            try:
                path = pl_module.save_model()
            except Exception as err:  # noqa: BLE001 - the original exception is what the user must see
                rank_zero_warn(f"CausalLMModule: could not save the model to {pl_module.hparams.save_dir}: {err}",
                               category=LowMemWarning)
                return
            if path is not None:
                rank_zero_warn(f"CausalLMModule: fit failed after training ended ({exception!r}); "
                               f"the trained model was saved to {path}.", category=LowMemWarning)


def cut_at_stop(ids: list[int], stops: list[list[int]]) -> list[int]:
    """``ids`` up to (without) the first occurrence of any sequence of ``stops``; all of ``ids`` when none occurs."""
    for end in range(len(ids)):
        if any(stop and ids[end:end + len(stop)] == stop for stop in stops):
            return ids[:end]
    return ids


class StopSequences:
    """A stopping criterion for transformers' ``generate`` (in a ``StoppingCriteriaList``): a row is done once the
    tokens it generated (after the first ``prompt_width`` columns) hold one of the token-id sequences ``stops`` (eos,
    a chat end-of-turn marker)."""

    def __init__(self, stops: list[list[int]], prompt_width: int):
        self.stops, self.prompt_width = [s for s in stops if s], prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """``[batch]`` bool: the row's generated tokens hold a stop sequence."""
        generated = input_ids[:, self.prompt_width:]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for stop in self.stops:
            if generated.shape[1] >= len(stop):
                target = torch.tensor(stop, device=input_ids.device)
                done |= (generated.unfold(1, len(stop), 1) == target).all(dim=2).any(dim=1)
        return done
