"""benchmarks/three_bytes.py: the ~3 B/param recipe's byte accounting, its Lightning twin, the report."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = ["--steps", "4", "--warmup", "1", "--batch", "2", "--seq", "16", "--eval-batches", "1",
        "--corpus-bytes", "60000", "--hidden", "64", "--layers", "1", "--seeds", "0"]
"""A tiny run: every matrix of the 64-wide Llama has >= 4096 elements (4-bit state), the norms keep fp32 state."""


@pytest.fixture(scope="module")
def three_bytes():
    spec = importlib.util.spec_from_file_location("bench_three_bytes", BENCH / "three_bytes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(three_bytes, tmp_path_factory):
    out = tmp_path_factory.mktemp("three_bytes")
    rows = "adamw_fp32,adamw_4bit_bf16_release,adamw_4bit_bf16_release_lightning"
    code = three_bytes.main(TINY + ["--only", rows, "--out", str(out), "--save", str(out / "runs.json")])
    saved = json.loads((out / "runs.json").read_text())
    runs = {r["row"]: three_bytes.RunResult(**r) for r in saved["results"]}
    return code, runs, (out / "three_bytes.md").read_text()


def _largest_grad_bytes(three_bytes, bf16: bool) -> int:
    model = three_bytes.conv.tiny_llama(0, 64, 1, 16)
    return max(p.numel() for p in model.parameters()) * (2 if bf16 else 4)


def test_release_recipe_measures_about_three_bytes_per_param(three_bytes, tiny_run):
    code, runs, _ = tiny_run
    assert code == 0
    run = runs["adamw_4bit_bf16_release"]
    assert run.weight_bytes == 2 * run.params  # bf16 weights, no fp32 copy
    # gradients: at most the largest tensor's plus one more alive at once, far below the 2 B/param buffer
    assert 0 < run.grad_peak_bytes <= 2 * _largest_grad_bytes(three_bytes, bf16=True)
    assert run.grad_peak_bytes < 0.35 * run.grad_buffer_bytes
    assert 1.06 <= run.state_bytes / run.params < 1.15  # 4-bit m and v + absmax; the norms' fp32 state
    assert 3.1 <= run.total_bytes / run.params <= 3.8
    assert run.estimate_bytes is not None and abs(run.estimate_bytes - run.total_bytes) / run.params < 0.05
    assert run.step_peak_bytes > 0


def test_reference_measures_sixteen_bytes_per_param(tiny_run):
    run = tiny_run[1]["adamw_fp32"]
    assert run.grad_peak_bytes == run.grad_buffer_bytes == run.weight_bytes == 4 * run.params
    assert run.state_bytes / run.params == pytest.approx(8.0, abs=0.01)  # m, v (+ a 4-byte step per tensor)
    assert run.estimate_bytes == pytest.approx(run.total_bytes, rel=0.01)


def test_lightning_release_equals_plain_loop(tiny_run):
    code, runs, text = tiny_run
    lightning, plain = runs["adamw_4bit_bf16_release_lightning"], runs["adamw_4bit_bf16_release"]
    assert lightning.weights_sha256 == plain.weights_sha256 and lightning.val == plain.val
    assert lightning.grad_peak_bytes == plain.grad_peak_bytes
    assert "seed 0: final weights bit-equal" in text
    assert "| adamw_4bit_bf16_release | 2.00 |" in text
    assert "adamw_4bit_bf16_release: 3." in text and "the 1.01x goal" in text


def test_twin_check_flags_different_weights(three_bytes, tiny_run):
    runs = tiny_run[1]
    changed = dict(vars(runs["adamw_4bit_bf16_release_lightning"]), weights_sha256="0" * 64)
    lines = three_bytes.check_twins([runs["adamw_4bit_bf16_release"], three_bytes.RunResult(**changed)])
    assert lines and "DIFFER" in lines[0]


def test_grad_meter_sees_the_whole_buffer_without_release(three_bytes):
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))
    meter = three_bytes.GradMeter(model.parameters())
    model(torch.randn(4, 32)).square().mean().backward()
    meter.remove()
    assert meter.peak_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_unknown_row_is_refused(three_bytes):
    with pytest.raises(SystemExit, match="unknown row 'nope'"):
        three_bytes.main(TINY + ["--only", "nope"])


def test_lagged_norm_clip_scales_by_the_previous_steps_norm(three_bytes):
    weight = torch.nn.Parameter(torch.zeros(3))
    clip = three_bytes.LaggedNormClip([weight], max_norm=1.0)
    (weight * torch.tensor([3.0, 4.0, 0.0])).sum().backward()  # norm 5: first step unscaled
    assert weight.grad.tolist() == [3.0, 4.0, 0.0]
    clip.end_step()
    weight.grad = None
    (weight * torch.tensor([6.0, 8.0, 0.0])).sum().backward()  # scaled by 1/5, the previous norm
    assert weight.grad.tolist() == pytest.approx([1.2, 1.6, 0.0])
    clip.end_step()
    assert clip.scale == pytest.approx(1 / 10)
    clip.remove()


def test_report_refuses_runs_of_different_settings(three_bytes, tiny_run, tmp_path):
    runs = [vars(r) for r in tiny_run[1].values()]
    for name, scale in (("a.json", 1.0), ("b.json", 0.5)):
        (tmp_path / name).write_text(json.dumps({"settings": {"lr_scale": scale}, "results": runs, "notes": {}}))
    with pytest.raises(SystemExit, match="lr_scale=0.5"):
        three_bytes.main(["--report", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
