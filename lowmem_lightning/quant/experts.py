"""MoE experts held as 3-D parameters, in NF4: :func:`quantize_experts` and the :class:`Experts4bit` forward.

transformers 5 keeps a mixture-of-experts layer's experts as one module with 3-D parameters, ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I) (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE, gpt-oss, ...: the
classes ``transformers.integrations.moe.use_experts_implementation`` decorates, whose flags say the layout:
``is_transposed`` (E, in, out), ``has_bias``, ``has_gate`` (``up_proj`` alone), ``has_post_expert_norm``). They are
most of such a model's weights, and no ``nn.Linear``, so a QLoRA model built by converting linear layers keeps
them in bf16 (bitsandbytes#1849).

:func:`quantize_experts` stores each expert's matrix of each projection in NF4 on its own, as a
:class:`~lowmem_lightning.quant.Linear4bit` of that matrix would (same codes, block scales and double
quantization; ~0.516 B/weight), as buffers of the experts module (``gate_up_proj_qweight`` (E, ceil(n/2)),
``gate_up_proj_qscale`` (E, blocks), ...), and makes the module an :class:`Experts4bit` of its own class (the class
is kept as a base: its ``_apply_gate``, activation and attributes apply unchanged). Its forward is the eager
experts loop of transformers (tokens grouped by expert; per hit expert ``y = down(gate(x @ W_gu.T + b))``, scaled
by the routing weight, summed into the token's row), with each expert's weight decoded when its matmul runs and
decoded again in backward for the input gradient (the weights are frozen): activation memory holds no dense
expert. The module's 3-D parameters are gone, so peft's ``all-linear`` and a ``target_modules`` list see nothing
new to adapt (LoRA adapts the attention and any dense MLP, as for a bitsandbytes model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowmem_lightning.kernels.nf4 import SCALE_BLOCK, NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["Experts4bit", "quantize_experts", "is_quantizable_experts", "experts_projections"]

_BUFFERS = ("qweight", "absmax", "qscale", "scale_step", "scale_mean")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def experts_projections(module: nn.Module) -> tuple[str, ...]:
    """The 3-D weight names of an experts module: ``("gate_up_proj", "down_proj")``, or ``("up_proj", "down_proj")``
    when it has no gate (``has_gate`` False)."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj", "down_proj")


def is_quantizable_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of transformers' experts interface (``is_transposed`` and
    ``has_gate`` set by ``use_experts_implementation``) holding its projections as 3-D floating parameters."""
    if isinstance(module, Experts4bit) or not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return False
    params = [module._parameters.get(name) for name in experts_projections(module)]
    return all(p is not None and p.dim() == 3 and p.dtype in _FLOAT_DTYPES for p in params)


class _NF4ExpertFunction(torch.autograd.Function):
    """``y = x @ W_e.T`` with expert ``e``'s matrix of projection ``proj`` decoded from NF4 in forward and again in
    backward (nothing dense saved; the weight is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, experts: Experts4bit, proj: str, expert: int) -> torch.Tensor:
        ctx.experts, ctx.proj, ctx.expert = experts, proj, expert
        return x @ experts.dequantize_expert(proj, expert, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = ctx.experts.dequantize_expert(ctx.proj, ctx.expert, grad_out.dtype)
        return grad_out @ weight, None, None, None


def _rebuild_experts4bit(base: type, state: dict) -> nn.Module:
    """Unpickle / deepcopy an :class:`Experts4bit` of ``base`` (its class is made again, not looked up by name)."""
    module = nn.Module.__new__(_experts4bit_class(base))
    module.__setstate__(state)
    return module


class Experts4bit(nn.Module):
    """Mixed in ahead of an experts class by :func:`quantize_experts`: the forward and storage of experts whose
    projections are NF4 buffers (``{proj}_qweight``, ``{proj}_qscale``, ``{proj}_scale_step``, ``{proj}_scale_mean``,
    or ``{proj}_absmax`` without double quantization; leading dimension the expert), each expert's (out, in) matrix
    quantized on its own. ``nf4_shapes[proj]`` is that (out, in); ``nf4_weight_dtype`` the dtype it decodes to
    by default; biases (``{proj}_bias``) stay parameters, frozen.

    Forward takes the experts interface's ``(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K))`` and
    returns (T, H) in ``hidden_states``' dtype; the matmuls run in the autocast dtype when autocast is on, else in
    the input's dtype. Gradients flow to the input and the routing weights.
    """

    _experts_base: type = nn.Module

    def __reduce_ex__(self, protocol):
        return _rebuild_experts4bit, (self._experts_base, self.__dict__.copy())

    def nf4_weight(self, proj: str, expert: int) -> NF4Weight:
        """Expert ``expert``'s matrix of projection ``proj`` as an :class:`NF4Weight` view of the buffers (no copy)."""
        rows = {name: self._buffers.get(f"{proj}_{name}") for name in _BUFFERS}
        get = lambda name: None if rows[name] is None else rows[name][expert]
        return NF4Weight(get("qweight"), get("absmax"), get("qscale"), get("scale_step"), get("scale_mean"),
                         torch.Size(self.nf4_shapes[proj]), self.nf4_weight_dtype, self.nf4_block_size)

    def dequantize_expert(self, proj: str, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert ``expert``'s (out, in) matrix of ``proj`` decoded in ``dtype`` (default ``nf4_weight_dtype``)."""
        return dequantize_nf4(self.nf4_weight(proj, expert), dtype or self.nf4_weight_dtype)

    def dequantize(self, proj: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole 3-D parameter ``proj`` decoded, in the layout the model stores it ((E, in, out) when
        ``is_transposed``)."""
        experts = [self.dequantize_expert(proj, e, dtype) for e in range(self._buffers[f"{proj}_qweight"].shape[0])]
        return torch.stack([w.t() for w in experts] if self.is_transposed else experts)

    @torch.no_grad()
    def quantize_expert_(self, proj: str, expert: int, weight: torch.Tensor) -> None:
        """Store the NF4 codes of ``weight``, expert ``expert``'s matrix of ``proj`` in the model's layout ((in, out)
        when ``is_transposed``), in place; buffers still on the meta device are allocated on ``weight``'s device."""
        matrix = weight.t() if self.is_transposed else weight
        if tuple(matrix.shape) != tuple(self.nf4_shapes[proj]):
            raise ValueError(f"Invalid {proj}[{expert}] of shape {tuple(weight.shape)}: expected "
                             f"{self.layout_shape(proj)[1:]}.")
        w = quantize_nf4(matrix.detach().contiguous(), self.nf4_block_size, self.nf4_double_quant)
        for name in _BUFFERS:
            value = getattr(w, "packed" if name == "qweight" else name)
            if value is None:
                continue
            key = f"{proj}_{name}"
            store = self._buffers[key]
            if store.device.type == "meta":
                store = self._buffers[key] = torch.zeros(store.shape, dtype=store.dtype, device=value.device)
            store[expert].copy_(value.reshape(store.shape[1:]))
        self.nf4_weight_dtype = weight.dtype

    def layout_shape(self, proj: str) -> tuple[int, int, int]:
        """The 3-D shape of ``proj`` as the model (and a checkpoint) stores it."""
        out_features, in_features = self.nf4_shapes[proj]
        experts = self._buffers[f"{proj}_qweight"].shape[0]
        return (experts, in_features, out_features) if self.is_transposed else (experts, out_features, in_features)

    def _allocate(self, proj: str, experts: int, out_features: int, in_features: int, device) -> None:
        n = out_features * in_features
        blocks = math.ceil(n / self.nf4_block_size)
        sizes = {"qweight": (math.ceil(n / 2), torch.uint8)}
        if self.nf4_double_quant:
            sizes.update(qscale=(blocks, torch.int8), scale_step=(math.ceil(blocks / SCALE_BLOCK), torch.float32),
                         scale_mean=(1, torch.float32))
        else:
            sizes["absmax"] = (blocks, torch.float32)
        for name, (size, dtype) in sizes.items():
            self.register_buffer(f"{proj}_{name}", torch.empty(experts, size, dtype=dtype, device=device))
        self.nf4_shapes[proj] = (out_features, in_features)

    def _linear(self, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        out = _NF4ExpertFunction.apply(x, self, proj, expert)
        bias = self._parameters.get(f"{proj}_bias") if self.has_bias else None
        return out if bias is None else out + bias[expert].to(out.dtype)

    def forward(self, hidden_states: torch.Tensor, *routing, **named) -> torch.Tensor:
        """The experts of ``top_k_index`` applied to their tokens and summed with ``top_k_weights``."""
        top_k_index, top_k_weights = (*routing, *named.values())
        device_type = hidden_states.device.type
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden_states.dtype
        first, down = experts_projections(self)
        post_norm = getattr(self, "has_post_expert_norm", False)  # the interface has it from transformers 5.20
        experts = self._buffers[f"{down}_qweight"].shape[0]
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        with torch.autocast(device_type, enabled=False):
            for expert in (e for e in hit if e < experts):
                top_k_pos, token_idx = torch.where(mask[expert])
                state = self._linear(first, expert, hidden_states[token_idx].to(dtype))
                state = self._apply_gate(state) if self.has_gate else self.act_fn(state)
                state = self._linear(down, expert, state)
                if post_norm:
                    state = self.post_expert_norm(state)
                state = state * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, state.to(final.dtype))
        return final

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() move the codes and fp32 scales but never cast them; nf4_weight_dtype follows.
        saved = {name: self._buffers[name] for name in self.nf4_buffer_names()}
        probe = fn(torch.empty(0, dtype=self.nf4_weight_dtype, device=next(iter(saved.values())).device))
        super()._apply(fn, recurse)
        for name, before in saved.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        if probe.dtype in _FLOAT_DTYPES:
            self.nf4_weight_dtype = probe.dtype
        return self

    @property
    def nf4_nbytes(self) -> int:
        """Bytes of the NF4 codes and scales of every projection."""
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in self.nf4_buffer_names())

    def nf4_buffer_names(self) -> list[str]:
        """The names of the NF4 code and scale buffers (``gate_up_proj_qweight``, ...), in registration order."""
        names = {f"{proj}_{leaf}" for proj in self.nf4_shapes for leaf in _BUFFERS}
        return [name for name, t in self._buffers.items() if name in names and t is not None]

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{proj}={self.layout_shape(proj)}" for proj in self.nf4_shapes)
        return (f"{shapes}, nf4 block_size={self.nf4_block_size}, double_quant={self.nf4_double_quant}, "
                f"weight_dtype={self.nf4_weight_dtype}")


_CLASSES: dict[type, type] = {}


def _experts4bit_class(base: type) -> type:
    """``Experts4bit`` mixed in ahead of ``base`` (one class per base, made once)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"{base.__name__}4bit", (Experts4bit, base), {"_experts_base": base,
                                                                           "__module__": __name__})
    return _CLASSES[base]


@torch.no_grad()
def quantize_experts(module: nn.Module, block_size: int = 64, double_quant: bool = True) -> Experts4bit:
    """Store the 3-D projections of experts module ``module`` in NF4, in place (each expert's matrix quantized on
    its own device; meta parameters give meta buffers to fill with :meth:`Experts4bit.quantize_expert_`), drop the
    parameters, freeze the biases and make ``module`` an :class:`Experts4bit`; returns it. ``ValueError`` when
    ``module`` is no experts module :func:`is_quantizable_experts` accepts."""
    if not is_quantizable_experts(module):
        raise ValueError(f"Invalid module {type(module).__name__}: expected an experts module of transformers' experts "
                         "interface with 3-D floating gate_up_proj/up_proj and down_proj parameters.")
    weights = {proj: module._parameters.pop(proj) for proj in experts_projections(module)}
    module.__class__ = _experts4bit_class(type(module))
    module.nf4_shapes, module.nf4_block_size, module.nf4_double_quant = {}, block_size, double_quant
    module.nf4_weight_dtype = next(iter(weights.values())).dtype
    for proj, weight in weights.items():
        experts, rows, cols = weight.shape
        out_features, in_features = (cols, rows) if module.is_transposed else (rows, cols)
        module._allocate(proj, experts, out_features, in_features, weight.device)
        if weight.device.type != "meta":
            for expert in range(experts):
                module.quantize_expert_(proj, expert, weight[expert])
        del weight
    for param in module.parameters(recurse=False):
        param.requires_grad_(False)
    return module
