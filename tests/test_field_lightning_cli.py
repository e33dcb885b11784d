"""Field test: a user's own ``LightningCLI(MyModule, MyData)`` project picking our optimizers (brief v2, part 1).

The project (``PROJECT``, written to ``proj.py``) knows nothing of lowmem-lightning: the optimizer and LR scheduler
come from the command line or YAML (``optimizer: {class_path: lowmem_lightning.AdamW4bit, init_args: ...}``),
and LightningCLI's own ``configure_optimizers`` builds them. Checked: every registry class is importable at the top
level (the ``class_path`` users write); a YAML config per class fits, and its ``--print_config`` output loads back
to the same config and fits again; jsonargparse's handling of our signatures (tuples ``betas``/``eps``,
``momentum_dtype``, ``bf16_rounding``, Muon's ``adjust_lr_fn``) and who words a wrong value's error (jsonargparse's
type check for a tuple of the wrong length, our validation for a string outside its choices: both name the
argument, the value and what is allowed); ``--ckpt_path`` resume in a new process equal to the uninterrupted run bit
for bit (params, optimizer state, scheduler); ``LowMemOptimizerCallback`` added through YAML ``trainer.callbacks``
to a project with its own ``configure_optimizers``.

The matrix runs LightningCLI in this process (``args=[...]``, the same parser and ``configure_optimizers``); the
real ``python proj.py ...`` runs, one per check, start a new interpreter (~4 s each, mostly imports).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lowmem_calls import seed_environment_kept

import lowmem_lightning
from lowmem_lightning.optim import registry

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]

PROJECT = '''"""A user's LightningCLI project: no lowmem-lightning import anywhere."""
import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MyModule(L.LightningModule):
    """A tiny classifier; the first weight (80 x 64 = 5120 elements) gets quantized optimizer state."""

    def __init__(self, hidden: int = 80):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 4))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss


class OwnOptimizerModule(MyModule):
    """The same model with its own optimizer: torch AdamW and a StepLR stepped per step."""

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MyData(L.LightningDataModule):
    """32 fixed samples, 4 batches of 8 per epoch, no shuffling."""

    def __init__(self, n: int = 32, batch_size: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 64, generator=g)
        self.y = (self.x @ torch.randn(64, 4, generator=g)).argmax(1)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


if __name__ == "__main__":
    LightningCLI(MyModule, MyData)
'''

QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--seed_everything", "0"]

INIT_ARGS = {  # per registry name: the init_args a user would write (any class-specific must-haves)
    "adamw_8bit": {"lr": 1e-3, "betas": [0.9, 0.95]},
    "adamw_4bit": {"lr": 1e-3, "betas": [0.9, 0.95], "bf16_rounding": "nearest"},
    "paged_adamw_8bit": {"lr": 1e-3},
    "sgd": {"lr": 1e-2, "momentum": 0.9, "momentum_dtype": "int8"},
    "adafactor": {"lr": 1e-3, "relative_step": False, "eps": [1e-30, 1e-3]},
    "came": {"lr": 1e-3, "momentum_dtype": "int8", "betas": [0.9, 0.999, 0.9999]},
    "lion": {"lr": 1e-4},
    "lion_8bit": {"lr": 1e-4, "betas": [0.9, 0.99]},
    "ademamix": {"lr": 1e-3},
    "ademamix_8bit": {"lr": 1e-3, "betas": [0.9, 0.999, 0.9999]},
    "muon": {"lr": 1e-2, "adjust_lr_fn": "match_rms_adamw"},
    "muon_8bit": {"lr": 1e-2, "adjust_lr_fn": "original", "momentum_dtype": "int8"},
}
OURS = [name for name in registry.available_optimizers() if name != "adamw"]  # "adamw" is torch's AdamW


@pytest.fixture(autouse=True)
def _seed_environment():
    """LightningCLI's ``seed_everything`` sets ``PL_GLOBAL_SEED``/``PL_SEED_WORKERS`` in this process: put them back
    as they were, so tests that run next in the same worker do not inherit a global seed."""
    with seed_environment_kept():
        yield


def class_path(name: str) -> str:
    """The top-level ``class_path`` of registry ``name`` (``lowmem_lightning.AdamW4bit``)."""
    return f"lowmem_lightning.{registry.optimizer_class(name).__name__}"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object]:
    """``proj.py`` written to a folder, and the same file imported as a module (for in-process LightningCLI)."""
    path = tmp_path_factory.mktemp("project") / "proj.py"
    path.write_text(PROJECT)
    spec = importlib.util.spec_from_file_location("field_cli_proj", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # jsonargparse imports what it names
    spec.loader.exec_module(module)
    yield path, module
    sys.modules.pop(spec.name, None)


def run_project(proj: Path, root: Path, *args: str, module: str = "MyModule") -> subprocess.CompletedProcess:
    """``python proj.py <args>`` in ``root`` (a new process), its output captured; ``module`` picks the
    LightningModule the script hands LightningCLI."""
    root.mkdir(parents=True, exist_ok=True)
    script = proj.read_text().replace("LightningCLI(MyModule, MyData)", f"LightningCLI({module}, MyData)")
    (root / "proj.py").write_text(script)
    return subprocess.run([sys.executable, "proj.py", *args, "--trainer.default_root_dir", str(root)], cwd=root,
                          capture_output=True, text=True, timeout=300)


def in_process_cli(module, root: Path, args: list[str], run: bool = False):
    """LightningCLI over the project's classes with ``args``, not run (``run=False``), or run as ``python proj.py
    ARGS`` runs it (``run=True``: ``args`` start with the subcommand)."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(module.MyModule, module.MyData, run=run,
                        args=[*args, *QUIET, "--trainer.default_root_dir", str(root)])


# ================================================================================ top-level exports
def test_every_registry_class_is_exported_at_top_level():
    """Each registry class is ``lowmem_lightning.<ClassName>`` (the class itself) and listed in ``__all__``, so a
    YAML ``class_path: lowmem_lightning.<ClassName>`` works for every optimizer, the next one included; ``dir()`` lists
    them before their import."""
    for name in OURS:
        cls = registry.optimizer_class(name)
        assert getattr(lowmem_lightning, cls.__name__) is cls, name
        assert cls.__name__ in lowmem_lightning.__all__ and cls.__name__ in dir(lowmem_lightning), name
    assert set(INIT_ARGS) == set(OURS), "a new optimizer needs its INIT_ARGS row in this file"


# ================================================================================ YAML, print_config round trip
@pytest.mark.parametrize("name", OURS)
def test_yaml_class_paths_fit_and_print_config_round_trips(name, project, tmp_path, capsys):
    """A YAML config naming ``lowmem_lightning.<Class>`` with init_args and a ``StepLR`` fits 2 steps with that
    class and those settings; its ``--print_config`` output is valid YAML that parses back to the same config and
    fits again."""
    _, module = project
    config = {"optimizer": {"class_path": class_path(name), "init_args": INIT_ARGS[name]},
              "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}},
              "trainer": {"max_steps": 2, "enable_checkpointing": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        in_process_cli(module, tmp_path / "print", ["--config", str(tmp_path / "cfg.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert yaml.safe_load(printed)["optimizer"]["class_path"] == class_path(name)
    first, second = (_fit(module, tmp_path / run, tmp_path / cfg) for run, cfg in
                     (("a", "cfg.yaml"), ("b", "printed.yaml")))
    for cli in (first, second):
        optimizer = cli.trainer.optimizers[0]
        assert type(optimizer) is registry.optimizer_class(name)
        assert optimizer.state, "no step was taken"
        for key, value in INIT_ARGS[name].items():
            got = optimizer.defaults[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, (key, got, value)
    assert first.config["optimizer"] == second.config["optimizer"]
    assert first.config["lr_scheduler"] == second.config["lr_scheduler"]


def _fit(module, root: Path, config: Path):
    """Parse ``config`` with LightningCLI and fit; the CLI object after fit."""
    cli = in_process_cli(module, root, ["--config", str(config)])
    cli.trainer.fit(cli.model, cli.datamodule)
    return cli


# ================================================================================ wrong values
@pytest.mark.parametrize("name, argument, value, who, words", [
    ("adamw_8bit", "betas", "[0.9]", "jsonargparse", ['Parser key "betas"', "Expected a tuple with 2 elements",
                                                      "Got value: [0.9]"]),
    ("came", "eps", "[1e-30]", "jsonargparse", ['Parser key "eps"', "Expected a tuple with 2 elements"]),
    ("adamw_8bit", "lr", "fast", "jsonargparse", ['Parser key "lr"', "fast"]),
    ("came", "momentum_dtype", "int4", "jsonargparse", ['Parser key "momentum_dtype"', "'float32', 'int8'",
                                                        "Got value: int4"]),
    ("adamw_4bit", "bf16_rounding", "sometimes", "jsonargparse", ['Parser key "bf16_rounding"',
                                                                  "'stochastic', 'nearest'", "Got value: sometimes"]),
    ("muon_8bit", "adjust_lr_fn", "foo", "jsonargparse", ['Parser key "adjust_lr_fn"', "'original', "
                                                          "'match_rms_adamw'", "foo"]),
    ("muon_8bit", "momentum_dtype", "int4", "jsonargparse", ['Parser key "momentum_dtype"', "'int8'", "int4"]),
])
def test_wrong_value_names_argument_value_and_allowed(name, argument, value, who, words, project, tmp_path, capsys):
    """A wrong ``--optimizer.<argument>`` fails before any step with a message naming the argument, the value and
    what is allowed. Tuples of the wrong length, non-numbers and a string outside its choices (our signatures type
    those ``Literal``): jsonargparse's type check, at parse time, exit 2, before anything is built or written."""
    _, module = project
    args = ["--optimizer", class_path(name), "--optimizer.lr", "1e-3", f"--optimizer.{argument}", value,
            "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false"]
    if who == "jsonargparse":
        with pytest.raises(SystemExit) as exit_info:
            in_process_cli(module, tmp_path, args)
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
    else:  # LightningCLI builds the optimizer while it instantiates the classes, before a Trainer runs
        with pytest.raises(ValueError) as error:
            in_process_cli(module, tmp_path, args)
        message = str(error.value)
    for word in words:
        assert word in message, (word, message)


@pytest.mark.slow
def test_wrong_value_in_a_real_process(project, tmp_path):
    """``python proj.py fit --optimizer.momentum_dtype int4`` exits 2 with jsonargparse's message naming the key, the
    choices and the value, and writes nothing (no config.yaml, no checkpoint); ``--optimizer.betas [0.9]`` exits 2
    with jsonargparse's, naming the key and the tuple length."""
    proj, _ = project
    base = ["fit", "--optimizer", "lowmem_lightning.optim.came.CAME", "--optimizer.lr", "1e-3", *QUIET,
            "--trainer.max_steps", "2"]
    done = run_project(proj, tmp_path / "dtype", *base, "--optimizer.momentum_dtype", "int4")
    assert done.returncode == 2
    assert 'Parser key "momentum_dtype"' in done.stderr and "'float32', 'int8'" in done.stderr, done.stderr
    assert "Got value: int4" in done.stderr
    assert sorted(p.name for p in (tmp_path / "dtype").iterdir()) == ["proj.py"]
    done = run_project(proj, tmp_path / "betas", *base, "--optimizer.betas", "[0.9]")
    assert done.returncode == 2
    assert 'Parser key "betas"' in done.stderr and "Expected a tuple with 3 elements" in done.stderr, done.stderr


# ================================================================================ --ckpt_path resume
RESUME = {
    "adamw_8bit": ["--optimizer", "lowmem_lightning.optim.adamw8bit.AdamW8bit", "--optimizer.lr", "1e-2"],
    "adamw_4bit": ["--optimizer", "lowmem_lightning.AdamW4bit", "--optimizer.lr", "1e-2"],
    "came": ["--optimizer", "lowmem_lightning.CAME", "--optimizer.lr", "1e-3", "--optimizer.momentum_dtype", "int8"],
    "muon_8bit": ["--optimizer", "lowmem_lightning.Muon8bit", "--optimizer.lr", "2e-2"],
}
CHECKPOINTS = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k", "-1",
               "--trainer.callbacks.every_n_epochs", "1", "--trainer.max_epochs", "3"]
SCHEDULER = ["--lr_scheduler", "OneCycleLR", "--lr_scheduler.max_lr", "2e-2", "--lr_scheduler.total_steps", "4"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "adamw_4bit" else pytest.mark.slow)
                                  for n in RESUME])
def test_ckpt_path_resume_in_new_process_is_bit_exact(name, project, tmp_path, monkeypatch):
    """3 epochs of 4 steps with LightningCLI's ``configure_optimizers`` and a ``OneCycleLR`` (stepped per epoch,
    its momentum cycling our betas), a checkpoint per epoch; a new process resumes from the first epoch's checkpoint
    with ``--ckpt_path``: its final checkpoint equals the uninterrupted run's bit for bit (params, optimizer state
    and param groups, scheduler). The uninterrupted run only makes the checkpoints, so it is the project's
    LightningCLI in this process (``in_process_cli(run=True)``, the same arguments, in its folder)."""
    proj, module = project
    args = ["fit", *RESUME[name], *SCHEDULER, *CHECKPOINTS, *QUIET]
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    in_process_cli(module, tmp_path / "straight", args, run=True)
    middle = _checkpoint(tmp_path / "straight", "epoch=0-step=4.ckpt")
    resumed = run_project(proj, tmp_path / "resumed", *args, "--ckpt_path", str(middle))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end = "epoch=2-step=12.ckpt"
    a, b = (torch.load(_checkpoint(tmp_path / run, end), weights_only=False) for run in ("straight", "resumed"))
    m = torch.load(middle, weights_only=False)
    assert not torch.equal(m["state_dict"]["net.0.weight"], a["state_dict"]["net.0.weight"])  # it trained on
    _assert_same(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert a["optimizer_states"][0]["state"], "no optimizer state saved"


def _checkpoint(root: Path, filename: str) -> Path:
    """The one checkpoint called ``filename`` under ``root``."""
    found = list(root.rglob(filename))
    assert len(found) == 1, (filename, sorted(p.name for p in root.rglob("*.ckpt")))
    return found[0]


def _assert_same(a, b, where: str) -> None:
    """``a`` and ``b`` equal bit for bit (tensors: dtype, shape, values incl. NaN positions), recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b) if isinstance(b, dict) else b)
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ================================================================================ the callback through YAML
def test_callback_through_yaml_swaps_own_optimizer_and_logs_state_memory(project, tmp_path):
    """``trainer.callbacks: [{class_path: lowmem_lightning.LowMemOptimizerCallback, init_args: {optimizer:
    adamw_4bit}}]`` in a project whose ``configure_optimizers`` returns torch AdamW + StepLR: the checkpoint holds
    adamw_4bit's state (codes), the module's betas (0.9, 0.95) and the scheduled lr; the state-memory metrics are
    logged (CSV) and the summary printed."""
    proj, _ = project
    config = {"trainer": {"max_steps": 4, "log_every_n_steps": 1, "enable_progress_bar": False,
                          "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(tmp_path / "run")}},
                          "callbacks": [{"class_path": "lowmem_lightning.LowMemOptimizerCallback",
                                         "init_args": {"optimizer": "adamw_4bit", "plot": False}}]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    done = run_project(proj, tmp_path / "run", "fit", "--config", str(tmp_path / "cfg.yaml"), "--seed_everything",
                       "0", module="OwnOptimizerModule")
    assert done.returncode == 0, done.stderr[-3000:]
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert group["betas"] == (0.9, 0.95) and group["lr"] == pytest.approx(1e-2 * 0.5 ** 2)
    state = saved["optimizer_states"][0]["state"][0]  # net.0.weight: 5120 elements, quantized
    assert any(t.dtype == torch.uint8 for t in state.values() if isinstance(t, torch.Tensor)), state.keys()
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "optim/state_MiB" in header and "optim/state_bytes_per_param" in header, header
    assert "adamw_4bit" in done.stdout + done.stderr
