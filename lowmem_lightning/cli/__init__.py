"""The ``lowmem`` command: LightningCLI with low-memory optimizers, bundled recipes and ``lowmem estimate``.

::

    lowmem fit --config configs/tiny.yaml            # train (also: validate, test, predict)
    lowmem fit --config qlora_7b.yaml --model.model_name_or_path /path/to/llama-2-7b-hf
    lowmem fit --config tiny.yaml --optim came --lr 1e-3
    lowmem estimate --config qlora_7b.yaml --budget-gb 8
    lowmem export --config tiny.yaml --ckpt_path run.ckpt --save_dir tiny-hf   # a checkpoint as an HF directory

* Model and data are chosen by ``class_path`` (ours or any importable LightningModule /
  LightningDataModule); the defaults are ``CausalLMModule`` and ``TextDataModule``.
* The optimizer is chosen by a ``LowMemOptimizerCallback`` in ``trainer.callbacks``; ``--optim NAME``
  (with ``--lr``) sets that callback's optimizer, adding the callback when the config has none, keeping
  the config's lr and schedule and dropping the callback's ``optimizer_kwargs`` NAME does not take
  (:mod:`~lowmem_lightning.cli.switch`). ``--model.optimizer`` / ``--model.lr`` on the command line
  reach the callback too (it replaces the module's optimizer), each said in one line.
* ``--config NAME`` with no such file resolves to the recipe of that name bundled in the package
  (``tiny``, ``tiny.yaml``, ``qlora_7b.yaml``, ...), so recipes run from any directory. A relative
  path inside a recipe (``model.model_name_or_path``, ``data.data_path``) that does not exist from the
  current directory is looked up next to the recipe file.
* A rich progress bar is added unless the config sets its own progress bar or disables it.
* Wrong input (unknown optimizer, a missing config file or one that is no YAML mapping, unknown key, bad type,
  invalid value, a bad data file, a missing ``--ckpt_path``, an unwritable output directory) ends with a
  one-paragraph message
  naming the problem and the allowed values, exit code 2, no traceback, before anything is written: the
  data module's ``check_inputs()`` runs before the Trainer is built. So does every refusal before
  training (gradient release that cannot hold, checked on the built Trainer before ``fit``; a
  ``ValueError`` raised inside ``fit`` before the sanity check or the first step, after which the
  directories the run created are removed).
* ``--ckpt_path last`` resumes from the newest checkpoint, by step, of the run's ModelCheckpoint
  directories across restarts (:mod:`~lowmem_lightning.cli.last`), or starts fresh saying so.
* A run stopped by SIGTERM exits with code 143 (after saving ``last.ckpt`` when it checkpoints).
* ``lowmem test`` reports the held-out loss of a checkpoint; ``lowmem predict`` prints greedy continuations of
  held-out prompts as JSON lines (``CausalLMModule`` with ``TextDataModule``); on instruction or chat data, the
  model's reply to each held-out record's prompt beside the record's own reply.
* ``lowmem export`` writes a checkpoint's model as a Hugging Face directory (adapter, merged or full model, and
  the tokenizer) through the module's end-of-fit saver (:mod:`~lowmem_lightning.cli.export`).

Modules: :mod:`~lowmem_lightning.cli.app` (the LightningCLI and :func:`main`),
:mod:`~lowmem_lightning.cli.recipes` (the command line before parsing: recipes, default classes),
:mod:`~lowmem_lightning.cli.config_edits` (look-ups and edits on a parsed config),
:mod:`~lowmem_lightning.cli.messages` (one-line errors, notices), :mod:`~lowmem_lightning.cli.terminal` (text
broken to the terminal's width, the help formatter), :mod:`~lowmem_lightning.cli.held_logs`
(Lightning's set-up lines held until the run starts), :mod:`~lowmem_lightning.cli.resume_args` (``--ckpt_path``
and ``--model_from_ckpt`` against the run; a new lr after a resume),
:mod:`~lowmem_lightning.cli.checks` (inputs and outputs checked before a run),
:mod:`~lowmem_lightning.cli.switch` (``--optim`` over another optimizer's settings),
:mod:`~lowmem_lightning.cli.last` (``--ckpt_path last``),
:mod:`~lowmem_lightning.cli.resume` (a ``--ckpt_path`` checked before anything is built: the file, and its
model against the run's; ``--model_from_ckpt``), :mod:`~lowmem_lightning.cli.versions` (each run claims its
own ``version_N``),
:mod:`~lowmem_lightning.cli.estimate` (``lowmem estimate``),
:mod:`~lowmem_lightning.cli.export` (``lowmem export``), :mod:`~lowmem_lightning.cli.quiet`
(known third-party noise), :mod:`~lowmem_lightning.cli.about` (``lowmem --version``, ``--help`` and ``lowmem`` alone,
without Lightning).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lowmem_lightning.cli.quiet import quiet_spawned_rank

quiet_spawned_rank()  # a ddp_spawn rank of a lowmem command: before app imports transformers and peft

_LAZY = {
    "DEFAULT_DATA": "lowmem_lightning.cli.app",
    "DEFAULT_MODEL": "lowmem_lightning.cli.app",
    "RECIPES_DIR": "lowmem_lightning.cli.app",
    "LowMemCLI": "lowmem_lightning.cli.app",
    "bundled_recipes": "lowmem_lightning.cli.app",
    "parse_fit_config": "lowmem_lightning.cli.app",
    "resolve_recipe": "lowmem_lightning.cli.app",
    "KNOWN_LOG_NOISE": "lowmem_lightning.cli.quiet",
    "KNOWN_WARNING_NOISE": "lowmem_lightning.cli.quiet",
    "quiet_known_noise": "lowmem_lightning.cli.quiet",
}

__all__ = ["LowMemCLI", "main", "parse_fit_config", "RECIPES_DIR", "bundled_recipes", "resolve_recipe",
           "DEFAULT_MODEL", "DEFAULT_DATA", "quiet_known_noise", "KNOWN_LOG_NOISE", "KNOWN_WARNING_NOISE"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowmem`` console script (:func:`lowmem_lightning.cli.app.main`); returns the exit code.
    ``lowmem --version`` (or ``-V``), ``lowmem --help`` (``-h``) and ``lowmem`` alone are answered by
    :mod:`~lowmem_lightning.cli.about` without importing torch or Lightning (the rest of the CLI needs them, and their
    imports take seconds)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args in ([], ["--version"], ["-V"], ["--help"], ["-h"]):
        from lowmem_lightning.cli import about

        return about.answer(args)
    from lowmem_lightning.cli.about import SUBCOMMAND_HELP, unsupported_jsonargparse

    if problem := unsupported_jsonargparse():  # LightningCLI would fail inside its set-up with an AttributeError
        from lowmem_lightning.cli.terminal import usage_error

        return usage_error(problem, f"lowmem {args[0]}" if args[0] in SUBCOMMAND_HELP else "lowmem")
    from lowmem_lightning.cli.app import main as run

    return run(argv)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
