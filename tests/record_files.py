"""Data files written inside the tests: JSON Lines records as a user's ``data_path`` holds them."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, records: list) -> Path:
    """``records`` written to ``path`` one JSON object per line (UTF-8, a final newline); returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
