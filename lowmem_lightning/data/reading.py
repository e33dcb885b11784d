"""The data files behind ``data_path`` and the documents in them, read as ``TextDataModule`` reads them: the files
found (:func:`find_data_files`), each file's text checked (:func:`read_text_file`: readable, gzip, UTF-8, no NUL,
not empty), its records streamed and rendered one at a time (:func:`iter_documents`; JSONL, CSV and TSV read
:data:`READ_CHUNK` bytes at a time), and the one line said when that takes long (:class:`Progress`)."""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from lowmem_lightning.data.chat import ChatDocument
from lowmem_lightning.data.documents import (
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE_NO_INPUT,
    Document,
    render_record,
)
from lowmem_lightning.data.formats import (
    COMPRESSED_SUFFIX,
    FORMATS,
    HF_METADATA_FILES,
    PARQUET_SUFFIX,
    data_format,
    is_compressed,
    iter_jsonl_records,
    iter_parquet_records,
    iter_table_records,
    json_records,
    parquet_readable,
    refusal,
    split_lines,
)
from lowmem_lightning.hub import DATASET_URL, dataset_files, dataset_parts, is_repo_id, resolve_dataset
from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = ["SAMPLE_DIR", "ACCEPTED_FILES", "HUB_DATA_PATTERNS", "READ_CHUNK", "PROGRESS_AFTER_S", "PROGRESS_BYTES",
           "hub_data_patterns", "find_data_files", "read_text_file", "read_documents", "iter_documents", "Progress"]


SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
"""The shipped sample data (``data_path="sample"``): see ``sample/SOURCE.md`` for origin and licence."""


ACCEPTED_FILES = (".txt, .jsonl, .json, .csv or .tsv file (each also gzip-compressed, NAME.gz) or .parquet file "
                  "(with pyarrow)")
"""The files ``data_path`` may name, in words (:mod:`~lowmem_lightning.data.formats`)."""

_UNICODE_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\xfe\xff", "UTF-16"),
                 (b"\xff\xfe", "UTF-16"))


PROGRESS_AFTER_S = 3.0
"""Seconds of reading and tokenizing after which ``TextDataModule.check_inputs`` says, once, what it is doing."""

PROGRESS_BYTES = 256 * 2**20
"""Data files of this many bytes or more in all make ``TextDataModule.check_inputs`` say what it is doing before
it reads them (parsing them alone takes longer than :data:`PROGRESS_AFTER_S`)."""


def _special_kind(path: Path) -> str:
    """What an existing path that is neither a regular file nor a directory is, in words."""
    import stat

    mode = path.stat().st_mode
    for test, words in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def _hidden(relative: Path) -> bool:
    """Whether a path inside a data directory is hidden (a part of ``relative`` starts with a dot)."""
    return any(part.startswith(".") for part in relative.parts)


HUB_DATA_PATTERNS = tuple(f"*{ext}{gz}" for suffix in FORMATS for ext in (suffix, suffix.upper())
                          for gz in ("", COMPRESSED_SUFFIX, COMPRESSED_SUFFIX.upper()))
"""The files of a Hub dataset that ``data_path`` downloads (every read format, at any depth of the repo), Parquet
aside (:func:`hub_data_patterns`)."""


def hub_data_patterns() -> list[str]:
    """:data:`HUB_DATA_PATTERNS`, and Parquet files when ``pyarrow`` reads them (without it they would be downloaded
    to be refused)."""
    parquet = [f"*{PARQUET_SUFFIX}", f"*{PARQUET_SUFFIX.upper()}"] if parquet_readable() else []
    return [*HUB_DATA_PATTERNS, *parquet]


def find_data_files(data_path: str) -> list[Path]:
    """The files behind ``data_path``: ``"sample"`` (the shipped data), one file, or every file of a read format
    under a directory (recursively, sorted; :data:`~lowmem_lightning.data.formats.FORMATS`, each optionally ``.gz``:
    ``.txt``, ``.jsonl``, ``.json``, ``.csv``, ``.tsv``; ``.parquet`` with pyarrow); other files (README.md, images),
    hidden files and folders (``.DS_Store``, macOS' ``._NAME`` copies, ``.ipynb_checkpoints/``) and ``datasets``'
    metadata JSON are skipped.
    A value naming no local path but spelled as a Hugging Face Hub dataset id (``org/name``, ``org/name@revision``;
    not a file name: ``data/train.jsonl`` is a missing file) is that dataset: its files of those formats, downloaded
    into the HF cache unless there (:func:`~lowmem_lightning.hub.resolve_dataset`), read as a directory.
    ``ValueError`` naming the path when it does not exist or holds no such file, and naming the file and the
    conversion to JSONL for a refused format (Parquet without pyarrow, Arrow / ``save_to_disk`` directories, ...:
    :func:`~lowmem_lightning.data.formats.refusal`), which a directory must not hold either (its records would be
    silently left out); for a Hub dataset, the Hub's reason (not cached while offline, not found, gated) or the
    refused format its files are stored in."""
    if data_path == "sample":
        path = SAMPLE_DIR
    else:
        path = Path(data_path).expanduser()
    if data_path.startswith(DATASET_URL) or not path.exists() and is_repo_id(data_path) and not _file_name(path):
        return _hub_dataset_files(data_path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _files_under(path)
    elif path.exists():
        raise ValueError(f"Invalid data_path={data_path!r}: {path} is {_special_kind(path)}, not a regular file "
                         f"or directory; give {ACCEPTED_FILES} or a directory of them.")
    else:
        raise ValueError(f"Invalid data_path={data_path!r}: no such file or directory ({path.resolve()}).")
    for file in files:
        refused = refusal(file)
        if refused:
            raise ValueError(f"Invalid data_path={data_path!r}: {refused}")
    if path.is_file():
        return files
    files = [p for p in files if data_format(p) and p.name not in HF_METADATA_FILES]
    if not files:
        raise ValueError(f"Invalid data_path={data_path!r}: the directory holds no {ACCEPTED_FILES}.")
    _say_held_out_read(data_path, path, files)
    return files


def _file_name(path: Path) -> bool:
    """Whether ``path`` ends in a data file's name (``data/train.jsonl``, ``x.parquet``, ``corpus.gz``): a local file
    that is missing, never read as a Hub dataset id."""
    return bool(data_format(path) or refusal(path) or is_compressed(path))


HELD_OUT_SPLITS = frozenset({"test", "testing", "eval", "evaluation", "validation", "valid", "val", "dev"})
"""Words that mark a Hub dataset's file as a held-out split (``data/test_sft-00000-of-00001.parquet``,
``validation.jsonl``), as ``datasets`` names splits from file names."""


def _held_out(relative: Path) -> bool:
    """Whether a dataset file's path (in its repo) names a held-out split: a word of :data:`HELD_OUT_SPLITS` between
    its separators (``/``, ``.``, ``_``, ``-``, digits)."""
    return any(word in HELD_OUT_SPLITS for word in re.split(r"[/._\-\d\s]+", relative.as_posix().lower()))


def _hub_dataset_files(data_path: str) -> list[Path]:
    """The data files of Hub dataset ``data_path``: for an id, its snapshot read as a directory but its held-out
    splits' (:func:`_without_held_out`); for a :data:`~lowmem_lightning.hub.DATASET_URL` path, the file or folder it
    names (read as a local one is). ``ValueError`` naming ``data_path`` for a malformed URL, a path the dataset does
    not hold, or a dataset none of whose files lowmem reads (:func:`_no_hub_data`)."""
    parts = dataset_parts(data_path)
    if parts is None:
        raise ValueError(f"Invalid data_path={data_path!r}: expected {DATASET_URL}ORG/NAME[@REVISION][/PATH IN THE "
                         "REPO] (a Hugging Face Hub dataset, a file or folder of it), e.g. "
                         f"{DATASET_URL}HuggingFaceTB/smoltalk/data/all.")
    inside, patterns = parts[2], hub_data_patterns()
    if inside:
        patterns = [inside, *(f"{inside}/{pattern}" for pattern in patterns)]
    folder = resolve_dataset(data_path, "data_path", patterns)
    target = folder / inside
    if inside and target.is_file():
        refused = refusal(target)
        if refused:
            raise ValueError(f"Invalid data_path={data_path!r}: {refused}")
        return [target]
    files = [p for p in _files_under(target) if data_format(p) and p.name not in HF_METADATA_FILES]
    if files:
        return files if inside else _without_held_out(data_path, folder, files)
    raise _no_hub_data(data_path, inside)


def _files_under(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively, sorted), hidden ones aside (:func:`_hidden`); none when ``folder`` is
    no directory."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))


def _no_hub_data(data_path: str, inside: str) -> ValueError:
    """Why Hub dataset ``data_path`` gave no data file (``inside``: the path in it that was asked for, or ``""``): no
    such path, or its files' refused format (Parquet without pyarrow), from huggingface_hub's cached listing."""
    listing = dataset_files(data_path)
    listed = sorted(name for name in listing or () if name.startswith(inside))
    if inside and not listed:
        unknown = " (or it is not in the Hugging Face cache)" if listing is None else ""
        return ValueError(f"Invalid data_path={data_path!r}: Hugging Face Hub dataset {dataset_parts(data_path)[0]!r} "
                          f"holds no file or folder {inside!r}{unknown}.")
    refused = [refusal(Path(name)) for name in listed if refusal(Path(name))]
    what = (f"its files are stored in a format lowmem does not read ({len(refused)} such files; the first: "
            f"{refused[0]})" if refused else f"it holds no {ACCEPTED_FILES}" + (
                f" (its files: {', '.join(listed[:5])}{', ...' if len(listed) > 5 else ''})" if listed else ""))
    return ValueError(f"Invalid data_path={data_path!r}: Hugging Face Hub dataset {data_path!r}: {what}.")


def _held_out_beside_others(folder: Path, files: list[Path]) -> list[Path]:
    """The ``files`` (under ``folder``) named as held-out splits (:func:`_held_out`), when others are not; else
    none."""
    held = [p for p in files if _held_out(p.relative_to(folder))]
    return held if len(held) < len(files) else []


def _shown(folder: Path, paths: list[Path]) -> str:
    """The first three of ``paths``, relative to ``folder``, for a message (``a.jsonl, b.jsonl, c.jsonl, ...``)."""
    return ", ".join(p.relative_to(folder).as_posix() for p in paths[:3]) + (", ..." if len(paths) > 3 else "")


def _without_held_out(data_path: str, folder: Path, files: list[Path]) -> list[Path]:
    """``files`` (of the dataset snapshot ``folder``) but those of held-out splits (test, validation:
    :func:`_held_out`) when there are others, said in one warning: ``TextDataModule`` holds out its own validation
    blocks, and a test split trained on is no test. All of them when every one is held out."""
    left = _held_out_beside_others(folder, files)
    if not left:
        return files
    from lightning.pytorch.utilities import rank_zero_warn

    kept = [p for p in files if p not in left]
    rank_zero_warn(f"data_path={data_path!r}: the Hub dataset's held-out split files are left out "
                   f"({_shown(folder, left)}: {len(left)} of {len(files)}); training reads {_shown(folder, kept)}. To "
                   f"train on a file or folder of your choice, name it: data_path={DATASET_URL}"
                   f"{dataset_parts(data_path)[0]}/PATH.", category=LowMemWarning)
    return kept


def _say_held_out_read(data_path: str, folder: Path, files: list[Path]) -> None:
    """One warning when the local directory ``folder`` holds files named as held-out splits (:func:`_held_out`)
    beside others: all are read (the directory was given), so a test split downloaded with its training data is
    trained on unless the user gives the training files alone."""
    held = _held_out_beside_others(folder, files)
    if not held:
        return
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(f"data_path={data_path!r} holds files named as held-out splits ({_shown(folder, held)}: "
                   f"{len(held)} of {len(files)}), which are trained on with the others; if they are a test or "
                   "validation split, give the training files or their folder instead.", category=LowMemWarning)


def _file_bytes(path: Path) -> bytes:
    """The bytes of one data file, decompressed when its name ends in ``.gz``; ``ValueError`` naming the file when
    it cannot be read or is no valid gzip file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _unreadable(path, err) from None
    if is_compressed(path):
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise _not_gzip(path, err) from None
    return raw


def read_text_file(path: Path) -> str:
    """The UTF-8 text of one data file (gunzipped when named ``*.gz``; a UTF-8 byte-order mark dropped);
    ``ValueError`` naming the file when it cannot be read, is empty (only whitespace), is UTF-16 / UTF-32 (a
    byte-order mark) or otherwise not UTF-8 (with the byte offset), or looks binary (holds NUL bytes)."""
    raw = _file_bytes(path)
    _refuse_other_unicode(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + 3 * raw.startswith(_UTF8_BOM)
        raise _not_utf8(path, offset, raw[offset]) from None
    if "\x00" in text:
        raise _binary(path)
    if not text.strip():
        raise _empty(path)
    return text


_UTF8_BOM = b"\xef\xbb\xbf"

READ_CHUNK = 2**20
"""Bytes read at a time from a JSONL, CSV or TSV data file (:func:`iter_documents` streams them)."""


def _refuse_other_unicode(path: Path, head: bytes) -> None:
    """``ValueError`` naming ``path`` when its first bytes ``head`` are a UTF-16 / UTF-32 byte-order mark."""
    for bom, encoding in _UNICODE_BOMS:
        if head.startswith(bom):
            raise ValueError(f"Data file {path} is {encoding} text (byte-order mark {bom.hex(' ')}), not UTF-8: "
                             f"convert it, e.g. `iconv -f {encoding} -t UTF-8 {path} > utf8{path.suffix}`.")


def _unreadable(path: Path, err: OSError) -> ValueError:
    return ValueError(f"Cannot read data file {path}: {err.strerror or err}.")


def _not_gzip(path: Path, err: Exception) -> ValueError:
    return ValueError(f"Data file {path} is not a valid gzip file ({err}): recompress it with gzip, or give it "
                      "uncompressed.")


def _not_utf8(path: Path, offset: int, byte: int) -> ValueError:
    return ValueError(f"Data file {path} is not UTF-8 text (invalid byte 0x{byte:02x} at offset {offset}): "
                      f"expected a {ACCEPTED_FILES} in UTF-8; convert it to UTF-8 or leave it out of data_path.")


def _binary(path: Path) -> ValueError:
    return ValueError(f"Data file {path} looks binary (it holds NUL bytes): expected a {ACCEPTED_FILES}.")


def _empty(path: Path) -> ValueError:
    return ValueError(f"Data file {path} is empty: add text to it or leave it out of data_path.")


@contextlib.contextmanager
def _opened_bytes(path: Path, progress: Progress | None = None) -> Iterator[io.BufferedIOBase]:
    """``path`` opened for reading bytes, gunzipped as it is read when named ``*.gz``; ``progress`` follows how far
    into the file on disk the reading is. ``ValueError`` naming the file when it cannot be read or is no valid gzip
    file (also when that shows while reading)."""
    try:
        raw = open(path, "rb")  # closed by the `with` below
    except OSError as err:
        raise _unreadable(path, err) from None
    with raw:
        if progress is not None:
            progress.reading(raw)
        try:
            yield gzip.GzipFile(fileobj=raw, mode="rb") if is_compressed(path) else raw
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise _not_gzip(path, err) from None
        except OSError as err:
            raise _unreadable(path, err) from None


def _checked_text_size(path: Path) -> int:
    """:func:`read_text_file`'s checks of one data file, read :data:`READ_CHUNK` bytes at a time (no more than a
    chunk and one line of it kept), with the same errors; the number of bytes of its text (gunzipped), at least its
    number of characters."""
    nul, blank, at_end = False, True, False
    with _opened_bytes(path) as stream:
        pending = bytearray(stream.read(max(READ_CHUNK, 4)))
        _refuse_other_unicode(path, bytes(pending[:4]))
        offset = 3 if pending.startswith(_UTF8_BOM) else 0  # bytes of the file before `pending`
        del pending[:offset]
        searched = 0  # bytes at the start of `pending` that hold no line end
        while pending or not at_end:
            # whole lines only (a line end is never inside a UTF-8 character); at the end of the file, the rest
            cut = len(pending) if at_end else pending.rfind(b"\n", searched) + 1
            if cut:
                lines = bytes(pending[:cut])
                del pending[:cut]
                try:
                    text = lines.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise _not_utf8(path, offset + err.start, lines[err.start]) from None
                nul, blank = nul or "\x00" in text, blank and text.isspace()
                offset += cut
            searched = len(pending)
            if not at_end:
                chunk = stream.read(READ_CHUNK)
                at_end = not chunk
                pending += chunk
    if nul:
        raise _binary(path)
    if blank:
        raise _empty(path)
    return offset


def read_documents(
    files: list[Path],
    template: str = DEFAULT_PROMPT_TEMPLATE,
    template_no_input: str = DEFAULT_PROMPT_TEMPLATE_NO_INPUT,
    record_fields: Mapping[str, str] | None = None,
) -> list[Document | ChatDocument]:
    """Every document in ``files``, as a list: :func:`iter_documents`."""
    return list(iter_documents(files, template, template_no_input, record_fields=record_fields))


def iter_documents(
    files: Iterable[Path],
    template: str = DEFAULT_PROMPT_TEMPLATE,
    template_no_input: str = DEFAULT_PROMPT_TEMPLATE_NO_INPUT,
    progress: Progress | None = None,
    record_fields: Mapping[str, str] | None = None,
) -> Iterator[Document | ChatDocument]:
    """Every document in ``files``, one at a time: a plain-text file is one document (read whole; Windows CRLF and
    old-Mac CR line ends read as LF); a JSONL line, a CSV/TSV row (read from the file line by line / row by row, so
    neither the file's text nor its records are held) or an item of a JSON array (the ``.json`` file parsed whole)
    is one record (a conversation is a ``ChatDocument``). ``ValueError`` naming the file (and line or record) for any
    file :func:`read_text_file` refuses, a file that holds no record, or a malformed record. ``progress`` follows how
    far into the files the reading is (:class:`Progress`); ``record_fields`` renames each record's keys to ours first
    (:func:`~lowmem_lightning.data.documents.render_record`)."""
    for path in files:
        kind = data_format(path)
        if kind in (None, "text"):  # as Python's text mode and `datasets`' text loader: LF
            yield Document("", _unix_line_ends(read_text_file(path)))
        else:
            records = 0
            for where, record in _file_records(path, kind, progress):
                records += 1
                yield render_record(record, where, template, template_no_input, record_fields)
            if not records:
                raise ValueError(f"Data file {path} holds no records: add records to it or leave it out of "
                                 "data_path.")
        if progress is not None:
            progress.read(path)


def _unix_line_ends(text: str) -> str:
    """``text`` with CRLF and CR line ends as LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _file_records(path: Path, kind: str, progress: Progress | None) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of each record of a JSONL, JSON, CSV, TSV or Parquet data file (``kind``,
    :mod:`~lowmem_lightning.data.formats`): JSONL, CSV and TSV read from the file as they are parsed, after
    :func:`_checked_text_size` checked it; JSON parsed whole; Parquet a batch of rows at a time."""
    if kind == "json":
        yield from json_records(path, read_text_file(path))
        return
    if kind == "parquet":
        yield from iter_parquet_records(path)
        if progress is not None:
            progress.read(path)
        return
    size = _checked_text_size(path)
    with _opened_bytes(path, progress) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        if kind == "jsonl":
            yield from iter_jsonl_records(path, split_lines(text))
        else:
            yield from iter_table_records(path, text, kind, size)


class Progress:
    """Says, once, what reading and tokenizing is doing: before reading files of :data:`PROGRESS_BYTES` or more, or
    when tokenizing has taken :data:`PROGRESS_AFTER_S` seconds, so a long one does not look like a hang; ``say``
    takes the line. Follows how many bytes of the files on disk have been read (:meth:`reading`, :meth:`read`), as
    the number of records is not known before they are all read."""

    def __init__(self, say, data_path: str, files: list[Path]):
        self.say, self.data_path = say, data_path
        self.started, self.said = time.monotonic(), False
        self.size = sum(f.stat().st_size for f in files)
        self._bytes_done, self._file = 0, None
        if self.size >= PROGRESS_BYTES:
            self.said = True
            self.say(f"TextDataModule: reading and tokenizing data_path={data_path!r}: {len(files)} file(s), "
                     f"{self.size / 2**30:.2f} GiB, then packing them into blocks...")

    def reading(self, file: io.BufferedIOBase) -> None:
        """The data file (opened for bytes, as on disk) being read now."""
        self._file = file

    def read(self, path: Path) -> None:
        """The data file ``path`` has been read to its end."""
        self._bytes_done += path.stat().st_size
        self._file = None

    def bytes_read(self) -> int:
        """Bytes of the data files on disk read so far (the file being read: up to its read-ahead)."""
        file = self._file
        return self._bytes_done + (file.tell() if file is not None and not file.closed else 0)

    def update(self, records_done: int, tokens_done: int) -> None:
        """Called as records are tokenized: ``records_done`` records so far, into ``tokens_done`` tokens."""
        seconds = time.monotonic() - self.started
        if self.said or seconds < PROGRESS_AFTER_S:
            return
        self.said = True
        share = min(1.0, self.bytes_read() / self.size) if self.size else 1.0
        self.say(f"TextDataModule: tokenizing data_path={self.data_path!r}: {records_done:,} records "
                 f"({tokens_done:,} tokens), {share:.0%} of {_size_in_words(self.size)} read after {seconds:.0f} s, "
                 "then packing them into blocks...")


def _size_in_words(size: int) -> str:
    """``size`` bytes as ``"1.2 GiB"``, ``"12.3 MiB"`` or ``"4.5 KiB"`` (the largest unit it has one of)."""
    for unit, power in (("GiB", 30), ("MiB", 20)):
        if size >= 2**power:
            return f"{size / 2**power:.1f} {unit}"
    return f"{size / 2**10:.1f} KiB"
