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
* Wrong input (unknown optimizer, missing config file, unknown key, bad type, invalid value, a bad data
  file, a missing ``--ckpt_path``, an unwritable output directory) ends with a one-paragraph message
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
:mod:`~lowmem_lightning.cli.messages` (one-line errors, notices), :mod:`~lowmem_lightning.cli.held_logs`
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
(known third-party noise).
"""

from lowmem_lightning.cli.quiet import quiet_spawned_rank

quiet_spawned_rank()  # a ddp_spawn rank of a lowmem command: before app imports transformers and peft

from lowmem_lightning.cli.app import (  # noqa: E402
    DEFAULT_DATA,
    DEFAULT_MODEL,
    RECIPES_DIR,
    LowMemCLI,
    bundled_recipes,
    main,
    parse_fit_config,
    resolve_recipe,
)
from lowmem_lightning.cli.quiet import KNOWN_LOG_NOISE, KNOWN_WARNING_NOISE, quiet_known_noise  # noqa: E402

__all__ = ["LowMemCLI", "main", "parse_fit_config", "RECIPES_DIR", "bundled_recipes", "resolve_recipe",
           "DEFAULT_MODEL", "DEFAULT_DATA", "quiet_known_noise", "KNOWN_LOG_NOISE", "KNOWN_WARNING_NOISE"]
