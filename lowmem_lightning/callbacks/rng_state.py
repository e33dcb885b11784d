"""The random number generators' states in every checkpoint, put back when a fit resumes from it: a part of
:class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` and of every ``LowMemModule`` / ``CausalLMModule``.

Lightning's checkpoints hold the weights, the optimizer, the loops and (with a resumable loader) the data position,
not the generators: a model with dropout (GPT-2's, the QLoRA recipe's LoRA dropout of 0.05) drew other masks after
``--ckpt_path last`` than the uninterrupted run did at the same steps, so the resumed weights were not the
uninterrupted run's. :class:`RngStateCheckpoint` saves torch's CPU generator (and CUDA's, once CUDA is in use),
Python's ``random`` and NumPy's global generator with each checkpoint, as plain tensors, lists and numbers (a
``torch.load(weights_only=True)`` reads them), and sets them again when the resumed fit's first training batch
starts, after the model, the optimizer, the sanity check and every ``on_train_start``: where the uninterrupted run
stood when it saved (its next draw is that batch's). Every rank puts back
the saving rank's states: ranks seeded alike (``seed_everything``) and drawing alike hold the same ones.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

__all__ = ["RngStateCheckpoint", "capture_rng_states", "restore_rng_states"]


def capture_rng_states() -> dict:
    """The generators' states: ``torch`` (the CPU generator's ``ByteTensor``), ``cuda`` (one per device, only when
    CUDA is initialized), ``python`` (``random.getstate()`` as lists) and ``numpy`` (``np.random.get_state()``, its
    key as a list of ints)."""
    version, internal, gauss = random.getstate()
    kind, key, position, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
              "numpy": [kind, key.tolist(), int(position), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Set the generators to ``states`` (:func:`capture_rng_states`); CUDA's only when this process has CUDA
    initialized with as many devices as were saved (a checkpoint of a GPU run resumed on the CPU sets the others)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), position, has_gauss, cached))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RngStateCheckpoint(L.Callback):
    """Save the generators' states with each checkpoint and set them again at the first training batch of a fit
    resumed from it (see the module doc). A checkpoint without them (written before this callback existed) changes
    nothing."""

    def __init__(self) -> None:
        self._pending: dict | None = None  # states read from the checkpoint, set at on_train_start

    def state_dict(self) -> dict:
        """The states now (Lightning asks when it writes a checkpoint)."""
        return capture_rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep the checkpoint's states until the resumed fit's first training batch."""
        self._pending = dict(state_dict) if "torch" in state_dict else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        """Set the checkpoint's states (once), where the saving run stood."""
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None
