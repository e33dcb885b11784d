"""Fused Lion step with fp32 or 8-bit block-wise momentum (Triton kernel, reference, launcher).

Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023), with decoupled
weight decay as in the paper and bitsandbytes >= 0.50, all in fp32::

    g = grad * sign                       (sign = -1 when maximizing)
    p = p * (1 - lr * weight_decay)
    c = beta1 * m + (1 - beta1) * g
    p = p - lr * sign(c)                  (sign(0) = 0)
    m = beta2 * m + (1 - beta2) * g

One state tensor: the momentum ``m``, kept in fp32 or in the signed block-wise 8-bit code of
:mod:`.codec` (int8 codes + one fp32 absmax per 256 elements: 1.016 bytes/param). The update uses
the fp32 ``m`` before it is re-quantized. Tensors under ``MIN_QUANTIZED_NUMEL`` elements keep fp32
momentum (same kernel, ``QUANTIZED=False``). bf16/fp16 params are written back with stochastic
rounding (:mod:`.rounding`), seeded from the tensor's step counter as in the AdamW kernel.

Exactness: the fp32 operations are the same, in the same order, in the kernel and in the reference
(``(1 - beta1) * sign`` is folded into one coefficient, exact since ``sign`` is +-1; ``sign(c)`` is
``(c > 0) - (c < 0)``); there is no division or square root outside the codec, so kernel and
reference store identical params and codes. A tensor whose ``flag`` is 0 is left untouched.
Hyperparameters are runtime arguments (an LR schedule never recompiles).

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .codec import BLOCK_SIZE, decode_signed, decode_signed_reference, encode_signed, encode_signed_reference
from .cpu_buckets import plan
from .dispatch import Family, HostStep, pack, unpack
from .multitensor import PARAM_GRAD_DTYPE_PAIRS, aot_spec, as_fp32, is_aligned, launch_over, table_pointer, tile_header
from .rounding import (
    SEED_MASK,
    SEED_STEP,
    device_seed,
    masked_reference,
    nearest_variant,
    store_param,
    write_param_reference,
)

__all__ = ["ROWS", "LION", "LION_NEAREST", "LionScalars", "LionTensors", "lion_math", "lion_step"]

ROWS = 4
"""Quantization blocks per Triton program (a tile of ROWS x BLOCK_SIZE elements)."""


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _lion_kernel(
    table_ptr,  # int64 (9, T): param, grad, m, m_absmax, step, flag pointers; numel, first tile, seed base
    tile_owner_ptr,  # int32 (num_tiles,): tensor index of each program
    T,  # tensors in the table
    lr,
    beta1,
    beta2,
    weight_decay,
    grad_sign,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = True,
):
    lr = as_fp32(lr)
    beta1 = as_fp32(beta1)
    beta2 = as_fp32(beta2)
    weight_decay = as_fp32(weight_decay)
    grad_sign = as_fp32(grad_sign)
    t, p_ptr, g_ptr, step_ptr, n, n_write, tile, seed_base = tile_header(
        table_ptr, tile_owner_ptr, T, 2, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    rows = tile * ROWS + tl.arange(0, ROWS)  # block index inside the tensor, (ROWS,)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element index, (ROWS, BLOCK)
    in_bounds = offs < n
    write = offs < n_write  # nothing when the gradient is not finite
    p = tl.load(p_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    if QUANTIZED:
        m_ptr = table_pointer(table_ptr, T, t, 2, tl.int8, ALIGNED)
        m_abs_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
        m_scale = tl.load(m_abs_ptr + rows, mask=rows * BLOCK < n, other=0.0)
        m = decode_signed(tl.load(m_ptr + offs, mask=in_bounds, other=0), m_scale[:, None])
    else:
        m_ptr = table_pointer(table_ptr, T, t, 2, tl.float32, ALIGNED)
        m_abs_ptr = m_ptr
        m = tl.load(m_ptr + offs, mask=in_bounds, other=0.0)

    seed = device_seed(tl.load(step_ptr), seed_base)  # == rounding.step_seed(step, index, base)
    decay = 1.0 - lr * weight_decay  # per program
    c1 = (1.0 - beta1) * grad_sign
    c2 = (1.0 - beta2) * grad_sign

    p = p * decay
    c = beta1 * m + c1 * g
    p = p - lr * ((c > 0.0).to(tl.float32) - (c < 0.0).to(tl.float32))
    m = beta2 * m + c2 * g
    store_param(p_ptr, p, offs, write, seed, STOCHASTIC)
    if QUANTIZED:
        m_max = tl.max(tl.abs(m), axis=1)  # (ROWS,): masked elements are exactly 0
        tl.store(m_ptr + offs, encode_signed(m, m_max[:, None]), mask=write)
        tl.store(m_abs_ptr + rows, m_max, mask=rows * BLOCK < n_write)
    else:
        tl.store(m_ptr + offs, m, mask=write)


AOT_SPECS = [
    aot_spec(_lion_kernel, p, g, aligned, QUANTIZED=q, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
]
"""(kernel, signature, constexprs) for every (param dtype, grad dtype, quantized, aligned) variant launched."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class LionScalars(NamedTuple):
    """The hyperparameters of one Lion step, in the order of ``_lion_kernel``'s scalar arguments (the host
    steps get them through :func:`.dispatch.pack`)."""

    lr: float
    beta1: float
    beta2: float
    weight_decay: float
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""

    @classmethod
    def of(cls, lr: float, beta1: float, beta2: float, weight_decay: float, maximize: bool) -> LionScalars:
        """The scalars of a param group's values (``maximize`` becomes the sign of the gradient)."""
        return cls(float(lr), float(beta1), float(beta2), float(weight_decay), -1.0 if maximize else 1.0)


class LionTensors(NamedTuple):
    """The tensors of one Lion step, one entry per param (a :func:`.dispatch.dispatch` batch).

    Tensor ``i`` has 8-bit momentum when ``exp_avg_absmaxes[i]`` is not None (flat int8 codes + fp32
    absmax per 256 elements) and fp32 ``exp_avgs[i]`` (contiguous, any shape) otherwise. ``steps[i]``
    (0-d fp32, already advanced) and ``flags[i]`` (0-d fp32, 0 = leave the tensor untouched) live on the
    param's device; ``seed_bases[i] = rounding.step_seed(0, tensor_index, base_seed)``.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    seed_bases: Sequence[int]


def lion_math(p, g, m, s: LionScalars):
    """fp32 Lion update of ``p`` and ``m`` (any one shape) with the scalars ``s`` (0-d fp32 tensors);
    returns the new ``(p, m)``: the kernel's operations in its order (bit for bit)."""
    c1 = (1.0 - s.beta1) * s.grad_sign
    c2 = (1.0 - s.beta2) * s.grad_sign
    p = p * (1.0 - s.lr * s.weight_decay)
    c = s.beta1 * m + c1 * g
    p = p - s.lr * ((c > 0).to(torch.float32) - (c < 0).to(torch.float32))
    m = s.beta2 * m + c2 * g
    return p, m


def lion_step(param, grad, m, m_absmax, ok, s: LionScalars, seed, stochastic: bool = True) -> None:
    """One Lion step in place: the specification of ``_lion_kernel``.

    ``param``, ``grad``, ``m``: ``(rows, BLOCK_SIZE)`` views; ``m`` int8 codes with ``m_absmax``
    ``(rows, 1)`` (8-bit momentum) or fp32 with ``m_absmax=None``. ``ok``: 0-d bool (False leaves
    everything untouched) or None (checked on the host). ``s``: 0-d fp32 tensors. ``seed``: the
    stochastic-rounding seed (int, or int64 ``(rows, 1)`` per row); ``stochastic``: the kernel's
    ``STOCHASTIC`` (False: bf16/fp16 params rounded to nearest-even).
    """
    old = m if m_absmax is None else decode_signed_reference(m, m_absmax)
    p, new = lion_math(param.to(torch.float32), grad.to(torch.float32), old, s)
    write_param_reference(param, p, ok, seed, stochastic)
    if m_absmax is None:
        m.copy_(masked_reference(ok, new, m))
        return
    scale = new.abs().amax(dim=1, keepdim=True)
    m.copy_(masked_reference(ok, encode_signed_reference(new, scale), m))
    m_absmax.copy_(masked_reference(ok, scale, m_absmax))


def _bucket_step_8bit(param, grad, m, m_absmax, hp, seeds, stochastic=True):
    """:func:`lion_step` over a bucket with 8-bit momentum (flags checked on the host); ``hp``: packed scalars."""
    lion_step(param, grad, m, m_absmax, None, unpack(LionScalars, hp), seeds, stochastic)


def _bucket_step_32bit(param, grad, m, hp, seeds, stochastic=True):
    """:func:`lion_step` over a bucket with fp32 momentum (flags checked on the host); ``hp``: packed scalars."""
    lion_step(param, grad, m, None, None, unpack(LionScalars, hp), seeds, stochastic)


_BUCKET_STEPS = {True: HostStep(_bucket_step_8bit), False: HostStep(_bucket_step_32bit)}
"""The bucket steps by ``quantized``, each its own compile cache (compiled once, ``dynamic=True``)."""


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launch and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _launch_key(t: LionTensors, i: int) -> tuple:
    """What changes the compiled kernel: quantized, aligned, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, is_aligned(t.params[i], t.grads[i], t.exp_avgs[i]),
            t.params[i].dtype, t.grads[i].dtype)


def _launch(t: LionTensors, scalars: LionScalars, stochastic: bool = True) -> None:
    """One launch of ``_lion_kernel`` over a group of one :func:`_launch_key` (``stochastic``: ``STOCHASTIC``)."""
    quantized, aligned, *_ = _launch_key(t, 0)
    state_rows = [[m.data_ptr() for m in t.exp_avgs], [a.data_ptr() if quantized else 0 for a in t.exp_avg_absmaxes]]
    launch_over(_lion_kernel, t.params, t.grads, state_rows, t.steps, t.flags, t.seed_bases, scalars,
                ROWS * BLOCK_SIZE, QUANTIZED=quantized, ROWS=ROWS, BLOCK=BLOCK_SIZE, ALIGNED=aligned,
                STOCHASTIC=stochastic)


def _host_key(t: LionTensors, i: int) -> tuple:
    """Tensors stepped by the same host step function: quantized, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, t.params[i].dtype, t.grads[i].dtype)


def _host(t: LionTensors, scalars: LionScalars, backend: str, steps: list[float], stochastic: bool = True) -> None:
    """The reference step of one :func:`_host_key` group whose flags are set, one call per bucket of
    :func:`.cpu_buckets.plan` (rows of ``BLOCK_SIZE``: every quantization block inside one tensor;
    ``stochastic``: the param rounding mode)."""
    device = t.params[0].device
    hp = pack(scalars, device)
    # rounding.seed_reference: (step * SEED_STEP + base) & SEED_MASK, as host ints
    seeds = torch.tensor([(int(s) * SEED_STEP + b) & SEED_MASK for s, b in zip(steps, t.seed_bases)],
                         dtype=torch.int64, device=device)
    quantized = t.exp_avg_absmaxes[0] is not None
    ms = [m.view(-1) for m in t.exp_avgs]
    for layout in plan(t.params, BLOCK_SIZE):
        p, m = layout.rows_of(t.params), layout.rows_of(ms)
        state = [m, layout.scales_of(t.exp_avg_absmaxes)] if quantized else [m]
        _BUCKET_STEPS[quantized].on(backend)(p, layout.rows_of(t.grads), *state, hp, layout.row_seeds(seeds),
                                             stochastic)
        layout.write_back(t.params, p)
        layout.write_back(ms, m)
        if quantized:
            layout.write_back_scales(t.exp_avg_absmaxes, state[1])


LION = Family("lion", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key, bucketed=True)
"""The Lion family: ``dispatch(LION, LionTensors(...), LionScalars.of(...))`` applies one step in place to
every tensor (one Triton launch per :func:`_launch_key` group on CUDA; on the host one call per bucket of
each :func:`_host_key` group). Never synchronizes with a CUDA device."""

LION_NEAREST = nearest_variant(LION, _launch, _host)
""":data:`LION` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
