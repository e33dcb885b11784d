"""Chat records in ``TextDataModule``: ``{"messages": [{"role", "content"}]}`` and ShareGPT
``{"conversations": [{"from", "value"}]}``, rendered with a chat template (the HF tokenizer's own, a
``chat_template`` given as text or file, or our default), loss on the assistant turns only; record and template
checks naming ``file:line``; the template in the resume fingerprint; and one real ``lowmem fit`` on chat data."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import warnings
from pathlib import Path

import pytest
from lowmem_calls import LOWMEM
from record_files import write_jsonl
from tiny_tokenizers import bpe_tokenizer

from lowmem_lightning.cli import main
from lowmem_lightning.data import ByteTokenizer, HFTokenizer, TextDataModule
from lowmem_lightning.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, chat_record, read_chat_template
from lowmem_lightning.data.documents import Document
from lowmem_lightning.data.encoding import encode_document
from lowmem_lightning.data.reading import read_documents
from lowmem_lightning.data.tokens import IGNORE_INDEX

BYTE = ByteTokenizer()

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in CHAT]

CHATML = (  # Qwen-style ChatML, with TRL's {% generation %} marks so HF computes its own assistant mask
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DROPS_OLD_REASONING = (  # like Qwen3's: earlier assistant turns lose their <think> part once a later turn follows
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _trained_text(ids: list[int], labels: list[int], decode) -> str:
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    return decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer built here (no download), ChatML special tokens, saved with the ChatML template."""
    path = tmp_path_factory.mktemp("tok") / "chatml"
    bpe_tokenizer(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>",
                  "Hello there! Be brief. What is 2+2? It is 4. system user assistant", chat_template=CHATML)
    return path


def test_default_template_trains_every_assistant_turn_and_nothing_else():
    """Byte tokenizer, default template: bos, then the rendered turns; labels are the ids exactly on each
    assistant turn's content + ``<|end|>\\n`` (both turns of the conversation), -100 on bos, system and user."""
    doc = chat_record({"messages": CHAT}, "chat.jsonl:1")
    ids, labels = encode_document(doc, BYTE)
    text = ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
            "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n")
    assert ids == [BYTE.bos_token_id, *text.encode()]
    targets = set()
    for turn in ("Hello!<|end|>\n", "4<|end|>\n"):
        start = 1 + text.index("<|assistant|>\n" + turn) + len("<|assistant|>\n")
        targets |= set(range(start, start + len(turn)))
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == sorted(targets)
    assert _trained_text(ids, labels, BYTE.decode) == "Hello!<|end|>\n4<|end|>\n"


def test_sharegpt_form_is_the_same_conversation():
    messages = encode_document(chat_record({"messages": CHAT}, "a:1"), BYTE)
    sharegpt = encode_document(chat_record({"conversations": SHAREGPT}, "a:2"), BYTE)
    assert sharegpt == messages


def test_hf_template_ids_are_apply_chat_template_and_mask_is_hfs_assistant_mask(chatml_tokenizer):
    """A local HF tokenizer with a ChatML template: the ids are what ``apply_chat_template`` gives, and the trained
    tokens are exactly HF's own ``assistant_masks`` (from the template's ``{% generation %}`` marks)."""
    tok = HFTokenizer(chatml_tokenizer)
    ids, labels = encode_document(chat_record({"messages": CHAT}, "a:1"), tok, ChatTemplate(tok))
    ref = tok.tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"])
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in ref["assistant_masks"]]
    assert _trained_text(ids, labels, tok.decode) == "Hello!\n4\n"  # <|im_end|> is special: not decoded
    assert _trained_text(ids, labels, lambda i: tok.decode(i, skip_special_tokens=False)) == (
        "Hello!<|im_end|>\n4<|im_end|>\n")


def test_byte_tokenizer_renders_a_template_as_transformers_does(chatml_tokenizer):
    """Our Jinja environment (byte tokenizer) renders a template with ``{% generation %}`` marks to the same text as
    transformers' ``apply_chat_template``; the loss covers the same assistant text."""
    hf = HFTokenizer(chatml_tokenizer)
    doc = chat_record({"messages": CHAT}, "a:1")
    ours = ChatTemplate(BYTE, read_chat_template(CHATML))
    for n, prompt in ((5, False), (3, False), (4, True)):
        assert ours.render(doc.messages[:n], prompt) == hf.tokenizer.apply_chat_template(
            CHAT[:n], tokenize=False, add_generation_prompt=prompt)
    ids, trained = ours.encode(doc)
    assert ids[0] == BYTE.bos_token_id
    assert BYTE.decode([i for i, keep in zip(ids, trained) if keep]) == "Hello!<|im_end|>\n4<|im_end|>\n"


def test_data_module_with_chat_data_pickles_for_spawned_ranks(tmp_path):
    """ddp_spawn pickles the set-up data module: the compiled template is left out and compiled again."""
    import pickle

    dm = TextDataModule(str(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)), seq_len=64)
    dm.setup()
    copy = pickle.loads(pickle.dumps(dm))
    doc = chat_record({"messages": CHAT}, "a:1")
    assert copy.chat.encode(doc) == dm.chat.encode(doc)


def test_chat_template_argument_overrides_the_tokenizers_and_reads_files(tmp_path, chatml_tokenizer):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)

    def trained(**kwargs) -> str:
        dm = TextDataModule(str(tmp_path / "chat.jsonl"), tokenizer=str(chatml_tokenizer), seq_len=512,
                            val_fraction=0.0, **kwargs)
        dm.setup()
        ids, labels = dm.train_dataset.blocks["input_ids"][0], dm.train_dataset.blocks["labels"][0]
        return dm.tokenizer.decode(ids[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)

    chatml = "Hello!<|im_end|>\n4<|im_end|>\n" * 4
    assert trained() == chatml
    plain = "Hello!<|end|>\n4<|end|>\n" * 4
    assert trained(chat_template=DEFAULT_CHAT_TEMPLATE) == plain
    (tmp_path / "plain.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    assert trained(chat_template=str(tmp_path / "plain.jinja")) == plain


def test_hf_tokenizer_default_template_adds_bos_its_own_template_decides(tmp_path, chatml_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chatml_tokenizer)
    tok.chat_template = None
    tok.add_special_tokens({"bos_token": "<|endoftext|>"})
    tok.save_pretrained(tmp_path / "plain")
    hf = HFTokenizer(tmp_path / "plain")
    chat = ChatTemplate(hf)
    assert chat.text == DEFAULT_CHAT_TEMPLATE and "default" in chat.source
    ids, trained = chat.encode(chat_record({"messages": CHAT}, "a:1"))
    assert ids[0] == hf.bos_token_id and not trained[0]
    assert hf.decode(ids[1:]) == chat.render(chat_record({"messages": CHAT}, "a:1").messages)
    tok.chat_template = CHATML  # the same tokenizer with its own template: the template decides, no bos added
    tok.save_pretrained(tmp_path / "own")
    own = HFTokenizer(tmp_path / "own")
    ids, _ = ChatTemplate(own).encode(chat_record({"messages": CHAT}, "a:1"))
    assert ids == list(own.tokenizer.apply_chat_template(CHAT, return_dict=True)["input_ids"])
    assert own.bos_token_id is not None and ids[0] != own.bos_token_id


def test_mixed_file_keeps_the_other_record_kinds_as_they_were(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "plain"}, {"instruction": "Greet.", "output": "hi"},
        {"messages": CHAT}, {"conversations": SHAREGPT},
    ])
    plain, instruction, chat, sharegpt = read_documents([path])
    assert plain == Document("", "plain") and isinstance(instruction, Document)
    assert chat.where == f"{path}:3" and sharegpt.messages == chat.messages
    dm = TextDataModule(str(path), seq_len=1024, val_fraction=0.0, pack=True)  # all in one block
    dm.setup()
    expected = [t for d in (plain, instruction, chat, sharegpt) for t in encode_document(d, BYTE)[1]]
    assert dm.train_dataset.blocks["labels"].flatten()[: len(expected)].tolist() == expected


def test_template_that_rerenders_earlier_turns_is_refused_naming_the_record(tmp_path):
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>easy</think>2"},
             {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "<think>sum</think>4"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns[:2]}, {"messages": turns}])
    dm = TextDataModule(str(path), seq_len=64, val_fraction=0.0, chat_template=DROPS_OLD_REASONING)
    with pytest.raises(ValueError, match=r"chat.jsonl:2: chat_template=.*does not render this conversation prefix "
                                         r"by prefix.*--data.chat_template.*one record per assistant turn"):
        dm.setup()
    # the single-turn record alone renders prefix by prefix: nothing to refuse
    write_jsonl(path, [{"messages": turns[:2]}] * 4)
    TextDataModule(str(path), seq_len=64, val_fraction=0.0, chat_template=DROPS_OLD_REASONING).setup()


@pytest.mark.parametrize(("record", "match"), [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
     r"messages\[1\]: role='bot'; expected one of 'system', 'user', 'assistant'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "model", "value": "yo"}]},
     r"conversations\[1\]: from='model'; expected one of 'system', 'human', 'gpt'"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, r"messages\[0\]: no 'role'"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, r"messages\[0\]: role=\['user'\]; expected one of"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},
     r"messages\[0\]: the 'user' turn's 'content' must be a string, got nothing"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ["y", "o"]}]},
     r"conversations\[1\]: the 'gpt' turn's 'value' part 0 must be \{'type': 'text', 'text': str\}, got a string"),
    ({"messages": []}, r"'messages' must be a non-empty list of turns, got an empty list"),
    ({"messages": "hi"}, r"'messages' must be a non-empty list of turns, got a string"),
    ({"messages": ["hi"]}, r"messages\[0\]: expected an object with 'role' and 'content', got a string"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     r"no assistant turn \(role 'assistant'\) in 'messages': nothing to learn"),
    ({"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]},
     r"messages\[0\] is an assistant turn, with nothing before it to answer"),
])
def test_bad_chat_record_is_named_file_line(tmp_path, record, match):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, record])
    with pytest.raises(ValueError, match=rf"chat.jsonl:2: {match}"):
        TextDataModule(str(path), seq_len=32).check_inputs()


@pytest.mark.parametrize(("value", "match"), [
    ("bogus", r"chat_template='bogus': neither a Jinja template .* nor the path of a .jinja, .j2, .txt file"),
    ("missing.jinja", r"chat_template='missing.jinja': no such file"),
    ("{% for m in messages %}{{ m.content }", r"chat_template='\{% for m .*not a valid Jinja template"),
    ("@empty.txt", r"chat_template='.*: .*empty.txt holds no Jinja template"),
    ("", r"chat_template='': expected a Jinja chat template or the path"),
    (3, r"chat_template=3: expected a Jinja chat template"),
])
def test_bad_chat_template_is_refused_in_the_constructor(tmp_path, value, match):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    if value == "@empty.txt":
        (tmp_path / "empty.txt").write_text("no template here")
        value = str(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match=match):
        TextDataModule(str(tmp_path / "chat.jsonl"), chat_template=value)


def test_template_error_on_a_record_is_named(tmp_path):
    strict = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}" \
             "{{ m.content }}{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT[1:]}, {"messages": CHAT}])
    with pytest.raises(ValueError, match=r"chat.jsonl:2: chat_template=.* failed on this conversation: "
                                         r"TemplateError: no system role"):
        TextDataModule(str(path), seq_len=32, val_fraction=0.0, chat_template=strict).check_inputs()


def test_replies_cut_into_position_zero_leave_no_target_and_are_refused(tmp_path):
    """pack=False, seq_len 16: bos + a 15-character user turn fill the first block, so the one-character reply is
    at position 0 of the second block, where a causal LM never predicts it: the existing no-target check refuses."""
    bare = "{% for m in messages %}{{ m.content }}{% endfor %}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q" * 15},
                                                          {"role": "assistant", "content": "a"}]}] * 20)
    dm = TextDataModule(str(path), seq_len=16, pack=False, chat_template=bare)
    with pytest.raises(ValueError, match=r"No trainable label .*seq_len=16, pack=False"):
        dm.check_inputs()
    longer = TextDataModule(str(path), seq_len=17, pack=False, chat_template=bare)
    longer.check_inputs()  # one more token of room: the reply is a target
    assert (longer.train_dataset.blocks["labels"] == ord("a")).sum() == len(longer.train_dataset)


def test_resume_with_another_chat_template_is_noticed(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 8)
    dm = TextDataModule(str(path), seq_len=64)
    dm.setup()
    state = dm.state_dict()
    assert state["chat_template"]["source"].startswith("the default chat template")

    def said(**kwargs) -> str:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            TextDataModule(str(path), seq_len=64, **kwargs).load_state_dict(state)
        return "\n".join(str(w.message) for w in caught if "data changed" in str(w.message))

    assert said() == "" and said(chat_template=DEFAULT_CHAT_TEMPLATE) == ""  # same text, however given
    changed = said(chat_template=CHATML)
    assert "chat_template: the default chat template" in changed and '-> chat_template="{% for' in changed
    text_only = TextDataModule(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 99}])), seq_len=16)
    text_only.setup()
    assert "chat_template" not in text_only.state_dict()  # a template that renders nothing is not part of the data


def test_lowmem_fit_refuses_a_bad_chat_record_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user", "content": 1}]}])
    code = main(["fit", "--config", "tiny.yaml", "--data.data_path", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not (tmp_path / "runs").exists()
    message = "chat.jsonl:2: messages[0]: the 'user' turn's 'content' must be a string, got int."
    assert err.splitlines()[0].endswith(message)


def test_lowmem_fit_trains_on_chat_data(tmp_path):
    """The tiny recipe on a chat JSONL (both forms, multi-turn, system prompts), byte tokenizer, no download:
    3 steps, then validation; the run ends 0 and its val loss is finite."""
    records = []
    for i in range(60):
        a, b = i % 7, i % 11
        records.append({"messages": [{"role": "system", "content": "You add."},
                                     {"role": "user", "content": f"{a} + {b}?"},
                                     {"role": "assistant", "content": str(a + b)},
                                     {"role": "user", "content": "Twice that?"},
                                     {"role": "assistant", "content": str(2 * (a + b))}]})
        records.append({"conversations": [{"from": "human", "value": f"Add {a} and {b}."},
                                          {"from": "gpt", "value": f"It is {a + b}."}]})
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    proc = subprocess.run(
        [LOWMEM, "fit", "--config", "tiny.yaml", "--data.data_path", str(path), "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.callbacks.plot", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [metrics] = (tmp_path / "runs").rglob("metrics.csv")
    val = [float(row["val_loss"]) for row in csv.DictReader(metrics.open()) if row.get("val_loss")]
    assert len(val) == 1 and math.isfinite(val[0]) and 0 < val[0] < 2 * math.log(259), val
