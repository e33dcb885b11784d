"""``benchmarks/gpu_check.py --dry-run``: every part of the GPU acceptance run goes through the same
code on the CPU at toy sizes (kernels under the Triton interpreter), so the first, short GPU session
cannot fail on a typo; the dated section it writes names the device and each part's status."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_gpu_check_dry_run_driver_appends_a_dated_section(tmp_path):
    """The driver end to end, one process per part: a section appended (never overwriting) naming the device,
    each part's status and its lines (``sync``, the cheapest part; every part's own code runs below)."""
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--results", str(results),
         "--budget-scale", "4", "--parts", "sync"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert text.startswith("# results\n")  # appended, never overwritten
    assert "## GPU acceptance run (" in text and "--dry-run (toy sizes on CPU)" in text
    assert "| sync | ok |" in text and "### sync" in text
    assert "| adamw_8bit | n/a on CPU (code path ran) | n/a on CPU (code path ran) |" in text


def test_without_a_gpu_a_real_run_is_refused_before_any_part_runs(tmp_path):
    """No CUDA and no --dry-run: exit 2, one error line, no part started and nothing appended to the results file
    (it used to run every part, each failing, and append a 'GPU acceptance run' section of failures)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the real run would start")
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--results", str(results), "--parts", "sync"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "no CUDA device here" in proc.stderr and "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert results.read_text() == "# results\n"


def test_gpu_check_dry_run_runs_every_part(tmp_path, monkeypatch):
    """Every part's child-mode code (:func:`gpu_check.run_part`, what the driver's process for it runs) in this
    process, with the driver's ``--budget-scale 4`` budgets; the lines go into the section as the driver writes
    it. ``qlora_7b``'s code is run by ``test_qlora_peer_row_skips_cleanly_without_bitsandbytes`` (ours, with
    profiling) and ``test_qlora_peer_row_runs_bitsandbytes_paged_adamw_on_cpu`` (the peer row)."""
    parts = ("kernels", "gpu_tests", "sync", "step_time", "paged", "release", "qlora_moe")
    results = {}
    for part in parts:
        monkeypatch.setenv("GPU_CHECK_PART_BUDGET_S", str(gpu_check.BUDGET_S[part] * 4))
        out = tmp_path / f"{part}.json"
        gpu_check.run_part(part, True, out)
        result = json.loads(out.read_text())
        assert "error" not in result, result.get("trace")
        results[part] = {"status": "ok", "seconds": 0.0, "lines": result["lines"]}
    text = gpu_check.section(results, "CPU; --dry-run (toy sizes on CPU)", ["--dry-run"])
    for part in parts:
        assert f"| {part} | ok |" in text and f"### {part}" in text, part
    assert "| adamw_8bit | float16 |" in text and "MISMATCH" not in text
    assert "| came (one group, 3 tensors) | float32 |" in text
    assert "`pytest -m gpu` (collect only, no GPU): exit 0" in text
    assert re.search(r" [1-9][0-9]*/[0-9]+ tests collected", text)  # the gpu tests, from the files that hold them
    assert "| released (step_in_backward) |" in text
    assert "| lowmem NF4 (experts too) + peft LoRA r=16 on the attention" in text  # qlora_moe: Experts4bit built
    assert "LoRA r=16 on 4 projections, NF4 base" in text  # its estimate models the MoE activations
    skip = "CUDA only" if importlib.util.find_spec("flashoptim") else "not installed"  # FlashOptim's rows say why
    assert text.count("| flashoptim_adamw | 64K |") == 2 and text.count("| flashoptim_adamw_nomaster | 64K |") == 2
    assert "| FlashOptim FlashAdamW (24-bit master), normal and released |" in text and skip in text


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


# ------------------------------------------------------------------ full_ft_7b, qlora_7b's peer row, long_run
def test_full_ft_settings_are_the_recipes_and_the_7b_estimate_fits_24_gib():
    trainer, callback, module = gpu_check._full_ft_settings("recipe")
    assert trainer == {"precision": "bf16-true", "accumulate_grad_batches": 1, "gradient_clip_val": 1.0,
                       "gradient_clip_algorithm": "value"}
    assert (callback["optimizer"], callback["optimizer_kwargs"], callback["step_in_backward"]) == (
        "came", {"momentum_dtype": "int8"}, True)
    assert module == {"gradient_checkpointing": True, "torch_dtype": "bfloat16", "weight_decay": 0.0}
    _, callback, _ = gpu_check._full_ft_settings("adamw_8bit")
    assert (callback["optimizer"], callback["step_in_backward"]) == ("adamw_8bit", True)
    arch = gpu_check._full_ft_arch(False)
    assert (arch["hidden_size"], arch["num_hidden_layers"], arch["vocab_size"]) == (4096, 32, 32000)
    est = gpu_check.full_ft_estimate("recipe", 1024, False)
    assert est["total"] == est["weights"] + est["state"] + est["gradients"] + est["activations"]
    assert 20e9 < est["total"] < 24 * 2**30  # the claim the GPU run checks: inside the 24 GiB cap
    assert gpu_check._full_ft_cap("recipe") == 24 * 2**30
    cap = gpu_check._full_ft_cap("adamw_8bit")
    assert cap % 2**30 == 0 and cap >= 1.05 * gpu_check.full_ft_estimate("adamw_8bit", 1024, False)["total"]


@pytest.mark.parametrize("row", list(gpu_check.FULL_FT_ROWS))
def test_full_ft_row_trains_through_lightning_on_cpu(row):
    """The row's code path at toy size: bf16 weights made by configure_model, the recipe's callback with the
    row's optimizer releasing gradients in 25 MiB buckets, losses falling on the fixed batch."""
    from lowmem_lightning.callbacks.release import DEFAULT_BUCKET_BYTES

    r = gpu_check.full_ft_row(row, 32, dry=True)
    assert not r["oom"] and r["seq"] == 32 and r["weights"] == "bfloat16 on cpu"
    assert r["optimizer"] == gpu_check._full_ft_settings(row)[1]["optimizer"]
    assert r["release"] and r["buckets"] == [DEFAULT_BUCKET_BYTES]
    assert 0 < r["fullest_bucket"] <= r["estimate"]["gradients"]  # toy model: one bucket, all its gradients
    assert len(r["losses"]) == 3 and r["losses"][-1] < r["losses"][0]
    assert gpu_check._full_ft_verdicts(row, r, dry=True) == []
    line = gpu_check._full_ft_line(row, r, True, "")
    assert line.startswith(f"| {row} |") and "bfloat16 on cpu" in line


def test_full_ft_verdicts_catch_a_flat_loss_fp32_weights_and_a_wrong_estimate():
    r = {"losses": [5.0, 5.1], "weights": "float32 on cuda", "peak_allocated": 13e9, "estimate": {"total": 10e9}}
    found = " ".join(gpu_check._full_ft_verdicts("recipe", r, dry=False))
    assert "loss did not fall" in found and "not bf16" in found and "not within 10%" in found


@pytest.mark.slow
def test_full_ft_7b_dry_run_through_the_driver(tmp_path):
    results = tmp_path / "r.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--results", str(results),
         "--parts", "full_ft_7b", "--budget-scale", "4"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert "| full_ft_7b | ok |" in text and "| recipe | came + release |" in text
    assert "| adamw_8bit | adamw_8bit + release |" in text and "seq 32 default allocator: fit" in text


def test_qlora_peer_row_skips_cleanly_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(gpu_check, "_installed", lambda name: name != "bitsandbytes")
    lines = gpu_check.part_qlora_7b(dry=True)
    assert lines[2].startswith("| lowmem NF4 + peft LoRA r=16, paged_adamw_8bit |")
    assert lines[-1] == "| bitsandbytes NF4 + peft | - | - | - | skipped: bitsandbytes not installed |"
    assert "Kernel time by family: n/a on CPU (one step profiled)." in lines  # the profiling code path ran


def test_qlora_peer_row_runs_bitsandbytes_paged_adamw_on_cpu():
    pytest.importorskip("bitsandbytes")
    line, measured = gpu_check._bnb_qlora_row(gpu_check._llama_config(True), gpu_check._device(True), 16)
    assert measured is not None, line
    assert line.startswith("| bitsandbytes NF4 + peft LoRA r=16, bitsandbytes PagedAdamW8bit |")


def test_long_run_dry_run_writes_table_and_png(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path))
    lines = gpu_check.part_long_run(dry=True)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"row", "adamw", "adamw_8bit", "came", "came_int8", "bnb_adamw_8bit"}
    assert "| adamw_8bit | adamw |" in rows["adamw_8bit"] and "| came_int8 | came |" in rows["came_int8"]
    assert (tmp_path / "long_run.png").stat().st_size > 1000


def test_the_recommended_device_command_fits_its_budget():
    """The parts the docstring's device command runs add up to at most 9.5 minutes of part budgets."""
    assert sum(gpu_check.BUDGET_S[p] for p in gpu_check.RECOMMENDED_PARTS) <= 570
    assert f"--parts {','.join(gpu_check.RECOMMENDED_PARTS)} " in " ".join(gpu_check.__doc__.split())
    assert "carry: [\".whl\"]" in gpu_check.__doc__ and set(gpu_check.RECOMMENDED_PARTS) <= set(gpu_check.PARTS)


def test_long_run_reports_a_failed_row_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "_installed", lambda module: True)  # rows faked: no peer needed

    def fake_train(name, builder, kwargs, data, size, device):
        if name == "bnb_adamw_8bit":
            raise RuntimeError("no CUDA library for this GPU")
        return {"curve": [5.0, 4.0], "held_out": {"adamw_8bit": 4.1}.get(name, 4.0), "ms_per_step": 1.0}

    monkeypatch.setattr(gpu_check, "_long_run_train", fake_train)
    with pytest.raises(AssertionError) as err:
        gpu_check.part_long_run(dry=True)
    text = str(err.value)
    assert "bnb_adamw_8bit FAILED: RuntimeError: no CUDA library" in text.splitlines()[0]
    assert "| adamw_8bit | adamw | 4.0000 | 4.1000 | 1.0250x | 1.0250x | 1.0 | NO |" in text
    assert "| came_int8 | came | 4.0000 | 4.0000 | 1.0000x | 1.0000x | 1.0 | yes |" in text


def test_long_run_keeps_the_rows_done_when_its_time_runs_out(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "_installed", lambda module: True)  # rows faked: no peer needed
    monkeypatch.setenv("GPU_CHECK_PART_BUDGET_S", "100")  # 75 s for rows once the driver's and the plot's are kept
    clock = [0.0]
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])

    def fake_train(name, builder, kwargs, data, size, device):
        clock[0] += 20.0  # each row 20 s: after three, a fourth (with 20% margin) would end past 75 s
        return {"curve": [5.0, 4.0], "held_out": 4.0, "ms_per_step": 1.0}

    monkeypatch.setattr(gpu_check, "_long_run_train", fake_train)
    with pytest.raises(AssertionError) as err:
        gpu_check.part_long_run(dry=True)
    text = str(err.value)
    assert "| adamw_8bit | adamw | 4.0000 | 4.0000 | 1.0000x |" in text
    assert "| bnb_adamw_8bit | adamw | 4.0000 | 4.0000 | 1.0000x |" in text
    assert "| came | - | - | - | - | - | - | FAILED: skipped, the part's time budget would run out |" in text
    assert "| came_int8 | came | - | - | - | - | - | FAILED: skipped" in text


# ------------------------------------------------------------------ packing: what keeping documents apart costs
def test_packing_dry_run_measures_both_batches_and_reports_a_failed_optional_attention(monkeypatch):
    """The part at toy size: TextDataModule's own batches (``attention_mask`` for plain causal, ``position_ids``
    for documents kept apart) through ``CausalLMModule``; an optional attention that cannot run here fails its
    own row only (an unknown name: ``flash_attention_2`` without ``flash_attn`` would ask the Hub for a kernel)."""
    monkeypatch.setattr(gpu_check, "PACKING_ROWS", (*gpu_check.PACKING_ROWS[:2], ("no_such_attention", True)))
    lines = gpu_check.part_packing(dry=True)
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| sdpa", "False", "input_ids, attention_mask"], ["| sdpa", "True", "input_ids, position_ids"],
        ["| no_such_attention", "True", "input_ids, position_ids"]]
    assert rows[0].split(" | ")[6] == "1.00x" and rows[0].endswith("| n/a on CPU |")
    assert " | failed: ValueError: " in rows[2]
    assert lines[-1].startswith("Keeping documents apart under sdpa: ") and "document starts per block" in lines[0]


def test_packing_skips_flash_attention_with_the_reason(monkeypatch):
    monkeypatch.setattr(gpu_check, "_installed", lambda name: name != "flash_attn")
    assert gpu_check._packing_skip_reason("flash_attention_2") == "skipped: flash_attn not installed"
    assert gpu_check._packing_skip_reason("sdpa") is None
    monkeypatch.setattr(gpu_check, "_installed", lambda name: True)
    assert gpu_check._packing_skip_reason("flash_attention_2") == "skipped: CUDA only"  # this machine has no GPU


def test_packing_corpus_has_realistic_document_lengths_and_enough_tokens(tmp_path):
    size = gpu_check.PACKING_SIZE
    path = gpu_check._packing_corpus(tmp_path, size)
    lengths = sorted(len(json.loads(line)["text"]) for line in path.read_text().splitlines())
    assert sum(n + 2 for n in lengths) >= (size["steps"] + 1) * size["batch"] * size["seq"]
    assert 0.8 * size["median_tokens"] < lengths[len(lengths) // 2] < 1.25 * size["median_tokens"]
    assert lengths[0] < 100 and lengths[-1] > size["seq"]  # short records and some longer than a block
    assert (len(lengths), round(sum(lengths) / len(lengths))) == (103, 576)  # as PACKING_SIZE's docstring says
    assert path.read_text() == gpu_check._packing_corpus(tmp_path, size).read_text()  # the same file every run


def test_every_device_command_in_the_plan_fits_560_s_and_packing_is_not_in_the_first():
    """Each ``--parts`` list of the docstring's device commands names known parts whose budgets add up to at most
    560 s (the commands' timeout); ``packing`` is in a later command, not the first (its budget is full)."""
    doc = " ".join(gpu_check.__doc__.split())
    commands = [chunk.split(" ")[0].split(",") for chunk in doc.split("--parts ")[1:]]
    assert len(commands) == 5 and commands[0] == list(gpu_check.RECOMMENDED_PARTS)
    assert commands[3] == ["qlora_moe", "host_embeddings"] and "(120 s of part budget" in doc
    assert commands[4] == ["qdora_7b"] and "(110 s of part budget, ``timeout_s`` 170" in doc
    assert gpu_check.BUDGET_S["qdora_7b"] == 110
    assert gpu_check.BUDGET_S["qlora_moe"] == 120 and gpu_check.BUDGET_S["host_embeddings"] == 75
    assert "(75 s; ``timeout_s`` 260 for both" in doc
    for parts in commands:
        assert set(parts) <= set(gpu_check.PARTS), parts
        assert sum(gpu_check.BUDGET_S[p] for p in parts) <= 560, parts
    assert "packing" not in commands[0] and any("packing" in parts for parts in commands[1:])
    assert "--parts packing,sync,ema" in doc and "(125 s of part budgets" in doc and "``timeout_s`` 210" in doc
    assert gpu_check.BUDGET_S["packing"] + gpu_check.BUDGET_S["sync"] + gpu_check.BUDGET_S["ema"] == 125
