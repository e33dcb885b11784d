"""The ``lowmem`` command's LightningCLI: parser, config fix-ups (``--optim``, recipes, paths) and the
entry point :func:`main`; see :mod:`lowmem_lightning.cli` for what the command does."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.multiprocessing import ProcessRaisedException

from lowmem_lightning.callbacks.checkpoint_io import CheckpointWriteError, use_atomic_checkpoint_io
from lowmem_lightning.callbacks.progress import StepsAwareRichProgressBar
from lowmem_lightning.cli.about import NO_SUBCOMMAND, SUBCOMMAND_HELP, VERSION_HELP, description, version_line
from lowmem_lightning.cli.checks import (
    EVALUATION_SETUP_FILES,
    ckpt_path_problem,
    new_paths,
    output_dirs,
    remove_new_paths,
    seed_problem,
    trainer_setting_problem,
    unwritable,
)
from lowmem_lightning.cli.config_edits import (
    OPTIMIZER_CALLBACK,
    PATH_KEYS,
    atomic_sharded_strategy,
    flag_given,
    init_args,
    is_optimizer_callback,
    number,
    optimizer_entries,
    type_model_config,
)
from lowmem_lightning.cli.export import ExportMixin
from lowmem_lightning.cli.held_logs import HeldLogs
from lowmem_lightning.cli.messages import (
    LowMemArgumentParser,
    log_lines_for_terminal,
    notice,
    our_warnings_in_one_line,
    say,
    short,
    usage_error,
    with_setting,
)
from lowmem_lightning.cli.quiet import QUIET_RANKS_ENV, quiet_known_noise, quiet_unsharded_noise
from lowmem_lightning.cli.recipes import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    RECIPES_DIR,
    SUBCOMMANDS,
    bundled_recipes,
    model_optimizer_as_optim,
    resolve_config_args,
    resolve_recipe,
    with_default_classes,
)
from lowmem_lightning.cli.resume_args import ResumeArgsMixin, RunLrAfterResume
from lowmem_lightning.cli.switch import switch_optimizer
from lowmem_lightning.cli.versions import claim_version_dirs
from lowmem_lightning.optim.registry import available_optimizers, unknown_optimizer_message

__all__ = ["LowMemCLI", "main", "parse_fit_config", "RECIPES_DIR", "bundled_recipes", "resolve_recipe",
           "DEFAULT_MODEL", "DEFAULT_DATA"]

SIGTERM_EXIT_CODE = 128 + 15
"""Exit code of a run stopped by SIGTERM (the shell's convention), so a scheduler sees it did not finish."""

UNTRAINED_EXIT_CODE = 1
"""Exit code of a fit stopped because nothing was being trained (``stop_after_skipped_steps`` steps in a row whose every
update was skipped for inf/NaN gradients) or that ended with inf/NaN in its weights (an optimizer that applies
non-finite updates), so a job script sees it failed; 2 stays bad input, 143 a SIGTERM."""


def _data_progress(text: str) -> None:
    """The data module's one line on a long read and tokenization (``TextDataModule.progress``), said on stderr now
    (not held with Lightning's set-up lines: it says why nothing else is printed yet), by rank 0 only."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        say(f"lowmem: {text}")


class LowMemCLI(ExportMixin, ResumeArgsMixin, LightningCLI):
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
        self.held_logs = kwargs.pop("held_logs", None)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("prog", "lowmem")
        parser_kwargs.setdefault("description", description())
        for name in self.subcommands():  # LightningCLI's; export's parser is made by _add_export_subcommand
            parser_kwargs.setdefault(name, {}).setdefault("description", SUBCOMMAND_HELP[name])
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    held_logs: HeldLogs | None = None
    """Lightning's set-up messages held by :func:`main` until the run starts (dropped when it is refused)."""

    _cli_args: list[str] = []

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse like LightningCLI; a ``--model.optimizer NAME`` on the command line of a config whose
        ``trainer.callbacks`` has a LowMemOptimizerCallback (which replaces the module's optimizer) is
        applied as ``--optim NAME``, said in one line. ``main`` passes the (resolved) arguments and keeps
        the user's command line in ``sys.argv`` for Lightning's DDP launcher; the parse reads ``args`` only
        (so LightningCLI does not warn that both were given)."""
        if isinstance(args, (list, tuple)):
            args = model_optimizer_as_optim(list(args))
            self._cli_args = list(args)
        saved_argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = saved_argv

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's subcommands, ``export`` (:mod:`~lowmem_lightning.cli.export`), and ``estimate`` listed with
        them (``main`` runs it before LightningCLI, so this parser only documents it); ``--version``."""
        super()._add_subcommands(parser, **kwargs)
        parser.add_argument("-V", "--version", action="version", version=version_line(), help=VERSION_HELP)
        action = parser._subcommands_action
        if action is None:
            return
        self._add_export_subcommand(action)
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

    def _set_seed(self) -> None:
        """Seed like LightningCLI, after refusing a seed ``seed_everything`` cannot take (exit 2, one message)."""
        problem = seed_problem(self._get(self.config, "seed_everything"))
        if problem:
            self._error(problem)
        super()._set_seed()

    def before_instantiate_classes(self) -> None:
        """Apply ``--optim``/``--lr``/``--step_in_backward``, check optimizer names, and resolve
        recipe-relative paths."""
        cfg = self._subconfig()
        if self.subcommand == "export" and self.check_weights:
            self._prepare_export(cfg)
        self._apply_optim_shortcut(cfg)
        self._check_optimizer_callbacks(cfg)
        self._resolve_relative_paths(cfg)
        self._link_tokenizer(cfg)
        if self.check_weights:
            self._check_not_architecture_only(cfg)
        type_model_config(cfg)
        atomic_sharded_strategy(cfg)
        self._check_run_inputs(cfg)

    def _check_run_inputs(self, cfg: Namespace) -> None:
        """A missing ``--ckpt_path``, a Trainer count Lightning does not check, or an unwritable output
        directory: exit 2 before anything is built."""
        if not self.check_weights:  # parse-only (lowmem estimate): no run, nothing to check
            return
        problem = ckpt_path_problem(cfg.get("ckpt_path")) or trainer_setting_problem(cfg.get("trainer"))
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
        """``data.tokenizer: model`` means the tokenizer of ``model.model_name_or_path``, its own code (if any) trusted
        with the model's (``model.trust_remote_code``)."""
        data, model = self._init(cfg, "data"), self._init(cfg, "model")
        if data is None or data.get("tokenizer") != "model":
            return
        path = model.get("model_name_or_path") if model is not None else None
        if not isinstance(path, str):
            self._error(
                "data.tokenizer='model' takes the tokenizer of model.model_name_or_path, which is not set; "
                "set --model.model_name_or_path (a directory or Hub id) or --data.tokenizer (byte, a tokenizer "
                "directory or Hub id)."
            )
        data["tokenizer"] = path
        if model.get("trust_remote_code") and "trust_remote_code" in data:
            data["trust_remote_code"] = True  # the model's own tokenizer code, trusted with the model's

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
                    "(a local Hugging Face directory with config.json + safetensors, or a Hub id such as "
                    "meta-llama/Llama-2-7b-hf). 'lowmem estimate' "
                    "works without it."
                )

    def _apply_optim_shortcut(self, cfg: Namespace) -> None:
        name, lr, release = cfg.get("optim"), cfg.get("lr"), cfg.get("step_in_backward")
        if name is None and lr is None and release is None:
            self._apply_model_lr(cfg, optimizer_entries(cfg))
            return
        callbacks = cfg.trainer.get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, list):
            callbacks = [callbacks]
        targets = [c for c in callbacks if is_optimizer_callback(c)]
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
            init = init_args(entry)
            if lr is not None:
                init["lr"] = lr
            if release is not None:
                init["step_in_backward"] = release
                if not release and init.get("bucket_bytes") is not None:
                    notice(f"--step_in_backward false: dropped the config's bucket_bytes={init['bucket_bytes']!r} "
                           "(the gradient release's bucket size).")
                    init["bucket_bytes"] = None
            if name is not None and name in available_optimizers():
                run_lr = init.get("lr") if init.get("lr") is not None else model_lr
                notice(switch_optimizer(
                    init, name, number(run_lr), lr_given=lr is not None, module_lr=number(model_lr),
                    kwargs_given=flag_given(self._cli_args, "trainer.callbacks", "optimizer_kwargs")))
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
        if not flag_given(self._cli_args, "model", "lr") or not isinstance(value, (int, float)):
            return
        for entry in targets:
            init = init_args(entry)
            if init.get("lr") is not None and float(init["lr"]) != float(value):
                notice(f"--model.lr {value:g} also sets the LowMemOptimizerCallback's lr (the config's "
                        f"{float(init['lr']):g} would replace the module's lr).")
                init["lr"] = float(value)

    def _check_optimizer_callbacks(self, cfg: Namespace) -> None:
        callbacks = cfg.trainer.get("callbacks") or []
        for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
            if not is_optimizer_callback(entry):
                continue
            name = init_args(entry).get("optimizer", "adamw_8bit")
            if name not in available_optimizers():
                self._error(unknown_optimizer_message(name))

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
            self._error(with_setting(short(err), "trainer", self._subconfig().get("trainer")))

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Check the data module's inputs (``check_inputs()``, when it has one: files read, tokenized,
        checked) before the Trainer and its loggers exist, then build the Trainer."""
        datamodule = getattr(self, "datamodule", None)
        check = getattr(datamodule, "check_inputs", None)
        if callable(check) and self.subcommand != "export":  # export reads no data (the tokenizer only)
            if hasattr(datamodule, "progress"):  # TextDataModule's line on a long read: said now, not held
                datamodule.progress = _data_progress
            check()
        return super().instantiate_trainer(**kwargs)

    # ------------------------------------------------------------------ fit
    def before_fit(self) -> None:
        """Refusals that need the built Trainer and module, made before ``fit`` writes anything (gradient
        release that cannot hold: exit 2, one message); ``--ckpt_path last`` resolved to the newest
        checkpoint of the run's ModelCheckpoint directories (:mod:`~lowmem_lightning.cli.last`); a resume leaves
        out the build's notes on where token rows start (the rows are the checkpoint's); a Trainer that starts its
        ranks in new processes gets weight-averaging functions it can pickle
        (:func:`~lowmem_lightning.callbacks.averaging.picklable_averaging`); a strategy that shards no layer drops
        Lightning's warning that weight averaging does not shard (:func:`~.quiet.quiet_unsharded_noise`)."""
        from lowmem_lightning.callbacks.averaging import picklable_averaging
        from lowmem_lightning.callbacks.optimizer import LowMemOptimizerCallback
        from lowmem_lightning.callbacks.release import release_refusal

        if _spawns_ranks(self.trainer):
            picklable_averaging(self.trainer.callbacks)
        if not _shards_layers(self.trainer):
            quiet_unsharded_noise()

        for callback in self.trainer.callbacks:
            if isinstance(callback, LowMemOptimizerCallback) and callback.step_in_backward:
                reason = release_refusal(self.trainer, self.model)
                if reason is not None:
                    self._error(f"LowMemOptimizerCallback(step_in_backward=True) cannot run: {reason}.")
        if self.config_init["fit"].get("ckpt_path") == "last":
            self.config_init["fit"]["ckpt_path"] = self._resolve_last()
            self._check_resolved(self.config_init["fit"]["ckpt_path"])
        if self.config_init["fit"].get("ckpt_path"):
            self._rows_from_checkpoint()

    def before_validate(self) -> None:
        """``--ckpt_path last`` / ``best`` resolved as ``lowmem export`` resolves them (:meth:`_named_ckpt_path`)."""
        self._resolve_evaluation_ckpt_path("validate")

    def before_test(self) -> None:
        """``--ckpt_path last`` / ``best`` resolved as ``lowmem export`` resolves them (:meth:`_named_ckpt_path`)."""
        self._resolve_evaluation_ckpt_path("test")

    def before_predict(self) -> None:
        """``--ckpt_path last`` / ``best`` resolved as ``lowmem export`` resolves them (:meth:`_named_ckpt_path`)."""
        self._resolve_evaluation_ckpt_path("predict")

    def _resolve_evaluation_ckpt_path(self, subcommand: str) -> None:
        """Lightning's own ``ckpt_path="last"`` looks for ``last*.ckpt`` in this run's new version folder only (and
        ``"best"`` at this process's ModelCheckpoint, which has seen no training): finding nothing, it evaluates the
        recipe's untrained model with a warning. Here they name the newest (or recorded best) checkpoint of the
        run's ModelCheckpoint directories across versions, or end with exit 2 when there is none. With a checkpoint,
        the build's notes on where token rows start are left out (the rows are the checkpoint's)."""
        init = self.config_init[subcommand]
        if init.get("ckpt_path") in ("last", "best"):
            init["ckpt_path"] = self._named_ckpt_path(self.config[subcommand], subcommand)
        if init.get("ckpt_path"):
            self._rows_from_checkpoint()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run the subcommand in a logger version folder of its own (claimed atomically:
        :mod:`~lowmem_lightning.cli.versions`); a ``ValueError``/``TypeError``/
        ``MisconfigurationException`` raised before the sanity check, training or evaluation begins (a refusal:
        optimizer, precision, strategy, checkpoint) ends with one message and exit code 2, and the
        directories the run created are removed (when they hold only the config and the logger's first
        files). ``LOWMEM_TRACEBACK=1`` re-raises. ``export`` runs no Trainer method (:meth:`_run_export`)."""
        if subcommand == "export":
            self._run_export()
            return
        claimed = claim_version_dirs(self.trainer)  # runs started together never share a version folder
        created = new_paths(self._run_paths())
        created += [outer for _, outer in claimed if outer not in created]
        config_files = self._new_config_files()
        spawns = _spawns_ranks(self.trainer)
        started = _RunStarted(self.held_logs, subcommand)
        self.trainer.callbacks.append(started)
        if self.held_logs is not None and not spawns:  # the summary prints at on_fit_start: after the set-up lines
            self.held_logs.hold_summaries(self.trainer.callbacks)
        if subcommand == "fit" and not self._has_optimizer_callback():
            self.trainer.callbacks.append(RunLrAfterResume())  # a new --model.lr applies after a resume
        try:
            with warnings.catch_warnings(), _spawned_ranks_quiet(spawns):
                _drop_checkpoint_dirpath_note(subcommand)
                try:
                    super()._run_subcommand(subcommand)
                except ProcessRaisedException as err:  # in a spawned rank: a refusal is handled as one here
                    raise (started.rank_refusal or err) from err
            if subcommand != "fit" and self.trainer.global_rank == 0:  # no results in it (predict: they are on stdout)
                remove_new_paths(created, EVALUATION_SETUP_FILES)
        except (ValueError, TypeError, MisconfigurationException) as err:
            if started.started or os.environ.get("LOWMEM_TRACEBACK"):
                raise
            remove_new_paths(created)
            for file in config_files:  # in a folder that was there before (logger: false writes it in the root)
                file.unlink(missing_ok=True)
            done = "trained" if subcommand == "fit" else "run"
            say(f"lowmem {subcommand}: error: {short(err)}\n(nothing was {done} or written; "
                "LOWMEM_TRACEBACK=1 shows where it was raised)")
            raise SystemExit(2) from None
        except BaseException:  # a refusal in before_fit (exit 2), or an evaluation that failed
            started.show_unprinted_setup()
            if not started.started or subcommand != "fit":
                remove_new_paths(created)  # only folders holding nothing but set-up files
            raise
        return None

    def after_predict(self) -> None:
        """Print each prediction that is a dict (``CausalLMModule``: ``{"prompt", "continuation"}``, or ``{"prompt",
        "generated", "reference"}`` on instruction or chat data) as one JSON line on stdout, so ``lowmem predict ... >
        out.jsonl`` keeps them; other predictions are returned by Lightning only."""
        for item in flat_predictions(self.trainer.predict_loop.predictions):
            if isinstance(item, dict):
                sys.stdout.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        sys.stdout.flush()

    def _has_optimizer_callback(self) -> bool:
        from lowmem_lightning.callbacks.optimizer import LowMemOptimizerCallback

        return any(isinstance(c, LowMemOptimizerCallback) for c in self.trainer.callbacks)

    def _new_config_files(self) -> list[Path]:
        """The config files LightningCLI's ``SaveConfigCallback`` will write into the run's log directory (the root
        without a logger) that do not exist yet: a refused run removes them, as it removes the folders it made."""
        from lightning.pytorch.cli import SaveConfigCallback

        folder = self.trainer.log_dir or self.trainer.default_root_dir
        files = [Path(folder, callback.config_filename) for callback in self.trainer.callbacks
                 if isinstance(callback, SaveConfigCallback)]
        return [file for file in files if not file.exists()]

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

    def _bar_console(self) -> dict[str, Any]:
        """The progress bar's console: stderr for ``predict``, whose stdout carries the JSON lines (``lowmem predict
        ... > out.jsonl`` keeps only them); rich's default (stdout) for the other subcommands."""
        return {"stderr": True} if self.subcommand == "predict" else {}

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        has_bar = any(isinstance(c, ProgressBar) for c in [*listed, *callbacks])
        if not has_bar and config.get("enable_progress_bar", True) is not False:
            callbacks = [*callbacks, StepsAwareRichProgressBar(console_kwargs=self._bar_console())]
        trainer = super()._instantiate_trainer(config, callbacks)
        use_atomic_checkpoint_io(trainer)  # checkpoints complete or absent, a full disk named (issue 25)
        _report_rank_refusals(trainer)  # ddp_spawn: a rank's refusal comes back as data
        return trainer


def _drop_checkpoint_dirpath_note(subcommand: str) -> None:
    """Ignore ModelCheckpoint's "The dirpath has changed from ... won't be reloaded" warning where it says nothing
    new: in an evaluation (it writes no checkpoint), and in a fit resumed from another version folder of the same
    logger (each start of ``lowmem fit`` logs into a new ``version_N``, and ``--ckpt_path last`` said where it
    resumes from). A ``dirpath`` changed by hand still gets it."""
    same_logger_versions = (r"The dirpath has changed from '(.*)[/\\]version_[^/\\]+[/\\]checkpoints' "
                            r"to '\1[/\\]version_")
    message = "The dirpath has changed from" if subcommand != "fit" else same_logger_versions
    warnings.filterwarnings("ignore", message=message, category=UserWarning,
                            module=r"lightning\.pytorch\.callbacks\.model_checkpoint")


def _shards_layers(trainer: Any) -> bool:
    """Whether ``trainer``'s strategy shards model layers (FSDP, model parallel, DeepSpeed)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy))


def _spawns_ranks(trainer: Any) -> bool:
    """Whether the Trainer's strategy starts its ranks in new processes that receive the pickled Trainer
    (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``: Lightning's ``_MultiProcessingLauncher``)."""
    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


@contextlib.contextmanager
def _spawned_ranks_quiet(spawns: bool):
    """While ``spawns``: the ranks this command starts quiet the known noise too (:data:`QUIET_RANKS_ENV`)."""
    if not spawns:
        yield
        return
    saved = os.environ.get(QUIET_RANKS_ENV)
    os.environ[QUIET_RANKS_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(QUIET_RANKS_ENV, None)
        else:
            os.environ[QUIET_RANKS_ENV] = saved


REFUSALS = (ValueError, TypeError, MisconfigurationException)
"""What a run raises before it starts when it refuses its input: one message and exit code 2 (``_run_subcommand``)."""


class _RunStarted(L.Callback):
    """Records that a run got past its set-up (the sanity check, training or the evaluation loop began: the
    CLI's refusal handling applies only before that) and then prints Lightning's held set-up messages.

    Under ``ddp_spawn`` / ``ddp_fork`` (:meth:`prepare_ranks`) the ranks run in other processes: the lines held here
    go to them as text and rank 0 prints them when its run starts, each rank holds its own set-up lines likewise,
    and a rank says on a pipe that its run started, or sends the refusal it raised before that (its kind and
    message: :attr:`rank_refusal`), through :class:`_RefusalReportingLauncher`. A copy pickled into a spawned rank
    drops there the ``subcommand``'s ModelCheckpoint note that the command drops
    (:func:`_drop_checkpoint_dirpath_note`)."""

    def __init__(self, held: HeldLogs | None = None, subcommand: str | None = None) -> None:
        self._started = False
        self.held = held
        self.subcommand = subcommand
        self.held_text = ""  # under ranks: the lines held here before they started, printed by rank 0
        self._refusal: Exception | None = None  # here: the first refusal a rank sent
        self._reader: Any = None  # here: where the ranks say that their run started, or send their refusal
        self._writer: Any = None  # in a rank: where it says so

    def prepare_ranks(self) -> None:
        """Before the ranks are started: open the pipe they report on and take the held lines as text (rank 0
        prints it once its run starts; :meth:`show_unprinted_setup` here if no rank's run started)."""
        self._reader, self._writer = multiprocessing.Pipe(duplex=False)
        if self.held is not None:
            self.held_text = self.held.take_text()

    def _read_pipe(self) -> None:
        while self._reader is not None and self._reader.poll():
            kind, *refusal = self._reader.recv()
            if kind == "started":
                self._started = True
            elif kind == "shown":
                self.held_text = ""
            elif self._refusal is None:
                self._refusal = refusal[0](refusal[1])

    @property
    def started(self) -> bool:
        """Whether the run got past its set-up, here or in a rank."""
        self._read_pipe()
        return self._started

    @property
    def rank_refusal(self) -> Exception | None:
        """The refusal a rank raised before its run started, as an exception of its kind (``ValueError``,
        ``TypeError`` or ``MisconfigurationException``) with its message; ``None`` when no rank sent one."""
        self._read_pipe()
        return self._refusal

    def show_unprinted_setup(self) -> None:
        """Print the held lines that went to the ranks as text when no rank printed them (none started, or
        failed)."""
        if self.held_text and not self.started:
            sys.stderr.write(self.held_text)
            self.held_text = ""

    def __getstate__(self) -> dict:
        """The state sent to a spawned rank: without the held records (handlers, locks, closures) or the reading end
        of the pipe."""
        return {**self.__dict__, "held": None, "_reader": None}

    def __setstate__(self, state: dict) -> None:
        """In a spawned rank: the warning filter the command set in its own process, set in this one too."""
        self.__dict__.update(state)
        if self.subcommand:
            _drop_checkpoint_dirpath_note(self.subcommand)

    def enter_rank(self) -> None:
        """In a rank, before its run: hold its own set-up lines (a forked rank first drops the copy of the command's
        hold it inherited)."""
        if self.held is not None:
            self.held.discard()
        self.held = HeldLogs().hold()

    def refused(self, err: BaseException) -> None:
        """In a rank whose run did not start: send ``err``'s kind and message to the command; drop the held lines."""
        if self._started:
            return
        kind = next(k for k in REFUSALS if isinstance(err, k))
        if self._writer is not None:
            self._writer.send(("refused", kind, short(err)))
        self.held_text = ""
        if self.held is not None:
            self.held.discard()

    def leave_rank(self, process_idx: int) -> None:
        """In a rank, after its run (or its failure before it started): print what it still holds, rank 0 the
        command's lines first (and says so)."""
        if self.held_text and process_idx == 0:
            sys.stderr.write(self.held_text)
            self.held_text = ""
            if self._writer is not None:
                self._writer.send(("shown",))
        if self.held is not None:
            self.held.release()

    def _start(self, trainer: Any) -> None:
        if self._writer is not None and not self._started:
            self._writer.send(("started",))
        self._started = True
        if self.held_text and trainer.global_rank == 0:
            sys.stderr.write(self.held_text)
            self.held_text = ""
        if self.held is not None:
            self.held.release()

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        """The sanity check begins: the fit is past its set-up."""
        self._start(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Training begins: the fit is past its set-up."""
        self._start(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """``lowmem validate`` (or a fit's first validation) begins."""
        self._start(trainer)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """``lowmem test`` begins."""
        self._start(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        """``lowmem predict`` begins."""
        self._start(trainer)


TORCH_SPAWN_LOGGER = "torch.multiprocessing.spawn"
"""The logger of torch's rank launcher: it warns "Terminating process N via signal SIGTERM" when a rank fails."""


class _LoggerHold(logging.Filter):
    """Within ``with``: the records logged on the logger ``name`` are kept, and logged at the end (unless dropped
    from :attr:`records` meanwhile)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def __enter__(self) -> _LoggerHold:
        self.logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeFilter(self)
        for record in self.records:
            self.logger.handle(record)


class _RefusalReportingLauncher(_MultiProcessingLauncher):
    """Lightning's launcher of ``ddp_spawn`` / ``ddp_fork`` ranks, whose ranks hold their set-up lines and report a
    refusal raised before their run started to the command as data (its kind and message, on the pipe of the
    Trainer's :class:`_RunStarted`), not as traceback text."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        """Here, as the ranks are started: the Trainer's :class:`_RunStarted` opens its pipe and hands them the
        held lines (:meth:`_RunStarted.prepare_ranks`)."""
        started = _run_started(trainer)
        if started is None:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        started.prepare_ranks()
        with _LoggerHold(TORCH_SPAWN_LOGGER) as hold:
            try:
                return super().launch(function, *args, trainer=trainer, **kwargs)
            except ProcessRaisedException:
                if started.rank_refusal is not None:
                    hold.records.clear()  # "Terminating process N via signal SIGTERM": the other ranks, refused too
                raise

    def _wrapping_function(self, process_idx: int, trainer: Any, *args: Any, **kwargs: Any) -> None:
        started = _run_started(trainer)
        if started is None:
            return super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        started.enter_rank()
        try:
            return super()._wrapping_function(process_idx, trainer, *args, **kwargs)
        except REFUSALS as err:
            started.refused(err)
            raise
        finally:
            started.leave_rank(process_idx)


def _run_started(trainer: Any) -> _RunStarted | None:
    """The :class:`_RunStarted` among ``trainer``'s callbacks (the ``lowmem`` command adds one), or ``None``."""
    return next((c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, _RunStarted)), None)


def _report_rank_refusals(trainer: Any) -> None:
    """Give a Trainer that starts its ranks with Lightning's ``_MultiProcessingLauncher`` a
    :class:`_RefusalReportingLauncher` instead (the same start method)."""
    launcher = getattr(trainer.strategy, "launcher", None)
    if type(launcher) is _MultiProcessingLauncher:
        trainer.strategy._launcher = _RefusalReportingLauncher(trainer.strategy, start_method=launcher._start_method)


class _ParseOnlyCLI(LowMemCLI):
    """Parses and fixes up a ``fit`` config like ``lowmem fit`` would, and instantiates nothing; its refusals
    are prefixed with :attr:`prog` (the command that asked: ``lowmem estimate``)."""

    check_weights = False
    prog = "lowmem fit"

    def __init__(self, *args: Any, prog: str = "lowmem fit", **kwargs: Any) -> None:
        self.prog = prog
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` alone, the one subcommand this parses: building the parsers of validate, test, predict and export
        too took about half of each parse (``lowmem estimate`` parses a recipe this way)."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """The ``fit`` parser (no ``export``/``estimate``: nothing here parses them), named :attr:`prog` in its
        messages."""
        LightningCLI._add_subcommands(self, parser, **kwargs)
        self._subcommand_parsers["fit"].prog = self.prog

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def flat_predictions(predictions: Any) -> list:
    """The items of ``trainer.predict``'s result (a list per batch, or per dataloader then per batch) in order."""
    if not isinstance(predictions, list):
        return [predictions] if predictions is not None else []
    return [item for entry in predictions for item in flat_predictions(entry)]


def parse_fit_config(args: list[str], prog: str = "lowmem fit") -> Namespace:
    """The ``fit`` section of the config ``lowmem fit ARGS`` would run (defaults filled, ``--optim``
    applied, recipe-relative paths resolved), without building anything. A refusal exits with code 2 and one
    message prefixed ``PROG: error:`` (``prog``: the command parsing, e.g. ``lowmem estimate``)."""
    argv = with_default_classes(["fit", *resolve_config_args(args)])
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return _ParseOnlyCLI(args=argv, save_config_callback=None, prog=prog).config.fit
    finally:
        sys.argv = saved_argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowmem`` console script; returns the exit code (2 for bad input). Known third-party
    noise is dropped and the package's own warnings show as one line each while it runs."""
    quiet_known_noise()
    restore_warnings, restore_logs = our_warnings_in_one_line(), log_lines_for_terminal()
    try:
        return _run_command(argv)
    finally:
        restore_logs()
        restore_warnings()


def _stopped_untrained(cli: LowMemCLI) -> bool:
    """Whether a callback of the run stopped its fit because every update of ``stop_after_skipped_steps`` steps in a
    row was skipped (inf/NaN gradients: :mod:`~lowmem_lightning.callbacks.skips`), or saw its weights end with
    inf/NaN: nothing usable was trained."""
    trainer = getattr(cli, "trainer", None)
    summaries = [getattr(callback, "summary", None) for callback in (trainer.callbacks if trainer else [])]
    return any(isinstance(s, dict) and (s.get("stopped_at_step") is not None or s.get("lost_weights"))
               for s in summaries)


def _run_command(argv: Sequence[str] | None) -> int:
    """:func:`main`'s work: ``estimate``, or LightningCLI with Lightning's set-up lines held until the run starts."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        return usage_error(NO_SUBCOMMAND)
    if args[0] == "estimate":
        from lowmem_lightning.cli.estimate import estimate_main

        try:
            return estimate_main(args[1:])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    prog = f"lowmem {args[0]}" if args[0] in SUBCOMMANDS else "lowmem"
    try:
        args = with_default_classes(resolve_config_args(args))
    except ValueError as err:
        return usage_error(str(err), prog)
    saved_argv = sys.argv
    # the command line as given: Lightning's DDP launcher re-runs sys.argv for ranks > 0
    sys.argv = [saved_argv[0] if saved_argv else "lowmem", *(saved_argv[1:] if argv is None else argv)]
    held = HeldLogs().hold()  # "Seed set to", "GPU available": printed once the run starts, dropped if refused
    code = 0
    try:
        cli = LowMemCLI(args=args, held_logs=held)
        code = UNTRAINED_EXIT_CODE if _stopped_untrained(cli) else 0
    except SIGTERMException:
        code = SIGTERM_EXIT_CODE
    except CheckpointWriteError as err:  # a full / read-only checkpoint directory: one message, exit 2
        say(f"{prog}: error: {err}")
        code = 2
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = saved_argv
        if code == 2 and held.holding:
            held.discard()
        else:
            held.release()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
