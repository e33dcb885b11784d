"""Smoke tests of the benchmark scripts on tiny sizes: they run, print their tables, write CSV rows."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def optim_step():
    return _load("optim_step")


def test_size_parsing_and_shapes(optim_step):
    assert optim_step.parse_size("4M") == 4 * 2**20
    assert optim_step.parse_size("64k") == 65536
    assert optim_step.size_label(16 * 2**20) == "16M"
    assert optim_step.matrix_shapes(4 * 2**20, 4) == [(1024, 1024)] * 4
    assert optim_step.matrix_shapes(3 * 2**20, 4) == [(768, 1024)] * 4
    with pytest.raises(ValueError, match="size"):
        optim_step.parse_size("lots")


def test_optim_step_table_and_csv(optim_step, tmp_path, capsys, monkeypatch):
    missing = optim_step.Row("missing_peer", optim_step._peer("no_such_module_xyz", lambda m, ps: None), False)
    monkeypatch.setattr(optim_step, "ROWS", optim_step.ROWS + [missing])
    out_csv, out_md = tmp_path / "results.csv", tmp_path / "report.md"
    names = "torch_adamw_fused,sgd,sgd_int8,torch_sgd_foreach,missing_peer"
    argv = ["--sizes", "64K", "--repeats", "2", "--warmup", "0", "--optimizers", names,
            "--csv", str(out_csv), "--markdown", str(out_md)]
    assert optim_step.main(argv) == 0
    text = capsys.readouterr().out
    assert "| optimizer | params | median step (ms) | x torch AdamW foreach |" in text
    table = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert set(names.split(",")) | {"torch_adamw_foreach"} <= set(table)
    assert "| 1.00 |" in table["torch_adamw_foreach"]
    assert "not available" in table["missing_peer"] and "no_such_module_xyz" in table["missing_peer"]
    # measured state: fp32 momentum 4 B/param; 8-bit momentum 1 + 4/256 B/param (+ 4 step counters)
    assert "| 4.000 |" in table["sgd"] and "| 1.016 |" in table["sgd_int8"]
    # bytes moved from the tensors: fp32 param r+w, grad r, 4 B/param momentum r+w (+ step counters)
    moved = float(table["sgd"].split("|")[7])
    assert moved == pytest.approx((8 + 4 + 8) * 65536 / 1e6, abs=0.01)
    assert float(table["sgd"].split("|")[10]) >= 0  # % of the same-size copy (rounded: 0 on a loaded machine)
    assert out_md.read_text().count("| sgd_int8 |") == 1
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == optim_step.CSV_HEADER
    by_key = {(r["optimizer"], r["metric"]): r for r in rows}
    assert float(by_key[("sgd", "median_ms")]["value"]) > 0
    assert float(by_key[("sgd", "pct_of_copy")]["value"]) > 0  # unrounded
    assert float(by_key[("sgd_int8", "state_bytes_per_param")]["value"]) == pytest.approx(1.0157, abs=1e-3)
    assert by_key[("missing_peer", "unavailable")]["value"].startswith("not available")
    assert rows[0]["torch"] == torch.__version__ and "triton" in rows[0]["device"]


def test_peer_state_bytes_counts_distinct_storages(optim_step):
    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, foreach=True)
    opt.step()
    # exp_avg + exp_avg_sq (4 B each) per element + one fp32 step counter per tensor
    assert optim_step.state_bytes(opt, ours=False) == 2 * (8 * 64 * 64 + 4)


def test_codec_study_small(capsys):
    codec_study = _load("codec_study")
    argv = ["--size", "64", "--steps", "5", "--state-numel", "16K", "--throughput-numel", "16K", "--no-compile"]
    assert codec_study.main(argv) == 0
    text = capsys.readouterr().out
    for heading in ("### Accuracy", "### Dynamic range", "### Throughput"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| power (ours) |")]
    assert len(rows) == 3
    cosine = float(rows[0].split("|")[3])
    assert 0.99 < cosine <= 1.0


def test_codec_candidates_round_trip():
    codec_study = _load("codec_study")
    x = torch.randn(1000)
    for code in codec_study.CODES:
        err = (codec_study.round_trip(x, code, signed=True) - x).abs().max() / x.abs().max()
        assert err < 0.05, code.name
        v = x.abs()
        assert (codec_study.round_trip(v, code, signed=False) >= 0).all()


def test_ptx_counts_tells_scalar_from_vector_accesses():
    from lowmem_lightning.kernels.aot import count_accesses as count
    ptx = "\n".join([
        "\tld.global.b32 { %r9 }, [ %rd10 + 0 ];",
        "\t@%p1 ld.global.b8 { %rs1 }, [ %rd1 + 0 ];",
        "\t@!%p2 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\tld.global.v2.b16 { %rs1, %rs2 }, [ %rd3 + 0 ];",
        "\t@%p3 st.global.v4.b32 [ %rd2 + 0 ], { %r1, %r2, %r3, %r4 };",
        "\tst.global.b8 [ %rd2 + 0 ], %rs1;",
        "\tld.shared.b32 %r1, [ %r2 ];",  # not global memory
        "// ld.global.v4 in a comment",
    ])
    assert count(ptx) == {"ld": 2, "ld.v2": 1, "ld.v4": 1, "st": 1, "st.v2": 0, "st.v4": 1}


def test_lora_update_size_follows_muons_shape_rule():
    """Muon's default scaling moves a LoRA factor by ~lr / sqrt(cols): lora_A (r x in) far less than lora_B (out x r);
    match_rms_adamw brings both to ~0.2 lr (the figures README quotes come from this script)."""
    bench = _load("lora_update_size")
    width, rank = 64, 4
    muon = bench.update_rms("muon", {}, width, rank, steps=2, lr=1e-3)
    matched = bench.update_rms("muon", {"adjust_lr_fn": "match_rms_adamw"}, width, rank, steps=2, lr=1e-3)
    assert muon["lora_A"] == pytest.approx(width ** -0.5, rel=0.25)
    assert muon["lora_B"] == pytest.approx(rank ** -0.5, rel=0.25)
    assert 0.1 < matched["lora_A"] < 0.3 and 0.1 < matched["lora_B"] < 0.3


def test_ema_update_small(capsys, one_thread):
    """``benchmarks/ema_update.py`` at a toy size: the shared average holds the trainable bytes alone, the full copy
    the whole model."""
    assert _load("ema_update").main(["--hidden", "64", "--layers", "1", "--repeats", "1", "--updates", "1"]) == 0
    text = capsys.readouterr().out
    trainable = int(text.split("trainable ")[1].split(" bytes")[0].replace(",", ""))
    whole = int(text.split("params, ")[1].split(" bytes")[0].replace(",", ""))
    rows = {line.split("|")[1].strip(): int(line.split("|")[2].replace(",", "")) for line in text.splitlines()
            if line.startswith(("| full copy |", "| shared"))}
    assert rows == {"full copy": whole, "shared, torch's update": trainable, "shared": trainable}
    assert "averages bit-equal: True" in text and "validation swap of the shared average" in text


def test_kbit_prepare_table(capsys, one_thread):
    """``benchmarks/kbit_prepare.py``: peft's preparation doubles the frozen bf16 weights, ours keeps them."""
    assert _load("kbit_prepare").main([]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    theirs, ours = (int(row[2].strip().removesuffix(" B").replace(",", "")) for row in rows)
    assert [row[3].strip() for row in rows] == ["float32", "bfloat16"] and theirs > 1.9 * ours


def test_frozen_checkpoint_small(capsys, one_thread):
    """``benchmarks/frozen_checkpoint.py`` at a toy size: the checkpoint without the frozen base is the smaller by at
    least the base's bytes, and loads back to the trained module."""
    assert _load("frozen_checkpoint").main(["--hidden", "64", "--layers", "1", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): int(line.split("|")[2].replace(",", "")) for line in text.splitlines()
            if line.startswith(("| whole |", "| frozen base left out |"))}
    assert rows["whole"] > 20 * rows["frozen base left out"], rows
    assert "equal to the trained module: True" in text


def test_packed_documents_sweep_gives_each_model_type_a_verdict(capsys):
    """``packed_documents_sweep.py gpt_oss nosuchtype``: gpt-oss keeps its packed documents apart (through
    ``packed_call``), a type transformers lacks is listed as not built, and the counts close the output."""
    sweep = _load("packed_documents_sweep")
    assert sweep.main(["gpt_oss", "nosuchtype"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["gpt_oss", "OK"], lines
    assert lines[1].split()[:3] == ["nosuchtype", "not", "built"], lines
    assert lines[-1] == "OK: 1, not: 1"


def test_peft_methods_4bit_prints_each_methods_row_per_backend(capsys):
    """``peft_methods_4bit.py VeRA OFT``: on our NF4, VeRA's forward equals its dense twin's and both merges keep the
    adapter model's logits; OFT's merges are refused with our message."""
    table = _load("peft_methods_4bit")
    assert table.main(["VeRA", "OFT"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if " | ours | " in line]
    assert [r[0] for r in rows] == ["VeRA", "OFT"], rows
    vera, oft = rows
    assert vera[2] == "forward 0.0e+00", vera
    assert all(float(cell.split()[-1]) < 1e-5 for cell in vera[3:]), vera
    assert oft[2] == "forward 0.0e+00" and all("stored as 4-bit NF4 codes" in cell for cell in oft[3:]), oft


def test_qdora_step_times_the_three_steps_and_gives_ratios_to_qlora(capsys):
    bench = _load("qdora_step")
    assert bench.main(["--hidden", "64", "--layers", "1", "--seq", "16", "--steps", "1", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "ms/step" in line]
    assert [row.split("  ")[0] for row in rows] == ["QLoRA (ours)", "QDoRA (ours)", "DoRA on dense (peft)"], rows
    assert rows[0].endswith("x1.00 of QLoRA")


def test_encoder_as_decoder_lists_the_types_with_a_switch_and_whether_they_see_later_tokens(capsys):
    """``encoder_as_decoder.py roberta llama``: RoBERTa, built from its switch off, sees later tokens and not after
    ``as_causal_decoder``; Llama has no switch and gets no line."""
    table = _load("encoder_as_decoder")
    assert table.main(["roberta", "llama"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("roberta") and lines[0].endswith("as_causal_decoder: 0.0e+00")
    assert float(lines[0].split("is_decoder off:")[1].split()[0]) > 1e-4
    assert lines[1] == "model types with an is_decoder switch: 1; attending to later tokens with it off: 1"
