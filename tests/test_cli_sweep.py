"""Every refusal of the ``lowmem`` command, swept over the command's own arguments (issue 25, 7).

The arguments come from the parser itself (each ``ActionTypeHint`` of ``fit``, ``validate``, ``test`` and
``predict``), from the signatures of the default model and data classes, and from the keys of the tiny
recipe's ``model.config``; each gets bad values chosen from its type (a negative count, a zero count where
zero means nothing, NaN and negative numbers, a name that is none of the allowed ones, special files and
directories for paths). ``lowmem estimate`` gets its own arguments the same way. Each case runs the installed
``lowmem`` entry point as a real process in an empty directory and must end with exit code 2, one ``error:``
line that names the argument and the value, no traceback, no Lightning chatter before it ("Seed set to",
"GPU available"), and nothing written there.

The full sweep (~130 processes, ~8 s each) is marked slow; the default suite runs :data:`QUICK`, one case
of each kind.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from lowmem_calls import LOWMEM, lowmem_in_process

ENV = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}

BASE = {
    "fit": ["--config", "tiny.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"],
    "validate": ["--config", "tiny.yaml", "--trainer.limit_val_batches", "1"],
    "test": ["--config", "tiny.yaml", "--trainer.limit_test_batches", "1"],
    "predict": ["--config", "tiny.yaml", "--trainer.limit_predict_batches", "1"],
}
"""The command each bad value is added to: a tiny run that would finish in seconds if the value were taken."""

ZERO_ALLOWED = {
    "seed_everything", "trainer.max_epochs", "trainer.min_epochs", "trainer.max_steps", "trainer.min_steps",
    "trainer.limit_train_batches", "trainer.limit_val_batches", "trainer.limit_test_batches",
    "trainer.limit_predict_batches", "trainer.overfit_batches", "trainer.num_sanity_val_steps",
    "trainer.reload_dataloaders_every_n_epochs", "trainer.fast_dev_run", "trainer.gradient_clip_val",
    "trainer.log_every_n_steps",
    "model.weight_decay", "model.warmup_steps", "model.min_lr_ratio", "data.val_fraction", "data.seed",
    "data.num_workers",
}
"""Counts and numbers for which 0 is a meaningful setting (off, none, from the start): not swept with 0."""

NEGATIVE_ONE_ALLOWED = {"trainer.max_epochs", "trainer.max_steps", "trainer.num_sanity_val_steps"}
"""Arguments where -1 is Lightning's documented "no limit" / "all" (they are swept with -7)."""

PATH_FILE = {"data.data_path", "ckpt_path", "config"}
"""Path arguments that name a file to read."""
PATH_DIR = {"model.model_name_or_path", "data.tokenizer"}
"""Path arguments that name a directory to read."""
PATH_OUT = {"trainer.default_root_dir", "model.save_dir"}
"""Path arguments that name a directory to write."""

SKIPPED = {
    "trainer.logger": "a Logger object or a bool; a bad class path is swept as trainer.callbacks",
    "trainer.plugins": "plugin objects; a bad class path is swept as trainer.callbacks",
    "trainer.max_time": "a duration in many spellings, checked by Lightning",
    "trainer.model_registry": "a free-form model name for Lightning's registry upload: any string is valid",
    "model.lora": "a dict checked by the module (tests/test_causal_lm.py sweeps its keys)",
    "model.fp32_state": "name patterns: one that selects no param is warned about, not refused "
                        "(tests/test_state_precision.py)",
    "data.cache_dir": "a cache folder: one that cannot be written is warned about when the cache would be written, "
                      "and the run goes on without it (tests/test_data_cache.py)",
    "model.optimizer_kwargs": "a dict checked by the optimizer (tests/test_callback_optimizers.py)",
    "data.prompt_template": "a template checked by the data module (tests/test_data.py)",
    "data.prompt_template_no_input": "a template checked by the data module (tests/test_data.py)",
}
"""Arguments the sweep does not give a generic bad value, and where they are checked instead."""


def _leaves(hint) -> list:
    """The member types of a (nested) Union / Optional / Literal hint, with Literal values kept whole."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return [leaf for arg in typing.get_args(hint) for leaf in _leaves(arg)]
    return [hint]


def _kinds(hint) -> set[str]:
    """What a hint accepts, in the sweep's words: int, float, bool, str, literal, class, other."""
    kinds = set()
    for leaf in _leaves(hint):
        if typing.get_origin(leaf) is typing.Literal:
            kinds.add("literal")
        elif leaf is bool:
            kinds.add("bool")
        elif leaf is int:
            kinds.add("int")
        elif leaf is float:
            kinds.add("float")
        elif leaf in (str, Path) or getattr(leaf, "__name__", "") == "PathLike":
            kinds.add("str")
        elif leaf is type(None):
            continue
        elif isinstance(leaf, type):
            kinds.add("class")
        else:
            kinds.add("other")
    return kinds


def bad_values(name: str, hint) -> list[str]:
    """Bad command-line values of argument ``name`` (dotted) of type ``hint``, derived from the type."""
    if name in SKIPPED:
        return []
    if name in PATH_FILE | PATH_DIR | PATH_OUT:
        return ["@devnull", "@fifo", "@dir" if name in PATH_FILE else "@file"]
    kinds = _kinds(hint)
    values = []
    if "int" in kinds:
        values.append("-7")
        if name not in ZERO_ALLOWED:
            values.append("0")
    if "float" in kinds:
        values += ["nan"] + ([] if "int" in kinds else ["-1.5"])
    if kinds & {"literal", "str", "class", "other"} and not kinds & {"int", "float"}:
        values.append("bogus")
    if kinds == {"bool"}:
        values.append("maybe")
    return values


def _init_hints(class_path: str) -> dict[str, typing.Any]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(cls.__init__)
    return {p: hints.get(p, str) for p in inspect.signature(cls.__init__).parameters if p != "self"}


def parser_arguments() -> dict[str, dict[str, typing.Any]]:
    """``{subcommand: {dotted argument: type hint}}`` from the ``lowmem`` parser itself, with the model's
    and data module's init args (the parser holds them as one class-path argument each) and the tiny
    recipe's ``model.config`` keys."""
    from lowmem_lightning.cli.app import DEFAULT_DATA, DEFAULT_MODEL, LowMemCLI, _ParseOnlyCLI
    from lowmem_lightning.cli.recipes import resolve_recipe

    class EverySubcommand(_ParseOnlyCLI):
        """Parses without running, with the parser of every subcommand ``lowmem`` has (``_ParseOnlyCLI`` builds
        ``fit``'s alone)."""

        subcommands = staticmethod(LowMemCLI.subcommands)

        def _add_subcommands(self, parser, **kwargs) -> None:
            LowMemCLI._add_subcommands(self, parser, **kwargs)

    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = EverySubcommand(args=["fit", "--config", resolve_recipe("tiny.yaml")], save_config_callback=None)
    finally:
        sys.argv = saved
    out = {}
    for sub, parser in cli.parser._subcommands_action._name_parser_map.items():
        if sub not in BASE:
            continue
        args = {a.dest: a._typehint for a in parser._actions
                if type(a).__name__ == "ActionTypeHint" and a.dest not in ("model", "data")}
        args["config"] = str
        args.update({f"model.{k}": v for k, v in _init_hints(DEFAULT_MODEL).items() if k != "config"})
        args.update({f"data.{k}": v for k, v in _init_hints(DEFAULT_DATA).items()})
        for key in cli.config.fit.model.init_args.config:
            args[f"model.config.{key}"] = int
        out[sub] = args
    return out


def sweep_cases() -> list[tuple[str, str, str]]:
    """``(subcommand, argument, bad value)`` for the sweep: every argument of ``fit``, and the arguments of
    ``validate``/``test``/``predict`` that ``fit`` does not have (the rest are the same parser code)."""
    arguments = parser_arguments()
    cases = [("fit", name, value) for name, hint in arguments["fit"].items() for value in bad_values(name, hint)]
    for sub in ("validate", "test", "predict"):
        for name, hint in arguments[sub].items():
            if name not in arguments["fit"] or name == "ckpt_path":
                cases += [(sub, name, value) for value in bad_values(name, hint)]
    return cases


ESTIMATE_CASES = [
    ("--budget-gb", "-3", "tiny"), ("--budget-gb", "nan", "tiny"), ("--budget-gb", "1e300", "tiny"),
    ("--budget-gb", "0", "tiny"), ("--config", "@devnull", None), ("--config", "@fifo", None),
    ("--config", "@dir", None), ("--model.config.num_attention_heads", "7", "tiny"),
    ("--model.config.hidden_size", "-96", "tiny"), ("--model.model_name_or_path", "@devnull", "qlora_7b"),
    ("--model.model_name_or_path", "@file", "qlora_7b"), ("--model.model_name_or_path", "@emptydir", "qlora_7b"),
    ("--model.model_name_or_path", "@badconfig", "qlora_7b"), ("--optim", "bogus", "tiny"),
    ("--model.torch_dtype", "bogus", "tiny"),
]
"""``lowmem estimate`` arguments with bad values, and the recipe each is added to (its own parser has a handful of
arguments; model files are read as ``lowmem fit`` reads them: a bad one is named)."""

QUICK = [
    ("fit", "trainer.accumulate_grad_batches", "0"),
    ("fit", "model.config.num_attention_heads", "-7"),
    ("fit", "data.data_path", "@devnull"),
]
"""One case of each kind (a count the Trainer refuses, a model dimension, a special file) for the default suite."""

IN_PROCESS = {("fit", "model.config.num_attention_heads", "-7"), ("fit", "data.data_path", "@devnull")}
"""Quick cases that call ``lowmem``'s entry point (``lowmem_lightning.cli:main``) in this process, with the same
contract asserted (exit 2, the one message first, no traceback, nothing written) without an interpreter start-up
and its imports (~5 s) each; the Trainer's count stays a real ``lowmem`` process, as every case of the ``-m slow``
sweep is."""


def _materialize(value: str, where: Path) -> str:
    """``@devnull``, ``@fifo``, ``@dir``, ``@file`` as real special files / folders under ``where``."""
    if value == "@devnull":
        return os.devnull
    if value == "@fifo":
        fifo = where.parent / f"{where.name}-fifo"
        if not fifo.exists():
            os.mkfifo(fifo)
        return str(fifo)
    if value == "@dir":
        folder = where.parent / f"{where.name}-dir"
        folder.mkdir(exist_ok=True)
        return str(folder)
    if value in ("@emptydir", "@badconfig"):
        folder = where.parent / f"{where.name}-model"
        folder.mkdir(exist_ok=True)
        if value == "@badconfig":
            (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # truncated JSON
        return str(folder)
    if value == "@file":
        path = where.parent / f"{where.name}-file.txt"
        path.write_text("not a directory\n")
        return str(path)
    return value


def run_refused(tmp_path: Path, sub: str, args: list[str], in_process=None) -> str:
    """Run ``lowmem SUB ARGS`` in an empty directory, assert the refusal's contract and return its ``error:`` line;
    ``in_process=(capsys, monkeypatch)``: by the entry point in this process instead of a ``lowmem`` process."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if in_process is None:
        proc = subprocess.run([LOWMEM, sub, *args], cwd=cwd, capture_output=True, text=True, timeout=240, env=ENV)
    else:
        proc = lowmem_in_process(*in_process, cwd, sub, *args, columns=ENV["COLUMNS"])
    shown = f"$ lowmem {sub} {' '.join(args)}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stderr + proc.stdout, shown
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, shown
    assert lines[0] == errors[0], shown  # nothing before the message: no "Seed set to", no "GPU available"
    assert all(line.startswith("(") for line in lines[1:]), shown  # at most a hint in parentheses after it
    left = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    assert left == [], (left, shown)
    return errors[0]


def _assert_named(message: str, name: str, value: str, given: str) -> None:
    """The message names the argument (its last dotted part, as the module / Trainer spells it) and the value."""
    key = name.rsplit(".", 1)[-1].lstrip("-").replace("-", "_")
    assert key in message.replace("-", "_"), (key, message)
    if value == "nan":
        assert "nan" in message.lower(), message
    elif value.startswith("@"):
        assert given in message or Path(given).name in message, (given, message)
        assert "no such file" not in message and "not found" not in message and "does not exist" not in message, (
            f"{given} exists: the message must say what it is, not that it is missing: {message}")
    else:
        assert value in message or _spelled_as_number(value, message), (value, message)


def _spelled_as_number(value: str, message: str) -> bool:
    """Whether the message shows the numeric ``value`` in another spelling (``-1.5``, ``1e+300``)."""
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and (str(number) in message or f"{number:g}" in message)


def _case_id(value) -> str | None:
    """A test id part: the argument or value without leading dashes (``None``: pytest's own id)."""
    return None if value is None else str(value).lstrip("-")


def _run_case(tmp_path: Path, sub: str, name: str, value: str, in_process=None) -> None:
    given = _materialize(value, tmp_path / name.replace(".", "_"))
    message = run_refused(tmp_path, sub, [*BASE[sub], f"--{name}", given], in_process)
    _assert_named(message, name, value, given)


@pytest.mark.parametrize(("sub", "name", "value"), QUICK, ids=_case_id)
def test_refusal_quick(tmp_path, sub, name, value, capsys, monkeypatch):
    _run_case(tmp_path, sub, name, value, (capsys, monkeypatch) if (sub, name, value) in IN_PROCESS else None)


def test_estimate_names_the_model_directory_argument_as_fit_does(tmp_path, capsys, monkeypatch):
    """``lowmem estimate`` checks the model's arguments as ``lowmem fit`` does before it reads a file: a special file
    given as the NF4 recipe's model directory is refused naming ``model_name_or_path`` (it said "Model directory
    /dev/null is not a directory", from the NF4 header check, without the argument)."""
    given = _materialize("@devnull", tmp_path / "model")
    message = run_refused(tmp_path, "estimate", ["--config", "qlora_7b.yaml", "--model.model_name_or_path", given],
                          (capsys, monkeypatch))
    _assert_named(message, "--model.model_name_or_path", "@devnull", given)


def test_the_sweep_covers_every_argument():
    """Every argument the parser knows is swept or listed in SKIPPED with where it is checked."""
    arguments = parser_arguments()
    covered = {name for _, name, _ in sweep_cases()}
    for sub, args in arguments.items():
        missing = [name for name, hint in args.items() if name not in covered and name not in SKIPPED
                   and (sub == "fit" or name not in arguments["fit"])]
        assert missing == [], (sub, missing)
    assert {case for case in QUICK} <= set(sweep_cases())


@pytest.mark.slow
@pytest.mark.parametrize(("sub", "name", "value"), sweep_cases(), ids=_case_id)
def test_refusal_sweep(tmp_path, sub, name, value):
    _run_case(tmp_path, sub, name, value)


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "value", "recipe"), ESTIMATE_CASES, ids=_case_id)
def test_estimate_refusal_sweep(tmp_path, flag, value, recipe):
    given = _materialize(value, tmp_path / flag.strip("-").replace(".", "_"))
    config = ["--config", f"{recipe}.yaml"] if recipe else []
    message = run_refused(tmp_path, "estimate", [*config, flag, given])
    if value in ("@emptydir", "@badconfig"):  # the message names the file inside the model directory
        assert "config.json" in message and given in message, message
        assert "Traceback" not in message
    else:
        _assert_named(message, flag, value, given)
