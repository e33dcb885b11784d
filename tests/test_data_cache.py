"""The token cache of ``TextDataModule`` (``cache_dir``; :mod:`lowmem_lightning.data.token_cache`): a later start on
the same data loads what an earlier one tokenized, bit for bit, memory-mapped; small data writes nothing; a cache
that cannot be written, or a damaged one, is said once and never trained on; two builders of one key at once end with
one valid file; ``lowmem fit`` caches large data, and its DDP ranks load what one of them wrote."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from launched_scripts import run_script
from lowmem_calls import LOWMEM

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.data import text, token_cache
from lowmem_lightning.data.text import TextDataModule


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """The default cache directory, in ``tmp_path``, where even the tests' small data is cached."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(directory))
    monkeypatch.setattr(token_cache, "CACHE_MIN_BYTES", 0)
    return directory


def _data(tmp_path: Path, kind: str) -> Path:
    """A data directory: instruction records with plain text, or conversations."""
    folder = tmp_path / f"data_{kind}"
    folder.mkdir(exist_ok=True)
    if kind == "chat":
        records = [{"messages": [{"role": "user", "content": f"question {k} " * (k % 4 + 1)},
                                 {"role": "assistant", "content": f"reply {k} " * (k % 7 + 1)}]} for k in range(60)]
    else:
        records = [{"instruction": f"question {k}", "output": "answer " * (k % 9)} for k in range(60)]
        (folder / "notes.txt").write_text("plain text that is long enough to be split. " * 30)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


SETTINGS = {  # data kind, TextDataModule keyword arguments
    "packed": ("records", dict(seq_len=48)),
    "packed_not_isolated": ("records", dict(seq_len=48, isolate_documents=False)),
    "pack_false_overflow": ("records", dict(seq_len=24, pack=False)),
    "chat_pack_false": ("chat", dict(seq_len=100, pack=False, overflow="drop")),
}


def _module(path: Path, **kwargs) -> tuple[TextDataModule, list[str], list[str]]:
    """``(module, its lines, its warnings)`` after ``check_inputs``."""
    dm = TextDataModule(str(path), **{"val_fraction": 0.25, **kwargs})
    lines = []
    dm.progress = lines.append
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.check_inputs()
    return dm, lines, [str(w.message) for w in caught]


def _everything(dm: TextDataModule) -> dict:
    """All that a run reads of the module: every block and item, the split, the kinds of record, predict's prompts
    (or block prompts) and the resume fingerprints."""
    out = {"state": dm.state_dict(), "kinds": (dm.has_chat, dm.has_instructions, dm.has_plain_text)}
    for name, dataset in (("train", dm.train_dataset), ("val", dm.val_dataset)):
        out[name] = {key: dataset.blocks[key].tolist() for key in dataset.blocks}
        out[name + "_items"] = [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]
    if dm.answers_records:
        records = dm.answer_prompts()
        out["predict"] = [(r.prompt, r.ids, r.reference) for r in records.records]
        out["stops"] = dm.predict_stop_sequences
    else:
        out["predict"] = [batch["input_ids"].tolist() for batch in dm.predict_dataloader()]
    return out


def _mapped(path: Path) -> bool:
    """Whether this process maps the file ``path``."""
    return any(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize("name", SETTINGS)
def test_a_warm_start_loads_what_a_cold_build_made_bit_for_bit(name, tmp_path, cache, monkeypatch):
    kind, kwargs = SETTINGS[name]
    path = _data(tmp_path, kind)
    reference, _, reference_warnings = _module(path, cache_dir=False, **kwargs)
    assert not cache.exists()
    cold, cold_lines, cold_warnings = _module(path, **kwargs)
    (written,) = cache.glob("*.tokens")
    assert cold_lines == [f"TextDataModule: token cache written: {written} ({written.stat().st_size / 2**20:.1f} "
                          f"MiB); later runs on the same data and settings load it instead of reading and tokenizing "
                          f"({cold_lines[0].rsplit('(', 1)[1]}"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a warm start tokenized")

    monkeypatch.setattr(text, "encode_documents", no_tokenizing)
    warm, warm_lines, warm_warnings = _module(path, **kwargs)
    assert warm_lines == [f"TextDataModule: using the token cache {written} ({written.stat().st_size / 2**20:.1f} "
                          f"MiB) for data_path={str(path)!r}: no file read or tokenized."]
    assert _mapped(written)
    assert warm_warnings == cold_warnings == reference_warnings
    if kwargs.get("pack") is False:
        assert any("longer than seq_len" in w for w in warm_warnings)  # the overflow warning, said again
    assert _everything(warm) == _everything(cold) == _everything(reference)


def test_the_key_is_what_decides_the_tokens_and_the_split_is_not_in_it(tmp_path, cache):
    path = _data(tmp_path, "records")
    _module(path, seq_len=48)

    def used(**kwargs) -> bool:
        return any("using the token cache" in line for line in _module(path, **kwargs)[1])

    assert used(seq_len=48, seed=7) and used(seq_len=48, val_fraction=0.5)  # split after loading
    assert not used(seq_len=64)
    assert not used(seq_len=48, pack=False)
    assert not used(seq_len=48, isolate_documents=False)
    assert not used(seq_len=48, prompt_template_no_input="Q: {instruction}\nA: ")
    assert not used(seq_len=48, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    versions = token_cache.library_versions()
    with pytest.MonkeyPatch.context() as patch:  # another transformers may tokenize the same text otherwise
        patch.setattr(token_cache, "library_versions", lambda: {**versions, "transformers": "0.0"})
        assert not used(seq_len=48)
    with pytest.MonkeyPatch.context() as patch:  # other code of ours (an edit, an upgrade) may tokenize otherwise
        patch.setattr(token_cache, "pipeline_source_hash", lambda: "another pipeline")
        assert not used(seq_len=48)
    before = len(list(cache.glob("*.tokens")))
    with (path / "records.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": "one more", "output": "record"}) + "\n")
    dm, lines, _ = _module(path, seq_len=48)
    assert not any("using" in line for line in lines)
    assert len(list(cache.glob("*.tokens"))) == before + 1
    assert used(seq_len=48)


def test_every_data_module_that_makes_tokens_or_blocks_is_in_the_pipeline_hash():
    """An edit of any module of ``lowmem_lightning.data`` that turns records into tokens and blocks changes the key:
    each module is in ``PIPELINE_MODULES`` or named here as making nothing the cache holds (a new module must be
    placed), and the hash reads every one of them."""
    outside = {"__init__", "distributed", "fingerprint", "loader", "prompts"}
    modules = {path.stem for path in Path(token_cache.__file__).parent.glob("*.py")}
    assert modules - outside == set(token_cache.PIPELINE_MODULES)
    assert len(token_cache.PIPELINE_MODULES) == len(set(token_cache.PIPELINE_MODULES))
    token_cache.pipeline_source_hash.cache_clear()
    assert len(token_cache.pipeline_source_hash()) == 64


def test_small_data_is_not_cached_and_cache_dir_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(tmp_path / "cache"))
    _module(_data(tmp_path, "records"), seq_len=48)  # 3.6 KB read in well under 3 s
    assert not (tmp_path / "cache").exists()
    (tmp_path / "cache").mkdir()  # a cache directory in use: nothing added to it either
    _module(_data(tmp_path, "records"), seq_len=48)
    assert list((tmp_path / "cache").iterdir()) == []
    (tmp_path / "cache").rmdir()
    monkeypatch.setattr(token_cache, "CACHE_MIN_BYTES", 0)
    _, lines, _ = _module(_data(tmp_path, "records"), seq_len=48, cache_dir=False)
    assert lines == [] and not (tmp_path / "cache").exists()


def test_the_default_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWMEM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert token_cache.cache_directory(None) == tmp_path / "home/.cache/lowmem_lightning/tokens"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache.cache_directory(None) == tmp_path / "xdg/lowmem_lightning/tokens"
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(tmp_path / "mine"))
    assert token_cache.cache_directory(True) == tmp_path / "mine"
    assert token_cache.cache_directory("~/x") == tmp_path / "home/x"
    assert token_cache.cache_directory(False) is None
    with pytest.raises(TypeError, match=r"Invalid cache_dir=3: expected a directory path, None .* or False"):
        TextDataModule("sample", cache_dir=3)


@pytest.mark.parametrize("failure", ["unwritable", "disk_full"])
def test_a_cache_that_cannot_be_written_is_said_once_and_the_run_goes_on(failure, tmp_path, cache, monkeypatch):
    path = _data(tmp_path, "records")
    reference = _everything(_module(path, seq_len=48, cache_dir=False)[0])
    if failure == "unwritable":
        (tmp_path / "a_file").write_text("")
        kwargs, where = {"cache_dir": str(tmp_path / "a_file" / "cache")}, tmp_path / "a_file" / "cache"
    else:
        def full_disk(f, arrays, table):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(token_cache, "_write_arrays", full_disk)
        kwargs, where = {}, cache
    dm, lines, caught = _module(path, seq_len=48, **kwargs)
    assert lines == []
    assert caught == [f"TextDataModule: cannot write the token cache in {where} "
                      f"({'Not a directory' if failure == 'unwritable' else 'No space left on device'}); this run "
                      "goes on without it (set cache_dir to a writable directory, or cache_dir=False to not try)."]
    assert _everything(dm) == reference
    assert not where.exists() or list(where.iterdir()) == []  # no temporary file left behind


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path, cache):
    path = _data(tmp_path, "records")
    _module(path, seq_len=48)
    (written,) = cache.glob("*.tokens")
    written.unlink()
    stale, live = cache / f".{written.name}.999.dead.tmp", cache / f".{written.name}.998.live.tmp"
    for temporary in (stale, live):
        temporary.write_bytes(b"partial")
    old = stale.stat().st_mtime - token_cache.STALE_TEMPORARY_S - 1
    os.utime(stale, (old, old))
    _module(path, seq_len=48)
    assert written.exists() and not stale.exists() and live.exists()  # a writer busy now keeps its file


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) - 100]
    elif how == "array_byte":
        data[len(data) // 2] ^= 0x01  # inside the token ids
    elif how == "header_byte":
        data[60] ^= 0x01
    else:
        data = data[:30]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "array_byte", "header_byte", "cut_in_prefix"])
def test_a_damaged_cache_is_rebuilt_with_one_warning_never_trained_on(how, tmp_path, cache):
    path = _data(tmp_path, "records")
    reference = _everything(_module(path, seq_len=48, cache_dir=False)[0])
    _module(path, seq_len=48)
    (written,) = cache.glob("*.tokens")
    _damage(written, how)
    dm, lines, caught = _module(path, seq_len=48)
    assert len(caught) == 1 and caught[0].startswith(f"TextDataModule: the token cache {written} is damaged (")
    assert caught[0].endswith("); it is not used, the data is read and tokenized again and the cache rewritten.")
    assert _everything(dm) == reference
    assert len(lines) == 1 and "token cache written" in lines[0]
    dm, lines, caught = _module(path, seq_len=48)  # the rewritten file is whole
    assert caught == [] and "using the token cache" in lines[0] and _everything(dm) == reference


def _used_at(path: Path, seconds: float) -> None:
    os.utime(path, (seconds, seconds))


def test_a_new_cache_file_removes_the_least_recently_used_beyond_the_limit(tmp_path, cache):
    """Three datasets' caches under a limit that holds two: the third removes the one least recently used, not the
    one least recently written; a user's own files in the directory, and another key's killed writer's temporary
    file that is still being written, are left alone; the stale one is removed."""
    path = _data(tmp_path, "records")
    _module(path, seq_len=48)
    (first,) = cache.glob("*.tokens")
    _module(path, seq_len=40)
    (second,) = set(cache.glob("*.tokens")) - {first}
    _used_at(first, 1_000_000)
    _used_at(second, 2_000_000)  # the first is the older ...
    assert "using the token cache" in _module(path, seq_len=48)[1][0]  # ... until it is read: now the newer
    mine = cache / "notes.txt"
    stale, live = cache / f".{'a' * 64}.tokens.1.dead.tmp", cache / f".{'b' * 64}.tokens.2.x.tmp"
    for kept in (mine, stale, live):
        kept.write_bytes(b"x" * 10_000_000)  # larger than the limit: they are not cache files
    _used_at(stale, time.time() - token_cache.STALE_TEMPORARY_S - 1)
    sizes = {p: p.stat().st_size for p in (first, second)}
    limit_gb = (max(sizes.values()) * 2.5) / 2**30
    dm, lines, caught = _module(path, seq_len=56, cache_limit_gb=limit_gb)
    (third,) = set(cache.glob("*.tokens")) - {first, second}
    assert caught == [] and not second.exists() and first.exists() and third.exists()
    assert mine.exists() and live.exists() and not stale.exists()
    assert len(lines) == 1 and lines[0].startswith(f"TextDataModule: token cache written: {third} (")
    assert lines[0].endswith(f" s). Removed 1 least recently used cache file ({sizes[second] / 2**20:.1f} MiB) to "
                             f"stay within cache_limit_gb={limit_gb}.")
    assert sum(p.stat().st_size for p in cache.glob("*.tokens")) <= limit_gb * 2**30
    assert "using the token cache" in _module(path, seq_len=48, cache_limit_gb=limit_gb)[1][0]


def test_data_larger_than_the_limit_alone_is_not_cached_and_nothing_is_removed(tmp_path, cache):
    path = _data(tmp_path, "records")
    reference = _everything(_module(path, seq_len=48, cache_dir=False)[0])
    _module(path, seq_len=40)
    (kept,) = cache.glob("*.tokens")
    dm, lines, caught = _module(path, seq_len=48, cache_limit_gb=1e-6)  # 1 KiB
    assert caught == [] and _everything(dm) == reference
    size = token_cache.file_size("0" * 64, *_module(path, seq_len=48, cache_dir=False)[0]._tokens().to_cache())
    assert lines == [f"TextDataModule: the token cache is not written: this data's file would take "
                     f"{size / 2**30:.2f} GiB, more than cache_limit_gb=1e-06 (--data.cache_limit_gb raises it)."]
    assert list(cache.iterdir()) == [kept]


def test_a_cache_file_that_cannot_be_removed_keeps_the_limit_by_not_writing(tmp_path, cache, monkeypatch):
    """A shared cache directory holding another user's file the limit would remove: nothing is written (the limit
    holds), the run goes on from the files, one line says which file and why."""
    path = _data(tmp_path, "records")
    reference = _everything(_module(path, seq_len=48, cache_dir=False)[0])
    _module(path, seq_len=40)
    (theirs,) = cache.glob("*.tokens")
    unlink = Path.unlink

    def not_ours(self, missing_ok=False):
        if self == theirs:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", not_ours)
    limit_gb = theirs.stat().st_size * 1.5 / 2**30
    dm, lines, caught = _module(path, seq_len=48, cache_limit_gb=limit_gb)
    assert caught == [] and _everything(dm) == reference
    assert lines == [f"TextDataModule: the token cache is not written: {theirs} cannot be removed to stay within "
                     f"cache_limit_gb={limit_gb} (Permission denied); raise --data.cache_limit_gb, or set "
                     "--data.cache_dir to a directory of your own."]
    assert list(cache.iterdir()) == [theirs]


def test_file_size_is_the_size_write_cache_writes(tmp_path):
    dm = _module(_data(tmp_path, "chat"), seq_len=400, pack=False, cache_dir=False)[0]
    meta, arrays = dm._tokens().to_cache()
    written = token_cache.write_cache(tmp_path / "x.tokens", "k" * 64, meta, arrays)
    assert token_cache.file_size("k" * 64, meta, arrays) == written == (tmp_path / "x.tokens").stat().st_size


@pytest.mark.parametrize("room", ["short", "enough", "enough_after_removing"])
def test_a_cache_file_never_takes_the_room_checkpoints_need(room, tmp_path, cache, monkeypatch):
    """The disk (made up: 100 GiB, so 5 GiB stay free) keeps room for checkpoints: a file that would leave less is
    not written, and the data is read as always; counting what the limit's removals free."""
    path = _data(tmp_path, "records")
    reference = _everything(_module(path, seq_len=48, cache_dir=False)[0])
    _module(path, seq_len=40)
    (old,) = cache.glob("*.tokens")
    size = token_cache.file_size("0" * 64, *_module(path, seq_len=48, cache_dir=False)[0]._tokens().to_cache())
    free = {"short": 5 * 2**30 + size - 1, "enough": 5 * 2**30 + size,
            "enough_after_removing": 5 * 2**30 + size - old.stat().st_size}[room]
    usage = shutil.disk_usage(cache)._replace(total=100 * 2**30, free=free)
    monkeypatch.setattr(token_cache.shutil, "disk_usage", lambda where: usage)
    limit = {"enough_after_removing": (size + 10) / 2**30}.get(room, token_cache.CACHE_LIMIT_GB)
    dm, lines, caught = _module(path, seq_len=48, cache_limit_gb=limit)
    assert caught == [] and _everything(dm) == reference and len(lines) == 1
    if room == "short":
        assert lines == [f"TextDataModule: the token cache is not written: its {size / 2**30:.2f} GiB would leave "
                         f"{(5 * 2**30 - 1) / 2**30:.2f} GiB free on the disk of {cache}, which keeps 5.00 GiB free "
                         "for checkpoints (--data.cache_dir elsewhere, or --data.cache_dir false)."]
        assert list(cache.iterdir()) == [old]
    else:
        assert "token cache written" in lines[0] and len(list(cache.glob("*.tokens"))) == (
            2 if room == "enough" else 1)
        assert old.exists() == (room == "enough")


def test_a_disk_that_cannot_be_asked_does_not_stop_the_cache(tmp_path, cache, monkeypatch):
    def unanswered(where):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(token_cache.shutil, "disk_usage", unanswered)
    assert token_cache.disk_shortfall(cache, 10**15) is None
    _, lines, caught = _module(_data(tmp_path, "records"), seq_len=48)
    assert caught == [] and len(lines) == 1 and "token cache written" in lines[0]


@pytest.mark.parametrize("value", [0, -1.0, True, "20", float("inf"), float("nan")])
def test_a_bad_cache_limit_is_refused_naming_it(value):
    with pytest.raises(ValueError) as caught:
        TextDataModule("sample", cache_limit_gb=value)
    assert str(caught.value) == (f"Invalid cache_limit_gb={value!r}: expected a positive number of GiB, the most the "
                                 "token cache's files may hold in all (cache_dir=False turns the cache off).")


def _build_in_child(path: str, directory: str, barrier, results) -> None:
    token_cache.CACHE_MIN_BYTES = 0
    dm = TextDataModule(path, seq_len=48, val_fraction=0.25, cache_dir=directory)
    lines = []
    dm.progress = lines.append
    barrier.wait()
    dm.check_inputs()
    digest = hashlib.sha256()
    for dataset in (dm.train_dataset, dm.val_dataset):
        for key in dataset.blocks:
            digest.update(dataset.blocks[key].numpy().tobytes())
    results.put((digest.hexdigest(), "using the token cache" in "".join(lines)))


@pytest.mark.parametrize("directory_exists", [True, False])  # locked; not locked (the first run: no directory)
def test_two_processes_building_one_key_at_once_end_with_one_valid_cache(directory_exists, tmp_path):
    path = _data(tmp_path, "records")
    directory = tmp_path / "cache"
    if directory_exists:
        directory.mkdir()
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(path), str(directory), barrier, results))
                for _ in range(2)]
    for child in children:
        child.start()
    digests, loaded = zip(*[results.get(timeout=120) for _ in children])
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    reference = TextDataModule(str(path), seq_len=48, val_fraction=0.25, cache_dir=False)
    reference.check_inputs()
    digest = hashlib.sha256()
    for dataset in (reference.train_dataset, reference.val_dataset):
        for key in dataset.blocks:
            digest.update(dataset.blocks[key].numpy().tobytes())
    assert list(digests) == [digest.hexdigest()] * 2
    if directory_exists:  # the lock: one tokenized, the other waited and loaded its cache
        assert sorted(loaded) == [False, True]
    assert [p.suffix for p in directory.iterdir()] == [".tokens"]  # no temporary or lock file left
    dm, lines, caught = _module(path, seq_len=48, cache_dir=str(directory))
    assert caught == [] and "using the token cache" in lines[0]


def _lowmem(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([LOWMEM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


QUICK = ["--config", str(RECIPES_DIR / "tiny.yaml"), "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.seq_len", "32"]


def test_lowmem_fit_on_the_sample_writes_nothing_under_home_and_caches_large_data(tmp_path, capsys, monkeypatch):
    """Two real ``lowmem fit`` processes (the sample; 8 MiB of text, whose tokens are cached), then the same fit of
    the large text by lowmem's entry point in this process, which loads the cache the process wrote."""
    from lowmem_lightning.cli import main

    env = {**os.environ, "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "COLUMNS": "200"}
    env.pop("LOWMEM_CACHE_DIR", None)
    _lowmem(tmp_path, env, "fit", *QUICK)
    assert not (tmp_path / "xdg" / "lowmem_lightning").exists()
    assert not (tmp_path / "home" / ".cache" / "lowmem_lightning").exists()
    big = tmp_path / "big.txt"  # 8 MiB of text: cached however fast it was read
    line = "The quick brown fox jumps over the lazy dog, again and again.\n"
    big.write_text(line * (token_cache.CACHE_MIN_BYTES // len(line) + 1))
    args = ["fit", *QUICK, "--data.data_path", str(big), "--data.cache_dir", str(tmp_path / "tokens")]
    first = _lowmem(tmp_path, env, *args)
    (written,) = (tmp_path / "tokens").glob("*.tokens")
    assert f"lowmem: TextDataModule: token cache written: {written} (" in first.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    for key in ("HOME", "XDG_CACHE_HOME", "COLUMNS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("LOWMEM_CACHE_DIR", raising=False)
    monkeypatch.setenv("PL_GLOBAL_SEED", "")  # the fit's seed_everything sets it: gone again after the test
    monkeypatch.delenv("PL_GLOBAL_SEED")
    capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()
    assert f"lowmem: TextDataModule: using the token cache {written} (" in second.err


@pytest.mark.slow
def test_ddp_ranks_load_the_cache_one_of_them_wrote(tmp_path):
    big = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog, again and again.\n"
    big.write_text(line * (token_cache.CACHE_MIN_BYTES // len(line) + 1))
    env = {**os.environ, "COLUMNS": "200", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    args = ["fit", *QUICK, "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
            "--data.data_path", str(big), "--data.cache_dir", str(tmp_path / "tokens")]
    first = _lowmem(tmp_path, env, *args)
    (written,) = (tmp_path / "tokens").glob("*.tokens")
    assert (first.stdout + first.stderr).count("token cache written") == 1
    identity = (written.stat().st_ino, written.stat().st_size)
    second = _lowmem(tmp_path, env, *args)
    assert "using the token cache" in second.stderr
    assert "token cache written" not in second.stdout + second.stderr
    # no rank rebuilt it (a cache is written to a temporary file renamed over it: a new inode); its mtime moves, as
    # reading a cache marks it used for the cache_limit_gb eviction
    assert (written.stat().st_ino, written.stat().st_size) == identity
    assert list((tmp_path / "tokens").glob(".*.tmp")) == []


DDP_SCRIPT = """
import json, os, sys
import lightning as L
import torch
from lowmem_lightning.data import token_cache
from lowmem_lightning.data.text import TextDataModule

token_cache.CACHE_MIN_BYTES = 0  # the small data cached
LINES = []  # this rank's data module lines


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(259, 8)
        self.head = torch.nn.Linear(8, 259)

    def training_step(self, batch, batch_idx):
        logits = self.head(self.embed(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(TextDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        blocks = self.train_dataset.blocks
        with open(os.path.join(sys.argv[2], f"rank{self.trainer.global_rank}.json"), "w") as f:
            json.dump({"lines": LINES, "ids": blocks["input_ids"].sum().item(), "n": blocks.n_blocks}, f)


if __name__ == "__main__":
    data = Data(sys.argv[1], seq_len=48, batch_size=4, cache_dir=os.path.join(sys.argv[2], "tokens"))
    data.progress = LINES.append
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=sys.argv[2])
    trainer.fit(Model(), datamodule=data)
"""


@pytest.mark.slow
def test_a_python_ddp_fit_tokenizes_on_local_rank_0_and_the_other_rank_loads(tmp_path):
    (tmp_path / "tokens").mkdir()
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    run_script(script, str(_data(tmp_path, "records")), str(tmp_path), cwd=tmp_path, port=True, quiet=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["ids"] == ranks[1]["ids"] and ranks[0]["n"] == ranks[1]["n"]
    assert len(ranks[0]["lines"]) == 1 and "token cache written" in ranks[0]["lines"][0]  # in prepare_data
    assert len(ranks[1]["lines"]) == 1 and "using the token cache" in ranks[1]["lines"][0]
