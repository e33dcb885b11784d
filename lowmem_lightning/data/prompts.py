"""What ``lowmem predict`` generates from: the prompts of held-out records (:func:`prompt_record`,
:class:`PromptRecords`, batched by :func:`collate_prompts`) or, for plain text, the first document of each held-out
block (:func:`first_document_prompts`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from lowmem_lightning.data.chat import ChatDocument, ChatTemplate
from lowmem_lightning.data.documents import Document
from lowmem_lightning.data.encoding import encode_document
from lowmem_lightning.data.overflow import collate_trimmed
from lowmem_lightning.data.tokenizer import ByteTokenizer, HFTokenizer
from lowmem_lightning.data.tokens import IGNORE_INDEX

__all__ = ["PromptRecord", "prompt_record", "PromptRecords", "collate_prompts", "first_document_prompts"]


@dataclass(frozen=True)
class PromptRecord:
    """A held-out record to answer: its ``prompt`` as rendered text, the prompt's token ``ids`` (framed as in
    training: bos first where the record had one) and the record's ``reference`` reply."""

    prompt: str
    ids: tuple[int, ...]
    reference: str


def prompt_record(
    doc: Document | ChatDocument, tokenizer: ByteTokenizer | HFTokenizer, chat: ChatTemplate
) -> tuple[PromptRecord, str]:
    """``(record, end_of_turn)``: the prompt of an instruction record (bos, then its prompt template rendered) or a
    conversation (the turns before its last assistant turn with the generation prompt,
    :meth:`~lowmem_lightning.data.chat.ChatTemplate.generation_prompt`), its reply as the reference, and the text
    that ends a reply (the chat template's end-of-turn marker; ``""`` for instruction records, which end at eos)."""
    if isinstance(doc, ChatDocument):
        prompt, ids, reference, end_of_turn = chat.generation_prompt(doc)
        return PromptRecord(prompt, tuple(ids), reference), end_of_turn
    ids, labels = encode_document(Document(doc.prompt, ""), tokenizer)
    prompt_ids = tuple(i for i, label in zip(ids, labels) if label == IGNORE_INDEX)  # bos and the prompt
    return PromptRecord(doc.prompt, prompt_ids, doc.completion), ""


class PromptRecords(Dataset):
    """Prompts to answer: item ``i`` is ``{"input_ids", "attention_mask"}`` (``[width]`` int64 each, ``width`` the
    longest prompt; left-padded with ``pad_id``, mask 0 there, as generation wants) and the strings ``prompt`` and
    ``reference`` of ``records[i]``. Batch them with :func:`collate_prompts`."""

    def __init__(self, records: list[PromptRecord], pad_id: int):
        self.records = records
        width = max(len(r.ids) for r in records)
        self.ids = torch.full((len(records), width), pad_id, dtype=torch.long)
        self.mask = torch.zeros((len(records), width), dtype=torch.long)
        for row, record in enumerate(records):
            self.ids[row, width - len(record.ids):] = torch.tensor(record.ids, dtype=torch.long)
            self.mask[row, width - len(record.ids):] = 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "prompt": self.records[i].prompt,
                "reference": self.records[i].reference}


def collate_prompts(items: list[dict]) -> dict:
    """A batch of :class:`PromptRecords` items: ``input_ids`` and ``attention_mask`` ``[batch, width]`` as wide as
    the batch's longest prompt (rounded up, :func:`~lowmem_lightning.data.overflow.collate_trimmed`), and the lists
    ``prompt`` and ``reference``."""
    batch = collate_trimmed([{k: item[k] for k in ("input_ids", "attention_mask")} for item in items])
    return {**batch, "prompt": [item["prompt"] for item in items],
            "reference": [item["reference"] for item in items]}


def first_document_prompts(blocks: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}``, ``[n, length]`` each: the first ``length`` tokens of each block that has
    no padding there; when ``blocks`` carry ``position_ids`` (isolated documents), only the tokens before the first
    restart after position 0 (the block's first document, which the model saw alone), left-padded with ``pad_id``
    (``attention_mask`` 0) as generation wants, so no prompt joins two documents the model never saw together."""
    ids, mask = blocks["input_ids"][:, :length], blocks["attention_mask"][:, :length]
    width = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
    if "position_ids" in blocks:
        restarts = blocks["position_ids"][:, 1:length] == 0
        width = torch.where(restarts.any(dim=1), restarts.int().argmax(dim=1) + 1, width)
    columns = torch.arange(ids.shape[1])
    inside = columns < width[:, None]
    keep = (mask.bool() | ~inside).all(dim=1)
    start = (ids.shape[1] - width)[:, None]  # each prompt right-aligned: it starts at this column
    source, left = (columns - start) % ids.shape[1], columns >= start
    return {"input_ids": ids.gather(1, source).masked_fill(~left, pad_id)[keep],
            "attention_mask": left.long()[keep]}
