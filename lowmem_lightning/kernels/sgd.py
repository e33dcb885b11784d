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
them and stores param and momentum. Per step and element it moves ``2 * param_bytes + grad_bytes``
plus ``8`` (fp32 momentum) or ``2 + 8/256`` (8-bit momentum) bytes.

A 0/1 fp32 ``flag`` (from the optimizer's non-finite guard) masks every load and store: with
``flag == 0`` params and momentum are left untouched. The step counter is read (``step == 0`` marks
the first step, which initializes the momentum) but advanced by the optimizer, not here.

File order: Triton kernel, PyTorch reference, launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import BLOCK_SIZE, decode_signed, dequantize_reference, encode_signed, quantize_reference
from .dispatch import cpu_compiled, scalar_args, use_triton
from .rounding import round_param_reference, store_param

__all__ = ["ROWS", "sgd_reference", "sgd_update", "sgd_seed_reference"]

ROWS = 4
"""Quantization blocks (of ``BLOCK_SIZE`` elements) handled by one Triton program."""

_SEED_STEP = 7_919
_SEED_INDEX = 104_729
_SEED_MASK = 0x7FFFFFFF


@triton.jit(do_not_specialize=["tensor_index"])
def _sgd_kernel(
    param_ptr,
    grad_ptr,
    buf_ptr,
    absmax_ptr,
    step_ptr,
    flag_ptr,
    n,
    lr,
    weight_decay,
    momentum,
    one_minus_dampening,
    nesterov,
    grad_sign,
    tensor_index,
    MOMENTUM: tl.constexpr,
    QUANTIZED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) quantization block ids
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (ROWS, BLOCK) element ids
    limit = tl.where(tl.load(flag_ptr) != 0.0, n, 0)  # a skipped (non-finite) update touches nothing
    mask = offs < limit
    step = tl.load(step_ptr)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_sign
    p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = g + weight_decay * p
    if MOMENTUM:
        row_mask = rows * BLOCK < limit
        if QUANTIZED:
            codes = tl.load(buf_ptr + offs, mask=mask, other=0)
            absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)
            buf = decode_signed(codes, absmax[:, None])
        else:
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
    seed = (step.to(tl.int64) * 7919 + tensor_index.to(tl.int64) * 104729) & tl.full((), 0x7FFFFFFF, tl.int64)
    store_param(param_ptr, p, offs, mask, seed, True)


def _aot_spec(param: str, grad: str, momentum: bool, quantized: bool):
    buf = "*i8" if quantized else "*fp32"
    signature = {
        "param_ptr": f"*{param}",
        "grad_ptr": f"*{grad}",
        "buf_ptr": buf,
        "absmax_ptr": "*fp32",
        "step_ptr": "*fp32",
        "flag_ptr": "*fp32",
        "n": "i64",
        "lr": "fp32",
        "weight_decay": "fp32",
        "momentum": "fp32",
        "one_minus_dampening": "fp32",
        "nesterov": "fp32",
        "grad_sign": "fp32",
        "tensor_index": "i32",
    }
    constexprs = {"MOMENTUM": momentum, "QUANTIZED": quantized, "ROWS": ROWS, "BLOCK": BLOCK_SIZE}
    return (_sgd_kernel, signature, constexprs)


AOT_SPECS = [
    _aot_spec(param, grad, momentum, quantized)
    for param, grad in (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16"))
    for momentum, quantized in ((False, False), (True, False), (True, True))
]
"""(kernel, signature, constexprs) for every mode (no momentum, fp32, 8-bit) and common dtype pairs."""


# --------------------------------------------------------------------------------------------------
# PyTorch reference (the specification, the CPU path and the test oracle)
# --------------------------------------------------------------------------------------------------


def sgd_seed_reference(step: torch.Tensor, tensor_index: torch.Tensor | int) -> torch.Tensor:
    """Stochastic-rounding seed of a step: ``rounding.step_seed(step, tensor_index)`` computed on the device."""
    index = tensor_index.to(torch.int64) if isinstance(tensor_index, torch.Tensor) else tensor_index
    return (step.to(torch.int64) * _SEED_STEP + index * _SEED_INDEX) & _SEED_MASK


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
    seed = sgd_seed_reference(step, tensor_index)
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


def sgd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor | None,
    absmax: torch.Tensor | None,
    step: torch.Tensor,
    flag: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    tensor_index: int,
) -> None:
    """Apply one SGD step in place to ``param`` (any shape) and its momentum state.

    ``buf``: None when ``momentum == 0``; an fp32 tensor of ``param.numel()`` elements (any shape);
    or flat int8 codes with ``absmax`` (fp32, one per 256 elements) for 8-bit momentum. ``step`` and
    ``flag`` are 0-d fp32 tensors on the param's device (``step`` is not advanced here). Triton on
    CUDA (one launch), the ``torch.compile``'d reference on CPU. Never synchronizes.
    """
    work = param if param.is_contiguous() else param.contiguous()
    flat_param, flat_grad = work.view(-1), grad.reshape(-1)
    flat_buf = None if buf is None else buf.view(-1)
    if use_triton(param):
        _launch(flat_param, flat_grad.contiguous(), flat_buf, absmax, step, flag,
                lr, weight_decay, momentum, dampening, nesterov, maximize, tensor_index)
    else:
        hp = scalar_args(lr, weight_decay, momentum, 1.0 - dampening, float(nesterov),
                         -1.0 if maximize else 1.0, float(tensor_index), device=param.device)
        _sgd_cpu(flat_param, flat_grad, flat_buf, absmax, step, flag, hp)
    if work is not param:
        param.copy_(work)


def _launch(param, grad, buf, absmax, step, flag, lr, weight_decay, momentum, dampening, nesterov, maximize,
            tensor_index) -> None:
    n = param.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, ROWS * BLOCK_SIZE),)
    _sgd_kernel[grid](
        param,
        grad,
        flag if buf is None else buf,
        flag if absmax is None else absmax,
        step,
        flag,
        n,
        float(lr),
        float(weight_decay),
        float(momentum),
        1.0 - float(dampening),
        float(nesterov),
        -1.0 if maximize else 1.0,
        int(tensor_index),
        MOMENTUM=buf is not None,
        QUANTIZED=absmax is not None,
        ROWS=ROWS,
        BLOCK=BLOCK_SIZE,
        enable_fp_fusion=False,
    )

