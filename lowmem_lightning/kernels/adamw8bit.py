"""Fused AdamW step with 8-bit block-wise quantized moments (reference, launcher, host step; the Triton
kernels are in :mod:`.adamw8bit_triton`).

Math (AdamW, Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, with the
semantics of ``torch.optim.AdamW``), all in fp32, for step ``t`` (already advanced)::

    g   = grad * sign                      (sign = -1 when maximizing)
    p   = p * (1 - lr * weight_decay)
    m   = beta1 * m + (1 - beta1) * g
    v   = beta2 * v + (1 - beta2) * g * g
    p   = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The moments are stored block-wise quantized (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", ICLR 2022) with the companding code of :mod:`.codec`: ``m`` as int8 codes of the
signed code, ``v`` as uint8 codes of the unsigned code, each with one fp32 absmax per block of 256
elements. The parameter update uses the fp32 ``m, v`` *before* re-quantization; the new codes use a
new absmax per block. Tensors under ``MIN_QUANTIZED_NUMEL`` elements keep fp32 ``m, v`` (same
kernel, ``QUANTIZED=False``). bf16/fp16 params are written back with stochastic rounding
(:mod:`.rounding`).

``beta^t`` is computed by exponentiation by squaring on the integer step (24 fp32 multiplies, exact
for ``t < 2**24``), the same operations in the kernel and the reference, so both agree bit for bit
without a host sync: the step is a device tensor the kernel reads. It and the step scalars
(``step_size = lr / (1 - beta1^t)``, ``inv_bc2 = 1 / sqrt(1 - beta2^t)``, ``1 - lr * wd``,
``(1 - beta1) * sign``) are computed once per program, not per element. The kernel's fp32 operations,
in order, and why they are correctly rounded at few instructions (issue 24): :mod:`.adamw8bit_triton`;
the reference computes the same values with IEEE ``/`` and a correctly rounded square root
(:func:`adamw_math`).

A tensor whose ``flag`` is 0 (non-finite gradient) is left untouched: no param, code or absmax is
written. Hyperparameters are runtime arguments (an LR schedule never recompiles).

One launch covers many tensors: a table of int64 data pointers (one column per tensor) and a
tile -> tensor map let each program find its tensor (:mod:`.multitensor`); :func:`.dispatch.dispatch`
groups them by device and by what changes the compiled kernel (``_launch_key``: quantized, aligned,
param dtype, grad dtype). The family registers as :data:`ADAMW_8BIT`. Two launch forms share the tile code
(:func:`.adamw8bit_triton._load_tile`, :func:`.adamw8bit_triton._update_tile`) and so compute the same bits:
one program per tile (``_adamw8bit_kernel``, the default) and persistent programs
(``_adamw8bit_persistent_kernel``, chosen by :func:`.multitensor.persistent` /
``LOWMEM_PERSISTENT_PROGRAMS_PER_SM``) that loop over the tiles and load the next tile before computing the
current one (issue 24; SASS evidence in ``benchmarks/RESULTS.md``).

File order: the kernels' AOT variants, PyTorch reference (named scalars and tensors first), launcher and
host step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from .adamw8bit_triton import _adamw8bit_kernel, _adamw8bit_persistent_kernel
from .aot import signature_of
from .codec import (
    BLOCK_SIZE,
    block_scale_rcp_reference,
    decode_signed_reference,
    decode_unsigned_reference,
    encode_signed_scaled_reference,
    encode_unsigned_roots_reference,
    sqrt_floor_reference,
    sqrt_rn_reference,
)
from .cpu_buckets import fold_seeds, gather_rows, materialize, per_tensor, plan
from .dispatch import Family, HostStep, packed, triton_dtype, unpack
from .multitensor import (
    PARAM_GRAD_DTYPE_PAIRS,
    PERSISTENT_TABLE_TYPES,
    aot_spec,
    is_aligned,
    launch_over,
)
from .rounding import (
    SEED_MASK,
    SEED_STEP,
    masked_reference,
    nearest_variant,
    seed_reference,
    write_param_reference,
)

__all__ = [
    "ROWS",
    "AdamWScalars",
    "AdamWTensors",
    "ADAMW_8BIT",
    "ADAMW_8BIT_NEAREST",
    "adamw8bit_step",
    "adamw32_step",
    "adamw_math",
    "step_terms_reference",
]

ROWS = 4
"""Quantization blocks per Triton program (a tile of ROWS x BLOCK_SIZE elements)."""

_POW_BITS = 24
"""Bits of the step used by ``beta ** step`` (fp32 step counters are exact below 2**24)."""


# --------------------------------------------------------------------------------------------------
# The Triton kernels' ahead-of-time variants (kernels: :mod:`.adamw8bit_triton`)
# --------------------------------------------------------------------------------------------------


AOT_SPECS = [
    aot_spec(_adamw8bit_kernel, p, g, aligned, QUANTIZED=q, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
]
"""(kernel, signature, constexprs) for every (param dtype, grad dtype, quantized, aligned) variant launched."""

PERSISTENT_AOT_SPECS = [
    (_adamw8bit_persistent_kernel, signature_of(_adamw8bit_persistent_kernel, PERSISTENT_TABLE_TYPES),
     {"PARAM_DTYPE": triton_dtype(p), "GRAD_DTYPE": triton_dtype(g), "QUANTIZED": q, "ROWS": ROWS,
      "BLOCK": BLOCK_SIZE, "ALIGNED": aligned})
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
]
"""The same variants of the persistent kernel (``launch_over``'s ``persistent_kernel``)."""

AOT_SPECS = AOT_SPECS + PERSISTENT_AOT_SPECS


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class AdamWScalars(NamedTuple):
    """The hyperparameters of one AdamW step, in the order of ``_adamw8bit_kernel``'s scalar arguments
    (launched by name; the host steps get them through :func:`.dispatch.pack`)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""

    @classmethod
    def of(cls, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool
           ) -> AdamWScalars:
        """The scalars of a param group's values (``maximize`` becomes the sign of the gradient)."""
        return cls(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), -1.0 if maximize else 1.0)


class AdamWTensors(NamedTuple):
    """The tensors of one AdamW step, one entry per param (a :func:`.dispatch.dispatch` batch).

    Tensor ``i`` is quantized when ``exp_avg_absmaxes[i]`` is not None (flat int8 / uint8 codes + fp32
    absmax per 256 elements) and keeps fp32 ``exp_avgs[i]`` / ``exp_avg_sqs[i]`` otherwise. ``steps[i]``
    (0-d fp32, already advanced) and ``flags[i]`` (0-d fp32, 0 = leave the tensor untouched) live on the
    param's device; ``seed_bases[i] = rounding.step_seed(0, tensor_index, base_seed)`` seeds the
    stochastic rounding of bf16/fp16 params (step ``t`` uses ``step_seed(t, tensor_index, base_seed)``).
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_absmaxes: Sequence[torch.Tensor | None]
    exp_avg_sqs: Sequence[torch.Tensor]
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    seed_bases: Sequence[int]


def _pow_by_squaring_reference(base: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``base ** step`` with the kernel's fp32 multiplies (24 rounds; rounds past the top bit are no-ops)."""
    if step.device.type == "cpu":  # host scalars: the same IEEE fp32 multiplies in numpy, ~100x fewer ops
        out = [_pow_by_squaring_host(np.float32(base.item()), int(t)) for t in step.reshape(-1).tolist()]
        return torch.tensor(out, dtype=torch.float32).reshape(step.shape)
    e = step.to(torch.int32)
    result = base * 0.0 + 1.0
    for _ in range(_POW_BITS):
        result = torch.where((e & 1) != 0, result * base, result)
        base = base * base
        e = e >> 1
    return result


def _pow_by_squaring_host(base: np.float32, e: int) -> np.float32:
    result = np.float32(1.0)
    while e > 0:
        if e & 1:
            result = np.float32(result * base)
        base = np.float32(base * base)
        e >>= 1
    return result


def step_terms_reference(
    scalars: AdamWScalars, steps: torch.Tensor, seed_bases: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scalars of a step: fp32 ``(..., 2)`` ``[lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)]`` and
    the int64 stochastic-rounding seeds ``step_seed(t, i, base)``.

    ``scalars``: 0-d fp32 tensors (:func:`.dispatch.unpack`); ``steps`` (any shape, fp32, already
    advanced) and ``seed_bases`` (int64, same shape). Runs eagerly, once per group: its 24 unrolled
    squaring rounds would blow up a compiled graph. Each division and root is correctly rounded, as the
    kernel's branch-free ones (``div_rn_fast``, ``rcp_rn``, ``sqrt_rn_fast`` of :mod:`.codec`).
    """
    step_size = scalars.lr / (1.0 - _pow_by_squaring_reference(scalars.beta1, steps))
    inv_bc2 = 1.0 / sqrt_rn_reference(1.0 - _pow_by_squaring_reference(scalars.beta2, steps))
    seeds = seed_reference(steps, seed_bases)
    return torch.stack([step_size, inv_bc2], dim=-1), seeds


def adamw_math(p, g, m, v, s: AdamWScalars, step_size, inv_bc2):
    """fp32 AdamW update of ``p, m, v`` (any one shape) with the scalars ``s`` (0-d fp32 tensors); returns
    the new ``(p, m, v, w)``, ``w = sqrt(max(v, SQRT_FLOOR))`` (reused by the v-code).

    The kernel's operations in its order: ``denom = w * inv_bc2 + eps`` (``inv_bc2 = RN(1 /
    sqrt(1 - beta2^t))``, a product where torch divides), ``p - step_size * RN(m / denom)``; every
    division and root correctly rounded.
    """
    g = g * s.grad_sign
    p = p * (1.0 - s.lr * s.weight_decay)
    m = s.beta1 * m + (1.0 - s.beta1) * g
    v = s.beta2 * v + (1.0 - s.beta2) * (g * g)
    w = sqrt_floor_reference(v)
    denom = w * inv_bc2 + s.eps
    p = p - step_size * (m / denom)
    return p, m, v, w


def adamw8bit_step(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, ok,
                   s: AdamWScalars, step_size, inv_bc2, seed, stochastic: bool = True, staging=None) -> None:
    """One 8-bit AdamW step on whole blocks, in place: the specification of ``_adamw8bit_kernel``.

    Tensors are ``(num_blocks, BLOCK_SIZE)`` views (absmax ``(num_blocks, 1)``): with the block
    dimension static, torch.compile emits vectorised loops (a flat input reshaped inside the graph
    made it divide symbolic sizes per element). ``ok``: a bool tensor (0-d; False leaves everything
    untouched) or None when the caller checked the finite flag on the host (the bucketed host path: a
    ``where(ok, new, old)`` on mutated inputs made inductor materialise copies). ``s``: the
    hyperparameters as 0-d fp32 tensors; ``step_size``, ``inv_bc2`` (:func:`step_terms_reference`) and
    ``seed``: per tensor or per row; ``stochastic``: the kernel's ``STOCHASTIC`` (False: bf16/fp16 params
    rounded to nearest-even); ``staging``: None, or for a bf16 ``param`` an fp32 tensor of its shape that receives
    the rounded param instead, for the caller to copy (:func:`.rounding.write_param_reference`). fp32 tensors
    everywhere, so compiled and eager store the same bits.
    """
    p = param.to(torch.float32)
    g = grad.to(torch.float32)
    m = decode_signed_reference(exp_avg_codes, exp_avg_absmax)
    v = decode_unsigned_reference(exp_avg_sq_codes, exp_avg_sq_absmax)
    p, m, v, w = adamw_math(p, g, m, v, s, step_size, inv_bc2)
    write_param_reference(param, p, ok, seed, stochastic, staging)
    w = materialize(w)  # compiled: sqrt(v) computed once, stored for the v-codes (:func:`.cpu_buckets.materialize`)
    m_absmax = m.abs().amax(dim=1, keepdim=True)
    v_absmax = v.amax(dim=1, keepdim=True)
    # per-block reciprocals computed once per row (compiled: not per 16 elements); max(w) = sqrt_floor(v_absmax)
    v_codes = encode_unsigned_roots_reference(w, materialize(1.0 / sqrt_floor_reference(v_absmax)))
    m_codes = encode_signed_scaled_reference(m, materialize(block_scale_rcp_reference(m_absmax)))
    exp_avg_codes.copy_(masked_reference(ok, m_codes, exp_avg_codes))
    exp_avg_absmax.copy_(masked_reference(ok, m_absmax, exp_avg_absmax))
    exp_avg_sq_codes.copy_(masked_reference(ok, v_codes, exp_avg_sq_codes))
    exp_avg_sq_absmax.copy_(masked_reference(ok, v_absmax, exp_avg_sq_absmax))


def adamw32_step(param, grad, exp_avg, exp_avg_sq, ok, s: AdamWScalars, step_size, inv_bc2, seed,
                 stochastic: bool = True, staging=None) -> None:
    """The step with fp32 moments (tensors under ``MIN_QUANTIZED_NUMEL`` elements), in place on tensors of
    one shape: the same math as :func:`adamw8bit_step`, no codec; ``ok`` and ``staging`` as there."""
    p, m, v, _ = adamw_math(param.to(torch.float32), grad.to(torch.float32), exp_avg, exp_avg_sq, s, step_size,
                            inv_bc2)
    write_param_reference(param, p, ok, seed, stochastic, staging)
    exp_avg.copy_(masked_reference(ok, m, exp_avg))
    exp_avg_sq.copy_(masked_reference(ok, v, exp_avg_sq))


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launch and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _launch_key(t: AdamWTensors, i: int) -> tuple:
    """What changes the compiled kernel: quantized, aligned, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, is_aligned(t.params[i], t.grads[i], t.exp_avgs[i], t.exp_avg_sqs[i]),
            t.params[i].dtype, t.grads[i].dtype)


def _launch(t: AdamWTensors, scalars: AdamWScalars, stochastic: bool = True) -> None:
    """One launch of ``_adamw8bit_kernel`` over a group of one :func:`_launch_key` (``stochastic``: its
    ``STOCHASTIC`` rounding mode)."""
    quantized, aligned, *_ = _launch_key(t, 0)
    state_rows = [
        [m.data_ptr() for m in t.exp_avgs],
        [a.data_ptr() if quantized else 0 for a in t.exp_avg_absmaxes],
        [v.data_ptr() for v in t.exp_avg_sqs],
        [a.data_ptr() if quantized else 0 for a in t.exp_avg_sq_absmaxes],
    ]
    launch_over(_adamw8bit_kernel, t.params, t.grads, state_rows, t.steps, t.flags, t.seed_bases, scalars,
                ROWS * BLOCK_SIZE, persistent_kernel=_adamw8bit_persistent_kernel, QUANTIZED=quantized, ROWS=ROWS,
                BLOCK=BLOCK_SIZE, ALIGNED=aligned, STOCHASTIC=stochastic)


def _host_key(t: AdamWTensors, i: int) -> tuple:
    """Tensors stepped by the same host step function: quantized, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, t.params[i].dtype, t.grads[i].dtype)


def _host(t: AdamWTensors, scalars: AdamWScalars, backend: str, steps: list[float], stochastic: bool = True) -> None:
    """The reference step of one :func:`_host_key` group whose flags are set (``steps``: their counters,
    read on the host), one call per bucket of :func:`.cpu_buckets.plan` (``stochastic``: the rounding mode).
    The step terms and seeds are computed on the host once per tensor (:func:`_host_terms`, no tensor ops)
    and gathered per row inside the bucket step (:func:`.cpu_buckets.gather_rows`)."""
    device = t.params[0].device
    hp = packed(scalars, device)
    table = per_tensor([(*_host_terms(scalars.lr, scalars.beta1, scalars.beta2, int(s)), seed)
                        for s, seed in zip(steps, _host_seeds(steps, t.seed_bases))], torch.float64, device)
    quantized = t.exp_avg_absmaxes[0] is not None
    run_bucket = _bucket_8bit if quantized else _bucket_32bit
    for layout in plan(t.params, BLOCK_SIZE if quantized else 1):
        run_bucket(layout, backend, t, hp, table, layout.row_map.to(device), stochastic)


@functools.lru_cache(maxsize=1024)
def _host_terms(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """:func:`step_terms_reference` of one step on the host: ``(lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t))`` by
    the same IEEE fp32 operations in numpy scalars (``lr``, ``beta1``, ``beta2`` rounded to fp32 first, as
    :func:`.dispatch.pack` does; numpy's fp32 square root is correctly rounded), so the same bits. The bias terms
    come from :func:`_bias_block` (a new step is a cache miss here, not a recomputation of both powers)."""
    if not 0 <= step < 1 << _POW_BITS:
        raise ValueError(f"step={step}: AdamW's bias terms are exact for steps in [0, 2**{_POW_BITS}) (fp32 step "
                         "counters)")
    one_minus_beta1_t, inv_bc2 = _bias_block(beta1, beta2, step // _BLOCK_STEPS)[step % _BLOCK_STEPS]
    return float(np.float32(lr) / one_minus_beta1_t), inv_bc2


_BLOCK_STEPS = 64
"""Steps whose bias terms :func:`_bias_block` computes at once."""


@functools.lru_cache(maxsize=64)
def _bias_block(beta1: float, beta2: float, block: int) -> list[tuple[np.float32, float]]:
    """``(1 - beta1^t, 1 / sqrt(1 - beta2^t))`` (fp32, as :func:`step_terms_reference`) for the ``_BLOCK_STEPS`` steps
    ``t`` of ``block``, in numpy fp32 arrays: per step the products of :func:`_pow_from_squares` in its order (one
    per set bit of ``t``, lowest first), so the same bits, for ~1 us a step instead of ~6."""
    steps = np.arange(block * _BLOCK_STEPS, (block + 1) * _BLOCK_STEPS, dtype=np.int64)
    one = np.float32(1.0)
    with np.errstate(divide="ignore"):  # step 0 (never applied): 1 - beta^0 = 0
        c1 = one - _pow_steps(beta1, steps)
        inv_bc2 = one / np.sqrt(one - _pow_steps(beta2, steps))
    return [(c, float(i)) for c, i in zip(c1, inv_bc2)]


def _pow_steps(base: float, steps: np.ndarray) -> np.ndarray:
    """:func:`_pow_from_squares` of fp32 ``base`` for every exponent in ``steps`` (fp32 array)."""
    result, e = np.ones(steps.shape, dtype=np.float32), steps.copy()
    for square in _squares(base):
        if not e.any():
            break
        result = np.where((e & 1) != 0, result * square, result)
        e >>= 1
    return result  # exponents from 2**_POW_BITS on are wrong (their high bits ignored): _host_terms refuses them


@functools.lru_cache(maxsize=64)
def _squares(base: float) -> tuple[np.float32, ...]:
    """``base ** (2 ** k)`` for ``k < 24`` by repeated fp32 squaring (the ``base`` sequence of the squaring loop)."""
    out = [np.float32(base)]
    for _ in range(_POW_BITS - 1):
        out.append(np.float32(out[-1] * out[-1]))
    return tuple(out)


def _pow_from_squares(base: float, e: int) -> np.float32:
    """:func:`_pow_by_squaring_host` of fp32 ``base`` from the cached squares: the same fp32 products in the same
    order (one per set bit of ``e``), so the same bits."""
    result, squares, k = np.float32(1.0), _squares(base), 0
    while e:
        if e & 1:
            result = np.float32(result * squares[k])
        e >>= 1
        k += 1
    return result


def _host_seeds(steps: Sequence[float], seed_bases: Sequence[int]) -> list[int]:
    """The seeds of :func:`.rounding.seed_reference` (``(step * SEED_STEP + base) & SEED_MASK``) in Python ints."""
    return [(int(t) * SEED_STEP + base) & SEED_MASK for t, base in zip(steps, seed_bases)]


def _step_terms(steps: list[float], seed_bases: Sequence[int], hp: torch.Tensor):
    """:func:`step_terms_reference` of every tensor (``(T, 2)`` fp32, ``(T,)`` int64 seeds) from host step values
    and ``hp`` (:func:`.dispatch.pack` of :class:`AdamWScalars`), computed on the host (:func:`_host_terms`)."""
    lr, beta1, beta2 = hp[:3].tolist()
    terms = [_host_terms(lr, beta1, beta2, int(t)) for t in steps]
    return (torch.tensor(terms, dtype=torch.float32, device=hp.device),
            torch.tensor(_host_seeds(steps, seed_bases), dtype=torch.int64, device=hp.device))


def _row_terms(table: torch.Tensor, row_map: torch.Tensor):
    """``(step_size, inv_bc2, seed)`` of every row of a bucket, ``(rows, 1)`` each (fp32, fp32, int64), from the
    per-tensor float64 ``table`` ``(T, 3)`` (fp32 terms and 31-bit seeds, all exact) and ``row_map``."""
    step_size, inv_bc2, seed = gather_rows(table, row_map).unbind(1)
    return step_size.to(torch.float32).view(-1, 1), inv_bc2.to(torch.float32).view(-1, 1), fold_seeds(seed, row_map)


def _bucket_step_8bit(param, grad, m, m_absmax, v, v_absmax, hp, table, row_map, stochastic=True, staging=None):
    """:func:`adamw8bit_step` over a bucket: ``(rows, BLOCK_SIZE)`` operands, absmax ``(rows, 1)``, ``hp``
    (:func:`.dispatch.pack` of :class:`AdamWScalars`), the per-tensor step ``table`` ``(T, 3)``: step size,
    ``inv_bc2`` and seed (float64, exact), gathered per row by ``row_map`` (:attr:`.cpu_buckets.Bucket.row_map`);
    few inputs (each costs guard time per compiled call); ``staging``: :func:`_staging`."""
    row_terms = [materialize(term) for term in _row_terms(table, row_map)]  # once per row, not per 16 elements
    adamw8bit_step(param, grad, m, m_absmax, v, v_absmax, None, unpack(AdamWScalars, hp), *row_terms, stochastic,
                   staging)


def _bucket_step_32bit(param, grad, m, v, hp, table, row_map, stochastic=True, staging=None):
    """:func:`adamw32_step` over a bucket of fp32-state tensors: ``(elements, 1)`` operands, one row per
    element (``row_map`` ``(elements, 2)``)."""
    adamw32_step(param, grad, m, v, None, unpack(AdamWScalars, hp), *_row_terms(table, row_map), stochastic, staging)


def _staging(layout, param: torch.Tensor):
    """The bucket's fp32 staging operand for a bf16 ``param`` operand (:meth:`.cpu_buckets.Bucket.staging`), else
    None: the step writes the rounded param there and :func:`_unstage` copies it in (ATen's full-width bf16 store,
    not inductor's masked one)."""
    return layout.staging(param.device) if param.dtype == torch.bfloat16 else None


def _unstage(param: torch.Tensor, staging) -> None:
    """Copy the staged rounded values into the bf16 ``param`` operand (exact: each value is a bf16)."""
    if staging is not None:
        param.copy_(staging)


_BUCKET_STEPS = {True: HostStep(_bucket_step_8bit), False: HostStep(_bucket_step_32bit)}
"""The bucket steps by ``quantized``, each compiled (once, ``dynamic=True``) on first use."""


def _bucket_8bit(layout, backend: str, t: AdamWTensors, hp, table, row_map, stochastic: bool) -> None:
    p, m, v = layout.rows_of(t.params), layout.rows_of(t.exp_avgs), layout.rows_of(t.exp_avg_sqs)
    m_absmax, v_absmax = layout.scales_of(t.exp_avg_absmaxes), layout.scales_of(t.exp_avg_sq_absmaxes)
    staging = _staging(layout, p)
    _BUCKET_STEPS[True].on(backend)(p, layout.rows_of(t.grads), m, m_absmax, v, v_absmax, hp, table, row_map,
                                    stochastic, staging)
    _unstage(p, staging)
    layout.write_back(t.params, p)
    layout.write_back(t.exp_avgs, m)
    layout.write_back(t.exp_avg_sqs, v)
    layout.write_back_scales(t.exp_avg_absmaxes, m_absmax)
    layout.write_back_scales(t.exp_avg_sq_absmaxes, v_absmax)


def _bucket_32bit(layout, backend: str, t: AdamWTensors, hp, table, row_map, stochastic: bool) -> None:
    p, m, v = layout.rows_of(t.params), layout.rows_of(t.exp_avgs), layout.rows_of(t.exp_avg_sqs)
    staging = _staging(layout, p)
    _BUCKET_STEPS[False].on(backend)(p, layout.rows_of(t.grads), m, v, hp, table, row_map, stochastic, staging)
    _unstage(p, staging)
    for dst, src in ((t.params, p), (t.exp_avgs, m), (t.exp_avg_sqs, v)):
        layout.write_back(dst, src)


ADAMW_8BIT = Family("adamw_8bit", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key,
                    bucketed=True)
"""The AdamW family: ``dispatch(ADAMW_8BIT, AdamWTensors(...), AdamWScalars.of(...))`` applies one step in
place to every tensor (one Triton launch per :func:`_launch_key` group on CUDA; on the host one call per
bucket of each :func:`_host_key` group, the same bits as one call per tensor). Never synchronizes with a
CUDA device (on the CPU the flags are read on the host: a memory read)."""

ADAMW_8BIT_NEAREST = nearest_variant(ADAMW_8BIT, _launch, _host)
""":data:`ADAMW_8BIT` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
