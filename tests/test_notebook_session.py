"""A notebook user: one Python process, many fits of one model, cells run again with other settings.

Lightning without this package is the reference: a second ``trainer.fit`` (same Trainer with a larger ``max_steps``,
or a new Trainer) calls ``configure_optimizers`` again, so the optimizer restarts while the weights and the Trainer's
step count go on; after a fit, the last Trainer stays reachable through ``model.trainer`` and keeps its optimizer,
and an older Trainer's optimizer is freed. We match it: the same restart, one optimizer alive however often a cell
runs, no gradient-release hook left on a param after a fit (a second fit steps each tensor once), the module's own
``configure_optimizers`` back, validate/test/predict and the model's train mode as without the callback.

Ctrl+C (SIGINT) during a training step: Lightning stops the fit at once; under gradient release half the tensors then
carry the step's update, and the batch is counted as read, so a checkpoint saved then did not resume exactly. The
callback delays it to the end of the step (:mod:`lowmem_lightning.callbacks.interrupt`): tested in a process of its
own, which sends itself the signal from inside backward.
"""

from __future__ import annotations

import gc
import json
import signal
import textwrap
import weakref

import lightning as L
import pytest
import torch
from launched_scripts import run_script
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning import LowMemModule, LowMemOptimizerCallback
from lowmem_lightning.callbacks.interrupt import InterruptAtStepEnd
from lowmem_lightning.callbacks.report import format_summary

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


class Net(L.LightningModule):
    """A user's own module (AdamW in ``configure_optimizers``); two matrices of 6144 elements (8-bit state)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader():
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen)),
                      batch_size=8)


def _trainer(root, callbacks=(), max_steps=3, limit_val_batches=0, gradient_clip_val=None):
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                     num_sanity_val_steps=0, limit_val_batches=limit_val_batches, callbacks=list(callbacks),
                     gradient_clip_val=gradient_clip_val)


def _model():
    torch.manual_seed(0)
    return Net()


class Module(LowMemModule):
    """A user's ``LowMemModule`` subclass: ``Net``'s layers, its optimizer and LR schedule from the base class."""

    def __init__(self):
        super().__init__(optimizer="adamw_8bit", lr=1e-2, warmup_steps=1, scheduler="cosine")
        self.net = Net().net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)


def _module():
    torch.manual_seed(0)
    return Module()


def _callback(optimizer="adamw_8bit", **kwargs):
    return LowMemOptimizerCallback(optimizer, plot=False, print_summary=False, **kwargs)


def _more_steps(trainer, max_steps):
    """What a notebook user does to train on with the same Trainer."""
    trainer.fit_loop.epoch_loop.max_steps = max_steps


def _steps(optimizer):
    return sorted({float(state["step"]) for state in optimizer.state.values()})


def _hooks(model):
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())


@pytest.mark.parametrize("with_callback", [False, True])
def test_a_second_fit_restarts_the_optimizer_as_lightning_does(tmp_path, with_callback):
    """Same Trainer, max_steps 3 -> 6, then a new Trainer with the same callback: each fit builds a fresh optimizer
    (3 steps of state) while the weights go on; the summary is the last fit's, and does not call the second fit on the
    same Trainer a resume (it said "resumed: 3 of these 6 steps made by this run")."""
    callback = _callback() if with_callback else L.Callback()
    model, trainer = _model(), _trainer(tmp_path, [callback])
    trainer.fit(model, _loader())
    first = trainer.optimizers[0]
    _more_steps(trainer, 6)
    trainer.fit(model, _loader())
    assert trainer.global_step == 6 and trainer.optimizers[0] is not first and _steps(trainer.optimizers[0]) == [3.0]
    if with_callback:  # the summary does not call the second fit a resume: its optimizer state is 3 steps old
        summary = callback.summary
        assert (summary["steps"], summary["steps_this_run"], summary["resumed"]) == (6, 3, False)
        assert "(a second fit of this Trainer: 3 of these 6 steps made by it, from a new optimizer state)" in (
            format_summary(summary, None))
    again = _trainer(tmp_path, [callback])
    again.fit(model, _loader())
    assert again.global_step == 3 and _steps(again.optimizers[0]) == [3.0]
    assert "configure_optimizers" not in vars(model)  # the module's own method back
    if with_callback:
        assert type(again.optimizers[0]).__name__ == "AdamW8bit" and callback.optimizers == again.optimizers
        assert (callback.summary["steps"], callback.summary["steps_this_run"]) == (3, 3)
        assert len(again.callbacks) == len({id(c) for c in again.callbacks}) == 1 + len(callback.parts)


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clip", "clip-norm"])
def test_gradient_release_steps_each_tensor_once_in_every_fit(tmp_path, clip):
    """Release hooks are removed after each fit: fits on the same Trainer and on a new one with the same callback
    give the params a normal step gives, bit for bit (a hook left behind would update a tensor twice); with norm
    clipping (two backward passes) the Trainer's ``gradient_clip_val`` and its plugin's backward come back too."""
    params = {}
    for release in (False, True):
        callback = _callback(step_in_backward=True, bucket_bytes=0) if release else _callback()
        model, trainer = _model(), _trainer(tmp_path, [callback], gradient_clip_val=clip)
        trainer.fit(model, _loader())
        _more_steps(trainer, 5)
        trainer.fit(model, _loader())
        assert _hooks(model) == 0 and trainer.gradient_clip_val == clip
        assert "backward" not in vars(trainer.precision_plugin)
        _trainer(tmp_path, [callback], gradient_clip_val=clip).fit(model, _loader())
        assert _hooks(model) == 0
        params[release] = [p.detach().clone() for p in model.parameters()]
    for normal, released in zip(params[False], params[True]):
        assert torch.equal(normal, released)


@pytest.mark.parametrize("cell", [
    pytest.param({"optimizer": "torch"}, id="lightning-alone"),
    pytest.param({"optimizer": "adamw_8bit"}, id="adamw_8bit"),
    pytest.param({"optimizer": "paged_adamw_8bit"}, id="paged_adamw_8bit"),
    pytest.param({"optimizer": "came", "lr": 1e-3, "step_in_backward": True, "bucket_bytes": 0}, id="came-release"),
    pytest.param({"optimizer": "module"}, id="LowMemModule-cosine"),
])
def test_running_a_cell_five_times_keeps_one_optimizer_alive(tmp_path, cell):
    """Each run of the cell builds a Trainer (and a callback) and fits the same model: after gc, only the last
    optimizer and its state tensors are alive (reachable through ``model.trainer``, as with Lightning alone), and
    none once the model is dropped. Also a ``LowMemModule`` subclass with its own 8-bit optimizer and schedule."""
    cell = dict(cell)
    model, optimizers, states = (_module() if cell["optimizer"] == "module" else _model()), [], []
    for _ in range(5):
        callbacks = [] if cell["optimizer"] in ("torch", "module") else [_callback(**cell)]
        trainer = _trainer(tmp_path, callbacks)
        trainer.fit(model, _loader())
        optimizers.append(weakref.ref(trainer.optimizers[0]))
        states.append([weakref.ref(t) for s in trainer.optimizers[0].state.values() for t in s.values()
                       if isinstance(t, torch.Tensor)])
        del trainer, callbacks
    gc.collect()
    assert [ref() is not None for ref in optimizers] == [False] * 4 + [True]
    alive = [[ref() is not None for ref in refs] for refs in states]
    assert not any(sum(alive[:4], [])) and all(alive[4])
    assert _hooks(model) == 0
    del model
    gc.collect()
    assert optimizers[4]() is None


def _after_fit(tmp_path, callbacks):
    """A fit, then validate, test and predict on the same Trainer: results and the model's mode after each."""
    model, trainer = _model(), _trainer(tmp_path, callbacks, limit_val_batches=None)
    trainer.fit(model, _loader())
    out = {"fit": model.training}
    out["validate"] = (trainer.validate(model, _loader(), verbose=False)[0]["val_loss"], model.training)
    out["test"] = (trainer.test(model, _loader(), verbose=False)[0]["val_loss"], model.training)
    out["predict"] = (torch.cat(trainer.predict(model, _loader())).sum().item(), model.training)
    return out, model


def test_validate_test_and_predict_after_fit_as_with_the_modules_optimizer(tmp_path):
    """The module's own AdamW against the callback's ``adamw`` (fp32 AdamW, the same math): the same losses and
    predictions, the model left in train mode after fit as Lightning leaves it, the fit's summary kept."""
    plain, _ = _after_fit(tmp_path, [])
    callback = _callback("adamw")
    ours, model = _after_fit(tmp_path, [callback])
    assert {k: ours[k][1] for k in ours if k != "fit"} == {k: plain[k][1] for k in plain if k != "fit"}
    assert {k: ours[k][0] for k in ours if k != "fit"} == pytest.approx({k: plain[k][0] for k in plain if k != "fit"})
    assert ours["fit"] is plain["fit"] is True
    assert callback.summary["steps"] == 3 and "configure_optimizers" not in vars(model)


def test_a_callback_cell_run_again_with_another_optimizer(tmp_path):
    """The cell building the callback runs again with ``came`` and the same model is fitted: CAME is built from the
    module's own ``configure_optimizers`` (not through the first callback's wrapper), and each callback keeps the
    summary of its own fit."""
    model = _model()
    first = _callback("adamw_8bit")
    _trainer(tmp_path, [first]).fit(model, _loader())
    second = _callback("came", lr=1e-3)
    trainer = _trainer(tmp_path, [second])
    trainer.fit(model, _loader())
    assert [type(o).__name__ for o in trainer.optimizers] == ["CAME"]
    assert (first.summary["optimizer"], second.summary["optimizer"]) == ("adamw_8bit", "came")
    assert not any(c is first or c in first.parts for c in trainer.callbacks)


def _raise_sigint() -> str:
    """Send this process SIGINT: ``"raised"`` when it became a KeyboardInterrupt here, else ``"held"``."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        return "raised"
    return "held"


def test_a_sigint_is_held_only_inside_a_training_step():
    """Outside a step (validation, between steps) Ctrl+C interrupts at once, as without the callback; inside it the
    signal waits for the step's end, a second one interrupts at once; after the fit Python's handler is back."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    part, trainer = InterruptAtStepEnd(), type("OneProcess", (), {"world_size": 1})()
    try:
        part.on_train_start(trainer, None)
        InterruptAtStepEnd().on_train_start(trainer, None)  # a second one (a user's beside the callback's) stands by
        assert signal.getsignal(signal.SIGINT) == part._on_signal
        assert _raise_sigint() == "raised"
        part.on_train_batch_start(trainer, None, None, 0)
        assert (_raise_sigint(), part.held) == ("held", True)
        assert (_raise_sigint(), part.held) == ("raised", False)  # a second Ctrl+C: at once
        part.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


CELLS = textwrap.dedent('''
    import json, os, signal, sys, warnings
    warnings.filterwarnings("ignore")
    import lightning as L, torch
    from lowmem_lightning import LowMemOptimizerCallback
    from lowmem_lightning.data import TextDataModule

    class Plain(L.LightningModule):  # cell 1: a project's own module, no NF4 anywhere
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(64, 64)
        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              callbacks=[LowMemOptimizerCallback(plot=False, print_summary=False)]).fit(
        Plain(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 64)), batch_size=4))
    imported = sorted(m for m in ("lowmem_lightning.quant", "peft", "bitsandbytes") if m in sys.modules)

    from lowmem_lightning.modules.causal_lm import CausalLMModule

    DATA = sys.argv[1]
    open(DATA, "w").write(" ".join(f"w{i % 97}" for i in range(700))[: 43 * 32 - 2])  # 40 training blocks

    class CtrlC(L.Callback):
        """Ctrl+C pressed `times` times while backward is at the embedding's gradient in step `at` (0-based)."""
        def __init__(self, at, times=1):
            self.at, self.times = at, times
        def on_train_start(self, trainer, module):
            self.trainer = trainer
            self.hook = module.model.get_input_embeddings().weight.register_post_accumulate_grad_hook(self.press)
        def press(self, param):
            if self.trainer.global_step == self.at:
                self.at = None
                for _ in range(self.times):
                    os.kill(os.getpid(), signal.SIGINT)
        def on_exception(self, *args):
            self.hook.remove()
        teardown = on_exception

    def fit(release, max_steps, *extra, ckpt_path=None, with_callback=True):
        L.seed_everything(7)
        model = CausalLMModule(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_key_value_heads": 2}, lr=3e-3, warmup_steps=2)
        callback = LowMemOptimizerCallback("adamw_8bit", lr=3e-3, plot=False, print_summary=False,
                                           **({"step_in_backward": True, "bucket_bytes": 0} if release else {}))
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, default_root_dir=os.path.dirname(DATA),
                            callbacks=[*([callback] if with_callback else []), *extra])
        data = TextDataModule(DATA, seq_len=32, batch_size=4, val_fraction=0.05)
        try:
            trainer.fit(model, data, ckpt_path=ckpt_path)
        except SystemExit:  # Lightning's answer to KeyboardInterrupt
            pass
        return model, trainer

    def diff(a, b):
        return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))

    def tensors(model, trainer):
        state = trainer.optimizers[0].state_dict()["state"]
        return [*model.parameters(), *(t for s in state.values() for t in s.values() if torch.is_tensor(t))]

    out = {"imported by a plain fit": imported}
    for release in (False, True):
        straight = tensors(*fit(release, 8))
        model, trainer = fit(release, 8, CtrlC(at=3))
        ckpt = os.path.join(os.path.dirname(DATA), f"interrupted-{release}.ckpt")
        trainer.save_checkpoint(ckpt)
        resumed = tensors(*fit(release, 8, ckpt_path=ckpt))
        _, twice = fit(release, 8, CtrlC(at=3, times=2))
        out[str(release)] = {"interrupted": trainer.interrupted, "step": trainer.global_step,
                             "diff": diff(straight, resumed), "twice_step": twice.global_step,
                             "sigint_after": signal.getsignal(signal.SIGINT) is signal.default_int_handler}
    straight = tensors(*fit(False, 8, with_callback=False))  # CausalLMModule alone: its own adamw_8bit
    model, trainer = fit(False, 8, CtrlC(at=3), with_callback=False)
    trainer.save_checkpoint(os.path.join(os.path.dirname(DATA), "module.ckpt"))
    resumed = tensors(*fit(False, 8, ckpt_path=os.path.join(os.path.dirname(DATA), "module.ckpt"),
                           with_callback=False))
    out["module alone"] = {"step": trainer.global_step, "diff": diff(straight, resumed)}
    print(json.dumps(out))
''')


def test_ctrl_c_inside_a_step_stops_after_it_and_resumes_exactly(tmp_path):
    """In one process, with and without gradient release: Ctrl+C while backward runs in step 4 ends the fit after
    that step (global_step 4), and the checkpoint saved then resumes to the uninterrupted 8-step run bit for bit
    (params and 8-bit state); a second Ctrl+C in the same step stops at once (global_step 3); Python's SIGINT handler
    is back after each fit. The same with ``CausalLMModule`` alone (no callback: LowMemModule's own part). Before
    them, a fit of a plain module with the callback imports none of the NF4 stack (``lowmem_lightning.quant``, peft,
    bitsandbytes)."""
    script = tmp_path / "cells.py"
    script.write_text(CELLS)
    proc = run_script(script, str(tmp_path / "words.txt"), cwd=tmp_path, quiet=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["imported by a plain fit"] == []  # was all three: seconds, and bitsandbytes asking the Hub for kernels
    for release in ("False", "True"):
        assert out[release] == {"interrupted": True, "step": 4, "diff": 0.0, "twice_step": 3, "sigint_after": True}
    assert out["module alone"] == {"step": 4, "diff": 0.0}  # LowMemModule's own part (configure_callbacks)
    assert proc.stdout.count("Ctrl+C received during step 4: stopped after it") + proc.stderr.count(
        "Ctrl+C received during step 4: stopped after it") == 3
