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

Activations depend on batch size, sequence length and checkpointing: device totals exclude them, and
:func:`activation_bytes` gives the peak of a Llama-style decoder's forward + backward from its config
(the formula is in its docstring; ``tests/test_estimate.py`` checks it against torch's profiler on CPU).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowmem_lightning.optim.base import LowMemOptimizer, StateSpec
from lowmem_lightning.optim.registry import available_optimizers, optimizer_class

__all__ = [
    "OPTIMIZER_VARIANTS",
    "ModelCount",
    "OptimizerEstimate",
    "MemoryEstimate",
    "count_model",
    "state_layout",
    "optimizer_state_bytes",
    "released_gradient_bytes",
    "activation_bytes",
    "model_activation_bytes",
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


@dataclass(frozen=True)
class ModelCount:
    """Parameter counts (elements) and weight bytes of a model.

    ``params`` counts the model's own parameters, LoRA adapters excluded, with a 4-bit layer's weight
    counted as ``in_features * out_features`` elements; ``adapter_params`` the LoRA adapters;
    ``trainable_params`` every parameter with ``requires_grad``. ``frozen_bytes_by_dtype`` maps a dtype
    name (``bfloat16``, ...) or ``nf4`` (codes + scales of ``Linear4bit``) to bytes of frozen weights
    and buffers; ``trainable_bytes`` are the trainable weights themselves; ``gradient_bytes`` one
    gradient per trainable parameter in its dtype; ``largest_gradient_bytes`` the largest of those
    gradients (all that is alive at once under per-tensor gradient release, ``bucket_bytes=0``);
    ``trainable_nbytes`` every trainable tensor's bytes in parameter order (what
    :func:`released_gradient_bytes` replays).
    """

    params: int
    adapter_params: int
    trainable_params: int
    frozen_bytes_by_dtype: dict[str, int]
    trainable_bytes: int
    gradient_bytes: int
    largest_gradient_bytes: int = 0
    trainable_nbytes: tuple[int, ...] = ()

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

    @property
    def released_gradient_bytes(self) -> int:
        """Gradient bytes alive at once under gradient release (the fullest bucket of ``bucket_bytes``)."""
        return released_gradient_bytes(self.model.trainable_nbytes, self.bucket_bytes)

    @property
    def gradient_device_bytes(self) -> int:
        """Gradient bytes on the device: all of them, or the fullest released bucket with ``step_in_backward``."""
        return self.released_gradient_bytes if self.step_in_backward else self.model.gradient_bytes

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
            "budget_bytes": self.budget_bytes,
            "recommendation": self.recommendation,
            "optimizers": {name: asdict(est) for name, est in self.optimizers.items()},
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------ model
def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _is_linear4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit" and hasattr(module, "qweight")


def count_model(model: nn.Module) -> ModelCount:
    """Count parameters and weight bytes of ``model`` (any device; meta works, nothing is read).

    Shared (tied) tensors are counted once. 4-bit layers (``lowmem_lightning.quant.Linear4bit``)
    contribute ``in * out`` parameters and their stored code/scale bytes as ``nf4``.
    """
    seen: set[int] = set()
    params = adapter = trainable = trainable_bytes = grad_bytes = largest_grad = 0
    frozen: dict[str, int] = {}
    order: list[int] = []
    for module in model.modules():
        if _is_linear4bit(module):
            params += module.in_features * module.out_features
            quant = [b for name, b in module.named_buffers(recurse=False) if b is not None and name != "bias"]
            frozen["nf4"] = frozen.get("nf4", 0) + sum(_nbytes(b) for b in quant)
            seen.update(id(b) for b in quant)
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if any(marker in name for marker in _ADAPTER_MARKERS):
            adapter += param.numel()
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
                      largest_grad, tuple(order))


def released_gradient_bytes(tensor_bytes: Iterable[int], bucket_bytes: int = RELEASE_BUCKET_BYTES) -> int:
    """The most gradient bytes alive at once under gradient release with ``bucket_bytes`` buckets.

    Replays :class:`~lowmem_lightning.callbacks.release.GradientRelease`'s rule over the trainable
    tensors' bytes (``tensor_bytes`` in parameter order; backward produces them roughly in reverse): a
    ready gradient joins the bucket, and a bucket holding ``>= bucket_bytes`` is updated and freed. The
    answer is the fullest bucket, the tensor that closed it included: at most ``bucket_bytes`` plus the
    largest tensor, never more than all gradients; ``bucket_bytes=0`` gives the largest tensor.
    """
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 0:
        raise ValueError(f"Invalid bucket_bytes={bucket_bytes!r}: expected an int >= 0 (0: each tensor alone).")
    bucket = peak = 0
    for nbytes in reversed(list(tensor_bytes)):
        bucket += nbytes
        peak = max(peak, bucket)
        if bucket >= bucket_bytes:
            bucket = 0
    return peak


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
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid config {key}={value!r}: expected an int >= 1 (a Llama-style decoder config).")
    return value


def activation_bytes(config, batch_size: int, seq_len: int, dtype_bytes: int = 2,
                     gradient_checkpointing: bool = True) -> int:
    """Peak activation bytes of one forward + backward of a Llama-style decoder (HF ``LlamaForCausalLM``
    and its kin, SDPA attention, so no ``seq_len**2`` term), gradients of the weights not included.

    With ``n = batch_size * seq_len`` tokens, ``h``/``i``/``L``/``V`` the config's ``hidden_size``,
    ``intermediate_size``, ``num_hidden_layers``, ``vocab_size``, ``d = dtype_bytes`` and the
    coefficients of :data:`ACTIVATION_COEFFICIENTS` (``c``) and :data:`LOSS_BYTES_PER_VOCAB` (12):

    * gradient checkpointing: ``n * ((L + 1) * d * h + max(c.layer_h * h + c.layer_i * i, 12 * V + 2 * d * h))``
      -- each layer's input kept, plus the larger of one layer recomputed in backward and the loss;
    * without: ``n * (L * (c.full_h * h + c.full_i * i) + 12 * V + c.rest_h * h)`` -- every layer's saved
      tensors at once, then the loss.

    Within 5% of torch's CPU profiler on the sizes it was fitted to (and checked at others in
    ``tests/test_estimate.py``); the GPU kernels save the same tensors (``benchmarks/gpu_check.py``
    ``full_ft_7b`` measures it). Not modelled: mixed precision (autocast) and 4-bit/LoRA models.
    """
    if dtype_bytes not in ACTIVATION_COEFFICIENTS:
        raise ValueError(f"Invalid dtype_bytes={dtype_bytes!r}: expected 2 (bf16/fp16) or 4 (fp32).")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}={value!r}: expected an int >= 1.")
    h, i = _config_value(config, "hidden_size"), _config_value(config, "intermediate_size")
    layers, vocab = _config_value(config, "num_hidden_layers"), _config_value(config, "vocab_size")
    c, d = ACTIVATION_COEFFICIENTS[dtype_bytes], dtype_bytes
    loss = LOSS_BYTES_PER_VOCAB * vocab
    if gradient_checkpointing:
        per_token = (layers + 1) * d * h + max(c["layer_h"] * h + c["layer_i"] * i, loss + 2 * d * h)
    else:
        per_token = layers * (c["full_h"] * h + c["full_i"] * i) + loss + c["rest_h"] * h
    return int(batch_size * seq_len * per_token)


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_HALF_PRECISIONS = ("bf16-true", "16-true")
"""Lightning precisions that convert the model's weights to 2 bytes (``HalfPrecision``)."""


def _decoder_config(model: nn.Module):
    """The config of the first module (``model`` itself first) whose ``config`` has a ``hidden_size``."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "hidden_size", None) is not None:
            return config
    return None


def _weight_dtype(model: nn.Module, precision: str) -> torch.dtype | None:
    """The dtype of the weights as the run trains them: bf16 / fp16 under ``bf16-true`` / ``16-true``, else
    that of the model's largest floating-point parameter."""
    if precision in _HALF_PRECISIONS:
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16
    floats = [p for p in model.parameters() if p.is_floating_point()]
    return max(floats, key=lambda p: p.numel()).dtype if floats else None


def model_activation_bytes(model: nn.Module, batch_size: int, seq_len: int, gradient_checkpointing: bool,
                           precision: str | int | None = None) -> tuple[int | None, str]:
    """``(bytes, what they are of)`` of :func:`activation_bytes` for ``model`` (meta works) as a run with
    Lightning ``precision`` (``None``: ``"32-true"``) trains it; ``(None, why not)`` where that formula does
    not model the run: LoRA adapters or 4-bit layers, mixed precision (autocast), weights other than
    bf16/fp16/fp32, or a model with no Llama-style ``config`` (``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``vocab_size``)."""
    precision = "32-true" if precision is None else str(precision)
    count = count_model(model)
    if count.adapter_params or "nf4" in count.frozen_bytes_by_dtype:
        return None, "not modelled for LoRA / 4-bit models (the formula is fitted to full-weight decoders)"
    if precision not in ("32-true", "32", *_HALF_PRECISIONS):
        return None, f"not modelled under precision={precision!r} (fitted to '32-true', 'bf16-true' and '16-true')"
    config = _decoder_config(model)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    if config is None or any(getattr(config, key, None) is None for key in keys):
        return None, "not modelled: the model has no Llama-style config (" + ", ".join(keys) + ")"
    dtype = _weight_dtype(model, precision)
    if dtype not in _DTYPE_NAMES:
        return None, f"not modelled for {dtype} weights (fitted to bf16, fp16 and fp32)"
    nbytes = activation_bytes(config, batch_size, seq_len, dtype.itemsize, gradient_checkpointing)
    checkpointing = "checkpointing" if gradient_checkpointing else "no checkpointing"
    return nbytes, f"batch {batch_size} x seq {seq_len}, {_DTYPE_NAMES[dtype]}, {checkpointing}"


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


def optimizer_state_bytes(name: str, params: Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]], **kwargs
                          ) -> tuple[int, int]:
    """``(device_bytes, host_bytes)`` of the state of registered optimizer ``name`` with ``kwargs`` over
    the trainable ``params`` (meta tensors work; ``(name, param)`` pairs from ``named_parameters()`` let
    an optimizer that splits by name, Muon, see the names), summed from the exact state layout of each param.

    Paged optimizers keep quantized codes and scales in host pages (``host_bytes``); their step
    counters and the fp32 state of small tensors stay on the device, and the pages of the tensor
    being updated and of the prefetched next one are copied in: ``device_bytes`` counts those two
    (the largest two, the minimum resident set; an automatic budget may keep more resident).
    """
    pairs = [item if isinstance(item, tuple) else (None, item) for item in params]
    pairs = [(n, p) for n, p in pairs if p.requires_grad]
    if not pairs:
        return 0, 0
    named = all(n is not None for n, _ in pairs)
    optimizer = optimizer_class(name)(pairs if named else [p for _, p in pairs], **kwargs)
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
    released = released_gradient_bytes(count.trainable_nbytes, bucket_bytes)
    weights = count.frozen_bytes + count.trainable_bytes + activations
    grads = released if step_in_backward else count.gradient_bytes
    result: dict[str, OptimizerEstimate] = {}
    notes = []
    for row, (name, kwargs) in rows.items():
        try:
            device, host = optimizer_state_bytes(name, params, **kwargs)
        except (TypeError, ValueError, ImportError) as err:
            notes.append(f"{row}: not estimated ({err})")
            continue
        state = device + host
        per_param = state / count.trainable_params if count.trainable_params else 0.0
        result[row] = OptimizerEstimate(name, dict(kwargs), state, device, host, per_param, weights + grads + device,
                                        weights + released + device)
    estimate = MemoryEstimate(count, result, configured_row, step_in_backward, budget_bytes, None, notes,
                              gradient_checkpointing, bucket_bytes, activations, activation_detail)
    if budget_bytes is not None:
        for est in result.values():
            est.fits = est.total_device_bytes <= budget_bytes
        estimate.recommendation = recommend(estimate)
    return estimate


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
    the state of 4-bit AdamW (1.06), which keeps Adam's algorithm."""
    rows = estimate.optimizers
    release = " + step_in_backward"
    paged = "paged_adamw_8bit" + ("" if estimate.gradient_checkpointing else " + gradient checkpointing")
    if estimate.step_in_backward:  # the run releases already: name the optimizer only
        for row in (*_IN_MEMORY_ORDER, "paged_adamw_8bit", "adafactor"):
            if row in rows and rows[row].fits:
                return paged if row == "paged_adamw_8bit" else row
    else:
        budget = estimate.budget_bytes if estimate.budget_bytes is not None else -1
        for row in _IN_MEMORY_ORDER:
            if row in rows and rows[row].fits:
                return row
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
    return f"nothing fits: weights + gradients alone need {need / GB:.2f} GB; " + _reduce_weights_advice(estimate.model)


def _reduce_weights_advice(model: ModelCount) -> str:
    """What would shrink the weights themselves, leaving out what the model already does (a 4-bit
    base, LoRA adapters)."""
    quantized = "nf4" in model.frozen_bytes_by_dtype
    adapters = model.adapter_params > 0
    if quantized and adapters:
        return ("the base is already 4-bit NF4 and only LoRA adapters train: raise the budget, or train a smaller "
                "model")
    if adapters:
        return "quantize the base (quantize: nf4) under the LoRA adapters, or raise the budget"
    if quantized:
        return "train LoRA adapters on the 4-bit base (lora: ...), or raise the budget"
    return "quantize the base (quantize: nf4) and train LoRA adapters, or raise the budget"


# ------------------------------------------------------------------------------------------ output
def _gb(nbytes: int) -> str:
    if nbytes >= 10**8:
        return f"{nbytes / GB:.3f} GB"
    if nbytes >= MIB // 10:
        return f"{nbytes / MIB:.2f} MiB"
    return f"{nbytes:,} B"


LABEL_WIDTH = 23
"""Width of the label column of :func:`format_table` (the report fits an 80-column terminal)."""


def _labelled(label: str, text: str, indent: int = LABEL_WIDTH) -> list[str]:
    """``label`` padded to ``indent`` columns, then ``text`` wrapped to 80 columns under it."""
    first = label.ljust(indent) if len(label) < indent else label + "  "
    return textwrap.wrap(text, width=80, initial_indent=first, subsequent_indent=" " * indent) or [label]


def _model_lines(estimate: MemoryEstimate) -> list[str]:
    """Parameter counts, weights, gradients and activations of the model (whatever the optimizer)."""
    m = estimate.model
    lines = [
        f"params (base model)    {m.params:,}",
        f"adapter params (LoRA)  {m.adapter_params:,}",
        f"trainable params       {m.trainable_params:,}",
        *_labelled("frozen weights", f"{_gb(m.frozen_bytes)}  ("
                   + ", ".join(f"{k}: {_gb(v)}" for k, v in m.frozen_bytes_by_dtype.items()) + ")"),
        f"trainable weights      {_gb(m.trainable_bytes)}",
        f"gradients              {_gb(m.gradient_bytes)}"
        + (f"  ({_gb(estimate.released_gradient_bytes)} on device: released)" if estimate.step_in_backward else ""),
    ]
    if estimate.activation_bytes:
        lines += _labelled("activations", f"{_gb(estimate.activation_bytes)}  ({estimate.activation_detail})")
    else:
        lines += _labelled("activations", estimate.activation_detail or "left out")
    return lines


def _run_lines(estimate: MemoryEstimate) -> list[str]:
    """The run's own peak on the device, part by part: weights, gradients, optimizer state, activations, total."""
    row = estimate.optimizers[estimate.configured_optimizer]
    m, width = estimate.model, 12
    grads = (f"released in backward, {_gb(estimate.bucket_bytes)} buckets" if estimate.step_in_backward
             else "one per trainable parameter")
    host = f"on device; {_gb(row.host_state_bytes)} in host memory" if row.host_state_bytes else ""
    acts = _gb(estimate.activation_bytes) if estimate.activation_bytes else "left out"
    budget = None if row.fits is None else f"the {estimate.budget_bytes / GB:g} GB budget"
    fits = [] if budget is None else [("fits " if row.fits else "over ") + budget]
    total = "; ".join(([] if estimate.activation_bytes else ["+ activations"]) + fits)
    parts = [("weights", _gb(m.frozen_bytes + m.trainable_bytes), ""),
             ("gradients", _gb(estimate.gradient_device_bytes), grads),
             ("optimizer state", _gb(row.device_state_bytes), host),
             ("activations", acts, estimate.activation_detail),
             ("total", _gb(row.total_device_bytes), total)]
    lines = [f"peak on the device with the recipe's optimizer ({estimate.configured_optimizer}, * below):"]
    for label, value, note in parts:
        lines += _labelled(f"  {label:<17}{value:>{width}}", note, indent=2 + 17 + width + 2)
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
            f"{row + mark:<22} {_gb(est.state_bytes):>12} {est.bytes_per_param:>8.3f} "
            f"{_gb(est.device_state_bytes):>12} {_gb(est.total_device_bytes):>13}{fits}"
        )
    grads = "released gradients" if estimate.step_in_backward else "gradients"
    acts = " + activations" if estimate.activation_bytes else " (activations left out)"
    lines += ["", *_labelled("device total", f"= weights + {grads} + state on device{acts}", indent=13)]
    if estimate.budget_bytes is not None:
        lines += _labelled(f"budget {estimate.budget_bytes / GB:g} GB ->", f"recommended: {estimate.recommendation}",
                           indent=len(f"budget {estimate.budget_bytes / GB:g} GB -> "))
    for note in estimate.notes:
        lines += textwrap.wrap(note, width=80, subsequent_indent="  ")
    return "\n".join(lines)


def format_json(estimate: MemoryEstimate) -> str:
    """The estimate as indented JSON (:meth:`MemoryEstimate.as_dict`)."""
    return json.dumps(estimate.as_dict(), indent=2)
