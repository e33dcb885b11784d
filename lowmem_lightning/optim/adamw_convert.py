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

import dataclasses
import functools

import torch

from ..kernels.adamw4bit import dequantize4_reference, num_blocks4, packed_len
from ..kernels.codec import dequantize_reference, num_blocks
from .layout import StateSpec, codes_specs, quantizes_state, step_spec
from .reshard import CODEC4, CODEC8, decode_rows, row_width
from .sharding import block_state_len, is_dtensor, local, row_form, unwrap_state, wrap_state

__all__ = ["FORM_8BIT", "FORM_4BIT", "FORM_FP32", "code_form", "decoded_moments", "with_decoded_moments",
           "fp32_adamw_state_dict", "convert_on_load", "form_layout", "prepare_sharded_load", "decoded_row_form",
           "read_layout"]

FORM_8BIT = "8-bit"
""":func:`code_form` of an ``adamw_8bit`` / ``paged_adamw_8bit`` state (int8 m codes, one byte per element)."""

FORM_4BIT = "4-bit"
""":func:`code_form` of an ``adamw_4bit`` state (uint8 bytes holding two 4-bit m codes each)."""

FORM_FP32 = "fp32"
"""The form of fp32 ``exp_avg`` / ``exp_avg_sq`` moments (``torch.optim.AdamW``; every param under 4096 elements)."""

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
    saved ones lack, and lose ``bf16_rounding`` and ``quantize_state`` (keys of ours torch does not read). Other
    states and step counters are kept; the input is not changed. A state dict without codes is returned as it is."""
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict) or not isinstance(groups, list):
        return state_dict
    if not any(isinstance(s, dict) and code_form(s) for s in states.values()):
        return state_dict
    params = _saved_params(groups, optimizer)
    new_states = {}
    for pid, state in states.items():
        form = code_form(state) if isinstance(state, dict) else None
        new_states[pid] = with_decoded_moments(params[pid], state, form) if form and pid in params else state
    return {**state_dict, "state": new_states, "param_groups": _merged_groups(optimizer, groups)}


def _saved_params(groups: list, optimizer: torch.optim.Optimizer) -> dict:
    """``{saved param id (an index, or a name): param}`` of saved param ``groups`` and ``optimizer``'s own."""
    params = {}
    for group, saved in zip(optimizer.param_groups, groups):
        if isinstance(saved, dict) and isinstance(saved.get("params"), list):
            params.update(zip(saved["params"], group["params"]))
    return params


def _merged_groups(optimizer: torch.optim.Optimizer, groups: list) -> list:
    """Saved param ``groups`` completed with ``optimizer``'s keys they lack, without ``bf16_rounding`` and
    ``quantize_state`` (ours)."""
    new_groups = []
    for group, saved in zip(optimizer.param_groups, groups):
        merged = {**{k: v for k, v in group.items() if k != "params"}, **saved}
        for key in ("bf16_rounding", "quantize_state"):  # keys of ours torch does not read
            merged.pop(key, None)
        new_groups.append(merged)
    return new_groups


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


# ------------------------------------------------------------------ sharded (FSDP2) checkpoints of another form
# A torch.distributed.checkpoint load (Lightning's ModelParallelStrategy) fills the loading optimizer's own state
# dict in place: keys, shapes and dtypes must be the saved ones, so a state of another form would not load (size
# mismatch, missing keys). prepare_sharded_load makes the next state_dict() a template of the saved form and the
# next load decode it: the source codes of each local shard are decoded with their own (row-form) scales and
# encoded with the loading optimizer's codes.


def _held_form(form: str, param: torch.Tensor, group: dict | None = None) -> str:
    """The form ``form``'s optimizer keeps ``param``'s moments in (fp32 below 4096 elements or in a group with
    ``quantize_state=False``: :func:`.layout.quantizes_state`; a saved form is read with the size rule alone)."""
    return form if quantizes_state(param, group) else FORM_FP32


def form_layout(param: torch.Tensor, form: str) -> dict[str, StateSpec]:
    """``{name: StateSpec}`` of an AdamW-family state of ``form`` (:data:`FORM_FP32`, :data:`FORM_8BIT`,
    :data:`FORM_4BIT`) for ``param`` (the local shard's, padded, for a DTensor), as that form's optimizer lays it
    out (:mod:`.sharding` reads it to present and to read back the state)."""
    form = _held_form(form, param)
    if form == FORM_FP32:
        shape = tuple(local(param).shape)
        specs = [StateSpec("exp_avg", shape, torch.float32, "moment"),
                 StateSpec("exp_avg_sq", shape, torch.float32, "square")]
    elif form == FORM_8BIT:
        n = block_state_len(param)
        specs = [*codes_specs("exp_avg", n, True), *codes_specs("exp_avg_sq", n, False)]
    elif form == FORM_4BIT:
        from .adamw4bit import codes4_specs  # adamw4bit imports this module

        n = block_state_len(param)
        specs = [*codes4_specs("exp_avg", n, True), *codes4_specs("exp_avg_sq", n, False)]
    else:
        raise ValueError(f"Invalid form={form!r}: expected {FORM_FP32!r}, {FORM_8BIT!r} or {FORM_4BIT!r}.")
    return {spec.name: spec for spec in (step_spec(), *specs)}


_OUR_GROUP_KEYS = frozenset({"lr", "betas", "eps", "weight_decay", "maximize", "bf16_rounding", "quantize_state"})


@functools.cache
def _torch_group_keys() -> frozenset:
    return frozenset(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults)


def _group_keys(form: str) -> frozenset:
    """The param-group keys (hyperparameters) of the optimizer that keeps ``form`` (fp32: ``torch.optim.AdamW``)."""
    return _torch_group_keys() if form == FORM_FP32 else _OUR_GROUP_KEYS


def read_layout(param: torch.Tensor, form: str) -> dict[str, StateSpec]:
    """:func:`form_layout` as a load reads it: for a row-form (FSDP2) param the codes and scales are taken as
    they come (local), for :func:`decoded_row_form` to decode with their own scales."""
    layout = form_layout(param, form)
    if not row_form(param):
        return layout
    return {name: dataclasses.replace(spec, absmax=None, axes="param") if spec.role in ("codes", "absmax") else spec
            for name, spec in layout.items()}


def _own_form(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> str:
    """The form ``optimizer`` keeps ``param``'s moments in (``torch.optim.AdamW``: fp32), its group's
    ``quantize_state`` included."""
    group = optimizer._layout_group(param, None) if hasattr(optimizer, "_layout_group") else None
    return _held_form(getattr(optimizer, "_moment_form", FORM_FP32), param, group)


def _template(param: torch.Tensor, state: dict, form: str, present: bool) -> dict:
    """A state of ``form`` for the DTensor ``param`` (zeros, ``state``'s step): local tensors, or with ``present``
    presented as ``form``'s optimizer presents it (what a checkpoint of that form holds for ``param``)."""
    layout = form_layout(param, form)
    shard = local(param)
    zeros = {name: torch.zeros(spec.shape, dtype=spec.dtype, device=shard.device)
             for name, spec in layout.items() if name != "step"}
    step = state.get("step")
    zeros["step"] = local(step) if isinstance(step, torch.Tensor) else torch.zeros((), dtype=torch.float32)
    return wrap_state(param, zeros, layout) if present else zeros


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _row_codes(param: torch.Tensor, state: dict, key: str, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The local codes (one per element) and scale rows of ``key`` in ``state`` (row form of ``form``), checked:
    ``ValueError`` naming the key, what it holds and what ``form`` needs."""
    codec, shard = (CODEC8 if form == FORM_8BIT else CODEC4), local(param)
    codes, rows = local(state.get(f"{key}_codes")), local(state.get(f"{key}_absmax"))
    where = f"Invalid optimizer state dict: the {form} state of a param of shape {tuple(param.shape)}"
    width = row_width(tuple(param.shape), codec.block)
    if not (isinstance(codes, torch.Tensor) and isinstance(rows, torch.Tensor)) or tuple(codes.shape) != tuple(
            shard.shape) or tuple(rows.shape) != (shard.shape[0] if shard.dim() else 1, width):
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (codes, rows)]
        raise ValueError(f"{where} holds {key!r} codes and scales of shapes {got[0]} and {got[1]}; its shard "
                         f"{tuple(shard.shape)} needs codes of that shape and scale rows ({shard.shape[0]}, {width}).")
    signed = key == "exp_avg"
    low, high = ((-8, 7) if signed else (0, 15)) if codec is CODEC4 else ((-128, 127) if signed else (0, 255))
    dtype = torch.int8 if signed else torch.uint8
    if codes.dtype != dtype or (codes.numel() and (int(codes.min()) < low or int(codes.max()) > high)):
        raise ValueError(f"{where}: {key!r} codes are {codes.dtype} outside {low}..{high}, not {form} codes "
                         f"({dtype}); was the checkpoint written by another optimizer than its callback names?")
    if not torch.isfinite(rows).all() or (rows < 0).any():
        raise ValueError(f"{where}: {key}_absmax holds a negative, infinite or NaN block scale.")
    return codes, rows


def decoded_row_form(param: torch.Tensor, state: dict, form: str | None) -> dict:
    """``state`` (a DTensor ``param``'s, its tensors local) with the row-form codes of ``form`` (codes of the
    shard's shape, one per element; scales per row: :mod:`.reshard`) replaced by the fp32 ``exp_avg`` /
    ``exp_avg_sq`` they decode to with their own saved scales (whatever world size saved them: no re-encoding);
    unchanged when ``form`` is ``None`` or fp32, ``param`` is not in row form or ``state`` holds no scale rows.
    ``ValueError`` when the codes or scales cannot be ``form``'s."""
    rows = local(state.get("exp_avg_absmax"))
    if form in (None, FORM_FP32) or not row_form(param) or not (isinstance(rows, torch.Tensor) and rows.dim() == 2):
        return state
    codec, shard, out = (CODEC8 if form == FORM_8BIT else CODEC4), local(param), dict(state)
    for key in _MOMENTS:
        codes, rows = _row_codes(param, state, key, form)
        out[key] = decode_rows(codes, rows, codec).reshape(shard.shape).to(shard.device)
        del out[f"{key}_codes"], out[f"{key}_absmax"]
    return out


def _decoded_dtensor_state(param: torch.Tensor, state: dict, pid, form: str) -> dict:
    """A state of ``form`` saved for the DTensor ``param`` (DTensors, as a distributed load fills them) with its
    codes decoded to fp32 moments presented like the param (what ``torch.optim.AdamW`` keeps for it)."""
    if row_form(param):
        moments = decoded_row_form(param, {k: local(v) for k, v in state.items()}, form)
        shard = moments
    else:  # flat codes of another sharding: laid out for this run's shards (checked), then decoded
        shard = unwrap_state(param, dict(state), pid, form_layout(param, form))
        moments = decoded_moments(param, shard, form)
    if moments is None or "exp_avg" not in moments:
        raise ValueError(
            f"Invalid optimizer state dict: param {pid!r} (shape {tuple(param.shape)}) holds {form} codes whose "
            f"lengths are not those of its shard ({tuple(local(param).shape)}); they cannot be decoded."
        )
    moments = {key: moments[key] for key in _MOMENTS}
    kept = {"step": shard["step"]} if "step" in shard else {}
    return wrap_state(param, {**kept, **moments}, {"step": step_spec(), "exp_avg": "param", "exp_avg_sq": "param"})


class _ShardedLoad:
    """The hooks :func:`prepare_sharded_load` puts on one optimizer, removed together (``remove()``), at the
    latest when the load they prepare ends."""

    def __init__(self, optimizer: torch.optim.Optimizer, form: str) -> None:
        self.optimizer, self.form, self.handles = optimizer, form, []

    def present(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """State-dict post-hook: the state of every DTensor param held in another form replaced (in place) by a
        template of the saved ``form``; returns ``state_dict``. (Torch runs it before an optimizer of this package
        presents its state as DTensors: it gets local tensors, presented in ``form`` by its ``_axes_of``.)"""
        params, ours = _params(optimizer), hasattr(optimizer, "_moment_form")
        extra = set(optimizer.defaults) - _group_keys(self.form)  # group keys the saved form's optimizer lacks
        for group in state_dict["param_groups"]:
            for key in extra:
                group.pop(key, None)
        for pid, state in state_dict["state"].items():
            param = params[pid]
            if is_dtensor(param) and _own_form(optimizer, param) != _held_form(self.form, param):
                state_dict["state"][pid] = _template(param, state, self.form, present=not ours)
        return state_dict

    def decode(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        """Load pre-hook of a ``torch.optim.AdamW``: saved codes of DTensor params decoded to fp32 moments."""
        params, states = _saved_params(state_dict["param_groups"], optimizer), dict(state_dict["state"])
        for pid, state in states.items():
            param = params.get(pid)
            if param is not None and is_dtensor(param) and _held_form(self.form, param) != FORM_FP32 \
                    and is_dtensor(state.get("exp_avg_codes")):
                states[pid] = _decoded_dtensor_state(param, state, pid, self.form)
        return {**state_dict, "state": states, "param_groups": _merged_groups(optimizer, state_dict["param_groups"])}

    def remove(self, *_) -> None:
        """Remove every hook and the optimizer's note of the saved form."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if getattr(self.optimizer, "_incoming_form", None) is not None:
            self.optimizer._incoming_form = None


def prepare_sharded_load(optimizer: torch.optim.Optimizer, form: str, present: bool = True) -> _ShardedLoad:
    """Make ``optimizer`` (an AdamW-family optimizer of this package, or a ``torch.optim.AdamW``) load the next
    **sharded** state dict of ``form`` (:data:`FORM_FP32`, :data:`FORM_8BIT`, :data:`FORM_4BIT`) whatever form it
    keeps: its ``state_dict()`` presents every DTensor param held in another form as a template of ``form`` (what
    ``torch.distributed.checkpoint`` fills: keys, shapes and dtypes of the saved state), and its ``load_state_dict``
    decodes the saved codes of each local shard with their own scales (any world size: the row form) and encodes
    them with its own codes (or keeps them as fp32 moments). Returns the hooks' handle; they remove themselves
    when that load ends (``.remove()`` removes them earlier). With ``present=False`` ``state_dict()`` is left
    alone: the caller presents the template with the handle's ``present(optimizer, state_dict)`` (from a
    state-dict hook of its own). ``ValueError`` for another optimizer or form."""
    form_layout(torch.zeros(1), form)  # checks form
    if not (hasattr(optimizer, "_moment_form") or isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW)):
        raise ValueError(
            f"Invalid optimizer={type(optimizer).__name__}: prepare_sharded_load expects an AdamW-family optimizer "
            "(adamw, adamw_8bit, paged_adamw_8bit, adamw_4bit)."
        )
    hooks = _ShardedLoad(optimizer, form)
    if present:
        hooks.handles.append(optimizer.register_state_dict_post_hook(hooks.present))
    if hasattr(optimizer, "_moment_form"):
        optimizer._incoming_form = form  # its _axes_of presents and reads this form until the load ends
    else:
        hooks.handles.append(optimizer.register_load_state_dict_pre_hook(hooks.decode, prepend=True))
    hooks.handles.append(optimizer.register_load_state_dict_post_hook(hooks.remove))
    return hooks
