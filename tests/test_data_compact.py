"""``TextDataModule``'s compact pipeline (flat int32 ids + trained flags, blocks as spans: ~7 bytes per token) gives
exactly the blocks, split, overflow counts and batches of a straightforward list-based construction (the
pipeline's earlier code, kept here as the reference), for every kind of record, packing and overflow mode, with
the byte tokenizer and a fast BPE tokenizer (batched ``encode_batch``); and building ~5 MB of data stays far below
the memory the list-based pipeline needed."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from launched_scripts import launch_env
from tiny_tokenizers import bpe_tokenizer

from lowmem_lightning.data import ByteTokenizer, TextDataModule
from lowmem_lightning.data.blocks import split_indices, trainable_blocks
from lowmem_lightning.data.chat import ChatDocument
from lowmem_lightning.data.encoding import ENCODE_CHUNK, encode_document, encode_documents
from lowmem_lightning.data.overflow import OverflowReport, fit_records
from lowmem_lightning.data.reading import read_documents
from lowmem_lightning.data.tokenizer import HFTokenizer
from lowmem_lightning.data.tokens import IGNORE_INDEX
from lowmem_lightning.lowmem_warning import LowMemWarning

SEQ = 24
WORDS = ["def", "return", "the", "value", " of", "naïve", "日本語", "🙂", "x" * 30, "a\nb", "  spaced  ",
         "<|endoftext|>"]


# ---------------------------------------------------------------- the reference: the list-based construction
def reference_fit(encoded, prompted, seq_len, overflow):
    """What overflow keeps of each ``(ids, labels)`` record, and the counts, written record by record."""
    kept, report = [], OverflowReport(records=len(encoded))
    for (ids, labels), has_prompt in zip(encoded, prompted):
        trained = sum(label != IGNORE_INDEX for label in labels)
        report.trained += trained
        report.long += len(ids) > seq_len
        mode = overflow or ("truncate" if has_prompt else "split")
        if len(ids) <= seq_len or mode == "split":
            kept.append((ids, labels))
        elif mode == "truncate" and sum(label != IGNORE_INDEX for label in labels[1:seq_len]):
            report.truncated += 1
            report.lost += trained - sum(label != IGNORE_INDEX for label in labels[:seq_len])
            kept.append((ids[:seq_len], labels[:seq_len]))
        else:
            report.dropped += 1
            report.lost += trained
    return kept, report


def reference_blocks(encoded, seq_len, pad_id, pack, isolate):
    """``[n, seq_len]`` int64 blocks: the streams (all records, or each) cut and right-padded, position by position."""
    streams = [encoded] if pack else [[e] for e in encoded]
    rows = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for stream in streams:
        ids = [t for e in stream for t in e[0]]
        labels = [t for e in stream for t in e[1]]
        doc_starts = set()
        at = 0
        for e in stream:
            doc_starts.add(at)
            at += len(e[0])
        doc_starts.add(len(ids))  # the padding counts as one more document
        for b in range(0, len(ids), seq_len):
            n = min(seq_len, len(ids) - b)
            rows["input_ids"].append(ids[b:b + n] + [pad_id] * (seq_len - n))
            rows["labels"].append(labels[b:b + n] + [IGNORE_INDEX] * (seq_len - n))
            rows["attention_mask"].append([1] * n + [0] * (seq_len - n))
            positions, p = [], 0
            for k in range(b, b + seq_len):
                p = 0 if (k == b or k in doc_starts) else p + 1
                positions.append(p)
            rows["position_ids"].append(positions)
    blocks = {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}
    if pack and isolate:
        blocks["labels"] = blocks["labels"].masked_fill(blocks["position_ids"] == 0, IGNORE_INDEX)
    else:
        del blocks["position_ids"]
    return blocks


# ---------------------------------------------------------------- data and tokenizers
def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _records(seed: int = 0) -> list[dict]:
    """Every kind of record, short and long, with multi-byte characters and a special token's text."""
    rng = random.Random(seed)
    records = []
    for k in range(60):
        kind, size = k % 6, rng.choice([0, 1, 3, 8, 20])
        if kind == 0:
            records.append({"text": _text(rng, size)})
        elif kind == 1:
            records.append({"instruction": _text(rng, rng.choice([1, 12])), "output": _text(rng, size),
                            **({"input": _text(rng, 2)} if rng.random() < 0.5 else {})})
        elif kind == 2:
            records.append({"prompt": _text(rng, rng.choice([0, 2, 15])), "completion": _text(rng, size) or "x"})
        elif kind == 3:
            records.append({"messages": [{"role": "system", "content": _text(rng, 2)},
                                         {"role": "user", "content": _text(rng, rng.choice([1, 12]))},
                                         {"role": "assistant", "content": _text(rng, size)},
                                         {"role": "user", "content": "more"},
                                         {"role": "assistant", "content": _text(rng, 2)}]})
        elif kind == 4:
            records.append({"conversations": [{"from": "human", "value": _text(rng, 2)},
                                              {"from": "gpt", "value": _text(rng, size)}]})
        else:
            records.append({"prompt": [{"role": "user", "content": _text(rng, 3)}],
                            "completion": [{"role": "assistant", "content": _text(rng, size)}]})
    return records


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compact")
    (path / "records.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records()))
    (path / "notes.txt").write_text(_text(random.Random(1), 40) + "\n")
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> str:
    corpus = " ".join(WORDS * 3) + " ".join(json.dumps(r) for r in _records(1))
    path = tmp_path_factory.mktemp("bpe")
    bpe_tokenizer(path, ["<|endoftext|>"], "<|endoftext|>", corpus, vocab_size=400)
    return str(path)


def _tokenizer(name: str, bpe: str) -> str:
    return bpe if name == "bpe" else "byte"


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_encode_batch_gives_the_ids_encode_gives_text_by_text(tokenizer, bpe):
    tok = ByteTokenizer() if tokenizer == "byte" else HFTokenizer(bpe)
    texts = ["", " leading", "naïve 日本語 🙂", "<|endoftext|> inside", "a\r\nb", *WORDS]
    ids, lengths = tok.encode_batch(texts)
    assert ids.dtype.name == "int32" and lengths.tolist() == [len(tok.encode(t)) for t in texts]
    assert ids.tolist() == [i for t in texts for i in tok.encode(t)]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_encode_documents_gives_each_records_ids_and_labels(tokenizer, bpe, data_dir):
    dm = TextDataModule(str(data_dir), tokenizer=_tokenizer(tokenizer, bpe), seq_len=SEQ)
    docs = read_documents(dm.files)
    assert any(isinstance(d, ChatDocument) for d in docs) and any(not isinstance(d, ChatDocument) for d in docs)
    encoded = encode_documents(docs, dm.tokenizer, dm.chat)
    assert encoded.ids.dtype.name == "int32" and encoded.trained.dtype.name == "bool"
    assert [encoded.record(i) for i in range(len(docs))] == [encode_document(d, dm.tokenizer, dm.chat) for d in docs]


SETTINGS = [dict(pack=True, isolate_documents=True), dict(pack=True, isolate_documents=False),
            *(dict(pack=False, overflow=o) for o in (None, "split", "truncate", "drop"))]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_blocks_split_items_and_overflow_counts_are_the_list_based_ones(tokenizer, settings, bpe, data_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm = TextDataModule(str(data_dir), tokenizer=_tokenizer(tokenizer, bpe), seq_len=SEQ, val_fraction=0.2,
                            seed=3, **settings)
        dm.setup()
    docs = read_documents(dm.files)
    encoded = [encode_document(d, dm.tokenizer, dm.chat) for d in docs]
    prompted = [isinstance(d, ChatDocument) or bool(d.prompt) for d in docs]
    if not dm.pack:
        encoded, report = reference_fit(encoded, prompted, SEQ, dm.overflow)
        said = [str(w.message) for w in caught if issubclass(w.category, LowMemWarning) and "seq_len=" in
                str(w.message) and "records are longer" in str(w.message)]
        assert said == ([report.message(dm.overflow, SEQ)] if report.message(dm.overflow, SEQ) else [])
        assert fit_records(encode_documents(docs, dm.tokenizer, dm.chat), prompted, SEQ, dm.overflow)[1] == report
        encoded = [e for e in encoded]
    expected = reference_blocks(encoded, SEQ, dm.tokenizer.pad_token_id, dm.pack, dm.isolate_documents)
    keep = trainable_blocks(expected["labels"])
    train, val = split_indices(int(keep.sum()), 0.2, 3)
    for dataset, index in ((dm.train_dataset, train), (dm.val_dataset, index_val := val)):
        rows = {k: v[keep][index] for k, v in expected.items()}
        assert set(dataset.blocks) == set(rows)
        for key, value in rows.items():
            assert dataset.blocks[key].dtype == torch.long and torch.equal(dataset.blocks[key], value), key
        assert len(dataset) == len(index)
        for i in range(len(dataset)):  # what a loader reads: the same keys, dtypes and values
            item = dataset[i]
            assert tuple(item) == dataset.keys and all(v.dtype == torch.long for v in item.values())
            assert all(torch.equal(item[k], rows[k][i]) for k in item)
    assert len(index_val) > 0


@pytest.mark.parametrize("settings", [dict(pack=True), dict(pack=False)])
def test_predict_prompts_are_the_list_based_records_wholly_held_out(settings, tmp_path):
    seq_len = 96
    records = [{"instruction": f"question {k}", "output": "answer " * (k % 5)} for k in range(40)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = TextDataModule(str(path), seq_len=seq_len, val_fraction=0.25, **settings)
    dm.setup()
    docs = read_documents(dm.files)
    encoded = [encode_document(d, dm.tokenizer) for d in docs]
    if not dm.pack:
        encoded = reference_fit(encoded, [True] * len(docs), seq_len, None)[0]
    blocks = reference_blocks(encoded, seq_len, dm.tokenizer.pad_token_id, dm.pack, dm.isolate_documents)
    held = set(trainable_blocks(blocks["labels"]).nonzero().flatten()[split_indices(
        int(trainable_blocks(blocks["labels"]).sum()), 0.25, dm.seed)[1]].tolist())
    start, expected = 0, []
    for doc, (ids, _) in zip(docs, encoded):
        span = (range(start // seq_len, (start + len(ids) - 1) // seq_len + 1) if dm.pack else
                range(start, start + -(-len(ids) // seq_len)))
        start += len(ids) if dm.pack else len(span)
        if len(span) and all(b in held for b in span):
            expected.append(doc.prompt)
    assert expected and [r.prompt for r in dm.answer_prompts().records] == expected


MEMORY_CHILD = r"""
import json, sys
def rss(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
import torch, lightning
from lowmem_lightning.data.text import TextDataModule
base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
dm = TextDataModule(data_path=sys.argv[1], seq_len=512)
dm.check_inputs()
peak = rss("VmHWM:") - base
blocks = [ds.blocks for ds in (dm.train_dataset, dm.val_dataset)]
if hasattr(blocks[0], "nbytes"):
    tokens, stored = sum(int(b.lengths.sum()) for b in blocks), blocks[0].nbytes
else:  # the list-based code's dicts of int64 tensors
    tokens = sum(int(b["attention_mask"].sum()) for b in blocks)
    stored = sum(t.numel() * t.element_size() for b in blocks for t in b.values())
print(json.dumps({"peak": peak, "tokens": tokens, "stored": stored}))
"""


def _build_memory(tmp_path: Path, megabytes: float) -> dict:
    """``{"peak", "tokens", "stored"}`` of a fresh process building ``megabytes`` MB of instruction records
    (:data:`MEMORY_CHILD`)."""
    line = json.dumps({"instruction": "Explain what the Python function `abc.abstractmethod` does.", "input": "",
                       "output": "A decorator indicating abstract methods, for classes with ABCMeta. " * 2})
    path = tmp_path / f"big{megabytes}.jsonl"
    path.write_text((line + "\n") * int(megabytes * 1e6 // (len(line) + 1)))
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(path)], capture_output=True, text=True,
                         env=launch_env(), cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    path.unlink()
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_instructions_build_in_a_fraction_of_the_list_based_memory_which_grows_by_their_tokens_alone(tmp_path):
    """~5M byte tokens: the list-based pipeline peaked ~108 bytes per token above the imports (two Python lists per
    record, then int64 tensors of ids, labels, mask and positions: 540 MB here); the compact one stays under 40, and
    the blocks it keeps (train and held-out share the arrays) hold ~7 bytes per token (int32 id, bool trained flag,
    int16 position). From 5 MB to 20 MB the peak grows by the tokens' bytes and their packing's temporaries, ~7.2
    bytes per token: records stream from the file through the tokenizer, so no file text, record or rendered
    document outlives its chunk (read whole, as before, they made it ~12.7; a list of the rendered documents alone,
    ~9.1)."""
    small, large = _build_memory(tmp_path, 5), _build_memory(tmp_path, 20)
    assert small["tokens"] > 4_500_000 and large["tokens"] > 3.9 * small["tokens"]
    assert small["peak"] / small["tokens"] < 40, small
    assert small["stored"] / small["tokens"] < 7.1, small
    growth = (large["peak"] - small["peak"]) / (large["tokens"] - small["tokens"])
    assert growth < 8.5, (growth, small, large)


def test_a_long_read_says_once_what_it_is_doing_and_the_sample_data_says_nothing(monkeypatch, capsys, data_dir):
    TextDataModule("sample").check_inputs()  # the tiny recipe's data: read in well under PROGRESS_AFTER_S
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("lowmem_lightning.data.reading.PROGRESS_AFTER_S", 0.0)
    said = []
    dm = TextDataModule(str(data_dir), seq_len=SEQ)
    dm.progress = said.append
    dm.check_inputs()
    size = sum(f.stat().st_size for f in dm.files) / 2**10
    assert len(said) == 1 and re.fullmatch(
        rf"TextDataModule: tokenizing data_path='{re.escape(str(data_dir))}': 61 records \([\d,]+ tokens\), "
        rf"100% of {size:.1f} KiB read after 0 s, then packing them into blocks\.\.\.", said[0]), said


@pytest.mark.parametrize("suffix", [".jsonl", ".csv.gz"])
def test_records_stream_through_the_tokenizer_the_line_says_how_much_of_the_file_is_read(monkeypatch, tmp_path,
                                                                                          suffix):
    """The first chunk of records is tokenized while most of the file is still unread (the old pipeline read and
    parsed every record first: its line came at 100%). The words are random hex, so that the gzipped file (1.3 MiB)
    is several times the 128 KiB that Python >= 3.12's gzip reads from the file at once."""
    monkeypatch.setattr("lowmem_lightning.data.reading.PROGRESS_AFTER_S", 0.0)
    rng = random.Random(0)
    rows = [f"record {k}: " + " ".join(f"{rng.getrandbits(64):016x}" for _ in range(8))
            for k in range(4 * ENCODE_CHUNK)]
    if suffix == ".jsonl":
        data = "".join(json.dumps({"text": row}) + "\n" for row in rows).encode()
    else:
        data = gzip.compress(("text\n" + "".join(f"{row}\n" for row in rows)).encode())
    path = tmp_path / f"train{suffix}"
    path.write_bytes(data)
    said = []
    dm = TextDataModule(str(path), seq_len=512, cache_dir=False)
    dm.progress = said.append
    dm.check_inputs()
    share = re.fullmatch(r".*: 4,096 records \([\d,]+ tokens\), (\d+)% of [\d.]+ [KM]iB read after .*", said[0])
    assert len(said) == 1 and share and 10 <= int(share[1]) <= 50, said


def test_large_files_are_said_before_they_are_read(monkeypatch, data_dir):
    monkeypatch.setattr("lowmem_lightning.data.reading.PROGRESS_BYTES", 1000)
    said = []
    dm = TextDataModule(str(data_dir), seq_len=SEQ)
    dm.progress = said.append
    dm.check_inputs()
    assert len(said) == 1 and re.fullmatch(
        rf"TextDataModule: reading and tokenizing data_path='{re.escape(str(data_dir))}': 2 file\(s\), 0.00 GiB, then "
        r"packing them into blocks\.\.\.", said[0]), said


def test_lowmem_fit_says_the_line_on_stderr_before_its_other_messages(monkeypatch, capsys, tmp_path):
    from lowmem_lightning.cli import main

    monkeypatch.setattr("lowmem_lightning.data.reading.PROGRESS_AFTER_S", 0.0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.txt").write_text("abc")
    code = main(["fit", "--config", "tiny.yaml", "--data.data_path", str(tmp_path / "tiny.txt"),
                 "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0].startswith("lowmem: TextDataModule: tokenizing data_path="), err
    assert "Too little data for val_fraction" in err[1]


def test_the_head_of_blocks_is_their_first_columns(data_dir):
    dm = TextDataModule(str(data_dir), seq_len=SEQ, val_fraction=0.2)
    dm.setup()
    sets = (dm.train_dataset.blocks, dm.val_dataset.blocks)
    assert any(bool((blocks.lengths < SEQ).any()) for blocks in sets)  # a padded block, whose padding some heads hold
    for blocks in sets:
        for width in range(1, SEQ + 1):
            head = blocks.head(width)
            assert set(head) == set(blocks) and all(torch.equal(head[k], blocks[k][:, :width]) for k in blocks)
