"""TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``: how most QLoRA fine-tunes are written) with our
optimizers and our NF4 weights, as TRL users write them, on a tiny Llama built from a config and a BPE tokenizer
trained in the test (no download).

* SFT, QLoRA: ``SFTTrainer(model=quantize_model(base), peft_config=LoraConfig(...),
  optimizer_cls_and_kwargs=(PagedAdamW8bit, {...}))``. TRL wraps the model itself and trains under gradient
  checkpointing: the loss falls, only the adapters carry optimizer state, the NF4 codes stay those of the base; a
  run stopped at its ``save_steps`` checkpoint and resumed by a new trainer on a new ``quantize_model`` starts from
  the saved optimizer state and trains on (ends on the very adapters of the uninterrupted run where they are fp32
  throughout; see the test for TRL's bf16 rule), and the saved adapter loads onto ``quantize_model(base)`` with
  ``PeftModel.from_pretrained`` and gives the trained model's logits.
* DPO: a peft model over NF4 weights and our ``adamw_8bit`` in ``optimizers=(opt, None)`` (DPO's reference model is
  the same model with its adapter disabled): the reward margin grows, the NF4 codes stay.
* GRPO: completions generated through the NF4 + LoRA model, our ``adamw_8bit`` steps every adapter.
* A reward model (``RewardTrainer``, a sequence classifier with LoRA on NF4): it learns the preference.

TRL is an optional extra of the test environment (``dev``): without it these tests skip.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_tokenizers import bpe_tokenizer  # noqa: E402
from trainer_resume import OptimizerStateAtStart, assert_started_from  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402
from trl import (  # noqa: E402
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

from lowmem_lightning.optim import optimizer_class  # noqa: E402
from lowmem_lightning.quant import quantize_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread, bit-equal across processes

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = "the cat sat on the mat and the dog ran to the park while birds sang " * 5
STEPS, SAVE_AT = 8, 4
QUANT_BUFFERS = ("qweight", "absmax", "qscale", "scale_step", "scale_mean")  # Linear4bit's, by layout


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(None, ["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], "<|end|>",
                         CORPUS, chat_template=CHAT)


def _nf4_llama(tokenizer, task: type = LlamaForCausalLM) -> LlamaForCausalLM:
    """The same tiny bf16 Llama every call (seed 0; ``task``: its head), its linear layers quantized to our NF4."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, num_labels=1)
    return quantize_model(task(config).to(torch.bfloat16))


def _nf4_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The NF4 codes and scales of ``model`` by their names in the bare model (peft's prefixes taken out)."""
    return {name.removeprefix("base_model.model.").replace(".base_layer", ""): buffer.clone()
            for name, buffer in model.named_buffers() if name.rsplit(".", 1)[-1] in QUANT_BUFFERS}


def _assert_codes_kept(model: torch.nn.Module, base_codes: dict[str, torch.Tensor]) -> None:
    codes = _nf4_buffers(model)
    assert base_codes and codes.keys() == base_codes.keys()
    assert all(torch.equal(codes[k], base_codes[k]) for k in codes)


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _lora() -> peft.LoraConfig:
    return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def _pairs() -> Dataset:
    return Dataset.from_dict({"prompt": [f"where is cat {i}" for i in range(32)], "chosen": ["on the mat"] * 32,
                              "rejected": ["in the park"] * 32})


def _conversations() -> Dataset:
    return Dataset.from_dict({"messages": [[{"role": "user", "content": f"where is cat {i}"},
                                            {"role": "assistant", "content": "on the mat"}] for i in range(64)]})


def _sft(model, tokenizer, output_dir) -> SFTTrainer:
    args = SFTConfig(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_strategy="steps", save_steps=SAVE_AT, report_to=[], use_cpu=True, seed=0,
                     bf16=True, gradient_checkpointing=True, max_length=32, disable_tqdm=True,
                     dataloader_num_workers=0)
    return SFTTrainer(model=model, args=args, train_dataset=_conversations(), processing_class=tokenizer,
                      peft_config=_lora(),
                      optimizer_cls_and_kwargs=(optimizer_class("paged_adamw_8bit"), {"lr": 1e-2}))


@pytest.mark.parametrize("bitsandbytes", ["importable", "missing"])
def test_sft_qlora_on_our_nf4_with_paged_adamw_8bit_trains_adapters_resumes_and_reloads(bitsandbytes, tokenizer,
                                                                                         tmp_path, monkeypatch):
    """``is_loaded_in_4bit`` reads true only where bitsandbytes imports (transformers imports it for such a model):
    TRL then trains bf16 adapters, and its resume loads them back as fp32 (peft's ``load_adapter``), so the resumed
    run goes on in fp32, its optimizer state exact; without bitsandbytes they are fp32 throughout and the resumed
    run ends on the very adapters of the uninterrupted one."""
    if bitsandbytes == "missing":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    elif importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    adapter_dtype = torch.bfloat16 if bitsandbytes == "importable" else torch.float32
    base_codes = _nf4_buffers(_nf4_llama(tokenizer))
    first = _sft(_nf4_llama(tokenizer), tokenizer, tmp_path)
    first.train()
    model = first.model
    assert isinstance(model, peft.PeftModel)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, _ in trainable)
    assert {p.dtype for _, p in trainable} == {adapter_dtype}
    optimizer = first.optimizer.optimizer  # accelerate's wrapper around ours
    assert type(optimizer).__name__ == "PagedAdamW8bit"
    assert {id(p) for p in optimizer.state} == {id(p) for _, p in trainable}
    _assert_codes_kept(model, base_codes)
    losses = _losses(first)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.05, losses

    shutil.rmtree(tmp_path / f"checkpoint-{STEPS}")
    second, start = _sft(_nf4_llama(tokenizer), tokenizer, tmp_path), OptimizerStateAtStart()
    second.add_callback(start)
    second.train(resume_from_checkpoint=True)
    assert_started_from(start, tmp_path / f"checkpoint-{SAVE_AT}")
    resumed = dict(second.model.named_parameters())
    at_save = load_file(tmp_path / f"checkpoint-{SAVE_AT}" / "adapter_model.safetensors")
    for name, p in trainable:
        assert resumed[name].dtype == torch.float32, name  # peft's load_adapter, under TRL as under bitsandbytes
        if adapter_dtype == torch.float32:
            assert torch.equal(p, resumed[name]), name
        else:  # trained on from the checkpoint, near the bf16 run: far closer to it than the checkpoint was
            moved = (p.float() - at_save[name.replace(".default", "")].float()).abs().max()
            assert (p.float() - resumed[name]).abs().max() < moved / 3, name

    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(_nf4_llama(tokenizer), tmp_path / "adapter")
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(adapter_dtype)  # the dtype TRL trained them in (peft loads adapters as fp32)
    ids = torch.tensor([tokenizer("where is cat 3").input_ids])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the Trainer's bf16=True ran the model
        assert torch.equal(model.eval()(ids).logits.float(), reloaded.eval()(ids).logits.float())


def test_dpo_on_our_nf4_with_adamw_8bit_widens_the_margin_and_keeps_the_codes(tokenizer, tmp_path):
    model = peft.get_peft_model(_nf4_llama(tokenizer), _lora())
    base_codes = _nf4_buffers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class("adamw_8bit")(trainable, lr=5e-3)
    data = _pairs()
    args = DPOConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=True,
                     gradient_checkpointing=True, max_length=32, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         optimizers=(optimizer, None))
    trainer.train()
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert margins[0] == 0.0 and margins[-1] > 0.1, margins  # the reference is the model with its adapter off
    assert len(optimizer.state) == len(trainable)
    _assert_codes_kept(trainer.model, base_codes)


def test_grpo_generates_through_our_nf4_and_steps_every_adapter(tokenizer, tmp_path):
    model = peft.get_peft_model(_nf4_llama(tokenizer), _lora())
    base_codes = _nf4_buffers(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class("adamw_8bit")(trainable, lr=5e-3)

    def completion_length(completions, **kwargs):
        return [float(len(text)) for text in completions]

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[],
                      use_cpu=True, seed=0, bf16=True, gradient_checkpointing=True, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=completion_length, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": [f"the cat {i}" for i in range(16)]}),
                          optimizers=(optimizer, None))
    trainer.train()
    spread = [entry["reward_std"] for entry in trainer.state.log_history if "reward_std" in entry]
    assert spread and all(s > 0 for s in spread), spread  # generated completions differ: a gradient to follow
    assert len(optimizer.state) == len(trainable)
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zero at init: each one stepped
    _assert_codes_kept(trainer.model, base_codes)


def test_reward_model_on_our_nf4_learns_the_preference_with_its_head_trained_whole(tokenizer, tmp_path):
    """``RewardTrainer`` (a sequence classifier scoring chosen above rejected) on an NF4 Llama with LoRA
    (``task_type="SEQ_CLS"``: peft trains the ``score`` head whole, which ``quantize_model`` kept dense)."""
    model = _nf4_llama(tokenizer, LlamaForSequenceClassification)
    assert type(model.score) is torch.nn.Linear  # a head is never quantized
    base_codes = _nf4_buffers(model)
    args = RewardConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=True,
                        max_length=32, disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=args, train_dataset=_pairs(), processing_class=tokenizer,
                            peft_config=peft.LoraConfig(r=8, target_modules="all-linear", task_type="SEQ_CLS"),
                            optimizer_cls_and_kwargs=(optimizer_class("adamw_8bit"), {"lr": 5e-3}))
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] / 2, losses  # log(2) at the start: the head learns which answer is chosen
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in name and "score" in name for name in trainable), trainable
    assert all("lora_" in name or "modules_to_save" in name for name in trainable), trainable
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer).__name__ == "AdamW8bit" and len(optimizer.state) == len(trainable)
    _assert_codes_kept(trainer.model, base_codes)



def test_sft_qdora_through_a_registered_config_trains_the_magnitudes_and_reloads(tokenizer, tmp_path):
    """QDoRA under TRL: ``peft_config=register_peft_custom_module(LoraConfig(use_dora=True, ...))`` (peft's own DoRA
    layer cannot read an NF4 weight): our layer is used, the magnitudes train beside the adapters, the loss falls,
    and ``load_lora`` reloads the saved adapter onto a new NF4 model with the same logits."""
    from lowmem_lightning.quant import LoraLinear4bit, load_lora, register_peft_custom_module

    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=True,
                     gradient_checkpointing=True, max_length=32, disable_tqdm=True, dataloader_num_workers=0)
    config = register_peft_custom_module(peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                         lora_dropout=0.05, task_type="CAUSAL_LM", use_dora=True))
    trainer = SFTTrainer(model=_nf4_llama(tokenizer), args=args, train_dataset=_conversations(),
                         processing_class=tokenizer, peft_config=config,
                         optimizer_cls_and_kwargs=(optimizer_class("paged_adamw_8bit"), {"lr": 1e-2}))
    model = trainer.model
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, LoraLinear4bit)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 14  # 7 projections x 2 layers
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(not torch.equal(p, magnitudes[n]) for n, p in model.named_parameters() if n in magnitudes)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_lora(_nf4_llama(tokenizer), tmp_path / "adapter").eval()
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(next(q for n, q in model.named_parameters() if n == name).dtype)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
