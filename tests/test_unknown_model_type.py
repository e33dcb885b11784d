"""A model newer than the installed transformers (its ``model_type`` is one transformers does not have, and it ships
no code of its own): refused in one sentence naming the model type, transformers' version, the nearest names it has
and the upgrade, from an architecture dict and from a checkpoint's ``config.json``. Before, the architecture dict got
transformers' own error, which lists every model type it knows: some 12,000 characters on the terminal."""

from __future__ import annotations

import json

import pytest
import transformers
from lowmem_calls import lowmem_in_process

from lowmem_lightning.modules.causal_lm import make_config
from lowmem_lightning.quant.loading import ModelFileError, read_model_config
from lowmem_lightning.remote_code import unknown_model_type_problem

UPGRADE = "a model released after this transformers needs a newer one: pip install -U transformers."


def test_a_model_type_transformers_has_is_no_problem():
    assert unknown_model_type_problem("llama") is None and unknown_model_type_problem(None) is None


def test_an_architecture_dict_naming_an_unknown_model_type_is_refused_in_one_sentence():
    with pytest.raises(ValueError) as caught:
        make_config({"model_type": "gemma9", "hidden_size": 64})
    message = str(caught.value)
    assert message.startswith("Invalid config={'model_type': 'gemma9', 'hidden_size': 64}: it names model_type "
                              f"'gemma9', which transformers {transformers.__version__} does not have (nearest: gemma")
    assert message.endswith(UPGRADE) and len(message) < 300


def _checkpoint(folder, config: dict):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_checkpoint_naming_an_unknown_model_type_is_refused_naming_its_config(tmp_path):
    folder = _checkpoint(tmp_path / "ck", {"model_type": "qwen9_moe", "hidden_size": 64})
    with pytest.raises(ModelFileError) as caught:
        read_model_config(folder)
    message = str(caught.value)  # the nearest names depend on the transformers release
    assert message.startswith(f"Model file {folder / 'config.json'} names model_type 'qwen9_moe', which "
                              f"transformers {transformers.__version__} does not have (nearest: qwen")
    assert "qwen3_moe" in message and message.endswith(f"); {UPGRADE}")


@pytest.mark.parametrize("model_args", [
    ["--model.config", '{"model_type": "gemma9", "hidden_size": 64}'],
    ["--model.model_name_or_path", "ck", "--model.config", "null"],
])
def test_lowmem_fit_refuses_an_unknown_model_type_in_one_message(model_args, tmp_path, capsys, monkeypatch):
    """``lowmem fit`` (its entry point, in this process): exit 2, the refusal and its one line of advice, nothing
    written."""
    _checkpoint(tmp_path / "ck", {"model_type": "gemma9", "hidden_size": 64})
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "tiny.yaml", *model_args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("lowmem fit: error: ") and "Traceback" not in proc.stderr
    assert f"names model_type 'gemma9', which transformers {transformers.__version__} does not have" in proc.stderr
    assert UPGRADE in proc.stderr and len(proc.stderr) < 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
