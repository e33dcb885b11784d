"""Regenerate the shipped sample data from the Python standard library's own docstrings.

Run from the repository root with the Python the files were made with (CPython 3.11.7):

    python lowmem_lightning/data/sample/build_sample.py

Writes ``stdlib_docs.txt`` (module, class and function docstrings of the modules in ``MODULES``,
pydoc-style, about 200 KB) and ``instructions.jsonl`` (one record per documented function:
"explain what X does", answered with the first paragraph of its docstring). The docstrings are
part of CPython's source, distributed under the PSF License Agreement (``LICENSE-PSF``).
Output is deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip",
    "heapq", "hmac", "json", "logging", "operator", "os.path", "pathlib", "pprint", "queue", "random",
    "shlex", "shutil", "statistics", "string", "tempfile", "textwrap", "threading", "urllib.parse",
    "uuid", "zipfile",
)
"""Modules whose documentation makes up the corpus, in this order."""

HERE = Path(__file__).resolve().parent
MAX_ANSWER_CHARS = 700


_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-f]+[^<>]*>")


def _signature(obj) -> str:
    """``inspect.signature`` text with object reprs (``<... at 0x7f..>``) replaced by ``<...>``."""
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return _ADDRESS.sub("<...>", text)


def _public_members(module):
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and inspect.getdoc(obj):
            if getattr(obj, "__module__", module.__name__) in (module.__name__, "posixpath", "_" + module.__name__):
                yield name, obj


def _methods(cls):
    for name, obj in sorted(vars(cls).items()):
        if not name.startswith("_") and callable(obj) and inspect.getdoc(obj):
            yield name, obj


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in text.splitlines())


def module_text(module_name: str) -> str:
    """The pydoc-style text of one module: its docstring, then each public function and class."""
    module = importlib.import_module(module_name)
    title = f"Module {module_name}"
    parts = [f"{title}\n{'=' * len(title)}\n\n{inspect.getdoc(module) or ''}\n"]
    for name, obj in _public_members(module):
        parts.append(f"{module_name}.{name}{_signature(obj)}\n{_indent(inspect.getdoc(obj))}\n")
        if inspect.isclass(obj):
            for meth_name, meth in _methods(obj):
                doc = inspect.getdoc(meth)
                parts.append(f"{module_name}.{name}.{meth_name}{_signature(meth)}\n{_indent(doc)}\n")
    return "\n".join(parts)


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())[:MAX_ANSWER_CHARS]


def instruction_records() -> list[dict]:
    """One instruction record per documented public function, alternating two phrasings."""
    records = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, obj in _public_members(module):
            if inspect.isclass(obj):
                continue
            answer = _first_paragraph(inspect.getdoc(obj))
            if len(answer) < 20:
                continue
            qualname = f"{module_name}.{name}"
            if len(records) % 2 == 0:
                records.append({"instruction": f"Explain what the Python function `{qualname}` does.",
                                "input": "", "output": answer})
            else:
                records.append({"instruction": "Explain what this Python standard library function does.",
                                "input": f"{qualname}{_signature(obj)}", "output": answer})
    return records


def main() -> None:
    """Write ``stdlib_docs.txt`` and ``instructions.jsonl`` next to this script."""
    corpus = "\n\n".join(module_text(name) for name in MODULES)
    (HERE / "stdlib_docs.txt").write_text(corpus, encoding="utf-8")
    with open(HERE / "instructions.jsonl", "w", encoding="utf-8") as f:
        for record in instruction_records():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"python {sys.version.split()[0]}: stdlib_docs.txt {len(corpus.encode())} bytes, "
          f"instructions.jsonl {len(instruction_records())} records")


if __name__ == "__main__":
    main()
