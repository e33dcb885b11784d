"""What a person sees running ``lowmem``: no third-party chatter, the end-of-fit summary and
Lightning's "fit stopped" line on the final screen of an 80x24 terminal (tmux), ``lowmem --help``.

The fit runs the tiny recipe for a few steps (validation included), so these tests take seconds."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import warnings

import pytest

from lowmem_lightning.cli import KNOWN_LOG_NOISE, main, quiet_known_noise

STEPS = 12
SHORT_FIT = [
    "fit", "--config", "tiny.yaml", "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", "6",
    "--trainer.limit_val_batches", "2",
]
LOWMEM = [sys.executable, "-c", "import sys; from lowmem_lightning.cli import main; sys.exit(main())"]

EXPECTED_FIT_LINES = [
    r"Seed set to \d+",
    r"(GPU|TPU|HPU) available: .*",
    r"[┏┃┡│└].*",  # Lightning's model summary table
    r"(Trainable|Non-trainable|Total) params: .*",
    r"Total estimated model params size \(MB\): .*",
    r"Modules in (train|eval) mode: \d+",
    r"Total FLOPs: .*",
    rf"`Trainer.fit` stopped: `max_steps={STEPS}` reached\.",
    rf"Epoch \d+ +━+ {STEPS}/{STEPS} steps .*it/s",  # the final bar
    r"loss \d+\.\d+ · state 0\.53 MiB · val_loss \d+\.\d+ \(step \d+\)",  # its metrics line
    r"LowMemOptimizerCallback: adamw_8bit on 271,392 trainable params",
    rf"  state after {STEPS} steps: 0\.529 MiB \(2\.04 bytes/param\), peak 0\.529 MiB",
    r"  fp32 AdamW would hold 2\.071 MiB \(8\.00 bytes/param\): saving 74\.5%",
    r"  plot: runs/tiny/version_\d+/state_memory\.png",
]
"""Every line ``lowmem fit`` (tiny) may print: Lightning's own lines, the bar and our summary."""


def _unexpected(lines: list[str], allowed: list[str]) -> list[str]:
    patterns = [re.compile(p) for p in allowed]
    return [line for line in lines if line.strip() and not any(p.fullmatch(line.rstrip()) for p in patterns)]


def _env() -> dict:
    """The environment a user has: Python's default warning filters, the terminal's own size."""
    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "PYTHONWARNINGS")}


def test_fit_prints_only_its_own_lines(tmp_path):
    proc = subprocess.run([*LOWMEM, *SHORT_FIT], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert _unexpected(out.splitlines(), EXPECTED_FIT_LINES) == []
    assert re.search(r"^LowMemOptimizerCallback: ", proc.stderr, re.M)  # the summary is there


def test_estimate_prints_only_the_estimate(tmp_path):
    proc = subprocess.run([*LOWMEM, "estimate", "--config", "qlora_7b.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert proc.stdout.startswith("params (base model)")


def test_quiet_known_noise_drops_exactly_the_known_messages(caplog):
    """Known third-party messages go; the same kinds of message with other text, or from us, stay."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_noise()
            known = "`isinstance(treespec, LeafSpec)` is deprecated, use ... instead."
            warnings.warn_explicit(known, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
            warnings.warn_explicit(known, FutureWarning, "mine.py", 1, module="my_project.mine")
            warnings.warn_explicit("ours", UserWarning, "loading.py", 1, module="lowmem_lightning.quant.loading")
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "m.py", 1,
                                   module="transformers.modeling_utils")
            summary = "Precision {} is not supported by the model summary.  Estimated model size in MB will not be"
            for precision in ("bf16-mixed", "16-mixed", "transformer-engine"):  # mixed: params are 32-bit, as it says
                warnings.warn_explicit(summary.format(precision), UserWarning, "model_summary.py", 242,
                                       module="lightning.pytorch.utilities.model_summary.model_summary")
        assert [str(w.message) for w in caught] == [known, "ours", summary.format("transformer-engine")]
        with caplog.at_level(logging.INFO):
            logging.getLogger("torchao").warning("Failed to load /x/torchao/_C_mxfp8.abi3.so: Could not load")
            logging.getLogger("torchao").warning("Failed to quantize layer 3")
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
                "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: For seamless cloud logging "
                                                                           "and experiment tracking, try ...")
            logging.getLogger("lightning.pytorch.utilities.rank_zero").info("`Trainer.fit` stopped")
            for rank in ("", "[rank: 0] ", "[rank: 1] ", "[rank: 10] "):  # a ddp rank's own seed line goes
                logging.getLogger("lightning.fabric.utilities.seed").info(f"{rank}Seed set to 42")
        assert [r.getMessage() for r in caplog.records] == ["Failed to quantize layer 3", "`Trainer.fit` stopped",
                                                            "Seed set to 42", "[rank: 0] Seed set to 42"]
    finally:
        for name, _ in KNOWN_LOG_NOISE:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if type(f).__name__ == "_DropKnownRecords"]:
                logger.removeFilter(f)


def test_help_lists_estimate_with_whole_sentences(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict,export,estimate}" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    helps = re.findall(r"^    (fit|validate|test|predict|export|estimate) +(.*(?:\n {24}.*)*)", out, re.M)
    assert [name for name, _ in helps] == ["fit", "validate", "test", "predict", "export", "estimate"]
    for name, text in helps:
        assert " ".join(text.split()).endswith("."), (name, text)  # a whole sentence, not a cut docstring


# ---------------------------------------------------------------------- 80x24 terminal (tmux)
def _tmux_screen(command: str, cwd, timeout: float = 600) -> tuple[str, str]:
    """Run ``command`` in a detached 80x24 tmux session; its final screen and its whole history."""
    server = f"lowmem-test-{uuid.uuid4().hex[:8]}"  # a server of our own: it has our environment
    tmux = ["tmux", "-L", server, "-f", os.devnull]
    done = "__LOWMEM_EXIT="
    subprocess.run([*tmux, "new-session", "-d", "-x", "80", "-y", "24", "-c", str(cwd),
                    f"{command}; echo {done}$?; sleep 600"], check=True, env=_env())
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True, check=True).stdout
            if done in screen:
                history = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-"], capture_output=True,
                                         text=True, check=True).stdout
                return screen, history
            time.sleep(0.5)
        raise AssertionError(f"no exit after {timeout} s:\n{screen}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_fit_final_screen_in_an_80x24_terminal(tmp_path):
    import shlex

    screen, history = _tmux_screen(shlex.join([*LOWMEM, *SHORT_FIT]), tmp_path)
    lines = [line.rstrip() for line in screen.splitlines()]
    assert "__LOWMEM_EXIT=0" in lines, screen
    # the final screen ends with the finished bar, its metrics, then our summary
    end = lines.index("__LOWMEM_EXIT=0")
    bar, metrics, *summary = lines[end - 6:end]
    assert re.fullmatch(rf"Epoch \d+ +━+ {STEPS}/{STEPS} steps .*it/s", bar), screen
    assert re.fullmatch(r"loss \d+\.\d+ · state 0\.53 MiB · val_loss \d+\.\d+ \(step 12\)", metrics), screen
    assert summary[0] == "LowMemOptimizerCallback: adamw_8bit on 271,392 trainable params", screen
    assert summary[1].startswith(f"  state after {STEPS} steps: 0.529 MiB"), screen
    assert summary[2].startswith("  fp32 AdamW would hold 2.071 MiB"), screen
    assert summary[3].startswith("  plot: runs/tiny/version_0/state_memory.png"), screen
    # Lightning's stop line is on the screen above the bar; on a loaded machine rich may repaint the
    # finished bar once more after it, so only bar/metrics repaints may stand between the two
    stop = f"`Trainer.fit` stopped: `max_steps={STEPS}` reached."
    assert stop in lines[:end - 6], screen
    between = lines[lines.index(stop) + 1:end - 6]
    assert _unexpected(between, EXPECTED_FIT_LINES[-6:-4]) == [] and len(between) <= 4, screen
    # nothing else on the way: no third-party chatter, no bar redraws left behind
    history_lines = [line for line in history.splitlines() if not line.startswith("__LOWMEM_EXIT=")]
    assert _unexpected(history_lines, EXPECTED_FIT_LINES) == []
