"""Field walk: a hand-written PyTorch training loop (no Lightning) that swaps ``torch.optim.AdamW`` for ours, every
registered name, written as torch's tutorials and recipes write it.

What ``tests/test_optim_contract.py`` (the torch.optim contract) and ``tests/test_peer_suites.py`` (a first plain
loop for three optimizers) already cover is not repeated. Here: the AMP recipe with ``GradScaler("cpu")`` and
gradient accumulation (a step whose gradients overflow is skipped with params and every state tensor untouched and
the scale halved, as with torch's AdamW), torch's "compiling the optimizer" recipe and a ``torch.compile``d model
under Muon's name-based split, ``OneCycleLR(cycle_momentum=True)`` (the beta1/momentum it writes is the one the next
step reads), layer-wise lr decay over 22 groups, ``add_param_group`` for a layer unfrozen later, the tutorial
checkpoint (model, optimizer, scheduler, scaler, EMA model) resumed in a new process, an fp32 checkpoint loaded into
a bf16 model, and reading the state for logging (``decoded_state``).
"""

from __future__ import annotations

import copy
import io
import runpy
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from launched_scripts import run_script
from optim_helpers import snapshot_differences
from torch import nn
from torch.optim import lr_scheduler

from lowmem_lightning.optim import available_optimizers, build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, bit-equal across processes

NAMES = available_optimizers()  # ``adamw`` is torch.optim.AdamW itself: the control
OURS = [name for name in NAMES if name != "adamw"]
KWARGS = {  # lr-driven settings, as a user of each would write them
    "adamw": dict(lr=3e-3),
    "adamw_8bit": dict(lr=3e-3),
    "adamw_4bit": dict(lr=3e-3),
    "paged_adamw_8bit": dict(lr=3e-3, gpu_budget_bytes=0),
    "sgd": dict(lr=3e-2, momentum=0.9),
    "adafactor": dict(lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9),
    "came": dict(lr=1e-3),
    "lion": dict(lr=3e-4),
    "lion_8bit": dict(lr=3e-4),
    "ademamix": dict(lr=3e-3),
    "ademamix_8bit": dict(lr=3e-3),
    "muon": dict(lr=2e-2),
    "muon_8bit": dict(lr=2e-2),
}
VOCAB, WIDTH = 64, 80  # every matrix has >= 4096 elements: quantized state where the optimizer quantizes


class TinyLM(nn.Module):
    """The user's model: token embedding, one hidden matrix, a norm, the output head (Muon's split by name)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.block = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(torch.relu(self.block(self.embed(ids)))))


def tokens(seed: int) -> torch.Tensor:
    """A batch of 4 sequences of 9 token ids drawn from ``seed``."""
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(seed))


def next_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Cross entropy of predicting each next token."""
    return nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def fresh_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def build(name: str, model: nn.Module, **overrides) -> torch.optim.Optimizer:
    """``build_optimizer`` as the user calls it: Muon gets ``named_parameters()`` (its split is by name)."""
    params = model.named_parameters() if name.startswith("muon") else model.parameters()
    return build_optimizer(name, params, **{**KWARGS[name], **overrides})


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Copies of every param and of every state tensor (in param order), for :func:`snapshot_differences`."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]}


def step_counts(opt) -> list[float]:
    return [float(opt.state[p]["step"]) for group in opt.param_groups for p in group["params"] if opt.state[p]]


# ================================================================================ AMP: autocast + GradScaler
def amp_run(name: str, steps: int, *, scaler: torch.amp.GradScaler | None, dtype: torch.dtype,
            overflow_at: int | None = None, leave_out: int | None = None, accumulate: int = 2):
    """torch's AMP recipe with gradient accumulation: per step ``accumulate`` micro-batches under
    ``torch.autocast("cpu", dtype)``, ``scaler.scale(loss / accumulate).backward()``, then ``scaler.unscale_``,
    ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``, ``zero_grad`` (without a scaler: plain
    ``backward``/``step``). ``overflow_at``: that step's last gradient gets an inf (as an fp16 overflow leaves);
    ``leave_out``: that step is not run at all. Returns (model, optimizer, per step: (snapshot before the step,
    snapshot after, scale before, scale after))."""
    model = fresh_model()
    opt = build(name, model)
    record = []
    for step in range(steps):
        if step == leave_out:
            continue
        for micro in range(accumulate):
            with torch.autocast("cpu", dtype=dtype):
                loss = next_token_loss(model, tokens(100 * step + micro)) / accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        if step == overflow_at:
            model.block.weight.grad[3, 5] = float("inf")
        before, scale = snapshot(model, opt), scaler.get_scale() if scaler else None
        if scaler:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
        record.append((before, snapshot(model, opt), scale, scaler.get_scale() if scaler else None))
    return model, opt, record


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_an_overflowing_step_as_with_torch_adamw(name):
    """fp16 autocast, ``GradScaler("cpu")``, 2 micro-batches per step, an inf in step 2's gradients: that step leaves
    every param and every state tensor (codes, scales, step counters) bit for bit as they were and halves the scale,
    exactly what it does around torch's AdamW (the control, ``adamw``); the other steps update and keep the scale."""
    model, opt, record = amp_run(name, 4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12),
                                 dtype=torch.float16, overflow_at=2)
    before, after, scale, new_scale = record[2]
    assert snapshot_differences(before, after) == []
    assert new_scale == scale / 2
    for step in (1, 3):
        assert snapshot_differences(record[step][0], record[step][1]) != []  # these steps updated
        assert record[step][3] == record[step][2]
    assert set(step_counts(opt)) == {3.0}  # 4 steps, one skipped
    if name != "adamw":
        assert opt.skipped_updates == 0  # the scaler skipped the step; ours never saw the inf


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_with_accumulation_trains_as_the_unscaled_loop_without_the_skipped_step(name):
    """The same AMP loop under bf16 autocast (where scaling by a power of 2 is exact): with ``GradScaler``, 2
    micro-batches per step and an inf in step 1, params and every state tensor after 4 steps equal bit for bit the
    loop without a scaler that never ran step 1 (the scaler's unscale, clip and step hand our optimizer exactly the
    gradients of plain accumulation)."""
    scaled_model, scaled_opt, _ = amp_run(name, 4, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10),
                                          dtype=torch.bfloat16, overflow_at=1)
    plain_model, plain_opt, _ = amp_run(name, 4, scaler=None, dtype=torch.bfloat16, leave_out=1)
    assert snapshot_differences(snapshot(scaled_model, scaled_opt), snapshot(plain_model, plain_opt)) == []


# ================================================================================ torch.compile
@pytest.mark.parametrize("name", OURS)
def test_the_compiled_optimizer_recipe_steps_as_eager(name):
    """torch's "compiling the optimizer" recipe: ``@torch.compile(fullgraph=False) def step(): opt.step()``. Our step
    is fused kernels already and runs as called (a graph break, no crash in dynamo): 3 steps give the params and state
    of plain ``opt.step()`` bit for bit. (torch's own AdamW compiles its step and rounds differently: no control.)"""
    torch._dynamo.reset()  # the recipe's function is compiled for this optimizer, not a cache of another test's
    models = [fresh_model(), fresh_model()]
    compiled_opt, eager_opt = build(name, models[0]), build(name, models[1])

    @torch.compile(fullgraph=False)
    def compiled_step():
        compiled_opt.step()

    for step in range(3):
        for model in models:
            next_token_loss(model, tokens(step)).backward()
        compiled_step()
        eager_opt.step()
        compiled_opt.zero_grad()
        eager_opt.zero_grad()
    assert snapshot_differences(snapshot(models[0], compiled_opt), snapshot(models[1], eager_opt)) == []


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_muon_on_a_compiled_model_splits_by_name_as_on_the_uncompiled_one(name):
    """``torch.compile(model).named_parameters()`` names every param ``_orig_mod.<name>``: Muon still gives the
    embedding, the head and the norm AdamW state and the hidden matrix Muon's momentum; fed the compiled model's
    gradients, it steps bit for bit as the same optimizer on the uncompiled model's names (the compiled forward and
    backward round differently from eager, which AdamW's first steps amplify up to lr: the gradients are shared),
    and its state dict loads into an optimizer built on the uncompiled model's names (and back)."""
    torch._dynamo.reset()
    plain, inner = fresh_model(), fresh_model()
    compiled = torch.compile(inner)
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    opts = [build(name, compiled), build(name, plain)]
    for step in range(3):
        next_token_loss(compiled, tokens(step)).backward()
        for ours, theirs in zip(inner.parameters(), plain.parameters()):
            theirs.grad = ours.grad.clone()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    momentum = "momentum_buffer" if name == "muon" else "momentum_codes"
    for param_name, param in inner.named_parameters():
        assert (momentum in opts[0].state[param]) == (param_name == "block.weight"), param_name
    assert snapshot_differences(snapshot(inner, opts[0]), snapshot(plain, opts[1])) == []
    build(name, plain).load_state_dict(opts[0].state_dict())
    build(name, compiled).load_state_dict(opts[1].state_dict())


# ================================================================================ schedules and param groups
def beta1(group: dict) -> float:
    """The value ``OneCycleLR(cycle_momentum=True)`` writes: ``betas[0]``, else ``momentum``."""
    return group["betas"][0] if "betas" in group else group["momentum"]


def with_beta1(name: str, value: float) -> dict:
    """Constructor arguments of ``name`` with its beta1 (or momentum) set to ``value``."""
    if name.startswith(("muon", "sgd")):
        return {"momentum": value}
    betas = list(build_optimizer(name, [nn.Parameter(torch.zeros(1))], **KWARGS[name]).defaults["betas"])
    return {"betas": (value, *betas[1:])}


CYCLED = [name for name in NAMES if name != "adafactor"]


@pytest.mark.parametrize("name", CYCLED)
def test_one_cycle_lr_cycles_beta1_and_each_step_reads_the_new_value(name):
    """``OneCycleLR(cycle_momentum=True)`` writes ``betas[0]`` (SGD's and Muon's ``momentum``; Muon's AdamW part keeps
    ``adamw_betas``) before every step. Each step reads the value just written: it equals the step of a fresh
    optimizer built with that beta1 in its constructor and loaded from the running one's state dict (nothing cached
    from construction), and the run differs from ``cycle_momentum=False``'s."""
    model = fresh_model()
    opt = build(name, model)
    schedule = lr_scheduler.OneCycleLR(opt, max_lr=KWARGS[name]["lr"], total_steps=8, cycle_momentum=True)
    seen = []
    for step in range(5):
        twin_model = copy.deepcopy(model)
        twin = build(name, twin_model, **with_beta1(name, beta1(opt.param_groups[0])))
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's AdamW would share the tensors
        for m, o in ((model, opt), (twin_model, twin)):
            next_token_loss(m, tokens(step)).backward()
            o.step()
            o.zero_grad()
        assert snapshot_differences(snapshot(model, opt), snapshot(twin_model, twin)) == [], step
        seen.append(beta1(opt.param_groups[0]))
        schedule.step()
    assert len(set(seen)) >= 4
    flat_model = fresh_model()
    flat = build(name, flat_model)
    flat_schedule = lr_scheduler.OneCycleLR(flat, max_lr=KWARGS[name]["lr"], total_steps=8, cycle_momentum=False)
    for step in range(5):
        next_token_loss(flat_model, tokens(step)).backward()
        flat.step()
        flat.zero_grad()
        flat_schedule.step()
    assert not torch.equal(flat_model.block.weight, model.block.weight)


def test_one_cycle_lr_refuses_to_cycle_adafactors_beta1_as_it_refuses_transformers_adafactor():
    """Adafactor keeps its momentum coefficient as ``beta1`` (transformers' name), which ``OneCycleLR`` does not look
    for: torch refuses ``cycle_momentum=True`` at construction, before any step; ``cycle_momentum=False`` works."""
    opt = build("adafactor", fresh_model())
    with pytest.raises(ValueError, match="cycle_momentum"):
        lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=8)
    lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=8, cycle_momentum=False)


class DeepNet(nn.Module):
    """An input layer, 20 hidden layers and a head: 22 layers for layer-wise lr decay."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 72)
        self.layers = nn.ModuleList(nn.Linear(72, 72) for _ in range(20))
        self.lm_head = nn.Linear(72, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.lm_head(x)

    def named_layers(self) -> list[tuple[str, nn.Module]]:
        hidden = [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]
        return [("embed", self.embed), *hidden, ("lm_head", self.lm_head)]


def decayed_groups(model: DeepNet, lrs: list[float]) -> list[dict]:
    """One param group per layer with its lr, its params named (``named_parameters(prefix=...)``: Muon's split)."""
    return [{"params": list(layer.named_parameters(prefix=prefix)), "lr": lr}
            for (prefix, layer), lr in zip(model.named_layers(), lrs)]


@pytest.mark.parametrize("name", NAMES)
def test_layer_wise_lr_decay_over_22_groups_steps_each_layer_at_its_own_lr(name):
    """Layer-wise lr decay (lr * 0.8**depth, one named group per layer, 22 groups), fed the same gradients each step:
    after 3 steps each layer equals that layer of a run whose 22 groups all have this layer's lr (same groups, same
    tensor order: the stochastic rounding of 4-bit moments seeds by it), so no group's lr or state leaks into
    another's; the deepest and the top layer moved by different amounts."""
    torch.manual_seed(0)
    reference = DeepNet()
    depth = len(reference.named_layers())
    lrs = [KWARGS[name]["lr"] * 0.8 ** (depth - 1 - k) for k in range(depth)]
    rest = {k: v for k, v in KWARGS[name].items() if k != "lr"}

    def run(group_lrs):
        model = copy.deepcopy(reference)
        opt = build_optimizer(name, decayed_groups(model, group_lrs), **rest)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return model, opt

    model, opt = run(lrs)
    assert len(opt.param_groups) == 22
    for k in range(0, depth, 3):  # every third layer: the first, hidden ones, the head
        alone, _ = run([lrs[k]] * depth)
        layer, same = model.named_layers()[k][1], alone.named_layers()[k][1]
        for p, q in zip(layer.parameters(), same.parameters()):
            assert torch.equal(p, q), (k, lrs[k])
    moved = [float((layer.weight - start.weight).detach().norm()) for layer, start in
             ((model.layers[i], reference.layers[i]) for i in (0, 19))]
    assert moved[0] < moved[1]


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_for_an_unfrozen_layer_equals_having_it_from_the_start(name):
    """A bf16 model whose head is frozen for 3 steps, then unfrozen and added with ``add_param_group`` (named, for
    Muon's split): its state is created lazily at its first step and after 3 more steps params and the head's state
    equal bit for bit a run whose optimizer held the (frozen, gradient-less) head from the start."""
    models = [fresh_model().to(torch.bfloat16) for _ in range(2)]
    for model in models:
        model.lm_head.requires_grad_(False)
    from_start = build(name, models[0])
    body = [(n, p) for n, p in models[1].named_parameters() if not n.startswith("lm_head")]
    later = build_optimizer(name, body if name.startswith("muon") else [p for _, p in body], **KWARGS[name])
    for step in range(6):
        if step == 3:
            for model in models:
                model.lm_head.requires_grad_(True)
            head = list(models[1].lm_head.named_parameters(prefix="lm_head"))  # names: Muon's split
            later.add_param_group({"params": head if name.startswith("muon") else [p for _, p in head]})
            assert not later.state[models[1].lm_head.weight]
        for model, opt in zip(models, (from_start, later)):
            next_token_loss(model, tokens(step)).float().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(*(model.parameters() for model in models)):
        assert torch.equal(p, q)
    head_states = [opt.state[model.lm_head.weight] for model, opt in zip(models, (from_start, later))]
    assert sorted(head_states[0]) == sorted(head_states[1])
    assert all(torch.equal(head_states[0][k], head_states[1][k]) for k in head_states[0])
    assert float(head_states[1]["step"]) == 3


# ================================================================================ checkpoints
TRAIN_PY = '''
"""A user's train.py: fp16 autocast + GradScaler, warmup + cosine (SequentialLR), clip_grad_norm_, an EMA of the
weights (AveragedModel + get_ema_multi_avg_fn); checkpoint as torch's tutorials save it, per optimizer name.

python train.py first DIR: steps 0-5 (an overflow in step 1), checkpoint after step 2, final.pt after step 5.
python train.py resume DIR: load every checkpoint (map_location="cpu"), steps 3-5, resumed.pt."""
import sys

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, {tests!r})
from test_field_plain_loop import KWARGS, build, fresh_model, next_token_loss, tokens

torch.set_num_threads(1)
phase, out = sys.argv[1], sys.argv[2]


def setup(name):
    model = fresh_model()
    opt = build(name, model)
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    scheduler = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[2])
    return model, opt, scheduler, torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(0.9))


def train(model, opt, scheduler, scaler, ema, steps):
    for step in steps:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = next_token_loss(model, tokens(step))
        scaler.scale(loss).backward()
        if step == 1:
            model.block.weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scheduler.step()
        ema.update_parameters(model)


def everything(model, opt, scheduler, scaler, ema):
    return {{"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "ema": ema.state_dict()}}


for name in KWARGS:
    parts = setup(name)
    if phase == "first":
        train(*parts, range(3))
        torch.save(everything(*parts), f"{{out}}/{{name}}-checkpoint.pt")
        train(*parts, range(3, 6))
        torch.save(everything(*parts), f"{{out}}/{{name}}-final.pt")
    else:
        model, opt, scheduler, scaler, ema = parts
        checkpoint = torch.load(f"{{out}}/{{name}}-checkpoint.pt", map_location="cpu")
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        ema.load_state_dict(checkpoint["ema"])
        train(*parts, range(3, 6))
        torch.save(everything(*parts), f"{{out}}/{{name}}-resumed.pt")
'''


def tensors_of(tree, prefix: str = "") -> dict[str, object]:
    """Every leaf of a nested checkpoint dict, by its path."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in tensors_of(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in tensors_of(value, f"{prefix}/{i}").items()}
    return {prefix: tree}


def test_the_tutorial_checkpoint_resumes_in_a_new_process_bit_for_bit(tmp_path):
    """Per optimizer name, the tutorial's ``torch.save({"model", "optimizer", "scheduler", "scaler", "ema"})`` after 3
    of 6 steps (fp16 GradScaler with one overflow before the checkpoint, warmup + cosine ``SequentialLR``,
    ``clip_grad_norm_``, an EMA ``AveragedModel``), loaded with ``map_location="cpu"`` in a new process that builds
    everything again and runs steps 3-5: every saved tensor and value (params, optimizer state and groups, scheduler,
    scale, EMA weights) equals the uninterrupted run's bit for bit. The uninterrupted run (``train.py first``) only
    writes the checkpoint and the final state, so it runs the script in this process (``runpy``, its argv, cwd and
    ``sys.path`` put back after; one intra-op thread as in the process); the resume is a new process."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(TRAIN_PY.format(tests=str(Path(__file__).parent))))
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as the process's PYTHONWARNINGS=ignore (run_script's quiet)
        patch.chdir(tmp_path)
        patch.setattr(sys, "argv", [str(script), "first", str(tmp_path)])
        patch.setattr(sys, "path", list(sys.path))
        runpy.run_path(str(script), run_name="__main__")
    run_script(script, "resume", str(tmp_path), cwd=tmp_path, quiet=True, timeout=300)
    for name in KWARGS:
        final = tensors_of(torch.load(tmp_path / f"{name}-final.pt"))
        resumed = tensors_of(torch.load(tmp_path / f"{name}-resumed.pt"))
        assert final.keys() == resumed.keys(), name
        for key, value in final.items():
            other = resumed[key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, (name, key)
        assert final["/scaler/scale"] == 2.0 ** 11  # the overflow halved it, and it was saved and restored


@pytest.mark.parametrize("name", OURS)
def test_an_fp32_checkpoint_loads_into_the_model_moved_to_bf16(name):
    """``torch.load(path, map_location="cpu")`` of an fp32 run's checkpoint, the model moved to bf16 before the
    optimizer is built: the loaded state equals the saved one bit for bit and keeps its dtypes (codes, fp32 scales,
    fp32 moments of small tensors: torch's AdamW would cast them to bf16), and training goes on with finite params."""
    model = fresh_model()
    opt = build(name, model)
    for step in range(3):
        next_token_loss(model, tokens(step)).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu")
    bf16 = fresh_model(seed=1).to(torch.bfloat16)
    bf16.load_state_dict(checkpoint["model"])
    opt16 = build(name, bf16)
    opt16.load_state_dict(checkpoint["optimizer"])
    for p, q in zip(model.parameters(), bf16.parameters()):
        for key, value in opt.state[p].items():
            assert opt16.state[q][key].dtype == value.dtype and torch.equal(opt16.state[q][key], value), key
    before = bf16.block.weight.detach().clone()
    next_token_loss(bf16, tokens(3)).float().backward()
    opt16.step()
    assert all(torch.isfinite(p).all() for p in bf16.parameters())
    assert not torch.equal(bf16.block.weight, before)


# ================================================================================ reading the state for logging
FP32_FORM = {  # (name, kwargs) -> the fp32 optimizer (name, kwargs) whose state keys and values decoded_state gives
    ("adamw_8bit", ()): ("adamw", ()),
    ("adamw_4bit", ()): ("adamw", ()),
    ("paged_adamw_8bit", ()): ("adamw", ()),
    ("lion_8bit", ()): ("lion", ()),
    ("ademamix_8bit", ()): ("ademamix", ()),
    ("muon_8bit", ()): ("muon", ()),
    ("sgd", (("momentum_dtype", "int8"),)): ("sgd", ()),
    ("came", (("momentum_dtype", "int8"),)): ("came", ()),
    ("adafactor", (("momentum_dtype", "int8"),)): ("adafactor", ()),
    **{(name, ()): (name, ()) for name in ("sgd", "came", "adafactor", "lion", "ademamix", "muon")},
}
FACTORED = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")
"""Adafactor's and CAME's row/column statistics: vectors, stored and returned as they are."""


def _trained(name: str, kwargs: tuple, steps: int = 4):
    model = fresh_model()
    opt = build(name, model, **dict(kwargs))
    for step in range(steps):
        next_token_loss(model, tokens(step)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("variant", list(FP32_FORM), ids=lambda v: v[0] + "".join(f"[{k}={x}]" for k, x in v[1]))
def test_decoded_state_gives_the_fp32_optimizers_moments_for_logging(variant):
    """What a user logs (``exp_avg`` norms): ``opt.state[p]`` of a quantized param holds codes and block scales;
    ``opt.decoded_state(p)`` gives the state under the fp32 optimizer's names (torch AdamW's ``exp_avg``/
    ``exp_avg_sq`` for the 8- and 4-bit AdamWs), fp32 and of the param's shape (the row/column statistics as
    vectors), for every param (Muon's AdamW ones too), and its moments track the fp32 optimizer run on the same
    batches: the norm of each within 5% (4-bit: 15%). The returned tensors are copies."""
    name, kwargs = variant
    model, opt = _trained(name, kwargs)
    ref_model, ref = _trained(*FP32_FORM[variant])
    tolerance = 0.15 if name == "adamw_4bit" else 0.05
    for (param_name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        decoded = opt.decoded_state(p)
        expected = ref.state[q] if FP32_FORM[variant][0] == "adamw" else ref.decoded_state(q)  # Muon: 8-bit AdamW
        assert sorted(decoded) == sorted(expected), param_name
        for key, value in decoded.items():
            assert value.dtype == torch.float32, (param_name, key)
            if key == "step":
                assert float(value) == float(expected["step"]) == 4
            elif key not in FACTORED:
                assert value.shape == p.shape, (param_name, key)
                ratio = float(value.norm() / expected[key].norm())
                assert abs(ratio - 1) < tolerance, (param_name, key, ratio)
    stored = {k: v.clone() for k, v in opt.state[model.block.weight].items()}
    for value in opt.decoded_state(model.block.weight).values():
        value.zero_()
    assert all(torch.equal(v, opt.state[model.block.weight][k]) for k, v in stored.items())


def test_decoded_state_is_empty_before_the_first_step_and_refuses_a_tensor_it_does_not_hold():
    """Before a param's first update ``decoded_state`` is ``{}`` (as ``opt.state[p]`` is); a tensor that is not one of
    the optimizer's params is refused naming its shape."""
    model = fresh_model()
    opt = build("adamw_8bit", model)
    assert opt.decoded_state(model.block.weight) == {}
    with pytest.raises(ValueError, match=r"decoded_state: param of shape \(3, 2\) is not in this optimizer"):
        opt.decoded_state(torch.zeros(3, 2))
