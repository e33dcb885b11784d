"""``benchmarks/gpu_check.py --dry-run``: every part of the GPU acceptance run goes through the same
code on the CPU at toy sizes (kernels under the Triton interpreter), so the first, short GPU session
cannot fail on a typo; the dated section it writes names the device and each part's status."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_part(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--results", str(results),
         "--budget-scale", "4"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# results\n")  # appended, never overwritten
    assert "## GPU acceptance run (" in text and "--dry-run (toy sizes on CPU)" in text
    for part in ("kernels", "gpu_tests", "sync", "step_time", "paged", "qlora_7b", "release"):
        assert f"| {part} | ok |" in text, part
        assert f"### {part}" in text
    assert "| adamw_8bit | float16 |" in text and "MISMATCH" not in text
    assert "| released (step_in_backward) |" in text


def test_gpu_check_reports_a_failing_part_and_runs_the_rest(tmp_path):
    results = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--results", str(results),
         "--parts", "sync,release", "--budget-scale", "0.001"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    text = results.read_text()
    assert "| sync | TIMEOUT after 0 s |" in text and "| release | TIMEOUT" in text
