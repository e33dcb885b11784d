"""What the ``lowmem`` command writes on stderr fits the user's terminal: a notice or a refusal longer than the
screen is broken at spaces (continuation lines indented), so an 80-column terminal never splits a word; written to
a pipe or a file it stays one line per message (scripts and logs grep it). An unknown optimizer name that looks
like a typo gets the closest registered name."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import warnings

import pytest

from lowmem_lightning.cli import messages, terminal
from lowmem_lightning.optim.registry import build_optimizer, unknown_optimizer_message

LONG = ("lowmem: --ckpt_path last: no checkpoint yet in runs/tiny/*/checkpoints; starting a fresh run (the same "
        "command resumes from the newest checkpoint once one is saved).")


def test_long_lines_break_at_spaces_on_a_terminal(monkeypatch):
    monkeypatch.setattr(terminal, "terminal_columns", lambda: 80)
    text = messages.for_terminal(LONG + "\n(short line)")
    lines = text.split("\n")
    assert len(lines) == 4 and lines[-1] == "(short line)"
    assert all(len(line) <= 80 for line in lines)
    assert all(line.startswith("  ") and not line.startswith("   ") for line in lines[1:3])
    assert " ".join(line.strip() for line in lines[:3]) == LONG


def test_a_word_longer_than_the_screen_stays_whole(monkeypatch):
    monkeypatch.setattr(terminal, "terminal_columns", lambda: 40)
    path = "/data/" + "x" * 60 + "/last.ckpt"
    lines = messages.for_terminal(f"lowmem: resuming from {path} (step 3)").split("\n")
    assert path in [line.strip() for line in lines]


def test_unchanged_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(terminal, "terminal_columns", lambda: None)
    assert messages.for_terminal(LONG) == LONG


def test_captured_stderr_is_not_a_terminal(capsys):
    messages.say(LONG)
    assert capsys.readouterr().err == LONG + "\n"


@pytest.mark.parametrize(("typo", "meant"), [("adamw_8bitt", "adamw_8bit"), ("muon8bit", "muon_8bit"),
                                             ("AdamW4bit", "adamw_4bit"), ("paged_adamw8bit", "paged_adamw_8bit")])
def test_a_typo_gets_the_closest_name(typo, meant):
    with pytest.raises(ValueError) as err:
        build_optimizer(typo, [])
    assert str(err.value).startswith(f"Unknown optimizer {typo!r}: expected one of ")
    assert str(err.value).endswith(f"Did you mean {meant!r}?")


def test_no_suggestion_for_a_name_unlike_any():
    assert "Did you mean" not in unknown_optimizer_message("shampoo")
    assert "Did you mean" not in unknown_optimizer_message(3)


def _run_on_a_terminal(args: list[str], cwd, columns: int = 80) -> tuple[int, str]:
    """Run ``python -m lowmem_lightning.cli ARGS`` with stdout and stderr on a pseudo-terminal ``columns`` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {key: value for key, value in os.environ.items() if key not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_lightning.cli", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_a_refusal_on_an_80_column_terminal_breaks_at_words(tmp_path):
    code, out = _run_on_a_terminal(["fit", "--config", "tiny.yaml", "--optim", "adamw_8bitt"], tmp_path)
    assert code == 2, out
    lines = out.strip("\n").split("\n")
    assert all(len(line) <= 80 for line in lines), lines
    text = " ".join(line.strip() for line in lines)
    assert "lowmem fit: error: Unknown optimizer 'adamw_8bitt': expected one of adafactor, adamw," in text, text
    assert "Did you mean 'adamw_8bit'?" in text and "(all options: lowmem fit --help)" in text, text
    assert "Traceback" not in out and list(tmp_path.iterdir()) == []


def _help_in_process(args: list[str], cwd, monkeypatch, capsys, columns: int = 80) -> tuple[int, str]:
    """``lowmem ARGS`` by the console script's entry point in this process with ``COLUMNS`` set to ``columns`` (the
    help formatter reads the width from it, as from the terminal in :func:`_run_on_a_terminal`); exit code and
    stdout + stderr."""
    from lowmem_lightning.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    monkeypatch.setenv("COLUMNS", str(columns))
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize("args", [["--trainer.callbacks.help", "LowMemOptimizerCallback"],
                                  ["--model.help", "CausalLMModule"], ["--data.help", "TextDataModule"]])
def test_class_help_on_an_80_column_terminal_fits(tmp_path, args, monkeypatch, capsys):
    """Our classes' help: every line within 80 columns; a list-typed argument's two spellings (``--x X, --x+ X``,
    87 columns for ``fp32_state``) go one per line when together they do not fit (Python >= 3.13's argparse writes
    ``--x, --x+ X``: 76 columns, one line). The callback's help runs as a real process on an 80-column
    pseudo-terminal; the model's and the data's by the same entry point in this process with ``COLUMNS=80`` (the
    width the help formatter takes from the terminal)."""
    if args[0] == "--trainer.callbacks.help":
        code, out = _run_on_a_terminal(["fit", *args], tmp_path)
    else:
        code, out = _help_in_process(["fit", *args], tmp_path, monkeypatch, capsys)
    assert code == 0, out
    lines = out.strip("\n").split("\n")
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    if args[0] == "--trainer.callbacks.help" and sys.version_info >= (3, 13):  # argparse names the metavar once
        assert "  --trainer.callbacks.fp32_state, --trainer.callbacks.fp32_state+ FP32_STATE" in lines  # 76 columns
    elif args[0] == "--trainer.callbacks.help":
        at = lines.index("  --trainer.callbacks.fp32_state FP32_STATE,")
        assert lines[at + 1] == "  --trainer.callbacks.fp32_state+ FP32_STATE", lines[at:at + 3]


def test_subcommand_help_starts_with_a_short_usage_and_fits(tmp_path):
    """``lowmem fit --help`` on an 80x24 terminal: the usage is one line (argparse's listed every Trainer, model and
    data option, ~50 lines, some past 80 columns, before the sections that list them again) and every line fits."""
    code, out = _run_on_a_terminal(["fit", "--help"], tmp_path)
    assert code == 0, out
    lines = out.strip("\n").split("\n")
    assert lines[0] == "usage: lowmem fit [-h] [-c CONFIG] [options]", lines[:3]
    assert lines[1] == "", lines[:3]
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert any(line.startswith("  --trainer.max_steps MAX_STEPS") for line in lines)  # the sections still list all


def test_a_lightning_warning_during_a_fit_breaks_at_words(tmp_path):
    """Lightning's warnings during ``lowmem fit`` go through the same word breaking as ours: the location is named
    from its package on one line (its full site-packages path, 86 columns, was split mid-word by the terminal), the
    message broken at spaces, shown once."""
    code, out = _run_on_a_terminal(["fit", "--config", "tiny.yaml", "--trainer.max_steps", "1",
                                    "--trainer.log_every_n_steps", "100000", "--trainer.limit_val_batches", "0"],
                                   tmp_path)
    assert code == 0, out
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).rsplit("\r", 1)[-1] for line in out.split("\n")]  # bar codes
    at = next(i for i, line in enumerate(lines) if "fit_loop.py:" in line)
    assert lines[at].startswith("lightning/pytorch/loops/fit_loop.py:"), lines[at:at + 4]
    warning = [lines[at]] + [line for line in lines[at + 1:at + 4] if line.startswith("  ")]
    assert all(len(line) <= 80 for line in warning), warning
    text = " ".join(line.strip() for line in warning)
    assert text.endswith("Set a lower value for log_every_n_steps if you want to see logs for the training epoch."), \
        warning
    assert out.count("The number of training batches") == 1, out


def test_another_library_warning_on_a_terminal_names_its_file_from_its_package(monkeypatch):
    """Python's own format (``FILE:LINE: Category: MESSAGE`` and the source line), as torch's and transformers'
    warnings show: the location from the package, each line broken at words; unchanged when not a terminal."""
    import torch

    monkeypatch.setattr(messages, "_format_others", warnings._formatwarning_orig)
    filename = torch.__file__
    message = "the quick brown fox jumps over the lazy dog " * 4
    piped = messages.one_line_for_ours(message, UserWarning, filename, 7, "warnings.warn(x)")
    assert piped.startswith(f"{filename}:7: UserWarning: the quick")
    monkeypatch.setattr(terminal, "terminal_columns", lambda: 80)
    lines = messages.one_line_for_ours(message, UserWarning, filename, 7, "warnings.warn(x)").rstrip("\n").split("\n")
    assert lines[0].startswith("torch/__init__.py:7: UserWarning: the quick"), lines
    assert all(len(line) <= 80 for line in lines) and lines[-1] == "  warnings.warn(x)", lines
    assert " ".join(line.strip() for line in lines[:-1]).endswith(message.strip()), lines


def test_info_lines_from_lightnings_loggers_break_at_words_on_a_terminal(monkeypatch, capsys):
    """The package's ``rank_zero_info`` lines (a resume's schedule note, a conversion note: up to ~220 columns) and
    Lightning's go through Lightning's stderr handler; under the ``lowmem`` command they break at words on a terminal
    like its warnings, and stay one line when stderr is not a terminal."""
    import logging

    from lightning.pytorch.utilities import rank_zero_info

    logger = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(logger, "handlers", [logging.StreamHandler(sys.stderr)])  # sys.stderr: capsys's
    remove = messages.log_lines_for_terminal()
    try:
        monkeypatch.setattr(terminal, "terminal_columns", lambda: 80)
        rank_zero_info(LONG)
        lines = capsys.readouterr().err.strip("\n").split("\n")
        assert len(lines) > 1 and all(len(line) <= 80 for line in lines), lines
        assert " ".join(line.strip() for line in lines) == LONG
        monkeypatch.setattr(terminal, "terminal_columns", lambda: None)
        rank_zero_info(LONG)
        assert capsys.readouterr().err == LONG + "\n"
    finally:
        remove()
    monkeypatch.setattr(terminal, "terminal_columns", lambda: 80)
    rank_zero_info(LONG)  # removed: Lightning's handler as before
    assert capsys.readouterr().err == LONG + "\n"
