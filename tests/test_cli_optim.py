"""``--optim NAME`` with every bundled recipe and every optimizer ``lowmem fit --help`` lists, and the
module's ``--model.optimizer`` / ``--model.lr`` against the recipe's LowMemOptimizerCallback.

Every (recipe, optimizer) pair is parsed and its callback built (no 1B/7B model) in the default suite,
and ``tiny.yaml`` trains one step with each optimizer; with ``-m slow`` every other tiny recipe trains
one step with each optimizer, and the 1B/7B recipes train one step on a tiny stand-in model
(their optimizer, precision, accumulation, clipping and gradient release, the model swapped for a
1-layer Llama), which is where a refusal at fit time would show.
"""

from __future__ import annotations

import csv
import functools
import json
import sys

import pytest
from jsonargparse import Namespace

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.cli import bundled_recipes, main, parse_fit_config
from lowmem_lightning.cli.app import _ParseOnlyCLI
from lowmem_lightning.cli.recipes import resolve_config_args, with_default_classes
from lowmem_lightning.cli.switch import switch_optimizer
from lowmem_lightning.optim import available_optimizers

OPTIMIZERS = available_optimizers()
RECIPES = bundled_recipes()
BIG = [r for r in RECIPES if not r.startswith("tiny")]
TINY = [r for r in RECIPES if r.startswith("tiny")]
TINY_DEFAULT = ["tiny.yaml"]  # the others train one step per optimizer with -m slow
TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64}


def _callback_entry(cfg):
    entries = [c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback")]
    assert len(entries) == 1
    return entries[0]


def _one_step(recipe: str, tmp_path, *extra: str) -> list[str]:
    args = [
        "fit", "--config", recipe, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1", "--data.init_args.seq_len", "32", *extra,
    ]
    if recipe in BIG:  # the recipe's training set-up on a 1-layer stand-in instead of the 1B/7B checkpoint
        args += ["--model.init_args.model_name_or_path", "null", "--model.init_args.config", json.dumps(TINY_MODEL),
                 "--model.init_args.save_dir", "null", "--data.init_args.tokenizer", "byte",
                 # a base drawn from a config cannot be rebuilt for a checkpoint that leaves it out (qlora_7b's
                 # checkpoint_frozen: false refuses it): the stand-in's checkpoints keep it
                 "--model.init_args.checkpoint_frozen", "true"]
    return args


def _trained_one_step(tmp_path) -> bool:
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    return [r["step"] for r in rows if r.get("train_loss")] == ["0"]


def test_help_says_what_optim_keeps_and_changes(capsys):
    assert main(["fit", "--help"]) == 0
    flat = " ".join(capsys.readouterr().out.split())
    for words in ("lr and LR schedule are kept", "relative_step: false", "--model.optimizer NAME"):
        assert words in flat, words


class _KeepsTheParse(_ParseOnlyCLI):
    """:func:`parse_fit_config`'s CLI that also keeps the parsed config as it was before the fix-ups (``--optim``,
    ``--lr``, paths), so that they can be run again on a copy with another ``--optim``."""

    def before_instantiate_classes(self) -> None:
        """Keep a copy of the parse, then fix it up as ``lowmem fit`` does."""
        self.parsed = self.config.clone()
        super().before_instantiate_classes()


@functools.cache
def _recipe_parse(recipe: str) -> _KeepsTheParse:
    """``recipe`` parsed as ``lowmem fit --config RECIPE`` parses it, once per session."""
    argv = with_default_classes(["fit", *resolve_config_args(["--config", recipe])])
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return _KeepsTheParse(args=argv, save_config_callback=None)
    finally:
        sys.argv = saved_argv


def _fit_config_with_optim(recipe: str, optim: str) -> Namespace:
    """What ``parse_fit_config(["--config", recipe, "--optim", optim])`` gives, from the recipe's one parse: ``--optim``
    is a plain string to the parser (its value changes nothing else that is parsed), and everything it does is done
    by the fix-ups (``before_instantiate_classes``), run here on a copy of the parse with ``optim`` set. Parsing
    takes ~0.2 s a time (jsonargparse checks every value of the recipe); the fix-ups a few ms."""
    cli = _recipe_parse(recipe)
    cli.config = cli.parsed.clone()
    cli.config.fit.optim = optim
    cli._cli_args = with_default_classes(["fit", *resolve_config_args(["--config", recipe, "--optim", optim])])
    _ParseOnlyCLI.before_instantiate_classes(cli)
    return cli.config.fit


@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_optim_parses_and_builds_its_callback_with_every_recipe(recipe, optim):
    """Every pair's fix-ups and callback; each optimizer with one recipe (every recipe with at least one) also goes
    through the whole parse of ``--optim NAME``, which must give the same config (the full command line with every
    optimizer: :func:`test_optim_trains_with_every_tiny_recipe`)."""
    cfg = _fit_config_with_optim(recipe, optim)
    if RECIPES.index(recipe) == OPTIMIZERS.index(optim) % len(RECIPES):
        assert parse_fit_config(["--config", recipe, "--optim", optim]) == cfg
    init = _callback_entry(cfg).init_args.as_dict()
    callback = LowMemOptimizerCallback(**init)  # the constructor validates the optimizer's arguments
    assert callback.optimizer_name == optim
    if optim == "adafactor" and "adafactor" not in recipe:
        assert {"relative_step": False, "scale_parameter": False}.items() <= init["optimizer_kwargs"].items()
        assert init["lr"] is not None  # the recipe's (callback or module) lr, which its schedule drives


@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize("recipe", TINY_DEFAULT)
def test_optim_trains_with_every_tiny_recipe(recipe, optim, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(_one_step(recipe, tmp_path, "--optim", optim)) == 0
    assert _trained_one_step(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize("recipe", [r for r in TINY if r not in TINY_DEFAULT] + BIG)
def test_optim_trains_with_the_other_recipes(recipe, optim, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(_one_step(recipe, tmp_path, "--optim", optim)) == 0
    assert _trained_one_step(tmp_path)


def test_adafactor_takes_the_recipes_lr_and_schedule(tmp_path, monkeypatch, capsys):
    """The issue's command: no "Cannot combine manual `lr` and `relative_step=True`", the lr drives it."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    args = _one_step("tiny.yaml", tmp_path, "--optim", "adafactor", "--trainer.max_steps", "3")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "relative_step=False, scale_parameter=False" in err and "Cannot combine" not in err
    rows = [r for r in csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()) if r.get("optim/effective_lr")]
    lrs = [float(r["optim/effective_lr"]) for r in rows]
    assert lrs and all(0 < lr < 3e-3 for lr in lrs)  # warmup of the recipe's cosine schedule to lr 3e-3


def test_switch_drops_settings_of_the_old_optimizer_and_says_so():
    init = {"optimizer": "sgd", "lr": 0.3, "optimizer_kwargs": {"momentum": 0.9, "nesterov": True,
                                                                "momentum_dtype": "int8"}}
    line = switch_optimizer(init, "came", 0.3)
    assert init["optimizer"] == "came" and init["optimizer_kwargs"] == {"momentum_dtype": "int8"}
    assert "momentum=0.9" in line and "nesterov=True" in line and "sgd's, not valid for came" in line
    init = {"optimizer": "sgd", "optimizer_kwargs": {"momentum": 0.9, "nesterov": True}}
    assert switch_optimizer(init, "sgd", None) is None and init["optimizer_kwargs"] == {"momentum": 0.9,
                                                                                      "nesterov": True}
    init = Namespace(optimizer="adamw_8bit", lr=None)
    switch_optimizer(init, "adafactor", None)  # no lr anywhere: Adafactor's own relative step stays
    assert init.optimizer_kwargs is None and init.lr is None


def test_model_optimizer_on_the_command_line_is_applied_to_the_callback(capsys):
    cfg = parse_fit_config(["--config", "tiny.yaml", "--model.optimizer", "came"])
    assert _callback_entry(cfg).init_args.optimizer == "came"
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "--model.optimizer came" in line]) == 1
    assert "replaces the module's optimizer" in err


def test_model_lr_on_the_command_line_wins_over_the_callbacks(capsys):
    cfg = parse_fit_config(["--config", "tiny.yaml", "--model.lr", "0.001"])
    assert _callback_entry(cfg).init_args.lr == 0.001 and cfg.model.init_args.lr == 0.001
    assert "--model.lr 0.001 also sets the LowMemOptimizerCallback's lr" in capsys.readouterr().err
    cfg = parse_fit_config(["--config", "tiny.yaml", "--model.lr", "0.001", "--lr", "0.002"])
    assert _callback_entry(cfg).init_args.lr == 0.002  # --lr is the callback's own flag
    cfg = parse_fit_config(["--config", "tiny.yaml"])
    assert _callback_entry(cfg).init_args.lr == 0.003 and capsys.readouterr().err == ""


def test_optim_does_not_hand_an_sgd_lr_to_an_adaptive_optimizer(capsys):
    cfg = parse_fit_config(["--config", "tiny_sgd.yaml", "--optim", "adamw"])
    assert _callback_entry(cfg).init_args.lr is None  # the module's 3e-3 applies, not SGD's 0.3
    assert "dropped the config's lr=0.3" in capsys.readouterr().err
    cfg = parse_fit_config(["--config", "tiny_sgd.yaml", "--optim", "adamw", "--lr", "0.01"])
    assert _callback_entry(cfg).init_args.lr == 0.01
    cfg = parse_fit_config(["--config", "tiny_came.yaml", "--optim", "sgd"])
    assert _callback_entry(cfg).init_args.lr == 3e-3  # the same as the module's: kept, and said
    err = capsys.readouterr().err
    assert "dropped the config's lr" not in err and "kept lr=0.003" in err and "--lr to set one" in err
    parse_fit_config(["--config", "tiny_came.yaml", "--optim", "sgd", "--lr", "0.1"])
    assert "kept lr" not in capsys.readouterr().err


def test_optim_drops_a_bf16_rounding_the_new_optimizer_does_not_take():
    init = {"optimizer": "adamw_8bit", "bf16_rounding": "nearest", "optimizer_kwargs": None}
    line = switch_optimizer(init, "adamw", 1e-3)
    assert init["bf16_rounding"] is None and "dropped the config's bf16_rounding='nearest'" in line
    LowMemOptimizerCallback(**init)  # builds
    init = {"optimizer": "adamw_8bit", "bf16_rounding": "nearest", "optimizer_kwargs": None}
    assert switch_optimizer(init, "came", 1e-3) is None and init["bf16_rounding"] == "nearest"


def test_step_in_backward_false_drops_the_recipes_bucket_bytes(tmp_path, capsys):
    from lowmem_lightning.cli import RECIPES_DIR

    text = (RECIPES_DIR / "full_finetune_7b.yaml").read_text()
    text = text.replace("        step_in_backward: true\n", "        step_in_backward: true\n        bucket_bytes: 0\n")
    assert "bucket_bytes: 0" in text
    (tmp_path / "recipe.yaml").write_text(text)
    cfg = parse_fit_config(["--config", str(tmp_path / "recipe.yaml")])
    assert _callback_entry(cfg).init_args.bucket_bytes == 0
    cfg = parse_fit_config(["--config", str(tmp_path / "recipe.yaml"), "--step_in_backward", "false"])
    init = _callback_entry(cfg).init_args
    assert (init.step_in_backward, init.bucket_bytes) == (False, None)
    assert "dropped the config's bucket_bytes=0" in capsys.readouterr().err
    LowMemOptimizerCallback(**init.as_dict())  # builds: a bucket size without release would be refused
