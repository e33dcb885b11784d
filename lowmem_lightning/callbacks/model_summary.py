"""Lightning's model summary with NF4 weights counted: a QLoRA model's frozen base is NF4 code and scale buffers,
which ``parameters()`` (what Lightning's ``ModelSummary`` counts) does not hold, so the table said "Total params:
478 K" for a 3.3M-parameter model and ~300M for a 7B. :func:`count_nf4_in_model_summaries` makes each
``ModelSummary`` / ``RichModelSummary`` callback of a Trainer count them: every 4-bit weight as one parameter
(non-trainable, as ``out x in`` elements of a ``Linear4bit`` and every expert's matrices of an ``Experts4bit``), in
the layer rows and the totals, and their stored bytes in the estimated size. Embedding tables held in host memory
(``host_embeddings``: :class:`~lowmem_lightning.quant.host_embeddings.HostEmbedding`, neither parameters nor buffers)
count the same way, so the totals do not change with that option. A model with neither gets Lightning's summary
unchanged."""

from __future__ import annotations

import sys
from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary

__all__ = ["NF4ModelSummary", "count_nf4_in_model_summaries"]


def _nf4_weights(module) -> tuple[int, int]:
    """``(elements, bytes)`` of ``module``'s NF4 weights; none unless :mod:`lowmem_lightning.quant` is imported (no NF4
    layer exists before it is, and importing it, peft and transformers would cost a fit without NF4 seconds)."""
    convert = sys.modules.get("lowmem_lightning.quant.convert")
    return convert.nf4_weights(module) if convert is not None else (0, 0)


def _host_table_elements(module) -> int:
    """Elements of the embedding tables ``module`` holds in host memory (none unless
    :mod:`lowmem_lightning.quant.host_embeddings` is imported: no such table exists before)."""
    hosted = sys.modules.get("lowmem_lightning.quant.host_embeddings")
    if hosted is None:
        return 0
    return sum(table.numel() for table in hosted.host_tables(module).values())


def _outside_parameters(module) -> int:
    """Weights of ``module`` that ``parameters()`` does not hold: NF4 weights and host-memory embedding tables."""
    return _nf4_weights(module)[0] + _host_table_elements(module)


class NF4ModelSummary(Summary):
    """Lightning's ``ModelSummary`` counting the NF4 weights (buffers) and host-memory embedding tables of each layer
    as its parameters: ``param_nums`` and ``total_parameters`` add their elements (trainable counts are unchanged, so
    they land in "Non-trainable params"), ``model_size`` (MB) is the parameters and host tables at the precision's
    bytes plus the NF4 codes and scales as stored."""

    @property
    def param_nums(self) -> list[int]:
        return [layer.num_parameters + _outside_parameters(layer._module) for layer in self._layer_summary.values()]

    @property
    def total_parameters(self) -> int:
        return super().total_parameters + _outside_parameters(self._model)

    @property
    def model_size(self) -> float:
        parameters = super().total_parameters + _host_table_elements(self._model)  # host tables: as the params were
        return parameters * self._precision_megabytes + _nf4_weights(self._model)[1] * 1e-6


def _counting_nf4(summary_of: Callable) -> Callable:
    def summary(trainer: L.Trainer, pl_module: L.LightningModule):
        found = summary_of(trainer, pl_module)
        if type(found) is Summary and _outside_parameters(pl_module):
            found.__class__ = NF4ModelSummary
        return found

    return summary


def count_nf4_in_model_summaries(trainer: L.Trainer) -> None:
    """Make every ``ModelSummary`` callback of ``trainer`` (``RichModelSummary`` too) summarize with
    :class:`NF4ModelSummary` when the module holds NF4 weights (on this instance only; once). Call it before
    ``on_fit_start`` (a ``setup`` hook): the summary is made then."""
    for callback in trainer.callbacks:
        if isinstance(callback, ModelSummary) and "_summary" not in vars(callback):
            callback._summary = _counting_nf4(callback._summary)
