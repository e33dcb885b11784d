"""A run's logger version directory claimed atomically, so that runs started together never share one.

Lightning's ``CSVLogger`` / ``TensorBoardLogger`` pick ``version_N`` as one more than the highest
``version_*`` folder that exists when the version is first asked for, and create the folder only when
they first write: two ``lowmem fit`` started together on one config both pick ``version_0`` and write
every metrics row, the plot, the config and the checkpoints into it. Here the version is claimed with
``os.mkdir`` (atomic: exactly one process creates a given folder), trying the next number while the
folder exists, and the logger is given the number claimed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lowmem_lightning.cli.messages import say

__all__ = ["claim_version_dir", "claim_version_dirs"]

MAX_TRIES = 1000
"""How many consecutive version numbers a claim tries before giving up (an error naming the folder)."""


def _claimable(logger: Any) -> bool:
    """A logger that numbers its runs ``version_N`` under a local ``root_dir`` and has no version chosen yet."""
    root = getattr(logger, "root_dir", None)
    return (getattr(logger, "_version", 0) is None and callable(getattr(logger, "_get_next_version", None))
            and isinstance(root, str) and "://" not in root)  # a remote folder is left to the logger


def claim_version_dir(logger: Any) -> tuple[Path, Path] | None:
    """Claim a fresh ``version_N`` folder for ``logger`` (see the module docstring) and give the logger
    that version; returns ``(version folder, outermost folder this created)``, or ``None`` when the
    logger has its version already (given by the user) or does not number versions."""
    if not _claimable(logger):
        return None
    root = Path(logger.root_dir).expanduser().absolute()
    outermost = root
    while not outermost.parent.exists() and outermost.parent != outermost:
        outermost = outermost.parent
    root_existed = root.exists()
    root.mkdir(parents=True, exist_ok=True)
    version = first = logger._get_next_version()
    for _ in range(MAX_TRIES):
        folder = root / f"version_{version}"
        try:
            os.mkdir(folder)
        except FileExistsError:
            version += 1
            continue
        logger._version = version
        if version != first:
            say(f"lowmem: {root / f'version_{first}'} was created by another run meanwhile; this run logs to "
                f"{folder}.")
        return folder, (outermost if not root_existed else folder)
    raise RuntimeError(f"Could not claim a new version folder under {root}: version_{version - MAX_TRIES} to "
                       f"version_{version - 1} all exist.")


def claim_version_dirs(trainer: Any) -> list[tuple[Path, Path]]:
    """:func:`claim_version_dir` for each of ``trainer``'s loggers, on the process of global rank 0 only
    (under DDP the other ranks log nothing, and Lightning broadcasts rank 0's folders to them)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    claimed = [claim_version_dir(logger) for logger in trainer.loggers]
    return [c for c in claimed if c is not None]
