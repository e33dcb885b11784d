"""Checkpoints written as the Hub holds pre-quantized releases (gpt-oss's MXFP4 experts, fine-grained FP8 weights), for
the loader's tests: two shards, each quantized tensor's codes in the first and its scales in the second (one tensor's
parts in different files), an index, and the release's ``quantization_config`` in ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
CODES_SHARD, SCALES_SHARD = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def write_release(model, path: Path, quantization: dict,
                  encode: Callable[[str, torch.Tensor], tuple[dict, dict] | None]) -> None:
    """``model`` saved as a release: ``encode(key, tensor)`` gives ``({codes key: tensor}, {scales key: tensor})`` for
    each tensor stored quantized (``None``: stored in bf16)."""
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    codes, scales = {}, {}
    for key, tensor in model.state_dict().items():
        parts = encode(key, tensor)
        if parts is None:
            codes[key] = tensor.to(torch.bfloat16).contiguous()
        else:
            codes.update(parts[0])
            scales.update(parts[1])
    files = {CODES_SHARD: codes, SCALES_SHARD: scales}
    for name, tensors in files.items():
        save_file(tensors, path / name, metadata={"format": "pt"})
    weight_map = {key: name for name, tensors in files.items() for key in tensors}
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def rewrite_shard(path: Path, shard: str, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to the tensors of ``shard`` in ``path`` (a dict to edit in place) and write them back."""
    tensors = {key: tensor.clone() for key, tensor in load_file(path / shard).items()}
    change(tensors)
    save_file({key: tensor.contiguous() for key, tensor in tensors.items()}, path / shard, metadata={"format": "pt"})
