"""Chat records as fine-tuning data sets give them now: OpenAI content parts (text parts joined, other parts refused)
and function calling (a top-level ``tools`` list, assistant ``tool_calls``, ``tool`` results; ShareGPT's
``function_call`` / ``observation`` turns): rendered by our default template and by a Qwen2.5/Hermes-shaped one, the
loss on the assistant turns and tool calls only, the refusals named ``file:line``, the token cache and predict's
prompts on such records, and one real ``lowmem fit``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from lowmem_calls import lowmem_in_process
from record_files import write_jsonl
from tiny_tokenizers import bpe_tokenizer

from lowmem_lightning.data import ByteTokenizer, HFTokenizer, TextDataModule, text, token_cache
from lowmem_lightning.data.chat import ChatTemplate, chat_record, read_chat_template
from lowmem_lightning.data.encoding import encode_document
from lowmem_lightning.data.reading import read_documents
from lowmem_lightning.data.tokens import IGNORE_INDEX

BYTE = ByteTokenizer()

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]

TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "rain"},
    {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "sun"},
    {"role": "assistant", "content": "Oslo: rain. Rome: sun."},
]

# Written here after the shape of the Qwen2.5 / Hermes templates: tools in the system block inside <tools>, each call
# a <tool_call> JSON (string arguments written as they are), consecutive tool results grouped in one user turn (a
# look-ahead at the next message), and TRL's {% generation %} marks so HF computes its own assistant mask.
HERMES = (
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\n<tools>' }}{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{% elif messages[0].role == 'system' %}{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% elif message.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    "{% set call = call.function if call.function is defined else call %}"
    "{% if message.content or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}"
    "{% if call.arguments is string %}{{ call.arguments }}{% else %}{{ call.arguments | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endgeneration %}"
    "{% elif message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _trained(ids, trained, decode) -> str:
    return decode([i for i, keep in zip(ids, trained) if keep])


@pytest.fixture(scope="module")
def hermes_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer built here (no download) with ChatML special tokens and the HERMES template."""
    path = tmp_path_factory.mktemp("tok") / "hermes"
    bpe_tokenizer(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>",
                  "Weather in Oslo and Rome? rain sun get_weather city tool_call tool_response tools system user "
                  "assistant Be brief.", chat_template=HERMES)
    return path


def test_default_template_renders_tools_calls_and_results_and_trains_the_assistant_turns_only():
    ids, labels = encode_document(chat_record({"messages": TOOL_CHAT, "tools": TOOLS}, "t.jsonl:1"), BYTE)
    text = ("<|tools|>\n" + json.dumps(TOOLS[0]) + "\n<|end|>\n<|system|>\nBe brief.<|end|>\n"
            "<|user|>\nWeather in Oslo and Rome?<|end|>\n<|assistant|>\n"
            '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Rome"}}\n<|end|>\n'
            "<|tool|>\nrain<|end|>\n<|tool|>\nsun<|end|>\n<|assistant|>\nOslo: rain. Rome: sun.<|end|>\n")
    assert ids == [BYTE.bos_token_id, *text.encode()]
    trained = [label != IGNORE_INDEX for label in labels]
    assert _trained(ids, trained, BYTE.decode) == (
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Rome"}}\n<|end|>\n'
        "Oslo: rain. Rome: sun.<|end|>\n")


def test_hf_template_with_tools_ids_are_apply_chat_template_and_mask_is_hfs_assistant_mask(hermes_tokenizer):
    """A tools-aware HF template (Qwen2.5/Hermes-shaped): the ids are ``apply_chat_template(..., tools=TOOLS)``, the
    trained tokens HF's own ``assistant_masks``: both assistant turns (the tool calls and the reply), no tool
    result, no tools list."""
    tok = HFTokenizer(hermes_tokenizer)
    doc = chat_record({"messages": TOOL_CHAT, "tools": TOOLS}, "t.jsonl:1")
    ids, trained = ChatTemplate(tok).encode(doc)
    ref = tok.tokenizer.apply_chat_template(TOOL_CHAT, tools=TOOLS, return_dict=True,
                                            return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"])
    assert trained == [bool(m) for m in ref["assistant_masks"]]
    learned = _trained(ids, trained, lambda i: tok.decode(i, skip_special_tokens=False))
    assert learned == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
                       "Oslo: rain. Rome: sun.<|im_end|>\n")
    # the byte tokenizer renders the same template to the same text through our Jinja environment
    ours = ChatTemplate(BYTE, read_chat_template(HERMES))
    assert ours.render(doc.messages, False, doc.tools) == tok.tokenizer.apply_chat_template(
        TOOL_CHAT, tools=TOOLS, tokenize=False)
    assert BYTE.decode([i for i, keep in zip(*ours.encode(doc)) if keep]) == learned


def test_content_parts_read_as_their_joined_text():
    def parts(text):
        return [{"type": "text", "text": text[:3]}, {"type": "text", "text": text[3:]}]

    plain = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, you."}]
    with_parts = [{"role": m["role"], "content": parts(m["content"])} for m in plain]
    doc = chat_record({"messages": with_parts}, "p.jsonl:1")
    assert doc.messages == chat_record({"messages": plain}, "p.jsonl:2").messages
    assert encode_document(doc, BYTE) == encode_document(chat_record({"messages": plain}, "a:1"), BYTE)
    sharegpt = chat_record({"conversations": [{"from": "human", "value": parts("Hello there")},
                                              {"from": "gpt", "value": "Hi, you."}]}, "p.jsonl:3")
    assert sharegpt.messages == doc.messages


def test_sharegpt_function_call_and_observation_are_the_messages_form():
    """LLaMA-Factory's ShareGPT function calling: a ``function_call`` turn (the JSON of the call) is an assistant
    turn with ``tool_calls``, ``observation`` a tool result, ``tools`` a JSON string: the same tokens as the
    OpenAI form."""
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    sharegpt = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "Weather in Oslo?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "rain"}, {"from": "gpt", "value": "Rain."}]}
    messages = {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}]}
    assert encode_document(chat_record(sharegpt, "s:1"), BYTE) == encode_document(chat_record(messages, "m:1"), BYTE)


def test_openai_legacy_function_calling_is_the_tools_form():
    """OpenAI's fine-tuning format before ``tools``: a top-level ``functions`` list, an assistant ``function_call``
    (arguments a JSON string) and a ``function`` role for the result read as the ``tools`` / ``tool_calls`` / ``tool``
    form: the same tokens (before: ``role='function'`` was refused)."""
    call = {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}
    legacy = {"functions": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_weather", "content": "rain"}, {"role": "assistant", "content": "Rain."}]}
    current = {"tools": [TOOLS[0]["function"]], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "name": "get_weather", "content": "rain"}, {"role": "assistant", "content": "Rain."}]}
    doc = chat_record(legacy, "l:1")
    assert doc.messages == chat_record(current, "c:1").messages and doc.tools == (TOOLS[0]["function"],)
    assert encode_document(doc, BYTE) == encode_document(chat_record(current, "c:1"), BYTE)
    with pytest.raises(ValueError, match=r"l:1: messages\[1\] is a tool result \(role 'function'\) with no tool call"):
        chat_record({"messages": [legacy["messages"][0], legacy["messages"][2], legacy["messages"][3]]}, "l:1")


def test_conversational_prompt_completion_record_keeps_its_tools(tmp_path):
    """TRL's conversational prompt-completion form with a ``tools`` column: the same conversation and tools as the
    messages form, trained on the completion's tool call."""
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    prompt, completion = [{"role": "user", "content": "Oslo?"}], [{"role": "assistant", "tool_calls": call}]
    (doc,) = read_documents([write_jsonl(tmp_path / "pc.jsonl",
                                    [{"prompt": prompt, "completion": completion, "tools": TOOLS}])])
    assert doc == chat_record({"messages": prompt + completion, "tools": TOOLS}, doc.where)
    assert doc.tools == tuple(TOOLS)


def test_data_module_reads_tool_and_parts_records_with_either_tokenizer(tmp_path, hermes_tokenizer):
    """``check_inputs`` on a file mixing function-calling records (JSON-string arguments, content beside calls) and
    content-part records, with the byte tokenizer (default template) and the HF tokenizer (its tools template): the
    trained tokens are the assistant turns of every record."""
    records = [{"messages": TOOL_CHAT, "tools": TOOLS},
               {"messages": [{"role": "user", "content": [{"type": "text", "text": "Rome?"}]},
                             {"role": "assistant", "content": "Checking.",
                              "tool_calls": [{"type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
                             {"role": "tool", "content": "sun"},
                             {"role": "assistant", "content": [{"type": "text", "text": "Sun."}]}],
                "tools": TOOLS}] * 4
    path = write_jsonl(tmp_path / "tools.jsonl", records)
    for tokenizer, end in (("byte", "<|end|>\n"), (str(hermes_tokenizer), "<|im_end|>\n")):
        dm = TextDataModule(str(path), tokenizer=tokenizer, seq_len=2048, val_fraction=0.0, cache_dir=False)
        dm.check_inputs()
        ids, labels = dm.train_dataset.blocks["input_ids"].flatten(), dm.train_dataset.blocks["labels"].flatten()
        trained = dm.tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
        assert trained.count("get_weather") == 12 and trained.count("Sun." + end) == 4, trained
        assert "rain" not in trained.replace("Oslo: rain", "") and "sun" not in trained.replace("Rome: sun", "")
        assert "description" not in trained  # the tools list is not trained


BAD = [  # (record, message after "file:2: ")
    ({"messages": TOOL_CHAT, "tools": {"type": "function"}},
     r"'tools' must be a list of objects \(function specs .*\); got an object"),
    ({"messages": TOOL_CHAT, "tools": [TOOLS[0], "get_weather"]},
     r"'tools' must be a list of objects.*item 1 is a string"),
    ({"messages": TOOL_CHAT, "tools": "not json"}, r"'tools' must be a list of objects.*got a string"),
    ({"messages": [TOOL_CHAT[1], {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "arguments": {}}}]}]}, r"messages\[1\]: the 'assistant' turn's tool_calls\[0\] has no function name"),
    ({"messages": [TOOL_CHAT[1], {"role": "assistant", "content": None}]},
     r"messages\[1\]: the 'assistant' turn has neither 'content' nor 'tool_calls' \('content' is null\)"),
    ({"messages": [TOOL_CHAT[1], {"role": "assistant"}]},
     r"messages\[1\]: the 'assistant' turn has neither 'content' nor 'tool_calls' \('content' is absent\)"),
    ({"messages": [TOOL_CHAT[1], {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain."}]},
     r"messages\[1\] is a tool result \(role 'tool'\) with no tool call before it"),
    ({"conversations": [{"from": "human", "value": "Oslo?"}, {"from": "function_call", "value": "get_weather(Oslo)"}]},
     r"conversations\[1\]: the 'function_call' turn's 'value' must be the JSON of \{\"name\": .*got 'get_weather"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                {"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]},
     r"messages\[0\]: the 'user' turn's 'content' part 1 has type 'image_url': text-only fine-tuning"),
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}, {"role": "assistant", "content": "yo"}]},
     r"messages\[0\]: the 'user' turn's 'content' part 0 must be \{'type': 'text', 'text': str\}, got an object"),
]


@pytest.mark.parametrize(("record", "match"), BAD)
def test_bad_tool_or_parts_record_is_named_file_line(tmp_path, record, match):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}, record])
    with pytest.raises(ValueError, match=rf"chat.jsonl:2: {match}"):
        TextDataModule(str(path), seq_len=64, cache_dir=False).check_inputs()


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.name }}{% endfor %}{{ m.content }}"
    "{% endfor %}",
])
def test_template_without_function_calling_is_refused_on_tool_records(tmp_path, template):
    """A template that prints ``None`` for a tool-call turn's content, or renders calls but not the tools list, would
    train on text without the calls or tools: refused, naming the record."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TOOL_CHAT[:2] + [{"role": "assistant", "content": "x"}]},
                                            {"messages": TOOL_CHAT, "tools": TOOLS}])
    dm = TextDataModule(str(path), seq_len=64, val_fraction=0.0, chat_template=template, cache_dir=False)
    with pytest.raises(ValueError, match=r"chat.jsonl:2: chat_template=.* leaves out the (tool calls of assistant "
                                         r"turn 2|record's 'tools').*not written for function calling"):
        dm.check_inputs()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The token cache in ``tmp_path``, where even small data is cached."""
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(token_cache, "CACHE_MIN_BYTES", 0)
    return tmp_path / "cache"


def test_cache_and_predict_prompts_on_tool_records(tmp_path, cache, monkeypatch):
    """pack=False, a quarter held out: a warm start loads the cold build's blocks; predict answers each held-out
    record, a last turn that calls a tool with the template's text of the calls as the reference (no end-of-turn
    marker), and stops at ``<|end|>``."""
    records = []
    for k in range(24):
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{k}"}}}
        records.append({"tools": TOOLS, "messages": [{"role": "user", "content": f"Weather in c{k}?"},
                                                     {"role": "assistant", "tool_calls": [call]}]})
    path = write_jsonl(tmp_path / "calls.jsonl", records)

    def module():
        dm = TextDataModule(str(path), seq_len=512, pack=False, val_fraction=0.25)
        dm.check_inputs()
        return dm

    cold = module()
    assert len(list(cache.glob("*.tokens"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a warm start tokenized")

    monkeypatch.setattr(text, "encode_documents", no_tokenizing)
    warm = module()
    assert warm.train_dataset.blocks["input_ids"].tolist() == cold.train_dataset.blocks["input_ids"].tolist()
    assert warm.answers_records
    answered = warm.answer_prompts().records
    assert answered and warm.predict_stop_sequences == sorted([[BYTE.eos_token_id], list(b"<|end|>")])
    for record in answered:
        city = record.prompt.split("Weather in ")[1].split("?")[0]
        assert record.prompt.endswith(f"Weather in {city}?<|end|>\n<|assistant|>\n")
        assert record.reference == f'<|tool_call|>{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}'


def test_lowmem_fit_trains_on_tool_records(tmp_path, capsys, monkeypatch):
    """The tiny recipe on function-calling records (and content parts), byte tokenizer, 3 steps: exit 0."""
    records = [{"tools": TOOLS, "messages": [
        {"role": "user", "content": [{"type": "text", "text": f"Weather in c{k}?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"c{k}"}}}]},
        {"role": "tool", "content": "sunny", "name": "get_weather"},
        {"role": "assistant", "content": f"It is sunny in c{k}."}]} for k in range(40)]
    path = write_jsonl(tmp_path / "tools.jsonl", records)
    run = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "tiny.yaml", "--data.data_path",
                            str(path), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
                            "--trainer.callbacks.plot", "false", "--trainer.enable_checkpointing", "false",
                            "--trainer.enable_progress_bar", "false")
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize(("record", "match"), BAD)
def test_lowmem_fit_refuses_each_bad_record_with_one_line(tmp_path, capsys, monkeypatch, record, match):
    """Every refusal above: exit 2, the message as the first line of stderr, no traceback, nothing written."""
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": TOOL_CHAT, "tools": TOOLS}, record])
    run = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", "--config", "tiny.yaml", "--data.data_path",
                            str(path))
    assert run.returncode == 2 and "Traceback" not in run.stderr and not (tmp_path / "runs").exists()
    assert re.search(rf"chat.jsonl:2: {match}", run.stderr.splitlines()[0]), run.stderr
