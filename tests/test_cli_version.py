"""``lowmem --version``: the versions a bug report needs, answered at once (without importing Lightning), one line
in a pipe, broken at words in an 80-column terminal; listed in ``lowmem --help``. ``lowmem --help`` and ``lowmem``
alone are answered at once too (neither torch nor Lightning imported), with the full parser's words."""

from __future__ import annotations

import fcntl
import os
import platform
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch
from lowmem_calls import LOWMEM, lowmem_in_process

from lowmem_lightning import __version__
from lowmem_lightning.cli import about
from lowmem_lightning.cli.about import installed_version, version_line


def _expected_start() -> str:
    return f"lowmem-lightning {__version__} (torch {torch.__version__}, lightning "


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_lowmem_version_prints_one_line_and_exits_0(flag, tmp_path):
    """A real ``lowmem`` process: exit 0, one line naming our version and torch's, Python's; nothing on stderr and
    nothing written in the working directory."""
    proc = subprocess.run([LOWMEM, flag], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and list(tmp_path.iterdir()) == []
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(_expected_start())
    for name in ("triton", "transformers", "peft", "jsonargparse"):
        assert f"{name} {installed_version(name)}" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"Python {platform.python_version()})")


def test_version_does_not_import_lightning_or_torch():
    """The answer comes from the distributions' metadata: neither Lightning (~5 s) nor torch is imported."""
    code = ("import sys; from lowmem_lightning.cli import main; rc = main(['--version']); "
            "print(rc, sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "0 []"


def test_version_breaks_at_words_in_an_80_column_terminal():
    """In a terminal narrower than the line, it is broken at spaces, continuation lines indented by two."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([LOWMEM, "--version"], stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    assert proc.wait(timeout=120) == 0
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    lines = b"".join(chunks).decode().replace("\r\n", "\n").rstrip("\n").split("\n")
    assert len(lines) >= 2 and all(len(line) <= 80 for line in lines), lines
    assert lines[0].startswith(_expected_start().rstrip()) and all(line.startswith("  ") for line in lines[1:])
    assert " ".join(line.strip() for line in lines) == version_line()


def test_help_lists_the_version_flag(capsys, monkeypatch, tmp_path):
    """``lowmem --help`` names ``-V, --version``; ``--version`` after other top-level options still answers."""
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "--help")
    assert proc.returncode == 0 and "-V, --version" in proc.stdout
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "--config", "tiny.yaml", "--version")
    assert proc.returncode == 0 and proc.stdout.split() == version_line().split()


def test_a_missing_library_is_named_not_installed():
    assert installed_version("no-such-distribution-lowmem") == "not installed"


def _fake_torch(site, metadata_version: str, stated: str | None):
    """A torch distribution in ``site`` whose metadata says ``metadata_version`` and whose ``torch/version.py``
    states ``stated`` (none written for ``None``)."""
    info = site / f"torch-{metadata_version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {metadata_version}\n")
    if stated is not None:
        (site / "torch").mkdir()
        (site / "torch" / "version.py").write_text(f"__version__ = '{stated}'\ncuda = '13.2'\n")


@pytest.mark.parametrize("metadata_version, stated, shown", [
    ("2.15.0", "2.15.0+cu132", "2.15.0+cu132"),  # PyPI's CUDA wheel: its metadata has no build tag
    ("2.13.0+cpu", "2.13.0+cpu", "2.13.0+cpu"),
    ("2.15.0", None, "2.15.0"),
    ("2.15.0", "2.14.1+cu128", "2.15.0"),  # a version.py left from another release is not believed
])
def test_torch_is_named_with_its_build(tmp_path, monkeypatch, metadata_version, stated, shown):
    """Which CUDA a torch was built for is what a bug report about a GPU needs first: ``torch 2.15.0+cu132``, as
    ``torch.__version__`` says, also where the wheel's metadata says ``2.15.0`` (read without importing torch)."""
    _fake_torch(tmp_path, metadata_version, stated)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_version("torch") == shown
    assert f"(torch {shown}, lightning " in version_line()


def test_help_and_no_subcommand_import_neither_lightning_nor_torch():
    """``lowmem --help`` / ``-h`` (exit 0) and ``lowmem`` alone (exit 2) in a fresh interpreter: neither Lightning,
    torch nor transformers is imported (a bare ``lowmem`` took ~7 s of their imports to say it needs a subcommand)."""
    code = ("import sys; from lowmem_lightning.cli import main; rcs = [main(a) for a in (['--help'], ['-h'], [])]; "
            "print(rcs, sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[0, 0, 2] []"
    assert proc.stderr == f"lowmem: error: {about.NO_SUBCOMMAND}\n"


@pytest.mark.parametrize("columns", ["80", "120"])
def test_the_quick_help_is_the_full_parsers(columns, capsys, monkeypatch):
    """What ``lowmem --help`` prints without Lightning is, character for character, what LightningCLI's parser
    (subcommands, recipes, optimizer names, ``-V``) prints, at two terminal widths."""
    from lowmem_lightning.cli.app import main as full_main

    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    about.print_help()
    quick = capsys.readouterr().out
    assert full_main(["--help"]) == 0
    full = capsys.readouterr().out
    assert quick == full and "Available subcommands" in full and "qlora_7b.yaml" in full and "muon_8bit" in full
    assert max(len(line) for line in full.splitlines()) <= int(columns)


def test_lowmem_alone_says_it_needs_a_subcommand_in_one_line(tmp_path):
    """A real ``lowmem`` with no arguments: exit 2, one line on stderr naming the subcommands, nothing written."""
    proc = subprocess.run([LOWMEM], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"lowmem: error: {about.NO_SUBCOMMAND}\n")
    assert list(tmp_path.iterdir()) == []
