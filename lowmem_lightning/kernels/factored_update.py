"""Building blocks of the factored optimizers' update kernels (the last pass of :mod:`.adafactor` and
:mod:`.came`), the PyTorch reference of their momentum, and the update launch.

An update program takes :data:`.factored_plan.UPDATE_ROWS` codec blocks of one tensor of its group
(:func:`update_tile`), computes the unclipped direction ``u = (rf * cf) * g`` from the row and column
factors of :mod:`.factored`'s finalize pass, or ``g / sqrt(v)`` for a 1-D tensor (:func:`tile_direction`;
gathers and multiplies only), and updates the momentum ``m = beta1 * m + (1 - beta1) * u`` as fp32 or as
8-bit codes with one absmax per block (:func:`momentum_tile`; reference :func:`momentum_update_reference`).
The family's own kernel (Adafactor's or CAME's) does the rest; :func:`launch_update` launches it once for
a whole group.

File order: Triton helpers, PyTorch reference, launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import (
    BLOCK_SIZE,
    decode_signed,
    decode_signed_reference,
    dequantize_reference,
    encode_signed,
    encode_signed_reference,
    quantize_reference,
)
from .factored import ema, ema_reference, inv_sqrt, row_of
from .factored_plan import (
    F_ABSMAX,
    F_C,
    F_COFF,
    F_FLAG,
    F_G,
    F_M,
    F_N,
    F_ROFF,
    F_UPD,
    F_V,
    UPDATE_ROWS,
    UPDATE_WARPS,
    GroupPlan,
    index_floats,
    owner_of,
    tfield,
    tfield16,
)
from .multitensor import table_pointer
from .rounding import masked_reference

__all__ = ["factored_index", "factored_scale", "tile_factors", "update_tile", "tile_direction", "momentum_tile",
           "momentum_update_reference", "launch_update"]


# --------------------------------------------------------------------------------------------------
# Triton building blocks of the update kernels (Adafactor's and CAME's last pass)
# --------------------------------------------------------------------------------------------------


@triton.jit
def factored_index(offs, blocks, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo, ROW_BLOCKS: tl.constexpr,
                   BLOCK: tl.constexpr):
    """``(ridx, cidx)`` of the ``(ROWS, BLOCK)`` flat element offsets ``offs`` (codec ``blocks``) of a ``(B,
    R, C)`` tensor: the global row ``b * R + r`` (into ``B * R`` row factors) and the column index ``b * C
    + c`` (into ``B * C`` column factors). ``ROW_BLOCKS`` (``C % BLOCK == 0``: every codec block lies in
    one row): ``ridx`` per block (``ROWS``), from the block's first element only, and ``cidx`` contiguous
    from a multiple of ``BLOCK`` (vector loads); else both per element."""
    if ROW_BLOCKS:  # one return: the branches' shapes differ (the compiler checks every return)
        start = blocks * BLOCK
        grow = row_of(start, inv_c_hi, inv_c_lo)
        b = row_of(grow, inv_r_hi, inv_r_lo)
        cbase = tl.multiple_of(b * C + (start - grow * C), BLOCK)
        cidx = cbase[:, None] + tl.arange(0, BLOCK)[None, :]
    else:
        grow = row_of(offs, inv_c_hi, inv_c_lo)  # b * R + r
        b = row_of(grow, inv_r_hi, inv_r_lo)
        cidx = b * C + (offs - grow * C)
    return grow, cidx


@triton.jit
def factored_scale(x, ridx, cidx, mask, bmask, rf_ptr, cf_ptr, ROW_BLOCKS: tl.constexpr):
    """``(rf[ridx] * cf[cidx]) * x`` (:func:`factored_index`): gathers and two multiplies per element, no
    division (``ROW_BLOCKS``: one row factor per codec block, broadcast over its elements)."""
    if ROW_BLOCKS:
        rf = tl.load(rf_ptr + ridx, mask=bmask, other=0.0)[:, None]
    else:
        rf = tl.load(rf_ptr + ridx, mask=mask, other=0.0)
    cf = tl.load(cf_ptr + cidx, mask=mask, other=0.0)
    return (rf * cf) * x


@triton.jit
def tile_factors(table_ptr, T, t, offs, blocks, ROW_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """``(ridx, cidx, roff, coff)``: :func:`factored_index` of tensor ``t``'s elements ``offs`` and the
    tensor's offsets into the group's row and column factor arrays."""
    C = tfield(table_ptr, T, t, F_C).to(tl.int32)
    if ROW_BLOCKS:
        C = tl.multiple_of(C, BLOCK)
    inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo = index_floats(table_ptr, T, t)
    ridx, cidx = factored_index(offs, blocks, C, inv_c_hi, inv_c_lo, inv_r_hi, inv_r_lo, ROW_BLOCKS, BLOCK)
    roff = tfield(table_ptr, T, t, F_ROFF)
    coff = tfield16(table_ptr, T, t, F_COFF)  # regions start on 16 elements (_offsets)
    return ridx, cidx, roff, coff


@triton.jit
def update_tile(table_ptr, owner_ptr, T, ALIGNED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This update program's ``ROWS`` codec blocks of its tensor: ``(t, blocks, offs, finite, mask, bmask)``
    with ``offs`` the ``(ROWS, BLOCK)`` element offsets, ``mask`` empty when the gradient is not finite
    (flag 0) and ``bmask`` the blocks that exist and are written (``finite`` and inside the tensor)."""
    t, local = owner_of(owner_ptr, table_ptr, T, F_UPD)
    n = tfield(table_ptr, T, t, F_N)
    finite = tl.load(table_pointer(table_ptr, T, t, F_FLAG, tl.float32, False)) != 0.0
    n_write = tl.where(finite, n, 0)
    if ALIGNED:
        n_write = tl.multiple_of(n_write, 16)
    blocks = local.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    return t, blocks, offs, finite, offs < n_write, blocks * BLOCK < n_write


@triton.jit
def tile_direction(table_ptr, owner_ptr, T, rf_ptr, cf_ptr, GRAD_DTYPE: tl.constexpr, FACTORED: tl.constexpr,
                   ALIGNED: tl.constexpr, ROW_BLOCKS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """:func:`update_tile` and the unclipped update ``u`` of its elements: ``(rf * cf) * g`` (factored;
    the group's factor arrays, at the tensor's offsets) or ``g / sqrt(v)`` (``v`` full size). Returns
    ``(t, blocks, offs, finite, mask, bmask, u)``."""
    t, blocks, offs, finite, mask, bmask = update_tile(table_ptr, owner_ptr, T, ALIGNED, ROWS, BLOCK)
    g_ptr = table_pointer(table_ptr, T, t, F_G, GRAD_DTYPE, ALIGNED)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FACTORED:
        ridx, cidx, roff, coff = tile_factors(table_ptr, T, t, offs, blocks, ROW_BLOCKS, BLOCK)
        u = factored_scale(g, ridx, cidx, mask, bmask, rf_ptr + roff, cf_ptr + coff, ROW_BLOCKS)
    else:
        v_ptr = table_pointer(table_ptr, T, t, F_V, tl.float32, ALIGNED)
        u = inv_sqrt(tl.load(v_ptr + offs, mask=mask, other=1.0)) * g
    return t, blocks, offs, finite, mask, bmask, u


@triton.jit
def momentum_tile(table_ptr, T, t, blocks, offs, mask, bmask, finite, u, beta1, one_minus_beta1,
                  QUANTIZED: tl.constexpr, ALIGNED: tl.constexpr):
    """``m = beta1 * m + (1 - beta1) * u`` over ``(ROWS, 256)`` codec blocks, stored back as fp32 or as int8
    codes with a new absmax per block (a row reduction: the row's max ``|m|``); returns the fp32 ``m``."""
    if QUANTIZED:
        m_ptr = table_pointer(table_ptr, T, t, F_M, tl.int8, ALIGNED)
        absmax_ptr = table_pointer(table_ptr, T, t, F_ABSMAX, tl.float32, False)
        scale = tl.load(absmax_ptr + blocks, mask=bmask, other=0.0)
        old = decode_signed(tl.load(m_ptr + offs, mask=mask, other=0), scale[:, None])
        m = tl.where(mask, ema(old, u, beta1, one_minus_beta1), 0.0)
        absmax = tl.max(tl.abs(m), axis=1)
        tl.store(m_ptr + offs, encode_signed(m, absmax[:, None]), mask=mask)
        tl.store(absmax_ptr + blocks, absmax, mask=bmask)
    else:
        m_ptr = table_pointer(table_ptr, T, t, F_M, tl.float32, ALIGNED)
        m = ema(tl.load(m_ptr + offs, mask=mask, other=0.0), u, beta1, one_minus_beta1)
        tl.store(m_ptr + offs, m, mask=mask)
    return m


# --------------------------------------------------------------------------------------------------
# PyTorch reference of the momentum (used by the step functions of Adafactor and CAME)
# --------------------------------------------------------------------------------------------------


def momentum_update_reference(
    m: torch.Tensor, absmax: torch.Tensor | None, u: torch.Tensor, beta1: torch.Tensor, omb1: torch.Tensor,
    ok: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """EMA of the momentum: returns ``(new fp32 m, stored m, stored absmax)``.

    ``m`` is fp32 or int8 codes with ``absmax`` (flat, or the shape of ``u``: the same layout); the
    stored values are re-quantized when ``absmax`` is given, and unchanged where ``ok`` is False
    (``ok=None``: always re-quantized).
    """
    if absmax is None:
        new = ema_reference(m, u, beta1, omb1)
        return new, masked_reference(ok, new, m), None
    if m.numel() % BLOCK_SIZE:  # a partial last block: the codec's padded reference
        new = ema_reference(dequantize_reference(m, absmax).view(u.shape), u, beta1, omb1)
        codes, scales = quantize_reference(new, signed=True)
        return new, masked_reference(ok, codes.view(m.shape), m), masked_reference(ok, scales, absmax)
    # whole blocks: the same codec math on (blocks, 256) views, no padding copies (the host steps pass
    # 2-D views already, see codec.block_rows)
    u_blocks = u.reshape(-1, BLOCK_SIZE)
    m_blocks = m.view(u_blocks.shape)
    scale = absmax.view(*u_blocks.shape[:-1], 1)
    new = ema_reference(decode_signed_reference(m_blocks, scale), u_blocks, beta1, omb1)
    new_scale = new.abs().amax(dim=-1, keepdim=True)
    codes = masked_reference(ok, encode_signed_reference(new, new_scale), m_blocks)
    return new.view(u.shape), codes.view(m.shape), masked_reference(ok, new_scale, scale).view(-1)


# --------------------------------------------------------------------------------------------------
# Launcher of the update pass
# --------------------------------------------------------------------------------------------------


def launch_update(kernel, plan: GroupPlan, scal: torch.Tensor, args: dict) -> None:
    """The last pass of a factored optimizer, one launch of ``kernel`` (Adafactor's or CAME's update) over
    every tensor of ``plan`` (:data:`.factored_plan.UPDATE_ROWS` codec blocks per program), with the group's factors,
    ``scal`` and the family's own arguments ``args``; then params updated through copies are written back."""
    owner, programs = plan.upd
    kernel[(programs,)](
        table_ptr=plan.table, owner_ptr=owner, T=plan.T, rf_ptr=plan.ws["rf"], cf_ptr=plan.ws["cf"], scal_ptr=scal,
        FACTORED=plan.factored, PARAM_DTYPE=plan.param_dtype, GRAD_DTYPE=plan.grad_dtype, ALIGNED=plan.aligned,
        ROW_BLOCKS=plan.row_blocks, ROWS=UPDATE_ROWS, BLOCK=BLOCK_SIZE, num_warps=UPDATE_WARPS,
        enable_fp_fusion=False, **args,
    )
    plan.copy_back()
