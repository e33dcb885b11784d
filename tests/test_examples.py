"""Both examples run end to end (few steps) and log optimizer-state memory per step."""

import csv
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["plug_into_existing_project", "subclass_lowmem_module"])
def test_example_runs_and_logs_state_memory(tmp_path, name, capsys):
    summary = _load(name).main(["--out", str(tmp_path), "--max-steps", "6"])
    assert summary["optimizer"] == "adamw_8bit"
    assert summary["steps"] == 6
    assert summary["bytes_per_param"] < 0.5 * summary["adamw_fp32_bytes_per_param"]
    (metrics,) = tmp_path.glob("*/version_0/metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("optim/state_MiB")]
    assert len(rows) == 6
    assert float(rows[-1]["optim/state_MiB"]) == pytest.approx(summary["state_MiB"])
    out = capsys.readouterr().out
    assert "metrics.csv" in out
    assert "6/6 steps" in out and "/-" not in out  # optimizer steps of max_steps, no "Epoch 1/-2"
