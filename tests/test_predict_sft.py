"""``lowmem predict`` on an instruction or chat fine-tune answers the held-out records: one JSON line per held-out
record, ``{"prompt", "generated", "reference"}``: the record's prompt (the instruction prompt template; the turns before
the last assistant turn rendered with the chat template's generation prompt), the model's greedy reply (stopped at eos
or the template's end-of-turn marker, special tokens skipped) and the record's own reply. A held-out record is one whose
every token lies in held-out blocks, so no training record is a prompt; prompts that leave no room for
``predict_new_tokens`` within ``seq_len`` are skipped and counted in one warning. Each check runs the installed
``lowmem predict`` as a real process on a checkpoint trained here for 3 steps (byte tokenizer for instruction records,
a ChatML tokenizer built here for multi-turn chat records; no download). Plain text keeps ``{"prompt",
"continuation"}`` (tests/test_cli_test_predict.py)."""

from __future__ import annotations

import json
import os
import subprocess

import lightning as L
import pytest
import torch
from lowmem_calls import LOWMEM
from record_files import write_jsonl
from test_data_chat import CHATML
from tiny_tokenizers import bpe_tokenizer

from lowmem_lightning.cli import main, parse_fit_config
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.data.documents import DEFAULT_PROMPT_TEMPLATE_NO_INPUT
from lowmem_lightning.modules.causal_lm import CausalLMModule, StopSequences, cut_at_stop

VAL = "0.25"
NEW_TOKENS = CausalLMModule.predict_new_tokens  # 32: what `lowmem predict` generates at most
BYTE_BOS, BYTE_EOS = 257, 258


def _instruction_records() -> list[dict]:
    """60 distinct instruction records; every 5th has a prompt of 34 + 70 = 104 bytes (bos, template, instruction):
    within seq_len=128 for training, over 128 - 32 = 96 for predict."""
    records = []
    for i in range(60):
        a, b = i % 7, i % 11
        words = f"Task {i:02d}: add {a} and {b}."
        if i % 5 == 0:
            words = f"{words} Reply with the sum only, in digits, and nothing more.".ljust(70, ".")
        records.append({"instruction": words, "output": str(a + b)})
    return records


def _chat_records() -> list[dict]:
    """60 distinct two-exchange conversations with a system prompt (the last assistant turn is the reference)."""
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": f"Hello {i}!"},
                          {"role": "user", "content": f"What is {i % 5}+{i % 3}?"},
                          {"role": "assistant", "content": f"It is {i % 5 + i % 3}."}]}
            for i in range(60)]


def _chatml_tokenizer(path) -> str:
    """A byte-level BPE tokenizer with the ChatML template whose eos (``<|endoftext|>``, id 0) is not the end-of-turn
    marker (``<|im_end|>``, id 1), so predict must stop on the marker itself (nor is either the Llama config's default
    eos, id 2)."""
    bpe_tokenizer(path, ["<|endoftext|>", "<|im_end|>", "<|im_start|>"], "<|endoftext|>",
                  "Hello there! Be brief. What is 2+2? It is 4. Hi system user assistant", chat_template=CHATML)
    return str(path)


def _train(root, args: list[str], steps: int):
    """The tiny recipe with ``args`` trained ``steps`` steps in this process: ``(model, data, checkpoint path)``."""
    cfg = parse_fit_config(["--config", "tiny.yaml", *args])
    torch.manual_seed(0)
    model = CausalLMModule(**cfg.model.init_args.as_dict())
    data = TextDataModule(**cfg.data.init_args.as_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, max_steps=steps, limit_val_batches=0)
    trainer.fit(model, data)
    path = root / "three.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), data, path


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruction")
    args = ["--data.data_path", str(write_jsonl(root / "sft.jsonl", _instruction_records())), "--data.pack", "false",
            "--data.val_fraction", VAL]
    return (*_train(root, args, steps=3), args)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    args = ["--data.data_path", str(write_jsonl(root / "chat.jsonl", _chat_records())), "--data.val_fraction", VAL,
            "--data.tokenizer", _chatml_tokenizer(root / "chatml"), "--data.seq_len", "256"]
    return (*_train(root, args, steps=10), args)  # 10 steps: its greedy replies end with <|im_end|>


def _predict(cwd, checkpoint, args: list[str]) -> tuple[list[dict], list[str]]:
    """``lowmem predict`` on ``checkpoint`` with the data ``args`` it was trained with: (JSON rows, stderr lines)."""
    proc = subprocess.run([LOWMEM, "predict", "--config", "tiny.yaml", "--ckpt_path", str(checkpoint), *args,
                           "--trainer.enable_progress_bar", "false"],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr.splitlines()


def _greedy(model: CausalLMModule, ids: list[int], eos: int) -> list[int]:
    """The tokens ``model.generate`` gives for the prompt ``ids`` alone (greedy, ``predict_new_tokens``, ending at
    the tokenizer's ``eos``)."""
    out = model.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=0, eos_token_id=eos)
    return out[0, len(ids):].tolist()


def _block_sets(data: TextDataModule) -> tuple[set, set]:
    """The training and held-out blocks, each as a set of token-id tuples."""
    return ({tuple(row.tolist()) for row in data.train_dataset.blocks["input_ids"]},
            {tuple(row.tolist()) for row in data.val_dataset.blocks["input_ids"]})


def _skip_lines(stderr: list[str]) -> list[str]:
    return [line for line in stderr if "predict skips" in line]


def test_instruction_fine_tune_answers_each_held_out_record(tmp_path, instruction_run):
    """pack=False: the held-out records are those whose block is held out; each prompt is bos + the prompt template,
    the reference the record's output, generated the model's greedy reply to that prompt alone (stopped at eos);
    the records whose prompt leaves no room for 32 new tokens in seq_len=128 are skipped and counted."""
    model, data, checkpoint, args = instruction_run
    train, held = _block_sets(data)
    expected, too_long = [], 0
    for record in _instruction_records():
        prompt = DEFAULT_PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])
        ids = [BYTE_BOS, *prompt.encode()]
        block = tuple(ids + list(record["output"].encode()) + [BYTE_EOS])
        block += (256,) * (data.seq_len - len(block))  # the record's own block, right-padded
        assert (block in train) != (block in held)  # each record is in exactly one split
        if block in held and len(ids) > data.seq_len - NEW_TOKENS:
            too_long += 1
        elif block in held:
            expected.append((prompt, ids, record["output"]))
    assert too_long > 0 and len(expected) > 5  # the split holds records of both kinds
    rows, stderr = _predict(tmp_path, checkpoint, args)
    assert [(r["prompt"], r["reference"]) for r in rows] == [(p, ref) for p, _, ref in expected]
    assert [list(r.ids) for r in data.answer_prompts().records] == [ids for _, ids, _ in expected]
    for row, (_, ids, _) in zip(rows, expected):
        assert set(row) == {"prompt", "generated", "reference"}
        assert row["generated"] == data.tokenizer.decode(cut_at_stop(_greedy(model, ids, BYTE_EOS), [[BYTE_EOS]]))
    held_total = len(expected) + too_long
    [line] = _skip_lines(stderr)
    assert f"predict skips {too_long} of {held_total} held-out records whose prompt is longer than 96 tokens" in line
    assert "seq_len=128 less predict_new_tokens=32" in line


def test_chat_fine_tune_answers_the_last_assistant_turn_of_each_held_out_conversation(tmp_path, chat_run):
    """pack=True, a ChatML HF tokenizer: the held-out conversations are those whose every token lies in held-out
    blocks; each prompt's ids are ``apply_chat_template(turns before the last assistant turn,
    add_generation_prompt=True)``, the reference that turn's content, generated the greedy reply stopped at eos or
    ``<|im_end|>`` (which each does, before its 32 tokens); no training conversation is a prompt."""
    model, data, checkpoint, args = chat_run
    hf = data.tokenizer.tokenizer
    train, held = _block_sets(data)
    stream, starts = [], []
    for record in _chat_records():
        starts.append(len(stream))
        stream += hf.apply_chat_template(record["messages"], tokenize=True, return_dict=False)
    stream += [hf.pad_token_id] * (-len(stream) % data.seq_len)
    blocks = [tuple(stream[i:i + data.seq_len]) for i in range(0, len(stream), data.seq_len)]
    expected, touching_training = [], 0
    for record, start, end in zip(_chat_records(), starts, [*starts[1:], None]):
        end = end if end is not None else len(stream)
        reached = blocks[start // data.seq_len:(end - 1) // data.seq_len + 1]
        if all(block in held for block in reached):
            prompt = hf.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
            ids = hf.apply_chat_template(record["messages"][:-1], tokenize=True, add_generation_prompt=True,
                                         return_dict=False)
            expected.append((prompt, ids, record["messages"][-1]["content"]))
        touching_training += any(block in train for block in reached)
    assert len(expected) >= 3 and touching_training > len(expected)
    rows, stderr = _predict(tmp_path, checkpoint, args)
    assert [(r["prompt"], r["reference"]) for r in rows] == [(p, ref) for p, _, ref in expected]
    assert [list(r.ids) for r in data.answer_prompts().records] == [ids for _, ids, _ in expected]
    stops = [[hf.convert_tokens_to_ids("<|im_end|>")], [hf.eos_token_id]]
    assert sorted(data.predict_stop_sequences) == sorted(stops)
    replies = [_greedy(model, ids, hf.eos_token_id) for _, ids, _ in expected]
    assert [r["generated"] for r in rows] == [hf.decode(cut_at_stop(reply, stops), skip_special_tokens=True)
                                             for reply in replies]
    assert all(stops[0][0] in reply[:-1] for reply in replies)  # text follows the marker: the stop matters
    assert _skip_lines(stderr) == []  # every held-out prompt fits


def test_generation_stops_after_a_stop_sequence_and_the_reply_is_cut_before_it():
    """``StopSequences`` ends a row of ``model.generate`` once its generated tokens hold a stop sequence (here two
    tokens the model generates greedily at steps 3-4), and ``cut_at_stop`` keeps the tokens before it."""
    cfg = parse_fit_config(["--config", "tiny.yaml"])
    torch.manual_seed(0)
    module = CausalLMModule(**cfg.model.init_args.as_dict())
    module.configure_model()
    prompt = torch.tensor([[BYTE_BOS, *b"### Instruction:\nHi\n\n### Response:\n"]])
    free = module.model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    tokens = free[0, prompt.shape[1]:].tolist()
    stop = tokens[2:4]
    first = next(i for i in range(len(tokens)) if tokens[i:i + 2] == stop)  # the stop's first occurrence
    from transformers import StoppingCriteriaList

    stopped = module.model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                    stopping_criteria=StoppingCriteriaList([StopSequences([stop], prompt.shape[1])]))
    assert stopped[0, prompt.shape[1]:].tolist() == tokens[:first + 2]
    assert cut_at_stop(tokens, [stop]) == tokens[:first]
    assert cut_at_stop(tokens, [[999]]) == tokens


@pytest.mark.parametrize("seq_len, message", [
    ("40", "No held-out record to answer in data_path='sft.jsonl' with pack=True, seq_len=40, val_fraction=0.05: no "
           "instruction or chat record lies wholly inside the held-out blocks"),
    ("32", "Invalid seq_len=32 for predict: the module's predict_new_tokens=32 leave no room for a prompt within "
           "seq_len=32"),
])
def test_predict_with_no_record_to_answer_is_refused_with_one_line(tmp_path, capsys, monkeypatch, seq_len, message):
    """Packed records (about 50 tokens) longer than a 40-token block never lie wholly in held-out blocks; a 32-token
    seq_len leaves no room for 32 new tokens: ``lowmem predict`` exits 2 with one line, writes nothing."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "sft.jsonl", _instruction_records()[1:5] * 15)
    code = main(["predict", "--config", "tiny.yaml", "--data.data_path", "sft.jsonl", "--data.seq_len", seq_len,
                 "--trainer.enable_progress_bar", "false"])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2 and "Traceback" not in err and captured.out == ""
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl"]  # nothing written
