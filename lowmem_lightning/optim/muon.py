"""Muon for the hidden 2-D matrices and 8-bit AdamW for the rest, in one optimizer (``muon``, ``muon_8bit``).

The Muon math lives in :mod:`lowmem_lightning.kernels.muon` (``torch.optim.Muon`` semantics), the AdamW
math in :mod:`lowmem_lightning.kernels.adamw8bit`; this module keeps the state, decides which params take
which update, and gathers sharded matrices for Newton–Schulz.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

from lowmem_lightning.lowmem_warning import LowMemWarning

from ..kernels.adamw8bit import ADAMW_8BIT, ADAMW_8BIT_NEAREST, AdamWScalars, AdamWTensors
from ..kernels.codec import BLOCK_SIZE, dequantize_reference, quantize_reference
from ..kernels.dispatch import dispatch
from ..kernels.muon import (
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    MuonScalars,
    adjusted_lr,
    momentum_8bit_lerp_reference,
    muon_apply,
    muon_momentum,
    newton_schulz,
    ns_work_numel,
    store_momentum_8bit_reference,
)
from ..kernels.rounding import BF16Rounding, is_stochastic, step_seed
from .base import LowMemOptimizer, StateSpec, _advance_steps, check_drop_in_flags, codes_specs, step_spec
from .layout import MomentumDtype, loaded_step, quantizes_state
from .lion import moment_state
from .reshard import decode_rows
from .sharding import (
    agree_on_block_max,
    aligned_blocks,
    block_state_head,
    block_state_len,
    is_dtensor,
    local,
    pad_block_state,
    shard_tensor_index,
)
from .validation import check_betas, check_bool, check_choice, check_eps, check_lr, check_non_negative

__all__ = ["Muon", "Muon8bit", "MOMENTUM_DTYPES", "AdjustLrFn", "EMBEDDING_MARKS", "FILTER_DIMS", "HEAD_MODULES",
           "HEAD_NAMES", "LOOKUP_TABLES", "PEFT_WRAPPERS", "matrix_shape", "uses_muon"]

MOMENTUM_DTYPES = ("float32", "int8")
"""Allowed values of ``momentum_dtype``."""

AdjustLrFn = Literal["original", "match_rms_adamw"]
"""How ``adjust_lr_fn`` scales the lr of a matrix of shape ``(A, B)`` (as ``torch.optim.Muon``): ``"original"``,
``lr * max(1, A / B) ** 0.5``; ``"match_rms_adamw"``, ``lr * 0.2 * max(A, B) ** 0.5`` (the update's RMS matches
AdamW's)."""

EMBEDDING_MARKS = ("embed", "wte", "wpe")
"""A param whose module path has a component containing one of these, or ending in ``emb`` (minGPT's ``tok_emb``,
``pos_emb``), is an embedding (AdamW)."""

HEAD_NAMES = ("lm_head", "head", "output", "output_layer", "classifier", "score")
"""A param owned by a module of one of these names (the component before ``weight``) is the output head."""

HEAD_MODULES = ("lm_head", "classifier", "classification_head", "score", "qa_outputs")
"""A param anywhere inside a module of one of these names is the output head's (transformers' task heads of more
than one layer: RoBERTa's ``classifier.dense`` / ``classifier.out_proj``, BART's ``classification_head.*``)."""

LOOKUP_TABLES = ("shared", "relative_attention_bias")
"""A param owned by a module of one of these names is an embedding table (T5's, BART's, mBART's and Pegasus's token
table ``shared``, tied to ``lm_head``; T5's relative position bias ``relative_attention_bias``)."""

PEFT_WRAPPERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "modules_to_save", "original_module", "base_layer")
"""Path components peft inserts under the module it wraps (``lm_head.lora_A.default.weight``,
``score.modules_to_save.default.weight``): the owner of such a param is the module before the first of them."""

NS_BATCH_NUMEL = 2**26
"""Largest batch (elements) of same-shape matrices orthogonalized together on an accelerator (bounds the bf16
workspace)."""

NS_BATCH_NUMEL_CPU = 2**19
"""The same on the CPU, where a batch beyond ~1 MiB of bf16 per operand falls out of cache: 48 matrices of
256x256 run fastest 8 at a time (``benchmarks/RESULTS.md``, "Muon on the CPU")."""

NS_SCRATCH_NUMEL_CPU = 2**24
"""Largest Newton–Schulz scratch (bf16 elements: ``U``, the normalized input, two products and the Gram
products of one batch; 32 MiB) a CPU optimizer keeps across steps; a larger batch allocates per step."""


def uses_muon(param: torch.Tensor, name: str | None = None, use_muon: bool | None = None) -> bool:
    """Whether ``param`` (called ``name`` in ``named_parameters()``) takes the Muon update.

    ``use_muon`` (the param group's) decides when True or False. ``None`` (default): a 2-D param, or a
    convolution filter (a 3- to 5-D param named ``...weight``: ``Conv1d``/``Conv2d``/``Conv3d``, updated as its
    :func:`matrix_shape` view ``[out, in * k...]``, Keller Jordan's recipe), unless its name marks an embedding
    (a path component containing ``embed``, ``wte`` or ``wpe``, or ending in ``emb``: ``tok_emb``; or its module is
    a :data:`LOOKUP_TABLES` name: T5's ``shared``) or the output head (its module is called ``lm_head``, ``head``,
    ``output``, ``output_layer``, ``classifier`` or ``score``, or lies inside a :data:`HEAD_MODULES` module:
    RoBERTa's ``classifier.dense``; under peft the module peft wrapped: ``lm_head.lora_A.default.weight`` and
    ``score.modules_to_save.default.weight`` are the head's, ``q_proj.lora_B.default.weight`` a hidden matrix;
    a module compiled alone with ``torch.compile`` keeps its name: ``lm_head._orig_mod.weight`` is the head's).
    Without names every 2-D param is a hidden matrix and no N-D param is (a filter cannot be told from a ViT's
    ``[1, N, D]`` position embedding by shape): pass ``model.named_parameters()`` (the callback and
    ``LowMemModule`` do) or groups with ``use_muon=False`` for the embeddings and the head. A ``cls_token`` or
    ``pos_embed`` (not a module's ``weight``) takes AdamW.
    """
    if use_muon is not None:
        return bool(use_muon)
    if param.ndim != 2 and not (name is not None and _is_filter(param, name)):
        return False
    if name is None:
        return True
    parts = [part for part in name.lower().split(".") if part != "_orig_mod"]  # torch.compile's wrapper
    if any(mark in part for part in parts for mark in EMBEDDING_MARKS) or any(p.endswith("emb") for p in parts):
        return False
    wrapped = next((i for i, part in enumerate(parts) if part in _PEFT_WRAPPERS), len(parts) - 1)
    owner = parts[wrapped - 1] if wrapped > 0 else ""
    return owner not in HEAD_NAMES and owner not in LOOKUP_TABLES and not set(parts[:wrapped]) & set(HEAD_MODULES)


_PEFT_WRAPPERS = frozenset(w.lower() for w in PEFT_WRAPPERS)

FILTER_DIMS = (3, 4, 5)
"""Dimensions of the convolution filters Muon updates by default (``Conv1d``, ``Conv2d``, ``Conv3d`` weights)."""


def _is_filter(param: torch.Tensor, name: str) -> bool:
    """Whether ``param`` called ``name`` is a convolution filter: 3- to 5-D and a module's ``weight``."""
    return param.ndim in FILTER_DIMS and name.rsplit(".", 1)[-1] == "weight"


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` matrix Muon orthogonalizes for a param of ``shape``: itself when 2-D, a convolution
    filter ``[out, in, k...]`` as ``[out, in * prod(k)]`` (Keller Jordan's Muon: collapse all but the first dim;
    its step size then follows ``torch.optim.Muon``'s rule for that matrix)."""
    return int(shape[0]), math.prod(shape[1:])


class Muon(LowMemOptimizer):
    """Muon (Jordan et al. 2024; ``torch.optim.Muon`` semantics) on hidden 2-D matrices, 8-bit AdamW on the rest.

    For a param that :func:`uses_muon`: ``buf = lerp(buf, g, 1 - momentum)``; ``U = lerp(g, buf, momentum)``
    (Nesterov) or ``buf``; ``O`` = Newton–Schulz of ``U`` in bf16 (``ns_steps`` steps of the quintic with
    ``ns_coefficients``, norm floored at ``eps``); ``p = p * (1 - lr * weight_decay) - adjusted_lr * O``
    with ``adjusted_lr`` from ``adjust_lr_fn`` and the matrix's (global) shape. With fp32 momentum on the
    CPU the result equals ``torch.optim.Muon``'s bit for bit. Matrices of one shape run Newton–Schulz as
    one batch. Sharded (DTensor, FSDP2) matrices: the momentum is kept per shard, ``U`` is gathered so
    Newton–Schulz sees the whole matrix, and each rank applies its shard of ``O``; 8-bit momentum keeps the whole
    matrix's blocks of 256 (:func:`.sharding.aligned_blocks`), a block split between ranks taking its scale from
    one ``all_reduce(MAX)`` per batch, so a sharded run stores the codes and params of one unsharded process
    wherever the shard boundaries fall (``tests/test_muon_sharded_blocks.py``).

    Every other param (embeddings, output head, norms, biases, non-2-D) takes AdamW with 8-bit moments
    (:class:`~lowmem_lightning.optim.adamw8bit.AdamW8bit`'s math): the group's ``lr`` and ``weight_decay``,
    ``adamw_betas`` and ``adamw_eps``.

    Which params take Muon: the group's ``use_muon`` (True: every param, which must have at least 2 dims;
    False: none; None, the default: 2-D params and convolution filters whose ``named_parameters()`` name marks
    no embedding or head, see :func:`uses_muon`). An N-D param is orthogonalized as its :func:`matrix_shape`
    ``[out, in * k...]`` view (momentum kept in the param's shape); ``channels_last`` params step as contiguous
    ones. Named param groups override: ``[{"params": emb_and_head, "use_muon": False, "lr":
    3e-4}, {"params": hidden, "lr": 0.02}]``.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``model.named_parameters()``: embeddings and head found
            by name) or param-group dicts; fp32, bf16 or fp16 (bf16/fp16 written with stochastic rounding).
        lr: learning rate (>= 0) of both updates of the group; a scheduler's change applies next step.
        weight_decay: decoupled weight decay (>= 0), ``p *= 1 - lr * weight_decay``.
        momentum: Muon's momentum (>= 0, torch's rule).
        nesterov: Nesterov momentum.
        ns_coefficients: ``(a, b, c)`` of the Newton–Schulz quintic.
        eps: floor of the Frobenius norm before Newton–Schulz (>= 0).
        ns_steps: Newton–Schulz iterations (an int in [0, 100)).
        adjust_lr_fn: ``None``/``"original"`` (``lr * sqrt(max(1, A/B))``) or ``"match_rms_adamw"`` (``lr *
            0.2 * sqrt(max(A, B))``: reuse AdamW's lr and weight decay, Liu et al. 2025).
        momentum_dtype: ``"float32"`` (4 bytes/param) or ``"int8"`` (signed block-wise 8-bit code: 1.016
            bytes/param; matrices under 4096 elements keep fp32). A storage choice: a load keeps this
            optimizer's value and converts the loaded momentum.
        adamw_betas, adamw_eps: the AdamW part's ``betas`` and ``eps``.
        use_muon: the default of the groups' ``use_muon`` (None: decide per param).
        maximize: ascend instead of descend (both updates).
        seed: base seed of the stochastic rounding.
        bf16_rounding: how bf16/fp16 params are written (both updates): ``"stochastic"`` (default) or
            ``"nearest"`` (round-to-nearest-even, as torch.optim.Muon); a param-group setting kept in state dicts.
        quantize_state: ``False`` keeps 32-bit state for every param (of a param group: give the embeddings a
            group with ``quantize_state=False``, as bitsandbytes' ``optim_bits=32`` override), the fp32 state
            params under 4096 elements keep; a storage choice: a load keeps this optimizer's value and converts.
        foreach, fused, capturable, differentiable: torch.optim's switches, accepted as None/False; True raises.

    State per Muon param: ``step`` and ``momentum_buffer`` (fp32, the param's local shape) or
    ``momentum_codes`` (int8) + ``momentum_absmax`` (fp32 per 256); per AdamW param that of ``AdamW8bit``.
    A gradient holding inf/NaN skips its tensor (params, state and step untouched) and is counted in
    :attr:`skipped_updates`. ``torch.optim.Muon`` state dicts load (their momentum converted).
    """

    _default_momentum_dtype = "float32"

    _whole_tensor_update = True  # Newton–Schulz of whole matrices: FSDP1 flat params are refused

    @classmethod
    def with_param_names(cls, groups: list, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> list:
        """``groups`` (tensors or group dicts) with every param as a ``(name, param)`` pair from
        ``named_parameters`` (``module.named_parameters()``), so the embeddings and the head are found by
        name; unchanged when some param has no name there (torch needs all groups named or none). What
        :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback` does before building this optimizer."""
        names = {id(p): n for n, p in named_parameters}
        dicts = [g if isinstance(g, dict) else {"params": [g]} for g in groups]
        if not all(isinstance(p, torch.Tensor) and id(p) in names for g in dicts for p in _as_list(g["params"])):
            return groups
        return [{**g, "params": [(names[id(p)], p) for p in _as_list(g["params"])]} for g in dicts]

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: AdjustLrFn | None = None,
        momentum_dtype: MomentumDtype | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        use_muon: bool | None = None,
        maximize: bool = False,
        *,
        seed: int = 0,
        bf16_rounding: BF16Rounding = "stochastic",
        quantize_state: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        check_drop_in_flags(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed={seed!r}: expected an int.")
        self._seed = seed
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients) if isinstance(ns_coefficients, list) else ns_coefficients,
            eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            momentum_dtype=self._default_momentum_dtype if momentum_dtype is None else momentum_dtype,
            adamw_betas=tuple(adamw_betas) if isinstance(adamw_betas, list) else adamw_betas,
            adamw_eps=adamw_eps, use_muon=use_muon, maximize=maximize, bf16_rounding=bf16_rounding,
            quantize_state=quantize_state,
        )
        super().__init__(params, defaults)
        self._warn_unnamed_matrices()

    def _warn_unnamed_matrices(self) -> None:
        """One ``UserWarning`` when 2-D params left to :func:`uses_muon` (group ``use_muon=None``) came without
        names (``model.parameters()``, or HF ``Trainer``'s ``optimizer_cls_and_kwargs``): each takes the Muon update,
        the embeddings and the output head among them, where the user most likely meant AdamW; and when 3- to 5-D
        params (convolution filters) came without names: they take AdamW, which only names turn into Muon."""
        left = [param for group in self.param_groups if "param_names" not in group and group["use_muon"] is None
                for param in group["params"]]
        unnamed = sum(1 for param in left if param.ndim == 2)
        filters = sum(1 for param in left if param.ndim in FILTER_DIMS)
        if not (unnamed or filters):
            return
        said = []
        if unnamed:
            said.append(f"{unnamed} 2-D param(s) without names, so every one takes the Muon update, including any "
                        "embedding or output head (Muon is meant for hidden matrices)")
        if filters:
            said.append(f"{filters} 3- to 5-D param(s) without names, which take AdamW: convolution filters take "
                        "Muon only when named (...weight)")
        warnings.warn(
            f"{type(self).__name__} got {'; and '.join(said)}. Pass model.named_parameters() (embeddings and heads "
            "are then found by name and take the AdamW part, conv filters Muon), or give those params a group with "
            "use_muon=False or True (which silences this).",
            LowMemWarning, stacklevel=3)

    # ------------------------------------------------------------------ groups
    def _check_group(self, group: dict) -> None:
        """Validate a param group like the constructor's arguments (``ValueError`` naming the argument)."""
        check_lr(group["lr"], torch_wording=True)
        check_non_negative(group["weight_decay"], "weight_decay", torch_wording=True)
        check_non_negative(group["momentum"], "momentum", torch_wording=True)
        check_non_negative(group["eps"], "eps")
        check_bool(group["nesterov"], "nesterov")
        check_bool(group["maximize"], "maximize")
        coefficients = group["ns_coefficients"]
        if (not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients)):
            raise ValueError(f"Invalid ns_coefficients={coefficients!r}: expected a tuple of 3 numbers (a, b, c).")
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"Invalid ns_steps={steps!r}: expected an int in [0, 100).")
        check_choice(group["adjust_lr_fn"], (None, *get_args(AdjustLrFn)), "adjust_lr_fn")
        check_choice(group["momentum_dtype"], MOMENTUM_DTYPES, "momentum_dtype")
        check_choice(group["use_muon"], (None, True, False), "use_muon")
        check_betas(group["adamw_betas"], name="adamw_betas")
        check_eps(group["adamw_eps"], "adamw_eps")
        if group["use_muon"] is True:
            for index, param in enumerate(group.get("params", ())):
                if isinstance(param, torch.Tensor) and param.ndim < 2:
                    raise ValueError(
                        f"Invalid use_muon=True for a group holding param {index} of shape {tuple(param.shape)}: "
                        "Muon updates matrices (2-D, or N-D viewed as [shape[0], rest]) only (give that param a "
                        "group with use_muon=False or None)."
                    )

    _transient_attributes = ("_names", "_ns_work", "_known_names")

    def _reset_transient(self) -> None:
        """The name cache is rebuilt on first use (ids change in a copy); the Newton–Schulz scratch on first step;
        the names of :meth:`remember_names` are dropped (they are keyed by id)."""
        self._names: dict[int, str | None] = {}
        self._ns_work: torch.Tensor | None = None
        self._known_names: dict[int, str] = {}

    def remember_names(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Keep the names of ``named_parameters`` (a module's ``named_parameters()``), so that a group added later
        without names (:meth:`add_param_group`: Lightning's ``BackboneFinetuning`` unfreezing a backbone) is
        named from them and split like the first groups. ``LowMemOptimizerCallback`` and ``LowMemModule`` call it."""
        self._known_names = {id(p): n for n, p in named_parameters}

    def add_param_group(self, param_group: dict) -> None:
        """The base class's; a group of plain tensors added to groups that carry ``param_names`` takes its params'
        names from :meth:`remember_names` (torch refuses groups with and without names in one optimizer). A
        ``ValueError`` says what to do when a param's name is not known."""
        if (isinstance(param_group, dict) and "param_names" not in param_group and self.param_groups
                and "param_names" in self.param_groups[0]):
            params = _as_list(param_group.get("params", []))
            if all(isinstance(p, torch.Tensor) for p in params):
                known = self.__dict__.get("_known_names") or {}
                missing = [tuple(p.shape) for p in params if id(p) not in known]
                if missing:
                    raise ValueError(
                        f"Invalid param_group for {type(self).__name__}.add_param_group: its groups carry param "
                        f"names (the embeddings and the head are found by name) and {len(missing)} added param(s) "
                        f"have none (shapes {missing[:3]}); give (name, param) pairs from the module's "
                        "named_parameters(), or call remember_names(module.named_parameters()) first."
                    )
                param_group = {**param_group, "params": [(known[id(p)], p) for p in params]}
        super().add_param_group(param_group)

    def _ns_scratch(self, shape: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bf16 Newton–Schulz batch ``U`` of ``shape`` ``(batch, rows, cols)`` and the ``work`` scratch of
        :func:`~lowmem_lightning.kernels.muon.newton_schulz`. On the CPU both are views of one flat buffer kept
        across steps (grown to the largest batch) when it holds at most :data:`NS_SCRATCH_NUMEL_CPU` elements:
        fresh multi-MiB buffers are new pages there (thousands of page faults per step, ~2% of a step);
        elsewhere, or above that, ``U`` is allocated per batch and the scratch is None (fresh buffers)."""
        size = math.prod(shape)
        need = size + ns_work_numel(shape)
        if device.type != "cpu" or need > NS_SCRATCH_NUMEL_CPU:
            return torch.empty(shape, dtype=torch.bfloat16, device=device), None
        work = self.__dict__.get("_ns_work")
        if work is None or work.numel() < need:
            work = self._ns_work = torch.empty(need, dtype=torch.bfloat16)
        return work[:size].view(shape), work[size:need]

    def _is_muon(self, param: torch.Tensor, group: dict) -> bool:
        """:func:`uses_muon` of ``param`` with the group's ``use_muon`` and the param's name in this optimizer."""
        return uses_muon(param, self._name_of(param), group["use_muon"])

    def muon_params(self) -> list[torch.Tensor]:
        """The params of every group that take the Muon update (:func:`uses_muon`); the others take AdamW."""
        return [p for group in self.param_groups for p in group["params"] if self._is_muon(p, group)]

    def _name_of(self, param: torch.Tensor) -> str | None:
        """The param's ``param_names`` entry (None without names); cached by id, rebuilt on a miss."""
        names = self.__dict__.setdefault("_names", {})
        if id(param) not in names:
            names.clear()
            for group in self.param_groups:
                names.update((id(p), n) for n, p in zip(group.get("param_names", ()), group["params"]))
            names.setdefault(id(param), None)  # unnamed: not looked up again
        return names[id(param)]

    # ------------------------------------------------------------------ state layout
    def state_layout(self, param: torch.Tensor, group: dict | None = None) -> list[StateSpec]:
        """Muon params: ``step`` and ``momentum_codes`` (int8) + ``momentum_absmax`` (fp32 per 256) with
        ``momentum_dtype="int8"`` and :func:`.layout.quantizes_state` (>= 4096 elements, ``quantize_state`` not
        False), else an fp32 ``momentum_buffer`` of the param's (local) shape. AdamW params: ``step`` and 8-bit
        ``exp_avg``/``exp_avg_sq`` codes (:func:`.layout.quantizes_state`) or fp32 moments, as
        :class:`~lowmem_lightning.optim.adamw8bit.AdamW8bit` keeps them."""
        group = self._layout_group(param, group)
        if self._is_muon(param, group):
            if group["momentum_dtype"] == "int8" and quantizes_state(param, group):
                return [step_spec(), *codes_specs("momentum", aligned_blocks(param).length, signed=True, aligned=True)]
            return [step_spec(), StateSpec("momentum_buffer", tuple(local(param).shape), torch.float32, "moment")]
        if quantizes_state(param, group):
            n = block_state_len(param)
            return [step_spec(), *codes_specs("exp_avg", n, True), *codes_specs("exp_avg_sq", n, False)]
        shape = tuple(local(param).shape)
        return [step_spec(), StateSpec("exp_avg", shape, torch.float32, "moment"),
                StateSpec("exp_avg_sq", shape, torch.float32, "square")]

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Accept ``torch.optim.Muon`` state (``momentum_buffer`` only: a step counter is added) and our own
        of the other ``momentum_dtype`` or ``quantize_state`` (the momentum, or the AdamW part's moments, re-stored
        in this group's form); AdamW-part state saved for a param that now takes Muon (a convolution filter, saved
        before filters took Muon) starts the momentum from its first moment (:func:`_momentum_from_first_moment`);
        Muon state saved for a param that now takes the AdamW part (T5's ``shared`` table, a RoBERTa head's layer,
        saved before they did) starts fresh AdamW moments (:func:`_fresh_moments_for_momentum`)."""
        if not self._is_muon(param, group):  # the AdamW params: a Python-number step (torch's form) as ours
            if {"momentum_buffer", "momentum_codes"} & set(state) and not {"exp_avg", "exp_avg_codes"} & set(state):
                state = _fresh_moments_for_momentum(param, state, type(self).__name__)
            state = {**state, "step": loaded_step(state["step"])} if "step" in state else dict(state)
            quantized = quantizes_state(param, group)
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                state = moment_state(state, key, param, quantized, signed)
            return state
        state = dict(state)
        if not {"momentum_buffer", "momentum_codes"} & set(state) and {"exp_avg", "exp_avg_codes"} & set(state):
            state = _momentum_from_first_moment(param, state, type(self).__name__)
        if "step" not in state:
            state["step"] = torch.tensor(1.0)
        elif not isinstance(state["step"], torch.Tensor):
            state["step"] = torch.tensor(float(state["step"]))
        state["step"] = state["step"].to(torch.float32).reshape(())
        layout = {spec.name for spec in self.state_layout(param, group)}
        buffer = state.get("momentum_buffer")
        blocks = aligned_blocks(param)
        if "momentum_codes" in layout and isinstance(buffer, torch.Tensor) and buffer.numel() == local(param).numel():
            values = torch.nn.functional.pad(state.pop("momentum_buffer").float().reshape(-1), (blocks.head, 0))
            codes, absmax = quantize_reference(values, signed=True)
            state["momentum_codes"], state["momentum_absmax"] = pad_block_state(codes, absmax, blocks.length)
        elif "momentum_buffer" in layout and "momentum_codes" in state and "momentum_absmax" in state:
            shard = local(param)
            codes, absmax = state.pop("momentum_codes"), state.pop("momentum_absmax")
            if absmax.dim() == 2:  # row form (a sharded checkpoint read with this fp32 layout): scales per row
                values = decode_rows(codes, absmax)
            else:
                values = dequantize_reference(codes, absmax)[blocks.head: blocks.head + shard.numel()]
            state["momentum_buffer"] = values.view(shard.shape)
        elif isinstance(buffer, torch.Tensor) and buffer.dtype != torch.float32:
            state["momentum_buffer"] = buffer.float()
        return state

    # ------------------------------------------------------------------ step
    def _step_group(self, group: dict, per_device: list[list[tuple[int, torch.Tensor]]]) -> None:
        """The base class's step of a group, except that on the CPU (plain tensors) each Newton–Schulz batch's
        finite check (and step counters) runs right before its momentum pass, which then reads the gradients
        while they are still in cache instead of a second time from memory; the AdamW part is checked as one.
        The same flags, counters and skips as checking everything first (the checks read only gradients)."""
        if not all(items[0][1].device.type == "cpu" and not any(is_dtensor(p) for _, p in items)
                   for items in per_device):
            super()._step_group(group, per_device)
            return
        self._begin_group(group, per_device)
        for items in per_device:
            states = [self._init_state(param, group) for _, param in items]
            self._update_tensors(group, items, states, None)

    def _update_tensors(self, group: dict, items: list, states: list[dict], flags: list | None) -> None:
        """Split one device's params into the Muon and the AdamW update and run both (``flags`` None: each part
        checks its gradients itself, :meth:`_checked`)."""
        muon, adamw = [], []
        for i, (item, state) in enumerate(zip(items, states)):
            flag = None if flags is None else flags[i]
            (muon if self._is_muon(item[1], group) else adamw).append((item, state, flag))
        if muon:
            self._muon_update(group, muon)
        if adamw:
            self._adamw_update(group, self._checked(adamw))

    def _checked(self, work: list) -> list:
        """``work`` (``((index, param), state, flag)`` entries) with finite flags: as they are, or when they are None
        (:meth:`_step_group` on the CPU) the gradients checked now and the step counters advanced by the flags."""
        if work[0][2] is not None:
            return work
        flags = self._finite_flags([param.grad for (_, param), _, _ in work])
        _advance_steps([state["step"] for _, state, _ in work], flags)
        return [(item, state, flag) for (item, state, _), flag in zip(work, flags)]

    def _adamw_update(self, group: dict, work: list) -> None:
        """The 8-bit AdamW update of the group's non-Muon params (empty DTensor shards left out)."""
        live = [(index, param, state, flag) for (index, param), state, flag in work if local(param).numel() > 0]
        if not live:
            return
        shards = [local(param) for _, param, _, _ in live]
        moments = {key: [] for key in ("m", "m_absmax", "v", "v_absmax")}
        for (_, _, state, _), shard in zip(live, shards):
            quantized = "exp_avg_codes" in state
            for key, name in (("m", "exp_avg"), ("v", "exp_avg_sq")):
                values = state[f"{name}_codes"] if quantized else state[name]
                moments[key].append(block_state_head(values, shard.numel(), False))
                moments[f"{key}_absmax"].append(
                    block_state_head(state[f"{name}_absmax"], shard.numel(), True) if quantized else None)
        beta1, beta2 = group["adamw_betas"]
        tensors = AdamWTensors(
            shards, [local(param.grad) for _, param, _, _ in live],
            moments["m"], moments["m_absmax"], moments["v"], moments["v_absmax"],
            [state["step"] for _, _, state, _ in live], [flag for *_, flag in live],
            [step_seed(0, shard_tensor_index(index, param), self._seed) for index, param, _, _ in live],
        )
        family = ADAMW_8BIT if is_stochastic(group["bf16_rounding"]) else ADAMW_8BIT_NEAREST
        dispatch(family, tensors, AdamWScalars.of(group["lr"], beta1, beta2, group["adamw_eps"],
                                                      group["weight_decay"], group["maximize"]))

    def _muon_update(self, group: dict, work: list) -> None:
        """Momentum pass, Newton–Schulz per batch of same-shape matrices (:func:`matrix_shape`: a filter as its
        ``[out, in * k...]`` view; gathered when sharded), update."""
        by_shape: dict[tuple, list] = {}
        for entry in work:
            by_shape.setdefault(matrix_shape(entry[0][1].shape), []).append(entry)
        lr = float(group["lr"])
        for shape, entries in by_shape.items():
            step_size = adjusted_lr(lr, group["adjust_lr_fn"], shape)
            cap = NS_BATCH_NUMEL_CPU if entries[0][0][1].device.type == "cpu" else NS_BATCH_NUMEL
            per_batch = max(1, cap // max(1, shape[0] * shape[1]))
            for start in range(0, len(entries), per_batch):
                self._muon_batch(group, self._checked(entries[start:start + per_batch]), shape, step_size)

    def _muon_batch(self, group: dict, entries: list, shape: tuple, step_size: float) -> None:
        params = [param for (_, param), _, _ in entries]
        shards = [local(param) for param in params]
        states = [state for _, state, _ in entries]
        flags = [flag for *_, flag in entries]
        batch = work = None
        if any(is_dtensor(p) for p in params):
            outs = [torch.empty(s.shape, dtype=torch.bfloat16, device=s.device) for s in shards]
        else:  # U written straight into the Newton–Schulz batch
            batch, work = self._ns_scratch((len(params), *shape), params[0].device)
            outs = list(batch.unbind(0))
        _momentum_pass(group, params, states, flags, outs)
        full = batch if batch is not None else _gather(params, outs, shape)  # (batch, rows, cols) bf16
        ortho = newton_schulz(full, group["ns_coefficients"], group["ns_steps"], float(group["eps"]), work)
        updates = _scatter(params, ortho)
        muon_apply(shards, updates, flags, [st["step"] for st in states],
                   [shard_tensor_index(index, param) for (index, param), _, _ in entries],
                   [step_size] * len(entries), lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                   stochastic=is_stochastic(group["bf16_rounding"]))


def _momentum_pass(group: dict, params: Sequence[torch.Tensor], states: Sequence[dict], flags: Sequence,
                   outs: Sequence[torch.Tensor]) -> None:
    """The momentum pass of one batch, ``U`` written into ``outs``. 8-bit momentum of a sharded param keeps the
    whole tensor's blocks (:func:`.sharding.aligned_blocks`): the pass runs over the blocks its shard holds whole,
    and the blocks split between shards (at most two per shard) take :func:`_split_blocks`, so the stored codes,
    scales and ``U`` equal one unsharded process's."""
    run: list[tuple] = []  # (grad, buf, absmax, step, flag, out) of the pass
    split: list[tuple] = []  # (param, blocks, pieces, grad, codes, absmax, flag, out)
    for param, state, flag, out in zip(params, states, flags, outs):
        shard, grad = local(param), local(param.grad)
        if "momentum_codes" not in state:
            run.append((grad, state["momentum_buffer"], None, state["step"], flag, out))
            continue
        codes, absmax = state["momentum_codes"], state["momentum_absmax"]
        blocks = aligned_blocks(param)
        if not blocks.shared:  # blocks per shard coincide with the whole tensor's
            run.append((grad, block_state_head(codes, shard.numel(), False),
                        block_state_head(absmax, shard.numel(), True), state["step"], flag, out))
            continue
        grad, out = grad.reshape(-1), out.view(-1)
        (first, end), pieces = _whole_and_split(shard.numel(), blocks.head)
        if end > first:
            start, stop = blocks.head + first, blocks.head + end  # positions of the state: whole blocks
            run.append((grad[first:end], codes[start:stop], absmax[start // BLOCK_SIZE: stop // BLOCK_SIZE],
                        state["step"], flag, out[first:end]))
        split.append((param, blocks, pieces, grad, codes, absmax, flag, out))
    settings = dict(momentum=float(group["momentum"]), nesterov=bool(group["nesterov"]),
                    maximize=bool(group["maximize"]))
    if run:
        muon_momentum(*(list(column) for column in zip(*run)), **settings)
    if split:
        _split_blocks(split, MuonScalars.of(settings["momentum"], settings["nesterov"], settings["maximize"]))


def _whole_and_split(numel: int, head: int) -> tuple[tuple[int, int], list[tuple[int, int, int]]]:
    """For a shard of ``numel`` elements starting ``head`` elements into its first block: ``(first, end)``, the
    local elements in blocks the shard holds whole, and ``(first, end, local block)`` of each block it holds
    only part of (its first and its last, when they do not start or end on a block boundary)."""
    if numel == 0:
        return (0, 0), []
    end = head + numel  # position after the last element
    last = (end - 1) // BLOCK_SIZE
    pieces = []
    if head:
        pieces.append((0, min(numel, BLOCK_SIZE - head), 0))
    if end % BLOCK_SIZE and not (head and last == 0):
        pieces.append((last * BLOCK_SIZE - head, numel, last))
    first = min(numel, BLOCK_SIZE - head) if head else 0
    return (first, max(first, end // BLOCK_SIZE * BLOCK_SIZE - head)), pieces


def _split_blocks(split: list[tuple], scalars: MuonScalars) -> None:
    """The momentum step of the blocks split between shards: each rank's new fp32 momentum of its part
    (:func:`~lowmem_lightning.kernels.muon.momentum_8bit_lerp_reference`), the block's scale completed with one
    ``all_reduce(MAX)`` over the split blocks of every param (:func:`.sharding.agree_on_block_max`), then codes,
    scale (where the finite flag is set) and ``U`` stored as one process would (a piece of the tensor's last
    block, held by one shard, keeps its own maximum)."""
    parts, offset = [], 0
    for _, blocks, pieces, grad, codes, absmax, flag, out in split:
        for first, end, block in pieces:
            g = grad[first:end].to(torch.float32) * scalars.grad_sign
            position = blocks.head + first
            codes_part, scale_part = codes[position: position + end - first], absmax[block: block + 1]
            new = momentum_8bit_lerp_reference(g, codes_part, scale_part, scalars.weight_buf)
            index = blocks.first_block + block
            slot = offset + blocks.shared.index(index) if index in blocks.shared else None
            parts.append((g, new, codes_part, scale_part, flag, out[first:end], slot))
        offset += len(blocks.shared)
    maxima = torch.zeros(offset, dtype=torch.float32, device=split[0][3].device)
    for _, new, *_, slot in parts:
        if slot is not None:
            maxima[slot] = new.abs().amax()
    agree_on_block_max(maxima, [entry[0] for entry in split])
    for g, new, codes_part, scale_part, flag, out, slot in parts:
        scale = new.abs().amax().reshape(1) if slot is None else maxima[slot: slot + 1]
        store_momentum_8bit_reference(new, scale, codes_part, scale_part, flag)
        out.copy_(torch.lerp(g, new, scalars.weight_nesterov) if scalars.nesterov else new)


class Muon8bit(Muon):
    """:class:`Muon` with 8-bit momentum by default (``momentum_dtype="int8"``: ~1.02 bytes/param on the
    Muon matrices, Gupta et al. 2025, arXiv 2509.23106); the ``muon_8bit`` of the registry."""

    _default_momentum_dtype = "int8"


def _momentum_from_first_moment(param: torch.Tensor, state: dict, owner: str) -> dict:
    """``state`` of the AdamW part (``exp_avg`` fp32 or 8-bit codes, ``exp_avg_sq``) for ``param``, which now takes
    Muon, as Muon state: the first moment (an EMA of the gradient, as Muon's momentum is) becomes
    ``momentum_buffer`` (fp32, the param's local shape), the second moment is dropped, the step kept. Warns
    (``LowMemWarning``) that the checkpoint's param changed update."""
    shard = local(param)
    state = dict(state)
    if "exp_avg_codes" in state:
        codes, absmax = state.pop("exp_avg_codes"), state.pop("exp_avg_absmax")
        first = dequantize_reference(codes, absmax)[: shard.numel()].view(shard.shape)
    else:
        first = state.pop("exp_avg").float().reshape(shard.shape)
    for key in ("exp_avg_sq", "exp_avg_sq_codes", "exp_avg_sq_absmax"):
        state.pop(key, None)
    warnings.warn(
        f"{owner}: the loaded state holds AdamW moments for a param that now takes Muon (a convolution filter "
        "saved before filters took Muon); its momentum starts from the saved first moment (exp_avg), the second "
        "moment is dropped.", LowMemWarning, stacklevel=2)
    return {**state, "momentum_buffer": first}


def _fresh_moments_for_momentum(param: torch.Tensor, state: dict, owner: str) -> dict:
    """``state`` of the Muon part (``momentum_buffer`` or its 8-bit codes) for ``param``, which now takes the AdamW
    part, as a fresh AdamW state: zero moments and step 0 (Muon's momentum is no second moment, and a first moment
    without one would divide by ``eps`` at the next step). Warns (``LowMemWarning``) that the param changed update."""
    warnings.warn(
        f"{owner}: the loaded state holds Muon momentum for a param of shape {tuple(param.shape)} that now takes the "
        "AdamW part (an embedding table or a head layer saved before its name marked it); its AdamW moments start "
        "from zero.", LowMemWarning, stacklevel=3)
    zeros = torch.zeros(local(param).shape, dtype=torch.float32)
    return {"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros.clone()}


def _as_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _gather(params: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], shape: tuple) -> torch.Tensor:
    """``(batch, *shape)`` bf16 stack of whole matrices: local ``outs`` of plain params, the gathered
    ``U`` (``DTensor.full_tensor``, every rank joins) of sharded ones."""
    whole = []
    for param, out in zip(params, outs):
        if is_dtensor(param):
            from torch.distributed.tensor import DTensor

            out = DTensor.from_local(out, param.device_mesh, param.placements, shape=param.shape,
                                     stride=param.stride()).full_tensor()
        whole.append(out.view(shape))
    return torch.stack(whole)


def _scatter(params: Sequence[torch.Tensor], ortho: torch.Tensor) -> list[torch.Tensor]:
    """Each param's part of ``ortho`` ``(batch, *shape)``: all of it, or a sharded param's local shard."""
    if not any(is_dtensor(param) for param in params):
        return list(ortho.unbind(0))
    parts = []
    for param, matrix in zip(params, ortho.unbind(0)):
        if is_dtensor(param):
            from torch.distributed.tensor import DTensor, Replicate

            replicated = DTensor.from_local(matrix, param.device_mesh, [Replicate()] * param.device_mesh.ndim,
                                            run_check=False)
            matrix = replicated.redistribute(param.device_mesh, param.placements).to_local()
        parts.append(matrix)
    return parts
