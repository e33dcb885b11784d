"""Tokenizers for ``TextDataModule``: a built-in byte-level one (no download) and HF tokenizers (a local directory
or a Hub repo id: :mod:`lowmem_lightning.hub`).

Both expose the same small interface, which is all the data pipeline uses: ``encode(text) -> list[int]``
(no special tokens added), ``encode_batch(texts)`` (the same ids for many texts, as flat int32 arrays),
``decode(ids) -> str``, ``vocab_size`` and the ``pad_token_id``,
``bos_token_id`` and ``eos_token_id`` that mark document boundaries when sequences are packed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lowmem_lightning.remote_code import remote_code_trusted

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "BYTE_VOCAB_SIZE"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0-255 are the byte values, then ``pad`` = 256, ``bos`` = 257,
    ``eos`` = 258 (``vocab_size`` = 259).

    Needs no files and no download, never meets an unknown token, and round-trips any text
    (``decode(encode(s)) == s``). Every document packed by ``TextDataModule`` is framed as
    ``bos, bytes..., eos``, so the model sees where one document ends and the next begins.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    name = "byte"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as token ids (no special tokens added)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: the :meth:`encode` ids of every text of ``texts`` one after the other (int32) and
        how many each has (int64), without a Python list of the ids."""
        encoded = [text.encode("utf-8") for text in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32), lengths

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped (or shown as ``<pad>``/``<s>``/``</s>``)."""
        names = {self.pad_token_id: "<pad>", self.bos_token_id: "<s>", self.eos_token_id: "</s>"}
        out, chunk = [], bytearray()
        for i in map(int, ids):
            if i < 256:
                chunk.append(i)
                continue
            if i not in names:
                raise ValueError(f"Invalid token id {i}: the byte tokenizer has ids 0..{self.vocab_size - 1}.")
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if not skip_special_tokens:
                out.append(names[i])
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size


BYTE_VOCAB_SIZE = ByteTokenizer.vocab_size
"""Vocabulary size of the built-in byte tokenizer (256 bytes + pad, bos, eos): 259."""


def _refuse_empty_vocabulary(tok, name: str) -> None:
    """``ValueError`` when every token of ``tok``'s vocabulary is a special or added one: a tokenizer transformers
    built from a config without vocabulary files (it does so silently, with a handful of special tokens), which would
    encode every text as its unknown token, or as nothing."""
    special = {str(token) for token in (*tok.all_special_tokens, *tok.added_tokens_decoder.values())}
    if any(token not in special for token in tok.get_vocab()):
        return
    raise ValueError(
        f"Invalid tokenizer={name!r}: its vocabulary holds special tokens only ({type(tok).__name__} with {len(tok)} "
        "tokens), so it would encode every text as its unknown token or as nothing: its vocabulary files are missing "
        "(tokenizer.json, or the vocabulary its class needs). Save the full tokenizer there "
        "(tokenizer.save_pretrained(dir)), or set --data.tokenizer to a working tokenizer directory, a Hub repo id or "
        "'byte'."
    )


class HFTokenizer:
    """A Hugging Face tokenizer loaded from local directory ``path``, behind the ``ByteTokenizer`` interface;
    ``name`` is what the user gave (a Hub repo id resolved to ``path``; default ``path``), ``directory`` the files.

    ``encode`` adds no special tokens (the packer frames documents itself). When the tokenizer has
    no pad token, the eos token pads (labels of padding are -100 anyway); a tokenizer with neither
    eos nor pad is rejected, since packed documents need a separator.
    """

    def __init__(self, path: str | Path, name: str | None = None):
        from transformers import AutoTokenizer

        self.name = str(path) if name is None else name
        self.directory = Path(path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                           trust_remote_code=remote_code_trusted())
        except ValueError as err:
            if remote_code_trusted() or "custom code" not in str(err):
                raise
            raise ValueError(f"Invalid tokenizer={self.name!r}: it ships code of its own (tokenizer_config.json's "
                             "auto_map), which lowmem runs only when told to: set --model.trust_remote_code true "
                             "(with tokenizer: model) or --data.trust_remote_code true, as transformers' "
                             f"trust_remote_code=True, after reading the code in {path}.") from None
        tok = self.tokenizer
        _refuse_empty_vocabulary(tok, self.name)
        self.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.pad_token_id
        if self.eos_token_id is None:
            raise ValueError(f"Invalid tokenizer={self.name!r}: it defines neither an eos nor a pad token.")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: the :meth:`encode` ids of every text of ``texts`` one after the other (int32) and
        how many each has (int64). One call of the tokenizer on the list: a fast tokenizer encodes it in one call of
        its Rust backend (``encode_batch``, on its own threads), the very call it makes for a single text (which
        transformers encodes as a batch of one), so the ids are the same as :meth:`encode` gives text by text."""
        if not texts:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        rows = self.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum())), lengths

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def special_tokens(self) -> dict[int, str]:
        """Id -> text of the tokenizer's special tokens, its added tokens (chat markers, reserved tokens) and any id
        past its base vocabulary: the ids a base checkpoint may hold untrained rows for."""
        tok = self.tokenizer
        tokens = {i: str(token) for i, token in tok.added_tokens_decoder.items()}
        tokens.update(zip(tok.all_special_ids, tok.all_special_tokens))
        tokens.update((i, tok.convert_ids_to_tokens(i)) for i in range(tok.vocab_size, self.vocab_size)
                      if i not in tokens)
        return tokens


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tekken.json", "*.tiktoken")
"""The files one of which a Hugging Face tokenizer directory holds (a fast tokenizer's ``tokenizer.json``, its
config, or a slow tokenizer's vocabulary)."""


def _model_hint(path: Path) -> str:
    """For a directory with a ``config.json`` (a model checkpoint): that it looks like one saved without its
    tokenizer."""
    return ": it is a model checkpoint saved without its tokenizer" if (path / "config.json").is_file() else ""


def load_tokenizer(tokenizer: str) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> the built-in ``ByteTokenizer``; otherwise a local directory holding a Hugging Face
    tokenizer (``tokenizer.json`` / ``tokenizer_config.json``), or the Hub repo id ``org/name[@revision]`` of one
    (its tokenizer files downloaded into the HF cache, or found there when offline:
    :func:`~lowmem_lightning.hub.resolve_pretrained`), loaded with ``local_files_only=True``.

    Raises ``ValueError`` naming the value when it is neither ``"byte"``, an existing directory nor a Hub repo id
    that resolves.
    """
    from lowmem_lightning.hub import is_repo_id, resolve_pretrained

    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError(
            f"Invalid tokenizer={tokenizer!r}: expected 'byte', the path of a local tokenizer directory or a Hub "
            "repo id (org/name)."
        )
    if tokenizer == "byte":
        return ByteTokenizer()
    path = Path(tokenizer).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"Invalid tokenizer={tokenizer!r}: {path} is not a directory; expected 'byte' or a local "
            "directory saved with tokenizer.save_pretrained()."
        )
    if not path.is_dir() and not is_repo_id(tokenizer):
        raise ValueError(
            f"Invalid tokenizer={tokenizer!r}: no such directory ({path.resolve()}), and not a Hugging Face Hub "
            "repo id (org/name or org/name@revision); expected 'byte', a local directory saved with "
            "tokenizer.save_pretrained(), or a Hub repo id."
        )
    name = None if path.is_dir() else tokenizer  # a Hub id keeps its name; a local directory is named by its path
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise ValueError(
            f"Invalid tokenizer={tokenizer!r}: {path} holds no tokenizer files (none of "
            f"{', '.join(TOKENIZER_FILES)}){_model_hint(path)}. Save the tokenizer into it "
            "(tokenizer.save_pretrained(dir)), or set --data.tokenizer to a tokenizer directory, a Hub repo id or "
            "'byte'."
        )
    path = resolve_pretrained(tokenizer, "tokenizer", need="tokenizer")
    try:
        return HFTokenizer(path, name=name)
    except (OSError, ValueError) as err:
        if str(err).startswith("Invalid tokenizer="):  # said by HFTokenizer already
            raise
        broken = _broken_json_file(path) if isinstance(err, json.JSONDecodeError) else None
        if broken:
            raise ValueError(f"Invalid tokenizer={tokenizer!r}: {broken}") from err
        raise ValueError(f"Invalid tokenizer={tokenizer!r}: could not load a tokenizer from it: {err}") from err


def _broken_json_file(folder: Path) -> str | None:
    """Which JSON file of tokenizer directory ``folder`` does not parse, and where (transformers' JSON error names
    no file), with the way to a sound one; ``None`` when every one parses."""
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except (OSError, UnicodeDecodeError) as err:
            return f"{file} cannot be read as JSON text ({err}); save the tokenizer again (save_pretrained)."
        except json.JSONDecodeError as err:
            return (f"{file} is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}); save the tokenizer "
                    "again (tokenizer.save_pretrained(dir)) or copy the file anew.")  # worded as quant.loading's
    return None
