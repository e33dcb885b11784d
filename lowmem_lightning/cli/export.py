"""``lowmem export``: a Lightning checkpoint of a recipe written as a Hugging Face model directory.

::

    lowmem export --config RECIPE --ckpt_path FILE|last|best --save_dir DIR [--save_merged true] [--overwrite true]

The recipe's model is built as ``lowmem fit`` builds it (NF4 base + LoRA for a QLoRA recipe, full weights otherwise;
no optimizer, no Trainer run), the checkpoint's ``state_dict`` is loaded into it (a weights-only checkpoint is
enough), and :meth:`~lowmem_lightning.modules.causal_lm.CausalLMModule.save_model` writes what ``save_dir`` gets at
the end of a fit: the LoRA adapter (``PeftModel.from_pretrained(base, DIR)``), the merged dense model with
``--save_merged true``, or the full model without LoRA (``AutoModelForCausalLM.from_pretrained(DIR)``), and the
data module's Hugging Face tokenizer (the byte tokenizer has no files).

The directory appears whole or not at all: the model is written into a hidden directory beside ``DIR``
(``.DIR.export-XXXXXXXX``) and renamed to ``DIR`` at the end. A ``DIR`` that exists and is not empty is refused
unless ``--overwrite true``, which replaces it (its old files are removed after the new directory is in place).

Checkpoints of a run with a ``WeightAveraging`` callback (``EMAWeightAveraging``) hold two sets of weights: the
average as ``state_dict`` (what validation measured, and what ``lowmem test --ckpt_path`` evaluates) and the
training weights as ``current_model_state``. The export takes the ``state_dict`` (``--weights average``, said in
one line) unless ``--weights training`` asks for the training weights. A weights-only checkpoint
(``save_weights_only=True``) of such a run holds the training weights only: Lightning skips the callback's
checkpoint hook for it.

``--ckpt_path last`` is the newest checkpoint (by step) of the recipe's ModelCheckpoint directories
(:mod:`~lowmem_lightning.cli.last`), weights-only ones included; ``--ckpt_path best`` is the ``best_model_path``
the newest full checkpoint there recorded (``ModelCheckpoint(monitor=...)``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import Namespace

from lowmem_lightning.cli.about import EXPORT_HELP
from lowmem_lightning.cli.checks import unwritable
from lowmem_lightning.cli.config_edits import import_class
from lowmem_lightning.cli.last import checkpoint_dirs, checkpoint_step, newest_any_checkpoint, recorded_best
from lowmem_lightning.cli.messages import notice
from lowmem_lightning.cli.resume import load_checkpoint, saved_config_next_to

__all__ = ["EXPORT_HELP", "ExportMixin", "first_mismatch", "export_weights", "replace_dir"]

WEIGHTS = Literal["average", "training"]
"""Values of ``--weights``: the checkpoint's ``state_dict`` (the average under WeightAveraging) or its
``current_model_state`` (the training weights)."""


def first_mismatch(model_state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """The first difference between the recipe's model (``model_state``) and a checkpoint's ``state_dict``
    (``saved``) that would stop loading it: a tensor of another shape, a tensor only one side has; ``None`` when
    every key and shape agrees. Said as a clause naming the key and the shapes."""
    for key, tensor in saved.items():
        if key not in model_state:
            return f"{key} (shape {list(tensor.shape)}) is not in the recipe's model"
        if tuple(tensor.shape) != tuple(model_state[key].shape):
            return (f"{key} has shape {list(tensor.shape)} in the checkpoint, {list(model_state[key].shape)} in the "
                    "recipe's model")
    missing = next((key for key in model_state if key not in saved), None)
    if missing is not None:
        return f"{missing} (shape {list(model_state[missing].shape)}) of the recipe's model is not in the checkpoint"
    return None


def export_weights(checkpoint: dict, weights: str | None, ckpt_path: str) -> tuple[dict | None, str]:
    """``(state_dict, what)``: the weights of ``checkpoint`` that ``--weights`` picks and a phrase naming them;
    ``(None, why)`` when it asks for weights the checkpoint does not hold (``--weights average`` of a checkpoint
    saved without weight averaging)."""
    averaged = isinstance(checkpoint.get("current_model_state"), dict)
    if weights == "training" and averaged:
        return checkpoint["current_model_state"], "the training weights (current_model_state)"
    if weights == "average" and not averaged:
        return None, (f"ckpt_path={ckpt_path!r} holds no weight average (no current_model_state: saved without a "
                      "WeightAveraging callback, or with save_weights_only=True, which Lightning saves without it); "
                      "drop --weights to export its weights.")
    if averaged:
        return checkpoint["state_dict"], ("the weight average (its state_dict; --weights training exports the "
                                          "training weights)")
    return checkpoint["state_dict"], ""


def replace_dir(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target`` by renaming it (``target``: absent, an empty directory, or one to
    replace); an old non-empty ``target`` is renamed aside first and removed once ``new`` is in place."""
    try:
        os.replace(new, target)  # absent or empty target: one rename
        return
    except OSError:
        if not target.is_dir():
            raise
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _entries(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


_READING = {"export": "exporting", "validate": "validating", "test": "testing", "predict": "predicting with"}
"""What each subcommand does with the checkpoint ``--ckpt_path last`` / ``best`` chose, in its notice."""


class ExportMixin:
    """The ``export`` subcommand of :class:`~lowmem_lightning.cli.app.LowMemCLI`: its parser, the checks before
    anything is built, and the export. Reads the CLI's ``config``, ``model``, ``datamodule``, ``trainer``,
    ``_init``, ``_error``, ``_check_resolved``, ``_chosen_logger_version`` and LightningCLI's parser helpers."""

    def _add_export_subcommand(self, action: Any) -> None:
        """Register ``lowmem export`` beside LightningCLI's subcommands: the recipe's arguments (as ``fit`` has
        them, so ``--config``, ``--model.*``, ``--data.*`` apply) and the export's own."""
        parser = self.init_parser(description=EXPORT_HELP)
        self._add_arguments(parser)
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Checkpoint to export: a .ckpt file (full or weights-only), 'last' (the newest, by "
                            "step, of the recipe's ModelCheckpoint directories) or 'best' (the best_model_path the "
                            "newest full checkpoint there recorded).")
        parser.add_argument("--save_dir", type=str | None, default=None,
                            help="Directory to write (as CausalLMModule's save_dir at the end of a fit): created "
                            "whole by one rename; an existing non-empty one is refused unless --overwrite true.")
        parser.add_argument("--save_merged", type=bool, default=False,
                            help="With LoRA: write the merged dense model instead of the adapter.")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="Replace a --save_dir that exists and is not empty (its old files are removed).")
        parser.add_argument("--weights", type=WEIGHTS | None, default=None,
                            help="For a checkpoint of a run with weight averaging (EMA): 'average' (its state_dict, "
                            "the default) or 'training' (its current_model_state).")
        self._subcommand_method_arguments["export"] = []
        self._subcommand_parsers["export"] = parser
        action.add_subcommand("export", parser, help=EXPORT_HELP)

    def _prepare_export(self, cfg: Namespace) -> None:
        """Before anything is built: ``--ckpt_path`` and ``--save_dir`` given, the model a CausalLMModule, the
        target directory new or empty (or ``--overwrite true``); ``--save_dir``/``--save_merged`` become the
        module's ``save_dir``/``save_merged`` (its constructor refuses ``save_merged`` without LoRA)."""
        from lowmem_lightning.modules.causal_lm import CausalLMModule

        if cfg.get("ckpt_path") is None:
            self._error("--ckpt_path is required: a checkpoint file of this recipe's run, 'last' or 'best'.")
        save_dir = cfg.get("save_dir")
        if not save_dir:
            self._error("--save_dir is required: the directory to write the Hugging Face model to.")
        model_class = import_class(str((cfg.get("model") or Namespace()).get("class_path")))
        if not (isinstance(model_class, type) and issubclass(model_class, CausalLMModule)):
            self._error(f"model.class_path={cfg.model.get('class_path')!r}: lowmem export writes a CausalLMModule "
                        "(or a subclass) as a Hugging Face directory; this model is not one.")
        target = Path(save_dir).expanduser()
        problem = unwritable("save_dir", save_dir)  # first: a name too long for the file system fails any look-up
        if problem and os.path.isfile(target):  # (os.path: False, not an error, for a name too long)
            problem = f"save_dir={save_dir!r} is a file: give a new or empty directory."
        if problem:
            self._error(problem)
        entries = _entries(target)
        if entries and not cfg.get("overwrite"):
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            self._error(f"save_dir={save_dir!r} exists and is not empty ({shown}): give a new or empty directory, "
                        "or --overwrite true to replace it.")
        init = self._init(cfg, "model")
        init["save_dir"] = str(target.absolute())
        init["save_merged"] = cfg.get("save_merged")

    def _named_ckpt_path(self, cfg: Namespace, subcommand: str = "export") -> str:
        """The checkpoint file ``subcommand`` (export, validate, test or predict) reads: ``--ckpt_path`` as given, or
        the file ``last``/``best`` stands for among the run's ModelCheckpoint directories across its versions
        (:func:`~lowmem_lightning.cli.last.checkpoint_dirs`; checked like a given file); refusals name what was
        searched."""
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path not in ("last", "best"):
            return ckpt_path
        dirs = checkpoint_dirs(self.trainer, self._chosen_logger_version(subcommand))
        where = " or ".join(dirs) or "(none: the recipe has no ModelCheckpoint)"
        if ckpt_path == "last":
            found = newest_any_checkpoint(dirs)
            if found is None:
                self._error(f"ckpt_path='last': no checkpoint in {where}; give a checkpoint file.")
        else:
            found = recorded_best(dirs)
            if found is None:
                self._error(f"ckpt_path='best': the newest full checkpoint in {where} records no best_model_path "
                            "that exists (a ModelCheckpoint with monitor=..., saved with its callback state); give a "
                            "checkpoint file.")
        notice(f"--ckpt_path {ckpt_path}: {_READING[subcommand]} {found}.")
        self._check_resolved(found, subcommand=subcommand, keyword=ckpt_path)
        return found

    def _rows_from_checkpoint(self) -> None:
        """Tell a ``CausalLMModule`` that a checkpoint's weights replace the model it builds
        (``rows_from_checkpoint``, which travels with the module to ``ddp_spawn``'s processes): its build leaves out
        the notes on where token rows start."""
        from lowmem_lightning.modules.causal_lm import CausalLMModule

        if isinstance(self.model, CausalLMModule):
            self.model.rows_from_checkpoint = True

    def _build_for_export(self) -> None:
        """Build the module's model as a fit would (``configure_model`` under the Trainer's device and precision,
        the data module attached for its vocabulary and tokenizer), without a Trainer run or an optimizer; whole
        on one device (no sharding: the export writes every tensor)."""
        model, trainer = self.model, self.trainer
        model.trainer = trainer
        trainer.datamodule = self.datamodule
        self._rows_from_checkpoint()  # the rows exported are the checkpoint's
        with torch.device(trainer.strategy.root_device), trainer.precision_plugin.module_init_context():
            model.configure_model()

    def _run_export(self) -> None:
        """``lowmem export``: load the checkpoint's weights into the recipe's model and write ``--save_dir``."""
        cfg = self.config["export"]
        ckpt_path = self._named_ckpt_path(cfg)
        path = Path(ckpt_path).expanduser()
        if path.is_dir():
            self._error(f"ckpt_path={ckpt_path!r} is a sharded checkpoint directory: consolidate it into one file "
                        "first (python -m lightning.pytorch.utilities.consolidate_checkpoint DIR), then export that.")
        checkpoint = load_checkpoint(path)
        state, what = export_weights(checkpoint, cfg.get("weights"), ckpt_path)
        if state is None:
            self._error(what)
        self._build_for_export()
        if hasattr(self.model, "with_frozen_base"):  # a checkpoint that left out the frozen base (checkpoint_frozen)
            try:
                state = self.model.with_frozen_base(state, checkpoint)
            except ValueError as err:
                self._error(str(err))
        mismatch = first_mismatch(self.model.state_dict(), state)
        if mismatch is not None:
            config = saved_config_next_to(ckpt_path)
            hint = f" (its run's config: {config})" if config else ""
            self._error(f"ckpt_path={ckpt_path!r} is of a model of another shape than this recipe's: {mismatch}; "
                        f"export it with the recipe it was trained with{hint}.")
        self.model.load_state_dict(state, strict=True)
        del checkpoint, state
        target = Path(cfg.save_dir).expanduser().absolute()
        self._write_export(target)
        step = checkpoint_step(path)
        kind = self._export_kind()
        at_step = f" (step {step})" if step is not None else ""
        notice(f"export: wrote {kind} of {ckpt_path}{at_step}{f', {what},' if what else ''} to {target}.")

    def _export_kind(self) -> str:
        if self.model.lora is None:
            return "the full model"
        return "the merged model" if self.model.hparams.save_merged else "the LoRA adapter"

    def _write_export(self, target: Path) -> None:
        """The module's :meth:`save_model` into a hidden directory beside ``target``, renamed to ``target`` at the
        end (:func:`replace_dir`); the hidden directory is removed whatever happens."""
        staging = target.parent / f".{target.name}.export-{secrets.token_hex(4)}"
        self.model.hparams.save_dir = str(staging)
        try:
            self.model.save_model()
            replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self.model.hparams.save_dir = str(target)

