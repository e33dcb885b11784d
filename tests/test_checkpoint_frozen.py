"""``checkpoint_frozen=False``: a LoRA / QLoRA run's Lightning checkpoints hold what trains, not the frozen base.

Through ``lowmem fit`` on a tiny Llama checkpoint written by ``save_pretrained`` (NF4 + LoRA, adamw_8bit, a checkpoint
every step): the checkpoint holds the LoRA tensors alone and is a fraction of a whole one; resuming from it continues
exactly as from a whole one; ``lowmem export`` and ``load_from_checkpoint`` give the same model; a base that changed
since (another checkpoint in the directory) is refused naming a tensor; a frozen tensor changed after the build stays
in the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lowmem_calls import lowmem_in_process
from tiny_checkpoints import same_contents

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.frozen_base import FROZEN_BASE_KEY, drop_unchanged, tensor_digests
from lowmem_lightning.modules.causal_lm import CausalLMModule

LORA = {"r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("base") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _recipe(root: Path, base: Path, frozen: bool) -> Path:
    """The tiny recipe's trainer and data on a QLoRA model of ``base`` (adamw_8bit, no validation), a full checkpoint
    every step in ``root/ckpts``."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"].update({"max_steps": 2, "limit_val_batches": 0, "enable_progress_bar": False,
                              "enable_model_summary": False, "logger": False})
    recipe["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": "ckpts", "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1}}]
    init = recipe["model"]["init_args"]
    init.pop("config")
    init.update({"model_name_or_path": str(base), "quantize": "nf4", "lora": LORA, "optimizer": "adamw_8bit",
                 "checkpoint_frozen": frozen})
    recipe["data"]["init_args"].update({"seq_len": 32, "batch_size": 4})
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _fit(capsys, monkeypatch, root: Path, *args: str):
    proc = lowmem_in_process(capsys, monkeypatch, root, "fit", "--config", "run.yaml", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _ckpt(root: Path, step: int) -> dict:
    return torch.load(root / "ckpts" / f"step={step}.ckpt", map_location="cpu", weights_only=False)


class _NoCapture:
    """What :func:`lowmem_in_process` reads the output from, for a module-scoped fixture (which has no ``capsys``)."""

    @staticmethod
    def readouterr() -> tuple[str, str]:
        return "", ""


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """``{"whole": dir, "trained": dir}``: 4 steps with whole checkpoints; 2 steps with checkpoint_frozen=False, then
    resumed with ``--ckpt_path last`` to step 4."""
    root, monkeypatch = tmp_path_factory.mktemp("runs"), pytest.MonkeyPatch()
    dirs = {"whole": _recipe(root / "whole", base, True), "trained": _recipe(root / "trained", base, False)}
    try:
        _fit(_NoCapture, monkeypatch, dirs["whole"], "--trainer.max_steps", "4")
        _fit(_NoCapture, monkeypatch, dirs["trained"])
        _fit(_NoCapture, monkeypatch, dirs["trained"], "--trainer.max_steps", "4", "--ckpt_path", "last")
    finally:
        monkeypatch.undo()
    return dirs


def test_the_checkpoint_holds_the_lora_tensors_alone_and_a_fraction_of_the_bytes(runs):
    whole, trained = _ckpt(runs["whole"], 2), _ckpt(runs["trained"], 2)
    assert set(trained["state_dict"]) == {k for k in whole["state_dict"] if ".lora_" in k}
    record = trained[FROZEN_BASE_KEY]
    assert set(record["tensors"]) == set(whole["state_dict"]) - set(trained["state_dict"])
    assert record["model_name_or_path"].endswith("llama")
    sizes = {name: (runs[name] / "ckpts" / "step=2.ckpt").stat().st_size for name in runs}
    assert sizes["trained"] < 0.6 * sizes["whole"], sizes  # tiny model: LoRA and its state are a large part here


def test_resuming_from_it_continues_as_from_a_whole_checkpoint(runs):
    """Steps 3 and 4 after ``--ckpt_path last`` on the trained-only checkpoint: the weights LoRA trains and the
    optimizer state equal those of 4 steps straight with whole checkpoints."""
    whole, trained = _ckpt(runs["whole"], 4), _ckpt(runs["trained"], 4)
    lora = {k: v for k, v in whole["state_dict"].items() if ".lora_" in k}
    assert same_contents(lora, trained["state_dict"])
    assert same_contents(whole["optimizer_states"], trained["optimizer_states"])


def test_load_from_checkpoint_rebuilds_the_base(runs, base):
    whole = CausalLMModule.load_from_checkpoint(runs["whole"] / "ckpts" / "step=4.ckpt", map_location="cpu")
    trained = CausalLMModule.load_from_checkpoint(runs["trained"] / "ckpts" / "step=4.ckpt", map_location="cpu")
    assert same_contents(whole.state_dict(), trained.state_dict())


def test_lowmem_export_of_it_writes_the_same_merged_model(runs, capsys, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    merged = {}
    for name in runs:
        out = tmp_path / name
        proc = lowmem_in_process(capsys, monkeypatch, runs[name], "export", "--config", "run.yaml", "--ckpt_path",
                                 str(runs[name] / "ckpts" / "step=4.ckpt"), "--save_dir", str(out),
                                 "--save_merged", "true")
        assert proc.returncode == 0, proc.stderr[-3000:]
        merged[name] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert same_contents(merged["whole"], merged["trained"])


def test_a_changed_base_is_refused_naming_a_tensor_that_differs(base, tmp_path, capsys, monkeypatch):
    """The base directory was overwritten since the checkpoint was written (another checkpoint in the same place: one
    weight changed): resuming would train the adapters on a base they never saw. Refused: exit 2, one message naming
    a tensor that differs, nothing written."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "llama"
    shutil.copytree(base, other)
    root = _recipe(tmp_path / "run", other, False)
    _fit(capsys, monkeypatch, root, "--trainer.max_steps", "1")
    [file] = other.glob("*.safetensors")
    tensors = load_file(file)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    proc = lowmem_in_process(capsys, monkeypatch, root, "fit", "--config", "run.yaml", "--trainer.max_steps", "3",
                             "--ckpt_path", "last")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("Invalid checkpoint: it holds the trained weights only (checkpoint_frozen=False), and the frozen base "
            f"this run built from model_name_or_path={str(other)!r} is not the one it trained on") in proc.stderr
    assert "e.g. 'model.base_model.model.model.layers.1.mlp.down_proj.base_layer." in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in (root / "ckpts").iterdir()) == ["step=1.ckpt"]
    export = lowmem_in_process(capsys, monkeypatch, root, "export", "--config", "run.yaml", "--ckpt_path",
                               str(root / "ckpts" / "step=1.ckpt"), "--save_dir", "adapter")
    assert export.returncode == 2 and "is not the one it trained on" in export.stderr, export.stderr[-3000:]
    assert not (root / "adapter").exists()


def test_a_frozen_tensor_changed_after_the_build_stays_in_the_checkpoint():
    """A callback that trained a tensor and froze it again: its checksum is no longer the build's, so the save keeps
    it (the base would not give it back)."""
    state = {"kept.weight": torch.ones(3), "frozen.weight": torch.zeros(4), "changed.weight": torch.zeros(5),
             "lora.weight": torch.ones(2)}
    baseline = tensor_digests({k: v for k, v in state.items() if k != "lora.weight"})
    state["changed.weight"] += 1e-3
    dropped = drop_unchanged(state, trainable={"lora.weight"}, baseline=baseline)
    assert set(dropped) == {"kept.weight", "frozen.weight"}
    assert set(state) == {"changed.weight", "lora.weight"}


@pytest.mark.parametrize("kwargs, words", [
    ({"lora": None}, "Invalid checkpoint_frozen=False with lora=None"),
    ({"model_name_or_path": None, "config": {"hidden_size": 64}}, "model_name_or_path=None: checkpoints leave out"),
    ({"checkpoint_frozen": "no"}, "Invalid checkpoint_frozen='no': expected True or False."),
])
def test_refused_where_the_base_cannot_be_rebuilt(base, kwargs, words):
    args = {"model_name_or_path": str(base), "quantize": None, "lora": LORA, "checkpoint_frozen": False, **kwargs}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        CausalLMModule(**args)


def test_the_checksum_is_summed_a_chunk_at_a_time_to_the_same_value(monkeypatch):
    """torch casts a reduction's input to int64 up front (a 1.3 GB bf16 table would take 5.4 GB at a save): the sum
    goes a chunk at a time, to the value of the whole sum, for every element size."""
    from lowmem_lightning import frozen_base

    monkeypatch.setattr(frozen_base, "_CHUNK", 1000)
    generator = torch.Generator().manual_seed(0)
    for tensor in (torch.randn(70, 33, generator=generator).to(torch.bfloat16), torch.randn(4097, generator=generator),
                   torch.randint(0, 255, (2500,), dtype=torch.uint8, generator=generator),
                   torch.randn(1500, generator=generator).double()):
        integers = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
        whole = tensor.view(integers).to(torch.int64).sum()
        assert tensor_digests({"t": tensor})["t"] == (int(whole), tensor.numel(), str(tensor.dtype)[6:])


def test_a_run_resumes_across_the_setting(runs, base, tmp_path, capsys, monkeypatch):
    """``checkpoint_frozen`` sets what a checkpoint holds, not what the model is: a run with it ``false`` (the recipe
    now) resumes a whole checkpoint (one written before), and a run with it ``true`` a trained-only one, each to the
    weights of 4 steps straight. Before, the first was refused as "saved from a different model"."""
    want = {k: v for k, v in _ckpt(runs["whole"], 4)["state_dict"].items() if ".lora_" in k}
    for name, frozen in (("whole", False), ("trained", True)):
        root = _recipe(tmp_path / name, base, frozen)
        _fit(capsys, monkeypatch, root, "--trainer.max_steps", "4", "--ckpt_path",
             str(runs[name] / "ckpts" / "step=2.ckpt"))
        got = {k: v for k, v in _ckpt(root, 4)["state_dict"].items() if ".lora_" in k}
        assert same_contents(got, want), name


def _tensor_bytes(checkpoint: dict) -> int:
    """Bytes of the distinct tensors of a checkpoint's weights and optimizer state (what ``torch.save`` writes once
    each)."""
    seen: dict[tuple, int] = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            seen[(value.untyped_storage().data_ptr(), value.dtype, value.shape)] = value.nbytes
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for key in ("state_dict", "current_model_state", "optimizer_states"):
        walk(checkpoint.get(key))
    return sum(seen.values())


def test_lowmem_estimate_says_the_checkpoint_size(runs, capsys, monkeypatch):
    """``lowmem estimate``'s checkpoint figure of each recipe (whole, and with ``checkpoint_frozen: false``) is the
    tensor bytes of its checkpoints within 1% (the optimizer's scalars and Lightning's loop state aside)."""
    import json

    for name, root in runs.items():
        proc = lowmem_in_process(capsys, monkeypatch, root, "estimate", "--config", "run.yaml", "--format", "json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        estimate = json.loads(proc.stdout)
        said = estimate["optimizers"]["adamw_8bit"]["checkpoint_bytes"]
        measured = _tensor_bytes(_ckpt(root, 4))
        assert abs(said - measured) <= 0.01 * measured, (name, said, measured)
        assert ("left out" in estimate["checkpoint_detail"]) == (name == "trained")


def test_lowmem_estimate_reads_the_callbacks_setting_and_counts_a_weight_average(runs, capsys, monkeypatch, tmp_path):
    """The callback's ``checkpoint_frozen: false`` leaves the base out of the figure as the module's does; an
    ``EMAWeightAveraging`` adds its own tensors (what trains: the average shares the frozen base)."""
    import json

    recipe = yaml.safe_load((runs["whole"] / "run.yaml").read_text())
    recipe["trainer"]["callbacks"] += [
        {"class_path": "lowmem_lightning.callbacks.LowMemOptimizerCallback",
         "init_args": {"optimizer": "adamw_8bit", "checkpoint_frozen": False}},
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging"}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "run.yaml", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    estimate = json.loads(proc.stdout)
    trained = estimate["trainable_bytes"]
    assert estimate["checkpoint_weight_bytes"] == 2 * trained, estimate["checkpoint_detail"]
    assert "left out" in estimate["checkpoint_detail"] and "weight average" in estimate["checkpoint_detail"]


def test_lowmem_estimate_counts_swas_copy_of_the_module(runs, capsys, monkeypatch, tmp_path):
    """``StochasticWeightAveraging`` writes a copy of the module's weights into every checkpoint: the whole state
    dict again, or what trains when the checkpoint leaves the base out."""
    import json

    figures = {}
    for frozen in (True, False):
        recipe = yaml.safe_load((runs["whole"] / "run.yaml").read_text())
        recipe["model"]["init_args"]["checkpoint_frozen"] = frozen
        recipe["trainer"]["callbacks"] += [{"class_path": "lightning.pytorch.callbacks.StochasticWeightAveraging",
                                            "init_args": {"swa_lrs": 1e-3}}]
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
        proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "run.yaml", "--format", "json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        figures[frozen] = json.loads(proc.stdout)
    proc = lowmem_in_process(capsys, monkeypatch, runs["whole"], "estimate", "--config", "run.yaml", "--format",
                             "json")
    without = json.loads(proc.stdout)["checkpoint_weight_bytes"]
    assert figures[False]["checkpoint_weight_bytes"] == 2 * figures[False]["trainable_bytes"]
    assert figures[True]["checkpoint_weight_bytes"] == 2 * without > 4 * figures[False]["trainable_bytes"]


def test_the_callbacks_setting_on_a_causal_lm_module_resumes_and_exports(runs, base, tmp_path, capsys, monkeypatch):
    """``checkpoint_frozen: false`` on the recipe's LowMemOptimizerCallback rather than on its CausalLMModule: the
    checkpoints hold the LoRA tensors alone, ``--ckpt_path last`` resumes to the whole run's step-4 weights, and
    ``lowmem export`` writes the whole run's merged model (the module takes the base back from its record)."""
    from safetensors.torch import load_file

    root = _recipe(tmp_path / "callback", base, True)
    recipe = yaml.safe_load((root / "run.yaml").read_text())
    recipe["trainer"]["callbacks"].append({"class_path": "lowmem_lightning.callbacks.LowMemOptimizerCallback",
                                           "init_args": {"optimizer": "adamw_8bit", "checkpoint_frozen": False}})
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    _fit(capsys, monkeypatch, root)
    _fit(capsys, monkeypatch, root, "--trainer.max_steps", "4", "--ckpt_path", "last")
    mine, whole = _ckpt(root, 4), _ckpt(runs["whole"], 4)
    assert set(mine["state_dict"]) == {k for k in whole["state_dict"] if ".lora_" in k}
    assert same_contents(mine["state_dict"], {k: v for k, v in whole["state_dict"].items() if ".lora_" in k})
    merged = {}
    for name, directory in (("callback", root), ("whole", runs["whole"])):
        out = tmp_path / f"export-{name}"
        proc = lowmem_in_process(capsys, monkeypatch, directory, "export", "--config", "run.yaml", "--ckpt_path",
                                 str(directory / "ckpts" / "step=4.ckpt"), "--save_dir", str(out),
                                 "--save_merged", "true")
        assert proc.returncode == 0, proc.stderr[-3000:]
        merged[name] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert same_contents(merged["callback"], merged["whole"])


def test_lowmem_estimate_places_swas_average_on_its_device(runs, capsys, monkeypatch, tmp_path):
    """``StochasticWeightAveraging`` keeps a copy of the whole module on the CPU unless told otherwise: on a GPU run
    that is host memory (nothing in the device totals, its size in the detail); on a CPU run it is the device's."""
    import json

    recipe = yaml.safe_load((runs["whole"] / "run.yaml").read_text())
    recipe["trainer"]["callbacks"] += [{"class_path": "lightning.pytorch.callbacks.StochasticWeightAveraging",
                                        "init_args": {"swa_lrs": 1e-3}}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
    found = {}
    for accelerator in ("gpu", "cpu"):
        proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "run.yaml", "--format", "json",
                                 "--trainer.accelerator", accelerator)
        assert proc.returncode == 0, proc.stderr[-2000:]
        found[accelerator] = json.loads(proc.stdout)
    assert found["gpu"]["average_bytes"] == 0
    assert found["gpu"]["average_detail"].startswith("StochasticWeightAveraging: ") and (
        "in host memory (device cpu), a copy of the whole model" in found["gpu"]["average_detail"])
    whole = found["cpu"]["frozen_bytes"] + found["cpu"]["trainable_bytes"]
    assert found["cpu"]["average_bytes"] == whole
    assert found["cpu"]["average_detail"] == "StochasticWeightAveraging: a copy of the whole model"
