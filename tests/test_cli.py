"""The ``lowmem`` command: help, class_path selection, --optim/--lr, bundled recipes, short errors,
progress bar. Uses a tiny regression module defined here (``test_cli.TinyModule``), so the checks
do not depend on the language-model stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.cli import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    RECIPES_DIR,
    LowMemCLI,
    bundled_recipes,
    main,
    parse_fit_config,
    resolve_recipe,
)
from lowmem_lightning.cli.recipes import with_default_classes
from lowmem_lightning.optim import available_optimizers

TESTS = Path(__file__).resolve().parent


class TinyModule(L.LightningModule):
    """A two-layer regression net that brings its own SGD.

    Args:
        hidden: Width of the hidden layer (units).
        lr: Learning rate of the module's own SGD.
    """

    def __init__(self, hidden: int = 8, lr: float = 0.05):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TinyData(L.LightningDataModule):
    """Random regression data (y = sum of x).

    Args:
        n: Number of samples.
        batch_size: Samples per batch.
    """

    def __init__(self, n: int = 64, batch_size: int = 8):
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        x = torch.randn(self.n, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=self.batch_size)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny_test.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"max_steps": 3, "logger": False, "enable_checkpointing": False, "accelerator": "cpu",
                    "enable_model_summary": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "test_cli.TinyModule", "init_args": {"hidden": 16}},
        "data": {"class_path": "test_cli.TinyData"},
    }))
    return path


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _cli(*args) -> LowMemCLI:
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return LowMemCLI(args=list(args), run=True)
    finally:
        sys.argv = saved


# ------------------------------------------------------------------ help
def test_help_lists_subcommands_recipes_and_optim(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for word in ("fit", "validate", "test", "predict", "estimate", "tiny.yaml", "qlora_7b.yaml"):
        assert word in out
    code, out, _ = _run(capsys, "fit", "--help")
    assert code == 0
    assert "--optim" in out and "--lr" in out and "--trainer.callbacks" in out
    assert all(name in out for name in available_optimizers())


@pytest.mark.parametrize(
    "flag, class_path",
    [
        ("--model.help", DEFAULT_MODEL),
        ("--data.help", DEFAULT_DATA),
        ("--trainer.callbacks.help", "lowmem_lightning.callbacks.LowMemOptimizerCallback"),
        ("--model.help", "test_cli.TinyModule"),
    ],
)
def test_help_documents_every_argument_from_docstrings(capsys, flag, class_path):
    import inspect

    from lowmem_lightning.cli.config_edits import import_class

    code, out, _ = _run(capsys, "fit", flag, class_path)
    assert code == 0
    cls = import_class(class_path)
    doc = inspect.getdoc(cls)
    flat = " ".join(out.split())
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self":
            continue
        assert f".{name} " in flat or f".{name}\n" in out or f".{name}, " in flat, name  # ", ": Python >= 3.13
        # the first words of the argument's docstring entry are shown under it
        entry = next((line.split(":", 1)[1].split() for line in doc.splitlines()
                      if line.strip().startswith(f"{name}:") and line.split(":", 1)[1].strip()), None)
        if entry:
            assert " ".join(entry[:3]).replace("`", "") in flat.replace("`", ""), (name, entry[:3])


# ------------------------------------------------------------------ class selection and defaults
def test_default_classes_are_injected_only_when_missing(tiny_config):
    assert with_default_classes(["fit"]) == ["fit", "--model", DEFAULT_MODEL, "--data", DEFAULT_DATA]
    args = ["fit", "--config", str(tiny_config)]
    assert with_default_classes(args) == args
    cfg = parse_fit_config(["--config", str(tiny_config)])
    assert cfg.model.class_path == "test_cli.TinyModule"
    # the default class's own lr (CausalLMModule: 2e-4) does not leak into the user's class
    assert cfg.model.init_args.lr == 0.05 and cfg.model.init_args.hidden == 16


def test_parsing_a_fit_config_builds_the_fit_parser_alone(tiny_config, monkeypatch):
    """``parse_fit_config`` (what ``lowmem estimate`` reads a recipe with) builds no validate/test/predict/export
    parser: they took about half of each parse, and a refusal still names the asking command."""
    from lowmem_lightning.cli.app import _ParseOnlyCLI

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    cli = _ParseOnlyCLI(args=["fit", "--config", str(tiny_config)], save_config_callback=None, prog="lowmem estimate")
    assert set(cli._subcommand_parsers) == {"fit"} and cli._subcommand_parsers["fit"].prog == "lowmem estimate"
    assert list(cli.parser._subcommands_action.choices) == ["fit"]


def test_fit_runs_user_classes_with_rich_bar_and_optim_shortcut(tiny_config):
    cli = _cli("fit", "--config", str(tiny_config), "--optim", "adamw_8bit", "--lr", "0.01")
    assert cli.trainer.global_step == 3
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, RichProgressBar)
    assert cli.trainer.max_epochs == -1  # a max_steps-only run: no "Epoch 0/-2" on the bar
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.description.strip() == "Epoch 0"
    assert (task.completed, task.total, task.fields.get("unit")) == (3, 3, "steps")  # optimizer steps / max_steps
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, LowMemOptimizerCallback)]
    assert len(callbacks) == 1 and callbacks[0].optimizer_name == "adamw_8bit" and callbacks[0].lr == 0.01
    assert type(cli.trainer.optimizers[0]).__name__ == "AdamW8bit"
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)


def test_step_in_backward_shortcut_runs_gradient_release(tiny_config):
    cli = _cli("fit", "--config", str(tiny_config), "--optim", "came", "--lr", "0.001", "--step_in_backward", "true")
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LowMemOptimizerCallback)]
    assert callback.step_in_backward and callback.optimizer_name == "came"
    assert cli.trainer.global_step == 3 and callback.releases == []  # trained, hooks removed at teardown
    assert float(cli.trainer.optimizers[0].state[next(cli.model.parameters())]["step"]) == 3.0


def test_step_in_backward_needs_an_optimizer_callback(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--step_in_backward", "true")
    assert code == 2 and "step_in_backward needs --optim NAME or a LowMemOptimizerCallback" in err


def test_optim_overrides_the_configs_callback(tiny_config):
    data = yaml.safe_load(tiny_config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "lowmem_lightning.callbacks.LowMemOptimizerCallback",
                                     "init_args": {"optimizer": "adamw_8bit", "lr": 0.5}}]
    tiny_config.write_text(yaml.safe_dump(data))
    cfg = parse_fit_config(["--config", str(tiny_config), "--optim", "came"])
    (entry,) = cfg.trainer.callbacks
    assert entry.init_args.optimizer == "came" and entry.init_args.lr == 0.5
    cfg = parse_fit_config(["--config", str(tiny_config), "--optim", "sgd"])  # an adaptive lr is not SGD's
    (entry,) = cfg.trainer.callbacks
    assert entry.init_args.optimizer == "sgd" and entry.init_args.lr is None
    cfg = parse_fit_config(["--config", str(tiny_config), "--lr", "0.25"])
    assert cfg.trainer.callbacks[0].init_args.lr == 0.25


def test_user_progress_bar_is_kept_and_can_be_disabled(tiny_config):
    data = yaml.safe_load(tiny_config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"}]
    tiny_config.write_text(yaml.safe_dump(data))
    cli = _cli("fit", "--config", str(tiny_config), "--trainer.max_steps", "1")
    assert isinstance(cli.trainer.progress_bar_callback, TQDMProgressBar)
    cli = _cli("fit", "--config", str(tiny_config), "--trainer.max_steps", "1", "--trainer.callbacks=[]",
               "--trainer.enable_progress_bar", "false")
    assert cli.trainer.progress_bar_callback is None


# ------------------------------------------------------------------ recipes
def test_bare_recipe_names_resolve_to_the_bundled_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "tiny.yaml" in bundled_recipes() and "qlora_7b.yaml" in bundled_recipes()
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        assert Path(resolve_recipe(name)) == RECIPES_DIR / "tiny.yaml"
    (tmp_path / "tiny.yaml").write_text("trainer: {}\n")
    assert resolve_recipe("tiny.yaml") == "tiny.yaml"  # a local file wins
    with pytest.raises(ValueError, match="Bundled recipes: .*tiny.yaml"):
        resolve_recipe("elsewhere/nothing.yaml")


def test_recipe_relative_paths_and_model_tokenizer():
    cfg = parse_fit_config(["--config", "qlora_7b.yaml"])
    path = Path(cfg.model.init_args.model_name_or_path)
    assert path == (RECIPES_DIR / "llama-2-7b").resolve() and (path / "config.json").is_file()
    assert cfg.data.init_args.tokenizer == str(path)


# ------------------------------------------------------------------ errors: short, exit 2, no traceback
def _assert_short_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err and len(err.splitlines()) <= 4, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_unknown_optimizer_on_the_command_line(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--optim", "adam9000")
    _assert_short_error(code, err, "adam9000", "adamw_8bit", "paged_adamw_8bit", "came")


def test_unknown_optimizer_in_the_config(capsys, tiny_config):
    data = yaml.safe_load(tiny_config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "lowmem_lightning.callbacks.LowMemOptimizerCallback",
                                     "init_args": {"optimizer": "nadam_9bit"}}]
    tiny_config.write_text(yaml.safe_dump(data))
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config))
    _assert_short_error(code, err, "'nadam_9bit'", "adafactor", "sgd")


def test_invalid_optimizer_hyperparameter(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--optim", "adamw_8bit", "--lr", "-1")
    _assert_short_error(code, err, "lr", "-1")


def test_no_subcommand(capsys):
    code, _, err = _run(capsys)
    _assert_short_error(code, err, "fit", "estimate")


def test_missing_config_file(capsys):
    code, _, err = _run(capsys, "fit", "--config", "does/not/exist.yaml")
    _assert_short_error(code, err, "does/not/exist.yaml", "no such file", "tiny.yaml")


@pytest.mark.parametrize("content, needle", [
    (b"trainer:\n\tmax_steps: 2\n", "is not valid YAML: line 2, column 1: a tab, which YAML does not allow here "
                                     "(indent with spaces)."),
    (b"trainer: [1, 2\n", "is not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>' (while "
                          "parsing a flow sequence)."),
    (b"a: 1\n---\nb: 2\n", "is not valid YAML: line 2, column 1: expected a single document in the stream, but "
                           "found another document."),
    (b"", "is empty (no settings): expected a YAML mapping (seed_everything:, trainer:, model:, data:, ...)."),
    (b"# nothing but a comment\n", "is empty (no settings)"),
    (b"- trainer\n- model\n", "holds a YAML list: expected a mapping (seed_everything:, trainer:"),
    (b"42\n", "holds a YAML single value (int): expected a mapping"),
    (b"trainer: \x98\xff\n", "is not UTF-8 text (byte 0x98 at offset 9): expected a YAML file."),
], ids=["tab", "unclosed", "two-documents", "empty", "comments-only", "list", "scalar", "not-utf8"])
def test_a_config_file_that_is_no_yaml_mapping_is_named_with_what_is_wrong(capsys, tmp_path, monkeypatch, content,
                                                                          needle):
    """Before, jsonargparse's own words named no file: ``Unexpected config:`` for an empty file, ``'utf-8' codec
    can't decode byte 0x98 in position 9`` and a YAML error "in <unicode string>"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_bytes(content)
    for subcommand in ("fit", "estimate"):
        code, out, err = _run(capsys, subcommand, "--config", "run.yaml")
        assert err.startswith(f"lowmem {subcommand}: error: --config 'run.yaml' {needle}"), err
        _assert_short_error(code, err)
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]  # nothing written


def test_unknown_key(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--model.hiden", "3")
    _assert_short_error(code, err, "hiden", "hidden, lr")
    data = yaml.safe_load(tiny_config.read_text())
    data["trainer"]["max_step"] = 3
    tiny_config.write_text(yaml.safe_dump(data))
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config))
    _assert_short_error(code, err, "trainer.max_step", "trainer.max_steps")


def test_bad_type(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--model.hidden", "wide")
    _assert_short_error(code, err, "hidden", "int", "wide")
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--trainer.max_steps", "many")
    _assert_short_error(code, err, "trainer.max_steps", "many")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs no GPU")
def test_gpu_accelerator_without_a_gpu_names_the_argument(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--trainer.accelerator", "gpu")
    _assert_short_error(code, err, "trainer.accelerator='gpu'", "no GPU", "'auto', 'cpu'")
    assert [p.name for p in tiny_config.parent.iterdir()] == [tiny_config.name]  # nothing written


def test_lr_without_an_optimizer_callback(capsys, tiny_config):
    code, _, err = _run(capsys, "fit", "--config", str(tiny_config), "--lr", "0.1")
    _assert_short_error(code, err, "--optim")


def test_architecture_only_folder_is_refused_for_training(capsys):
    code, _, err = _run(capsys, "fit", "--config", "qlora_7b.yaml")
    _assert_short_error(code, err, "architecture-only", "--model.model_name_or_path")


@pytest.mark.slow
def test_console_script_exit_code_and_no_traceback(tiny_config):
    """The installed entry point, in its own process: bad input -> exit 2 and one short message."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from lowmem_lightning.cli import main; sys.exit(main())",
         "fit", "--config", str(tiny_config), "--optim", "nope"],
        capture_output=True, text=True, cwd=TESTS, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(TESTS)},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "Unknown optimizer 'nope'" in proc.stderr
