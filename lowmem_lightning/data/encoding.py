"""Documents into tokens: :func:`encode_document` (one document's ids and labels) and :func:`encode_documents` (a
stream of documents into flat arrays, :class:`~lowmem_lightning.data.tokens.EncodedRecords`, tokenized
:data:`ENCODE_CHUNK` records per call of the tokenizer)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

from lowmem_lightning.data.chat import ChatDocument, ChatTemplate
from lowmem_lightning.data.documents import Document
from lowmem_lightning.data.tokenizer import ByteTokenizer, HFTokenizer
from lowmem_lightning.data.tokens import IGNORE_INDEX, EncodedRecords, RecordsBuilder, segment_index

__all__ = ["ENCODE_CHUNK", "encode_document", "encode_documents"]


def encode_document(
    doc: Document | ChatDocument, tokenizer: ByteTokenizer | HFTokenizer, chat: ChatTemplate | None = None
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of ``bos, prompt..., completion..., eos``; labels are -100 on bos and prompt.
    A ``ChatDocument`` is rendered with ``chat`` (default: ``ChatTemplate(tokenizer)``); its labels are -100
    except on the tokens of assistant turns."""
    if isinstance(doc, ChatDocument):
        ids, trained = (chat or ChatTemplate(tokenizer)).encode(doc)
        return ids, [i if keep else IGNORE_INDEX for i, keep in zip(ids, trained)]
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prompt = tokenizer.encode(doc.prompt) if doc.prompt else []
    body = tokenizer.encode(doc.completion) + [tokenizer.eos_token_id]
    ids = head + prompt + body
    labels = [IGNORE_INDEX] * (len(head) + len(prompt)) + body
    return ids, labels


ENCODE_CHUNK = 4096
"""Records tokenized per call of the tokenizer's ``encode_batch`` (:func:`encode_documents`)."""


def encode_documents(
    docs: Iterable[Document | ChatDocument], tokenizer: ByteTokenizer | HFTokenizer, chat: ChatTemplate | None = None,
    on_chunk=None,
) -> EncodedRecords:
    """Every document's :func:`encode_document` ids and labels, as flat arrays (:class:`EncodedRecords`: int32 ids, bool
    "trained" = label is not -100). ``docs`` (a list, or an iterator such as
    :func:`~lowmem_lightning.data.reading.iter_documents`) are taken :data:`ENCODE_CHUNK` at a time, so no more than a
    chunk of them is held: runs of prompt/completion documents are tokenized by one ``tokenizer.encode_batch`` call for
    their prompts and one for their completions, and framed (bos, eos) by array arithmetic; conversations are rendered
    and tokenized one by one (:meth:`ChatTemplate.encode`: each needs its own renders to find its assistant turns).
    ``on_chunk(records_done, tokens_done)`` is called after each chunk."""
    chat = chat or ChatTemplate(tokenizer)
    builder = RecordsBuilder()
    docs = iter(docs)
    while chunk := list(itertools.islice(docs, ENCODE_CHUNK)):
        for is_chat, run in itertools.groupby(chunk, key=lambda doc: isinstance(doc, ChatDocument)):
            if is_chat:
                for doc in run:
                    ids, trained = chat.encode(doc)
                    builder.add_record(np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=np.bool_))
            else:
                builder.add_flat(*_encode_prompted(list(run), tokenizer))
        del chunk
        if on_chunk is not None:
            on_chunk(builder.n_records, builder.n_tokens)
    return builder.finish()


def _encode_prompted(docs: list[Document], tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, trained, lengths)`` of ``docs`` one after the other, each ``bos, prompt..., completion..., eos``
    (:func:`encode_document`), with two ``encode_batch`` calls (an empty prompt is not tokenized, as there)."""
    prompted = np.fromiter((bool(d.prompt) for d in docs), dtype=np.bool_, count=len(docs))
    prompt_ids, some = tokenizer.encode_batch([d.prompt for d in docs if d.prompt])
    prompt_lengths = np.zeros(len(docs), dtype=np.int64)
    prompt_lengths[prompted] = some
    body_ids, body_lengths = tokenizer.encode_batch([d.completion for d in docs])
    head = int(tokenizer.bos_token_id is not None)
    lengths = head + prompt_lengths + body_lengths + 1
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    ids = np.empty(int(lengths.sum()), dtype=np.int32)
    trained = np.zeros(ids.size, dtype=np.bool_)
    if head:
        ids[starts] = tokenizer.bos_token_id
    ids[segment_index(starts + head, prompt_lengths)] = prompt_ids
    body = segment_index(starts + head + prompt_lengths, body_lengths)
    ids[body], trained[body] = body_ids, True
    ends = starts + lengths - 1
    ids[ends], trained[ends] = tokenizer.eos_token_id, True
    return ids, trained, lengths
