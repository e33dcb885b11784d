"""A weight average (Lightning's ``EMAWeightAveraging``) of a LoRA / QLoRA run shares the frozen base, not a copy.

Lightning's ``WeightAveraging`` deep-copies the whole module into torch's ``AveragedModel`` at ``setup``: for a QLoRA
run a second NF4 base, embeddings and norms on the device for the whole fit, copied at every update, and written into
every checkpoint beside the module's own (measured below: the tiny model's average held 204,848 bytes where 32,768
train). :class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen` (a part of ``LowMemOptimizerCallback`` and
of ``LowMemModule``) makes the copy share what does not train. Every averaged value, validation metric and checkpoint
tensor equals the full copy's (the same runs with the sharing switched off); the copy is never made (tensor bytes
deep-copied counted) when the optimizer callback is listed before the averaging one, and dropped at ``setup``
otherwise; a backbone unfrozen later is averaged as by a full copy; ``checkpoint_frozen=False`` leaves the base out of
both the average and the training weights, and such a run resumes exactly.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import test_callback
import torch
import yaml
from lightning.pytorch.callbacks import BackboneFinetuning, EMAWeightAveraging, ModelCheckpoint
from lowmem_calls import lowmem_in_process
from tiny_checkpoints import same_contents
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks import averaging as averaging_module
from lowmem_lightning.callbacks.averaging import SharedParts, _may_share
from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.frozen_base import FROZEN_BASE_KEY
from lowmem_lightning.modules.causal_lm import CausalLMModule

pytestmark = pytest.mark.usefixtures("one_thread")
SAVED = ("state_dict", "current_model_state", "averaging_state", "optimizer_states")
CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture
def no_sharing(monkeypatch):
    """The averaging callbacks copy the whole module, as Lightning alone does."""
    monkeypatch.setattr(averaging_module, "shareable_parts", lambda module, use_buffers: SharedParts())


def _storages(module: nn.Module) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*module.parameters(), *module.buffers()]}


def _own_bytes(average: nn.Module, module: nn.Module) -> int:
    """Bytes of the average's params and buffers in storages the module does not hold."""
    own, theirs = _storages(average), _storages(module)
    return sum(n for ptr, n in own.items() if ptr not in theirs)


def _qlora_fit(root: Path, order: str, steps: int = 4) -> tuple[CausalLMModule, L.Trainer, EMAWeightAveraging]:
    """A tiny QLoRA CausalLMModule (adamw_8bit) with ``EMAWeightAveraging(use_buffers=False)``, validated and saved
    every 2 steps. ``order``: ``callback_first`` (LowMemOptimizerCallback before the averaging), ``averaging_first``,
    ``module_only`` (no optimizer callback: the module's own part)."""
    torch.manual_seed(0)
    module = CausalLMModule(config=CONFIG, quantize="nf4", lora={"r": 4, "alpha": 8}, optimizer="adamw_8bit", lr=3e-3)
    ema = EMAWeightAveraging(decay=0.8, use_buffers=False)
    ours = LowMemOptimizerCallback("adamw_8bit", lr=3e-3, plot=False, print_summary=False)
    saving = ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=2, save_top_k=-1)
    callbacks = {"callback_first": [ours, ema], "averaging_first": [ema, ours], "module_only": [ema]}[order]
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=2,
                        num_sanity_val_steps=0, callbacks=[*callbacks, saving])
    from lowmem_lightning.data import TextDataModule

    trainer.fit(module, TextDataModule("sample", seq_len=32, batch_size=2, val_fraction=0.02, seed=0))
    return module, trainer, ema


@pytest.fixture(scope="module")
def full_copy(tmp_path_factory):
    """The reference: the same QLoRA fit with the sharing switched off (Lightning's full copy, averaged one tensor at
    a time with torch's EMA function)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(averaging_module, "shareable_parts", lambda module, use_buffers: SharedParts())
        patch.setattr(averaging_module, "ema_decay", lambda function: None)
        root = tmp_path_factory.mktemp("full_copy")
        module, trainer, ema = _qlora_fit(root, "callback_first")
    return {"root": root, "own": _own_bytes(ema._average_model.module, module), "after_fit": _frozen_state(module),
            "val_loss": trainer.callback_metrics["val_loss"].clone()}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _frozen_state(module: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v.clone() for k, v in module.state_dict().items() if k not in trainable}


def _split_state(state: dict, trainable: set[str]) -> tuple[dict, dict]:
    return ({k: v for k, v in state.items() if k in trainable}, {k: v for k, v in state.items() if k not in trainable})


@pytest.mark.parametrize("order", ["callback_first", "averaging_first", "module_only"])
def test_the_average_holds_the_adapters_alone_and_averages_them_as_the_full_copy(tmp_path, full_copy, order):
    """The average holds in storage of its own the LoRA weights alone (before: the whole module, 204,848 bytes, 6.3x
    the 32,768 that train). In every checkpoint the averaged and the training LoRA weights, the averaging state and the
    optimizer state are bit-equal to the full copy's, and a checkpoint is a third smaller (the base is written once).
    The frozen tensors stay the base's, in the average too; the full copy's EMA of them drifted by rounding
    (``0.8 * w + 0.2 * w`` is not always ``w``), and its end-of-fit copy wrote that drift into the module's frozen
    weights (so its validation loss, on the average, differs in the last digits)."""
    module, trainer, ema = _qlora_fit(tmp_path, order)
    assert isinstance(ema._average_model.multi_avg_fn.inner, averaging_module.EMAMultiFunction)  # the same bits
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    trainable_bytes = sum(module.get_parameter(name).nbytes for name in trainable)
    assert full_copy["own"] == sum(_storages(module).values()) == 204_848 and trainable_bytes == 32_768
    assert _own_bytes(ema._average_model.module, module) == trainable_bytes
    for name in ("epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"):
        ours, theirs = _load(tmp_path / name), _load(full_copy["root"] / name)
        for key in ("state_dict", "current_model_state"):
            assert same_contents(_split_state(ours[key], trainable)[0], _split_state(theirs[key], trainable)[0])
        for key in ("averaging_state", "optimizer_states"):
            assert same_contents(ours[key], theirs[key]), (name, key)
        assert same_contents(_split_state(ours["state_dict"], trainable)[1],
                             _split_state(ours["current_model_state"], trainable)[1])
        assert (tmp_path / name).stat().st_size < 0.7 * (full_copy["root"] / name).stat().st_size
    base = _split_state(_load(tmp_path / "epoch=0-step=2.ckpt")["current_model_state"], trainable)[1]
    drifted = _split_state(_load(full_copy["root"] / "last.ckpt")["state_dict"], trainable)[1]
    assert same_contents(_frozen_state(module), base) and not same_contents(drifted, base)
    assert not same_contents(full_copy["after_fit"], base)
    assert torch.allclose(trainer.callback_metrics["val_loss"], full_copy["val_loss"], rtol=1e-5)


@pytest.mark.parametrize("order, copied_frozen", [("callback_first", False), ("averaging_first", True)])
def test_listed_before_the_averaging_the_copy_never_copies_the_frozen_base(tmp_path, monkeypatch, order,
                                                                            copied_frozen):
    """Tensor bytes deep-copied during the fit: with the optimizer callback first, the trainable ones alone (the
    averaging's copy shares the rest from the start); listed after, the averaging copies the whole module at its
    ``setup`` and the frozen copies are dropped right after (the first test: nothing of them is left)."""
    copied = []
    for cls in (torch.Tensor, nn.Parameter):
        original = cls.__deepcopy__

        def spy(self, memo, original=original):
            copied.append(self.untyped_storage().nbytes())
            return original(self, memo)

        monkeypatch.setattr(cls, "__deepcopy__", spy)
    module, _, _ = _qlora_fit(tmp_path, order, steps=1)
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    frozen = sum(_storages(module).values()) - trainable
    assert (sum(copied) >= frozen) is copied_frozen
    assert sum(copied) >= trainable


def test_a_second_fit_of_the_same_trainer_copies_no_frozen_base_either(tmp_path, monkeypatch):
    """A notebook's second ``trainer.fit`` (same Trainer, callbacks and module): the averaging callback copies the
    module again at its ``setup``; that copy shares the frozen base too (tensor bytes deep-copied: the trainable
    ones alone, counted during the averaging's ``setup``), and the average holds the adapters alone. Before, it
    copied the whole module, and through the callback's ``configure_optimizers`` wrapper on the module the first
    fit's optimizers with their state (14,944 bytes copied here for 3,328 that train)."""
    from test_field_lightning_round3 import OwnQLoRA

    module, ema = OwnQLoRA(), EMAWeightAveraging(decay=0.8)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False), ema])
    trainer.fit(module)
    copied, counting = [], []
    for cls in (torch.Tensor, nn.Parameter):
        original = cls.__deepcopy__

        def spy(self, memo, original=original):
            if counting:
                copied.append(self.untyped_storage().nbytes())
            return original(self, memo)

        monkeypatch.setattr(cls, "__deepcopy__", spy)
    setup = EMAWeightAveraging.setup

    def counted_setup(self, *args, **kwargs):  # the averaging's copy of the module is made here
        counting.append(True)
        try:
            return setup(self, *args, **kwargs)
        finally:
            counting.clear()

    monkeypatch.setattr(EMAWeightAveraging, "setup", counted_setup)
    trainer.fit_loop.epoch_loop.max_steps = 2
    trainer.fit(module)
    trainable = sum(p.nbytes for p in module.parameters() if p.requires_grad)
    assert trainer.global_step == 2 and trainable <= sum(copied) < 2 * trainable
    assert _own_bytes(ema._average_model.module, module) == trainable


class WithBackbone(test_callback.WithBackbone):
    """Lightning's BackboneFinetuning example (``tests/test_callback.py``) with a BatchNorm in the backbone (buffers
    that change in training)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh())
        self.head = nn.Linear(16, 1)


class SharedBackbone(L.Callback):
    """Records at each epoch's end whether the average's backbone is the module's own."""

    def __init__(self, averaging: EMAWeightAveraging):
        self.averaging, self.shared = averaging, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.shared.append(self.averaging._average_model.module.backbone[0] is pl_module.backbone[0])


def _backbone_fit(root: Path, use_buffers: bool):
    """3 epochs; BackboneFinetuning (listed first: it freezes the backbone at ``on_fit_start``) unfreezes at epoch 1."""
    torch.manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(32, 6), torch.randn(32, 1)), batch_size=8)
    module, ema = WithBackbone(), EMAWeightAveraging(decay=0.7, use_buffers=use_buffers)
    spy = SharedBackbone(ema)
    callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=1),
                 LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False), ema, spy,
                 ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)]
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, data)
    return spy.shared, _load(root / "last.ckpt")


@pytest.mark.parametrize("use_buffers", [False, True])
def test_a_backbone_unfrozen_later_is_averaged_as_by_a_full_copy(tmp_path, monkeypatch, use_buffers):
    """BackboneFinetuning freezes the backbone at fit start (shared: the average's is the module's) and unfreezes it
    at epoch 1: from its first training batch the average holds a copy of its own, and the average, its buffers (a
    BatchNorm's running statistics: followed, or averaged with ``use_buffers=True``), the training weights and the
    optimizer state at the end equal the full copy's."""
    shared, ours = _backbone_fit(tmp_path / "shared", use_buffers)
    assert shared == [True, False, False]
    monkeypatch.setattr(averaging_module, "shareable_parts", lambda module, use_buffers: SharedParts())
    full, theirs = _backbone_fit(tmp_path / "full", use_buffers)
    assert full == [False, False, False]
    for key in SAVED:
        assert same_contents(ours[key], theirs[key]), key


@pytest.mark.parametrize("averaging_first", [False, True])
def test_a_users_own_qlora_module_under_the_callback_averages_its_adapters_alone(averaging_first):
    """A user's own LightningModule (our ``quantize_model`` under peft's ``get_peft_model``, built on the CPU in
    ``__init__``) with the callback and ``EMAWeightAveraging(use_buffers=False)`` in either order: the average's own
    storage is the LoRA weights alone, its NF4 layers are the module's."""
    from test_field_lightning_round3 import OwnQLoRA

    module, ema = OwnQLoRA(), EMAWeightAveraging(decay=0.8, use_buffers=False)
    ours = LowMemOptimizerCallback("adamw_8bit", lr=1e-3, plot=False, print_summary=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[ema, ours] if averaging_first else [ours, ema])
    trainer.fit(module)
    trainable = sum(p.nbytes for p in module.parameters() if p.requires_grad)
    assert 0 < _own_bytes(ema._average_model.module, module) == trainable < sum(_storages(module).values()) / 2
    assert ema._average_model.module.net.base_model.model[0].base_layer is module.net.base_model.model[0].base_layer


def test_an_average_kept_on_another_device_is_left_as_lightning_builds_it():
    """``EMAWeightAveraging(device=...)`` on another device than the module's: moving the average there would move
    the shared parts (the module's own) with it, so nothing is shared; on the module's device (any index spelling)
    it is."""
    module = WithBackbone()
    assert not _may_share(EMAWeightAveraging(device="cuda"), module)
    assert not _may_share(EMAWeightAveraging(device="meta"), module)
    assert _may_share(EMAWeightAveraging(device="cpu"), module)
    assert _may_share(EMAWeightAveraging(), module)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("base") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**CONFIG, "vocab_size": 320})).save_pretrained(path)
    return path


def _recipe(root: Path, base: Path) -> Path:
    """The tiny recipe on a QLoRA model of ``base`` with ``checkpoint_frozen: false`` and ``host_embeddings: true``,
    EMA (``use_buffers: false``) after the optimizer callback, a checkpoint every step."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"].update({"limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False,
                              "logger": False})
    recipe["trainer"]["callbacks"][0]["init_args"]["plot"] = False
    recipe["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
         "init_args": {"decay": 0.8, "use_buffers": False}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1}}]
    init = recipe["model"]["init_args"]
    init.pop("config")
    init.update({"model_name_or_path": str(base), "quantize": "nf4", "lora": {"r": 4, "alpha": 8},
                 "checkpoint_frozen": False, "host_embeddings": True})
    recipe["data"]["init_args"].update({"seq_len": 32, "batch_size": 4})
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _fit(capsys, monkeypatch, root: Path, steps: int, *args: str) -> None:
    proc = lowmem_in_process(capsys, monkeypatch, root, "fit", "--config", "run.yaml",
                             "--trainer.max_steps", str(steps), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_checkpoint_frozen_false_leaves_the_base_out_of_the_average_and_the_training_weights(
        tmp_path, base, capsys, monkeypatch):
    """``lowmem fit`` with EMA and ``checkpoint_frozen: false``: both the average (``state_dict``) and the training
    weights (``current_model_state``) hold the LoRA tensors alone (before: the training weights held the whole base);
    2 steps, then ``--ckpt_path last`` to step 4, end bit for bit where 4 steps straight end."""
    straight, resumed = _recipe(tmp_path / "straight", base), _recipe(tmp_path / "resumed", base)
    _fit(capsys, monkeypatch, straight, 4)
    _fit(capsys, monkeypatch, resumed, 2)
    _fit(capsys, monkeypatch, resumed, 4, "--ckpt_path", "last")
    first, a, b = (_load(root / "ckpts" / name) for root, name in
                   ((straight, "step=1.ckpt"), (straight, "step=4.ckpt"), (resumed, "step=4.ckpt")))
    for key in ("state_dict", "current_model_state"):
        assert first[key] and all(".lora_" in name for name in first[key]), key
    assert first[FROZEN_BASE_KEY]["tensors"]
    for key in SAVED:
        assert same_contents(a[key], b[key]), key


def test_a_table_held_in_host_memory_is_shared_not_copied(base):
    """``host_embeddings=True``: the average's embedding is the module's ``HostEmbedding`` itself (a copy would be a
    second host table, page-locked again)."""
    from lowmem_lightning.data import TextDataModule
    from lowmem_lightning.quant.host_embeddings import HostEmbedding

    module = CausalLMModule(model_name_or_path=str(base), quantize="nf4", lora={"r": 4}, host_embeddings=True, lr=1e-3)
    ema = EMAWeightAveraging(decay=0.8, use_buffers=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False, callbacks=[ema])
    trainer.fit(module, TextDataModule("sample", seq_len=32, batch_size=2))
    held = [name for name, m in module.named_modules() if isinstance(m, HostEmbedding)]
    assert held and all(ema._average_model.module.get_submodule(name) is module.get_submodule(name) for name in held)


class FailsAtSetup(L.Callback):
    def setup(self, trainer, pl_module, stage):
        raise RuntimeError("a callback failed at setup")


def test_a_fit_that_fails_before_the_averaging_copied_leaves_the_module_copying_as_before():
    """The module answers the averaging's copy with a sharing copy from the optimizer callback's ``setup``; a fit
    stopped before the averaging copied (a callback in between raised) leaves a module whose ``copy.deepcopy`` copies
    everything again (a user's copy later must not share its weights)."""
    import copy

    module = WithBackbone()
    for p in module.backbone.parameters():
        p.requires_grad_(False)
    callbacks = [LowMemOptimizerCallback("adamw_8bit", plot=False, print_summary=False), FailsAtSetup(),
                 EMAWeightAveraging(use_buffers=False)]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
    with pytest.raises(RuntimeError, match="failed at setup"):
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 6), torch.randn(8, 1)), batch_size=4))
    assert "__deepcopy__" not in module.__dict__
    assert copy.deepcopy(module).backbone is not module.backbone


def _estimate(capsys, monkeypatch, root: Path, lora: bool, averaging: dict | None, *args: str) -> dict:
    """``lowmem estimate --format json`` of the tiny recipe on :data:`CONFIG` (NF4 + LoRA r=4 when ``lora``), with an
    ``EMAWeightAveraging`` of init args ``averaging`` appended to its callbacks (none when ``None``)."""
    import json

    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["model"]["init_args"]["config"] = dict(CONFIG)
    if lora:
        recipe["model"]["init_args"].update({"quantize": "nf4", "lora": {"r": 4, "alpha": 8}})
    if averaging is not None:
        recipe["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
                                               "init_args": averaging})
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    proc = lowmem_in_process(capsys, monkeypatch, root, "estimate", "--config", "run.yaml", "--format", "json", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("lora", [True, False])
def test_estimate_counts_the_average_the_fit_keeps(tmp_path, capsys, monkeypatch, lora):
    """``lowmem estimate`` of a recipe with ``EMAWeightAveraging`` adds the average to every device total: for QLoRA
    the 32,768 bytes of LoRA weights the fit's average holds of its own (first test: measured), for a full
    fine-tune the whole model; one kept on the CPU of a CPU run is on its device too."""
    without = _estimate(capsys, monkeypatch, tmp_path / "none", lora, None)
    with_average = _estimate(capsys, monkeypatch, tmp_path / "ema", lora, {"decay": 0.9, "use_buffers": False})
    on_cpu = _estimate(capsys, monkeypatch, tmp_path / "cpu", lora, {"device": "cpu", "use_buffers": False})
    expected = 32_768 if lora else with_average["trainable_bytes"]
    assert without["average_bytes"] == 0 and with_average["average_bytes"] == on_cpu["average_bytes"] == expected
    assert "EMAWeightAveraging: a copy of " in with_average["average_detail"]
    for row, est in with_average["optimizers"].items():
        assert est["total_device_bytes"] - without["optimizers"][row]["total_device_bytes"] == expected, row


def test_estimate_of_an_average_kept_in_host_memory_and_of_one_that_does_not_fit(tmp_path, capsys, monkeypatch):
    """On a GPU run an average with ``device: cpu`` is a whole copy in host memory: nothing on the device, said in its
    detail. A budget that the weights and gradients fit but not with the average on the device is told to keep the
    average in host memory, not to quantize the base."""
    hosted = _estimate(capsys, monkeypatch, tmp_path / "host", False, {"device": "cpu"}, "--trainer.accelerator", "gpu")
    assert hosted["average_bytes"] == 0 and "in host memory (device cpu), a copy of the whole model" in (
        hosted["average_detail"])
    on_device = _estimate(capsys, monkeypatch, tmp_path / "device", False, {"use_buffers": False})
    need = on_device["frozen_bytes"] + on_device["trainable_bytes"] + on_device["gradient_device_bytes"] + (
        on_device["activation_bytes"])
    budget = str((need + on_device["average_bytes"] // 2) / 1e9)
    told = _estimate(capsys, monkeypatch, tmp_path / "budget", False, {"use_buffers": False}, "--budget-gb", budget)
    assert told["recommendation"].startswith("nothing fits with the weight average on the device")
    assert "keep the average in host memory" in told["recommendation"]


@pytest.mark.parametrize("use_buffers", [False, True])
def test_the_multi_tensor_ema_averages_as_torchs_one_tensor_at_a_time(use_buffers):
    """:class:`EMAMultiFunction` (what a shared average updates with: for the 7B recipe's 448 LoRA tensors 3 calls
    per dtype instead of 1,792) gives torch's per-tensor EMA bit for bit: fp32, bf16 and fp16 params (fp16 and bf16
    multiply out of place: in place, torch rounds 0.9 * w otherwise), a BatchNorm's float statistics and integer
    count, several decays."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    from lowmem_lightning.callbacks.averaging import EMAMultiFunction, ema_decay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 53), nn.BatchNorm1d(53), nn.Linear(53, 29).to(torch.bfloat16),
                          nn.Linear(29, 7).to(torch.float16))
    for decay in (0.999, 0.9, 0.95, 0.7, 0.5):
        assert ema_decay(get_ema_avg_fn(decay)) == decay
        torchs = AveragedModel(model, avg_fn=get_ema_avg_fn(decay), use_buffers=use_buffers)
        ours = AveragedModel(model, multi_avg_fn=EMAMultiFunction(decay), use_buffers=use_buffers)
        for _ in range(5):
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.1)
                model[1].running_mean.add_(0.3)
                model[1].num_batches_tracked += 3
            torchs.update_parameters(model)
            ours.update_parameters(model)
        assert same_contents(torchs.state_dict(), ours.state_dict())
    assert ema_decay(lambda a, b, n: a) is None


def test_the_validation_swap_leaves_the_shared_tensors_alone(tmp_path, monkeypatch):
    """For validation Lightning swaps the average into the module and back, cloning each of the average's tensors
    first: for a shared tensor a copy of the frozen base swapped with itself. The swap now clones what trains alone
    (the 32,768 LoRA bytes of the tiny QLoRA model, not its 204,848), and leaves module and average as Lightning's."""
    from lightning.pytorch.callbacks import WeightAveraging

    module, trainer, ema = _qlora_fit(tmp_path, "callback_first")
    assert ema._swap_models.__func__ is averaging_module.swap_unshared
    cloned = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: cloned.append(self.nbytes) or clone(self, *a, **k))
    states = []
    for swap in (ema._swap_models, lambda m: WeightAveraging._swap_models(ema, m)):
        cloned.clear()
        swap(module)
        states.append(({k: clone(v) for k, v in module.state_dict().items()},
                       {k: clone(v) for k, v in ema._average_model.module.state_dict().items()}, sum(cloned)))
        swap(module)  # and back
    (ours_module, ours_average, ours_bytes), (theirs_module, theirs_average, theirs_bytes) = states
    assert same_contents(ours_module, theirs_module) and same_contents(ours_average, theirs_average)
    trainable = sum(p.nbytes for p in module.parameters() if p.requires_grad)
    assert ours_bytes == trainable == 32_768 and theirs_bytes > 6 * trainable


def test_the_ema_function_pickles_and_averages_as_torchs():
    """``picklable_averaging`` swaps ``EMAWeightAveraging``'s torch closure (which no spawned rank can receive) for
    :class:`EMAFunction`: it pickles, and its averages are torch's bit for bit (fp32 and bf16)."""
    import pickle

    from lowmem_lightning.callbacks.averaging import EMAFunction, picklable_averaging

    averaging = EMAWeightAveraging(decay=0.93)
    torchs = averaging._kwargs["avg_fn"]
    with pytest.raises(AttributeError, match="Can't (pickle|get) local object"):
        pickle.dumps(averaging)
    assert picklable_averaging([averaging, ModelCheckpoint()]) == 1
    ours = pickle.loads(pickle.dumps(averaging))._kwargs["avg_fn"]
    assert isinstance(ours, EMAFunction) and ours.decay == 0.93
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype)
        assert torch.equal(ours(a, b, 3), torchs(a, b, 3))
    assert picklable_averaging([averaging]) == 0  # already swapped


def test_lowmem_fit_with_ema_says_nothing_about_sharding_it_does_not_do(tmp_path):
    """``lowmem fit`` of the tiny recipe with ``EMAWeightAveraging``: Lightning's "WeightAveraging doesn't support
    sharding model layers, so you may run out of memory" (said for any module that builds its model in
    ``configure_model``) is not printed on a single device, where nothing is sharded."""
    import subprocess

    from lowmem_calls import LOWMEM

    proc = subprocess.run([LOWMEM, "fit", "--config", "tiny.yaml", "--trainer.max_steps", "2",
                           "--trainer.limit_val_batches", "0", "--trainer.callbacks+=lightning.pytorch.callbacks."
                           "EMAWeightAveraging"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LowMemOptimizerCallback: adamw_8bit on" in proc.stdout + proc.stderr
    assert "WeightAveraging" not in proc.stdout + proc.stderr
