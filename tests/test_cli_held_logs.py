"""Lightning's set-up chatter ("Seed set to", "GPU available") and the command's own notices are held back until
the run starts, printed in order then, and dropped when the command is refused (issue 25, 7); the model summary,
printed by Lightning before the run starts, is held with them and comes after them."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys

import pytest
from lightning.pytorch.callbacks import ModelSummary

from lowmem_lightning.cli import messages
from lowmem_lightning.cli.held_logs import HeldLogs


def test_release_prints_held_records_and_notices_in_order(lightning_stream, capsys):
    held = HeldLogs().hold()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    messages.notice("--optim came: dropped betas")
    assert lightning_stream.getvalue() == "" and capsys.readouterr().err == ""  # nothing printed while held
    assert held.holding
    held.release()
    assert lightning_stream.getvalue() == "GPU available: False, used: False\n"
    assert capsys.readouterr().err == "lowmem: --optim came: dropped betas\n"
    assert not held.holding and messages.NOTICE_HOLDER is None
    logging.getLogger("lightning.pytorch").info("after")  # no longer held
    assert lightning_stream.getvalue().endswith("after\n")


def test_discard_drops_what_was_held(lightning_stream, capsys):
    held = HeldLogs().hold()
    logging.getLogger("lightning.pytorch.trainer").info("Seed set to 42")
    messages.notice("a notice")
    held.discard()
    held.release()  # a second stop does nothing
    assert lightning_stream.getvalue() == "" and capsys.readouterr().err == ""
    messages.notice("printed at once")
    assert capsys.readouterr().err == "lowmem: printed at once\n"


class _LoggedSummary(ModelSummary):
    """A ModelSummary whose table is one line on Lightning's logger (so its order with the held lines shows)."""

    @staticmethod
    def summarize(*args, **kwargs) -> None:
        logging.getLogger("lightning.pytorch").info("THE SUMMARY")


def test_take_text_hands_the_held_lines_over_and_a_pickled_hold_holds_nothing(lightning_stream, capsys):
    """Under ``ddp_spawn`` the held lines go to the ranks as text (rank 0 prints them when its run starts), and the
    hold itself, pickled with the CLI, arrives empty (its handlers and locks cannot travel)."""
    held = HeldLogs().hold()
    try:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
        messages.notice("a notice")
        assert held.take_text() == "GPU available: False, used: False\nlowmem: a notice\n"
        logging.getLogger("lightning.pytorch").info("later")  # still held
        clone = pickle.loads(pickle.dumps(held))
        assert clone.records == [] and not clone.holding and held.holding
        assert held.take_text() == "later\n"
    finally:
        held.release()
    assert lightning_stream.getvalue() == "" and capsys.readouterr().err == ""


def test_model_summary_is_held_and_printed_after_the_setup_lines(lightning_stream):
    """Lightning prints the summary at on_fit_start, between the set-up lines and the run: held, it follows them."""
    summary = _LoggedSummary()
    held = HeldLogs().hold()
    held.hold_summaries([object(), summary])
    logging.getLogger("lightning.pytorch.trainer").info("Seed set to 42")
    summary.summarize([], 0, 0, 0.0, {})
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    assert lightning_stream.getvalue() == ""
    held.release()
    assert lightning_stream.getvalue() == "Seed set to 42\nTHE SUMMARY\nGPU available: False, used: False\n"
    summary.summarize([], 0, 0, 0.0, {})  # nothing held any more: printed at once
    assert lightning_stream.getvalue().endswith("GPU available: False, used: False\nTHE SUMMARY\n")


def test_a_refused_run_drops_the_held_summary(lightning_stream):
    summary = _LoggedSummary()
    held = HeldLogs().hold()
    held.hold_summaries([summary])
    summary.summarize([], 0, 0, 0.0, {})
    held.discard()
    assert lightning_stream.getvalue() == ""


@pytest.mark.slow  # a real fit in its own process (~20 s on the shared machine)
def test_fit_prints_setup_lines_before_the_model_summary(tmp_path):
    """``lowmem fit`` as a user runs it (stdout and stderr into one terminal, unbuffered): "Seed set to" and
    "GPU available" come before the model summary's table, which comes before the end-of-fit summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "tiny.yaml", "--trainer.max_steps", "1",
         "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"},
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    order = [out.index(text) for text in ("Seed set to 42", "GPU available", "Trainable params", "state after 1 steps")]
    assert order == sorted(order), out[-3000:]
