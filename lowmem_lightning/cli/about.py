"""``lowmem --version``: the package's version and those of the libraries a bug report needs, read from the
installed distributions' metadata (nothing is imported, so it answers without loading torch or Lightning)."""

from __future__ import annotations

import os
import platform
import sys
import textwrap
from importlib import metadata

from lowmem_lightning import __version__

LIBRARIES = ("torch", "lightning", "triton", "transformers", "peft", "jsonargparse")
"""Distributions named in the version line, in this order."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (e.g. ``"2.13.0+cpu"``), or ``"not installed"``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_line() -> str:
    """One line: ``lowmem-lightning 0.1.0 (torch 2.13.0+cpu, lightning 2.6.1, ..., Python 3.11.9)``."""
    libraries = ", ".join(f"{name} {installed_version(name)}" for name in LIBRARIES)
    return f"lowmem-lightning {__version__} ({libraries}, Python {platform.python_version()})"


def print_version() -> None:
    """Print :func:`version_line` on stdout: one line for a pipe or a file, broken at words to the width of a
    terminal (continuation lines indented by two, as the CLI's messages are)."""
    line = version_line()
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except (AttributeError, ValueError, OSError):
        columns = None
    if columns and len(line) > columns:
        line = textwrap.fill(line, width=columns, subsequent_indent="  ", break_on_hyphens=False)
    print(line)
