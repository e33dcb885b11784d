"""Hugging Face users beyond causal LMs, as tests/test_field_hf_tasks.py meets them: each fine-tunes a transformers
task model in their own LightningModule (tiny models from configs, no download; dropout off so that runs repeat
bit for bit): a T5 seq2seq model trained on ``labels=``, a BERT / RoBERTa sequence classifier (optionally NF4 +
peft LoRA ``task_type="SEQ_CLS"``, gradient checkpointing, a torchmetrics Accuracy) and a BERT token classifier
(``-100`` labels on padding). Each module's own optimizer is torch AdamW.

Importable by ``lowmem estimate`` (``model: {class_path: hf_task_users.Seq2SeqUser}``) with this folder on
``PYTHONPATH``.
"""

from __future__ import annotations

import lightning as L
import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
"""Token ids of every task (0 is padding, 1 end of sequence)."""

LABELS = 3
"""Classes of the classification tasks."""

ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
"""A 2-layer BERT/RoBERTa of hidden size 32."""


def t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A 2 + 2 layer T5 of width 32 (``shared`` embedding tied to ``lm_head``, as t5-small), seeded."""
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def bart(seed: int = 0) -> BartForConditionalGeneration:
    """A 2 + 2 layer BART of width 32 (``shared`` embedding tied to ``lm_head``), seeded."""
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1))


def sequence_classifier(arch: str = "bert", seed: int = 0):
    """A BERT (``classifier`` a Linear) or RoBERTa (``classifier.dense`` + ``classifier.out_proj``) of
    :data:`LABELS` classes, seeded."""
    torch.manual_seed(seed)
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(**ENCODER, max_position_embeddings=32))
    return RobertaForSequenceClassification(RobertaConfig(**ENCODER, max_position_embeddings=34, pad_token_id=0))


def token_classifier(seed: int = 0) -> BertForTokenClassification:
    """A BERT tagging each token with one of :data:`LABELS` classes, seeded."""
    torch.manual_seed(seed)
    return BertForTokenClassification(BertConfig(**ENCODER, max_position_embeddings=32))


def seq2seq_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` pairs (source ``[12]``, target ``[8]``): the target is the source's first 8 tokens, each + 1."""
    source = torch.randint(2, VOCAB - 1, (n, 12), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(source, source[:, :8] + 1)


def classification_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` sequences ``[16]`` and a label: which third of the vocabulary their first token and most others come
    from."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, LABELS, (n,), generator=gen)
    low = 2 + labels * 20
    ids = low[:, None] + torch.randint(0, 20, (n, 16), generator=gen)
    noise = torch.rand(n, 16, generator=gen) < 0.2  # a fifth of the tokens from anywhere, the first never
    noise[:, 0] = False
    ids = torch.where(noise, torch.randint(2, VOCAB, (n, 16), generator=gen), ids)
    return TensorDataset(ids, labels)


def tagging_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """``n`` sequences ``[16]`` padded (id 0) after 8 to 16 tokens; each token's tag is its third of the vocabulary,
    padding is tagged ``-100`` (ignored by the loss)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 62, (n, 16), generator=gen)
    lengths = torch.randint(8, 17, (n, 1), generator=gen)
    padding = torch.arange(16)[None] >= lengths
    ids = ids.masked_fill(padding, 0)
    return TensorDataset(ids, ((ids - 2) // 20).masked_fill(padding, -100))


def loader(data: TensorDataset, batch_size: int = 16) -> DataLoader:
    """The training loader, in order (a resumed epoch-based fit reads what one run reads)."""
    return DataLoader(data, batch_size=batch_size)


class HFUser(L.LightningModule):
    """A user's module around a transformers model: ``self.model(**inputs, labels=...).loss``, logged as
    ``train_loss``, and torch AdamW at ``lr``."""

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def inputs(self, batch) -> dict:
        """The model's keyword arguments for ``batch`` (a ``(ids, labels)`` pair); padding is masked."""
        ids, labels = batch
        return dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)

    def training_step(self, batch, batch_idx):
        """The model's own loss (from ``labels=``)."""
        loss = self.model(**self.inputs(batch)).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        """torch AdamW over every trainable param."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class Seq2SeqUser(HFUser):
    """T5 trained on its ``labels=`` loss; built from :func:`t5` when no model is given (``lowmem estimate``)."""

    def __init__(self, lr: float = 1e-3, model: torch.nn.Module | None = None) -> None:
        super().__init__(t5() if model is None else model, lr)


def qlora_classifier(arch: str = "bert", seed: int = 0):
    """The user's QLoRA classifier: NF4 base (:func:`~lowmem_lightning.quant.quantize_model`), gradient checkpointing
    on, peft LoRA on query/value with ``task_type="SEQ_CLS"`` (peft trains the ``classifier`` whole)."""
    from peft import LoraConfig, get_peft_model

    from lowmem_lightning.quant import quantize_model

    model = quantize_model(sequence_classifier(arch, seed))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))


class ClassifierUser(HFUser):
    """A sequence classifier with a torchmetrics ``Accuracy`` logged as ``train_acc``; built by
    :func:`qlora_classifier` (``qlora=True``) or :func:`sequence_classifier` when no model is given
    (``lowmem estimate``)."""

    def __init__(self, lr: float = 1e-3, model: torch.nn.Module | None = None, qlora: bool = False) -> None:
        if model is None:
            model = qlora_classifier() if qlora else sequence_classifier()
        super().__init__(model, lr)
        self.accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=LABELS)

    def training_step(self, batch, batch_idx):
        """The model's loss; the batch's accuracy updates ``train_acc``."""
        out = self.model(**self.inputs(batch))
        self.accuracy(out.logits.argmax(-1), batch[1])
        self.log_dict({"train_loss": out.loss, "train_acc": self.accuracy})
        return out.loss
