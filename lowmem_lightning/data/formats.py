"""The data files ``TextDataModule`` reads, told apart by name, and the records in them.

Read (each optionally gzip-compressed, ``NAME.gz``):

- ``.txt``: one plain-text document per file (so is a file given by name with any other suffix);
- ``.jsonl``: one JSON record per line;
- ``.json``: a JSON array of records, ``{"data": [records]}``, one record, or JSON Lines (what ``datasets``'
  ``to_json`` writes);
- ``.csv`` / ``.tsv``: a header row naming the record's keys (``text``; ``instruction``, ``input``, ``output``;
  ``prompt``, ``completion``), one record per row (RFC 4180 quoting: fields may hold the delimiter, quotes and line
  breaks).

- ``.parquet`` (not gzip-compressed: Parquet compresses its own columns): one record per row, read a batch of
  rows at a time, when ``pyarrow`` is installed (``pip install lowmem-lightning[parquet]``); nested columns (a
  ``messages`` list of ``{role, content}``) come as lists and dicts.

A record is a dict checked and rendered by ``TextDataModule`` as one JSONL line is; a CSV cell is always a string.
Parquet without ``pyarrow``, Arrow (and ``datasets``' ``save_to_disk`` directories), Feather, Excel and other
compressions are refused by name with the conversion to JSONL (:func:`refusal`).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["FORMATS", "COMPRESSED_SUFFIX", "HF_METADATA_FILES", "PARQUET_SUFFIX", "data_format", "is_compressed",
           "parquet_readable", "refusal", "jsonl_records", "json_records", "table_records", "iter_jsonl_records",
           "iter_table_records", "iter_parquet_records", "split_lines"]

COMPRESSED_SUFFIX = ".gz"
"""The compression read as it is (gzip): ``train.jsonl.gz`` is read as ``train.jsonl``."""

FORMATS = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
"""Suffix -> format of the files a data directory contributes (after an optional :data:`COMPRESSED_SUFFIX`)."""

PARQUET_SUFFIX = ".parquet"
"""Parquet files: format ``"parquet"`` when :func:`parquet_readable`, else refused with the install and the
conversion."""

HF_METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})
"""JSON files that describe a Hugging Face data set rather than hold records: a data directory skips them."""

_DELIMITERS = {"csv": ",", "tsv": "\t"}

_TO_JSONL = "convert with `datasets`/pandas to JSONL: "
_REFUSED = {
    PARQUET_SUFFIX: ("Parquet", "install pyarrow, which reads it (pip install pyarrow), or " + _TO_JSONL
                     + "datasets.Dataset.from_parquet({p!r}).to_json('train.jsonl') or "
                     "pandas.read_parquet({p!r}).to_json('train.jsonl', orient='records', lines=True)"),
    ".arrow": ("Arrow", _TO_JSONL + "datasets.Dataset.from_file({p!r}).to_json('train.jsonl')"),
    ".feather": ("Feather", _TO_JSONL + "pandas.read_feather({p!r}).to_json('train.jsonl', orient='records', "
                 "lines=True)"),
    ".xlsx": ("Excel", "save it as CSV (UTF-8) or " + _TO_JSONL + "pandas.read_excel({p!r}).to_json('train.jsonl', "
              "orient='records', lines=True)"),
    ".xls": ("Excel", "save it as CSV (UTF-8) or " + _TO_JSONL + "pandas.read_excel({p!r}).to_json('train.jsonl', "
             "orient='records', lines=True)"),
    **{suffix: (f"{suffix[1:]}-compressed", "decompress it (gzip .gz files are read as they are)")
       for suffix in (".bz2", ".xz", ".zst", ".zip", ".7z", ".tar", ".tgz", ".lz4")},
}


def is_compressed(path: Path) -> bool:
    """Whether ``path``'s name ends in :data:`COMPRESSED_SUFFIX` (in any case: ``TRAIN.JSONL.GZ``)."""
    return path.name.lower().endswith(COMPRESSED_SUFFIX)


def _inner_suffix(path: Path) -> str:
    """The lower-case suffix of ``path`` after an optional :data:`COMPRESSED_SUFFIX` (``train.jsonl.gz`` ->
    ``.jsonl``; ``TRAIN.CSV`` -> ``.csv``, as Windows and macOS names come)."""
    name = path.name.lower()
    return Path(name[: -len(COMPRESSED_SUFFIX)] if is_compressed(path) else name).suffix


@functools.cache
def parquet_readable() -> bool:
    """Whether ``pyarrow``, which reads Parquet, is installed (it is not a dependency: the ``parquet`` extra); looked
    up once (a directory asks for each of its files)."""
    return importlib.util.find_spec("pyarrow") is not None


def _readable_parquet(path: Path) -> bool:
    return _inner_suffix(path) == PARQUET_SUFFIX and not is_compressed(path) and parquet_readable()


def data_format(path: Path) -> str | None:
    """The :data:`FORMATS` format of ``path`` by its name (``"text"``, ``"jsonl"``, ``"json"``, ``"csv"``, ``"tsv"``;
    ``train.csv.gz`` is ``"csv"``; ``"parquet"`` for a ``.parquet`` file when :func:`parquet_readable`), or ``None``
    for any other name."""
    return "parquet" if _readable_parquet(path) else FORMATS.get(_inner_suffix(path))


def refusal(path: Path) -> str | None:
    """Why ``path`` cannot be read and what to convert it to, in words (``"PATH is Parquet, ...: convert with ..."``),
    or ``None`` when its name is no refused format. An Arrow file beside ``datasets``' ``state.json`` or
    ``dataset_info.json`` is named as its ``save_to_disk`` directory."""
    suffix = _inner_suffix(path)
    if suffix not in _REFUSED or _readable_parquet(path):
        return None
    if suffix == ".arrow" and any((path.parent / name).is_file() for name in ("state.json", "dataset_info.json")):
        split = (path.parent.parent / "dataset_dict.json").is_file()  # a DatasetDict: one folder per split
        folder = str(path.parent.parent if split else path.parent)
        load = f"datasets.load_from_disk({folder!r})" + ("['train']" if split else "")
        return (f"{folder} is a Hugging Face `datasets` save_to_disk directory (Arrow files), which lowmem does not "
                f"read: {_TO_JSONL}{load}.to_json('train.jsonl')")
    if suffix == PARQUET_SUFFIX and is_compressed(path):
        return _compressed_parquet_refusal(path)
    kind, convert = _REFUSED[suffix]
    return f"{path} is {kind}, which lowmem does not read: {convert.format(p=str(path))}"


def _compressed_parquet_refusal(path: Path) -> str:
    """Why a gzip-compressed Parquet file is refused: Parquet compresses its own columns and is read by seeking,
    so it is read only as a plain ``.parquet`` (and with ``pyarrow`` installed)."""
    plain = path.name[: -len(COMPRESSED_SUFFIX)]
    install = "" if parquet_readable() else ", with pyarrow installed (pip install pyarrow)"
    return (f"{path} is gzip-compressed Parquet, which lowmem does not read: Parquet compresses its own columns; "
            f"decompress it (gunzip {str(path)!r}) and lowmem reads {plain}{install}")


_JSONL_LINE_END = re.compile(r"\r\n|\r|\n")
"""The line ends of JSON Lines: LF (the format's), CRLF and CR. Not ``str.splitlines``' others: U+2028, U+2029 and
U+0085 may stand unescaped inside a JSON string (``json.dumps(..., ensure_ascii=False)`` writes them so), as may
nothing else it cuts at."""


def jsonl_records(path: Path, text: str) -> list[tuple[str, object]]:
    """``[(where, record)]`` of a JSON Lines text, ``where`` being ``path:line``; blank lines are skipped.
    ``ValueError`` naming ``path:line`` for a line that is not JSON."""
    return list(iter_jsonl_records(path, _JSONL_LINE_END.split(text)))


def split_lines(stream: Iterable[str]) -> Iterator[str]:
    """The lines of a text read line by line (a file opened with ``newline=""``, which ends a line at LF, CRLF or CR
    only), without their line ends: one line in memory at a time, cut as :func:`jsonl_records` cuts the whole text."""
    for line in stream:
        yield line.rstrip("\r\n")


def iter_jsonl_records(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of each JSON Lines line of ``lines`` (cut at LF, CRLF or CR: :data:`_JSONL_LINE_END`, or
    :func:`split_lines` of a file), one at a time, ``where`` being ``path:line``; blank lines are skipped.
    ``ValueError`` naming ``path:line`` for a line that is not JSON."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno}).") from None
        yield f"{path}:{lineno}", record


def json_records(path: Path, text: str) -> list[tuple[str, object]]:
    """``[(where, record)]`` of a ``.json`` text: the items of a top-level array or of ``{"data": [...]}``
    (``where``: ``path: record N``, counted from 1), a lone object as one record, or, when the text is several JSON
    values one per line, :func:`jsonl_records`. ``ValueError`` naming ``path:line`` when it is not JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one value per line: JSON Lines under a .json name
            return jsonl_records(path, text)
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}).") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if isinstance(value, list):
        return [(f"{path}: record {i}", item) for i, item in enumerate(value, start=1)]
    return [(f"{path} (one JSON value, read as one record; many records go in an array or {{\"data\": [...]}})",
             value)]


def table_records(path: Path, text: str, data_format: str) -> list[tuple[str, dict]]:
    """``[(where, record)]`` of a CSV (``data_format="csv"``) or TSV (``"tsv"``) text: :func:`iter_table_records`
    of the whole text."""
    return list(iter_table_records(path, io.StringIO(text, newline=""), data_format, len(text)))


def iter_table_records(path: Path, stream: Iterable[str], data_format: str,
                       longest_field: int) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of each row of a CSV (``data_format="csv"``) or TSV (``"tsv"``) text read from
    ``stream`` (a file opened with ``newline=""``), one row at a time: its first row names the keys (spaces around a
    name are dropped), each later row is ``{key: cell}`` (``where``: ``path:line`` of the row's first line); rows with
    no cell filled are skipped. ``longest_field``: characters a cell may hold (the text's length or more; the ``csv``
    module's default is 128 KiB, short of a long document in one cell). ``ValueError`` naming the file (and line) for
    an empty or repeated column name, a row whose field count differs from the header's, or a row the ``csv``
    module rejects."""
    delimiter = _DELIMITERS[data_format]
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, longest_field))
    try:
        rows = _table_rows(path, stream, delimiter)
        first = next(rows, None)
        if first is None:
            return
        header = [name.strip() for name in first[1]]
        if "" in header or len(set(header)) < len(header):
            raise ValueError(f"{path}:{first[0]}: the header row {header} must name every column once (the "
                             "record's keys: 'text', or 'instruction', 'input', 'output').")
        for line, row in rows:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields where the header {header} has {len(header)}; "
                                 f"quote fields that hold a {'comma' if delimiter == ',' else 'tab'}, a quote or a "
                                 "line break.")
            yield f"{path}:{line}", dict(zip(header, row))
    finally:
        csv.field_size_limit(limit)


def _table_rows(path: Path, stream: Iterable[str], delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line, cells)`` of each row of a delimited text (line breaks inside quotes kept as written)."""
    reader = csv.reader(stream, delimiter=delimiter)
    line = 1
    try:
        for row in reader:
            yield line, row
            line = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"{path}:{line}: not valid {'CSV' if delimiter == ',' else 'TSV'} ({err}).") from None


PARQUET_BATCH_ROWS = 1024
"""Rows of a Parquet file read at a time by :func:`iter_parquet_records`."""


def iter_parquet_records(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of each row of Parquet file ``path`` (``where``: ``path:row N``, from 1), read
    :data:`PARQUET_BATCH_ROWS` rows at a time with ``pyarrow``; ``ValueError`` naming the file when it is no readable
    Parquet file."""
    import pyarrow
    import pyarrow.parquet

    row = 0
    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
    except (pyarrow.ArrowException, OSError) as err:
        raise ValueError(f"Data file {path} is not a readable Parquet file (after {row} rows: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                         "re-export it, or leave it out of data_path.") from None
