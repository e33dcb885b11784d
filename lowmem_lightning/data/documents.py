"""What ``TextDataModule`` trains on, one record at a time: a :class:`Document` (a prompt left out of the loss and a
completion), rendered from a record (:func:`render_record`: plain text, an instruction record through the prompt
templates, a prompt-completion record) or, for a conversation, a
:class:`~lowmem_lightning.data.chat.ChatDocument`."""

from __future__ import annotations

from dataclasses import dataclass

from lowmem_lightning.data.chat import ChatDocument, chat_record

__all__ = ["Document", "DEFAULT_PROMPT_TEMPLATE", "DEFAULT_PROMPT_TEMPLATE_NO_INPUT", "render_record"]


DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""Prompt for instruction records with a non-empty ``input``; the ``output`` follows it."""

DEFAULT_PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
"""Prompt for instruction records without ``input`` (absent or empty)."""


@dataclass(frozen=True)
class Document:
    """One training document: ``prompt`` (left out of the loss; empty for plain text) + ``completion``."""

    prompt: str
    completion: str


def render_record(record: dict, where: str, template: str, template_no_input: str) -> Document | ChatDocument:
    """A JSONL record as a ``Document`` (or a ``ChatDocument`` for a conversation); ``ValueError`` naming
    ``where`` (file:line) when malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if isinstance(record.get("text"), str):
        return Document("", record["text"])
    chat = chat_record(record, where)
    if chat is not None:
        return chat
    if "prompt" in record and "completion" in record:
        return _prompt_completion(record["prompt"], record["completion"], where, record.get("tools"))
    fields = {k: record.get(k) for k in ("instruction", "input", "output")}
    if not isinstance(fields["instruction"], str) or not isinstance(fields["output"], str):
        raise ValueError(
            f"{where}: expected a string field 'text', string fields 'instruction' and 'output' "
            f"(and optionally 'input'), 'prompt' and 'completion', or a list 'messages' or 'conversations'; "
            f"found keys {sorted(record)}."
        )
    if fields["input"] is not None and not isinstance(fields["input"], str):
        raise ValueError(f"{where}: field 'input' must be a string, got {type(fields['input']).__name__}.")
    if fields["input"]:
        prompt = template.format(instruction=fields["instruction"], input=fields["input"])
    else:
        prompt = template_no_input.format(instruction=fields["instruction"])
    return Document(prompt, fields["output"])


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
