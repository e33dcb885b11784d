"""transformers' attention implementation chosen by ``CausalLMModule(attn_implementation=...)`` (``--model.
attn_implementation``): the model is built with it, it is recorded where a resume and ``load_from_checkpoint`` read
it, what this machine cannot run is refused before the run starts, and ``lowmem estimate`` models or names it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from launched_scripts import launch_env
from lowmem_calls import lowmem_in_process

from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}

STEPS = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]


def _flash_attention_2_installed() -> bool:
    import transformers.utils

    return transformers.utils.is_flash_attn_2_available()


def test_lowmem_fit_with_eager_attention_trains_records_it_and_its_checkpoint_rebuilds_it(tmp_path, capsys,
                                                                                          monkeypatch):
    """``--model.attn_implementation eager`` on the tiny recipe: the run finishes, its logged hyperparameters say
    eager, and the checkpoint it wrote loads (``load_from_checkpoint``) into a model that attends eagerly, with the
    trained weights."""
    run = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "tiny.yaml",
                            "--model.attn_implementation", "eager", *STEPS)
    assert run.returncode == 0, run.stderr[-3000:]
    logged = yaml.safe_load(next(tmp_path.glob("runs/tiny/version_0/hparams.yaml")).read_text())
    assert logged["attn_implementation"] == "eager"
    checkpoint = next(tmp_path.glob("runs/tiny/version_0/checkpoints/*.ckpt"))
    restored = CausalLMModule.load_from_checkpoint(checkpoint)
    assert restored.model.config._attn_implementation == "eager"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_eager_and_sdpa_give_the_same_logits_and_a_model_without_sdpa_is_refused_by_name():
    """The switch reaches the layers (eager returns the attention weights it holds; SDPA none) and computes what
    SDPA does; Gemma 2, which transformers runs eagerly only, refuses ``sdpa`` naming the argument and the model."""
    torch.manual_seed(0)
    models = {impl: build_causal_lm(None, TINY, device="cpu", attn_implementation=impl) for impl in ("eager", "sdpa")}
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    ids = torch.randint(0, 300, (2, 16))
    outputs = {impl: model(input_ids=ids, output_attentions=impl == "eager") for impl, model in models.items()}
    assert outputs["eager"].attentions[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(outputs["eager"].logits, outputs["sdpa"].logits, rtol=1e-5, atol=1e-5)
    gemma2 = {**TINY, "model_type": "gemma2", "head_dim": 16}
    with pytest.raises(ValueError, match=r"Invalid attn_implementation='sdpa' for this gemma2 model: "):
        build_causal_lm(None, gemma2, device="cpu", attn_implementation="sdpa")


def test_an_implementation_that_is_not_one_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"Invalid attn_implementation='flash': expected one of sdpa, eager, "
                                         r"flex_attention, flash_attention_2, flash_attention_3, flash_attention_4"):
        CausalLMModule(config=TINY, attn_implementation="flash")


@pytest.mark.skipif(_flash_attention_2_installed(), reason="flash-attn is installed here")
def test_lowmem_fit_refuses_flash_attention_without_the_package_before_anything_is_written(tmp_path):
    """A real ``lowmem`` process: exit 2, one message naming the argument, the value and what it needs, no
    traceback, no run folder."""
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "fit", "--config", "tiny.yaml",
                           "--model.attn_implementation", "flash_attention_2"], cwd=tmp_path, env=launch_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [
        "lowmem fit: error: Invalid attn_implementation='flash_attention_2': it needs flash-attn, which this Python "
        "does not have (flash attention runs on CUDA GPUs only); 'sdpa' runs everywhere and uses flash kernels on the "
        "GPU where it can.", "(all options: lowmem fit --help)"], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_choice_names_the_value_even_inside_a_choice(tmp_path, capsys, monkeypatch):
    """'flash' is part of 'flash_attention_2': the message still ends with the value given."""
    run = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "tiny.yaml",
                            "--model.attn_implementation", "flash")
    assert run.returncode == 2
    assert run.stderr.splitlines()[0].endswith("'flash_attention_4', null. Given value: flash"), run.stderr
    assert list(tmp_path.iterdir()) == []


def test_lowmem_estimate_models_eager_and_names_flash_attention_for_a_gpu_run(tmp_path, capsys, monkeypatch):
    """The estimate describes a run elsewhere, so flash attention is not refused on this machine: its activations
    are said not modelled; eager's are modelled, above SDPA's, and said in the detail."""
    def activations(*args: str) -> list[str]:
        run = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "tiny.yaml", *args)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("activations "))
        return " ".join(" ".join(lines[start:start + 3]).split())

    sdpa, eager = activations(), activations("--model.attn_implementation", "eager")
    assert "eager attention" in eager and "eager" not in sdpa
    assert eager.split()[2] == sdpa.split()[2] and float(eager.split()[1]) > float(sdpa.split()[1])  # same unit
    assert "document mask" in sdpa and "packed rows' rotary tables" in eager  # tiny.yaml packs, documents apart
    flash = activations("--model.attn_implementation", "flash_attention_2")
    assert "not modelled for attention 'flash_attention_2' (fitted to 'sdpa', 'eager')" in flash, flash
