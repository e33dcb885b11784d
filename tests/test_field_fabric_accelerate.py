"""Field test: our optimizers as Lightning Fabric and HF accelerate users write their loops (brief u3).

Fabric (precision ``32-true``, ``bf16-mixed``, ``bf16-true``): ``fabric.setup`` (or ``setup_module`` +
``setup_optimizers``), ``fabric.backward``, gradient accumulation under ``fabric.no_backward_sync``,
``fabric.clip_gradients`` by norm and by value, an LR scheduler, ``fabric.save`` / ``fabric.load`` /
``fabric.load_raw`` resumed in a new process, torch AdamW's checkpoint loaded into ours, the clipping norm handed
to our step through Fabric's optimizer wrapper, and ``strategy="ddp"`` on two CPU processes. accelerate
(``mixed_precision`` ``"no"`` / ``"bf16"``, ``gradient_accumulation_steps=2``): ``prepare``, ``accumulate``,
``clip_grad_norm_``, ``save_state`` / ``load_state`` in a new process, ``unwrap_model``, and what
``optimizer_step_was_skipped`` says when our overflow guard skips.

Every optimizer run is compared with the same loop written by hand without the tool (params bit-equal): the tool
changes nothing in what our optimizer computes. fp32 torch AdamW runs the same script as the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from launched_scripts import free_port
from torch import nn

from lowmem_lightning.optim import build_optimizer

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

OPTIMIZERS = {
    "adamw": {"lr": 1e-2},  # fp32 torch AdamW: the reference run of the same script
    "adamw_8bit": {"lr": 1e-2},
    "adamw_4bit": {"lr": 1e-2},
    "came": {"lr": 1e-3, "momentum_dtype": "int8"},
    "muon_8bit": {"lr": 2e-2},  # built from model.named_parameters()
    "lion_8bit": {"lr": 1e-3},
}
FABRIC_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
ACCUMULATE = 2
STEPS = 6  # optimizer steps per run; checkpoints are taken after SAVE_AT of them
SAVE_AT = 3
HERE = Path(__file__).parent


# ================================================================================ the shared script
def make_model() -> nn.Module:
    """Tiny MLP: the first weight (64 x 80 = 5120 elements) gets quantized state, the rest 32-bit state."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 80), nn.Tanh(), nn.Linear(80, 8))


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """``build_optimizer(name, ...)`` as users call it (Muon from named params) and a StepLR-ready lr."""
    params = model.named_parameters() if name.startswith("muon") else model.parameters()
    return build_optimizer(name, params, **OPTIMIZERS[name])


def make_scheduler(opt) -> torch.optim.lr_scheduler.LRScheduler:
    """An LR schedule that changes the lr mid-run (halved every 2 optimizer steps)."""
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def micro_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``index``: 16 x 64 inputs from a per-index seed, target a smooth function of them."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1000 + index))
    return x, x[:, :8].sin()


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32."""
    return (out.float() - y).square().mean()


def clip_kind(step: int) -> str:
    """Odd steps clip by norm (max_norm=1.0), even steps by value (0.5)."""
    return "norm" if step % 2 else "value"


def state_tensors(opt) -> dict[str, torch.Tensor]:
    """``{"param index/key": tensor}`` of every tensor in the optimizer's state dict (for bit-equality)."""
    out = {}
    for pid, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"{pid}/{key}"] = value.detach().clone()
    return out


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """Same keys, and every tensor equal bit for bit (dtype included)."""
    assert a.keys() == b.keys(), what
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{what}: {key}"


# ================================================================================ Fabric
def fabric_steps(fabric, model, opt, sched, start: int, steps: int, reuse_norm: bool = False) -> list[float]:
    """The Fabric loop: ``ACCUMULATE`` micro-batches (all but the last under ``no_backward_sync``),
    ``fabric.clip_gradients`` (norm or value), ``opt.step()``, ``sched.step()``, ``opt.zero_grad()``.
    ``reuse_norm``: hand the clipping norm to our step (``opt.use_grad_norm``). Returns the losses."""
    losses = []
    for step in range(start, start + steps):
        for k in range(ACCUMULATE):
            x, y = micro_batch(step * ACCUMULATE + k)
            with fabric.no_backward_sync(model, enabled=k < ACCUMULATE - 1):
                loss = loss_of(model(x), y)
                fabric.backward(loss / ACCUMULATE)
            losses.append(loss.item())
        if clip_kind(step) == "norm":
            norm = fabric.clip_gradients(model, opt, max_norm=1.0)
            if reuse_norm:
                opt.use_grad_norm(norm)
        else:
            fabric.clip_gradients(model, opt, clip_val=0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
    return losses


def fabric_setup(name: str, precision: str, split_setup: bool = False):
    """``(fabric, model, opt, sched)`` on one CPU device; ``split_setup``: ``setup_module`` + ``setup_optimizers``."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    model = make_model()
    opt = make_optimizer(name, model)
    sched = make_scheduler(opt)
    if split_setup:
        model = fabric.setup_module(model)
        opt = fabric.setup_optimizers(opt)
    else:
        model, opt = fabric.setup(model, opt)
    return fabric, model, opt, sched


def plain_steps(name: str, precision: str, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same loop written by hand, no Fabric: bf16 autocast for ``bf16-mixed``, a bf16 model and inputs with
    fp32 outputs for ``bf16-true``, ``torch.nn.utils`` clipping."""
    model = make_model()
    if precision == "bf16-true":
        model = model.to(torch.bfloat16)
    opt = make_optimizer(name, model)
    sched = make_scheduler(opt)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    for step in range(steps):
        for k in range(ACCUMULATE):
            x, y = micro_batch(step * ACCUMULATE + k)
            with autocast:
                out = model(x.to(torch.bfloat16) if precision == "bf16-true" else x)
            (loss_of(out, y) / ACCUMULATE).backward()
        if clip_kind(step) == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("precision", FABRIC_PRECISIONS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fabric_loop_equals_the_hand_written_loop(name, precision):
    """Fabric's loop (setup, backward, accumulation under no_backward_sync, clipping by norm and by value, an LR
    scheduler) trains our optimizer exactly as the hand-written loop does: params and optimizer state bit-equal;
    the loss falls; the lr followed the schedule. ``setup_module`` + ``setup_optimizers`` for ``bf16-true``."""
    fabric, model, opt, sched = fabric_setup(name, precision, split_setup=precision == "bf16-true")
    losses = fabric_steps(fabric, model, opt, sched, 0, STEPS)
    plain_model, plain_opt = plain_steps(name, precision, STEPS)
    assert_bit_equal(model.state_dict(), plain_model.state_dict(), f"{name} {precision} params")
    assert_bit_equal(state_tensors(opt), state_tensors(plain_opt), f"{name} {precision} optimizer state")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert opt.param_groups[0]["lr"] == OPTIMIZERS[name]["lr"] * 0.5 ** (STEPS // 2)
    if name != "adamw":
        assert opt.skipped_updates == 0


_FABRIC_RESUME = '''
import sys, torch
sys.path.insert(0, {here!r})
from test_field_fabric_accelerate import *
torch.set_num_threads(1)
for name in {names!r}:
    for precision in {precisions!r}:
        for how in ("load", "load_raw") if precision == "bf16-true" else ("load",):
            fabric, model, opt, sched = fabric_setup(name, precision)
            base = f"{tmp}/{{name}}-{{precision}}"
            if how == "load":
                state = {{"model": model, "optimizer": opt, "sched": sched, "step": 0}}
                rest = fabric.load(f"{{base}}.ckpt", state)
                assert rest == {{}} and state["step"] == {save_at}, (rest, state["step"])
            else:
                fabric.load_raw(f"{{base}}-model.pt", model)
                fabric.load_raw(f"{{base}}-opt.pt", opt)
                sched.load_state_dict(torch.load(f"{{base}}-sched.pt"))
            fabric_steps(fabric, model, opt, sched, {save_at}, {rest_steps})
            torch.save({{"params": model.state_dict(), "state": state_tensors(opt)}}, f"{{base}}-{{how}}-end.pt")
'''


def test_fabric_save_then_load_in_a_new_process_continues_bit_exactly(tmp_path):
    """``fabric.save(path, {"model", "optimizer", "sched", "step"})`` after 3 steps; a new Python process builds
    everything again, ``fabric.load``s it (and, second way, ``fabric.load_raw`` of the plain state dicts) and
    trains 3 more steps: params and optimizer state equal the uninterrupted run's bit for bit, every optimizer
    under every precision (``load_raw`` under ``bf16-true``, where the raw dicts hold bf16 params)."""
    names = [n for n in OPTIMIZERS if n != "adamw"]
    finals = {}
    for name in names:
        for precision in FABRIC_PRECISIONS:
            fabric, model, opt, sched = fabric_setup(name, precision)
            fabric_steps(fabric, model, opt, sched, 0, SAVE_AT)
            base = f"{tmp_path}/{name}-{precision}"
            fabric.save(f"{base}.ckpt", {"model": model, "optimizer": opt, "sched": sched, "step": SAVE_AT})
            torch.save(model.state_dict(), f"{base}-model.pt")
            torch.save(opt.state_dict(), f"{base}-opt.pt")
            torch.save(sched.state_dict(), f"{base}-sched.pt")
            fabric_steps(fabric, model, opt, sched, SAVE_AT, STEPS - SAVE_AT)
            finals[base] = (model.state_dict(), state_tensors(opt))
    script = _FABRIC_RESUME.format(here=str(HERE), names=names, precisions=FABRIC_PRECISIONS, tmp=str(tmp_path),
                                   save_at=SAVE_AT, rest_steps=STEPS - SAVE_AT)
    _run_python(script)
    for base, (params, state) in finals.items():
        for how in ("load", "load_raw") if base.endswith("bf16-true") else ("load",):
            resumed = torch.load(f"{base}-{how}-end.pt")
            assert_bit_equal(params, resumed["params"], f"{base} {how} params")
            assert_bit_equal(state, resumed["state"], f"{base} {how} optimizer state")


def _run_python(script: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in a new Python process (one thread, no CPU compile); assert it exited 0."""
    base_env = {"LOWMEM_CPU_COMPILE": "0", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1", "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**base_env, **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# -------------------------------------------------------------------------------- clipping norm reuse
NORM_OPS = ("aten::linalg_vector_norm", "aten::_foreach_norm", "aten::norm")
N_TENSORS = 4  # gradients of make_model()


def _gradient_reads(events) -> int:
    """Norm kernels that read a tensor themselves (a CPU ``_foreach_norm`` runs one ``vector_norm`` per tensor
    inside it: those are counted, not the wrapper)."""
    norms = [e for e in events if e.name in NORM_OPS]
    return sum(1 for e in norms if not any(child.name in NORM_OPS for child in e.cpu_children))


def _one_clipped_step(how: str) -> tuple[int, nn.Module, torch.optim.Optimizer]:
    """One Fabric step of adamw_8bit clipped by norm ``how``: ``"fabric"`` (``fabric.clip_gradients`` alone),
    ``"fabric+use_grad_norm"`` (its norm handed to ``opt.use_grad_norm``) or ``"ours"`` (``opt.clip_grad_norm_``);
    returns the gradient reads of clipping + step, the model and the optimizer."""
    fabric, model, opt, _ = fabric_setup("adamw_8bit", "32-true")
    x, y = micro_batch(0)
    fabric.backward(loss_of(model(x), y) * 100)  # far above max_norm: the clipping scales every gradient
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if how == "ours":
            opt.clip_grad_norm_(1.0)
        else:
            norm = fabric.clip_gradients(model, opt, max_norm=1.0)
            if how == "fabric+use_grad_norm":
                opt.use_grad_norm(norm)
        opt.step()
    return _gradient_reads(prof.events()), model, opt


def test_fabric_clip_gradients_norm_reaches_our_step_through_fabrics_wrapper():
    """``fabric.clip_gradients`` calls ``torch.nn.utils.clip_grad_norm_`` (N + 1 gradient reads) and drops nothing
    on the optimizer, so our step reads every gradient once more (N). Handing its norm to ``opt.use_grad_norm``
    on Fabric's optimizer saves those N reads, and so does ``opt.clip_grad_norm_``: the params are the same bit for
    bit. (Before the fix the wrapper kept the norm in its own attribute, which the wrapped step never read.)"""
    reads = {}
    params = {}
    for how in ("fabric", "fabric+use_grad_norm", "ours"):
        reads[how], model, _ = _one_clipped_step(how)
        params[how] = model.state_dict()
    assert reads == {"fabric": 2 * N_TENSORS + 1, "fabric+use_grad_norm": N_TENSORS + 1, "ours": N_TENSORS + 1}
    assert_bit_equal(params["fabric"], params["fabric+use_grad_norm"], "reused norm")
    assert_bit_equal(params["fabric"], params["ours"], "our clip_grad_norm_")


@pytest.mark.parametrize("wrapper", ["fabric", "lightning"])
def test_norm_handed_to_a_wrapper_reaches_the_wrapped_optimizer(wrapper):
    """Fabric's ``_FabricOptimizer`` and Lightning's ``LightningOptimizer`` subclass our class on the fly and forward
    attribute reads: ``use_grad_norm`` / ``clip_grad_norm_`` called on them must leave the norm with the wrapped
    optimizer (its step reuses it), and ``zero_grad`` on the wrapper must drop it there."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = make_model()
    inner = make_optimizer("adamw_8bit", model)
    if wrapper == "fabric":
        from lightning.fabric import Fabric

        outer = Fabric(accelerator="cpu", devices=1).setup_optimizers(inner)
    else:
        outer = LightningOptimizer(inner)
    assert isinstance(outer, type(inner)) and outer is not inner
    loss_of(model(micro_batch(0)[0]), micro_batch(0)[1]).backward()
    outer.use_grad_norm(torch.tensor(3.0))
    assert "norm" in inner._pending_norm and "_pending_norm" not in vars(outer)
    outer.zero_grad()
    assert not inner._pending_norm
    loss_of(model(micro_batch(1)[0]), micro_batch(1)[1]).backward()
    outer.clip_grad_norm_(1.0)
    assert "norm" in inner._pending_norm
    inner.step()
    assert not inner._pending_norm  # consumed by the step


def test_an_optimizer_pickled_before_the_pending_norm_dict_unpickles_and_reuses_norms():
    """An optimizer pickled by the release that kept the norm in ``_grad_norm`` (an attribute, no ``_pending_norm``)
    unpickles without it, and the next ``use_grad_norm`` reaches its step (one gradient read fewer)."""
    model = make_model()
    opt = make_optimizer("adamw_8bit", model)
    old = opt.__getstate__()
    old.pop("_pending_norm")
    old["_grad_norm"] = None
    restored = type(opt).__new__(type(opt))
    restored.__setstate__(old)
    assert "_grad_norm" not in vars(restored) and restored._pending_norm == {}
    loss_of(model(micro_batch(0)[0]), micro_batch(0)[1]).backward()
    restored.clip_grad_norm_(1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        restored.step()
    assert _gradient_reads(prof.events()) == 0

def test_fabric_clip_gradients_with_an_inf_gradient():
    """An inf gradient: ``fabric.clip_gradients`` raises by default (Fabric's ``error_if_nonfinite=True``: theirs);
    with ``error_if_nonfinite=False`` and the norm handed to our step, the whole step is skipped (params and state
    unchanged, every tensor counted); without the handover torch's clipping turns the gradients into NaN and 0 and
    our per-tensor check skips only the NaN ones (the others step with zeroed gradients)."""
    fabric, model, opt, _ = fabric_setup("adamw_8bit", "32-true")
    fabric_steps(fabric, model, opt, make_scheduler(opt), 0, 1)
    before, state_before = {k: v.clone() for k, v in model.state_dict().items()}, state_tensors(opt)
    for reuse in (True, False):
        x, y = micro_batch(99)
        fabric.backward(loss_of(model(x), y))
        model.module[2].bias.grad[0] = float("inf")
        with pytest.raises(RuntimeError, match="non-finite"):
            fabric.clip_gradients(model, opt, max_norm=1.0)
        norm = fabric.clip_gradients(model, opt, max_norm=1.0, error_if_nonfinite=False)
        if reuse:
            opt.use_grad_norm(norm)
        opt.step()
        opt.zero_grad()
        if reuse:
            assert_bit_equal(before, model.state_dict(), "params after a skipped step")
            assert_bit_equal(state_before, state_tensors(opt), "state after a skipped step")
            assert opt.skipped_updates == N_TENSORS
    after = model.state_dict()
    assert opt.skipped_updates == N_TENSORS + 1  # only the NaN bias skipped without the handover
    assert torch.equal(after["2.bias"], before["2.bias"]) and not torch.equal(after["0.weight"], before["0.weight"])


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_4bit"])
def test_fabric_load_converts_a_torch_adamw_checkpoint(name, tmp_path):
    """A checkpoint of the same script run with fp32 torch AdamW, ``fabric.load``ed into ours: the state is
    converted (our keys, 8/4-bit moments, step counters kept) exactly as ``load_state_dict`` converts it, and
    training continues."""
    fabric, model, opt, sched = fabric_setup("adamw", "32-true")
    fabric_steps(fabric, model, opt, sched, 0, SAVE_AT)
    fabric.save(tmp_path / "adamw.ckpt", {"model": model, "optimizer": opt, "step": SAVE_AT})
    torch_state = opt.state_dict()
    fabric, model, ours, sched = fabric_setup(name, "32-true")
    state = {"model": model, "optimizer": ours, "step": 0}
    fabric.load(tmp_path / "adamw.ckpt", state)
    direct = make_optimizer(name, make_model())
    direct.load_state_dict(torch_state)
    assert_bit_equal(state_tensors(ours), state_tensors(direct), "converted state")
    assert state["step"] == SAVE_AT
    assert all(float(s["step"]) == SAVE_AT for s in ours.state.values())
    losses = fabric_steps(fabric, model, ours, sched, SAVE_AT, STEPS - SAVE_AT)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and ours.skipped_updates == 0


# -------------------------------------------------------------------------------- DDP on two CPU processes
DDP_OPTIMIZERS = ("adamw_8bit", "came", "muon_8bit")
MUON_DDP_SHARE = 0.02
"""How far a Muon matrix of the DDP run may end from the one-process run's, as a share of how far it moved: Muon
orthogonalizes each update by Newton-Schulz iterations in bf16 (as torch.optim.Muon), which turn the all-reduce's
last-bit differences into bf16 roundings of the whole update (measured 2026-12-07: 0.37-0.92% for ``muon`` and
``muon_8bit``, 6 steps; test_ddp's 2e-5 held for neither, at the test's landing either)."""
_DDP_SCRIPT = '''
import sys, torch
sys.path.insert(0, {here!r})
from lightning.fabric import Fabric
from test_field_fabric_accelerate import *
import test_field_fabric_accelerate as field
torch.set_num_threads(1)
fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2, precision="32-true")
fabric.launch()
rank = fabric.global_rank
whole = field.micro_batch
field.micro_batch = lambda index: tuple(t[rank * 8:(rank + 1) * 8] for t in whole(index))  # this rank's half
out = {{}}
for name in {names!r}:
    model = make_model()
    opt = make_optimizer(name, model)
    sched = make_scheduler(opt)
    model, opt = fabric.setup(model, opt)
    fabric_steps(fabric, model, opt, sched, 0, {save_at}, reuse_norm=True)
    fabric.save(f"{tmp}/ddp-{{name}}.ckpt", {{"model": model, "optimizer": opt, "sched": sched}})
    fabric_steps(fabric, model, opt, sched, {save_at}, {steps} - {save_at}, reuse_norm=True)
    out[name] = {{"params": model.state_dict(), "state": state_tensors(opt)}}
    model = make_model()  # resumed: fresh objects, fabric.load, the rest of the steps
    opt = make_optimizer(name, model)
    sched = make_scheduler(opt)
    model, opt = fabric.setup(model, opt)
    fabric.load(f"{tmp}/ddp-{{name}}.ckpt", {{"model": model, "optimizer": opt, "sched": sched}})
    fabric_steps(fabric, model, opt, sched, {save_at}, {steps} - {save_at}, reuse_norm=True)
    out[name + "-resumed"] = {{"params": model.state_dict(), "state": state_tensors(opt)}}
torch.save(out, f"{tmp}/ddp-rank{{rank}}.pt")
'''



@pytest.mark.slow  # 17 s alone, 34 s beside the rest of the file on two busy cores (the brief's limit: 20 s)
def test_fabric_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """``Fabric(strategy="ddp", devices=2)`` + ``fabric.launch()`` on two CPU processes (gloo), each on half of every
    micro-batch, accumulation under ``no_backward_sync``, the clipping norm handed to our step: both ranks hold the
    same params and state bit for bit, and they equal one process trained on the whole batch within test_ddp's
    tolerances (rtol 1e-4, atol 2e-5; the all-reduce sums in another order), Muon's matrices within
    :data:`MUON_DDP_SHARE` of how far they moved. ``fabric.save`` mid-run (rank 0
    writes) and ``fabric.load`` into fresh objects on both ranks continue bit-exactly."""
    script = tmp_path / "ddp_fabric.py"
    script.write_text(_DDP_SCRIPT.format(here=str(HERE), names=DDP_OPTIMIZERS, steps=STEPS, save_at=SAVE_AT,
                                         tmp=str(tmp_path)))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOWMEM_CPU_COMPILE": "0",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1)]
    for name in DDP_OPTIMIZERS:
        assert_bit_equal(ranks[0][name]["params"], ranks[1][name]["params"], f"{name} ranks' params")
        assert_bit_equal(ranks[0][name]["state"], ranks[1][name]["state"], f"{name} ranks' state")
        for rank in ranks:
            assert_bit_equal(rank[name]["params"], rank[name + "-resumed"]["params"], f"{name} resumed params")
            assert_bit_equal(rank[name]["state"], rank[name + "-resumed"]["state"], f"{name} resumed state")
        start = make_model().state_dict()
        fabric, model, opt, sched = fabric_setup(name, "32-true")
        fabric_steps(fabric, model, opt, sched, 0, STEPS, reuse_norm=True)
        for key, value in model.state_dict().items():
            if name.startswith("muon") and value.dim() == 2:
                off, moved = (ranks[0][name]["params"][key] - value).abs().max(), (value - start[key]).abs().max()
                assert off <= MUON_DDP_SHARE * moved, (name, key, float(off), float(moved))
                continue
            torch.testing.assert_close(ranks[0][name]["params"][key], value, rtol=1e-4, atol=2e-5,
                                       msg=lambda text, name=name, key=key: f"{name} {key}: {text}")


# ================================================================================ HF accelerate
ACCELERATE_PRECISIONS = ("no", "bf16")


def _reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons (its own tests do the same between Accelerators)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """Each test builds its Accelerators from a clean state and leaves none behind."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def accelerate_setup(name: str, mixed_precision: str, skip_batches: int = 0):
    """``(accelerator, model, opt, loader, sched)`` after ``accelerator.prepare``; the loader yields
    ``micro_batch(0), micro_batch(1), ...`` (one optimizer step per ``ACCUMULATE`` of them), its first
    ``skip_batches`` skipped (``accelerator.skip_first_batches``)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    _reset_accelerate()
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision, gradient_accumulation_steps=ACCUMULATE)
    model = make_model()
    opt = make_optimizer(name, model)
    sched = make_scheduler(opt)
    xs, ys = zip(*(micro_batch(i) for i in range(STEPS * ACCUMULATE)))
    loader = DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=16)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    if skip_batches:
        loader = accelerator.skip_first_batches(loader, skip_batches)
    return accelerator, model, opt, loader, sched


def accelerate_steps(accelerator, model, opt, loader, sched, start: int = 0, stop: int | None = None,
                     reuse_norm: bool = False) -> list[float]:
    """The accelerate loop: ``accumulate``, ``backward``, on sync steps ``clip_grad_norm_`` (odd steps, its norm
    handed to ``opt.optimizer.use_grad_norm`` when ``reuse_norm``) or ``clip_grad_value_``, then ``step``,
    ``sched.step``, ``zero_grad`` every micro-batch (accelerate acts on sync steps only). Optimizer steps are
    numbered from ``start``; stops after step ``stop``. Returns the losses."""
    losses, step = [], start
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = loss_of(model(x), y)
            accelerator.backward(loss)
            losses.append(loss.item())
            if accelerator.sync_gradients:
                if clip_kind(step) == "norm":
                    norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    if reuse_norm:
                        opt.optimizer.use_grad_norm(norm)
                else:
                    accelerator.clip_grad_value_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            if step == stop:
                break
    return losses


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("mixed_precision", ACCELERATE_PRECISIONS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accelerate_loop_equals_the_hand_written_loop(name, mixed_precision):
    """accelerate's loop (prepare of model, optimizer, loader and scheduler; accumulate over 2 micro-batches;
    clip_grad_norm_ / clip_grad_value_; the scheduler) trains our optimizer exactly as the hand-written loop does
    (bf16 autocast for ``"bf16"``): params and state bit-equal, the loss falls, ``unwrap_model`` gives the model
    back, nothing skipped."""
    accelerator, model, opt, loader, sched = accelerate_setup(name, mixed_precision)
    losses = accelerate_steps(accelerator, model, opt, loader, sched)
    plain_model, plain_opt = plain_steps(name, "bf16-mixed" if mixed_precision == "bf16" else "32-true", STEPS)
    unwrapped = accelerator.unwrap_model(model)
    assert isinstance(unwrapped, nn.Sequential)
    assert_bit_equal(unwrapped.state_dict(), plain_model.state_dict(), f"{name} {mixed_precision} params")
    assert_bit_equal(state_tensors(opt), state_tensors(plain_opt), f"{name} {mixed_precision} optimizer state")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert opt.param_groups[0]["lr"] == OPTIMIZERS[name]["lr"] * 0.5 ** (STEPS // 2)
    assert not accelerator.optimizer_step_was_skipped


_ACCELERATE_RESUME = '''
import sys, torch
sys.path.insert(0, {here!r})
from test_field_fabric_accelerate import *
torch.set_num_threads(1)
for name in {names!r}:
    for mp in {precisions!r}:
        accelerator, model, opt, loader, sched = accelerate_setup(name, mp, skip_batches={skip})
        accelerator.load_state(f"{tmp}/{{name}}-{{mp}}")
        accelerate_steps(accelerator, model, opt, loader, sched, start={save_at})
        torch.save({{"params": accelerator.unwrap_model(model).state_dict(), "state": state_tensors(opt)}},
                   f"{tmp}/{{name}}-{{mp}}-end.pt")
'''


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerate_save_state_then_load_state_in_a_new_process_continues_bit_exactly(tmp_path):
    """``accelerator.save_state(dir)`` after 3 optimizer steps; a new Python process prepares everything again,
    ``load_state(dir)`` (accelerate's ``torch.load(weights_only=True)`` of our state dict), skips the consumed
    batches and trains to the end: params and optimizer state equal the uninterrupted run's bit for bit."""
    names = [n for n in OPTIMIZERS if n != "adamw"]
    finals = {}
    for name in names:
        for mp in ACCELERATE_PRECISIONS:
            accelerator, model, opt, loader, sched = accelerate_setup(name, mp)
            batches = iter(loader)
            accelerate_steps(accelerator, model, opt, batches, sched, stop=SAVE_AT)
            accelerator.save_state(f"{tmp_path}/{name}-{mp}")
            accelerate_steps(accelerator, model, opt, batches, sched, start=SAVE_AT)
            finals[f"{name}-{mp}"] = (accelerator.unwrap_model(model).state_dict(), state_tensors(opt))
    script = _ACCELERATE_RESUME.format(here=str(HERE), names=names, precisions=ACCELERATE_PRECISIONS,
                                       tmp=str(tmp_path), save_at=SAVE_AT, skip=SAVE_AT * ACCUMULATE)
    _run_python(script)
    for key, (params, state) in finals.items():
        resumed = torch.load(f"{tmp_path}/{key}-end.pt")
        assert_bit_equal(params, resumed["params"], f"{key} params")
        assert_bit_equal(state, resumed["state"], f"{key} optimizer state")


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize("reuse_norm", [False, True])
def test_accelerate_step_was_skipped_knows_only_its_grad_scaler(reuse_norm):
    """An inf in one gradient: our guard skips that tensor's update (or, with the clipping norm handed over, the
    whole step) and counts it in ``skipped_updates``; accelerate's ``optimizer_step_was_skipped`` stays False (it
    reports only a GradScaler skip, and bf16/fp32 runs have no scaler): read ``opt.optimizer.skipped_updates``."""
    accelerator, model, opt, loader, sched = accelerate_setup("adamw_8bit", "no")
    bias = accelerator.unwrap_model(model)[2].bias
    for index, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model(x), y))
            if accelerator.sync_gradients:
                if index == 3:
                    bias.grad[0] = float("inf")
                    before = bias.detach().clone()
                norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                if reuse_norm:
                    opt.optimizer.use_grad_norm(norm)
            opt.step()
            opt.zero_grad()
            if index == 3:
                assert not accelerator.optimizer_step_was_skipped
                assert torch.equal(bias.detach(), before)
    assert opt.optimizer.skipped_updates == (N_TENSORS if reuse_norm else 1)
    steps = {tuple(p.shape): float(opt.optimizer.state[p]["step"]) for p in model.parameters()}
    assert steps[(8,)] == STEPS - 1  # the inf bias: its update (and step counter) skipped either way
    assert set(steps.values()) == ({STEPS - 1} if reuse_norm else {STEPS - 1, STEPS})


def test_fabric_refuses_another_optimizers_checkpoint_by_name(tmp_path):
    """A torch AdamW checkpoint ``fabric.load``ed into CAME (no conversion between them): our ``ValueError`` comes
    through Fabric naming both classes, and the optimizer is left as it was."""
    fabric, model, opt, sched = fabric_setup("adamw", "32-true")
    fabric_steps(fabric, model, opt, sched, 0, 1)
    fabric.save(tmp_path / "adamw.ckpt", {"model": model, "optimizer": opt})
    fabric, model, came, _ = fabric_setup("came", "32-true")
    with pytest.raises(ValueError, match="AdamW.*CAME|CAME.*AdamW"):
        fabric.load(tmp_path / "adamw.ckpt", {"model": model, "optimizer": came})
    assert not came.state


def test_fabric_muon_from_the_set_up_modules_named_parameters():
    """Muon built after ``fabric.setup_module`` from the wrapper's ``named_parameters()`` (names carry Fabric's
    ``_forward_module.`` prefix): the embedding and the ``lm_head`` still take the AdamW part, the hidden matrix
    Muon's, and the loop trains."""
    from lightning.fabric import Fabric

    torch.manual_seed(0)
    net = nn.ModuleDict({"embed": nn.Embedding(32, 64), "hidden": nn.Linear(64, 64), "lm_head": nn.Linear(64, 32)})
    fabric = Fabric(accelerator="cpu", devices=1)
    module = fabric.setup_module(net)
    opt = fabric.setup_optimizers(build_optimizer("muon_8bit", module.named_parameters(), lr=2e-2))
    muon = {n: "momentum_codes" in {s.name for s in opt.state_layout(p)} for n, p in module.named_parameters()
            if p.ndim == 2}
    assert muon == {"_forward_module.embed.weight": False, "_forward_module.hidden.weight": True,
                    "_forward_module.lm_head.weight": False}
    ids = torch.randint(0, 32, (8, 6), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        logits = net["lm_head"](torch.tanh(net["hidden"](net["embed"](ids))))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        fabric.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and opt.skipped_updates == 0
