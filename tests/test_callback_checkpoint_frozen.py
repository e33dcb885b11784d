"""``LowMemOptimizerCallback(checkpoint_frozen=False)``: a user's own LoRA LightningModule writes checkpoints without
its frozen base, and they resume and load exactly.

The module is written as peft's and Lightning's users write it (``from_pretrained`` + ``get_peft_model`` in
``__init__``, its own AdamW and LR scheduler); Lightning-AI/pytorch-lightning#21053 asks for this (trimming by hand
then needs ``strict=False``, which hides a real mismatch). Each situation is compared with the same run writing whole
checkpoints, or with the straight run.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lowmem_calls import lowmem_in_process
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LeaveOutFrozenBase, LowMemOptimizerCallback, load_from_checkpoint
from lowmem_lightning.frozen_base import FROZEN_BASE_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama written by ``save_pretrained`` (the pretrained base every module loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("base") / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


class LoraModule(L.LightningModule):
    """A user's QLoRA-style module: the base from a directory, LoRA on q/v, AdamW with a step-wise LinearLR; one batch
    per epoch, so a resume at any step continues exactly."""

    def __init__(self, base_path: str, lr: float = 1e-2, nf4: bool = False):
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForCausalLM

        from lowmem_lightning.quant import quantize_model

        torch.manual_seed(1)  # the LoRA init: every instance starts from the same adapters
        model = AutoModelForCausalLM.from_pretrained(base_path)
        if nf4:
            model = quantize_model(model)
        self.model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def train_dataloader(self):
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
        return DataLoader(TensorDataset(ids), batch_size=2)

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(module, root: Path, steps: int, frozen: bool, ckpt_path=None, callbacks=(), **trainer_args):
    saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1,
                            save_weights_only=trainer_args.pop("weights_only", False))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[
                            LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False,
                                                    checkpoint_frozen=frozen), saver, *callbacks], **trainer_args)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _trained(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" in k}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_optimizer(a: dict, b: dict) -> bool:
    flat = [(torch.nn.utils.parameters_to_vector([t.float().reshape(-1) for t in v.values()
                                                  if isinstance(t, torch.Tensor)]))
            for s in (a, b) for v in s["optimizer_states"][0]["state"].values()]
    half = len(flat) // 2
    return all(torch.equal(x, y) for x, y in zip(flat[:half], flat[half:]))


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    """4 steps with whole checkpoints and 4 with the frozen base left out, a checkpoint every step."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, frozen in (("whole", True), ("trimmed", False)):
        module = LoraModule(str(base))
        _fit(module, root / name, 4, frozen)
        out[name] = module
    return root


def test_the_checkpoint_holds_what_trains_and_is_a_fraction_of_a_whole_one(runs):
    whole, trimmed = _load(runs / "whole" / "step=4.ckpt"), _load(runs / "trimmed" / "step=4.ckpt")
    assert set(trimmed["state_dict"]) == {k for k in whole["state_dict"] if "lora_" in k}
    assert _same(trimmed["state_dict"], {k: v for k, v in whole["state_dict"].items() if "lora_" in k})
    assert _same_optimizer(whole, trimmed)
    record = trimmed[FROZEN_BASE_KEY]
    assert record["module"].endswith("LoraModule") and set(record["tensors"]) == set(whole["state_dict"]) - set(
        trimmed["state_dict"])
    sizes = {name: (runs / name / "step=4.ckpt").stat().st_size for name in ("whole", "trimmed")}
    left_out = sum(whole["state_dict"][k].nbytes for k in record["tensors"])
    assert sizes["whole"] - sizes["trimmed"] >= 0.98 * left_out and sizes["trimmed"] < 0.35 * sizes["whole"], sizes


def test_a_resume_in_a_new_module_continues_as_the_straight_run(runs, base, tmp_path):
    module = LoraModule(str(base))
    _fit(module, tmp_path, 4, False, ckpt_path=runs / "trimmed" / "step=2.ckpt")
    resumed, straight = _load(tmp_path / "step=4.ckpt"), _load(runs / "trimmed" / "step=4.ckpt")
    assert _same(resumed["state_dict"], straight["state_dict"]) and _same_optimizer(resumed, straight)
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]
    assert FROZEN_BASE_KEY in resumed  # the resumed run leaves the base out too


def test_a_whole_checkpoint_resumes_into_a_trimming_run_and_back(runs, base, tmp_path):
    """The setting decides what a checkpoint holds, not what resumes: whole -> trimmed and trimmed -> whole."""
    for source, frozen in (("whole", False), ("trimmed", True)):
        module = LoraModule(str(base))
        _fit(module, tmp_path / source, 4, frozen, ckpt_path=runs / source / "step=2.ckpt")
        assert _same(_trained(module), {k: v for k, v in _load(runs / "whole" / "step=4.ckpt")["state_dict"].items()
                                        if "lora_" in k})


def test_load_from_checkpoint_gives_the_trained_module(runs, base):
    loaded = load_from_checkpoint(LoraModule, runs / "trimmed" / "step=4.ckpt", map_location="cpu")
    whole = LoraModule.load_from_checkpoint(runs / "whole" / "step=4.ckpt", map_location="cpu")
    assert _same(loaded.state_dict(), whole.state_dict())
    assert "on_load_checkpoint" not in LoraModule.__dict__  # the class is left as it was
    with pytest.raises(RuntimeError, match="Missing key"):  # Lightning's own load needs the helper
        LoraModule.load_from_checkpoint(runs / "trimmed" / "step=4.ckpt", map_location="cpu")


def test_another_base_is_refused_before_any_step_naming_a_tensor(runs, base, tmp_path):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(other)
    module = LoraModule(str(other))
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"Invalid checkpoint: it leaves out the frozen weights .* 1 of its \d+ "
                                         r"frozen tensors differ, e\.g\. '.*layers\.1\.mlp\.down_proj\.weight'"):
        _fit(module, tmp_path / "run", 4, False, ckpt_path=runs / "trimmed" / "step=2.ckpt")
    assert _same(module.state_dict(), before) and not list(tmp_path.joinpath("run").glob("*.ckpt"))
    with pytest.raises(ValueError, match="down_proj"):
        load_from_checkpoint(LoraModule, runs / "trimmed" / "step=2.ckpt", base_path=str(other))


def test_an_nf4_base_is_left_out_and_comes_back(base, tmp_path):
    """Our NF4 layers (codes and scales are buffers) as a user's QLoRA module builds them: left out, taken back."""
    straight = LoraModule(str(base), nf4=True)
    _fit(straight, tmp_path / "a", 4, False)
    assert len(_load(tmp_path / "a" / "step=2.ckpt")["state_dict"]) == 8
    resumed = LoraModule(str(base), nf4=True)
    _fit(resumed, tmp_path / "b", 4, False, ckpt_path=tmp_path / "a" / "step=2.ckpt")
    assert _same(resumed.state_dict(), straight.state_dict())


class WithValidation(LoraModule):
    def validation_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch[0], labels=batch[0]).loss
        self.log("val_loss", loss)

    def val_dataloader(self):
        return self.train_dataloader()


def test_validate_with_ckpt_path_takes_the_base_back(runs, base):
    """``trainer.validate(ckpt_path=...)`` (and test, predict) load as a resume does."""
    losses = []
    for name in ("whole", "trimmed"):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False)])
        (metrics,) = trainer.validate(WithValidation(str(base)), ckpt_path=runs / name / "step=4.ckpt", verbose=False)
        losses.append(metrics["val_loss"])
    assert losses[0] == losses[1]


class ChangesAFrozenNorm(L.Callback):
    """A frozen tensor changed after the build (as a schedule that trains a layer, then freezes it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:  # before step 2's checkpoint: Lightning runs ModelCheckpoint's hooks last
            with torch.no_grad():
                pl_module.model.base_model.model.model.norm.weight.add_(0.5)


def test_a_frozen_tensor_changed_after_the_build_stays_in_every_later_checkpoint(base, tmp_path):
    module = LoraModule(str(base))
    _fit(module, tmp_path / "a", 4, False, callbacks=[ChangesAFrozenNorm()])
    norm = "model.base_model.model.model.norm.weight"
    assert norm not in _load(tmp_path / "a" / "step=1.ckpt")["state_dict"]
    assert all(norm in _load(tmp_path / "a" / f"step={s}.ckpt")["state_dict"] for s in (2, 3, 4))
    resumed = LoraModule(str(base))
    _fit(resumed, tmp_path / "b", 4, False, ckpt_path=tmp_path / "a" / "step=2.ckpt")
    assert _same(resumed.state_dict(), module.state_dict())
    assert norm in _load(tmp_path / "b" / "step=4.ckpt")["state_dict"]  # held: not the build's, kept


def test_bf16_true_resumes_a_module_built_in_fp32(base, tmp_path):
    """``precision="bf16-true"`` casts the module after the resume loaded it: the left-out tensors are compared in
    the checkpoint's dtype, and the resume equals the straight run."""
    straight = LoraModule(str(base))
    _fit(straight, tmp_path / "a", 4, False, precision="bf16-true")
    assert len(_load(tmp_path / "a" / "step=2.ckpt")["state_dict"]) == 8
    resumed = LoraModule(str(base))
    _fit(resumed, tmp_path / "b", 4, False, ckpt_path=tmp_path / "a" / "step=2.ckpt", precision="bf16-true")
    assert _same(resumed.state_dict(), straight.state_dict())
    a, b = (_load(tmp_path / run / "step=4.ckpt")["state_dict"] for run in "ab")
    assert _same(a, b)


def test_weights_only_checkpoints_leave_it_out_too(base, tmp_path):
    """Lightning calls no callback hook for a weights-only checkpoint: the module's hook does it."""
    _fit(LoraModule(str(base)), tmp_path, 2, False, weights_only=True)
    checkpoint = _load(tmp_path / "step=2.ckpt")
    assert "optimizer_states" not in checkpoint and len(checkpoint["state_dict"]) == 8


def test_with_ema_both_weights_leave_it_out_and_resume_exactly(base, tmp_path):
    def ema():
        return EMAWeightAveraging(decay=0.5)

    straight = LoraModule(str(base))
    _fit(straight, tmp_path / "a", 4, False, callbacks=[ema()])
    checkpoint = _load(tmp_path / "a" / "step=2.ckpt")
    assert len(checkpoint["state_dict"]) == len(checkpoint["current_model_state"]) == 8
    resumed = LoraModule(str(base))
    _fit(resumed, tmp_path / "b", 4, False, ckpt_path=tmp_path / "a" / "step=2.ckpt", callbacks=[ema()])
    assert _same(resumed.state_dict(), straight.state_dict())
    for key in ("state_dict", "current_model_state"):
        assert _same(_load(tmp_path / "a" / "step=4.ckpt")[key], _load(tmp_path / "b" / "step=4.ckpt")[key])


def test_with_swa_its_average_leaves_it_out_and_resumes_exactly(base, tmp_path):
    """``StochasticWeightAveraging`` keeps a copy of the whole module and writes it into every checkpoint (its callback
    state's ``average_model_state``): left out there too, taken back at the resume, which ends where the resume of
    the whole checkpoint ends. (Lightning's SWA resume does not end on the straight run's weights, with or without
    this library: plain Lightning and torch AdamW differ too.)"""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    def swa():
        return StochasticWeightAveraging(swa_lrs=5e-3, swa_epoch_start=1, annealing_epochs=1)

    resumed = {}
    for frozen in (True, False):
        root = tmp_path / str(frozen)
        _fit(LoraModule(str(base)), root / "a", -1, frozen, callbacks=[swa()], max_epochs=4)
        resumed[frozen] = LoraModule(str(base))
        _fit(resumed[frozen], root / "b", -1, frozen, ckpt_path=root / "a" / "step=3.ckpt", callbacks=[swa()],
             max_epochs=4)
    checkpoint = _load(tmp_path / "False" / "a" / "step=3.ckpt")
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("StochasticWeightAveraging")]
    assert len(state["average_model_state"]) == len(checkpoint["state_dict"]) == 8
    assert _same(resumed[True].state_dict(), resumed[False].state_dict())


def test_a_save_after_the_fit_and_a_notebooks_second_fit(base, tmp_path):
    """``trainer.save_checkpoint`` after the fit leaves the base out as the fit's checkpoints did; a second fit of the
    same module keeps the first fit's record of the build (a tensor changed between the fits stays in); a third
    under ``checkpoint_frozen=True`` writes whole checkpoints again, and the module's own hook runs throughout."""
    module = LoraModule(str(base))
    saves = []
    module.on_save_checkpoint = lambda checkpoint: saves.append(checkpoint["global_step"])
    trainer = _fit(module, tmp_path / "a", 2, False)
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert len(_load(tmp_path / "after.ckpt")["state_dict"]) == 8
    with torch.no_grad():
        module.model.base_model.model.lm_head.weight.add_(1.0)
    _fit(module, tmp_path / "b", 3, False)
    assert set(_load(tmp_path / "b" / "step=3.ckpt")["state_dict"]) - set(_load(tmp_path / "after.ckpt")[
        "state_dict"]) == {"model.base_model.model.lm_head.weight"}
    _fit(module, tmp_path / "c", 4, True)
    assert len(_load(tmp_path / "c" / "step=4.ckpt")["state_dict"]) == len(module.state_dict())
    assert saves == [1, 2, 2, 1, 2, 3, 1, 2, 3, 4]  # a new Trainer counts from 0


def test_by_default_the_module_is_left_as_it_was(base, tmp_path):
    """With the default ``checkpoint_frozen=True`` the callback takes back a trimmed checkpoint at a load, and after
    the fit the module holds nothing of this package: pickled (``torch.save(model)``, MLflow's ``log_model``), it
    loads where lowmem_lightning is not installed."""
    import pickle

    module = LoraModule(str(base))
    _fit(module, tmp_path, 2, True)
    assert not {"on_save_checkpoint", "on_load_checkpoint"} & set(module.__dict__)
    assert b"lowmem_lightning" not in pickle.dumps(module)


def test_invalid_setting_is_named():
    with pytest.raises(ValueError, match=r"Invalid checkpoint_frozen='no': expected True .* or False"):
        LowMemOptimizerCallback(checkpoint_frozen="no")
    assert [p.leave_out for p in LowMemOptimizerCallback().parts if isinstance(p, LeaveOutFrozenBase)] == [False]


def test_under_fsdp_checkpoints_stay_whole_said_once():
    from lightning.pytorch.strategies import FSDPStrategy

    class Trainer:
        strategy = FSDPStrategy.__new__(FSDPStrategy)

    module = LoraModule.__new__(LoraModule)
    torch.nn.Module.__init__(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LeaveOutFrozenBase().setup(Trainer(), module, "fit")
    assert [str(w.message) for w in caught] == [
        "LowMemOptimizerCallback(checkpoint_frozen=False): checkpoints stay whole under FSDPStrategy (the model's "
        "state is written apart, shard by shard)."]
    assert "on_save_checkpoint" not in module.__dict__


def test_through_lowmem_fit_and_ckpt_path_last(base, tmp_path, capsys, monkeypatch):
    """The user's module by class path in a recipe, the callback's ``checkpoint_frozen: false``; killed runs resume
    with ``--ckpt_path last`` (here: a 2-step run, then the same recipe to 4 steps)."""
    recipe = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": [
                        {"class_path": "lowmem_lightning.callbacks.LowMemOptimizerCallback",
                         "init_args": {"optimizer": "adamw_8bit", "checkpoint_frozen": False, "plot": False,
                                       "print_summary": False}},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": "ckpts", "save_last": True}}]},
        "model": {"class_path": "test_callback_checkpoint_frozen.LoraModule", "init_args": {"base_path": str(base)}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
    first = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "run.yaml")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(_load(tmp_path / "ckpts" / "last.ckpt")["state_dict"]) == 8
    second = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "run.yaml", "--trainer.max_steps",
                               "4", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-3000:]
    last = _load(tmp_path / "ckpts" / "last.ckpt")
    assert last["global_step"] == 4 and len(last["state_dict"]) == 8


def _lowmem_lora(base_path: str, **kwargs):
    """A ``LowMemModule`` subclass as its README section writes one: the same LoRA model, the module's own
    ``adamw_8bit`` with warmup."""
    from lowmem_lightning import LowMemModule

    class MyLora(LowMemModule):
        def __init__(self):
            super().__init__(optimizer="adamw_8bit", lr=1e-2, warmup_steps=1, **kwargs)
            self.model = LoraModule(base_path).model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def train_dataloader(self):
            return LoraModule.train_dataloader(self)

    return MyLora()


def _fit_module_only(module, root: Path, steps: int, ckpt_path=None, callbacks=()):
    saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[saver, *callbacks])
    trainer.fit(module, ckpt_path=ckpt_path)


def test_a_save_reads_each_frozen_tensor_once_with_ema(base, tmp_path, monkeypatch):
    """The average shares the frozen base, so its ``state_dict`` and ``current_model_state`` hold the same frozen
    tensors: a save checksums each once (before: once per state dict, two reads of the base)."""
    from lowmem_lightning import frozen_base

    module = LoraModule(str(base))
    trainer = _fit(module, tmp_path / "a", 2, False, callbacks=[EMAWeightAveraging(decay=0.5)])
    calls = []
    checksum = frozen_base._checksum
    monkeypatch.setattr(frozen_base, "_checksum", lambda tensor: calls.append(tensor.numel()) or checksum(tensor))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    checkpoint = _load(tmp_path / "after.ckpt")
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert len(checkpoint["state_dict"]) == len(checkpoint["current_model_state"]) == 8
    assert len(calls) == len(frozen) and sum(calls) == sum(p.numel() for p in frozen)


def test_a_resume_reads_the_base_once_with_ema(base, tmp_path, monkeypatch):
    """The checkpoint's ``state_dict`` (the average) and ``current_model_state`` both left the base out: the resume
    checks the module's frozen tensors against the record once, not once per state dict."""
    from lowmem_lightning import frozen_base

    _fit(LoraModule(str(base)), tmp_path / "a", 2, False, callbacks=[EMAWeightAveraging(decay=0.5)])
    record = _load(tmp_path / "a" / "step=2.ckpt")[FROZEN_BASE_KEY]
    calls = []
    checksum = frozen_base._checksum
    monkeypatch.setattr(frozen_base, "_checksum", lambda tensor: calls.append(1) or checksum(tensor))
    _fit(LoraModule(str(base)), tmp_path / "b", 3, False, ckpt_path=tmp_path / "a" / "step=2.ckpt",
         callbacks=[EMAWeightAveraging(decay=0.5)])
    resume_reads = len(calls) - 2 * len(record["tensors"])  # fit start's baseline and step 3's save read it once each
    assert resume_reads == len(record["tensors"])


def test_a_lowmem_module_subclass_leaves_it_out_and_resumes_exactly(base, tmp_path):
    straight = _lowmem_lora(str(base), checkpoint_frozen=False)
    _fit_module_only(straight, tmp_path / "a", 4)
    assert len(_load(tmp_path / "a" / "step=2.ckpt")["state_dict"]) == 8
    resumed = _lowmem_lora(str(base), checkpoint_frozen=False)
    _fit_module_only(resumed, tmp_path / "b", 4, ckpt_path=tmp_path / "a" / "step=2.ckpt")
    assert _same(resumed.state_dict(), straight.state_dict())
    whole = _lowmem_lora(str(base))  # the default writes whole checkpoints, and resumes a trimmed one
    _fit_module_only(whole, tmp_path / "c", 4, ckpt_path=tmp_path / "a" / "step=2.ckpt")
    assert _same(whole.state_dict(), straight.state_dict())
    assert len(_load(tmp_path / "c" / "step=4.ckpt")["state_dict"]) == len(whole.state_dict())
    with pytest.raises(ValueError, match=r"Invalid checkpoint_frozen=1: expected True"):
        _lowmem_lora(str(base), checkpoint_frozen=1)


def test_the_callbacks_setting_holds_on_a_lowmem_module(base, tmp_path):
    """A ``LowMemModule`` brings its own part (Lightning puts a module's callbacks in place of the Trainer's of the
    same type); the callback's ``checkpoint_frozen=False`` still leaves the base out."""
    module = _lowmem_lora(str(base))
    callback = LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False, checkpoint_frozen=False)
    _fit_module_only(module, tmp_path, 2, callbacks=[callback])
    assert len(_load(tmp_path / "step=2.ckpt")["state_dict"]) == 8
