"""A checkpoint that ships code of its own (``config.json``'s ``auto_map`` for a ``model_type`` transformers does not
have, as InternLM2 or MiniCPM do): refused at once and by name without ``trust_remote_code`` (transformers would ask
``[y/N]`` on the terminal and wait), trained with it, through the real ``lowmem`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launched_scripts import launch_env

CONFIGURATION = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
'''

TOKENIZATION = '''from transformers import PreTrainedTokenizerFast


class TinyCustomTokenizer(PreTrainedTokenizerFast):
    """A fast tokenizer under a class of the model's own."""
'''

MODELING = '''from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''

RUN = """seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 2
  limit_val_batches: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
model:
  class_path: lowmem_lightning.modules.causal_lm.CausalLMModule
  init_args:
    model_name_or_path: {model}
    quantize: nf4
    lora: {{r: 4, alpha: 8}}
    torch_dtype: float32
data:
  class_path: lowmem_lightning.data.text.TextDataModule
  init_args: {{data_path: {data}, tokenizer: {tokenizer}, seq_len: 32, batch_size: 2, val_fraction: 0.0}}
"""


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    """A folder as a model with code of its own ships: the three modules, a ``config.json`` and a
    ``tokenizer_config.json`` whose ``auto_map`` name their classes, safetensors weights (a Llama's, whose layout the
    custom class keeps), a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_custom")
    (folder / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny_custom.py").write_text(MODELING)
    (folder / "tokenization_tiny_custom.py").write_text(TOKENIZATION)
    words = "the quick brown fox jumps over lazy dog .".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", *words])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TinyCustomTokenizer", "unk_token": "<unk>", "eos_token": "</s>",
        "auto_map": {"AutoTokenizer": [None, "tokenization_tiny_custom.TinyCustomTokenizer"]}}))
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=259, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    text = (folder / "config.json").read_text()
    text = text.replace('"model_type": "llama"', '"model_type": "tiny_custom"').replace(
        '"architectures": [\n    "LlamaForCausalLM"\n  ]', '"architectures": ["TinyCustomForCausalLM"], "auto_map": '
        '{"AutoConfig": "configuration_tiny_custom.TinyCustomConfig", '
        '"AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM"}')
    assert '"auto_map"' in text and '"tiny_custom"' in text
    (folder / "config.json").write_text(text)
    return folder


def _lowmem(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """A real ``lowmem`` process in ``tmp_path`` with no terminal to answer a prompt (stdin closed), transformers'
    copies of a model's own code kept under ``tmp_path`` (``HF_MODULES_CACHE``)."""
    env = {**launch_env(), "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    return subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", *args], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


def _config(tmp_path: Path, model: Path, tokenizer: str = "byte") -> str:
    (tmp_path / "words.txt").write_text("the quick brown fox jumps over the lazy dog . " * 60)
    (tmp_path / "run.yaml").write_text(RUN.format(model=model, data=tmp_path / "words.txt", tokenizer=tokenizer))
    return "run.yaml"


def test_lowmem_fit_refuses_a_models_own_code_at_once_naming_the_option(tmp_path, custom_model):
    """Without ``trust_remote_code``: exit 2 before anything runs, one message naming the file, the code's modules,
    the model type and the option; no ``[y/N]`` prompt, nothing written but the inputs (no ``config.yaml`` either:
    with ``logger: false`` LightningCLI writes it into the working folder, which the refusal now cleans too)."""
    config = _config(tmp_path, custom_model)
    proc = _lowmem(tmp_path, "fit", "--config", config)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "[y/N]" not in proc.stdout + proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"lowmem fit: error: Model file {custom_model / 'config.json'} names classes of its own "
                            "(auto_map: configuration_tiny_custom.py, modeling_tiny_custom.py) for model_type "
                            "'tiny_custom'"), proc.stderr
    assert "--model.trust_remote_code true" in first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml", "words.txt"]


def test_lowmem_fit_and_estimate_run_a_models_own_code_when_trusted(tmp_path, custom_model):
    """``--model.trust_remote_code true`` with ``tokenizer: model``: the model's tokenizer class and model class both
    run (QLoRA through the NF4 loader), and the estimate builds the model (its activations: not modelled for that
    model type)."""
    config = _config(tmp_path, custom_model, tokenizer="model")
    fit = _lowmem(tmp_path, "fit", "--config", config, "--model.trust_remote_code", "true")
    assert fit.returncode == 0, fit.stderr[-3000:]
    copied = {p.name for p in (tmp_path / "hf_modules").rglob("*_tiny_custom.py")}
    assert copied == {"configuration_tiny_custom.py", "modeling_tiny_custom.py", "tokenization_tiny_custom.py"}
    estimate = _lowmem(tmp_path, "estimate", "--config", config, "--model.trust_remote_code", "true")
    assert estimate.returncode == 0, estimate.stderr[-3000:]
    assert "not modelled for model_type 'tiny_custom'" in " ".join(estimate.stdout.split()), estimate.stdout


def test_build_causal_lm_refuses_a_non_bool_and_loads_the_custom_class_when_trusted(custom_model, monkeypatch,
                                                                                   tmp_path):
    """The model and its tokenizer in this process: refused by name without the option, their classes with it."""
    import transformers.dynamic_module_utils as dynamic

    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm

    with pytest.raises(ValueError, match=r"Invalid tokenizer=.*: it ships code of its own .* set "
                                         r"--model.trust_remote_code true \(with tokenizer: model\)"):
        TextDataModule(tokenizer=str(custom_model))

    with pytest.raises(ValueError, match=r"Invalid trust_remote_code='yes': expected True or False"):
        CausalLMModule(model_name_or_path=str(custom_model), trust_remote_code="yes")
    with pytest.raises(ValueError, match=r"names classes of its own .* set trust_remote_code: true"):
        build_causal_lm(str(custom_model), device="meta")
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    model = build_causal_lm(str(custom_model), device="cpu", trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM" and model.config.model_type == "tiny_custom"
    data = TextDataModule(tokenizer=str(custom_model), trust_remote_code=True)
    assert type(data.tokenizer.tokenizer).__name__ == "TinyCustomTokenizer"
