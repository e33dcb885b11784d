"""Load a Hugging Face causal LM from a local directory, quantizing linear weights as they arrive.

The model is built with its parameters on the meta device (no memory, no random init; buffers such
as rotary frequencies are computed for real), its ``nn.Linear`` layers (but the skipped ones) are
swapped for empty meta :class:`Linear4bit` layers, and then the safetensors shards are read one
tensor at a time: a linear weight is quantized to NF4 and dropped, any other tensor becomes the
parameter. Peak host memory is therefore about the 4-bit model plus the full-precision tensors kept
(embeddings, norms, skipped layers) plus one tensor being quantized, never the whole bf16 model.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from .linear4bit import Linear4bit, _check_options, _check_skip, _is_skipped, mark_loaded_in_4bit

__all__ = ["load_pretrained_causal_lm", "random_causal_lm", "checkpoint_files"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of checkpoint directory ``path``: the shards listed in
    ``model.safetensors.index.json`` (in order), or ``model.safetensors``."""
    path = Path(path)
    index = path / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in dict.fromkeys(weight_map.values())]
    if (path / _SINGLE).is_file():
        return [path / _SINGLE]
    raise ValueError(f"Invalid path={str(path)!r}: no {_INDEX} or {_SINGLE} found (safetensors checkpoints only).")


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
    swapped = False
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not _is_skipped(name, skip):
            parent_name, _, child = name.rpartition(".")
            layer = Linear4bit(
                module.in_features, module.out_features, module.bias is not None, block_size, double_quant,
                weight_dtype=dtype, device="meta",
            )
            setattr(model.get_submodule(parent_name), child, layer)
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
    if tensor.is_floating_point():
        tensor = tensor.to(device=device, dtype=dtype)
    if isinstance(module, Linear4bit) and leaf == "weight":
        module.quantize_weight_(tensor)
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
        module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype)
        return True
    return False


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
    return [name for name, t in tensors if t.device.type == "meta"]


def load_pretrained_causal_lm(
    path: str | Path,
    quantize: str | None = "nf4",
    torch_dtype: torch.dtype | str = torch.bfloat16,
    skip=("lm_head",),
    block_size: int = 64,
    double_quant: bool = True,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a causal LM from local directory ``path`` (``config.json`` + safetensors), shard by shard.

    ``quantize="nf4"``: every ``nn.Linear`` whose name is not in ``skip`` becomes a frozen
    :class:`Linear4bit` (block ``block_size``, ``double_quant``), quantized on ``device`` (Triton on
    CUDA) as its weight is read; ``None`` loads full precision. Other tensors are cast to
    ``torch_dtype``. The result equals ``quantize_model(AutoModelForCausalLM.from_pretrained(path,
    dtype=torch_dtype), skip, ...)`` while peak host memory stays near the 4-bit model plus the
    unquantized tensors plus one tensor. Raises ValueError if a model tensor is missing from the
    checkpoint (tied weights excepted); checkpoint tensors the model has no place for are skipped with
    a warning (obsolete ones, like per-layer ``rotary_emb.inv_freq``, silently).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"Invalid path={str(path)!r}: expected a directory with config.json and safetensors.")
    if quantize not in (None, "nf4"):
        raise ValueError(f"Invalid quantize={quantize!r}: expected 'nf4' or None.")
    dtype = _DTYPES.get(torch_dtype, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"Invalid torch_dtype={torch_dtype!r}: expected float32, bfloat16 or float16.")
    skip = _check_skip(skip)
    _check_options(block_size, double_quant, None)
    files = checkpoint_files(path)

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantize == "nf4":
        _swap_in_meta_linear4bit(model, skip, block_size, double_quant, dtype)
    names = set(model.state_dict(keep_vars=True)) | {
        f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Linear4bit)
    }
    ignored = _ignored_keys(model)
    unexpected = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for key in shard.keys():
                target = _model_key(model, key, names)
                if target is None or not _place(model, target, shard.get_tensor(key), dtype, device):
                    if not ignored.search(key):
                        unexpected.append(key)
    if unexpected:
        warnings.warn(f"Checkpoint {str(path)!r} has {len(unexpected)} tensors the model does not use, "
                      f"e.g. {unexpected[:5]}; they were skipped.", stacklevel=2)
    model.tie_weights()
    missing = _still_on_meta(model)
    if missing:
        raise ValueError(f"Checkpoint {str(path)!r} lacks tensors the model needs: {missing[:5]}.")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    model.to(device)
    return model.eval()


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
    from transformers import AutoModelForCausalLM

    if quantize not in (None, "nf4"):
        raise ValueError(f"Invalid quantize={quantize!r}: expected 'nf4' or None.")
    if torch_dtype not in _DTYPES.values():
        raise ValueError(f"Invalid torch_dtype={torch_dtype!r}: expected float32, bfloat16 or float16.")
    skip = _check_skip(skip)
    _check_options(block_size, double_quant, None)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    if quantize == "nf4":
        _swap_in_meta_linear4bit(model, skip, block_size, double_quant, torch_dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
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
    """Whether tensor ``key`` of ``model`` (param, buffer or a Linear4bit weight) is still to be made;
    a Linear4bit's code and scale buffers are made with its weight, never on their own."""
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, Linear4bit):
        if leaf == "weight":
            return module.qweight.device.type == "meta"
        if leaf != "bias":
            return False
    tensor = module._parameters.get(leaf)
    tensor = module._buffers.get(leaf) if tensor is None else tensor
    return tensor is not None and tensor.device.type == "meta"
