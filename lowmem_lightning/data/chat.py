"""Chat records for ``TextDataModule``: conversations rendered with a chat template, loss on the assistant turns.

Two JSONL record forms are read (and mix with ``{"text"}`` and instruction records in one file):

- OpenAI / Hugging Face: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``;
- ShareGPT: ``{"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}`` (``human`` is the
  user, ``gpt`` the assistant; ``user`` and ``assistant`` are accepted as well).

:func:`chat_record` checks a record (roles, string contents, at least one assistant turn) and returns a
:class:`ChatDocument`. :class:`ChatTemplate` renders it: with a Hugging Face tokenizer through its own
``apply_chat_template`` (so a Llama-3, Qwen or Mistral tokenizer gives its model's format), with the byte
tokenizer through a Jinja environment like transformers' (sandboxed, ``trim_blocks``, ``lstrip_blocks``). The
template is ``chat_template`` when given, else the tokenizer's own, else :data:`DEFAULT_CHAT_TEMPLATE`.

The assistant turns are found the way TRL and axolotl find them: the conversation is rendered prefix by prefix.
For assistant message ``i``, the rendering of messages ``[:i]`` with ``add_generation_prompt=True`` (where the
model starts to answer) and of messages ``[:i+1]`` (the answer and the template's end-of-turn marker) must each
be the start of the rendering of the whole conversation; the characters between them are that turn. A template
that renders earlier turns differently once later ones follow (one that drops the reasoning of earlier assistant
turns, or moves the system prompt into the last user turn) fails this and is refused, naming the record. Tokens
overlapping an assistant turn get their ids as labels, all others -100 (with a fast HF tokenizer the whole text
is tokenized once and the character offsets decide, as in ``apply_chat_template(...,
return_assistant_tokens_mask=True)``; the byte tokenizer encodes each piece on its own, which is the same).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lowmem_lightning.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "CHAT_FORMS",
    "CHAT_TEMPLATE_SUFFIXES",
    "ChatDocument",
    "ChatTemplate",
    "chat_record",
    "read_chat_template",
]

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Our plain chat format, for the byte tokenizer and HF tokenizers without a template: each turn is
``<|role|>\\n{content}<|end|>\\n`` (role ``system``, ``user`` or ``assistant``); the generation prompt is
``<|assistant|>\\n``. The loss covers an assistant turn's ``{content}<|end|>\\n``."""

CHAT_FORMS = {
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant",
                                        "user": "user", "assistant": "assistant"}),
}
"""Record key -> (role field, content field, {role as written: role given to the template}) of each chat form."""

CHAT_TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt")
"""File suffixes ``chat_template`` accepts as the path of a template file."""


@dataclass(frozen=True)
class ChatDocument:
    """One conversation: ``messages`` as ``(role, content)`` pairs (role ``system``, ``user`` or ``assistant``)
    and ``where`` it was read (``file:line``), for error messages."""

    messages: tuple[tuple[str, str], ...]
    where: str


def chat_record(record: dict, where: str) -> ChatDocument | None:
    """The conversation of a JSONL record with a ``messages`` or ``conversations`` key, else ``None``.
    ``ValueError`` naming ``where`` (file:line) and the turn for an empty or non-list conversation, a turn that is
    not an object, an unknown role, a missing or non-string content, a first turn by the assistant, or no
    assistant turn at all (nothing to learn)."""
    key = next((k for k in CHAT_FORMS if k in record), None)
    if key is None:
        return None
    role_field, content_field, roles = CHAT_FORMS[key]
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of turns, got {_kind(turns)}.")
    messages = tuple(_turn(turn, f"{where}: {key}[{i}]", role_field, content_field, roles)
                     for i, turn in enumerate(turns))
    if messages[0][0] == "assistant":
        raise ValueError(f"{where}: {key}[0] is an assistant turn, with nothing before it to answer; start the "
                         "conversation with a user (or system) turn.")
    if all(role != "assistant" for role, _ in messages):
        allowed = sorted(k for k, v in roles.items() if v == "assistant")
        raise ValueError(f"{where}: no assistant turn ({role_field} {' or '.join(map(repr, allowed))}) in {key!r}: "
                         "nothing to learn; add the reply or leave the record out.")
    return ChatDocument(messages, where)


def _kind(value) -> str:
    """``value``'s JSON kind in words, for error messages."""
    return "an empty list" if value == [] else {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), "null" if value is None else type(value).__name__)


def _turn(turn, where: str, role_field: str, content_field: str, roles: dict) -> tuple[str, str]:
    """``(role, content)`` of one turn; ``ValueError`` naming ``where`` when malformed."""
    if not isinstance(turn, dict):
        raise ValueError(f"{where}: expected an object with {role_field!r} and {content_field!r}, got {_kind(turn)}.")
    role = turn.get(role_field)
    if not isinstance(role, str) or role not in roles:
        shown = f"{role_field}={role!r}" if role_field in turn else f"no {role_field!r}"
        raise ValueError(f"{where}: {shown}; expected one of {', '.join(map(repr, roles))}.")
    content = turn.get(content_field)
    if not isinstance(content, str):
        shown = _kind(content) if content_field in turn else "nothing"
        raise ValueError(f"{where}: the {role!r} turn's {content_field!r} must be a string, got {shown}.")
    return roles[role], content


def _environment():
    """A Jinja environment like transformers' for chat templates: sandboxed, ``trim_blocks``, ``lstrip_blocks``,
    loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII, and
    ``{% generation %}`` blocks (TRL-style templates) rendered as their body."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                   ensure_ascii=ensure_ascii)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _shown(value: str) -> str:
    """``value`` for an error message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_chat_template(value) -> str:
    """The Jinja text of a ``chat_template`` setting: the value itself when it holds ``{{`` or ``{%``, else the
    content of the ``.jinja`` / ``.j2`` / ``.txt`` file it names. ``ValueError`` naming ``chat_template`` and the
    value when it is neither, the file cannot be read or holds no template, or the template does not compile."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"Invalid chat_template={value!r}: expected a Jinja chat template or the path of a "
                         f"{', '.join(CHAT_TEMPLATE_SUFFIXES)} file holding one.")
    text = value if ("{{" in value or "{%" in value) else _template_file(value)
    import jinja2

    try:
        _environment().from_string(text)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"Invalid chat_template={_shown(value)}: not a valid Jinja template ({err.message}, "
                         f"template line {err.lineno}).") from None
    return text


def _template_file(value: str) -> str:
    """The text of the template file ``value`` names (see :func:`read_chat_template`)."""
    path = Path(value).expanduser()
    if path.suffix not in CHAT_TEMPLATE_SUFFIXES:
        raise ValueError(f"Invalid chat_template={_shown(value)}: neither a Jinja template (no '{{{{' or '{{%') nor "
                         f"the path of a {', '.join(CHAT_TEMPLATE_SUFFIXES)} file.")
    if not path.is_file():
        why = "not a regular file" if path.exists() else "no such file"
        raise ValueError(f"Invalid chat_template={_shown(value)}: {why} ({path.resolve()}).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"Invalid chat_template={_shown(value)}: cannot read it as UTF-8 text ({err}).") from None
    if "{{" not in text and "{%" not in text:
        raise ValueError(f"Invalid chat_template={_shown(value)}: {path} holds no Jinja template (no '{{{{' or '{{%').")
    return text


class ChatTemplate:
    """Renders and tokenizes :class:`ChatDocument` s for one tokenizer.

    Args:
        tokenizer: The data module's tokenizer (``ByteTokenizer`` or ``HFTokenizer``).
        template: Jinja text (from :func:`read_chat_template`) to use instead of the tokenizer's own; ``None``
            uses the tokenizer's ``chat_template`` when it has one, else :data:`DEFAULT_CHAT_TEMPLATE`.
        setting: The ``chat_template`` value ``template`` was read from (a path or the text), named in messages.

    With the tokenizer's template, or one given for an HF tokenizer, the ids are exactly what
    ``apply_chat_template(messages)`` returns (the template decides about bos). With the default template or the
    byte tokenizer (whose special tokens have no text), the conversation is framed like other documents: bos (when
    the tokenizer has one), then the rendered text.
    """

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer, template: str | None = None,
                 setting: str | None = None):
        self.tokenizer = tokenizer
        self._given, self._given_source = template, f"chat_template={_shown(setting or template or '')}"
        self._resolved: tuple[str, str] | None = None
        self._compiled = None

    def __getstate__(self) -> dict:
        """Pickled without the compiled Jinja template (ddp_spawn sends the data module to its ranks); it is
        compiled again on first use."""
        return {**self.__dict__, "_compiled": None}

    @property
    def text(self) -> str:
        """The Jinja text in use (resolved on first use; ``ValueError`` when the tokenizer's templates have no
        default)."""
        return self._resolve()[0]

    @property
    def source(self) -> str:
        """Where :attr:`text` comes from, in words."""
        return self._resolve()[1]

    def _resolve(self) -> tuple[str, str]:
        if self._resolved is None:
            self._resolved = self._pick()
        return self._resolved

    def _pick(self) -> tuple[str, str]:
        if self._given is not None:
            return self._given, self._given_source
        hf = getattr(self.tokenizer, "tokenizer", None)
        if getattr(hf, "chat_template", None):
            try:
                return hf.get_chat_template(), f"the chat template of tokenizer={self.tokenizer.name!r}"
            except ValueError as err:  # several named templates, none named 'default'
                raise ValueError(f"tokenizer={self.tokenizer.name!r}: {err} Set --data.chat_template.") from None
        return DEFAULT_CHAT_TEMPLATE, "the default chat template (DEFAULT_CHAT_TEMPLATE)"

    def fingerprint(self) -> dict:
        """``{"source": words, "sha256": hex digest of the template text}``, kept in checkpoints to notice a
        resume with another template."""
        from lowmem_lightning.data.fingerprint import template_fingerprint

        return template_fingerprint(self.text, self.source)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (``(role, content)`` pairs) under the template."""
        chat = [{"role": role, "content": content} for role, content in messages]
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.tokenizer.apply_chat_template(
                chat, chat_template=self.text, tokenize=False, add_generation_prompt=add_generation_prompt)
        if self._compiled is None:
            self._compiled = _environment().from_string(self.text)
        return self._compiled.render(messages=chat, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, doc: ChatDocument) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the whole conversation rendered, and the ``[start, end)`` character span of each
        assistant turn in it (its content and the end-of-turn marker after it), found by rendering prefixes.
        ``ValueError`` naming ``doc.where`` when the template fails on the conversation or renders a prefix of it
        as text that is not the start of the whole (see the module docstring)."""
        full = self._render_checked(doc, doc.messages, False)
        spans: list[tuple[int, int]] = []
        for i, (role, _) in enumerate(doc.messages):
            if role != "assistant":
                continue
            start = self._render_checked(doc, doc.messages[:i], True)
            stop = self._render_checked(doc, doc.messages[: i + 1], False)
            done = spans[-1][1] if spans else 0
            if not (stop.startswith(start) and full.startswith(stop) and len(start) >= done):
                raise ValueError(
                    f"{doc.where}: {self.source} does not render this conversation prefix by prefix (its text for "
                    f"the first {i} turn(s) plus the generation prompt, then with assistant turn {i} (0-based), is "
                    "not the start of its text for the whole conversation: it renders earlier turns differently "
                    "once later ones follow, or writes text after the last turn, such as a newline after its loop), "
                    "so the assistant turns cannot be located for the loss; give "
                    "--data.chat_template a template that renders each turn the same whatever follows, or split "
                    "the conversation into one record per assistant turn."
                )
            spans.append((len(start), len(stop)))
        return full, spans

    def _render_checked(self, doc: ChatDocument, messages, add_generation_prompt: bool) -> str:
        try:
            return self.render(messages, add_generation_prompt)
        except Exception as err:  # a template is code: raise_exception, TypeError, UndefinedError, ...
            raise ValueError(f"{doc.where}: {self.source} failed on this conversation: "
                             f"{type(err).__name__}: {err}".replace("\n", " ")) from None

    def encode(self, doc: ChatDocument) -> tuple[list[int], list[bool]]:
        """``(ids, trained)``: the token ids of the rendered conversation and, per token, whether it overlaps an
        assistant turn (the tokens the loss covers)."""
        text, spans = self.assistant_spans(doc)
        return self._framed(*self._tokenize(text, spans))

    def _framed(self, ids: list[int], trained: list[bool]) -> tuple[list[int], list[bool]]:
        """``ids`` (and their ``trained`` flags) with bos in front when this template frames conversations with it."""
        bos = self.tokenizer.bos_token_id
        if bos is not None and self._frames_with_bos() and ids[:1] != [bos]:
            return [bos, *ids], [False, *trained]
        return ids, trained

    def generation_prompt(self, doc: ChatDocument) -> tuple[str, list[int], str, str]:
        """``(prompt, ids, reference, end_of_turn)`` for answering ``doc``'s last assistant turn: the turns before it
        rendered with the generation prompt (the assistant-turn header, ``add_generation_prompt=True``), its token
        ids (framed as :meth:`encode` frames a conversation), that turn's content, and the text the template writes
        after an assistant turn's content (its end-of-turn marker, surrounding whitespace stripped; ``""`` when the
        turn's rendering does not start with its content). ``ValueError`` naming ``doc.where`` as
        :meth:`assistant_spans`."""
        last = max(i for i, (role, _) in enumerate(doc.messages) if role == "assistant")
        prompt = self._render_checked(doc, doc.messages[:last], True)
        turn = self._render_checked(doc, doc.messages[: last + 1], False)[len(prompt):]
        reference = doc.messages[last][1]
        ids, _ = self._framed(*self._tokenize(prompt, []))
        end_of_turn = turn[len(reference):].strip() if turn.startswith(reference) else ""
        return prompt, ids, reference, end_of_turn

    def _frames_with_bos(self) -> bool:
        return isinstance(self.tokenizer, ByteTokenizer) or self.text == DEFAULT_CHAT_TEMPLATE

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None and getattr(hf, "is_fast", False):
            enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
            trained = [any(a < end and b > start for start, end in spans) for a, b in enc["offset_mapping"]]
            return list(enc["input_ids"]), trained
        ids: list[int] = []
        trained: list[bool] = []
        cuts = [0, *(c for span in spans for c in span), len(text)]
        for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
            piece = self.tokenizer.encode(text[a:b]) if b > a else []
            ids += piece
            trained += [k % 2 == 1] * len(piece)
        return ids, trained
