"""What ``TextDataModule`` trains on, one record at a time: a :class:`Document` (a prompt left out of the loss and a
completion), rendered from a record (:func:`render_record`: plain text, an instruction record through the prompt
templates, a prompt-completion record) or, for a conversation, a
:class:`~lowmem_lightning.data.chat.ChatDocument`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from lowmem_lightning.data.chat import ChatDocument, chat_record

__all__ = ["Document", "DEFAULT_PROMPT_TEMPLATE", "DEFAULT_PROMPT_TEMPLATE_NO_INPUT", "RECORD_FIELDS",
           "check_record_fields", "render_record"]


DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""Prompt for instruction records with a non-empty ``input``; the ``output`` follows it."""

DEFAULT_PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
"""Prompt for instruction records without ``input`` (absent or empty)."""


RECORD_FIELDS = ("text", "instruction", "input", "output", "prompt", "completion", "messages", "conversations",
                 "tools")
"""The record keys :func:`render_record` reads; ``record_fields`` maps them to a data set's own keys."""

_QUESTION_KEYS = ("instruction", "question", "query", "problem", "prompt", "input")
_CONTEXT_KEYS = ("input", "context")
_ANSWER_KEYS = ("output", "response", "answer", "solution", "completion", "target")


@dataclass(frozen=True)
class Document:
    """One training document: ``prompt`` (left out of the loss; empty for plain text) + ``completion``."""

    prompt: str
    completion: str


def check_record_fields(record_fields: object) -> dict[str, str] | None:
    """``record_fields`` as a dict ``{our key: the data's key}`` (``None``: the records use our keys); ``ValueError``
    naming the argument, the value and what is allowed for anything else."""
    if record_fields is None:
        return None
    if not isinstance(record_fields, Mapping) or not record_fields or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in record_fields.items()):
        raise ValueError(f"Invalid record_fields={record_fields!r}: expected a mapping of this module's record keys to "
                         "the data's own (non-empty strings), e.g. {'instruction': 'question', 'output': 'answer'}.")
    unknown = sorted(set(record_fields) - set(RECORD_FIELDS))
    if unknown:
        raise ValueError(f"Invalid record_fields={dict(record_fields)!r}: {', '.join(map(repr, unknown))} is not a "
                         f"record key this module reads; the keys: {', '.join(RECORD_FIELDS)} (each mapped to the "
                         "data's own key).")
    if len(set(record_fields.values())) < len(record_fields):
        raise ValueError(f"Invalid record_fields={dict(record_fields)!r}: two of its keys name the same key of the "
                         "data.")
    return dict(record_fields)


def _with_our_keys(record: dict, fields: Mapping[str, str]) -> dict:
    """``record`` with the data's keys of ``fields`` renamed to ours (a key of ours it also has is replaced)."""
    theirs = set(fields.values())
    renamed = {key: value for key, value in record.items() if key not in theirs}
    renamed.update({ours: record[key] for ours, key in fields.items() if key in record})
    return renamed


def _suggested_fields(record: dict) -> dict[str, str] | None:
    """A ``record_fields`` that reads ``record`` as an instruction record (a question-like and an answer-like string
    key, and a context-like one beside them), or ``None``."""
    strings = [key for key, value in record.items() if isinstance(value, str)]
    question = next((k for k in _QUESTION_KEYS if k in strings), None)
    answer = next((k for k in _ANSWER_KEYS if k in strings and k != question), None)
    if question is None or answer is None:
        return None
    context = next((k for k in _CONTEXT_KEYS if k in strings and k not in (question, answer)), None)
    fields = {"instruction": question, **({"input": context} if context else {}), "output": answer}
    return {ours: key for ours, key in fields.items() if ours != key} or None


def _chosen_fields(record: dict) -> dict[str, str] | None:
    """A ``record_fields`` that trains on the chosen answer of a preference record (TRL's ``chosen``/``rejected``
    forms, for DPO: with a ``prompt`` the chosen answer is its completion; without one, the chosen text or
    conversation holds the prompt too), or ``None``."""
    chosen = record.get("chosen")
    if "rejected" not in record or not isinstance(chosen, (str, list)):
        return None
    if "prompt" in record:
        return {"completion": "chosen"}
    return {"text": "chosen"} if isinstance(chosen, str) else {"messages": "chosen"}


def _labelled_completion(where: str) -> ValueError:
    """The refusal of an unpaired preference record (TRL's KTO form: ``prompt``, ``completion`` and a boolean
    ``label``), which fine-tuning would train on whatever its label says."""
    return ValueError(f"{where}: a boolean 'label' beside 'prompt' and 'completion' makes an unpaired preference "
                      "record (for KTO): fine-tuning on it would train on the completions labelled false too. Keep "
                      "the records labelled true, without the key: jq -c 'select(.label == true) | del(.label)'.")


_PROMPT_ONLY = (" It holds a prompt and no answer (TRL's prompt-only form, for GRPO and other online training, "
                "where the model writes the answers): fine-tuning needs the answer to train on; give each record "
                "its 'completion'.")
"""What the refusal of a record with a ``prompt`` and no answer-like key adds."""


def _prompt_only(record: dict) -> bool:
    """Whether ``record`` holds a prompt (a string or a conversation) and no key that names an answer."""
    return isinstance(record.get("prompt"), (str, list)) and not any(key in record for key in _ANSWER_KEYS)


def _unread_record(record: dict, where: str, fields: Mapping[str, str] | None) -> ValueError:
    """The refusal of a record none of whose keys this module reads, with the ``record_fields`` that would read it
    when its keys look like an instruction record's, or train on the chosen answer of a preference record; a prompt
    with no answer is said to be one (:func:`_prompt_only`)."""
    mapped = f" (after record_fields={dict(fields)!r})" if fields else ""
    chosen = _chosen_fields(record)
    mapping = chosen or _suggested_fields(record)
    lead = (" It is a preference record (chosen/rejected, for DPO): this module fine-tunes on answers, not on "
            "preferences; to train on the chosen ones," if chosen else " If its keys mean those,")
    hint = (f"{lead} map them: record_fields: {json.dumps(mapping)} (--data.record_fields '{json.dumps(mapping)}')."
            if mapping else _PROMPT_ONLY if _prompt_only(record) else "")
    return ValueError(f"{where}: expected a string field 'text', string fields 'instruction' and 'output' "
                      f"(and optionally 'input'), 'prompt' and 'completion', or a list 'messages' or 'conversations'; "
                      f"found keys {sorted(record)}{mapped}.{hint}")


def render_record(record: dict, where: str, template: str, template_no_input: str,
                  record_fields: Mapping[str, str] | None = None) -> Document | ChatDocument:
    """A JSONL record as a ``Document`` (or a ``ChatDocument`` for a conversation), its keys first renamed by
    ``record_fields`` (``{our key: the data's key}``: :func:`check_record_fields`); ``ValueError`` naming ``where``
    (file:line) when malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    given = record
    if record_fields:
        record = _with_our_keys(record, record_fields)
    if isinstance(record.get("text"), str):
        return Document("", record["text"])
    chat = chat_record(record, where)
    if chat is not None:
        return chat
    if "prompt" in record and "completion" in record:
        if isinstance(record.get("label"), bool):
            raise _labelled_completion(where)
        return _prompt_completion(record["prompt"], record["completion"], where, record.get("tools"))
    parts = {k: record.get(k) for k in ("instruction", "input", "output")}
    if not isinstance(parts["instruction"], str) or not isinstance(parts["output"], str):
        raise _unread_record(given, where, record_fields)
    if parts["input"] is not None and not isinstance(parts["input"], str):
        raise ValueError(f"{where}: field 'input' must be a string, got {type(parts['input']).__name__}.")
    if parts["input"]:
        prompt = template.format(instruction=parts["instruction"], input=parts["input"])
    else:
        prompt = template_no_input.format(instruction=parts["instruction"])
    return Document(prompt, parts["output"])


def _prompt_completion(prompt, completion, where: str, tools=None) -> Document | ChatDocument:
    """A prompt-completion record (TRL's standard and conversational forms): two strings give the prompt as written
    (no template, left out of the loss) and the completion (trained); two lists of messages give the conversation
    ``prompt + completion`` (with the record's ``tools``, if any), trained on the completion's turns, which must all
    be the assistant's (and the prompt's none). ``ValueError`` naming ``where`` otherwise."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ValueError(f"{where}: 'completion' is empty: nothing to learn; add it or leave the record out.")
        return Document(prompt, completion)
    if isinstance(prompt, list) and isinstance(completion, list):
        if any(isinstance(turn, dict) and turn.get("role") == "assistant" for turn in prompt):
            raise ValueError(f"{where}: 'prompt' holds an assistant turn, which would be trained: a prompt-completion "
                             "record trains only its completion; give the conversation as 'messages' instead.")
        if not completion or not all(isinstance(turn, dict) and turn.get("role") == "assistant" for turn in completion):
            raise ValueError(f"{where}: 'completion' must be a non-empty list of assistant turns "
                             "({'role': 'assistant', 'content': ...}).")
        return chat_record({"messages": prompt + completion, "tools": tools}, where)
    raise ValueError(f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages, got "
                     f"{type(prompt).__name__} and {type(completion).__name__}.")
