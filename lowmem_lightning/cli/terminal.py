"""Text for the terminal the ``lowmem`` command writes to: lines broken at words to its width, one-line errors, and
the help formatter of its parsers. Imports neither torch nor Lightning, so the answers that need no training code
(``lowmem`` alone, ``lowmem --help``, ``lowmem --version``: :mod:`~lowmem_lightning.cli.about`) come without their
seconds of imports."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any

from jsonargparse import DefaultHelpFormatter

__all__ = ["USAGE_LINES", "WrappedHeadingsFormatter", "for_terminal", "say", "terminal_columns", "usage_error"]


def terminal_columns() -> int | None:
    """The width of the terminal stderr writes to, or ``None`` when stderr is not a terminal (a pipe, a file)."""
    try:
        if not sys.stderr.isatty():
            return None
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):  # replaced by an object without a file descriptor, or closed
        return None


def for_terminal(text: str) -> str:
    """``text`` with each line longer than the terminal broken at spaces (continuation lines indented by two), so
    an 80-column screen shows whole words; unchanged when stderr is not a terminal (one line per message, as a
    script or log reads it). A word longer than the screen (a path) stays whole."""
    columns = terminal_columns()
    if not columns:
        return text
    return "\n".join(
        line if len(line) <= columns else textwrap.fill(
            line, width=columns, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
        for line in text.split("\n"))


def say(text: str) -> None:
    """Write ``text`` and a newline on stderr, broken to the terminal's width (:func:`for_terminal`)."""
    sys.stderr.write(for_terminal(text) + "\n")


def usage_error(message: str, prog: str = "lowmem") -> int:
    """Print ``PROG: error: MESSAGE`` (``prog``: the command, with its subcommand when there is one) on stderr;
    returns exit code 2."""
    say(f"{prog}: error: {message}")
    return 2


USAGE_LINES = 4
"""The most lines a help's usage may take before it is shortened to ``PROG [-h] [-c CONFIG] [options]``."""


class WrappedHeadingsFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter with section headings broken at words to the help's width (argparse prints a
    heading on one line: a class's description, e.g. ``--model.help CausalLMModule``'s, ran past 80 columns), and an
    argument's spellings one per line when together they do not fit (a list-typed argument has two,
    ``--trainer.callbacks.fp32_state FP32_STATE, --trainer.callbacks.fp32_state+ FP32_STATE``: 87 columns), and a
    usage of more than :data:`USAGE_LINES` lines shortened to its first words."""

    def _format_usage(self, usage: str | None, actions: Any, groups: Any, prefix: str | None) -> str:
        """argparse's usage, or the short form ``usage: lowmem fit [-h] [-c CONFIG] [options]`` (``-h`` and ``-c``
        where the parser has them) when it would take more than :data:`USAGE_LINES` lines: ``lowmem fit`` lists
        every Trainer, model and data option there, ~50 lines before the first section that lists them again."""
        full = super()._format_usage(usage, actions, groups, prefix)
        if usage is not None or full.count("\n") <= USAGE_LINES + 1:
            return full
        flags = {flag for action in actions for flag in action.option_strings}
        named = [shown for flag, shown in (("-h", "[-h]"), ("-c", "[-c CONFIG]")) if flag in flags]
        prog = self._prog.replace(" [options]", "")
        return f"{prefix or 'usage: '}{' '.join([prog, *named, '[options]'])}\n\n"

    def _format_action_invocation(self, action: Any) -> str:
        """The argument's spellings, joined by ``", "`` on one line when they fit in the columns left at this
        indent, else one per line (each ending in a comma but the last)."""
        invocation = super()._format_action_invocation(action)
        spellings = invocation.split(", ")
        if len(invocation) <= self._width - self._current_indent or len(spellings) != len(action.option_strings):
            return invocation
        return (",\n" + " " * self._current_indent).join(spellings)

    def start_section(self, heading: str | None) -> None:
        """Start a help section under ``heading``, wrapped to the columns left at this indent (minus its colon)."""
        room = self._width - self._current_indent - 1
        if heading and len(heading) > room > 20:
            heading = textwrap.fill(heading, room, subsequent_indent=" " * self._current_indent)
        super().start_section(heading)
