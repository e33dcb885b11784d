"""An on-disk cache of tokenized data: ``TextDataModule`` tokenizes a dataset once and later starts (a resume, ``lowmem
validate/test/predict``, every DDP rank) memory-map the arrays instead of reading and tokenizing the files again.

One cache file per key, ``KEY.tokens`` in the cache directory (:func:`cache_directory`); the key (:func:`cache_key`)
is the SHA-256 of everything that decides the tokens and blocks, with :data:`FORMAT_VERSION` and the versions of the
tokenizing libraries. Layout: the magic bytes :data:`MAGIC`, the header's length (8 bytes, little endian) and SHA-256
(32 bytes), the header (JSON: the key, the caller's ``meta``, and each array's dtype, shape, offset and SHA-256), then
the arrays, each at a 64-byte aligned offset. :func:`read_cache` checks the magic, the header's checksum, the key, the
file's size and every array's checksum before it returns anything, and maps the arrays copy-on-write (``np.memmap``
mode ``"c"``: processes reading the same file share its pages). :func:`write_cache` writes a temporary file in the
same directory and moves it into place with ``os.replace`` (a reader sees the old file or the whole new one; two
writers of one key leave one whole file), after ``fsync``. :func:`key_lock` makes other processes building the same
key wait for the one building it.

The cache stays bounded: before a file is written, :func:`eviction_plan` picks the least recently used files of other
keys (``read_cache`` marks a file used) to remove so that the directory's cache files, the new one included, hold at
most ``limit_bytes`` (``TextDataModule(cache_limit_gb=...)``, default :data:`CACHE_LIMIT_GB`); a file larger than
the limit alone is not written. :func:`disk_shortfall` keeps a cache file from taking the room checkpoints need: one
is written only while at least :data:`KEEP_FREE_BYTES` and :data:`KEEP_FREE_FRACTION` of the disk stay free.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "MAGIC", "CACHE_AFTER_S", "CACHE_MIN_BYTES", "STALE_TEMPORARY_S", "CACHE_LIMIT_GB",
           "KEEP_FREE_BYTES", "KEEP_FREE_FRACTION", "TOKENIZING_LIBRARIES", "PIPELINE_MODULES", "CacheDamaged",
           "cache_directory", "library_versions", "pipeline_source_hash", "cache_key", "cache_path", "worth_caching",
           "file_size", "cache_files", "eviction_plan", "disk_shortfall", "write_cache", "read_cache", "key_lock"]

FORMAT_VERSION = 1
"""Version of the cache's layout and of how records become tokens: a change of either bumps it (old files are then
never read: their key differs). The key also holds a hash of the pipeline's source (:func:`pipeline_source_hash`), so
an edit that forgets the bump still misses."""

MAGIC = b"LMTOKEN1"
"""The first 8 bytes of a cache file."""

CACHE_AFTER_S = 3.0
"""Seconds of reading and tokenizing from which the result is cached (the threshold of the progress line)."""

CACHE_MIN_BYTES = 8 * 2**20
"""Bytes of data files from which the result is cached however fast it was built (8 MiB)."""

STALE_TEMPORARY_S = 600.0
"""A temporary cache file of a key not written to for this many seconds is left from a killed writer (a preempted
job) and is removed by the next :func:`write_cache` of that key."""

CACHE_LIMIT_GB = 20.0
"""Default ``TextDataModule(cache_limit_gb=...)``: the GiB the cache directory's files may hold in all (~7 bytes per
token kept: about 3 billion tokens)."""

KEEP_FREE_BYTES = 2 * 2**30
"""Bytes of its disk a cache file never takes: it is not written when less would stay free (2 GiB)."""

KEEP_FREE_FRACTION = 0.05
"""Fraction of its disk a cache file never takes (the larger of this and :data:`KEEP_FREE_BYTES` stays free)."""

_ALIGN = 64
_PREFIX = len(MAGIC) + 8 + 32
_CACHE_FILE = re.compile(r"[0-9a-f]{64}\.tokens")
_TEMPORARY_FILE = re.compile(r"\.[0-9a-f]{64}\.tokens\..+\.tmp")


class CacheDamaged(Exception):
    """A cache file that cannot be trusted (truncated, corrupted, another key or format); the message says why."""


def cache_directory(setting: str | Path | bool | None) -> Path | None:
    """The directory ``cache_dir=setting`` names: ``False`` turns the cache off (``None`` returned); ``None`` (or
    ``True``) is the default, ``$LOWMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmem_lightning/tokens``, else
    ``~/.cache/lowmem_lightning/tokens``; a path is that directory (``~`` expanded). ``TypeError`` naming the value
    otherwise."""
    if setting is False:
        return None
    if setting is None or setting is True:
        if os.environ.get("LOWMEM_CACHE_DIR"):
            return Path(os.environ["LOWMEM_CACHE_DIR"]).expanduser()
        base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
        return Path(base).expanduser() / "lowmem_lightning" / "tokens"
    if isinstance(setting, (str, Path)) and str(setting):
        return Path(setting).expanduser()
    raise TypeError(f"Invalid cache_dir={setting!r}: expected a directory path, None (the default location: "
                    "$LOWMEM_CACHE_DIR, $XDG_CACHE_HOME/lowmem_lightning/tokens or ~/.cache/lowmem_lightning/tokens) "
                    "or False (no cache).")


TOKENIZING_LIBRARIES = ("transformers", "tokenizers", "sentencepiece", "jinja2")
"""Libraries whose version may change the tokens of the same text (tokenizers, chat template rendering)."""


def library_versions() -> dict[str, str | None]:
    """The installed version of each of :data:`TOKENIZING_LIBRARIES` (``None``: not installed)."""
    from importlib import metadata

    versions = {}
    for name in TOKENIZING_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


PIPELINE_MODULES = ("text", "reading", "documents", "encoding", "blocks", "tokens", "tokenizer", "chat", "overflow",
                    "formats", "token_cache")
"""The modules of ``lowmem_lightning.data`` whose code turns records into tokens and blocks (or lays out the cache).
Not in it: ``loader`` and ``distributed`` (the order blocks are read in), ``prompts`` (predict's prompts, made after
the cache is loaded), ``fingerprint`` (its fingerprints are in the key)."""


@functools.cache
def pipeline_source_hash() -> str:
    """The hex SHA-256 of the source files of :data:`PIPELINE_MODULES`: any edit of how records become tokens (a
    fix, an upgrade of this package) changes the key, so a cache built by other code is never read, whether or not
    :data:`FORMAT_VERSION` was bumped."""
    digest = hashlib.sha256()
    for name in PIPELINE_MODULES:
        digest.update(name.encode("utf-8") + b"\0" + (Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    """The hex SHA-256 of ``parts`` (JSON-serializable: fingerprints and settings), :data:`FORMAT_VERSION`, the
    :func:`library_versions` and the :func:`pipeline_source_hash`."""
    text = json.dumps({"format": FORMAT_VERSION, "libraries": library_versions(), "code": pipeline_source_hash(),
                       **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_path(directory: Path, key: str) -> Path:
    """The cache file of ``key`` in ``directory``."""
    return directory / f"{key}.tokens"


def worth_caching(seconds: float, data_bytes: int) -> bool:
    """Whether a build that took ``seconds`` from ``data_bytes`` of files is cached: :data:`CACHE_AFTER_S` or more,
    or :data:`CACHE_MIN_BYTES` or more (small data, such as the shipped sample, is rebuilt: nothing written)."""
    return seconds >= CACHE_AFTER_S or data_bytes >= CACHE_MIN_BYTES


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _layout(arrays: dict[str, np.ndarray], sums: dict[str, str], start: int) -> dict[str, dict]:
    """Each array's dtype, shape, offset (from ``start``, 64-byte aligned) and SHA-256 (``sums``)."""
    table, offset = {}, _aligned(start)
    for name, array in arrays.items():
        table[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset, "sha256": sums[name]}
        offset = _aligned(offset + array.nbytes)
    return table


def _header(key: str, meta: dict, arrays: dict[str, np.ndarray], sums: dict[str, str]) -> bytes:
    """The JSON header (``sums``: each array's hex SHA-256); its own length decides where the arrays start, so it is
    laid out until that is stable."""
    start = _PREFIX
    while True:
        text = json.dumps({"key": key, "meta": meta, "arrays": _layout(arrays, sums, start)},
                          sort_keys=True).encode()
        if _aligned(_PREFIX + len(text)) == _aligned(start):
            return text
        start = _PREFIX + len(text)


def _size(header: bytes, arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the cache file made of ``header`` and ``arrays``: the end of its last array."""
    ends = [entry["offset"] + arrays[name].nbytes for name, entry in json.loads(header)["arrays"].items()]
    return max([_PREFIX + len(header), *ends])


def file_size(key: str, meta: dict, arrays: dict[str, np.ndarray]) -> int:
    """Bytes :func:`write_cache` would write for these arguments, found without hashing the arrays (a SHA-256 is
    always 64 hex digits, so the layout does not depend on the sums)."""
    return _size(_header(key, meta, arrays, dict.fromkeys(arrays, "0" * 64)), arrays)


def cache_files(directory: Path) -> list[tuple[Path, int, float]]:
    """``(path, bytes, last used)`` of the cache files in ``directory`` (``KEY.tokens``: nothing else a user keeps
    there), the least recently used first (their modification time: written, or marked by :func:`read_cache`);
    ``[]`` when the directory does not exist."""
    found = []
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            if _CACHE_FILE.fullmatch(path.name):
                with contextlib.suppress(OSError):  # removed meanwhile by another process
                    stat = path.stat()
                    found.append((path, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda entry: entry[2])


def eviction_plan(directory: Path, new_bytes: int, limit_bytes: int, keep: Path) -> list[tuple[Path, int]] | None:
    """The cache files of ``directory`` to remove, least recently used first, so that with a new file of
    ``new_bytes`` its cache files hold at most ``limit_bytes`` (``keep``, the new file's path, is never one of them:
    its old version is replaced); ``None`` when the new file alone is larger than the limit. Removing a file another
    process has memory-mapped is safe on POSIX: its mapping keeps the data, a later start rebuilds it."""
    if new_bytes > limit_bytes:
        return None
    others = [(path, size) for path, size, _ in cache_files(directory) if path != keep]
    held, plan = sum(size for _, size in others), []
    for path, size in others:
        if held + new_bytes <= limit_bytes:
            break
        plan.append((path, size))
        held -= size
    return plan


def disk_shortfall(directory: Path, new_bytes: int, freed_bytes: int = 0) -> tuple[int, int] | None:
    """``None`` when writing ``new_bytes`` in ``directory`` (after ``freed_bytes`` are removed there) leaves free at
    least :data:`KEEP_FREE_BYTES` and :data:`KEEP_FREE_FRACTION` of its disk; else ``(bytes free after, bytes kept
    free)``. The disk is that of ``directory``, or of its nearest existing parent; ``None`` too when it cannot be
    asked."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:  # the disk cannot be asked: the write itself then says a full disk (one warning)
        return None
    keep_free = max(KEEP_FREE_BYTES, int(KEEP_FREE_FRACTION * usage.total))
    free_after = usage.free + freed_bytes - new_bytes
    return None if free_after >= keep_free else (free_after, keep_free)


def _write_arrays(f, arrays: dict[str, np.ndarray], table: dict[str, dict]) -> None:
    """Write each array at its offset of ``table`` (zero bytes between them)."""
    for name, array in arrays.items():
        f.write(b"\0" * (table[name]["offset"] - f.tell()))
        f.write(array.data)


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove the temporary cache files in ``directory`` that no writer has touched for :data:`STALE_TEMPORARY_S`
    seconds (left by killed writers, of any key)."""
    now = time.time()
    for temporary in directory.glob(".*.tokens.*.tmp"):
        if _TEMPORARY_FILE.fullmatch(temporary.name):
            with contextlib.suppress(OSError):
                if now - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                    temporary.unlink()


def write_cache(path: Path, key: str, meta: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write ``meta`` (JSON-serializable) and ``arrays`` (C-contiguous) as the cache file ``path`` of ``key``,
    atomically (a temporary file in ``path``'s directory, fsync'd, moved into place); the file's size in bytes.
    Creates the directory; removes the temporary files killed writers left there. An ``OSError``
    (unwritable directory, full disk) leaves no temporary file behind."""
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    sums = {name: hashlib.sha256(array.data).hexdigest() for name, array in arrays.items()}
    header = _header(key, meta, arrays, sums)
    table = json.loads(header)["arrays"]
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent)
    temporary = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + hashlib.sha256(header).digest() + header)
            _write_arrays(f, arrays, table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return path.stat().st_size


def read_cache(path: Path, key: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of the cache file ``path`` of ``key``, the arrays memory-mapped copy-on-write, each checked
    against its stored size and SHA-256; ``CacheDamaged`` saying why when the file is not a whole cache of ``key``
    (``FileNotFoundError`` when there is none). A file read whole is marked used (its modification time set to now,
    where the directory allows: :func:`eviction_plan` removes the least recently used first)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX)
        if len(prefix) < _PREFIX or prefix[:len(MAGIC)] != MAGIC:
            raise CacheDamaged("not a token cache of this version (its first bytes differ)")
        length = int.from_bytes(prefix[len(MAGIC):len(MAGIC) + 8], "little")
        header = f.read(length) if length <= size else b""
    if len(header) != length or hashlib.sha256(header).digest() != prefix[len(MAGIC) + 8:]:
        raise CacheDamaged("its header is truncated or corrupted (checksum mismatch)")
    content = json.loads(header)
    if content["key"] != key:
        raise CacheDamaged("it holds another key than its name")
    arrays = {}
    for name, entry in content["arrays"].items():
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        end = entry["offset"] + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        if end > size:
            raise CacheDamaged(f"it is truncated ({size} bytes; array {name!r} ends at byte {end})")
        array = (np.memmap(path, dtype=dtype, mode="c", offset=entry["offset"], shape=shape) if end > entry["offset"]
                 else np.zeros(shape, dtype=dtype))
        if hashlib.sha256(array.data).hexdigest() != entry["sha256"]:
            raise CacheDamaged(f"array {name!r} is corrupted (checksum mismatch)")
        arrays[name] = array
    with contextlib.suppress(OSError):  # a read-only shared cache is still read
        os.utime(path)
    return content["meta"], arrays


@contextlib.contextmanager
def key_lock(directory: Path, key: str):
    """Hold an exclusive lock on ``key`` in ``directory`` (``KEY.lock``, ``fcntl.flock``; released when the block
    ends or the process dies), so processes building the same key at once wait for the first and then read its
    cache. No lock (the block runs at once) where the directory does not exist yet, cannot be written or the
    platform has no ``fcntl``: the build then goes on, and two builders of one key each replace the file whole."""
    lock = directory / f"{key}.lock"
    try:
        import fcntl

        handle = open(lock, "a") if directory.is_dir() else None
    except (ImportError, OSError):
        handle = None
    if handle is None:
        yield
        return
    with handle:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:  # removed before it is released: a waiter then finds the cache (or builds), nothing is left behind
            with contextlib.suppress(OSError):
                lock.unlink()
