"""Optimizer states saved by peer libraries, read without importing them: a checkpoint of bitsandbytes'
``AdamW8bit`` / ``PagedAdamW8bit`` / ``AdamW`` (32-bit) / ``Lion8bit``, torchao's ``AdamW8bit`` / ``AdamW4bit``,
came-pytorch's ``CAME`` or transformers' ``Adafactor`` resumes with the equivalent optimizer of ours.

How each peer saves its moments (read from the tensors in the state dict, duck typing, no peer import):

- bitsandbytes 0.50: per param ``{"step": int, "__bnb_optimizer_quant_state__": {"state1", "state2", "qmap1",
  "qmap2", "absmax1", "absmax2"}}``; ``stateN`` is uint8 codes of the param's shape indexing ``qmapN`` (256 fp32
  levels, the dynamic map), scaled by ``absmaxN`` per block of 256 flattened elements; fp32 ``stateN`` (32-bit
  optimizers, params under 4096 elements) is the moment itself. AdamW: ``state1`` = m, ``state2`` = v;
  Lion: ``state1`` = its momentum.
- torchao: ``exp_avg`` / ``exp_avg_sq`` are ``OptimState8bit`` / ``OptimState4bit`` tensor subclasses (``codes``,
  ``scale``, ``qmap``) that decode themselves (``.dequantize()``); unpickling them needs torchao installed.
- came-pytorch's CAME and transformers' Adafactor keep ours' names and shapes (int ``step``, ``RMS``):
  our ``came`` / ``adafactor`` read them as they are.

:func:`identify_peer` names the peer of a saved state dict; :func:`converted_peer_state` turns it into a state
dict the target loads (fp32 moments under our names, which the target encodes into its own codes on load).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = ["PEERS", "PeerOptimizer", "identify_peer", "converted_peer_state", "peer_refusal", "conversion_note"]

_BNB_KEY = "__bnb_optimizer_quant_state__"
_BNB_BLOCK = 256  # bitsandbytes' blockwise optimizer block (elements per absmax)
_ADAMW_FAMILY = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_4bit")


class PeerOptimizer(NamedTuple):
    """A peer optimizer whose checkpoints convert."""

    label: str
    """Its name as a user knows it (in the info line and the refusal)."""
    family: str
    """The algorithm: ``"adamw"``, ``"lion"``, ``"came"`` or ``"adafactor"``."""
    targets: tuple[str, ...]
    """The registered optimizers of ours that continue it."""


PEERS: dict[str, PeerOptimizer] = {
    "bnb_adamw_8bit": PeerOptimizer("bitsandbytes 8-bit AdamW (AdamW8bit / PagedAdamW8bit)", "adamw", _ADAMW_FAMILY),
    "bnb_adamw_32bit": PeerOptimizer("bitsandbytes 32-bit AdamW", "adamw", _ADAMW_FAMILY),
    "bnb_lion_8bit": PeerOptimizer("bitsandbytes Lion8bit", "lion", ("lion", "lion_8bit")),
    "bnb_lion_32bit": PeerOptimizer("bitsandbytes 32-bit Lion", "lion", ("lion", "lion_8bit")),
    "torchao_adamw_8bit": PeerOptimizer("torchao AdamW8bit", "adamw", _ADAMW_FAMILY),
    "torchao_adamw_4bit": PeerOptimizer("torchao AdamW4bit", "adamw", _ADAMW_FAMILY),
    "came_pytorch": PeerOptimizer("came-pytorch CAME", "came", ("came",)),
    "transformers_adafactor": PeerOptimizer("transformers Adafactor", "adafactor", ("adafactor",)),
}
"""Peer optimizers whose checkpoints convert, by key (:func:`identify_peer`), with their labels and targets."""

_DROPPED_GROUP_KEYS = {  # peer group keys with no meaning in the target (bitsandbytes' AdEMAMix fields, Lion's eps)
    "adamw": ("alpha", "t_alpha", "t_beta3", "amsgrad"),
    "lion": ("alpha", "t_alpha", "t_beta3", "eps"),
}


def _states(state_dict) -> list[dict]:
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    return [s for s in states.values() if isinstance(s, dict)] if isinstance(states, dict) else []


def _is_torchao_state(value) -> bool:
    """A torchao quantized optimizer state (tensor subclass holding ``codes``, ``scale``, ``qmap``)."""
    return isinstance(value, torch.Tensor) and all(hasattr(value, a) for a in ("codes", "scale", "qmap")) \
        and callable(getattr(value, "dequantize", None))


def _torchao_bits(value) -> int:
    """8 or 4: the code width of a torchao state (two 4-bit codes per byte)."""
    return 4 if value.codes.numel() < value.numel() else 8


def identify_peer(state_dict) -> str | None:
    """The :data:`PEERS` key of the peer optimizer that saved ``state_dict`` (an optimizer state dict, as in a
    Lightning checkpoint's ``optimizer_states``), else ``None`` (ours, torch's, or unknown)."""
    states = _states(state_dict)
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    group = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    bnb = [s[_BNB_KEY] for s in states if isinstance(s.get(_BNB_KEY), dict)]
    if bnb:
        return _bnb_kind(bnb, group)
    moments = [s.get(k) for s in states for k in ("exp_avg", "exp_avg_sq")]
    quantized = [m for m in moments if _is_torchao_state(m)]
    if quantized:
        return f"torchao_adamw_{_torchao_bits(quantized[0])}bit"
    keys = set().union(*(set(s) for s in states)) if states else set()
    if "RMS" in keys and keys & {"exp_avg_res_row", "exp_avg_res"}:
        return "came_pytorch"
    if "RMS" in keys and {"lr", "clip_threshold", "decay_rate", "relative_step"} <= set(group):
        return "transformers_adafactor"
    return None


def _bnb_kind(quant_states: list[dict], group: dict) -> str | None:
    """bitsandbytes' AdamW (two states) or Lion (one state, two betas, no momentum/alpha keys), 8- or 32-bit."""
    betas = group.get("betas")
    bits = "8bit" if any(isinstance(q.get("qmap1"), torch.Tensor) for q in quant_states) else "32bit"
    two_betas = isinstance(betas, (tuple, list)) and len(betas) == 2
    if all("state2" in q for q in quant_states) and two_betas and not group.get("alpha"):
        return f"bnb_adamw_{bits}"
    if not any("state2" in q for q in quant_states) and two_betas and not {"momentum", "alpha"} & set(group):
        return f"bnb_lion_{bits}"
    return None


def peer_refusal(kind: str, own: str) -> str:
    """Why a checkpoint of peer ``kind`` (:data:`PEERS`) cannot be resumed with our ``own``, and what to do."""
    peer = PEERS[kind]
    return (
        f"Cannot resume: the checkpoint's optimizer state is {peer.label}'s ({peer.family}), which "
        f"LowMemOptimizerCallback(optimizer={own!r}) cannot continue: a different algorithm. Resume with "
        f"optimizer={' or '.join(map(repr, peer.targets))}, or load only the weights (e.g. "
        "Module.load_from_checkpoint(path) and a new fit without ckpt_path) to switch optimizers."
    )


def _bnb_moment(quant: dict, index: int, what: str) -> torch.Tensor:
    """bitsandbytes' ``state{index}`` decoded to fp32 (its shape): codes through ``qmap{index}`` times the block's
    ``absmax{index}``; fp32 states as they are. ``ValueError`` naming the key when the pieces do not fit."""
    state = quant.get(f"state{index}")
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"Invalid bitsandbytes optimizer state for {what}: 'state{index}' is missing.")
    if state.dtype != torch.uint8:
        return state.detach().to(torch.float32).clone()
    qmap, absmax = quant.get(f"qmap{index}"), quant.get(f"absmax{index}")
    blocks = -(-state.numel() // _BNB_BLOCK)
    if not (isinstance(qmap, torch.Tensor) and qmap.numel() == 256 and isinstance(absmax, torch.Tensor)
            and absmax.numel() == blocks):
        got = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (qmap, absmax)]
        raise ValueError(
            f"Invalid bitsandbytes optimizer state for {what}: 'qmap{index}' / 'absmax{index}' have shapes "
            f"{got[0]} / {got[1]}; 8-bit codes of {state.numel()} elements need (256,) and ({blocks},) (blockwise, "
            f"{_BNB_BLOCK} elements per block)."
        )
    scale = absmax.detach().float().reshape(-1).repeat_interleave(_BNB_BLOCK)[: state.numel()]
    return (qmap.detach().float()[state.reshape(-1).long()] * scale).reshape(state.shape)


def _torchao_moment(value) -> torch.Tensor:
    """A torchao moment as a plain fp32 tensor (its own decode for the quantized subclasses)."""
    decoded = value.dequantize() if _is_torchao_state(value) else value
    return decoded.detach().to(torch.float32).clone()


def _step(value) -> torch.Tensor:
    return torch.tensor(float(value.item() if isinstance(value, torch.Tensor) else value or 0), dtype=torch.float32)


def _converted_param_state(kind: str, pid, state: dict) -> dict:
    """One param's peer state as fp32 moments under our names (``exp_avg`` [, ``exp_avg_sq``], ``step``)."""
    what = f"param {pid!r}"
    if kind.startswith("bnb_"):
        quant = state.get(_BNB_KEY) or {}
        out = {"step": _step(state.get("step")), "exp_avg": _bnb_moment(quant, 1, what)}
        if PEERS[kind].family == "adamw":
            out["exp_avg_sq"] = _bnb_moment(quant, 2, what)
        return out
    if kind.startswith("torchao_"):
        if "max_exp_avg_sq" in state:
            raise ValueError(f"Invalid torchao optimizer state for {what}: it holds 'max_exp_avg_sq' (amsgrad=True), "
                             "which our AdamW optimizers do not support.")
        return {"step": _step(state.get("step")),
                **{key: _torchao_moment(state[key]) for key in ("exp_avg", "exp_avg_sq") if key in state}}
    return dict(state)  # came-pytorch / transformers: our came / adafactor read their states as they are


@functools.cache
def _torch_adamw_defaults() -> dict:
    return dict(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults)


def _converted_group(kind: str, group: dict, target: str) -> dict:
    """A peer param group with the hyperparameters that mean the same in ``target`` (lr, betas, eps,
    weight_decay, scheduler keys) and without the peer's own; torch AdamW gets its defaults for the rest."""
    out = {k: v for k, v in group.items() if k not in _DROPPED_GROUP_KEYS.get(PEERS[kind].family, ())}
    if isinstance(out.get("lr"), torch.Tensor):  # torchao keeps lr as a tensor
        out["lr"] = float(out["lr"].item())
    if target == "adamw":
        out = {**_torch_adamw_defaults(), **out}
    return out


def converted_peer_state(state_dict: dict, kind: str, target: str) -> dict:
    """``state_dict`` of peer ``kind`` (:func:`identify_peer`) as a state dict our ``target`` loads: moments decoded
    to fp32 under our names (the target encodes them into its codes on load), step counters kept, param groups
    keeping the hyperparameters that mean the same. ``ValueError`` when ``target`` does not continue the peer's
    algorithm (:func:`peer_refusal`) or a state's pieces do not fit (naming the param and key). The input is not
    changed."""
    if kind not in PEERS:
        raise ValueError(f"Invalid kind={kind!r}: expected one of {sorted(PEERS)}.")
    if target not in PEERS[kind].targets:
        raise ValueError(peer_refusal(kind, target))
    states = {pid: _converted_param_state(kind, pid, s) if isinstance(s, dict) else s
              for pid, s in state_dict["state"].items()}
    groups = [_converted_group(kind, g, target) for g in state_dict["param_groups"]]
    return {**state_dict, "state": states, "param_groups": groups}


def conversion_note(kind: str, target: str) -> str:
    """What converting peer ``kind``'s state into ``target`` does, for the one info line."""
    peer = PEERS[kind]
    if peer.family in ("came", "adafactor"):
        return "the same statistics read as ours; step counters kept"
    codes = "8-bit codes decoded with its qmap and block scales" if kind.startswith("bnb_") and "8bit" in kind \
        else "codes decoded by torchao" if kind.startswith("torchao_") else "fp32 moments"
    held = "kept as fp32 moments" if target in ("adamw", "lion") else "encoded into our codes"
    return f"its {codes}, {held}; step counters and lr/betas/eps/weight_decay kept"
