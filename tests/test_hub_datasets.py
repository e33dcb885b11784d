"""``data_path`` as a Hugging Face Hub dataset id (``org/name``, ``org/name@revision``), as a model id is taken for
``model_name_or_path``: users write ``--data.data_path yahma/alpaca-cleaned`` and got "no such file or directory";
or a file or folder of one, ``hf://datasets/ORG/NAME[@REV]/PATH``.

No network here: the Hub is a hand-built cache (``datasets--ORG--NAME/`` with ``refs/main`` naming a
``snapshots/<40 hex>/`` folder, as huggingface_hub writes it), read offline, as on a cluster node whose cache was
filled online. ``tiny-org/alpaca`` holds instruction records in ``data/train.jsonl`` (and a README, which is not
data) at ``main`` and a CSV at tag ``v1``; ``tiny-org/parquet`` is a dataset the Hub stores as Parquet only (read
with pyarrow: ``test_data_parquet.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lowmem_calls import lowmem_in_process

from lowmem_lightning.data import TextDataModule
from lowmem_lightning.data.reading import find_data_files, hub_data_patterns
from lowmem_lightning.lowmem_warning import LowMemWarning

MAIN, V1 = "3" * 40, "4" * 40
RECORDS = [{"instruction": f"Say {word}.", "input": "", "output": f"{word} {word}"}
           for word in ("hello", "world", "lightning", "memory", "adam", "eight", "bits", "tiny") * 8]


def _snapshot(cache: Path, repo_id: str, commit: str, *refs: str) -> Path:
    storage = cache / f"datasets--{repo_id.replace('/', '--')}"
    folder = storage / "snapshots" / commit
    folder.mkdir(parents=True)
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The hand-built cache, read offline by this process (huggingface_hub reads its environment at import)."""
    from huggingface_hub import constants

    root = tmp_path / "hf" / "hub"
    main = _snapshot(root, "tiny-org/alpaca", MAIN, "main")
    (main / "data").mkdir()
    (main / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (main / "README.md").write_text("# tiny alpaca\n")
    (main / "dataset_info.json").write_text("{}")
    v1 = _snapshot(root, "tiny-org/alpaca", V1, "v1")
    (v1 / "train.csv").write_text("text\n" + "".join(f"line {i} of the csv\n" for i in range(50)))
    _snapshot(root, "tiny-org/parquet", MAIN, "main")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return root


def test_a_dataset_id_and_a_revision_read_their_snapshots_data_files(cache):
    snapshots = cache / "datasets--tiny-org--alpaca" / "snapshots"
    assert find_data_files("tiny-org/alpaca") == [snapshots / MAIN / "data" / "train.jsonl"]  # no README, no info
    assert find_data_files("tiny-org/alpaca@v1") == [snapshots / V1 / "train.csv"]
    data = TextDataModule("tiny-org/alpaca", tokenizer="byte", seq_len=64, batch_size=2, val_fraction=0.1)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 64) and (batch["labels"] != -100).any()


def test_a_datasets_held_out_splits_are_left_out_and_said(cache):
    """A dataset with train and test files (UltraChat's ``data/train_sft-*`` / ``data/test_sft-*``): training reads
    the train files, one warning names those left out; a dataset of test files only is read whole."""
    folder = _snapshot(cache, "tiny-org/splits", "6" * 40, "main") / "data"
    folder.mkdir()
    for name in ("train_sft-00000-of-00001.jsonl", "test_sft-00000-of-00001.jsonl", "validation.jsonl"):
        (folder / name).write_text('{"text": "a line"}\n')
    with pytest.warns(LowMemWarning) as caught:
        files = find_data_files("tiny-org/splits")
    assert [f.name for f in files] == ["train_sft-00000-of-00001.jsonl"]
    [said] = [str(w.message) for w in caught]
    assert said.startswith("data_path='tiny-org/splits': the Hub dataset's held-out split files are left out "
                           "(data/test_sft-00000-of-00001.jsonl, data/validation.jsonl: 2 of 3); training reads "
                           "data/train_sft-00000-of-00001.jsonl. To train on a file or folder of your choice, name "
                           "it: data_path=hf://datasets/tiny-org/splits/PATH.")
    only_test = _snapshot(cache, "tiny-org/only-test", "7" * 40, "main")
    (only_test / "test.jsonl").write_text('{"text": "a line"}\n')
    assert find_data_files("tiny-org/only-test") == [only_test / "test.jsonl"]


def test_an_hf_url_picks_a_folder_or_a_file_of_the_dataset(cache):
    """``hf://datasets/ORG/NAME[@REV]/PATH`` (huggingface_hub's file-system notation) reads the folder or file named,
    held-out names included (the user chose them): SmolTalk's ``data/all`` beside its parts, which the whole
    dataset would read twice."""
    snapshot = _snapshot(cache, "tiny-org/smoltalk", "8" * 40, "main")
    for part in ("all", "magpie", "rewrite"):
        (snapshot / "data" / part).mkdir(parents=True)
        for split in ("train", "test"):
            (snapshot / "data" / part / f"{split}-00000-of-00001.jsonl").write_text('{"text": "a line"}\n')
    url = "hf://datasets/tiny-org/smoltalk"
    assert [f.relative_to(snapshot).as_posix() for f in find_data_files(f"{url}/data/all")] == [
        "data/all/test-00000-of-00001.jsonl", "data/all/train-00000-of-00001.jsonl"]
    assert find_data_files(f"{url}@main/data/magpie/train-00000-of-00001.jsonl") == [
        snapshot / "data" / "magpie" / "train-00000-of-00001.jsonl"]
    with pytest.warns(LowMemWarning, match="held-out split files are left out"):
        assert len(find_data_files(url)) == 3  # the id: every train file, of every part
    with pytest.raises(ValueError, match=r"Invalid data_path='hf://datasets/tiny-org/smoltalk/data/none': Hugging Face "
                                         r"Hub dataset 'tiny-org/smoltalk' holds no file or folder 'data/none'"):
        find_data_files(f"{url}/data/none")
    with pytest.raises(ValueError, match=r"expected hf://datasets/ORG/NAME\[@REVISION\]\[/PATH IN THE REPO\]"):
        find_data_files("hf://datasets/tiny-org")


def test_a_local_folder_of_that_name_is_read_instead(cache, tmp_path):
    local = tmp_path / "tiny-org" / "alpaca"
    local.mkdir(parents=True)
    (local / "mine.txt").write_text("my own text\n")
    assert find_data_files("tiny-org/alpaca") == [Path("tiny-org/alpaca/mine.txt")]


def test_a_missing_file_spelled_like_an_id_is_a_missing_file(cache):
    """``data/train.jsonl`` (a typo of a local file) is not looked up on the Hub: the refusal names the file."""
    for value in ("data/train.jsonl", "data/train.parquet", "data/corpus.gz"):
        with pytest.raises(ValueError, match=rf"Invalid data_path='{value}': no such file or directory \("):
            find_data_files(value)


def test_an_id_not_in_the_cache_offline_is_one_line_naming_it(cache):
    with pytest.raises(ValueError) as info:
        find_data_files("no-org/none")
    message = str(info.value)
    assert message.startswith("Invalid data_path='no-org/none': no local file or directory 'no-org/none' (relative "
                              "to the working directory ") and "\n" not in message
    for text in ("as a Hub dataset id: HF_HUB_OFFLINE=1 is set", "Hub dataset 'no-org/none' is not in the Hugging "
                 "Face cache", "pass a local file or directory"):
        assert text in message, message


def test_a_parquet_only_dataset_names_its_format_and_the_conversion_without_pyarrow(cache, monkeypatch, no_pyarrow):
    from lowmem_lightning import hub

    listed = {"README.md", "data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"}
    monkeypatch.setattr(hub, "_repo_files", lambda repo_id, revision, repo_type="model": listed)
    with pytest.raises(ValueError) as info:
        find_data_files("tiny-org/parquet")
    message = str(info.value)
    assert message.startswith("Invalid data_path='tiny-org/parquet': Hugging Face Hub dataset 'tiny-org/parquet': "
                              "its files are stored in a format lowmem does not read (2 such files; the first: "
                              "data/test-00000-of-00001.parquet is Parquet, which lowmem does not read: install "
                              "pyarrow")
    assert "to_json('train.jsonl')" in message


def test_hub_errors_name_the_dataset_and_its_page(monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants, errors

    request = httpx2.Request("GET", "https://huggingface.co/api/datasets/org/gated")
    error = errors.GatedRepoError("gated", response=httpx2.Response(403, request=request))

    def snapshot_download(*args, **kwargs):
        assert kwargs["repo_type"] == "dataset" and set(kwargs["allow_patterns"]) == set(hub_data_patterns())
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ValueError, match=r"as a Hub dataset id: Hub dataset 'org/gated' is gated: accept its license "
                                         r"on https://huggingface.co/datasets/org/gated and "):
        find_data_files("org/gated")


def test_lowmem_fit_trains_on_a_dataset_id_and_refuses_an_unknown_one(cache, capsys, monkeypatch, tmp_path):
    small = ["--config", "tiny.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
             "--trainer.val_check_interval", "2", "--data.init_args.seq_len", "32",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.callbacks.init_args.plot", "false"]
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", *small, "--data.data_path", "tiny-org/alpaca")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_loss" in (tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").read_text()
    proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "fit", *small, "--data.data_path", "no-org/none")
    assert proc.returncode == 2 and "Hub dataset 'no-org/none' is not in the Hugging Face cache" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs" / "tiny" / "version_1").exists()
