"""Loading a state dict without a memory spike (what :meth:`LowMemOptimizer.load_state_dict` uses).

Two copies used to be made of every state tensor during a load: a ``copy.deepcopy`` of the whole
state dict, and torch's ``Optimizer.load_state_dict`` casting every state tensor to the param's
dtype (8-bit codes became fp32 tensors, four times their size, cast back afterwards). Now:

* :func:`private_copy` copies the structure of a state dict and each tensor once, except tensors
  that already are this optimizer's own state (what a ``torch.distributed.checkpoint`` load writes
  into: adopted, no copy), so the new state never coexists with a second copy of itself;
* :func:`hold` / :func:`release` pass the state through torch's ``load_state_dict`` untouched
  (wrapped in :class:`Held`, which torch's cast leaves alone) and unwrap it afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["Held", "hold", "private_copy", "release", "storage_ids"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def storage_ids(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Data pointers of the storages of ``tensors`` (DTensors: of their local shard)."""
    return {_local(t).untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def private_copy(obj, own: set[int]):
    """``obj`` (a state dict or any part of one) with its dicts, lists and tuples copied and each tensor
    cloned, except tensors whose storage is in ``own`` (:func:`storage_ids` of the optimizer's state), which
    are kept as they are. Other values are shared (they are immutable in practice: numbers, strings)."""
    if isinstance(obj, torch.Tensor):
        if _local(obj).untyped_storage().data_ptr() in own:
            return obj
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {key: private_copy(value, own) for key, value in obj.items()}
    if isinstance(obj, list):
        return [private_copy(value, own) for value in obj]
    if isinstance(obj, tuple):
        return tuple(private_copy(value, own) for value in obj)
    return obj


class Held:
    """A state tensor wrapped so torch's ``Optimizer.load_state_dict`` stores it as it is (torch casts
    tensors and recurses into dicts and iterables; this is neither)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def hold(states: dict) -> dict:
    """``{param id: {key: value}}`` with every tensor value wrapped in :class:`Held`."""
    return {pid: {key: Held(value) if isinstance(value, torch.Tensor) else value for key, value in state.items()}
            for pid, state in states.items()}


def release(states: dict) -> None:
    """Unwrap, in place, the :class:`Held` values of an optimizer's ``state`` (``{param: {key: value}}``)."""
    for state in states.values():
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(value, Held):
                    state[key] = value.tensor
