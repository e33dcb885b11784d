"""Tiny random checkpoints written as users' directories, for the tests that load them: :func:`checkpoint_maker`."""

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
