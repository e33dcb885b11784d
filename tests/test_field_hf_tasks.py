"""Hugging Face users beyond causal LMs add the callback to their own LightningModule (tests/hf_task_users.py):
a T5 seq2seq model on its ``labels=`` loss, a BERT / RoBERTa sequence classifier (NF4 + peft LoRA
``task_type="SEQ_CLS"``, gradient checkpointing, torchmetrics Accuracy) and a BERT token classifier with gradient
release, all under bf16-mixed.

Measured with each module's own fp32 torch AdamW (lr 1e-3, seed 0; ``pytest tests/test_field_hf_tasks.py -m slow
-k torch_adamw``): the mean loss over the last 4 of 40 steps, :data:`T5_ADAMW` for T5 and :data:`CLS_ADAMW` for the
QLoRA classifier; each optimizer of ours must come within 0.05 of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hf_task_users import (
    ClassifierUser,
    HFUser,
    Seq2SeqUser,
    bart,
    classification_data,
    loader,
    qlora_classifier,
    seq2seq_data,
    sequence_classifier,
    t5,
    tagging_data,
    token_classifier,
)
from optim_helpers import one_cpu_thread  # noqa: F401  (autouse: one intra-op thread)

from lowmem_lightning import LowMemOptimizerCallback, LowMemWarning
from lowmem_lightning.optim import state_memory

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lowmem_lightning.quant import Linear4bit, quantize_model  # noqa: E402

T5_ADAMW = 3.660
"""Mean T5 loss over steps 37-40 with the module's fp32 torch AdamW (first 4 steps: 4.863)."""

CLS_ADAMW = 0.302
"""Mean loss over the last 4 of 40 steps of the QLoRA BERT classifier with torch AdamW at lr 3e-2 (first 4: 1.109;
train_acc 0.94)."""

BART_ADAMW = 3.919
"""The same for BART (first 4 steps: 4.174)."""

T5_ADAMW_LR_1E_2 = 2.127
"""The same at lr 1e-2."""

MUON_AS_ADAMW = dict(optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"})
"""Muon with the module's AdamW lr keeping its meaning (the README's way)."""

T5_EPOCHS = 10  # 64 pairs in batches of 16: 40 steps

ADAFACTOR_T5 = dict(lr=1e-3, optimizer_kwargs={"relative_step": False, "scale_parameter": False,
                                               "warmup_init": False})
"""Adafactor as the transformers docs set it for T5 fine-tuning."""


class Losses(L.Callback):
    """Records each training step's loss."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Keep the step's loss."""
        self.values.append(float(outputs["loss"]))


def fit(module: L.LightningModule, data, root: Path, epochs: int, optimizer: str | None = "adamw_8bit",
        precision: str = "bf16-mixed", ckpt_path: str | None = None, **callback_args):
    """``trainer.fit`` of ``module`` for ``epochs`` with ``LowMemOptimizerCallback(optimizer)`` (None: the module's
    AdamW); returns ``(trainer, losses)``."""
    losses = Losses()
    callbacks = [losses]
    if optimizer is not None:
        callbacks.append(LowMemOptimizerCallback(optimizer, print_summary=False, plot=False, **callback_args))
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_epochs=epochs, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=root)
    trainer.fit(module, loader(data), ckpt_path=ckpt_path)
    return trainer, losses.values


def tail_mean(losses: list[float], n: int = 4) -> float:
    """Mean of the last ``n`` losses."""
    return sum(losses[-n:]) / n


def assert_same_params_and_state(a, b) -> None:
    """Params of the two modules and state of the two trainers' optimizers equal bit for bit."""
    for (name, x), y in zip(a[0].named_parameters(), b[0].parameters(), strict=True):
        assert torch.equal(x, y), name
    state_a, state_b = a[1].optimizers[0].state_dict()["state"], b[1].optimizers[0].state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for field, value in state_a[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[key][field])), (key, field)


# ----------------------------------------------------------------------------------------------- seq2seq: T5
@pytest.fixture(scope="module")
def t5_runs(tmp_path_factory):
    """T5 with adamw_8bit: one 10-epoch fit, and 5 epochs saved by ``trainer.save_checkpoint`` then resumed to 10."""
    root = tmp_path_factory.mktemp("t5")
    whole = Seq2SeqUser()
    trainer, losses = fit(whole, seq2seq_data(), root, T5_EPOCHS)
    first = Seq2SeqUser()
    half, _ = fit(first, seq2seq_data(), root, T5_EPOCHS // 2)
    half.save_checkpoint(root / "half.ckpt")
    resumed = Seq2SeqUser(model=t5(seed=1))  # other weights: all that matches comes from the checkpoint
    resumed_trainer, rest = fit(resumed, seq2seq_data(), root, T5_EPOCHS, ckpt_path=str(root / "half.ckpt"))
    return dict(whole=(whole, trainer), losses=losses, resumed=(resumed, resumed_trainer), rest=rest)


def test_t5_learns_its_labels_loss_with_adamw_8bit_as_with_torch_adamw(t5_runs):
    losses = t5_runs["losses"]
    assert len(losses) == 40
    assert tail_mean(losses) < tail_mean(losses[:4]) - 0.5
    assert tail_mean(losses) <= T5_ADAMW + 0.05


def test_t5_resumed_from_save_checkpoint_equals_one_run(t5_runs):
    assert t5_runs["rest"] == t5_runs["losses"][20:]
    assert_same_params_and_state(t5_runs["whole"], t5_runs["resumed"])


def test_t5_generates_after_training(t5_runs):
    model = t5_runs["whole"][0].model.eval()
    source, target = seq2seq_data(8, seed=1).tensors
    out = model.generate(input_ids=source, attention_mask=torch.ones_like(source), max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 8 and 2 <= out.shape[1] <= 9
    assert out.dtype == torch.long and int(out.max()) < model.config.vocab_size


def estimate(tmp_path: Path, module: str, optimizer: str, init_args: str = "{}") -> dict:
    """``lowmem estimate --format json`` of a recipe with ``hf_task_users.<module>`` and the callback."""
    (tmp_path / "recipe.yaml").write_text(
        f"model:\n  class_path: hf_task_users.{module}\n  init_args: {init_args}\n"
        "trainer:\n  precision: bf16-mixed\n  callbacks:\n"
        f"    - class_path: lowmem_lightning.LowMemOptimizerCallback\n      init_args: {{optimizer: {optimizer}}}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowmem_lightning.cli", "estimate", "-c", "recipe.yaml",
                           "--format", "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_lowmem_estimate_takes_the_t5_users_module(t5_runs, tmp_path):
    """``lowmem estimate`` builds the user's module on the meta device: params and adamw_8bit state as the fit's."""
    module, trainer = t5_runs["whole"]
    counted = estimate(tmp_path, "Seq2SeqUser", "adamw_8bit")
    assert counted["params"] == sum(p.numel() for p in module.parameters())
    assert counted["optimizers"]["adamw_8bit"]["state_bytes"] == state_memory(trainer.optimizers[0]).total_bytes


def muon_fit(module: L.LightningModule, data, tmp_path) -> tuple[set[int], list[str]]:
    """One epoch of ``module`` with ``muon_8bit``: the ids of the params on Muon, and the callback's notes about
    ``nn.Embedding`` weights on Muon."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(module, data, tmp_path, 1, "muon_8bit")
    notes = [str(w.message) for w in caught if issubclass(w.category, LowMemWarning)
             and "nn.Embedding weight(s)" in str(w.message)]
    return {id(p) for p in trainer.optimizers[0].muon_params()}, notes


def test_muon_gives_t5s_lookup_tables_adamw(tmp_path):
    """T5's ``shared`` table (also the encoder's and decoder's ``embed_tokens`` and, tied, ``lm_head``) and its
    ``relative_attention_bias`` tables are embeddings: AdamW, with no note; the attention matrices take Muon (these
    tables took Muon before, named in a note)."""
    module = Seq2SeqUser()
    muon, notes = muon_fit(module, seq2seq_data(16), tmp_path)
    t5_model = module.model
    tables = [t5_model.shared.weight, t5_model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
              t5_model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight]
    assert not {id(t) for t in tables} & muon and notes == []
    assert id(t5_model.encoder.block[0].layer[0].SelfAttention.q.weight) in muon


def test_muon_gives_barts_shared_table_adamw(tmp_path):
    """BART's ``shared`` table (tied to ``lm_head``) is an embedding too."""
    module = Seq2SeqUser(model=bart())
    muon, notes = muon_fit(module, seq2seq_data(16), tmp_path)
    assert id(module.model.model.shared.weight) not in muon and notes == []
    assert id(module.model.model.encoder.layers[0].fc1.weight) in muon


def test_muon_gives_robertas_two_layer_classifier_head_adamw(tmp_path):
    """RoBERTa's head is ``classifier.dense`` + ``classifier.out_proj``: both the head's (AdamW), not only a module
    called ``classifier`` (they took Muon before); the encoder's matrices take Muon."""
    module = ClassifierUser(model=sequence_classifier("roberta"))
    muon, _ = muon_fit(module, classification_data(16), tmp_path)
    head = module.model.classifier
    assert not {id(head.dense.weight), id(head.out_proj.weight)} & muon
    assert id(module.model.roberta.encoder.layer[0].attention.self.query.weight) in muon


@pytest.mark.parametrize("optimizer", ["muon", "muon_8bit"])
def test_a_muon_checkpoint_from_before_the_tables_took_adamw_resumes(monkeypatch, optimizer):
    """A Muon state dict saved when T5's tables took Muon (the earlier rule) loads into the current split: their
    Muon momentum gives fresh AdamW moments (zero, step 0; a first moment without a second would divide by eps), one
    warning per table, and the next step is finite; the other params' state loads as saved."""
    from lowmem_lightning.optim import build_optimizer
    from lowmem_lightning.optim import muon as muon_module

    model, ids = t5(), torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))

    def steps(optim, n):
        for _ in range(n):
            optim.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optim.step()

    with monkeypatch.context() as earlier:
        earlier.setattr(muon_module, "LOOKUP_TABLES", ())
        old = build_optimizer(optimizer, model.named_parameters(), lr=1e-3)
        assert id(model.shared.weight) in {id(p) for p in old.muon_params()}
        steps(old, 2)
    saved = old.state_dict()
    new = build_optimizer(optimizer, model.named_parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new.load_state_dict(saved)
    notes = [str(w.message) for w in caught if "its AdamW moments start from zero" in str(w.message)]
    assert len(notes) == 3  # shared and the encoder's and decoder's relative_attention_bias
    order = [id(p) for group in new.param_groups for p in group["params"]]
    q = order.index(id(model.encoder.block[0].layer[0].SelfAttention.q.weight))  # still on Muon: loaded as saved
    loaded = new.state_dict()["state"][q]
    assert loaded.keys() == saved["state"][q].keys()
    assert all(torch.equal(torch.as_tensor(loaded[k]), torch.as_tensor(saved["state"][q][k])) for k in loaded)
    steps(new, 1)
    assert float(new.state[model.shared.weight]["step"]) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class TiedCodebook(L.LightningModule):
    """A user's model whose lookup table has a name Muon's rule does not mark (``codebook``), used by two modules."""

    def __init__(self) -> None:
        super().__init__()
        self.codebook = torch.nn.Embedding(64, 32)
        self.lookup_again = self.codebook  # the same table under a second module name
        self.mix = torch.nn.Linear(32, 32)

    def training_step(self, batch, batch_idx):
        ids, _ = batch
        return self.mix(self.codebook(ids) + self.lookup_again(ids)).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_muon_names_an_unmarked_table_once_by_its_parameter_name(tmp_path):
    """An ``nn.Embedding`` whose name marks nothing takes Muon's update; the one note names it once, as
    ``named_parameters()`` does (``codebook.weight``), not again under its second module name."""
    module = TiedCodebook()
    muon, notes = muon_fit(module, classification_data(16), tmp_path)
    assert id(module.codebook.weight) in muon
    assert len(notes) == 1 and "nn.Embedding weight(s) codebook.weight:" in notes[0]
    assert "lookup_again" not in notes[0]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [None, "adamw_8bit"])
def test_bart_learns_with_adamw_8bit_as_with_torch_adamw(tmp_path, optimizer):
    """BART on its ``labels=`` loss: the module's AdamW reaches :data:`BART_ADAMW`, adamw_8bit within 0.05."""
    _, losses = fit(Seq2SeqUser(model=bart()), seq2seq_data(), tmp_path, T5_EPOCHS, optimizer)
    assert abs(tail_mean(losses) - BART_ADAMW) < (0.01 if optimizer is None else 0.05)


class TablesOnAdamW(Seq2SeqUser):
    """The note's fix: T5's lookup tables in a param group of their own with ``use_muon=False``."""

    def configure_optimizers(self):
        """torch AdamW over two groups: the embedding tables (``use_muon=False``) and the rest."""
        tables = [m.weight for m in self.modules() if isinstance(m, torch.nn.Embedding)]
        ids = {id(t) for t in tables}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return torch.optim.AdamW([{"params": list({id(t): t for t in tables}.values()), "use_muon": False},
                                  {"params": rest}], lr=self.lr)


def test_t5s_tables_in_a_use_muon_false_group_take_adamw(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(TablesOnAdamW(), seq2seq_data(16), tmp_path, 1, "muon_8bit")
    assert not [w for w in caught if "nn.Embedding weight(s)" in str(w.message)]
    module, optimizer = trainer.lightning_module, trainer.optimizers[0]
    muon = {id(p) for p in optimizer.muon_params()}
    assert id(module.model.shared.weight) not in muon and id(module.model.lm_head.weight) not in muon
    assert id(module.model.encoder.block[0].layer[0].SelfAttention.q.weight) in muon
    assert {"exp_avg", "exp_avg_sq"} <= optimizer.state[module.model.shared.weight].keys()  # AdamW part (fp32 < 4096)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, args", [("adafactor", ADAFACTOR_T5), ("came", {})])
def test_t5_learns_with_adafactor_and_came(tmp_path, optimizer, args):
    """Adafactor as T5 users set it and CAME (the module's lr 1e-3) train T5 as AdamW does."""
    _, losses = fit(Seq2SeqUser(), seq2seq_data(), tmp_path, T5_EPOCHS, optimizer, **args)
    assert tail_mean(losses) <= T5_ADAMW + 0.05


@pytest.mark.slow
def test_t5_learns_with_muon_8bit_its_tables_on_adamw(tmp_path):
    """muon_8bit as the note and README say (tables ``use_muon=False``, ``adjust_lr_fn="match_rms_adamw"``) at
    lr 1e-2 trains T5 as AdamW at that lr does (at 1e-3 Muon lags in 40 steps: 4.27 against AdamW's 3.66)."""
    _, losses = fit(TablesOnAdamW(lr=1e-2), seq2seq_data(), tmp_path, T5_EPOCHS, "muon_8bit", **MUON_AS_ADAMW)
    assert tail_mean(losses) <= T5_ADAMW_LR_1E_2 + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("lr, measured", [(1e-3, T5_ADAMW), (1e-2, T5_ADAMW_LR_1E_2)])
def test_t5_with_torch_adamw_reaches_the_measured_loss(tmp_path, lr, measured):
    """The references: the module's own optimizer, no callback."""
    _, losses = fit(Seq2SeqUser(lr=lr), seq2seq_data(), tmp_path, T5_EPOCHS, None)
    assert abs(tail_mean(losses) - measured) < 0.01


# --------------------------------------------------------------------- sequence classification: NF4 + LoRA
@pytest.mark.parametrize("arch, head", [("bert", [""]), ("roberta", [".dense", ".out_proj"])])
def test_quantize_model_keeps_a_classifiers_head_dense(arch, head):
    """The head peft's SEQ_CLS trains whole (``classifier``; RoBERTa's holds two Linears) stays dense: NF4 there
    would leave its weights frozen, random, and only its biases training. The encoder's layers are NF4."""
    model = quantize_model(sequence_classifier(arch))
    assert all(type(model.get_submodule("classifier" + layer)) is torch.nn.Linear for layer in head)
    assert isinstance(model.get_submodule(f"{arch}.encoder.layer.0.attention.self.query"), Linear4bit)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    copy = "base_model.model.classifier.modules_to_save.default"
    assert trainable == {f"{copy}{layer}.{kind}" for layer in head for kind in ("weight", "bias")}


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """The QLoRA BERT classifier trained 10 epochs with adamw_8bit (lr 3e-2), and its adapter saved; and 5 epochs
    saved by ``trainer.save_checkpoint`` then resumed to 10."""
    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    module = ClassifierUser(lr=3e-2, model=qlora_classifier())
    head_before = module.model.classifier.modules_to_save["default"].weight.detach().clone()
    trainer, losses = fit(module, classification_data(), root, 10)
    module.model.save_pretrained(root / "adapter")
    half, _ = fit(ClassifierUser(lr=3e-2, qlora=True), classification_data(), root, 5)
    half.save_checkpoint(root / "half.ckpt")
    resumed = ClassifierUser(lr=3e-2, model=qlora_classifier(seed=1))
    resumed_trainer, rest = fit(resumed, classification_data(), root, 10, ckpt_path=str(root / "half.ckpt"))
    return dict(module=module, trainer=trainer, losses=losses, head_before=head_before, root=root,
                resumed=(resumed, resumed_trainer), rest=rest)


def test_qlora_classifier_resumed_from_save_checkpoint_equals_one_run(classifier_run):
    """NF4 codes are buffers, LoRA factors and the classifier params: the checkpoint restores them all."""
    assert classifier_run["rest"] == classifier_run["losses"][20:]
    assert_same_params_and_state((classifier_run["module"], classifier_run["trainer"]), classifier_run["resumed"])


@pytest.mark.slow
def test_qlora_classifier_with_torch_adamw_reaches_the_measured_loss(tmp_path):
    """The reference :data:`CLS_ADAMW`: the module's own optimizer, no callback."""
    _, losses = fit(ClassifierUser(lr=3e-2, qlora=True), classification_data(), tmp_path, 10, None)
    assert abs(tail_mean(losses) - CLS_ADAMW) < 0.01


@pytest.mark.slow
def test_lowmem_estimate_takes_the_qlora_classifier(classifier_run, tmp_path):
    """``lowmem estimate`` of the NF4 + LoRA classifier counts the params the fit trains."""
    module, trainer = classifier_run["module"], classifier_run["trainer"]
    counted = estimate(tmp_path, "ClassifierUser", "adamw_8bit", "{qlora: true}")
    assert counted["trainable_params"] == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert counted["optimizers"]["adamw_8bit"]["state_bytes"] == state_memory(trainer.optimizers[0]).total_bytes


def test_qlora_classifier_learns_and_its_head_trains(classifier_run):
    losses, module = classifier_run["losses"], classifier_run["module"]
    assert tail_mean(losses) <= CLS_ADAMW + 0.05  # from 1.109
    head = module.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(head.detach(), classifier_run["head_before"])
    assert float(classifier_run["trainer"].callback_metrics["train_acc"]) >= 0.85
    assert all(layer.gradient_checkpointing for layer in module.model.base_model.model.bert.encoder.layer)


def test_qlora_classifier_adapter_and_head_load_back(classifier_run):
    """``save_pretrained`` then ``PeftModel.from_pretrained`` on the same NF4 base gives the trained logits."""
    module = classifier_run["module"]
    ids, _ = classification_data(8, seed=1).tensors
    trained = module.model.eval()(input_ids=ids).logits
    loaded = PeftModel.from_pretrained(quantize_model(sequence_classifier()), classifier_run["root"] / "adapter")
    assert torch.equal(loaded.eval()(input_ids=ids).logits, trained)


# ------------------------------------------------------------------ token classification: gradient release
@pytest.fixture(scope="module")
def tagger_runs(tmp_path_factory):
    """The BERT tagger trained 5 epochs with adamw_8bit, with and without ``step_in_backward`` (each tensor stepped
    as its gradient is ready: ``bucket_bytes=0``, the model's gradients fit one default bucket); and with it 2 epochs
    saved by ``trainer.save_checkpoint`` then resumed to 5."""
    root = tmp_path_factory.mktemp("tag")
    runs = {}
    for release in (False, True):
        module = HFUser(token_classifier(), lr=3e-3)
        trainer, losses = fit(module, tagging_data(), root, 5, step_in_backward=release,
                              **({"bucket_bytes": 0} if release else {}))
        runs[release] = (module, trainer, losses)
    half, _ = fit(HFUser(token_classifier(), lr=3e-3), tagging_data(), root, 2, step_in_backward=True, bucket_bytes=0)
    half.save_checkpoint(root / "half.ckpt")
    resumed = HFUser(token_classifier(seed=1), lr=3e-3)
    resumed_trainer, rest = fit(resumed, tagging_data(), root, 5, ckpt_path=str(root / "half.ckpt"),
                                step_in_backward=True, bucket_bytes=0)
    runs["resumed"], runs["rest"] = (resumed, resumed_trainer), rest
    return runs


def test_token_classifier_learns_with_gradient_release(tagger_runs):
    module, _, losses = tagger_runs[True]
    assert tail_mean(losses) < 0.5 * tail_mean(losses[:4])
    assert all(p.grad is None for p in module.parameters())


def test_gradient_release_steps_the_tagger_as_normal_steps(tagger_runs):
    released, normal = tagger_runs[True], tagger_runs[False]
    assert released[2] == normal[2]
    assert_same_params_and_state(released[:2], normal[:2])


def test_released_tagger_resumed_from_save_checkpoint_equals_one_run(tagger_runs):
    assert tagger_runs["rest"] == tagger_runs[True][2][8:]
    assert_same_params_and_state(tagger_runs[True][:2], tagger_runs["resumed"])
