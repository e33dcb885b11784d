"""The data files users have, given as ``data_path``: CSV/TSV with a header, JSON arrays (and ``{"data": [...]}``),
gzip, BOMs and CRLF give the same records as the JSONL of the same data (no header or commas trained as text);
Parquet without pyarrow (``no_pyarrow``), Arrow / ``save_to_disk`` directories, other compressions and UTF-16 are
refused by name with what to convert them to, before anything is read (Parquet read: ``test_data_parquet.py``); a
directory skips unrelated files; the resume fingerprint sees the files.
Two cases run a real ``lowmem fit``; the rest are in-process."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from lowmem_calls import LOWMEM
from record_files import write_jsonl

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.data import TextDataModule
from lowmem_lightning.data.reading import find_data_files, read_documents
from lowmem_lightning.lowmem_warning import LowMemWarning

RECORDS = [
    {"instruction": f'Say "hi", twice {i}\nplease', "input": "" if i % 2 else f"to, {i}", "output": f"hi,\n hi {i}"}
    for i in range(30)
]
TEXTS = [{"text": f"line one, with a comma {i}\nline two \"quoted\"\tand a tab"} for i in range(30)]


def _table(path: Path, records: list[dict], delimiter: str = ",", bom: bool = False, crlf: bool = False) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.DictWriter(f, list(records[0]), delimiter=delimiter, lineterminator="\r\n" if crlf else "\n")
        writer.writeheader()
        writer.writerows(records)
    return path


def _gzip(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


WRITERS = {
    "csv": lambda d, r: _table(d / "train.csv", r),
    "csv, BOM and CRLF": lambda d, r: _table(d / "train.csv", r, bom=True, crlf=True),
    "tsv": lambda d, r: _table(d / "train.tsv", r, delimiter="\t"),
    "json array": lambda d, r: (d / "data.json").write_text(json.dumps(r, indent=2)) and d / "data.json",
    "json data key": lambda d, r: (d / "data.json").write_text(json.dumps({"data": r})) and d / "data.json",
    "json lines named .json": lambda d, r: write_jsonl(d / "data.json", r),
    "jsonl.gz": lambda d, r: _gzip(d / "train.jsonl.gz", "".join(json.dumps(x) + "\n" for x in r).encode()),
    "csv.gz": lambda d, r: _gzip(d / "train.csv.gz", _table(d / "plain.csv", r).read_bytes()),
    "jsonl, BOM and CRLF": lambda d, r: (d / "t.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\r\n" for x in r).encode()) and d / "t.jsonl",
}


@pytest.mark.parametrize("records", [RECORDS, TEXTS], ids=["instruction", "text"])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_file_reads_as_the_jsonl_of_the_same_records(tmp_path, kind, records):
    expected = read_documents([write_jsonl(tmp_path / "same.jsonl", records)])
    path = WRITERS[kind](tmp_path, records)
    assert find_data_files(str(path)) == [path]
    assert read_documents([path]) == expected


def test_a_csv_cell_longer_than_the_csv_modules_limit_is_read(tmp_path):
    long = "word, " * 40_000  # 240 KB in one cell; the csv module's default limit is 128 KiB
    path = _table(tmp_path / "long.csv", [{"text": long}, {"text": "short"}])
    assert [d.completion for d in read_documents([path])] == [long, "short"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("keys.csv", "question,answer\nx,y\n", r"keys.csv:2: expected a string field 'text'.*"
                                               r"found keys \['answer', 'question'\]"),
        ("fields.csv", "instruction,output\n\"a\nb\",c\nd,e,f\n", r"fields.csv:4: 3 fields where the header "
                                                                   r"\['instruction', 'output'\] has 2; quote"),
        ("header.csv", "text,text\na,b\n", r"header.csv:1: the header row \['text', 'text'\] must name every column"),
        ("only_header.tsv", "text\n\n", r"only_header.tsv holds no records"),
        ("bad.json", '[{"text": "a"},\n {"text": ]', r"bad.json:2: not valid JSON"),
        ("item.json", '[{"text": "a"}, "b"]', r"item.json: record 2: expected a JSON object, got str"),
        ("empty.json", "[]", r"empty.json holds no records"),
        ("splits.json", '{"train": [{"text": "a"}]}', r"splits.json \(one JSON value, read as one record; many "
                                                       r"records go in an array .*found keys \['train'\]"),
    ],
)
def test_a_malformed_file_is_named_with_its_line_or_record(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match):
        read_documents([tmp_path / name])


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bom.txt", b"\xef\xbb\xbfplain", None),
        ("utf16.txt", "plain".encode("utf-16"), r"utf16.txt is UTF-16 text \(byte-order mark ff fe\), not UTF-8: "
                                                 r"convert it, e.g. `iconv -f UTF-16 -t UTF-8 "),
        ("utf32.jsonl", "{}".encode("utf-32"), r"utf32.jsonl is UTF-32 text"),
        ("latin1.txt", b"\xef\xbb\xbfcaf\xe9", r"latin1.txt is not UTF-8 text \(invalid byte 0xe9 at offset 6\)"),
        ("broken.jsonl.gz", b"\x1f\x8b\x08\x00garbage", r"broken.jsonl.gz is not a valid gzip file"),
        ("empty.txt.gz", gzip.compress(b" \n", mtime=0), r"empty.txt.gz is empty"),
    ],
)
def test_encodings_and_compression(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    if match is None:
        assert read_documents([tmp_path / name])[0].completion == "plain"
        return
    with pytest.raises(ValueError, match=match):
        read_documents([tmp_path / name])


STREAMED_CONTENTS = [
    b'{"text": "a"}\n{"text": "b\xc3\xa9"}\n\n{"text": "c"}',  # no line end after the last line
    b'\xef\xbb\xbf{"text": "bom"}\r\n{"text": "crlf \xe6\x97\xa5"}\r\n',
    b'{"text": "old mac"}\r{"text": "cr"}\r',
    b'{"text": "a"}\n{"text": "b\xe2\x80\xa8c"}\n',  # U+2028 inside a string: not a JSON Lines line end
    b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "\x00"}\n',  # the invalid byte is said before the NUL
    b'{"text": "a"}\n{"text": "\xe6\x97"}\n',  # a character cut short by its line end
    b'{"text": "a"}\n{"text": "\x00"}\n',
    b'{"text": "a"}\n{"text": "b"}\n\xe6\x97',  # ... by the end of the file
    b"\xef\xbb\xbf \n\t\n",
    b"",
    b'{"text": "a"}\n{"text": oops}\n',
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_unicode_line_separators_inside_jsonl_strings_stay_in_their_record(tmp_path, suffix):
    """U+2028, U+2029 and U+0085 may stand unescaped in a JSON string (``json.dumps(..., ensure_ascii=False)`` writes
    them so; scraped text has them): each record stays one record with the character in its text. Before, lines were
    cut as ``str.splitlines`` cuts them, and such a record was refused as 'not valid JSON' at a line it never had."""
    texts = ["first\u2028line", "para\u2029graph", "next\x85line", "plain"]
    lines = "\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n"
    data = lines.encode("utf-8")
    path = tmp_path / f"train{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    assert [d.completion for d in read_documents([path])] == texts


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 2**20])
@pytest.mark.parametrize("content", STREAMED_CONTENTS, ids=range(len(STREAMED_CONTENTS)))
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".csv"])
def test_records_read_streamed_are_those_of_the_whole_text_with_the_same_errors(monkeypatch, tmp_path, chunk,
                                                                                content, suffix):
    """JSONL and CSV files are read a chunk at a time (``READ_CHUNK`` bytes): the records, their ``file:line`` and
    every refusal (not UTF-8 with the byte's offset, NUL, empty, not JSON) are those of the file's whole text."""
    from lowmem_lightning.data import documents, formats, reading

    monkeypatch.setattr(reading, "READ_CHUNK", chunk)
    path = tmp_path / f"train{suffix}"
    data = content if suffix != ".csv" else b"text\n" + content.replace(b'{"text": ', b"").replace(b"}", b"")
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    try:
        whole = reading.read_text_file(path)
        parse = formats.jsonl_records if suffix != ".csv" else lambda p, t: formats.table_records(p, t, "csv")
        expected = [documents.render_record(r, where, documents.DEFAULT_PROMPT_TEMPLATE,
                                             documents.DEFAULT_PROMPT_TEMPLATE_NO_INPUT)
                    for where, r in parse(path, whole)]
        if not expected:
            raise ValueError(f"Data file {path} holds no records: add records to it or leave it out of data_path.")
    except ValueError as err:
        with pytest.raises(ValueError) as streamed:
            read_documents([path])
        assert str(streamed.value) == str(err)
        return
    assert read_documents([path]) == expected


def _save_to_disk(folder: Path) -> Path:
    """What ``datasets``' ``Dataset.save_to_disk`` writes (the Arrow bytes do not matter: they are never read)."""
    folder.mkdir(parents=True)
    (folder / "data-00000-of-00001.arrow").write_bytes(os.urandom(64))
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    return folder


def _dataset_dict(d: Path) -> Path:
    """What ``DatasetDict.save_to_disk`` writes: ``dataset_dict.json`` and one save_to_disk folder per split."""
    _save_to_disk(d / "dd" / "train")
    (d / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    return d / "dd"


def _parquet_among_jsonl(d: Path) -> Path:
    (d / "mixed").mkdir()
    write_jsonl(d / "mixed" / "a.jsonl", TEXTS)
    (d / "mixed" / "b.parquet").write_bytes(b"PAR1")
    return d / "mixed"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "train.parquet", r"train.parquet is Parquet, which lowmem does not read: install pyarrow, "
                                        r"which reads it \(pip install pyarrow\), or convert with `datasets`/pandas "
                                        r"to JSONL: datasets.Dataset.from_parquet\("),
        (lambda d: d / "t.feather", r"t.feather is Feather, .*pandas.read_feather\("),
        (lambda d: d / "train.jsonl.bz2", r"train.jsonl.bz2 is bz2-compressed, .*decompress it \(gzip .gz files"),
        (lambda d: _save_to_disk(d / "saved"), r"saved is a Hugging Face `datasets` save_to_disk directory \(Arrow "
                                               r"files\), .*datasets.load_from_disk\('.*saved'\).to_json\("),
        (_dataset_dict, r"dd is a Hugging Face .*datasets.load_from_disk\('.*dd'\)\['train'\].to_json\("),
        (_parquet_among_jsonl, r"mixed/b.parquet is Parquet"),
    ],
    ids=["parquet", "feather", "bz2", "save_to_disk", "dataset_dict", "directory with a parquet file"],
)
def test_a_format_not_read_is_refused_in_the_constructor_with_the_conversion(tmp_path, make, match, no_pyarrow):
    path = make(tmp_path)
    if not path.exists():
        path.write_bytes(b"PAR1" + os.urandom(64))
    with pytest.raises(ValueError, match=r"Invalid data_path=.*" + match):
        TextDataModule(str(path))


def test_a_directory_reads_its_data_files_and_skips_the_rest(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    wanted = [write_jsonl(folder / "a.jsonl", TEXTS), _table(folder / "b.csv", RECORDS), folder / "c.txt",
              _gzip(folder / "sub" / "d.txt.gz", b"zipped text"), folder / "sub" / "e.json"]
    wanted[2].write_text("plain text")
    wanted[4].write_text(json.dumps(RECORDS[:3]))
    (folder / ".ipynb_checkpoints").mkdir()
    for name, data in [("README.md", b"# data"), (".DS_Store", b"\x00\x00\x00\x01Bud1"), ("cat.png", b"\x89PNG\x00"),
                       ("dataset_info.json", b"{}"), ("notes.docx", b"PK\x03\x04"), ("._a.jsonl", b"\x00\x05\x16\x07"),
                       (".ipynb_checkpoints/a-checkpoint.jsonl", b'{"text": "a stale copy"}\n')]:
        (folder / name).write_bytes(data)
    assert find_data_files(str(folder)) == sorted(wanted)
    assert len(read_documents(find_data_files(str(folder)))) == 30 + 30 + 1 + 1 + 3
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "README.md").write_text("# nothing")
    with pytest.raises(ValueError, match=r"the directory holds no .txt, .jsonl, .json, .csv or .tsv file"):
        TextDataModule(str(tmp_path / "none"))


def test_a_directory_with_a_test_split_beside_its_training_files_says_it_reads_both(tmp_path):
    """A dataset downloaded whole (``hf download ... --local-dir data``: ``data/train.jsonl``, ``data/test.jsonl``,
    ``data/validation.jsonl``) is read whole, as the directory was given, and one warning names the held-out-looking
    files trained on; a directory without such names says nothing."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train.jsonl", "test.jsonl", "validation.jsonl", "devops_notes.jsonl"):
        write_jsonl(folder / name, TEXTS)
    with pytest.warns(LowMemWarning) as caught:
        assert len(find_data_files(str(folder))) == 4
    assert [str(w.message) for w in caught] == [
        f"data_path={str(folder)!r} holds files named as held-out splits (test.jsonl, validation.jsonl: 2 of 4), which "
        "are trained on with the others; if they are a test or validation split, give the training files or their "
        "folder instead."]
    (folder / "test.jsonl").unlink()
    (folder / "validation.jsonl").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowMemWarning)
        assert len(find_data_files(str(folder))) == 2


def test_upper_case_names_are_read_as_their_format(tmp_path, no_pyarrow):
    """A directory from Windows or an export tool (``TRAIN.CSV``, ``Extra.JSONL.GZ``, ``NOTES.TXT``): each read as its
    format, in any case, and a ``DATA.PARQUET`` refused as a lower-case one is (they were skipped as unknown names)."""
    folder = tmp_path / "data"
    folder.mkdir()
    wanted = [_table(folder / "TRAIN.CSV", RECORDS), _gzip(folder / "Extra.JSONL.GZ",
                                                          "".join(json.dumps(r) + "\n" for r in TEXTS).encode())]
    assert find_data_files(str(folder)) == sorted(wanted)
    assert read_documents(find_data_files(str(folder))) == read_documents(  # sorted: Extra before TRAIN
        [write_jsonl(tmp_path / "extra.jsonl", TEXTS), _table(tmp_path / "train.csv", RECORDS)])
    (folder / "DATA.PARQUET").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="DATA.PARQUET is Parquet"):
        find_data_files(str(folder))


def test_a_text_files_windows_and_old_mac_line_ends_read_as_lf(tmp_path):
    """A ``.txt`` saved on Windows (CRLF) or an old Mac (CR) trains the same text as its LF copy (``\\r`` was trained
    as a byte of its own before every newline)."""
    unix = "first line\nsecond line\n\nlast\n"
    for name, ends in [("windows.txt", "\r\n"), ("mac.txt", "\r")]:
        (tmp_path / name).write_bytes(unix.replace("\n", ends).encode())
        assert read_documents([tmp_path / name])[0].completion == unix


def test_the_resume_fingerprint_sees_a_csv_edit_and_not_a_readme_edit(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    table = _table(folder / "train.csv", RECORDS)
    (folder / "README.md").write_text("# about")
    data = TextDataModule(str(folder), seq_len=128)
    data.setup()
    state = data.state_dict()
    assert list(state["data_files"]) == [str(table.resolve())]
    assert state["settings"]["prompt_template"]  # the rows are instruction records: their template is kept
    (folder / "README.md").write_text("# about, longer")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*data changed", category=LowMemWarning)
        TextDataModule(str(folder), seq_len=128).load_state_dict(state)
    _table(table, RECORDS[:-1])
    with pytest.warns(LowMemWarning, match=r"train.csv: size \d+ -> \d+ bytes"):
        TextDataModule(str(folder), seq_len=128).load_state_dict(state)


def _fit(cwd: Path, data_path: Path, run: bool = True) -> subprocess.CompletedProcess | None:
    """A real ``lowmem fit`` of the tiny recipe on ``data_path`` in ``cwd``: one step, validated once, no logger,
    checkpoint or plot. ``run=False``: only its recipe, ``cwd``'s name + ``.yaml`` beside ``cwd``."""
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    recipe["trainer"].update({"max_steps": 1, "val_check_interval": 1, "limit_val_batches": 1, "logger": False,
                              "enable_checkpointing": False, "default_root_dir": str(cwd / "runs")})
    recipe["trainer"]["callbacks"][0]["init_args"]["plot"] = False
    recipe["data"]["init_args"]["data_path"] = str(data_path)
    (cwd.parent / f"{cwd.name}.yaml").write_text(yaml.safe_dump(recipe))
    if not run:
        return None
    return subprocess.run([LOWMEM, "fit", "--config", str(cwd.parent / f"{cwd.name}.yaml")], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_lowmem_fit_trains_on_a_csv_and_refuses_parquet(tmp_path, capsys, monkeypatch, no_pyarrow):
    """A real ``lowmem fit`` trains on a CSV; the same folder with a Parquet file added is refused, without pyarrow, by
    lowmem's entry point called in this process (exit 2, one error line, nothing written)."""
    from lowmem_lightning.cli import main

    data, trained = tmp_path / "data", tmp_path / "trained"
    data.mkdir()
    trained.mkdir()
    proc = _fit(trained, _table(data / "train.csv", RECORDS * 4, crlf=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "state after 1 steps" in proc.stdout + proc.stderr
    (data / "train.parquet").write_bytes(b"PAR1" + os.urandom(64))
    refused = tmp_path / "refused"
    refused.mkdir()
    _fit(refused, data, run=False)
    monkeypatch.chdir(refused)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    capsys.readouterr()
    code = main(["fit", "--config", str(tmp_path / "refused.yaml")])
    proc = subprocess.CompletedProcess("lowmem", code, *capsys.readouterr())
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("train.parquet is Parquet, which lowmem does not read: install pyarrow, which reads it (pip install "
            "pyarrow), or convert with `datasets`/pandas to JSONL") in errors[0]
    assert list(refused.iterdir()) == []
