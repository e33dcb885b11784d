"""The tiny recipe on a chat data set, written for a real ``lowmem`` process, and that process run: shared by the
tests of added and untrained token rows (``test_added_tokens.py``, ``test_untrained_tokens.py``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from lowmem_calls import LOWMEM

from lowmem_lightning.cli import RECIPES_DIR


def chat_recipe(files: Path, name: str, model: dict, steps: int, tokenizer: str) -> Path:
    """``files/name``: ``tiny.yaml`` on ``files/chat.jsonl`` and the tokenizer ``files/tokenizer`` with ``model``
    init args (its ``config`` replaced), ``steps`` steps validated once at the end, checkpoints every 2 steps into
    ``ckpts-NAME/`` (all kept), no plot, bar or summary table."""
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"].update({"max_steps": steps, "val_check_interval": steps, "limit_val_batches": 1,
                              "enable_progress_bar": False, "enable_model_summary": False})
    callbacks = recipe["trainer"]["callbacks"]
    callbacks[0]["init_args"]["plot"] = False
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": f"ckpts-{Path(name).stem}", "every_n_train_steps": 2,
                                    "save_top_k": -1, "filename": "{step}"}})
    init = recipe["model"]["init_args"]
    init.pop("config")
    init.update(model)
    recipe["data"]["init_args"].update({"data_path": str(files / "chat.jsonl"), "tokenizer": str(files / tokenizer),
                                        "seq_len": 32, "batch_size": 4})
    (files / name).write_text(yaml.safe_dump(recipe))
    return files / name


def run_lowmem(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``lowmem ARGS`` in ``cwd`` (one thread, 200 columns), asserted to exit 0; its captured output."""
    proc = subprocess.run([LOWMEM, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
