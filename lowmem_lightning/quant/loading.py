"""Load a Hugging Face causal LM from a local directory, quantizing linear weights as they arrive.

The model is built with its parameters on the meta device (no memory, no random init; buffers such
as rotary frequencies are computed for real), its ``nn.Linear`` layers (but the skipped ones) are
swapped for empty meta :class:`Linear4bit` layers and its MoE experts made :class:`Experts4bit`, and then the
safetensors shards are read one tensor at a time: a linear weight (an expert's matrix) is quantized to NF4 and
dropped, any other tensor becomes the parameter. Experts stored one tensor per expert (as the Hub holds Mixtral and
Qwen-MoE; transformers stacks them into 3-D parameters while loading) are stacked here too, one expert at a time;
experts stored in MXFP4 (gpt-oss's Hub release, :mod:`.mxfp4`) are decoded one expert at a time, and weights stored in
fine-grained FP8 (:mod:`.fp8`: linear layers, and experts stored one tensor per expert) one tensor at a time.
Peak host memory is therefore about the 4-bit model plus the full-precision tensors kept (embeddings, norms, skipped
layers) plus one tensor being quantized, never the whole bf16 model.

Bad files name themselves (:class:`ModelFileError`, a ``ValueError``): the directory, ``config.json``
and the index are parsed, and every safetensors header is read and checked against the model (names,
shapes, dtypes, missing tensors) before any tensor data is read or quantized. A missing, empty,
truncated, garbled or foreign file is refused naming the file and what is wrong with it; no model is
returned. Values are checked as they stream: every floating tensor read (quantized or kept dense: a
nan in a norm weight is as fatal as one in a projection, and quantizing one spreads it over its whole
scale group) gets a nan/inf flag on the device, one min/max reduction; all flags are read with one
host sync after the last shard, and any hit raises :class:`NonFiniteCheckpointError` naming the
tensor, its count of non-finite elements and its file.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from lowmem_lightning.hub import local_path
from lowmem_lightning.lowmem_warning import LowMemWarning
from lowmem_lightning.multimodal import as_causal_decoder, causal_lm_auto_class
from lowmem_lightning.remote_code import remote_code_trusted, unknown_code_problem, unknown_model_type_problem

from .convert import _check_skip, _is_skipped, kept_dense_names, mark_loaded_in_4bit, warn_unquantized_matrices
from .experts import Experts4bit, is_quantizable_experts, quantize_experts
from .fp8 import FP8_CODES, FP8_METHOD, SCALE_SUFFIX, block_size, decode_fp8, fp8_scale_shapes
from .host_embeddings import HostEmbedding, hold_embeddings_on_host, host_table_names
from .linear4bit import (
    _QUANT_BUFFERS,
    Linear4bit,
    NonFiniteWeightError,
    _check_options,
    _describe_nonfinite,
    _flagged,
    _nonfinite_flag,
    is_conv1d,
)
from .mxfp4 import BLOCKS, MXFP4_METHOD, SCALES, declared_quant_method, decode_expert, decode_mxfp4, mxfp4_shapes

__all__ = ["load_pretrained_causal_lm", "check_pretrained_checkpoint", "random_causal_lm", "checkpoint_files",
           "ModelFileError", "NonFiniteCheckpointError", "read_model_config", "read_checkpoint_modules"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_HEADER = 100_000_000  # bytes; safetensors refuses larger headers too
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}  # safetensors dtype codes a floating model tensor may come in
_FP8_AUXILIARY = re.compile(r"\.(activation_scale|input_scale|input_scale_inv)$")  # FP8 static activation scales


class ModelFileError(ValueError):
    """A file (or the directory) of a model checkpoint is missing, unreadable, damaged or foreign.

    ``path`` names it and the message says what is wrong. Raised by :func:`load_pretrained_causal_lm`
    before any tensor is read or quantized whenever the problem shows in ``config.json``, the index or
    a safetensors header. A ``ValueError``, so the ``lowmem`` CLI reports it in one line, exit code 2.
    """

    def __init__(self, path: str | Path, problem: str, what: str = "Model file") -> None:
        self.path = str(path)
        ValueError.__init__(self, f"{what} {self.path} {problem}")


class NonFiniteCheckpointError(ModelFileError, NonFiniteWeightError):
    """Checkpoint tensors holding nan/+-inf: both a :class:`ModelFileError` (``path``: the first file
    holding one) and a :class:`~lowmem_lightning.quant.NonFiniteWeightError` (``counts``: non-finite
    elements per model tensor name)."""

    def __init__(self, path: str | Path, problem: str, counts: dict[str, int]) -> None:
        ModelFileError.__init__(self, Path(path).parent, problem, what="Checkpoint")  # the message names the directory
        self.path = str(path)
        self.counts = dict(counts)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of checkpoint directory ``path``: the shards listed in
    ``model.safetensors.index.json`` (in order), or ``model.safetensors``.

    Raises :class:`ModelFileError` naming the file when the index is not valid JSON or has no
    ``weight_map``, when a shard it lists is missing, or when the directory holds neither."""
    return _checkpoint_layout(Path(path))[0]


def _checkpoint_layout(path: Path) -> tuple[list[Path], dict[str, str]]:
    """(safetensors files, index weight_map: tensor name -> shard file name; empty for one file)."""
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise ModelFileError(path, f"{state}; expected a directory with config.json and safetensors.",
                             what="Model directory")
    if (path / _INDEX).exists():
        return _index_layout(path, path / _INDEX)
    single = path / _SINGLE
    if single.exists():
        if not single.is_file():
            raise ModelFileError(single, "is not a regular file.")
        return [single], {}
    raise ModelFileError(path, _no_weights_reason(path), what="Model directory")


def _index_layout(path: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shards ``index`` lists (each checked to exist inside ``path``) and its weight_map."""
    weight_map = _load_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelFileError(index, "has no 'weight_map' object mapping tensor names to shard file names.")
    shards = list(dict.fromkeys(weight_map.values()))
    escaping = [name for name in shards if Path(name).is_absolute() or ".." in Path(name).parts]
    if escaping:
        raise ModelFileError(index, f"lists shards outside its directory ({escaping[:3]}); expected file names.")
    absent = [name for name in shards if not (path / name).is_file()]
    if absent:
        listed = sum(v == absent[0] for v in weight_map.values())
        more = f" ({len(absent) - 1} more listed shards are missing too: {absent[1:4]})" if len(absent) > 1 else ""
        state = "is not a regular file" if (path / absent[0]).exists() else "does not exist"
        raise ModelFileError(path / absent[0], f"{state}, but {_INDEX} lists it for {listed} tensors{more}.",
                             what="Shard")
    return [path / name for name in shards], weight_map


def _no_weights_reason(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    if shards:
        return (f"has {len(shards)} .safetensors files ({shards[:3]}) but neither {_INDEX}, which names the shards, "
                f"nor {_SINGLE}.")
    if pickles:
        return (f"holds PyTorch pickle weights ({pickles[:3]}), not safetensors: re-save them with "
                "save_pretrained(..., safe_serialization=True).")
    return f"has no {_INDEX} or {_SINGLE} (safetensors checkpoints only)."


def _load_json(file: Path) -> dict:
    """The JSON object in ``file``; :class:`ModelFileError` naming it when unreadable, empty or not an object."""
    if not file.is_file():
        raise ModelFileError(file, "does not exist." if not file.exists() else "is not a regular file.")
    try:
        text = file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFileError(file, f"cannot be read as UTF-8 text ({err}).") from None
    if not text.strip():
        raise ModelFileError(file, f"is empty ({len(text)} bytes); expected a JSON object.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelFileError(file, f"is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}).") from None
    if not isinstance(value, dict):
        raise ModelFileError(file, f"holds a JSON {type(value).__name__}; expected an object.")
    return value


def _read_config(path: Path):
    """``path``'s ``config.json`` as a transformers config; :class:`ModelFileError` naming what is wrong."""
    from transformers import AutoConfig

    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise ModelFileError(path, f"{state}; expected a directory with config.json and safetensors.",
                             what="Model directory")
    file = path / "config.json"
    if not file.exists():
        raise ModelFileError(file, "does not exist; a model directory needs the config.json that save_pretrained "
                             "writes next to the safetensors.")
    stated = _load_json(file)
    problem = unknown_code_problem(stated, path)
    if not problem and not stated.get("auto_map"):  # a model type with no code of its own: transformers' own or none
        problem = unknown_model_type_problem(stated.get("model_type"))
    if problem:
        raise ModelFileError(file, problem)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=remote_code_trusted())
    except Exception as err:  # any failure here is the file's: transformers' validators raise their own types
        raise ModelFileError(file, f"cannot be read by transformers ({_brief(err)}).") from None


class StoredFormat(NamedTuple):
    """How a checkpoint stores its weights beyond plain floats, as its ``config.json`` declares it: ``method``
    ``"mxfp4"`` (experts, :mod:`.mxfp4`), ``"fp8"`` (linear weights, :mod:`.fp8`, scale blocks ``fp8_block``:
    ``None`` per tensor) or ``None``."""

    method: str | None = None
    fp8_block: tuple[int, int] | None = None


PLAIN = StoredFormat()
"""Plain floating-point tensors."""


def _stored_format(path: Path, config) -> StoredFormat:
    """What ``config`` declares the checkpoint's tensors to be stored as: MXFP4 experts (gpt-oss's Hub release) or
    fine-grained FP8 linear weights (DeepSeek-V3, Qwen3-FP8, Ministral 3, ...), which this loader decodes as they
    stream; the declaration is then dropped from ``config`` (the loaded model holds them in NF4 or the load dtype, as
    transformers' ``Mxfp4Config`` / ``FineGrainedFP8Config(dequantize=True)`` drop it). :class:`ModelFileError` naming
    ``config.json`` for a checkpoint stored in another quantized format (its ``quantization_config``: bitsandbytes'
    4-bit Hub uploads, GPTQ, AWQ, ...), whose tensors (packed codes and scales under their own names) this loader
    does not read."""
    method = declared_quant_method(config)
    if method is None:
        return PLAIN
    if method in (MXFP4_METHOD, FP8_METHOD):
        quantization = config.quantization_config
        quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
        del config.quantization_config
        return StoredFormat(method, block_size(quantization) if method == FP8_METHOD else None)
    raise ModelFileError(path / "config.json", (
        f"declares a checkpoint stored already quantized (quantization_config.quant_method={method!r}); lowmem reads "
        "full-precision safetensors (bf16, fp16 or fp32; MXFP4 experts and fine-grained FP8 weights too) and "
        "quantizes them itself. Use the model's full-precision release, or load this one with transformers (which "
        "dequantizes some formats) and save_pretrained it in bf16 first."))


def read_model_config(path: str | Path):
    """The transformers config of model directory (or Hub repo id, :func:`~lowmem_lightning.hub.resolve_pretrained`:
    only its ``config.json`` fetched) ``path`` (its ``config.json`` only, no weights read), checked as loading checks
    it: :class:`ModelFileError` naming the directory or file and what is wrong."""
    return _read_config(local_path(path, "model_name_or_path", "config"))


def _brief(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``err``, its last line (validators wrap the cause) cut to ``limit`` characters
    (transformers lists every model type it knows when ``model_type`` is missing)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [""]
    text = f"{type(err).__name__}: {lines[-1] if len(lines) > 1 and len(lines[0]) < 80 else lines[0]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safetensors_problem(file: Path, err: Exception) -> str:
    """Why safetensors refused ``file``: empty, too short, truncated, trailing bytes, or not safetensors."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = handle.read(length) if 0 < length <= min(size - 8, _MAX_HEADER) else b""
    except OSError as os_err:
        return f"cannot be read ({os_err})."
    if size == 0:
        return "is empty (0 bytes); expected a safetensors file."
    if size < 8:
        return f"has {size} bytes, too few for a safetensors header."
    if not header:
        return (f"is not a safetensors file or is cut short: its first 8 bytes announce a {length}-byte header, "
                f"the file has {size} bytes.")
    try:
        entries = json.loads(header)
        end = 8 + length + max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"is not a safetensors file: its header is not safetensors JSON (safetensors says: {err})."
    if end > size:
        return f"is truncated: its header describes {end} bytes, the file has {size} ({end - size} missing)."
    if end < size:
        return f"has {size - end} bytes after the tensor data its header describes (damaged or not safetensors)."
    return f"is not a readable safetensors file (safetensors says: {err})."


def _read_headers(files: list[Path]) -> dict[Path, dict[str, tuple[str, tuple[int, ...]]]]:
    """Every file's tensors, ``{key: (safetensors dtype code, shape)}``, from the headers only (no data)."""
    headers = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as shard:
                headers[file] = {
                    key: (view.get_dtype(), tuple(view.get_shape()))
                    for key in shard.keys() for view in (shard.get_slice(key),)
                }
        except (SafetensorError, OSError) as err:
            raise ModelFileError(file, _safetensors_problem(file, err)) from None
    return headers


@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every parameter a module registers is moved to the meta device at once.

    Uses torch's supported, removable parameter-registration hook (no class is patched); the hook is
    removed on exit, so nothing outlives the model construction.
    """

    def to_meta(module, name, param):
        if param.device.type != "meta":
            return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _swap_in_meta_linear4bit(model, skip, block_size, double_quant, dtype) -> None:
    skip = tuple(skip) + kept_dense_names(model)  # as quantize_model keeps them
    swapped = False
    for name, module in list(model.named_modules()):
        conv1d = is_conv1d(module)  # GPT-2's linear layer: weight (in, out)
        if (type(module) is nn.Linear or conv1d) and not _is_skipped(name, skip):
            parent_name, _, child = name.rpartition(".")
            in_features, out_features = module.weight.shape if conv1d else (module.in_features, module.out_features)
            layer = Linear4bit(
                in_features, out_features, module.bias is not None, block_size, double_quant,
                weight_dtype=dtype, device="meta", conv1d=conv1d,
            )
            setattr(model.get_submodule(parent_name), child, layer)
            swapped = True
        elif is_quantizable_experts(module) and not _is_skipped(name, skip):
            quantize_experts(module, block_size, double_quant)  # meta parameters: meta NF4 buffers
            swapped = True
    if swapped:
        mark_loaded_in_4bit(model)


def _place(model: nn.Module, key: str, tensor: torch.Tensor, dtype: torch.dtype, device) -> bool:
    """Put checkpoint tensor ``key`` into ``model``; returns False when the model has no such tensor."""
    module_name, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    if tensor.is_floating_point() and not _is_nf4_buffer(module, leaf):
        tensor = tensor.to(device=_load_device(module, leaf, device), dtype=_load_dtype(module, leaf, dtype))
    if isinstance(module, HostEmbedding) and leaf == "weight":
        module.set_table(tensor, device)
        return True
    if isinstance(module, Linear4bit) and leaf == "weight":
        module.quantize_weight_(tensor.t().contiguous() if module.conv1d else tensor)  # Conv1D's is (in, out)
        return True
    if isinstance(module, Experts4bit) and leaf in module.nf4_shapes:
        for expert, matrix in enumerate(tensor):
            module.quantize_expert_(leaf, expert, matrix)
        return True
    if leaf in module._parameters and module._parameters[leaf] is not None:
        old = module._parameters[leaf]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(
                f"Checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(old.shape)}."
            )
        trainable = old.requires_grad and not isinstance(module, Linear4bit)
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=trainable)
        return True
    if leaf in module._buffers and module._buffers[leaf] is not None:
        module._buffers[leaf] = tensor.to(device=device, dtype=module._buffers[leaf].dtype)
        return True
    return False


def _load_device(module: nn.Module, leaf: str, device) -> torch.device | str:
    """Where checkpoint tensor ``leaf`` of ``module`` is read to: the host for a :class:`HostEmbedding`'s table (it
    never passes through the GPU), else ``device``."""
    return "cpu" if isinstance(module, HostEmbedding) and leaf == "weight" else device


def _load_dtype(module: nn.Module, leaf: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype checkpoint tensor ``leaf`` of ``module`` is loaded in: a floating parameter's or buffer's own (the
    model is built by ``from_config(dtype=dtype)``, which keeps transformers' keep-in-fp32 modules in fp32: the MoE
    routers and score-correction biases of DeepSeek-V2/V3, GLM-4.5, ERNIE 4.5, Nemotron-H; transformers loads them
    so), else ``dtype``. A :class:`Linear4bit` weight is quantized from ``dtype``."""
    held = module._parameters.get(leaf)
    held = module._buffers.get(leaf) if held is None else held
    if held is None or not held.is_floating_point() or (isinstance(module, Linear4bit) and leaf == "weight"):
        return dtype
    return held.dtype


def _is_nf4_buffer(module: nn.Module, leaf: str) -> bool:
    """Whether ``leaf`` of ``module`` is one of a :class:`Linear4bit`'s or an :class:`Experts4bit`'s NF4 code / scale
    buffers: a checkpoint written by ``save_pretrained`` of a 4-bit model holds these instead of the layer's
    ``weight`` (the experts' 3-D projections), and they are placed as stored (fp32 scales are not cast to the load
    dtype)."""
    if isinstance(module, Experts4bit):
        return leaf in module.nf4_buffer_names()
    return isinstance(module, Linear4bit) and leaf in _QUANT_BUFFERS


def _nf4_weight_of(module: nn.Module, leaf: str) -> str | None:
    """The weight a saved NF4 code buffer ``leaf`` of ``module`` stands for (``qweight`` -> ``weight`` of a
    :class:`Linear4bit`, ``gate_up_proj_qweight`` -> ``gate_up_proj`` of an :class:`Experts4bit`), else None."""
    if not _is_nf4_buffer(module, leaf) or not leaf.endswith("qweight"):
        return None
    return "weight" if isinstance(module, Linear4bit) else leaf.removesuffix("_qweight")


def _ignored_keys(model: nn.Module) -> re.Pattern:
    """Checkpoint keys to drop silently: the model's ``_keys_to_ignore_on_load_unexpected`` plus tensors
    older checkpoints saved that are now computed (per-layer ``rotary_emb.inv_freq``, ``position_ids``)."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    patterns |= {r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$"}
    return re.compile("|".join(f"({p})" for p in patterns))


def _model_key(model: nn.Module, key: str, names: set[str]) -> str | None:
    """The model's name for checkpoint ``key``: itself, or with the base-model prefix added/removed."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if candidate in names:
            return candidate
    return None


def _still_on_meta(model: nn.Module) -> list[str]:
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    tensors += [(f"{name}.weight", m.table) for name, m in model.named_modules() if isinstance(m, HostEmbedding)]
    return [name for name, t in tensors if t.device.type == "meta"]


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor name the model loads (state dict plus each ``Linear4bit``'s ``weight``) -> a tensor
    with its shape and dtype (meta or real)."""
    tensors = dict(model.state_dict(keep_vars=True))
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            prefix = f"{name}." if name else ""
            shape = (module.in_features, module.out_features) if module.conv1d else (
                module.out_features, module.in_features)  # as the checkpoint stores it
            tensors[f"{prefix}weight"] = torch.empty(shape, dtype=module.weight_dtype, device="meta")
        elif isinstance(module, Experts4bit):
            for proj in module.nf4_shapes:
                tensors[f"{name}.{proj}"] = torch.empty(module.layout_shape(proj), dtype=module.nf4_weight_dtype,
                                                        device="meta")
    return tensors


def _required(model: nn.Module) -> list[set[str]]:
    """The tensors still to be loaded, as sets of names any one of which provides it (tied weights
    share one tensor under several names); a ``Linear4bit``'s codes come from its ``weight``."""
    groups: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            groups[id(module)] = {f"{name}.weight" if name else "weight"}
        elif isinstance(module, Experts4bit):
            groups.update({id(module._buffers[f"{proj}_qweight"]): {f"{name}.{proj}"} for proj in module.nf4_shapes})
        elif isinstance(module, HostEmbedding) and module.table.device.type == "meta":
            groups[id(module)] = {f"{name}.weight"}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        module_name, _, leaf = name.rpartition(".")
        if tensor.device.type != "meta" or _is_nf4_buffer(model.get_submodule(module_name), leaf):
            continue
        groups.setdefault(id(tensor), set()).add(name)
    return list(groups.values())


def _key_conversions(model: nn.Module):
    """``(convert, converters)``: ``convert(key) -> (renamed key, converter pattern or None)`` applies the renames
    transformers applies to this model's checkpoint keys while loading (its ``get_model_conversion_mapping``:
    GPT-NeoX's ``embed_out`` is the model's ``lm_head``) and says whether a key is one a converter merges with others
    (MoE experts stored one per expert); ``converters`` maps each such source pattern to its ``WeightConverter``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    return (lambda key: rename_source_key(key, renamings, converters)), by_pattern


class ExpertParts(tuple):
    """A plan entry's key for one expert's matrix of a 3-D experts projection stored one tensor per expert (and per
    part: Mixtral's ``w1`` and ``w3`` make ``gate_up_proj``): ``(expert, ((file, key), ...))``, the parts in the order
    they are concatenated (rows)."""

    expert = property(lambda self: self[0])
    parts = property(lambda self: self[1])


class JoinedParts(tuple):
    """A plan entry's key for a model tensor transformers builds from whole checkpoint tensors while loading:
    ``(transpose, ((file, key), ...))``, the parts joined along their first dimension in this order (OLMo-hybrid's
    ``q_conv1d`` / ``k_conv1d`` / ``v_conv1d`` into ``conv1d``), each with its last two dimensions swapped first when
    ``transpose`` (Qwen3-VL-MoE's experts, stored ``[experts, hidden, intermediate]``)."""

    transpose = property(lambda self: self[0])
    parts = property(lambda self: self[1])


def _joins_whole_tensors(converter) -> str | None:
    """``"concatenate"`` or ``"transpose"`` for a transformers ``WeightConverter`` that the loader does itself on
    whole tensors (:class:`JoinedParts`): concatenation along the first dimension, or a swap of the last two
    dimensions of one tensor (``Transpose(1, 2)``, with or without ``check_dims``); ``None`` for any other."""
    kinds = [(type(op).__name__, getattr(op, "dim", None), getattr(op, "dim0", None), getattr(op, "dim1", None))
             for op in converter.operations]
    if kinds == [("Concatenate", 0, None, None)]:
        return "concatenate"
    if len(kinds) == 1 and kinds[0][0] == "Transpose" and {kinds[0][2], kinds[0][3]} == {1, 2}:
        return "transpose"
    return None


def _joined_plan(model, path: Path, joined, converters, expected, names) -> list[tuple[Path, JoinedParts, str]]:
    """Plan entries ``(file, JoinedParts, model name)`` for checkpoint tensors a converter joins whole (``joined``:
    ``(file, key, renamed key, pattern, shape)``), checked from the headers: every part present and, joined, the
    model tensor's shape (a transposed tensor already in the model's shape is taken as it is, as transformers'
    ``check_dims`` does). :func:`_refuse_converted` for a conversion the loader does not do."""
    groups: dict[str, dict[int, tuple[Path, str, tuple]]] = {}
    kinds: dict[str, tuple[str, int]] = {}
    for file, key, renamed, pattern, shape in joined:
        converter, target = converters[pattern], _model_key(model, renamed, names)
        kind = _joins_whole_tensors(converter)
        if target is None or kind is None:
            _refuse_converted(path, key, renamed, model)
        kinds[target] = (kind, len(converter.source_patterns))
        groups.setdefault(target, {})[converter.source_patterns.index(pattern)] = (file, key, shape)
    plan = []
    for target, parts in groups.items():
        (kind, count), want = kinds[target], tuple(expected[target].shape)
        stored = [parts.get(i) for i in range(count)]
        transpose = False
        if None not in stored:
            shapes = [shape for _, _, shape in stored]
            transpose = kind == "transpose" and shapes[0] != want
            joined = shapes[0][:-2] + (shapes[0][-1], shapes[0][-2]) if transpose else (
                (sum(shape[0] for shape in shapes),) + shapes[0][1:])
        if None in stored or joined != want:
            held = [(p[1], p[2]) for p in stored if p is not None]
            raise ModelFileError(path, f"holds {held or 'no tensor'} for {target!r}, which the model of config.json "
                                 f"builds from {count} tensor{'s' if count > 1 else ''} ({kind}) of shape {want} in "
                                 "all.", what="Checkpoint")
        plan.append((stored[0][0], JoinedParts((transpose, tuple((f, k) for f, k, _ in stored))), target))
    return plan


def _stacks_experts(converter) -> bool:
    """Whether a transformers ``WeightConverter`` only stacks per-expert tensors (``MergeModulelist(dim=0)``) and
    concatenates the stacks along their rows (``Concatenate(dim=1)``): the conversions the NF4 loader does itself."""
    kinds = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    return kinds in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)])


def _expert_index(pattern: str, key: str) -> int | None:
    """The expert number a per-expert checkpoint key holds where its converter pattern has ``*``."""
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)") + "$", key)
    return int(found.group(1)) if found else None


def _refuse_converted(path: Path, key: str, target: str, model: nn.Module) -> None:
    """:class:`ModelFileError` for a checkpoint tensor that transformers converts while loading in a way the loader
    does not (it stacks per-expert tensors and concatenates their parts only)."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    raise ModelFileError(path, (
        f"stores tensors in a layout transformers converts while loading this {kind} model (e.g. {key!r} into "
        f"{target!r}) with operations the NF4 loader does not do (it stacks tensors stored one per expert into "
        "their 3-D parameter, joining gate and up parts, joins whole tensors along their first dimension and swaps "
        "the last two dimensions of stored experts). Train this model with quantize: null (a full fine-tune "
        "or LoRA on bf16 weights, loaded by transformers)."), what="Checkpoint")


def _expert_plan(model, path: Path, converted, converters, expected, names, fp8_parts=None
                 ) -> list[tuple[Path, ExpertParts, str]]:
    """Plan entries ``(file, ExpertParts, model name)`` for checkpoint tensors stored one per expert (``converted``:
    ``(file, key, renamed key, pattern, shape)``; ``names``: the model's tensor names, ``expected``'s keys), one per
    expert of each 3-D projection, checked from the headers:
    every expert's every part present with the rows and columns the projection needs. :func:`_refuse_converted` for
    a conversion the loader does not do (another operation, a transposed layout, a target the model lacks). A part
    stored as FP8 codes (``fp8_parts``: ``key -> (scales file, scales key, dtype code, shape, block)``) is planned as
    an :class:`Fp8Parts`, its scales checked as :func:`_fp8_entry` checks them."""
    fp8_parts = fp8_parts or {}
    groups: dict[str, dict[int, dict[int, tuple[Path, str, tuple]]]] = {}
    counts: dict[str, int] = {}
    whole = [entry for entry in converted if "*" not in entry[3]]  # no expert number in the pattern: whole tensors
    fp8_whole = [entry for entry in whole if entry[1] in fp8_parts]
    if fp8_whole:
        _refuse_converted(path, fp8_whole[0][1], fp8_whole[0][2], model)
    plan = _joined_plan(model, path, whole, converters, expected, names)
    converted = [entry for entry in converted if "*" in entry[3]]
    for file, key, renamed, pattern, shape in converted:
        converter, target = converters[pattern], _model_key(model, renamed, names)
        module = model.get_submodule(target.rpartition(".")[0]) if target is not None else None
        expert = _expert_index(pattern, key)
        if (target is None or expert is None or not _stacks_experts(converter) or len(shape) != 2
                or getattr(module, "is_transposed", True)):
            _refuse_converted(path, key, renamed, model)
        counts[target] = len(converter.source_patterns)
        groups.setdefault(target, {}).setdefault(expert, {})[converter.source_patterns.index(pattern)] = (
            file, key, shape)
    for target, experts in groups.items():
        count, (total, rows, cols) = counts[target], tuple(expected[target].shape)
        for expert in range(total):
            stored = [experts.get(expert, {}).get(part) for part in range(count)]
            if None in stored or sum(p[2][0] for p in stored) != rows or {p[2][1] for p in stored} != {cols}:
                held = [(p[1], p[2]) for p in stored if p is not None]
                raise ModelFileError(path, f"holds expert {expert} of {target!r} as {held or 'no tensor'}: the model "
                                     f"of config.json needs {count} tensor{'s' if count > 1 else ''} of {cols} columns "
                                     f"and {rows} rows in all for each of its {total} experts.", what="Checkpoint")
            parts = tuple(_fp8_expert_part(path, f, k, shape, fp8_parts[k]) if k in fp8_parts else (f, k)
                          for f, k, shape in stored)
            plan.append((stored[0][0], ExpertParts((expert, parts)), target))
        extra = sorted(set(experts) - set(range(total)))
        if extra:
            raise ModelFileError(path, f"holds expert {extra[0]} of {target!r}, but the model of config.json has "
                                 f"{total} experts there.", what="Checkpoint")
    return plan


def _fp8_expert_part(path: Path, file: Path, key: str, shape: tuple, scales: tuple) -> Fp8Parts:
    """The :class:`Fp8Parts` of one expert's part ``key`` (``shape``) stored as FP8 codes, with its ``scales``
    ``(file, key, dtype code, shape, block)`` checked (:func:`_fp8_entry`)."""
    scale_file, scale_key, scale_code, scale_shape, block = scales
    stored = {"codes": (file, key, FP8_CODES[0], shape)}
    if scale_file is not None:
        stored["scales"] = (scale_file, scale_key, scale_code, scale_shape)
    return _fp8_entry(path, key, stored, shape, block)[1]


class Fp8Parts(tuple):
    """A plan entry's key for a linear weight stored in FP8 (:mod:`.fp8`): ``((codes file, codes key), (scales file,
    scales key), scale block)``."""

    blocks = property(lambda self: self[0])


def _fp8_entry(path: Path, target: str, stored: dict, param_shape: tuple, block) -> tuple[Path, Fp8Parts, str]:
    """The plan entry of weight ``target`` (``param_shape``) stored in FP8 (``stored``: ``{"codes" | "scales": (file,
    key, dtype code, shape)}``), checked from the headers: both tensors present, the codes FP8 E4M3 of the weight's
    shape, the scales floating (or E8M0 uint8) of the block grid's; :class:`ModelFileError` otherwise."""
    if "codes" not in stored:  # a scale without FP8 codes: the weight is stored unquantized
        file, key, *_ = stored["scales"]
        raise ModelFileError(file, f"holds {key!r}, the FP8 scales of {target!r}, but that weight is not stored in "
                             "FP8.")
    file, key, code, shape = stored["codes"]
    if "scales" not in stored:
        raise ModelFileError(path, f"holds {key!r} in FP8 but no {key + SCALE_SUFFIX!r}: fine-grained FP8 stores each "
                             "weight with its scales.", what="Checkpoint")
    if shape != param_shape or code not in FP8_CODES:
        raise ModelFileError(file, f"holds {key!r} as {code} {shape}; FP8 storage of {target!r} is "
                             f"{'/'.join(FP8_CODES)} {param_shape}.")
    scale_file, scale_key, scale_code, scale_shape = stored["scales"]
    if scale_shape not in fp8_scale_shapes(param_shape, block) or scale_code not in {*_FLOAT_CODES, "U8", "F8_E8M0"}:
        raise ModelFileError(scale_file, f"holds {scale_key!r} as {scale_code} {scale_shape}; the scales of "
                             f"{target!r} {param_shape} in blocks of {block} are "
                             f"{fp8_scale_shapes(param_shape, block)[0]}.")
    return file, Fp8Parts(((file, key), (scale_file, scale_key), block)), target


def _fp8_part(model, convert, key: str, code: str, names: set[str]) -> tuple[str, str] | None:
    """``(model name, "codes" | "scales")`` when checkpoint ``key`` is an FP8 weight (stored as FP8 codes) or its
    ``weight_scale_inv`` and the model has that weight, else ``None``."""
    part = "scales" if key.endswith(SCALE_SUFFIX) else "codes" if code in FP8_CODES else None
    if part is None:
        return None
    renamed, merged = convert(key.removesuffix(SCALE_SUFFIX))
    target = _model_key(model, renamed, names) if merged is None else None  # an expert's part: :func:`_expert_plan`
    return (target, part) if target is not None else None


class Mxfp4Parts(tuple):
    """A plan entry's key for a 3-D experts projection stored in MXFP4 (:mod:`.mxfp4`, gpt-oss):
    ``((blocks file, blocks key), (scales file, scales key))``."""

    blocks = property(lambda self: self[0])


def _mxfp4_entry(path: Path, target: str, stored: dict, param_shape: tuple) -> tuple[Path, Mxfp4Parts, str]:
    """The plan entry of projection ``target`` (a ``param_shape`` experts parameter) stored in MXFP4 (``stored``:
    ``{suffix: (file, key, dtype code, shape)}`` of its tensors), checked from the headers: both tensors present, uint8,
    of the shapes that store the parameter (:func:`~.mxfp4.mxfp4_shapes`); :class:`ModelFileError` otherwise."""
    wanted = mxfp4_shapes(param_shape)
    if wanted is None:
        file, key, _, _ = next(iter(stored.values()))
        raise ModelFileError(file, f"holds {key!r}, MXFP4 storage of {target!r}, but the model of config.json has it "
                             f"as {param_shape}, whose rows are not groups of 32.")
    for suffix, shape in zip((BLOCKS, SCALES), wanted):
        if suffix not in stored:
            raise ModelFileError(path, f"holds {next(iter(stored.values()))[1]!r} but no {suffix[1:]} tensor for it: "
                                 f"MXFP4 stores {target!r} as both {BLOCKS[1:]} (codes) and {SCALES[1:]}.",
                                 what="Checkpoint")
        file, key, code, held = stored[suffix]
        if code != "U8" or held != shape:
            raise ModelFileError(file, f"holds {key!r} as {code} {held}; MXFP4 storage of {target!r} {param_shape} "
                                 f"is U8 (uint8) {shape}.")
    (blocks_file, blocks_key, *_), (scales_file, scales_key, *_) = stored[BLOCKS], stored[SCALES]
    return blocks_file, Mxfp4Parts(((blocks_file, blocks_key), (scales_file, scales_key))), target


def _mxfp4_target(model, convert, key: str, names: set[str], expected: dict) -> tuple[str, str] | None:
    """``(model name, suffix)`` when checkpoint ``key`` is one of the two MXFP4 tensors of a 3-D experts parameter
    (``<name>_blocks`` / ``<name>_scales``), else ``None``."""
    base, _, last = key.rpartition("_")
    suffix = f"_{last}"
    if suffix not in (BLOCKS, SCALES):
        return None
    target = _model_key(model, convert(base)[0], names)
    return (target, suffix) if target is not None and expected[target].dim() == 3 else None


def _check_floating(file: Path, key: str, code: str) -> None:
    """:class:`ModelFileError` naming ``file`` when tensor ``key``, which the model holds in a floating dtype, is
    stored as the non-floating safetensors dtype ``code``."""
    if code not in _FLOAT_CODES:
        raise ModelFileError(file, f"holds {key!r} as {code}; the model expects a floating-point tensor (a quantized "
                             "or foreign checkpoint?).")


def _plan(model, path: Path, headers, weight_map, ignored, stored_as: StoredFormat = PLAIN, within=None
          ) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """Match every checkpoint tensor to the model from the headers alone, before any data is read.

    Keys are first renamed as transformers renames them for this model (:func:`_key_conversions`). Returns
    ([(file, checkpoint key, model name)], unexpected keys). :class:`ModelFileError` naming the file for a
    tensor of the wrong shape or of a non-floating dtype where the model has a floating tensor, and for
    tensors the model needs that no file holds. MoE experts stored one tensor per expert (Mixtral's ``w1`` / ``w3`` /
    ``w2``, Qwen-MoE's ``gate_proj`` / ``up_proj`` / ``down_proj``, which transformers stacks into 3-D parameters) get
    one entry per expert (:func:`_expert_plan`), the directory named when one is missing or of another shape. Where
    the config declares it (``stored_as``), 3-D experts parameters stored as MXFP4 codes and scales get one entry each
    (:func:`_mxfp4_entry`), and so do weights stored as FP8 codes and scales (:func:`_fp8_entry`). ``within``: the
    qualified names of the modules to plan for (their tensors alone are matched, checked and required)."""
    expected = _expected(model)
    names = set(expected)
    convert, converters = _key_conversions(model)
    plan, unexpected, converted, packed, fp8, expert_scales = [], [], [], {}, {}, {}
    header_codes = {file: {key: code for key, (code, _) in header.items()} for file, header in headers.items()}
    for file, header in headers.items():
        for key, (code, shape) in header.items():
            stored = _mxfp4_target(model, convert, key, names, expected) if stored_as.method == MXFP4_METHOD else None
            if stored is not None:
                packed.setdefault(stored[0], {})[stored[1]] = (file, key, code, shape)
                continue
            stored = _fp8_part(model, convert, key, code, names) if stored_as.method == FP8_METHOD else None
            if stored is not None:
                fp8.setdefault(stored[0], {})[stored[1]] = (file, key, code, shape)
                continue
            if stored_as.method == FP8_METHOD and _FP8_AUXILIARY.search(key):
                continue  # static activation scales: nothing to hold in a dequantized model
            if stored_as.method == FP8_METHOD and key.endswith(SCALE_SUFFIX):  # an expert's part's scales
                expert_scales[key.removesuffix(SCALE_SUFFIX)] = (file, key, code, shape)
                continue
            renamed, merged = convert(key)
            if merged is not None:
                if code not in FP8_CODES or stored_as.method != FP8_METHOD:
                    _check_floating(file, key, code)
                converted.append((file, key, renamed, merged, shape))
                continue
            target = _model_key(model, renamed, names)
            if target is None:
                if not ignored.search(key):
                    unexpected.append(key)
                continue
            if not _inside(target, within):
                continue
            want = expected[target]
            if shape != tuple(want.shape):
                raise ModelFileError(file, f"holds {key!r} with shape {shape}, but the model that config.json "
                                     f"describes needs {tuple(want.shape)}: the file belongs to another model, or "
                                     "config.json does not match it.")
            if want.is_floating_point():
                _check_floating(file, key, code)
            plan.append((file, key, target))
    if converted:
        fp8_parts = {key: (*expert_scales.pop(key, (None, None, None, None)), stored_as.fp8_block)
                     for file, key, _, _, _ in converted if header_codes[file][key] in FP8_CODES}
        plan += _expert_plan(model, path, converted, converters, expected, names, fp8_parts)
    unexpected += [key for _, key, *_ in expert_scales.values()]
    plan += [_mxfp4_entry(path, target, stored, tuple(expected[target].shape)) for target, stored in packed.items()]
    plan += [_fp8_entry(path, target, stored, tuple(expected[target].shape), stored_as.fp8_block)
             for target, stored in fp8.items()]
    plan = [entry for entry in plan if _inside(entry[2], within)]
    provided = {target for _, _, target in plan}
    # a Linear4bit's codes, as save_pretrained of a 4-bit model wrote them, provide its weight
    for target in [t for t in provided if t.endswith("qweight")]:
        module_name, _, leaf = target.rpartition(".")
        weight = _nf4_weight_of(model.get_submodule(module_name), leaf)
        if weight is not None:
            provided.add(f"{module_name}.{weight}" if module_name else weight)
    missing = sorted(min(group) for group in _required(model) if not group & provided and _inside(min(group), within))
    if missing:
        _refuse_missing(path, missing, weight_map, headers, unexpected)
    return plan, unexpected


def _inside(target: str, modules) -> bool:
    """Whether model tensor ``target`` lies in one of ``modules`` (qualified names; ``None``: the whole model)."""
    return modules is None or any(target == m or target.startswith(m + ".") for m in modules)


def read_checkpoint_modules(model: nn.Module, path: str | Path, modules, torch_dtype: torch.dtype | str,
                            device: torch.device | str = "cpu") -> int:
    """Put the checkpoint's own tensors of ``modules`` (qualified names of modules of the dense ``model``) into
    ``model``, read from checkpoint ``path`` as :func:`load_pretrained_causal_lm` reads them (keys renamed as
    transformers renames them, FP8 and MXFP4 decoded, nan/inf refused) in ``torch_dtype`` on ``device``: every
    safetensors header is read, then only their tensors. A merged QLoRA export puts a vision-language model's
    vision tower back so: frozen, never run on text, it would otherwise be written as its NF4 approximation. Returns
    how many tensors were read; :class:`ModelFileError` when the checkpoint lacks one of them or holds another shape."""
    dtype, _ = _checked_options(None, torch_dtype, ("lm_head",), 64, True)
    path = local_path(path, "path", "weights")
    config = _read_config(path)
    files, weight_map = _checkpoint_layout(path)
    plan, _ = _plan(model, path, _read_headers(files), weight_map, _ignored_keys(model),
                    _stored_format(path, config), within=tuple(modules))
    _refuse_nonfinite(_stream(model, plan, dtype, device), dtype)
    return len(plan)


def _refuse_missing(path: Path, missing: list[str], weight_map: dict[str, str], headers, unexpected) -> None:
    """Raise :class:`ModelFileError` for model tensors no checkpoint file holds, naming the shard the
    index promised one in when it did (the file itself for a one-file checkpoint)."""
    prefixes = ("", "model.")
    promised = next(((name, weight_map[k]) for name in missing for p in prefixes
                     for k in (p + name, name.removeprefix(p)) if k in weight_map), None)
    held = sum(len(h) for h in headers.values())
    files = f"{len(headers)} files hold" if len(headers) > 1 else "file holds"
    unused = f", {len(unexpected)} of them unused (e.g. {unexpected[:3]})" if unexpected else ""
    text = (f"lacks {len(missing)} tensor{'s' if len(missing) > 1 else ''} the model of config.json needs "
            f"(e.g. {missing[:5]}); its {files} {held} tensors{unused}: a checkpoint of another model, or "
            "config.json does not match it.")
    codes = [key for key in unexpected if key.endswith(".qweight")]
    if codes:
        text += (f" It holds NF4 codes (e.g. {codes[0]!r}): a save_pretrained of a 4-bit model, which loads with "
                 "quantize='nf4' and the skip, block_size and double_quant it was quantized with.")
    if promised is not None:
        raise ModelFileError(path / promised[1], f"does not hold {promised[0]!r}, which {_INDEX} maps to it; the "
                             f"checkpoint {text}", what="Shard")
    if len(headers) == 1:
        raise ModelFileError(next(iter(headers)), text)
    raise ModelFileError(path, text, what="Checkpoint")


def _get_tensor(shard, file: Path, key: str) -> torch.Tensor:
    try:
        return shard.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise ModelFileError(file, f"cannot deliver tensor {key!r} ({err}).") from None


def _refuse_nonfinite(flags: list[tuple[Path, str, str, torch.Tensor]], dtype: torch.dtype) -> None:
    """One host sync over all tensors' nan/inf flags; any hit raises :class:`NonFiniteCheckpointError`
    naming the tensor, its file and its non-finite count (re-read from the file: error path only)."""
    hits = _flagged([flag for *_, flag in flags])
    if not hits:
        return
    counts, lines = {}, []
    for i in hits:
        file, key, target, _ = flags[i]
        tensor = _reread(file, key, dtype)
        counts[target], text = _describe_nonfinite(tensor)
        if counts[target] == 0:  # finite in the file, beyond the range of the load dtype
            counts[target], text = _describe_nonfinite(tensor.to(dtype))
            text += f" after conversion from {tensor.dtype} to {dtype} (values beyond its range)"
        if isinstance(key, Mxfp4Parts):
            key = key.blocks[1]
            text += " decoded from MXFP4 (a scale of 255, the format's NaN, or values beyond the load dtype's range)"
        elif isinstance(key, Fp8Parts):
            key = key.blocks[1]
            text += " decoded from FP8 (a NaN code or scale, or values beyond the load dtype's range)"
        alias = "" if key == target else f" (key {key!r})"
        lines.append(f"{target}{alias} in {file.name}: {text}")
    first = flags[hits[0]][0]
    raise NonFiniteCheckpointError(
        first, f"holds nan/inf in {len(hits)} tensor{'s' if len(hits) > 1 else ''}: {'; '.join(lines)}. "
        "Refused at load: a non-finite weight poisons training, and quantizing one makes its whole NF4 block "
        "(with double quantization every element sharing its scale statistics) decode to nan. "
        "Fix or re-export the checkpoint.", counts,
    )


def _reread(file: Path, key, dtype: torch.dtype) -> torch.Tensor:
    """Checkpoint tensor ``key`` of ``file`` read again (error path only); an MXFP4 projection or FP8 weight decoded in
    fp32 (kept finite where the load dtype overflows, so its count is found after conversion)."""
    if isinstance(key, Fp8Parts):
        return _read_fp8(key, torch.float32, "cpu")
    if not isinstance(key, Mxfp4Parts):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            return _get_tensor(shard, file, key)
    parts = []
    for part_file, part_key in key:
        with safe_open(str(part_file), framework="pt", device="cpu") as shard:
            parts.append(_get_tensor(shard, part_file, part_key))
    blocks, scales = parts
    return torch.stack([decode_mxfp4(b, s, dtype) for b, s in zip(blocks, scales)])


def _build(config, path: Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with meta parameters; :class:`ModelFileError` on ``config.json`` when
    transformers cannot build it (a foreign or inconsistent config)."""
    try:
        with _parameters_on_meta():
            return causal_lm_auto_class(config).from_config(as_causal_decoder(config), dtype=dtype,
                                                            trust_remote_code=remote_code_trusted())
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ModelFileError(path / "config.json", f"describes a model transformers cannot build as a causal LM "
                             f"({_brief(err)}).") from None


def load_pretrained_causal_lm(
    path: str | Path,
    quantize: str | None = "nf4",
    torch_dtype: torch.dtype | str = torch.bfloat16,
    skip=("lm_head",),
    block_size: int = 64,
    double_quant: bool = True,
    device: torch.device | str = "cpu",
    host_embeddings: bool = False,
    lora_targets=None,
) -> nn.Module:
    """Load a causal LM from local directory ``path`` (``config.json`` + safetensors), shard by shard; a Hub repo id
    ``org/name[@revision]`` is first resolved to its snapshot in the HF cache (config and safetensors downloaded
    unless cached: :func:`~lowmem_lightning.hub.resolve_pretrained`, ``ValueError`` when it cannot be).

    ``quantize="nf4"``: every ``nn.Linear`` whose name is not in ``skip`` becomes a frozen :class:`Linear4bit`
    (block ``block_size``, ``double_quant``), and every MoE experts module of transformers' experts interface an
    :class:`Experts4bit`, quantized on ``device`` (Triton on CUDA) as its weight is read; ``None`` loads full
    precision. Other tensors are cast to ``torch_dtype``. The result equals
    ``quantize_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype), skip, ...)`` while peak host
    memory stays near the 4-bit model plus the unquantized tensors plus one tensor. Checkpoint tensors the model has
    no place for are skipped with a warning (obsolete ones, like per-layer ``rotary_emb.inv_freq``, silently). A
    directory written by ``save_pretrained`` of a 4-bit model (NF4 codes and scales in place of the linear weights)
    loads with ``quantize="nf4"`` and the ``skip``, ``block_size`` and ``double_quant`` it was quantized with: its
    codes and fp32 scales are placed as stored, nothing is re-quantized. A checkpoint whose config declares
    ``quant_method: mxfp4`` (gpt-oss) has its experts' MXFP4 codes and scales decoded expert by expert (values equal to
    transformers' ``Mxfp4Config(dequantize=True)``) and quantized, or kept in ``torch_dtype`` with ``quantize=None``;
    one declaring ``quant_method: fp8`` (fine-grained FP8: DeepSeek-V3, Qwen3-FP8, Ministral 3) has each FP8 weight
    decoded with its ``weight_scale_inv`` as it is read (values equal to ``FineGrainedFP8Config(dequantize=True)``'s)
    and quantized, or kept in ``torch_dtype``; other pre-quantized formats are refused naming their ``quant_method``.

    ``host_embeddings=True`` (for a model LoRA will wrap, with target module names ``lora_targets``): the embedding
    tables LoRA leaves frozen and no output head shares (:func:`~.host_embeddings.host_table_names`) are read into host
    memory and held there by :class:`~.host_embeddings.HostEmbedding` (page-locked when ``device`` is a GPU); they
    never take device memory.

    Raises :class:`ModelFileError` (a ValueError) naming the file, before any tensor data is read, for: a missing
    directory or ``config.json``; an empty, garbled or foreign ``config.json`` or index; a shard the index lists
    that is missing; an empty, truncated or non-safetensors file; a tensor of the wrong shape or dtype; tensors the
    model needs that no file holds (tied weights excepted; for experts stored one tensor per expert, each expert's
    parts). Raises :class:`NonFiniteCheckpointError` after the last shard when any floating tensor read (quantized
    or kept dense) holds a nan or +-inf, or overflows ``torch_dtype``, naming each such tensor, its file and its
    non-finite count (one host sync for all tensors). No model is returned in either case.
    """
    from transformers import GenerationConfig

    dtype, skip = _checked_options(quantize, torch_dtype, skip, block_size, double_quant)
    path = local_path(path, "path", "weights")
    model, plan, unexpected = _planned_model(path, quantize, dtype, skip, block_size, double_quant)
    if quantize == "nf4":  # before any tensor is read: what stays in full precision
        warn_unquantized_matrices(model, skip)
    if host_embeddings:
        hold_embeddings_on_host(model, host_table_names(model, lora_targets, check_frozen=False), device)
    flags = _stream(model, plan, dtype, device)
    _refuse_nonfinite(flags, dtype)
    if unexpected:
        warnings.warn(f"Checkpoint {str(path)!r} has {len(unexpected)} tensors the model does not use, "
                      f"e.g. {unexpected[:5]}; they were skipped.", LowMemWarning, stacklevel=2)
    model.tie_weights()
    missing = _still_on_meta(model)
    if missing:
        raise ModelFileError(path, f"lacks tensors the model needs: {missing[:5]}.", what="Checkpoint")
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ModelFileError(path / "generation_config.json", f"cannot be read by transformers ({err}).") from None
    model.to(device)
    return model.eval()


def _checked_options(quantize, torch_dtype, skip, block_size, double_quant) -> tuple[torch.dtype, tuple[str, ...]]:
    """``(dtype, skip)`` of :func:`load_pretrained_causal_lm`'s options; ``ValueError`` naming a bad one."""
    if quantize not in (None, "nf4"):
        raise ValueError(f"Invalid quantize={quantize!r}: expected 'nf4' or None.")
    dtype = _DTYPES.get(torch_dtype, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"Invalid torch_dtype={torch_dtype!r}: expected float32, bfloat16 or float16.")
    skip = _check_skip(skip)
    _check_options(block_size, double_quant, None)
    return dtype, skip


def _planned_model(path: Path, quantize: str | None, dtype: torch.dtype, skip, block_size: int, double_quant: bool):
    """``(meta model, plan, unexpected keys)`` of checkpoint directory ``path`` from ``config.json`` and the safetensors
    headers alone (:func:`_plan`): every :class:`ModelFileError` :func:`load_pretrained_causal_lm` raises before it
    reads tensor data is raised here (options checked by :func:`_checked_options`)."""
    config = _read_config(path)
    stored_as = _stored_format(path, config)
    files, weight_map = _checkpoint_layout(path)
    headers = _read_headers(files)
    model = _build(config, path, dtype)
    if quantize == "nf4":
        _swap_in_meta_linear4bit(model, skip, block_size, double_quant, dtype)
    plan, unexpected = _plan(model, path, headers, weight_map, _ignored_keys(model), stored_as)
    return model, plan, unexpected


def check_pretrained_checkpoint(path: str | Path, quantize: str | None = "nf4",
                                torch_dtype: torch.dtype | str = torch.bfloat16, skip=("lm_head",)) -> None:
    """Refuse what :func:`load_pretrained_causal_lm` (same arguments) refuses before it reads any tensor data, with
    the same :class:`ModelFileError`, reading only ``config.json`` and the safetensors headers (no weights): an
    unreadable layout, a tensor of another shape, tensors the model needs that no file holds (an expert's part among
    them). ``lowmem estimate`` calls it on
    the checkpoint an NF4 recipe would load, so it refuses what ``lowmem fit`` refuses. A directory that holds no
    weight file at all (``config.json`` only: an architecture, such as the recipes' ``llama-2-7b``) is left to the
    config-only estimate. A Hub repo id is resolved with only its ``config.json`` fetched, so its weights are checked
    when they are already in the HF cache."""
    dtype, skip = _checked_options(quantize, torch_dtype, skip, 64, True)
    path = local_path(path, "model_name_or_path", "config")
    if path.is_dir() and not (path / _INDEX).exists() and not any(
            f.suffix in (".safetensors", ".bin", ".pt", ".pth") for f in path.iterdir()):
        return
    _planned_model(path, quantize, dtype, skip, 64, True)


def _opened(file: Path):
    """``safe_open`` of ``file`` (a context manager), or :class:`ModelFileError` naming it."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModelFileError(file, _safetensors_problem(file, err)) from None


def _place_joined(model, target: str, entry: JoinedParts, shard, file: Path, dtype, device) -> list:
    """Read the parts of a :class:`JoinedParts` entry (from ``shard``, the open ``file``, or their own files), swap
    or join them and put the result into ``target`` (quantized where it is a 4-bit weight); returns the parts'
    nan/inf flags."""
    module_name, _, leaf = target.rpartition(".")
    load_dtype = _load_dtype(model.get_submodule(module_name), leaf, dtype)
    parts, flags = [], []
    for part_file, key in entry.parts:
        tensor = _read_key(part_file, key, shard, file).to(device=device, dtype=load_dtype)
        flags.append((part_file, key, target, _nonfinite_flag(tensor)))
        parts.append(tensor.transpose(-2, -1).contiguous() if entry.transpose else tensor)
    _place(model, target, torch.cat(parts) if len(parts) > 1 else parts[0], dtype, device)
    return flags


def _place_expert(model, target: str, entry: ExpertParts, shard, file: Path, dtype, device) -> list:
    """Read one expert's parts (from ``shard``, the open ``file``, or their own files), join their rows and put the
    matrix into expert ``entry.expert`` of the 3-D projection ``target`` (quantized in an :class:`Experts4bit`);
    returns the parts' nan/inf flags."""
    parts, flags = [], []
    for part in entry.parts:
        if isinstance(part, Fp8Parts):
            tensor = _read_fp8(part, dtype, device, shard, file)
            flags.append((part.blocks[0], part, target, _nonfinite_flag(tensor)))
            parts.append(tensor)
            continue
        part_file, key = part
        tensor = _read_key(part_file, key, shard, file).to(device=device, dtype=dtype)
        flags.append((part_file, key, target, _nonfinite_flag(tensor)))
        parts.append(tensor)
    _put_expert(model, target, entry.expert, torch.cat(parts) if len(parts) > 1 else parts[0], dtype, device)
    return flags


def _put_expert(model, target: str, expert: int, matrix: torch.Tensor, dtype, device) -> None:
    """Put ``matrix`` into expert ``expert`` of the 3-D projection ``target``: quantized in an :class:`Experts4bit`,
    else copied into the parameter (allocated on ``device`` at its first expert)."""
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, Experts4bit):
        module.quantize_expert_(leaf, expert, matrix)
        return
    param = module._parameters[leaf]
    if param.device.type == "meta":
        param = module._parameters[leaf] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                        requires_grad=param.requires_grad)
    with torch.no_grad():
        param[expert].copy_(matrix)


def _place_mxfp4(model, target: str, entry: Mxfp4Parts, shard, file: Path, dtype, device) -> list:
    """Decode the MXFP4 projection ``target`` one expert at a time (only that expert's bytes read) into the model
    (:func:`_put_expert`); returns its nan/inf flag (one for all experts)."""
    with contextlib.ExitStack() as stack:
        slices = []
        for part_file, key in entry:
            source = shard if part_file == file else stack.enter_context(_opened(part_file))
            slices.append(source.get_slice(key))
        flag = None
        for expert in range(slices[0].get_shape()[0]):
            matrix = decode_expert(*slices, expert, dtype, device)
            flag = _nonfinite_flag(matrix) if flag is None else flag | _nonfinite_flag(matrix)
            _put_expert(model, target, expert, matrix, dtype, device)
    return [(file, entry, target, flag)]


def _read_fp8(entry: Fp8Parts, dtype: torch.dtype, device, shard=None, file: Path | None = None) -> torch.Tensor:
    """The weight an FP8 plan entry stores, decoded in ``dtype`` on ``device`` (its tensors read from ``shard``, the
    open ``file``, or their own files)."""
    codes, scales = (_read_key(part_file, key, shard, file).to(device) for part_file, key in entry[:2])
    return decode_fp8(codes, scales, entry[2], dtype)


def _read_key(part_file: Path, key: str, shard=None, file: Path | None = None) -> torch.Tensor:
    """Tensor ``key`` of ``part_file``: from ``shard`` when that is the open ``file``, else from ``part_file``
    opened for it."""
    if part_file == file:
        return _get_tensor(shard, file, key)
    with _opened(part_file) as other:
        return _get_tensor(other, part_file, key)


def _stream(model, plan, dtype, device) -> list[tuple[Path, str, str, torch.Tensor]]:
    """Read the planned tensors file by file into ``model`` (quantizing ``Linear4bit`` weights); returns
    a nan/inf flag (a 0-dim device bool, not yet read) per floating tensor read."""
    flags = []
    for file in dict.fromkeys(file for file, _, _ in plan):
        with _opened(file) as shard:
            for _, key, target in (entry for entry in plan if entry[0] == file):
                if isinstance(key, ExpertParts):
                    flags += _place_expert(model, target, key, shard, file, dtype, device)
                    continue
                if isinstance(key, JoinedParts):
                    flags += _place_joined(model, target, key, shard, file, dtype, device)
                    continue
                if isinstance(key, Mxfp4Parts):
                    flags += _place_mxfp4(model, target, key, shard, file, dtype, device)
                    continue
                if isinstance(key, Fp8Parts):
                    tensor = _read_fp8(key, dtype, device, shard, file)
                    flags.append((file, key, target, _nonfinite_flag(tensor)))
                    _place(model, target, tensor, dtype, device)
                    del tensor
                    continue
                tensor = _get_tensor(shard, file, key)
                module_name, _, leaf = target.rpartition(".")
                if tensor.is_floating_point():
                    module = model.get_submodule(module_name)
                    if not _is_nf4_buffer(module, leaf):
                        tensor = tensor.to(device=_load_device(module, leaf, device),
                                           dtype=_load_dtype(module, leaf, dtype))
                    flags.append((file, key, target, _invalid_flag(module, leaf, tensor)))
                _place(model, target, tensor, dtype, device)
                del tensor
    return flags


def _invalid_flag(module: nn.Module, leaf: str, tensor: torch.Tensor) -> torch.Tensor:
    """The flag :func:`_refuse_nonfinite` reads for ``tensor``, loaded into ``module.<leaf>``: nan or +-inf for a
    parameter; nan only for a buffer, whose +-inf is a bound (Gemma 4's clippable linear layers keep their clamp
    ranges in buffers, +-inf where a layer is not clipped: the value transformers initialises them to)."""
    if leaf in module._buffers and not _is_nf4_buffer(module, leaf):
        return torch.isnan(tensor).any()
    return _nonfinite_flag(tensor)


def random_causal_lm(
    config,
    quantize: str | None = "nf4",
    torch_dtype: torch.dtype = torch.bfloat16,
    skip=("lm_head",),
    block_size: int = 64,
    double_quant: bool = True,
    device: torch.device | str = "cpu",
    std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """A causal LM of ``config``'s architecture (a transformers ``PretrainedConfig``) with random
    weights created tensor by tensor on ``device``: no download and no full-precision copy of the
    model anywhere (with ``quantize="nf4"`` the device holds the 4-bit model plus one layer's bf16
    weight at a time). Linear and embedding weights are ``N(0, std)``, norm weights ones, biases
    zeros; other arguments as :func:`load_pretrained_causal_lm`. For benchmarks and tests of models
    too big to build densely (a 7B model in NF4 takes ~3.9 GB on the device).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"Invalid quantize={quantize!r}: expected 'nf4' or None.")
    if torch_dtype not in _DTYPES.values():
        raise ValueError(f"Invalid torch_dtype={torch_dtype!r}: expected float32, bfloat16 or float16.")
    skip = _check_skip(skip)
    _check_options(block_size, double_quant, None)
    with _parameters_on_meta():
        model = causal_lm_auto_class(config).from_config(as_causal_decoder(config), dtype=torch_dtype,
                                                         trust_remote_code=remote_code_trusted())
    if quantize == "nf4":
        _swap_in_meta_linear4bit(model, skip, block_size, double_quant, torch_dtype)
        warn_unquantized_matrices(model, skip)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
        elif isinstance(module, Experts4bit):
            shapes.update({f"{name}.{proj}": module.layout_shape(proj) for proj in module.nf4_shapes})
    for key, shape in shapes.items():
        if not _still_on_meta_key(model, key):
            continue
        leaf = key.rpartition(".")[2]
        if "norm" in key and leaf == "weight":
            tensor = torch.ones(shape, device=device, dtype=torch_dtype)
        elif leaf == "bias":
            tensor = torch.zeros(shape, device=device, dtype=torch_dtype)
        else:
            tensor = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).mul_(std).to(torch_dtype)
        _place(model, key, tensor, torch_dtype, device)
        del tensor
    model.tie_weights()
    missing = _still_on_meta(model)
    if missing:
        raise ValueError(f"random_causal_lm could not create {missing[:5]}.")
    return model.to(device)


def _still_on_meta_key(model: nn.Module, key: str) -> bool:
    """Whether tensor ``key`` of ``model`` (param, buffer, a Linear4bit weight or an Experts4bit projection) is still
    to be made; NF4 code and scale buffers are made with their weight, never on their own."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, Linear4bit):
        if leaf == "weight":
            return module.qweight.device.type == "meta"
        if leaf != "bias":
            return False
    if isinstance(module, Experts4bit):
        if leaf in module.nf4_shapes:
            return module._buffers[f"{leaf}_qweight"].device.type == "meta"
        if _is_nf4_buffer(module, leaf):
            return False
    tensor = module._parameters.get(leaf)
    tensor = module._buffers.get(leaf) if tensor is None else tensor
    return tensor is not None and tensor.device.type == "meta"
