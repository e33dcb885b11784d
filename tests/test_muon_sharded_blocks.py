"""muon_8bit on DTensor params (FSDP2's ``Shard(0)``) whose shards do not end on a 256-element block boundary.

Two forked gloo ranks each hold a dim-0 shard; the gathered params and 8-bit momentum (codes and the value each
code stands for, read through the state dict's row form) equal one unsharded process bit for bit: the momentum
blocks follow the whole tensor's flat index, and a block split between ranks takes the maximum over both parts
(one small ``all_reduce`` per step). Shapes: a conv filter ``[66, 7, 3, 3]`` (33 rows of 63 per rank: rank 1
starts at element 2079, 31 into a block) and a ``[70, 65]`` matrix (2275 per rank); at step 2 the filter's
gradient holds an inf on rank 1's part, so both runs skip it (the split blocks' codes left untouched on every rank).
The same on the Triton momentum kernel (interpreter, forced), which runs the blocks a shard holds whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from forked_ranks import forked_ranks

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.codec import dequantize_reference
from lowmem_lightning.optim import build_optimizer
from lowmem_lightning.optim.reshard import decode_rows

WORLD = 2
STEPS = 4
SHAPES = {"conv": (66, 7, 3, 3), "matrix": (70, 65), "even": (64, 256)}
KWARGS = dict(lr=2e-2, weight_decay=0.1, momentum=0.95)


@pytest.fixture(autouse=True)
def _needs_distributed():
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")


def _full_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) * 0.1 for name, shape in SHAPES.items()}


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # a different scale per step and param, so block maxima move between the ranks' parts of a split block
    grads = {name: torch.randn(shape, generator=g) * (0.1 + 0.05 * step) for name, shape in SHAPES.items()}
    if step == 2:
        grads["conv"][40, 0, 0, 0] = float("inf")  # skipped by both runs
    return grads


def _build(params: dict[str, torch.Tensor], name: str = "muon_8bit"):
    return build_optimizer(name, [{"params": list(params.values()), "use_muon": True}], **KWARGS)


def _sharded_run(rank: int, steps: int, triton: bool = False) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    params = {n: torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for n, t in _full_params().items()}
    opt = _build(params)
    with dispatch.override(force_triton=triton):
        for step in range(steps):
            for name, grad in _grads(step).items():
                params[name].grad = distribute_tensor(grad, mesh, [Shard(0)])
            opt.step()
    assert opt.skipped_updates == (1 if steps > 2 else 0)
    state = opt.state_dict()["state"]
    momentum = {name: {key: state[i][key].full_tensor() for key in ("momentum_codes", "momentum_absmax")}
                for i, name in enumerate(params)}
    return {"params": {n: p.full_tensor().detach().clone() for n, p in params.items()}, "momentum": momentum}


def _plain_run(steps: int, triton: bool = False) -> tuple[dict, dict]:
    params = {n: torch.nn.Parameter(t.clone()) for n, t in _full_params().items()}
    opt = _build(params)
    with dispatch.override(force_triton=triton):
        for step in range(steps):
            for name, grad in _grads(step).items():
                params[name].grad = grad.clone()
            opt.step()
    state = [opt.state[p] for p in params.values()]
    return ({n: p.detach().clone() for n, p in params.items()},
            {n: (s["momentum_codes"], s["momentum_absmax"]) for n, s in zip(params, state)})


def _assert_momentum_equal(sharded: dict, plain: dict) -> None:
    for name, (codes, absmax) in plain.items():
        got = sharded[name]
        torch.testing.assert_close(got["momentum_codes"].reshape(-1), codes, rtol=0, atol=0, msg=name)
        values = dequantize_reference(codes, absmax)[: codes.numel()]
        torch.testing.assert_close(decode_rows(got["momentum_codes"], got["momentum_absmax"]), values, rtol=0,
                                   atol=0, msg=name)


def test_sharded_muon_8bit_equals_one_process_when_shards_split_blocks(tmp_path):
    ranks = forked_ranks(tmp_path, WORLD, _sharded_run, STEPS)
    params, momentum = _plain_run(STEPS)
    start = _full_params()
    for name, expected in params.items():
        assert (expected - start[name]).abs().max() > 1e-3, name  # the params moved
        for result in ranks:
            torch.testing.assert_close(result["params"][name], expected, rtol=0, atol=0, msg=name)
    _assert_momentum_equal(ranks[0]["momentum"], momentum)


@pytest.mark.slow  # ~5 s: the interpreter
def test_sharded_muon_8bit_on_the_triton_kernel_equals_one_process(tmp_path):
    """Forced Triton (interpreter): the kernel runs each shard's whole blocks (unaligned slices of the shard), the
    split blocks take the reference; params and momentum equal one process on the kernel and one on the reference
    (the CPU path) bit for bit."""
    ranks = forked_ranks(tmp_path, WORLD, _sharded_run, STEPS, True)
    for triton in (True, False):
        params, momentum = _plain_run(STEPS, triton=triton)
        for name, expected in params.items():
            for result in ranks:
                torch.testing.assert_close(result["params"][name], expected, rtol=0, atol=0, msg=name)
        _assert_momentum_equal(ranks[0]["momentum"], momentum)


@pytest.mark.slow  # ~1-3 s each (one multi-rank case stays in the default suite, above)
@pytest.mark.parametrize("before,after,how", [(2, 3, "dcp"), (2, 1, "dcp"), (2, 3, "full")])
def test_sharded_muon_8bit_checkpoint_resumes_on_another_world_size_bit_for_bit(tmp_path, monkeypatch, before,
                                                                               after, how):
    """tests/test_reshard.py's run (FSDP2-style params, ``torch.distributed.checkpoint`` after step 2) with
    muon_8bit, sharded (``dcp``) or as one file (``full``: rank 0 gathers, ``broadcast_from_rank0`` on load): the
    whole tensor's blocks are the same on every world size, so the loaded momentum equals the saved
    one exactly (no block moved) and the resumed steps end where the uninterrupted run does, bit for bit, on every
    Muon matrix ("uneven" 33x300: rank 1 of 2 starts 236 elements into a block); the 1-D "flat" param takes the
    AdamW part (blocks per shard: re-encoded, within test_reshard's bound)."""
    import test_reshard

    monkeypatch.setitem(test_reshard.CASES, "muon_8bit", dict(lr=1e-2, weight_decay=0.1))
    saved, loaded, moved = test_reshard._reshard(tmp_path, "muon_8bit", before, after, how)
    for name in ("even", "uneven", "small", "wide"):  # the Muon matrices ("small": fp32 momentum)
        assert moved[name] == 0, name
        torch.testing.assert_close(loaded["final"][name], saved["final"][name], rtol=0, atol=0, msg=name)
    assert "momentum_codes" in saved["state2"]["uneven"]
    ratios = test_reshard._check_training("muon_8bit", saved, loaded, moved)
    assert moved["flat"] > 0 and ratios["flat"] < test_reshard.MOVED_FRACTION


@pytest.mark.slow  # ~15 s: two spawned processes
def test_muon_8bit_conv_filters_under_fully_shard_equal_one_process(tmp_path):
    """tests/test_field_vision.py's FSDP2 run (``fully_shard`` of a small CNN on 2 gloo ranks, a ``[66, 9, 3, 3]``
    filter split 33 rows of 81 = 2673 elements each, 113 into a block) with muon_8bit: the params equal one
    unsharded process's bit for bit, as with fp32 momentum."""
    import json

    import test_field_vision
    from launched_scripts import run_script

    script = test_field_vision.FSDP2_SCRIPT.replace('build_optimizer("muon",', 'build_optimizer("muon_8bit",')
    assert script != test_field_vision.FSDP2_SCRIPT
    (tmp_path / "fsdp2_conv.py").write_text(script)
    run_script(tmp_path / "fsdp2_conv.py", cwd=tmp_path, port=True, timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["muon"] == 3
    assert result["diffs"] == dict.fromkeys(result["diffs"], 0.0)


def test_row_form_with_a_head_round_trips_and_loads_per_shard_blocks():
    """:mod:`lowmem_lightning.optim.reshard` with ``head`` (no processes): a shard's whole-tensor blocks in row
    form come back bit for bit; rows saved with blocks per shard (the layout before) load into them with each
    value within one code step, blocks inside one saved block keeping their codes and scale."""
    from lowmem_lightning.kernels.codec import quantize_reference
    from lowmem_lightning.optim.reshard import blocks_from_rows, code_step, row_width, rows_from_blocks

    shape, head = (35, 65), 35 * 65 % 256  # rank 1 of a [70, 65] matrix on 2 ranks: 227 into its first block
    n, width = 35 * 65, row_width((70, 65))
    values = torch.randn(n, generator=torch.Generator().manual_seed(3))
    codes, absmax = quantize_reference(torch.nn.functional.pad(values, (head, 0)), signed=True)
    rows = rows_from_blocks(absmax, shape, width, head=head)
    got_codes, got_absmax, moved = blocks_from_rows(codes[head:].clone().view(shape), rows, codes.numel(),
                                                    head=head, within=True)
    assert moved == 0
    torch.testing.assert_close(got_codes, codes, rtol=0, atol=0)
    torch.testing.assert_close(got_absmax, absmax, rtol=0, atol=0)

    old_codes, old_absmax = quantize_reference(values, signed=True)  # blocks from the shard's first element
    old_rows = rows_from_blocks(old_absmax, shape, width)
    saved = decode_rows(old_codes[:n].view(shape), old_rows)
    new_codes, new_absmax, moved = blocks_from_rows(old_codes[:n].clone().view(shape), old_rows, codes.numel(),
                                                    head=head, within=True)
    loaded = dequantize_reference(new_codes, new_absmax)[head: head + n]
    scale = new_absmax.repeat_interleave(256)[head: head + n]
    assert 0 < moved < n
    assert ((loaded - saved).abs() <= code_step(new_codes[head: head + n], scale)).all()
    assert (loaded == saved).float().mean() > 0.5


def odd_net_init(self) -> None:
    """``tests/test_ddp.py``'s ``Net`` with a hidden ``[65, 70]`` matrix (4550 elements: 8-bit momentum; FSDP2 gives
    rank 0 33 rows, 2310 elements, so rank 1 starts 6 elements into a block)."""
    import lightning as L
    from torch import nn

    L.LightningModule.__init__(self)
    self.net = nn.Sequential(nn.Linear(16, 70), nn.Tanh(), nn.Linear(70, 65), nn.Tanh(), nn.Linear(65, 1))


@pytest.mark.slow  # ~60 s: three 2-rank fits and one single-process fit
def test_muon_8bit_under_lightning_fsdp2_with_split_blocks_matches_one_process_and_resumes(tmp_path, monkeypatch):
    """tests/test_fsdp2.py's run (Lightning ``ModelParallelStrategy``, 2 gloo ranks, ``LowMemOptimizerCallback``,
    a sharded checkpoint after epoch 1) with muon_8bit on a net whose 8-bit matrix is split inside a block: the
    resume from the checkpoint is bit for bit, and epoch 1 equals one process to fp32 summation order of the
    gradients (test_fsdp2's bound)."""
    import test_ddp
    import test_fsdp2

    line = "from test_ddp import GLOBAL_BATCH, Net, _data\n"
    script = test_fsdp2.SCRIPT.replace(line, line + "from test_muon_sharded_blocks import odd_net_init\n"
                                       "Net.__init__ = odd_net_init\n")
    assert script != test_fsdp2.SCRIPT
    monkeypatch.setattr(test_fsdp2, "SCRIPT", script)
    monkeypatch.setitem(test_fsdp2.OPTIMIZERS, "muon_8bit", ("Muon8bit", 1.0, 4.0, True))
    monkeypatch.setattr(test_ddp.Net, "__init__", odd_net_init)
    ranks = test_fsdp2._run_script(tmp_path, "muon_8bit", "cpu", 2)
    for result in ranks:
        assert result["optimizer"] == "Muon8bit" and result["global_step"] == 4
        for a, b in zip(result["straight"], result["resumed"]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    single = test_fsdp2._single_process_model(tmp_path, "muon_8bit")
    assert [tuple(p.shape) for p in single.parameters()][2] == (65, 70)
    for (name, a), b in zip(single.named_parameters(), ranks[0]["epoch1"]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=2e-5, msg=name)


def _convert_momentum_dtype(rank: int) -> dict:
    """Sharded fp32 Muon state loaded into muon_8bit (the buffer quantized into the whole tensor's blocks), and that
    state loaded back into fp32 Muon (the row-form codes decoded)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    param = torch.nn.Parameter(distribute_tensor(_full_params()["matrix"], mesh, [Shard(0)]))
    fp32 = build_optimizer("muon", [param], lr=1e-2)
    for step in range(2):
        param.grad = distribute_tensor(_grads(step)["matrix"], mesh, [Shard(0)])
        fp32.step()
    eight = build_optimizer("muon_8bit", [param], lr=1e-2)
    eight.load_state_dict(fp32.state_dict())
    back = build_optimizer("muon", [param], lr=1e-2)
    back.load_state_dict(eight.state_dict())
    rows = eight.state_dict()["state"][0]
    return {"buffer": fp32.state[param]["momentum_buffer"], "back": back.state[param]["momentum_buffer"],
            "decoded": decode_rows(rows["momentum_codes"].to_local(), rows["momentum_absmax"].to_local())}


@pytest.mark.slow  # ~1 s, but a second default multi-rank run
def test_sharded_momentum_converts_between_fp32_and_8bit_on_load(tmp_path):
    for result in forked_ranks(tmp_path, WORLD, _convert_momentum_dtype):
        buffer, decoded = result["buffer"].reshape(-1), result["decoded"]
        assert (decoded - buffer).abs().max() <= 0.01 * buffer.abs().max()  # quantized: within a code step
        torch.testing.assert_close(result["back"].reshape(-1), decoded, rtol=0, atol=0)  # decoded exactly
