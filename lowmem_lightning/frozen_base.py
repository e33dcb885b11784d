"""Checkpoints that leave out the frozen base: ``CausalLMModule(checkpoint_frozen=False)`` and, for any
LightningModule, ``LowMemOptimizerCallback(checkpoint_frozen=False)``.

A LoRA or QLoRA run on a pretrained checkpoint trains adapters of a few MB to a few hundred MB, yet Lightning's
checkpoint holds the module's whole ``state_dict``: a Llama-2-7B QLoRA writes its 3.9 GB NF4 base at every save. The
base is rebuilt, bit for bit, whenever the run's module is built (from ``model_name_or_path``, or by the user's own
``__init__`` / ``configure_model``), so a checkpoint can hold what trains alone.

What makes it safe: the build records a checksum of every frozen tensor (:func:`tensor_digests`: its bytes summed as
integers, its size and dtype). A save leaves out the frozen tensors whose checksum is still the build's
(:func:`drop_unchanged`): one a callback changed after the build (trained, then frozen) stays in the checkpoint. The
checkpoint records the checksums of what it left out (:data:`FROZEN_BASE_KEY`); a load rebuilds them and compares
(:func:`differing`, :func:`restore_dropped`), so a checkpoint resumed on another base (another directory, another Hub
revision, a module that builds its frozen part at random) is refused, naming a tensor, instead of training on a base
it never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["AVERAGE_MODEL_STATE_KEY", "FROZEN_BASE_KEY", "MODEL_STATE_KEYS", "differing", "drop_unchanged",
           "model_states", "restore_dropped", "tensor_digests"]

FROZEN_BASE_KEY = "lowmem_frozen_base"
"""Checkpoint key of a checkpoint whose ``state_dict`` leaves out frozen tensors: ``{"model_name_or_path": ...,
"tensors": {state_dict key: [integer sum, numel, dtype name]}}`` (``"module"``, the module's class, instead of
``model_name_or_path`` when ``LowMemOptimizerCallback`` left them out)."""

MODEL_STATE_KEYS = ("state_dict", "current_model_state")
"""The checkpoint keys of the module's weights: its ``state_dict`` and, under a ``WeightAveraging`` callback (which
writes the average to ``state_dict``), the training weights."""

AVERAGE_MODEL_STATE_KEY = "average_model_state"
"""The key, in a callback's checkpoint state, of ``StochasticWeightAveraging``'s average: a copy of the whole module."""


def model_states(checkpoint: dict) -> list[tuple[dict, str]]:
    """``(container, key)`` of every state dict of the module's weights in ``checkpoint``: under
    :data:`MODEL_STATE_KEYS`, and each callback state's :data:`AVERAGE_MODEL_STATE_KEY`."""
    slots = [(checkpoint, key) for key in MODEL_STATE_KEYS if isinstance(checkpoint.get(key), dict)]
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and isinstance(state.get(AVERAGE_MODEL_STATE_KEY), dict):
            slots.append((state, AVERAGE_MODEL_STATE_KEY))
    return slots


_INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


_CHUNK = 1 << 22
"""Elements summed at once: torch casts a reduction's input to int64 up front, so a whole 1.3 GB bf16 embedding would
take a 5.4 GB int64 copy; a chunk takes 32 MiB."""


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 on the tensor's device: its bytes, read as integers of its element size, summed (wrapping), a chunk
    of :data:`_CHUNK` elements at a time."""
    flat = tensor.detach().contiguous().reshape(-1)
    flat = flat.view(_INTEGER_VIEWS[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), _CHUNK):
        total += flat[start:start + _CHUNK].sum(dtype=torch.int64)
    return total


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _digest_dtype(tensor: torch.Tensor, dtype_name: str | None) -> torch.dtype:
    """The floating dtype named ``dtype_name`` for a floating ``tensor``; its own dtype otherwise (``None``, or a
    non-floating dtype on either side)."""
    dtype = getattr(torch, dtype_name, None) if dtype_name else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and tensor.dtype.is_floating_point:
        return dtype
    return tensor.dtype


def tensor_digests(tensors: Mapping[str, torch.Tensor],
                   as_dtypes: Mapping[str, str] | None = None) -> dict[str, tuple[int, int, str]]:
    """``{name: (integer sum of its bytes, numel, dtype name)}`` of each real (not meta) tensor: one host sync per
    device. ``as_dtypes`` (name -> dtype name): the digest of a floating tensor cast to that floating dtype first
    (one tensor's cast at a time), as a ``precision="bf16-true"`` fit casts a module built in fp32 after a resume
    loads it."""
    as_dtypes = as_dtypes or {}
    real = {name: t for name, t in tensors.items() if t.device.type != "meta"}
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in real.items():
        by_device.setdefault(tensor.device, []).append(name)
    digests = {}
    for names in by_device.values():
        dtypes = {name: _digest_dtype(real[name], as_dtypes.get(name)) for name in names}
        sums = torch.stack([_checksum(real[name].to(dtypes[name])) for name in names]).tolist()
        digests.update({name: (s, real[name].numel(), _dtype_name(dtypes[name])) for name, s in zip(names, sums)})
    return digests


def _identity(tensor: torch.Tensor) -> tuple:
    """What makes two tensor objects the same data: device, address, dtype, shape, strides."""
    return tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())


def drop_unchanged(state: dict[str, torch.Tensor], trainable: set[str], baseline: Mapping[str, tuple[int, int, str]],
                   seen: dict | None = None) -> dict[str, tuple[int, int, str]]:
    """Remove from ``state`` (a checkpoint's ``state_dict``, in place) the tensors not in ``trainable`` whose digest
    equals the build's (``baseline``); returns the digests of those removed. ``seen``: digests by tensor identity,
    read and filled, so a tensor several state dicts of one checkpoint hold (a weight average's, sharing the frozen
    base, and the module's) is read once."""
    seen = {} if seen is None else seen
    candidates = {k: v for k, v in state.items() if k not in trainable and k in baseline}
    fresh = {k: v for k, v in candidates.items() if _identity(v) not in seen}
    for key, digest in tensor_digests(fresh).items():
        seen[_identity(fresh[key])] = digest
    now = {k: seen[_identity(v)] for k, v in candidates.items() if _identity(v) in seen}
    dropped = {k: d for k, d in now.items() if d == tuple(baseline[k])}
    for key in dropped:
        del state[key]
    return dropped


def differing(state: Mapping[str, torch.Tensor], record: Mapping, built: Mapping[str, torch.Tensor],
              checked: set[str] | None = None) -> tuple[list[str], int]:
    """The names, sorted, of the tensors a checkpoint left out (``record``: its :data:`FROZEN_BASE_KEY` entry; those
    ``state`` lacks) that ``built`` (the state dict of the module this run built) lacks or holds with another digest
    (compared in the recorded dtype: :func:`tensor_digests`), and how many were left out. ``checked``: names found
    equal already (by an earlier state dict of the same checkpoint), not read again; filled with those found equal."""
    checked = set() if checked is None else checked
    recorded = {k: tuple(v) for k, v in record.get("tensors", {}).items() if k not in state}
    missing = sorted(k for k in recorded if k not in built)
    present = [k for k in recorded if k in built and k not in checked]
    rebuilt = tensor_digests({k: built[k] for k in present}, {k: recorded[k][2] for k in present})
    differ = sorted(k for k, d in rebuilt.items() if d != recorded[k])
    checked.update(k for k in rebuilt if k not in differ)
    return missing + differ, len(recorded)


def restore_dropped(state: Mapping[str, torch.Tensor], record: Mapping, built: Mapping[str, torch.Tensor],
                    refusal: Callable[[list[str], int], str],
                    checked: set[str] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with the tensors a checkpoint left out (``record``: its :data:`FROZEN_BASE_KEY` entry) taken from
    ``built`` (the state dict of the module this run built). ``ValueError`` with ``refusal(differing names, how many
    were left out)`` when one is missing there or its digest differs from the one recorded (:func:`differing`): the
    base is not the one the checkpoint trained on. ``checked``: as :func:`differing`'s, one set for the state dicts
    of one checkpoint (the module's, a weight average's), so the base is read once."""
    differ, left_out = differing(state, record, built, checked)
    if differ:
        raise ValueError(refusal(differ, left_out))
    return {**{k: built[k] for k in record.get("tensors", {}) if k not in state}, **state}
