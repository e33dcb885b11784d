"""Fused AdEMAMix step with fp32 or 8-bit block-wise moments (Triton kernel, reference, launcher).

AdEMAMix (Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", 2024;
bitsandbytes' AdEMAMix semantics): Adam's fast EMA ``m1`` (beta1, bias-corrected) mixed with a slow,
uncorrected EMA ``m2`` (beta3) by ``alpha``, over Adam's second moment ``nu``; decoupled weight decay.
All in fp32, for step ``t`` (already advanced)::

    g   = grad * sign                                  (sign = -1 when maximizing)
    p   = p * (1 - lr * weight_decay)
    m1  = beta1 * m1 + (1 - beta1) * g
    m2  = beta3_t * m2 + (1 - beta3_t) * g
    nu  = beta2 * nu + (1 - beta2) * g * g
    p   = p - (lr / (1 - beta1^t) * m1 + lr * alpha_t * m2) / (sqrt(nu) / sqrt(1 - beta2^t) + eps)

The paper's warmup schedules (off when ``t_alpha`` / ``t_beta3`` is 0, bitsandbytes' default):
``alpha_t = min(t * alpha / t_alpha, alpha)`` and ``beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 - t /
t_beta3) ln(beta3) + t / t_beta3 ln(beta1))), beta3)`` (beta3_t rises from beta1 to beta3, linearly in
the EMA's half-life). They are computed once per step and tensor by :func:`schedule_reference` (torch
ops, on the step counters' device: no host sync) and read by the kernel, so both paths use the same bits.

Storage: ``m1`` and ``m2`` in the signed 8-bit code of :mod:`.codec`, ``nu`` in the unsigned one, each
with one fp32 absmax per 256 elements (3.05 bytes/param), or all three in fp32 (``QUANTIZED=False``:
tensors under ``MIN_QUANTIZED_NUMEL`` elements, and the fp32 ``ademamix``). The update uses the fp32
moments before re-quantization. bf16/fp16 params are written back with stochastic rounding.

Exactness: as in :mod:`.adamw8bit` (whose ``beta ** t`` by squaring and step terms this family reuses),
every division and square root is correctly rounded and branch-free (``div_rn_fast``, ``sqrt_floor``,
``rcp_rn``), mirrored by IEEE ``/`` and a correctly rounded square root in the reference, so kernel and
reference store identical params and codes. A tensor whose ``flag`` is 0 is left untouched.

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .adamw8bit import step_terms_reference
from .adamw8bit_triton import _beta_powers
from .codec import (
    BLOCK_SIZE,
    decode_signed,
    decode_signed_reference,
    decode_unsigned,
    decode_unsigned_reference,
    div_rn_fast,
    encode_signed,
    encode_signed_reference,
    encode_unsigned_roots,
    encode_unsigned_roots_reference,
    rcp_rn,
    sqrt_floor,
    sqrt_floor_reference,
    sqrt_rn_fast,
)
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

__all__ = ["ROWS", "ADEMAMIX", "ADEMAMIX_NEAREST", "AdEMAMixScalars", "AdEMAMixTensors", "schedule_reference",
           "ademamix_math", "ademamix_step"]

ROWS = 4
"""Quantization blocks per Triton program (a tile of ROWS x BLOCK_SIZE elements)."""

# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _ademamix_kernel(
    table_ptr,  # int64 (14, T): param, grad, m1, m1_absmax, m2, m2_absmax, nu, nu_absmax, schedule, step, flag
    #             pointers; numel, first tile, seed base
    tile_owner_ptr,  # int32 (num_tiles,): tensor index of each program
    T,  # tensors in the table
    lr,
    beta1,
    beta2,
    beta3,
    alpha,
    eps,
    weight_decay,
    grad_sign,
    t_alpha,  # unused here: with SCHEDULED, alpha_t and beta3_t arrive per tensor (schedule_reference)
    t_beta3,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    SCHEDULED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
    STOCHASTIC: tl.constexpr = True,
):
    lr = as_fp32(lr)
    beta1 = as_fp32(beta1)
    beta2 = as_fp32(beta2)
    eps = as_fp32(eps)
    weight_decay = as_fp32(weight_decay)
    grad_sign = as_fp32(grad_sign)
    t, p_ptr, g_ptr, step_ptr, n, n_write, tile, seed_base = tile_header(
        table_ptr, tile_owner_ptr, T, 7, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    rows = tile * ROWS + tl.arange(0, ROWS)  # block index inside the tensor, (ROWS,)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element index, (ROWS, BLOCK)
    in_bounds = offs < n
    write = offs < n_write  # nothing when the gradient is not finite
    row_in = rows * BLOCK < n
    row_write = rows * BLOCK < n_write
    p = tl.load(p_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)  # grad_sign: folded into c1, c3
    if QUANTIZED:
        m1_ptr = table_pointer(table_ptr, T, t, 2, tl.int8, ALIGNED)
        m1_abs_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
        m2_ptr = table_pointer(table_ptr, T, t, 4, tl.int8, ALIGNED)
        m2_abs_ptr = table_pointer(table_ptr, T, t, 5, tl.float32, False)
        nu_ptr = table_pointer(table_ptr, T, t, 6, tl.uint8, ALIGNED)
        nu_abs_ptr = table_pointer(table_ptr, T, t, 7, tl.float32, False)
        m1 = decode_signed(tl.load(m1_ptr + offs, mask=in_bounds, other=0),
                           tl.load(m1_abs_ptr + rows, mask=row_in, other=0.0)[:, None])
        m2 = decode_signed(tl.load(m2_ptr + offs, mask=in_bounds, other=0),
                           tl.load(m2_abs_ptr + rows, mask=row_in, other=0.0)[:, None])
        nu = decode_unsigned(tl.load(nu_ptr + offs, mask=in_bounds, other=0),
                             tl.load(nu_abs_ptr + rows, mask=row_in, other=0.0)[:, None])
    else:
        m1_ptr = table_pointer(table_ptr, T, t, 2, tl.float32, ALIGNED)
        m2_ptr = table_pointer(table_ptr, T, t, 4, tl.float32, ALIGNED)
        nu_ptr = table_pointer(table_ptr, T, t, 6, tl.float32, ALIGNED)
        m1_abs_ptr = m1_ptr
        m2_abs_ptr = m2_ptr
        nu_abs_ptr = nu_ptr
        m1 = tl.load(m1_ptr + offs, mask=in_bounds, other=0.0)
        m2 = tl.load(m2_ptr + offs, mask=in_bounds, other=0.0)
        nu = tl.load(nu_ptr + offs, mask=in_bounds, other=0.0)

    # per program: the step scalars (== step_terms_reference and schedule_reference)
    step = tl.load(step_ptr)
    seed = device_seed(step, seed_base)
    if SCHEDULED:
        schedule_ptr = table_pointer(table_ptr, T, t, 8, tl.float32, False)
        alpha_t = tl.load(schedule_ptr)
        beta3_t = tl.load(schedule_ptr + 1)
    else:
        alpha_t = as_fp32(alpha)
        beta3_t = as_fp32(beta3)
    beta1_t, beta2_t = _beta_powers(beta1, beta2, step)
    step_size = div_rn_fast(lr, 1.0 - beta1_t)
    inv_bc2 = rcp_rn(sqrt_rn_fast(1.0 - beta2_t))
    slow_size = lr * alpha_t
    c1 = (1.0 - beta1) * grad_sign
    c3 = (1.0 - beta3_t) * grad_sign
    c2 = 1.0 - beta2

    p = p * (1.0 - lr * weight_decay)
    m1 = beta1 * m1 + c1 * g
    m2 = beta3_t * m2 + c3 * g
    nu = beta2 * nu + c2 * (g * g)
    w = sqrt_floor(nu)  # sqrt(max(nu, 2**-100)), correctly rounded, branch-free
    denom = w * inv_bc2 + eps
    p = p - div_rn_fast(step_size * m1 + slow_size * m2, denom)
    store_param(p_ptr, p, offs, write, seed, STOCHASTIC)

    if QUANTIZED:
        m1_max = tl.max(tl.abs(m1), axis=1)  # (ROWS,): masked elements are exactly 0
        m2_max = tl.max(tl.abs(m2), axis=1)
        nu_max = tl.max(nu, axis=1)
        inv_w_max = rcp_rn(sqrt_floor(nu_max))  # == 1 / max(w): one reciprocal per row
        tl.store(m1_ptr + offs, encode_signed(m1, m1_max[:, None]), mask=write)
        tl.store(m2_ptr + offs, encode_signed(m2, m2_max[:, None]), mask=write)
        tl.store(nu_ptr + offs, encode_unsigned_roots(w, inv_w_max[:, None]), mask=write)
        tl.store(m1_abs_ptr + rows, m1_max, mask=row_write)
        tl.store(m2_abs_ptr + rows, m2_max, mask=row_write)
        tl.store(nu_abs_ptr + rows, nu_max, mask=row_write)
    else:
        tl.store(m1_ptr + offs, m1, mask=write)
        tl.store(m2_ptr + offs, m2, mask=write)
        tl.store(nu_ptr + offs, nu, mask=write)


AOT_SPECS = [
    aot_spec(_ademamix_kernel, p, g, aligned, QUANTIZED=q, SCHEDULED=False, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
] + [
    aot_spec(_ademamix_kernel, p, g, aligned, QUANTIZED=q, SCHEDULED=True, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS[:4] for q in (True, False)
]
"""(kernel, signature, constexprs): every (param dtype, grad dtype, quantized, aligned) variant without
schedules, and the fp32/bf16-param ones with (the schedule only changes two per-program loads)."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


class AdEMAMixScalars(NamedTuple):
    """The hyperparameters of one AdEMAMix step, named as ``_ademamix_kernel``'s scalar arguments (the
    schedule lengths ``t_alpha``, ``t_beta3`` in steps, 0 = no schedule)."""

    lr: float
    beta1: float
    beta2: float
    beta3: float
    alpha: float
    eps: float
    weight_decay: float
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""
    t_alpha: float
    t_beta3: float

    @classmethod
    def of(cls, lr: float, betas: Sequence[float], alpha: float, eps: float, weight_decay: float, maximize: bool,
           t_alpha: int | None = None, t_beta3: int | None = None) -> AdEMAMixScalars:
        """The scalars of a param group's values (``maximize`` becomes the sign of the gradient; a schedule
        length of None becomes 0, no schedule)."""
        beta1, beta2, beta3 = (float(b) for b in betas)
        return cls(float(lr), beta1, beta2, beta3, float(alpha), float(eps), float(weight_decay),
                   -1.0 if maximize else 1.0, float(t_alpha or 0), float(t_beta3 or 0))

    @property
    def scheduled(self) -> bool:
        """Whether alpha or beta3 follows a warmup schedule."""
        return self.t_alpha > 0 or self.t_beta3 > 0


class AdEMAMixTensors(NamedTuple):
    """The tensors of one AdEMAMix step, one entry per param (a :func:`.dispatch.dispatch` batch).

    Tensor ``i`` is quantized when ``exp_avg_absmaxes[i]`` is not None: flat int8 codes for ``exp_avgs``
    (m1) and ``exp_avg_slows`` (m2), uint8 for ``exp_avg_sqs`` (nu), each with fp32 absmax per 256
    elements; otherwise the three are fp32 (contiguous, any shape). ``steps[i]`` (0-d fp32, already
    advanced) and ``flags[i]`` (0-d fp32, 0 = leave the tensor untouched) live on the param's device;
    ``seed_bases[i] = rounding.step_seed(0, tensor_index, base_seed)``.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    exp_avgs: Sequence[torch.Tensor]
    exp_avg_absmaxes: Sequence[torch.Tensor | None]
    exp_avg_slows: Sequence[torch.Tensor]
    exp_avg_slow_absmaxes: Sequence[torch.Tensor | None]
    exp_avg_sqs: Sequence[torch.Tensor]
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    seed_bases: Sequence[int]


def schedule_reference(steps: torch.Tensor, s: AdEMAMixScalars) -> torch.Tensor:
    """fp32 ``(..., 2)`` ``[alpha_t, beta3_t]`` for step counters ``steps`` (fp32, any shape, any device).

    ``alpha_t = min(t * alpha / t_alpha, alpha)`` and ``beta3_t = min(exp(ln(beta1) ln(beta3) / ((1 -
    t / t_beta3) ln(beta3) + t / t_beta3 ln(beta1))), beta3)`` (Pagliardini et al. 2024, section 3); a
    length of 0 keeps the value constant. The logarithms are host constants (validation requires beta1,
    beta3 > 0 when ``t_beta3`` is set). Both the kernel (as per-tensor inputs) and the host step use
    these values, so they agree bit for bit.
    """
    steps = steps.to(torch.float32)
    alpha = torch.full_like(steps, s.alpha)
    beta3 = torch.full_like(steps, s.beta3)
    if s.t_alpha > 0:
        alpha = torch.minimum(steps * s.alpha / s.t_alpha, alpha)
    if s.t_beta3 > 0:
        log1, log3 = math.log(s.beta1), math.log(s.beta3)
        frac = steps / s.t_beta3
        beta3 = torch.minimum(torch.exp((log1 * log3) / ((1.0 - frac) * log3 + frac * log1)), beta3)
    return torch.stack([alpha, beta3], dim=-1)


def ademamix_math(p, g, m1, m2, nu, s: AdEMAMixScalars, step_size, inv_bc2, alpha_t, beta3_t):
    """fp32 AdEMAMix update of ``p, m1, m2, nu`` (any one shape); returns the new ``(p, m1, m2, nu, w)``,
    ``w = sqrt(max(nu, SQRT_FLOOR))`` (reused by the nu-code). ``s``: 0-d fp32 tensors; ``step_size =
    lr / (1 - beta1^t)`` and ``inv_bc2 = 1 / sqrt(1 - beta2^t)`` (:func:`.adamw8bit.step_terms_reference`),
    ``alpha_t``, ``beta3_t`` (:func:`schedule_reference`): the kernel's operations in its order."""
    c1 = (1.0 - s.beta1) * s.grad_sign
    c3 = (1.0 - beta3_t) * s.grad_sign
    p = p * (1.0 - s.lr * s.weight_decay)
    m1 = s.beta1 * m1 + c1 * g
    m2 = beta3_t * m2 + c3 * g
    nu = s.beta2 * nu + (1.0 - s.beta2) * (g * g)
    w = sqrt_floor_reference(nu)
    denom = w * inv_bc2 + s.eps
    p = p - (step_size * m1 + (s.lr * alpha_t) * m2) / denom
    return p, m1, m2, nu, w


def ademamix_step(param, grad, m1, m1_absmax, m2, m2_absmax, nu, nu_absmax, ok, s: AdEMAMixScalars, terms,
                  seed, stochastic: bool = True) -> None:
    """One AdEMAMix step in place: the specification of ``_ademamix_kernel``.

    ``(rows, BLOCK_SIZE)`` views; 8-bit moments (int8 ``m1``, ``m2``, uint8 ``nu``, absmax ``(rows, 1)``)
    or fp32 ones (every absmax None). ``ok``: 0-d bool or None (checked on the host). ``terms``: ``(rows,
    4)`` or ``(4,)`` ``[step_size, inv_bc2, alpha_t, beta3_t]``; ``seed``: int or int64 ``(rows, 1)``;
    ``stochastic``: the kernel's ``STOCHASTIC`` (False: bf16/fp16 params rounded to nearest-even).
    """
    quantized = m1_absmax is not None
    old = ((decode_signed_reference(m1, m1_absmax), decode_signed_reference(m2, m2_absmax),
            decode_unsigned_reference(nu, nu_absmax)) if quantized else (m1, m2, nu))
    cols = [terms[..., k:k + 1] for k in range(4)]
    p, n1, n2, nnu, w = ademamix_math(param.to(torch.float32), grad.to(torch.float32), *old, s, *cols)
    write_param_reference(param, p, ok, seed, stochastic)
    if not quantized:
        for dst, src in ((m1, n1), (m2, n2), (nu, nnu)):
            dst.copy_(masked_reference(ok, src, dst))
        return
    a1, a2, anu = n1.abs().amax(dim=1, keepdim=True), n2.abs().amax(dim=1, keepdim=True), nnu.amax(dim=1, keepdim=True)
    codes = (encode_signed_reference(n1, a1), encode_signed_reference(n2, a2),
             encode_unsigned_roots_reference(w, 1.0 / sqrt_floor_reference(anu)))  # max(w) = root of max(nu)
    for dst, src in zip((m1, m1_absmax, m2, m2_absmax, nu, nu_absmax), (codes[0], a1, codes[1], a2, codes[2], anu)):
        dst.copy_(masked_reference(ok, src, dst))


def _bucket_step_8bit(param, grad, m1, m1_absmax, m2, m2_absmax, nu, nu_absmax, hp, terms, seeds, stochastic=True):
    """:func:`ademamix_step` over a bucket with 8-bit moments (flags checked on the host); ``hp``: packed
    scalars, ``terms`` ``(rows, 4)``, ``seeds`` ``(rows, 1)``."""
    ademamix_step(param, grad, m1, m1_absmax, m2, m2_absmax, nu, nu_absmax, None, unpack(AdEMAMixScalars, hp),
                  terms, seeds, stochastic)


def _bucket_step_32bit(param, grad, m1, m2, nu, hp, terms, seeds, stochastic=True):
    """:func:`ademamix_step` over a bucket with fp32 moments (flags checked on the host)."""
    ademamix_step(param, grad, m1, None, m2, None, nu, None, None, unpack(AdEMAMixScalars, hp), terms, seeds,
                  stochastic)


_BUCKET_STEPS = {True: HostStep(_bucket_step_8bit), False: HostStep(_bucket_step_32bit)}
"""The bucket steps by ``quantized``, each its own compile cache (compiled once, ``dynamic=True``)."""


# --------------------------------------------------------------------------------------------------
# Launcher: the family's Triton launch and host step, registered with dispatch
# --------------------------------------------------------------------------------------------------


def _launch_key(t: AdEMAMixTensors, i: int) -> tuple:
    """What changes the compiled kernel: quantized, aligned, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None,
            is_aligned(t.params[i], t.grads[i], t.exp_avgs[i], t.exp_avg_slows[i], t.exp_avg_sqs[i]),
            t.params[i].dtype, t.grads[i].dtype)


def _launch(t: AdEMAMixTensors, scalars: AdEMAMixScalars, stochastic: bool = True) -> None:
    """One launch of ``_ademamix_kernel`` over a group of one :func:`_launch_key`; with a schedule, its
    values are computed first on the device (:func:`schedule_reference` of the stacked step counters).
    ``stochastic``: the kernel's ``STOCHASTIC``."""
    quantized, aligned, *_ = _launch_key(t, 0)
    schedule = schedule_reference(torch.stack(list(t.steps)), scalars) if scalars.scheduled else None
    state_rows = [[x.data_ptr() if x is not None else 0 for x in seq] for seq in (
        t.exp_avgs, t.exp_avg_absmaxes, t.exp_avg_slows, t.exp_avg_slow_absmaxes, t.exp_avg_sqs, t.exp_avg_sq_absmaxes)]
    state_rows.append([0] * len(t.params) if schedule is None else [r.data_ptr() for r in schedule.unbind(0)])
    launch_over(_ademamix_kernel, t.params, t.grads, state_rows, t.steps, t.flags, t.seed_bases,
                scalars, ROWS * BLOCK_SIZE, QUANTIZED=quantized, SCHEDULED=scalars.scheduled,
                ROWS=ROWS, BLOCK=BLOCK_SIZE, ALIGNED=aligned, STOCHASTIC=stochastic)


def _host_key(t: AdEMAMixTensors, i: int) -> tuple:
    """Tensors stepped by the same host step function: quantized, param dtype, grad dtype."""
    return (t.exp_avg_absmaxes[i] is not None, t.params[i].dtype, t.grads[i].dtype)


def _step_terms(steps: list[float], scalars: AdEMAMixScalars, device) -> torch.Tensor:
    """``(T, 4)`` ``[step_size, inv_bc2, alpha_t, beta3_t]`` from host step values, computed once per
    distinct step (:func:`.adamw8bit.step_terms_reference`, :func:`schedule_reference`)."""
    unique = sorted(set(steps))
    hp = unpack(AdEMAMixScalars, pack(scalars, device))
    at = torch.tensor(unique, dtype=torch.float32, device=device)
    bias, _ = step_terms_reference(hp, at, torch.zeros(len(unique), dtype=torch.int64, device=device))
    terms = torch.cat([bias, schedule_reference(at, scalars)], dim=-1)
    return terms[torch.tensor([unique.index(s) for s in steps], device=device)]


def _host(t: AdEMAMixTensors, scalars: AdEMAMixScalars, backend: str, steps: list[float],
          stochastic: bool = True) -> None:
    """The reference step of one :func:`_host_key` group whose flags are set, one call per bucket of
    :func:`.cpu_buckets.plan` (rows of ``BLOCK_SIZE``: every quantization block inside one tensor;
    ``stochastic``: the param rounding mode)."""
    device = t.params[0].device
    hp = pack(scalars, device)
    terms = _step_terms(steps, scalars, device)
    # rounding.seed_reference: (step * SEED_STEP + base) & SEED_MASK, as host ints
    seeds = torch.tensor([(int(s) * SEED_STEP + b) & SEED_MASK for s, b in zip(steps, t.seed_bases)],
                         dtype=torch.int64, device=device)
    quantized = t.exp_avg_absmaxes[0] is not None
    moments = [[x.view(-1) for x in seq] for seq in (t.exp_avgs, t.exp_avg_slows, t.exp_avg_sqs)]
    scales = (t.exp_avg_absmaxes, t.exp_avg_slow_absmaxes, t.exp_avg_sq_absmaxes)
    for layout in plan(t.params, BLOCK_SIZE):
        p = layout.rows_of(t.params)
        rows = [layout.rows_of(seq) for seq in moments]
        absmax = [layout.scales_of(seq) for seq in scales] if quantized else []
        state = [x for pair in zip(rows, absmax) for x in pair] if quantized else rows
        _BUCKET_STEPS[quantized].on(backend)(p, layout.rows_of(t.grads), *state, hp, layout.per_row(terms),
                                             layout.row_seeds(seeds), stochastic)
        layout.write_back(t.params, p)
        for seq, r in zip(moments, rows):
            layout.write_back(seq, r)
        for seq, a in zip(scales, absmax):
            layout.write_back_scales(seq, a)


ADEMAMIX = Family("ademamix", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key,
                  bucketed=True)
"""The AdEMAMix family: ``dispatch(ADEMAMIX, AdEMAMixTensors(...), AdEMAMixScalars.of(...))`` applies one
step in place to every tensor (one Triton launch per :func:`_launch_key` group on CUDA; on the host one
call per bucket of each :func:`_host_key` group). Never synchronizes with a CUDA device."""

ADEMAMIX_NEAREST = nearest_variant(ADEMAMIX, _launch, _host)
""":data:`ADEMAMIX` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""
