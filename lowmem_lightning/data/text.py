"""``TextDataModule``: plain text and records (JSONL, JSON, CSV/TSV), tokenized, packed into fixed-length blocks,
split train/val.

Pipeline (all in ``setup``, once):

1. read documents: each plain-text file is one document; each JSONL line (item of a JSON array, CSV/TSV row under
   a header naming the keys; files optionally gzipped: :mod:`~lowmem_lightning.data.formats`) is one record, either
   ``{"text": ...}``, ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional), or a
   conversation, ``{"messages": [{"role", "content"}, ...]}`` (text content parts and function calling: ``tools``,
   ``tool_calls``, ``tool`` turns) or ShareGPT's ``{"conversations": [{"from", "value"}, ...]}``
   (:mod:`~lowmem_lightning.data.chat`); JSONL, CSV and TSV records stream from their files, line by
   line, through steps 1 and 2, :data:`~lowmem_lightning.data.encoding.ENCODE_CHUNK` records at a time
   (:func:`~lowmem_lightning.data.reading.iter_documents`), so no record's text outlives its chunk;
2. tokenize: a document becomes ``bos, prompt..., completion..., eos``; labels copy the ids except
   the ``bos`` and the prompt (instruction records rendered with the prompt template), which get -100
   so the loss covers only the response; a conversation is rendered with its chat template and only
   its assistant turns (content or tool calls, and end-of-turn marker) keep their labels;
3. pack: all documents are concatenated and cut into blocks of ``seq_len`` tokens (``pack=True``), or
   each document is cut on its own (``pack=False``; a record longer than ``seq_len`` is split, truncated or dropped
   as ``overflow`` says: :mod:`~lowmem_lightning.data.overflow`); the last block of a stream is right-padded with
   the pad token, ``attention_mask`` 0 and labels -100; packed blocks with ``isolate_documents=True`` (the
   default) carry ``position_ids`` that restart at 0 where a document (or the padding) starts, and the label of
   that first token is -100, so no token attends to or is predicted from another document
   (:func:`~lowmem_lightning.data.blocks.document_position_ids`);
   Tokens are kept compact from the tokenizer on (:mod:`~lowmem_lightning.data.tokens`, ~7 bytes per token: int32
   ids, a bool "trained" flag, int16 positions; blocks are spans of those arrays); a loader's item is built as int64
   tensors when it is read (:class:`~lowmem_lightning.data.blocks.TokenBlocks`);
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
(:class:`~lowmem_lightning.data.loader.EpochShuffleSampler`, whose state travels with the loader's), not from the global
RNG.

``check_inputs()`` (called by ``setup`` and, before the Trainer is built, by ``lowmem fit``) reads and
checks every file: unreadable, empty, binary / non-UTF-8 files, malformed records (file:line, or file: record N),
malformed chat records (unknown role, non-string content or a non-text content part, a ``tools`` that is not a
list of objects, a tool call without a name, a tool result before any call, no assistant turn; file:line), too little
data
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

import functools
import itertools
import string
import sys
import time
import warnings
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lowmem_lightning.data.blocks import TokenBlocks, pack_blocks, record_blocks, split_indices
from lowmem_lightning.data.chat import ChatDocument, ChatTemplate, read_chat_template
from lowmem_lightning.data.documents import (
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_PROMPT_TEMPLATE_NO_INPUT,
    Document,
    check_record_fields,
)
from lowmem_lightning.data.encoding import encode_documents
from lowmem_lightning.data.loader import TrainLoader
from lowmem_lightning.data.overflow import Overflow, check_overflow, collate_trimmed, fit_records
from lowmem_lightning.data.prompts import PromptRecords, collate_prompts, first_document_prompts, prompt_record
from lowmem_lightning.data.reading import Progress, find_data_files, iter_documents
from lowmem_lightning.data.token_cache import CACHE_LIMIT_GB, cache_directory
from lowmem_lightning.data.tokenizer import load_tokenizer
from lowmem_lightning.data.tokens import EncodedRecords, PackedBlocks
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.remote_code import trusting_remote_code

__all__ = ["TextDataModule"]


def _with_old_overflow(saved: dict) -> dict:
    """``saved`` block settings, with the ``overflow`` that versions before the setting applied when it lacks one:
    ``"split"`` (every record longer than ``seq_len`` was cut into blocks) with ``pack=False``."""
    if "overflow" in saved or saved.get("pack") is not False:
        return saved
    return {**saved, "overflow": "split"}


def _stderr_line(text: str) -> None:
    """``text`` and a newline on stderr, from rank 0 only (every rank of a DDP run reads the data)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        sys.stderr.write(text + "\n")


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


def _limit_bytes(cache_limit_gb) -> int:
    """``cache_limit_gb`` in bytes; ``ValueError`` naming the value unless it is a positive number."""
    if not isinstance(cache_limit_gb, (int, float)) or isinstance(cache_limit_gb, bool) or not (
        0 < cache_limit_gb < float("inf")
    ):
        raise ValueError(f"Invalid cache_limit_gb={cache_limit_gb!r}: expected a positive number of GiB, the most "
                         "the token cache's files may hold in all (cache_dir=False turns the cache off).")
    return int(cache_limit_gb * 2**30)


def _removed_text(removed: list[tuple[Path, int]], cache_limit_gb: float) -> str:
    """What the token cache removed to make room, for the line saying it was written ('' when nothing)."""
    if not removed:
        return ""
    freed = sum(size for _, size in removed)
    return (f" Removed {len(removed)} least recently used cache file{'s' if len(removed) > 1 else ''} "
            f"({freed / 2**20:.1f} MiB) to stay within cache_limit_gb={cache_limit_gb}.")


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
        data_path: A ``.txt`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` file (each also ``.gz``) or, with
            pyarrow, a ``.parquet`` file, a directory (every such file under it;
            :func:`~lowmem_lightning.data.reading.find_data_files`), a Hugging Face Hub dataset id (``org/name``,
            ``org/name@revision``: its such files, downloaded into the HF cache) or a file or folder of one
            (``hf://datasets/org/name[@revision]/path``), or ``"sample"``: the
            shipped sample data (Python standard library docstrings and an instruction set made from them; PSF License,
            see ``data/sample/SOURCE.md``). A local folder that happens to be named ``sample`` is reached as
            ``./sample``.
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
        record_fields: The data's own record keys for the ones this module reads, ``{our key: theirs}``: Dolly's
            ``{"input": "context", "output": "response"}``, GSM8K's ``{"instruction": "question", "output":
            "answer"}``, ``{"messages": "dialog"}`` (our keys: :data:`~lowmem_lightning.data.documents.RECORD_FIELDS`).
            ``None``: the records use ours. A record none of whose keys are read is refused naming its keys and, when
            they look like an instruction record's, the ``record_fields`` that reads it.
        chat_template: Chat template for ``messages`` / ``conversations`` records: a Jinja template string
            (as in a tokenizer's ``chat_template``) or the path of a ``.jinja``, ``.j2`` or ``.txt`` file holding
            one. ``None`` uses the HF tokenizer's own template, or, for the byte tokenizer and HF tokenizers
            without one, :data:`~lowmem_lightning.data.chat.DEFAULT_CHAT_TEMPLATE`. The loss covers the
            assistant turns only.
        cache_dir: Where the token cache is kept (:mod:`~lowmem_lightning.data.token_cache`): data that took
            3 s or more to read and tokenize, or files of 8 MiB or more, is written there once, and later runs with
            the same data files, tokenizer, templates, ``record_fields``, ``seq_len``, ``pack``,
            ``isolate_documents`` and ``overflow``
            memory-map it instead of tokenizing again (the split, ``val_fraction`` and ``seed``, is made after).
            ``None``: ``$LOWMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmem_lightning/tokens``, else
            ``~/.cache/lowmem_lightning/tokens``; ``False``: no cache. Clear it by deleting the directory.
        cache_limit_gb: GiB the cache directory's files may hold in all (a positive number): a new cache file
            makes room by removing the least recently used ones, and data whose file alone would be larger is not
            cached. No file is written that would leave less than 2 GiB or 5% of its disk free (checkpoints need
            the room): :mod:`~lowmem_lightning.data.token_cache`.
        trust_remote_code: Run the code a tokenizer ships of its own (``tokenizer_config.json``'s ``auto_map``), as
            transformers' ``trust_remote_code=True``; ``False`` refuses such a tokenizer at once, naming this option.
            ``lowmem`` sets it with ``--model.trust_remote_code true`` when ``tokenizer: model``.

    Raises ``ValueError`` naming the argument when a value is invalid or a path does not exist,
    in the constructor, before anything is read; :meth:`check_inputs` then checks the files' content.
    """

    progress = None
    """Takes the one line :meth:`check_inputs` says when reading and tokenizing takes more than
    :data:`~lowmem_lightning.data.reading.PROGRESS_AFTER_S` seconds, or before it reads
    :data:`~lowmem_lightning.data.reading.PROGRESS_BYTES` of files or more (``None``: written on stderr by rank 0;
    ``lowmem`` sets its own)."""

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
        record_fields: dict[str, str] | None = None,
        chat_template: str | None = None,
        cache_dir: bool | str | None = None,
        cache_limit_gb: float = CACHE_LIMIT_GB,
        trust_remote_code: bool = False,
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
        self.record_fields = check_record_fields(record_fields)
        """``record_fields`` as given (checked), or ``None``."""
        given_chat = None if chat_template is None else read_chat_template(chat_template)
        self.cache_dir = cache_directory(cache_dir)
        self.cache_limit_bytes = _limit_bytes(cache_limit_gb)
        self.files = find_data_files(str(data_path))
        if not isinstance(trust_remote_code, bool):
            raise TypeError(f"Invalid trust_remote_code={trust_remote_code!r}: expected True or False.")
        with trusting_remote_code(trust_remote_code):
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

    def max_position_id(self) -> int | None:
        """The largest position id the training and validation blocks give the model (``seq_len - 1``, or with
        ``isolate_documents`` the longest document's or padding's run within a block, less one: positions restart at
        each); ``None`` before the data is read (:meth:`check_inputs`). ``CausalLMModule`` checks it against the
        model's position table."""
        if self.train_dataset is None:
            return None
        return max(ds.blocks.max_position_id() for ds in (self.train_dataset, self.val_dataset))

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
        """Read, tokenize and cut the data into blocks (all of them, before blocks without a target are left out), with
        the overflow warning's text (said by :meth:`_tokens`). The records stream from the files through the tokenizer a
        chunk at a time (:func:`~lowmem_lightning.data.reading.iter_documents`,
        :func:`~lowmem_lightning.data.encoding.encode_documents`): what is kept of each is its tokens and one byte
        saying its kind."""
        progress = Progress(self._say, str(self.hparams.data_path), self.files)
        kinds_seen = array("B")  # per record: _PLAIN, _INSTRUCTION or _CHAT
        docs = iter_documents(self.files, self.hparams.prompt_template, self.hparams.prompt_template_no_input,
                              progress, self.record_fields)
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
        """:meth:`_tokenize`, then the result written to ``path`` when worth it (or replacing a damaged file) and
        when it has room (:meth:`_room_for`); a write that fails (unwritable directory, full disk) is said in one
        warning."""
        from lowmem_lightning.data.token_cache import worth_caching, write_cache

        started = time.monotonic()
        tokens = self._tokenize()
        seconds = time.monotonic() - started
        if not (replace_damaged or worth_caching(seconds, sum(f.stat().st_size for f in self.files))):
            return tokens
        meta, arrays = tokens.to_cache()
        removed = self._room_for(path, key, meta, arrays)
        if removed is None:
            return tokens
        try:
            size = write_cache(path, key, meta, arrays)
        except OSError as err:
            rank_zero_warn(f"TextDataModule: cannot write the token cache in {self.cache_dir} "
                           f"({err.strerror or err}); this run goes on without it (set cache_dir to a writable "
                           "directory, or cache_dir=False to not try).", category=LowMemWarning)
            return tokens
        self._say(f"TextDataModule: token cache written: {path} ({size / 2**20:.1f} MiB); later runs on the same "
                  f"data and settings load it instead of reading and tokenizing ({seconds:.1f} s)."
                  + _removed_text(removed, self.hparams.cache_limit_gb))
        return tokens

    def _room_for(self, path: Path, key: str, meta: dict, arrays: dict) -> list[tuple[Path, int]] | None:
        """Make room for the cache file of ``(meta, arrays)``: remove the least recently used cache files that would
        take the directory past ``cache_limit_gb`` (the removed ``(path, bytes)`` returned); ``None``, with one line
        saying why, when the file is not to be written (larger than the limit alone, or the disk would keep too
        little free)."""
        from lowmem_lightning.data import token_cache

        size = token_cache.file_size(key, meta, arrays)
        plan = token_cache.eviction_plan(self.cache_dir, size, self.cache_limit_bytes, keep=path)
        if plan is None:
            self._say(f"TextDataModule: the token cache is not written: this data's file would take "
                      f"{size / 2**30:.2f} GiB, more than cache_limit_gb={self.hparams.cache_limit_gb} "
                      "(--data.cache_limit_gb raises it).")
            return None
        shortfall = token_cache.disk_shortfall(self.cache_dir, size, sum(freed for _, freed in plan))
        if shortfall is not None:
            self._say(f"TextDataModule: the token cache is not written: its {size / 2**30:.2f} GiB would leave "
                      f"{max(shortfall[0], 0) / 2**30:.2f} GiB free on the disk of {self.cache_dir}, which keeps "
                      f"{shortfall[1] / 2**30:.2f} GiB free for checkpoints (--data.cache_dir elsewhere, or "
                      "--data.cache_dir false).")
            return None
        removed = []
        for old, freed in plan:
            try:
                old.unlink()
            except FileNotFoundError:  # removed meanwhile by another process
                continue
            except OSError as err:  # another user's file in a shared cache directory: the limit cannot be kept
                self._say(f"TextDataModule: the token cache is not written: {old} cannot be removed to stay within "
                          f"cache_limit_gb={self.hparams.cache_limit_gb} ({err.strerror or err}); raise "
                          "--data.cache_limit_gb, or set --data.cache_dir to a directory of your own.")
                return None
            removed.append((old, freed))
        return removed

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
                "pack": self.pack, "isolate_documents": self.isolate_documents, "overflow": self.overflow,
                **({"record_fields": self.record_fields} if self.record_fields else {})}

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
        if self.record_fields:
            settings["record_fields"] = self.record_fields
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
        """A loader of ``dataset`` (shuffled: a :class:`~lowmem_lightning.data.loader.TrainLoader`); with ``pack=False``
        (or ``trim``) its batches leave out the columns that are padding in every row
        (:func:`~lowmem_lightning.data.overflow.collate_trimmed`); ``collate`` replaces that. Its own generator (seeded
        by ``seed``) gives each iterator its base seed: a loader without one draws it from torch's global generator
        whenever an epoch or a validation starts, and a resumed run, which saved that generator's state in its
        checkpoint (:mod:`~lowmem_lightning.callbacks.rng_state`), would then draw other dropout masks."""
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
                generator=torch.Generator().manual_seed(self.seed),
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
        ``prompt`` (the rendered text) and ``reference`` (the record's reply); :attr:`predict_stop_sequences` says where
        a reply ends. Plain text (also mixed with records): the first half (``seq_len // 2`` tokens) of each held-out
        block that has no padding there, as batches with ``input_ids`` and ``attention_mask``; with isolated documents
        the prompt ends where the block's second document starts
        (:func:`~lowmem_lightning.data.prompts.first_document_prompts`: left-padded, each batch as wide as its longest
        prompt)."""
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
        """The held-out records with a prompt, as :class:`~lowmem_lightning.data.prompts.PromptRecords` to answer: each
        instruction record's prompt (bos and the prompt template) and each conversation's turns before its last
        assistant turn, rendered with the generation prompt
        (:meth:`~lowmem_lightning.data.chat.ChatTemplate.generation_prompt`); the reference is the record's ``output`` /
        last assistant turn. A held-out record is one whose every token lies in held-out blocks (``pack=False``: its own
        blocks; ``pack=True``: every block its tokens reach), so no record the model trained on, even in part, is a
        prompt; plain-text records are left out. Records whose prompt is longer than ``seq_len`` (or the model's
        ``max_position_embeddings``) less the module's ``predict_new_tokens`` are skipped, counted in one
        ``LowMemWarning``. ``ValueError`` naming the setting when no record is left."""
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
        blocks ``held_blocks`` (indices among all the blocks :func:`~lowmem_lightning.data.blocks.pack_blocks` cut from
        records of ``lengths`` tokens, before blocks without a target were left out; with ``pack=False``, ``lengths``
        are what overflow kept of each record, 0 for one dropped)."""
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
            docs = iter_documents(self.files, self.hparams.prompt_template, self.hparams.prompt_template_no_input,
                                  record_fields=self.record_fields)
            last = max(wanted, default=-1)
            self._held_out_prompted = [doc for i, doc in enumerate(itertools.islice(docs, last + 1)) if i in wanted]
        return self._held_out_prompted
