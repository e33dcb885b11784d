"""What ``host_embeddings`` takes off the GPU under the QLoRA recipe: ``lowmem estimate`` (meta build, no weights) of
``configs/qlora_7b.yaml`` on a few architectures, with and without ``--model.host_embeddings true``.

Architectures (``config.json`` files written to a temporary directory; nothing is downloaded):

* Gemma 3n E4B's text model: transformers' ``Gemma3nTextConfig()`` defaults (35 layers, hidden 2048, 262144 x 35 x 256
  per-layer embeddings; its main embedding is tied to the head, so it stays on the device);
* Llama-2-7B: the recipe's own ``configs/llama-2-7b`` (untied 32000 x 4096 input embedding);
* a Llama-3-8B-shaped model (``LlamaConfig`` with 128256 x 4096 untied embeddings, 32 layers, GQA 8).

    python benchmarks/host_embeddings.py

Prints a markdown table: device weights, the recipe's device total (weights + gradients + optimizer state +
activations where the estimator models them) and the tables' host bytes; GB = 10**9 bytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _architectures(folder: Path) -> dict[str, Path]:
    """``{name: checkpoint directory}`` of the architectures, each a ``config.json`` alone."""
    from transformers import Gemma3nTextConfig, LlamaConfig

    dirs = {}
    gemma = folder / "gemma-3n-e4b-text"
    Gemma3nTextConfig(architectures=["Gemma3nForCausalLM"]).save_pretrained(gemma)
    dirs["Gemma 3n E4B (text)"] = gemma
    dirs["Llama-2-7B"] = ROOT / "configs" / "llama-2-7b"
    llama3 = folder / "llama-3-8b-shape"
    LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(llama3)
    dirs["Llama-3-8B shape"] = llama3
    return dirs


def _estimate(model_dir: Path, host: bool) -> dict:
    lowmem = shutil.which("lowmem") or str(Path(sys.executable).parent / "lowmem")
    proc = subprocess.run([lowmem, "estimate", "--config", "qlora_7b.yaml", "--model.model_name_or_path",
                           str(model_dir), "--model.host_embeddings", str(host).lower(), "--format", "json"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    rows = ["| model | host_embeddings | device weights (GB) | device total, recipe (GB) "
            "| tables in host memory (GB) |", "|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in _architectures(Path(tmp)).items():
            for host in (False, True):
                est = _estimate(model_dir, host)
                recipe = est["optimizers"][est["configured_optimizer"]]
                weights = est["frozen_bytes"] + est["trainable_bytes"]
                rows.append(f"| {name} | {host} | {weights / 1e9:.3f} | {recipe['total_device_bytes'] / 1e9:.3f} | "
                            f"{est['host_table_bytes'] / 1e9:.3f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
