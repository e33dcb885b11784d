"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; ``torch.optim.Muon``
semantics): the fused momentum pass (fp32 or 8-bit momentum), the batched bf16 Newton–Schulz iteration
and the parameter update.

Per 2-D parameter ``P`` (``A x B``) and step, all in fp32 except Newton–Schulz::

    buf = lerp(buf, g, 1 - momentum)                     buf starts at 0 (torch.optim.Muon)
    U   = lerp(g, buf, momentum)  if nesterov  else  buf
    O   = NS_k^{(a,b,c)}(bf16(U); eps)                   Newton–Schulz in bf16, below
    P   = P * (1 - lr * weight_decay) - adjusted_lr * O  decoupled weight decay, then the update

``lerp(s, e, w)`` is torch's: ``fma(w, e - s, s)`` when ``|w| < 0.5``, else ``fma(-(1 - w), e - s, e)``
(``w`` and ``1 - w`` in fp32), so the fp32 momentum path reproduces ``torch.optim.Muon`` bit for bit on
the CPU. ``adjusted_lr`` is ``lr * sqrt(max(1, A / B))`` (``"original"``, Keller Jordan's) or ``lr * 0.2 *
sqrt(max(A, B))`` (``"match_rms_adamw"``, Liu et al. 2025, "Muon is Scalable for LLM Training").

Newton–Schulz (:func:`newton_schulz`): ``X = bf16(U)``, transposed when tall, divided by
``max(||X||_F, eps)``, then ``k`` times ``A = X X^T; B = b A + c A A; X = a X + B X`` in bf16 matmuls, the
quintic of the Muon authors (coefficients (3.4445, -4.7750, 2.0315), 5 steps). Matrices of one shape run
as one batch (``baddbmm``), which on the CPU gives the same bits as one ``addmm`` chain per matrix.

8-bit momentum (Gupta et al. 2025, arXiv 2509.23106, "block-wise quantization of the Muon momentum"):
``buf`` is stored in the package's signed block-wise code (:mod:`.codec`: int8 per element + fp32 absmax
per 256 = 1.016 bytes/param); ``U`` is formed from the fp32 momentum before it is re-quantized.

One pass over memory (:func:`_muon_momentum_kernel`): a program loads ``ROWS x 256`` elements of grad and
momentum, stores the momentum and writes ``U`` directly as bf16 into the Newton–Schulz batch buffer (half
the bytes of an fp32 copy). A 0/1 fp32 ``flag`` (the optimizer's non-finite guard) masks the momentum
store; the update (:func:`_muon_apply_kernel`: decay and step as one fma, bf16/fp16 params written with
stochastic rounding) leaves the param untouched where it is 0.

On the host the momentum pass runs one of two forms of :func:`muon_momentum_reference`, chosen by
:func:`.dispatch.choose_bucket` for each group of same-kind matrices (on the CPU: 8-bit compiled unless
``cpu_compile="never"``, fp32 eager, :func:`_host_backend`), both storing its bits: compiled, one fused pass
per matrix (:func:`_fused_momentum_8bit`, :func:`_fused_momentum_fp32`; inductor's C++ built with
floating-point contraction so that its decomposed ``lerp`` is torch's fma again, :func:`_fp_contraction`), or
eager (fp32: torch's ``lerp`` calls; 8-bit: :func:`muon_momentum_8bit_host`, torch ops in place and numpy's
correctly rounded fp32 square root).

File order: Triton kernel, PyTorch reference, launchers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .aot import signature_of, with_aligned
from .codec import (
    BLOCK_SIZE,
    SIGNED_LEVELS,
    block_scale_rcp_reference,
    decode_signed,
    decode_signed_reference,
    encode_signed,
    encode_signed_reference,
    fma,
    neg,
)
from .dispatch import Family, HostStep, dispatch, host_flag_values, pack, settings, unpack
from .multitensor import aot_spec, as_fp32, is_aligned, launch_over, table_pointer, tile_header
from .rounding import index_seed, index_seed_reference, nearest_variant, store_param, write_param_reference

__all__ = [
    "ROWS",
    "MUON_APPLY_NEAREST",
    "NS_COEFFICIENTS",
    "NS_STEPS",
    "NS_EPS",
    "MuonScalars",
    "MuonTensors",
    "MUON_MOMENTUM",
    "adjusted_lr",
    "muon_momentum_reference",
    "momentum_8bit_lerp_reference",
    "store_momentum_8bit_reference",
    "muon_momentum_8bit_host",
    "newton_schulz",
    "ns_work_numel",
    "muon_apply_reference",
    "muon_momentum",
    "muon_apply",
    "MUON_APPLY",
    "ApplyScalars",
    "ApplyTensors",
]

ROWS = 4
"""Quantization blocks (of ``BLOCK_SIZE`` elements) handled by one Triton program."""

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton–Schulz coefficients ``(a, b, c)`` of the Muon authors (and ``torch.optim.Muon``)."""

NS_STEPS = 5
"""Newton–Schulz iterations per update (the Muon authors' and torch's default)."""

NS_EPS = 1e-7
"""Floor of the Frobenius norm the Newton–Schulz input is divided by (torch.optim.Muon's ``eps``)."""


@triton.jit
def _lerp(s, e, w):
    """torch's fp32 ``lerp(s, e, w)``: ``fma(w, e - s, s)`` when ``|w| < 0.5``, else ``fma(-(1 - w), e - s, e)``."""
    small = tl.abs(w) < 0.5
    return fma(tl.where(small, w, neg(1.0 - w)), e - s, tl.where(small, s, e))


@triton.jit
def _muon_momentum_kernel(
    table_ptr,  # int64 (9, T): out (bf16 U), grad, buf, absmax, step, flag pointers; numel, first tile, index
    tile_owner_ptr,  # int32 (num_tiles,): which tensor each program updates
    T,  # tensors in the table
    weight_buf,  # lerp(buf, g, 1 - momentum)
    weight_nesterov,  # lerp(g, buf, momentum)
    nesterov,
    grad_sign,
    PARAM_DTYPE: tl.constexpr,  # the dtype of U (bf16): the table's "param" row is U
    GRAD_DTYPE: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr = False,
):
    weight_buf = as_fp32(weight_buf)
    weight_nesterov = as_fp32(weight_nesterov)
    nesterov = as_fp32(nesterov)
    grad_sign = as_fp32(grad_sign)
    t, out_ptr, grad_ptr, _, n, n_write, tile, _ = tile_header(
        table_ptr, tile_owner_ptr, T, 2, PARAM_DTYPE, GRAD_DTYPE, ALIGNED)
    rows = tile * ROWS + tl.arange(0, ROWS)  # (ROWS,) quantization blocks of the tensor
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK) element indices
    mask = offs < n
    write = offs < n_write  # flag 0: the momentum is left untouched
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_sign
    if QUANTIZED:
        buf_ptr = table_pointer(table_ptr, T, t, 2, tl.int8, ALIGNED)
        absmax_ptr = table_pointer(table_ptr, T, t, 3, tl.float32, False)
        row_mask = rows * BLOCK < n
        codes = tl.load(buf_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)
        buf = decode_signed(codes, absmax[:, None])
    else:
        buf_ptr = table_pointer(table_ptr, T, t, 2, tl.float32, ALIGNED)
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
    buf = _lerp(buf, g, weight_buf)
    u = tl.where(nesterov != 0.0, _lerp(g, buf, weight_nesterov), buf)
    store_param(out_ptr, u, offs, mask, 0, False)  # round to nearest even (bf16(U), as torch)
    if QUANTIZED:
        new_absmax = tl.max(tl.abs(buf), axis=1)  # masked elements are exactly 0
        tl.store(buf_ptr + offs, encode_signed(buf, new_absmax[:, None]), mask=write)
        tl.store(absmax_ptr + rows, new_absmax, mask=rows * BLOCK < n_write)
    else:
        tl.store(buf_ptr + offs, buf, mask=write)


AOT_SPECS = [
    aot_spec(_muon_momentum_kernel, torch.bfloat16, grad, aligned, QUANTIZED=quantized, ROWS=ROWS, BLOCK=BLOCK_SIZE)
    for aligned in (False, True)
    for grad in (torch.float32, torch.bfloat16, torch.float16)
    for quantized in (False, True)
]
"""(kernel, signature, constexprs) for fp32 and 8-bit momentum, each grad dtype and alignment."""

APPLY_BLOCK = 1024
"""Elements per program of :func:`_muon_apply_kernel`."""


@triton.jit(do_not_specialize=["tensor_index"])  # an index of 1 would become a constexpr int
def _muon_apply_kernel(param_ptr, update_ptr, step_ptr, flag_ptr, n, tensor_index, decay, step_size,
                       BLOCK: tl.constexpr, STOCHASTIC: tl.constexpr = True):
    """``p = fma(-step_size, O, p * decay)`` for one tensor (``O`` the bf16 Newton–Schulz result), written back
    in the param's dtype (bf16/fp16 stochastically rounded, seeded by the step counter and tensor index, or
    rounded to nearest-even without ``STOCHASTIC``); nothing is written where the finite flag is 0."""
    decay = as_fp32(decay)
    step_size = as_fp32(step_size)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n_write = tl.where(tl.load(flag_ptr) != 0.0, n, 0)
    mask = offs < n_write
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(update_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    seed = index_seed(tl.load(step_ptr), tensor_index)
    store_param(param_ptr, fma(neg(step_size), u, p * decay), offs, mask, seed, STOCHASTIC)


AOT_SPECS += with_aligned([
    (_muon_apply_kernel, signature_of(_muon_apply_kernel, {"n": "i64", "tensor_index": "i64"},
                                      param_ptr=f"*{dtype}", update_ptr="*bf16"), {"BLOCK": APPLY_BLOCK})
    for dtype in ("fp32", "bf16", "fp16")
])


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def muon_momentum_reference(grad: torch.Tensor, buf: torch.Tensor, absmax: torch.Tensor | None, weight_buf: float,
                            weight_nesterov: float, nesterov: bool, grad_sign: float = 1.0) -> torch.Tensor:
    """One momentum step in place; returns ``U`` (fp32), the Newton–Schulz input.

    ``grad`` and ``buf``: fp32 momentum of the same shape, or ``(num_blocks, BLOCK_SIZE)`` views with int8
    codes ``buf`` and ``absmax`` ``(num_blocks, 1)`` (8-bit momentum; zero padding stays zero); ``grad_sign``
    -1 maximizes. The specification of :func:`_muon_momentum_kernel`, of the CPU's eager
    (:func:`muon_momentum_8bit_host`) and compiled (:func:`_fused_momentum_8bit`) steps, with torch's own
    ``lerp`` (bit for bit ``torch.optim.Muon``).
    """
    g = _signed_fp32(grad, grad_sign)
    if absmax is None:  # in place: torch.optim.Muon's own buf.lerp_
        new = buf.lerp_(g, weight_buf)
    else:
        new = momentum_8bit_lerp_reference(g, buf, absmax, weight_buf)
        store_momentum_8bit_reference(new, new.abs().amax(dim=1, keepdim=True), buf, absmax)
    return torch.lerp(g, new, weight_nesterov) if nesterov else new


def momentum_8bit_lerp_reference(g: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                                 weight_buf: float) -> torch.Tensor:
    """The new fp32 momentum ``lerp(decode(codes, absmax), g, weight_buf)`` of 8-bit momentum (``g``: fp32, sign
    applied; ``codes`` int8 of its shape, ``absmax`` broadcast to it): the first half of
    :func:`muon_momentum_reference`'s 8-bit step, for blocks whose scale is completed elsewhere (a block split
    between the shards of a sharded param, :func:`~lowmem_lightning.optim.sharding.aligned_blocks`)."""
    return torch.lerp(decode_signed_reference(codes, absmax), g, weight_buf)


def store_momentum_8bit_reference(new: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor,
                                  ok: torch.Tensor | None = None) -> None:
    """The second half: ``new`` (fp32) stored as ``codes`` (int8, in place) with the block ``scale`` (its block's
    largest ``|new|``, broadcast to it) in ``absmax``; where ``ok`` (0-d, the finite flag) is 0 nothing changes."""
    encoded = encode_signed_reference(new, scale)
    if ok is not None:
        encoded = torch.where(ok != 0, encoded, codes)
        scale = torch.where(ok != 0, scale, absmax)
    codes.copy_(encoded)
    absmax.copy_(scale)


def _signed_fp32(grad: torch.Tensor, grad_sign: float) -> torch.Tensor:
    """``grad * grad_sign`` in fp32: ``grad`` itself (no copy) for an fp32 grad and ``grad_sign`` 1."""
    g = grad.to(torch.float32)
    return g if grad_sign == 1.0 else g * grad_sign


_DECODE_STEP = 1.0 / SIGNED_LEVELS
"""The decode's ``1 / 127`` (rounded to fp32 by the multiplication, as in :func:`.codec.decode_signed_reference`)."""

_SIGN_BIT = -(2**31)
"""The sign bit of an fp32 seen as int32."""


def muon_momentum_8bit_host(g: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor,
                            weight_buf: float, weight_nesterov: float, nesterov: bool,
                            work: torch.Tensor | None = None) -> None:
    """The 8-bit momentum step of :func:`muon_momentum_reference` on CPU tensors in ~16 passes (the reference
    takes ~25 and square roots in fp64): the same codes, scales and ``U``, bit for bit.

    ``g``: fp32 ``(num_blocks, BLOCK_SIZE)`` (sign applied); ``codes`` int8 of that shape and ``absmax``
    ``(num_blocks, 1)``, updated in place; ``U`` written into ``out`` (``g``'s element count, any float dtype).
    The decode, lerp and nesterov lerp are the reference's torch ops, in place where they can be; the block
    maximum is ``max(amax, -amin)``; the encode's square root is numpy's fp32 ``sqrt`` (correctly rounded, as
    the specification wants, where torch's vectorized fp32 ``sqrt`` on the CPU is not) on ``|r|``, whose sign
    is put back as a bit (int32 ``or``) before rounding half to even. The reference's ``SQRT_FLOOR`` clamp is
    left out: it only changes roots of ``|r| < 2**-100``, whose codes are 0 either way.

    ``work``: optional fp32 scratch of at least ``3 * g.numel()`` elements (:func:`_host_workspace`), reused
    across the matrices of a step so that no pass writes freshly mapped memory (the page faults of three
    new buffers per matrix cost about as much as the arithmetic); without it the buffers are allocated.
    """
    n = codes.numel()
    work = torch.empty(3 * n, dtype=torch.float32) if work is None else work
    new, r, mag_t = (work[i * n:(i + 1) * n].view(codes.shape) for i in range(3))
    new.copy_(codes).mul_(_DECODE_STEP)  # decoded y = sign(c) (|c| / 127)^2 absmax, below
    torch.abs(new, out=r)
    new.mul_(r).mul_(absmax).lerp_(g, weight_buf)  # (num_blocks, BLOCK_SIZE) fp32 momentum
    scale = torch.maximum(new.amax(dim=1, keepdim=True), new.amin(dim=1, keepdim=True).neg_()).abs_()
    torch.mul(new, block_scale_rcp_reference(scale), out=r)
    mag = mag_t.numpy()
    np.abs(r.numpy(), out=mag)
    np.sqrt(mag, out=mag)
    mag *= np.float32(SIGNED_LEVELS)
    mag_t.view(torch.int32).bitwise_or_(r.view(torch.int32).bitwise_and_(_SIGN_BIT))
    np.rint(mag, out=mag)
    codes.copy_(mag_t)
    absmax.copy_(scale)
    if nesterov:  # the momentum is stored: its buffer takes U (lerp is elementwise, in place is exact)
        torch.lerp(g, new, weight_nesterov, out=new)
    out.copy_(new.view(out.shape))


def _signed(grad: torch.Tensor, grad_sign: torch.Tensor) -> torch.Tensor:
    """fp32 ``grad`` negated where ``grad_sign`` (0-d) is negative: a negation, not a product (a product could
    be contracted into the lerp's fma when compiled)."""
    g = grad.to(torch.float32)
    return torch.where(grad_sign < 0, -g, g)


def _fused_momentum_8bit(grad: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor,
                         packed: torch.Tensor) -> None:
    """:func:`muon_momentum_reference`'s 8-bit step as one function for torch.compile (one fused pass): ``grad``
    and int8 ``codes`` ``(num_blocks, BLOCK_SIZE)``, ``absmax`` ``(num_blocks, 1)`` updated in place, ``U``
    written into ``out`` (same shape, bf16); ``packed``: :class:`MuonScalars` as one fp32 tensor."""
    s = unpack(MuonScalars, packed)
    g = _signed(grad, s.grad_sign)
    new = torch.lerp(decode_signed_reference(codes, absmax), g, s.weight_buf)
    scale = new.abs().amax(dim=1, keepdim=True)
    codes.copy_(encode_signed_reference(new, scale))
    absmax.copy_(scale)
    out.copy_(torch.where(s.nesterov != 0, torch.lerp(g, new, s.weight_nesterov), new))


def _fused_momentum_fp32(grad: torch.Tensor, buf: torch.Tensor, out: torch.Tensor, packed: torch.Tensor) -> None:
    """:func:`muon_momentum_reference`'s fp32 step as one function for torch.compile: flat ``grad``, ``buf``
    (updated in place) and ``out`` (``U``, bf16) of one length; ``packed`` as in :func:`_fused_momentum_8bit`."""
    s = unpack(MuonScalars, packed)
    g = _signed(grad, s.grad_sign)
    new = torch.lerp(buf, g, s.weight_buf)
    buf.copy_(new)
    out.copy_(torch.where(s.nesterov != 0, torch.lerp(g, new, s.weight_nesterov), new))


_FUSED_STEPS = {True: HostStep(_fused_momentum_8bit), False: HostStep(_fused_momentum_fp32)}
"""The compiled momentum steps (8-bit: True), run under :func:`_fp_contraction` so that they store torch's eager
``lerp`` bits (see there)."""

_CONTRACT_OPTION = {"cpp.enable_floating_point_contract_flag": "fast"}
"""inductor's C++ flag ``-ffp-contract=fast`` (default ``off``)."""


def _fp_contraction():
    """Context in which inductor compiles C++ with floating-point contraction. torch's eager CPU ``lerp`` is one
    fma (``fma(w', e - s, base)``); inductor decomposes it into a product and a sum, which contraction fuses back
    into that fma, so the compiled steps store the eager bits (``tests/test_muon.py``). The other products of
    the steps feed a select or no sum, and GCC (inductor's compiler here) contracts a product only when every
    use is a sum: nothing else fuses. A compiler or CPU without fma contraction breaks the equality, which the
    slow tests (compiled == eager == ``torch.optim.Muon``, momentum included) report."""
    from torch._inductor import config

    return config.patch(_CONTRACT_OPTION)


def newton_schulz(x: torch.Tensor, coefficients: Sequence[float] = NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = NS_EPS, work: torch.Tensor | None = None) -> torch.Tensor:
    """Orthogonalize a batch of matrices ``x`` ``(batch, rows, cols)`` (any float dtype): bf16 result.

    ``steps`` iterations of the quintic ``X <- a X + (b A + c A A) X`` with ``A = X X^T`` (Jordan et al.
    2024), in bf16 matmuls, on ``X`` = ``bf16(x)`` transposed when tall (so ``A`` is the smaller Gram
    matrix) and divided by its Frobenius norm floored at ``eps``; the same operations as
    ``torch.optim.Muon``'s per-matrix loop. The result's singular values lie near ``[0.7, 1.2]``.

    ``work``: optional flat bf16 scratch on ``x``'s device of at least :func:`ns_work_numel` elements that
    every intermediate (and the result, a view of it) is written into instead of fresh buffers; the caller
    keeps it across steps (fresh multi-MiB buffers on the CPU are new pages: thousands of page faults a step).
    """
    if x.ndim != 3:
        raise ValueError(f"Invalid x of shape {tuple(x.shape)}: expected a (batch, rows, cols) stack of matrices.")
    a, b, c = (float(v) for v in coefficients)
    tall = x.size(-2) > x.size(-1)
    X = x.bfloat16()
    if tall:
        X = X.mT
    norms = torch.stack([m.norm() for m in X])  # per matrix, in torch's reduction order (bf16, as torch's)
    scale = norms.clamp(min=eps).view(-1, 1, 1)
    if work is None:
        X = _ns_iterations(X / scale, a, b, c, steps)
    else:
        normalized, buffers = _ns_buffers(X, work)
        X = _ns_iterations(torch.div(X, scale, out=normalized), a, b, c, steps, buffers)
    return X.mT if tall else X


def ns_work_numel(shape: Sequence[int]) -> int:
    """Elements of the bf16 scratch :func:`newton_schulz` takes as ``work`` for a ``(batch, rows, cols)`` input:
    the normalized input, two product buffers and the two ``small x small`` Gram products per matrix."""
    n, rows, cols = shape
    small = min(rows, cols)
    return 3 * n * rows * cols + 2 * n * small * small


def _ns_buffers(X: torch.Tensor, work: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Views of ``work`` for :func:`newton_schulz` of the (possibly transposed) input ``X`` ``(n, small,
    large)``: the normalized input, laid out as ``X`` is (what ``X / norm`` would allocate), and
    :func:`_ns_iterations`'s ``(gram, poly, spare, spare2)``."""
    n, small, large = X.shape
    size, square = n * small * large, n * small * small
    if work.dtype != torch.bfloat16 or work.device != X.device or work.numel() < ns_work_numel(X.shape):
        raise ValueError(f"Invalid work ({work.dtype}, {work.numel()} elements on {work.device}): expected a bf16 "
                         f"scratch of at least {ns_work_numel(X.shape)} elements on {X.device}.")
    flat = work.view(-1)
    normalized = flat[:size].view(n, small, large)
    if not X.is_contiguous():  # a tall matrix's transposed view: the division keeps that layout
        normalized = flat[:size].view(n, large, small).mT
    spare, spare2 = flat[size:2 * size].view(X.shape), flat[2 * size:3 * size].view(X.shape)
    gram = flat[3 * size:3 * size + square].view(n, small, small)
    poly = flat[3 * size + square:3 * size + 2 * square].view(n, small, small)
    return normalized, (gram, poly, spare, spare2)


def _ns_iterations(X: torch.Tensor, a: float, b: float, c: float, steps: int, buffers: tuple | None = None
                   ) -> torch.Tensor:
    """``steps`` quintic iterations on the normalized batch ``X`` ``(batch, small, large)``, every product
    written into buffers allocated once (a fresh output per product costs ~4% of the CPU step), or into
    ``buffers`` (``(gram, poly, spare, spare2)``, :func:`_ns_buffers`); ``X`` itself is reused as a buffer when
    contiguous (it is this function's own)."""
    n, small = X.size(0), X.size(1)
    if buffers is not None:
        gram, poly, spare0, spare1 = buffers
        spare = [spare0, X if X.is_contiguous() else spare1]
    else:
        gram, poly = X.new_empty(2, n, small, small).unbind(0)
        spare = [torch.empty(X.shape, dtype=X.dtype, device=X.device)]
        if X.is_contiguous():
            spare.append(X)
        else:  # a tall matrix's transposed view: read once, then replaced by contiguous products (as torch does)
            spare.append(torch.empty_like(spare[0]))
    if n == 1:  # one matrix: torch's own 2-D ops (a batch of one takes another CPU kernel)
        X, gram, poly, spare = X[0], gram[0], poly[0], [t[0] for t in spare]
        for i in range(steps):
            torch.mm(X, X.T, out=gram)  # (small, small)
            torch.addmm(gram, gram, gram, beta=b, alpha=c, out=poly)
            X = torch.addmm(X, poly, X, beta=a, out=spare[i % 2])
        return X[None]
    for i in range(steps):
        torch.bmm(X, X.mT, out=gram)  # (batch, small, small)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        X = torch.baddbmm(X, poly, X, beta=a, out=spare[i % 2])
    return X


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """The step size of a ``shape[0] x shape[1]`` matrix: ``lr * sqrt(max(1, A / B))`` for ``None`` or
    ``"original"``, ``lr * 0.2 * sqrt(max(A, B))`` for ``"match_rms_adamw"`` (torch.optim.Muon's rule)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"Invalid adjust_lr_fn={adjust_lr_fn!r}: expected None, 'original' or 'match_rms_adamw'.")


def muon_apply_reference(param: torch.Tensor, update: torch.Tensor, ok: torch.Tensor | None, decay: float,
                         step_size: float, seed, stochastic: bool = True) -> None:
    """``param = param * decay - step_size * update`` in place (fp32 math: ``decay`` = ``1 - lr *
    weight_decay``, ``step_size`` the adjusted lr), where ``ok`` (0-d bool; None: always). fp32 params get
    torch's ``mul_`` then ``add_(alpha=-step_size)`` results; bf16/fp16 params are written back with
    stochastic rounding seeded by ``seed`` (:func:`.rounding.write_param_reference`), or rounded to
    nearest-even when ``stochastic`` is False."""
    if ok is None and param.dtype == torch.float32:  # torch.optim.Muon's own in-place ops, no copies
        param.mul_(decay).add_(update, alpha=-step_size)
        return
    p = param.to(torch.float32)
    new = torch.add(p * decay, update, alpha=-step_size)
    write_param_reference(param, new, ok, seed, stochastic)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _blocks(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Flat ``t`` as ``(num_blocks, BLOCK_SIZE)`` (a zero-padded copy when ``pad``)."""
    flat = t.reshape(-1)
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK_SIZE)


def _host_workspace(t: MuonTensors) -> torch.Tensor | None:
    """One fp32 scratch for :func:`muon_momentum_8bit_host` over all of ``t``'s CPU 8-bit matrices (three
    buffers of the largest padded matrix), or None when there is none."""
    sizes = [-(-g.numel() // BLOCK_SIZE) * BLOCK_SIZE for g, a in zip(t.grads, t.absmaxes)
             if a is not None and g.device.type == "cpu"]
    return torch.empty(3 * max(sizes), dtype=torch.float32) if sizes else None


def _host_momentum(grad, buf, absmax, out, s: MuonScalars, packed: torch.Tensor | None,
                   work: torch.Tensor | None = None) -> None:
    """One tensor's momentum step on the host, ``U`` written into ``out`` (bf16): compiled when ``packed`` (the
    scalars as a tensor) is given (:data:`_FUSED_STEPS`), else eager (the reference for fp32 momentum,
    :func:`muon_momentum_8bit_host` for 8-bit, with the scratch ``work``); every form stores the same bits."""
    n = grad.numel()
    if absmax is None:
        if packed is not None:
            _FUSED_STEPS[False].on("compiled")(grad.reshape(-1), buf.view(-1), out.view(-1), packed)
        else:
            out.copy_(muon_momentum_reference(grad.reshape(buf.shape), buf, None, *s).view(out.shape))
        return
    pad = (-n) % BLOCK_SIZE
    codes = _blocks(buf, pad)
    u = torch.empty(codes.shape, dtype=out.dtype, device=out.device) if pad else out.view(codes.shape)
    if packed is not None:
        _FUSED_STEPS[True].on("compiled")(_blocks(grad, pad), codes, absmax.view(-1, 1), u, packed)
    elif codes.device.type != "cpu":  # a host step off the CPU (no Triton): the reference, no numpy
        u.copy_(muon_momentum_reference(_blocks(grad, pad), codes, absmax.view(-1, 1), *s).view(u.shape))
    else:
        muon_momentum_8bit_host(_signed_fp32(_blocks(grad, pad), s.grad_sign), codes, absmax.view(-1, 1), u,
                                s.weight_buf, s.weight_nesterov, bool(s.nesterov), work)
    if pad:
        out.copy_(u.view(-1)[:n].view(out.shape))
        buf.view(-1).copy_(codes.view(-1)[:n])


class MuonScalars(NamedTuple):
    """The hyperparameters of one momentum pass, in the order of ``_muon_momentum_kernel``'s scalar arguments
    (launched by name) and of :func:`muon_momentum_reference`'s: the weights of torch's two lerps, rounded to
    fp32 as torch's ``lerp`` rounds its weight."""

    weight_buf: float
    """``1 - momentum``: ``buf = lerp(buf, g, weight_buf)``."""
    weight_nesterov: float
    """``momentum``: ``U = lerp(g, buf, weight_nesterov)``."""
    nesterov: float
    """1.0 for Nesterov momentum, else 0.0."""
    grad_sign: float
    """-1.0 when maximizing, else 1.0."""

    @classmethod
    def of(cls, momentum: float, nesterov: bool, maximize: bool) -> MuonScalars:
        """The scalars of a param group's values (``1 - momentum`` in Python floats, as torch.optim.Muon)."""
        return cls(float(np.float32(1 - momentum)), float(np.float32(momentum)), float(bool(nesterov)),
                   -1.0 if maximize else 1.0)


class MuonTensors(NamedTuple):
    """The tensors of one momentum pass, one entry per matrix (a :func:`.dispatch.dispatch` batch).

    ``params[i]``: what the pass writes, ``U`` (contiguous bf16, ``grads[i]``'s numel; the table's param
    row); ``bufs[i]``: fp32 momentum or flat int8 codes with ``absmaxes[i]`` (fp32, one per 256);
    ``steps[i]``/``flags[i]``: 0-d fp32 on the device (flag 0 leaves the momentum untouched and ``U``
    unwritten: the update must skip that matrix).
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    bufs: Sequence[torch.Tensor]
    absmaxes: Sequence[torch.Tensor | None]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]


def _launch_key(t: MuonTensors, i: int) -> tuple:
    """What changes the compiled kernel: 8-bit or not, aligned, grad dtype."""
    return (t.absmaxes[i] is not None, is_aligned(t.params[i], t.grads[i], t.bufs[i]), t.grads[i].dtype)


def _launch(t: MuonTensors, scalars: MuonScalars) -> None:
    """One launch of ``_muon_momentum_kernel`` over a group of one :func:`_launch_key`."""
    quantized, aligned, _ = _launch_key(t, 0)
    state_rows = [[b.data_ptr() for b in t.bufs], [0 if a is None else a.data_ptr() for a in t.absmaxes]]
    launch_over(_muon_momentum_kernel, t.params, t.grads, state_rows, t.steps, t.flags, [0] * len(t.params), scalars,
                ROWS * BLOCK_SIZE, QUANTIZED=quantized, ROWS=ROWS, BLOCK=BLOCK_SIZE, ALIGNED=aligned)


def _host_key(t: MuonTensors, i: int) -> tuple:
    """What changes the compiled host step: 8-bit or not, grad dtype."""
    return (t.absmaxes[i] is not None, t.grads[i].dtype)


def _host(t: MuonTensors, scalars: MuonScalars, backend: str, steps) -> None:
    """The live tensors of one :func:`_host_key` group (``dispatch`` leaves out those whose flag is 0: their
    ``U`` stays unwritten); ``backend="compiled"``: the fused compiled steps, one tensor at a time.

    On the CPU, 8-bit momentum under ``cpu_compile="auto"`` takes the compiled step from
    :data:`MUON_COMPILE_MIN_NUMEL` elements per batch and fp32 momentum always the eager one
    (:func:`_host_backend`): ``torch.optim.Muon``'s own ``lerp`` calls (:func:`_fp32_momentum_eager`)."""
    backend = _host_backend(t, backend)
    if backend != "compiled":
        if t.absmaxes[0] is None:
            _fp32_momentum_eager(t, scalars)
            return
        work = _host_workspace(t)
        for grad, buf, absmax, out in zip(t.grads, t.bufs, t.absmaxes, t.params):
            _host_momentum(grad, buf, absmax, out, scalars, None, work)
        return
    packed = pack(scalars)
    with _fp_contraction():
        for grad, buf, absmax, out in zip(t.grads, t.bufs, t.absmaxes, t.params):
            _host_momentum(grad, buf, absmax, out, scalars, packed)


MUON_COMPILE_MIN_NUMEL = 2**16
"""Elements of one Newton–Schulz batch from which the CPU's 8-bit momentum pass compiles under ``"auto"``."""


def _host_backend(t: MuonTensors, backend: str) -> str:
    """The host step a CPU group of ``t`` takes for ``backend`` (what :func:`.dispatch.choose_bucket` chose):

    * 8-bit momentum under ``cpu_compile="auto"``: compiled when the batch holds at least
      :data:`MUON_COMPILE_MIN_NUMEL` elements (a 256x256 matrix), else what ``dispatch`` chose (eager until
      ``compile_after_numel`` element-steps, the other optimizers' rule). The fused compiled pass is ~3x faster
      than the eager one (~16 passes), is compiled once per process (one dynamic-shape graph, one more for a
      matrix whose length is not a multiple of 256; inductor caches the code on disk: a first step of seconds),
      and the 8-bit pass is most of a Muon step beside Newton–Schulz; a model of smaller matrices does not
      repay that first step soon.
    * fp32 momentum: eager, even when compiling is asked for: ``torch.optim.Muon``'s own two ``lerp`` calls per
      matrix beat the compiled fused pass in a whole step (7.4M elements of 256x256 and 256x688 matrices: 8.0
      against 11.6 ms, ``benchmarks/RESULTS.md``), and store the same bits.

    Other devices keep ``backend``."""
    if t.grads[0].device.type != "cpu":
        return backend
    if t.absmaxes[0] is None:
        return "eager"
    if backend == "eager" and settings().cpu_compile == "auto" and sum(g.numel() for g in t.grads) >= \
            MUON_COMPILE_MIN_NUMEL:
        return "compiled"
    return backend


def _fp32_momentum_eager(t: MuonTensors, s: MuonScalars) -> None:
    """:func:`muon_momentum_reference` with fp32 momentum, tensor by tensor (``torch.optim.Muon``'s order: the
    gradient and momentum are still in cache for the second op): ``lerp_`` of the momentum, then ``U`` (the
    nesterov ``lerp``, or the momentum) written straight into the bf16 output (computed in fp32, rounded once on
    the store: the bits of ``lerp`` followed by ``bfloat16()``)."""
    for grad, buf, out in zip(t.grads, t.bufs, t.params):
        g = _signed_fp32(grad.reshape(buf.shape), s.grad_sign)
        buf.lerp_(g, s.weight_buf)
        if s.nesterov:
            torch.lerp(g, buf, s.weight_nesterov, out=out.view(buf.shape))
        else:
            out.view(buf.shape).copy_(buf)


MUON_MOMENTUM = Family("muon_momentum", launch=_launch, host=_host, launch_key=_launch_key, host_key=_host_key,
                       bucketed=True)
"""The momentum pass: ``dispatch(MUON_MOMENTUM, MuonTensors(...), MuonScalars.of(...))`` (one Triton launch per
:func:`_launch_key` group on CUDA; on the host one :func:`_host_key` group per call, compiled or eager as
:func:`.dispatch.choose_bucket` says for the group's elements)."""


def muon_momentum(grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], absmaxes: Sequence[torch.Tensor | None],
                  steps: Sequence[torch.Tensor], flags: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *,
                  momentum: float, nesterov: bool, maximize: bool = False) -> None:
    """The momentum pass of one Muon step over many matrices, in place; ``U`` written into ``outs[i]``
    (contiguous bf16): :data:`MUON_MOMENTUM` dispatched over :class:`MuonTensors`."""
    dispatch(MUON_MOMENTUM, MuonTensors(outs, grads, bufs, absmaxes, steps, flags),
             MuonScalars.of(momentum, nesterov, maximize))


class ApplyScalars(NamedTuple):
    """The scalars of one update of same-shape matrices: ``decay`` = ``1 - lr * weight_decay`` and
    ``step_size`` (the adjusted lr)."""

    decay: float
    step_size: float


class ApplyTensors(NamedTuple):
    """The tensors of one update (a :func:`.dispatch.dispatch` batch): ``params[i]``, ``updates[i]`` (the
    Newton–Schulz result of the param's shape, contiguous bf16), 0-d fp32 ``steps[i]`` / ``flags[i]``, and
    ``tensor_indices[i]`` (seeds the stochastic rounding)."""

    params: Sequence[torch.Tensor]
    updates: Sequence[torch.Tensor]
    steps: Sequence[torch.Tensor]
    flags: Sequence[torch.Tensor]
    tensor_indices: Sequence[int]


def _apply_launch(t: ApplyTensors, scalars: ApplyScalars, stochastic: bool = True) -> None:
    """:func:`_muon_apply_kernel` on one tensor (``launch_key=None``: one launch per tensor; a non-contiguous
    param goes through a contiguous copy; ``stochastic``: its ``STOCHASTIC``)."""
    param, update = t.params[0], t.updates[0].contiguous()
    work = param if param.is_contiguous() else param.contiguous()
    n = work.numel()
    _muon_apply_kernel[(triton.cdiv(n, APPLY_BLOCK),)](
        work, update, t.steps[0], t.flags[0], n, int(t.tensor_indices[0]), **scalars._asdict(), BLOCK=APPLY_BLOCK,
        STOCHASTIC=stochastic, enable_fp_fusion=False)
    if work is not param:
        param.copy_(work)


def _apply_host(t: ApplyTensors, scalars: ApplyScalars, backend: str, steps, stochastic: bool = True) -> None:
    """:func:`muon_apply_reference` on one host tensor (its flag read on the host: a memory read;
    ``stochastic``: the rounding mode)."""
    param = t.params[0]
    if not float(t.flags[0]):
        return
    seed = None if param.dtype == torch.float32 else index_seed_reference(t.steps[0], t.tensor_indices[0])
    target = param if param.is_contiguous() else param.contiguous()
    muon_apply_reference(target, t.updates[0].view(param.shape), None, scalars.decay, scalars.step_size, seed,
                         stochastic)
    if target is not param:
        param.copy_(target)


MUON_APPLY = Family("muon_apply", launch=_apply_launch, host=_apply_host)
"""The update: ``dispatch(MUON_APPLY, ApplyTensors(...), ApplyScalars(...))``: Triton on CUDA (one launch per
tensor, stochastic rounding fused), the reference on the host."""

MUON_APPLY_NEAREST = nearest_variant(MUON_APPLY, _apply_launch, _apply_host)
""":data:`MUON_APPLY` storing bf16/fp16 params rounded to nearest-even (``bf16_rounding="nearest"``)."""


def muon_apply(params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], flags: Sequence[torch.Tensor],
               steps: Sequence[torch.Tensor], tensor_indices: Sequence[int], step_sizes: Sequence[float], *,
               lr: float, weight_decay: float, stochastic: bool = True) -> None:
    """``params[i] = params[i] * (1 - lr * weight_decay) - step_sizes[i] * updates[i]`` in place where
    ``flags[i]`` is set (:data:`MUON_APPLY`; ``updates[i]`` has the param's shape, bf16). bf16/fp16 params
    round stochastically, seeded by step and index (to nearest-even when ``stochastic`` is False). Tensors of
    one step size go in one dispatch."""
    family = MUON_APPLY if stochastic else MUON_APPLY_NEAREST
    decay = 1 - lr * weight_decay
    by_size: dict[float, list[int]] = {}
    for i, size in enumerate(step_sizes):
        by_size.setdefault(float(size), []).append(i)
    live = _host_fp32_live(params, flags)
    for size, idx in by_size.items():
        if live is not None:  # torch.optim.Muon's mul_ and add_, as two multi-tensor ops
            chosen = [params[i] for i in idx if live[i]]
            if chosen:
                torch._foreach_mul_(chosen, decay)
                torch._foreach_add_(chosen, [updates[i].view(params[i].shape) for i in idx if live[i]], alpha=-size)
            continue
        tensors = ApplyTensors(*([seq[i] for i in idx] for seq in (params, updates, steps, flags, tensor_indices)))
        dispatch(family, tensors, ApplyScalars(decay, size))


def _host_fp32_live(params: Sequence[torch.Tensor], flags: Sequence[torch.Tensor]) -> list[bool] | None:
    """Which params to update when every one is an fp32 CPU tensor with a host-checked flag (what
    :func:`muon_apply_reference` does to them needs no rounding draw and no flag read), else None."""
    if not all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params):
        return None
    return host_flag_values(list(flags))
