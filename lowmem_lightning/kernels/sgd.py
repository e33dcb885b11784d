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
(one column per tensor) and a tile -> tensor map tell each program which tensor it updates; tensors
are grouped by (param dtype, grad dtype, 8-bit or not). Per step and element it moves
``2 * param_bytes + grad_bytes`` plus ``8`` (fp32 momentum) or ``2 + 8/256`` (8-bit momentum) bytes.

A 0/1 fp32 ``flag`` (from the optimizer's non-finite guard) masks every load and store: with
``flag == 0`` params and momentum are left untouched. The step counter is read (``step == 0`` marks
the first step, which initializes the momentum) but advanced by the optimizer, not here.

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

from collections.abc import Sequence

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
from .dispatch import cpu_compile_wanted, cpu_compiled, scalar_args, triton_dtype, use_triton
from .multitensor import PARAM_GRAD_DTYPE_PAIRS, kernel_inputs, launch_table, tile_map, write_back
from .rounding import index_seed, index_seed_reference, round_param_reference, store_param

__all__ = ["ROWS", "sgd_reference", "sgd_update"]

ROWS = 4
"""Quantization blocks (of ``BLOCK_SIZE`` elements) handled by one Triton program."""



@triton.jit
def _as_fp32(x):
    """A runtime scalar as fp32 (the interpreter passes Python floats through as float64)."""
    return tl.zeros((), dtype=tl.float32) + x


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
):
    lr = _as_fp32(lr)
    weight_decay = _as_fp32(weight_decay)
    momentum = _as_fp32(momentum)
    one_minus_dampening = _as_fp32(one_minus_dampening)
    nesterov = _as_fp32(nesterov)
    grad_sign = _as_fp32(grad_sign)
    pid = tl.program_id(0)
    t = tl.load(tile_owner_ptr + pid).to(tl.int64)
    param_ptr = tl.load(table_ptr + 0 * T + t).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(table_ptr + 1 * T + t).to(tl.pointer_type(GRAD_DTYPE))
    step_ptr = tl.load(table_ptr + 4 * T + t).to(tl.pointer_type(tl.float32))
    flag_ptr = tl.load(table_ptr + 5 * T + t).to(tl.pointer_type(tl.float32))
    n = tl.load(table_ptr + 6 * T + t)
    first_tile = tl.load(table_ptr + 7 * T + t)
    tensor_index = tl.load(table_ptr + 8 * T + t)

    rows = (pid - first_tile) * ROWS + tl.arange(0, ROWS)  # (ROWS,) quantization blocks of the tensor
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK) element indices
    limit = tl.where(tl.load(flag_ptr) != 0.0, n, 0)  # a skipped (non-finite) update touches nothing
    mask = offs < limit
    step = tl.load(step_ptr)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_sign
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = g + weight_decay * p
    if MOMENTUM:
        row_mask = rows * BLOCK < limit
        if QUANTIZED:
            buf_ptr = tl.load(table_ptr + 2 * T + t).to(tl.pointer_type(tl.int8))
            absmax_ptr = tl.load(table_ptr + 3 * T + t).to(tl.pointer_type(tl.float32))
            codes = tl.load(buf_ptr + offs, mask=mask, other=0)
            absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)
            buf = decode_signed(codes, absmax[:, None])
        else:
            buf_ptr = tl.load(table_ptr + 2 * T + t).to(tl.pointer_type(tl.float32))
            buf = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        buf = tl.where(step == 0.0, d, momentum * buf + one_minus_dampening * d)
        d = tl.where(nesterov != 0.0, d + momentum * buf, buf)
        if QUANTIZED:
            new_absmax = tl.max(tl.abs(buf), axis=1)  # masked elements are exactly 0
            tl.store(buf_ptr + offs, encode_signed(buf, new_absmax[:, None]), mask=mask)
            tl.store(absmax_ptr + rows, new_absmax, mask=row_mask)
        else:
            tl.store(buf_ptr + offs, buf, mask=mask)
    p = p - lr * d
    seed = index_seed(step, tensor_index)
    store_param(param_ptr, p, offs, mask, seed, True)


def _aot_spec(param_dtype, grad_dtype, momentum: bool, quantized: bool):
    signature = {"table_ptr": "*i64", "tile_owner_ptr": "*i32", "T": "i32"}
    for name in ("lr", "weight_decay", "momentum", "one_minus_dampening", "nesterov", "grad_sign"):
        signature[name] = "fp32"
    constexprs = {
        "PARAM_DTYPE": param_dtype,
        "GRAD_DTYPE": grad_dtype,
        "MOMENTUM": momentum,
        "QUANTIZED": quantized,
        "ROWS": ROWS,
        "BLOCK": BLOCK_SIZE,
    }
    return (_sgd_kernel, signature, constexprs)



AOT_SPECS = [
    _aot_spec(triton_dtype(param), triton_dtype(grad), momentum, quantized)
    for param, grad in PARAM_GRAD_DTYPE_PAIRS
    for momentum, quantized in ((False, False), (True, False), (True, True))
]
"""(kernel, signature, constexprs) for every mode (no momentum, fp32, 8-bit) and launched dtype pair."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def sgd_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    absmax: torch.Tensor | None,
    step: torch.Tensor,
    flag: torch.Tensor,
    hp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One SGD step on flat tensors, returning ``(new_param, new_buf, new_absmax)`` (inputs untouched).

    ``param`` (n,) fp32/bf16/fp16; ``grad`` (n,) any float dtype; ``buf`` None (no momentum), fp32
    (n,) or int8 codes (n,) with ``absmax`` fp32 (ceil(n/256),); ``step`` and ``flag`` 0-d fp32;
    ``hp`` fp32 ``[lr, weight_decay, momentum, 1 - dampening, nesterov (0/1), grad_sign (+-1),
    tensor_index]``. ``new_param`` has the param's dtype (stochastically rounded); where
    ``flag == 0`` every output equals its input.
    """
    lr, weight_decay, momentum, one_minus_dampening, nesterov, grad_sign, tensor_index = hp.unbind()
    ok = flag != 0
    g = grad.to(torch.float32) * grad_sign
    p = param.to(torch.float32)
    d = g + weight_decay * p
    new_buf, new_absmax = buf, absmax
    if buf is not None:
        old = dequantize_reference(buf, absmax) if absmax is not None else buf
        momentum_buf = torch.where(step == 0, d, momentum * old + one_minus_dampening * d)
        d = torch.where(nesterov != 0, d + momentum * momentum_buf, momentum_buf)
        if absmax is not None:
            codes, scales = quantize_reference(momentum_buf, signed=True)
            new_buf, new_absmax = torch.where(ok, codes, buf), torch.where(ok, scales, absmax)
        else:
            new_buf = torch.where(ok, momentum_buf, buf)
    seed = index_seed_reference(step, tensor_index)
    rounded = round_param_reference(p - lr * d, param.dtype, seed, stochastic=True)
    return torch.where(ok, rounded, param), new_buf, new_absmax


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _sgd_inplace(param, grad, buf, absmax, step, flag, hp) -> None:
    new_param, new_buf, new_absmax = sgd_reference(param, grad, buf, absmax, step, flag, hp)
    param.copy_(new_param)
    if buf is not None:
        buf.copy_(new_buf)
    if absmax is not None:
        absmax.copy_(new_absmax)


_sgd_cpu = cpu_compiled(_sgd_inplace)


def _sgd8bit_fast_core(param, grad, codes, absmax, lr: float, weight_decay: float, momentum: float,
                       one_minus_dampening: float, nesterov: bool, grad_sign: float, first_step: bool, seed: int):
    """The compiled CPU step for 8-bit momentum on ``(num_blocks, BLOCK_SIZE)`` views (absmax
    ``(num_blocks, 1)``) with host scalars and no skip-select: the caller reads the finite flag and the
    step on the host (a memory read on CPU). Same math as :func:`sgd_reference`, to fp32 rounding.
    Without it the compiled reference's ``where(flag, new, old)`` on mutated inputs and its in-graph
    reshapes made the 8-bit step ~3x slower than the fp32-momentum one.
    """
    p = param.to(torch.float32)
    d = grad.to(torch.float32) * grad_sign + weight_decay * p
    buf = d if first_step else momentum * decode_signed_reference(codes, absmax) + one_minus_dampening * d
    d = d + momentum * buf if nesterov else buf
    p = p - lr * d
    if param.dtype == torch.float32:
        param.copy_(p)
    else:
        offs = torch.arange(param.numel(), device=param.device).view(param.shape)
        param.copy_(round_param_reference(p, param.dtype, seed, True, offs))
    scale = buf.abs().amax(dim=1, keepdim=True)
    codes.copy_(encode_signed_reference(buf, scale))
    absmax.copy_(scale)


_sgd8bit_fast_cpu = cpu_compiled(_sgd8bit_fast_core)


def _sgd8bit_fast_one(param, grad, codes, absmax, step, flag, hyper, tensor_index) -> None:
    """Run :func:`_sgd8bit_fast_core` on one contiguous CPU tensor whose size is a multiple of BLOCK_SIZE."""
    if not flag.item():  # CPU tensors: host reads, no device sync
        return
    step_value = int(step.item())
    lr, weight_decay, momentum, one_minus_dampening, nesterov, grad_sign = hyper
    seed = int(index_seed_reference(step, tensor_index).item())
    _sgd8bit_fast_cpu(param.view(-1, BLOCK_SIZE), grad.reshape(-1, BLOCK_SIZE), codes.view(-1, BLOCK_SIZE),
                      absmax.view(-1, 1), lr, weight_decay, momentum, one_minus_dampening, bool(nesterov), grad_sign,
                      step_value == 0, seed)


def sgd_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor | None],
    absmaxes: Sequence[torch.Tensor | None],
    steps: Sequence[torch.Tensor],
    flags: Sequence[torch.Tensor],
    tensor_indices: Sequence[int],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Apply one SGD step in place to every ``params[i]`` (any shape) and its momentum state.

    ``bufs[i]``: None when ``momentum == 0``; an fp32 tensor of ``params[i].numel()`` elements (any
    shape); or flat int8 codes with ``absmaxes[i]`` (fp32, one per 256 elements) for 8-bit momentum.
    ``steps[i]`` and ``flags[i]`` are 0-d fp32 tensors on the param's device (``steps`` is not
    advanced here; ``flags[i] == 0`` leaves tensor ``i`` untouched); ``tensor_indices[i]`` seeds its
    stochastic rounding. CUDA tensors run one Triton launch per (param dtype, grad dtype, 8-bit or
    not) group; others run the ``torch.compile``'d reference, one call per tensor. Never synchronizes.
    """
    hyper = (float(lr), float(weight_decay), float(momentum), 1.0 - float(dampening), float(bool(nesterov)),
             -1.0 if maximize else 1.0)
    buckets: dict[tuple, list[int]] = {}
    for i, param in enumerate(params):
        if use_triton(param):
            key = (param.device, param.dtype, grads[i].dtype, bufs[i] is not None, absmaxes[i] is not None)
            buckets.setdefault(key, []).append(i)
            continue
        work = param if param.is_contiguous() else param.contiguous()
        buf = None if bufs[i] is None else bufs[i].view(-1)
        if absmaxes[i] is not None and work.numel() % BLOCK_SIZE == 0 and cpu_compile_wanted(work):
            _sgd8bit_fast_one(work, grads[i], buf, absmaxes[i], steps[i], flags[i], hyper, tensor_indices[i])
        else:
            hp = scalar_args(*hyper, float(tensor_indices[i]), device=param.device)
            _sgd_cpu(work.view(-1), grads[i].reshape(-1), buf, absmaxes[i], steps[i], flags[i], hp)
        if work is not param:
            param.copy_(work)
    for (_, _, _, has_momentum, quantized), idx in buckets.items():
        _launch([params[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
                [absmaxes[i] for i in idx], [steps[i] for i in idx], [flags[i] for i in idx],
                [tensor_indices[i] for i in idx], hyper, has_momentum, quantized)


def _launch(params, grads, bufs, absmaxes, steps, flags, tensor_indices, hyper, has_momentum, quantized) -> None:
    device = params[0].device
    work, grads = kernel_inputs(params, grads)
    numels = tuple(p.numel() for p in work)
    owner, firsts, num_tiles = tile_map(numels, device, ROWS * BLOCK_SIZE)
    if num_tiles == 0:
        return
    table = launch_table(
        [
            [p.data_ptr() for p in work],
            [g.data_ptr() for g in grads],
            [0 if b is None else b.data_ptr() for b in bufs],
            [0 if a is None else a.data_ptr() for a in absmaxes],
            [s.data_ptr() for s in steps],
            [f.data_ptr() for f in flags],
            numels,
            firsts,
            [int(i) for i in tensor_indices],
        ],
        device,
    )
    _sgd_kernel[(num_tiles,)](
        table,
        owner,
        len(work),
        *hyper,
        PARAM_DTYPE=triton_dtype(work[0].dtype),
        GRAD_DTYPE=triton_dtype(grads[0].dtype),
        MOMENTUM=has_momentum,
        QUANTIZED=quantized,
        ROWS=ROWS,
        BLOCK=BLOCK_SIZE,
        enable_fp_fusion=False,
    )
    write_back(params, work)
