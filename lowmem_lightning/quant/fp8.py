"""FP8 weights with block-wise scales, as fine-grained FP8 releases store them, decoded one tensor at a time for the
loader.

Format (DeepSeek-V3's, transformers' ``FineGrainedFP8Config``; ``quantization_config.quant_method: fp8``): a linear
layer's ``weight`` (``out x in``) is stored as FP8 E4M3 codes (``float8_e4m3fn``) with a scale per block of
``weight_block_size`` (``[128, 128]``: rows x columns) in ``weight_scale_inv`` (fp32, ``ceil(out / 128) x
ceil(in / 128)``; or a single per-tensor scale without blocks), so that ``value = code * scale`` of its block (the
name is the inverse of the quantization scale). Scales stored as uint8 are E8M0 exponents (``2 ** (s - 127)``). The
product is taken in fp32 and cast once to the load dtype, as transformers' ``FineGrainedFP8Config(dequantize=True)``
does (where its block grid divides the weight; partial edge blocks, which it refuses, take their block's scale as
DeepSeek's reference dequantization does). Layers left unquantized (``modules_to_not_convert``) are stored in bf16 and
read as usual.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_METHOD", "FP8_CODES", "SCALE_SUFFIX", "block_size", "decode_fp8", "fp8_scale_shapes"]

FP8_METHOD = "fp8"
"""``quantization_config.quant_method`` of a checkpoint whose linear weights are stored in fine-grained FP8."""

FP8_CODES = ("F8_E4M3",)
"""safetensors dtype codes of the FP8 weight codes this loader decodes."""

SCALE_SUFFIX = "_scale_inv"
"""``<name>.weight`` is stored with its scales in ``<name>.weight_scale_inv``."""

_E8M0_BIAS = 127


def block_size(quantization: dict) -> tuple[int, int] | None:
    """``(rows, columns)`` of the FP8 scale blocks the ``quantization_config`` dict declares (its
    ``weight_block_size``), ``None`` for one scale per tensor."""
    block = quantization.get("weight_block_size")
    return None if block is None else (int(block[0]), int(block[1]))


def fp8_scale_shapes(weight_shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[tuple[int, ...], ...]:
    """The shapes a ``weight_shape`` (``out x in``) weight's ``weight_scale_inv`` may have: the block grid
    ``ceil(out / rows) x ceil(in / columns)``, or for a per-tensor scale ``()``, ``(1,)`` or ``(1, 1)``."""
    if block is None:
        return (), (1,), (1, 1)
    rows, cols = weight_shape
    return ((-(-rows // block[0]), -(-cols // block[1])),)


def decode_fp8(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """Values ``out x in`` in ``dtype`` of FP8 ``codes`` scaled by ``scale_inv`` per ``block`` (``None``: one scale):
    ``code * scale``, computed in fp32 and cast once. Each scale is repeated over its block's rows only; columns
    broadcast through a view, so the fp32 product is the one weight-sized temporary."""
    scale = scale_inv.to(torch.float32)
    if scale_inv.dtype == torch.uint8:
        scale = torch.exp2(scale - _E8M0_BIAS)
    values = codes.to(torch.float32)
    if block is None or scale.numel() == 1:
        return values.mul_(scale.reshape(())).to(dtype)
    rows, cols = values.shape
    per_row = scale.repeat_interleave(block[0], dim=0)[:rows]
    full, rest = divmod(cols, block[1])
    values[:, :full * block[1]].unflatten(-1, (full, block[1])).mul_(per_row[:, :full, None])
    if rest:
        values[:, full * block[1]:].mul_(per_row[:, full:])
    return values.to(dtype)
