"""CausalLMModule + TextDataModule end to end on the shipped sample data: full fine-tune, NF4 QLoRA
on a tiny Llama, the meta-device builder used by ``lowmem estimate``, saving, and argument errors."""

import warnings

import lightning as L
import pytest
import torch

from lowmem_lightning.data import TextDataModule
from lowmem_lightning.modules.causal_lm import LLAMA_PROJECTIONS, CausalLMModule, build_causal_lm

TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: a second spinning thread is ~10x slower


class LossRecorder(L.Callback):
    """Keeps the training loss of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(module, datamodule, steps, **trainer_kwargs):
    recorder = LossRecorder()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2, val_check_interval=steps,
        num_sanity_val_steps=0, callbacks=[recorder], **trainer_kwargs,
    )
    trainer.fit(module, datamodule)
    return trainer, recorder.losses


def _falls(losses, k=5, by=0.3):
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return last < first - by, (first, last)


def _sample(seq_len=64, batch_size=8):
    return TextDataModule("sample", seq_len=seq_len, batch_size=batch_size, val_fraction=0.02, seed=0)


def test_full_finetune_trains_logs_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw", lr=3e-3, save_dir=str(tmp_path / "out"))
    trainer, losses = _fit(module, _sample(), steps=30)
    falls, means = _falls(losses)
    assert len(losses) == 30 and falls, means
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_ppl"} <= set(metrics)
    assert torch.allclose(metrics["val_ppl"], metrics["val_loss"].exp())
    assert module.model.get_input_embeddings().num_embeddings == 259  # the byte tokenizer's vocab
    assert all(p.requires_grad for p in module.model.parameters())
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name


QLORA_LLAMA = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 256}
"""Wide enough that some LoRA matrices (gate/up lora_B, down lora_A: 4096 elements at r=16) get 8-bit
optimizer state; smaller tensors keep 32-bit state, as in bitsandbytes."""


def test_qlora_tiny_llama_all_projections_adamw_8bit_loss_falls(tmp_path):
    from lowmem_lightning.quant import Linear4bit

    module = CausalLMModule(
        config=QLORA_LLAMA, quantize="nf4", lora={"r": 16, "alpha": 32, "target_modules": LLAMA_PROJECTIONS},
        optimizer="adamw_8bit", lr=3e-2, save_dir=str(tmp_path / "adapter"),
    )
    L.seed_everything(0, verbose=False)
    trainer, losses = _fit(module, _sample(), steps=30)
    # From ln(259) = 5.56 (uniform over bytes) to well below, with a frozen random base and head:
    # seeds 0-4 give 5.53-5.62 -> 4.90-5.04 (mean of the last 5 steps).
    first, last = losses[0], sum(losses[-5:]) / 5
    print(f"QLoRA e2e: first loss {first:.3f}, mean of last 5 {last:.3f}")
    assert len(losses) == 30 and last < first - 0.35 and last < 5.25, (first, last, losses)
    model = module.model
    wrapped = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(wrapped) == 7 * QLORA_LLAMA["num_hidden_layers"]
    assert {n.rsplit(".", 2)[-2] for n in wrapped} == set(LLAMA_PROJECTIONS)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    h, i = QLORA_LLAMA["hidden_size"], QLORA_LLAMA["intermediate_size"]
    kv = h // QLORA_LLAMA["num_attention_heads"] * QLORA_LLAMA["num_key_value_heads"]
    per_layer = 16 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))
    assert sum(p.numel() for p in trainable.values()) == per_layer * QLORA_LLAMA["num_hidden_layers"]
    assert all(p.dtype == torch.float32 for p in trainable.values())
    state = trainer.optimizers[0].state
    assert len(state) == len(trainable)
    codes = [t for s in state.values() for t in s.values()
             if torch.is_tensor(t) and t.dtype in (torch.int8, torch.uint8)]
    assert codes, "no parameter got 8-bit optimizer state"
    assert {"train_loss", "val_loss", "val_ppl"} <= set(trainer.callback_metrics)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_save_merged_writes_a_dense_model_with_the_same_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(config=TINY_LLAMA, quantize="nf4", lora={"r": 4}, optimizer="adamw", lr=1e-2,
                            save_dir=str(tmp_path / "merged"), save_merged=True)
    dm = _sample()
    _fit(module, dm, steps=3)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    batch = next(iter(dm.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits,
                                   module(batch["input_ids"]).logits, rtol=1e-4, atol=1e-4)


def test_local_checkpoint_full_and_nf4(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowmem_lightning.quant import Linear4bit, quantize_model

    source = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA, vocab_size=259)).eval()
    source.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ids = torch.randint(0, 259, (2, 24))
    with torch.no_grad():
        want = source(input_ids=ids).logits
    full = CausalLMModule(model_name_or_path=str(tmp_path / "ckpt"), optimizer="adamw")
    full.configure_model()
    qlora = CausalLMModule(model_name_or_path=str(tmp_path / "ckpt"), quantize="nf4", lora={"r": 4},
                           optimizer="adamw")
    qlora.configure_model()
    assert sum(isinstance(m, Linear4bit) for m in qlora.model.modules()) == 7 * TINY_LLAMA["num_hidden_layers"]
    full.eval()
    qlora.eval()
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, want)
        got = qlora(ids).logits  # LoRA B starts at 0: the NF4 base alone
        want_nf4 = quantize_model(source).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want_nf4)
    assert not torch.equal(got, want)


def test_nf4_from_config_is_initialized_like_the_dense_model():
    from lowmem_lightning.quant import Linear4bit

    dense = build_causal_lm(config=TINY_LLAMA)
    nf4 = build_causal_lm(config=TINY_LLAMA, quantize="nf4", lora={"r": 4})
    tensors = dict(nf4.named_parameters()) | dict(nf4.named_buffers())
    assert not [n for n, t in tensors.items() if t.is_meta]
    layers = [m for m in nf4.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * TINY_LLAMA["num_hidden_layers"]
    stds = torch.stack([m.dequantize().float().std() for m in layers])
    torch.testing.assert_close(stds, torch.full_like(stds, 0.02), rtol=0.1, atol=0)  # initializer_range
    base, ref = nf4.get_base_model().model, dense.model
    torch.testing.assert_close(base.rotary_emb.inv_freq, ref.rotary_emb.inv_freq)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in (base.norm, base.layers[0].input_layernorm))
    assert 0.015 < base.embed_tokens.weight.std() < 0.025


def test_meta_build_counts_params_without_memory():
    meta = build_causal_lm(config=TINY_LLAMA, device="meta")
    real = build_causal_lm(config=TINY_LLAMA)
    assert all(p.is_meta for p in meta.parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(meta) == count(real) > 0
    big = build_causal_lm(config={**TINY_LLAMA, "hidden_size": 4096, "intermediate_size": 11008,
                                  "num_attention_heads": 32, "num_key_value_heads": 32,
                                  "num_hidden_layers": 32, "vocab_size": 32000}, device="meta")
    assert count(big) == 6_738_415_616  # Llama-2-7B


def test_meta_qlora_7b_counts_match_the_issue_targets():
    from lowmem_lightning.quant import Linear4bit, linear4bit_bytes

    llama2_7b = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "num_hidden_layers": 32, "vocab_size": 32000}
    model = build_causal_lm(config=llama2_7b, quantize="nf4", lora={"r": 16, "alpha": 32}, device="meta")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 39_976_960
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * 32
    nf4 = sum(linear4bit_bytes(m.in_features, m.out_features) for m in layers)
    assert 3.3e9 < nf4 < 3.5e9  # 6.48B quantized weights at ~0.516 B/param; embeddings and head stay 16-bit


def test_config_vocab_defaults_to_the_datamodule_and_mismatch_is_an_error(tmp_path):
    (tmp_path / "d.txt").write_text("abc " * 300)
    dm = TextDataModule(str(tmp_path / "d.txt"), seq_len=32, batch_size=2, val_fraction=0.0)
    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    _fit(module, dm, steps=1)
    assert module.model.config.vocab_size == 259
    small = CausalLMModule(config={**TINY_LLAMA, "vocab_size": 100}, optimizer="adamw")
    with pytest.raises(ValueError, match="Vocabulary mismatch: .* 259 token ids .* only 100"):
        _fit(small, dm, steps=1)


def test_lightning_checkpoint_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *"abcdefghij"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(
        tmp_path / "tok")
    (tmp_path / "d.txt").write_text(" ".join("abcdefghij"[i % 7] for i in range(400)))
    dm = TextDataModule(str(tmp_path / "d.txt"), tokenizer=str(tmp_path / "tok"), seq_len=16, batch_size=2,
                        val_fraction=0.0)
    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    trainer, _ = _fit(module, dm, steps=2)
    assert module.model.config.vocab_size == 12  # taken from the tokenizer
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "last.ckpt")
    for (name, a), b in zip(module.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    plain.configure_model()
    ckpt = CausalLMModule(config=TINY_LLAMA, optimizer="adamw", gradient_checkpointing=True)
    ckpt.configure_model()
    ckpt.model.load_state_dict(plain.model.state_dict())
    batch = {"input_ids": torch.randint(0, 259, (2, 16))}
    batch["labels"] = batch["input_ids"].clone()
    for module in (plain, ckpt):
        module.train()
        module(**batch).loss.backward()
    assert ckpt.model.model.gradient_checkpointing
    for (name, a), b in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give exactly one"),
        ({"config": TINY_LLAMA, "model_name_or_path": "/x"}, "give exactly one"),
        ({"model_name_or_path": "/no/such/model"}, "model_name_or_path='/no/such/model'"),
        ({"config": TINY_LLAMA, "quantize": "int4"}, "quantize='int4'"),
        ({"config": TINY_LLAMA, "quantize": "nf4"}, "needs LoRA adapters"),
        ({"config": TINY_LLAMA, "lora": {"rank": 8}}, r"unknown key\(s\) \['rank'\]"),
        ({"config": TINY_LLAMA, "lora": {"r": 0}}, r"lora\['r'\]=0"),
        ({"config": TINY_LLAMA, "lora": {"dropout": 1.0}}, r"lora\['dropout'\]=1.0"),
        ({"config": TINY_LLAMA, "lora": {"target_modules": []}}, r"lora\['target_modules'\]=\[\]"),
        ({"config": TINY_LLAMA, "torch_dtype": "float8"}, "torch_dtype='float8'"),
        ({"config": TINY_LLAMA, "save_merged": True}, "save_merged=True"),
        ({"config": TINY_LLAMA, "optimizer": "adam_9bit"}, "optimizer='adam_9bit'"),
        ({"config": "tiny"}, "config='tiny'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    kwargs.setdefault("optimizer", "adamw")
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**kwargs)


def test_a_nan_validation_batch_makes_val_loss_nan_not_the_mean_of_the_others(monkeypatch):
    """A validation batch whose loss is NaN (weights gone NaN, an fp16 overflow): before, torchmetrics' default dropped
    it with a warning, so val_loss was the mean of the other batches (here 2.0) and looked like the model's loss.
    Now val_loss is NaN, as the loss over that data is."""
    from types import SimpleNamespace

    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    losses = iter([torch.tensor(2.0), torch.tensor(float("nan"))])
    monkeypatch.setattr(module, "forward", lambda **batch: SimpleNamespace(loss=next(losses)))
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Encountered `nan` values" warning either
        module.validation_step(batch, 0)
        module.validation_step(batch, 1)
        assert torch.isnan(module.val_loss.compute())


def test_val_loss_is_the_mean_per_target_token_not_per_batch(monkeypatch):
    """Batches of 3 and 1 target tokens with losses 1.0 and 5.0: val_loss is (3 * 1 + 1 * 5) / 4 = 2.0, not the
    batches' mean 3.0 (torchmetrics' nan_strategy='disable' drops the weights: that would give 3.0)."""
    from types import SimpleNamespace

    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    losses = iter([torch.tensor(1.0), torch.tensor(5.0)])
    monkeypatch.setattr(module, "forward", lambda **batch: SimpleNamespace(loss=next(losses)))
    for width in (4, 2):  # labels[:, 1:] holds the targets: 3, then 1
        ids = torch.ones(1, width, dtype=torch.long)
        module.validation_step({"input_ids": ids, "labels": ids}, 0)
    assert module.val_loss.compute().item() == pytest.approx(2.0)


class _OwnData(L.LightningDataModule):
    """A user's own data module: dict rows as ``make_row(ids)`` builds them."""

    def __init__(self, make_row):
        super().__init__()
        self.make_row = make_row

    def train_dataloader(self):
        ids = torch.randint(0, 259, (8, 16), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader([self.make_row(r) for r in ids], batch_size=4)


def test_a_users_batches_without_labels_train_on_their_own_tokens():
    """A data module of the user's own yielding ``input_ids`` / ``attention_mask`` only (no collator making labels)
    failed at the first step with "`self.log(train_loss, None)` was called"; the tokens are now their own labels,
    padding (attention_mask 0) left out, as DataCollatorForLanguageModeling(mlm=False) makes them."""
    from lowmem_lightning.modules.causal_lm import model_inputs

    ids = torch.tensor([[5, 6, 7, 0]])
    inputs = model_inputs({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert inputs["labels"].tolist() == [[5, 6, 7, -100]]
    assert model_inputs({"input_ids": ids})["labels"].tolist() == [[5, 6, 7, 0]]
    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _OwnData(lambda r: {"input_ids": r, "attention_mask": torch.ones_like(r)}))
    assert trainer.global_step == 2


@pytest.mark.parametrize("row, match", [
    (lambda r: (r, r.clone()), r"a batch must be a dict with 'input_ids'.*got a list of 2"),
    (lambda r: {"input_ids": r, "labels": r, "token_type_ids": torch.zeros_like(r)},
     r"keys it does not take: \['token_type_ids'\]; it takes input_ids, attention_mask, labels, position_ids"),
    (lambda r: {"tokens": r}, r"the batch has no 'input_ids'"),
])
def test_a_users_batches_of_another_shape_are_refused_naming_it(row, match):
    module = CausalLMModule(config=TINY_LLAMA, optimizer="adamw")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, _OwnData(row))


def test_a_subclass_forward_taking_more_keys_gets_them():
    """A subclass whose own ``forward`` takes another batch key still gets it (only keys no forward takes are
    refused)."""
    seen = []

    class WithWeights(CausalLMModule):
        def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None, sample_weight=None):
            seen.append(sample_weight is not None)
            return super().forward(input_ids, attention_mask, labels, position_ids)

    module = WithWeights(config=TINY_LLAMA, optimizer="adamw")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _OwnData(lambda r: {"input_ids": r, "sample_weight": torch.ones(())}))
    assert seen == [True]
