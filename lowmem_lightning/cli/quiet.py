"""Known third-party console noise, and the one function that silences exactly it.

The ``lowmem`` command calls :func:`quiet_known_noise`; the library itself never changes warning
filters or log levels.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence

__all__ = ["KNOWN_LOG_NOISE", "KNOWN_WARNING_NOISE", "QUIET_RANKS_ENV", "UNSHARDED_WARNING_NOISE", "quiet_known_noise",
           "quiet_spawned_rank", "quiet_unsharded_noise"]

QUIET_RANKS_ENV = "LOWMEM_QUIET_SPAWNED_RANKS"
"""Set to ``1`` by a ``lowmem`` command while its Trainer starts ranks in new processes (``ddp_spawn``): such a
rank imports :mod:`lowmem_lightning.cli` (the console script is its main module) and quiets the same noise."""

KNOWN_LOG_NOISE: tuple[tuple[str, str], ...] = (
    # Lightning's advertisement, printed by every Trainer without a LitLogger
    ("lightning.pytorch.utilities.rank_zero", r"^💡 Tip: For seamless cloud logging and experiment tracking"),
    # its twin, printed by every Trainer with a ModelCheckpoint when litmodels is not installed
    ("lightning.pytorch.utilities.rank_zero", r"^💡 Tip: For seamless cloud uploads and versioning"),
    # torchao (imported by transformers/peft when installed) on a machine without its CUDA extensions
    ("torchao", r"^Failed to load \S*torchao\S*_C\w*\S*\.so: "),
    # torch's deprecation of register_constant() on Enum subclasses, which torchao still calls
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile"),
    # Lightning's seed line from each rank that `--trainer.strategy ddp` starts as a new `lowmem` process (they seed
    # as the command did): the command's own "Seed set to N" stays, once, as under one process and ddp_spawn
    ("lightning.fabric.utilities.seed", r"^\[rank: [1-9]\d*\] Seed set to "),
    # bitsandbytes (imported by peft when installed) without the optional `kernels` package
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
)
"""``(logger name, message regex)`` of third-party log records that ``lowmem`` commands drop."""

KNOWN_WARNING_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # torch deprecated LeafSpec; Lightning's own _pytree helper still uses it
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # transformers renamed is_gradient_checkpointing; peft still calls the old name
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
    # torchdata's StatefulDataLoader calls torch.set_vital (deprecated); Lightning re-creates the predict loader
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\.stateful_dataloader"),
    # Lightning's model summary under a mixed precision (the QLoRA recipe's bf16-mixed): it sizes the params at 32
    # bits, which they are under autocast, so "will not be accurate" is wrong there (NF4 weights: their bytes)
    (r"Precision (bf)?16-mixed is not supported by the model summary", UserWarning,
     r"lightning\.pytorch\.utilities\.model_summary"),
)
"""``(message regex, category, module regex)`` of third-party warnings that ``lowmem`` commands ignore."""

UNSHARDED_WARNING_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning's WeightAveraging (EMAWeightAveraging) warns for any module that overrides configure_model that
    # "WeightAveraging doesn't support sharding model layers, so you may run out of memory": CausalLMModule builds
    # its model there and shards nothing unless the strategy does (FSDP, model parallel, DeepSpeed: kept there)
    (r"You're using the WeightAveraging callback with a model that overrides the configure_model", UserWarning,
     r".*"),
)
"""Third-party warnings that ``lowmem`` commands ignore when the run's strategy shards no model layer
(:func:`quiet_unsharded_noise`)."""


class _DropKnownRecords(logging.Filter):
    """Drops the log records whose message matches one of ``patterns``; passes every other record."""

    def __init__(self, patterns: Sequence[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_known_noise() -> None:
    """Silence exactly the known third-party messages above (by logger and message, or by warning
    message, category and module); everything else, our warnings and every error included, stays.

    Called by the ``lowmem`` entry point only: the library itself never changes warning filters or
    log levels. An application may call it too, before it imports transformers or peft.
    """
    by_logger: dict[str, list[str]] = {}
    for name, pattern in KNOWN_LOG_NOISE:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownRecords) for f in logger.filters):
            logger.addFilter(_DropKnownRecords(patterns))
    for message, category, module in KNOWN_WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_unsharded_noise() -> None:
    """Ignore :data:`UNSHARDED_WARNING_NOISE`: for a run whose strategy shards no model layer (the ``lowmem fit`` of
    such a run, inside its own ``warnings.catch_warnings()``; its spawned ``ddp_spawn`` ranks)."""
    for message, category, module in UNSHARDED_WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_spawned_rank() -> None:
    """:func:`quiet_known_noise` in a process that a ``lowmem`` command started for a rank of its fit
    (``ddp_spawn``: the command sets :data:`QUIET_RANKS_ENV` only while it starts them, after its own import of
    :mod:`lowmem_lightning.cli`); nothing anywhere else. Called on import of :mod:`lowmem_lightning.cli`, before
    transformers or peft are imported there (the spawned rank's parent is not known yet at that point). The
    package's own warnings show there as one line each too, as in the command's process."""
    if os.environ.get(QUIET_RANKS_ENV) == "1":
        quiet_known_noise()
        quiet_unsharded_noise()  # the ranks a command spawns are DDP's: no layer is sharded
        from lowmem_lightning.cli.messages import our_warnings_in_one_line

        our_warnings_in_one_line()
