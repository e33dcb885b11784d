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
:func:`~lowmem_lightning.callbacks.preemption.save_on_sigterm`.

Sharded saves of ``ModelParallelStrategy`` (``save_distributed_checkpoint=True``: every rank writes its shards
through ``torch.distributed.checkpoint`` into a directory) bypass the CheckpointIO and write straight into the
final directory, over an existing one. :class:`AtomicModelParallelStrategy` saves them through
:func:`atomic_sharded_save` instead: the ranks write into a temporary directory next to the final one, then
rank 0 fsyncs it and swaps it in (the old checkpoint renamed aside, the new one renamed onto the final name, the
old one removed), so a half-written checkpoint never carries the final name and the previous one is kept until
the new one is complete. The ``lowmem`` CLI uses it in place of ``ModelParallelStrategy``. DeepSpeed's saves are
not covered.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import secrets
import shutil
from collections.abc import Callable
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

__all__ = ["AtomicCheckpointIO", "AtomicModelParallelStrategy", "CheckpointWriteError", "atomic_sharded_save",
           "atomic_torch_save", "atomic_write", "use_atomic_checkpoint_io"]

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
    object as a ``RuntimeError`` whose context is the ``OSError``; torch.distributed.checkpoint gathers each rank's
    exception into a ``CheckpointException``)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        for failure in (getattr(err, "failures", None) or {}).values():  # DCP's CheckpointException, per rank
            found = _os_error_in(failure[0] if isinstance(failure, tuple) and failure else None)  # (exc, trace)
            if found is not None:
                return found
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


def _local(path: str | os.PathLike) -> str:
    """A local path without its ``file://`` prefix."""
    text = os.fspath(path)
    return text[len("file://"):] if text.startswith("file://") else text


def _repoint_links(target: str, replacement: str | None) -> None:
    """Make every symbolic link in ``target``'s folder that resolves to ``target`` point to ``replacement`` instead
    (a relative link, swapped in with ``os.replace``: the name always exists), or remove it when ``replacement`` is
    ``None``, missing or ``target`` itself. Best effort: a link that cannot be changed is left as it was."""
    folder = os.path.dirname(target)
    real = os.path.realpath(target)
    usable = replacement is not None and os.path.isfile(replacement) and os.path.realpath(replacement) != real
    links: list[str] = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        links = [e.path for e in entries if e.is_symlink() and os.path.realpath(e.path) == real]
    for link in links:
        with contextlib.suppress(OSError):
            if not usable:
                os.unlink(link)
                continue
            tmp = os.path.join(folder, f".{os.path.basename(link)}.tmp-link-{secrets.token_hex(4)}")
            os.symlink(os.path.relpath(replacement, folder), tmp)
            try:
                os.replace(tmp, link)
            except OSError:
                os.unlink(tmp)
                raise
    if links:
        _fsync_dir(folder)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local saves (:func:`atomic_torch_save`).

    Loading and removing are Lightning's. A local checkpoint is complete under its final name or absent,
    on any file system; a failed write raises :class:`CheckpointWriteError` naming the path and leaves the
    previous checkpoints intact. Remote URLs are saved by ``TorchCheckpointIO`` (object stores commit an
    upload atomically). Pass it as ``Trainer(plugins=[AtomicCheckpointIO()])`` or let
    :func:`use_atomic_checkpoint_io` install it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._newest: dict[str, str] = {}  # folder -> the last checkpoint this IO saved there (absolute path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (local paths); ``storage_options`` is refused as in Lightning.
        A symbolic link at ``path`` (``ModelCheckpoint(save_last="link")``'s ``last.ckpt``) is replaced by the new
        file; the checkpoint it pointed to is left unchanged (a write through the link would overwrite it)."""
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = _local(path)
        atomic_torch_save(checkpoint, local)
        self._newest[os.path.dirname(os.path.abspath(local))] = os.path.abspath(local)
        return None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Lightning's load (onto the CPU, as saved); a checkpoint holding tensor subclasses (torchao's quantized
        optimizer states), which torch cannot map with Lightning's callable ``map_location``, is read with
        ``map_location="cpu"``. One whose classes need torchao where it is not installed is refused naming it."""
        kwargs = {} if map_location is None else {"map_location": map_location}
        try:
            try:
                return super().load_checkpoint(path, weights_only=weights_only, **kwargs)
            except RuntimeError as err:
                if "Callable map_location not supported" not in str(err):
                    raise
                return super().load_checkpoint(path, map_location="cpu", weights_only=weights_only)
        except (ModuleNotFoundError, pickle.UnpicklingError) as err:
            missing = str(getattr(err, "name", None) or "").startswith("torchao") or "GLOBAL torchao." in str(err)
            if not missing:
                raise
            raise ModuleNotFoundError(
                f"Cannot load {path}: its optimizer state holds torchao's quantized tensors (torchao.optim "
                "AdamW8bit / AdamW4bit), which only torchao can unpickle, and torchao is not installed. Install it "
                "(pip install torchao); LowMemOptimizerCallback then converts them into its own optimizer's state.",
                name="torchao",
            ) from err

    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path`` (Lightning's removal); a symbolic link beside it that points to it (``last.ckpt`` of
        ``ModelCheckpoint(save_last="link")``, which removes the old top-k file before it re-links) is first
        re-pointed, atomically, to the newest checkpoint this IO saved in that folder, or removed when there is
        none: a kill between the removal and Lightning's re-link leaves no dangling ``last.ckpt``."""
        if _is_local(path):
            local = os.path.abspath(_local(path))
            _repoint_links(local, self._newest.get(os.path.dirname(local)))
        super().remove_checkpoint(path)


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



def _fsync_tree(folder: str) -> None:
    """fsync every file and directory under ``folder`` (the shards are complete on disk before the rename)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _swap_in(tmp: str, path: str, token: str) -> None:
    """Rename the complete ``tmp`` onto ``path``; an existing ``path`` is renamed aside first and removed last."""
    folder, name = os.path.dirname(path), os.path.basename(path)
    old = os.path.join(folder, f".{name}.old-{token}")
    had_old = os.path.lexists(path)
    if had_old:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if had_old:
            os.replace(old, path)  # put the previous checkpoint back under its name
        raise
    _fsync_dir(folder)
    if had_old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(old)


def atomic_sharded_save(strategy: Any, save: Callable[[dict, str], None], checkpoint: dict, filepath: Any) -> None:
    """Run ``save(checkpoint, tmp)`` on every rank of ``strategy`` into a temporary directory next to ``filepath``,
    then on rank 0 fsync it and swap it in for ``filepath`` (:func:`_swap_in`); every rank waits for the swap.

    ``save`` writes the whole checkpoint under the path it is given (for ``ModelParallelStrategy``, its own
    ``save_checkpoint``: each rank's shards through ``torch.distributed.checkpoint`` plus rank 0's metadata
    file). The temporary name (``.<name>.tmp-<token>``, one token for all ranks) never matches ``*.ckpt``. The ranks
    vote after writing, so a failure on any rank (or in rank 0's swap) ends the save on every rank, none left
    waiting: rank 0 removes the temporary directory, ``filepath`` keeps the previous checkpoint, and an ``OSError``
    (also inside the exception's chain; on the ranks that wrote their part, "another rank could not write") becomes
    a :class:`CheckpointWriteError` naming ``filepath``; other exceptions propagate on the rank that raised them."""
    path = os.path.abspath(os.fspath(strategy.broadcast(os.fspath(filepath))))
    token = strategy.broadcast(secrets.token_hex(4))
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{token}")
    rank_zero = strategy.global_rank == 0
    error = _attempt(lambda: save(checkpoint, tmp))
    if strategy.reduce_boolean_decision(error is None, all=True):  # every rank wrote its part
        error = _attempt(lambda: (_fsync_tree(tmp), _swap_in(tmp, path, token))) if rank_zero else None
        failed = strategy.broadcast(error is not None)
    else:
        failed = True
    if not failed:
        return
    if rank_zero:
        shutil.rmtree(tmp, ignore_errors=True)
    cause = _os_error_in(error) if error is not None else None
    if error is not None and cause is None:
        raise error
    code, detail = (cause.errno, cause.strerror or str(cause)) if cause else (None, "another rank could not write")
    raise CheckpointWriteError(path, code, detail, "sharded checkpoint") from None


def _attempt(action: Callable[[], Any]) -> BaseException | None:
    """Run ``action``; the exception it raised (``None`` when it returned), so every rank reaches the vote."""
    try:
        action()
    except BaseException as err:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; re-raised after the vote
        return err
    return None


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel) whose sharded checkpoints
    (``save_distributed_checkpoint=True``) are written atomically by :func:`atomic_sharded_save`. Takes
    ``ModelParallelStrategy``'s arguments; single-file saves go through its CheckpointIO
    (:func:`use_atomic_checkpoint_io` makes that an :class:`AtomicCheckpointIO`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Save like ``ModelParallelStrategy``; a sharded checkpoint complete under its final name or not there."""
        if storage_options is not None or not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        atomic_sharded_save(self, super().save_checkpoint, checkpoint, filepath)
        return None
