"""The ``--ckpt_path`` and ``--model_from_ckpt`` arguments of ``lowmem``, checked against the run before anything
is built or written: the file (:mod:`~lowmem_lightning.cli.resume`), the model it was saved from, and the
checkpoint ``--ckpt_path last`` picks (:mod:`~lowmem_lightning.cli.last`)."""

from __future__ import annotations

import os
from typing import Any

from jsonargparse import Namespace

from lowmem_lightning.callbacks.resume import RunLrAfterResume
from lowmem_lightning.cli.config_edits import flag_given, real_paths, type_model_config
from lowmem_lightning.cli.last import checkpoint_dirs, newest_checkpoint, refusal, resume_notice
from lowmem_lightning.cli.messages import listing, notice, shown
from lowmem_lightning.cli.resume import checkpoint_problem, is_file_path, model_differences, saved_config_next_to

__all__ = ["ResumeArgsMixin", "RunLrAfterResume"]


class ResumeArgsMixin:
    """The checks of :class:`~lowmem_lightning.cli.app.LowMemCLI` for a run that resumes from a checkpoint; they
    read the CLI's ``config``, ``_cli_args``, ``check_weights``, ``trainer`` and call its ``_error``, ``_init``
    and ``_resolve_relative_paths``."""

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
        problem, checkpoint = checkpoint_problem(ckpt_path, resume=sub == "fit")
        if problem:
            self._error(problem)
        if checkpoint is not None:
            self._match_checkpoint_model(cfg, ckpt_path, checkpoint.get("hyper_parameters"))

    def _explicit_model_flag(self, key: str) -> bool:
        """Whether the command line gives model init arg ``key`` (dotted: ``config.hidden_size``) or a
        dict that holds it (``--model.config``)."""
        parts = key.split(".")
        return any(flag_given(self._cli_args, "model", ".".join(parts[:n])) for n in range(1, len(parts) + 1))

    def _match_checkpoint_model(self, cfg: Namespace, ckpt_path: str, saved: Any) -> None:
        """Refuse a checkpoint whose saved model init args differ from the run's (naming the keys), or with
        ``--model_from_ckpt true`` take them, refusing an explicit ``--model.*`` that contradicts them."""
        init = self._init(cfg, "model")
        if not isinstance(saved, dict) or not saved or init is None:
            return
        type_model_config(cfg)
        self._resolve_relative_paths(cfg)
        diffs = model_differences(real_paths(saved), real_paths(init.as_dict()))
        if not diffs:
            return
        differing = listing(diffs)
        if not cfg.get("model_from_ckpt"):
            config = saved_config_next_to(ckpt_path)
            also = f", or run with --config {config} (the config saved with that run)" if config else ""
            keep = ("" if self.config.get("subcommand") == "export"
                    else "; to keep this run's model, start without --ckpt_path")
            verb = "export" if self.config.get("subcommand") == "export" else "resume"
            self._error(f"ckpt_path={ckpt_path!r} was saved from a different model than this run's: {differing}. "
                        f"To {verb} with the checkpoint's model, add --model_from_ckpt true{also}{keep}.")
        explicit = [(key, a, b) for key, a, b in diffs if self._explicit_model_flag(key)]
        if explicit:
            key, a, b = explicit[0]
            self._error(f"ckpt_path={ckpt_path!r}: --model.{key} {shown(b)} on the command line contradicts the "
                        f"checkpoint's model.{key}={shown(a)} (--model_from_ckpt true takes the model from the "
                        "checkpoint): drop one of the two.")
        for top in dict.fromkeys(key.split(".", 1)[0] for key, _, _ in diffs):
            init[top] = saved[top]
        notice(f"--model_from_ckpt: {', '.join(f'model.{key}={shown(a)}' for key, a, _ in diffs)} taken from "
                f"{ckpt_path}.")


    def _check_resolved(self, path: str | None, subcommand: str = "fit", keyword: str = "last") -> None:
        """The checkpoint ``--ckpt_path last`` (``keyword``) chose for ``subcommand``, checked like a ``--ckpt_path
        FILE`` (the model is built already, so a checkpoint of another model is refused, naming how to use it
        explicitly); only ``fit`` needs a resumable one."""
        if path is None:
            return
        problem, checkpoint = checkpoint_problem(path, resume=subcommand == "fit")
        if problem:
            self._error(f"ckpt_path={keyword!r} chose {path}, which {problem.removeprefix(f'ckpt_path={path!r} ')}")
        saved = checkpoint.get("hyper_parameters") if checkpoint is not None else None
        init = self._init(self.config[subcommand], "model")
        diffs = (model_differences(real_paths(saved), real_paths(init.as_dict()))
                 if isinstance(saved, dict) and init is not None else [])
        if diffs:
            how = {"fit": "Resume it with", "export": "Export it with"}.get(subcommand, "Use it with")
            fresh = ("" if subcommand != "fit"
                     else ", or log this run elsewhere (another trainer.logger name) to start fresh")
            self._error(f"ckpt_path={keyword!r} chose {path}, saved from a different model than this run's: "
                        f"{listing(diffs)}. {how} --ckpt_path {path} --model_from_ckpt true{fresh}.")

    def _chosen_logger_version(self, subcommand: str = "fit") -> int | str | None:
        """The first logger's ``version`` as configured (``--trainer.logger.init_args.version``) in ``subcommand``'s
        config, else ``None``."""
        logger = self.config[subcommand]["trainer"].get("logger")
        first = logger[0] if isinstance(logger, list) and logger else logger
        init = first.get("init_args") if isinstance(first, Namespace) else None
        return init.get("version") if isinstance(init, Namespace) else None

    def _resolve_last(self) -> str | None:
        dirs = checkpoint_dirs(self.trainer, self._chosen_logger_version())
        if not dirs:
            self._error(
                "ckpt_path='last' resumes from the run's ModelCheckpoint directory, but this run has no "
                "ModelCheckpoint (trainer.enable_checkpointing is false), so nothing is saved to resume from: add a "
                "ModelCheckpoint to trainer.callbacks (README: Resume and preemption) or drop --ckpt_path."
            )
        found, count = newest_checkpoint(dirs)
        where = " or ".join(os.path.relpath(d) if not os.path.isabs(d) else d for d in dirs)
        if found is None:
            notice(f"--ckpt_path last: no checkpoint yet in {where}; starting a fresh run "
                    "(the same command resumes from the newest checkpoint once one is saved).")
            return None
        if found.weights_only:
            self._error(refusal(found, count, where))
        notice(resume_notice(found, count, where))
        return found.path
