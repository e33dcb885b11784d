"""Our optimizers in Hugging Face's ``transformers.Trainer`` (no Lightning), on tiny models built from a config.

* ``Trainer(optimizers=(our_opt, scheduler))``: the loss falls; a run stopped at its ``save_steps`` checkpoint and
  resumed by a new Trainer (``train(resume_from_checkpoint=True)``: the Trainer loads ``optimizer.pt`` through our
  ``load_state_dict``) holds the saved optimizer state when training restarts and ends on the very params of the
  uninterrupted run.
* ``Trainer(optimizer_cls_and_kwargs=(OurClass, kwargs))``: the Trainer builds ours over its weight-decay groups
  (biases and norms at ``weight_decay=0``), under ``bf16=True`` (CPU autocast).
* A peft LoRA model: only the adapters train and carry state, the base weights stay as they were, and the resume is
  exact as above.
"""

from __future__ import annotations

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainer_resume import OptimizerStateAtStart, assert_started_from  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

from lowmem_lightning.optim import build_optimizer, optimizer_class  # noqa: E402

STEPS, SAVE_AT = 8, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, bit-equal across processes


class _Shifted(torch.utils.data.Dataset):
    """64 sequences of 16 tokens counting up from a random start (mod 64): next-token prediction is learnable."""

    def __init__(self, vocab: int = 64, length: int = 16, size: int = 64):
        start = torch.randint(0, vocab, (size, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4))


def _args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=8, logging_steps=1,
                    save_strategy="steps", save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)
    return TrainingArguments(**{**settings, **overrides})


def _losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _scheduled(name: str, params, **kwargs):
    """Our optimizer ``name`` over ``params`` and a linear schedule (2 warmup steps, to 0 at STEPS)."""
    opt = build_optimizer(name, params, **kwargs)
    return opt, get_linear_schedule_with_warmup(opt, 2, STEPS)


def _run_and_resume(make_model, make_optimizer, tmp_path) -> tuple[torch.nn.Module, Trainer, Trainer, dict]:
    """An uninterrupted run of STEPS (checkpoints at SAVE_AT and STEPS), then a new model, optimizer and Trainer
    resumed from the SAVE_AT checkpoint (the later one removed). Returns both models' last params via the
    Trainers, and the optimizer state the resumed Trainer started from."""
    model = make_model()
    first = Trainer(model=model, args=_args(tmp_path), train_dataset=_Shifted(), optimizers=make_optimizer(model))
    first.train()
    shutil.rmtree(tmp_path / f"checkpoint-{STEPS}")
    resumed_model = make_model()
    optimizer, scheduler = make_optimizer(resumed_model)
    start = OptimizerStateAtStart()
    second = Trainer(model=resumed_model, args=_args(tmp_path), train_dataset=_Shifted(),
                     optimizers=(optimizer, scheduler), callbacks=[start])
    second.train(resume_from_checkpoint=True)
    saved = assert_started_from(start, tmp_path / f"checkpoint-{SAVE_AT}")
    return model, first, second, saved


@pytest.mark.parametrize("name, lr", [("adamw_8bit", 3e-3), ("adamw_4bit", 3e-3), ("muon_8bit", 2e-2)])
def test_trainer_with_our_optimizer_and_scheduler_resumes_exactly(name, lr, tmp_path):
    """``optimizers=(ours, linear warmup schedule)``: the loss falls; the resumed run starts from the saved
    optimizer state (step counters at SAVE_AT) and ends on the uninterrupted run's params, bit for bit, with the
    same logged losses after the checkpoint (Muon built from ``model.named_parameters()``, so the embedding and
    the head take its AdamW part)."""
    def optimizer(model):
        return _scheduled(name, model.named_parameters() if name.startswith("muon") else model.parameters(), lr=lr)

    model, first, second, saved = _run_and_resume(_llama, optimizer, tmp_path)
    losses = _losses(first)
    assert len(losses) == STEPS and sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    assert all(float(state["step"]) == SAVE_AT for state in saved["state"].values())
    assert _losses(second)[-(STEPS - SAVE_AT):] == losses[SAVE_AT:]
    for (key, p), q in zip(model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), key


@pytest.mark.parametrize("name, kwargs", [
    ("adamw_8bit", dict(lr=3e-3)),
    ("lion_8bit", dict(lr=3e-4)),
    ("ademamix_8bit", dict(lr=3e-3)),
    ("came", dict(lr=3e-3, momentum_dtype="int8")),
    ("adafactor", dict(lr=3e-3, relative_step=False, scale_parameter=False)),
    ("sgd", dict(lr=0.3, momentum=0.9, momentum_dtype="int8")),
])
def test_trainer_builds_ours_from_optimizer_cls_and_kwargs_under_bf16(name, kwargs, tmp_path):
    """``optimizer_cls_and_kwargs=(OurClass, kwargs)`` on a GPT-2, ``bf16=True`` (CPU autocast), weight decay 0.1:
    the Trainer builds our class over its two groups (decay / no decay), the loss falls, and biases and norms sit
    in the group of weight decay 0."""
    model = _gpt2()
    cls = optimizer_class(name)
    trainer = Trainer(model=model, args=_args(tmp_path, bf16=True, weight_decay=0.1, save_strategy="no",
                                              learning_rate=kwargs["lr"]),
                      train_dataset=_Shifted(), optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(opt) is cls
    assert sorted(group["weight_decay"] for group in opt.param_groups) == [0.0, 0.1]
    no_decay = next(group for group in opt.param_groups if group["weight_decay"] == 0.0)
    assert all(p.ndim == 1 for p in no_decay["params"])
    losses = _losses(trainer)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses


def test_trainer_with_a_peft_lora_model_trains_adapters_only_and_resumes_exactly(tmp_path):
    """A LoRA (r=8 on q/v projections) Llama under the Trainer with ``adamw_8bit`` over the trainable params:
    only adapters carry state and move, the base weights are untouched, the loss falls, and the resume is exact."""
    peft = pytest.importorskip("peft")

    def lora_model():
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 task_type="CAUSAL_LM")
        return peft.get_peft_model(_llama(), config)

    def optimizer(model):
        return _scheduled("adamw_8bit", [p for p in model.parameters() if p.requires_grad], lr=1e-2)

    model, first, second, saved = _run_and_resume(lora_model, optimizer, tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(saved["state"]) == len(trainable)
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
              for n, p in model.named_parameters() if not p.requires_grad}
    base = dict(_llama().named_parameters())
    assert frozen.keys() == base.keys()
    assert all(torch.equal(frozen[n], base[n]) for n in base)
    losses = _losses(first)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    for (key, p), q in zip(model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), key
