"""FlashOptim as a benchmark peer (benchmarks/optim_step.py, release_step.py, gpu_check.py): its rows are in the
tables, say why they are skipped off CUDA or without the package, count its state from its own containers, and
drive FlashAdamW with the hyperparameters and step semantics of our ``adamw_8bit`` row (checked on FlashOptim's
unquantized, unfused CPU path, the only one that runs without CUDA)."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
ROWS = ("flashoptim_adamw", "flashoptim_adamw_nomaster")
CPU_PATH = dict(quantize=False, fused=False, master_weight_bits=None)
"""FlashAdamW arguments of its plain-PyTorch path: fp32 states, no error bits, no Triton (CUDA not needed)."""


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def optim_step():
    return _load("optim_step")


@pytest.fixture(scope="module")
def release_step():
    return _load("release_step")


def _table(text: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}


def test_rows_are_in_the_peer_table(optim_step, capsys):
    names = [row.name for row in optim_step.ROWS]
    assert set(ROWS) <= set(names)
    assert all(not row.ours for row in optim_step.ROWS if row.name in ROWS)
    assert optim_step.main(["--list"]) == 0
    assert set(ROWS) <= set(capsys.readouterr().out.split())


def test_off_cuda_the_rows_print_why(optim_step, tmp_path, capsys):
    """bf16 params on the CPU: both rows skipped as CUDA only, in the table (stdout), on stderr and in the CSV."""
    pytest.importorskip("flashoptim")
    out_csv = tmp_path / "r.csv"
    argv = ["--sizes", "64K", "--repeats", "1", "--warmup", "0", "--param-dtype", "bfloat16",
            "--optimizers", ",".join(ROWS), "--csv", str(out_csv)]
    assert optim_step.main(argv) == 0
    captured = capsys.readouterr()
    table = _table(captured.out)
    for name in ROWS:
        assert "skipped: FlashOptim is CUDA only" in table[name] and "params on cpu" in table[name]
        assert "| - | - |" in table[name]  # no figures
    assert captured.err.count("skipped: FlashOptim is CUDA only") == 2
    with out_csv.open() as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    for name in ROWS:
        assert rows[name]["metric"] == "unavailable" and rows[name]["value"].startswith("skipped: FlashOptim is CUDA")


def test_fp32_params_make_the_master_weight_row_not_applicable(optim_step):
    params = [torch.nn.Parameter(torch.zeros(8))]
    reason = optim_step.flashoptim_skip_reason(params, 24)
    assert reason.startswith("not applicable: master_weight_bits=24") and "float32" in reason
    assert optim_step.flashoptim_skip_reason(params, None).startswith("skipped: FlashOptim is CUDA only")
    bf16 = [torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))]
    assert optim_step.flashoptim_skip_reason(bf16, 24).startswith("skipped: FlashOptim is CUDA only")
    with pytest.raises(ValueError, match="master_weight_bits 16.*None, 24 or 32"):
        optim_step.flashoptim_kwargs(16)


def test_without_the_package_the_rows_say_not_installed(optim_step, release_step, monkeypatch):
    monkeypatch.setitem(sys.modules, "flashoptim", None)  # import flashoptim -> ImportError
    grads = [torch.zeros(64, 64, dtype=torch.bfloat16)]
    base = [torch.zeros(64, 64, dtype=torch.bfloat16)]
    args = optim_step.parse_args(["--repeats", "1", "--warmup", "0"])
    for row in (r for r in optim_step.ROWS if r.name in ROWS):
        result = optim_step.bench_row(row, base, grads, args, torch.device("cpu"))
        assert result.median_ms is None and "`flashoptim` not installed" in result.note, result.note
    args = release_step.parse_args(["--optimizers", "flashoptim_adamw", "--hidden", "64", "--layers", "1"])
    assert "`flashoptim` not installed" in release_step.measure("flashoptim_adamw", args)["note"]


def test_state_counted_from_flashoptims_containers(optim_step):
    """Quantized moments (codes + one fp16 scale per 32 elements, built through FlashOptim's own container from a
    state dict: no CUDA needed) and error bits as stored; the plain fp32 moments of its CPU path."""
    fo = pytest.importorskip("flashoptim.optimizers")
    n = 4096 + 32 * 3  # 131 groups
    codes = {"exp_avg::quantized": torch.zeros(n, dtype=torch.int8), "exp_avg::scales": torch.ones(n // 32,
                                                                                                    dtype=torch.float16)}
    moment = fo._MaybeQuantizedTensor.from_state_dict(codes, "exp_avg", try_quantize=False)
    assert moment.is_quantized()

    class Holder:
        state = {"p": {"exp_avg": moment, "error_bits": torch.zeros(n, dtype=torch.int8)}}

    assert optim_step.state_bytes(Holder(), ours=False) == n + 2 * (n // 32) + n
    # from the source: m, v 8-bit + fp16 scale per 32; error bits (bf16 + 24 bits: int8, + 32: int16)
    assert optim_step.flashoptim_state_bytes_per_param(torch.bfloat16, 24) == pytest.approx(3.125)
    assert optim_step.flashoptim_state_bytes_per_param(torch.bfloat16, 32) == pytest.approx(4.125)
    assert optim_step.flashoptim_state_bytes_per_param(torch.bfloat16, None) == pytest.approx(2.125)
    assert optim_step.flashoptim_state_bytes_per_param(torch.float32, None) == pytest.approx(2.125)

    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(2)]
    opt = fo.FlashAdamW(params, **{**optim_step.flashoptim_kwargs(None), **CPU_PATH})
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert optim_step.state_bytes(opt, ours=False) == 2 * (2 * 4 * 64 * 64 + 8)  # m, v fp32 + int64 step each


@pytest.mark.parametrize("master_weight_bits", [24, None])
def test_adapter_is_our_rows_adamw(optim_step, master_weight_bits):
    """The FlashOptim rows' hyperparameters are the adamw_8bit row's (lr, betas, eps, weight decay), and
    FlashAdamW with them takes torch AdamW's steps (decoupled decay, bias correction, eps outside the root)."""
    fo = pytest.importorskip("flashoptim")
    ours = next(r for r in optim_step.ROWS if r.name == "adamw_8bit").build([torch.nn.Parameter(torch.zeros(8))])
    kwargs = optim_step.flashoptim_kwargs(master_weight_bits)
    assert kwargs["master_weight_bits"] == master_weight_bits
    hyper = ("lr", "betas", "eps", "weight_decay")
    assert {k: kwargs[k] for k in hyper} == {k: ours.param_groups[0][k] for k in hyper}

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(33, 65, generator=gen), torch.randn(4097, generator=gen)]
    grads = [[torch.randn(s.shape, generator=gen) for s in start] for _ in range(20)]
    flash = [torch.nn.Parameter(s.clone()) for s in start]
    ref = [torch.nn.Parameter(s.clone()) for s in start]
    opt = fo.FlashAdamW(flash, **{**kwargs, **CPU_PATH})
    torch_opt = torch.optim.AdamW(ref, **{k: kwargs[k] for k in hyper}, foreach=False)
    for step in grads:
        for ps, o in ((flash, opt), (ref, torch_opt)):
            for p, g in zip(ps, step):
                p.grad = g.clone()
            o.step()
    for a, b, s in zip(flash, ref, start):
        assert (b - s).abs().max() > 1e-3  # 20 steps of lr 1e-3 moved them
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # a few ulps: rounding order


def test_release_row_steps_like_the_normal_step_on_cpu(release_step):
    """release_step's FlashOptim row wiring on its CPU path: a model trained with FlashOptim's
    enable_gradient_release (step() and zero_grad() not called) ends bit-equal to the normal loop."""
    pytest.importorskip("flashoptim")
    args = release_step.parse_args(["--hidden", "64", "--layers", "1"])
    models = []
    for release in (False, True):
        model = release_step.tiny_llama(args.hidden, args.layers)
        opt, handle = release_step.flashoptim_optimizer(model, "flashoptim_adamw", 1e-3, release, **CPU_PATH)
        assert (handle is not None) == release
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            batch = torch.randint(0, 256, (2, 16), generator=gen)
            model(input_ids=batch, labels=batch).loss.backward()
            if not release:
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
        models.append(model)
    first = release_step.tiny_llama(args.hidden, args.layers)
    for a, b, s in zip(models[0].parameters(), models[1].parameters(), first.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, s)


def test_release_step_reports_the_skip_off_cuda(release_step, capsys):
    pytest.importorskip("flashoptim")
    argv = ["--optimizers", ",".join(ROWS), "--hidden", "64", "--layers", "1", "--dtype", "bfloat16",
            "--repeats", "1", "--warmup", "0"]
    assert release_step.main(argv) == 0
    table = _table(capsys.readouterr().out)
    for name in ROWS:
        assert table[name].startswith(f"| {name} | - |") and "skipped: FlashOptim is CUDA only" in table[name]
    with pytest.raises(SystemExit):
        release_step.parse_args(["--count", "--optimizers", "adamw_8bit,flashoptim_adamw"])
    args = release_step.parse_args(["--gpu-check-size"])
    assert (args.hidden, args.layers, args.vocab, args.head_dim, args.seq, args.dtype) == (
        2048, 12, 32000, 128, 256, "bfloat16")


def test_gpu_check_release_rows_skip_with_the_reason():
    """gpu_check's release part ends with FlashOptim's line: on the CPU its skip reason (CUDA only, or not
    installed), never a crash (the dry step_time part's rows: tests/test_gpu_check.py)."""
    sys.path.insert(0, str(BENCH))
    import gpu_check

    lines = gpu_check._flashoptim_release_rows(True, torch.device("cpu"))
    assert len(lines) == 1 and lines[0].startswith("| FlashOptim FlashAdamW (24-bit master), normal and released |")
    assert ("CUDA only" in lines[0]) if importlib.util.find_spec("flashoptim") else ("not installed" in lines[0])
