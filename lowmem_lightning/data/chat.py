"""Chat records for ``TextDataModule``: conversations rendered with a chat template, loss on the assistant turns.

Two JSONL record forms are read (and mix with ``{"text"}`` and instruction records in one file):

- OpenAI / Hugging Face: ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]}``;
- ShareGPT: ``{"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}`` (``human`` is the
  user, ``gpt`` the assistant; ``user``, ``assistant`` and ``tool`` are accepted as well, and the function-calling
  ``function_call`` / ``observation`` turns of LLaMA-Factory-style data, see below).

A content is a string or a list of OpenAI content parts: ``{"type": "text", "text": str}`` parts are read as their
texts joined with nothing between (what templates that loop over parts print), and the template receives that
string, so every text-only template renders it; any other part (``image_url``, ``input_audio``, ...) is refused
(text-only fine-tuning).

Function calling (the OpenAI fine-tuning format, as glaive-, xlam- and Hermes-style data sets give it): a
top-level ``"tools"`` list of function specs (JSON-schema objects; a JSON string holding such a list is read too)
goes to the template as ``tools=`` (``apply_chat_template(..., tools=...)``); an assistant turn may carry
``"tool_calls": [{"type": "function", "function": {"name": str, "arguments": object or JSON string}}, ...]``
(the flat ``{"name", "arguments"}`` is accepted too), kept on the message as given, with ``content`` null, absent
or text; a ``{"role": "tool", "content": str}`` turn (its ``name`` / ``tool_call_id`` kept) gives a call's result.
In ShareGPT records a ``function_call`` turn's value (the JSON of ``{"name", "arguments"}``, or a list of them)
becomes an assistant turn with those ``tool_calls``, an ``observation`` turn a ``tool`` turn. OpenAI's legacy form
(its fine-tuning format before ``tools``) is read as the same: a top-level ``"functions"`` list is the tools, an
assistant turn's ``"function_call": {"name", "arguments"}`` its one tool call, a ``{"role": "function", "name",
"content"}`` turn a ``tool`` turn. Assistant turns,
tool-call turns included, are trained; tool results, the tools list, system and user turns are not. A tool result
with no tool call before it is refused (axolotl and TRL pass such records to the template unchecked).

:func:`chat_record` checks a record and returns a :class:`ChatDocument`. :class:`ChatTemplate` renders it: with a
Hugging Face tokenizer through its own ``apply_chat_template`` (so a Llama-3, Qwen or Mistral tokenizer gives its
model's format), with the byte tokenizer through a Jinja environment like transformers' (sandboxed,
``trim_blocks``, ``lstrip_blocks``). The template is ``chat_template`` when given, else the tokenizer's own, else
:data:`DEFAULT_CHAT_TEMPLATE`. A template that leaves out a record's tool calls (a call's name is not in its turn's
text) or its tools (the text is the same without them), one written without function calling, is refused, naming
the record.

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
    "{% if tools %}<|tools|>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set call = call['function'] if call['function'] is defined else call %}"
    "<|tool_call|>{\"name\": {{ call['name'] | tojson }}, \"arguments\": "
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% elif call['arguments'] is defined %}"
    "{{ call['arguments'] | tojson }}{% else %}{}{% endif %}}\n"
    "{% endfor %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Our plain chat format, for the byte tokenizer and HF tokenizers without a template: each turn is
``<|role|>\\n{content}<|end|>\\n`` (role ``system``, ``user``, ``assistant`` or ``tool``, the last for a tool's
result); the generation prompt is ``<|assistant|>\\n``. An assistant turn's tool calls follow its content (if any),
one line each: ``<|tool_call|>{"name": NAME, "arguments": ARGUMENTS}\\n``, the arguments as JSON (a JSON string
given as the arguments is written as it is). A ``tools`` list comes first, as ``<|tools|>\\n``, the JSON of each
tool on its own line, then ``<|end|>\\n``. The loss covers an assistant turn's ``{content}{tool calls}<|end|>\\n``."""

CHAT_FORMS = {
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                                     "function": "tool"}),
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant",
                                        "user": "user", "assistant": "assistant", "tool": "tool",
                                        "function_call": "assistant", "observation": "tool"}),
}
"""Record key -> (role field, content field, {role as written: role given to the template}) of each chat form
(ShareGPT's ``function_call`` is an assistant turn whose value holds its tool calls, ``observation`` a tool result;
OpenAI's legacy ``function`` role a tool result)."""

CHAT_TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt")
"""File suffixes ``chat_template`` accepts as the path of a template file."""


@dataclass(frozen=True)
class ChatDocument:
    """One conversation: ``messages`` as the dicts the chat template receives (``role``: ``system``, ``user``,
    ``assistant`` or ``tool``; ``content``: a string, or for an assistant turn with ``tool_calls`` a string,
    ``None`` or absent; an assistant turn's ``tool_calls`` and a tool turn's ``name`` / ``tool_call_id`` as the
    record gave them), ``where`` it was read (``file:line``), for error messages, and the record's ``tools``
    (function specs given to the template as ``tools=``; empty: none)."""

    messages: tuple[dict, ...]
    where: str
    tools: tuple[dict, ...] = ()


def chat_record(record: dict, where: str) -> ChatDocument | None:
    """The conversation of a JSONL record with a ``messages`` or ``conversations`` key, else ``None``.
    ``ValueError`` naming ``where`` (file:line) and the turn for an empty or non-list conversation, a turn that is
    not an object, an unknown role, a missing or non-string content (text content parts are joined; any other part
    is refused), a ``tools`` that is not a list of objects, a tool call without a function name, an assistant turn
    with neither content nor tool calls, a tool result before any tool call, a first turn by the assistant, or no
    assistant turn at all (nothing to learn)."""
    key = next((k for k in CHAT_FORMS if k in record), None)
    if key is None:
        return None
    role_field, content_field, roles = CHAT_FORMS[key]
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of turns, got {_kind(turns)}.")
    tools = _tools(record["tools"] if "tools" in record else record.get("functions"), where)
    messages = tuple(_turn(turn, f"{where}: {key}[{i}]", role_field, content_field, roles)
                     for i, turn in enumerate(turns))
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: {key}[0] is an assistant turn, with nothing before it to answer; start the "
                         "conversation with a user (or system) turn.")
    called = False
    for i, message in enumerate(messages):
        called = called or bool(message.get("tool_calls"))
        if message["role"] == "tool" and not called:
            raise ValueError(f"{where}: {key}[{i}] is a tool result ({role_field} {turns[i][role_field]!r}) with no "
                             "tool call before it (no earlier assistant turn has 'tool_calls'); put the assistant "
                             "turn that calls the tool before it, or leave the record out.")
    if all(m["role"] != "assistant" for m in messages):
        allowed = sorted(k for k, v in roles.items() if v == "assistant")
        raise ValueError(f"{where}: no assistant turn ({role_field} {' or '.join(map(repr, allowed))}) in {key!r}: "
                         "nothing to learn; add the reply or leave the record out.")
    return ChatDocument(messages, where, tools)


def _tool_name(spec: dict) -> str | None:
    """The function name of a tool spec or tool call (``{"function": {"name"}}`` or the flat ``{"name"}``), if any."""
    function = spec.get("function", spec)
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _kind(value) -> str:
    """``value``'s JSON kind in words, for error messages."""
    return "an empty list" if value == [] else {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), "null" if value is None else type(value).__name__)


def _turn(turn, where: str, role_field: str, content_field: str, roles: dict) -> dict:
    """The message dict of one turn; ``ValueError`` naming ``where`` when malformed."""
    if not isinstance(turn, dict):
        raise ValueError(f"{where}: expected an object with {role_field!r} and {content_field!r}, got {_kind(turn)}.")
    written = turn.get(role_field)
    if not isinstance(written, str) or written not in roles:
        shown = f"{role_field}={written!r}" if role_field in turn else f"no {role_field!r}"
        raise ValueError(f"{where}: {shown}; expected one of {', '.join(map(repr, roles))}.")
    role = roles[written]
    if written == "function_call":  # ShareGPT (LLaMA-Factory): the value is the JSON of the call(s)
        return {"role": role, "tool_calls": _sharegpt_calls(turn.get(content_field), where, content_field)}
    message = {"role": role}
    content = turn.get(content_field)
    calls = turn.get("tool_calls") if role == "assistant" else None
    if role == "assistant" and calls in (None, []) and turn.get("function_call") is not None:  # OpenAI's legacy form
        calls = [{"type": "function", "function": turn["function_call"]}]
    if calls is not None and calls != []:  # an empty list: no calls
        message["tool_calls"] = _tool_calls(calls, where)
    if role == "assistant" and content is None:
        if "tool_calls" not in message:
            raise ValueError(f"{where}: the {written!r} turn has neither {content_field!r} nor 'tool_calls' "
                             f"({content_field!r} is {'null' if content_field in turn else 'absent'}): nothing to "
                             "learn there; give its reply or its tool calls.")
        if content_field in turn:
            message["content"] = None
        return message
    if isinstance(content, list):
        content = _text_parts(content, where, written, content_field)
    if not isinstance(content, str):
        shown = _kind(content) if content_field in turn else "nothing"
        raise ValueError(f"{where}: the {written!r} turn's {content_field!r} must be a string, got {shown}.")
    message["content"] = content
    if role == "tool":
        message.update({k: turn[k] for k in ("name", "tool_call_id") if k in turn})
    return message


def _text_parts(parts: list, where: str, written: str, content_field: str) -> str:
    """The texts of OpenAI content parts ``[{"type": "text", "text": str}, ...]`` joined; ``ValueError`` naming the
    part for any other part (text-only fine-tuning)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        if isinstance(part, dict) and isinstance(kind, str) and kind != "text":
            raise ValueError(f"{where}: the {written!r} turn's {content_field!r} part {j} has type {kind!r}: "
                             "text-only fine-tuning: only {'type': 'text', 'text': ...} parts are read; leave the "
                             "other parts (images, audio, files) out, or the record.")
        raise ValueError(f"{where}: the {written!r} turn's {content_field!r} part {j} must be "
                         f"{{'type': 'text', 'text': str}}, got {_kind(part)}"
                         f"{'' if not isinstance(part, dict) else ' with keys ' + str(sorted(part))}.")
    return "".join(texts)


def _tools(tools, where: str) -> tuple[dict, ...]:
    """A record's ``tools`` (absent or null: none) as a tuple of objects; a JSON string holding the list (as
    LLaMA-Factory and xlam data give it) is read. ``ValueError`` naming ``where`` otherwise."""
    if tools is None:
        return ()
    given = tools
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError:
            pass
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        bad = next((f"item {i} is {_kind(t)}" for i, t in enumerate(tools) if not isinstance(t, dict)), "") \
            if isinstance(tools, list) else f"got {_kind(given)}"
        raise ValueError(f"{where}: 'tools' must be a list of objects (function specs such as {{'type': 'function', "
                         f"'function': {{'name': ..., 'parameters': ...}}}}, or a JSON string of one); {bad}.")
    return tuple(tools)


def _tool_calls(calls, where: str) -> list:
    """An assistant turn's ``tool_calls`` as given, checked: a non-empty list of objects, each naming its function
    (``{"function": {"name": str, ...}}`` or the flat ``{"name": str, ...}``); ``ValueError`` naming the call."""
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}: the 'assistant' turn's 'tool_calls' must be a list of calls ({{'type': "
                         f"'function', 'function': {{'name': ..., 'arguments': ...}}}}), got {_kind(calls)}.")
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
            raise ValueError(f"{where}: the 'assistant' turn's tool_calls[{j}] has no function name: expected "
                             "{'type': 'function', 'function': {'name': str, 'arguments': ...}}, got "
                             f"{_shown(json.dumps(call))}.")
    return calls


def _sharegpt_calls(value, where: str, content_field: str) -> list:
    """The ``tool_calls`` of a ShareGPT ``function_call`` turn: its value is the JSON of ``{"name", "arguments"}``
    (or a list of them); ``ValueError`` naming ``where`` otherwise."""
    try:
        calls = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError:
        calls = None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise ValueError(f"{where}: the 'function_call' turn's {content_field!r} must be the JSON of "
                         "{\"name\": ..., \"arguments\": ...} (or a list of them), got "
                         f"{_shown(value) if isinstance(value, str) else _kind(value)}.")
    return _tool_calls([{"type": "function", "function": call} for call in calls], where)


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

    def render(self, messages, add_generation_prompt: bool = False, tools=()) -> str:
        """The text of ``messages`` (the message dicts of a :class:`ChatDocument`) under the template, with
        ``tools`` (function specs; empty: none) given to it as ``tools=``."""
        chat = [dict(message) for message in messages]
        tools = [dict(tool) for tool in tools] or None
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.tokenizer.apply_chat_template(
                chat, tools=tools, chat_template=self.text, tokenize=False, add_generation_prompt=add_generation_prompt)
        if self._compiled is None:
            self._compiled = _environment().from_string(self.text)
        return self._compiled.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, doc: ChatDocument) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the whole conversation rendered, and the ``[start, end)`` character span of each
        assistant turn in it (its content or tool calls, and the end-of-turn marker after it), found by rendering
        prefixes. ``ValueError`` naming ``doc.where`` when the template fails on the conversation, renders a prefix
        of it as text that is not the start of the whole (see the module docstring), leaves out a tool call (its name
        is not in the turn's text) or the tools (the text is the same without them)."""
        full = self._render_checked(doc, doc.messages, False)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(doc.messages):
            if message["role"] != "assistant":
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
            self._check_calls_rendered(doc, i, stop[len(start):])
            spans.append((len(start), len(stop)))
        if doc.tools and self._render_checked(doc, doc.messages, False, tools=()) == full:
            raise ValueError(f"{doc.where}: {self.source} leaves out the record's 'tools' (its text is the same "
                             "without them): it is not written for function calling; give --data.chat_template a "
                             "template that renders tools (as Qwen2.5, Llama-3.1 or Hermes templates do).")
        return full, spans

    def _check_calls_rendered(self, doc: ChatDocument, i: int, turn: str) -> None:
        """``ValueError`` naming ``doc.where`` when assistant turn ``i``'s rendered text ``turn`` lacks the name of one
        of its tool calls (a template without function calling drops them, or prints ``None`` for the content)."""
        for call in doc.messages[i].get("tool_calls") or ():
            name = _tool_name(call)
            if name not in turn:
                raise ValueError(f"{doc.where}: {self.source} leaves out the tool calls of assistant turn {i} "
                                 f"(0-based; the name {name!r} is not in its text): it is not written for function "
                                 "calling; give --data.chat_template a template that renders 'tool_calls' (as "
                                 "Qwen2.5, Llama-3.1 or Hermes templates do).")

    def _render_checked(self, doc: ChatDocument, messages, add_generation_prompt: bool, tools=None) -> str:
        try:
            return self.render(messages, add_generation_prompt, doc.tools if tools is None else tools)
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

    _PROBE = "lowmem-end-of-turn-probe"
    """The content of the assistant turn rendered to find the end-of-turn marker after a tool-call turn."""

    def generation_prompt(self, doc: ChatDocument) -> tuple[str, list[int], str, str]:
        """``(prompt, ids, reference, end_of_turn)`` for answering ``doc``'s last assistant turn: the turns before it
        rendered with the generation prompt (the assistant-turn header, ``add_generation_prompt=True``), its token
        ids (framed as :meth:`encode` frames a conversation), that turn's content, and the text the template writes
        after an assistant turn's content (its end-of-turn marker, surrounding whitespace stripped; ``""`` when the
        turn's rendering does not start with its content). When that turn makes tool calls, the reference is the
        template's text of the turn (its content and calls, as the model learns to write them) without the
        end-of-turn marker, which is found from the same prompt followed by a plain assistant turn. ``ValueError``
        naming ``doc.where`` as :meth:`assistant_spans`."""
        last = max(i for i, message in enumerate(doc.messages) if message["role"] == "assistant")
        prompt = self._render_checked(doc, doc.messages[:last], True)
        turn = self._render_checked(doc, doc.messages[: last + 1], False)[len(prompt):]
        ids, _ = self._framed(*self._tokenize(prompt, []))
        if not doc.messages[last].get("tool_calls"):
            reference = doc.messages[last]["content"]
            end_of_turn = turn[len(reference):].strip() if turn.startswith(reference) else ""
            return prompt, ids, reference, end_of_turn
        probe = [*doc.messages[:last], {"role": "assistant", "content": self._PROBE}]
        try:
            plain = self.render(probe, False, doc.tools)
        except Exception:  # a template may insist on something about the turn: no marker then
            plain = ""
        after = plain[len(prompt) + len(self._PROBE):] if plain.startswith(prompt + self._PROBE) else ""
        end_of_turn, reference = after.strip(), turn.rstrip()
        if end_of_turn and reference.endswith(end_of_turn):
            reference = reference[: -len(end_of_turn)].rstrip()
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
