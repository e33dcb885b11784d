"""What ``lowmem`` says about itself without importing torch or Lightning (their imports take seconds):
``lowmem --version`` (the package's version and those of the libraries a bug report needs, read from the installed
distributions' metadata), ``lowmem --help`` (the subcommands, the bundled recipes and the optimizer names; the same
text as the full parser's, which :class:`~lowmem_lightning.cli.app.LowMemCLI` builds from :data:`DESCRIPTION` and
:data:`SUBCOMMAND_HELP` too) and ``lowmem`` alone (which subcommands there are)."""

from __future__ import annotations

import os
import platform
import re
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from lowmem_lightning import __version__

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
"""The recipes shipped in the package (a link to the repository's ``configs/`` in a source checkout)."""

DESCRIPTION = (
    "Train with PyTorch Lightning on far less memory. 'lowmem SUBCOMMAND --help' lists the options "
    "of each subcommand; --config takes a YAML file or a bundled recipe by name: {recipes}. "
    "--optim NAME trains it with another optimizer: {optimizers}."
)
"""``lowmem --help``'s description (``{recipes}``, ``{optimizers}``: :func:`description` fills them in)."""

EXPORT_HELP = ("Write a checkpoint's model as a Hugging Face directory: the LoRA adapter, the merged model "
               "(--save_merged true) or the full model, and the tokenizer.")
"""One-line help of ``lowmem export``."""

SUBCOMMAND_HELP = {
    "fit": "Train: the recipe's model, data and optimizer; summary and plot at the end.",
    "validate": "Run one evaluation pass over the validation set.",
    "test": "Run one evaluation pass over the test set.",
    "predict": "Run inference over the predict set and return the predictions.",
    "export": EXPORT_HELP,
    "estimate": "Memory a recipe needs with each optimizer (model built on the meta device, no weights read).",
}
"""One-line help of each subcommand in ``lowmem --help`` (whole sentences, not cut docstrings), in its order."""

CONFIG_HELP = "Path to a configuration file in json or yaml format."
"""Help of ``-c/--config`` (LightningCLI's words)."""

VERSION_HELP = ("Print the versions of lowmem-lightning, torch, Lightning, Triton, transformers, peft, jsonargparse "
                "and Python, and exit.")
"""Help of ``-V/--version``."""

NO_SUBCOMMAND = ("expected a subcommand: fit, validate, test, predict, export or estimate "
                 "(see lowmem --help).")
"""The error of ``lowmem`` given no subcommand."""


def bundled_recipes() -> list[str]:
    """File names of the bundled YAML recipes, sorted."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))


def description() -> str:
    """:data:`DESCRIPTION` with the bundled recipes and the registered optimizer names."""
    from lowmem_lightning.optim.registry import available_optimizers

    return DESCRIPTION.format(recipes=", ".join(bundled_recipes()) or "none",
                              optimizers=", ".join(available_optimizers()))


def print_help() -> None:
    """Print ``lowmem --help`` on stdout: a parser with the full one's options and subcommands, each subcommand's
    own options left out (``lowmem SUBCOMMAND --help`` lists those), so that jsonargparse alone is imported."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lowmem_lightning.cli.terminal import WrappedHeadingsFormatter

    parser = ArgumentParser(prog="lowmem", description=description(), env_prefix="PL", default_env=False,
                            formatter_class=WrappedHeadingsFormatter)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help=CONFIG_HELP)
    subcommands = parser.add_subcommands()
    parser.add_argument("-V", "--version", action="version", version="", help=VERSION_HELP)
    for name, text in SUBCOMMAND_HELP.items():
        subcommands.add_subcommand(name, ArgumentParser(prog=f"lowmem {name}"), help=text)
    parser.print_help()

LIBRARIES = ("torch", "lightning", "triton", "transformers", "peft", "jsonargparse")
"""Distributions named in the version line, in this order."""


BUILD_VERSION_FILES = {"torch": "torch/version.py"}
"""Files in which a distribution states its version with the build (``torch 2.15.0+cu132``: which CUDA), where its
metadata may not (PyPI's CUDA wheels of torch say ``2.15.0``)."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (e.g. ``"2.13.0+cpu"``, ``"2.15.0+cu132"``: with torch's build
    from :data:`BUILD_VERSION_FILES`, as ``torch.__version__`` says it), or ``"not installed"``."""
    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
    return _with_build(found, BUILD_VERSION_FILES.get(distribution))


def _with_build(found: metadata.Distribution, version_file: str | None) -> str:
    """``found``'s version with the build tag that its ``version_file`` adds to it (read as text: nothing is
    imported), or its version as the metadata says it."""
    version = found.version
    if version_file is None or "+" in version:
        return version
    try:
        text = Path(found.locate_file(version_file)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return version
    stated = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return stated.group(1) if stated and stated.group(1).startswith(version + "+") else version


CLI_EXTRA = "pytorch-extra"
"""Lightning's extra whose requirements state the jsonargparse versions its ``LightningCLI`` supports (Lightning
2.6: ``jsonargparse[jsonnet,signatures]>=4.39.0,<5.0``; 5.0 removed ``ArgumentParser.add_instantiator``, which
``LightningCLI`` calls)."""


def unsupported_jsonargparse() -> str | None:
    """Why the installed jsonargparse cannot run ``lowmem``: a version outside the range that the installed Lightning
    states for its CLI (:data:`CLI_EXTRA`), which ``LightningCLI`` would meet with an ``AttributeError`` from inside
    its set-up, naming the versions and the ``pip install`` of this package's own range (which lies inside
    Lightning's: ``tests/test_jsonargparse_range.py``); ``None`` when it fits or when the metadata cannot be read."""
    from packaging.requirements import InvalidRequirement

    try:
        installed = metadata.version("jsonargparse")
        lightning_range = _stated_range(metadata.requires("lightning") or [], {"extra": CLI_EXTRA})
        own_range = _stated_range(metadata.requires("lowmem-lightning") or [], {"extra": ""})
    except (metadata.PackageNotFoundError, InvalidRequirement):
        return None
    if lightning_range is None or lightning_range.contains(installed, prereleases=True):
        return None
    fitting = _lower_first(own_range or lightning_range)
    return (f"jsonargparse {installed} is installed, but the CLI of Lightning {metadata.version('lightning')} "
            f"supports jsonargparse{_lower_first(lightning_range)} only (its '{CLI_EXTRA}' requirement). Install "
            f"a version it supports: pip install 'jsonargparse[signatures]{fitting}'")


def _lower_first(specifier) -> str:
    """A ``SpecifierSet`` as its bounds read, the lower first: ``>=4.44,<5`` (its ``str`` sorts them as text)."""
    return ",".join(sorted(map(str, specifier), key=lambda bound: not bound.startswith(">")))


def _stated_range(requirements: list[str], environment: dict[str, str]):
    """The version range (a ``packaging`` ``SpecifierSet``) that ``requirements`` (a distribution's
    ``Requires-Dist`` lines) state for jsonargparse under ``environment`` (its ``extra``), or ``None``."""
    from packaging.requirements import Requirement

    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "jsonargparse" and (requirement.marker is None
                                                   or requirement.marker.evaluate(environment)):
            return requirement.specifier
    return None


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


def answer(args: list[str]) -> int:
    """``lowmem`` with ``args`` one of ``[]``, ``["--version"]`` / ``["-V"]``, ``["--help"]`` / ``["-h"]``: print what
    the full parser prints for them (:data:`NO_SUBCOMMAND` on stderr, exit code 2, for no arguments); returns the
    exit code."""
    if not args:
        from lowmem_lightning.cli.terminal import usage_error

        return usage_error(NO_SUBCOMMAND)
    if args[0] in ("--version", "-V"):
        print_version()
    else:
        print_help()
    return 0
