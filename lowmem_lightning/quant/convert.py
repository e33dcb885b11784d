"""Whole models in 4 bits: :func:`quantize_model` (every ``nn.Linear`` -> :class:`~.linear4bit.Linear4bit`) and the
``is_loaded_in_4bit`` flag peft and transformers read (:func:`mark_loaded_in_4bit`, :class:`LoadedIn4bit`)."""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from lowmem_lightning.lowmem_warning import LowMemWarning

from .experts import Experts4bit, experts_projections, is_quantizable_experts, quantize_experts
from .linear4bit import Linear4bit, _check_options, _linear_tensors, _refuse_nonfinite, dense_layer, is_conv1d

__all__ = [
    "quantize_model", "dequantize_model", "mark_loaded_in_4bit", "LoadedIn4bit", "HEAD_MODULES", "ddp_skip_nf4_buffers",
    "unquantized_matrices", "warn_unquantized_matrices", "UNQUANTIZED_SHARE", "holds_nf4", "nf4_weights",
    "router_names",
    "clamped_weight_names",
    "kept_dense_names",
]

HEAD_MODULES = ("lm_head", "classifier", "score", "classification_head", "qa_outputs")
"""Module names :func:`quantize_model` keeps dense by default: the output heads of transformers' task models
(causal LM, sequence / token classification, question answering); peft's ``task_type="SEQ_CLS"`` /
``"TOKEN_CLS"`` trains ``classifier`` and ``score`` whole (``modules_to_save``, which matches every module whose
name ends with one: DistilBERT's ``pre_classifier`` too), which an NF4 layer inside would leave frozen but for its
bias."""


def _check_skip(skip) -> tuple[str, ...]:
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, Iterable) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"Invalid skip={skip!r}: expected a sequence of module names (str).")
    return tuple(skip)


def _is_skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether the layer ``name`` is, or lies inside, a module named by an entry of ``skip`` (an entry matches whole
    path components: ``classifier`` keeps ``classifier`` and ``roberta_head.classifier.out_proj``). An entry of
    :data:`HEAD_MODULES` also keeps a module whose name merely ends with it (DistilBERT's ``pre_classifier``), as
    peft's ``modules_to_save`` (``name.endswith(entry)``) picks the modules a task head trains whole."""
    prefixes = [name.rsplit(".", i)[0] for i in range(name.count(".") + 1)]
    return any(f".{s}." in f".{name}." or (s in HEAD_MODULES and any(p.endswith(s) for p in prefixes)) for s in skip)


def _output_embedding_names(model: nn.Module) -> tuple[str, ...]:
    """The qualified name(s) of ``model.get_output_embeddings()`` (a transformers model's head, e.g. a masked LM's
    ``cls.predictions.decoder`` tied to the input embeddings); none for other modules."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return tuple(name for name, module in model.named_modules() if head is not None and module is head and name)


def router_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the linear layers that route tokens in ``model``'s MoE blocks, which NF4 leaves dense: in a
    module holding an experts module (transformers' experts interface or :class:`Experts4bit`), those under a child
    named ``router`` (Gemma 4's ``router.proj``), and those named ``gate`` / ``..._gate`` with one output per expert
    or a single one (Qwen2-MoE's and Qwen3-Next's ``shared_expert_gate``; not Gemma 4's ``per_layer_input_gate``).
    A router's scores pick each token's experts: NF4 on Gemma 4's router sends about half the tokens of a random
    layer to another set of experts (``python benchmarks/router_precision.py``), for a few bytes per hidden unit per
    expert. Most routers of transformers 5 are no linear layer (a module of their own: kept dense anyway)."""
    names = []
    for block_name, block in model.named_modules():
        counts = [_expert_count(child) for child in block.children()
                  if is_quantizable_experts(child) or isinstance(child, Experts4bit)]
        if not counts:
            continue
        for name, module in block.named_modules():
            if not name or not (type(module) is nn.Linear or isinstance(module, Linear4bit)):
                continue
            parts = name.split(".")
            gate = (parts[-1] == "gate" or parts[-1].endswith("_gate")) and module.out_features in (1, *counts)
            if "router" in parts or gate:
                names.append(f"{block_name}.{name}" if block_name else name)
    return tuple(names)


CLAMPED_WEIGHT_LAYERS = ("prediction_coefs", "correction_coefs")
"""Linear layers of Gemma 3n's AltUp blocks whose weight transformers clamps in training mode (``prediction_coefs.weight
.data.clamp_(...)``, ``correction_coefs.weight.clamp(...)``, to ``altup_coef_clip``): an NF4 layer holds no weight
tensor (bitsandbytes' would clamp its packed codes), so they stay dense (``altup_num_inputs`` ** 2 outputs: tiny)."""


def clamped_weight_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the linear layers :data:`CLAMPED_WEIGHT_LAYERS` names inside an AltUp block of ``model``."""
    names = []
    for block_name, block in model.named_modules():
        if not type(block).__name__.endswith("AltUp"):
            continue
        for child in CLAMPED_WEIGHT_LAYERS:
            module = getattr(block, child, None)
            if type(module) is nn.Linear or isinstance(module, Linear4bit):
                names.append(f"{block_name}.{child}" if block_name else child)
    return tuple(names)


def kept_dense_names(model: nn.Module) -> tuple[str, ...]:
    """The linear layers NF4 leaves dense whatever ``skip`` says: MoE routers (:func:`router_names`) and weights
    transformers clamps while training (:func:`clamped_weight_names`)."""
    return router_names(model) + clamped_weight_names(model)


def _expert_count(experts: nn.Module) -> int:
    """How many experts an experts module holds (the first dimension of its 3-D projections)."""
    if isinstance(experts, Experts4bit):
        return experts.layout_shape(next(iter(experts.nf4_shapes)))[0]
    return experts._parameters[experts_projections(experts)[0]].shape[0]


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = HEAD_MODULES,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a frozen :class:`Linear4bit`, in place; returns ``model``
    (marked ``is_loaded_in_4bit`` when a layer was replaced, see :func:`mark_loaded_in_4bit`). A transformers
    ``Conv1D`` (GPT-2's linear layer, weight stored (in, out)) is one too: its ``Linear4bit`` has ``conv1d=True``.

    A layer is kept when it is, or lies inside, a module named by an entry of ``skip`` (whole path components:
    ``"lm_head"`` keeps ``model.lm_head``, ``"classifier"`` keeps RoBERTa's ``classifier.dense`` and
    ``classifier.out_proj``), and so is the module ``model.get_output_embeddings()`` returns (a transformers
    model's head by whatever name). The default, :data:`HEAD_MODULES`, keeps the heads of transformers' task models
    dense and trainable, as transformers keeps a bitsandbytes 4-bit model's last module; ``skip=()`` quantizes every
    layer but the output embeddings. MoE routers that are linear layers stay dense too (:func:`router_names`), and so
    do Gemma 3n's AltUp coefficients, which transformers clamps in training (:func:`clamped_weight_names`). Each
    weight is quantized on its own device (Triton on CUDA) and released as soon as its layer is replaced; meta weights
    give meta layers (shapes only).
    MoE experts held as 3-D parameters (transformers' experts interface: Mixtral, Qwen-MoE, DeepSeek-V3, gpt-oss,
    ...) are quantized too, each expert's matrix on its own (:func:`~lowmem_lightning.quant.experts.quantize_experts`),
    unless ``skip`` names them.

    Before any layer is replaced, the weight and bias of every layer to quantize are checked for nan /
    +-inf (one min/max reduction each, one host sync for all): any found raise
    :class:`NonFiniteWeightError` naming each tensor (``model.layers.3.mlp.down_proj.weight``) and its
    count, and ``model`` is left unchanged. Other parameters (embeddings, norms, skipped layers) are not
    transformed here and not checked; :func:`~lowmem_lightning.quant.load_pretrained_causal_lm` checks
    every tensor it reads.
    """
    skip = _check_skip(skip)
    _check_options(block_size, double_quant, compute_dtype)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    skip += _output_embedding_names(model) + kept_dense_names(model)
    targets = [
        (name, module) for name, module in model.named_modules()
        if (type(module) is nn.Linear or is_conv1d(module)) and not _is_skipped(name, skip)
    ]
    experts = [(name, module) for name, module in model.named_modules()
               if is_quantizable_experts(module) and not _is_skipped(name, skip)]
    named = [pair for name, linear in targets if linear.weight.device.type != "meta"
             for pair in _linear_tensors(name, linear)]
    named += [(f"{name}.{leaf}", param) for name, module in experts
              for leaf, param in module.named_parameters(recurse=False) if param.device.type != "meta"]
    _refuse_nonfinite(named, "quantize_model")
    del named
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Linear4bit._quantized_copy(linear, block_size, double_quant, compute_dtype))
    for _, module in experts:
        quantize_experts(module, block_size, double_quant)
    if targets or experts:
        mark_loaded_in_4bit(model)
        warn_unquantized_matrices(model, skip)
    return model


UNQUANTIZED_SHARE = 0.10
"""The share of a 4-bit model's weights (elements) held in matrices NF4 does not cover above which
:func:`warn_unquantized_matrices` warns."""


def unquantized_matrices(model: nn.Module, skip: Iterable[str] = ()) -> tuple[list[tuple[str, torch.Tensor]], int]:
    """``([(name, param)], total)``: the floating parameters of two or more dimensions that no
    :class:`Linear4bit` or :class:`Experts4bit` holds, outside embeddings, dense linear layers and the modules ``skip``
    names (3-D MoE experts outside transformers' experts interface, Llama 4's ``experts.gate_up_proj``: weights NF4
    leaves in full precision), and ``total``, the elements of every weight of the model (NF4 ones counted as their
    dense elements)."""
    skip = tuple(skip)
    found, total = [], 0
    for name, module in model.named_modules():
        total += _nf4_elements(module)
        covered = isinstance(module, (nn.Embedding, nn.Linear)) or is_conv1d(module) or _is_skipped(name, skip)
        for leaf, param in module.named_parameters(recurse=False):
            total += param.numel()
            if not covered and param.dim() >= 2 and param.is_floating_point() and not leaf.endswith("bias"):
                found.append((f"{name}.{leaf}" if name else leaf, param))
    return found, total


def holds_nf4(module: nn.Module) -> bool:
    """Whether ``module`` itself stores weights in NF4: a 4-bit :class:`Linear4bit` or an :class:`Experts4bit`."""
    return (isinstance(module, Linear4bit) and module.is_quantized) or isinstance(module, Experts4bit)


def _nf4_elements(module: nn.Module) -> int:
    """The weight elements ``module`` itself holds in NF4 (a :class:`Linear4bit`'s ``out x in``, every expert's
    matrices of an :class:`Experts4bit`), 0 for any other module."""
    if isinstance(module, Experts4bit):
        return sum(math.prod(module.layout_shape(proj)) for proj in module.nf4_shapes)
    return module.in_features * module.out_features if holds_nf4(module) else 0


def nf4_weights(module: nn.Module) -> tuple[int, int]:
    """``(elements, bytes)`` of the weights ``module`` and its submodules hold in NF4: each 4-bit :class:`Linear4bit`'s
    ``out x in`` and every :class:`Experts4bit` expert's matrices, and the bytes of their codes and scales (biases,
    which are parameters, aside). They are buffers, so ``parameters()`` counts none of them."""
    elements = nbytes = 0
    for layer in module.modules():
        if holds_nf4(layer):
            elements += _nf4_elements(layer)
            names = layer.nf4_buffer_names() if isinstance(layer, Experts4bit) else list(layer._buffers)
            nbytes += sum(layer._buffers[n].numel() * layer._buffers[n].element_size() for n in names
                          if layer._buffers[n] is not None)
    return elements, nbytes


def warn_unquantized_matrices(model: nn.Module, skip: Iterable[str] = ()) -> None:
    """One ``LowMemWarning`` when more than :data:`UNQUANTIZED_SHARE` of a 4-bit ``model``'s weights are matrices
    NF4 does not cover (:func:`unquantized_matrices`: Llama 4's 3-D experts, outside transformers' experts
    interface), naming their share, their
    bytes and the two largest: they stay in full precision, so the model takes several times the memory a 4-bit model
    of its size would."""
    found, total = unquantized_matrices(model, skip)
    elements = sum(param.numel() for _, param in found)
    if not total or elements <= UNQUANTIZED_SHARE * total:
        return
    found.sort(key=lambda item: -item[1].numel())
    nbytes = sum(param.numel() * param.element_size() for _, param in found)
    dtypes = sorted({str(param.dtype).removeprefix("torch.") for _, param in found})
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    warnings.warn(
        f"quantize='nf4' covers linear layers and the MoE experts of transformers' experts interface: "
        f"{elements / total:.0%} of this {kind} model's weights ({elements:,} params in {len(found)} tensors outside "
        "them, e.g. "
        f"{', '.join(name for name, _ in found[:2])}) stay {'/'.join(dtypes)}, frozen: {nbytes / 1e9:.3f} GB, "
        "as much as the unquantized model needs for them.", LowMemWarning, stacklevel=3)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`Linear4bit` of ``model`` (4-bit, or made dense by a LoRA merge) by the dense layer it
    stands for, in place: an ``nn.Linear``, or a transformers ``Conv1D`` for one with ``conv1d=True`` (weight
    back to (in, out)), holding ``dequantize(W)`` (or the merged weight) in the layer's ``weight_dtype``, frozen.
    ``save_pretrained`` then writes the dense architecture's tensors (``AutoModelForCausalLM.from_pretrained``
    loads it): after ``merge_and_unload()`` of adapters on some layers only, the other layers are still 4-bit.
    An :class:`Experts4bit` gets its 3-D parameters back (decoded in its ``nf4_weight_dtype``) and its own class.
    Returns ``model`` (``is_loaded_in_4bit`` reads False once no 4-bit layer is left)."""
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, _dense_layer(layer))
    for module in [m for m in model.modules() if isinstance(m, Experts4bit)]:
        _dense_experts(module)
    return model


def _dense_experts(module: Experts4bit) -> None:
    """Make ``module`` the plain experts module it stood for: decoded 3-D parameters (frozen), no NF4 buffers."""
    weights = {proj: module.dequantize(proj) for proj in experts_projections(module)}
    for name in module.nf4_buffer_names():
        del module._buffers[name]
    module.__class__ = module._experts_base
    for proj in ("nf4_shapes", "nf4_block_size", "nf4_double_quant", "nf4_weight_dtype"):
        module.__dict__.pop(proj, None)
    for proj, weight in weights.items():
        module._parameters[proj] = nn.Parameter(weight, requires_grad=False)


def _dense_layer(layer: Linear4bit) -> nn.Module:
    """The ``nn.Linear`` (or ``Conv1D``) holding ``layer``'s weight and bias, frozen, in its ``weight_dtype``."""
    bias = None if layer.bias is None else layer.bias.detach()
    return dense_layer(layer.dequantize(layer.weight_dtype), bias, layer.conv1d)


@torch.no_grad()
def ddp_skip_nf4_buffers(module: nn.Module, group=None) -> list[str]:
    """Keep the NF4 codes and scales of every :class:`Linear4bit` of ``module`` out of ``DistributedDataParallel``'s
    buffer broadcast; call it before ``module`` is wrapped (a Lightning module: in ``configure_model``). Returns
    their names (relative to ``module``).

    DDP broadcasts every buffer of the wrapped module from rank 0 before each training forward
    (``broadcast_buffers=True``, its default): the codes are buffers, so the whole frozen 4-bit base (codes and
    scales) would cross the network at every step, although no rank ever changes it (bitsandbytes' 4-bit weights
    are frozen parameters, which DDP broadcasts once, at wrapping). The names are added to
    ``module._ddp_params_and_buffers_to_ignore``, the attribute DDP reads when it wraps ``module``; and, when
    ``torch.distributed`` is initialized with more than one rank in ``group``, the buffers are broadcast once now
    from the group's first rank, as DDP's wrapping would have (ranks that built the base from differently seeded
    random weights start alike)."""
    import torch.distributed as dist

    names = [f"{name}.{buffer}" if name else buffer for name, layer in module.named_modules()
             if isinstance(layer, Linear4bit) for buffer, _ in layer.named_buffers(recurse=False)]
    names += [f"{name}.{buffer}" if name else buffer for name, layer in module.named_modules()
              if isinstance(layer, Experts4bit) for buffer in layer.nf4_buffer_names()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        source = dist.get_global_rank(group, 0) if group is not None else 0
        for name in names:
            dist.broadcast(module.get_buffer(name), src=source, group=group)
    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    module._ddp_params_and_buffers_to_ignore = ignored + [name for name in names if name not in ignored]
    return names


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training`` without its fp32 copies: freeze every param, and with
    ``use_gradient_checkpointing`` turn on the model's activation checkpointing with ``gradient_checkpointing_kwargs``
    (:func:`enable_activation_checkpointing`; ``use_reentrant=False`` unless they say otherwise, as transformers and
    peft 0.22 default to and torch asks to be told) and, where they say ``use_reentrant=True``, gradients on the input
    embeddings' output (reentrant checkpointing needs an input that requires grad). Returns ``model``.

    peft's function also casts every frozen fp16 / bf16 param that is not a bitsandbytes 4-bit weight to fp32: on our
    NF4 models the embeddings, the head and the norms, which then take twice their memory though nothing trains
    them (huggingface/peft#816, #1149, bitsandbytes-foundation/bitsandbytes#1569: "QLoRA uses more memory than bf16
    LoRA"). This one leaves every dtype as it is."""
    for param in model.parameters():
        param.requires_grad_(False)
    if not use_gradient_checkpointing:
        return model
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    if kwargs["use_reentrant"]:
        model.enable_input_require_grads()
    enable_activation_checkpointing(model, kwargs)
    return model


def enable_activation_checkpointing(model: nn.Module, kwargs: dict) -> None:
    """Turn on a transformers ``model``'s activation checkpointing with ``kwargs`` (``use_reentrant``, ...) by the
    installed transformers' name for it: ``activation_checkpointing_enable`` (the name from transformers 5.23, whose old
    ``gradient_checkpointing_enable`` warns that it goes in v6), else ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def mark_loaded_in_4bit(model: nn.Module) -> nn.Module:
    """Set ``model.is_loaded_in_4bit`` (an instance attribute, a :class:`LoadedIn4bit`), the flag with
    which transformers models loaded in 4 bits tell peft so: ``peft.prepare_model_for_kbit_training``
    then enables input gradients and gradient checkpointing, and ``PeftModel`` leaves them to it.
    Returns ``model``.

    The flag is true only while ``model`` holds a 4-bit :class:`Linear4bit` (once ``merge_and_unload``
    made every one dense it is false) *and* bitsandbytes can be imported: transformers reads the flag
    too, and its ``num_parameters()`` (the HF ``Trainer``'s FLOP count at every step, ``save_pretrained``
    of a sharded checkpoint) imports bitsandbytes when it is true. Without bitsandbytes the flag is
    false, so those keep working, and the first read warns once that ``prepare_model_for_kbit_training``
    will then not enable gradient checkpointing and input gradients (call
    ``model.gradient_checkpointing_enable()`` and ``model.enable_input_require_grads()`` yourself).
    """
    model.is_loaded_in_4bit = LoadedIn4bit(model)
    return model


def _bitsandbytes_importable() -> bool:
    """Whether ``import bitsandbytes`` would succeed (it is not imported). Warns once when not:
    transformers' ``num_parameters()`` imports it for a model marked 4-bit."""
    if "bitsandbytes" in sys.modules:
        found = sys.modules["bitsandbytes"] is not None
    else:
        found = _bitsandbytes_installed()
    if not found and not _WARNED_NO_BITSANDBYTES:
        _WARNED_NO_BITSANDBYTES.append(True)
        warnings.warn(
            "lowmem_lightning: model.is_loaded_in_4bit reads False because bitsandbytes is not installed "
            "(transformers' num_parameters(), which the HF Trainer calls every step, imports it for 4-bit "
            "models). peft.prepare_model_for_kbit_training therefore does not enable gradient checkpointing: "
            "call model.gradient_checkpointing_enable() and model.enable_input_require_grads() yourself.",
            LowMemWarning,
            stacklevel=3,
        )
    return found


_WARNED_NO_BITSANDBYTES: list[bool] = []


@functools.cache
def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


class LoadedIn4bit:
    """The value of ``model.is_loaded_in_4bit``: true while ``model`` has a :class:`Linear4bit` whose
    weight is still 4-bit (peft and transformers test it by truth value; ``== True`` works too)."""

    __slots__ = ("_model",)

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __bool__(self) -> bool:
        if not any(holds_nf4(m) for m in self._model.modules()):
            return False
        return _bitsandbytes_importable()

    def __eq__(self, other) -> bool:
        return bool(self) == other

    __hash__ = None

    def __repr__(self) -> str:
        return repr(bool(self))
