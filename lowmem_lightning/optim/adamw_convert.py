"""Conversions between the AdamW family's state forms: fp32 moments, the 8-bit codes, the 4-bit codes.

``adamw`` (``torch.optim.AdamW``: fp32 ``exp_avg`` / ``exp_avg_sq``), ``adamw_8bit`` and ``paged_adamw_8bit``
(:mod:`..kernels.codec`: int8 m codes, uint8 v codes, one byte per element, an fp32 absmax per 256) and
``adamw_4bit`` (:mod:`..kernels.adamw4bit`: two 4-bit codes per uint8 byte, an fp32 absmax per 128) keep the
same moments in different forms. A state of one form loads into an optimizer of another by decoding the
source codes to fp32 (the codes' own decode references, :func:`decoded_moments`) and encoding them with
the target's own encoder (the loading optimizer's ``_convert_foreign_state``); step counters are kept.
``torch.optim.AdamW`` has no conversion hook of its own: :func:`fp32_adamw_state_dict` turns a quantized
state dict into one it loads, and :func:`convert_on_load` makes an optimizer's ``load_state_dict`` do it.

A state whose codes or scales do not have the source form's lengths (or whose scales are negative or not
finite) is not decoded: it is left as it is for the loading optimizer's validation, which refuses it
naming the key, its dtype and shape and the expected ones.
"""

from __future__ import annotations

import torch

from ..kernels.adamw4bit import dequantize4_reference, num_blocks4, packed_len
from ..kernels.codec import dequantize_reference, num_blocks
from .sharding import block_state_len, local

__all__ = ["FORM_8BIT", "FORM_4BIT", "code_form", "decoded_moments", "with_decoded_moments", "fp32_adamw_state_dict",
           "convert_on_load"]

FORM_8BIT = "8-bit"
""":func:`code_form` of an ``adamw_8bit`` / ``paged_adamw_8bit`` state (int8 m codes, one byte per element)."""

FORM_4BIT = "4-bit"
""":func:`code_form` of an ``adamw_4bit`` state (uint8 bytes holding two 4-bit m codes each)."""

_MOMENTS = ("exp_avg", "exp_avg_sq")
_CODE_KEYS = tuple(f"{key}_{part}" for key in _MOMENTS for part in ("codes", "absmax"))


def code_form(state: dict) -> str | None:
    """:data:`FORM_8BIT` or :data:`FORM_4BIT` when ``state`` holds all four code tensors of that form (told
    apart by the m codes' dtype: int8 or uint8), else ``None`` (fp32 moments, or a malformed state)."""
    if not all(isinstance(state.get(key), torch.Tensor) for key in _CODE_KEYS):
        return None
    dtype = state["exp_avg_codes"].dtype
    return FORM_8BIT if dtype == torch.int8 else FORM_4BIT if dtype == torch.uint8 else None


def _form_lengths(form: str, length: int) -> dict[str, int]:
    """Element counts of the four code tensors of ``form`` for ``length`` (padded) state elements."""
    if form == FORM_8BIT:
        return {"exp_avg_codes": length, "exp_avg_absmax": num_blocks(length),
                "exp_avg_sq_codes": length, "exp_avg_sq_absmax": num_blocks(length)}
    return {"exp_avg_codes": packed_len(length), "exp_avg_absmax": num_blocks4(length),
            "exp_avg_sq_codes": packed_len(length), "exp_avg_sq_absmax": num_blocks4(length)}


def _well_formed(form: str, state: dict, param: torch.Tensor) -> bool:
    """Whether the code tensors have ``form``'s dtypes and lengths (flat) for ``param``'s (padded) state."""
    lengths = _form_lengths(form, block_state_len(param))
    for key, n in lengths.items():
        value = state[key]
        dtype = torch.float32 if key.endswith("absmax") else torch.uint8
        if key == "exp_avg_codes":
            dtype = torch.int8 if form == FORM_8BIT else torch.uint8
        if value.dtype != dtype or value.dim() != 1 or value.numel() != n:
            return False
    return True


def decoded_moments(param: torch.Tensor, state: dict, form: str) -> dict[str, torch.Tensor] | None:
    """``{"exp_avg", "exp_avg_sq"}``: the fp32 moments (the param's local shape, on its device) that the
    ``form`` codes in ``state`` decode to, exactly as the optimizer's own step decodes them; ``None`` when
    the codes do not have that form's lengths for ``param`` (the caller leaves them to the validation).
    ``ValueError`` when a block scale is negative, infinite or NaN."""
    if not _well_formed(form, state, param):
        return None
    for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
        scales = state[key]
        if not torch.isfinite(scales).all() or (scales < 0).any():
            raise ValueError(f"Invalid optimizer state dict: {key!r} holds a negative, infinite or NaN block scale.")
    shard = local(param)
    out = {}
    for key, signed in zip(_MOMENTS, (True, False)):
        codes = state[f"{key}_codes"].detach().to(shard.device)
        absmax = state[f"{key}_absmax"].detach().to(shard.device)
        if form == FORM_8BIT:
            flat = dequantize_reference(codes, absmax)[: shard.numel()]
        else:
            flat = dequantize4_reference(codes, absmax, shard.numel(), signed)
        out[key] = flat.reshape(shard.shape).clone()
    return out


def with_decoded_moments(param: torch.Tensor, state: dict, form: str) -> dict:
    """``state`` with its ``form`` code tensors replaced by the fp32 ``exp_avg`` / ``exp_avg_sq`` they decode to
    (:func:`decoded_moments`); unchanged when the codes are malformed (the validation then refuses them)."""
    moments = decoded_moments(param, state, form)
    if moments is None:
        return state
    return {**{k: v for k, v in state.items() if k not in _CODE_KEYS}, **moments}


def fp32_adamw_state_dict(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """``state_dict`` of ``adamw_8bit`` / ``paged_adamw_8bit`` / ``adamw_4bit`` with every param's codes decoded
    into fp32 ``exp_avg`` / ``exp_avg_sq`` of the param's shape, so that ``optimizer`` (a ``torch.optim.AdamW``
    over the same params, in the same order) loads it; its param groups take ``optimizer``'s keys that the
    saved ones lack, and lose ``bf16_rounding`` (a key of ours torch does not read). Other states and
    step counters are kept; the input is not changed. A state dict without codes is returned as it is."""
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict) or not isinstance(groups, list):
        return state_dict
    if not any(isinstance(s, dict) and code_form(s) for s in states.values()):
        return state_dict
    params = {}
    for group, saved in zip(optimizer.param_groups, groups):
        if isinstance(saved, dict) and isinstance(saved.get("params"), list):
            params.update(zip(saved["params"], group["params"]))
    new_states = {}
    for pid, state in states.items():
        form = code_form(state) if isinstance(state, dict) else None
        new_states[pid] = with_decoded_moments(params[pid], state, form) if form and pid in params else state
    new_groups = []
    for group, saved in zip(optimizer.param_groups, groups):
        merged = {**{k: v for k, v in group.items() if k != "params"}, **saved}
        merged.pop("bf16_rounding", None)
        new_groups.append(merged)
    return {**state_dict, "state": new_states, "param_groups": new_groups}


def _pre_hook(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    return fp32_adamw_state_dict(state_dict, optimizer)


def convert_on_load(optimizer: torch.optim.Optimizer):
    """Make ``optimizer.load_state_dict`` (a ``torch.optim.AdamW``) accept the quantized state dicts of
    ``adamw_8bit`` / ``paged_adamw_8bit`` / ``adamw_4bit`` (decoded by :func:`fp32_adamw_state_dict`); returns
    the hook's handle (``.remove()`` undoes it)."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(
            f"Invalid optimizer={type(optimizer).__name__}: convert_on_load expects a torch.optim.AdamW (or Adam); "
            "the optimizers of this package convert the AdamW family's states on their own."
        )
    return optimizer.register_load_state_dict_pre_hook(_pre_hook)
