"""``Linear4bit``: a frozen linear layer whose weight is stored in NF4 (QLoRA), and ``quantize_model``.

The weight lives as buffers (packed 4-bit codes and block scales, see
:mod:`lowmem_lightning.kernels.nf4`), ~0.516 bytes per weight with block 64 and double quantization.
Forward dequantizes the weight to the compute dtype (Triton on CUDA, the PyTorch reference on CPU)
and multiplies; the dense copy is a temporary, not kept for backward: backward dequantizes again to
compute the input gradient (the weight itself gets none). So LoRA adapters and earlier layers train
while the 4-bit base stays frozen, and activation memory holds no dense weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lowmem_lightning.kernels.nf4 import (
    BLOCK_SIZES,
    SCALE_BLOCK,
    NF4Weight,
    dequantize_nf4,
    nf4_storage_bytes,
    quantize_nf4,
)

__all__ = ["Linear4bit", "quantize_model", "linear4bit_bytes"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QUANT_BUFFERS = ("qweight", "absmax", "qscale", "scale_step", "scale_mean")


def linear4bit_bytes(in_features: int, out_features: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Storage bytes of a ``Linear4bit`` weight of shape (out_features, in_features), bias excluded.

    Codes (0.5 B/param) plus block scales: ~0.5159 B/param for block 64 with double quantization
    (``linear4bit_bytes(4096, 4096) / 4096**2 = 0.51587``).
    """
    return nf4_storage_bytes(in_features * out_features, block_size, double_quant)


def _check_features(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Invalid {name}={value!r}: expected a positive int.")


def _check_options(block_size, double_quant, compute_dtype) -> None:
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"Invalid block_size={block_size!r}: expected one of {', '.join(map(str, BLOCK_SIZES))}.")
    if not isinstance(double_quant, bool):
        raise TypeError(f"Invalid double_quant={double_quant!r}: expected True or False.")
    if compute_dtype is not None and compute_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"Invalid compute_dtype={compute_dtype!r}: expected None, float32, bfloat16 or float16.")


class _NF4LinearFunction(torch.autograd.Function):
    """``y = x @ W.T`` with W decoded from NF4 in forward and again in backward (nothing dense saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer with an NF4 weight (QLoRA); ``y = x @ dequantize(W).T + bias``.

    Buffers (the whole ``state_dict`` with ``bias``): ``qweight`` uint8 packed codes
    (``ceil(in*out/2)`` bytes); with ``double_quant`` ``qscale`` int8 per block, ``scale_step`` fp32
    per 256 blocks and ``scale_mean`` fp32 (1); without it ``absmax`` fp32 per block. ``bias`` is a
    frozen ``nn.Parameter`` in ``weight_dtype`` (or None). There is no weight ``Parameter``.

    Forward runs in the autocast dtype when autocast is on (the output is in that dtype), else in
    ``compute_dtype`` if set, else in the input's dtype; without autocast the output has the input's
    dtype. Gradients flow to the input only.

    Build one with :meth:`from_linear`; the constructor makes an empty layer (``device="meta"`` gives
    a shape-only layer for memory estimates or for filling by :meth:`quantize_weight_`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        _check_options(block_size, double_quant, compute_dtype)
        if weight_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Invalid weight_dtype={weight_dtype!r}: expected float32, bfloat16 or float16.")
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self._allocate(torch.empty if device is None else _empty_on(device))
        self.bias = None if not bias else nn.Parameter(
            torch.zeros(out_features, dtype=weight_dtype, device=device), requires_grad=False
        )

    def _allocate(self, empty) -> None:
        n = self.in_features * self.out_features
        blocks = math.ceil(n / self.block_size)
        self.register_buffer("qweight", empty(math.ceil(n / 2), dtype=torch.uint8))
        if self.double_quant:
            self.register_buffer("qscale", empty(blocks, dtype=torch.int8))
            self.register_buffer("scale_step", empty(math.ceil(blocks / SCALE_BLOCK), dtype=torch.float32))
            self.register_buffer("scale_mean", empty(1, dtype=torch.float32))
        else:
            self.register_buffer("absmax", empty(blocks, dtype=torch.float32))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize ``linear`` (its weight on its own device: Triton on CUDA) into a new ``Linear4bit``.

        ``weight_dtype`` becomes the linear's weight dtype; the bias is copied. A weight on the meta
        device gives a meta layer (shapes only, nothing computed).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}.")
        weight = linear.weight
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Invalid linear.weight.dtype={weight.dtype}: expected float32, bfloat16 or float16.")
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, block_size, double_quant,
            compute_dtype, weight.dtype, device=torch.device("meta"),
        )
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if weight.device.type == "meta":
            return layer
        layer.quantize_weight_(weight)
        return layer

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor) -> Linear4bit:
        """Replace the stored weight by the NF4 quantization of ``weight`` (out, in), on its device.

        Sets ``weight_dtype`` to ``weight.dtype``. Returns ``self``.
        """
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (self.out_features, self.in_features):
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"Invalid weight of shape {got}: expected ({self.out_features}, {self.in_features}).")
        w = quantize_nf4(weight.detach(), self.block_size, self.double_quant)
        for name in _QUANT_BUFFERS:
            value = getattr(w, "packed" if name == "qweight" else name)
            if value is not None:
                setattr(self, name, value)
        self.weight_dtype = weight.dtype
        return self

    def nf4_weight(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` view of this layer's buffers (no copy)."""
        get = lambda name: getattr(self, name, None)
        return NF4Weight(
            self.qweight, get("absmax"), get("qscale"), get("scale_step"), get("scale_mean"),
            torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.block_size,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out_features, in_features) decoded in ``dtype`` (default: ``weight_dtype``)."""
        return dequantize_nf4(self.nf4_weight(), dtype or self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored by this layer: codes, scales and bias."""
        tensors = [getattr(self, name, None) for name in _QUANT_BUFFERS] + [self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _compute_dtype(self, x: torch.Tensor) -> tuple[torch.dtype, bool]:
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type), True
        return self.compute_dtype or x.dtype, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` of shape (..., in_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Invalid input of shape {tuple(x.shape)}: expected last dim {self.in_features}.")
        dtype, autocast = self._compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out = _NF4LinearFunction.apply(x.to(dtype), self)
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out if autocast else out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() must move the codes and fp32 scales but never cast them: only the
        # device changes for them, while weight_dtype (and the bias) follow the requested dtype.
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.qweight.device))
        saved = {name: getattr(self, name) for name in _QUANT_BUFFERS if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        if probe.dtype in _FLOAT_DTYPES:
            self.weight_dtype = probe.dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A full-precision checkpoint ("weight" key, as nn.Linear saves) is quantized on load.
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict.pop(key)
            if self.qweight.device.type != "meta":
                weight = weight.to(self.qweight.device)
            self.quantize_weight_(weight)
            for name in _QUANT_BUFFERS:
                if hasattr(self, name):
                    state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 block_size={self.block_size}, double_quant={self.double_quant}, weight_dtype={self.weight_dtype}"
        )


def _empty_on(device):
    return lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=device)


def _check_skip(skip) -> tuple[str, ...]:
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, Iterable) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"Invalid skip={skip!r}: expected a sequence of module names (str).")
    return tuple(skip)


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a frozen :class:`Linear4bit`, in place; returns ``model``.

    A layer is kept when its qualified name equals an entry of ``skip`` or ends with ``"." + entry``
    (``"lm_head"`` keeps ``model.lm_head``). Each weight is quantized on its own device (Triton on
    CUDA) and released as soon as its layer is replaced; meta weights give meta layers (shapes only).
    """
    skip = _check_skip(skip)
    _check_options(block_size, double_quant, compute_dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is nn.Linear and not _is_skipped(name, skip)
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Linear4bit.from_linear(linear, block_size, double_quant, compute_dtype))
    return model
