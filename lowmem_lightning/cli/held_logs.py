"""Lightning's set-up chatter held back until a run really starts.

LightningCLI seeds (``Seed set to 42``) and builds the Trainer (``GPU available: False, used: False``, ...)
before the ``lowmem`` command has made its last refusal (a bad data file, gradient release that cannot
hold, an optimizer that refuses the module's schedule). A refused command should print its one message
and nothing else, so :class:`HeldLogs` keeps the records Lightning logs during set-up and, once the run
starts, prints them in their order (:meth:`HeldLogs.release`); a refused command drops them
(:meth:`HeldLogs.discard`). Only the handlers Lightning itself installs on its ``lightning.pytorch`` and
``lightning.fabric`` loggers are held (an application that configured logging keeps its own handlers).
The model summary, which Lightning prints at ``on_fit_start`` (before the run starts, and not through a
logger), is held with them (:meth:`HeldLogs.hold_summaries`), so it comes after the set-up lines it
followed, not before them. Python warnings shown while holding (Lightning's ``rank_zero_warn`` at a resume:
"Checkpoint directory ... exists and is not empty", "Be aware that when using `ckpt_path`, callbacks ...";
``TextDataModule``'s "the data changed since the checkpoint") are held too, in order with the records: the
warnings filters still decide which are shown (a ``once`` warning is counted when raised), and
``warnings.showwarning`` is the function that gets held.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings
from collections.abc import Callable, Iterable

from lowmem_lightning.cli import messages

__all__ = ["HeldLogs", "LIGHTNING_LOGGERS"]

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
"""Loggers whose own handlers print Lightning's set-up messages."""


class _Hold(logging.Filter):
    """A handler filter that keeps every record (for later) instead of letting the handler emit it."""

    def __init__(self, held: HeldLogs, handler: logging.Handler) -> None:
        super().__init__()
        self.held, self.handler = held, handler

    def filter(self, record: logging.LogRecord) -> bool:
        self.held.records.append((self.handler, record))
        return False


class HeldLogs:
    """Holds the records of Lightning's own log handlers from :meth:`hold` until :meth:`release` (print them,
    in order) or :meth:`discard` (drop them); both stop holding and may be called more than once."""

    def __init__(self) -> None:
        self.records: list[tuple[logging.Handler | None, logging.LogRecord | str | Callable[[], None]]] = []
        self._filters: list[tuple[logging.Handler, _Hold]] = []
        self._holding_warnings = False
        self._showwarning: Callable[..., None] = warnings.showwarning  # the one replaced by :meth:`_show_warning`
        self._shower = self._show_warning  # one bound method: ``warnings.showwarning is self._shower`` holds

    def __reduce__(self) -> tuple:
        """Pickled (into a ``ddp_spawn`` rank, with the objects that refer to it: the CLI, its parser): a new
        ``HeldLogs`` that holds nothing; the records, handlers and locks stay in this process."""
        return (HeldLogs, ())

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """``warnings.showwarning`` while holding: the warning is shown (by the function this one replaced) at
        :meth:`release`; after the hold, by code that saved this function and put it back, at once."""
        show = self._showwarning
        if self._holding_warnings:
            self.records.append((None, lambda: show(message, category, filename, lineno, file, line)))
        else:
            show(message, category, filename, lineno, file, line)

    def note(self, line: str) -> None:
        """Keep one line of the ``lowmem`` command's own notices (:func:`~lowmem_lightning.cli.messages.notice`)."""
        self.records.append((None, line))

    def defer(self, call: Callable[[], None]) -> None:
        """Run ``call`` (it prints something) at :meth:`release`, in order with the held records; at once when
        nothing is held; never when the records are discarded."""
        if self.holding:
            self.records.append((None, call))
        else:
            call()

    def hold_summaries(self, callbacks: Iterable) -> None:
        """Hold the table of each ``ModelSummary`` callback (``RichModelSummary`` too) among ``callbacks``: its
        ``summarize`` call, on this instance only, is deferred (:meth:`defer`)."""
        from lightning.pytorch.callbacks import ModelSummary

        for callback in callbacks:
            if isinstance(callback, ModelSummary) and "summarize" not in vars(callback):
                callback.summarize = self._deferred(callback.summarize)

    def _deferred(self, summarize: Callable) -> Callable:
        def deferred(*args, **kwargs) -> None:
            self.defer(lambda: summarize(*args, **kwargs))

        return deferred

    def hold(self) -> HeldLogs:
        """Start holding the records of the handlers of :data:`LIGHTNING_LOGGERS`, the command's notices and
        the Python warnings shown; returns ``self``."""
        messages.NOTICE_HOLDER = self
        if warnings.showwarning is not self._shower:
            self._showwarning, warnings.showwarning = warnings.showwarning, self._shower
        self._holding_warnings = True
        for name in LIGHTNING_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                if not any(h is handler for h, _ in self._filters):
                    hold = _Hold(self, handler)
                    handler.addFilter(hold)
                    self._filters.append((handler, hold))
        return self

    def _stop(self) -> list[tuple[logging.Handler | None, logging.LogRecord | str | Callable[[], None]]]:
        if messages.NOTICE_HOLDER is self:
            messages.NOTICE_HOLDER = None
        self._holding_warnings = False
        if warnings.showwarning is self._shower:  # else replaced since (catch_warnings): it passes through now
            warnings.showwarning = self._showwarning
        for handler, hold in self._filters:
            handler.removeFilter(hold)
        self._filters = []
        records, self.records = self.records, []
        return records

    @property
    def holding(self) -> bool:
        """Whether records are being held now."""
        return bool(self._filters) or messages.NOTICE_HOLDER is self or self._holding_warnings

    def take_text(self) -> str:
        """The records held so far as the text they print (stderr's), removed from the hold, which goes on. For a
        process that cannot take the records themselves (a ``ddp_spawn`` rank prints them once its run starts)."""
        records, self.records = self.records, []
        out = io.StringIO()
        with contextlib.redirect_stderr(out):
            for handler, record in records:
                if callable(record):
                    record()
                elif handler is None:
                    out.write(record)
                else:
                    out.write(handler.format(record) + getattr(handler, "terminator", "\n"))
        return out.getvalue()

    def release(self) -> None:
        """Stop holding and print the held records through their handlers, oldest first."""
        for handler, record in self._stop():
            if callable(record):
                record()
            elif handler is None:
                sys.stderr.write(record)
            else:
                handler.handle(record)

    def discard(self) -> None:
        """Stop holding and drop the held records (the command was refused: its message is all it prints)."""
        self._stop()
