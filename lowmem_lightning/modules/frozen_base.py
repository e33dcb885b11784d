"""Checkpoints that leave out the frozen base (``CausalLMModule(checkpoint_frozen=False)``).

A LoRA or QLoRA run on a pretrained checkpoint trains adapters of a few MB to a few hundred MB, yet Lightning's
checkpoint holds the module's whole ``state_dict``: a Llama-2-7B QLoRA writes its 3.9 GB NF4 base at every save. The
base is rebuilt, bit for bit, from ``model_name_or_path`` whenever the run's model is built (resume, ``lowmem
export``, ``load_from_checkpoint``), so a checkpoint can hold what trains alone.

What makes it safe: the build records a checksum of every frozen tensor (:func:`tensor_digests`: its bytes summed as
integers, its size and dtype). A save leaves out the frozen tensors whose checksum is still the build's
(:func:`drop_unchanged`): one a callback changed after the build (trained, then frozen) stays in the checkpoint. The
checkpoint records the checksums of what it left out (:data:`FROZEN_BASE_KEY`); a load rebuilds them and compares
(:func:`restore_dropped`), so a checkpoint resumed on another base (another directory, another Hub revision) is
refused, naming a tensor that differs, instead of training on a base it never saw.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["FROZEN_BASE_KEY", "tensor_digests", "drop_unchanged", "restore_dropped"]

FROZEN_BASE_KEY = "lowmem_frozen_base"
"""Checkpoint key of a checkpoint whose ``state_dict`` leaves out frozen tensors: ``{"model_name_or_path": ...,
"tensors": {state_dict key: [integer sum, numel, dtype name]}}``."""

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


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int, str]]:
    """``{name: (integer sum of its bytes, numel, dtype name)}`` of each real (not meta) tensor: one host sync per
    device."""
    real = {name: t for name, t in tensors.items() if t.device.type != "meta"}
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in real.items():
        by_device.setdefault(tensor.device, []).append(name)
    digests = {}
    for names in by_device.values():
        sums = torch.stack([_checksum(real[name]) for name in names]).tolist()
        digests.update({name: (s, real[name].numel(), str(real[name].dtype).removeprefix("torch."))
                        for name, s in zip(names, sums)})
    return digests


def drop_unchanged(state: dict[str, torch.Tensor], trainable: set[str],
                   baseline: Mapping[str, tuple[int, int, str]]) -> dict[str, tuple[int, int, str]]:
    """Remove from ``state`` (a checkpoint's ``state_dict``, in place) the tensors not in ``trainable`` whose digest
    equals the build's (``baseline``); returns the digests of those removed."""
    candidates = {k: v for k, v in state.items() if k not in trainable and k in baseline}
    now = tensor_digests(candidates)
    dropped = {k: d for k, d in now.items() if d == tuple(baseline[k])}
    for key in dropped:
        del state[key]
    return dropped


def restore_dropped(state: Mapping[str, torch.Tensor], record: Mapping, built: Mapping[str, torch.Tensor],
                    model_name_or_path) -> dict[str, torch.Tensor]:
    """``state`` with the tensors a checkpoint left out (``record``: its :data:`FROZEN_BASE_KEY` entry) taken from
    ``built`` (the state dict of the model this run built from ``model_name_or_path``). ``ValueError`` when one is
    missing there or its digest differs from the one recorded: the base is not the one the checkpoint trained on."""
    recorded = {k: tuple(v) for k, v in record.get("tensors", {}).items() if k not in state}
    missing = sorted(k for k in recorded if k not in built)
    rebuilt = tensor_digests({k: built[k] for k in recorded if k in built})
    differ = missing + sorted(k for k, d in rebuilt.items() if d != recorded[k])
    if differ:
        raise ValueError(
            f"Invalid checkpoint: it holds the trained weights only (checkpoint_frozen=False), and the frozen base "
            f"this run built from model_name_or_path={model_name_or_path!r} is not the one it trained on (from "
            f"{record.get('model_name_or_path')!r}): {len(differ)} of its {len(recorded)} frozen tensors differ, e.g. "
            f"{differ[0]!r}. Resume, export or load it with the base checkpoint it was trained on.")
    return {**{k: built[k] for k in recorded}, **state}
