"""The ``lowmem`` command's LightningCLI: parser, config fix-ups (``--optim``, recipes, paths) and the
entry point :func:`main`; see :mod:`lowmem_lightning.cli` for what the command does."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lowmem_lightning.callbacks.checkpoint_io import CheckpointWriteError, use_atomic_checkpoint_io
from lowmem_lightning.callbacks.progress import StepsAwareRichProgressBar
from lowmem_lightning.cli.checks import ckpt_path_problem, new_paths, output_dirs, remove_new_paths, unwritable
from lowmem_lightning.cli.last import checkpoint_dirs, newest_checkpoint
from lowmem_lightning.cli.quiet import quiet_known_noise
from lowmem_lightning.cli.resume import UNSET, checkpoint_problem, is_file_path, model_differences, saved_config_next_to
from lowmem_lightning.cli.switch import switch_optimizer
from lowmem_lightning.cli.versions import claim_version_dirs
from lowmem_lightning.optim.registry import available_optimizers

__all__ = ["LowMemCLI", "main", "parse_fit_config", "RECIPES_DIR", "bundled_recipes", "resolve_recipe",
           "DEFAULT_MODEL", "DEFAULT_DATA"]

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
"""The recipes shipped in the package (a link to the repository's ``configs/`` in a source checkout)."""

DEFAULT_MODEL = "lowmem_lightning.modules.causal_lm.CausalLMModule"
"""``class_path`` of the model when a config names none."""

DEFAULT_DATA = "lowmem_lightning.data.text.TextDataModule"
"""``class_path`` of the data module when a config names none."""

OPTIMIZER_CALLBACK = "lowmem_lightning.callbacks.optimizer.LowMemOptimizerCallback"
"""``class_path`` of the callback that ``--optim`` adds or overrides."""

SUBCOMMANDS = ("fit", "validate", "test", "predict")
SIGTERM_EXIT_CODE = 128 + 15
"""Exit code of a run stopped by SIGTERM (the shell's convention), so a scheduler sees it did not finish."""
PATH_KEYS = (("model", "model_name_or_path"), ("data", "data_path"), ("data", "tokenizer"))

DESCRIPTION = (
    "Train with PyTorch Lightning on far less memory. 'lowmem SUBCOMMAND --help' lists the options "
    "of each subcommand; --config takes a YAML file or a bundled recipe by name: {recipes}."
)

SUBCOMMAND_HELP = {
    "fit": "Train: the recipe's model, data and optimizer; summary and plot at the end.",
    "validate": "Run one evaluation pass over the validation set.",
    "test": "Run one evaluation pass over the test set.",
    "predict": "Run inference over the predict set and return the predictions.",
    "estimate": "Memory a recipe needs with each optimizer (model built on the meta device, no weights read).",
}
"""One-line help of each subcommand in ``lowmem --help`` (whole sentences, not cut docstrings)."""


def bundled_recipes() -> list[str]:
    """File names of the bundled YAML recipes, sorted."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(value: str) -> str:
    """A ``--config`` value as a path: an existing file as given, else the bundled recipe of that name
    (``tiny``, ``tiny.yaml``); ``ValueError`` naming the value and listing the bundled recipes."""
    if Path(value).expanduser().is_file():
        return value
    name = Path(value).name
    for candidate in (RECIPES_DIR / name, RECIPES_DIR / f"{name}.yaml"):
        if candidate.is_file() and Path(value).parent in (Path("."), Path("configs")):
            return str(candidate)
    raise ValueError(
        f"Config file {value!r} not found (not a file from {Path.cwd()}, not a bundled recipe). "
        f"Bundled recipes: {', '.join(bundled_recipes()) or 'none'}."
    )


def _resolve_config_args(argv: list[str]) -> list[str]:
    """Replace every ``--config``/``-c`` value in ``argv`` by :func:`resolve_recipe`'s path."""
    out = []
    take_next = False
    for arg in argv:
        if take_next:
            out.append(resolve_recipe(arg))
            take_next = False
        elif arg in ("--config", "-c"):
            out.append(arg)
            take_next = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_recipe(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def _class_in_args(args: list[str], key: str) -> str | None:
    """The class given for ``key`` (``model``/``data``) on the command line, if any."""
    for i, arg in enumerate(args):
        if arg in (f"--{key}", f"--{key}.class_path") and i + 1 < len(args):
            return args[i + 1]
        for prefix in (f"--{key}=", f"--{key}.class_path="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
    return None


def _class_in_configs(args: list[str], subcommand: str, key: str) -> str | None:
    """The class given for ``key`` in the ``--config`` files of ``args`` (the last one wins)."""
    import yaml

    found = None
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, dict):
            continue
        for scope in (data, data.get(subcommand)):
            value = scope.get(key) if isinstance(scope, dict) else None
            if isinstance(value, str):
                found = value
            elif isinstance(value, dict) and isinstance(value.get("class_path"), str):
                found = value["class_path"]
    return found


def _with_default_classes(args: list[str]) -> list[str]:
    """Insert ``--model CausalLMModule`` (and ``--data TextDataModule`` for it) right after the
    subcommand when neither the command line nor a config file names a class.

    Defaults are injected this way, not as parser defaults, so the default class's argument values
    never leak into a user's class of the same argument names.
    """
    if not args or args[0] not in SUBCOMMANDS or any(a in ("-h", "--help") for a in args):
        return args
    sub, rest = args[0], args[1:]
    model = _class_in_args(rest, "model") or _class_in_configs(rest, sub, "model")
    data = _class_in_args(rest, "data") or _class_in_configs(rest, sub, "data")
    extra = []
    if model is None:
        extra += ["--model", DEFAULT_MODEL]
        model = DEFAULT_MODEL
    if data is None and model.rsplit(".", 1)[-1] == "CausalLMModule":
        extra += ["--data", DEFAULT_DATA]
    return [sub, *extra, *rest]


def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _is_optimizer_callback(entry: Any) -> bool:
    class_path = entry.get("class_path") if isinstance(entry, (dict, Namespace)) else None
    if not isinstance(class_path, str):
        return False
    cls = _import_class(class_path)
    target = _import_class(OPTIMIZER_CALLBACK)
    return cls is not None and target is not None and isinstance(cls, type) and issubclass(cls, target)


def _optimizer_entries(cfg: Namespace) -> list:
    """The LowMemOptimizerCallback entries of a parsed config's ``trainer.callbacks``."""
    callbacks = cfg.trainer.get("callbacks") or []
    return [c for c in (callbacks if isinstance(callbacks, list) else [callbacks]) if _is_optimizer_callback(c)]


def _flag_given(args: list[str], group: str, key: str) -> bool:
    """Whether ``--GROUP.KEY`` (or ``--GROUP.init_args.KEY``) is on the command line ``args``."""
    names = (f"--{group}.{key}", f"--{group}.init_args.{key}")
    return any(arg in names or arg.startswith(tuple(n + "=" for n in names)) for arg in args)


def _notice(message: str | None) -> None:
    """One line on stderr saying what the command changed in the config (``None``: nothing)."""
    if message:
        sys.stderr.write(f"lowmem: {message}\n")


def _configs_have_optimizer_callback(args: list[str]) -> bool:
    """Whether a ``--config`` file of ``args`` lists a LowMemOptimizerCallback in ``trainer.callbacks``."""
    import yaml

    sub = args[0] if args else "fit"
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        try:
            data = yaml.safe_load(Path(path).read_text()) if path else None
        except (OSError, yaml.YAMLError):
            continue
        for scope in (data, (data or {}).get(sub)) if isinstance(data, dict) else ():
            trainer = scope.get("trainer") if isinstance(scope, dict) else None
            callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
            entries = callbacks if isinstance(callbacks, list) else [callbacks]
            if any(_is_optimizer_callback(e) for e in entries if isinstance(e, dict)):
                return True
    return False


def _model_optimizer_as_optim(args: list[str]) -> list[str]:
    """``--model.optimizer NAME`` -> ``--optim NAME`` when a config's LowMemOptimizerCallback would
    replace the module's optimizer and ``--optim`` is not given; one line says so."""
    names = ("--model.optimizer", "--model.init_args.optimizer")
    if any(a == "--optim" or a.startswith("--optim=") for a in args) or not _configs_have_optimizer_callback(args):
        return args
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg in names and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith(tuple(n + "=" for n in names)):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        _notice(f"--model.optimizer {value} is applied as --optim {value}: the LowMemOptimizerCallback in "
                "trainer.callbacks replaces the module's optimizer.")
        out += ["--optim", value]
    return out


def _init_args(entry: Namespace) -> Namespace:
    if entry.get("init_args") is None:
        entry["init_args"] = Namespace()
    return entry["init_args"]


class LowMemArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one short message (no 90-line usage dump), exit code 2."""

    def error(self, message: str, ex: Exception | None = None):
        """Print ``PROG: error: MESSAGE`` and a hint to ``--help``, then exit with code 2."""
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {condense_message(message)}\n(all options: {prog} --help)\n")
        self.exit(2)


_NOISE = re.compile(
    r"Does not validate against any of the Union subtypes|^\s*Subtypes:|^\s*Errors:\s*$|"
    r"Expected a <class 'NoneType'>|^\s*Given value( type)?:|Expected a path but .* not accessible or invalid"
)


def condense_message(message: str) -> str:
    """jsonargparse's nested Union error reports as one line: the innermost problems only."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not _NOISE.search(line)]
    text = " ".join(kept) if kept else message.strip()
    text = re.sub(r"Expected an? <class '([\w.]+)'>", r"Expected \1", text)
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    return text + _allowed_keys_hint(text)


def _init_arg_names(cls: type) -> list[str]:
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _allowed_keys_hint(text: str) -> str:
    """For an unknown key, the accepted keys of that class (or the closest Trainer arguments)."""
    unknown = re.search(r"Option '([\w.]+)' is not accepted|does not accept option '([\w.]+)'", text)
    if unknown is None:
        return ""
    key = unknown.group(1) or unknown.group(2)
    owner = re.findall(r"class_path '([\w.]+)'", text)
    if owner and (cls := _import_class(owner[-1])) is not None:
        return f" Accepted by {owner[-1].rsplit('.', 1)[-1]}: {', '.join(_init_arg_names(cls))}."
    if key.startswith("trainer."):
        from lightning.pytorch import Trainer

        close = difflib.get_close_matches(key.split(".", 1)[1], _init_arg_names(Trainer), n=3)
        return f" Did you mean: {', '.join('trainer.' + c for c in close)}?" if close else ""
    return ""


class LowMemCLI(LightningCLI):
    """LightningCLI for lowmem-lightning: any LightningModule / LightningDataModule by ``class_path``
    (default ``CausalLMModule`` / ``TextDataModule``), optimizer through ``LowMemOptimizerCallback``
    (``--optim``/``--lr`` shortcut), rich progress bar by default, config errors as short messages.

    Keyword arguments go to ``LightningCLI``; ``model_class``/``datamodule_class`` default to any
    subclass of ``LightningModule``/``LightningDataModule``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", LowMemArgumentParser)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", "lowmem")
        parser_kwargs.setdefault("description", DESCRIPTION.format(recipes=", ".join(bundled_recipes()) or "none"))
        for name in SUBCOMMANDS:
            parser_kwargs.setdefault(name, {}).setdefault("description", SUBCOMMAND_HELP[name])
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    _cli_args: list[str] = []

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse like LightningCLI; a ``--model.optimizer NAME`` on the command line of a config whose
        ``trainer.callbacks`` has a LowMemOptimizerCallback (which replaces the module's optimizer) is
        applied as ``--optim NAME``, said in one line. ``main`` passes the (resolved) arguments and keeps
        the user's command line in ``sys.argv`` for Lightning's DDP launcher; the parse reads ``args`` only
        (so LightningCLI does not warn that both were given)."""
        if isinstance(args, (list, tuple)):
            args = _model_optimizer_as_optim(list(args))
            self._cli_args = list(args)
        saved_argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = saved_argv

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path FILE`` checked before anything is built (:mod:`~lowmem_lightning.cli.resume`): a bad
        file, or a checkpoint saved from another model, ends with one message naming the file and what is
        wrong (exit 2). Unlike LightningCLI, the checkpoint's hyperparameters replace the run's model init args
        only with ``--model_from_ckpt true``, and never an explicit ``--model.*`` flag."""
        sub = self.config.get("subcommand")
        if not sub or not self.check_weights:
            return
        cfg = self.config[sub]
        ckpt_path = cfg.get("ckpt_path")
        if not is_file_path(ckpt_path):
            if cfg.get("model_from_ckpt"):
                self._error(f"ckpt_path={ckpt_path!r} names no file, but --model_from_ckpt true takes the model "
                            "from the checkpoint file given as --ckpt_path FILE: give the checkpoint's path.")
            return
        problem, checkpoint = checkpoint_problem(ckpt_path)
        if problem:
            self._error(problem)
        if checkpoint is not None:
            self._match_checkpoint_model(cfg, ckpt_path, checkpoint.get("hyper_parameters"))

    def _explicit_model_flag(self, key: str) -> bool:
        """Whether the command line gives model init arg ``key`` (dotted: ``config.hidden_size``) or a
        dict that holds it (``--model.config``)."""
        parts = key.split(".")
        return any(_flag_given(self._cli_args, "model", ".".join(parts[:n])) for n in range(1, len(parts) + 1))

    def _match_checkpoint_model(self, cfg: Namespace, ckpt_path: str, saved: Any) -> None:
        """Refuse a checkpoint whose saved model init args differ from the run's (naming the keys), or with
        ``--model_from_ckpt true`` take them, refusing an explicit ``--model.*`` that contradicts them."""
        init = self._init(cfg, "model")
        if not isinstance(saved, dict) or not saved or init is None:
            return
        _type_model_config(cfg)
        self._resolve_relative_paths(cfg)
        diffs = model_differences(_real_paths(saved), _real_paths(init.as_dict()))
        if not diffs:
            return
        listing = _listing(diffs)
        if not cfg.get("model_from_ckpt"):
            config = saved_config_next_to(ckpt_path)
            also = f", or run with --config {config} (the config saved with that run)" if config else ""
            self._error(f"ckpt_path={ckpt_path!r} was saved from a different model than this run's: {listing}. "
                        f"To resume with the checkpoint's model, add --model_from_ckpt true{also}; to keep this "
                        "run's model, start without --ckpt_path.")
        explicit = [(key, a, b) for key, a, b in diffs if self._explicit_model_flag(key)]
        if explicit:
            key, a, b = explicit[0]
            self._error(f"ckpt_path={ckpt_path!r}: --model.{key} {_shown(b)} on the command line contradicts the "
                        f"checkpoint's model.{key}={_shown(a)} (--model_from_ckpt true takes the model from the "
                        "checkpoint): drop one of the two.")
        for top in dict.fromkeys(key.split(".", 1)[0] for key, _, _ in diffs):
            init[top] = saved[top]
        _notice(f"--model_from_ckpt: {', '.join(f'model.{key}={_shown(a)}' for key, a, _ in diffs)} taken from "
                f"{ckpt_path}.")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's subcommands, and ``estimate`` listed with them (``main`` runs it before
        LightningCLI, so this parser only documents it)."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        if action is None:
            return
        if "estimate" not in action.choices:
            estimate = LowMemArgumentParser(prog="lowmem estimate", description=SUBCOMMAND_HELP["estimate"])
            action.add_subcommand("estimate", estimate, help=SUBCOMMAND_HELP["estimate"])
        for choice in getattr(action, "_choices_actions", []):  # LightningCLI cuts docstrings mid-sentence
            if choice.dest in SUBCOMMAND_HELP:
                choice.help = SUBCOMMAND_HELP[choice.dest]

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Trainer, model (required) and data (optional: a model may bring its own dataloaders)."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(
            self._datamodule_class, "data", subclass_mode=self.subclass_mode_data, required=False
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``--optim``/``--lr``/``--step_in_backward`` shortcuts."""
        names = ", ".join(available_optimizers())
        parser.add_argument(
            "--optim", type=str | None, default=None,
            help=f"Optimizer of the LowMemOptimizerCallback in trainer.callbacks (added if the config has none). "
            f"One of: {names}. The config's lr and LR schedule are kept (--lr to change the lr; a callback lr "
            "written for sgd is not given to an adaptive optimizer, nor the reverse); the config's "
            "optimizer_kwargs that the new optimizer does not take are dropped (said in one line); adafactor "
            "gets relative_step: false, scale_parameter: false when the run has an lr, so that lr drives it. "
            "--model.optimizer NAME with such a callback means the same. "
            "Its other arguments: --trainer.callbacks.help LowMemOptimizerCallback.",
        )
        parser.add_argument(
            "--lr", type=float | None, default=None,
            help="Learning rate of the LowMemOptimizerCallback (with --optim, or overriding the config's callback). "
            "A --model.lr given on the command line also sets the callback's lr when the config gives the callback "
            "one (said in one line).",
        )
        parser.add_argument(
            "--model_from_ckpt", type=bool, default=False,
            help="With --ckpt_path FILE: take the model's init args (config, model_name_or_path, quantize, lora, ...; "
            "not lr or other training settings) from the checkpoint's saved hyperparameters. Without it, a checkpoint "
            "saved from a model whose init args differ from this run's is refused, naming the differing keys. An "
            "explicit --model.* flag that contradicts the checkpoint is refused either way.",
        )
        parser.add_argument(
            "--step_in_backward", type=bool | None, default=None,
            help="Gradient release: the LowMemOptimizerCallback updates each tensor inside backward and frees its "
            "gradient (no gradient buffer). With --optim, or overriding the config's callback.",
        )

    # ------------------------------------------------------------------ config fix-ups
    def _subconfig(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Apply ``--optim``/``--lr``/``--step_in_backward``, check optimizer names, and resolve
        recipe-relative paths."""
        cfg = self._subconfig()
        self._apply_optim_shortcut(cfg)
        self._check_optimizer_callbacks(cfg)
        self._resolve_relative_paths(cfg)
        self._link_tokenizer(cfg)
        if self.check_weights:
            self._check_not_architecture_only(cfg)
        _type_model_config(cfg)
        self._check_run_inputs(cfg)

    def _check_run_inputs(self, cfg: Namespace) -> None:
        """A missing ``--ckpt_path`` or an unwritable output directory: exit 2 before anything is built."""
        if not self.check_weights:  # parse-only (lowmem estimate): no run, nothing to check
            return
        problem = ckpt_path_problem(cfg.get("ckpt_path"))
        for name, path in output_dirs(cfg):
            problem = problem or unwritable(name, path)
        if problem:
            self._error(problem)

    check_weights = True
    """Refuse to run a bundled architecture-only folder (``llama-2-7b/``) as a checkpoint."""

    @staticmethod
    def _init(cfg: Namespace, group: str) -> Namespace | None:
        init = (cfg.get(group) or Namespace()).get("init_args")
        return init if isinstance(init, Namespace) else None

    def _link_tokenizer(self, cfg: Namespace) -> None:
        """``data.tokenizer: model`` means the tokenizer of ``model.model_name_or_path``."""
        data, model = self._init(cfg, "data"), self._init(cfg, "model")
        if data is None or data.get("tokenizer") != "model":
            return
        path = model.get("model_name_or_path") if model is not None else None
        if not isinstance(path, str):
            self._error(
                "data.tokenizer='model' takes the tokenizer of model.model_name_or_path, which is not set; "
                "set --model.model_name_or_path DIR or --data.tokenizer (byte, or a tokenizer directory)."
            )
        data["tokenizer"] = path

    def _check_not_architecture_only(self, cfg: Namespace) -> None:
        model = self._init(cfg, "model")
        path = model.get("model_name_or_path") if model is not None else None
        if not isinstance(path, str) or not RECIPES_DIR.is_dir():
            return
        with contextlib.suppress(OSError, ValueError):
            if Path(path).resolve().is_relative_to(RECIPES_DIR.resolve()):
                self._error(
                    f"model.model_name_or_path={path!r} is an architecture-only folder shipped with the recipes "
                    "(config.json, no weights): set --model.model_name_or_path /path/to/your/checkpoint "
                    "(a local Hugging Face directory with config.json + safetensors). 'lowmem estimate' "
                    "works without it."
                )

    def _apply_optim_shortcut(self, cfg: Namespace) -> None:
        name, lr, release = cfg.get("optim"), cfg.get("lr"), cfg.get("step_in_backward")
        if name is None and lr is None and release is None:
            self._apply_model_lr(cfg, _optimizer_entries(cfg))
            return
        callbacks = cfg.trainer.get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        targets = [c for c in callbacks if _is_optimizer_callback(c)]
        if not targets:
            if name is None:
                flag = "--lr" if lr is not None else "--step_in_backward"
                self._error(
                    f"{flag} needs --optim NAME or a LowMemOptimizerCallback in trainer.callbacks "
                    f"(optimizers: {', '.join(available_optimizers())})."
                )
            entry = Namespace(class_path=OPTIMIZER_CALLBACK, init_args=Namespace())
            callbacks.append(entry)
            targets = [entry]
        model_lr = (self._init(cfg, "model") or Namespace()).get("lr")
        for entry in targets:
            init = _init_args(entry)
            if lr is not None:
                init["lr"] = lr
            if release is not None:
                init["step_in_backward"] = release
            if name is not None and name in available_optimizers():
                run_lr = init.get("lr") if init.get("lr") is not None else model_lr
                _notice(switch_optimizer(
                    init, name, _number(run_lr), lr_given=lr is not None, module_lr=_number(model_lr)))
            elif name is not None:
                init["optimizer"] = name  # refused with the list of names by _check_optimizer_callbacks
        cfg.trainer["callbacks"] = callbacks
        if lr is None:
            self._apply_model_lr(cfg, targets)

    def _apply_model_lr(self, cfg: Namespace, targets: list) -> None:
        """``--model.lr V`` on the command line (no ``--lr``): the explicit value wins over an lr the
        config gives the LowMemOptimizerCallback (whose lr would replace the module's), said in one line."""
        model = self._init(cfg, "model")
        value = model.get("lr") if model is not None else None
        if not _flag_given(self._cli_args, "model", "lr") or not isinstance(value, (int, float)):
            return
        for entry in targets:
            init = _init_args(entry)
            if init.get("lr") is not None and float(init["lr"]) != float(value):
                _notice(f"--model.lr {value:g} also sets the LowMemOptimizerCallback's lr (the config's "
                        f"{float(init['lr']):g} would replace the module's lr).")
                init["lr"] = float(value)

    def _check_optimizer_callbacks(self, cfg: Namespace) -> None:
        callbacks = cfg.trainer.get("callbacks") or []
        for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
            if not _is_optimizer_callback(entry):
                continue
            name = _init_args(entry).get("optimizer", "adamw_8bit")
            if name not in available_optimizers():
                self._error(f"Unknown optimizer {name!r}: expected one of {', '.join(available_optimizers())}.")

    def _config_dirs(self, cfg: Namespace) -> list[Path]:
        paths = cfg.get("config") or []
        dirs = []
        for path in reversed(paths if isinstance(paths, list) else [paths]):
            with contextlib.suppress(TypeError, ValueError):
                dirs.append(Path(getattr(path, "absolute", None) or str(path)).resolve().parent)
        return dirs

    def _resolve_relative_paths(self, cfg: Namespace) -> None:
        dirs = self._config_dirs(cfg)
        for group, key in PATH_KEYS:
            init = self._init(cfg, group)
            value = init.get(key) if init is not None else None
            if not isinstance(value, str) or not value or Path(value).is_absolute() or Path(value).exists():
                continue
            for folder in dirs:
                if (folder / value).exists():
                    init[key] = str(folder / value)
                    break

    # ------------------------------------------------------------------ instantiation
    def _error(self, message: str) -> None:
        sub = getattr(self, "subcommand", None) or (getattr(self, "config", None) or Namespace()).get("subcommand")
        parser = self._parser(sub) if sub else self.parser
        parser.error(message)

    def instantiate_classes(self) -> None:
        """Instantiate model, data, callbacks and trainer; a ``ValueError``/``TypeError`` raised by a
        constructor (invalid argument) or Lightning's ``MisconfigurationException`` becomes a short error
        message and exit code 2."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            self._error(_short(err))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Check the data module's inputs (``check_inputs()``, when it has one: files read, tokenized,
        checked) before the Trainer and its loggers exist, then build the Trainer."""
        check = getattr(getattr(self, "datamodule", None), "check_inputs", None)
        if callable(check):
            check()
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ fit
    def before_fit(self) -> None:
        """Refusals that need the built Trainer and module, made before ``fit`` writes anything (gradient
        release that cannot hold: exit 2, one message); ``--ckpt_path last`` resolved to the newest
        checkpoint of the run's ModelCheckpoint directories (:mod:`~lowmem_lightning.cli.last`)."""
        from lowmem_lightning.callbacks.optimizer import LowMemOptimizerCallback
        from lowmem_lightning.callbacks.release import release_refusal

        for callback in self.trainer.callbacks:
            if isinstance(callback, LowMemOptimizerCallback) and callback.step_in_backward:
                reason = release_refusal(self.trainer, self.model)
                if reason is not None:
                    self._error(f"LowMemOptimizerCallback(step_in_backward=True) cannot run: {reason}.")
        if self.config_init["fit"].get("ckpt_path") == "last":
            self.config_init["fit"]["ckpt_path"] = self._resolve_last()
            self._check_resolved(self.config_init["fit"]["ckpt_path"])

    def _check_resolved(self, path: str | None) -> None:
        """The checkpoint ``--ckpt_path last`` chose, checked like a ``--ckpt_path FILE`` (the model is
        built already, so a checkpoint of another model is refused, naming how to resume it explicitly)."""
        if path is None:
            return
        problem, checkpoint = checkpoint_problem(path)
        if problem:
            self._error(f"ckpt_path='last' chose {path}, which cannot be resumed: {problem}")
        saved = checkpoint.get("hyper_parameters") if checkpoint is not None else None
        init = self._init(self.config["fit"], "model")
        diffs = (model_differences(_real_paths(saved), _real_paths(init.as_dict()))
                 if isinstance(saved, dict) and init is not None else [])
        if diffs:
            self._error(f"ckpt_path='last' chose {path}, saved from a different model than this run's: "
                        f"{_listing(diffs)}. "
                        f"Resume it with --ckpt_path {path} --model_from_ckpt true, or log this run elsewhere "
                        "(another trainer.logger name) to start fresh.")

    def _resolve_last(self) -> str | None:
        dirs = checkpoint_dirs(self.trainer)
        if not dirs:
            self._error(
                "ckpt_path='last' resumes from the run's ModelCheckpoint directory, but this run has no "
                "ModelCheckpoint (trainer.enable_checkpointing is false), so nothing is saved to resume from: add a "
                "ModelCheckpoint to trainer.callbacks (README: Resume and preemption) or drop --ckpt_path."
            )
        found, count = newest_checkpoint(dirs)
        where = " or ".join(os.path.relpath(d) if not os.path.isabs(d) else d for d in dirs)
        if found is None:
            _notice(f"--ckpt_path last: no checkpoint yet in {where}; starting a fresh run "
                    "(the same command resumes from the newest checkpoint once one is saved).")
            return None
        _notice(f"--ckpt_path last: resuming from {found.path} (step {found.step}, the newest of {count} "
                f"checkpoint{'s' if count > 1 else ''} in {where}).")
        return found.path

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand in a logger version folder of its own (claimed atomically:
        :mod:`~lowmem_lightning.cli.versions`); for ``fit``, a ``ValueError``/``TypeError``/
        ``MisconfigurationException`` raised before the first sanity-check or training step (a refusal:
        optimizer, precision, strategy, checkpoint) ends with one message and exit code 2, and the
        directories the run created are removed (when they hold only the config and the logger's first
        files). ``LOWMEM_TRACEBACK=1`` re-raises."""
        claimed = claim_version_dirs(self.trainer)  # runs started together never share a version folder
        if subcommand != "fit":
            try:
                return super()._run_subcommand(subcommand)
            except BaseException:
                remove_new_paths([outer for _, outer in claimed])
                raise
        created = new_paths(self._run_paths())
        created += [outer for _, outer in claimed if outer not in created]
        started = _TrainingStarted()
        self.trainer.callbacks.append(started)
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, TypeError, MisconfigurationException) as err:
            if started.started or os.environ.get("LOWMEM_TRACEBACK"):
                raise
            remove_new_paths(created)
            sys.stderr.write(f"lowmem fit: error: {_short(err)}\n(nothing was trained or written; "
                             "LOWMEM_TRACEBACK=1 shows where it was raised)\n")
            raise SystemExit(2) from None
        except SystemExit:  # a refusal in before_fit (exit 2): the claimed version folder is not left behind
            if not started.started:
                remove_new_paths(created)
            raise
        return None

    def _run_paths(self) -> list[str]:
        """Every directory the fit may create: the root, each logger's directories, checkpoint dirs."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        trainer = self.trainer
        paths = [trainer.default_root_dir]
        for logger in trainer.loggers:
            for attr in ("save_dir", "root_dir", "log_dir"):
                with contextlib.suppress(Exception):
                    paths.append(getattr(logger, attr))
        paths += [c.dirpath for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
        paths.append(getattr(self.model, "save_dir", None))
        return [str(p) for p in paths if isinstance(p, (str, os.PathLike)) and "://" not in str(p)]

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        has_bar = any(isinstance(c, ProgressBar) for c in [*listed, *callbacks])
        if not has_bar and config.get("enable_progress_bar", True) is not False:
            callbacks = [*callbacks, StepsAwareRichProgressBar()]
        trainer = super()._instantiate_trainer(config, callbacks)
        use_atomic_checkpoint_io(trainer)  # checkpoints complete or absent, a full disk named (issue 25)
        return trainer


class _TrainingStarted(L.Callback):
    """Records that a fit got past its set-up: the sanity check or training began (the CLI's refusal
    handling applies only before that)."""

    started = False

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        """The sanity check begins: the fit is past its set-up."""
        self.started = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Training begins: the fit is past its set-up."""
        self.started = True


_LITERALS = {"true": True, "false": False, "null": None, "none": None}


def _typed(value: Any) -> Any:
    """A command-line string as the number / bool / None it spells (``'64'`` -> 64, ``'1e-5'`` ->
    1e-05, ``'true'`` -> True); any other value unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.lower() in _LITERALS:
        return _LITERALS[text.lower()]
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return value


def _type_model_config(cfg: Namespace) -> None:
    """``--model.config.hidden_size 64`` arrives as the string ``'64'`` (the argument is a dict):
    give such values the types a YAML recipe gives them (int, float, bool, None)."""
    init = (cfg.get("model") or Namespace()).get("init_args")
    config = init.get("config") if isinstance(init, Namespace) else None
    if isinstance(config, dict):
        init["config"] = {key: _typed(value) for key, value in config.items()}


class _ParseOnlyCLI(LowMemCLI):
    """Parses and fixes up a ``fit`` config like ``lowmem fit`` would, and instantiates nothing."""

    check_weights = False

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_fit_config(args: list[str]) -> Namespace:
    """The ``fit`` section of the config ``lowmem fit ARGS`` would run (defaults filled, ``--optim``
    applied, recipe-relative paths resolved), without building anything."""
    argv = _with_default_classes(["fit", *_resolve_config_args(args)])
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return _ParseOnlyCLI(args=argv, save_config_callback=None).config.fit
    finally:
        sys.argv = saved_argv


def _short(err: BaseException) -> str:
    """The innermost message of an exception chain (what the constructor said), one paragraph."""
    while err.__cause__ is not None and isinstance(err.__cause__, (ValueError, TypeError)):
        err = err.__cause__
    text = str(err).strip()
    return text if text else type(err).__name__


def _real_paths(init_args: dict) -> dict:
    """``init_args`` with each path of :data:`PATH_KEYS` of the model that exists as its resolved absolute path
    (a checkpoint saved from another directory names the same weights)."""
    out = dict(init_args)
    for group, key in PATH_KEYS:
        value = out.get(key) if group == "model" else None
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def _listing(diffs: list) -> str:
    """``(key, checkpoint value, run value)`` triples as one clause each, joined by semicolons."""
    return "; ".join(f"model.{key}={_shown(a)} in the checkpoint, {_shown(b)} in this run" for key, a, b in diffs)


def _shown(value: Any) -> str:
    """A config value as a message shows it (``'unset'`` for a key one side lacks)."""
    return "unset" if value is UNSET else repr(value) if isinstance(value, str) else str(value)


def _usage_error(message: str) -> int:
    sys.stderr.write(f"lowmem: error: {message}\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowmem`` console script; returns the exit code (2 for bad input)."""
    quiet_known_noise()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return _usage_error("expected a subcommand: fit, validate, test, predict or estimate (see lowmem --help).")
    if args[0] == "estimate":
        from lowmem_lightning.cli.estimate import estimate_main

        try:
            return estimate_main(args[1:])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        args = _with_default_classes(_resolve_config_args(args))
    except ValueError as err:
        return _usage_error(str(err))
    saved_argv = sys.argv
    # the command line as given: Lightning's DDP launcher re-runs sys.argv for ranks > 0
    sys.argv = [saved_argv[0] if saved_argv else "lowmem", *(saved_argv[1:] if argv is None else argv)]
    try:
        LowMemCLI(args=args)
    except SIGTERMException:
        return SIGTERM_EXIT_CODE
    except CheckpointWriteError as err:  # a full / read-only checkpoint directory: one message, exit 2
        sys.stderr.write(f"lowmem: error: {err}\n")
        return 2
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
