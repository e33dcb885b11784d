"""Cheap fingerprints of data files (and of the chat template), to say at resume what changed since a checkpoint.

A fingerprint is a file's size, modification time and a SHA-256 of its first and last MiB: reading at
most 2 MiB per file, it catches appends, truncations, replaced files and edits near either end (an edit
in the middle of a large file that keeps its size shows as a new modification time only). A template
setting that changes how records become tokens (``chat_template``) is kept as its source and SHA-256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["EDGE_BYTES", "fingerprint", "fingerprints", "describe_changes", "template_fingerprint",
           "describe_template_change"]

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


def describe_template_change(name: str, saved: dict, now: dict) -> list[str]:
    """One entry when a template setting differs between ``saved`` and ``now`` (both ``{"source": words,
    "sha256": hex}``: :func:`template_fingerprint`), else none."""
    if saved.get("sha256") == now["sha256"]:
        return []
    return [f"{name}: {saved.get('source')} (sha256 {str(saved.get('sha256'))[:12]}) -> {now['source']} "
            f"(sha256 {now['sha256'][:12]}): conversations are rendered differently"]
