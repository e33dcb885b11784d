"""Checkpoints written atomically: a complete file under its final name, or none at all.

Lightning's :class:`~lightning.fabric.plugins.io.torch_io.TorchCheckpointIO` serializes the whole
checkpoint into memory, then writes it through an fsspec transaction whose temporary file lives in the
system temp directory; committing it is a cross-filesystem copy onto the final name. A full or read-only
checkpoint directory therefore leaves a truncated ``epoch=0-step=N.ckpt`` (which a later
``--ckpt_path last`` would pick) and a raw traceback.

:class:`AtomicCheckpointIO` streams ``torch.save`` into a temporary file *in the checkpoint's own
directory* (``.<name>.tmp-<pid>-<random>``, never matching ``*.ckpt``), fsyncs it, ``os.replace``-s it
onto the final name (atomic within one filesystem, whatever the filesystem) and fsyncs the directory, so
the name holds either the previous complete file or the new complete file. On any failure the temporary
file is removed; an ``OSError`` (disk full, quota, read-only, no permission, ...) becomes one
:class:`CheckpointWriteError` naming the path and the cause. Remote paths (``s3://`` ...) are left to
Lightning's object-store upload, which is atomic per object.

:func:`use_atomic_checkpoint_io` installs it on a Trainer whose strategy still uses Lightning's default
``TorchCheckpointIO`` (the lowmem CLI and :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` do);
a CheckpointIO the user chose is kept. Everything saved through ``trainer.save_checkpoint`` goes through
it: ``ModelCheckpoint`` files, ``last.ckpt`` and the SIGTERM checkpoint of
:func:`~lowmem_lightning.callbacks.preemption.save_on_sigterm`. Sharded saves of ``ModelParallelStrategy``
(``save_distributed_checkpoint=True``, ``torch.distributed.checkpoint``) and DeepSpeed do not use a
CheckpointIO (see the module notes in the report of issue 25).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "atomic_torch_save", "atomic_write",
           "use_atomic_checkpoint_io"]

_REASONS = {
    errno.ENOSPC: "the file system is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for the file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the directory is not writable)",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "a directory of that name exists",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


class CheckpointWriteError(OSError):
    """A checkpoint (or another file written atomically) could not be written; ``path`` names it.

    Raised by :func:`atomic_write` for any ``OSError`` met while creating the directory, writing, syncing or
    renaming (``errno`` keeps the cause: ``ENOSPC``, ``EROFS``, ``EACCES``, ...). When it is raised nothing
    was written under ``path`` (a file already there is unchanged) and no temporary file is left. It is an
    ``OSError``, so code that catches ``OSError`` still catches it; the ``lowmem`` CLI ends with exit code 2.
    """

    def __init__(self, path: str, code: int | None, detail: str = "", what: str = "checkpoint"):
        self.path, self.detail, self.what = str(path), detail, what
        reason = _REASONS.get(code, detail or "an I/O error")
        name = errno.errorcode.get(code, "") if code is not None else ""
        folder = os.path.dirname(os.path.abspath(self.path))
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = f"free space in {folder} or save elsewhere"
        elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
            hint = f"make {folder} writable or save elsewhere"
        else:
            hint = f"check {folder} or save elsewhere"
        self.message = (
            f"Could not write the {what} {self.path}: {reason}{f' [{name}]' if name else ''}. Nothing was written "
            f"under that name (a file already there is unchanged) and no temporary file is left; {hint}."
        )
        super().__init__(code, self.message, self.path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.path, self.errno, self.detail, self.what)


def _os_error_in(err: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno in ``err``'s chain (torch.save reports a failed write of its file
    object as a ``RuntimeError`` whose context is the ``OSError``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
    return None


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable; best effort (some file systems cannot fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str = "checkpoint") -> None:
    """Write a file so that ``path`` holds either its previous content or the complete new content.

    ``write(f)`` writes the bytes into ``f``, a binary file opened on a temporary file in ``path``'s own
    directory (created if missing); it is then flushed, fsynced, renamed onto ``path`` with ``os.replace``
    and the directory fsynced. On any exception the temporary file is removed; an ``OSError`` (also one
    found in the exception's chain) becomes a :class:`CheckpointWriteError` naming ``path`` (``what`` names
    the kind of file in its message); other exceptions propagate unchanged.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error_in(err)
        if cause is None:
            raise
        raise CheckpointWriteError(path, cause.errno, cause.strerror or str(cause), what) from None
    _fsync_dir(folder)


def atomic_torch_save(obj: Any, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write` (streamed to the file: no copy in memory)."""
    atomic_write(path, lambda f: torch.save(obj, f), what)


def _is_local(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local saves (:func:`atomic_torch_save`).

    Loading and removing are Lightning's. A local checkpoint is complete under its final name or absent,
    on any file system; a failed write raises :class:`CheckpointWriteError` naming the path and leaves the
    previous checkpoints intact. Remote URLs are saved by ``TorchCheckpointIO`` (object stores commit an
    upload atomically). Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])`` or let
    :func:`use_atomic_checkpoint_io` install it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (local paths); ``storage_options`` is refused as in Lightning."""
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        text = os.fspath(path)
        atomic_torch_save(checkpoint, text[len("file://"):] if text.startswith("file://") else text)
        return None


def use_atomic_checkpoint_io(trainer: Any) -> bool:
    """Make ``trainer``'s strategy save through :class:`AtomicCheckpointIO` when it uses Lightning's default
    ``TorchCheckpointIO`` (exactly that class); returns whether an :class:`AtomicCheckpointIO` is in use.

    A CheckpointIO the user passed (``Trainer(plugins=[...])``, ``strategy=...(checkpoint_io=...)``, another
    class, a wrapper such as ``AsyncCheckpointIO``) is kept. Uses the strategy's public ``checkpoint_io``
    setter, the one Lightning's own connector uses for ``plugins``; call it before ``fit`` saves or loads
    anything (at Trainer construction or in a callback's ``setup``)."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, AtomicCheckpointIO):
        return True
    if type(current) is not TorchCheckpointIO:
        return False
    strategy.checkpoint_io = AtomicCheckpointIO()
    return True
