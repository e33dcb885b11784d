"""LowMemOptimizerCallback's parts: one job per callback, reached by the Trainer itself (no hand-forwarding),
state set in ``__init__``, the monitor's metric names written once, the progress bar on public extension points."""

import types

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import (
    FSDP1Check,
    GradientReleaseCallback,
    LeaveOutFrozenBase,
    LowMemOptimizerCallback,
    PreemptionCheckpoint,
    ResumeCompatibility,
    StateMemoryMonitor,
    StepsAwareRichProgressBar,
)
from lowmem_lightning.callbacks.averaging import AverageSharesFrozen
from lowmem_lightning.callbacks.clip_norm import ClipNormReuse
from lowmem_lightning.callbacks.interrupt import InterruptAtStepEnd
from lowmem_lightning.callbacks.monitor import METRICS, STATE_MIB
from lowmem_lightning.callbacks.progress import format_bar_metrics
from lowmem_lightning.callbacks.rng_state import RngStateCheckpoint
from lowmem_lightning.callbacks.rotary import KeepRotaryFp32
from lowmem_lightning.callbacks.train_mode import CheckpointingModeCheck

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.net(x).square().mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _loader():
    return DataLoader(TensorDataset(torch.randn(12, 4, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _fit(tmp_path, callbacks, steps=3, trainer=None):
    trainer = trainer or L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, log_every_n_steps=1,
    )
    trainer.fit(_Tiny(), _loader())
    return trainer


def test_parts_follow_the_callback_in_trainer_callbacks_once(tmp_path):
    callback = LowMemOptimizerCallback("adamw_8bit", step_in_backward=True, print_summary=False, plot=False)
    other = L.Callback()
    trainer = _fit(tmp_path, [callback, other])
    kinds = [FSDP1Check, GradientReleaseCallback, StateMemoryMonitor, PreemptionCheckpoint, InterruptAtStepEnd,
             ResumeCompatibility, ClipNormReuse, KeepRotaryFp32, CheckpointingModeCheck, RngStateCheckpoint,
             AverageSharesFrozen, LeaveOutFrozenBase]
    position = trainer.callbacks.index(callback)
    assert [type(c) for c in trainer.callbacks[position + 1:position + 13]] == kinds
    assert trainer.callbacks[position + 13] is other
    assert trainer.callbacks[position + 3] is callback.monitor and trainer.callbacks[position + 2] is callback.release
    trainer.fit(_Tiny(), _loader())  # a second fit with the same Trainer (set up, no step): no part added again
    assert len(trainer.callbacks) == len({id(c) for c in trainer.callbacks}) == position + 14
    plain = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)
    assert not any(isinstance(p, GradientReleaseCallback) for p in plain.parts) and plain.releases == []


def test_a_hook_added_to_the_monitor_runs_inside_the_composed_callback(tmp_path, monkeypatch):
    """The old composite forwarded five hooks by hand: a new monitor hook silently did nothing inside it."""
    seen = []
    monkeypatch.setattr(StateMemoryMonitor, "on_train_epoch_end", lambda self, trainer, module: seen.append(self),
                        raising=False)
    monkeypatch.setattr(StateMemoryMonitor, "on_before_optimizer_step",
                        lambda self, trainer, module, optimizer: seen.append(optimizer), raising=False)
    callback = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)
    trainer = _fit(tmp_path, [callback], steps=3)
    assert seen.count(callback.monitor) == 1  # one epoch of 3 batches
    assert [o for o in seen if o is not callback.monitor] == [trainer.optimizers[0]] * 3


def test_state_lives_in_attributes_set_by_init(tmp_path):
    callback = LowMemOptimizerCallback("adamw_8bit", step_in_backward=True, print_summary=False, plot=False)
    bar = StepsAwareRichProgressBar()
    ours = [callback, *callback.parts]
    before = [set(vars(c)) for c in ours]
    bar_before = set(vars(bar))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback, bar])
    _fit(tmp_path, [], trainer=trainer)
    assert bar.progress is not None and bar.train_progress_bar_id is not None  # the bar ran
    lightnings = {"log", "log_dict"}  # the Trainer gives every callback the module's logging functions
    assert [set(vars(c)) - lightnings for c in ours] == before
    rich = RichProgressBar()
    assert set(vars(bar)) - set(vars(rich)) - lightnings == bar_before - set(vars(rich))  # none of ours added later


def test_progress_bar_overrides_no_private_rich_progress_bar_method():
    private = [name for name in vars(StepsAwareRichProgressBar) if name.startswith("_") and not name.startswith("__")]
    assert private  # it has helpers of its own ...
    assert [name for name in private if hasattr(RichProgressBar, name)] == []  # ... none replaces Lightning's


def test_every_metric_the_monitor_logs_has_its_one_definition(tmp_path):
    callback = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False)
    trainer = _fit(tmp_path, [callback], steps=2)
    logged = {name for name in trainer.callback_metrics if name.startswith(("optim/", "memory/"))}
    assert STATE_MIB.name in logged and logged <= {m.name for m in METRICS}
    assert set(trainer.progress_bar_metrics) & logged == {STATE_MIB.name}
    assert format_bar_metrics({STATE_MIB.name: 0.5}) == "state 0.50 MiB"  # the bar's label from the same constant
    assert len({m.name for m in METRICS}) == len(METRICS)


def test_fsdp1_check_refuses_factored_optimizers_at_fit_setup_only():
    fsdp = types.SimpleNamespace(strategy=FSDPStrategy())
    for name in ("adafactor", "came"):
        with pytest.raises(ValueError, match=rf"optimizer='{name}' with strategy=FSDPStrategy \(FSDP1\)"):
            FSDP1Check(name).setup(fsdp, None, "fit")
        FSDP1Check(name).setup(fsdp, None, "validate")
        FSDP1Check(name).setup(types.SimpleNamespace(strategy=DDPStrategy()), None, "fit")
    FSDP1Check("adamw_8bit").setup(fsdp, None, "fit")


def test_resume_compatibility_reads_the_swap_record_or_the_states():
    check = ResumeCompatibility("adamw_8bit")
    saved = {"callbacks": {"LowMemOptimizerCallback": {"optimizer": "came"}}}
    with pytest.raises(ValueError, match=r"trained with optimizer 'came', but LowMemOptimizerCallback\(optimizer="
                                         r"'adamw_8bit'\)"):
        check.on_load_checkpoint(None, None, saved)
    check.on_load_checkpoint(None, None, {"callbacks": {"LowMemOptimizerCallback": {"optimizer": "adamw_8bit"}}})
    torch_adamw = {"optimizer_states": [{"state": {0: {"step": 1, "exp_avg": 0, "exp_avg_sq": 0}}}]}
    check.on_load_checkpoint(None, None, torch_adamw)  # fp32 AdamW converts into adamw_8bit
    with pytest.raises(ValueError, match="trained with optimizer 'adamw'"):
        ResumeCompatibility("sgd").on_load_checkpoint(None, None, torch_adamw)
    other_key = ResumeCompatibility("sgd", saved_under="Mine")
    other_key.on_load_checkpoint(None, None, {"callbacks": {"Mine": {"optimizer": "sgd"}}})


def test_resume_refusal_names_the_checkpoint_file_and_the_cli_flag():
    """``--ckpt_path last`` picks a file the user did not type (the README's ``tiny`` then ``--optim came`` runs
    share ``runs/tiny``): the refusal names the file it read and the ``lowmem`` flag that resumes it."""
    trainer = types.SimpleNamespace(state=types.SimpleNamespace(fn="fit"),
                                    ckpt_path="runs/tiny/version_1/checkpoints/epoch=1-step=300.ckpt")
    saved = {"callbacks": {"LowMemOptimizerCallback": {"optimizer": "came"}}}
    with pytest.raises(ValueError) as refused:
        ResumeCompatibility("adamw_8bit").on_load_checkpoint(trainer, None, saved)
    message = str(refused.value)
    assert message.startswith("Cannot resume from runs/tiny/version_1/checkpoints/epoch=1-step=300.ckpt: it was "
                              "trained with optimizer 'came', but LowMemOptimizerCallback(optimizer='adamw_8bit')"), \
        message
    assert "(lowmem fit: --optim came)" in message, message
