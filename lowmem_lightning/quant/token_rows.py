"""Trainable token rows (peft's ``trainable_token_indices``) without a full-size copy of the weight.

peft's ``TrainableTokensLayer`` builds, on every forward, ``W = base.weight.index_copy(0, ids, delta)``: a
``vocab x hidden`` copy of the input embedding or output head with the trained rows put in (measured on CPU,
torch's profiler and ``saved_tensors_hooks``, a tiny Llama in bf16, LoRA + 2 trained rows vs LoRA alone):

* input embedding: the copy lives from the index_copy to the end of ``F.embedding`` (a forward transient), and
  backward makes a dense ``vocab x hidden`` gradient of it (``embedding_dense_backward``) only to pick the
  trained rows out of it;
* output head (untied, or tied: the tied head makes its own copy): ``F.linear`` saves the copy for backward,
  so it lives from the head's forward through its backward, across the step's peak (the loss), and backward
  makes another dense ``vocab x hidden`` gradient of it. Gradient checkpointing does not recompute either
  (only decoder layers are checkpointed), so each is made once per step.

For Llama-3-8B (128256 x 4096, bf16) each copy is 1.05 GB. :class:`CopyFreeTokensLayer` makes none of them:
the embedding looks rows up in the frozen base weight and puts the trained rows in at the positions whose id is
trained (``torch.where``; ``batch x seq x hidden`` tensors, the size of the output); the head multiplies by the
frozen base weight and writes the trained rows' logit columns in place (:class:`_TrainedRowsLinear`, saving only
its input and the small delta; backward adds the trained rows' correction ``grad[..., ids] @ (delta - W[ids])`` to
``grad @ W``: no ``batch x seq x vocab`` copy either).

The embedding's output equals peft's bit for bit. The head's trained logit columns come from a ``hidden x rows``
product instead of peft's ``hidden x vocab`` one, which BLAS may sum in another order (1 ulp in fp32; the other
columns are bit for bit), so the head takes this path only while the rows train (grad enabled: where peft's copy
would be saved for backward); without grad (validation, generation) peft's forward runs, its copy a transient
there, and the logits equal peft's, and those of ``PeftModel.from_pretrained`` on the saved adapter, bit for bit.
Gradients equal peft's within fp32 rounding. The layer keeps peft's attributes, so ``state_dict``,
``save_pretrained`` and ``PeftModel.from_pretrained`` are peft's own; any case it does not cover (several active
adapters, merged or disabled adapters, a trained base weight, ``max_norm`` / ``sparse`` / ``scale_grad_by_freq``
embeddings, a trained padding row, a head with a bias, other layer types) runs peft's forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.trainable_tokens import TrainableTokensLayer
from torch import nn

__all__ = ["CopyFreeTokensLayer", "use_copy_free_token_rows"]


class _TrainedRowsLinear(torch.autograd.Function):
    """``x @ W'^T`` where ``W'`` is ``weight`` with rows ``index`` replaced by ``delta``, without making ``W'``.

    Forward: ``logits = x @ weight^T``, then columns ``index`` overwritten in place by ``x @ delta^T``. Saves
    ``x``, ``weight`` (the frozen parameter itself, no copy), ``index`` and ``delta``. Backward:
    ``grad_x = grad @ weight + grad[..., index] @ (delta - weight[index])`` and
    ``grad_delta = grad[..., index]^T @ x`` (summed over every position); ``weight`` gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                delta: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, weight)
        logits.index_copy_(-1, index, F.linear(x, delta))
        ctx.save_for_backward(x, weight, index, delta)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, index, delta = ctx.saved_tensors
        picked = grad.index_select(-1, index)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight + picked @ (delta - weight.index_select(0, index))
        if ctx.needs_input_grad[3]:
            grad_delta = picked.reshape(-1, picked.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, None, None, grad_delta


def _linear_with_rows(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                      delta: torch.Tensor) -> torch.Tensor:
    """:class:`_TrainedRowsLinear` with autocast's casts done first (as ``F.linear`` under autocast would)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight, delta = x.to(dtype), weight.to(dtype), delta.to(dtype)
    with torch.autocast(device, enabled=False):
        return _TrainedRowsLinear.apply(x, weight, index, delta)


def _embedding_with_rows(ids: torch.Tensor, embedding: nn.Embedding, index: torch.Tensor,
                         delta: torch.Tensor) -> torch.Tensor:
    """``embedding(ids)`` with the rows ``index`` taken from ``delta`` instead: a lookup in the frozen base
    weight, then, at the positions whose id is in ``index``, the matching ``delta`` row (``torch.where``)."""
    order = torch.argsort(index)
    sorted_index = index[order]
    slot = torch.searchsorted(sorted_index, ids).clamp_(max=index.numel() - 1)
    trained = (sorted_index[slot] == ids).unsqueeze(-1)
    looked_up = F.embedding(ids, embedding.weight, padding_idx=embedding.padding_idx)
    return torch.where(trained, F.embedding(order[slot], delta), looked_up)


class CopyFreeTokensLayer(TrainableTokensLayer):
    """peft's ``TrainableTokensLayer`` whose forward makes no ``vocab x hidden`` copy of the weight (see the
    module docstring); same attributes, state dict, merge and saved adapter as peft's layer, same outputs.
    :func:`use_copy_free_token_rows` turns a peft model's layers into this one."""

    def forward_adapters(self, x: torch.Tensor, active_adapters, *args, **kwargs) -> torch.Tensor:
        """The layer's output for ``x`` (token ids for an embedding, hidden states for a head)."""
        if args or kwargs or not self._copy_free(active_adapters):
            return super().forward_adapters(x, active_adapters, *args, **kwargs)
        base = self.base_layer
        adapter = active_adapters[0]
        index = self._index_on(adapter, base.weight.device)
        delta = self.trainable_tokens_delta[adapter].to(base.weight)
        if isinstance(base, nn.Embedding):
            result = _embedding_with_rows(x, base, index, delta)
            scale = self._get_embed_scale()
            return result if scale is None else result * scale.to(result.dtype)
        return _linear_with_rows(x, base.weight, index, delta)

    def _index_on(self, adapter: str, device: torch.device) -> torch.Tensor:
        """``token_indices[adapter]`` as an int64 tensor on ``device``, made once per adapter and device: a tensor
        built from the Python list every forward would be a pageable host-to-device copy, which waits for the
        device (a host sync per step on a GPU)."""
        cache = self.__dict__.setdefault("_index_cache", {})
        ids = self.token_indices[adapter]
        key = (adapter, device)
        if key not in cache or cache[key][0] != ids:
            cache[key] = (list(ids), torch.tensor(ids, dtype=torch.int64, device=device))
        return cache[key][1]

    def _copy_free(self, active_adapters) -> bool:
        """Whether this forward can skip the copy: one active unmerged adapter on a frozen plain embedding, or on
        a bias-free linear head while the rows train (grad enabled: where peft's copy would be saved for backward;
        without grad its copy is a transient and peft's forward keeps the logits bit for bit); everything else runs
        peft's forward."""
        if self.disable_adapters or self.merged or len(active_adapters) != 1:
            return False
        base = self.base_layer
        if base.weight.requires_grad or type(base.weight) not in (torch.Tensor, nn.Parameter):
            return False
        if isinstance(base, nn.Embedding):
            return (base.max_norm is None and not base.scale_grad_by_freq and not base.sparse
                    and base.padding_idx not in self.token_indices[active_adapters[0]])
        training = torch.is_grad_enabled() and self.trainable_tokens_delta[active_adapters[0]].requires_grad
        return training and type(base) is nn.Linear and base.bias is None


def use_copy_free_token_rows(model: nn.Module) -> int:
    """Turn every peft ``TrainableTokensLayer`` of ``model`` (a peft model with ``trainable_token_indices``) into a
    :class:`CopyFreeTokensLayer`, in place (the instance's class only: its tensors, state dict keys and saved
    adapter stay peft's). Returns how many layers changed (0 for a model without trainable token rows)."""
    layers = [module for module in model.modules() if type(module) is TrainableTokensLayer]
    for layer in layers:
        layer.__class__ = CopyFreeTokensLayer
    return len(layers)
