"""``lowmem export``: a checkpoint of a recipe written as a Hugging Face model directory, as ``save_dir`` writes it at
the end of a fit, and loaded back as users load it.

Two runs are trained here by real ``lowmem fit`` processes (3 steps each, one validation): the tiny recipe (full
weights) with ``EMAWeightAveraging`` and a ``ModelCheckpoint(monitor="val_loss")``, and a QLoRA recipe (NF4 base read
from a tiny Llama directory + LoRA r=4) with a weights-only checkpoint. ``lowmem export`` processes then write the full
model (``--ckpt_path best``: the weight average; ``last`` with ``--weights training``: the training weights), the
adapter and the merged model, whose logits on a fixed input must equal those of the module loaded from the checkpoint
(``CausalLMModule.load_from_checkpoint``). Those runs are ``-m slow`` (about a minute). In the default suite
``lowmem export`` refuses (exit 2, one error line, nothing written) a truncated checkpoint, one of another shape, a
non-empty ``--save_dir`` and ``--save_merged true`` without LoRA, on a tiny-recipe checkpoint trained in process.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lowmem_calls import LOWMEM, lowmem_in_process

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.cli.export import first_mismatch, replace_dir

ENV = {**os.environ, "COLUMNS": "200"}
SMALL = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
         "--data.init_args.seq_len", "32", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
TINY_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128}


def _lowmem(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOWMEM, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)


def _recipe(root: Path, name: str, model: dict | None, checkpoint: dict) -> None:
    """``root/name``: the tiny recipe (no plot) with ``model`` init args replacing its ``config`` (when given) and a
    ModelCheckpoint writing to ``root/ckpts-NAME``; plus EMA weight averaging for the full-weight one."""
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    callbacks = recipe["trainer"]["callbacks"]
    for callback in callbacks:
        callback["init_args"]["plot"] = False
    if model is None:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
                          "init_args": {"decay": 0.9}})
    else:
        init = recipe["model"]["init_args"]
        init.pop("config")
        init.update(model)
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": f"ckpts-{Path(name).stem}", **checkpoint}})
    (root / name).write_text(yaml.safe_dump(recipe))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of the runs (``base/``: a tiny Llama directory for the QLoRA recipe)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=259)).save_pretrained(root / "base")
    return root


def _fit(root: Path, name: str) -> Path:
    proc = _lowmem(root, "fit", "--config", name, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def full_run(runs):
    """``full.yaml`` trained 3 steps by ``lowmem fit``: ``ckpts-full/`` holds its best val_loss checkpoint (EMA
    average + training weights)."""
    _recipe(runs, "full.yaml", None, {"monitor": "val_loss", "save_top_k": 1})
    return _fit(runs, "full.yaml")


@pytest.fixture(scope="module")
def qlora_run(runs):
    """``qlora.yaml`` trained 3 steps by ``lowmem fit``: ``ckpts-qlora/`` holds a weights-only checkpoint."""
    _recipe(runs, "qlora.yaml", {"model_name_or_path": str(runs / "base"), "quantize": "nf4", "lora": {"r": 4}},
            {"every_n_train_steps": 3, "save_weights_only": True})
    return _fit(runs, "qlora.yaml")


def _ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(input_ids=_ids()).logits


def _checkpoint_module(path: Path):
    """The module as Lightning loads it from ``path`` (its ``state_dict``)."""
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    return CausalLMModule.load_from_checkpoint(path, map_location="cpu")


def _one_checkpoint(folder: Path) -> Path:
    [path] = folder.glob("*.ckpt")
    return path


def _leftovers(root: Path) -> list[str]:
    """Hidden staging directories an export left beside its target."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and ".export-" in p.name)


@pytest.mark.slow
def test_full_model_export_loads_with_from_pretrained_with_the_checkpoints_logits(full_run):
    """``--ckpt_path best`` exports the weight average (said in one line) over a stale directory (``--overwrite
    true``); ``last --weights training`` the training weights. Each loads with ``from_pretrained`` and gives the logits
    of the checkpoint's weights."""
    runs = full_run
    from transformers import AutoModelForCausalLM

    stale = runs / "full-out"
    stale.mkdir()
    (stale / "old.txt").write_text("stale")
    proc = _lowmem(runs, "export", "--config", "full.yaml", "--ckpt_path", "best", "--save_dir", "full-out",
                   "--overwrite", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the weight average (its state_dict; --weights training exports the training weights)" in proc.stderr
    assert sorted(p.name for p in stale.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    ckpt = _one_checkpoint(runs / "ckpts-full")
    module = _checkpoint_module(ckpt)
    exported = AutoModelForCausalLM.from_pretrained(stale, local_files_only=True)
    assert torch.equal(_logits(exported), _logits(module.model))

    proc = _lowmem(runs, "export", "--config", "full.yaml", "--ckpt_path", "last", "--weights", "training",
                   "--save_dir", "full-training")
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = AutoModelForCausalLM.from_pretrained(runs / "full-training", local_files_only=True)
    module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["current_model_state"])
    assert torch.equal(_logits(training), _logits(module.model))
    assert not torch.equal(_logits(training), _logits(exported))  # the average is another model
    assert _leftovers(runs) == []


@pytest.mark.slow
def test_lora_export_adapter_on_the_nf4_base_and_merged_model_give_the_checkpoints_logits(qlora_run):
    """A weights-only QLoRA checkpoint: the adapter loads with ``PeftModel.from_pretrained`` on the NF4 base (built
    as the recipe builds it: float32) with the module's logits exactly; ``--save_merged true`` writes a dense model
    that ``from_pretrained`` loads, within fp32 merge rounding."""
    runs = qlora_run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowmem_lightning.quant import load_pretrained_causal_lm

    ckpt = _one_checkpoint(runs / "ckpts-qlora")
    proc = _lowmem(runs, "export", "--config", "qlora.yaml", "--ckpt_path", str(ckpt), "--save_dir", "adapter")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (runs / "adapter").iterdir()}
    want = _logits(_checkpoint_module(ckpt).model)
    base = load_pretrained_causal_lm(str(runs / "base"), quantize="nf4", skip=("lm_head",), torch_dtype=torch.float32)
    before = _logits(base)
    adapted = PeftModel.from_pretrained(base, runs / "adapter")
    assert torch.equal(_logits(adapted), want)
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter moved the logits

    proc = _lowmem(runs, "export", "--config", "qlora.yaml", "--ckpt_path", "last", "--save_dir", "merged",
                   "--save_merged", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(runs / "merged", local_files_only=True)
    torch.testing.assert_close(_logits(merged), want, rtol=0, atol=1e-5)
    assert _leftovers(runs) == []


def _refused(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert line.startswith("lowmem export: error: "), proc.stderr
    for text in expected:
        assert text in line, line


def _shape_changed(source: Path, target: Path, vocab: int) -> None:
    """``source`` saved again as if trained with a tokenizer of ``vocab`` token ids (its embeddings and head)."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    for key in ("model.model.embed_tokens.weight", "model.lm_head.weight"):
        state[key] = torch.zeros(vocab, state[key].shape[1])
    checkpoint["hyper_parameters"]["config"]["vocab_size"] = vocab
    torch.save(checkpoint, target)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint of the tiny recipe's model after one step, trained in this process (the refusals need a real
    checkpoint, not a run)."""
    import lightning as L

    from lowmem_lightning.cli import parse_fit_config
    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    cfg = parse_fit_config(["--config", "tiny.yaml", "--data.seq_len", "32"])
    model = CausalLMModule(**{**cfg.model.init_args.as_dict(), "optimizer": "adamw"})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, TextDataModule(**cfg.data.init_args.as_dict()))
    path = tmp_path_factory.mktemp("tiny") / "step=1.ckpt"
    trainer.save_checkpoint(path)
    return path


SUBPROCESS_REFUSALS = ("truncated",)
"""The refusal run as a real ``lowmem export`` process, as users meet it (refused while the checkpoint is read); the
others, the save directory's checks included, call the same entry point (``lowmem_lightning.cli:main``) in this
process, which asserts the same exit code, message and files without an interpreter start-up each."""


@pytest.mark.parametrize("case", ["truncated", "other_shape", "not_empty", "merged_without_lora", "name_too_long",
                                  "a_file"])
def test_refusals_write_nothing(tiny_ckpt, tmp_path, case, capsys, monkeypatch):
    """Each refusal of ``lowmem export --config tiny.yaml`` exits 2 with one error line naming the argument, and
    writes nothing."""
    ckpt = tiny_ckpt
    args = ["--ckpt_path", str(ckpt), "--save_dir", str(tmp_path / "out")]
    expected: tuple[str, ...] = ()
    if case == "truncated":
        cut = tmp_path / "cut.ckpt"
        cut.write_bytes(ckpt.read_bytes()[:4096])
        args[1], expected = str(cut), (f"ckpt_path={str(cut)!r} is truncated",)
    elif case == "other_shape":
        other = tmp_path / "vocab300.ckpt"
        _shape_changed(ckpt, other, 300)
        args[1] = str(other)
        expected = ("model.model.embed_tokens.weight has shape [300, 96] in the checkpoint, [259, 96] in the "
                    "recipe's model",)
    elif case == "not_empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        expected = (f"save_dir={str(tmp_path / 'out')!r} exists and is not empty (keep.txt)", "--overwrite true")
    elif case == "name_too_long":  # over the file system's NAME_MAX: every look-up fails (ENAMETOOLONG)
        args[3] = str(tmp_path / ("a" * 300))
        expected = (f"save_dir={args[3]!r}: cannot create the directory (File name too long)",)
    elif case == "a_file":
        args[3] = str(tmp_path / "model.txt")
        Path(args[3]).write_text("mine")
        expected = (f"save_dir={args[3]!r} is a file: give a new or empty directory.",)
    else:
        args += ["--save_merged", "true"]
        expected = ("save_merged=True", "only with lora")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    command = ("export", "--config", "tiny.yaml", *args)
    _refused(_lowmem(tmp_path, *command) if case in SUBPROCESS_REFUSALS else
             lowmem_in_process(capsys, monkeypatch, tmp_path, *command, columns=ENV["COLUMNS"]), *expected)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


def test_first_mismatch_names_the_key_and_both_shapes():
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert first_mismatch(model, {"a": torch.zeros(2, 3), "b": torch.zeros(4)}) is None
    assert first_mismatch(model, {"a": torch.zeros(5, 3), "b": torch.zeros(4)}) == (
        "a has shape [5, 3] in the checkpoint, [2, 3] in the recipe's model")
    assert first_mismatch(model, {"a": torch.zeros(2, 3)}) == (
        "b (shape [4]) of the recipe's model is not in the checkpoint")
    assert first_mismatch(model, {**model, "c": torch.zeros(1)}) == "c (shape [1]) is not in the recipe's model"


@pytest.mark.parametrize("existing", [None, [], ["old.bin"]])
def test_replace_dir_puts_the_new_directory_in_place_whole(tmp_path, existing):
    new, target = tmp_path / ".out.export-1", tmp_path / "out"
    new.mkdir()
    (new / "model.safetensors").write_text("new")
    if existing is not None:
        target.mkdir()
        for name in existing:
            (target / name).write_text("old")
    replace_dir(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]


def test_best_is_the_recorded_best_model_path_found_beside_the_checkpoint_that_recorded_it(tmp_path):
    """``--ckpt_path best``: the best_model_path of the newest checkpoint with ModelCheckpoint state; a path recorded
    relative to the folder the fit ran in (``runs/...``) is found in the checkpoint's own folder."""
    from lowmem_lightning.cli.last import recorded_best

    def save(name: str, best: str | None) -> None:
        state = {} if best is None else {"ModelCheckpoint{'monitor': 'val_loss'}": {
            "monitor": "val_loss", "best_model_path": best}}
        torch.save({"global_step": 0, "callbacks": state}, tmp_path / name)

    save("step=2.ckpt", "runs/tiny/version_0/checkpoints/step=2.ckpt")
    assert recorded_best([str(tmp_path)]) == str(tmp_path / "step=2.ckpt")
    save("step=4.ckpt", str(tmp_path / "step=4.ckpt"))
    save("step=6.ckpt", None)  # weights-only: no callback state, passed over
    assert recorded_best([str(tmp_path)]) == str(tmp_path / "step=4.ckpt")
    save("step=8.ckpt", "gone/step=7.ckpt")
    assert recorded_best([str(tmp_path)]) is None
