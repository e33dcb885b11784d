"""Fused AdamW step with 8-bit block-wise quantized moments (Triton kernel, reference, launcher).

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
``(1 - beta1) * sign``) are computed once per program, not per element.

Exactness at few instructions (issue 24): the fp32 operations, in order, are
``w = sqrt(max(v, 2**-100))``, ``denom = w * inv_bc2 + eps``, ``p - step_size * (m / denom)``, where
every square root and quotient is correctly rounded, computed branch-free by :mod:`.codec`'s
``sqrt_rn_fast`` / ``div_rn_fast`` / ``rcp_rn``: the instruction sequences of ptxas' own IEEE
``sqrt.rn`` / ``div.rn`` fast paths (MUFU + Newton/Markstein FMA steps), without their per-element
``FCHK`` + slow-path ``CALL`` (operands here are in the fast paths' range: ``v`` floored at 2**-100,
``denom >= eps``). The reference computes the same values with IEEE ``/`` and a correctly rounded
square root, so kernel and reference agree bit for bit (only the sign of a zero update may differ,
``-0 / d``, which changes no value). The floor moves ``sqrt(v)`` only below 8.9e-16 (= ulp(1e-8)).
The v-code reuses ``w`` (:func:`.codec.encode_unsigned_roots`), the block scales are reciprocals
computed once per block (codes: :mod:`.codec`). Measured: 164 -> ~75 SASS instructions per element
(aligned bf16, sm_90), no slow-path ``CALL`` (``benchmarks/sass_counts.py``).

A tensor whose ``flag`` is 0 (non-finite gradient) is left untouched: no param, code or absmax is
written. Hyperparameters are runtime arguments (an LR schedule never recompiles).

One launch covers many tensors: a table of int64 data pointers (one column per tensor) and a
tile -> tensor map let each program find its tensor; tensors are grouped by (param dtype, grad
dtype, quantized or not).

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

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
    sqrt_rn_reference,
)
from .cpu_buckets import plan
from .dispatch import choose_bucket, cpu_compiled, use_triton
from .multitensor import (
    PARAM_GRAD_DTYPE_PAIRS,
    aot_spec,
    as_fp32,
    bucket,
    is_aligned,
    launch_over,
    table_pointer,
    tile_header,
)
from .rounding import (
    SEED_MASK,
    SEED_STEP,
    device_seed,
    masked_reference,
    seed_reference,
    store_param,
    write_param_reference,
)

__all__ = [
    "ROWS",
    "adamw8bit_step",
    "adamw_math",
    "step_terms_reference",
    "hyperparameter_tensor",
    "adamw8bit_update",
]

ROWS = 4
"""Quantization blocks per Triton program (a tile of ROWS x BLOCK_SIZE elements)."""

_POW_BITS = 24
"""Bits of the step used by ``beta ** step`` (fp32 step counters are exact below 2**24)."""




# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _beta_powers(beta1, beta2, step):
    """``(beta1 ** step, beta2 ** step)`` for an integer-valued fp32 ``step`` >= 0, by squaring.

    The same fp32 multiplies as the reference (which runs 24 rounds; rounds past the top bit of
    ``step`` change nothing), so both agree bit for bit.
    """
    e = step.to(tl.int32)
    r1 = beta1 * 0.0 + 1.0
    r2 = beta2 * 0.0 + 1.0
    while e > 0:
        odd = (e & 1) != 0
        r1 = tl.where(odd, r1 * beta1, r1)
        r2 = tl.where(odd, r2 * beta2, r2)
        beta1 = beta1 * beta1
        beta2 = beta2 * beta2
        e = e >> 1
    return r1, r2


@triton.jit
def _adamw8bit_kernel(
    table_ptr,  # int64 (11, T): param, grad, m, m_absmax, v, v_absmax, step, flag pointers; numel, tile, seed
    tile_owner_ptr,  # int32 (num_tiles,): tensor index of each program
    T,  # number of tensors in the table
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_sign,
    PARAM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
):
    lr = as_fp32(lr)
    beta1 = as_fp32(beta1)
    beta2 = as_fp32(beta2)
    eps = as_fp32(eps)
    weight_decay = as_fp32(weight_decay)
    grad_sign = as_fp32(grad_sign)
    t, p_ptr, g_ptr, step_ptr, n, n_write, tile, seed_base = tile_header(
        table_ptr, tile_owner_ptr, T, 4, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    if QUANTIZED:
        m_ptr = table_pointer(table_ptr, T, t, 2, tl.int8, ALIGNED)
        m_abs_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
        v_ptr = table_pointer(table_ptr, T, t, 4, tl.uint8, ALIGNED)
        v_abs_ptr = table_pointer(table_ptr, T, t, 5, tl.float32, False)
    else:
        m_ptr = table_pointer(table_ptr, T, t, 2, tl.float32, ALIGNED)
        m_abs_ptr = m_ptr
        v_ptr = table_pointer(table_ptr, T, t, 4, tl.float32, ALIGNED)
        v_abs_ptr = v_ptr

    rows = tile * ROWS + tl.arange(0, ROWS)  # block index inside the tensor, (ROWS,)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # element index, (ROWS, BLOCK)
    in_bounds = offs < n
    write = offs < n_write  # nothing when the gradient is not finite
    row_in_bounds = rows * BLOCK < n  # (absmax rows: one per thread, scalar accesses at any alignment)
    row_write = rows * BLOCK < n_write

    p = tl.load(p_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)  # grad_sign: folded into c1
    if QUANTIZED:
        m_scale = tl.load(m_abs_ptr + rows, mask=row_in_bounds, other=0.0)
        v_scale = tl.load(v_abs_ptr + rows, mask=row_in_bounds, other=0.0)
        m = decode_signed(tl.load(m_ptr + offs, mask=in_bounds, other=0), m_scale[:, None])
        v = decode_unsigned(tl.load(v_ptr + offs, mask=in_bounds, other=0), v_scale[:, None])
    else:
        m = tl.load(m_ptr + offs, mask=in_bounds, other=0.0)
        v = tl.load(v_ptr + offs, mask=in_bounds, other=0.0)

    step = tl.load(step_ptr)
    seed = device_seed(step, seed_base)  # == rounding.step_seed(step, index, base)
    beta1_t, beta2_t = _beta_powers(beta1, beta2, step)
    step_size = div_rn_fast(lr, 1.0 - beta1_t)  # per program, == step_terms_reference
    inv_bc2 = rcp_rn(sqrt_rn_fast(1.0 - beta2_t))
    decay = 1.0 - lr * weight_decay
    c1 = (1.0 - beta1) * grad_sign  # (1 - beta1) * (sign * g) == c1 * g bit for bit (sign is +-1)
    c2 = 1.0 - beta2

    p = p * decay
    m = beta1 * m + c1 * g
    v = beta2 * v + c2 * (g * g)
    w = sqrt_floor(v)  # sqrt(max(v, 2**-100)), correctly rounded, branch-free
    denom = w * inv_bc2 + eps
    p = p - step_size * div_rn_fast(m, denom)
    store_param(p_ptr, p, offs, write, seed, True)

    if QUANTIZED:
        m_max = tl.max(tl.abs(m), axis=1)  # (ROWS,)
        v_max = tl.max(v, axis=1)
        inv_w_max = rcp_rn(sqrt_floor(v_max))  # == 1 / max(w): one reciprocal per row, not per element
        tl.store(m_ptr + offs, encode_signed(m, m_max[:, None]), mask=write)
        tl.store(v_ptr + offs, encode_unsigned_roots(w, inv_w_max[:, None]), mask=write)
        tl.store(m_abs_ptr + rows, m_max, mask=row_write)
        tl.store(v_abs_ptr + rows, v_max, mask=row_write)
    else:
        tl.store(m_ptr + offs, m, mask=write)
        tl.store(v_ptr + offs, v, mask=write)


AOT_SPECS = [
    aot_spec(_adamw8bit_kernel, p, g, aligned, QUANTIZED=q, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True) for p, g in PARAM_GRAD_DTYPE_PAIRS for q in (True, False)
]
"""(kernel, signature, constexprs) for every (param dtype, grad dtype, quantized, aligned) variant launched."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def hyperparameter_tensor(
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool, device="cpu"
) -> torch.Tensor:
    """fp32 tensor ``[lr, beta1, beta2, eps, weight_decay, grad_sign]`` for the reference (no recompiles)."""
    return torch.tensor(
        [lr, beta1, beta2, eps, weight_decay, -1.0 if maximize else 1.0], dtype=torch.float32, device=device
    )


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
    hp: torch.Tensor, steps: torch.Tensor, seed_bases: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scalars of a step: fp32 ``(..., 2)`` ``[lr / (1 - beta1^t), 1 / sqrt(1 - beta2^t)]`` and
    the int64 stochastic-rounding seeds ``step_seed(t, i, base)``.

    ``steps`` (any shape, fp32, already advanced) and ``seed_bases`` (int64, same shape). Runs eagerly,
    once for all tensors: its 24 unrolled squaring rounds would blow up a compiled graph. Each
    division and root is correctly rounded, as the kernel's branch-free ones (``div_rn_fast``,
    ``rcp_rn``, ``sqrt_rn_fast`` of :mod:`.codec`).
    """
    step_size = hp[0] / (1.0 - _pow_by_squaring_reference(hp[1], steps))
    inv_bc2 = 1.0 / sqrt_rn_reference(1.0 - _pow_by_squaring_reference(hp[2], steps))
    seeds = seed_reference(steps, seed_bases)
    return torch.stack([step_size, inv_bc2], dim=-1), seeds


def adamw_math(p, g, m, v, lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, inv_bc2):
    """fp32 AdamW update of ``p, m, v`` (any one shape); returns the new ``(p, m, v, w)``, ``w =
    sqrt(max(v, SQRT_FLOOR))`` (reused by the v-code).

    The kernel's operations in its order: ``denom = w * inv_bc2 + eps`` (``inv_bc2 = RN(1 /
    sqrt(1 - beta2^t))``, a product where torch divides), ``p - step_size * RN(m / denom)``; every
    division and root correctly rounded. Scalars are 0-d fp32 tensors (eager: bit for bit with the
    kernel) or Python floats (the compiled CPU step: symbolic inputs, no recompile per LR).
    """
    g = g * grad_sign
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    w = sqrt_floor_reference(v)
    denom = w * inv_bc2 + eps
    p = p - step_size * (m / denom)
    return p, m, v, w


def adamw8bit_step(param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, ok,
                   lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, inv_bc2, seed) -> None:
    """One 8-bit AdamW step on whole blocks, in place: the specification of ``_adamw8bit_kernel``.

    Tensors are ``(num_blocks, BLOCK_SIZE)`` views (absmax ``(num_blocks, 1)``): with the block
    dimension static, torch.compile emits vectorised loops (a flat input reshaped inside the graph
    made it divide symbolic sizes per element, ~4x slower). ``ok``: a bool tensor (0-d; False leaves
    everything untouched) or None when the caller checked the finite flag on the host. Scalars:
    ``lr .. grad_sign`` the hyperparameters, ``step_size = lr / (1 - beta1^t)``, ``inv_bc2 =
    1 / sqrt(1 - beta2^t)`` (:func:`step_terms_reference`), ``seed`` the stochastic-rounding seed.

    The eager path passes 0-d fp32 tensors and ``ok`` (bit for bit with the kernel). The compiled CPU
    path passes Python scalars and ``ok=None``: a ``where(ok, new, old)`` on mutated inputs made
    inductor materialise copies (measured 4x slower: 6.4 vs 1.7 ms on 1M elements); the result
    then agrees to fp32 rounding (scalars enter as double).
    """
    p = param.to(torch.float32)
    g = grad.to(torch.float32)
    m = decode_signed_reference(exp_avg_codes, exp_avg_absmax)
    v = decode_unsigned_reference(exp_avg_sq_codes, exp_avg_sq_absmax)
    p, m, v, w = adamw_math(p, g, m, v, lr, beta1, beta2, eps, weight_decay, grad_sign, step_size, inv_bc2)
    write_param_reference(param, p, ok, seed)
    m_absmax = m.abs().amax(dim=1, keepdim=True)
    v_absmax = v.amax(dim=1, keepdim=True)
    v_codes = encode_unsigned_roots_reference(w, 1.0 / sqrt_floor_reference(v_absmax))  # max(w) = its root
    exp_avg_codes.copy_(masked_reference(ok, encode_signed_reference(m, m_absmax), exp_avg_codes))
    exp_avg_absmax.copy_(masked_reference(ok, m_absmax, exp_avg_absmax))
    exp_avg_sq_codes.copy_(masked_reference(ok, v_codes, exp_avg_sq_codes))
    exp_avg_sq_absmax.copy_(masked_reference(ok, v_absmax, exp_avg_sq_absmax))


def _adamw32_core(param, grad, exp_avg, exp_avg_sq, flag, hp, terms, seed):
    """The step with fp32 moments of a small tensor (flat views), in place; same math, no codec."""
    ok = flag > 0
    flat = param.view(-1)
    m_flat, v_flat = exp_avg.view(-1), exp_avg_sq.view(-1)
    p, m, v, _ = adamw_math(flat.to(torch.float32), grad.reshape(-1).to(torch.float32), m_flat, v_flat,
                            *hp.unbind(0), terms[0], terms[1])
    write_param_reference(flat, p, ok, seed)
    m_flat.copy_(torch.where(ok, m, m_flat))
    v_flat.copy_(torch.where(ok, v, v_flat))


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def adamw8bit_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_absmaxes: Sequence[torch.Tensor | None],
    exp_avg_sqs: Sequence[torch.Tensor],
    exp_avg_sq_absmaxes: Sequence[torch.Tensor | None],
    steps: Sequence[torch.Tensor],
    flags: Sequence[torch.Tensor],
    seed_bases: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """Apply one AdamW step to every tensor, in place.

    Tensor ``i`` is quantized when ``exp_avg_absmaxes[i]`` is not None (int8/uint8 flat codes + fp32
    absmax) and keeps fp32 ``exp_avgs[i]``/``exp_avg_sqs[i]`` otherwise. ``steps[i]`` (0-d fp32,
    already advanced) and ``flags[i]`` (0-d fp32, 0 = leave the tensor untouched) live on the param's
    device; ``seed_bases[i]`` = ``rounding.step_seed(0, tensor_index, base_seed)`` seeds the
    stochastic rounding of bf16/fp16 params (step ``t`` uses ``step_seed(t, tensor_index, base_seed)``).
    CUDA tensors run one Triton launch per (quantized, param dtype, grad dtype) group; others run
    the reference once per bucket of such a group (:mod:`.cpu_buckets`; compiled or eager as
    :func:`.dispatch.choose_bucket` says), the same bits as one call per tensor. Nothing synchronises
    with the device (on the CPU the finite flags are read on the host: a memory read).
    """
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)
    groups = bucket(len(params), lambda i: (
        (exp_avg_absmaxes[i] is not None,
         is_aligned(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]),
         params[i].dtype, grads[i].dtype, params[i].device)
        if use_triton(params[i]) else params[i].device
    ))
    buckets = {key: idx for key, idx in groups.items() if isinstance(key, tuple)}
    on_reference = {key: idx for key, idx in groups.items() if not isinstance(key, tuple)}
    for device, idx in on_reference.items():
        host = torch.stack([flags[i] for i in idx] + [steps[i] for i in idx]).tolist()  # one read, no device sync
        live = [(i, t) for i, ok, t in zip(idx, host[:len(idx)], host[len(idx):]) if ok and params[i].numel()]
        if live:
            _reference_update([[seq[i] for i, _ in live] for seq in (params, grads, exp_avgs, exp_avg_absmaxes,
                               exp_avg_sqs, exp_avg_sq_absmaxes)], [t for _, t in live],
                              [seed_bases[i] for i, _ in live], hyperparameter_tensor(**hyper, device=device))
    for (quantized, aligned, *_), idx in buckets.items():
        _launch(
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_absmaxes[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
            [exp_avg_sq_absmaxes[i] for i in idx],
            [steps[i] for i in idx],
            [flags[i] for i in idx],
            [seed_bases[i] for i in idx],
            quantized,
            aligned,
            hyper,
        )


def _bucket_step_8bit(param, grad, m, m_absmax, v, v_absmax, hp, terms, seeds):
    """:func:`adamw8bit_step` over a bucket: ``(rows, BLOCK_SIZE)`` operands, absmax ``(rows, 1)``, ``hp``
    (6,) from :func:`hyperparameter_tensor`, per-row ``terms`` ``(rows, 2)`` and ``seeds`` ``(rows, 1)``.
    Every scalar is an fp32 tensor, compiled or eager (the same bits; Python floats would enter the
    compiled graph as double), few inputs (each costs guard time per call)."""
    adamw8bit_step(param, grad, m, m_absmax, v, v_absmax, None, hp[0], hp[1], hp[2], hp[3], hp[4], hp[5],
                   terms[:, :1], terms[:, 1:], seeds)


def _bucket_step_32bit(param, grad, m, v, hp, terms, seeds, flag):
    """:func:`_adamw32_core` over a bucket of fp32-state tensors: ``(elements, 1)`` operands, one row
    per element (``terms`` ``(elements, 2)``, ``seeds`` ``(elements, 1)``); ``flag`` a 0-d 1.0."""
    _adamw32_core(param, grad, m, v, flag, hp, terms.t(), seeds.view(-1))


_BUCKET_STEPS = {True: cpu_compiled(_bucket_step_8bit), False: cpu_compiled(_bucket_step_32bit)}
"""The bucket steps by ``quantized``, each compiled (once, ``dynamic=True``) on first use."""


def _reference_update(tensors: list[list], steps: list[float], seed_bases: list[int], hp: torch.Tensor) -> None:
    """The reference step of tensors whose flags are set (lists ``params, grads, m, m_absmax, v,
    v_absmax``; ``steps`` their step counters read on the host): per (quantized, param dtype, grad dtype)
    group, one call per bucket of :func:`.cpu_buckets.plan`."""
    params, grads, ms, m_absmaxes, vs, v_absmaxes = tensors
    terms, seeds = _step_terms(steps, seed_bases, hp)
    groups = bucket(len(params), lambda i: (m_absmaxes[i] is not None, params[i].dtype, grads[i].dtype))
    for (quantized, *_), idx in groups.items():
        group = [[seq[i] for i in idx] for seq in tensors]
        run_bucket = _bucket_8bit if quantized else _bucket_32bit
        mine = (terms, seeds) if len(idx) == len(params) else (terms[idx], seeds[idx])
        backend = choose_bucket(sum(p.numel() for p in group[0]))  # one choice for the group's buckets
        for layout in plan(group[0], BLOCK_SIZE if quantized else 1):
            run_bucket(layout, backend, *group, hp, *mine)


def _step_terms(steps: list[float], seed_bases: list[int], hp: torch.Tensor):
    """:func:`step_terms_reference` of every tensor (``(T, 2)``, ``(T,)``) from host step values, computed
    once per distinct step (its host loops are per step); the seeds of :func:`.rounding.seed_reference`
    (``(step * SEED_STEP + base) & SEED_MASK``) in Python ints."""
    unique = sorted(set(steps))
    device = hp.device
    terms, _ = step_terms_reference(hp, torch.tensor(unique, dtype=torch.float32, device=device),
                                    torch.zeros(len(unique), dtype=torch.int64, device=device))
    if len(unique) == 1:
        terms = terms.expand(len(steps), 2)
    else:
        terms = terms[torch.tensor([unique.index(t) for t in steps], device=device)]
    seeds = [(int(t) * SEED_STEP + base) & SEED_MASK for t, base in zip(steps, seed_bases)]
    return terms, torch.tensor(seeds, dtype=torch.int64, device=device)


def _bucket_8bit(layout, backend, params, grads, ms, m_absmaxes, vs, v_absmaxes, hp, terms, seeds) -> None:
    p, m, v = layout.rows_of(params), layout.rows_of(ms), layout.rows_of(vs)
    m_absmax, v_absmax = layout.scales_of(m_absmaxes), layout.scales_of(v_absmaxes)
    step = _BUCKET_STEPS[True].on(backend)
    step(p, layout.rows_of(grads), m, m_absmax, v, v_absmax, hp, layout.per_row(terms), layout.row_seeds(seeds))
    layout.write_back(params, p)
    layout.write_back(ms, m)
    layout.write_back(vs, v)
    layout.write_back_scales(m_absmaxes, m_absmax)
    layout.write_back_scales(v_absmaxes, v_absmax)


def _bucket_32bit(layout, backend, params, grads, ms, _, vs, __, hp, terms, seeds) -> None:
    p, m, v = layout.rows_of(params), layout.rows_of(ms), layout.rows_of(vs)
    step = _BUCKET_STEPS[False].on(backend)
    step(p, layout.rows_of(grads), m, v, hp, layout.per_row(terms), layout.row_seeds(seeds), hp.new_ones(()))
    for dst, src in ((params, p), (ms, m), (vs, v)):
        layout.write_back(dst, src)


def _launch(params, grads, ms, m_absmaxes, vs, v_absmaxes, steps, flags, seeds, quantized: bool, aligned: bool,
            hyper: dict):
    state_rows = [
        [m.data_ptr() for m in ms],
        [a.data_ptr() if quantized else 0 for a in m_absmaxes],
        [v.data_ptr() for v in vs],
        [a.data_ptr() if quantized else 0 for a in v_absmaxes],
    ]
    scalars = [float(hyper[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")]
    scalars.append(-1.0 if hyper["maximize"] else 1.0)
    launch_over(_adamw8bit_kernel, params, grads, state_rows, steps, flags, seeds, scalars, ROWS * BLOCK_SIZE,
                QUANTIZED=quantized, ROWS=ROWS, BLOCK=BLOCK_SIZE, ALIGNED=aligned)
