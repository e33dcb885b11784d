"""Params an optimizer cannot update, refused by name when the optimizer is built (before any step).

Two kinds of param reach an optimizer through ordinary modules and fail only at its first step otherwise, with a
message that names a param group and an index, not the param:

* the weight of an ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)``: its gradients are sparse
  tensors, which neither this package's optimizers nor torch's ``AdamW`` update (torch has ``SparseAdam``);
* a complex param (``torch.complex64``): torch's ``AdamW`` updates it as its real view (``torch.view_as_real``:
  the real and imaginary parts as independent elements), this package's optimizers take real floating-point
  params only. The same algorithm is had by storing the param as its real view and viewing it complex in
  ``forward``.

:func:`unsupported_params` is called by :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` when it builds
the optimizer and by :class:`~lowmem_lightning.modules.LowMemModule` in ``configure_optimizers``.

A third kind is not the optimizer's but a weight-averaging callback's: :func:`averaged_codes_refusal` (called at fit
start by the callback and by :class:`~lowmem_lightning.modules.CausalLMModule`) refuses an EMA that would average
the NF4 codes of a QLoRA model.

And one is a note, not a refusal: :func:`upcast_frozen_note` (a warning at fit start) tells a QLoRA model whose frozen
weights were cast up to fp32 around its 16-bit NF4 layers, as peft's ``prepare_model_for_kbit_training`` does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["unsupported_params", "averaged_codes_refusal", "upcast_frozen_note"]


def _names(module: nn.Module | None) -> dict[int, str]:
    """id(param) -> its name in ``module`` (the first name of a param shared by two modules)."""
    if module is None:
        return {}
    names: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return names


def _sparse_weights(module: nn.Module | None) -> dict[int, str]:
    """id(weight) -> the class name of each ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True`` in ``module``."""
    if module is None:
        return {}
    return {id(m.weight): type(m).__name__ for m in module.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)}


def unsupported_params(optimizer: str, cls: type, params: Iterable[torch.Tensor],
                       module: nn.Module | None) -> str | None:
    """Why the optimizer ``cls`` (registered as ``optimizer``) cannot update one of the trainable ``params`` of
    ``module`` (a sentence naming the param and what to do), else ``None``: a weight with sparse gradients
    (``sparse=True`` embeddings), or, for this package's optimizers, a complex param."""
    names = _names(module)
    sparse = _sparse_weights(module)
    ours = cls.__module__.startswith("lowmem_lightning.")
    for param in params:
        if not param.requires_grad:
            continue
        name = names.get(id(param)) or f"of shape {tuple(param.shape)}"  # a lazy param is named: no shape asked
        if id(param) in sparse:
            return (f"Invalid optimizer={optimizer!r} for param {name!r}: its {sparse[id(param)]}(sparse=True) gives "
                    f"it sparse gradients, which {cls.__name__} cannot update (torch's AdamW cannot either; torch."
                    "optim.SparseAdam can). Create the embedding with sparse=False (dense gradients), "
                    "or freeze it (requires_grad_(False)).")
        if ours and param.is_complex():
            return (f"Invalid optimizer={optimizer!r} for param {name!r} ({param.dtype}): {cls.__name__} updates "
                    "real floating-point params only (torch's AdamW updates a complex param as its real view). Get "
                    "the same algorithm by storing it real: nn.Parameter(torch.view_as_real(w)) in __init__ and "
                    "torch.view_as_complex(self.w) in forward; or use optimizer='adamw' (torch's AdamW).")
    return None


def averaged_codes_refusal(module: nn.Module) -> str | None:
    """Why a weight-averaging callback of ``module``'s fit would destroy its NF4 weights, else ``None``.

    Lightning's ``WeightAveraging`` / ``EMAWeightAveraging`` average buffers too by default (``use_buffers=True``):
    torch's ``AveragedModel`` then runs the average over the packed NF4 codes and the int8 block scales of every
    :class:`~lowmem_lightning.quant.Linear4bit` (``0.999 * code + 0.001 * code`` written back into uint8 truncates),
    and copies the result into the model at each validation and at the end of fit: the frozen base is changed at the
    first update. With ``use_buffers=False`` the buffers follow the model and only the parameters (the LoRA adapters)
    are averaged. An average that shares the module's NF4 layers
    (:class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen`, the default under ``LowMemOptimizerCallback``
    and ``LowMemModule``) is never refused: a shared layer averaged with itself stays as it is. What is left refused
    is an average that holds copies of them (kept on another device, ``device=``; a sharded module). ``module`` is the
    LightningModule (any, with the Trainer attached: its callbacks are read). It imports nothing: a model with NF4
    layers has imported their module, and importing :mod:`lowmem_lightning.quant` (peft, transformers, and
    bitsandbytes where installed) would cost a fit without NF4 seconds."""
    from lightning.pytorch.callbacks import WeightAveraging

    from lowmem_lightning.callbacks.averaging import quantized_layer_kinds

    kinds = quantized_layer_kinds()
    trainer = getattr(module, "_trainer", None)
    if not kinds or trainer is None or not any(isinstance(m, kinds) for m in module.modules()):
        return None
    for callback in trainer.callbacks:
        if not isinstance(callback, WeightAveraging):
            continue
        average = getattr(callback, "_average_model", None)
        if average is not None and _shares_layers(average.module, module, kinds):
            continue  # its NF4 layers are the module's own: averaging one with itself leaves it as it is
        if getattr(average, "use_buffers", getattr(callback, "_use_buffers", False)):
            return (f"{type(callback).__name__}(use_buffers=True) cannot average a model with NF4-quantized layers "
                    "(quantize='nf4'): it would average their packed 4-bit codes and int8 scales (buffers) as numbers "
                    "and write the result back into the frozen base, destroying it. Pass use_buffers=False (the "
                    f"buffers then follow the model; the trainable params, the LoRA adapters, are averaged): "
                    f"{type(callback).__name__}(..., use_buffers=False).")
    return None


_SIXTEEN_BITS = (torch.bfloat16, torch.float16)


def upcast_frozen_note(module: nn.Module) -> str | None:
    """The warning for ``module`` when its NF4 layers hold 16-bit weights and every frozen floating-point param
    beside them is fp32 (peft's ``prepare_model_for_kbit_training`` casts them all up: embeddings, head, norms),
    naming their bytes and the call that prepares a model without the cast; ``None`` otherwise (no NF4 layer, an
    fp32 model, a frozen 16-bit param left). Imports nothing (as :func:`averaged_codes_refusal`)."""
    nf4 = getattr(sys.modules.get("lowmem_lightning.quant.linear4bit"), "Linear4bit", None)
    if nf4 is None:
        return None
    narrow = {m.weight_dtype for m in module.modules() if isinstance(m, nf4) and m.is_quantized}
    frozen = [(name, p) for name, p in module.named_parameters() if not p.requires_grad and p.is_floating_point()]
    if len(narrow) != 1 or not narrow <= set(_SIXTEEN_BITS) or not frozen:
        return None
    if any(p.dtype != torch.float32 for _, p in frozen):
        return None
    nbytes = sum(p.nbytes for _, p in frozen)
    largest = ", ".join(name for name, _ in sorted(frozen, key=lambda item: -item[1].numel())[:2])
    dtype = str(next(iter(narrow))).removeprefix("torch.")
    return (f"The {len(frozen)} frozen params outside the NF4 layers are float32 ({nbytes / 2**20:,.1f} MiB, largest "
            f"{largest}) while the NF4 layers hold {dtype} weights: peft's prepare_model_for_kbit_training casts "
            f"every frozen 16-bit param up, which takes {nbytes / 2 / 2**20:,.1f} MiB more than {dtype} and trains "
            "none of them. lowmem_lightning.quant.prepare_for_kbit_training(model) prepares the model the same way "
            "(frozen params, gradient checkpointing, input gradients) without the cast.")


def _shares_layers(average: nn.Module, module: nn.Module, kinds: tuple[type, ...]) -> bool:
    """Whether every layer of ``kinds`` in ``module`` is, in ``average`` (a copy of it), the module's own object."""
    for name, layer in module.named_modules():
        if isinstance(layer, kinds):
            try:
                if average.get_submodule(name) is not layer:
                    return False
            except AttributeError:
                return False
    return True
