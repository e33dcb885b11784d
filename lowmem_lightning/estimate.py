"""Training-memory estimate of a model built on the meta device: weights, gradients, optimizer state.

Nothing here is a formula over a parameter count. Every figure is summed over the tensors of the
instantiated (meta) model:

* **weights**: every parameter and buffer by dtype; 4-bit ``Linear4bit`` layers by the bytes of their
  packed codes and scales (reported as ``nf4``), their weight counted as ``in * out`` parameters;
* **gradients**: one tensor of the parameter's dtype per trainable parameter; with gradient release
  (``step_in_backward``) the gradients ready in backward are gathered in buckets of
  :data:`RELEASE_BUCKET_BYTES` (the callback's default ``bucket_bytes``) and updated and freed together
  once a bucket is full, so the most gradient bytes alive at once is the fullest bucket
  (:func:`released_gradient_bytes`: under ``bucket_bytes`` plus the tensor that closes it);
* **optimizer state**: each registered optimizer is constructed over the trainable meta parameters
  (construction allocates no state) and asked for the exact ``(shape, dtype)`` of every state tensor
  it allocates for each parameter (its public ``state_layout``, the same description its
  ``load_state_dict`` validates against, host pages marked ``host``;
  torch's fp32 ``AdamW`` is described here: ``exp_avg`` and ``exp_avg_sq`` like the
  parameter, plus a 0-d fp32 ``step``). ``tests/test_estimate.py`` checks each figure against
  :func:`~lowmem_lightning.optim.state_memory` of the real optimizer after one step.

Activations depend on batch size, sequence length, checkpointing and packing: device totals exclude them, and
:func:`activation_bytes` gives the peak of a Llama-style decoder's forward + backward from its config,
:func:`lora_activation_bytes` that of LoRA adapters on a 4-bit or frozen base (the formulas are in their
docstrings; ``tests/test_estimate.py`` checks both against torch's profiler on CPU), and
:func:`token_rows_activation_bytes` what trained token rows add to the latter (``tests/test_token_rows_memory.py``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from lowmem_lightning.optim.base import LowMemOptimizer, StateSpec
from lowmem_lightning.optim.registry import available_optimizers, optimizer_class
from lowmem_lightning.optim.state_precision import fp32_state_params, parse_fp32_state, split_param_groups

__all__ = [
    "OPTIMIZER_VARIANTS",
    "size_text",
    "ModelCount",
    "OptimizerEstimate",
    "MemoryEstimate",
    "count_model",
    "state_layout",
    "optimizer_state_bytes",
    "released_gradient_bytes",
    "gradient_peak_bytes",
    "activation_bytes",
    "document_mask_terms",
    "model_activation_bytes",
    "lora_activation_bytes",
    "token_rows_activation_bytes",
    "LORA_ACTIVATION_COEFFICIENTS",
    "MOE_ACTIVATION_MODEL_TYPES",
    "MOE_LORA_ACTIVATION_COEFFICIENTS",
    "GPT_OSS_ACTIVATION_BYTES",
    "LORA_MODES",
    "LORA_TARGET_SETS",
    "FUSED_LORA_TARGET_SETS",
    "lora_target_sets",
    "ACTIVATION_MODEL_TYPES",
    "ATTENTION_WIDTH_BYTES",
    "LORA_ATTENTION_WIDTH_BYTES",
    "QK_NORM_BYTES",
    "QK_NORM_MODEL_TYPES",
    "attention_widths",
    "attention_extra_bytes",
    "GEMMA3_ACTIVATION_BYTES",
    "PHI3_ACTIVATION_BYTES",
    "GEMMA2_ACTIVATION_BYTES",
    "NEOX_ACTIVATION_BYTES",
    "OLMO2_ACTIVATION_BYTES",
    "GLM4_ACTIVATION_BYTES",
    "EXAONE4_ACTIVATION_BYTES",
    "GRANITE_ACTIVATION_BYTES",
    "SOFTCAP_MODEL_TYPES",
    "LAYER_ACTIVATION_BYTES",
    "unmodelled_layer",
    "unmodelled_attention",
    "ATTENTIONS",
    "EAGER_ATTENTION_BYTES",
    "sliding_window_layers",
    "NF4_DEQUANTIZE_BYTES",
    "RELEASE_BUCKET_BYTES",
    "estimate_memory",
    "recommend",
    "format_table",
    "format_json",
]

GB = 10**9
MIB = 2**20

RELEASE_BUCKET_BYTES = 25 * MIB
"""Gradient bytes gathered before a released bucket is updated: the default ``bucket_bytes`` of
``lowmem_lightning.callbacks.release.GradientRelease`` (a test keeps the two equal; not imported from
there, since this module does not import Lightning)."""

OPTIMIZER_VARIANTS: dict[str, tuple[str, dict]] = {
    "adamw": ("adamw", {"lr": 1e-3}),
    "adamw_8bit": ("adamw_8bit", {"lr": 1e-3}),
    "adamw_4bit": ("adamw_4bit", {"lr": 1e-3}),
    "paged_adamw_8bit": ("paged_adamw_8bit", {"lr": 1e-3}),
    "came": ("came", {"lr": 1e-4}),
    "came_int8": ("came", {"lr": 1e-4, "momentum_dtype": "int8"}),
    "adafactor": ("adafactor", {}),
    "adafactor_beta1": ("adafactor", {"beta1": 0.9}),
    "adafactor_beta1_int8": ("adafactor", {"beta1": 0.9, "momentum_dtype": "int8"}),
    "sgd": ("sgd", {"lr": 1e-3}),
    "sgd_momentum": ("sgd", {"lr": 1e-3, "momentum": 0.9}),
    "sgd_momentum_int8": ("sgd", {"lr": 1e-3, "momentum": 0.9, "momentum_dtype": "int8"}),
    "lion": ("lion", {"lr": 1e-4}),
    "lion_8bit": ("lion_8bit", {"lr": 1e-4}),
    "ademamix": ("ademamix", {"lr": 1e-3}),
    "ademamix_8bit": ("ademamix_8bit", {"lr": 1e-3}),
    "muon": ("muon", {"lr": 0.02}),
    "muon_8bit": ("muon_8bit", {"lr": 0.02}),
}
"""Rows of the estimate: ``row name -> (registered optimizer, constructor kwargs)``. Adafactor and SGD
keep no momentum by default; the ``_int8`` rows store the momentum in the 8-bit code. The Lion,
AdEMAMix and Muon rows are shown for a run that chooses them; :func:`recommend` never proposes them.
The Muon rows are the hybrid: Muon on the hidden matrices, 8-bit AdamW on embeddings, head, norms and
biases (found by the names of ``model.named_parameters()``)."""

_ADAPTER_MARKERS = ("lora_",)
_TOKEN_ROW_MARKERS = ("trainable_tokens_delta",)  # peft's trained rows of the embedding and head


@dataclass(frozen=True)
class ModelCount:
    """Parameter counts (elements) and weight bytes of a model.

    ``params`` counts the model's own parameters, LoRA adapters and trained token rows excluded, with a 4-bit
    layer's weight counted as ``in_features * out_features`` elements; ``adapter_params`` the LoRA adapters;
    ``token_row_params`` the embedding and head rows peft trains beside them (``trainable_token_indices``: rows x
    hidden per untied layer);
    ``trainable_params`` every parameter with ``requires_grad``. ``frozen_bytes_by_dtype`` maps a dtype
    name (``bfloat16``, ...) or ``nf4`` (codes + scales of ``Linear4bit``) to bytes of frozen weights
    and buffers; ``trainable_bytes`` are the trainable weights themselves; ``gradient_bytes`` one
    gradient per trainable parameter in its dtype; ``largest_gradient_bytes`` the largest of those
    gradients (all that is alive at once under per-tensor gradient release, ``bucket_bytes=0``);
    ``trainable_nbytes`` every trainable tensor's bytes in parameter order (what
    :func:`released_gradient_bytes` replays); ``tied_gradient_bytes`` the bytes of the trainable parameters more than
    one module holds (an input embedding tied to the output head), whose two gradients autograd sums as backward ends;
    ``host_table_bytes`` the frozen embedding tables held in host memory (``host_embeddings``: counted in ``params``,
    in no device total); ``hostable_table_bytes`` the frozen ones still on the device that ``host_embeddings`` would
    move there (:func:`~lowmem_lightning.quant.host_embeddings.host_table_names`).
    """

    params: int
    adapter_params: int
    trainable_params: int
    frozen_bytes_by_dtype: dict[str, int]
    trainable_bytes: int
    gradient_bytes: int
    largest_gradient_bytes: int = 0
    trainable_nbytes: tuple[int, ...] = ()
    token_row_params: int = 0
    tied_gradient_bytes: int = 0
    host_table_bytes: int = 0
    hostable_table_bytes: int = 0

    @property
    def frozen_bytes(self) -> int:
        """Bytes of every frozen weight and buffer (NF4 codes and scales included)."""
        return sum(self.frozen_bytes_by_dtype.values())


@dataclass
class OptimizerEstimate:
    """Optimizer-state bytes of one optimizer configuration over the trainable params.

    ``device_state_bytes`` stays on the training device; ``host_state_bytes`` lives in host memory
    (paged optimizers keep their state there and page it in); ``total_device_bytes`` adds weights,
    gradients and the activations given to :func:`estimate_memory` (none by default) to the device
    state (with gradient release, the fullest bucket of gradients: :func:`released_gradient_bytes`);
    ``released_device_bytes`` is that total with gradient release whatever the run's setting. ``fits``
    is set when a budget is given.
    """

    optimizer: str
    kwargs: dict
    state_bytes: int
    device_state_bytes: int
    host_state_bytes: int
    bytes_per_param: float
    total_device_bytes: int
    released_device_bytes: int = 0
    fits: bool | None = None


@dataclass
class MemoryEstimate:
    """Everything ``lowmem estimate`` reports (see :func:`estimate_memory`); bytes unless named otherwise."""

    model: ModelCount
    optimizers: dict[str, OptimizerEstimate]
    configured_optimizer: str | None = None
    step_in_backward: bool = False
    budget_bytes: int | None = None
    recommendation: str | None = None
    notes: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    bucket_bytes: int = RELEASE_BUCKET_BYTES
    activation_bytes: int = 0
    activation_detail: str = ""
    """What the activations are of (``batch 1 x seq 512, bf16, checkpointing``), or why they are left out."""
    average_bytes: int = 0
    """Device bytes of the weight averages (``EMAWeightAveraging``) the run keeps, in every device total."""
    average_detail: str = ""
    """What the averages hold (a copy of what trains, or of the whole model; one kept in host memory)."""
    checkpoint_weight_bytes: int = 0
    """Tensor bytes of the weights one Lightning checkpoint holds (:func:`checkpoint_weights`); 0: not estimated."""
    checkpoint_detail: str = ""
    """What those weights are (what trains, the frozen ones or that they are left out, a weight average's own)."""

    def checkpoint_bytes(self, row: str) -> int:
        """Tensor bytes of one Lightning checkpoint of the run with optimizer ``row``: :attr:`checkpoint_weight_bytes`
        and the optimizer's whole state (on the device and in host memory); 0 when not estimated."""
        return self.checkpoint_weight_bytes + self.optimizers[row].state_bytes if self.checkpoint_weight_bytes else 0

    @property
    def released_gradient_bytes(self) -> int:
        """Gradient bytes alive at once under gradient release (the fullest bucket of ``bucket_bytes``)."""
        return gradient_peak_bytes(self.model, True, self.bucket_bytes, self.activation_bytes or 0)

    @property
    def gradient_device_bytes(self) -> int:
        """Gradient bytes on the device at their peak (:func:`gradient_peak_bytes`): all of them, or the fullest
        released bucket with ``step_in_backward``."""
        return gradient_peak_bytes(self.model, self.step_in_backward, self.bucket_bytes, self.activation_bytes or 0)

    def as_dict(self) -> dict:
        """JSON-ready dict: ``params``, ``trainable_params``, ``optimizers.{name}.state_bytes``, ..."""
        model = asdict(self.model)
        return {
            **model,
            "frozen_bytes": self.model.frozen_bytes,
            "configured_optimizer": self.configured_optimizer,
            "step_in_backward": self.step_in_backward,
            "gradient_checkpointing": self.gradient_checkpointing,
            "gradient_device_bytes": self.gradient_device_bytes,
            "released_gradient_bytes": self.released_gradient_bytes,
            "bucket_bytes": self.bucket_bytes,
            "activation_bytes": self.activation_bytes,
            "activation_detail": self.activation_detail,
            "average_bytes": self.average_bytes,
            "average_detail": self.average_detail,
            "checkpoint_weight_bytes": self.checkpoint_weight_bytes,
            "checkpoint_detail": self.checkpoint_detail,
            "budget_bytes": self.budget_bytes,
            "recommendation": self.recommendation,
            "optimizers": {name: {**asdict(est), "checkpoint_bytes": self.checkpoint_bytes(name)}
                           for name, est in self.optimizers.items()},
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ model
def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module, "qweight")


def _is_experts4bit(module: nn.Module) -> bool:
    """An ``lowmem_lightning.quant.Experts4bit`` (MoE experts with NF4 buffers), known without importing it."""
    return hasattr(module, "nf4_buffer_names") and hasattr(module, "layout_shape")


def _is_host_embedding(module: nn.Module) -> bool:
    """A ``lowmem_lightning.quant.host_embeddings.HostEmbedding`` (a frozen table in host memory), known without
    importing it."""
    return type(module).__name__ == "HostEmbedding" and isinstance(getattr(module, "table", None), torch.Tensor)


def count_model(model: nn.Module) -> ModelCount:
    """Count parameters and weight bytes of ``model`` (any device; meta works, nothing is read).

    Shared (tied) tensors are counted once. 4-bit layers (``lowmem_lightning.quant.Linear4bit``)
    contribute ``in * out`` parameters and their stored code/scale bytes as ``nf4``; so do NF4 MoE experts
    (``Experts4bit``: every expert's matrices). Embedding tables held in host memory (``HostEmbedding``) count as
    parameters and as ``host_table_bytes``, not as device weights.
    """
    seen: set[int] = set()
    params = adapter = token_rows = trainable = trainable_bytes = grad_bytes = largest_grad = host_tables = 0
    frozen: dict[str, int] = {}
    order: list[int] = []
    for module in model.modules():
        if _is_host_embedding(module):
            params += module.table.numel()
            host_tables += _nbytes(module.table)
            continue
        if _is_linear4bit(module):
            params += module.in_features * module.out_features
            quant = [b for name, b in module.named_buffers(recurse=False) if b is not None and name != "bias"]
        elif _is_experts4bit(module):  # MoE experts in NF4: every expert's matrices
            params += sum(math.prod(module.layout_shape(proj)) for proj in module.nf4_shapes)
            quant = [module.get_buffer(name) for name in module.nf4_buffer_names()]
        else:
            continue
        frozen["nf4"] = frozen.get("nf4", 0) + sum(_nbytes(b) for b in quant)
        seen.update(id(b) for b in quant)
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if any(marker in name for marker in _ADAPTER_MARKERS):
            adapter += param.numel()
        elif any(marker in name for marker in _TOKEN_ROW_MARKERS):
            token_rows += param.numel()
        else:
            params += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            trainable_bytes += _nbytes(param)
            grad_bytes += _nbytes(param)
            largest_grad = max(largest_grad, _nbytes(param))
            order.append(_nbytes(param))
        else:
            key = str(param.dtype).removeprefix("torch.")
            frozen[key] = frozen.get(key, 0) + _nbytes(param)
    for buffer in model.buffers():
        if id(buffer) in seen:
            continue
        seen.add(id(buffer))
        key = str(buffer.dtype).removeprefix("torch.")
        frozen[key] = frozen.get(key, 0) + _nbytes(buffer)
    return ModelCount(params, adapter, trainable, dict(sorted(frozen.items())), trainable_bytes, grad_bytes,
                      largest_grad, tuple(order), token_rows, _tied_trainable_bytes(model), host_tables,
                      _hostable_table_bytes(model))


def _hostable_table_bytes(model: nn.Module) -> int:
    """Bytes of the frozen embedding tables of ``model`` on the device that ``host_embeddings`` would hold in host
    memory (only under LoRA adapters, which freeze them; 0 otherwise, and without a frozen ``nn.Embedding``)."""
    if not any(isinstance(m, nn.Embedding) and not m.weight.requires_grad for m in model.modules()) or not any(
            any(marker in name for marker in _ADAPTER_MARKERS) for name, _ in model.named_parameters()):
        return 0
    from lowmem_lightning.quant.host_embeddings import host_table_names

    return sum(_nbytes(model.get_submodule(name).weight) for name in host_table_names(model))


def _tied_trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters that more than one module holds (a tied input embedding and head)."""
    holders: dict[int, int] = {}
    params: dict[int, torch.Tensor] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            holders[id(param)] = holders.get(id(param), 0) + 1
            params[id(param)] = param
    return sum(_nbytes(params[key]) for key, count in holders.items() if count > 1)


def gradient_peak_bytes(count: ModelCount, step_in_backward: bool, bucket_bytes: int = RELEASE_BUCKET_BYTES,
                        activation_bytes: int = 0) -> int:
    """The gradient bytes to add to ``activation_bytes`` for the peak of backward: :func:`released_gradient_bytes`
    under gradient release, else every gradient. A tied embedding's gradient adds two copies of itself as backward
    ends, when the activations are freed (autograd holds the head's gradient until the embedding's arrives, then
    sums the two: profiled, three copies at once): ``max(0, 2 * tied - activation_bytes)`` more without release."""
    tied = count.tied_gradient_bytes
    if step_in_backward:
        return released_gradient_bytes(count.trainable_nbytes, bucket_bytes, tied, activation_bytes)
    return count.gradient_bytes + max(0, 2 * tied - activation_bytes)


def released_gradient_bytes(tensor_bytes: Iterable[int], bucket_bytes: int = RELEASE_BUCKET_BYTES,
                            tied_bytes: int = 0, activation_bytes: int = 0) -> int:
    """The most gradient bytes alive at once under gradient release with ``bucket_bytes`` buckets.

    Replays :class:`~lowmem_lightning.callbacks.release.GradientRelease`'s rule over the trainable
    tensors' bytes (``tensor_bytes`` in parameter order; backward produces them roughly in reverse): a
    ready gradient joins the bucket, and a bucket holding ``>= bucket_bytes`` is updated and freed. The
    answer is the fullest bucket, the tensor that closed it included: at most ``bucket_bytes`` plus the
    largest tensor, never more than all gradients; ``bucket_bytes=0`` gives the largest tensor. ``tied_bytes``: a
    tied embedding's gradient, held from the head's backward to the embedding's (beside every bucket and the
    activations) and then, as backward ends and the activations are freed, summed with the embedding's own (three
    copies at once): ``max(fullest bucket + tied_bytes, 3 * tied_bytes - activation_bytes)``.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
        raise ValueError(f"Invalid bucket_bytes={bucket_bytes!r}: expected an int >= 0 (0: each tensor alone).")
    bucket = peak = 0
    for nbytes in reversed(list(tensor_bytes)):
        bucket += nbytes
        peak = max(peak, bucket)
        if bucket >= bucket_bytes:
            bucket = 0
    return max(peak + tied_bytes, 3 * tied_bytes - activation_bytes) if tied_bytes else peak


# ------------------------------------------------------------------------------------------ activations
ACTIVATION_COEFFICIENTS: dict[int, dict[str, float]] = {
    2: {"layer_h": 28.0, "layer_i": 12.0, "full_h": 24.0, "full_i": 8.0, "rest_h": 8.5},
    4: {"layer_h": 41.0, "layer_i": 24.0, "full_h": 34.7, "full_i": 18.0, "rest_h": 22.0},
}
"""Bytes per token per unit of ``hidden_size`` (``_h``) or ``intermediate_size`` (``_i``) in
:func:`activation_bytes`, by the weights' element size (2: bf16/fp16, 4: fp32). Fitted to torch's
profiler on CPU (torch 2.13, transformers 5.25, HF Llama with SDPA attention), one term changed at a
time; bf16 carries more per ``hidden_size`` than its element size suggests because RMSNorm computes
in fp32."""

LOSS_BYTES_PER_VOCAB = 12
"""Bytes per token per vocabulary entry at the loss: the logits in the weights' dtype, their fp32 copy,
fp32 log-softmax and its gradient (measured 12.0 in bf16 and fp32)."""


def _config_value(config, key: str) -> int:
    value = _config_getter(config)(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid config {key}={value!r}: expected an int >= 1 (a Llama-style decoder config).")
    return value


ATTENTION_WIDTH_BYTES: dict[int, tuple[float, float]] = {
    # dtype bytes: (per query element, per key/value element)
    2: (4.1, 4.0),
    4: (8.1, 8.0),
}
"""Bytes per token per layer of a full-weight decoder (:func:`activation_bytes`) per element by which its query width
``num_attention_heads * head_dim`` and its key/value width ``num_key_value_heads * head_dim`` differ from
``hidden_size`` (:func:`attention_widths`; the Llama layers :data:`ACTIVATION_COEFFICIENTS` was fitted to have both
equal to it), by the weights' element size, with and without checkpointing. Least squares over torch's CPU
profiler (``python benchmarks/lora_activations.py --widths``: five head shapes, each against ``q = kv = h``)."""

LORA_ATTENTION_WIDTH_BYTES: dict[tuple[str, str, bool], tuple[float, float]] = {
    # (base, mode, dropout > 0): (per query element, per key/value element)
    ("nf4", "fp32", False): (8.1, 8.0),
    ("nf4", "fp32", True): (16.1, 8.0),
    ("nf4", "bf16", False): (4.1, 4.0),
    ("nf4", "bf16", True): (8.1, 4.0),
    ("nf4", "bf16-base-fp32-adapters", False): (8.1, 4.0),
    ("nf4", "bf16-base-fp32-adapters", True): (12.1, 4.0),
    ("nf4", "bf16-mixed", False): (4.4, 4.3),
    ("nf4", "bf16-mixed", True): (8.4, 4.3),
    ("dense", "fp32", False): (8.1, 8.0),
    ("dense", "fp32", True): (16.1, 8.0),
    ("dense", "bf16", False): (4.1, 4.0),
    ("dense", "bf16", True): (8.1, 4.0),
    ("dense", "bf16-base-fp32-adapters", False): (8.1, 4.0),
    ("dense", "bf16-base-fp32-adapters", True): (12.1, 4.0),
    ("dense", "bf16-mixed", False): (6.4, 4.3),
    ("dense", "bf16-mixed", True): (10.4, 4.3),
}
"""As :data:`ATTENTION_WIDTH_BYTES` for :func:`lora_activation_bytes`, by base, :data:`LORA_MODES` mode and dropout
> 0 (``o_proj``'s adapter drops out its query-wide input), pooled over the targets (all seven or the attention
projections) and checkpointing (``--widths`` prints this table)."""

QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe", "olmoe", "hunyuan_v1_dense", "qwen3_vl_text")
"""``config.model_type`` values whose attention normalizes its queries and keys (``q_norm``, ``k_norm``: an
RMSNorm over each head's ``head_dim``, or OLMoE's over the whole query / key width: as many elements; Hunyuan's after
the rotary embedding, Qwen3's before it): :data:`QK_NORM_BYTES` applies."""

QK_NORM_BYTES: dict[int | str, float] = {2: 6.1, 4: 8.1, "fp32": 4.1, "bf16": 4.1, "bf16-base-fp32-adapters": 4.1,
                                         "bf16-mixed": 4.1}
"""Bytes per token per layer per query and key/value element that :data:`QK_NORM_MODEL_TYPES` layers save for their
q/k norms, by full-weight dtype bytes (the norms' weights train: more is kept) or LoRA mode: Qwen3 decoders against
Llama ones of the same shapes under torch's CPU profiler (``benchmarks/lora_activations.py --widths``)."""


def attention_widths(config) -> tuple[int, int]:
    """``(query width, key/value width)`` of a decoder config: ``num_attention_heads * head_dim`` and
    ``num_key_value_heads * head_dim`` (``head_dim`` defaults to ``hidden_size // num_attention_heads``, the key/value
    heads to the query heads)."""
    heads, head_dim = _config_value(config, "num_attention_heads"), _head_dim(config)
    return heads * head_dim, (_optional_config_value(config, "num_key_value_heads") or heads) * head_dim


def _head_dim(config) -> int:
    """The config's ``head_dim``, else ``hidden_size // num_attention_heads``."""
    return _optional_config_value(config, "head_dim") or (
        _config_value(config, "hidden_size") // _config_value(config, "num_attention_heads"))


def _optional_config_value(config, key: str) -> int | None:
    return None if _config_getter(config)(key) is None else _config_value(config, key)


def attention_extra_bytes(config, setting: int | tuple[str, str, bool]) -> float:
    """Activation bytes per token per layer that ``config``'s attention adds to the Llama layer the activation
    tables were fitted to: ``a * (q - h) + b * (kv - h)`` with ``(a, b)`` from :data:`ATTENTION_WIDTH_BYTES`
    (``setting`` a full-weight dtype's bytes) or :data:`LORA_ATTENTION_WIDTH_BYTES` (``setting`` a LoRA ``(base,
    mode, dropout > 0)``) and ``(q, kv)`` the :func:`attention_widths`, plus ``c * (q + kv)`` for the q/k norms of a
    :data:`QK_NORM_MODEL_TYPES` layer (``c`` from :data:`QK_NORM_BYTES`). 0 for Llama-2's shapes, and for a config
    without ``num_attention_heads`` (taken as Llama's)."""
    if _optional_config_value(config, "num_attention_heads") is None:
        return 0.0
    h = _config_value(config, "hidden_size")
    q, kv = attention_widths(config)
    if isinstance(setting, tuple):
        (a, b), norm = LORA_ATTENTION_WIDTH_BYTES[setting], QK_NORM_BYTES[setting[1]]
    else:
        (a, b), norm = ATTENTION_WIDTH_BYTES[setting], QK_NORM_BYTES[setting]
    return a * (q - h) + b * (kv - h) + (norm * (q + kv) if _model_type(config) in QK_NORM_MODEL_TYPES else 0.0)


GEMMA3_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (20.6, 0.0, 8.2, 0.9, 26.4, -1.6, 6.7, 4.9),
    4: (21.8, -2.1, 7.3, -4.6, 21.3, -1.5, 5.3, 1.5),
    ("nf4", "fp32", False, "all"): (9.2, -0.1, 4.3, -3.2, 10.1, -0.1, 4.3, -6.5),
    ("nf4", "fp32", False, "attention"): (7.9, 1.3, 1.9, 4.5, 19.7, -2.4, 4.3, -6.5),
    ("nf4", "fp32", True, "all"): (14.4, -1.9, 6.5, -16.5, 10.5, -3.1, 7.1, -6.5),
    ("nf4", "fp32", True, "attention"): (7.9, 1.3, 1.9, 4.5, 19.7, -2.4, 4.3, -6.5),
    ("nf4", "bf16", False, "all"): (9.8, -0.4, 4.8, -6.0, 6.7, 0.0, 4.2, -1.1),
    ("nf4", "bf16", False, "attention"): (7.5, 0.9, 3.7, -1.3, 8.6, 2.1, 4.2, -1.1),
    ("nf4", "bf16", True, "all"): (11.9, -1.2, 5.7, -11.6, 6.7, 0.0, 4.2, -1.1),
    ("nf4", "bf16", True, "attention"): (7.5, 0.9, 3.7, -1.3, 8.6, 2.1, 4.2, -1.1),
    ("nf4", "bf16-base-fp32-adapters", False, "all"): (12.0, -1.2, 5.8, -11.8, 4.7, 0.0, 4.2, -1.1),
    ("nf4", "bf16-base-fp32-adapters", False, "attention"): (7.5, 0.9, 3.7, -1.3, 8.6, 2.1, 4.2, -1.1),
    ("nf4", "bf16-base-fp32-adapters", True, "all"): (16.2, -2.5, 8.2, -26.5, 3.7, -3.2, 8.9, -1.1),
    ("nf4", "bf16-base-fp32-adapters", True, "attention"): (7.5, 0.9, 3.7, -1.3, 8.6, 2.1, 4.2, -1.1),
    ("nf4", "bf16-mixed", False, "all"): (9.9, -0.5, 4.8, -6.0, 6.6, 0.1, 4.2, -1.1),
    ("nf4", "bf16-mixed", False, "attention"): (7.9, 0.7, 3.7, -1.8, 8.5, 2.1, 4.3, -1.1),
    ("nf4", "bf16-mixed", True, "all"): (12.0, -1.2, 5.8, -11.7, 6.6, 0.1, 4.2, -1.1),
    ("nf4", "bf16-mixed", True, "attention"): (7.9, 0.7, 3.7, -1.8, 8.5, 2.1, 4.3, -1.1),
    ("dense", "fp32", False, "all"): (9.1, -0.1, 4.0, -1.2, 30.8, -4.6, 3.1, -6.5),
    ("dense", "fp32", False, "attention"): (7.1, 1.3, 2.4, 3.8, 25.1, -2.4, 0.6, -6.5),
    ("dense", "fp32", True, "all"): (9.1, -0.1, 4.0, -1.2, 18.4, -0.6, 3.1, -6.5),
    ("dense", "fp32", True, "attention"): (7.1, 1.3, 2.4, 3.8, 25.1, -2.4, 0.6, -6.5),
    ("dense", "bf16", False, "all"): (8.8, -0.1, 3.9, 0.1, 25.4, -3.0, 4.2, -1.1),
    ("dense", "bf16", False, "attention"): (8.8, -0.1, 3.9, 0.1, 24.7, -4.7, 4.3, -1.1),
    ("dense", "bf16", True, "all"): (8.8, -0.1, 3.9, 0.1, 20.1, -2.6, 4.2, -1.1),
    ("dense", "bf16", True, "attention"): (8.8, -0.1, 3.9, 0.1, 24.7, -4.7, 4.3, -1.1),
    ("dense", "bf16-base-fp32-adapters", False, "all"): (7.5, 0.3, 3.4, 2.9, 13.3, -2.1, 2.7, -1.1),
    ("dense", "bf16-base-fp32-adapters", False, "attention"): (8.8, -0.1, 3.9, 0.1, 24.7, -4.7, 4.3, -1.1),
    ("dense", "bf16-base-fp32-adapters", True, "all"): (7.7, 1.0, 2.1, 3.4, 14.6, 0.1, 4.2, -1.1),
    ("dense", "bf16-base-fp32-adapters", True, "attention"): (8.8, -0.1, 3.9, 0.1, 24.7, -4.7, 4.3, -1.1),
    ("dense", "bf16-mixed", False, "all"): (7.9, 0.2, 3.6, 1.9, 14.0, -1.2, 3.4, -1.1),
    ("dense", "bf16-mixed", False, "attention"): (8.8, -0.1, 3.9, 0.1, 24.7, -4.7, 4.4, -1.1),
    ("dense", "bf16-mixed", True, "all"): (7.9, 1.1, 2.3, 3.6, 6.6, -0.3, 4.1, -1.1),
    ("dense", "bf16-mixed", True, "attention"): (8.8, -0.1, 3.9, 0.1, 24.7, -4.7, 4.4, -1.1),
}
"""Bytes per token that a Gemma 3 text layer (``model_type`` ``gemma3_text``: q/k norms, a norm after the attention
and after the MLP, GELU, the embedding scaled by ``sqrt(hidden_size)``) holds beyond the Llama layer with
:func:`attention_extra_bytes`' width terms, by full-weight dtype bytes or LoRA ``(base, mode, dropout > 0,
targets)``: without checkpointing ``L * (full_h * h + full_i * i + full_qk * (q + kv)) + full_once_h * h``; with it
``layer_h * h + layer_i * i + layer_qk * (q + kv)`` in the recomputed layer and ``layer_once_h * h`` once. Least
squares over torch's CPU profiler on the ``GEMMA3_FIT`` decoders of ``python benchmarks/lora_activations.py
--gemma3``, checked on its ``GEMMA3_CHECK`` ones."""


PHI3_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (2.3, 0.0, 0.2, -0.9, 11.2, 0.5, -2.4, 2.9),
    4: (11.1, -2.2, -1.3, -6.1, 6.8, -0.2, 1.5, 1.4),
    ('nf4', 'fp32', False, 'all'): (20.7, -4.9, 6.7, -48.6, 3.9, -7.5, 5.0, -6.6),
    ('nf4', 'fp32', False, 'attention'): (18.4, -3.3, 3.4, -36.0, 15.4, -10.4, 4.5, -6.6),
    ('nf4', 'fp32', True, 'all'): (-8.1, -6.4, 13.5, -59.0, -34.7, -9.7, 11.3, -6.6),
    ('nf4', 'fp32', True, 'attention'): (-1.6, -3.3, 3.4, -28.0, -4.6, -10.4, 4.5, -6.6),
    ('nf4', 'bf16', False, 'all'): (13.2, -3.0, 4.0, -32.1, -1.6, -4.0, 2.2, -1.1),
    ('nf4', 'bf16', False, 'attention'): (11.7, -1.9, 2.2, -26.7, 1.2, -2.4, 1.5, -1.1),
    ('nf4', 'bf16', True, 'all'): (5.1, -4.6, 6.3, -46.1, -19.6, -4.0, 2.2, -1.1),
    ('nf4', 'bf16', True, 'attention'): (1.7, -1.9, 2.2, -22.7, -8.8, -2.4, 1.5, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', False, 'all'): (5.4, -4.6, 6.4, -50.8, -20.1, -4.3, 1.7, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', False, 'attention'): (1.7, -1.9, 2.2, -26.7, -8.8, -2.4, 1.5, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', True, 'all'): (1.6, -7.3, 11.6, -74.1, -27.3, -10.5, 2.0, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', True, 'attention'): (-6.3, -1.9, 2.2, -18.7, -16.8, -2.4, 1.5, -1.1),
    ('nf4', 'bf16-mixed', False, 'all'): (14.0, -3.4, 4.5, -35.8, -2.4, -4.3, 2.3, -1.1),
    ('nf4', 'bf16-mixed', False, 'attention'): (12.3, -2.1, 2.2, -27.9, 0.7, -2.4, 1.5, -1.1),
    ('nf4', 'bf16-mixed', True, 'all'): (6.0, -5.0, 6.8, -49.7, -20.4, -4.3, 2.3, -1.1),
    ('nf4', 'bf16-mixed', True, 'attention'): (2.3, -2.1, 2.2, -23.9, -9.3, -2.4, 1.5, -1.1),
    ('dense', 'fp32', False, 'all'): (4.8, 0.2, -0.7, -0.1, 13.1, 0.2, 4.6, -6.6),
    ('dense', 'fp32', False, 'attention'): (4.9, 1.6, -2.5, 0.3, 9.0, 0.2, 4.6, -6.6),
    ('dense', 'fp32', True, 'all'): (-22.7, 0.1, -1.3, 9.5, -19.1, 0.2, 4.6, -6.6),
    ('dense', 'fp32', True, 'attention'): (-15.1, 1.6, -2.5, 8.3, -11.0, 0.2, 4.6, -6.6),
    ('dense', 'bf16', False, 'all'): (3.0, -0.2, -0.3, -0.3, 3.1, 1.0, 2.3, -1.1),
    ('dense', 'bf16', False, 'attention'): (3.0, -0.2, -0.3, -0.3, 7.6, -0.4, -0.4, -1.1),
    ('dense', 'bf16', True, 'all'): (-11.0, -0.2, -0.3, 3.7, -12.1, -0.2, 2.4, -1.1),
    ('dense', 'bf16', True, 'attention'): (-7.0, -0.2, -0.3, 3.7, -2.4, -0.4, -0.4, -1.1),
    ('dense', 'bf16-base-fp32-adapters', False, 'all'): (-28.9, 6.8, -7.4, 41.7, -11.6, 10.0, 2.3, -1.1),
    ('dense', 'bf16-base-fp32-adapters', False, 'attention'): (-7.0, -0.2, -0.3, -0.3, -2.4, -0.4, -0.4, -1.1),
    ('dense', 'bf16-base-fp32-adapters', True, 'all'): (-32.4, 4.7, -6.1, 31.1, -21.7, 8.0, 2.3, -1.1),
    ('dense', 'bf16-base-fp32-adapters', True, 'attention'): (-15.0, -0.2, -0.3, 7.7, -10.4, -0.4, -0.4, -1.1),
    ('dense', 'bf16-mixed', False, 'all'): (-6.3, 0.5, -1.3, 2.5, -6.7, -0.2, 2.4, -1.1),
    ('dense', 'bf16-mixed', False, 'attention'): (-3.3, -0.2, -0.3, 0.1, 1.2, -0.4, -0.3, -1.1),
    ('dense', 'bf16-mixed', True, 'all'): (-16.6, 1.3, -2.6, 8.4, -18.7, -0.2, 2.4, -1.1),
    ('dense', 'bf16-mixed', True, 'attention'): (-11.3, -0.2, -0.3, 8.1, -6.8, -0.4, -0.3, -1.1),
}
"""Bytes per token that a Phi-3 layer (``model_type`` ``phi3``: Phi-3, Phi-3.5, Phi-4; fused ``qkv_proj`` and
``gate_up_proj``, whose outputs are split and whose gradients are concatenated, a rotary embedding that concatenates
the rotated part of each query and key with the rest) holds beyond the Llama layer with :func:`attention_extra_bytes`'
width terms and its own adapters (:data:`FUSED_LORA_TARGET_SETS`: one per fused projection; an NF4 base decodes
``gate_up_proj``, twice Llama's largest matrix), laid out as :data:`GEMMA3_ACTIVATION_BYTES`. Least squares over
torch's CPU profiler on the ``LAYER_FIT`` Phi-3 decoders of ``python benchmarks/lora_activations.py --phi3``, checked
on its ``LAYER_CHECK`` ones (one with Phi-4-mini's partial rotary)."""

GEMMA2_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (26.5, -0.3, 1.5, -10.9, 24.3, -1.5, -1.5, 6.2),
    4: (33.9, -2.7, 2.8, -34.7, 20.1, -0.8, -2.4, 4.6),
    ('nf4', 'fp32', False, 'all'): (18.6, -0.2, 2.6, -21.1, 8.9, 0.6, 0.6, -3.4),
    ('nf4', 'fp32', False, 'attention'): (16.4, 1.6, -0.7, -10.2, 18.5, -1.7, 0.6, -3.4),
    ('nf4', 'fp32', True, 'all'): (18.7, -1.3, 1.6, -23.4, 8.6, -2.5, 1.2, -3.4),
    ('nf4', 'fp32', True, 'attention'): (13.2, 1.8, -2.9, -5.2, 17.8, -1.8, -1.5, -3.4),
    ('nf4', 'bf16', False, 'all'): (13.7, -0.2, 1.4, -11.1, 4.6, 0.1, 0.0, 0.2),
    ('nf4', 'bf16', False, 'attention'): (12.6, 1.0, 0.2, -8.4, 6.5, 2.2, 0.0, 0.2),
    ('nf4', 'bf16', True, 'all'): (14.3, -0.9, 1.3, -14.2, 4.2, 0.1, -1.1, 0.2),
    ('nf4', 'bf16', True, 'attention'): (11.0, 1.1, -1.0, -6.0, 6.1, 2.1, -1.1, 0.2),
    ('nf4', 'bf16-base-fp32-adapters', False, 'all'): (14.3, -0.9, 1.3, -14.5, 2.2, 0.1, -1.2, 0.2),
    ('nf4', 'bf16-base-fp32-adapters', False, 'attention'): (11.0, 1.1, -1.0, -6.0, 6.1, 2.1, -1.1, 0.2),
    ('nf4', 'bf16-base-fp32-adapters', True, 'all'): (18.5, -2.2, 3.8, -29.4, 1.2, -3.2, 3.6, 0.2),
    ('nf4', 'bf16-base-fp32-adapters', True, 'attention'): (11.0, 1.1, -1.0, -6.0, 6.1, 2.1, -1.1, 0.2),
    ('nf4', 'bf16-mixed', False, 'all'): (13.8, -0.2, 1.6, -11.6, 4.5, 0.2, 0.0, 0.2),
    ('nf4', 'bf16-mixed', False, 'attention'): (13.2, 0.9, 0.2, -9.4, 6.4, 2.2, 0.0, 0.2),
    ('nf4', 'bf16-mixed', True, 'all'): (14.3, -0.9, 1.5, -14.7, 4.1, 0.1, -1.1, 0.2),
    ('nf4', 'bf16-mixed', True, 'attention'): (11.6, 0.9, -0.9, -6.9, 6.0, 2.1, -1.1, 0.2),
    ('dense', 'fp32', False, 'all'): (20.1, -0.8, 3.2, -24.4, 29.7, -3.9, -0.5, -3.4),
    ('dense', 'fp32', False, 'attention'): (21.6, -0.8, 2.4, -24.5, 23.9, -1.7, -3.1, -3.4),
    ('dense', 'fp32', True, 'all'): (16.9, -0.6, 1.0, -19.4, 16.5, 0.0, -2.7, -3.4),
    ('dense', 'fp32', True, 'attention'): (18.3, -0.7, 0.2, -19.5, 23.1, -1.7, -5.3, -3.4),
    ('dense', 'bf16', False, 'all'): (14.4, -0.5, 1.7, -12.5, 23.3, -2.9, 0.0, 0.2),
    ('dense', 'bf16', False, 'attention'): (14.4, -0.5, 1.7, -12.5, 22.6, -4.6, 0.1, 0.2),
    ('dense', 'bf16', True, 'all'): (12.8, -0.4, 0.6, -10.0, 17.6, -2.5, -1.1, 0.2),
    ('dense', 'bf16', True, 'attention'): (12.8, -0.4, 0.6, -10.0, 22.2, -4.7, -1.0, 0.2),
    ('dense', 'bf16-base-fp32-adapters', False, 'all'): (11.7, 0.0, 0.2, -7.7, 10.9, -2.1, -2.6, 0.2),
    ('dense', 'bf16-base-fp32-adapters', False, 'attention'): (12.8, -0.4, 0.6, -10.0, 22.2, -4.7, -1.0, 0.2),
    ('dense', 'bf16-base-fp32-adapters', True, 'all'): (11.9, 0.7, -1.2, -6.8, 12.1, 0.1, -1.1, 0.2),
    ('dense', 'bf16-base-fp32-adapters', True, 'attention'): (12.8, -0.4, 0.6, -10.0, 22.2, -4.7, -1.0, 0.2),
    ('dense', 'bf16-mixed', False, 'all'): (12.1, -0.2, 0.4, -8.2, 11.5, -1.1, -2.0, 0.2),
    ('dense', 'bf16-mixed', False, 'attention'): (12.5, -0.3, 0.6, -9.2, 22.2, -4.7, -1.0, 0.2),
    ('dense', 'bf16-mixed', True, 'all'): (12.0, 0.7, -0.9, -6.3, 4.1, -0.2, -1.2, 0.2),
    ('dense', 'bf16-mixed', True, 'attention'): (12.5, -0.3, 0.6, -9.2, 22.2, -4.7, -1.0, 0.2),
}
"""Bytes per token that a Gemma 2 layer (``model_type`` ``gemma2``: a norm after the attention and after the MLP, GELU,
the embedding scaled by ``sqrt(hidden_size)``) holds beyond the Llama layer under eager attention (the only one
transformers runs it with but flash attention), its soft-capping counted apart (:data:`SOFTCAP_MODEL_TYPES`), laid out
as :data:`GEMMA3_ACTIVATION_BYTES`. Least squares over torch's CPU profiler on the ``LAYER_FIT`` Gemma 2 decoders of
``python benchmarks/lora_activations.py --gemma2``, checked on its ``LAYER_CHECK`` ones."""

NEOX_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (-2.0, -4.0, -4.0, 1.8, -1.4, -2.5, -2.8, -1.5),
    4: (-3.0, -10.0, -6.1, 24.1, -1.0, -4.6, -2.1, -3.4),
    ('nf4', 'fp32', False, 'all'): (-1.1, -7.4, -2.1, 7.9, -0.4, -3.1, -0.7, -7.4),
    ('nf4', 'fp32', False, 'attention'): (-0.3, -9.7, -0.6, 12.3, 1.6, -9.5, 3.2, -7.4),
    ('nf4', 'fp32', True, 'all'): (-4.8, -7.4, -9.6, -15.8, -5.1, -6.3, -10.2, -7.4),
    ('nf4', 'fp32', True, 'attention'): (-4.3, -9.7, -8.6, 20.3, -2.4, -9.5, -4.8, -7.4),
    ('nf4', 'bf16', False, 'all'): (-2.5, -2.0, -5.0, 1.5, -5.0, 2.4, -10.0, -3.5),
    ('nf4', 'bf16', False, 'attention'): (-1.9, -3.1, -3.7, 0.1, -5.0, 2.4, -10.0, -3.5),
    ('nf4', 'bf16', True, 'all'): (-4.5, -2.3, -9.0, -6.8, -7.8, 2.4, -15.6, -3.5),
    ('nf4', 'bf16', True, 'attention'): (-3.9, -3.1, -7.7, 4.1, -7.0, 2.4, -14.0, -3.5),
    ('nf4', 'bf16-base-fp32-adapters', False, 'all'): (-4.5, -2.3, -9.0, -9.0, -7.8, 2.4, -15.6, -3.5),
    ('nf4', 'bf16-base-fp32-adapters', False, 'attention'): (-3.9, -3.1, -7.7, 0.1, -7.0, 2.4, -14.0, -3.5),
    ('nf4', 'bf16-base-fp32-adapters', True, 'all'): (-4.7, -2.3, -9.3, -38.7, -8.5, -3.6, -17.0, -3.5),
    ('nf4', 'bf16-base-fp32-adapters', True, 'attention'): (-5.5, -3.1, -10.9, 8.1, -8.6, 2.4, -17.2, -3.5),
    ('nf4', 'bf16-mixed', False, 'all'): (-2.5, -2.2, -5.1, 0.9, -5.1, 2.3, -10.2, -3.5),
    ('nf4', 'bf16-mixed', False, 'attention'): (-1.7, -3.3, -3.5, -1.1, -5.1, 2.4, -10.1, -3.5),
    ('nf4', 'bf16-mixed', True, 'all'): (-4.5, -2.5, -9.1, -7.8, -7.9, 2.3, -15.8, -3.5),
    ('nf4', 'bf16-mixed', True, 'attention'): (-3.7, -3.3, -7.5, 2.9, -7.1, 2.4, -14.1, -3.5),
    ('dense', 'fp32', False, 'all'): (-1.3, -8.1, -2.5, 18.6, 3.0, -8.2, 6.1, -7.4),
    ('dense', 'fp32', False, 'attention'): (0.5, -10.2, 0.9, -1.4, 3.1, -12.3, 6.1, -7.4),
    ('dense', 'fp32', True, 'all'): (-7.5, -8.1, -15.1, 32.8, -1.8, -8.3, -3.5, -7.4),
    ('dense', 'fp32', True, 'attention'): (-3.5, -10.2, -7.1, 6.6, -0.9, -12.3, -1.9, -7.4),
    ('dense', 'bf16', False, 'all'): (-0.7, -4.1, -1.4, -1.3, 0.0, -3.4, 0.0, -3.5),
    ('dense', 'bf16', False, 'attention'): (-0.2, -4.8, -0.4, -9.3, 0.0, -5.5, 0.1, -3.5),
    ('dense', 'bf16', True, 'all'): (-3.5, -4.1, -7.0, 0.7, -2.5, -4.5, -5.1, -3.5),
    ('dense', 'bf16', True, 'attention'): (-2.2, -4.8, -4.4, -5.3, -2.0, -5.5, -3.9, -3.5),
    ('dense', 'bf16-base-fp32-adapters', False, 'all'): (-5.6, -4.1, -11.1, 29.4, -2.5, -4.3, -5.0, -3.5),
    ('dense', 'bf16-base-fp32-adapters', False, 'attention'): (-2.6, -4.8, -5.2, -2.8, 3.3, -11.4, 6.5, -3.5),
    ('dense', 'bf16-base-fp32-adapters', True, 'all'): (-8.1, -4.1, -16.1, 36.7, -4.9, -4.3, -9.7, -3.5),
    ('dense', 'bf16-base-fp32-adapters', True, 'attention'): (-4.2, -4.8, -8.4, 5.2, 1.7, -11.4, 3.3, -3.5),
    ('dense', 'bf16-mixed', False, 'all'): (-4.2, -4.3, -8.4, 26.0, -1.4, -4.7, -2.9, -3.5),
    ('dense', 'bf16-mixed', False, 'attention'): (-1.4, -4.8, -2.9, -9.0, -1.0, -5.8, -1.9, -3.5),
    ('dense', 'bf16-mixed', True, 'all'): (-7.5, -4.4, -15.0, 46.1, -3.8, -4.7, -7.7, -3.5),
    ('dense', 'bf16-mixed', True, 'attention'): (-3.0, -4.8, -6.1, -1.0, -2.5, -5.9, -4.9, -3.5),
}
"""Bytes per token that a GPT-NeoX layer (``model_type`` ``gpt_neox``: Pythia; attention and MLP in parallel from one
residual, LayerNorms with biases, a fused ``query_key_value``, an MLP without a gate, rotary on part of each head)
holds beyond the Llama layer (negative where it holds less), with its own adapters (:data:`FUSED_LORA_TARGET_SETS`),
laid out as :data:`GEMMA3_ACTIVATION_BYTES`. Least squares over torch's CPU profiler on the ``LAYER_FIT`` GPT-NeoX
decoders of ``python benchmarks/lora_activations.py --neox``, checked on its ``LAYER_CHECK`` ones (one with rotary on
all of each head)."""

LORA_MODES = ("fp32", "bf16", "bf16-base-fp32-adapters", "bf16-mixed")
"""How a LoRA run holds and computes its tensors, by the element sizes that matter (fp16 counts as bf16):
``fp32`` everything fp32 (``32-true``); ``bf16`` base and adapters bf16 (``bf16-true`` converts both);
``bf16-base-fp32-adapters`` a bf16 base under fp32 adapters without autocast (``32-true`` with
``torch_dtype: bfloat16``: each adapter casts its input to fp32); ``bf16-mixed`` that model under bf16
autocast (``trainer.precision: bf16-mixed``)."""


OLMO2_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (4.7, 0.0, 8.2, 0.3, 7.7, -1.4, 6.8, 5.4),
    4: (5.7, -2.1, 7.2, -4.7, 5.2, -1.5, 5.3, 1.4),
    ('nf4', 'fp32', False, 'all'): (1.1, -0.1, 4.2, 0.8, 2.0, -0.1, 4.2, -6.6),
    ('nf4', 'fp32', False, 'attention'): (2.1, 0.8, 2.7, 0.0, 11.6, -2.4, 4.3, -6.6),
    ('nf4', 'fp32', True, 'all'): (4.9, -1.5, 5.6, -7.4, 6.4, -3.1, 7.0, -6.6),
    ('nf4', 'fp32', True, 'attention'): (-4.0, 1.8, 1.6, 18.4, 15.6, -2.4, 4.3, -6.6),
    ('nf4', 'bf16', False, 'all'): (2.8, -0.6, 5.6, -7.2, -6.0, 0.2, 4.3, -0.6),
    ('nf4', 'bf16', False, 'attention'): (3.4, 0.1, 4.9, -10.8, -4.1, 2.2, 4.3, -0.6),
    ('nf4', 'bf16', True, 'all'): (4.9, -1.3, 6.5, -12.8, -4.0, 0.2, 4.3, -0.6),
    ('nf4', 'bf16', True, 'attention'): (1.5, 0.6, 3.9, -2.7, -2.1, 2.2, 4.3, -0.6),
    ('nf4', 'bf16-base-fp32-adapters', False, 'all'): (5.0, -1.4, 6.6, -13.0, -6.1, 0.2, 4.2, -0.6),
    ('nf4', 'bf16-base-fp32-adapters', False, 'attention'): (1.5, 0.6, 3.9, -2.7, -2.1, 2.2, 4.3, -0.6),
    ('nf4', 'bf16-base-fp32-adapters', True, 'all'): (9.0, -2.7, 8.5, -24.5, -7.1, -3.1, 9.0, -0.6),
    ('nf4', 'bf16-base-fp32-adapters', True, 'attention'): (1.5, 0.6, 3.9, -2.7, -2.1, 2.2, 4.3, -0.6),
    ('nf4', 'bf16-mixed', False, 'all'): (3.0, -0.7, 5.8, -8.4, -6.1, 0.3, 4.3, -0.6),
    ('nf4', 'bf16-mixed', False, 'attention'): (4.1, 0.0, 4.8, -11.6, -4.2, 2.2, 4.3, -0.6),
    ('nf4', 'bf16-mixed', True, 'all'): (5.0, -1.4, 6.6, -12.9, -4.1, 0.3, 4.3, -0.6),
    ('nf4', 'bf16-mixed', True, 'attention'): (1.9, 0.5, 3.9, -3.2, -2.2, 2.2, 4.3, -0.6),
    ('dense', 'fp32', False, 'all'): (1.0, -0.1, 3.9, 2.8, 22.8, -4.6, 3.1, -6.6),
    ('dense', 'fp32', False, 'attention'): (-1.0, 1.3, 2.3, 7.9, 17.0, -2.4, 0.6, -6.6),
    ('dense', 'fp32', True, 'all'): (-0.4, 0.3, 3.1, 8.0, 14.4, -0.6, 3.1, -6.6),
    ('dense', 'fp32', True, 'attention'): (-1.0, 1.3, 2.3, 7.9, 21.0, -2.4, 0.6, -6.6),
    ('dense', 'bf16', False, 'all'): (0.9, -0.1, 3.9, 3.6, 14.7, -2.8, 4.3, -0.6),
    ('dense', 'bf16', False, 'attention'): (0.9, -0.1, 3.9, 3.6, 14.7, -4.8, 4.3, -0.6),
    ('dense', 'bf16', True, 'all'): (0.9, -0.1, 3.9, 3.6, 11.4, -2.4, 4.3, -0.6),
    ('dense', 'bf16', True, 'attention'): (0.9, -0.1, 3.9, 3.6, 16.7, -4.8, 4.3, -0.6),
    ('dense', 'bf16-base-fp32-adapters', False, 'all'): (0.4, 0.1, 3.7, 4.9, 5.1, -2.4, 2.2, -0.6),
    ('dense', 'bf16-base-fp32-adapters', False, 'attention'): (0.9, -0.1, 3.9, 3.6, 16.7, -4.8, 4.3, -0.6),
    ('dense', 'bf16-base-fp32-adapters', True, 'all'): (0.6, 0.8, 2.9, 2.4, 3.9, 0.2, 4.3, -0.6),
    ('dense', 'bf16-base-fp32-adapters', True, 'attention'): (0.9, -0.1, 3.9, 3.6, 16.7, -4.8, 4.3, -0.6),
    ('dense', 'bf16-mixed', False, 'all'): (0.8, -0.1, 3.9, 3.9, 7.1, -1.6, 2.5, -0.6),
    ('dense', 'bf16-mixed', False, 'attention'): (0.9, -0.1, 3.9, 3.6, 16.6, -4.8, 4.3, -0.6),
    ('dense', 'bf16-mixed', True, 'all'): (0.7, 0.7, 2.5, 6.4, -0.2, -0.7, 3.3, -0.6),
    ('dense', 'bf16-mixed', True, 'attention'): (0.9, -0.1, 3.9, 3.6, 16.6, -4.8, 4.3, -0.6),
}
"""Bytes per token that an OLMo 2 layer (``model_type`` ``olmo2``: OLMo-2 7B-32B; no norm before the attention and the
MLP but one after each, q/k RMSNorms over the whole query and key widths) holds beyond the Llama layer with
:func:`attention_extra_bytes`' width terms, laid out as :data:`GEMMA3_ACTIVATION_BYTES`. Least squares over torch's CPU
profiler on the ``LAYER_FIT`` OLMo 2 decoders of ``python benchmarks/lora_activations.py --olmo2``, checked on its
``LAYER_CHECK`` ones."""


GLM4_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (14.5, -0.1, 1.3, -4.5, 23.0, -1.6, -0.2, 2.6),
    4: (25.7, -2.3, 1.5, -11.4, 22.5, -1.5, -0.6, 0.9),
    ('nf4', 'fp32', False, 'all'): (34.1, -5.2, 5.3, -57.3, 6.0, -7.4, 2.6, -7.1),
    ('nf4', 'fp32', False, 'attention'): (31.9, -3.8, 3.3, -48.9, 15.7, -9.7, 2.6, -7.1),
    ('nf4', 'fp32', True, 'all'): (30.5, -7.4, 7.7, -80.5, -14.6, -9.6, 6.7, -7.1),
    ('nf4', 'fp32', True, 'attention'): (28.6, -3.7, 1.1, -44.0, 15.0, -9.8, 0.4, -7.1),
    ('nf4', 'bf16', False, 'all'): (26.6, -3.4, 1.8, -38.7, 1.2, -3.9, 1.2, -1.4),
    ('nf4', 'bf16', False, 'attention'): (24.2, -2.4, 1.5, -35.6, 1.2, -1.9, 1.2, -1.4),
    ('nf4', 'bf16', True, 'all'): (27.9, -4.7, 1.0, -50.2, -7.1, -4.0, 0.1, -1.4),
    ('nf4', 'bf16', True, 'attention'): (22.6, -2.3, 0.4, -33.1, 0.8, -1.9, 0.1, -1.4),
    ('nf4', 'bf16-base-fp32-adapters', False, 'all'): (28.1, -4.8, 1.0, -50.6, -9.2, -4.0, 0.1, -1.4),
    ('nf4', 'bf16-base-fp32-adapters', False, 'attention'): (22.6, -2.3, 0.4, -33.1, 0.8, -1.9, 0.1, -1.4),
    ('nf4', 'bf16-base-fp32-adapters', True, 'all'): (34.2, -7.4, 4.0, -79.3, -8.9, -9.9, 0.4, -1.4),
    ('nf4', 'bf16-base-fp32-adapters', True, 'attention'): (22.6, -2.3, 0.4, -33.1, 0.8, -1.9, 0.1, -1.4),
    ('nf4', 'bf16-mixed', False, 'all'): (28.0, -3.7, 1.9, -41.8, 0.8, -4.2, 1.2, -1.4),
    ('nf4', 'bf16-mixed', False, 'attention'): (25.1, -2.6, 1.4, -36.4, 1.0, -1.9, 1.3, -1.4),
    ('nf4', 'bf16-mixed', True, 'all'): (29.3, -5.1, 1.1, -53.3, -7.6, -4.3, 0.1, -1.4),
    ('nf4', 'bf16-mixed', True, 'attention'): (23.4, -2.5, 0.3, -33.9, 0.7, -1.9, 0.2, -1.4),
    ('dense', 'fp32', False, 'all'): (13.0, -0.3, 2.2, -7.8, 32.0, -4.5, 1.2, -7.1),
    ('dense', 'fp32', False, 'attention'): (10.9, 1.2, 0.6, -2.9, 26.3, -2.3, -1.3, -7.1),
    ('dense', 'fp32', True, 'all'): (1.6, -0.1, -0.1, -2.6, 10.9, -0.6, -0.9, -7.1),
    ('dense', 'fp32', True, 'attention'): (7.7, 1.3, -1.6, 2.1, 25.6, -2.4, -3.4, -7.1),
    ('dense', 'bf16', False, 'all'): (10.7, -0.2, 0.9, -3.2, 26.0, -2.9, 1.2, -1.4),
    ('dense', 'bf16', False, 'attention'): (10.7, -0.2, 0.9, -3.2, 26.1, -5.0, 1.2, -1.4),
    ('dense', 'bf16', True, 'all'): (5.0, -0.1, -0.2, -0.7, 16.3, -2.5, 0.1, -1.4),
    ('dense', 'bf16', True, 'attention'): (9.0, -0.1, -0.2, -0.7, 25.7, -5.0, 0.1, -1.4),
    ('dense', 'bf16-base-fp32-adapters', False, 'all'): (-14.6, 6.5, -2.4, 29.0, -5.1, 10.0, 0.1, -1.4),
    ('dense', 'bf16-base-fp32-adapters', False, 'attention'): (9.0, -0.1, -0.2, -0.7, 25.7, -5.0, 0.1, -1.4),
    ('dense', 'bf16-base-fp32-adapters', True, 'all'): (-9.8, 4.5, -2.3, 13.3, -7.2, 8.0, 0.1, -1.4),
    ('dense', 'bf16-base-fp32-adapters', True, 'attention'): (9.0, -0.1, -0.2, -0.7, 25.7, -5.0, 0.1, -1.4),
    ('dense', 'bf16-mixed', False, 'all'): (5.9, 0.2, -0.5, 1.3, 14.7, -2.6, -1.4, -1.4),
    ('dense', 'bf16-mixed', False, 'attention'): (9.0, -0.1, -0.1, -0.7, 25.7, -5.0, 0.2, -1.4),
    ('dense', 'bf16-mixed', True, 'all'): (1.9, 1.1, -1.7, 2.7, 4.4, -1.6, -1.8, -1.4),
    ('dense', 'bf16-mixed', True, 'attention'): (9.0, -0.1, -0.1, -0.7, 25.7, -5.0, 0.2, -1.4),
}
"""Bytes per token that a GLM-4 layer (``model_type`` ``glm4``: GLM-4-0414, GLM-Z1; a norm after the attention and after
the MLP beside Llama's two, a fused ``gate_up_proj`` whose output is split, rotary on half of each head, q/k/v biases)
holds beyond the Llama layer with :func:`attention_extra_bytes`' width terms and its own adapters
(:data:`FUSED_LORA_TARGET_SETS`: one on ``gate_up_proj``; an NF4 base decodes it, twice Llama's largest matrix), laid
out as :data:`GEMMA3_ACTIVATION_BYTES`. Least squares over torch's CPU profiler on the ``LAYER_FIT`` GLM-4 decoders of
``python benchmarks/lora_activations.py --glm4``, checked on its ``LAYER_CHECK`` ones."""


EXAONE4_ACTIVATION_BYTES: dict[int | tuple[str, str, bool, str], tuple[float, ...]] = {
    # entry: (full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)
    2: (0.4, 0.0, 6.1, -1.0, 8.4, -1.6, 4.7, 2.9),
    4: (5.7, -2.1, 7.3, -4.5, 5.3, -1.6, 5.3, 1.4),
    ('nf4', 'fp32', False, 'all'): (1.0, -0.1, 4.3, 1.0, 2.1, -0.1, 4.3, -6.6),
    ('nf4', 'fp32', False, 'attention'): (2.0, 0.8, 2.8, 0.2, 11.6, -2.4, 4.3, -6.6),
    ('nf4', 'fp32', True, 'all'): (4.8, -1.5, 5.7, -7.2, 6.4, -3.1, 7.1, -6.6),
    ('nf4', 'fp32', True, 'attention'): (-4.1, 1.8, 1.7, 18.6, 15.6, -2.4, 4.3, -6.6),
    ('nf4', 'bf16', False, 'all'): (2.4, -0.6, 5.5, -6.5, -7.4, 0.0, 4.2, -1.1),
    ('nf4', 'bf16', False, 'attention'): (3.1, 0.1, 4.9, -10.1, -7.4, 2.1, 4.2, -1.1),
    ('nf4', 'bf16', True, 'all'): (4.6, -1.4, 6.5, -12.1, -7.4, 0.0, 4.2, -1.1),
    ('nf4', 'bf16', True, 'attention'): (1.2, 0.6, 3.8, -2.0, -5.4, 2.1, 4.2, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', False, 'all'): (4.6, -1.4, 6.5, -12.3, -9.4, 0.0, 4.2, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', False, 'attention'): (1.2, 0.6, 3.8, -2.0, -5.4, 2.1, 4.2, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', True, 'all'): (8.7, -2.7, 8.4, -23.8, -3.7, -4.4, 7.3, -1.1),
    ('nf4', 'bf16-base-fp32-adapters', True, 'attention'): (1.2, 0.6, 3.8, -2.0, -5.4, 2.1, 4.2, -1.1),
    ('nf4', 'bf16-mixed', False, 'all'): (2.7, -0.7, 5.8, -7.7, -7.5, 0.1, 4.2, -1.1),
    ('nf4', 'bf16-mixed', False, 'attention'): (3.8, 0.0, 4.7, -10.9, -7.6, 2.1, 4.2, -1.1),
    ('nf4', 'bf16-mixed', True, 'all'): (4.7, -1.4, 6.5, -12.2, -7.5, 0.1, 4.2, -1.1),
    ('nf4', 'bf16-mixed', True, 'attention'): (1.6, 0.5, 3.8, -2.5, -5.6, 2.1, 4.2, -1.1),
    ('dense', 'fp32', False, 'all'): (0.9, -0.1, 3.9, 3.0, 22.8, -4.7, 3.1, -6.6),
    ('dense', 'fp32', False, 'attention'): (-1.1, 1.3, 2.4, 8.0, 17.0, -2.4, 0.6, -6.6),
    ('dense', 'fp32', True, 'all'): (-0.5, 0.3, 3.1, 8.2, 14.4, -0.6, 3.1, -6.6),
    ('dense', 'fp32', True, 'attention'): (-1.1, 1.3, 2.4, 8.0, 21.0, -2.4, 0.6, -6.6),
    ('dense', 'bf16', False, 'all'): (0.6, -0.1, 3.8, 4.3, 15.3, -3.0, 4.2, -1.1),
    ('dense', 'bf16', False, 'attention'): (0.6, -0.1, 3.8, 4.3, 15.4, -5.1, 4.2, -1.1),
    ('dense', 'bf16', True, 'all'): (0.6, -0.1, 3.8, 4.3, 12.0, -2.6, 4.2, -1.1),
    ('dense', 'bf16', True, 'attention'): (0.6, -0.1, 3.8, 4.3, 17.4, -5.1, 4.2, -1.1),
    ('dense', 'bf16-base-fp32-adapters', False, 'all'): (0.0, 0.1, 3.6, 5.6, 7.2, -4.1, 2.7, -1.1),
    ('dense', 'bf16-base-fp32-adapters', False, 'attention'): (0.6, -0.1, 3.8, 4.3, 17.4, -5.1, 4.2, -1.1),
    ('dense', 'bf16-base-fp32-adapters', True, 'all'): (0.3, 0.8, 2.8, 3.1, 0.6, 0.1, 4.2, -1.1),
    ('dense', 'bf16-base-fp32-adapters', True, 'attention'): (0.6, -0.1, 3.8, 4.3, 17.4, -5.1, 4.2, -1.1),
    ('dense', 'bf16-mixed', False, 'all'): (0.4, -0.1, 3.8, 4.6, 9.3, -3.4, 3.0, -1.1),
    ('dense', 'bf16-mixed', False, 'attention'): (0.6, -0.1, 3.9, 4.3, 17.4, -5.1, 4.2, -1.1),
    ('dense', 'bf16-mixed', True, 'all'): (0.4, 0.7, 2.4, 7.1, 4.3, -2.2, 1.3, -1.1),
    ('dense', 'bf16-mixed', True, 'attention'): (0.6, -0.1, 3.9, 4.3, 17.4, -5.1, 4.2, -1.1),
}
"""Bytes per token that an EXAONE 4 layer (``model_type`` ``exaone4``: EXAONE-4.0 1.2B and 32B; OLMo 2's layout, a norm
after the attention and after the MLP instead of before, with q/k RMSNorms per head; sliding windows in three layers of
four, their masks counted as Gemma 3's) holds beyond the Llama layer with :func:`attention_extra_bytes`' width terms,
laid out as :data:`GEMMA3_ACTIVATION_BYTES`. Least squares over torch's CPU profiler on the ``LAYER_FIT`` EXAONE 4
decoders of ``python benchmarks/lora_activations.py --exaone4``, checked on its ``LAYER_CHECK`` ones."""


def _granite_activation_bytes() -> dict[int | tuple[str, str, bool, str], tuple[float, ...]]:
    """:data:`GRANITE_ACTIVATION_BYTES`: every full-weight dtype and LoRA entry, from the element size ``d`` its hidden
    states take (the full-weight dtype's; 4 in LoRA ``fp32`` mode, else 2)."""
    table: dict = {d: (0.0, 0.0, 0.0, 0.0, float(d), 0.0, 0.0, 0.0) for d in (2, 4)}
    lora_entries = itertools.product(("nf4", "dense"), LORA_MODES, (False, True), ("all", "attention"))
    for base, mode, dropped, targets in lora_entries:
        d = 4.0 if mode == "fp32" else 2.0
        table[(base, mode, dropped, targets)] = (0.0, 0.0, 0.0, 0.0, d, 0.0, 0.0, d)
    return table


GRANITE_ACTIVATION_BYTES = _granite_activation_bytes()
"""What a Granite layer (``model_type`` ``granite``: Llama's layer with its residual branches scaled by
``residual_multiplier``, the embedding by ``embedding_multiplier``, the logits divided by ``logits_scaling``) holds
beyond Llama's, laid out as :data:`GEMMA3_ACTIVATION_BYTES`: with checkpointing, one more ``hidden_size``-wide tensor
of the hidden states' element size ``d`` per token in the recomputed layer, and under LoRA one more held once (``d *
h`` each); nothing without checkpointing. Not fitted: torch's CPU profiler measured exactly these bytes against Llama
decoders of the same shapes (``python benchmarks/lora_activations.py --granite`` checks every setting)."""

LAYER_ACTIVATION_BYTES: dict[str, dict] = {"gemma3_text": GEMMA3_ACTIVATION_BYTES, "phi3": PHI3_ACTIVATION_BYTES,
                                           "gemma2": GEMMA2_ACTIVATION_BYTES, "gpt_neox": NEOX_ACTIVATION_BYTES,
                                           "granite": GRANITE_ACTIVATION_BYTES, "olmo2": OLMO2_ACTIVATION_BYTES,
                                           "olmo3": OLMO2_ACTIVATION_BYTES, "glm4": GLM4_ACTIVATION_BYTES,
                                           "exaone4": EXAONE4_ACTIVATION_BYTES}
"""``model_type -> table`` of what a decoder layer holds beyond Llama's (OLMo 3's layer is OLMo 2's), laid out as
:data:`GEMMA3_ACTIVATION_BYTES`: entry (full-weight dtype bytes or LoRA ``(base, mode, dropout > 0, targets)``) ``->
(full_h, full_i, full_qk, full_once_h, layer_h, layer_i, layer_qk, layer_once_h)``."""


def _layer_family_terms(config, entry: int | tuple[str, str, bool, str], checkpointing: bool) -> tuple[float, float]:
    """``(bytes per token per layer, bytes per token once)`` of ``entry`` in the :data:`LAYER_ACTIVATION_BYTES` table
    of ``config``'s ``model_type`` (``(0, 0)`` for a Llama layer); ``checkpointing``: the per-layer part is the
    recomputed layer's."""
    table = LAYER_ACTIVATION_BYTES.get(_model_type(config))
    if table is None:
        return 0.0, 0.0
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    per_h, per_i, per_qk, once_h = table[entry][4:] if checkpointing else table[entry][:4]
    return per_h * h + per_i * i + per_qk * sum(attention_widths(config)), once_h * h


def unmodelled_layer(config, seq_len: int) -> str:
    """What the activation formulas were not fitted to in a config of a modelled type (``""``: nothing): Gemma 3 with
    logit soft-capping, Phi-3 and GPT-NeoX with dropout (their released configs have none), Seed-OSS with dropout
    (transformers' ``SeedOssConfig`` defaults to 0.1: train with ``attention_dropout`` and ``residual_dropout`` at 0
    for an estimate), GPT-NeoX without its parallel residual."""
    get = _config_getter(config)
    if _model_type(config) == "gemma3_text":
        capping = {key: get(key) for key in ("final_logit_softcapping", "attn_logit_softcapping")
                   if get(key) is not None}
        return "Gemma 3 with logit soft-capping (" + _settings(capping) + ")" if capping else ""
    if _model_type(config) == "phi3":
        dropout = {key: get(key) for key in ("resid_pdrop", "embd_pdrop", "attention_dropout") if get(key)}
        return "Phi-3 with dropout (" + _settings(dropout) + ")" if dropout else ""
    if _model_type(config) == "olmoe" and get("clip_qkv") is not None:
        return f"OLMoE with clip_qkv={get('clip_qkv')!r}"
    if _model_type(config) == "seed_oss":
        dropout = {key: get(key) for key in ("attention_dropout", "residual_dropout") if get(key)}
        return "Seed-OSS with dropout (" + _settings(dropout) + ")" if dropout else ""
    if _model_type(config) == "gpt_neox":
        if get("use_parallel_residual") is False:
            return "GPT-NeoX without the parallel residual (use_parallel_residual=False)"
        dropout = {key: get(key) for key in ("attention_dropout", "hidden_dropout") if get(key)}
        return "GPT-NeoX with dropout (" + _settings(dropout) + ")" if dropout else ""
    return ""


def _settings(values: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in values.items())


def sliding_window_layers(config, seq_len: int) -> int:
    """How many layers attend through a sliding window shorter than ``seq_len``: each builds a ``seq_len**2`` mask, as
    packed documents do (0 within the window). Read from ``layer_types`` (Gemma 3; Qwen2/3 with
    ``use_sliding_window``, SmolLM3); a Mistral, Ministral 3 or Phi-3 config without them slides in every layer
    (profiled: Gemma 3, Mistral, Qwen2, Phi-3)."""
    get = _config_getter(config)
    window, types, model_type = get("sliding_window"), get("layer_types"), _model_type(config)
    if model_type not in ACTIVATION_MODEL_TYPES or window is None or seq_len <= window:
        return 0
    if types:
        return sum(kind == "sliding_attention" for kind in types)
    if model_type in ("mistral", "ministral3", "phi3"):
        return _config_value(config, "num_hidden_layers")
    if model_type == "gemma3_text":
        raise ValueError("Invalid config: a Gemma 3 config without layer_types (which layers slide).")
    return 0


def _attention_masks(config, batch_size: int, seq_len: int, dtype_bytes: int,
                     isolate_documents: bool, attention: str = "sdpa") -> tuple[int, int, int]:
    """``(mask bytes, rotary bytes, layers holding a float copy of the mask)`` under SDPA: packed documents kept apart
    mask every layer (:func:`document_mask_terms`); else a sliding window shorter than the sequence masks its layers
    (:func:`sliding_window_layers`, no rotary tables of their own); else none. Under eager attention the one mask is
    :func:`_eager_terms`' (the packed or sliding one in place of the causal one): the rotary tables only."""
    if attention == "eager":
        rotary = document_mask_terms(config, batch_size, seq_len, dtype_bytes)[1] if isolate_documents else 0
        return 0, rotary, 0
    if isolate_documents:
        return (*document_mask_terms(config, batch_size, seq_len, dtype_bytes),
                _config_value(config, "num_hidden_layers"))
    sliding = sliding_window_layers(config, seq_len)
    return (batch_size * seq_len**2 if sliding else 0), 0, sliding


ATTENTIONS = ("sdpa", "eager")
"""transformers' attention implementations the activation formulas model: ``sdpa`` (the default; no ``seq**2`` term
but masks) and ``eager`` (:data:`EAGER_ATTENTION_BYTES`)."""

EAGER_ATTENTION_BYTES: dict[tuple[int, bool], tuple[float, float, float]] = {
    # (attention's element size, checkpointing): (per score, per repeated key/value element, per mask element)
    (2, False): (6.4, 0.2, -5.5),
    (2, True): (6.1, 3.4, 1.0),
    (4, False): (4.9, 0.3, -8.2),
    (4, True): (4.7, 1.6, 0.6),
}
"""What eager attention holds beyond SDPA's, by the element size attention computes in (2: bf16/fp16 weights, LoRA
other than fp32; 4: fp32) and checkpointing: bytes per attention score (``batch * heads * seq**2`` per held layer:
the fp32 softmax and its cast, the scores' transients in backward), per element of the keys and values ``repeat_kv``
copies for grouped-query attention (``batch * seq * 2 * (heads - kv_heads) * head_dim`` per held layer), and per
element of the float causal mask built once (``batch * seq**2``; packed documents and a sliding window in every layer
replace it). A held layer is every layer without checkpointing, the recomputed one with it. Least squares of eager's
peak less SDPA's under torch's CPU profiler (``python benchmarks/lora_activations.py --eager``: Llama decoders, heads,
key/value heads, layers and lengths varied), checked on Llama, Qwen3, Phi-3 and Gemma 3."""


def _eager_terms(config, batch_size: int, seq_len: int, compute_bytes: int, checkpointing: bool,
                 attention: str) -> tuple[int, int]:
    """``(bytes per held layer, bytes once)`` that ``attention`` adds (:data:`EAGER_ATTENTION_BYTES`; ``(0, 0)`` for
    SDPA)."""
    if attention == "sdpa":
        return 0, 0
    per_score, per_repeated, per_mask = EAGER_ATTENTION_BYTES[(compute_bytes, checkpointing)]
    per_score += compute_bytes if _softcapped(config, "attn_logit_softcapping") else 0
    heads = _config_value(config, "num_attention_heads")
    kv = _optional_config_value(config, "num_key_value_heads") or heads
    repeated = batch_size * seq_len * 2 * (heads - kv) * _head_dim(config)
    layer = per_score * batch_size * heads * seq_len**2 + per_repeated * repeated
    return int(layer), int(per_mask * batch_size * seq_len**2)


def unmodelled_attention(config, seq_len: int, attention: str) -> str:
    """What the formulas were not fitted to in ``attention`` (``""``: nothing): an implementation other than
    :data:`ATTENTIONS`, gpt-oss under one other than eager, and eager attention where some layers but not all slide
    (two masks; profiled for gpt-oss only, :data:`GPT_OSS_ACTIVATION_BYTES`)."""
    if _model_type(config) == "gpt_oss" and attention != "eager":
        return f"gpt-oss under attention {attention!r} (fitted to 'eager', the one transformers runs it with)"
    if attention not in ATTENTIONS:
        return f"attention {attention!r} (fitted to {', '.join(repr(a) for a in ATTENTIONS)})"
    sliding = sliding_window_layers(config, seq_len)
    if attention == "eager" and 0 < sliding < _config_value(config, "num_hidden_layers"):
        return f"eager attention with a sliding window shorter than the sequence in {sliding} of the layers"
    return ""


SOFTCAP_MODEL_TYPES = ("gemma2",)
"""``config.model_type`` values whose logit soft-capping the formulas model: ``cap * tanh(x / cap)`` on the attention
scores (``attn_logit_softcapping``, under eager attention) holds one more score-sized tensor of the attention's element
size per held layer, and on the logits (``final_logit_softcapping``) one more logit-sized one at the loss (torch's CPU
profiler, Gemma 2: exactly 2.00 B per score and per logit in bf16, 4.00 in fp32)."""


def _softcapped(config, key: str) -> bool:
    """Whether a :data:`SOFTCAP_MODEL_TYPES` config caps its logits at ``key`` (``attn_logit_softcapping`` or
    ``final_logit_softcapping``)."""
    return _model_type(config) in SOFTCAP_MODEL_TYPES and _config_getter(config)(key) is not None


def _loss_bytes_per_vocab(config, compute_bytes: int) -> int:
    """Bytes per token per vocabulary entry at the loss: :data:`LOSS_BYTES_PER_VOCAB`, and the tanh of soft-capped
    logits (:data:`SOFTCAP_MODEL_TYPES`)."""
    return LOSS_BYTES_PER_VOCAB + (compute_bytes if _softcapped(config, "final_logit_softcapping") else 0)


def _check_attention(config, seq_len: int, attention: str) -> None:
    reason = unmodelled_attention(config, seq_len, attention)
    if reason:
        raise ValueError(f"Invalid attention={attention!r} / seq_len={seq_len}: activations are not modelled for "
                         f"{reason}.")


def _check_modelled_layer(config, seq_len: int) -> None:
    reason = unmodelled_layer(config, seq_len)
    if reason:
        raise ValueError(f"Invalid config / seq_len={seq_len}: activations are not modelled for {reason}.")


def activation_bytes(config, batch_size: int, seq_len: int, dtype_bytes: int = 2,
                     gradient_checkpointing: bool = True, isolate_documents: bool = False,
                     attention: str = "sdpa") -> int:
    """Peak activation bytes of one forward + backward of a Llama-style decoder (HF ``LlamaForCausalLM``
    and its kin, SDPA attention, so no ``seq_len**2`` term), gradients of the weights not included.

    With ``n = batch_size * seq_len`` tokens, ``h``/``i``/``L``/``V`` the config's ``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``vocab_size``, ``d = dtype_bytes`` and the
    coefficients of :data:`ACTIVATION_COEFFICIENTS` (``c``) and :data:`LOSS_BYTES_PER_VOCAB` (12):

    * gradient checkpointing: ``n * ((L + 1) * d * h + max(c.layer_h * h + c.layer_i * i + A, 12 * V + 2 * d *
      h))`` -- each layer's input kept, plus the larger of one layer recomputed in backward and the loss;
    * without: ``n * (L * (c.full_h * h + c.full_i * i + A) + 12 * V + c.rest_h * h)`` -- every layer's saved
      tensors at once, then the loss.

    ``A`` (:func:`attention_extra_bytes`) is what an attention other than Llama's ``hidden_size``-wide one adds per
    token per layer (0 for Llama-2): grouped-query attention and a ``head_dim`` of its own, Qwen3's q/k norms; a
    Gemma 3 layer adds :data:`GEMMA3_ACTIVATION_BYTES` to it and a once-per-model term to the total.

    ``isolate_documents``: packed documents kept apart (``TextDataModule``'s default with ``pack=True``: batches
    with ``position_ids`` restarting at each document), which adds :func:`document_mask_terms` (SDPA's
    block-diagonal mask; ``s = seq_len`` bytes per token of it) -- ``(1 + d) * s`` per token to the recomputed
    layer and ``s`` to the loss phase with checkpointing, ``L * d * s`` without -- plus the per-row rotary tables.

    ``attention="eager"`` (transformers' eager attention, which holds the ``seq**2`` scores) adds
    :func:`_eager_terms`: its per-layer bytes to the recomputed layer with checkpointing, ``L`` times without, and its
    mask once.

    Within 5% of torch's CPU profiler on the sizes it was fitted to (and checked at others in
    ``tests/test_estimate.py``, packed documents too); the GPU kernels save the same tensors
    (``benchmarks/gpu_check.py`` ``full_ft_7b`` measures it, unpacked). Not modelled: mixed precision (autocast);
    LoRA / 4-bit models: :func:`lora_activation_bytes`; attention other than SDPA and eager.
    """
    if dtype_bytes not in ACTIVATION_COEFFICIENTS:
        raise ValueError(f"Invalid dtype_bytes={dtype_bytes!r}: expected 2 (bf16/fp16) or 4 (fp32).")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}: expected an int >= 1.")
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    layers, vocab = _config_value(config, "num_hidden_layers"), _config_value(config, "vocab_size")
    _check_modelled_layer(config, seq_len)
    _check_attention(config, seq_len, attention)
    c, d = ACTIVATION_COEFFICIENTS[dtype_bytes], dtype_bytes
    family_layer, once = _layer_family_terms(config, dtype_bytes, gradient_checkpointing)
    widths = attention_extra_bytes(config, dtype_bytes) + family_layer
    loss = _loss_bytes_per_vocab(config, d) * vocab
    mask, rotary, masked = _attention_masks(config, batch_size, seq_len, d, isolate_documents, attention)
    eager_layer, eager_once = _eager_terms(config, batch_size, seq_len, d, gradient_checkpointing, attention)
    n = batch_size * seq_len
    mask_per_token = mask // n
    if gradient_checkpointing:
        per_token = (layers + 1) * d * h + once
        return int(n * per_token + max(n * (c["layer_h"] * h + c["layer_i"] * i + widths + (1 + d) * mask_per_token)
                                       + eager_layer, n * (loss + 2 * d * h + mask_per_token))) + eager_once + rotary
    per_token = (layers * (c["full_h"] * h + c["full_i"] * i + widths) + masked * d * mask_per_token + loss
                 + c["rest_h"] * h + once)
    return int(n * per_token) + layers * eager_layer + eager_once + rotary


def document_mask_terms(config, batch_size: int, seq_len: int, dtype_bytes: int) -> tuple[int, int]:
    """``(mask, rotary)`` bytes that packed documents kept apart add to a Llama-style decoder under SDPA attention
    (``position_ids`` restarting at each document, no ``attention_mask``: what ``TextDataModule`` batches with
    ``isolate_documents=True``): ``mask = batch_size * seq_len**2``, transformers' bool block-diagonal mask, which
    SDPA turns into a float mask of ``dtype_bytes * mask`` in every layer and keeps for backward (how
    :func:`activation_bytes` and :func:`lora_activation_bytes` place them is in their docstrings); ``rotary = 2 *
    (batch_size - 1) * seq_len * head_dim * dtype_bytes``, the cos and sin tables of each row's positions (one row's
    without ``position_ids``). Measured with torch's CPU profiler (``tests/test_data_packing.py``) and checked at
    other sizes (``tests/test_estimate.py``: what packing adds within 15% of the profiler's, fp32 and bf16, with and
    without checkpointing, full-weight and QLoRA); modelled for ``sdpa``, the attention transformers picks for these
    models: ``eager`` builds a float causal mask either way (the packed one costs nothing more) and
    ``flash_attention_*`` none, but their attention is not what :func:`activation_bytes` was fitted to."""
    return batch_size * seq_len**2, 2 * (batch_size - 1) * seq_len * _head_dim(config) * dtype_bytes


LORA_TARGET_SETS = {
    "all": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "attention": frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
}
"""The adapted projections :func:`lora_activation_bytes` models: all seven of a Llama layer (QLoRA's
choice) or the four attention ones."""

FUSED_LORA_TARGET_SETS = {
    "phi3": {"all": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
             "attention": frozenset({"qkv_proj", "o_proj"})},
    "gpt_neox": {"all": frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}),
                 "attention": frozenset({"query_key_value", "dense"})},
    "glm4": {"all": frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}),
             "attention": frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})},
}
""":data:`LORA_TARGET_SETS` of decoders whose layer fuses Llama's projections (Phi-3: ``qkv_proj`` for ``q/k/v_proj``,
``gate_up_proj`` for ``gate_proj`` and ``up_proj``; GPT-NeoX: ``query_key_value``, and an MLP without a gate; GLM-4:
``gate_up_proj``), by ``config.model_type``: one adapter per projection."""


def lora_target_sets(config) -> dict[str, frozenset]:
    """:data:`LORA_TARGET_SETS` in the projection names of ``config``'s ``model_type`` (:data:`FUSED_LORA_TARGET_SETS`
    where its layer fuses them)."""
    return FUSED_LORA_TARGET_SETS.get(_model_type(config), LORA_TARGET_SETS)

LORA_ACTIVATION_COEFFICIENTS: dict[tuple[str, str, bool, str], tuple[float, float, float, float, float]] = {
    # (base, mode, dropout > 0, targets): (full_h, full_i, rest_h, layer_h, layer_i)
    ("dense", "bf16", False, "all"): (19.7, 8.1, 1.2, 23.8, 11.2),
    ("dense", "bf16", False, "attention"): (17.7, 6.1, 1.2, 21.7, 11.3),
    ("dense", "bf16", True, "all"): (39.7, 10.1, -4.8, 49.1, 12.8),
    ("dense", "bf16", True, "attention"): (31.7, 6.1, -4.8, 35.7, 11.3),
    ("dense", "bf16-base-fp32-adapters", False, "all"): (39.7, 10.1, 1.2, 50.5, 18.2),
    ("dense", "bf16-base-fp32-adapters", False, "attention"): (31.7, 6.1, 1.2, 35.7, 11.3),
    ("dense", "bf16-base-fp32-adapters", True, "all"): (61.2, 14.2, -3.5, 76.6, 20.2),
    ("dense", "bf16-base-fp32-adapters", True, "attention"): (47.7, 6.1, -10.8, 51.7, 11.3),
    ("dense", "bf16-mixed", False, "all"): (29.5, 8.6, 0.7, 38.8, 15.3),
    ("dense", "bf16-mixed", False, "attention"): (25.0, 6.1, 0.7, 29.0, 11.3),
    ("dense", "bf16-mixed", True, "all"): (48.9, 13.6, -5.4, 62.8, 23.3),
    ("dense", "bf16-mixed", True, "attention"): (41.0, 6.1, -11.3, 45.0, 11.3),
    ("dense", "fp32", False, "all"): (31.6, 16.1, 2.0, 29.0, 24.1),
    ("dense", "fp32", False, "attention"): (24.1, 12.9, 6.5, 25.1, 24.2),
    ("dense", "fp32", True, "all"): (71.6, 20.1, -10.0, 81.2, 24.2),
    ("dense", "fp32", True, "attention"): (52.1, 12.9, -5.5, 53.1, 24.2),
    ("nf4", "bf16", False, "all"): (19.7, 8.1, 1.2, 24.5, 8.2),
    ("nf4", "bf16", False, "attention"): (14.8, 6.3, 9.0, 22.6, 6.2),
    ("nf4", "bf16", True, "all"): (39.7, 10.1, -4.8, 46.5, 8.2),
    ("nf4", "bf16", True, "attention"): (28.8, 6.3, 3.0, 36.6, 6.2),
    ("nf4", "bf16-base-fp32-adapters", False, "all"): (39.7, 10.1, 1.2, 48.5, 8.2),
    ("nf4", "bf16-base-fp32-adapters", False, "attention"): (28.8, 6.3, 9.0, 36.6, 6.2),
    ("nf4", "bf16-base-fp32-adapters", True, "all"): (63.7, 14.1, -10.8, 62.6, 14.8),
    ("nf4", "bf16-base-fp32-adapters", True, "attention"): (44.8, 6.3, -3.0, 52.6, 6.2),
    ("nf4", "bf16-mixed", False, "all"): (21.5, 8.6, 0.7, 26.2, 8.5),
    ("nf4", "bf16-mixed", False, "attention"): (15.2, 6.5, 10.2, 24.0, 6.2),
    ("nf4", "bf16-mixed", True, "all"): (41.5, 10.6, -5.3, 48.2, 8.5),
    ("nf4", "bf16-mixed", True, "attention"): (29.2, 6.5, 4.2, 38.0, 6.2),
    ("nf4", "fp32", False, "all"): (31.6, 16.1, 2.0, 32.5, 16.5),
    ("nf4", "fp32", False, "attention"): (22.2, 13.0, 11.9, 19.0, 18.9),
    ("nf4", "fp32", True, "all"): (71.6, 20.1, -10.0, 71.6, 19.9),
    ("nf4", "fp32", True, "attention"): (50.2, 13.0, -0.1, 47.0, 18.9),
}
"""Bytes per token per unit of ``hidden_size`` / ``intermediate_size`` of a LoRA decoder in
:func:`lora_activation_bytes`: ``full_*`` one layer's saved tensors and ``rest_h`` the rest without
checkpointing, ``layer_*`` one layer recomputed and differentiated with it; by base (``nf4``: our
``Linear4bit`` under our ``LoraLinear4bit``; ``dense``: a frozen ``nn.Linear`` under peft's ``lora.Linear``),
:data:`LORA_MODES` mode, dropout > 0 (peft uses ``nn.Identity`` at 0: no copy, no mask) and
:data:`LORA_TARGET_SETS` key. Least squares over torch's CPU profiler at the four ``FIT`` sizes of
``benchmarks/lora_activations.py`` (``--fit`` prints the table again; rank 16, the rank terms and the CPU
decode transient taken out first), checked at its three ``CHECK`` sizes (``--check``; ``tests/test_estimate.py``
profiles eight settings there, every entry under ``-m slow``). The adapters' extra tensors -- each adapter's own
dropout output and mask, its own fp32 or autocast copy of the input -- are why they differ from
:data:`ACTIVATION_COEFFICIENTS`."""

NF4_DEQUANTIZE_BYTES = {"cuda": {2: 2, 4: 4}, "cpu": {2: 10, 4: 8}}
"""Transient bytes per weight while a ``Linear4bit`` multiplies, by device and compute element size: on
CUDA the Triton kernel writes the dense weight once (the element size); on the CPU the PyTorch reference
also holds the int32 codes and fp32 values (torch's profiler: 10.0 B/weight into bf16, 8.06 into fp32)."""

MOE_ACTIVATION_MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss")
"""MoE ``config.model_type`` values :func:`lora_activation_bytes` models: a Llama-style decoder layer (Qwen3's with
its q/k norms) with transformers' experts in every layer (:data:`MOE_CONFIG_KEYS`: how many of what width, and
``num_experts_per_tok`` per token) in NF4 (:class:`~lowmem_lightning.quant.Experts4bit`), under LoRA on the four
attention projections (what the recipes' LoRA lands on there). Fitted on Mixtral, checked on Qwen3-MoE (``python
benchmarks/lora_activations.py --widths``) and OLMoE (Qwen3-MoE's layer: q/k norms, no shared expert; its
``clip_qkv`` not modelled); Qwen2-MoE's shared expert, with or without LoRA on it (the recipes' seven
names adapt it), adds :data:`SHARED_EXPERT_ACTIVATION_BYTES`; gpt-oss (eager attention with sinks, sliding windows in
every other layer, biased experts) adds :data:`GPT_OSS_ACTIVATION_BYTES`. Not modelled: other MoE layers (dense layers
among the sparse ones, ...), a dense or full-weight base."""

MOE_CONFIG_KEYS = {"mixtral": ("intermediate_size", "num_local_experts"),
                   "qwen3_moe": ("moe_intermediate_size", "num_experts"),
                   "qwen2_moe": ("moe_intermediate_size", "num_experts"),
                   "olmoe": ("intermediate_size", "num_experts"),
                   "gpt_oss": ("intermediate_size", "num_local_experts")}
"""``model_type -> (config key of one expert's intermediate size, config key of the experts per layer)``."""

MOE_LORA_ACTIVATION_COEFFICIENTS: dict[str, tuple[float, float, float, float, float, float]] = {
    # mode: (full_ki, full_kh, full_e, layer_ki, layer_kh, layer_e)
    "fp32": (12.7, 8.0, 0.0, 13.4, 9.4, 37.7),
    "bf16": (6.5, 4.0, 0.0, 5.1, 4.8, 94.1),
    "bf16-base-fp32-adapters": (6.5, 4.0, 0.0, 5.1, 4.8, 94.1),
    "bf16-mixed": (6.6, 3.9, 0.0, 5.1, 4.8, 94.7),
}
"""Bytes per token of an MoE layer's experts in :func:`lora_activation_bytes`, in place of the Llama MLP's ``i``
terms: ``ki * K * i + kh * K * h + e * E`` with ``K`` experts per token of ``intermediate_size`` ``i`` among ``E``
(the tokens each expert takes, its gate/up/down intermediates, the routing tensors); ``full_*`` one layer's saved
tensors without checkpointing, ``layer_*`` one layer recomputed and differentiated with it. Least squares over
torch's CPU profiler at the ``MOE_FIT`` sizes of ``benchmarks/lora_activations.py`` (``--moe`` prints the table
again and checks its ``MOE_CHECK`` sizes), with the Llama attention terms of :data:`LORA_ACTIVATION_COEFFICIENTS`
and the decode transient of one expert's ``gate_up`` matrix taken out first."""

SHARED_EXPERT_ACTIVATION_BYTES: dict[tuple[str, bool, str], tuple[float, ...]] = {
    # (mode, dropout > 0, targets): (full_h, full_s, full_ki, full_kh, full_e, layer_h, layer_s, layer_ki, layer_kh,
    #                                layer_e)
    ('fp32', False, 'all'): (1.0, 16.2, 0.2, 0.4, 5.3, 6.5, 10.1, 1.1, -2.9, 7.5),
    ('fp32', False, 'attention'): (2.7, 11.8, 0.5, 0.4, 9.1, 23.4, 6.9, 0.0, -3.8, 5.5),
    ('fp32', True, 'all'): (1.0, 20.2, 0.2, 0.4, 5.3, -0.4, 15.3, 4.3, -1.6, 9.6),
    ('fp32', True, 'attention'): (2.7, 11.8, 0.5, 0.4, 9.1, 23.4, 6.9, 0.0, -3.8, 5.5),
    ('bf16', False, 'all'): (-4.0, 8.6, 1.2, 0.8, 4.9, 19.6, -0.4, 0.8, -4.7, -54.1),
    ('bf16', False, 'attention'): (1.3, 5.7, 0.1, 0.1, 7.9, 21.4, -0.8, 0.3, -5.0, -58.0),
    ('bf16', True, 'all'): (-7.1, 10.8, 2.0, 1.2, 4.9, 8.6, 2.0, 3.9, -3.2, -51.3),
    ('bf16', True, 'attention'): (1.3, 5.7, 0.1, 0.1, 7.9, 21.4, -0.8, 0.3, -5.0, -58.0),
    ('bf16-base-fp32-adapters', False, 'all'): (-7.2, 10.9, 2.1, 1.2, 4.9, 6.3, 2.0, 3.9, -3.2, -51.2),
    ('bf16-base-fp32-adapters', False, 'attention'): (1.3, 5.7, 0.1, 0.1, 7.9, 21.4, -0.8, 0.3, -5.0, -58.0),
    ('bf16-base-fp32-adapters', True, 'all'): (-7.4, 14.9, 2.1, 1.2, 4.9, 4.2, 7.8, 7.5, -2.2, -50.5),
    ('bf16-base-fp32-adapters', True, 'attention'): (1.3, 5.7, 0.1, 0.1, 7.9, 21.4, -0.8, 0.3, -5.0, -58.0),
    ('bf16-mixed', False, 'all'): (-4.1, 9.1, 1.1, 0.9, 5.0, 19.2, 0.0, 0.9, -4.6, -54.3),
    ('bf16-mixed', False, 'attention'): (1.8, 5.6, 0.0, 0.2, 8.6, 21.3, -0.8, 0.3, -5.0, -58.6),
    ('bf16-mixed', True, 'all'): (-7.2, 11.3, 1.9, 1.3, 5.0, 7.6, 2.6, 4.2, -3.1, -51.7),
    ('bf16-mixed', True, 'attention'): (1.8, 5.6, 0.0, 0.2, 8.6, 21.3, -0.8, 0.3, -5.0, -58.6),
}
"""Bytes per token that a Qwen2-MoE layer (``model_type`` ``qwen2_moe``: the experts plus a shared expert, a Llama MLP
of ``shared_expert_intermediate_size`` ``s`` scaled by a sigmoid gate, and q/k/v biases) holds beyond the MoE formula's
Mixtral layer, under QLoRA on its attention (``attention``) or on the attention and the shared expert (``all``: the
recipes' seven names): ``h * hidden_size + s * s + ki * K * i + kh * K * h + e * E`` per token per held layer
(``full_*`` every layer without checkpointing, ``layer_*`` the recomputed one with it), by :data:`LORA_MODES` mode,
dropout > 0 and targets. Least squares over torch's CPU profiler on the ``SHARED_EXPERT_FIT`` decoders of ``python
benchmarks/lora_activations.py --qwen2-moe``, checked on its ``SHARED_EXPERT_CHECK`` ones."""


GPT_OSS_ACTIVATION_BYTES: dict[str, tuple[float, ...]] = {
    # mode: (full_h, full_ki, full_kh, full_e, full_score, full_mask,
    #        layer_h, layer_ki, layer_kh, layer_e, layer_score, layer_mask)
    "fp32": (1.82, 11.0, -0.36, 29.98, -0.46, 10.82, -4.64, 11.37, 0.27, 33.85, 0.42, 0.93),
    "bf16": (0.51, 5.62, -0.43, 15.23, -4.16, 4.85, -10.98, 7.78, -0.33, -43.37, -4.42, 2.89),
    "bf16-base-fp32-adapters": (-0.25, 5.65, -0.44, 11.45, -4.25, 4.9, -11.65, 7.74, -0.36, -47.63, -4.59, 3.62),
    "bf16-mixed": (0.42, 5.61, -0.36, 16.51, -4.11, 4.71, -11.23, 7.76, -0.31, -44.33, -4.42, 3.37),
}
"""Bytes that a gpt-oss layer (``model_type`` ``gpt_oss``: gpt-oss-20b and -120b) holds beyond the MoE formula's
Mixtral layer under transformers' eager attention (the one it runs gpt-oss with: no SDPA), by :data:`LORA_MODES` mode:
``h * hidden_size + ki * K * i + kh * K * h + e * E`` per token and ``score`` per attention score (``batch * heads *
seq**2``) per held layer (``full_*`` every layer without checkpointing, ``layer_*`` the recomputed one with it: the
attention sinks' column joined to the scores and their softmax in the scores' dtype, the experts' clamped gate and
their biases, the router's biased logits), and ``mask`` per element of one more ``batch * seq**2`` mask once (the
sliding-window layers' beside the full layers'). Least squares over torch's CPU profiler on the ``GPT_OSS_FIT``
decoders of ``python benchmarks/lora_activations.py --gpt-oss``, checked on its ``GPT_OSS_CHECK`` ones."""


def _gpt_oss_terms(config, mode: str, batch_size: int, seq_len: int, checkpointing: bool) -> tuple[int, int]:
    """``(bytes per held layer, bytes once)`` that a gpt-oss layer adds (:data:`GPT_OSS_ACTIVATION_BYTES`; ``(0, 0)``
    for another model type)."""
    if _model_type(config) != "gpt_oss":
        return 0, 0
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    experts, top_k = _config_value(config, "num_local_experts"), _config_value(config, "num_experts_per_tok")
    table = GPT_OSS_ACTIVATION_BYTES[mode]
    per_h, per_ki, per_kh, per_e, per_score, per_mask = table[6:] if checkpointing else table[:6]
    n, scores = batch_size * seq_len, batch_size * _config_value(config, "num_attention_heads") * seq_len**2
    layer = n * (per_h * h + per_ki * top_k * i + per_kh * top_k * h + per_e * experts) + per_score * scores
    return int(layer), int(per_mask * batch_size * seq_len**2)


def _shared_expert_terms(config, entry: tuple[str, bool, str], h: int, i: int, experts: int,
                         top_k: int) -> tuple[float, float, int]:
    """``(full bytes per token, recomputed-layer bytes per token, elements of its largest projection)`` that a
    Qwen2-MoE shared expert adds (:data:`SHARED_EXPERT_ACTIVATION_BYTES` ``entry``; ``h``, ``i``, ``experts``,
    ``top_k`` as :func:`_moe_terms` read them); ``(0, 0, 0)`` for another model type."""
    if _model_type(config) != "qwen2_moe":
        return 0.0, 0.0, 0
    shared = _config_value(config, "shared_expert_intermediate_size")
    features = (h, shared, top_k * i, top_k * h, experts)
    table = SHARED_EXPERT_ACTIVATION_BYTES[entry]
    full = sum(c * f for c, f in zip(table[:5], features))
    layer = sum(c * f for c, f in zip(table[5:], features))
    return full, layer, h * shared


_LORA_BASES = ("nf4", "dense")
_LORA_DEVICES = tuple(NF4_DEQUANTIZE_BYTES)


def _lora_targets(targets, sets: dict[str, frozenset] = LORA_TARGET_SETS) -> str:
    """The key of ``targets`` (a key, or a collection of projection names) in ``sets`` (:func:`lora_target_sets`)."""
    if isinstance(targets, str) and targets in sets:
        return targets
    names = frozenset(targets) if not isinstance(targets, str) else frozenset()
    for key, value in sets.items():
        if names == value:
            return key
    raise ValueError(f"Invalid targets={targets!r}: activations are modelled for LoRA on all {len(sets['all'])} "
                     f"projections ({', '.join(sorted(sets['all']))}) or the {len(sets['attention'])} attention ones "
                     f"({', '.join(sorted(sets['attention']))}).")


DORA_ACTIVATION_BYTES: dict[tuple[str, bool, str], tuple[float, float, float]] = {
    # (mode, dropout > 0, targets): (full, layer, transient)
    ("bf16", False, "all"): (4.3, 5.4, 0.9),
    ("bf16", False, "attention"): (4.1, 4.0, 0.2),
    ("bf16", True, "all"): (4.6, 5.7, 2.7),
    ("bf16", True, "attention"): (4.1, 4.0, 0.2),
    ("bf16-base-fp32-adapters", False, "all"): (6.5, 7.3, 2.6),
    ("bf16-base-fp32-adapters", False, "attention"): (6.1, 6.0, 0.2),
    ("bf16-base-fp32-adapters", True, "all"): (9.1, 9.7, 6.0),
    ("bf16-base-fp32-adapters", True, "attention"): (8.1, 8.0, 0.2),
    ("bf16-mixed", False, "all"): (4.3, 5.5, 0.7),
    ("bf16-mixed", False, "attention"): (4.1, 4.0, 0.2),
    ("bf16-mixed", True, "all"): (4.6, 5.7, 2.6),
    ("bf16-mixed", True, "attention"): (4.1, 4.0, 0.2),
    ("fp32", False, "all"): (8.5, 7.8, 4.5),
    ("fp32", False, "attention"): (8.1, 8.0, 0.2),
    ("fp32", True, "all"): (9.1, 9.1, 6.7),
    ("fp32", True, "attention"): (8.1, 8.0, 0.2),
}
"""What DoRA (``use_dora``, on an NF4 base: :class:`~lowmem_lightning.quant.LoraLinear4bit`) adds to
:func:`lora_activation_bytes`: bytes per token per output feature of the adapted projections, kept per layer without
checkpointing (``full``) and in the recomputed layer with it (``layer``: its magnitude-scaled base and adapter outputs
saved for backward), and ``transient`` bytes per element of the largest adapted projection while its row norm is
computed (the fp32 decoded weight, ``B @ A`` and their sum). Least squares over torch's CPU profiler, DoRA's peak
minus plain LoRA's (``python benchmarks/lora_activations.py --dora``)."""

_DORA_OUT_FEATURES = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "o_proj": "h", "gate_proj": "i", "up_proj": "i",
                      "down_proj": "h", "qkv_proj": "q+2kv", "gate_up_proj": "2i"}
"""Output width of each projection :data:`DORA_ACTIVATION_BYTES` models, in the layer's widths."""


def dora_projection_terms(config, targets) -> tuple[int, int]:
    """``(output features of the adapted projections of one layer summed, elements of the largest of them)`` for
    DoRA on ``targets`` (a key of :data:`LORA_TARGET_SETS` or the names) of a decoder ``config``; ``ValueError`` for
    a projection :data:`_DORA_OUT_FEATURES` does not list (GPT-NeoX's names) or an MoE model."""
    if _is_moe(config):
        raise ValueError(f"Invalid config: DoRA's activations are not modelled for model_type {_model_type(config)!r}.")
    sets = lora_target_sets(config)
    names = sets[_lora_targets(targets, sets)]
    unknown = sorted(set(names) - set(_DORA_OUT_FEATURES))
    if unknown:
        raise ValueError(f"Invalid targets: DoRA's activations are not modelled on {', '.join(unknown)}.")
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    q, kv = attention_widths(config)
    widths = {"q": q, "kv": kv, "h": h, "i": i, "q+2kv": q + 2 * kv, "2i": 2 * i}
    inputs = {"o_proj": q, "down_proj": i}
    out = [widths[_DORA_OUT_FEATURES[name]] for name in names]
    largest = max(widths[_DORA_OUT_FEATURES[name]] * inputs.get(name, h) for name in names)
    return sum(out), largest


def _check_lora_options(base, mode, rank, device) -> None:
    if base not in _LORA_BASES:
        raise ValueError(f"Invalid base={base!r}: expected one of {', '.join(_LORA_BASES)}.")
    if mode not in LORA_MODES:
        raise ValueError(f"Invalid mode={mode!r}: expected one of {', '.join(LORA_MODES)}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank={rank!r}: expected an int >= 1.")
    if device not in _LORA_DEVICES:
        raise ValueError(f"Invalid device={device!r}: expected one of {', '.join(_LORA_DEVICES)}.")


def lora_activation_bytes(config, batch_size: int, seq_len: int, *, base: str = "nf4", mode: str = "bf16-mixed",
                          dropout: float = 0.0, targets="all", rank: int = 16, gradient_checkpointing: bool = True,
                          device: str = "cuda", isolate_documents: bool = False, attention: str = "sdpa",
                          dora: bool = False) -> int:
    """Peak activation bytes of one forward + backward of a Llama-style decoder with LoRA adapters on a
    frozen base (``base="nf4"``: 4-bit ``Linear4bit``; ``"dense"``: frozen full-precision weights), adapter
    gradients not included.

    ``mode`` is one of :data:`LORA_MODES`, ``targets`` the adapted projections (a key of
    :data:`LORA_TARGET_SETS` or the names), ``rank`` the adapters' ``r``. With ``n = batch_size * seq_len``,
    ``h``/``i``/``L``/``V`` as in :func:`activation_bytes`, ``d`` the base's element size (4 in ``fp32``
    mode, else 2), ``c`` the coefficients of :data:`LORA_ACTIVATION_COEFFICIENTS`, ``R = adapters per layer
    * rank * a`` (each adapter's rank-``r`` activation, ``a`` its compute element size) and, on an NF4 base,
    ``T = t * P`` the dense weight a 4-bit projection decodes while it multiplies (``P`` the largest projection's
    elements, :func:`_largest_projection`: ``h * i``, Phi-3's fused ``gate_up_proj`` ``2 * h * i``; ``t`` from
    :data:`NF4_DEQUANTIZE_BYTES` for ``device``; 0 on a dense base):

    * gradient checkpointing: ``n * (L + 1) * d * h + max(n * (c.layer_h * h + c.layer_i * i + R + A) + T,
      n * (12 * V + 2 * d * h))``;
    * without: ``n * (L * (c.full_h * h + c.full_i * i + R + A) + c.rest_h * h) + max(n * 12 * V, T)``.

    ``A`` is :func:`attention_extra_bytes` (:data:`LORA_ATTENTION_WIDTH_BYTES`, Qwen3's q/k norms; Gemma 3 adds
    :data:`GEMMA3_ACTIVATION_BYTES` to it and a once-per-model term to the total); on an MoE
    model (:data:`MOE_ACTIVATION_MODEL_TYPES`) the ``i`` terms and ``T`` are those of its experts (:func:`_moe_terms`).

    ``isolate_documents`` (packed documents kept apart) adds :func:`document_mask_terms` as in
    :func:`activation_bytes`: ``n * (1 + d) * seq_len`` to the recomputed layer and ``n * seq_len`` to the loss
    phase with checkpointing, ``n * L * d * seq_len`` without, and the rotary tables.

    ``attention="eager"`` adds :func:`_eager_terms` as in :func:`activation_bytes` (attention computes in fp32 in
    ``fp32`` mode, else in 2 bytes).

    ``dora`` (DoRA on an NF4 base) adds :data:`DORA_ACTIVATION_BYTES` ``(full, layer, transient)`` with
    ``(O, P) =`` :func:`dora_projection_terms`: ``n * layer * O + transient * P`` to the recomputed layer with
    checkpointing; without, ``n * L * full * O`` to what is saved and ``transient * P`` to the decode transient.

    Within 10% of torch's CPU profiler (``device="cpu"``) at sizes it was not fitted to
    (``tests/test_estimate.py``); ``benchmarks/gpu_check.py`` ``qlora_7b`` sets the CUDA figure beside a
    measured peak.
    """
    _check_lora_options(base, mode, rank, device)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"Invalid dropout={dropout!r}: expected a number in [0, 1).")
    sets = lora_target_sets(config)
    key = _lora_targets(targets, sets)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}: expected an int >= 1.")
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    layers, vocab = _config_value(config, "num_hidden_layers"), _config_value(config, "vocab_size")
    full_h, full_i, rest_h, layer_h, layer_i = LORA_ACTIVATION_COEFFICIENTS[(base, mode, dropout > 0, key)]
    d = 4 if mode == "fp32" else 2
    adapter_bytes = 2 if mode in ("bf16", "bf16-mixed") else 4
    rank_bytes = len(sets[key]) * rank * adapter_bytes
    mlp_full, mlp_layer, decoded = full_i * i, layer_i * i, _largest_projection(config)
    _check_modelled_layer(config, seq_len)
    _check_attention(config, seq_len, attention)
    family_layer, once = _layer_family_terms(config, (base, mode, dropout > 0, key), gradient_checkpointing)
    widths = attention_extra_bytes(config, (base, mode, dropout > 0)) + family_layer
    if _is_moe(config):
        mlp_full, mlp_layer, decoded = _moe_terms(config, base, mode, key, dropout > 0)
    transient = NF4_DEQUANTIZE_BYTES[device][d] * decoded if base == "nf4" else 0
    n = batch_size * seq_len
    dora_full = dora_layer = 0
    if dora:
        if base != "nf4":
            raise ValueError(f"Invalid base={base!r} with dora=True: DoRA's activations are modelled on an NF4 base.")
        full_c, layer_c, transient_c = DORA_ACTIVATION_BYTES[(mode, dropout > 0, key)]
        out, largest = dora_projection_terms(config, key)
        dora_full, dora_layer = n * layers * full_c * out, n * layer_c * out
        transient += transient_c * largest
    loss = n * _loss_bytes_per_vocab(config, d) * vocab
    mask, rotary, masked = _attention_masks(config, batch_size, seq_len, d, isolate_documents, attention)
    eager_layer, eager_once = _eager_terms(config, batch_size, seq_len, d, gradient_checkpointing, attention)
    oss_layer, oss_once = _gpt_oss_terms(config, mode, batch_size, seq_len, gradient_checkpointing)
    eager_layer, eager_once = eager_layer + oss_layer, eager_once + oss_once
    if gradient_checkpointing:
        layer = (n * (layer_h * h + mlp_layer + rank_bytes + widths) + transient + (1 + d) * mask + eager_layer
                 + dora_layer)
        return int(n * ((layers + 1) * d * h + once) + max(layer, loss + n * 2 * d * h + mask)) + eager_once + rotary
    saved = (n * (layers * (full_h * h + mlp_full + rank_bytes + widths) + rest_h * h + once) + masked * d * mask
             + dora_full)
    return int(saved + max(loss, transient)) + layers * eager_layer + eager_once + rotary


def _largest_projection(config) -> int:
    """Elements of a decoder layer's largest projection, the dense weight an NF4 layer decodes while it multiplies:
    ``hidden_size * intermediate_size`` in Llama's layer; the fused query/key/value projection (``(q + 2 * kv) * h``)
    where it is larger (Phi-3, GPT-NeoX), and a fused ``gate_up_proj`` (Phi-3, GLM-4: ``2 * h * i``)."""
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    sets = lora_target_sets(config)
    mlp = (2 if "gate_up_proj" in sets["all"] else 1) * h * i
    if "q_proj" in sets["attention"]:  # queries, keys and values projected apart
        return mlp
    q, kv = attention_widths(config)
    return max(mlp, (q + 2 * kv) * h)


def _config_getter(config):
    """``get(key, default=None)`` on a config dict or object alike."""
    return config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)


def _model_type(config) -> str | None:
    return _config_getter(config)("model_type")


def _is_moe(config) -> bool:
    return _model_type(config) in MOE_ACTIVATION_MODEL_TYPES


def _dense_layers_among_experts(config) -> str:
    """``"mlp_only_layers=[0]"`` / ``"decoder_sparse_step=2"`` where a Qwen-MoE config gives some layers a dense MLP
    in place of experts; ``""`` where every layer has experts."""
    get = _config_getter(config)
    if get("mlp_only_layers"):
        return f"mlp_only_layers={list(get('mlp_only_layers'))!r}"
    step = get("decoder_sparse_step", 1)
    return "" if step in (None, 1) else f"decoder_sparse_step={step!r}"


def _moe_terms(config, base: str, mode: str, key: str, dropped: bool = False) -> tuple[float, float, int]:
    """``(full MLP bytes per token, recomputed-layer MLP bytes per token, elements of the largest matrix decoded)``
    of a :data:`MOE_ACTIVATION_MODEL_TYPES` layer (:data:`MOE_LORA_ACTIVATION_COEFFICIENTS`: the experts, one
    expert's gate_up matrix; a Qwen2-MoE shared expert's :func:`_shared_expert_terms`); ``ValueError`` for a base or
    targets they were not fitted to (``dropped``: LoRA dropout > 0)."""
    shared = _model_type(config) == "qwen2_moe"
    if base != "nf4" or key not in (("attention", "all") if shared else ("attention",)):
        raise ValueError(f"Invalid base={base!r} / targets={key!r} for an MoE model: its activations are modelled for "
                         "LoRA on the attention projections over NF4 experts only (Qwen2-MoE: or on its shared "
                         "expert too).")
    width_key, experts_key = MOE_CONFIG_KEYS[_model_type(config)]
    h, i = _config_value(config, "hidden_size"), _config_value(config, width_key)
    experts, top_k = _config_value(config, experts_key), _config_value(config, "num_experts_per_tok")
    dense = _dense_layers_among_experts(config)
    if dense:
        raise ValueError(f"Invalid config {dense}: its activations are modelled with experts in every layer.")
    full_ki, full_kh, full_e, layer_ki, layer_kh, layer_e = MOE_LORA_ACTIVATION_COEFFICIENTS[mode]
    shared_full, shared_layer, shared_decoded = _shared_expert_terms(config, (mode, dropped, key), h, i, experts,
                                                                     top_k)
    return (full_ki * top_k * i + full_kh * top_k * h + full_e * experts + shared_full,
            layer_ki * top_k * i + layer_kh * top_k * h + layer_e * experts + shared_layer,
            max(2 * i * h, shared_decoded))


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_HALF_PRECISIONS = ("bf16-true", "16-true")
"""Lightning precisions that convert the model's weights to 2 bytes (``HalfPrecision``)."""


_DECODER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def _decoder_config(model: nn.Module):
    """The config of the first module (``model`` itself first) whose ``config`` has every one of ``_DECODER_KEYS``
    (a multimodal model's language model, not its vision tower); else the first with a ``hidden_size``."""
    configs = [c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and getattr(c, "hidden_size", None) is not None]
    decoders = [c for c in configs if all(getattr(c, key, None) is not None for key in _DECODER_KEYS)]
    return (decoders or configs or [None])[0]


def _weight_dtype(model: nn.Module, precision: str) -> torch.dtype | None:
    """The dtype of the weights as the run trains them: bf16 / fp16 under ``bf16-true`` / ``16-true``, else
    that of the model's largest floating-point parameter."""
    if precision in _HALF_PRECISIONS:
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16
    floats = [p for p in model.parameters() if p.is_floating_point()]
    return max(floats, key=lambda p: p.numel()).dtype if floats else None


_MIXED = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
"""Lightning precisions that run the forward under autocast, and the autocast dtype."""


def _lora_setting(model: nn.Module) -> dict | None:
    """``{targets, rank, dropout, adapter_dtype, dora}`` of the LoRA adapters in ``model`` (None: none): the
    projection names that carry a ``lora_A``, the largest rank, the largest ``lora_dropout``, the dtype of
    the first adapter weight, and whether any adapter is DoRA (a ``lora_magnitude_vector``)."""
    targets, rank, dropout, dtype, dora = set(), 0, 0.0, None, False
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not lora_a:
            continue
        targets.add(name.rpartition(".")[2])
        for adapter in lora_a.values():
            rank = max(rank, adapter.weight.shape[0])
            dtype = dtype or adapter.weight.dtype
        for drop in getattr(module, "lora_dropout", {}).values():
            dropout = max(dropout, float(getattr(drop, "p", 0.0)))
        dora = dora or bool(getattr(module, "lora_magnitude_vector", None))
    return None if not targets else {"targets": targets, "rank": rank, "dropout": dropout, "adapter_dtype": dtype,
                                     "dora": dora}


def _lora_mode(base: torch.dtype, adapters: torch.dtype, precision: str) -> str | None:
    """The :data:`LORA_MODES` entry of a run (None: not modelled)."""
    if precision in _HALF_PRECISIONS:
        return "bf16"  # Lightning converts base and adapters to the half dtype
    half = base in (torch.bfloat16, torch.float16)
    if precision in _MIXED:
        return "bf16-mixed" if base == _MIXED[precision] and adapters == torch.float32 else None
    if base == adapters == torch.float32:
        return "fp32"
    if half and adapters == base:
        return "bf16"
    return "bf16-base-fp32-adapters" if half and adapters == torch.float32 else None


def _lora_activations(model: nn.Module, count: ModelCount, config, batch_size: int, seq_len: int,
                      gradient_checkpointing: bool, precision: str, device: str,
                      isolate_documents: bool, attention: str = "sdpa") -> tuple[int | None, str]:
    """:func:`model_activation_bytes` of a model with LoRA adapters (or a 4-bit base)."""
    lora = _lora_setting(model)
    if lora is None:
        return None, "not modelled for a 4-bit model without LoRA adapters (nothing in it trains)"
    if lora["dora"] and "nf4" not in count.frozen_bytes_by_dtype:
        return None, "not modelled for DoRA on a full-precision base (peft's own DoRA layer; fitted to QDoRA on NF4)"
    base = "nf4" if "nf4" in count.frozen_bytes_by_dtype else "dense"
    mode = _lora_mode(_weight_dtype(model, "32-true"), lora["adapter_dtype"], precision)
    if mode is None:
        return None, (f"not modelled for LoRA ({lora['adapter_dtype']} adapters) under precision={precision!r} "
                      f"(fitted to {', '.join(LORA_MODES)})")
    sets = lora_target_sets(config)
    try:
        key = _lora_targets(lora["targets"], sets)
    except ValueError:
        return None, ("not modelled for LoRA on " + ", ".join(sorted(lora["targets"]))
                      + f" (fitted to all {len(sets['all'])} projections or the {len(sets['attention'])} attention "
                      "ones)")
    if lora["dora"]:
        try:
            dora_projection_terms(config, key)
        except ValueError:
            return None, ("not modelled for DoRA on this model (fitted to the Llama-named projections of decoders "
                          "without experts)")
    nbytes = {isolate: lora_activation_bytes(config, batch_size, seq_len, base=base, mode=mode,
                                             dropout=lora["dropout"], targets=key, rank=lora["rank"],
                                             gradient_checkpointing=gradient_checkpointing, device=device,
                                             isolate_documents=isolate, attention=attention, dora=lora["dora"])
              for isolate in {False, isolate_documents}}
    checkpointing = "checkpointing" if gradient_checkpointing else "no checkpointing"
    drop = f", dropout {lora['dropout']:g}" if lora["dropout"] else ""
    where = "NF4" if base == "nf4" else "frozen"
    rows = _token_rows_term(model, config, batch_size, seq_len, gradient_checkpointing, mode)
    rows_note = f", +{size_text(rows)} trained token rows" if rows else ""
    kind = "DoRA" if lora["dora"] else "LoRA"
    return nbytes[isolate_documents] + rows, (f"batch {batch_size} x seq {seq_len}, {mode}, {checkpointing}, {kind} "
                                              f"r={lora['rank']} on {len(sets[key])} projections{drop}, "
                                              f"{where} base" + _attention_note(attention)
                                              + _mask_note(nbytes, attention) + rows_note
                                              + _sliding_note(config, seq_len, isolate_documents))


def token_rows_activation_bytes(hidden: int, batch_size: int, seq_len: int, embedding_rows: int, head_rows: int,
                                gradient_checkpointing: bool, dtype_bytes: int) -> int:
    """Peak activation bytes that trained token rows (peft's ``trainable_token_indices`` under LoRA, through
    ``add_lora``'s copy-free layers, :mod:`lowmem_lightning.quant.token_rows`) add to LoRA alone: with ``n =
    batch_size * seq_len``, ``9 * n + 8 * embedding_rows`` for ``embedding_rows`` rows on the input embedding (each
    position's int64 row slot and bool trained-mask, saved for backward; the rows' int64 ids, made once and kept),
    ``head_rows * (8 + hidden * dtype_bytes)`` for ``head_rows`` rows on the head (their ids, kept, and the rows in
    the head's compute dtype, saved), and without gradient checkpointing ``4 * n * (hidden + 1)`` (the first layer's
    fp32 norm input and rsqrt, saved once the embedding output needs a gradient).
    No ``vocab x hidden`` copy: peft's own layer would add one per layer (``tests/test_token_rows_memory.py``
    measures both)."""
    n = batch_size * seq_len
    embedding = 9 * n + 8 * embedding_rows + (0 if gradient_checkpointing else 4 * n * (hidden + 1)) if (
        embedding_rows) else 0
    return embedding + head_rows * (8 + hidden * dtype_bytes)


def _token_rows(model: nn.Module) -> tuple[int, int]:
    """``(how many rows the input embedding trains, how many rows the head trains)``: peft's token layers in
    ``model`` (modules with ``trainable_tokens_delta`` and ``token_indices``), read without importing peft."""
    embedding, head = 0, 0
    for module in model.modules():
        indices = getattr(module, "token_indices", None)
        if not isinstance(indices, dict) or not hasattr(module, "trainable_tokens_delta") or not indices:
            continue
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Embedding):
            embedding = max(embedding, *(len(ids) for ids in indices.values()))
        elif isinstance(base, nn.Linear):
            head = max(head, *(len(ids) for ids in indices.values()))
    return embedding, head


def _token_rows_term(model: nn.Module, config, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                     mode: str) -> int:
    """:func:`token_rows_activation_bytes` of ``model``'s trained token rows (0 without), ``mode`` a LoRA mode."""
    embedding, head = _token_rows(model)
    if not (embedding or head):
        return 0
    return token_rows_activation_bytes(_config_value(config, "hidden_size"), batch_size, seq_len, embedding, head,
                                       gradient_checkpointing, 4 if mode == "fp32" else 2)


def _sliding_note(config, seq_len: int, isolate_documents: bool) -> str:
    """``", sliding-window mask in 22 layers"`` where a sliding window shorter than the sequence masks layers that
    packed documents do not already mask; else nothing."""
    sliding = 0 if isolate_documents else sliding_window_layers(config, seq_len)
    return f", sliding-window mask in {sliding} layers" if sliding else ""


def _attention_note(attention: str) -> str:
    """``", eager attention"`` for an attention other than transformers' default SDPA; else nothing."""
    return "" if attention == "sdpa" else f", {attention} attention"


def _mask_note(nbytes: dict[bool, int], attention: str = "sdpa") -> str:
    """``", +3.00 MiB document mask"``: what packed documents kept apart add (``nbytes`` by ``isolate_documents``),
    or nothing when they are not; under eager attention, whose one mask they replace, their rotary tables."""
    if True not in nbytes:
        return ""
    what = "document mask" if attention == "sdpa" else "packed rows' rotary tables"
    return f", +{size_text(nbytes[True] - nbytes[False])} {what}"


ACTIVATION_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gemma2", "gpt_neox",
                          "ministral3", "ministral", "internlm3", "seed_oss", "smollm3", "hunyuan_v1_dense",
                          "granite", "olmo2", "olmo3", "glm4", "exaone4", "qwen2_vl_text", "qwen2_5_vl_text",
                          "qwen3_vl_text")
"""``config.model_type`` values whose decoder layer is Llama's, the one :func:`activation_bytes` and
:func:`lora_activation_bytes` were fitted to, or one with terms of its own: torch's CPU profiler measured Mistral,
Qwen2, Ministral 3, Ministral (8B-2410), InternLM3, Seed-OSS (without dropout) and SmolLM3 equal to Llama (``python
benchmarks/lora_activations.py --kin`` checks all but Mistral and Qwen2, and Hunyuan dense against Qwen3), the
language models of Qwen2-VL and Qwen2.5-VL equal to Qwen2 and of Qwen3-VL to Qwen3 (``--kin``, within 1%: their
multimodal rotary sections); Qwen3, Qwen3-VL and Hunyuan dense add their q/k norms (:data:`QK_NORM_BYTES`), Gemma 3
(text; a multimodal Gemma 3's language model) its norms and scaled embedding (:data:`GEMMA3_ACTIVATION_BYTES`), Phi-3
(Phi-3.5, Phi-4) its fused projections (:data:`PHI3_ACTIVATION_BYTES`, :data:`FUSED_LORA_TARGET_SETS`), Gemma 2 its
norms under eager attention (:data:`GEMMA2_ACTIVATION_BYTES`) and soft-capping (:data:`SOFTCAP_MODEL_TYPES`),
GPT-NeoX (Pythia) its parallel block (:data:`NEOX_ACTIVATION_BYTES`), Granite its scaled residual
(:data:`GRANITE_ACTIVATION_BYTES`), OLMo 2 its norms (:data:`OLMO2_ACTIVATION_BYTES`, OLMo 3's layer too: ``--kin``),
GLM-4 its norms and fused MLP (:data:`GLM4_ACTIVATION_BYTES`), EXAONE 4 its norms (:data:`EXAONE4_ACTIVATION_BYTES`);
an attention other than ``hidden_size`` wide is :data:`ATTENTION_WIDTH_BYTES`'s. Not these (batch 2 x seq 96, bf16,
the Llama formula against the profiler): Mixtral / Qwen-MoE -24..48% (experts, router:
:data:`MOE_ACTIVATION_MODEL_TYPES` under QLoRA); :func:`model_activation_bytes` says so rather than guess."""

def model_activation_bytes(model: nn.Module, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                           precision: str | int | None = None, device: str = "cuda",
                           isolate_documents: bool = False) -> tuple[int | None, str]:
    """``(bytes, what they are of)`` of the activations of ``model`` (meta works) as a run with Lightning
    ``precision`` (``None``: ``"32-true"``) trains it: :func:`activation_bytes` for a full-weight decoder,
    :func:`lora_activation_bytes` for LoRA adapters on a 4-bit or frozen base (mode from the weights, the
    adapters and ``precision``; ``device`` sets the 4-bit decode transient). ``(None, why not)`` where no
    formula models the run: mixed precision (autocast) of a full-weight model, LoRA other than
    :data:`LORA_MODES` or :data:`LORA_TARGET_SETS`, a 4-bit model without adapters, weights other than
    bf16/fp16/fp32, a model with no Llama-style ``config`` (``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``vocab_size``), or one of another ``model_type`` than
    :data:`ACTIVATION_MODEL_TYPES`. ``isolate_documents``: the batches are packed documents kept apart
    (``TextDataModule(pack=True, isolate_documents=True)``): :func:`document_mask_terms` join, said in the detail
    (``", +3.00 MiB document mask"``). The attention is the model's ``config._attn_implementation``: ``sdpa`` and
    ``eager`` are modelled (:data:`ATTENTIONS`; eager said in the detail), another is ``(None, why not)``."""
    precision = "32-true" if precision is None else str(precision)
    count = count_model(model)
    config = _decoder_config(model)
    if config is None or any(getattr(config, key, None) is None for key in _DECODER_KEYS):
        return None, "not modelled: the model has no Llama-style config (" + ", ".join(_DECODER_KEYS) + ")"
    model_type = getattr(config, "model_type", None)
    if model_type in MOE_ACTIVATION_MODEL_TYPES:
        if _dense_layers_among_experts(config):  # said first: peft >= 0.22 adapts their MLPs, so the targets differ too
            return None, (f"not modelled for a {model_type} model with dense layers among its experts "
                          f"({_dense_layers_among_experts(config)})")
        lora = _lora_setting(model)
        fitted = [LORA_TARGET_SETS["attention"]] + ([LORA_TARGET_SETS["all"]] if model_type == "qwen2_moe" else [])
        if lora is None or lora["targets"] not in fitted or not any(_is_experts4bit(m) for m in model.modules()):
            shared = ", or on its shared expert too" if len(fitted) > 1 else ""
            return None, (f"not modelled for this {model_type} model (fitted to LoRA on the attention projections "
                          f"over NF4 experts{shared})")
    elif model_type not in ACTIVATION_MODEL_TYPES:
        return None, (f"not modelled for model_type {model_type!r} (fitted to the Llama decoder layer: "
                      f"{', '.join(ACTIVATION_MODEL_TYPES)}; MoE: {', '.join(MOE_ACTIVATION_MODEL_TYPES)} under QLoRA)")
    if unmodelled_layer(config, seq_len):
        return None, f"not modelled for {unmodelled_layer(config, seq_len)}"
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    unmodelled = unmodelled_attention(config, seq_len, attention)
    if unmodelled:
        return None, f"not modelled for {unmodelled}"
    if count.adapter_params or "nf4" in count.frozen_bytes_by_dtype:
        if precision not in ("32-true", "32", *_HALF_PRECISIONS, *_MIXED):
            return None, f"not modelled under precision={precision!r}"
        return _lora_activations(model, count, config, batch_size, seq_len, gradient_checkpointing, precision,
                                 device, isolate_documents, attention)
    if precision not in ("32-true", "32", *_HALF_PRECISIONS):
        return None, f"not modelled under precision={precision!r} (fitted to '32-true', 'bf16-true' and '16-true')"
    dtype = _weight_dtype(model, precision)
    if dtype not in _DTYPE_NAMES:
        return None, f"not modelled for {dtype} weights (fitted to bf16, fp16 and fp32)"
    nbytes = {isolate: activation_bytes(config, batch_size, seq_len, dtype.itemsize, gradient_checkpointing, isolate,
                                        attention) for isolate in {False, isolate_documents}}
    checkpointing = "checkpointing" if gradient_checkpointing else "no checkpointing"
    return nbytes[isolate_documents], (f"batch {batch_size} x seq {seq_len}, {_DTYPE_NAMES[dtype]}, {checkpointing}"
                                       + _attention_note(attention) + _mask_note(nbytes, attention)
                                       + _sliding_note(config, seq_len, isolate_documents))


# ------------------------------------------------------------------------------------------ optimizers
def _torch_adamw_layout(param: torch.Tensor, group: dict) -> list[StateSpec]:
    """torch.optim.AdamW's state: ``exp_avg``/``exp_avg_sq`` like the param (+ ``max_exp_avg_sq`` with
    amsgrad), ``step`` a 0-d fp32 tensor."""
    keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
    like_param = [StateSpec(key, tuple(param.shape), param.dtype, "moment") for key in keys]
    return [StateSpec("step", (), torch.float32, "step"), *like_param]


def state_layout(optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict) -> list[StateSpec]:
    """The :class:`~lowmem_lightning.optim.base.StateSpec` list the optimizer allocates for ``param``
    (ours describe themselves through ``state_layout``; torch's AdamW is described here); ``TypeError``
    for any other optimizer."""
    if isinstance(optimizer, LowMemOptimizer):
        return optimizer.state_layout(param, group)
    if type(optimizer) is torch.optim.AdamW:
        return _torch_adamw_layout(param, group)
    raise TypeError(f"{type(optimizer).__name__} does not describe its state layout.")


def optimizer_state_bytes(name: str, params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                          fp32_ids: set[int] | frozenset[int] = frozenset(), **kwargs) -> tuple[int, int]:
    """``(device_bytes, host_bytes)`` of the state of registered optimizer ``name`` with ``kwargs`` over
    the trainable ``params`` (meta tensors work; ``(name, param)`` pairs from ``named_parameters()`` let
    an optimizer that splits by name, Muon, see the names), summed from the exact state layout of each param.

    Paged optimizers keep quantized codes and scales in host pages (``host_bytes``); their step
    counters and the fp32 state of small tensors stay on the device, and the pages of the tensor
    being updated and of the prefetched next one are copied in: ``device_bytes`` counts those two
    (the largest two, the minimum resident set; an automatic budget may keep more resident).
    The params whose ids are in ``fp32_ids`` go into a group with ``quantize_state=False`` (``fp32_state``:
    :mod:`lowmem_lightning.optim.state_precision`), as the callback puts them.
    """
    pairs = [item if isinstance(item, tuple) else (None, item) for item in params]
    pairs = [(n, p) for n, p in pairs if p.requires_grad]
    if not pairs:
        return 0, 0
    named = all(n is not None for n, _ in pairs)
    items = pairs if named else [p for _, p in pairs]
    groups = split_param_groups(items, set(fp32_ids))[0] if fp32_ids else items
    optimizer = optimizer_class(name)(groups, **kwargs)
    paged = getattr(optimizer, "is_paged", False)
    device = host = 0
    page_sizes = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            pages = 0
            for spec in state_layout(optimizer, param, group):
                if spec.host:
                    pages += spec.nbytes
                else:
                    device += spec.nbytes
            host += pages
            page_sizes.append(pages)
    if paged:
        device += sum(sorted(page_sizes)[-2:])
    return device, host


def _same_layout(a: tuple[str, dict], b: tuple[str, dict]) -> bool:
    """Whether two ``(name, kwargs)`` specs allocate the same state (learning rates do not matter)."""
    ignore = ("lr", "weight_decay")
    strip = lambda kw: {k: v for k, v in kw.items() if k not in ignore}
    return a[0] == b[0] and strip(a[1]) == strip(b[1])


def estimate_memory(
    model: nn.Module,
    budget_bytes: int | None = None,
    configured: tuple[str, dict] | None = None,
    variants: dict[str, tuple[str, dict]] | None = None,
    step_in_backward: bool = False,
    gradient_checkpointing: bool = False,
    bucket_bytes: int = RELEASE_BUCKET_BYTES,
    activations: int = 0,
    activation_detail: str = "",
    fp32_state=None,
    average_bytes: int = 0,
    average_detail: str = "",
) -> MemoryEstimate:
    """Estimate training memory of ``model`` (built on the meta device) for every optimizer.

    Args:
        model: The model as it would train (quantized, with adapters); meta tensors are fine.
        budget_bytes: Device memory budget in bytes; sets ``fits`` and ``recommendation``.
        configured: ``(optimizer name, kwargs)`` of the run's own optimizer, added as row ``configured``
            when it is not one of the variants.
        variants: Rows to compute (default :data:`OPTIMIZER_VARIANTS` plus any other registered name).
        step_in_backward: the run releases gradients in backward (``LowMemOptimizerCallback(...,
            step_in_backward=True)``): device totals count only the fullest bucket of released gradients.
        gradient_checkpointing: the model already checkpoints activations (the recommendation then
            does not propose it).
        bucket_bytes: the release's ``bucket_bytes`` (default the callback's, 25 MiB; 0: per tensor).
        activations: activation bytes to add to every device total (e.g. :func:`activation_bytes`); 0
            leaves them out.
        activation_detail: what ``activations`` are of, or why they are left out (shown by
            :func:`format_table`; :func:`model_activation_bytes` gives both).
        fp32_state: params kept in 32-bit state by every row's optimizer (the callback's ``fp32_state``: module
            classes, ``"embeddings"``, name patterns); a note says how many, or names an entry that selects none.
        average_bytes: device bytes of the run's weight averages (``EMAWeightAveraging``), added to every device
            total; ``average_detail`` says what they hold.
    """
    count = count_model(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = dict(OPTIMIZER_VARIANTS if variants is None else variants)
    if variants is None:
        for name in available_optimizers():
            if not any(opt == name for opt, _ in rows.values()):
                rows[name] = (name, {})
    configured_row = None
    if configured is not None:
        configured_row = next((row for row, spec in rows.items() if _same_layout(spec, configured)), None)
        if configured_row is None:
            configured_row = "configured"
            rows[configured_row] = configured
    if isinstance(activations, bool) or not isinstance(activations, int) or activations < 0:
        raise ValueError(f"Invalid activations={activations!r}: expected bytes, an int >= 0.")
    if isinstance(average_bytes, bool) or not isinstance(average_bytes, int) or average_bytes < 0:
        raise ValueError(f"Invalid average_bytes={average_bytes!r}: expected bytes, an int >= 0.")
    weights = count.frozen_bytes + count.trainable_bytes + activations + average_bytes
    released = gradient_peak_bytes(count, True, bucket_bytes, activations)
    grads = gradient_peak_bytes(count, step_in_backward, bucket_bytes, activations)
    result: dict[str, OptimizerEstimate] = {}
    fp32_ids, notes = _fp32_state(model, params, fp32_state)
    for row, (name, kwargs) in rows.items():
        try:
            device, host = optimizer_state_bytes(name, params, fp32_ids, **kwargs)
        except (TypeError, ValueError, ImportError) as err:
            notes.append(f"{row}: not estimated ({err})")
            continue
        state = device + host
        per_param = state / count.trainable_params if count.trainable_params else 0.0
        result[row] = OptimizerEstimate(name, dict(kwargs), state, device, host, per_param, weights + grads + device,
                                        weights + released + device)
    estimate = MemoryEstimate(count, result, configured_row, step_in_backward, budget_bytes, None, notes,
                              gradient_checkpointing, bucket_bytes, activations, activation_detail, average_bytes,
                              average_detail)
    if budget_bytes is not None:
        for est in result.values():
            est.fits = est.total_device_bytes <= budget_bytes
        estimate.recommendation = recommend(estimate)
    return estimate


def checkpoint_weights(model: nn.Module, frozen_in: bool = True, average_bytes: int = 0) -> tuple[int, str]:
    """``(bytes, what they are)`` of the weights in one Lightning checkpoint of ``model`` (meta tensors are fine): its
    state dict's tensors, each once (tied weights are written once), the frozen ones unless the run leaves them out
    (``checkpoint_frozen=False``: those unchanged since the build), and ``average_bytes``, a weight average's own
    tensors (the checkpoint holds the average as its ``state_dict`` and the training weights as
    ``current_model_state``; what the two share is written once)."""
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    trained = sum(t.nbytes for t in tensors.values() if t.requires_grad)
    frozen = sum(t.nbytes for t in tensors.values() if not t.requires_grad)
    parts = [f"what trains {size_text(trained)}"]
    if frozen:
        parts.append(f"frozen weights {size_text(frozen)}" if frozen_in else
                     f"the frozen weights ({size_text(frozen)}) left out (checkpoint_frozen: false)")
    if average_bytes:
        parts.append(f"weight average {size_text(average_bytes)}")
    return trained + (frozen if frozen_in else 0) + average_bytes, ", ".join(parts)


def _fp32_state(model: nn.Module, params: list[tuple[str, torch.Tensor]], fp32_state) -> tuple[set[int], list[str]]:
    """The ids of the trainable params ``fp32_state`` selects and the notes saying so (or naming an entry that
    selects none); ``ValueError`` for a bad ``fp32_state``."""
    parsed = parse_fp32_state(fp32_state)
    if parsed is None:
        return set(), []
    ids, unmatched = fp32_state_params(model, parsed)
    trainable = {id(p): p for _, p in params}
    ids &= set(trainable)
    chosen = sum(trainable[i].numel() for i in ids)
    total = sum(p.numel() for p in trainable.values())
    notes = [f"fp32_state={fp32_state!r}: {chosen:,} trainable params ({100.0 * chosen / max(1, total):.1f}%) keep "
             "32-bit state in every row (quantize_state=False)"]
    if unmatched:
        notes.append(f"fp32_state entries {', '.join(map(repr, unmatched))} select no param")
    return ids, notes


_IN_MEMORY_ORDER = ("adamw", "adamw_8bit", "adamw_4bit", "came", "came_int8", "adafactor_beta1_int8")


def recommend(estimate: MemoryEstimate) -> str:
    """The design's decision rule over the rows that fit the budget: fp32 AdamW if it fits, else 8-bit
    AdamW, else 4-bit AdamW (the same algorithm at ~1.06 bytes/param), else CAME / Adafactor with
    momentum (fp32, then 8-bit momentum); when none of them fits
    with a gradient buffer, the same order with gradient release (``+ step_in_backward``: only the
    fullest bucket of gradients alive, what makes a full fine-tune fit); else paged 8-bit AdamW with
    gradient checkpointing; as a last resort Adafactor without momentum (the smallest state), each
    with its gradient buffer first, then released; otherwise say that weights + gradients alone
    exceed the budget. Nothing the run already does is advised: a run that releases gradients is judged
    on its released totals and gets no ``+ step_in_backward``, one with gradient checkpointing no
    ``+ gradient checkpointing``, a 4-bit base or LoRA adapters are not proposed again. Lion and AdEMAMix
    are never proposed: a switch to either changes the algorithm and its lr and weight decay (Lion wants an
    lr 3-10x smaller than AdamW's), AdEMAMix 8-bit keeps more state than 8-bit AdamW (3.05 vs 2.03
    bytes/param: a choice for quality, not memory), and Lion 8-bit (1.02 bytes/param) saves under 5% of
    the state of 4-bit AdamW (1.06), which keeps Adam's algorithm. A run whose own optimizer is outside the rule
    (Lion, AdEMAMix, Muon, SGD) and fits as configured keeps it (``NAME (as configured)``) when no AdamW / CAME
    row fits: it is not told to release gradients, page its state or drop its momentum."""
    rows = estimate.optimizers
    keep = _kept_configured(estimate)
    release = " + step_in_backward"
    paged = "paged_adamw_8bit" + ("" if estimate.gradient_checkpointing else " + gradient checkpointing")
    budget = estimate.budget_bytes if estimate.budget_bytes is not None else -1
    if estimate.step_in_backward:  # the run releases already: name the optimizer only
        for row in (*_IN_MEMORY_ORDER, "paged_adamw_8bit", "adafactor"):
            if row == "paged_adamw_8bit" and keep:
                return keep
            if row in rows and rows[row].fits:
                return paged if row == "paged_adamw_8bit" else row
    else:
        for row in _IN_MEMORY_ORDER:
            if row in rows and rows[row].fits:
                return row
        if keep:
            return keep
        for row in _IN_MEMORY_ORDER:
            if row in rows and rows[row].released_device_bytes <= budget:
                return row + release
        last_resorts = (("paged_adamw_8bit", paged), ("adafactor", "adafactor"))
        for row, label in last_resorts:
            if row in rows and rows[row].fits:
                return label
            if row in rows and rows[row].released_device_bytes <= budget:
                return label + release
    need = (estimate.model.frozen_bytes + estimate.model.trainable_bytes + estimate.gradient_device_bytes
            + estimate.activation_bytes)
    if estimate.average_bytes and need <= budget:
        return (f"nothing fits with the weight average on the device: weights + gradients + average alone need "
                f"{(need + estimate.average_bytes) / GB:.2f} GB; keep the average in host memory (its callback's "
                "device: cpu) or leave it out")
    return f"nothing fits: weights + gradients alone need {need / GB:.2f} GB; " + _reduce_weights_advice(estimate.model)


_RULE_OPTIMIZERS = ("adamw", "adamw_8bit", "adamw_4bit", "paged_adamw_8bit", "came", "adafactor")
"""The registered optimizers :func:`recommend`'s rule chooses among."""


def _kept_configured(estimate: MemoryEstimate) -> str | None:
    """``"NAME (as configured)"`` when the run's own optimizer is not one the rule chooses among and fits the
    budget as configured; else ``None``."""
    row = estimate.optimizers.get(estimate.configured_optimizer or "")
    if row is None or not row.fits or row.optimizer in _RULE_OPTIMIZERS:
        return None
    return f"{row.optimizer} (as configured)"


def _reduce_weights_advice(model: ModelCount) -> str:
    """What would shrink the weights themselves, leaving out what the model already does (a 4-bit
    base, LoRA adapters)."""
    quantized = "nf4" in model.frozen_bytes_by_dtype
    adapters = model.adapter_params > 0
    table = size_text(model.hostable_table_bytes)
    hosted = (f"hold the frozen embedding tables in host memory (host_embeddings: true, {table} off the device), "
              if model.hostable_table_bytes else "")
    if quantized and adapters:
        return (f"the base is already 4-bit NF4 and only LoRA adapters train: {hosted}raise the budget, or train a "
                "smaller model")
    if adapters:
        return f"quantize the base (quantize: nf4) under the LoRA adapters, {hosted}or raise the budget"
    if quantized:
        return "train LoRA adapters on the 4-bit base (lora: ...), or raise the budget"
    return "quantize the base (quantize: nf4) and train LoRA adapters, or raise the budget"


# ------------------------------------------------------------------------------------------ output
def size_text(nbytes: int) -> str:
    """``nbytes`` as the report writes it: ``4.026 GB`` (10**9 bytes) from 0.1 GB, ``77.44 MiB`` (2**20 bytes)
    from 0.1 MiB, else ``1,792 B``."""
    if nbytes >= 10**8:
        return f"{nbytes / GB:.3f} GB"
    if nbytes >= MIB // 10:
        return f"{nbytes / MIB:.2f} MiB"
    return f"{nbytes:,} B"


LABEL_WIDTH = 23
"""Width of the label column of :func:`format_table` (the report fits an 80-column terminal)."""


_FIGURE = re.compile(r"(\d) (GB|MiB|B)\b")
"""A figure and its unit in a note (``1.00 MiB``): :func:`_labelled` keeps them on one line."""


def _labelled(label: str, text: str, indent: int = LABEL_WIDTH) -> list[str]:
    """``label`` padded to ``indent`` columns, then ``text`` wrapped to 80 columns under it (a figure and its unit
    stay together)."""
    first = label.ljust(indent) if len(label) < indent else label + "  "
    glued = "\0"  # not a space to textwrap
    lines = textwrap.wrap(_FIGURE.sub(rf"\1{glued}\2", text), width=80, initial_indent=first,
                          subsequent_indent=" " * indent)
    return [line.replace(glued, " ") for line in lines] or [label]


def _model_lines(estimate: MemoryEstimate) -> list[str]:
    """Parameter counts, weights, gradients and activations of the model (whatever the optimizer)."""
    m = estimate.model
    lines = [
        f"params (base model)    {m.params:,}",
        f"adapter params (LoRA)  {m.adapter_params:,}",
        *([f"trained token rows     {m.token_row_params:,}"] if m.token_row_params else []),
        f"trainable params       {m.trainable_params:,}",
        *_labelled("frozen weights", f"{size_text(m.frozen_bytes)}  ("
                   + ", ".join(f"{k}: {size_text(v)}" for k, v in m.frozen_bytes_by_dtype.items()) + ")"),
        f"trainable weights      {size_text(m.trainable_bytes)}",
        f"gradients              {size_text(m.gradient_bytes)}"
        + (f"  ({size_text(estimate.released_gradient_bytes)} on device: released)"
           if estimate.step_in_backward else ""),
    ]
    if estimate.activation_bytes:
        lines += _labelled("activations", f"{size_text(estimate.activation_bytes)}  ({estimate.activation_detail})")
    else:
        lines += _labelled("activations", estimate.activation_detail or "left out")
    return lines


def _run_lines(estimate: MemoryEstimate) -> list[str]:
    """The run's own peak on the device, part by part: weights, gradients, optimizer state, activations, total."""
    row = estimate.optimizers[estimate.configured_optimizer]
    m, width = estimate.model, 12
    grads = (f"released in backward, {size_text(estimate.bucket_bytes)} buckets" if estimate.step_in_backward
             else "one per trainable parameter")
    if m.tied_gradient_bytes and estimate.gradient_device_bytes > gradient_peak_bytes(
            replace(m, tied_gradient_bytes=0), estimate.step_in_backward, estimate.bucket_bytes):
        grads += ", tied embedding held"
    host = f"on device; {size_text(row.host_state_bytes)} in host memory" if row.host_state_bytes else ""
    acts = size_text(estimate.activation_bytes) if estimate.activation_bytes else "left out"
    budget = None if row.fits is None else f"the {estimate.budget_bytes / GB:g} GB budget"
    fits = [] if budget is None else [("fits " if row.fits else "over ") + budget]
    total = "; ".join(([] if estimate.activation_bytes else ["+ activations"]) + fits)
    hosted = f"+ {size_text(m.host_table_bytes)} of embedding tables in host memory" if m.host_table_bytes else ""
    parts = [("weights", size_text(m.frozen_bytes + m.trainable_bytes), hosted),
             ("gradients", size_text(estimate.gradient_device_bytes), grads),
             ("optimizer state", size_text(row.device_state_bytes), host),
             ("activations", acts, estimate.activation_detail),
             *([("weight average", size_text(estimate.average_bytes), estimate.average_detail)]
               if estimate.average_detail else []),
             ("total", size_text(row.total_device_bytes), total)]
    lines = [f"peak on the device with the recipe's optimizer ({estimate.configured_optimizer}, * below):"]
    for label, value, note in parts:
        lines += _labelled(f"  {label:<17}{value:>{width}}", note, indent=2 + 17 + width + 2)
    if estimate.checkpoint_weight_bytes:
        each = size_text(estimate.checkpoint_bytes(estimate.configured_optimizer))
        lines += ["", *_labelled(f"{'checkpoint file':<19}{each:>{width}}",
                                 f"each: {estimate.checkpoint_detail}, optimizer state "
                                 f"{size_text(row.state_bytes)}", indent=19 + width + 2)]
    return lines


def format_table(estimate: MemoryEstimate) -> str:
    """Human-readable report for an 80-column terminal (GB = 10**9 bytes, MiB = 2**20 bytes): the model, the
    recipe's own peak part by part, then every optimizer's state and device total and the recommendation
    (the last 22 lines: a 24-line screen shows the whole table with its header)."""
    lines = _model_lines(estimate)
    if estimate.configured_optimizer in estimate.optimizers:
        lines += ["", *_run_lines(estimate)]
    lines += ["", f"{'optimizer':<22} {'state':>12} {'B/param':>8} {'on device':>12} {'device total':>13}"
              + ("  fits" if estimate.budget_bytes is not None else "")]
    for row, est in estimate.optimizers.items():
        mark = " *" if row == estimate.configured_optimizer else ""
        fits = "" if est.fits is None else ("  yes" if est.fits else "  no")
        lines.append(
            f"{row + mark:<22} {size_text(est.state_bytes):>12} {est.bytes_per_param:>8.3f} "
            f"{size_text(est.device_state_bytes):>12} {size_text(est.total_device_bytes):>13}{fits}"
        )
    grads = "released gradients" if estimate.step_in_backward else "gradients"
    acts = " + activations" if estimate.activation_bytes else " (activations left out)"
    average = " + weight average" if estimate.average_bytes else ""
    lines += ["", *_labelled("device total", f"= weights + {grads} + state on device{acts}{average}", indent=13)]
    if estimate.budget_bytes is not None:
        lines += _labelled(f"budget {estimate.budget_bytes / GB:g} GB ->",
                           f"recommended: {estimate.recommendation}{_configured_fits_too(estimate)}",
                           indent=len(f"budget {estimate.budget_bytes / GB:g} GB -> "))
    for note in estimate.notes:
        lines += textwrap.wrap(note, width=80, subsequent_indent="  ")
    return "\n".join(lines)


def _configured_fits_too(estimate: MemoryEstimate) -> str:
    """``" (the configured came_int8 fits too)"`` when the run's own optimizer fits the budget but the rule
    prefers another: a recipe is not wrong for fitting with another optimizer than the rule's first choice."""
    row = estimate.optimizers.get(estimate.configured_optimizer or "")
    recommended = (estimate.recommendation or "").split(" ")[0]
    if row is None or not row.fits or recommended == estimate.configured_optimizer:
        return ""
    return f" (the configured {estimate.configured_optimizer} fits too)"


def format_json(estimate: MemoryEstimate) -> str:
    """The estimate as indented JSON (:meth:`MemoryEstimate.as_dict`)."""
    return json.dumps(estimate.as_dict(), indent=2)
