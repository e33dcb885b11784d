"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``; Lightning's ``strategy="fsdp"``) and the optimizers.

FSDP1 flattens a module's params into one 1-D ``FlatParameter`` and gives each rank a slice of it
(``use_orig_params=False``: the optimizer holds the flat slices; ``use_orig_params=True``: it holds the original
params, each a 1-D view of the part of the slice it covers, possibly empty). Both kinds carry the attribute
``_fsdp_flattened = True`` (:func:`is_fsdp1_flat`).

* **Checkpoints.** ``FSDP.optim_state_dict`` (save, full or sharded) and ``FSDP.optim_state_dict_to_load``
  (load) gather, unflatten and re-slice every state tensor of positive dimension as if it had one value per
  element of the local slice, with one dtype per state name on every rank. Block-wise codes and their
  per-block scales are neither, so :meth:`~.base.LowMemOptimizer.state_dict` presents the state of an FSDP1
  param in its **fp32 form** (:func:`fp32_presented`): every codes/scales pair decoded into an fp32 tensor of the
  param's local shape under the name the fp32 optimizer of the same family uses (``adamw_8bit`` ->
  ``exp_avg``/``exp_avg_sq`` as ``torch.optim.AdamW``; ``lion_8bit``, ``ademamix_8bit``: as ``lion``/``ademamix``;
  ``sgd`` with int8 momentum: ``momentum_buffer``), the step counter a 0-d tensor. Each optimizer's
  ``_fp32_state`` does the decoding with the functions its loads already use, and its ``load_state_dict``
  re-encodes the fp32 moments (``_convert_foreign_state``). Re-encoding a decoded block gives the same codes and
  scale whenever the block's scale is a normal fp32 number (>= 2**-126); blocks whose largest moment is
  below that (a moment under 1.2e-38) may come back with other codes of such magnitudes.
  Cost: the presented state is held at once while ``FSDP.optim_state_dict`` runs, 4 bytes per element and
  moment of the local slice (``adamw_8bit``: 8 B/param instead of 2.03), what ``torch.optim.AdamW`` keeps at
  all times; FSDP's full state dict then gathers fp32 as it does for torch's optimizers.
* **Whole-tensor optimizers** (:data:`WHOLE_TENSOR_OPTIMIZERS`: Adafactor and CAME factor and normalise over
  whole matrices, Muon orthogonalises them) would see 1-D slices: a different algorithm, silently. They
  refuse FSDP1 params at construction (:func:`check_not_fsdp1`) and
  :class:`~lowmem_lightning.callbacks.strategy_check.FSDP1Check` refuses them at fit setup, with one message
  (:func:`fsdp1_refusal`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sharding import is_dtensor

__all__ = ["FSDP_FLATTENED", "WHOLE_TENSOR_OPTIMIZERS", "is_fsdp1_flat", "fsdp1_refusal", "check_not_fsdp1",
           "fp32_presented"]

FSDP_FLATTENED = "_fsdp_flattened"
"""The attribute FSDP1 sets to True on every param it flattens (``torch.distributed.fsdp._common_utils``)."""

WHOLE_TENSOR_OPTIMIZERS: tuple[str, ...] = ("adafactor", "came", "muon", "muon_8bit")
"""Registered optimizers whose update needs whole tensors (row/column means, RMS; Muon's Newton–Schulz)."""

_ELEMENT_WISE = "adamw_8bit, adamw_4bit, paged_adamw_8bit, lion_8bit, ademamix_8bit, sgd, adamw"


def is_fsdp1_flat(param: torch.Tensor) -> bool:
    """Whether ``param`` is a param FSDP1 flattened (a ``FlatParameter`` slice or, with ``use_orig_params=True``,
    an original param viewing one); DTensors (FSDP2, tensor parallel) are not."""
    return bool(getattr(param, FSDP_FLATTENED, False)) and not is_dtensor(param)


def fsdp1_refusal(subject: str) -> str:
    """The one refusal of a whole-tensor optimizer under FSDP1: ``subject`` (what was given: ``"optimizer='came'
    with strategy=FSDPStrategy (FSDP1)"``, or the param and the class) followed by why and what to use instead."""
    return (
        f"Invalid {subject}: FSDP1 shards flattened params, so Adafactor/CAME/Muon would see 1-D slices instead of "
        "whole matrices (a different algorithm, silently). Use FSDP2 (fully_shard with Lightning's "
        "ModelParallelStrategy: in configure_model for the Trainer, in parallelize_fn for Fabric), or an element-wise "
        f"optimizer ({_ELEMENT_WISE})."
    )


def check_not_fsdp1(optimizer_name: str, group_index: int, params: Sequence[torch.Tensor]) -> None:
    """``ValueError`` (:func:`fsdp1_refusal`) naming the first FSDP1 param among ``params`` of param group
    ``group_index`` given to the whole-tensor optimizer class ``optimizer_name``."""
    for index, param in enumerate(params):
        if is_fsdp1_flat(param):
            raise ValueError(fsdp1_refusal(
                f"params for {optimizer_name}: param group {group_index}, param {index} (shape "
                f"{tuple(param.shape)}) is an FSDP1 flat parameter (FullyShardedDataParallel, strategy='fsdp')"
            ))


def fp32_presented(optimizer, state_dict: dict) -> dict:
    """``state_dict`` (``optimizer``'s, from ``torch.optim.Optimizer.state_dict``) with the state of every FSDP1
    param replaced by its fp32 form (``optimizer._fp32_state``: new tensors; the optimizer's own state is not
    touched), so ``FSDP.optim_state_dict`` gathers and re-slices it like ``torch.optim``'s (module doc)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = [group for group in optimizer.param_groups for _ in group["params"]]
    states = {}
    for pid, state in state_dict["state"].items():
        param = params[pid] if isinstance(pid, int) and 0 <= pid < len(params) else None
        flat = param is not None and is_fsdp1_flat(param)
        states[pid] = optimizer._fp32_state(param, dict(state), groups[pid]) if flat else state
    return {**state_dict, "state": states}
