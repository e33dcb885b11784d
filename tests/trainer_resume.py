"""What a Hugging Face ``Trainer`` (or a TRL trainer, its subclass) resumed from a checkpoint started from, for the
resume tests of ``test_hf_trainer.py`` and ``test_field_trl.py``."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback


class OptimizerStateAtStart(TrainerCallback):
    """The optimizer's state when training starts (after a resume has loaded ``optimizer.pt``), copied."""

    state: dict | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        saved = optimizer.state_dict()["state"]
        self.state = {pid: {key: value.clone() for key, value in s.items()} for pid, s in saved.items()}


def assert_started_from(start: OptimizerStateAtStart, checkpoint: Path) -> dict:
    """Asserts that the resumed run ``start`` watched began with the optimizer state saved in ``checkpoint``
    (``optimizer.pt``), tensor for tensor; returns that saved state dict."""
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert start.state is not None and start.state.keys() == saved["state"].keys()
    for pid, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(start.state[pid][key], value), (pid, key)
    return saved
