"""``record_fields``: data sets whose records name their fields in their own way train without a conversion step.
Dolly's ``{instruction, context, response}``, GSM8K's ``{question, answer}``, MetaMathQA's ``{query, response}``
were refused ("found keys [...]") and had to be rewritten to ``instruction`` / ``input`` / ``output``; now
``record_fields`` maps our keys to theirs, and the refusal of such a record names the mapping that reads it."""

from __future__ import annotations

import json

import pytest
from lowmem_calls import lowmem_in_process
from record_files import write_jsonl

from lowmem_lightning.data import TextDataModule
from lowmem_lightning.data.chat import ChatDocument
from lowmem_lightning.data.reading import read_documents

DOLLY = [{"instruction": f"Name a color of {thing}.", "context": f"{thing} is {color}." if i % 2 else "",
          "response": color, "category": "open_qa"}
         for i, (thing, color) in enumerate([("grass", "green"), ("sky", "blue"), ("snow", "white"),
                                             ("coal", "black"), ("blood", "red"), ("gold", "yellow")] * 10)]
OURS = [{"instruction": r["instruction"], "input": r["context"], "output": r["response"]} for r in DOLLY]
GSM8K = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(40)]


def test_dolly_mapped_reads_as_the_same_records_in_our_keys(tmp_path):
    mapped = read_documents([write_jsonl(tmp_path / "dolly.jsonl", DOLLY)],
                            record_fields={"input": "context", "output": "response"})
    assert mapped == read_documents([write_jsonl(tmp_path / "ours.jsonl", OURS)])
    assert "### Input:\ngrass is" not in mapped[0].prompt and "### Input:\nsky is blue." in mapped[1].prompt


def test_an_unread_record_is_refused_with_the_mapping_that_reads_it(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    with pytest.raises(ValueError) as info:
        read_documents([path])
    message = str(info.value)
    assert message.startswith(f"{path}:1: expected a string field 'text'") and "found keys ['answer', 'question']" \
        in message
    assert ('map them: record_fields: {"instruction": "question", "output": "answer"} (--data.record_fields '
            '\'{"instruction": "question", "output": "answer"}\')') in message
    docs = read_documents([path], record_fields={"instruction": "question", "output": "answer"})
    assert docs[3].completion == GSM8K[3]["answer"] and "What is 3 + 3?" in docs[3].prompt
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "x", "context": "y", "response": "z"}])
    with pytest.raises(ValueError, match=r'record_fields: \{"input": "context", "output": "response"\}'):
        read_documents([dolly])
    with pytest.raises(ValueError, match=r"found keys \['context', 'instruction', 'response'\] \(after "
                                         r"record_fields=\{'output': 'answer'\}\)"):
        read_documents([dolly], record_fields={"output": "answer"})


_USER, _YES, _NO = ({"role": "user", "content": "Is snow white?"}, {"role": "assistant", "content": "Yes."},
                    {"role": "assistant", "content": "No."})


@pytest.mark.parametrize("record, fields, prompt, completion", [
    ({"prompt": "Is snow white? ", "chosen": "Yes.", "rejected": "No."}, {"completion": "chosen"}, "Is snow white? ",
     "Yes."),
    ({"chosen": "Is snow white? Yes.", "rejected": "Is snow white? No."}, {"text": "chosen"}, "",
     "Is snow white? Yes."),
    ({"prompt": [_USER], "chosen": [_YES], "rejected": [_NO]}, {"completion": "chosen"}, None, [_USER, _YES]),
    ({"chosen": [_USER, _YES], "rejected": [_USER, _NO]}, {"messages": "chosen"}, None, [_USER, _YES]),
], ids=["prompt-strings", "implicit-prompt-strings", "prompt-conversation", "implicit-prompt-conversation"])
def test_a_preference_record_is_refused_with_the_mapping_that_trains_on_its_chosen_answer(record, fields, prompt,
                                                                                          completion, tmp_path):
    """TRL's four preference forms (DPO data sets: UltraFeedback binarized, HH-RLHF) were refused with "found keys
    ['chosen', 'prompt', 'rejected']" and no way on; the refusal now says what they are and names the
    ``record_fields`` that fine-tunes on the chosen answers, which then read as a prompt and its chosen completion."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [record] * 3)
    with pytest.raises(ValueError) as info:
        read_documents([path])
    mapping = json.dumps(fields)
    assert (f"It is a preference record (chosen/rejected, for DPO): this module fine-tunes on answers, not on "
            f"preferences; to train on the chosen ones, map them: record_fields: {mapping} "
            f"(--data.record_fields '{mapping}').") in str(info.value)
    doc = read_documents([path], record_fields=fields)[0]
    if prompt is None:
        assert isinstance(doc, ChatDocument) and list(doc.messages) == completion
    else:
        assert (doc.prompt, doc.completion) == (prompt, completion)


@pytest.mark.parametrize("label", [True, False])
def test_an_unpaired_preference_record_is_refused_not_trained_on_whatever_its_label(label, tmp_path):
    """TRL's unpaired preference form (KTO: ``prompt``, ``completion``, boolean ``label``) read as prompt-completion
    records and trained on the completions labelled false as on the good ones, silently. It is refused, with the
    filter that keeps the good ones; a ``label`` that is not a boolean (a class name, say) is another field."""
    records = [{"prompt": "Is snow white? ", "completion": "Yes.", "label": True},
               {"prompt": "Is snow white? ", "completion": "No.", "label": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", records if label else records[::-1])
    with pytest.raises(ValueError, match=r"kto.jsonl:1: a boolean 'label' beside 'prompt' and 'completion' makes an "
                                         r"unpaired preference record \(for KTO\): .* labelled false too\. Keep the "
                                         r"records labelled true, without the key: jq -c 'select\(\.label == true\) "
                                         r"\| del\(\.label\)'\."):
        read_documents([path])
    kept = write_jsonl(tmp_path / "kept.jsonl", [{"prompt": "Is snow white? ", "completion": "Yes."}])
    named = write_jsonl(tmp_path / "named.jsonl", [{"prompt": "Is snow white? ", "completion": "Yes.",
                                                    "label": "weather"}])
    assert read_documents([kept]) == read_documents([named])


def test_a_conversation_key_maps_too(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]}])
    [doc] = read_documents([path], record_fields={"messages": "dialog"})
    assert isinstance(doc, ChatDocument) and doc.messages[1]["content"] == "hello"


@pytest.mark.parametrize("value, expected", [
    ({"answer": "output"}, "'answer' is not a record key this module reads; the keys: text, instruction"),
    ({"instruction": "q", "input": "q"}, "two of its keys name the same key of the data"),
    (["instruction", "question"], "expected a mapping of this module's record keys to the data's own"),
    ({"instruction": ""}, "expected a mapping"),
])
def test_bad_record_fields_are_refused_before_reading(value, expected, tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    with pytest.raises(ValueError, match=rf"Invalid record_fields=.*{expected}"):
        TextDataModule(str(path), record_fields=value)


def test_the_mapping_keys_the_token_cache_and_the_checkpoints_settings(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    fields = {"input": "context", "output": "response"}
    data = TextDataModule(str(path), seq_len=64, batch_size=2, record_fields=fields, cache_dir=False)
    data.setup("fit")
    assert data.state_dict()["settings"]["record_fields"] == fields and data._cache_key()["record_fields"] == fields
    plain = TextDataModule(str(write_jsonl(tmp_path / "ours.jsonl", OURS)), seq_len=64, batch_size=2, cache_dir=False)
    assert "record_fields" not in plain._cache_key()


def test_lowmem_fit_with_record_fields_and_the_refusal_without(tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    small = ["--config", "tiny.yaml", "--data.data_path", str(path), "--trainer.max_steps", "2",
             "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--data.init_args.seq_len", "64",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.callbacks.init_args.plot", "false"]
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", *small)
    assert proc.returncode == 2 and "--data.record_fields '{\"instruction\": \"question\"" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", *small, "--data.record_fields",
                             '{"instruction": "question", "output": "answer"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_loss" in next((tmp_path / "runs").rglob("metrics.csv")).read_text()


@pytest.mark.parametrize("record", [
    {"prompt": "What is 2 + 2?"},  # TRL's standard prompt-only form
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}]},  # its conversational one
])
def test_a_prompt_only_record_is_said_to_lack_the_answer(record, tmp_path):
    """TRL's prompt-only form (GRPO and other online training, where the model writes the answers): the refusal says
    the record has no answer to fine-tune on, beside the keys it found."""
    path = write_jsonl(tmp_path / "grpo.jsonl", [record])
    with pytest.raises(ValueError, match=r"grpo.jsonl:1: expected .* found keys \[.*'prompt'.*\]\. It holds a prompt "
                                         r"and no answer \(TRL's prompt-only form, for GRPO .*\): fine-tuning needs "
                                         r"the answer to train on; give each record its 'completion'\.$"):
        read_documents([path])


def test_a_prompt_beside_an_answer_is_not_told_it_lacks_one(tmp_path):
    """A string prompt beside a ``solution`` is offered the mapping that reads it; a conversation beside one (a GRPO
    set's reward field) gets the plain refusal, not "no answer"."""
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "What is 2 + 2?", "solution": "4"}])
    with pytest.raises(ValueError) as caught:
        read_documents([path])
    assert "no answer" not in str(caught.value)
    assert """record_fields: {"instruction": "prompt", "output": "solution"}""" in str(caught.value)
    path = write_jsonl(tmp_path / "grpo.jsonl", [{"prompt": [{"role": "user", "content": "2 + 2?"}], "solution": "4"}])
    with pytest.raises(ValueError, match=r"found keys \['prompt', 'solution'\]\.$"):
        read_documents([path])
