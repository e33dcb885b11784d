"""Tiny random checkpoints written as users' directories, for the tests that load them (:func:`checkpoint_maker`), and
the comparison of what Lightning checkpoints hold (:func:`same_contents`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def checkpoint_maker(root: Path, build: Callable[[str], nn.Module],
                     finish: Callable[[str, Path], None] | None = None) -> Callable[[str], Path]:
    """``make(name) -> directory``: the model ``build(name)`` returns (seeded with 0 first), written by
    ``save_pretrained`` in shards of 100 KB into ``root / name`` on the first call for that name, then ``finish(name,
    directory)`` when given (a tokenizer, a stored layout); later calls return the same directory."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            model = build(name)
            made[name] = root / name
            model.save_pretrained(made[name], max_shard_size="100KB")
            if finish is not None:
                finish(name, made[name])
        return made[name]

    return make


def same_contents(a, b) -> bool:
    """Whether ``a`` and ``b`` (a checkpoint's ``state_dict`` or ``optimizer_states``: dicts, lists and tuples of
    tensors and plain values) hold the same keys and bit-equal tensors."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_contents(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_contents(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
