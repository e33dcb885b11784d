"""A project that tried ``LowMemOptimizerCallback`` and goes back to its own ``torch.optim.AdamW``, resuming the
checkpoint the callback wrote (its optimizer state is the callback's: 8-bit codes).

What the README's "Going back to your own optimizer" says, as a Lightning user meets it: without the callback
torch's AdamW fails at its first step (``KeyError: 'exp_avg'``), after Lightning's warning that names the
callback; ``LowMemOptimizerCallback("adamw")`` resumes on torch's AdamW with the decoded moments; a module that
calls ``convert_on_load`` on its own AdamW in ``configure_optimizers`` resumes without the callback, the same
moments; and a state that does not convert to AdamW's (CAME's) is refused by name."""

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning import LowMemOptimizerCallback
from lowmem_lightning.optim import convert_on_load
from lowmem_lightning.optim.adamw_convert import fp32_adamw_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


class Project(L.LightningModule):
    """A user's classifier with its own AdamW; ``convert`` makes that AdamW load the callback's 8-bit state."""

    def __init__(self, convert: bool = False):
        super().__init__()
        self.convert = convert
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(256, 32, generator=gen), torch.randint(0, 4, (256,), generator=gen))
        return DataLoader(data, batch_size=8)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        if self.convert:
            convert_on_load(optimizer)
        return optimizer


def _callback(name: str) -> LowMemOptimizerCallback:
    return LowMemOptimizerCallback(name, plot=False, print_summary=False)


def _callbacks(how: str) -> list:
    return [_callback("adamw")] if how == "callback adamw" else []


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``name -> last.ckpt`` written after 6 steps of the project under the callback with ``name``."""
    root, made = tmp_path_factory.mktemp("leave"), {}

    def make(name: str):
        if name not in made:
            folder = root / name
            checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)
            trainer = L.Trainer(max_steps=6, default_root_dir=folder, callbacks=[_callback(name), checkpoints],
                                **QUIET)
            trainer.fit(Project())
            made[name] = folder / "last.ckpt"
        return made[name]

    return make


def _expected_moments(path, model: Project) -> dict:
    """The saved 8-bit state decoded as torch's AdamW holds it: ``{index: state}``."""
    saved_state = torch.load(path, weights_only=False)["optimizer_states"][0]
    reference = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return fp32_adamw_state_dict(copy.deepcopy(saved_state), reference)["state"]


def _resume(path, model: Project, callbacks: list, steps: int = 6) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, enable_checkpointing=False, callbacks=callbacks, **QUIET)
    trainer.fit(model, ckpt_path=path)
    return trainer


def _loaded_state(optimizer: torch.optim.Optimizer) -> dict:
    return {i: optimizer.state[p] for i, p in enumerate(optimizer.param_groups[0]["params"]) if p in optimizer.state}


def test_the_callbacks_checkpoint_holds_8bit_codes_that_torch_adamw_cannot_step_on(saved):
    path = saved("adamw_8bit")
    states = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
    assert any("exp_avg_codes" in state for state in states.values())
    with pytest.warns(UserWarning, match="LowMemOptimizerCallback"), pytest.raises(KeyError, match="exp_avg"):
        _resume(path, Project(), callbacks=[], steps=8)


@pytest.mark.parametrize("how", ["callback adamw", "convert_on_load"])
def test_torch_adamw_resumes_the_callbacks_checkpoint_with_the_decoded_moments(saved, how):
    path = saved("adamw_8bit")
    model = Project(convert=how == "convert_on_load")
    expected = _expected_moments(path, model)
    trainer = _resume(path, model, _callbacks(how), steps=6)  # restores step 6 and stops: the loaded state as it is
    optimizer = trainer.optimizers[0]
    assert type(optimizer) is torch.optim.AdamW
    loaded = _loaded_state(optimizer)
    assert loaded.keys() == expected.keys() and loaded
    for index, state in expected.items():
        assert torch.equal(loaded[index]["exp_avg"], state["exp_avg"])
        assert torch.equal(loaded[index]["exp_avg_sq"], state["exp_avg_sq"])
        assert float(loaded[index]["step"]) == 6.0
    trainer = _resume(path, Project(convert=how == "convert_on_load"), _callbacks(how), steps=9)  # trains on
    assert trainer.global_step == 9
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_a_state_of_another_algorithm_is_refused_by_name(saved):
    path = saved("came")
    with pytest.raises(Exception, match="came"):
        _resume(path, Project(), callbacks=[_callback("adamw")], steps=8)
