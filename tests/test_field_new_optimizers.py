"""The newest optimizers (adamw_4bit, lion, lion_8bit, ademamix, ademamix_8bit, muon, muon_8bit) met the way
users meet the library: a LightningModule with its own ``configure_optimizers`` (AdamW betas (0.9, 0.95),
decay / no-decay groups, each of four LR schedulers) swapped by ``LowMemOptimizerCallback``; an HF model built
from a config with peft's ``get_peft_model``; ``LowMemModule`` / ``CausalLMModule`` with Muon; resume under
accumulation, clipping and bf16-mixed; bad hyperparameters refused before any work."""

import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.optim import build_optimizer, optimizer_class
from lowmem_lightning.optim.muon import uses_muon

NEW = ["adamw_4bit", "lion", "lion_8bit", "ademamix", "ademamix_8bit", "muon", "muon_8bit"]
VOCAB, WIDTH = 64, 32

pytestmark = pytest.mark.usefixtures("one_thread")


class GPT(L.LightningModule):
    """A nanoGPT-shaped module as users write it: its own AdamW with LLM betas, weight decay on matrices only,
    and the LR scheduler ``schedule(opt)`` stepped per optimizer step."""

    def __init__(self, schedule=None):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.fc = nn.Linear(WIDTH, 4 * WIDTH)
        self.proj = nn.Linear(4 * WIDTH, WIDTH)
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.schedule = schedule

    def _loss(self, batch):
        (idx,) = batch
        h = self.wte(idx[:, :-1])
        logits = self.lm_head(self.ln_f(h + self.proj(nn.functional.gelu(self.fc(h)))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=3e-3, betas=(0.9, 0.95))
        if self.schedule is None:
            return opt
        scheduler = self.schedule(opt)
        config = {"scheduler": scheduler, "interval": "step"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "train_loss"
        return {"optimizer": opt, "lr_scheduler": config}


SCHEDULES = {
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=20),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4)),
    # threshold 10 (relative): never an improvement, so each step halves the lr
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, threshold=10.0),
}


class Seen(L.Callback):
    """Per optimizer step: the optimizer stepped, every group's lr and the first group's beta1/momentum."""

    def __init__(self):
        self.optimizers, self.lrs, self.beta1 = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        group = optimizer.param_groups[0]
        self.optimizers.append(optimizer)
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        self.beta1.append(group["betas"][0] if "betas" in group else group["momentum"])


def _data(rows=48):
    idx = torch.randint(0, VOCAB, (rows, 9), generator=torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(idx), batch_size=8)


def _trainer(callbacks, root=None, **kwargs):
    kwargs = {"max_steps": 6, **kwargs}
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=callbacks, **kwargs)


def _swap_fit(module, name=None, **callback_kwargs):
    """Fit ``module`` 6 steps (with ``LowMemOptimizerCallback(name)`` unless ``name`` is None): the trainer, what
    each step saw and the callback's warnings."""
    seen = Seen()
    callbacks = [seen]
    if name is not None:
        callbacks.append(LowMemOptimizerCallback(name, print_summary=False, plot=False, **callback_kwargs))
    trainer = _trainer(callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, _data())
    return trainer, seen, [str(w.message) for w in caught if "LowMemOptimizerCallback(" in str(w.message)]


_REFERENCE: dict[str, Seen] = {}


def _reference(schedule: str) -> Seen:
    """The module's own AdamW under ``schedule`` (computed once per schedule)."""
    if schedule not in _REFERENCE:
        _REFERENCE[schedule] = _swap_fit(GPT(SCHEDULES[schedule]))[1]
    return _REFERENCE[schedule]


# AdamW(betas=(0.9, 0.95)): beta1 0.9 is AdamW's default, so each target keeps its own; beta2 0.95 was chosen
EXPECTED_BETAS = {"adamw_4bit": ("betas", (0.9, 0.95)), "lion": ("betas", (0.9, 0.99)),
                  "ademamix": ("betas", (0.9, 0.95, 0.9999)), "muon": ("adamw_betas", (0.9, 0.95))}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", NEW)
def test_own_configure_optimizers_keeps_groups_decay_and_the_schedule_drives_the_new_optimizer(name, schedule):
    reference = _reference(schedule)
    trainer, seen, messages = _swap_fit(GPT(SCHEDULES[schedule]), name)
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(name) and all(o is opt for o in seen.optimizers)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [4, 4]
    assert len({lrs[0] for lrs in seen.lrs}) >= 3  # the schedule moves the new optimizer's lr, step by step
    assert seen.lrs == reference.lrs  # exactly as it moved the module's AdamW
    key, betas = EXPECTED_BETAS[name.removesuffix("_8bit")]
    if schedule == "OneCycleLR":  # cycle_momentum: it writes betas[0] (Muon: momentum) as it did AdamW's
        assert seen.beta1 == pytest.approx(reference.beta1) and len(set(seen.beta1)) >= 3
        assert any("OneCycleLR cycles" in m and "adamw_betas[0]=0.9" in m for m in messages) == name.startswith("muon")
    else:
        assert tuple(opt.param_groups[0][key]) == betas
        if name.startswith("muon"):
            assert opt.param_groups[0]["momentum"] == 0.95  # Muon's own: AdamW's beta1 was its default


@pytest.mark.parametrize("name", ["lion_8bit", "muon_8bit"])
def test_the_callbacks_own_lr_and_weight_decay_rescale_the_schedule_and_keep_no_decay_groups(name):
    reference = _reference("CosineAnnealingLR")
    trainer, seen, _ = _swap_fit(GPT(SCHEDULES["CosineAnnealingLR"]), name, lr=3e-4, weight_decay=1.0)
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == [1.0, 0.0]  # norms/biases stay at 0
    expected = [[lr * (3e-4 / 3e-3) for lr in lrs] for lrs in reference.lrs]  # the schedule's shape, new base
    assert all(got == pytest.approx(want, rel=1e-12) for got, want in zip(seen.lrs, expected))


@pytest.mark.parametrize("name", NEW)
def test_step_in_backward_under_lightning_equals_the_normal_step(name):
    params = []
    for release in (False, True):
        module = GPT(SCHEDULES["LambdaLR"])
        trainer = _trainer([LowMemOptimizerCallback(name, print_summary=False, plot=False, step_in_backward=release)],
                           max_steps=4, gradient_clip_val=0.05, gradient_clip_algorithm="value")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, _data())
        params.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params))


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_the_carried_adamw_lr_into_muon_is_noted_with_the_fix_and_the_fix_silences_it(name):
    _, _, messages = _swap_fit(GPT(), name)
    assert len(messages) == 1 and "AdamW lr=0.003 changes meaning" in messages[0]
    assert "lr / sqrt(cols)" in messages[0] and "'adjust_lr_fn': 'match_rms_adamw'" in messages[0]
    trainer, _, messages = _swap_fit(GPT(), name, optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"})
    assert messages == [] and trainer.optimizers[0].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    _, _, messages = _swap_fit(GPT(), name, lr=0.02)  # Muon's own lr, chosen: nothing to note
    assert messages == []


class OnlyEmbeddingAndHead(GPT):
    def __init__(self):
        super().__init__()
        self.fc.requires_grad_(False)
        self.proj.requires_grad_(False)


def test_muon_on_a_model_without_hidden_matrices_says_every_param_takes_adamw():
    trainer, _, messages = _swap_fit(OnlyEmbeddingAndHead(), "muon_8bit")
    assert [p for p in trainer.optimizers[0].muon_params() if p.requires_grad] == []
    assert len(messages) == 1 and "gives none of its trainable params the Muon update" in messages[0]
    assert "AdamW lr=0.003 changes meaning" not in messages[0]  # only the AdamW part runs: the lr means AdamW's
    _, _, messages = _swap_fit(GPT(), "muon_8bit", optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"})
    assert messages == []  # fc and proj take Muon: no note


class SharedTable(GPT):
    """A token embedding whose name marks nothing (``lookup``; T5's ``shared`` is marked); minGPT's ``tok_emb`` is found
    by name."""

    def __init__(self, own_group=False):
        super().__init__()
        self.lookup, self.tok_emb, self.own_group = self.wte, nn.Embedding(VOCAB, WIDTH), own_group
        del self.wte

    def _loss(self, batch):
        (idx,) = batch
        h = self.lookup(idx[:, :-1]) + self.tok_emb(idx[:, :-1])
        logits = self.lm_head(self.ln_f(h + self.proj(nn.functional.gelu(self.fc(h)))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())

    def configure_optimizers(self):
        if not self.own_group:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)
        rest = [p for p in self.parameters() if p is not self.lookup.weight]
        return torch.optim.AdamW([{"params": [self.lookup.weight], "use_muon": False}, {"params": rest}], lr=3e-3)


def test_an_embedding_whose_name_hides_it_is_named_and_a_use_muon_group_routes_it():
    model = SharedTable()
    trainer, _, messages = _swap_fit(model, "muon", optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"})
    muon = {id(p) for p in trainer.optimizers[0].muon_params()}
    assert id(model.lookup.weight) in muon and id(model.tok_emb.weight) not in muon  # tok_emb: an embedding by name
    assert len(messages) == 1 and "nn.Embedding weight(s) lookup.weight: their names do not mark" in messages[0]
    model = SharedTable()
    model.lookup.requires_grad_(False)  # frozen: it never takes an update, nothing to say
    _, _, messages = _swap_fit(model, "muon", optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"})
    assert messages == []
    model = SharedTable(own_group=True)
    trainer, _, messages = _swap_fit(model, "muon", optimizer_kwargs={"adjust_lr_fn": "match_rms_adamw"})
    assert messages == [] and trainer.optimizers[0].param_groups[0]["use_muon"] is False
    assert {id(p) for p in trainer.optimizers[0].muon_params()} == {id(model.fc.weight), id(model.proj.weight)}


class TorchMuonAndAdamW(GPT):
    """The split as torch users write it: torch.optim.Muon for the hidden matrices, AdamW for the rest, stepped
    by hand."""

    automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        hidden = [self.fc.weight, self.proj.weight]
        rest = [p for p in self.parameters() if all(p is not h for h in hidden)]
        return [torch.optim.Muon(hidden, lr=0.02, momentum=0.9, weight_decay=0.01),
                torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.95))]


@pytest.mark.parametrize("name", ["muon_8bit", "lion_8bit", "adamw_4bit"])
def test_torch_muon_is_translated_by_meaning(name):
    trainer, _, messages = _swap_fit(TorchMuonAndAdamW(), name)
    hidden, rest = trainer.optimizers
    assert type(hidden) is type(rest) is optimizer_class(name)
    group = hidden.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.01)
    assert (group["momentum"] if name == "muon_8bit" else group["betas"][0]) == 0.9  # Muon's momentum is beta1
    assert len(messages) == 1
    if name == "muon_8bit":  # the AdamW one's params all take the AdamW part: said once, no lr note
        assert [len(o.muon_params()) for o in (hidden, rest)] == [2, 0]
        assert "gives none of its trainable params the Muon update" in messages[0] and " lr=" not in messages[0]
    else:  # Muon's lr 0.02 into an optimizer that moves every element by about lr: warned
        assert "Muon lr=0.02 changes meaning" in messages[0] and "sqrt(cols) times more" in messages[0]


# ---------------------------------------------------------------- resume, accumulation, clipping, bf16-mixed
class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _resumable_fit(root, name, epochs, ckpt_path=None):
    losses = Losses()
    trainer = _trainer([LowMemOptimizerCallback(name, print_summary=False, plot=False), losses], root,
                       max_steps=-1, max_epochs=epochs, accumulate_grad_batches=2, gradient_clip_val=0.05,
                       precision="bf16-mixed", limit_val_batches=1, num_sanity_val_steps=0)
    module = GPT(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), _data(8), ckpt_path=ckpt_path)
    return trainer, module, losses.values


@pytest.mark.parametrize("name", NEW)
def test_resume_under_accumulation_clipping_and_bf16_mixed_continues_bit_exactly(tmp_path, name):
    _, straight, all_losses = _resumable_fit(tmp_path / "a", name, 2)
    first, _, first_losses = _resumable_fit(tmp_path / "b", name, 1)
    first.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed_trainer, resumed, resumed_losses = _resumable_fit(tmp_path / "c", name, 2, tmp_path / "epoch1.ckpt")
    assert resumed_trainer.global_step == 6 and type(resumed_trainer.optimizers[0]) is optimizer_class(name)
    assert first_losses + resumed_losses == all_losses  # the loss continues where it stopped, bit for bit
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    (validated,) = resumed_trainer.validate(resumed, _data(8), verbose=False)
    (tested,) = resumed_trainer.test(resumed, _data(8), verbose=False)
    assert validated["val_loss"] == tested["test_loss"] and torch.isfinite(torch.tensor(validated["val_loss"]))


# ---------------------------------------------------------------- LowMemModule / CausalLMModule with Muon
def _lowmem_lm(name):
    """The same network under LowMemModule's own configure_optimizers (decay groups built from plain tensors)."""
    from lowmem_lightning.modules import LowMemModule

    class LM(LowMemModule):
        def __init__(self):
            super().__init__(optimizer=name, lr=2e-3, weight_decay=0.1)
            net = GPT()
            self.wte, self.fc, self.proj, self.ln_f, self.lm_head = net.wte, net.fc, net.proj, net.ln_f, net.lm_head

        training_step = GPT.training_step
        _loss = GPT._loss

    return LM()


@pytest.mark.parametrize("name", ["muon", "muon_8bit"])
def test_lowmem_module_with_muon_gives_the_embedding_and_head_adamw(name):
    module = _lowmem_lm(name)
    trainer = _trainer([], max_steps=2)
    trainer.fit(module, _data())
    opt = trainer.optimizers[0]
    assert {n for n, p in module.named_parameters() if any(p is q for q in opt.muon_params())} == {
        "fc.weight", "proj.weight"}
    assert "exp_avg" in opt.state[module.wte.weight] and "exp_avg" in opt.state[module.lm_head.weight]


def test_causal_lm_module_full_finetune_with_muon_gives_embeddings_and_head_adamw():
    from test_causal_lm import TINY_LLAMA, _sample

    from lowmem_lightning.modules.causal_lm import CausalLMModule

    module = CausalLMModule(config=TINY_LLAMA, optimizer="muon_8bit", lr=2e-3)
    trainer = _trainer([], max_steps=1, limit_val_batches=0)
    trainer.fit(module, _sample())
    muon = {n for n, p in module.named_parameters() if any(p is q for q in trainer.optimizers[0].muon_params())}
    assert "model.lm_head.weight" not in muon and "model.model.embed_tokens.weight" not in muon
    assert len(muon) == 2 * 7 and all("_proj." in n for n in muon)  # the seven projections of both layers


@pytest.mark.parametrize("name", NEW)
def test_causal_lm_module_qlora_trains_the_adapters_with_each_new_optimizer(name):
    from test_causal_lm import TINY_LLAMA, _sample

    from lowmem_lightning.modules.causal_lm import CausalLMModule

    module = CausalLMModule(config=TINY_LLAMA, quantize="nf4", lora={"r": 4}, optimizer=name, lr=2e-3,
                            weight_decay=0.01, warmup_steps=1, scheduler="cosine")
    trainer = _trainer([], max_steps=2, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _sample())
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(name) and trainer.global_step == 2
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(opt.state[p] for n, p in module.named_parameters() if p.requires_grad)  # every adapter stepped
    if name.startswith("muon"):  # LoRA factors of the hidden projections are 2-D hidden matrices: Muon
        assert {id(p) for p in opt.muon_params()} == {id(p) for p in module.parameters() if p.requires_grad}


# ---------------------------------------------------------------- HF model + peft's get_peft_model
def _peft(kind):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    if kind == "causal":  # LoRA on the head too: its adapters are the head's
        return get_peft_model(LlamaForCausalLM(LlamaConfig(**config)),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    model = LlamaForSequenceClassification(LlamaConfig(**config, num_labels=3, pad_token_id=0))
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="SEQ_CLS"))  # peft trains a copy of `score`


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_muon_split_of_a_peft_model_finds_the_wrapped_head(kind):
    model = _peft(kind)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = {n for n, p in trainable if uses_muon(p, n)}
    adamw = {n for n, p in trainable if not uses_muon(p, n)}
    assert muon and all(".q_proj.lora_" in n or ".v_proj.lora_" in n for n in muon)  # hidden LoRA factors
    head = {"causal": {"base_model.model.lm_head.lora_A.default.weight",
                       "base_model.model.lm_head.lora_B.default.weight"},
            "classifier": {"base_model.model.score.modules_to_save.default.weight"}}[kind]
    assert adamw == head


class PeftLM(L.LightningModule):
    """An HF causal LM from a config, wrapped by peft, under the module's own AdamW."""

    def __init__(self):
        super().__init__()
        self.model = _peft("causal")

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))


@pytest.mark.parametrize("name", NEW)
def test_peft_model_trains_its_adapters_through_the_callback(name):
    module = PeftLM()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    ids = torch.randint(1, 128, (8, 12), generator=torch.Generator().manual_seed(1))
    trainer = _trainer([LowMemOptimizerCallback(name, print_summary=False, plot=False)], max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    assert type(trainer.optimizers[0]) is optimizer_class(name)
    for n, p in module.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (p.requires_grad and "lora_" in n), n  # every adapter moved, no frozen weight did
        assert torch.isfinite(p).all(), n


# ---------------------------------------------------------------- bad hyperparameters, before any work
BAD = [
    ("lion", {"lr": -1e-4}, r"Invalid lr=-0\.0001: expected a finite number >= 0"),
    ("lion", {"lr": 0.0}, r"Invalid lr=0\.0 for LowMemOptimizerCallback\(optimizer='lion'\): expected a number > 0"),
    ("lion_8bit", {"optimizer_kwargs": {"betas": (0.9, 0.99, 0.999)}},
     r"Invalid betas=\(0\.9, 0\.99, 0\.999\): expected a tuple of 2 numbers in \[0, 1\)"),
    ("ademamix", {"optimizer_kwargs": {"alpha": -1.0}}, r"Invalid alpha=-1\.0: expected a finite number >= 0"),
    ("ademamix_8bit", {"optimizer_kwargs": {"betas": (0.9, 0.999)}},
     r"Invalid betas=\(0\.9, 0\.999\): expected a tuple of 3 numbers in \[0, 1\)"),
    ("ademamix", {"optimizer_kwargs": {"t_alpha": -5}}, r"Invalid t_alpha=-5: expected None \(no warmup\) or an int"),
    ("muon", {"optimizer_kwargs": {"adamw_betas": (0.9,)}}, r"Invalid adamw_betas=\(0\.9,\): expected a tuple of 2"),
    ("muon_8bit", {"optimizer_kwargs": {"use_muon": "yes"}}, r"Invalid use_muon='yes'"),
    ("adamw_4bit", {"optimizer_kwargs": {"betas": (0.9, 0.999, 0.9)}}, r"Invalid betas=.*expected a tuple of 2"),
    ("adamw_4bit", {"lr": 0}, r"Invalid lr=0 for LowMemOptimizerCallback"),
    ("muon", {"optimizer_kwargs": {"betas": (0.9, 0.95)}},
     r"unexpected keyword argument 'betas' \(betas: Muon takes lr, .*adamw_betas, adamw_eps"),
    ("lion_8bit", {"optimizer_kwargs": {"eps": 1e-8}}, r"'eps' \(eps: Lion8bit takes lr, betas, weight_decay, "),
]


BAD_IDS = ["lion-lr<0", "lion-lr=0", "lion_8bit-3betas", "ademamix-alpha<0", "ademamix_8bit-2betas",
           "ademamix-t_alpha<0", "muon-1adamw_beta", "muon_8bit-use_muon_str", "adamw_4bit-3betas", "adamw_4bit-lr=0",
           "muon-betas", "lion_8bit-eps"]


@pytest.mark.parametrize(("name", "kwargs", "match"), BAD, ids=BAD_IDS)
def test_bad_hyperparameters_are_refused_by_the_callback_constructor(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowMemOptimizerCallback(name, **kwargs)


def test_use_muon_on_a_1d_param_is_refused_at_fit_start_before_any_step():
    class Forced(GPT):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": [self.ln_f.weight], "use_muon": True},
                                      {"params": [p for n, p in self.named_parameters() if n != "ln_f.weight"]}])

    module = Forced()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"Invalid use_muon=True for a group holding param 0 of shape \(32,\)"):
        _trainer([LowMemOptimizerCallback("muon", print_summary=False, plot=False)]).fit(module, _data())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("name", ["lion", "muon_8bit"])
def test_lr_zero_is_refused_by_the_modules_too(name):
    from lowmem_lightning.modules import LowMemModule
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    for cls in (LowMemModule, CausalLMModule):
        with pytest.raises(ValueError, match=r"Invalid lr=0\.0: expected a number > 0"):
            cls(optimizer=name, lr=0.0)


def test_lr_zero_still_builds_directly_as_torch_allows_it_for_a_scheduler_to_raise():
    opt = build_optimizer("lion", [nn.Parameter(torch.ones(3))], lr=0.0)
    assert opt.param_groups[0]["lr"] == 0.0


# ---------------------------------------------------------------- a group added during the fit
class Backbone(GPT):
    """A backbone frozen by Lightning's BackboneFinetuning until epoch 1, then added as a param group."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(self.fc, self.proj)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.95))


def _backbone_fit(root, name, epochs, ckpt_path=None):
    from lightning.pytorch.callbacks import BackboneFinetuning

    module = Backbone()
    trainer = _trainer([BackboneFinetuning(unfreeze_backbone_at_epoch=1),
                        LowMemOptimizerCallback(name, print_summary=False, plot=False)], root,
                       max_steps=-1, max_epochs=epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(16), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("name", NEW)
def test_backbone_finetuning_adds_the_backbone_to_the_new_optimizer_and_resumes(tmp_path, name):
    trainer, straight = _backbone_fit(tmp_path / "a", name, 3)
    opt = trainer.optimizers[0]
    assert len(opt.param_groups) == 2 and type(opt) is optimizer_class(name)
    assert all(p in opt.state for p in straight.backbone.parameters())  # the backbone trained with the new one
    if name.startswith("muon"):  # the added group is split by name like the first: its matrices take Muon
        assert opt.param_groups[1]["param_names"] == ["fc.weight", "fc.bias", "proj.weight", "proj.bias"]
        assert {id(p) for p in opt.muon_params()} == {id(straight.fc.weight), id(straight.proj.weight)}
    first, _ = _backbone_fit(tmp_path / "b", name, 2)
    first.save_checkpoint(tmp_path / "epoch2.ckpt")
    saved = first.optimizers[0].state_dict()
    # (not bit-exact against the straight run: Lightning's BackboneFinetuning leaves the backbone frozen after a
    # resume past its unfreeze epoch, with torch's own AdamW too; the optimizer state is what must survive)
    resumed_trainer, _ = _backbone_fit(tmp_path / "c", name, 2, tmp_path / "epoch2.ckpt")
    loaded = resumed_trainer.optimizers[0].state_dict()
    names = [[g.get("param_names") for g in d["param_groups"]] for d in (saved, loaded)]
    assert names[0] == names[1] and len(names[0]) == 2
    assert loaded["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        assert all(torch.equal(value, loaded["state"][index][key]) for key, value in state.items() if key != "step")


def test_muon_add_param_group_without_known_names_says_how():
    model = GPT()
    opt = build_optimizer("muon", [{"params": [("wte.weight", model.wte.weight)]}], lr=0.02)
    with pytest.raises(ValueError, match=r"add_param_group: its groups carry param names.*remember_names"):
        opt.add_param_group({"params": [model.fc.weight]})
    opt.remember_names(model.named_parameters())
    opt.add_param_group({"params": [model.fc.weight, model.fc.bias]})
    assert opt.param_groups[1]["param_names"] == ["fc.weight", "fc.bias"]
    assert [id(p) for p in opt.muon_params()] == [id(model.fc.weight)]


# ---------------------------------------------------------------- resuming with the other precision of the state
@pytest.mark.parametrize(("saved", "resumed"), [("lion", "lion_8bit"), ("lion_8bit", "lion"),
                                                ("ademamix", "ademamix_8bit"), ("ademamix_8bit", "ademamix"),
                                                ("muon", "muon_8bit"), ("muon_8bit", "muon")])
def test_resume_switches_between_the_fp32_and_8bit_state_of_one_optimizer(tmp_path, saved, resumed):
    first = _trainer([LowMemOptimizerCallback(saved, print_summary=False, plot=False)], tmp_path, max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first.fit(GPT(), _data())
    first.save_checkpoint(tmp_path / "two.ckpt")
    written = first.optimizers[0].state[first.lightning_module.fc.weight]  # 4096 elements: 8-bit codes
    trainer = _trainer([LowMemOptimizerCallback(resumed, print_summary=False, plot=False)], tmp_path, max_steps=2)
    module = GPT()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), ckpt_path=tmp_path / "two.ckpt")  # restores, takes no further step
    opt = trainer.optimizers[0]
    assert type(opt) is optimizer_class(resumed) and trainer.global_step == 2
    state = opt.state[module.fc.weight]
    assert any(k.endswith("_codes") for k in state) == resumed.endswith("_8bit")
    assert any(k.endswith("_codes") for k in written) == saved.endswith("_8bit")
    assert float(state["step"]) == 2.0


# ---------------------------------------------------------------- lowmem fit --optim with a recipe's callback lr
@pytest.mark.parametrize(("previous", "name", "said"), [
    ("adamw_8bit", "lion", "lion moves every element by lr"),
    ("adamw_8bit", "muon_8bit", "muon_8bit moves its hidden matrices by an element RMS of lr / sqrt(cols)"),
    ("lion_8bit", "adamw_4bit", "adamw_4bit moves every element by about lr * m / sqrt(v)"),
    ("adamw_8bit", "ademamix_8bit", None), ("adamw_8bit", "adamw_4bit", None), ("lion", "lion_8bit", None)])
def test_optim_says_when_it_keeps_a_config_lr_that_steps_differently(previous, name, said):
    from lowmem_lightning.cli.switch import switch_optimizer

    init = {"optimizer": previous, "lr": 3e-3}
    line = switch_optimizer(init, name, 3e-3, module_lr=3e-3)
    assert init["lr"] == 3e-3 and init["optimizer"] == name  # kept: the line says so
    assert line is None if said is None else f"kept lr=0.003 (the config's, for {previous}), though {said}" in line
    init = {"optimizer": previous, "lr": 3e-4}
    assert switch_optimizer(init, name, 3e-4, lr_given=True, module_lr=3e-3) is None  # --lr: the user chose it
    muon = {"optimizer": previous, "lr": 3e-3, "optimizer_kwargs": {"adjust_lr_fn": "match_rms_adamw"}}
    if name.startswith("muon"):  # scaled to AdamW's RMS: the lr means the same
        assert switch_optimizer(muon, name, 3e-3, module_lr=3e-3, kwargs_given=True) is None
