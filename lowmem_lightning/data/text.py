"""``TextDataModule``: plain text and records (JSONL, JSON, CSV/TSV), tokenized, packed into fixed-length blocks,
split train/val.

Pipeline (all in ``setup``, once):

1. read documents: each plain-text file is one document; each JSONL line (item of a JSON array, CSV/TSV row under
   a header naming the keys; files optionally gzipped: :mod:`~lowmem_lightning.data.formats`) is one record, either
   ``{"text": ...}``, ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional), or a
   conversation, ``{"messages": [{"role", "content"}, ...]}`` or ShareGPT's ``{"conversations": [{"from",
   "value"}, ...]}`` (:mod:`~lowmem_lightning.data.chat`); JSONL, CSV and TSV records stream from their files,
   line by line, through steps 1 and 2, :data:`ENCODE_CHUNK` records at a time (:func:`iter_documents`), so no
   record's text outlives its chunk;
2. tokenize: a document becomes ``bos, prompt..., completion..., eos``; labels copy the ids except
   the ``bos`` and the prompt (instruction records rendered with the prompt template), which get -100
   so the loss covers only the response; a conversation is rendered with its chat template and only
   its assistant turns (content and end-of-turn marker) keep their labels;
3. pack: all documents are concatenated and cut into blocks of ``seq_len`` tokens (``pack=True``), or
   each document is cut on its own (``pack=False``; a record longer than ``seq_len`` is split, truncated or dropped
   as ``overflow`` says: :mod:`~lowmem_lightning.data.overflow`); the last block of a stream is right-padded with
   the pad token, ``attention_mask`` 0 and labels -100; packed blocks with ``isolate_documents=True`` (the
   default) carry ``position_ids`` that restart at 0 where a document (or the padding) starts, and the label of
   that first token is -100, so no token attends to or is predicted from another document
   (:func:`document_position_ids`);
   Tokens are kept compact from the tokenizer on (:mod:`~lowmem_lightning.data.tokens`, ~7 bytes per token: int32
   ids, a bool "trained" flag, int16 positions; blocks are spans of those arrays); a loader's item is built as int64
   tensors when it is read (:class:`TokenBlocks`);
4. split: a seeded permutation of the blocks sends ``round(val_fraction * n_blocks)`` (at least 1
   when ``val_fraction > 0``) to validation, the rest to training; blocks without a single target
   token (all prompt or padding: they would give a NaN loss) are left out, with a warning when
   ``pack=False`` or when they are more than 10% of the blocks.

Steps 1-3 run once per data: their result is written to a token cache when it took 3 s or more or the files are
8 MiB or more, and a later start with the same files, tokenizer and settings memory-maps it instead
(``cache_dir``; :mod:`~lowmem_lightning.data.token_cache`).

Loaders are torchdata ``StatefulDataLoader``s (a drop-in for torch's ``DataLoader``): Lightning saves
their position and the shuffle generator's state in every checkpoint and restores them, so a run
resumed from a mid-epoch checkpoint sees exactly the batches the uninterrupted run would have seen.
The shuffle order of each epoch comes from ``seed`` and the epoch number alone
(``EpochShuffleSampler``, whose state travels with the loader's), not from the global RNG.

``check_inputs()`` (called by ``setup`` and, before the Trainer is built, by ``lowmem fit``) reads and
checks every file: unreadable, empty, binary / non-UTF-8 files, malformed records (file:line, or file: record N),
malformed chat records (unknown role, non-string content, no assistant turn; file:line), too little data
for the split, and no trainable label at all each raise ``ValueError`` naming the file or the setting to
change.

Batches are dicts of ``[batch_size, seq_len]`` int64 tensors (with ``pack=False``, ``[batch_size, width]``: the
columns that are padding in every row are left out, so ``width`` is the batch's longest block,
:func:`~lowmem_lightning.data.overflow.collate_trimmed`): ``input_ids``, ``labels`` and either
``position_ids`` (packed, documents isolated: no ``attention_mask``, as transformers'
``DataCollatorWithFlattening`` does, because transformers builds the block-diagonal causal mask from
``position_ids`` only when ``attention_mask`` is None) or ``attention_mask``, ready for ``model(**batch)`` of a
Hugging Face causal LM (which shifts the labels). With ``position_ids``, call the model with
``use_cache=False`` (``CausalLMModule`` does): transformers 5 skips the packed-sequence mask whenever a cache
exists, and a model whose ``config.use_cache`` is True makes one even in training.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import itertools
import string
import sys
import time
import warnings
import zlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lowmem_lightning.data.chat import ChatDocument, ChatTemplate, chat_record, read_chat_template
from lowmem_lightning.data.formats import (
    HF_METADATA_FILES,
    data_format,
    is_compressed,
    iter_jsonl_records,
    iter_table_records,
    json_records,
    refusal,
    split_lines,
)
from lowmem_lightning.data.overflow import Overflow, check_overflow, collate_trimmed, fit_records
from lowmem_lightning.data.token_cache import cache_directory
from lowmem_lightning.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from lowmem_lightning.data.tokens import (
    IGNORE_INDEX,
    EncodedRecords,
    PackedBlocks,
    RecordsBuilder,
    flat_positions,
    segment_index,
)
from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = [
    "TextDataModule",
    "TokenBlocks",
    "SAMPLE_DIR",
    "DEFAULT_PROMPT_TEMPLATE",
    "DEFAULT_PROMPT_TEMPLATE_NO_INPUT",
    "IGNORE_INDEX",
    "find_data_files",
    "read_documents",
    "iter_documents",
    "encode_document",
    "encode_documents",
    "pack_blocks",
    "document_position_ids",
    "first_document_prompts",
    "record_blocks",
    "PromptRecord",
    "prompt_record",
    "PromptRecords",
    "collate_prompts",
    "split_indices",
    "read_text_file",
    "trainable_blocks",
    "EpochShuffleSampler",
    "TrainLoader",
]

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
"""The shipped sample data (``data_path="sample"``): see ``sample/SOURCE.md`` for origin and licence."""

DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""Prompt for instruction records with a non-empty ``input``; the ``output`` follows it."""

DEFAULT_PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
"""Prompt for instruction records without ``input`` (absent or empty)."""

ACCEPTED_FILES = ".txt, .jsonl, .json, .csv or .tsv file (each also gzip-compressed, NAME.gz)"
"""The files ``data_path`` may name, in words (:mod:`~lowmem_lightning.data.formats`)."""

_UNICODE_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"), (b"\xfe\xff", "UTF-16"),
                 (b"\xff\xfe", "UTF-16"))


@dataclass(frozen=True)
class Document:
    """One training document: ``prompt`` (left out of the loss; empty for plain text) + ``completion``."""

    prompt: str
    completion: str


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


def find_data_files(data_path: str) -> list[Path]:
    """The files behind ``data_path``: ``"sample"`` (the shipped data), one file, or every file of a read format
    under a directory (recursively, sorted; :data:`~lowmem_lightning.data.formats.FORMATS`, each optionally ``.gz``:
    ``.txt``, ``.jsonl``, ``.json``, ``.csv``, ``.tsv``); other files (README.md, images), hidden files and folders
    (``.DS_Store``, macOS' ``._NAME`` copies, ``.ipynb_checkpoints/``) and ``datasets``' metadata JSON are skipped.
    ``ValueError`` naming the path when it does not exist or holds no such file, and naming the file and the
    conversion to JSONL for a refused format (Parquet, Arrow / ``save_to_disk`` directories, ...:
    :func:`~lowmem_lightning.data.formats.refusal`), which a directory must not hold either (its records would be
    silently left out)."""
    if data_path == "sample":
        path = SAMPLE_DIR
    else:
        path = Path(data_path).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
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
    return files


def _render(record: dict, where: str, template: str, template_no_input: str) -> Document | ChatDocument:
    """A JSONL record as a ``Document`` (or a ``ChatDocument`` for a conversation); ``ValueError`` naming
    ``where`` (file:line) when malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if isinstance(record.get("text"), str):
        return Document("", record["text"])
    chat = chat_record(record, where)
    if chat is not None:
        return chat
    if "prompt" in record and "completion" in record:
        return _prompt_completion(record["prompt"], record["completion"], where)
    fields = {k: record.get(k) for k in ("instruction", "input", "output")}
    if not isinstance(fields["instruction"], str) or not isinstance(fields["output"], str):
        raise ValueError(
            f"{where}: expected a string field 'text', string fields 'instruction' and 'output' "
            f"(and optionally 'input'), 'prompt' and 'completion', or a list 'messages' or 'conversations'; "
            f"found keys {sorted(record)}."
        )
    if fields["input"] is not None and not isinstance(fields["input"], str):
        raise ValueError(f"{where}: field 'input' must be a string, got {type(fields['input']).__name__}.")
    if fields["input"]:
        prompt = template.format(instruction=fields["instruction"], input=fields["input"])
    else:
        prompt = template_no_input.format(instruction=fields["instruction"])
    return Document(prompt, fields["output"])


def _prompt_completion(prompt, completion, where: str) -> Document | ChatDocument:
    """A prompt-completion record (TRL's standard and conversational forms): two strings give the prompt as written
    (no template, left out of the loss) and the completion (trained); two lists of messages give the conversation
    ``prompt + completion``, trained on the completion's turns, which must all be the assistant's (and the prompt's
    none). ``ValueError`` naming ``where`` otherwise."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ValueError(f"{where}: 'completion' is empty: nothing to learn; add it or leave the record out.")
        return Document(prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        if any(isinstance(turn, dict) and turn.get("role") == "assistant" for turn in prompt):
            raise ValueError(f"{where}: 'prompt' holds an assistant turn, which would be trained: a prompt-completion "
                             "record trains only its completion; give the conversation as 'messages' instead.")
        if not completion or not all(isinstance(turn, dict) and turn.get("role") == "assistant" for turn in completion):
            raise ValueError(f"{where}: 'completion' must be a non-empty list of assistant turns "
                             "({'role': 'assistant', 'content': ...}).")
        return chat_record({"messages": prompt + completion}, where)
    raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages, got "
                     f"{type(prompt).__name__} and {type(completion).__name__}.")


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
def _opened_bytes(path: Path, progress: _Progress | None = None) -> Iterator[io.BufferedIOBase]:
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
) -> list[Document | ChatDocument]:
    """Every document in ``files``, as a list: :func:`iter_documents`."""
    return list(iter_documents(files, template, template_no_input))


def iter_documents(
    files: Iterable[Path],
    template: str = DEFAULT_PROMPT_TEMPLATE,
    template_no_input: str = DEFAULT_PROMPT_TEMPLATE_NO_INPUT,
    progress: _Progress | None = None,
) -> Iterator[Document | ChatDocument]:
    """Every document in ``files``, one at a time: a plain-text file is one document (read whole; Windows CRLF and
    old-Mac CR line ends read as LF); a JSONL line, a CSV/TSV row (read from the file line by line / row by row, so
    neither the file's text nor its records are held) or an item of a JSON array (the ``.json`` file parsed whole)
    is one record (a conversation is a ``ChatDocument``). ``ValueError`` naming the file (and line or record) for any
    file :func:`read_text_file` refuses, a file that holds no record, or a malformed record. ``progress`` follows how
    far into the files the reading is (:class:`_Progress`)."""
    for path in files:
        kind = data_format(path)
        if kind not in ("jsonl", "json", "csv", "tsv"):  # as Python's text mode and `datasets`' text loader: LF
            yield Document("", _unix_line_ends(read_text_file(path)))
        else:
            records = 0
            for where, record in _file_records(path, kind, progress):
                records += 1
                yield _render(record, where, template, template_no_input)
            if not records:
                raise ValueError(f"Data file {path} holds no records: add records to it or leave it out of "
                                 "data_path.")
        if progress is not None:
            progress.read(path)


def _unix_line_ends(text: str) -> str:
    """``text`` with CRLF and CR line ends as LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _file_records(path: Path, kind: str, progress: _Progress | None) -> Iterator[tuple[str, object]]:
    """``(where, record)`` of each record of a JSONL, JSON, CSV or TSV data file (``kind``,
    :mod:`~lowmem_lightning.data.formats`): JSONL, CSV and TSV read from the file as they are parsed, after
    :func:`_checked_text_size` checked it; JSON parsed whole."""
    if kind == "json":
        yield from json_records(path, read_text_file(path))
        return
    size = _checked_text_size(path)
    with _opened_bytes(path, progress) as stream:
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        if kind == "jsonl":
            yield from iter_jsonl_records(path, split_lines(text))
        else:
            yield from iter_table_records(path, text, kind, size)


def encode_document(
    doc: Document | ChatDocument, tokenizer: ByteTokenizer | HFTokenizer, chat: ChatTemplate | None = None
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of ``bos, prompt..., completion..., eos``; labels are -100 on bos and prompt.
    A ``ChatDocument`` is rendered with ``chat`` (default: ``ChatTemplate(tokenizer)``); its labels are -100
    except on the tokens of assistant turns."""
    if isinstance(doc, ChatDocument):
        ids, trained = (chat or ChatTemplate(tokenizer)).encode(doc)
        return ids, [i if keep else IGNORE_INDEX for i, keep in zip(ids, trained)]
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prompt = tokenizer.encode(doc.prompt) if doc.prompt else []
    body = tokenizer.encode(doc.completion) + [tokenizer.eos_token_id]
    ids = head + prompt + body
    labels = [IGNORE_INDEX] * (len(head) + len(prompt)) + body
    return ids, labels


ENCODE_CHUNK = 4096
"""Records tokenized per call of the tokenizer's ``encode_batch`` (:func:`encode_documents`)."""


def encode_documents(
    docs: Iterable[Document | ChatDocument], tokenizer: ByteTokenizer | HFTokenizer, chat: ChatTemplate | None = None,
    on_chunk=None,
) -> EncodedRecords:
    """Every document's :func:`encode_document` ids and labels, as flat arrays (:class:`EncodedRecords`: int32 ids,
    bool "trained" = label is not -100). ``docs`` (a list, or an iterator such as :func:`iter_documents`) are taken
    :data:`ENCODE_CHUNK` at a time, so no more than a chunk of them is held: runs of prompt/completion documents are
    tokenized by one ``tokenizer.encode_batch`` call for their prompts and one for their completions, and framed
    (bos, eos) by array arithmetic; conversations are rendered and tokenized one by one (:meth:`ChatTemplate.encode`:
    each needs its own renders to find its assistant turns). ``on_chunk(records_done, tokens_done)`` is called after
    each chunk."""
    chat = chat or ChatTemplate(tokenizer)
    builder = RecordsBuilder()
    docs = iter(docs)
    while chunk := list(itertools.islice(docs, ENCODE_CHUNK)):
        for is_chat, run in itertools.groupby(chunk, key=lambda doc: isinstance(doc, ChatDocument)):
            if is_chat:
                for doc in run:
                    ids, trained = chat.encode(doc)
                    builder.add_record(np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=np.bool_))
            else:
                builder.add_flat(*_encode_prompted(list(run), tokenizer))
        del chunk
        if on_chunk is not None:
            on_chunk(builder.n_records, builder.n_tokens)
    return builder.finish()


def _encode_prompted(docs: list[Document], tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, trained, lengths)`` of ``docs`` one after the other, each ``bos, prompt..., completion..., eos``
    (:func:`encode_document`), with two ``encode_batch`` calls (an empty prompt is not tokenized, as there)."""
    prompted = np.fromiter((bool(d.prompt) for d in docs), dtype=np.bool_, count=len(docs))
    prompt_ids, some = tokenizer.encode_batch([d.prompt for d in docs if d.prompt])
    prompt_lengths = np.zeros(len(docs), dtype=np.int64)
    prompt_lengths[prompted] = some
    body_ids, body_lengths = tokenizer.encode_batch([d.completion for d in docs])
    head = int(tokenizer.bos_token_id is not None)
    lengths = head + prompt_lengths + body_lengths + 1
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    ids = np.empty(int(lengths.sum()), dtype=np.int32)
    trained = np.zeros(ids.size, dtype=np.bool_)
    if head:
        ids[starts] = tokenizer.bos_token_id
    ids[segment_index(starts + head, prompt_lengths)] = prompt_ids
    body = segment_index(starts + head + prompt_lengths, body_lengths)
    ids[body], trained[body] = body_ids, True
    ends = starts + lengths - 1
    ids[ends], trained[ends] = tokenizer.eos_token_id, True
    return ids, trained, lengths


def document_position_ids(lengths: list[int], seq_len: int) -> torch.Tensor:
    """``[n_blocks, seq_len]`` int64 positions of a packed stream of documents of ``lengths`` tokens cut into
    ``seq_len``-token blocks: each token's offset from the start of its document, counted from the block's
    start for a document that began in an earlier block, so positions restart at 0 at every document start
    and every block start; the padding after the last document (up to the block's end) counts as one more
    document. Transformers reads a restart as a document boundary (``find_packed_sequence_indices``).
    (:func:`~lowmem_lightning.data.tokens.flat_positions` computes them as stored.)"""
    n_blocks = max(1, -(-sum(lengths) // seq_len))
    starts = np.cumsum([0, *lengths], dtype=np.int64)
    starts = np.unique(starts[starts < n_blocks * seq_len])  # a document (or the padding) starts at each
    return torch.from_numpy(flat_positions(starts, n_blocks * seq_len, seq_len)).long().view(n_blocks, seq_len)


def _with_old_overflow(saved: dict) -> dict:
    """``saved`` block settings, with the ``overflow`` that versions before the setting applied when it lacks one:
    ``"split"`` (every record longer than ``seq_len`` was cut into blocks) with ``pack=False``."""
    if "overflow" in saved or saved.get("pack") is not False:
        return saved
    return {**saved, "overflow": "split"}


def first_document_prompts(blocks: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``, ``[n, length]`` each: the first ``length`` tokens of each block that has
    no padding there; when ``blocks`` carry ``position_ids`` (isolated documents), only the tokens before the first
    restart after position 0 (the block's first document, which the model saw alone), left-padded with ``pad_id``
    (``attention_mask`` 0) as generation wants, so no prompt joins two documents the model never saw together."""
    ids, mask = blocks["input_ids"][:, :length], blocks["attention_mask"][:, :length]
    width = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
    if "position_ids" in blocks:
        restarts = blocks["position_ids"][:, 1:length] == 0
        width = torch.where(restarts.any(dim=1), restarts.int().argmax(dim=1) + 1, width)
    columns = torch.arange(ids.shape[1])
    inside = columns < width[:, None]
    keep = (mask.bool() | ~inside).all(dim=1)
    start = (ids.shape[1] - width)[:, None]  # each prompt right-aligned: it starts at this column
    source, left = (columns - start) % ids.shape[1], columns >= start
    return {"input_ids": ids.gather(1, source).masked_fill(~left, pad_id)[keep],
            "attention_mask": left.long()[keep]}


def record_blocks(lengths: list[int], seq_len: int, pack: bool) -> list[range]:
    """The indices of the blocks :func:`pack_blocks` puts each record's tokens in, for records of ``lengths`` tokens
    (0: a record left out): packed, the blocks a record's span of the concatenated stream reaches; not packed, the
    record's own blocks (one per ``seq_len`` tokens, after those of the records before it)."""
    spans, start = [], 0
    for n in lengths:
        if pack:
            spans.append(range(start // seq_len, (start + n - 1) // seq_len + 1) if n else range(0))
            start += n
        else:
            blocks = -(-n // seq_len)
            spans.append(range(start, start + blocks))
            start += blocks
    return spans


@dataclass(frozen=True)
class PromptRecord:
    """A held-out record to answer: its ``prompt`` as rendered text, the prompt's token ``ids`` (framed as in
    training: bos first where the record had one) and the record's ``reference`` reply."""

    prompt: str
    ids: tuple[int, ...]
    reference: str


def prompt_record(
    doc: Document | ChatDocument, tokenizer: ByteTokenizer | HFTokenizer, chat: ChatTemplate
) -> tuple[PromptRecord, str]:
    """``(record, end_of_turn)``: the prompt of an instruction record (bos, then its prompt template rendered) or a
    conversation (the turns before its last assistant turn with the generation prompt,
    :meth:`~lowmem_lightning.data.chat.ChatTemplate.generation_prompt`), its reply as the reference, and the text
    that ends a reply (the chat template's end-of-turn marker; ``""`` for instruction records, which end at eos)."""
    if isinstance(doc, ChatDocument):
        prompt, ids, reference, end_of_turn = chat.generation_prompt(doc)
        return PromptRecord(prompt, tuple(ids), reference), end_of_turn
    ids, labels = encode_document(Document(doc.prompt, ""), tokenizer)
    prompt_ids = tuple(i for i, label in zip(ids, labels) if label == IGNORE_INDEX)  # bos and the prompt
    return PromptRecord(doc.prompt, prompt_ids, doc.completion), ""


class PromptRecords(Dataset):
    """Prompts to answer: item ``i`` is ``{"input_ids", "attention_mask"}`` (``[width]`` int64 each, ``width`` the
    longest prompt; left-padded with ``pad_id``, mask 0 there, as generation wants) and the strings ``prompt`` and
    ``reference`` of ``records[i]``. Batch them with :func:`collate_prompts`."""

    def __init__(self, records: list[PromptRecord], pad_id: int):
        self.records = records
        width = max(len(r.ids) for r in records)
        self.ids = torch.full((len(records), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(records), width), dtype=torch.long)
        for row, record in enumerate(records):
            self.ids[row, width - len(record.ids):] = torch.tensor(record.ids, dtype=torch.long)
            self.mask[row, width - len(record.ids):] = 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "prompt": self.records[i].prompt,
                "reference": self.records[i].reference}


def collate_prompts(items: list[dict]) -> dict:
    """A batch of :class:`PromptRecords` items: ``input_ids`` and ``attention_mask`` ``[batch, width]`` as wide as
    the batch's longest prompt (rounded up, :func:`~lowmem_lightning.data.overflow.collate_trimmed`), and the lists
    ``prompt`` and ``reference``."""
    batch = collate_trimmed([{k: item[k] for k in ("input_ids", "attention_mask")} for item in items])
    return {**batch, "prompt": [item["prompt"] for item in items],
            "reference": [item["reference"] for item in items]}


def pack_blocks(
    encoded: EncodedRecords | list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, pack: bool = True,
    isolate_documents: bool = False,
) -> PackedBlocks:
    """Blocks of ``seq_len`` tokens from encoded documents (:class:`EncodedRecords`, or ``(ids, labels)`` lists), as
    :class:`~lowmem_lightning.data.tokens.PackedBlocks`: spans of the records' arrays (no token copied), read as
    ``input_ids``, ``labels``, ``attention_mask`` ``[n_blocks, seq_len]`` int64 tensors. ``pack=True`` concatenates
    all documents first (one padded block at most); ``pack=False`` cuts each document on its own (one padded block
    per document; a record of length 0 has none). ``isolate_documents`` (with ``pack=True``) adds ``position_ids``
    (:func:`document_position_ids`) and sets the label of each token at position 0 to -100: the first token of a
    document is not predicted from the previous document's last token."""
    if not isinstance(encoded, EncodedRecords):
        encoded = EncodedRecords.from_pairs(encoded)
    if encoded.n_tokens == 0:
        raise ValueError("No tokens to train on: every document is empty.")
    if pack:
        return _packed_stream(encoded, seq_len, pad_id, isolate_documents)
    blocks_per_record = -(-encoded.lengths // seq_len)
    record = np.repeat(np.arange(len(encoded)), blocks_per_record)
    first_block = np.cumsum(blocks_per_record) - blocks_per_record
    offset = (np.arange(record.size) - first_block[record]) * seq_len  # the block's start inside its record
    lengths = np.minimum(seq_len, encoded.lengths[record] - offset)
    return PackedBlocks(encoded.ids, encoded.trained, encoded.starts[record] + offset, lengths, seq_len, pad_id)


def _packed_stream(encoded: EncodedRecords, seq_len: int, pad_id: int, isolate: bool) -> PackedBlocks:
    """:func:`pack_blocks` with ``pack=True``: the records, laid end to end, cut every ``seq_len`` tokens."""
    encoded = encoded.laid_end_to_end()
    n = encoded.n_tokens
    starts = np.arange(0, n, seq_len, dtype=np.int64)
    lengths = np.minimum(seq_len, n - starts)
    if not isolate:
        return PackedBlocks(encoded.ids, encoded.trained, starts, lengths, seq_len, pad_id)
    positions = flat_positions(encoded.starts[encoded.lengths > 0], n, seq_len)
    trained = encoded.trained & (positions != 0)  # a document's (and a block's) first token is not predicted
    return PackedBlocks(encoded.ids, trained, starts, lengths, seq_len, pad_id, positions)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` block indices: a permutation of ``range(n)`` seeded by ``seed`` puts
    ``round(val_fraction * n)`` blocks (at least 1 when ``val_fraction > 0``) in validation."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
    if n_val >= n:
        raise ValueError(
            f"Too little data for val_fraction={val_fraction}: {n} block(s) of seq_len tokens leave none "
            "for training; lower val_fraction or seq_len, or add data."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def trainable_blocks(labels: torch.Tensor) -> torch.Tensor:
    """``[n_blocks]`` bool: the block has at least one target token. A causal LM predicts token
    ``t + 1`` from position ``t``, so the label at position 0 is never a target; a block whose other
    labels are all -100 (prompt, padding) contributes no loss term and, batched alone, a NaN loss."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=1)


class TokenBlocks(Dataset):
    """Rows of packed blocks: item ``i`` is ``{key: blocks[key][i]}`` for each key of ``keys`` (default: every
    key of ``blocks``: ``input_ids``, ``labels``, ``attention_mask`` and, for isolated documents,
    ``position_ids``), each ``[seq_len]`` int64. ``blocks`` holds them all, whichever ``keys`` the items carry: a dict
    of ``[n, seq_len]`` tensors, or :class:`~lowmem_lightning.data.tokens.PackedBlocks` (what ``TextDataModule``
    keeps: ~7 bytes per token), whose item is built when asked for, with the same keys, dtypes and values."""

    def __init__(self, blocks: PackedBlocks | dict[str, torch.Tensor], keys: tuple[str, ...] | None = None):
        self.blocks = blocks
        self.keys = tuple(blocks) if keys is None else keys

    def __len__(self) -> int:
        if isinstance(self.blocks, PackedBlocks):
            return self.blocks.n_blocks
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if isinstance(self.blocks, PackedBlocks):
            return self.blocks.row(i, self.keys)
        return {k: self.blocks[k][i] for k in self.keys}


class EpochShuffleSampler(Sampler[int]):
    """Indices ``0..n-1`` in a new order each epoch: epoch ``e`` is a permutation drawn from a generator
    seeded by ``(seed, e)`` alone, so an epoch's order never depends on how the run got there.

    The single-process case (``rank`` 0 of ``num_replicas`` 1) of
    :class:`~lowmem_lightning.data.distributed.RankEpochShuffleSampler`: from position ``consumed`` of the epoch's
    order, what is left (padded with the head of the order to a multiple of ``num_replicas``, as
    ``DistributedSampler`` pads) is dealt out, rank ``r`` reading every ``num_replicas``-th index from ``r``.

    Resumable: ``state_dict()`` is ``{"epoch", "consumed", "world"}``: the epoch, the length of the prefix of its order
    read by all ranks together (``>= n``: the epoch is over), and the number of ranks that read it. After
    ``load_state_dict`` the next iteration continues that epoch after the prefix, dealt over this sampler's
    ``num_replicas`` (another world size than the state's re-deals the rest, none read twice or skipped but the
    padding). An epoch starts (or continues) when its first index is drawn, not when ``iter()`` is called, so an
    iterator made and never drawn from (Lightning drops the loader's iterator at the end of ``fit``; a
    ``state_dict()`` afterwards makes a new one) moves nothing. ``StatefulDataLoader`` saves and restores this state
    with its own.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.rank, self.num_replicas = 0, 1
        self.epoch, self._start, self.yielded = -1, 0, 0  # no epoch started; this rank's indices since _start
        self._resume_at: int | None = None
        self._rest_empty = False  # the next iteration yields nothing (finish_epoch)
        self.resumed_from_world: int | None = None  # the state's world size when it differs from num_replicas
        self.on_load = None  # called with this sampler after each load_state_dict (to align the trainer's count)

    def permutation(self, epoch: int) -> list[int]:
        """The order of epoch ``epoch`` (``[n]`` indices)."""
        key = (self.seed * 1_000_003 + epoch) % 2**63
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(key)).tolist()

    def share(self, epoch: int, consumed: int) -> list[int]:
        """This rank's indices of epoch ``epoch`` after its first ``consumed`` (read by all ranks together):
        ``ceil((n - consumed) / num_replicas)`` of them."""
        order = self.permutation(epoch)
        rest = order[consumed:]
        rest += order[: -len(rest) % self.num_replicas]
        return rest[self.rank :: self.num_replicas]

    def __iter__(self):
        if self._rest_empty:  # the trainer ended this epoch at its limit_train_batches: nothing more of it
            self._rest_empty = False
            return
        consumed, self._resume_at = self._resume_at, None
        if consumed is None or consumed >= self.n or self.epoch < 0:  # a new epoch (also after one's end)
            self.epoch, consumed = self.epoch + 1, 0
        self._start, self.yielded = consumed, 0
        for index in self.share(self.epoch, consumed):
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Lightning's number of the epoch about to start (it calls this before each one). Taken only by a sampler that
        has neither begun an epoch nor loaded a state: a fit resumed from a checkpoint of a finished epoch under
        ``max_epochs``, whose loader state Lightning does not restore, then reads epoch ``epoch``'s order (it read
        epoch 0's again). Otherwise ignored: the epoch advances with each pass and is restored from the checkpoint."""
        if self.epoch < 0 and self._resume_at is None:
            self.epoch = epoch - 1

    @property
    def consumed(self) -> int:
        """Indices of the current epoch read by all ranks together (each rank is at the same place)."""
        return self._start + self.yielded * self.num_replicas

    def state_dict(self) -> dict:
        """``{"epoch": the epoch being read (-1 before the first), "consumed": its indices read by all ranks,
        "world": num_replicas}``."""
        return {"epoch": self.epoch, "consumed": self.consumed, "world": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a :meth:`state_dict`; an older one, ``{"epoch", "yielded"}`` per rank, is taken
        as written by this world size) at the next iteration."""
        world = int(state.get("world", self.num_replicas))
        consumed = int(state["consumed"]) if "consumed" in state else int(state["yielded"]) * world
        self.epoch, self._start, self.yielded = int(state["epoch"]), consumed, 0
        self._resume_at = consumed
        self.resumed_from_world = world if world != self.num_replicas and 0 < consumed < self.n else None
        if self.on_load is not None:
            self.on_load(self)

    def end_epoch(self) -> None:
        """Take the loaded epoch as over (the trainer ended it before its last index: ``limit_train_batches``): the
        next iteration starts the next epoch, and :meth:`state_dict` says the epoch is read."""
        self._start, self.yielded, self._resume_at, self.resumed_from_world = self.n, 0, self.n, None

    def finish_epoch(self) -> None:
        """Take the loaded epoch as read now (the blocks read reach the trainer's ``limit_train_batches`` in this world
        size): the next iteration yields nothing, so the trainer's epoch ends, and the one after starts the next epoch;
        :meth:`state_dict` says the epoch is read."""
        self.end_epoch()
        self._rest_empty = True


class TrainLoader(StatefulDataLoader):
    """The training ``StatefulDataLoader``, which keeps its position when its iterator is dropped from outside.

    Lightning sets ``loader._iterator = None`` when ``fit`` ends (after shutting the workers down); a ``state_dict()``
    afterwards (``trainer.save_checkpoint`` after ``fit``) then made a new iterator, whose position was not the one
    the fit stopped at: with worker processes it counted the batches they had prefetched as read. Here the dropped
    iterator's state becomes the state the next iterator starts from, so ``state_dict()`` (and the next ``iter()``)
    continue where the dropped one stopped.
    """

    @property
    def _iterator(self):
        return self.__dict__.get("_live_iterator")

    @_iterator.setter
    def _iterator(self, iterator) -> None:
        dropped = self.__dict__.get("_live_iterator")
        if iterator is None and dropped is not None:
            self.next_iter_state = dropped.state_dict()
        self.__dict__["_live_iterator"] = iterator


PROGRESS_AFTER_S = 3.0
"""Seconds of reading and tokenizing after which ``TextDataModule.check_inputs`` says, once, what it is doing."""

PROGRESS_BYTES = 256 * 2**20
"""Data files of this many bytes or more in all make ``TextDataModule.check_inputs`` say what it is doing before
it reads them (parsing them alone takes longer than :data:`PROGRESS_AFTER_S`)."""


def _stderr_line(text: str) -> None:
    """``text`` and a newline on stderr, from rank 0 only (every rank of a DDP run reads the data)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        sys.stderr.write(text + "\n")


class _Progress:
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


def _check_template(value, name: str, required: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"Invalid {name}={value!r}: expected a string.")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as err:
        raise ValueError(f"Invalid {name}={value!r}: not a format string ({err}).") from err
    allowed = {"instruction", "input"}
    if not set(required) <= fields or not fields <= allowed:
        raise ValueError(
            f"Invalid {name}={value!r}: expected placeholders {', '.join('{' + r + '}' for r in required)} "
            f"(allowed: {{instruction}}, {{input}}), found {sorted(fields)}."
        )


def _check_int(value, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Invalid {name}={value!r}: expected an integer >= {minimum}.")


@dataclass
class _Tokenized:
    """What ``TextDataModule`` keeps of its data after tokenizing, and what its token cache holds: every block
    (before blocks without a target are left out), each record's length after ``overflow`` and whether it has a
    prompt, which kinds of record the data holds and the overflow warning's text (no text of a record: predict reads
    the held-out ones again from the files)."""

    blocks: PackedBlocks
    record_lengths: np.ndarray
    prompted: np.ndarray
    kinds: dict
    overflow_message: str | None

    def to_cache(self) -> tuple[dict, dict[str, np.ndarray]]:
        """``(meta, arrays)`` to write (:func:`~lowmem_lightning.data.token_cache.write_cache`)."""
        blocks = self.blocks
        arrays = {"ids": blocks.ids.numpy(), "trained": blocks.trained.numpy(), "block_starts": blocks.starts.numpy(),
                  "block_lengths": blocks.lengths.numpy(), "record_lengths": np.asarray(self.record_lengths),
                  "prompted": self.prompted}
        if blocks.has_positions:
            arrays["positions"] = blocks.positions.numpy()
        return {**self.kinds, "overflow_message": self.overflow_message, "seq_len": blocks.seq_len}, arrays

    @classmethod
    def from_cache(cls, meta: dict, arrays: dict[str, np.ndarray], pad_id: int) -> _Tokenized:
        """The blocks :meth:`to_cache` wrote, their token arrays memory-mapped (``read_cache``'s arrays)."""
        blocks = PackedBlocks(arrays["ids"], arrays["trained"], arrays["block_starts"], arrays["block_lengths"],
                              meta["seq_len"], pad_id, arrays.get("positions"))
        kinds = {kind: bool(meta[kind]) for kind in ("has_chat", "has_instructions", "has_plain_text")}
        return cls(blocks, arrays["record_lengths"], arrays["prompted"], kinds, meta["overflow_message"])


_PLAIN, _INSTRUCTION, _CHAT = 0, 1, 2
"""The kinds of record :func:`_noting_kinds` notes: plain text (no prompt), prompt/completion, conversation."""


def _noting_kinds(docs: Iterable[Document | ChatDocument], kinds: array) -> Iterator[Document | ChatDocument]:
    """``docs``, passed on one at a time, each one's kind (:data:`_PLAIN`, :data:`_INSTRUCTION`, :data:`_CHAT`)
    appended to ``kinds`` (one byte a record) as it passes."""
    for doc in docs:
        kinds.append(_CHAT if isinstance(doc, ChatDocument) else _INSTRUCTION if doc.prompt else _PLAIN)
        yield doc


class TextDataModule(L.LightningDataModule):
    """Causal-LM data from plain text and records (JSONL, JSON, CSV/TSV), tokenized, packed into ``seq_len``-token
    blocks.

    Args:
        data_path: A ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file (each also ``.gz``), a directory
            (every such file under it; :func:`find_data_files`), or ``"sample"``: the shipped sample data (Python
            standard library docstrings and an instruction set made from them; PSF License, see
            ``data/sample/SOURCE.md``). A local folder that happens to be named ``sample`` is reached as ``./sample``.
        tokenizer: ``"byte"`` for the built-in byte-level tokenizer (259 ids: 256 bytes + pad, bos,
            eos; no download), a local directory with a Hugging Face tokenizer, or the Hub repo id
            ``org/name[@revision]`` of one (:func:`~lowmem_lightning.data.tokenizer.load_tokenizer`).
        seq_len: Tokens per training sequence (block), >= 2.
        batch_size: Sequences per batch, >= 1.
        val_fraction: Fraction of blocks held out for validation, in [0, 1); 0 disables validation.
        seed: Seed of the train/val split and of the shuffle order of training batches (the same
            seed gives the same split and the same batches; independent of ``seed_everything``).
        num_workers: DataLoader worker processes, >= 0 (0 loads in the main process).
        pack: True concatenates documents before cutting blocks (no padding but at the very end);
            False cuts each document on its own (padding per document, documents never share a block).
        isolate_documents: With ``pack=True``, keep the documents of a block apart: batches carry
            ``position_ids`` restarting at 0 at each document start instead of ``attention_mask``, so a Hugging
            Face model (sdpa, eager, flex attention; ``use_cache=False``) attends within each document only, and
            a document's first token gets label -100 (not predicted from the previous document). False lets each
            token attend to the earlier documents of its block (the older packing; batches carry
            ``attention_mask``). No effect with ``pack=False``.
        overflow: With ``pack=False``, what happens to a record longer than ``seq_len`` tokens: ``"split"`` cuts
            it into blocks, ``"truncate"`` keeps its first ``seq_len`` tokens, ``"drop"`` leaves it out; ``None``
            splits plain text and truncates records with a prompt (instruction, chat), so no block trains a reply
            without its question. A truncated record left without a trained token is dropped; one warning gives the
            counts and the trained tokens lost (:mod:`~lowmem_lightning.data.overflow`). Must be ``None`` with
            ``pack=True``.
        prompt_template: Prompt for JSONL instruction records with an ``input``; must contain
            ``{instruction}`` and ``{input}``. The loss skips the prompt (labels -100).
        prompt_template_no_input: Prompt for instruction records without ``input``; must contain
            ``{instruction}``.
        chat_template: Chat template for ``messages`` / ``conversations`` records: a Jinja template string
            (as in a tokenizer's ``chat_template``) or the path of a ``.jinja``, ``.j2`` or ``.txt`` file holding
            one. ``None`` uses the HF tokenizer's own template, or, for the byte tokenizer and HF tokenizers
            without one, :data:`~lowmem_lightning.data.chat.DEFAULT_CHAT_TEMPLATE`. The loss covers the
            assistant turns only.
        cache_dir: Where the token cache is kept (:mod:`~lowmem_lightning.data.token_cache`): data that took
            3 s or more to read and tokenize, or files of 8 MiB or more, is written there once, and later runs with
            the same data files, tokenizer, templates, ``seq_len``, ``pack``, ``isolate_documents`` and ``overflow``
            memory-map it instead of tokenizing again (the split, ``val_fraction`` and ``seed``, is made after).
            ``None``: ``$LOWMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmem_lightning/tokens``, else
            ``~/.cache/lowmem_lightning/tokens``; ``False``: no cache. Clear it by deleting the directory.

    Raises ``ValueError`` naming the argument when a value is invalid or a path does not exist,
    in the constructor, before anything is read; :meth:`check_inputs` then checks the files' content.
    """

    progress = None
    """Takes the one line :meth:`check_inputs` says when reading and tokenizing takes more than
    :data:`PROGRESS_AFTER_S` seconds, or before it reads :data:`PROGRESS_BYTES` of files or more (``None``: written on
    stderr by rank 0; ``lowmem`` sets its own)."""

    def __init__(
        self,
        data_path: str = "sample",
        tokenizer: str = "byte",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        seed: int = 42,
        num_workers: int = 0,
        pack: bool = True,
        isolate_documents: bool = True,
        overflow: Overflow | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        prompt_template_no_input: str = DEFAULT_PROMPT_TEMPLATE_NO_INPUT,
        chat_template: str | None = None,
        cache_dir: bool | str | None = None,
    ):
        super().__init__()
        if not isinstance(data_path, (str, Path)):
            raise TypeError(f"Invalid data_path={data_path!r}: expected a path or 'sample'.")
        _check_int(seq_len, "seq_len", 2)
        _check_int(batch_size, "batch_size", 1)
        _check_int(num_workers, "num_workers", 0)
        _check_int(seed, "seed", 0)
        if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not (
            0.0 <= val_fraction < 1.0
        ):
            raise ValueError(f"Invalid val_fraction={val_fraction!r}: expected a number in [0, 1).")
        if not isinstance(pack, bool):
            raise TypeError(f"Invalid pack={pack!r}: expected True or False.")
        if not isinstance(isolate_documents, bool):
            raise TypeError(f"Invalid isolate_documents={isolate_documents!r}: expected True or False.")
        check_overflow(overflow, pack)
        _check_template(prompt_template, "prompt_template", ("instruction", "input"))
        _check_template(prompt_template_no_input, "prompt_template_no_input", ("instruction",))
        given_chat = None if chat_template is None else read_chat_template(chat_template)
        self.cache_dir = cache_directory(cache_dir)
        self.files = find_data_files(str(data_path))
        self.tokenizer = load_tokenizer(tokenizer)
        self.chat = ChatTemplate(self.tokenizer, given_chat, setting=chat_template)
        self.has_chat = False  # whether the data read holds conversations (set by check_inputs)
        self.has_instructions = False  # whether it holds instruction records (prompt templates apply; check_inputs)
        self.has_plain_text = False  # whether it holds records without a prompt (check_inputs)
        self.save_hyperparameters()
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.val_fraction, self.seed, self.pack = float(val_fraction), seed, pack
        self.isolate_documents = pack and isolate_documents
        self.overflow = overflow
        self.train_dataset: TokenBlocks | None = None
        self._held_out_prompted: list | None = None  # the wholly held-out records with a prompt (read when asked)
        self._held_out_records: list[int] = []  # their indices among the data's records
        self.val_dataset: TokenBlocks | None = None

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (259 for ``"byte"``)."""
        return self.tokenizer.vocab_size

    def special_tokens_in_data(self) -> dict[int, str]:
        """Id -> text of the tokenizer's special and added tokens (and ids past its base vocabulary) that occur in the
        data's blocks, train and held-out, padding left out: the tokens a fine-tune on it reads or emits whose
        rows a base checkpoint may never have trained (``CausalLMModule`` checks them). Reads the data first
        (:meth:`check_inputs`, once); ``{}`` for the byte tokenizer."""
        special = getattr(self.tokenizer, "special_tokens", None)
        if not callable(special):
            return {}
        tokens = special()
        self.check_inputs()
        used = torch.cat([ds.blocks.used_ids() for ds in (self.train_dataset, self.val_dataset)]).unique().tolist()
        return {i: tokens[i] for i in used if i in tokens}

    def check_inputs(self) -> None:
        """Read, tokenize, pack and split the data now (once; the result is kept for ``setup``), so
        every problem with the data surfaces before training: ``ValueError`` naming the file (and
        line) for an unreadable, empty, binary or non-UTF-8 file or a malformed record, or the
        setting to change (``val_fraction``, ``seq_len``, ``pack``, the data) when the data is too
        little for the split or no block carries a trainable label. ``lowmem fit`` calls it before
        the Trainer creates its log directory."""
        if self.train_dataset is not None:
            return
        tokens = self._tokens()
        blocks = tokens.blocks
        keep = blocks.has_targets()
        if not bool(keep.any()):
            raise ValueError(
                f"No trainable label in data_path={self.hparams.data_path!r} with seq_len={self.seq_len}, "
                f"pack={self.pack}: every {self.seq_len}-token block is prompt or padding only (labels -100), "
                "so the loss would be NaN. Raise seq_len above the prompt length, set pack=True, or use "
                "records with shorter prompts."
            )
        dropped = int((~keep).sum())
        if dropped and (not self.pack or 10 * dropped > keep.numel()):  # packed: a few such blocks are normal
            rank_zero_warn(
                f"TextDataModule: {dropped} of {keep.numel()} blocks hold no trainable label (prompt or "
                f"padding only) and are left out; raise seq_len (now {self.seq_len})"
                + ("." if self.pack else " or set pack=True to keep them."),
                category=LowMemWarning,
            )
        kept = keep.nonzero().flatten()
        try:
            train_idx, val_idx = split_indices(kept.numel(), self.val_fraction, self.seed)
        except ValueError as err:
            raise ValueError(f"data_path={self.hparams.data_path!r}, seq_len={self.seq_len}: {err}") from None
        keys = ("input_ids", "labels", "position_ids") if self.isolate_documents else None
        self.train_dataset = TokenBlocks(blocks.select(kept[train_idx]), keys)
        self.val_dataset = TokenBlocks(blocks.select(kept[val_idx]), keys)
        held = self._wholly_held_out(tokens.prompted, tokens.record_lengths, kept[val_idx])
        self._held_out_prompted = None
        self._held_out_records = held

    def _tokenize(self) -> _Tokenized:
        """Read, tokenize and cut the data into blocks (all of them, before blocks without a target are left out),
        with the overflow warning's text (said by :meth:`_tokens`). The records stream from the files through the
        tokenizer a chunk at a time (:func:`iter_documents`, :func:`encode_documents`): what is kept of each is its
        tokens and one byte saying its kind."""
        progress = _Progress(self._say, str(self.hparams.data_path), self.files)
        kinds_seen = array("B")  # per record: _PLAIN, _INSTRUCTION or _CHAT
        docs = iter_documents(self.files, self.hparams.prompt_template, self.hparams.prompt_template_no_input,
                              progress)
        encoded = encode_documents(_noting_kinds(docs, kinds_seen), self.tokenizer, self.chat,
                                   on_chunk=progress.update)
        kind = np.frombuffer(kinds_seen, dtype=np.uint8).copy() if kinds_seen else np.zeros(0, dtype=np.uint8)
        prompted = kind != _PLAIN
        kinds = {"has_chat": bool((kind == _CHAT).any()), "has_instructions": bool((kind == _INSTRUCTION).any()),
                 "has_plain_text": bool((kind == _PLAIN).any())}
        message = None
        if not self.pack:
            encoded, message = self._fit_records(prompted, encoded)
        blocks = pack_blocks(encoded, self.seq_len, self.tokenizer.pad_token_id, self.pack, self.isolate_documents)
        return _Tokenized(blocks, encoded.lengths, prompted, kinds, message)

    def _tokens(self) -> _Tokenized:
        """The data's blocks: loaded from the token cache when it holds this data's key (:meth:`_cache_key`), else
        built (:meth:`_tokenize`) and, when that took long enough or the files are large
        (:func:`~lowmem_lightning.data.token_cache.worth_caching`), written to it. A damaged cache file, or one
        that cannot be written, is said in one warning and the run goes on from the files."""
        from lowmem_lightning.data import token_cache

        if self.cache_dir is None:
            tokens = self._tokenize()
        else:
            key = token_cache.cache_key(self._cache_key())
            path = token_cache.cache_path(self.cache_dir, key)
            tokens, damaged = self._load_cache(path, key)
            if tokens is None:
                with token_cache.key_lock(self.cache_dir, key):
                    tokens, damaged_now = self._load_cache(path, key, said=damaged)  # built meanwhile by another
                    if tokens is None:
                        tokens = self._build_and_cache(path, key, damaged or damaged_now)
        self.has_chat, self.has_instructions, self.has_plain_text = (
            tokens.kinds["has_chat"], tokens.kinds["has_instructions"], tokens.kinds["has_plain_text"])
        if tokens.overflow_message:
            rank_zero_warn(tokens.overflow_message, category=LowMemWarning)
        return tokens

    def _load_cache(self, path: Path, key: str, said: bool = False) -> tuple[_Tokenized | None, bool]:
        """``(tokens, damaged)``: the cache file ``path``'s blocks (``None`` when there is none or it is damaged)
        and whether it is damaged (said in one warning unless ``said``)."""
        from lowmem_lightning.data.token_cache import CacheDamaged, read_cache

        try:
            tokens = _Tokenized.from_cache(*read_cache(path, key), self.tokenizer.pad_token_id)
        except (FileNotFoundError, NotADirectoryError):
            return None, False
        except (CacheDamaged, OSError, ValueError, KeyError, TypeError) as err:
            if not said:
                rank_zero_warn(f"TextDataModule: the token cache {path} is damaged ({err}); it is not used, the data "
                               "is read and tokenized again and the cache rewritten.", category=LowMemWarning)
            return None, True
        self._say(f"TextDataModule: using the token cache {path} ({path.stat().st_size / 2**20:.1f} MiB) for "
                  f"data_path={str(self.hparams.data_path)!r}: no file read or tokenized.")
        return tokens, False

    def _build_and_cache(self, path: Path, key: str, replace_damaged: bool) -> _Tokenized:
        """:meth:`_tokenize`, then the result written to ``path`` when worth it (or replacing a damaged file); a
        write that fails (unwritable directory, full disk) is said in one warning."""
        from lowmem_lightning.data.token_cache import worth_caching, write_cache

        started = time.monotonic()
        tokens = self._tokenize()
        seconds = time.monotonic() - started
        if not (replace_damaged or worth_caching(seconds, sum(f.stat().st_size for f in self.files))):
            return tokens
        try:
            size = write_cache(path, key, *tokens.to_cache())
        except OSError as err:
            rank_zero_warn(f"TextDataModule: cannot write the token cache in {self.cache_dir} "
                           f"({err.strerror or err}); this run goes on without it (set cache_dir to a writable "
                           "directory, or cache_dir=False to not try).", category=LowMemWarning)
            return tokens
        self._say(f"TextDataModule: token cache written: {path} ({size / 2**20:.1f} MiB); later runs on the same "
                  f"data and settings load it instead of reading and tokenizing ({seconds:.1f} s).")
        return tokens

    def _say(self, text: str) -> None:
        """One line of the data module (:attr:`progress`, else stderr from rank 0)."""
        (self.progress or _stderr_line)(text)

    def _cache_key(self) -> dict:
        """What decides the tokens and blocks (the token cache's key): the data files' fingerprints, the tokenizer's
        fingerprint and special ids, the prompt and chat templates, ``seq_len``, ``pack``, ``isolate_documents`` and
        ``overflow``. ``val_fraction`` and ``seed`` are not in it: the split is made after loading."""
        from lowmem_lightning.data.fingerprint import fingerprints

        tokenizer = self.tokenizer
        return {"data_files": fingerprints(self.files), "tokenizer": self._tokenizer_fingerprint,
                "special_ids": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id],
                "chat_template": self.chat.fingerprint(), "prompt_template": self.hparams.prompt_template,
                "prompt_template_no_input": self.hparams.prompt_template_no_input, "seq_len": self.seq_len,
                "pack": self.pack, "isolate_documents": self.isolate_documents, "overflow": self.overflow}

    def _fit_records(self, prompted: np.ndarray, encoded: EncodedRecords) -> tuple[EncodedRecords, str | None]:
        """The encoded records after ``overflow`` (:func:`~lowmem_lightning.data.overflow.fit_records`) and its
        warning's text (``None``: nothing to say); ``ValueError`` naming ``seq_len`` and ``overflow`` when it leaves
        no record."""
        kept, report = fit_records(encoded, prompted, self.seq_len, self.overflow)
        if not kept.lengths.any():
            why = "" if self.overflow == "drop" else f" (its first {self.seq_len} tokens hold no trained token)"
            raise ValueError(
                f"No trainable label in data_path={self.hparams.data_path!r} with seq_len={self.seq_len}, "
                f"pack={self.pack}, overflow={self.overflow!r}: every record is longer than seq_len and was dropped"
                f"{why}. Raise seq_len above the records' prompt length, set overflow='split' or pack=True, or use "
                "records with shorter prompts."
            )
        return kept, report.message(self.overflow, self.seq_len) or None

    def prepare_data(self) -> None:
        """Read, tokenize and cache the data (:meth:`check_inputs`) once per machine before the ranks set up: under
        DDP, Lightning calls it on each machine's local rank 0 alone, so the other ranks' ``setup`` loads the token
        cache it wrote instead of tokenizing the same files at once."""
        self.check_inputs()

    def setup(self, stage: str | None = None) -> None:
        """Read, tokenize, pack and split the data (:meth:`check_inputs`; once, later calls do nothing)."""
        self.check_inputs()

    def state_dict(self) -> dict:
        """What checkpoints keep of the data module, to notice at resume a run on other blocks: a cheap fingerprint
        of every data file (size, modification time, hash of its first and last MiB;
        :mod:`~lowmem_lightning.data.fingerprint`), of the tokenizer (its name and a hash of the files that define
        its ids), the settings that cut, order and split the blocks (``seq_len``, ``pack``, ``isolate_documents``,
        ``overflow``, ``val_fraction``, ``seed``), the prompt templates when the data holds instruction records and
        the chat template (its source and SHA-256) when it holds conversations."""
        from lowmem_lightning.data.fingerprint import fingerprints

        state = {"data_files": fingerprints(self.files), "tokenizer": self._tokenizer_fingerprint,
                 "settings": self._block_settings()}
        if self.has_chat:
            state["chat_template"] = self.chat.fingerprint()
        return state

    @functools.cached_property
    def _tokenizer_fingerprint(self) -> dict:
        from lowmem_lightning.data.fingerprint import tokenizer_fingerprint

        hf = getattr(self.tokenizer, "tokenizer", None)
        return tokenizer_fingerprint(self.tokenizer.name, tuple(getattr(hf, "vocab_files_names", {}).values()))

    def _block_settings(self) -> dict:
        """The settings besides the files and the tokenizer that decide which blocks exist and their order."""
        settings = {"seq_len": self.seq_len, "pack": self.pack, "isolate_documents": self.isolate_documents,
                    "val_fraction": self.val_fraction, "seed": self.seed}
        if not self.pack:  # packed records have no overflow (a change of pack is already said)
            settings["overflow"] = self._applied_overflow()
        if self.has_instructions:
            settings["prompt_template"] = self.hparams.prompt_template
            settings["prompt_template_no_input"] = self.hparams.prompt_template_no_input
        return settings

    def _applied_overflow(self) -> str | None:
        """What ``overflow`` does to this data (``pack=False``): the mode, ``None`` spelled out as the mode each kind
        of record gets (``"split"`` when there is no record with a prompt), so a resume compares what was done, not
        how it was asked for."""
        if self.overflow is not None:
            return self.overflow
        if not (self.has_instructions or self.has_chat):
            return "split"
        return "truncate (records with a prompt), split (plain text)" if self.has_plain_text else "truncate"

    def load_state_dict(self, state_dict: dict) -> None:
        """At resume: warn, in one message naming each change, when data files, the tokenizer, a setting that cuts,
        orders or splits the blocks, or the chat template changed since the checkpoint (a warning, as the
        checkpoint's weights and optimizer state still hold: continuing on other data is a choice a run may make,
        e.g. a longer ``seq_len``; what no longer holds is the epoch position, which now applies to other blocks).
        Keys a checkpoint lacks (written by an older version) are not compared, but for ``overflow``: a ``pack=False``
        checkpoint without it split every long record, and is compared as ``"split"``."""
        from lowmem_lightning.data.fingerprint import (
            describe_changes,
            describe_setting_changes,
            describe_template_change,
            fingerprints,
        )

        self.check_inputs()  # what the data holds decides the settings compared (templates, overflow applied)
        state = state_dict if isinstance(state_dict, dict) else {}
        saved = state.get("data_files")
        changes = describe_changes(saved, fingerprints(self.files)) if isinstance(saved, dict) else []
        if isinstance(state.get("tokenizer"), dict):
            changes += describe_template_change("tokenizer", state["tokenizer"], self._tokenizer_fingerprint,
                                                "the token ids stand for other text than in the checkpoint's run")
        if isinstance(state.get("settings"), dict):
            changes += describe_setting_changes(_with_old_overflow(state["settings"]), self._block_settings())
        if isinstance(state.get("chat_template"), dict):
            changes += describe_template_change("chat_template", state["chat_template"], self.chat.fingerprint())
        if changes:
            rank_zero_warn(
                f"TextDataModule: the data changed since the checkpoint was written, so {self._what_changes()}:\n"
                + "\n".join(f"  - {change}" for change in changes),
                category=LowMemWarning,
            )

    def _what_changes(self) -> str:
        """What other blocks mean for the run restoring the checkpoint: a fit's epoch position, or an evaluation's
        held-out blocks."""
        from lightning.pytorch.trainer.states import TrainerFn

        state = getattr(getattr(self, "trainer", None), "state", None)
        if state is None or state.fn in (None, TrainerFn.FITTING):
            return ("the resumed run does not see the blocks the checkpoint's run saw (its position in the epoch "
                    "applies to other blocks)")
        return ("the held-out blocks this run evaluates are not the ones the checkpoint's run held out (some may "
                "have been trained on)")

    def _loader(self, dataset: Dataset, shuffle: bool, trim: bool = False, collate=None) -> StatefulDataLoader:
        """A loader of ``dataset`` (shuffled: a :class:`TrainLoader`); with ``pack=False`` (or ``trim``) its batches
        leave out the columns that are padding in every row (:func:`~lowmem_lightning.data.overflow.collate_trimmed`);
        ``collate`` replaces that."""
        from lowmem_lightning.data.distributed import epoch_sampler  # each rank's share under DDP / FSDP2

        with warnings.catch_warnings():  # torchdata 0.11's constructor calls a deprecated torch API
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            return (TrainLoader if shuffle else StatefulDataLoader)(
                dataset,
                batch_size=self.batch_size,
                sampler=epoch_sampler(len(dataset), self.seed, self.trainer, self.batch_size) if shuffle else None,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                collate_fn=collate or (None if self.pack and not trim else collate_trimmed),
            )

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled training blocks, ``batch_size`` per batch, in a resumable ``StatefulDataLoader``
        (its position and shuffle state travel in Lightning checkpoints)."""
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> StatefulDataLoader | list:
        """Validation blocks in order; an empty list (no validation) when ``val_fraction`` is 0."""
        self.setup()
        if len(self.val_dataset) == 0:
            return []
        return self._loader(self.val_dataset, shuffle=False)

    def _held_out(self, stage: str) -> TokenBlocks:
        self.setup()
        if len(self.val_dataset) == 0:
            raise ValueError(
                f"Invalid val_fraction={self.val_fraction!r} for {stage}: {stage} runs on the held-out blocks, and "
                "val_fraction 0 holds none out; set --data.val_fraction (e.g. 0.05, as the model was trained with)."
            )
        return self.val_dataset

    def test_dataloader(self) -> StatefulDataLoader:
        """The held-out blocks in order (the same ones validation uses: the module has one held-out split, so a
        checkpoint trained with the same ``seed``/``val_fraction``/data never saw them); ``ValueError`` naming
        ``val_fraction`` when it is 0."""
        return self._loader(self._held_out("test"), shuffle=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        """What ``lowmem predict`` generates from, in order; ``ValueError`` naming ``val_fraction`` when it is 0.

        Instruction or chat records only (:attr:`answers_records`): the prompt of each held-out record
        (:meth:`answer_prompts`), left-padded, as batches with ``input_ids``, ``attention_mask`` and the lists
        ``prompt`` (the rendered text) and ``reference`` (the record's reply); :attr:`predict_stop_sequences` says
        where a reply ends. Plain text (also mixed with records): the first half (``seq_len // 2`` tokens) of each
        held-out block that has no padding there, as batches with ``input_ids`` and ``attention_mask``; with isolated
        documents the prompt ends where the block's second document starts (:func:`first_document_prompts`:
        left-padded, each batch as wide as its longest prompt)."""
        held_out = self._held_out("predict")
        if self.answers_records:
            return self._loader(self.answer_prompts(), shuffle=False, collate=collate_prompts)
        half = max(1, self.seq_len // 2)
        prompts = first_document_prompts(held_out.blocks.head(half), half, self.tokenizer.pad_token_id)
        return self._loader(TokenBlocks(prompts), shuffle=False, trim=True)

    @property
    def answers_records(self) -> bool:
        """Whether ``predict`` answers held-out records (:meth:`answer_prompts`): the data holds instruction or chat
        records and no plain text (mixed data, such as the shipped sample, keeps the block prompts)."""
        self.setup()
        return (self.has_chat or self.has_instructions) and not self.has_plain_text

    predict_stop_sequences: list[list[int]] = []
    """Token-id sequences that end a generated reply (set by :meth:`answer_prompts`): eos and, for chat records, the
    chat template's end-of-turn marker; empty for plain text."""

    def answer_prompts(self) -> PromptRecords:
        """The held-out records with a prompt, as :class:`PromptRecords` to answer: each instruction record's prompt
        (bos and the prompt template) and each conversation's turns before its last assistant turn, rendered with the
        generation prompt (:meth:`~lowmem_lightning.data.chat.ChatTemplate.generation_prompt`); the reference is the
        record's ``output`` / last assistant turn. A held-out record is one whose every token lies in held-out
        blocks (``pack=False``: its own blocks; ``pack=True``: every block its tokens reach), so no record the model
        trained on, even in part, is a prompt; plain-text records are left out. Records whose prompt is longer than
        ``seq_len`` (or the model's ``max_position_embeddings``) less the module's ``predict_new_tokens`` are skipped,
        counted in one ``LowMemWarning``. ``ValueError`` naming the setting when no record is left."""
        self._held_out("predict")
        limit, why = self._prompt_limit()
        answered, stops = [], {(self.tokenizer.eos_token_id,)}
        for doc in self._held_out_documents():
            record, end_of_turn = prompt_record(doc, self.tokenizer, self.chat)
            answered.append(record)
            if end_of_turn:
                stops.add(tuple(self.tokenizer.encode(end_of_turn)))
        kept = [r for r in answered if len(r.ids) <= limit]
        self.predict_stop_sequences = sorted(list(s) for s in stops)
        if len(kept) < len(answered):
            rank_zero_warn(f"TextDataModule: predict skips {len(answered) - len(kept)} of {len(answered)} held-out "
                           f"records whose prompt is longer than {limit} tokens ({why}); raise seq_len or lower "
                           "predict_new_tokens to answer them.", category=LowMemWarning)
        if not kept:
            raise ValueError(self._no_prompt_reason(len(answered), limit, why))
        return PromptRecords(kept, self.tokenizer.pad_token_id)

    def _prompt_limit(self) -> tuple[int, str]:
        """``(tokens, why)``: the longest prompt that leaves room for the module's ``predict_new_tokens`` within
        ``seq_len`` and the model's ``max_position_embeddings`` (when known), and that rule in words. ``ValueError``
        naming ``predict_new_tokens`` when it leaves no room."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        new_tokens = int(getattr(module, "predict_new_tokens", 0) or 0)
        config = getattr(getattr(module, "model", None), "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        room, why = self.seq_len, f"seq_len={self.seq_len}"
        if isinstance(positions, int) and positions < room:
            room, why = positions, f"the model's max_position_embeddings={positions}"
        if room - new_tokens < 1:
            raise ValueError(f"Invalid seq_len={self.seq_len} for predict: the module's "
                             f"predict_new_tokens={new_tokens} leave no room for a prompt within {why}; expected "
                             f"more than {new_tokens} positions (raise seq_len, or lower predict_new_tokens).")
        return room - new_tokens, f"{why} less predict_new_tokens={new_tokens}"

    def _no_prompt_reason(self, held_out: int, limit: int, why: str) -> str:
        """Why :meth:`answer_prompts` has no record to answer, with the settings to change."""
        if held_out:
            return (f"No held-out record to answer with seq_len={self.seq_len}: all {held_out} held-out records have "
                    f"a prompt longer than {limit} tokens ({why}); raise seq_len or lower predict_new_tokens.")
        return (f"No held-out record to answer in data_path={self.hparams.data_path!r} with pack={self.pack}, "
                f"seq_len={self.seq_len}, val_fraction={self.val_fraction}: no instruction or chat record lies wholly "
                "inside the held-out blocks (with pack=True a record that reaches a training block is left out, as "
                "the model saw part of it). Fine-tune with pack=False to answer held-out records: changing pack, "
                "seq_len or val_fraction now would hold out records this model trained on.")

    def _wholly_held_out(self, prompted: np.ndarray, lengths: np.ndarray, held_blocks: torch.Tensor) -> list[int]:
        """The indices of the records with a prompt (``prompted``: instruction, chat) whose every token lies in the
        blocks ``held_blocks`` (indices among all the blocks :func:`pack_blocks` cut from records of ``lengths``
        tokens, before blocks without a target were left out; with ``pack=False``, ``lengths`` are what overflow kept
        of each record, 0 for one dropped)."""
        if not prompted.any():
            return []
        held = set(held_blocks.tolist())
        spans = record_blocks(lengths.tolist(), self.seq_len, self.pack)
        return [i for i, (p, span) in enumerate(zip(prompted.tolist(), spans))
                if p and len(span) and all(b in held for b in span)]

    def _held_out_documents(self) -> list:
        """The wholly held-out records with a prompt, as documents, read again from the data files (parsed up to the
        last of them, not tokenized; the build keeps no record's text, and the token cache's key holds the files'
        fingerprints), once."""
        if self._held_out_prompted is None:
            wanted = set(self._held_out_records)
            docs = iter_documents(self.files, self.hparams.prompt_template, self.hparams.prompt_template_no_input)
            last = max(wanted, default=-1)
            self._held_out_prompted = [doc for i, doc in enumerate(itertools.islice(docs, last + 1)) if i in wanted]
        return self._held_out_prompted
