"""Parquet ``data_path`` files, read with ``pyarrow`` (the ``parquet`` extra): what the Hugging Face Hub stores data
sets as (UltraChat, Tülu, Magpie: Parquet only), and so what a Hub dataset id often downloads. Each row is a record,
read as the JSONL line of the same record is (nested ``messages`` columns too); a directory mixes Parquet with the
other formats; a damaged file is named; a Hub dataset stored as Parquet trains. Without pyarrow they are refused
with the install and the conversion (``test_data_files.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from record_files import write_jsonl  # noqa: E402

from lowmem_lightning.data import TextDataModule  # noqa: E402
from lowmem_lightning.data.chat import ChatDocument  # noqa: E402
from lowmem_lightning.data.reading import find_data_files, read_documents  # noqa: E402

INSTRUCTIONS = [{"instruction": f"Double {i}.", "input": "" if i % 3 else f"{i}", "output": str(2 * i)}
                for i in range(2500)]  # more rows than one read batch (1024)
CHATS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."},
                       {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe") * 5]


def _parquet(path: Path, records: list) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=700)
    return path


def _content(doc):
    """A document without where it was read (a conversation keeps its file and line for its errors)."""
    return (doc.messages, doc.tools) if isinstance(doc, ChatDocument) else doc


def test_rows_read_as_the_same_records_in_jsonl(tmp_path):
    for records in (INSTRUCTIONS, CHATS):
        parquet = read_documents([_parquet(tmp_path / "data.parquet", records)])
        jsonl = read_documents([write_jsonl(tmp_path / "data.jsonl", records)])
        assert list(map(_content, parquet)) == list(map(_content, jsonl)) and len(parquet) == len(records)
    assert isinstance(parquet[0], ChatDocument) and parquet[0].messages[2] == {"role": "assistant", "content": "yes"}
    assert parquet[1].where.endswith("data.parquet:row 2")


def test_a_directory_mixes_parquet_with_jsonl(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    wanted = [write_jsonl(folder / "a.jsonl", CHATS), _parquet(folder / "b.parquet", INSTRUCTIONS[:10])]
    assert find_data_files(str(folder)) == wanted
    data = TextDataModule(str(folder), seq_len=64, batch_size=2, cache_dir=False)
    data.setup("fit")
    assert data.has_chat and data.has_instructions


def test_a_damaged_or_empty_parquet_file_is_named(tmp_path):
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(b"PAR1" + bytes(64) + b"PAR1")
    with pytest.raises(ValueError, match=rf"Data file {damaged} is not a readable Parquet file \(after 0 rows: "):
        read_documents([damaged])
    empty = _parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(ValueError, match=rf"Data file {empty} holds no records"):
        read_documents([empty])


def test_a_hub_dataset_stored_as_parquet_trains(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hub"
    storage = root / "datasets--tiny-org--ultrachat"
    snapshot = storage / "snapshots" / ("5" * 40) / "data"
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text("5" * 40)
    _parquet(snapshot / "train_sft-00000-of-00001.parquet", CHATS * 4)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    data = TextDataModule("tiny-org/ultrachat", seq_len=64, batch_size=2, cache_dir=False)
    data.setup("fit")
    assert data.has_chat and next(iter(data.train_dataloader()))["input_ids"].shape == (2, 64)


@pytest.mark.parametrize("with_pyarrow", [True, False])
def test_gzip_compressed_parquet_is_refused_with_how_to_read_it(tmp_path, request, with_pyarrow):
    import gzip

    if not with_pyarrow:
        request.getfixturevalue("no_pyarrow")
    packed = tmp_path / "train.parquet.gz"
    packed.write_bytes(gzip.compress(_parquet(tmp_path / "train.parquet", INSTRUCTIONS[:5]).read_bytes()))
    (tmp_path / "train.parquet").unlink()
    for data_path in (packed, tmp_path):  # the file, and the folder holding it
        with pytest.raises(ValueError, match="is gzip-compressed Parquet") as refused:
            TextDataModule(str(data_path), seq_len=16, batch_size=1, cache_dir=False).setup("fit")
        message = str(refused.value)
        assert f"gunzip '{packed}'" in message and "lowmem reads train.parquet" in message
        assert ("pip install pyarrow" in message) is not with_pyarrow
