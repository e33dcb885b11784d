"""LoRA adapters (peft) on NF4 ``Linear4bit`` layers: a custom peft LoRA layer and ``add_lora``.

Plain ``peft.get_peft_model(model, LoraConfig(...))`` wraps ``Linear4bit`` with peft's own
``lora.Linear`` (``Linear4bit`` is an ``nn.Linear``; see :mod:`lowmem_lightning.quant`). This module
adds :class:`LoraLinear4bit`, registered through peft's per-config custom-module mechanism
(``LoraConfig._register_custom_module({LayerType: LoraLayerType})``, see peft's "Custom models"
guide): :func:`add_lora` registers it on the config it builds, :func:`register_peft_custom_module`
on a config of your own. Nothing is patched: importing this package leaves peft's classes as they are.

:class:`LoraLinear4bit` computes ``y = base(x) + lora_B(lora_A(dropout(x))) * scaling``. Merging
never re-quantizes: ``merge()`` swaps the 4-bit base for a dense ``nn.Linear`` holding
``dequantize(W) + B @ A * scaling`` (fp32 math, stored in the base's ``weight_dtype``), so
``merge_and_unload()`` returns full-precision linear layers; ``unmerge()`` restores the exact 4-bit
layer.

With ``use_dora=True`` it is DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) on
the 4-bit weight, QDoRA: ``W' = m * (W + s B A) / ||W + s B A||_row`` with the magnitude ``m`` (one trained value per
output row, ``lora_magnitude_vector`` as peft names and saves it) starting at ``||W||_row``, and the row norm treated as
a constant in backward (the paper's section 4.3). The forward is
``y = base(x) + (m / n - 1) * base_nobias(x_d) + (m / n) * lora_B(lora_A(x_d)) * s`` with ``x_d = dropout(x)`` and
``n = ||dequantize(W) + s B A||_row`` computed in fp32 without gradient (one transient dense weight per layer); with
dropout active the base runs again on ``x_d`` through the 4-bit layer (no dense weight is kept for backward). A merge
stores ``W'``. Adapters save and load as peft's DoRA.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraVariant
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.multimodal import language_model_modules, outside_language_model_pattern

from .experts import Experts4bit, is_quantizable_experts
from .linear4bit import Linear4bit, dense_layer, is_conv1d
from .token_rows import use_copy_free_token_rows

__all__ = ["LoraLinear4bit", "add_lora", "load_lora", "register_peft_custom_module", "resolve_target_modules",
           "LLAMA_TARGET_MODULES"]

LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear projections of a Llama decoder layer (QLoRA puts adapters on all of them)."""

_ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_VARIANT_OPTIONS_BEFORE_METADATA = ("use_dora", "alora_invocation_tokens", "arrow_config", "velora_config",
                                    "use_bdlora")
"""LoRA variant options of peft releases whose ``LoraConfig`` fields carry no ``is_lora_variant`` mark (0.19)."""


def _requested_lora_variants(config: LoraConfig) -> list[tuple[str, object]]:
    """``(option, value)`` of every LoRA variant ``config`` turns on (DoRA, aLoRA, VeLoRA, BD-LoRA, KaSA, ...): each
    field peft marks ``is_lora_variant`` (so variants of later peft releases count too) or named in
    :data:`_VARIANT_OPTIONS_BEFORE_METADATA`, set to anything but None or False. Initialisation variants
    (``init_lora_weights="mica"``, PiSSA, ...) are not listed: :class:`LoraLinear4bit` refuses every string init but
    ``"gaussian"``."""
    marked = {f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant")}
    names = sorted(marked | set(_VARIANT_OPTIONS_BEFORE_METADATA))
    return [(name, getattr(config, name)) for name in names if getattr(config, name, None) not in (None, False)]


class _Dora4bit(LoraVariant):
    """peft's hook for DoRA on a :class:`LoraLinear4bit`: ``init`` makes the magnitude vector; the forward and the
    merge are the layer's own (peft's DoRA reads the base weight as a tensor)."""

    @staticmethod
    def init(module: LoraLinear4bit, adapter_name: str, **kwargs) -> None:
        module._init_dora_magnitude(adapter_name)


class LoraLinear4bit(nn.Module, LoraLayer):
    """peft LoRA layer around a frozen :class:`Linear4bit`: plain LoRA, or DoRA with ``use_dora=True`` (see the module
    docstring); the other variants are refused.

    Constructed by peft's dispatcher as ``LoraLinear4bit(target, adapter_name, config=..., r=...,
    lora_alpha=...)``. The adapters live in ``lora_A`` / ``lora_B`` (fp32 unless cast); the input is
    cast to the adapter dtype outside autocast and the adapter output is added in the base output's
    dtype.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
        **kwargs,
    ) -> None:
        init = config.init_lora_weights
        if isinstance(init, str) and init.lower() != "gaussian":
            raise ValueError(
                f"Invalid init_lora_weights={init!r} for a 4-bit layer: expected True, False or 'gaussian' "
                "(initializations that read the base weight are not supported)."
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self._quantized_base: list[Linear4bit] = []  # the 4-bit layer while a merge replaces it
        self._dora_norms: dict[str, tuple[tuple, torch.Tensor]] = {}  # adapter -> (key, row norm), eval mode only
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        variants = [v for v in _requested_lora_variants(config) if v != ("use_dora", True)]
        if variants:
            option, value = variants[0]
            raise ValueError(f"Invalid {option}={value!r} for a 4-bit layer: only plain LoRA and DoRA (use_dora=True) "
                             "are supported (without register_peft_custom_module, peft's own LoRA layer takes the "
                             "variants that do not read the base weight).")
        return _Dora4bit() if config.use_dora else None

    def _base_weight(self) -> torch.Tensor:
        """The base layer's weight (out_features, in_features) in fp32: decoded while 4-bit."""
        base = self.get_base_layer()
        if isinstance(base, Linear4bit):
            return base.dequantize(torch.float32)
        weight = base.weight.float()
        return weight.t() if is_conv1d(base) else weight

    @torch.no_grad()
    def _dora_row_norm(self, adapter: str) -> torch.Tensor:
        """``||W + s B A||`` per output row (out_features,), fp32, without gradient (DoRA's constant norm); outside
        autocast, so a bf16-mixed forward uses the norm a merge uses. In eval mode it is kept while the weights it
        reads are the same tensors at the same version (:meth:`_dora_norm_key`): generation and validation decode
        each weight once, not once per forward."""
        key = self._dora_norm_key(adapter) if not self.training else None
        kept = self._dora_norms.get(adapter)
        if key is not None and kept is not None and kept[0] == key:
            return kept[1]
        device = self.lora_A[adapter].weight.device.type
        with torch.autocast(device, enabled=False):
            norm = torch.linalg.vector_norm(self._base_weight() + self.get_delta_weight(adapter), dim=1)
        if key is not None:
            self._dora_norms[adapter] = (key, norm)
        return norm

    def _dora_norm_key(self, adapter: str) -> tuple:
        """What the row norm of ``adapter`` depends on: the base layer and the storage and version counter of its
        weight (the NF4 codes and scales), of ``lora_A`` and ``lora_B``, and the scaling; and whether inference mode
        is on (a norm made under it is an inference tensor, which autograd outside it cannot save)."""
        base = self.get_base_layer()
        tensors = [*base.buffers(recurse=False), *(p for name, p in base.named_parameters(recurse=False)
                                                   if name == "weight"),
                   self.lora_A[adapter].weight, self.lora_B[adapter].weight]
        return (id(base), self.scaling[adapter], torch.is_inference_mode_enabled(),
                *((t.data_ptr(), t._version) for t in tensors))

    def train(self, mode: bool = True):
        """``nn.Module.train``; leaving eval mode drops the kept DoRA row norms."""
        if mode:
            self._dora_norms.clear()
        return super().train(mode)

    def _init_dora_magnitude(self, adapter: str) -> None:
        """The DoRA magnitude of ``adapter``: ``||W + s B A||`` per row (``||W||`` with peft's zero-initialized B), a
        trainable fp32 vector in peft's ``lora_magnitude_vector`` (a shape-only one on the meta device)."""
        if "lora_magnitude_vector" not in self.adapter_layer_names:
            self.adapter_layer_names = (*self.adapter_layer_names, "lora_magnitude_vector")
        base = self.get_base_layer()
        if self.lora_A[adapter].weight.is_meta or getattr(base.weight, "is_meta", False):
            norm = torch.empty(self.out_features, device="meta")
        else:
            norm = self._dora_row_norm(adapter)
        magnitude = DoraLinearLayer(fan_in_fan_out=False)
        magnitude.weight = nn.Parameter(norm, requires_grad=True)
        self.lora_magnitude_vector[adapter] = magnitude

    def _dora_output(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``result = base(x)`` for ``adapter`` (``x`` already in the adapter's dtype)."""
        dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
        base = self.get_base_layer()
        bias = base.bias
        if isinstance(dropout, nn.Identity) or not self.training:
            base_out = result if bias is None else result - bias.to(result.dtype)
        else:
            x = dropout(x)
            base_out = base(x)
            base_out = base_out if bias is None else base_out - bias.to(base_out.dtype)
        lora_out = self.lora_B[adapter](self.lora_A[adapter](x))
        scale = self.lora_magnitude_vector[adapter].weight / self._dora_row_norm(adapter)
        return (scale - 1) * base_out + scale * lora_out * scaling

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``lora_B @ lora_A * scaling`` in fp32, shape (out_features, in_features)."""
        a = self.lora_A[adapter].weight.float()
        b = self.lora_B[adapter].weight.float()
        return (b @ a) * self.scaling[adapter]

    def _delta_bias(self, adapter: str) -> torch.Tensor | None:
        bias = self.lora_B[adapter].bias
        return None if bias is None else bias.float() * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold adapters into a dense ``nn.Linear`` base (a ``Conv1D`` for GPT-2's layers; no re-quantization); see
        the module docstring."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        quantized = isinstance(base, Linear4bit)
        conv1d = base.conv1d if quantized else is_conv1d(base)  # GPT-2: a Conv1D again, weight (in, out)
        dtype = base.weight_dtype if quantized else base.weight.dtype
        weight = base.dequantize(torch.float32) if quantized else base.weight.float()
        weight = weight.t() if conv1d and not quantized else weight
        bias = None if base.bias is None else base.bias.float()
        unmerged = weight
        for adapter in adapter_names:
            delta = self.get_delta_weight(adapter)
            weight = weight + delta
            if adapter in self.lora_magnitude_vector:  # DoRA: rows rescaled to m / ||W + s B A|| (W unmerged)
                norm = torch.linalg.vector_norm(unmerged + delta, dim=1)
                weight = weight * (self.lora_magnitude_vector[adapter].weight.float() / norm)[:, None]
            delta_bias = self._delta_bias(adapter)
            if delta_bias is not None:
                bias = delta_bias if bias is None else bias + delta_bias
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights; adapters {adapter_names} seem to be broken.")
        dense = dense_layer(weight.to(dtype), None if bias is None else bias.to(dtype), conv1d)
        if quantized:
            self._quantized_base = [base]
        self.base_layer = dense
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Restore the exact 4-bit base layer saved by :meth:`merge`."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", LowMemWarning, stacklevel=2)
            return
        self.merged_adapters.clear()
        self.base_layer = self._quantized_base.pop()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x)`` plus the scaled output of every active adapter (unless merged or disabled)."""
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("adapter_names (mixed-adapter batches) is not supported on 4-bit layers.")
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        autocast = torch.is_autocast_enabled(x.device.type)
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a = self.lora_A[adapter]
            h = x if autocast else self._cast_input_dtype(x, lora_a.weight.dtype)
            if adapter in self.lora_magnitude_vector:
                result = result + self._dora_output(adapter, h, result).to(result.dtype)
                continue
            out = self.lora_B[adapter](lora_a(self.lora_dropout[adapter](h))) * self.scaling[adapter]
            result = result + out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_peft_custom_module(config: LoraConfig) -> LoraConfig:
    """Map ``Linear4bit`` to :class:`LoraLinear4bit` in ``config`` (peft's per-config custom-module
    registration, ``LoraConfig._register_custom_module``) and return ``config``.

    Only this config changes (its other custom mappings are kept); no peft class is patched. Optional:
    plain ``peft.get_peft_model(model, config)`` wraps 4-bit layers with peft's own ``lora.Linear``
    (merging makes the ``Linear4bit`` dense); with this registration they get :class:`LoraLinear4bit`
    instead (merging swaps in an ``nn.Linear``, ``unmerge`` restores the exact 4-bit layer).
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"Invalid config={config!r}: expected a peft.LoraConfig.")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config


def _linear_names(model: nn.Module) -> list[str]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rpartition(".")[2]
        for name, module in language_model_modules(model)
        if (isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module)) and module is not output and name
    }
    return sorted(name for name in names if not _peft_refuses(model, name))


def _adapts_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """Whether the layers ``targets`` name are transformers ``Conv1D``s (GPT-2 without NF4): peft's LoRA wants
    ``fan_in_fan_out=True`` for them (it warns and sets it itself otherwise)."""
    chosen = [module for name, module in language_model_modules(model) if any(_matches(name, t) for t in targets)]
    return bool(chosen) and all(is_conv1d(module) for module in chosen)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a ``target_modules`` list entry: the module's qualified name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """The module names ``add_lora`` gives peft for ``target_modules`` on ``model``.

    ``"all-linear"``: the leaf names of every ``nn.Linear`` / :class:`Linear4bit` but the output embedding and
    those peft refuses (a Mamba mixer's ``out_proj`` on Nemotron-H, Falcon-H1, Jamba: :func:`_peft_refuses`)
    (peft's ``all-linear``: ``qkv_proj, o_proj, gate_up_proj, down_proj`` on Phi-3, ``query_key_value, dense,
    dense_h_to_4h, dense_4h_to_h`` on GPT-NeoX). A list whose every entry names a module of
    ``model`` (peft's match: the qualified name or a dotted suffix) is returned as given. The seven Llama
    projections (:data:`LLAMA_TARGET_MODULES`, the recipes' default) on a model lacking some of them (fused
    ``qkv_proj`` / ``gate_up_proj``, GPT-NeoX names, MoE experts held as 3-D parameters rather than
    linear layers) mean the same as ``"all-linear"``: every linear projection of the model, and a
    :class:`LowMemWarning` names what they became; on a hybrid model that has them all, the blocks of its decoder
    layers holding none of them (linear-attention, state-space or convolution mixers: :func:`_unreached_mixers`) get
    their projections added, named in a :class:`LowMemWarning` too. Any other entry that names no module raises a
    ``ValueError`` naming it and the model's linear layer names (peft itself refuses only when no entry
    matches, and would silently adapt a subset). A vision-language model's names are its language model's
    (:func:`~lowmem_lightning.multimodal.outside_language_model` left out).
    """
    linear = _linear_names(model)
    if target_modules == "all-linear":
        return linear
    targets = list(target_modules)
    names = [name for name, _ in language_model_modules(model)]
    missing = [t for t in targets if not any(_matches(name, t) for name in names)]
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    if not missing:
        unreached = _unreached_mixers(model, targets) if set(targets) == set(LLAMA_TARGET_MODULES) else {}
        if not unreached:
            return targets
        added = sorted({leaf for leaves in unreached.values() for leaf in leaves})
        warnings.warn(
            f"LoRA target_modules: this {kind} model's {', '.join(sorted(unreached))} blocks hold none of the seven "
            f"Llama projections; the seven are taken to cover their projections too: {', '.join(added)}.",
            LowMemWarning, stacklevel=3,
        )
        return targets + added
    if set(targets) == set(LLAMA_TARGET_MODULES) and linear:
        warnings.warn(
            f"LoRA target_modules: this {kind} model has no {', '.join(missing)}; the seven Llama projections "
            f"are taken as all of its linear layers (as 'all-linear'): {', '.join(linear)}.",
            LowMemWarning, stacklevel=3,
        )
        return linear
    raise ValueError(
        f"Invalid target_modules={targets!r}: {', '.join(repr(t) for t in missing)} "
        f"name{'s' if len(missing) == 1 else ''} no module of this "
        f"{kind} model; its linear layers are {', '.join(linear) or '(none)'}: give names from these, or "
        "'all-linear' for all of them." + _experts_note(model)
    )


def _unreached_mixers(model: nn.Module, targets: list[str]) -> dict[str, set[str]]:
    """``{child name: its linear layers' leaf names}`` of the parts of ``model``'s decoder layers (the entries of a
    ``layers`` ``ModuleList``) that hold linear layers none of ``targets`` names: the linear-attention, state-space
    and convolution mixers of hybrid models (Qwen3.5's and Qwen3-Next's ``linear_attn``, Falcon-H1's and Jamba's
    ``mamba``), which the seven Llama names would leave without an adapter. Only token mixers count
    (:func:`_mixes_tokens`): a MoE router (Gemma 4's ``router.proj``) or Gemma 4's per-layer input gate is no mixer,
    and the recipes leave them alone as peft leaves them on other models."""
    unreached: dict[str, set[str]] = {}
    for name, module in language_model_modules(model):
        if not (isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "layers"):
            continue
        for layer in module:
            for child_name, child in layer.named_children():
                if not _mixes_tokens(child):
                    continue
                leaves = {n.rpartition(".")[2] for n, m in child.named_modules()
                          if n and (isinstance(m, (nn.Linear, Linear4bit)) or is_conv1d(m))}
                leaves = {leaf for leaf in leaves if not _peft_refuses(model, leaf)}
                if leaves and not leaves & set(targets):
                    unreached.setdefault(child_name, set()).update(leaves)
    return unreached


def _mixes_tokens(module: nn.Module) -> bool:
    """Whether ``module`` (a child of a decoder layer) mixes information across positions: an attention of any kind
    (its class named ``...Attention``: softmax, linear or lightning attention) or a block holding a ``torch.nn.Conv1d``
    (the causal convolution of Mamba, gated DeltaNet and LFM2's short convolution). Not an MLP, a MoE router or
    Gemma's per-layer input gate and AltUp/Laurel blocks, which act on each position alone."""
    if type(module).__name__.endswith("Attention"):
        return True
    return any(isinstance(m, nn.Conv1d) for m in module.modules())


def _peft_refuses(model: nn.Module, leaf: str) -> bool:
    """Whether peft refuses LoRA on modules named ``leaf`` in ``model`` (Mamba's ``out_proj`` and ``conv1d``, whose
    fused kernels read the weight directly: peft's own check, where this peft version has it)."""
    from peft.tuners import tuners_utils

    check = getattr(tuners_utils, "_check_lora_target_modules_mamba", None)
    if check is None:
        return False
    try:
        check(LoraConfig(target_modules=[leaf]), model, leaf)
    except ValueError:
        return True
    return False


def _experts_note(model: nn.Module) -> str:
    """For a model with MoE experts held as 3-D parameters, why names of per-expert layers (transformers 4's Mixtral
    ``w1``/``w2``/``w3``, ``experts.0.gate_proj``) name nothing: said in the refusal of such a list."""
    experts = [name for name, module in model.named_modules() if isinstance(module, Experts4bit)
               or is_quantizable_experts(module)]
    if not experts:
        return ""
    return (f" Its MoE experts ({experts[0]}, ...) are 3-D parameters in transformers 5, not linear layers: the "
            "per-expert names of transformers 4 (Mixtral's w1/w2/w3, experts.N.gate_proj) are gone, and LoRA adapts "
            "the layers above, the experts staying frozen (in NF4 under quantize: nf4).")


def _check_lora_args(r, alpha, dropout, target_modules, adapter_dtype) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"Invalid r={r!r}: expected a positive int.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"Invalid alpha={alpha!r}: expected a finite number > 0.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout={dropout!r}: expected a number in [0, 1).")
    if target_modules != "all-linear" and (
        isinstance(target_modules, str)
        or not isinstance(target_modules, Sequence)
        or not target_modules
        or not all(isinstance(t, str) for t in target_modules)
    ):
        raise ValueError(f"Invalid target_modules={target_modules!r}: expected a non-empty list of module names "
                         "or 'all-linear'.")
    if adapter_dtype not in _ADAPTER_DTYPES:
        raise ValueError(f"Invalid adapter_dtype={adapter_dtype!r}: expected float32, bfloat16 or float16.")


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = LLAMA_TARGET_MODULES,
    adapter_dtype: torch.dtype = torch.float32,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
    use_dora: bool = False,
) -> PeftModel:
    """Wrap ``model`` with trainable LoRA adapters (peft ``get_peft_model``); everything else is frozen.

    Works on ``Linear4bit`` (QLoRA), ``nn.Linear`` and transformers ``Conv1D`` (GPT-2) layers alike.
    ``target_modules``: module names as peft matches them (default: the seven Llama projections), or
    ``"all-linear"`` for every linear / 4-bit layer but the output embedding; checked against ``model`` by
    :func:`resolve_target_modules` (the Llama seven on a model without them, e.g. Phi-3's fused
    ``qkv_proj`` / ``gate_up_proj``, become every linear layer; other unknown names are refused).
    ``alpha / r`` scales the adapter output. On a vision-language model the names match in its language model only: the
    modules text does not pass through (vision encoder, projector) are peft's ``exclude_modules``
    (:func:`~lowmem_lightning.multimodal.outside_language_model_pattern`).
    Adapters are stored in ``adapter_dtype`` (fp32 by default). ``trainable_token_indices`` (peft's LoraConfig
    option, e.g. the ids of tokens added to the vocabulary): these rows of the input embedding (a list) or of the
    named layers (``{"embed_tokens": [...], "lm_head": [...]}``) train too, as one ``len(ids) x hidden`` tensor
    per layer (a tied output head follows the input embedding's); the rest of each layer stays frozen. Their
    layers make no ``vocab x hidden`` copy of the weight per forward (:func:`use_copy_free_token_rows`; the saved
    adapter is peft's). ``use_dora``: DoRA (a trained magnitude per output row, see the module docstring; on a 4-bit
    base QDoRA), saved as peft's. Returns the ``PeftModel`` (``PeftModelForCausalLM`` for a model that can generate).
    """
    _check_lora_args(r, alpha, dropout, target_modules, adapter_dtype)
    if not isinstance(use_dora, bool):
        raise ValueError(f"Invalid use_dora={use_dora!r}: expected True or False.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    targets = resolve_target_modules(model, target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets, bias="none",
        fan_in_fan_out=_adapts_conv1d(model, targets), exclude_modules=outside_language_model_pattern(model),
        trainable_token_indices=trainable_token_indices, use_dora=use_dora,
        task_type="CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None,
    )
    register_peft_custom_module(config)
    with warnings.catch_warnings():
        for message in PEFT_MOE_CONVERSION_NOTES:  # what _warn_targets_peft_dropped says in one line
            warnings.filterwarnings("ignore", message=message, category=RuntimeWarning)
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    _warn_targets_peft_dropped(peft_model, targets)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != adapter_dtype:
            param.data = param.data.to(adapter_dtype)
    use_copy_free_token_rows(peft_model)
    return peft_model


PEFT_MOE_CONVERSION_NOTES = (r"target_parameters=.* were set but no parameter was matched",
                             r"The following (rank|alpha)_pattern keys did not match any targeted module and were "
                             r"ignored: \['\.\*\\\\\.gate_up_proj'\]")
"""peft's own ``RuntimeWarning`` messages (regular expressions) when its transformers 4 MoE conversion moved the
recipe's ``gate_proj`` / ``up_proj`` / ``down_proj`` to the experts' 3-D parameters and found none (NF4 experts hold
buffers): printed with a line of peft's source each, they say less than :func:`_warn_targets_peft_dropped`."""


def _warn_targets_peft_dropped(peft_model: PeftModel, targets: list[str]) -> None:
    """A :class:`LowMemWarning` naming the ``targets`` that name linear layers of the model on which peft put no
    adapter: peft's conversion of transformers 4 MoE names (``gate_proj`` / ``up_proj`` / ``down_proj`` taken for the
    experts that transformers 5 stacks into 3-D parameters) drops them from ``target_modules`` even where they name
    real linear layers, such as Qwen3-Next's shared expert."""
    base = peft_model.get_base_model()
    linear = set(_linear_names(base))
    adapted = {name.rpartition(".")[2] for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    dropped = sorted({t.rpartition(".")[2] for t in targets} & linear - adapted)
    if dropped:
        kind = getattr(base.config, "model_type", None) or type(base).__name__
        warnings.warn(
            f"LoRA target_modules: peft put no adapter on the linear layers {', '.join(dropped)} of this {kind} model: "
            "it reads these names as transformers 4's mixture-of-experts projections (moved to target_parameters), "
            "so they stay frozen (peft issue 3711, fixed in peft 0.22: upgrade peft to adapt them; an adapter holding "
            "them would not load back in this peft either).",
            LowMemWarning, stacklevel=3)


def load_lora(model: nn.Module, path, is_trainable: bool = False) -> PeftModel:
    """Reload adapters saved by ``save_pretrained`` (directory ``path``) onto ``model``.

    ``peft.PeftModel.from_pretrained`` with the saved ``LoraConfig`` passed through
    :func:`register_peft_custom_module`, so ``Linear4bit`` layers get their :class:`LoraLinear4bit`.
    """
    config = register_peft_custom_module(LoraConfig.from_pretrained(str(path)))
    return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=is_trainable)
