"""Lightning's set-up chatter ("Seed set to", "GPU available") and the command's own notices are held back until
the run starts, printed in order then, and dropped when the command is refused (issue 25, 7)."""

from __future__ import annotations

import io
import logging

import pytest

from lowmem_lightning.cli import messages
from lowmem_lightning.cli.held_logs import LIGHTNING_LOGGERS, HeldLogs


@pytest.fixture
def lightning_stream():
    """A StreamHandler on Lightning's logger, as Lightning installs one when the application configured none."""
    logger = logging.getLogger(LIGHTNING_LOGGERS[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


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
