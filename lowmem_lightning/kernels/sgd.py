"""Fused SGD step (momentum, dampening, Nesterov, coupled weight decay) with fp32 or 8-bit momentum.

The math is exactly ``torch.optim.SGD`` (Sutskever et al., "On the importance of initialization and
momentum in deep learning", ICML 2013, as formulated by PyTorch), all in fp32::

    g   = -grad if maximize else grad
    d   = g + weight_decay * p
    buf = d                                          on the first step of the tensor
    buf = momentum * buf + (1 - dampening) * d       afterwards
    d   = d + momentum * buf  if nesterov  else  buf     (only when momentum != 0)
    p   = p - lr * d

Momentum is kept either in fp32 (4 bytes/param) or in the package's signed block-wise 8-bit code
(:mod:`.codec`: one int8 per element plus one fp32 absmax per 256 elements, 1.016 bytes/param; the
parameter update uses the fp32 momentum *before* it is re-quantized, as in Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", ICLR 2022). bf16/fp16 params are written back with
stochastic rounding (:mod:`.rounding`), seeded on the device from the tensor's step counter and its
index, so no host value is needed per step.

One pass over memory: a program loads ``ROWS x 256`` elements of param, grad and momentum, updates
them and stores param and momentum. One launch covers many tensors: a table of int64 data pointers
(one column per tensor) and a tile -> tensor map tell each program which tensor it updates;
:func:`.dispatch.dispatch` groups them by device and ``_launch_key`` (momentum mode, aligned, param
dtype, grad dtype); the family registers as :data:`SGD_FAMILY`. Per step and element it moves
``2 * param_bytes + grad_bytes`` plus ``8`` (fp32 momentum) or ``2 + 8/256`` (8-bit momentum) bytes.

A 0/1 fp32 ``flag`` (from the optimizer's non-finite guard) masks every load and store: with
``flag == 0`` params and momentum are left untouched. The step counter is read, already advanced by the
optimizer for this step (``step == 1`` marks the tensor's first update, which initializes the
momentum), as in every kernel of the package.

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .codec import (
    BLOCK_SIZE,
    block_rows,
    decode_signed,
    decode_signed_reference,
    encode_signed,
    encode_signed_reference,
)
from .cpu_buckets import fold_seeds, gather_rows, per_tensor, plan
from .dispatch import Family, HostStep, pack, packed, unpack
from .multitensor import (
    PARAM_GRAD_DTYPE_PAIRS,
    aot_spec,
    as_fp32,
    copy_back,
    is_aligned,
    launch_over,
    table_pointer,
    tile_header,
)
from .rounding import (
    SEED_INDEX,
    SEED_MASK,
    SEED_STEP,
    index_seed,
    index_seed_reference,
    masked_reference,
    nearest_variant,
    store_param,
    write_param_reference,
)

__all__ = ["ROWS", "SGDScalars", "SGDTensors", "SGD_FAMILY", "SGD_NEAREST", "sgd_step", "sgd_reference"]

ROWS = 4
"""Quantization blocks (of ``BLOCK_SIZE`` elements) handled by one Triton program."""


@triton.jit
def _sgd_kernel(
    table_ptr,  # int64 (9, T): param, grad, buf, absmax, step, flag pointers; numel, first tile, tensor index
    tile_owner_ptr,  # int32 (num_tiles,): which tensor each program updates
    T,  # tensors in the table
    lr,
    weight_decay,
    momentum,
    one_minus_dampening,
    nesterov,
    grad_sign,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    MOMENTUM: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = True,
):
    lr = as_fp32(lr)
    weight_decay = as_fp32(weight_decay)
    momentum = as_fp32(momentum)
    one_minus_dampening = as_fp32(one_minus_dampening)
    nesterov = as_fp32(nesterov)
    grad_sign = as_fp32(grad_sign)
    t, param_ptr, grad_ptr, step_ptr, _, limit, tile, tensor_index = tile_header(
        table_ptr, tile_owner_ptr, T, 2, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    rows = tile * ROWS + tl.arange(0, ROWS)  # (ROWS,) quantization blocks of the tensor
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK) element indices
    mask = offs < limit
    step = tl.load(step_ptr)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_sign
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = g + weight_decay * p
    if MOMENTUM:
        row_mask = rows * BLOCK < limit
        if QUANTIZED:
            buf_ptr = table_pointer(table_ptr, T, t, 2, tl.int8, ALIGNED)
            absmax_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
            codes = tl.load(buf_ptr + offs, mask=mask, other=0)
            absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)
            buf = decode_signed(codes, absmax[:, None])
        else:
            buf_ptr = table_pointer(table_ptr, T, t, 2, tl.float32, ALIGNED)
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        buf = tl.where(step == 1.0, d, momentum * buf + one_minus_dampening * d)
        d = tl.where(nesterov != 0.0, d + momentum * buf, buf)
        if QUANTIZED:
            new_absmax = tl.max(tl.abs(buf), axis=1)  # masked elements are exactly 0
            tl.store(buf_ptr + offs, encode_signed(buf, new_absmax[:, None]), mask=mask)
            tl.store(absmax_ptr + rows, new_absmax, mask=row_mask)
        else:
            tl.store(buf_ptr + offs, buf, mask=mask)
    p = p - lr * d
    seed = index_seed(step, tensor_index)
    store_param(param_ptr, p, offs, mask, seed, STOCHASTIC)


AOT_SPECS = [
    aot_spec(_sgd_kernel, param, grad, aligned, MOMENTUM=momentum, QUANTIZED=quantized, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True)
    for param, grad in PARAM_GRAD_DTYPE_PAIRS
    for momentum, quantized in ((False, False), (True, False), (True, True))
]
"""(kernel, signature, constexprs) for every mode (no momentum, fp32, 8-bit), launched dtype pair and
alignment (the general and the ``ALIGNED`` variant)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class SGDScalars(NamedTuple):
    """The hyperparameters of one SGD step, in the order of ``_sgd_kernel``'s scalar arguments (launched
    by name; the host steps get them through :func:`.dispatch.pack`)."""

    lr: float
    weight_decay: float
    momentum: float
    one_minus_dampening: float
    nesterov: float
    """1.0 for Nesterov momentum, else 0.0."""
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""

    @classmethod
    def of(cls, lr: float, weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool
           ) -> SGDScalars:
        """The scalars of a param group's values."""
        return cls(float(lr), float(weight_decay), float(momentum), 1.0 - float(dampening), float(bool(nesterov)),
                   -1.0 if maximize else 1.0)


class SGDTensors(NamedTuple):
    """The tensors of one SGD step, one entry per param (a :func:`.dispatch.dispatch` batch).

    ``bufs[i]``: None without momentum; an fp32 tensor of ``params[i].numel()`` elements (any shape); or
    flat int8 codes with ``absmaxes[i]`` (fp32, one per 256 elements) for 8-bit momentum. ``steps[i]``
    and ``flags[i]``: 0-d fp32 on the param's device (``steps`` already count this step: 1 on the first
    update; ``flags[i] == 0`` leaves tensor ``i`` untouched); ``tensor_indices[i]`` seeds its
    stochastic rounding.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    bufs: Sequence[torch.Tensor | None]
    absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    tensor_indices: Sequence[int]


def sgd_step(param, grad, buf, absmax, ok, first, s: SGDScalars, seed, stochastic: bool = True, staging=None) -> None:
    """One SGD step in place: the specification of ``_sgd_kernel``, the CPU path and the test oracle.

    ``param``/``grad`` flat (no or fp32 momentum ``buf``, same layout) or ``(num_blocks, BLOCK_SIZE)``
    views with int8 codes ``buf`` and ``absmax`` ``(num_blocks, 1)`` (8-bit momentum). ``ok`` (0-d
    bool, False leaves everything untouched) or None (checked on the host: no ``where`` on mutated
    state in a compiled graph); ``first``: bool tensor, the tensor's first step (the momentum starts at
    ``d``); ``s``: the hyperparameters as 0-d fp32 tensors (:func:`.dispatch.unpack`), bit for bit with
    the kernel compiled or eager; ``seed``: the stochastic-rounding seed (per tensor or per row);
    ``stochastic``: the kernel's ``STOCHASTIC`` (False: bf16/fp16 params rounded to nearest-even); ``staging``:
    None, or for a bf16 ``param`` an fp32 tensor of its shape that receives the rounded param instead, for the
    caller to copy (:func:`.rounding.write_param_reference`).
    """
    nesterov = s.nesterov != 0
    p = param.to(torch.float32)
    d = grad.to(torch.float32) * s.grad_sign + s.weight_decay * p
    if buf is not None:
        old = buf if absmax is None else decode_signed_reference(buf, absmax)
        new_buf = torch.where(first, d, s.momentum * old + s.one_minus_dampening * d)
        d = torch.where(nesterov, d + s.momentum * new_buf, new_buf)
        if absmax is None:
            buf.copy_(masked_reference(ok, new_buf, buf))
        else:
            scale = new_buf.abs().amax(dim=1, keepdim=True)
            buf.copy_(masked_reference(ok, encode_signed_reference(new_buf, scale), buf))
            absmax.copy_(masked_reference(ok, scale, absmax))
    write_param_reference(param, p - s.lr * d, ok, seed, stochastic, staging)


def sgd_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    absmax: torch.Tensor | None,
    step: torch.Tensor,
    flag: torch.Tensor,
    scalars: SGDScalars,
    tensor_index: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`sgd_step` on copies of flat tensors, returning ``(new_param, new_buf, new_absmax)``.

    ``param`` (n,) fp32/bf16/fp16; ``grad`` (n,) any float dtype; ``buf`` None (no momentum), fp32
    (n,) or int8 codes (n,) with ``absmax`` fp32 (ceil(n/256),); ``step`` and ``flag`` 0-d fp32;
    ``tensor_index`` seeds the rounding. ``new_param`` has the param's dtype (stochastically rounded);
    where ``flag == 0`` every output equals its input. A partial last block of 8-bit momentum runs zero
    padded: a zero grad and param keep the padding at zero, so the block's absmax is unchanged.
    """
    param = param.clone(memory_format=torch.contiguous_format)
    buf = None if buf is None else buf.clone(memory_format=torch.contiguous_format)
    absmax = None if absmax is None else absmax.clone()
    s = unpack(SGDScalars, pack(scalars, param.device))
    args = (flag != 0, step == 1, s, index_seed_reference(step, tensor_index))
    if absmax is None:  # flat views
        sgd_step(param.view(-1), grad.reshape(-1), None if buf is None else buf.view(-1), None, *args)
        return param, buf, absmax
    rows = [block_rows(t) for t in (param, grad, buf)]  # whole blocks: views; else zero-padded copies
    sgd_step(rows[0], rows[1], rows[2], absmax.view(-1, 1), *args)
    copy_back(param, rows[0])
    copy_back(buf, rows[2])
    return param, buf, absmax


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launch and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _mode(t: SGDTensors, i: int) -> str:
    """``"plain"`` (no momentum), ``"fp32"`` or ``"int8"`` momentum of tensor ``i``."""
    return "plain" if t.bufs[i] is None else ("fp32" if t.absmaxes[i] is None else "int8")


def _launch_key(t: SGDTensors, i: int) -> tuple:
    """What changes the compiled kernel: momentum mode, aligned, param dtype, grad dtype."""
    return (_mode(t, i), is_aligned(t.params[i], t.grads[i], t.bufs[i]), t.params[i].dtype, t.grads[i].dtype)


def _launch(t: SGDTensors, scalars: SGDScalars, stochastic: bool = True) -> None:
    """One launch of ``_sgd_kernel`` over a group of one :func:`_launch_key` (``stochastic``: ``STOCHASTIC``)."""
    mode, aligned, *_ = _launch_key(t, 0)
    state_rows = [[0 if b is None else b.data_ptr() for b in t.bufs],
                  [0 if a is None else a.data_ptr() for a in t.absmaxes]]
    launch_over(_sgd_kernel, t.params, t.grads, state_rows, t.steps, t.flags, t.tensor_indices, scalars,
                ROWS * BLOCK_SIZE, MOMENTUM=mode != "plain", QUANTIZED=mode == "int8", ROWS=ROWS, BLOCK=BLOCK_SIZE,
                ALIGNED=aligned, STOCHASTIC=stochastic)


def _host_key(t: SGDTensors, i: int) -> tuple:
    """Tensors stepped by the same host step function: momentum mode, param dtype, grad dtype."""
    return (_mode(t, i), t.params[i].dtype, t.grads[i].dtype)


def _host(t: SGDTensors, scalars: SGDScalars, backend: str, steps: list[float], stochastic: bool = True) -> None:
    """The reference step of one :func:`_host_key` group whose flags are set (``steps``: their counters,
    read on the host), one call per bucket of :func:`.cpu_buckets.plan` (``stochastic``: the rounding mode).
    Per tensor, its first-step flag and seed go in one small table built on the host, gathered per row inside
    the bucket step."""
    device = t.params[0].device
    # index_seed_reference(step, index) = (step * SEED_STEP + index * SEED_INDEX) & SEED_MASK, host ints
    table = per_tensor([(float(s == 1), (int(s) * SEED_STEP + i * SEED_INDEX) & SEED_MASK)
                        for s, i in zip(steps, t.tensor_indices)], torch.float64, device)
    hp = packed(scalars, device)
    mode = _mode(t, 0)
    for layout in plan(t.params, BLOCK_SIZE):
        _bucket(layout, backend, mode, t, hp, table, layout.row_map.to(device), stochastic)


def _row_terms(table: torch.Tensor, row_map: torch.Tensor):
    """``(first, seed)`` of every row of a bucket, ``(rows, 1)`` each (bool, int64), from the per-tensor float64
    ``table`` ``(T, 2)`` (first-step flag, 31-bit seed: exact) and ``row_map`` (:attr:`.cpu_buckets.Bucket.row_map`)."""
    first, seed = gather_rows(table, row_map).unbind(1)
    return (first != 0).view(-1, 1), fold_seeds(seed, row_map)


def _bucket_step_plain(param, grad, hp, table, row_map, stochastic=True, staging=None):
    """:func:`sgd_step` without momentum over a bucket: ``(rows, BLOCK_SIZE)`` operands, ``hp``
    (:func:`.dispatch.pack` of :class:`SGDScalars`), the per-tensor ``table`` gathered per row (:func:`_row_terms`);
    ``staging``: None, or the fp32 operand a bf16 param is rounded into (the host copies it in)."""
    first, seeds = _row_terms(table, row_map)
    sgd_step(param, grad, None, None, None, first, unpack(SGDScalars, hp), seeds, stochastic, staging)


def _bucket_step_fp32(param, grad, buf, hp, table, row_map, stochastic=True, staging=None):
    """:func:`_bucket_step_plain` with fp32 momentum ``buf`` ``(rows, BLOCK_SIZE)``."""
    first, seeds = _row_terms(table, row_map)
    sgd_step(param, grad, buf, None, None, first, unpack(SGDScalars, hp), seeds, stochastic, staging)


def _bucket_step_int8(param, grad, buf, absmax, hp, table, row_map, stochastic=True, staging=None):
    """:func:`_bucket_step_plain` with 8-bit momentum: int8 codes ``buf`` and its ``absmax`` ``(rows, 1)``."""
    first, seeds = _row_terms(table, row_map)
    sgd_step(param, grad, buf, absmax, None, first, unpack(SGDScalars, hp), seeds, stochastic, staging)


_BUCKET_STEPS = {mode: HostStep(fn) for mode, fn in
                 (("plain", _bucket_step_plain), ("fp32", _bucket_step_fp32), ("int8", _bucket_step_int8))}
"""The bucket steps by momentum mode, each its own code object (own compile cache), compiled on first use."""


def _bucket(layout, backend: str, mode: str, t: SGDTensors, hp, table, row_map, stochastic: bool) -> None:
    p = layout.rows_of(t.params)  # zero padding: d = g + weight_decay * p enters the 8-bit block maxima
    state = [] if mode == "plain" else [layout.rows_of(t.bufs)]
    if mode == "int8":
        state.append(layout.scales_of(t.absmaxes))
    # a bf16 param is rounded into an fp32 staging operand and copied in by ATen (whole-vector bf16 stores; the
    # compiled loop's masked half-vector store was SGD's bottleneck: benchmarks/RESULTS.md)
    staging = layout.staging(p.device) if p.dtype == torch.bfloat16 else None
    _BUCKET_STEPS[mode].on(backend)(p, layout.rows_of(t.grads), *state, hp, table, row_map, stochastic, staging)
    if staging is not None:
        p.copy_(staging)
    layout.write_back(t.params, p)
    if mode != "plain":
        layout.write_back(t.bufs, state[0])
    if mode == "int8":
        layout.write_back_scales(t.absmaxes, state[1])


SGD_FAMILY = Family("sgd", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key, bucketed=True)
"""The SGD family: ``dispatch(SGD_FAMILY, SGDTensors(...), SGDScalars.of(...))`` applies one step in place
to every tensor and its momentum (one Triton launch per :func:`_launch_key` group on CUDA; on the host
one call per bucket of each :func:`_host_key` group, the same bits as one call per tensor). Never
synchronizes with a CUDA device (on the CPU the flags are read on the host: a memory read)."""

SGD_NEAREST = nearest_variant(SGD_FAMILY, _launch, _host)
""":data:`SGD_FAMILY` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
