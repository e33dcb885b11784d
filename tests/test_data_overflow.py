"""``TextDataModule(pack=False)`` as SFT users expect it: ``overflow`` decides what happens to a record longer than
``seq_len`` (by default plain text is split and records with a prompt are truncated, so no block trains a reply
without its question), one warning counts what that cost, batches are as wide as their longest record (the loss
unchanged), the setting is part of the resume fingerprint, and ``lowmem predict``'s prompts of packed, isolated
blocks hold one document each."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from launched_scripts import launch_env
from lowmem_calls import LOWMEM, lowmem_in_process

from lowmem_lightning.data import ByteTokenizer, TextDataModule
from lowmem_lightning.data.blocks import pack_blocks
from lowmem_lightning.data.overflow import collate_trimmed
from lowmem_lightning.data.prompts import first_document_prompts
from lowmem_lightning.data.tokens import IGNORE_INDEX
from lowmem_lightning.lowmem_warning import LowMemWarning

BYTE = ByteTokenizer()
SEQ = 48

# Token counts with the byte tokenizer (one token per character, bos in front; plain text and instruction outputs
# end in eos; the default chat template frames a turn as "<|role|>\n" + content + "<|end|>\n", 9 + n + 8 characters
# for the user, and the reply follows "<|assistant|>\n", 14 characters, its content and "<|end|>\n" trained):
RECORDS = {
    "text": {"text": "p" * 100},  # 1 + 100 + 1 = 102 tokens, 101 trained
    "instruction": {"instruction": "q" * 10, "output": "a" * 60},  # 1 + 17 (prompt) + 61 = 79 tokens, 61 trained
    "chat": {"messages": [{"role": "user", "content": "hi"},  # 1 + 33 (prompt) + 48 = 82 tokens, 48 trained
                          {"role": "assistant", "content": "z" * 40}]},
    "long_prompt": {"messages": [{"role": "user", "content": "u" * 40},  # 1 + 71 (prompt) + 11 = 83, 11 trained
                                 {"role": "assistant", "content": "xxx"}]},
    "short_text": {"text": "short"},  # 7 tokens, 6 trained
    "short_instruction": {"instruction": "hi", "output": "yo"},  # 1 + 9 + 3 = 13 tokens, 3 trained
    "short_chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},  # 44, 10
}
TRAINED = 101 + 61 + 48 + 11 + 6 + 3 + 10  # 240


def _data(tmp_path: Path, records: list[dict] | None = None) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (records or RECORDS.values())))
    return path


def _module(path: Path, **kwargs) -> tuple[TextDataModule, list[str]]:
    """The data module set up on ``path`` (pack=False, seq_len 48, no validation, a short prompt template) and the
    messages of the LowMemWarnings it raised."""
    dm = TextDataModule(str(path), seq_len=SEQ, batch_size=4, val_fraction=0.0, pack=False,
                        prompt_template_no_input="Q: {instruction}\nA: ", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    return dm, [str(w.message) for w in caught if issubclass(w.category, LowMemWarning)]


def _blocks(dm: TextDataModule) -> list[tuple[str, str]]:
    """``(text, trained text)`` of each block: its tokens and its target tokens, decoded."""
    blocks = dm.train_dataset.blocks
    out = []
    for ids, labels, mask in zip(blocks["input_ids"], blocks["labels"], blocks["attention_mask"]):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        out.append((BYTE.decode(ids), BYTE.decode([t for t in labels[1:] if t != IGNORE_INDEX])))
    return out


def _trained_of(blocks: list[tuple[str, str]], char: str) -> list[str]:
    """The blocks whose targets hold ``char`` (the record it stands for)."""
    return [text for text, trained in blocks if char in trained]


def test_split_trains_replies_in_blocks_without_their_question(tmp_path):
    """Today's behaviour, kept as ``overflow='split'``: the instruction's and the chat's replies run on into blocks
    that hold none of the question, and no warning says so."""
    dm, said = _module(_data(tmp_path), overflow="split")
    blocks = _blocks(dm)
    assert [text for text in _trained_of(blocks, "a") if "Q: " not in text] == ["a" * 30]  # 79 = 48 + 30 + eos
    assert [text for text in _trained_of(blocks, "z") if "<|user|>" not in text] == ["z" * 26 + "<|end|>\n"]
    assert len(_trained_of(blocks, "p")) == 3  # 102 = 48 + 48 + 6
    assert not any("longer than seq_len" in m for m in said)


@pytest.mark.parametrize("overflow", [None, "truncate"])
def test_records_with_a_prompt_are_truncated_and_never_lose_their_question(tmp_path, overflow):
    """The default and ``'truncate'``: each instruction / chat record is one block, its first 48 tokens (labels
    follow), so every trained reply token sits after its question; the chat whose prompt alone fills 48 tokens is
    dropped (a block without a target). Plain text is split by default, truncated with ``'truncate'``."""
    dm, said = _module(_data(tmp_path), overflow=overflow)
    blocks = _blocks(dm)
    assert _trained_of(blocks, "a") == ["Q: " + "q" * 10 + "\nA: " + "a" * 30]  # 18 + 30 = 48 tokens
    [chat] = _trained_of(blocks, "z")
    assert chat.startswith("<|user|>\nhi<|end|>\n<|assistant|>\n") and chat.endswith("z" * 14)
    assert not _trained_of(blocks, "x")  # long_prompt: dropped
    split = ["p" * 47, "p" * 48, "p" * 5]  # bos + 47, 48, 5 + eos
    assert _trained_of(blocks, "p") == (split if overflow is None else split[:1])
    assert len(blocks) == (3 if overflow is None else 1) + 2 + 3  # text, instruction + chat, the three short ones
    [message] = [m for m in said if "longer than seq_len" in m]
    lost = 31 + 34 + 11 + (0 if overflow is None else 101 - 47)  # instruction, chat, long_prompt (+ text truncated)
    assert message.startswith(f"TextDataModule: 4 of 7 records are longer than seq_len={SEQ} tokens; ")
    if overflow is None:
        assert ("overflow=None (the default: plain text is split, records with a prompt are truncated) truncated 2 "
                f"to their first {SEQ} tokens, dropped 1 whose first {SEQ} tokens hold no trained token, split 1 "
                f"(plain text) into blocks, which cost {lost} of {TRAINED} trained tokens (31.7%)") in message
    else:
        assert (f"overflow='truncate' truncated 3 to their first {SEQ} tokens, dropped 1 whose first {SEQ} tokens "
                f"hold no trained token, which cost {lost} of {TRAINED} trained tokens (54.2%)") in message
    assert message.endswith("raise seq_len, or set overflow to 'split' (later blocks of a record lack its start)"
                            + (", 'truncate' or 'drop'." if overflow is None else " or 'drop'."))
    assert "\n" not in message


def test_drop_leaves_out_every_long_record(tmp_path):
    dm, said = _module(_data(tmp_path), overflow="drop")
    assert sorted(text for text, _ in _blocks(dm)) == sorted(
        ["short", "Q: hi\nA: yo", "<|user|>\nhi<|end|>\n<|assistant|>\nok<|end|>\n"])
    [message] = [m for m in said if "longer than seq_len" in m]
    assert (f"4 of 7 records are longer than seq_len={SEQ} tokens; overflow='drop' dropped 4, which cost "
            f"{101 + 61 + 48 + 11} of {TRAINED} trained tokens (92.1%)") in message


def test_records_that_fit_give_no_warning_and_the_same_blocks_in_every_mode(tmp_path):
    path = _data(tmp_path, [RECORDS[k] for k in ("short_text", "short_instruction", "short_chat")])
    seen = []
    for overflow in (None, "split", "truncate", "drop"):
        dm, said = _module(path, overflow=overflow)
        assert said == []
        seen.append(dm.train_dataset.blocks)
    assert all(torch.equal(s["input_ids"], seen[0]["input_ids"]) for s in seen)


def test_no_record_left_is_refused_naming_overflow_and_seq_len(tmp_path):
    path = _data(tmp_path, [RECORDS["long_prompt"]] * 5)
    with pytest.raises(ValueError, match=r"No trainable label .* seq_len=48, pack=False, overflow=None: every record "
                                         r"is longer than seq_len and was dropped \(its first 48 tokens hold no "
                                         r"trained token\)\. Raise seq_len"):
        _module(path)
    with pytest.raises(ValueError, match=r"overflow='drop': every record is longer than seq_len and was dropped\. "):
        _module(path, overflow="drop")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"overflow": "cut", "pack": False},
     r"Invalid overflow='cut': expected one of 'split', 'truncate', 'drop' or None"),
    ({"overflow": "truncate"}, r"Invalid overflow='truncate' with pack=True: .*Set pack=False or leave overflow"),
])
def test_constructor_refuses_a_bad_overflow(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(str(_data(tmp_path)), **kwargs)


@pytest.mark.parametrize(("args", "error"), [
    (["--data.pack", "false", "--data.overflow", "cut"],
     "\"overflow\": Expected one of: 'split', 'truncate', 'drop', null. Given value: cut"),
    (["--data.overflow", "drop"], "Invalid overflow='drop' with pack=True: overflow decides"),
])
def test_lowmem_fit_refuses_a_bad_overflow_with_one_line(tmp_path, args, error, capsys, monkeypatch):
    """The parser's refusal of an unknown overflow is a real ``lowmem`` process, as users meet it; the data module's
    refusal of overflow with pack=True calls the same entry point (``lowmem_lightning.cli:main``) in this process:
    the same exit code, lines and files, without an interpreter start-up and its imports (~5 s)."""
    command = ["fit", "--config", "tiny.yaml", *args]
    if "cut" in args:
        proc = subprocess.run([LOWMEM, *command], cwd=tmp_path, env=launch_env(), capture_output=True, text=True,
                              timeout=120)
    else:
        proc = lowmem_in_process(capsys, monkeypatch, tmp_path, *command)
    assert proc.returncode == 2, proc.stderr[-3000:]
    first, *rest = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr and rest == ["(all options: lowmem fit --help)"], proc.stderr
    assert first.startswith("lowmem fit: error: ") and error in first, first
    assert list(tmp_path.iterdir()) == []


def test_batches_are_as_wide_as_their_longest_record_and_packed_ones_stay_full(tmp_path):
    records = [{"text": "x" * n} for n in (3, 9, 20, 5, 7, 2, 30, 4)]  # 5..32 tokens with bos and eos
    path = _data(tmp_path, records)
    dm, _ = _module(path)
    full = dm.train_dataset.blocks
    widths = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        widths.append(batch["input_ids"].shape[1])
        longest = int(batch["attention_mask"].sum(dim=1).max())  # the batch's longest record, rounded up to 8
        assert widths[-1] == -(-longest // 8) * 8 and not batch["attention_mask"][:, longest:].any()
    assert len(widths) == 2 and max(widths) < SEQ and len(set(widths)) == 2
    rows = collate_trimmed([dm.train_dataset[k] for k in range(len(dm.train_dataset))])
    width = rows["input_ids"].shape[1]
    assert width == 32 and all(torch.equal(rows[k], full[k][:, :width]) for k in rows)
    assert not full["attention_mask"][:, width:].any() and (full["labels"][:, width:] == IGNORE_INDEX).all()
    packed = TextDataModule(str(path), seq_len=SEQ, batch_size=2, val_fraction=0.0)
    assert {tuple(v.shape) for v in next(iter(packed.train_dataloader())).values()} == {(2, SEQ)}


def test_the_loss_of_a_batch_is_unchanged_by_the_trim(tmp_path):
    """A tiny Llama (sdpa) on the same records, padded to seq_len and trimmed: the loss is equal within fp32
    rounding, and validation's per-token weight is the same."""
    from torch.utils.data import default_collate

    from lowmem_lightning.modules.causal_lm import build_causal_lm

    records = [{"instruction": f"say {n}", "output": "y" * n} for n in (3, 11, 6, 17)] + [{"text": "abc " * 4}]
    dm, _ = _module(_data(tmp_path, records))
    items = [dm.train_dataset[k] for k in range(len(dm.train_dataset))]
    full, trimmed = default_collate(items), collate_trimmed(items)
    assert trimmed["input_ids"].shape[1] < full["input_ids"].shape[1] == SEQ
    torch.manual_seed(0)
    model = build_causal_lm(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2}, device="cpu",
                            torch_dtype="float32", vocab_size=BYTE.vocab_size).eval()
    with torch.no_grad():
        loss_full = model(**full, use_cache=False).loss
        loss_trimmed = model(**trimmed, use_cache=False).loss
    assert torch.isfinite(loss_full) and loss_trimmed.item() == pytest.approx(loss_full.item(), rel=1e-6, abs=0)
    assert ((full["labels"][:, 1:] != IGNORE_INDEX).sum() == (trimmed["labels"][:, 1:] != IGNORE_INDEX).sum())


def _resume_warning(path: Path, saved: dict, **kwargs) -> str:
    """The data-changed warning a datamodule (pack=False) on ``path`` gives when it loads ``saved``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TextDataModule(str(path), seq_len=SEQ, batch_size=4, val_fraction=0.0, pack=False,
                       prompt_template_no_input="Q: {instruction}\nA: ", **kwargs).load_state_dict(saved)
    return "\n".join(str(w.message) for w in caught if "data changed" in str(w.message))


def _without_overflow(state: dict) -> dict:
    """``state`` as a version before ``overflow`` wrote it."""
    return {**state, "settings": {k: v for k, v in state["settings"].items() if k != "overflow"}}


def test_resume_notices_a_changed_overflow_by_what_it_did(tmp_path):
    """The fingerprint keeps what overflow did to the data: the same thing asked for by another name is no change."""
    path = _data(tmp_path)
    dm, _ = _module(path)
    state = dm.state_dict()
    assert state["settings"]["overflow"] == "truncate (records with a prompt), split (plain text)"
    assert _resume_warning(path, state) == ""
    assert ("  - overflow: 'truncate (records with a prompt), split (plain text)' -> 'drop'"
            in _resume_warning(path, state, overflow="drop").splitlines())
    (tmp_path / "prompted").mkdir()
    prompted = _data(tmp_path / "prompted", [RECORDS["instruction"], RECORDS["chat"]])
    state = _module(prompted)[0].state_dict()
    assert state["settings"]["overflow"] == "truncate"
    assert _resume_warning(prompted, state, overflow="truncate") == ""  # the default did just that


def test_old_pack_false_checkpoints_are_told_their_prompted_records_are_now_truncated(tmp_path):
    """A checkpoint written before overflow split every long record: resuming on instruction/chat data (now
    truncated) says so; on plain text (still split) it resumes silently, as before."""
    prompted = _data(tmp_path, [RECORDS["instruction"], RECORDS["chat"]])
    old = _without_overflow(_module(prompted, overflow="split")[0].state_dict())
    assert "  - overflow: 'split' -> 'truncate'" in _resume_warning(prompted, old).splitlines()
    assert _resume_warning(prompted, old, overflow="split") == ""
    (tmp_path / "text").mkdir()
    text = _data(tmp_path / "text", [RECORDS["text"], RECORDS["short_text"]])
    assert _resume_warning(text, _without_overflow(_module(text)[0].state_dict())) == ""


def test_predict_prompts_of_isolated_blocks_hold_one_document(tmp_path):
    """Packed, isolated blocks: each prompt is its block's first-half tokens up to the next document start (the
    model never saw two documents together), left-padded, each batch as wide as its longest prompt; a tiny Llama
    continues a left-padded prompt as it continues the prompt alone."""
    from lowmem_lightning.modules.causal_lm import build_causal_lm

    encoded = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7, 8, 9, 10, 11], [0] * 8), ([12, 13], [0] * 2)]
    blocks = pack_blocks(encoded, seq_len=8, pad_id=0, isolate_documents=True)  # [1..3 | 4..8] [9..11 | 12 13 | pad]
    prompts = first_document_prompts(blocks, 4, pad_id=0)
    assert prompts["input_ids"].tolist() == [[0, 1, 2, 3], [0, 9, 10, 11]]
    assert prompts["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]
    mixed = first_document_prompts(pack_blocks(encoded, seq_len=8, pad_id=0), 4, pad_id=0)  # documents attend across
    assert mixed["input_ids"].tolist() == [[1, 2, 3, 4], [9, 10, 11, 12]] and bool(mixed["attention_mask"].all())

    records = [{"text": "w" * n + "."} for n in (5, 40, 9, 3, 60, 12, 7, 30, 18, 25)]
    dm = TextDataModule(str(_data(tmp_path, records)), seq_len=32, batch_size=4, val_fraction=0.5)
    dm.setup()
    held = dm.val_dataset.blocks
    rows = [row for batch in dm.predict_dataloader() for row in zip(batch["input_ids"], batch["attention_mask"])]
    for batch in dm.predict_dataloader():
        assert int(batch["attention_mask"][:, 0].max()) == 1  # as wide as the longest prompt
    assert len(rows) == held["input_ids"].shape[0]
    for (ids, mask), block, positions in zip(rows, held["input_ids"], held["position_ids"]):
        restarts = (positions[1:16] == 0).nonzero()
        width = int(restarts[0]) + 1 if restarts.numel() else 16  # up to the next document start
        assert int(mask.sum()) == width and torch.equal(ids[mask.bool()], block[:width])
        assert mask[-width:].all() and not mask[:-width].any()  # left-padded
    assert len({int(mask.sum()) for _, mask in rows}) > 1  # prompts of several lengths met
    torch.manual_seed(0)
    model = build_causal_lm(config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2}, device="cpu",
                            torch_dtype="float32", vocab_size=BYTE.vocab_size).eval()
    batch = next(iter(dm.predict_dataloader()))
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=BYTE.pad_token_id)
    for row, ids, mask in zip(out, batch["input_ids"], batch["attention_mask"]):
        alone = model.generate(input_ids=ids[mask.bool()][None], max_new_tokens=4, do_sample=False,
                               pad_token_id=BYTE.pad_token_id)
        assert row[ids.numel():].tolist() == alone[0, int(mask.sum()):].tolist()


def test_lowmem_fit_with_pack_false_runs_end_to_end(tmp_path):
    """The tiny recipe on the shipped sample (instruction records and docstring text) with ``--data.pack false``:
    3 steps and a validation run, exit 0, a finite val loss, and the overflow warning printed once."""
    proc = subprocess.run(
        [LOWMEM, "fit", "--config", "tiny.yaml", "--data.pack", "false", "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2", "--trainer.callbacks.plot", "false",
         "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**launch_env(), "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "records are longer than seq_len=128" in line]
    assert len(said) == 1 and said[0].startswith("lowmem: warning: TextDataModule: "), proc.stderr[-3000:]
    [metrics] = (tmp_path / "runs").rglob("metrics.csv")
    val = [float(row["val_loss"]) for row in csv.DictReader(metrics.open()) if row.get("val_loss")]
    assert len(val) == 1 and math.isfinite(val[0]) and 0 < val[0] < 2 * math.log(259), val
