"""What the ``lowmem`` command says: one-line parser errors (exit 2), notices of what it changed in a
config, and the short forms of exceptions and checkpoint differences that its messages quote."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lowmem_lightning.cli import terminal
from lowmem_lightning.cli.config_edits import import_class
from lowmem_lightning.cli.resume import UNSET
from lowmem_lightning.cli.terminal import WrappedHeadingsFormatter, for_terminal, say, usage_error
from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = ["LowMemArgumentParser", "WrappedHeadingsFormatter", "condense_message", "for_terminal",
           "log_lines_for_terminal", "notice",
           "one_line_for_ours", "our_warnings_in_one_line", "say", "short", "listing", "shown", "usage_error",
           "with_setting"]


NOTICE_HOLDER: Any = None
"""While a :class:`~lowmem_lightning.cli.held_logs.HeldLogs` holds, it (its ``note``) takes the notices too."""


def notice(message: str | None) -> None:
    """One message on stderr saying what the command changed in the config (``None``: nothing); held with
    Lightning's set-up messages while :data:`NOTICE_HOLDER` is set (a refused command prints only its error).
    Printed by rank 0 only: under ``ddp`` every rank runs the command (Lightning's ``rank_zero_only.rank``)."""
    if not message or getattr(rank_zero_only, "rank", 0) != 0:
        return
    if NOTICE_HOLDER is not None:
        NOTICE_HOLDER.note(for_terminal(f"lowmem: {message}") + "\n")
    else:
        say(f"lowmem: {message}")


_format_others: Callable[..., str] = warnings.formatwarning
"""How warnings other than ours are formatted while :func:`one_line_for_ours` formats (the function it replaced)."""


def one_line_for_ours(message, category, filename, lineno, line=None) -> str:
    """``warnings.formatwarning`` of the ``lowmem`` command: a
    :class:`~lowmem_lightning.lowmem_warning.LowMemWarning` (the warnings this package raises) as
    ``lowmem: warning: MESSAGE`` and a newline, like the command's notices, instead of Python's ``FILE:LINE:
    UserWarning: MESSAGE`` and the source line; any other warning (Lightning's, torch's, transformers') as the
    replaced function formats it, on a terminal with its file named from its package (no site-packages prefix) and
    broken at words like ours (:func:`for_terminal`): the terminal split its 86-column location mid-word."""
    if issubclass(category, LowMemWarning):
        return for_terminal(f"lowmem: warning: {message}") + "\n"
    text = _format_others(message, category, filename, lineno, line)
    if not terminal.terminal_columns():
        return text
    if text.startswith(f"{filename}:"):  # Lightning's and Python's formats start with the location
        text = _as_imported(filename) + text[len(filename):]
    return for_terminal(text.rstrip("\n")) + "\n"


def _as_imported(filename: str) -> str:
    """``filename`` relative to the longest ``sys.path`` entry it lies under, as its package spells it
    (``lightning/pytorch/loops/fit_loop.py`` for a file in site-packages: its full path alone is wider than an
    80-column screen), or as given when it lies under none."""
    roots = [os.path.join(os.path.abspath(entry), "") for entry in sys.path if entry]
    under = [root for root in roots if filename.startswith(root)]
    return filename[len(max(under, key=len)):] if under else filename


def our_warnings_in_one_line() -> Callable[[], None]:
    """Install :func:`one_line_for_ours` as ``warnings.formatwarning`` (``warnings.showwarning`` stays: the
    warnings filters still decide what is shown, and where); returns the function that puts the previous one back.
    Installed by the ``lowmem`` command only: the library never changes how warnings show. A module-level function,
    not a closure: a ``ddp_spawn`` rank gets objects that saved it pickled."""
    global _format_others
    if warnings.formatwarning is one_line_for_ours:
        return lambda: None
    previous = _format_others = warnings.formatwarning

    def restore() -> None:
        if warnings.formatwarning is one_line_for_ours:
            warnings.formatwarning = previous

    warnings.formatwarning = one_line_for_ours
    return restore


LOGGERS_ON_STDERR = ("lightning.pytorch", "lightning.fabric")
"""Loggers whose stderr handler prints Lightning's and this package's info lines (``rank_zero_info``) in a fit."""


class _BreakForTerminal(logging.Filter):
    """Rewrites a record's message with :func:`for_terminal` (broken at words to the terminal's width)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        broken = for_terminal(message)
        if broken != message:
            record.msg, record.args = broken, ()
        return True


def log_lines_for_terminal() -> Callable[[], None]:
    """Break the info lines Lightning's loggers print on stderr (:data:`LOGGERS_ON_STDERR`: Lightning's own, and the
    package's ``rank_zero_info`` lines such as a resume's notes) at words when stderr is a terminal, as
    :func:`one_line_for_ours` does for warnings; piped output is unchanged. Returns the function that removes it.
    Installed by the ``lowmem`` command only."""
    installed = []
    for name in LOGGERS_ON_STDERR:
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "stream", None) is sys.stderr and not any(
                    isinstance(f, _BreakForTerminal) for f in handler.filters):
                breaker = _BreakForTerminal()
                handler.addFilter(breaker)
                installed.append((handler, breaker))

    def remove() -> None:
        for handler, breaker in installed:
            handler.removeFilter(breaker)

    return remove


class LowMemArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one short message (no 90-line usage dump), exit code 2, and whose
    help keeps section headings within the terminal's width (:class:`WrappedHeadingsFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", WrappedHeadingsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        """Print ``PROG: error: MESSAGE`` and a hint to ``--help``, then exit with code 2."""
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        say(f"{prog}: error: {condense_message(message)}\n(all options: {prog} --help)")
        self.exit(2)


_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|^\s*Subtypes:|^\s*Errors:\s*$|"
    r"Expected a <class 'NoneType'>|^\s*Given value( type)?:|Expected a path but .* not accessible or invalid"
)


_SHORTCUT_SUBKEY = re.compile(
    r"Parser key \"(optim|lr|step_in_backward)\":.*NestedArg\(key='([\w.]+)', val=(.+?)\)\s*$", re.S)
_WHERE = "when it is the config's last callback, else in the YAML"


def _shortcut_subkey(message: str) -> str | None:
    """``--optim.lr 1e-4`` (a key under a shortcut that takes one value): what to write instead, or ``None``."""
    found = _SHORTCUT_SUBKEY.search(message)
    if found is None:
        return None
    flag, key, value = found.groups()
    value = value.strip().strip("'")
    if flag != "optim":
        return f"--{flag}.{key}={value}: --{flag} takes one value and has no keys (--{flag} VALUE)."
    said = f"--optim.{key}={value}: --optim takes an optimizer name only (--optim NAME)."
    if key in ("lr", "step_in_backward"):
        return f"{said} Write --{key} {value}."
    callback = import_class("lowmem_lightning.callbacks.LowMemOptimizerCallback")
    if callback is not None and key in _init_arg_names(callback):
        return f"{said} Set the LowMemOptimizerCallback's {key}: --trainer.callbacks.{key} {value} {_WHERE}."
    kwargs = "'{\"" + key + "\": " + value + "}'"
    return (f"{said} Set it in the LowMemOptimizerCallback's optimizer_kwargs: --trainer.callbacks.optimizer_kwargs "
            f"{kwargs} {_WHERE}.")


_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\](\s*\n\s*- Expected a <class 'NoneType'>)?")


def _literal_choices(found: re.Match) -> str:
    """``Expected a typing.Literal['a', 'b']`` (and the ``None`` of an Optional) as ``Expected one of: 'a', 'b',
    null``: the choices as YAML / the command line spell them."""
    return f"Expected one of: {found.group(1)}" + (", null" if found.group(2) else "")


_CLASS_PROBLEM = re.compile(r"\s*- Problem with given class_path '")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _items(lines: list[str], start: int) -> list[tuple[int, int]]:
    """``(first, end)`` line ranges of the ``- `` items of the list that holds line ``start`` (one item each)."""
    indent = _indent(lines[start])
    first = start
    while first > 0 and _indent(lines[first - 1]) >= indent:
        first -= 1
    items, end = [], first
    while end < len(lines) and _indent(lines[end]) >= indent:
        begin, end = end, end + 1
        while end < len(lines) and _indent(lines[end]) > indent:
            end += 1
        items.append((begin, end))
    return items


def _only_the_given_class(message: str) -> str:
    """A Union error reduced to its given class's problem when that class took the key and refused its value
    (``- Problem with given class_path 'X': ... Parser key "KEY": ...``): the other alternatives jsonargparse tried
    (the base ``lightning.Callback``, which takes no ``KEY``; a single callback for a list of them) only hid it, as
    for ``--trainer.callbacks.bf16_rounding BAD``."""
    lines = message.splitlines()
    dropped: set[int] = set()
    for start in (i for i, line in enumerate(lines) if _CLASS_PROBLEM.match(line)):
        items = _items(lines, start)
        mine = next((first, end) for first, end in items if first == start)
        if 'Parser key "' in "\n".join(lines[mine[0]:mine[1]]):
            dropped.update(i for first, end in items if first != start for i in range(first, end))
    return "\n".join(line for i, line in enumerate(lines) if i not in dropped)


def condense_message(message: str) -> str:
    """jsonargparse's nested Union error reports as one line: the innermost problems only."""
    subkey = _shortcut_subkey(message)
    if subkey is not None:
        return subkey
    message = _LITERAL.sub(_literal_choices, _only_the_given_class(message))
    lines = [re.sub(r"^(- )+", "", line.strip()).strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not _NOISE.search(line)]
    text = " ".join(kept) if kept else message.strip()
    text = re.sub(r"Expected an? <class '([\w.]+)'>", r"Expected \1", text)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    given = re.search(r"(?:Given|Got) value: (.+)", message)
    value = given.group(1).strip() if given else None
    if value and not re.search(rf"(?:Given|Got) value: {re.escape(value)}", text):
        # the union's lines that held the value were dropped as noise (a choice may contain the value: 'flash')
        text = f"{text.rstrip('.')}. Given value: {value}"
    return text + _allowed_keys_hint(text)


def _init_arg_names(cls: type) -> list[str]:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _allowed_keys_hint(text: str) -> str:
    """For an unknown key, the accepted keys of that class (or the closest Trainer arguments)."""
    unknown = re.search(r"Option '([\w.]+)' is not accepted|does not accept option '([\w.]+)'", text)
    if unknown is None:
        return ""
    key = unknown.group(1) or unknown.group(2)
    for owner in reversed(re.findall(r"class_path '([\w.]+)'", text)):  # the innermost class that takes any
        names = _init_arg_names(cls) if (cls := import_class(owner)) is not None else []
        if names:
            return f" Accepted by {owner.rsplit('.', 1)[-1]}: {', '.join(names)}."
    if key.startswith("trainer."):
        from lightning.pytorch import Trainer

        close = difflib.get_close_matches(key.split(".", 1)[1], _init_arg_names(Trainer), n=3)
        return f" Did you mean: {', '.join('trainer.' + c for c in close)}?" if close else ""
    return ""


def short(err: BaseException) -> str:
    """The message of an exception chain that says what was wrong, one paragraph: the innermost cause through the
    wrappers (jsonargparse's, Lightning's) down to what the constructor said, and no deeper than a message of this
    package (which names the argument and holds its cause's words: ``Invalid tokenizer='tok': could not load a
    tokenizer from it: Expecting property name ...``, not the ``json`` error alone)."""
    while not _raised_here(err) and isinstance(err.__cause__, (ValueError, TypeError)):
        err = err.__cause__
    text = str(err).strip()
    return text if text else type(err).__name__


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's code (the innermost frame of its traceback)."""
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("lowmem_lightning.")


def listing(diffs: list) -> str:
    """``(key, checkpoint value, run value)`` triples as one clause each, joined by semicolons."""
    return "; ".join(f"model.{key}={shown(a)} in the checkpoint, {shown(b)} in this run" for key, a, b in diffs)


def shown(value: Any) -> str:
    """A config value as a message shows it (``'unset'`` for a key one side lacks)."""
    return "unset" if value is UNSET else repr(value) if isinstance(value, str) else str(value)


UNNAMED_SETTINGS = {"No supported gpu backend found": "accelerator"}
"""Lightning messages that name no argument, and the Trainer argument each one is about."""


def _available_accelerators() -> list[str]:
    """The Trainer accelerators this machine can run (Lightning's registry, each asked ``is_available()``)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    names = sorted(AcceleratorRegistry.available_accelerators())
    return [name for name in names if AcceleratorRegistry[name]["accelerator"].is_available()]


def _unnamed_setting(text: str) -> str | None:
    """The Trainer argument a Lightning message is about when the message itself names none."""
    return next((name for start, name in UNNAMED_SETTINGS.items() if text.startswith(start)), None)


def with_setting(text: str, group: str, settings: Any) -> str:
    """``text`` (a message of Lightning's that names an argument in backticks, ```devices```, or as ``name=``)
    prefixed with ``GROUP.NAME=VALUE:`` from the parsed ``settings`` when it does not show the value given;
    a message that names no argument (``No supported gpu backend found!``) gets the one it is about, and for
    the accelerator, what this machine has."""
    unnamed = _unnamed_setting(text)
    if unnamed is not None:
        value = settings.get(unnamed) if hasattr(settings, "get") else None
        if unnamed == "accelerator":
            allowed = ", ".join(repr(name) for name in ["auto", *_available_accelerators()])
            text = f"{text.rstrip('!')}: this machine has no GPU that torch can use. Allowed here: {allowed}."
        return f"{group}.{unnamed}={value!r}: {text}" if value is not None else text
    names = re.findall(r"`(\w+)`|\b(\w+)=", text)
    for name in dict.fromkeys(a or b for a, b in names):
        value = settings.get(name) if hasattr(settings, "get") else None
        if value is not None and str(value) not in text:
            return f"{group}.{name}={value!r}: {text}"
    return text

