"""Every recipe in configs/ parses (``--print_config``); the tiny ones train a few steps; the bundled
copy is the same files (one source: ``lowmem_lightning/recipes`` links to ``configs/``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowmem_lightning.cli import RECIPES_DIR, main, parse_fit_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
TINY = [name for name in RECIPES if name.startswith("tiny")]
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_recipes_exist_and_are_bundled():
    assert {"tiny.yaml", "qlora_7b.yaml", "full_finetune_1b.yaml"} <= set(RECIPES)
    for optimizer in ("adamw", "paged_adamw_8bit", "sgd", "adafactor", "came"):
        assert f"tiny_{optimizer}.yaml" in RECIPES
    bundled = sorted(p.relative_to(RECIPES_DIR) for p in RECIPES_DIR.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*") if p.is_file())
    assert bundled == shipped
    assert RECIPES_DIR.resolve() == CONFIGS.resolve()


@pytest.mark.parametrize("name", RECIPES)
def test_print_config(name, capsys):
    assert main(["fit", "--config", str(CONFIGS / name), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith("CausalLMModule")
    assert printed["data"]["class_path"].endswith("TextDataModule")
    callbacks = printed["trainer"]["callbacks"]
    assert any(c["class_path"].endswith("LowMemOptimizerCallback") for c in callbacks)


def _callback(cfg):
    return next(c for c in cfg.trainer.callbacks if c.class_path.endswith("LowMemOptimizerCallback"))


def test_qlora_7b_recipe():
    cfg = parse_fit_config(["--config", "qlora_7b.yaml"])
    model = cfg.model.init_args
    assert model.quantize == "nf4" and model.gradient_checkpointing and model.torch_dtype == "bfloat16"
    assert model.lora == {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": LLAMA_PROJECTIONS}
    assert model.warmup_steps > 0 and model.scheduler == "cosine"
    assert _callback(cfg).init_args.optimizer == "paged_adamw_8bit"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    arch = json.loads((CONFIGS / "llama-2-7b" / "config.json").read_text())
    assert (arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]) == (4096, 11008, 32)
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["vocab_size"]) == (32, 32, 32000)
    assert arch["rms_norm_eps"] == 1e-5 and arch["max_position_embeddings"] == 4096
    assert arch["tie_word_embeddings"] is False
    # the model path is the user's field; the data is JSONL instruction data
    cfg = parse_fit_config(["--config", "qlora_7b.yaml", "--model.model_name_or_path", str(ROOT)])
    assert cfg.model.init_args.model_name_or_path == str(ROOT)
    from lowmem_lightning.data import SAMPLE_DIR

    assert cfg.data.init_args.data_path == "sample" and (SAMPLE_DIR / "instructions.jsonl").is_file()
    assert cfg.data.init_args.tokenizer == cfg.model.init_args.model_name_or_path  # tokenizer: model


def test_full_finetune_1b_recipe():
    cfg = parse_fit_config(["--config", "full_finetune_1b.yaml"])
    assert cfg.model.init_args.lora is None and cfg.model.init_args.quantize is None
    assert Path(cfg.model.init_args.model_name_or_path, "config.json").is_file()


def test_full_finetune_1b_is_about_1b_params(capsys):
    assert main(["estimate", "--config", "full_finetune_1b.yaml", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == data["trainable_params"] == 1_100_048_384  # TinyLlama-1.1B


def _short_run(name: str, tmp_path: Path, steps: int = 2) -> list[str]:
    return [
        "fit", "--config", str(CONFIGS / name),
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.seq_len", "32",
    ]


@pytest.mark.parametrize("name", ["tiny.yaml"])
def test_tiny_recipe_trains_a_few_steps(name, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(_short_run(name, tmp_path)) == 0
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert [r["optim/state_MiB"] != "" for r in rows if r["train_loss"]] == [True, True]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TINY if n != "tiny.yaml"])
def test_tiny_optimizer_recipes_train_a_few_steps(name, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    assert main(_short_run(name, tmp_path)) == 0
    assert next(tmp_path.rglob("metrics.csv")).is_file()


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    """``lowmem fit --config configs/tiny.yaml`` as a user runs it: loss falls, per-step state memory
    in metrics.csv, the PNG, the end-of-fit summary; the rich bar shows the loss and state MiB."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from lowmem_lightning.cli import main; sys.exit(main())",
         "fit", "--config", "configs/tiny.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    train = [r for r in rows if r["train_loss"]]
    assert len(train) == 300 and all(r["optim/state_MiB"] for r in train)
    first, last = float(train[0]["train_loss"]), sum(float(r["train_loss"]) for r in train[-20:]) / 20
    assert last < 0.6 * first
    assert next(tmp_path.rglob("state_memory.png")).stat().st_size > 1000
    assert "fp32 AdamW would hold" in out and "300/300 steps" in out and "state 0.53 MiB" in out


@pytest.mark.slow
def test_wheel_ships_the_recipes(tmp_path):
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=600)
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    for recipe in RECIPES + ["llama-2-7b/config.json", "tinyllama-1.1b/config.json"]:
        assert f"lowmem_lightning/recipes/{recipe}" in names
