"""Cheap fingerprints of data files and of the data settings, to say at resume what changed since a checkpoint.

A fingerprint is a file's size, modification time and a SHA-256 of its first and last MiB: reading at
most 2 MiB per file, it catches appends, truncations, replaced files and edits near either end (an edit
in the middle of a large file that keeps its size shows as a new modification time only). A template
setting that changes how records become tokens (``chat_template``) is kept as its source and SHA-256, the
tokenizer as its name and a SHA-256 of what defines its ids (:func:`tokenizer_fingerprint`), and the settings
that cut, order and split the blocks (``seq_len``, ``seed``, ...) as their values (:func:`describe_setting_changes`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["EDGE_BYTES", "TOKENIZER_FILES", "fingerprint", "fingerprints", "describe_changes",
           "template_fingerprint", "describe_template_change", "tokenizer_fingerprint", "describe_setting_changes"]

EDGE_BYTES = 1 << 20
"""Bytes hashed at each end of a file (1 MiB)."""


def fingerprint(path: Path | str) -> dict:
    """``{"size": bytes, "mtime_ns": int, "edges": sha256 hex of the first and last EDGE_BYTES}`` of ``path``."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges": digest.hexdigest()}


def fingerprints(files: list[Path]) -> dict[str, dict]:
    """``{resolved path: fingerprint}`` of every file (a file that cannot be read is left out)."""
    out = {}
    for path in files:
        try:
            out[str(Path(path).resolve())] = fingerprint(path)
        except OSError:
            continue
    return out


def _change(old: dict, new: dict) -> str | None:
    if old.get("size") != new["size"]:
        return f"size {old.get('size')} -> {new['size']} bytes"
    if old.get("edges") != new["edges"]:
        return "content changed (same size)"
    if old.get("mtime_ns") != new["mtime_ns"]:
        return "modified since (same size, same first and last MiB)"
    return None


def describe_changes(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """One entry per data file that differs between ``saved`` and ``now`` (both :func:`fingerprints`):
    changed, missing or new. A file found under another path with the same size and content is not a change."""
    moved = {(f["size"], f["edges"]) for f in saved.values()} & {(f["size"], f["edges"]) for f in now.values()}
    out = []
    for path, old in saved.items():
        if path in now:
            change = _change(old, now[path])
            if change:
                out.append(f"{path}: {change}")
        elif (old.get("size"), old.get("edges")) not in moved:
            out.append(f"{path}: no longer in the data")
    for path, new in now.items():
        if path not in saved and (new["size"], new["edges"]) not in moved:
            out.append(f"{path}: new since the checkpoint")
    return out


def template_fingerprint(text: str, source: str) -> dict:
    """``{"source": source, "sha256": hex digest of text}`` of a template in use (``source``: where it came from)."""
    return {"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def describe_template_change(name: str, saved: dict, now: dict,
                             effect: str = "conversations are rendered differently") -> list[str]:
    """One entry (ending in ``effect``) when a template setting, or the tokenizer, differs between ``saved`` and
    ``now`` (both ``{"source": words, "sha256": hex}``: :func:`template_fingerprint`), else none."""
    if saved.get("sha256") == now["sha256"]:
        return []
    return [f"{name}: {saved.get('source')} (sha256 {str(saved.get('sha256'))[:12]}) -> {now['source']} "
            f"(sha256 {now['sha256'][:12]}): {effect}"]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
"""Files of a Hugging Face tokenizer directory hashed besides its own vocabulary files (``vocab_files_names``)."""


def _tokenizer_file_bytes(path: Path) -> bytes:
    """The bytes of a tokenizer file; ``tokenizer_config.json`` without its ``chat_template`` (fingerprinted on
    its own, and only where the data holds conversations)."""
    raw = path.read_bytes()
    if path.name != "tokenizer_config.json":
        return raw
    config = json.loads(raw)
    config.pop("chat_template", None)
    return json.dumps(config, sort_keys=True).encode("utf-8")


def tokenizer_fingerprint(name: str, vocab_files: tuple[str, ...] = ()) -> dict:
    """``{"source": "tokenizer=NAME", "sha256": hex}`` of the tokenizer in use: for ``"byte"`` the hash of the name
    (its ids are fixed); for a Hugging Face tokenizer directory ``name``, the hash of its vocabulary files
    (``vocab_files``: e.g. ``vocab.json``, ``merges.txt``, ``tokenizer.model``) and :data:`TOKENIZER_FILES`, those
    present, by file name and content, so the same files in another directory are the same tokenizer. A Hub repo id
    ``name`` hashes the files of its snapshot in the HF cache (:func:`~lowmem_lightning.hub.resolve_pretrained`, as
    ``load_tokenizer`` resolved it), so the same snapshot gives the same fingerprint in every run."""
    digest = hashlib.sha256(name.encode("utf-8") if name == "byte" else b"")
    if name != "byte":
        from lowmem_lightning.hub import local_path

        directory = local_path(name, "tokenizer", "tokenizer")
        for file_name in sorted(set(vocab_files) | set(TOKENIZER_FILES)):
            path = directory / file_name
            if path.is_file():
                digest.update(file_name.encode("utf-8") + b"\0" + _tokenizer_file_bytes(path) + b"\0")
    return {"source": f"tokenizer={name!r}", "sha256": digest.hexdigest()}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_setting_changes(saved: dict, now: dict) -> list[str]:
    """One entry ``"KEY: SAVED -> NOW"`` per setting (``{name: value}``) whose value differs between ``saved`` and
    ``now``; a key ``saved`` lacks (a checkpoint written before it was kept) is not a change."""
    return [f"{key}: {_short(saved[key])} -> {_short(value)}"
            for key, value in now.items() if key in saved and saved[key] != value]
