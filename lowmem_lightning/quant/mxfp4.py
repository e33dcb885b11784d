"""MXFP4 expert weights, as gpt-oss's Hub release stores them, decoded one expert at a time for the loader.

Format (OCP Microscaling Formats v1.0, MXFP4; gpt-oss model card): the elements of each row are split into groups of
32 sharing one E8M0 scale, a uint8 exponent ``s`` meaning ``2 ** (s - 127)``; each element is an FP4 E2M1 code
(:data:`FP4_E2M1_VALUES`), two per byte, the even element in the low nibble. A 3-D experts projection of shape
``(experts, in, out)`` is stored as ``<name>_blocks`` (uint8, ``(experts, out, in / 32, 16)``) and
``<name>_scales`` (uint8, ``(experts, out, in / 32)``): row ``r`` of expert ``e`` decodes to column ``r`` of the
expert's ``(in, out)`` matrix, ``value = E2M1(code) * 2 ** (s - 127)``, as transformers'
``Mxfp4Config(dequantize=True)`` decodes it (the product taken in fp32, then cast to the load dtype: the same bits). A
scale of 255 (the format's NaN) decodes to inf, and values beyond the load dtype's range overflow to inf: the loader's
non-finite check refuses both.
"""

from __future__ import annotations

import torch

__all__ = ["FP4_E2M1_VALUES", "MXFP4_METHOD", "BLOCKS", "SCALES", "GROUP", "declared_quant_method", "mxfp4_shapes",
           "decode_mxfp4", "decode_expert"]

MXFP4_METHOD = "mxfp4"
"""``quantization_config.quant_method`` of a checkpoint whose experts are stored in MXFP4 (gpt-oss)."""

BLOCKS, SCALES = "_blocks", "_scales"
"""Suffixes of the two tensors that store projection ``<name>``: codes (``<name>_blocks``) and scales."""

GROUP = 32
"""Elements per E8M0 scale (16 bytes of two FP4 codes each)."""

FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit E2M1 code (sign bit 3, two exponent bits, one mantissa bit; bias 1)."""

_EXPONENT_BIAS = 127


def declared_quant_method(config) -> str | None:
    """``quantization_config.quant_method`` of a transformers ``config`` (a dict or a transformers quantization
    config; its ``QuantizationMethod`` enum read as its string), ``None`` when the config declares none."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(
        quantization, "quant_method", None)
    return getattr(method, "value", method)


def mxfp4_shapes(param_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(blocks shape, scales shape)`` that store an experts parameter of shape ``(experts, in, out)``, or ``None``
    when it cannot be stored so (not 3-D, or ``in`` not a multiple of :data:`GROUP`)."""
    if len(param_shape) != 3 or param_shape[1] % GROUP:
        return None
    experts, rows_in, out = param_shape
    return (experts, out, rows_in // GROUP, GROUP // 2), (experts, out, rows_in // GROUP)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values ``(rows, groups * 32)`` in ``dtype`` of MXFP4 ``blocks`` (uint8 ``(rows, groups, 16)``) and ``scales``
    (uint8 ``(rows, groups)``): ``E2M1(code) * 2 ** (scale - 127)``, computed in fp32 and cast once (exact for
    every finite result representable in ``dtype``)."""
    rows, groups, _ = blocks.shape
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).long()  # low nibble first
    values = table[codes].reshape(rows, groups, GROUP)
    exponents = scales.to(torch.int32).unsqueeze(-1) - _EXPONENT_BIAS
    return torch.ldexp(values, exponents).reshape(rows, groups * GROUP).to(dtype)


def decode_expert(blocks_slice, scales_slice, expert: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Expert ``expert``'s ``(in, out)`` matrix of a projection stored as MXFP4, read from safetensors slices (only
    that expert's bytes are read) and decoded on ``device``."""
    blocks = blocks_slice[expert].to(device)
    scales = scales_slice[expert].to(device)
    return decode_mxfp4(blocks, scales, dtype).t()
