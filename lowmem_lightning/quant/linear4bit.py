"""``Linear4bit``: a frozen linear layer whose weight is stored in NF4 (QLoRA); whole models:
:mod:`~lowmem_lightning.quant.convert`.

The weight lives as buffers (packed 4-bit codes and block scales, see
:mod:`lowmem_lightning.kernels.nf4`), ~0.516 bytes per weight with block 64 and double quantization.
Forward dequantizes the weight to the compute dtype (Triton on CUDA, the PyTorch reference on CPU)
and multiplies; the dense copy is a temporary, not kept for backward: backward dequantizes again to
compute the input gradient (the weight itself gets none). So LoRA adapters and earlier layers train
while the 4-bit base stays frozen, and activation memory holds no dense weight.

``Linear4bit`` is an ``nn.Linear`` (without a weight ``Parameter``) so that peft's own LoRA dispatch
(``dispatch_default``) wraps it with its plain ``lora.Linear``, as it does for any linear layer; see
:mod:`lowmem_lightning.quant` for why. Its ``weight`` attribute is therefore not a tensor while the
weight is in NF4 but an :class:`NF4WeightHandle`: it carries ``shape`` / ``dtype`` / ``device``, takes
the in-place ``weight.data += delta`` / ``-= delta`` with which peft merges and unmerges adapters, and
refuses every other tensor operation with an error that points to :meth:`Linear4bit.dequantize`. A
merge is lossless: the layer becomes *dense* (``dequantize(W) + delta`` in fp32 math, stored once in
``weight_dtype`` as a frozen ``weight`` Parameter, NF4 buffers dropped), and from then on it is a plain
linear layer whose ``state_dict`` is ``nn.Linear``'s (``weight``, ``bias``). Nothing is dense before a
merge, and only the merged layers become dense.
"""

from __future__ import annotations

import math

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

__all__ = ["Linear4bit", "NF4WeightHandle", "linear4bit_bytes", "NonFiniteWeightError", "is_conv1d", "dense_layer"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_QUANT_BUFFERS = ("qweight", "absmax", "qscale", "scale_step", "scale_mean")


class NonFiniteWeightError(ValueError):
    """Weights holding nan or +-inf, refused before they are quantized or loaded.

    One non-finite element in a weight poisons its NF4 block scale, and with double quantization the
    scale statistics of the whole tensor, so every element decodes to nan: the layer is lost for good
    and nothing says where it came from. ``counts`` maps each refused tensor's qualified name to its
    number of non-finite elements; ``path`` is the file it came from (None for an in-memory model).
    """

    def __init__(self, message: str, counts: dict[str, int], path: str | None = None) -> None:
        super().__init__(message)
        self.counts = dict(counts)
        self.path = path


def _nonfinite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on ``tensor``'s device, true when ``tensor`` holds a nan or +-inf.

    One fused min/max reduction (nan propagates through it on CPU and CUDA; an inf is the min or the
    max): no full-size temporary (``isfinite(t).all()`` would allocate a bool per element) and no host
    synchronisation, so a loader can flag every tensor and read all flags once at the end. On one CPU
    thread it costs ~0.2% of quantizing the tensor (a 2048x4096 bf16 weight; ``vector_norm(t, inf)``,
    also allocation-free, costs ~8%).
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return torch.zeros((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor.detach())
    return ~(torch.isfinite(low) & torch.isfinite(high))


def _flagged(flags: list[torch.Tensor]) -> list[int]:
    """Indices of the true flags; one device-to-host copy per device (usually one in all)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    hits = []
    for indices in by_device.values():
        values = torch.stack([flags[i] for i in indices]).cpu()
        hits += [i for i, hit in zip(indices, values.tolist()) if hit]
    return sorted(hits)


def _describe_nonfinite(tensor: torch.Tensor) -> tuple[int, str]:
    """(count, "N nan, N +inf, N -inf of TOTAL elements") of ``tensor``; a host sync (error path only)."""
    t = tensor.detach()
    nan, pos, neg = (int(f(t).sum()) for f in (torch.isnan, torch.isposinf, torch.isneginf))
    parts = [f"{n} {what}" for n, what in ((nan, "nan"), (pos, "+inf"), (neg, "-inf")) if n]
    count = nan + pos + neg
    return count, f"{count} non-finite element{'s' if count != 1 else ''} ({', '.join(parts)}) of {t.numel()}"


def _refuse_nonfinite(named: list[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise :class:`NonFiniteWeightError` naming every tensor of ``named`` that holds a nan or +-inf.

    Flags all tensors first and synchronises once (``what`` says who refuses, for the message)."""
    hits = _flagged([_nonfinite_flag(t) for _, t in named])
    if not hits:
        return
    counts, lines = {}, []
    for i in hits:
        name, tensor = named[i]
        counts[name], text = _describe_nonfinite(tensor)
        lines.append(f"{name}: {text}")
    raise NonFiniteWeightError(
        f"{what} refused {len(hits)} tensor{'s' if len(hits) > 1 else ''} holding nan/inf: {'; '.join(lines)}. "
        "Quantizing a non-finite weight makes its whole NF4 block (with double quantization: every element "
        "sharing its scale statistics) decode to nan; fix or re-export the weights. Nothing was changed.",
        counts,
    )


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


_READ_REFUSAL = (
    "Linear4bit.weight is stored as 4-bit NF4 codes, not as a tensor, so {name} cannot take it; use "
    "layer.dequantize(dtype) for a dense copy (or layer.quantize_weight_(w) to store a new weight). Code that reads a "
    "4-bit base weight as a tensor (PiSSA / OLoRA / CorDA initialization, HRA, DeLoRA) needs the model loaded "
    "unquantized (DoRA: lowmem_lightning.quant.add_lora(use_dora=True)); a peft merge that fails here may work with "
    "merge_and_unload(safe_merge=True)."
)
"""What :class:`NF4WeightHandle` says when code reads it as a tensor (``{name}``: what was asked of it)."""


class NF4WeightHandle:
    """``Linear4bit.weight`` while the weight is stored in NF4: a handle on the layer, not a tensor.

    It has the weight's ``shape`` (out_features, in_features), ``dtype`` (the layer's ``weight_dtype``),
    ``device`` and ``requires_grad`` (False), and supports exactly what peft's LoRA merge does to a base
    weight: ``weight.data += delta`` / ``-= delta`` make the layer dense and lossless (see the module
    docstring), ``weight.data.clone()`` is a dense fp32 copy, and ``weight.data = tensor`` (peft < 0.22) or
    ``weight.data.copy_(tensor)`` (peft >= 0.22) makes the layer dense with that tensor. Any torch function
    (``torch.nn.init``, matmul, ``isfinite``, ...) raises a ``TypeError`` naming :meth:`Linear4bit.dequantize`, so
    nothing reads codes as if they were weights.
    """

    __slots__ = ("_layer",)

    def __init__(self, layer: Linear4bit) -> None:
        self._layer = layer

    @property
    def shape(self) -> torch.Size:
        """(out_features, in_features)."""
        return torch.Size((self._layer.out_features, self._layer.in_features))

    def size(self, dim: int | None = None):
        """``shape`` (or one of its dims), as ``Tensor.size``."""
        return self.shape if dim is None else self.shape[dim]

    @property
    def ndim(self) -> int:
        """2."""
        return 2

    def numel(self) -> int:
        """out_features * in_features (weights, not stored bytes)."""
        return self._layer.out_features * self._layer.in_features

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight decodes to (the layer's ``weight_dtype``)."""
        return self._layer.weight_dtype

    @property
    def device(self) -> torch.device:
        """The device of the stored codes."""
        return self._layer.qweight.device

    @property
    def is_meta(self) -> bool:
        """Whether the layer is a shape-only meta layer."""
        return self.device.type == "meta"

    @property
    def requires_grad(self) -> bool:
        """False: the 4-bit weight is frozen. Setting False is accepted and changes nothing (peft's AdaLoRA and
        others freeze the base weight so); setting True is refused: codes have no gradient."""
        return False

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value:
            raise ValueError(
                f"Invalid requires_grad={value!r} for Linear4bit.weight: a 4-bit NF4 weight is frozen and gets no "
                "gradient. Train adapters on it (LoRA), or make the layer dense first (dequantize_model) to train "
                "its weight."
            )

    @property
    def data(self) -> NF4WeightHandle:
        """The handle itself (``weight.data`` is what peft merges into)."""
        return self

    @data.setter
    def data(self, value) -> None:
        if value is self or (isinstance(value, NF4WeightHandle) and value._layer is self._layer):
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Invalid weight.data={type(value).__name__}: expected a torch.Tensor of shape "
                            f"{tuple(self.shape)}.")
        self._layer._make_dense(value)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in ``dtype`` (default ``weight_dtype``); see :meth:`Linear4bit.dequantize`."""
        return self._layer.dequantize(dtype)

    def clone(self) -> torch.Tensor:
        """A dense fp32 copy of the weight (what peft's ``safe_merge`` adds the delta to and assigns
        back through ``weight.data = ...``): fp32, so the merged weight is rounded to ``weight_dtype``
        once, exactly as by ``weight.data += delta``."""
        return self._layer.dequantize(torch.float32)

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """``weight.data.copy_(merged)``, peft's (>= 0.22) safe merge and its LoRA variants' unmerge: the layer
        becomes dense holding a copy of ``src`` (out_features, in_features), rounded once to ``weight_dtype``,
        on the layer's device. Returns the new dense weight (this handle no longer stands for it)."""
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"Invalid src={type(src).__name__}: expected a torch.Tensor of shape {tuple(self.shape)}.")
        layer = self._layer
        layer._make_dense(src.detach().to(device=self.device, dtype=self.dtype, non_blocking=non_blocking, copy=True))
        return layer.weight

    def __getattr__(self, name: str):
        raise AttributeError(f"'NF4WeightHandle' has no attribute {name!r}: " + _READ_REFUSAL.format(name=f".{name}()"))

    def __iadd__(self, delta: torch.Tensor) -> torch.Tensor:
        """``weight += delta`` (``weight.data += delta``): the layer becomes dense (lossless, see the module docstring);
        returns its new dense weight, so ``w = layer.weight.data; w += delta; layer.weight.data = w`` (peft's
        VeRA and SHiRA merges) holds one dense weight."""
        self._layer._merge_delta(delta, 1.0)
        return self._layer.weight.data

    def __isub__(self, delta: torch.Tensor) -> torch.Tensor:
        """``weight -= delta``: as ``+=`` with ``-delta``."""
        self._layer._merge_delta(delta, -1.0)
        return self._layer.weight.data

    def _refuse(self, *args, **kwargs):
        raise TypeError(_READ_REFUSAL.format(name="an arithmetic operator"))

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = __truediv__ = _refuse

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", repr(func))
        raise TypeError(_READ_REFUSAL.format(name=f"{name}()"))

    def __repr__(self) -> str:
        return f"NF4WeightHandle(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class Linear4bit(nn.Linear):
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

    ``conv1d``: the layer stands for a transformers ``Conv1D`` (GPT-2, GPT-2's family: ``y = x @ W + b`` with ``W``
    stored (in, out)). It computes and stores like any other (the weight as (out, in)); a full-precision ``weight``
    loaded from a state dict arrives in ``Conv1D``'s (in, out) and is transposed on the way in, and
    :func:`~lowmem_lightning.quant.dequantize_model` gives a ``Conv1D`` back.

    It is an ``nn.Linear`` for peft's dispatch; ``weight`` is an :class:`NF4WeightHandle` until a LoRA
    merge (``weight.data += delta``) makes the layer dense (``is_quantized`` False; see the module
    docstring).
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
        conv1d: bool = False,
    ) -> None:
        _check_features("in_features", in_features)
        _check_features("out_features", out_features)
        _check_options(block_size, double_quant, compute_dtype)
        if weight_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"Invalid weight_dtype={weight_dtype!r}: expected float32, bfloat16 or float16.")
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight Parameter
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype
        self.conv1d = bool(conv1d)
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
        device gives a meta layer (shapes only, nothing computed). A weight or bias holding a nan or
        +-inf raises :class:`NonFiniteWeightError` (counts per tensor) before anything is quantized.
        """
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear must be a torch.nn.Linear or a transformers Conv1D, got {type(linear).__name__}.")
        if linear.weight.device.type != "meta":
            _refuse_nonfinite(_linear_tensors("linear", linear), "Linear4bit.from_linear")
        return cls._quantized_copy(linear, block_size, double_quant, compute_dtype)

    @classmethod
    def _quantized_copy(cls, linear: nn.Linear, block_size, double_quant, compute_dtype) -> Linear4bit:
        """``from_linear`` without the finite check (``quantize_model`` checks every layer at once)."""
        conv1d = is_conv1d(linear)
        weight = linear.weight.t().contiguous() if conv1d else linear.weight  # (out, in)
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"Invalid linear.weight.dtype={weight.dtype}: expected float32, bfloat16 or float16.")
        layer = cls(
            weight.shape[1], weight.shape[0], linear.bias is not None, block_size, double_quant,
            compute_dtype, weight.dtype, device=torch.device("meta"), conv1d=conv1d,
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
        self._parameters.pop("weight", None)  # a merged (dense) layer becomes 4-bit again
        for name in _QUANT_BUFFERS:
            value = getattr(w, "packed" if name == "qweight" else name)
            if value is not None:
                self._buffers[name] = value
        self.weight_dtype = weight.dtype
        return self

    @property
    def is_quantized(self) -> bool:
        """True while the weight is stored in NF4; False once a LoRA merge made the layer dense."""
        return "weight" not in self._parameters

    @property
    def weight(self):
        """An :class:`NF4WeightHandle` while 4-bit; the dense frozen ``Parameter`` after a merge."""
        dense = self._parameters.get("weight")
        return NF4WeightHandle(self) if dense is None else dense

    @weight.setter
    def weight(self, value) -> None:
        # nn.Module.__setattr__ sends Parameters to register_parameter and everything else here.
        if isinstance(value, NF4WeightHandle) and value._layer is self:
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"Invalid Linear4bit.weight={type(value).__name__}: expected a tensor of shape "
                            f"({self.out_features}, {self.in_features}).")
        self._make_dense(value)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """As ``nn.Module``'s; ``weight`` (assigned a Parameter, as peft's unload does) makes the layer dense."""
        if name == "weight" and param is not None:
            self._make_dense(param)
            return
        super().register_parameter(name, param)

    @torch.no_grad()
    def _make_dense(self, weight: torch.Tensor) -> None:
        """Hold ``weight`` (out, in) as a frozen dense Parameter in ``weight_dtype``; drop the NF4 buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Invalid weight of shape {tuple(weight.shape)}: expected "
                             f"({self.out_features}, {self.in_features}).")
        if isinstance(weight, nn.Parameter) and weight.dtype == self.weight_dtype and not weight.requires_grad:
            dense = weight
        else:
            dense = nn.Parameter(weight.detach().to(self.weight_dtype), requires_grad=False)
        for name in _QUANT_BUFFERS:
            self._buffers.pop(name, None)
        self._parameters["weight"] = dense

    @torch.no_grad()
    def _merge_delta(self, delta: torch.Tensor, sign: float) -> None:
        """``W <- W + sign * delta`` with fp32 math: ``dequantize(W)`` first when still 4-bit (lossless)."""
        if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (self.out_features, self.in_features):
            got = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
            raise ValueError(f"Invalid delta of shape {got}: expected ({self.out_features}, {self.in_features}).")
        current = self.dequantize(torch.float32)
        self._make_dense(current + sign * delta.to(device=current.device, dtype=torch.float32))

    def nf4_weight(self) -> NF4Weight:
        """The stored weight as an :class:`NF4Weight` view of this layer's buffers (no copy)."""
        if not self.is_quantized:
            raise RuntimeError("This Linear4bit holds a merged dense weight (a LoRA merge); it has no NF4 codes.")
        get = lambda name: getattr(self, name, None)
        return NF4Weight(
            self.qweight, get("absmax"), get("qscale"), get("scale_step"), get("scale_mean"),
            torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.block_size,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out_features, in_features) decoded in ``dtype`` (default: ``weight_dtype``); a
        copy of the dense weight once a merge made the layer dense."""
        if not self.is_quantized:
            return self._parameters["weight"].detach().to(dtype or self.weight_dtype, copy=True)
        return dequantize_nf4(self.nf4_weight(), dtype or self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored by this layer: codes, scales and bias (the dense weight and bias once merged)."""
        tensors = [self._buffers.get(name) for name in _QUANT_BUFFERS] + [self._parameters.get("weight"), self.bias]
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
            if self.is_quantized:
                out = _NF4LinearFunction.apply(x.to(dtype), self)
            else:
                out = x.to(dtype) @ self._parameters["weight"].to(dtype).t()
            if self.bias is not None:
                out = out + self.bias.to(dtype)
        return out if autocast else out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() must move the codes and fp32 scales but never cast them: only the
        # device changes for them, while weight_dtype (and the bias) follow the requested dtype.
        device = self.qweight.device if self.is_quantized else self._parameters["weight"].device
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=device))
        saved = {name: self._buffers[name] for name in _QUANT_BUFFERS if self._buffers.get(name) is not None}
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
        if key in state_dict and self.is_quantized:
            weight = state_dict.pop(key)
            weight = weight.t().contiguous() if self.conv1d else weight  # Conv1D's (in, out)
            if self.qweight.device.type != "meta":
                weight = weight.to(self.qweight.device)
            self.quantize_weight_(weight)
            for name in _QUANT_BUFFERS:
                if self._buffers.get(name) is not None:
                    state_dict.setdefault(prefix + name, self._buffers[name])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        storage = (f"nf4 block_size={self.block_size}, double_quant={self.double_quant}" if self.is_quantized
                   else "merged dense weight")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{storage}, weight_dtype={self.weight_dtype}" + (", conv1d=True" if self.conv1d else "")
        )


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (GPT-2's linear layer: weight (in, out)), without importing
    transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def dense_layer(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool = False) -> nn.Module:
    """A frozen ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` as they are, or with ``conv1d`` a
    transformers ``Conv1D`` (GPT-2's layer: the weight stored transposed, (in, out))."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(weight.shape[0], weight.shape[1]).to(device="meta")
        weight = weight.t().contiguous()
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    return layer


def _empty_on(device):
    return lambda *shape, dtype: torch.empty(*shape, dtype=dtype, device=device)


def _linear_tensors(name: str, linear: nn.Linear) -> list[tuple[str, torch.Tensor]]:
    """(qualified name, tensor) of ``linear``'s weight and bias (when it has one)."""
    prefix = f"{name}." if name else ""
    pairs = [(f"{prefix}weight", linear.weight)]
    return pairs + ([(f"{prefix}bias", linear.bias)] if linear.bias is not None else [])
