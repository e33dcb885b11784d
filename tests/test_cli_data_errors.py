"""Input errors of ``lowmem fit`` that used to surface after the Trainer was built (exit 1, a traceback,
an empty ``runs/.../version_N``): every one now ends with exit code 2, one short message naming the
file, line or argument, no traceback, and nothing written."""

from __future__ import annotations

import os
import pathlib
import re
from pathlib import Path

import pytest
from record_files import write_jsonl

from lowmem_lightning.cli import main, parse_fit_config
from lowmem_lightning.data import TextDataModule


def _fit(tmp_path: Path, capsys, *args: str) -> tuple[int, str]:
    runs = tmp_path / "runs"
    code = main([
        "fit", "--config", "tiny.yaml", "--trainer.max_steps", "2",
        "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs), *args,
    ])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not runs.exists(), sorted(str(p) for p in runs.rglob("*"))  # no version_N, nothing written
    return code, err


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", b"", r"Data file .*empty.txt is empty"),
        ("blank.jsonl", b"\n  \n", r"blank.jsonl is empty"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ("keys.jsonl", b'{"text": "ok"}\n{"prompt": "x"}\n', r"keys.jsonl:2: expected a string"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"),
         r"latin1.txt is not UTF-8 text \(invalid byte 0xe9 at offset 3\)"),
        ("image.txt", b"\x00\x01\x02PNG" * 50, r"image.txt looks binary"),
        ("tiny.txt", b"abc", r"data_path=.*tiny.txt.*seq_len=128: Too little data for val_fraction=0.05"),
    ],
)
def test_bad_data_file_is_a_short_error_before_anything_is_written(tmp_path, capsys, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    code, err = _fit(tmp_path, capsys, "--data.data_path", str(path))
    assert code == 2
    assert re.search(match, err), err
    assert len(err.strip().splitlines()) == 2  # the message and the --help hint


def test_unreadable_file_is_named(tmp_path, capsys, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("some text " * 100)
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    code, err = _fit(tmp_path, capsys, "--data.data_path", str(path))
    assert code == 2 and "Cannot read data file" in err and "secret.txt: Permission denied" in err


def test_no_trainable_label_is_refused_naming_the_settings(tmp_path, capsys):
    # bos + a 15-character prompt fill a 16-token block; the empty response leaves only eos, at position 0
    # of the next block, where a causal LM never predicts it: no block has a target token
    path = write_jsonl(tmp_path / "long_prompts.jsonl", [{"instruction": "x" * 15, "output": ""}] * 40)
    code, err = _fit(tmp_path, capsys, "--data.data_path", str(path), "--data.pack", "false",
                     "--data.seq_len", "16", "--data.prompt_template_no_input", "{instruction}")
    assert code == 2
    assert "No trainable label" in err and "seq_len=16" in err and "pack=True" in err


@pytest.mark.parametrize("files", ["none", "config only"])
def test_a_model_directory_without_its_tokenizer_is_refused_naming_what_is_missing(tmp_path, capsys, files):
    """``tokenizer: model`` on a checkpoint saved without its tokenizer: before, transformers' own error about
    sentencepiece came out for a Llama, and for a Gemma config (or a ``tokenizer_config.json`` without vocabulary) it
    silently built a 5-token tokenizer and trained on its unknown token only. Now exit 2 naming the directory and the
    files a tokenizer needs, with nothing written."""
    from transformers import LlamaConfig

    model = tmp_path / "checkpoint"
    model.mkdir()
    (model / "config.json").write_text(LlamaConfig(vocab_size=300).to_json_string())
    if files == "config only":
        (model / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
    code, err = _fit(tmp_path, capsys, "--data.tokenizer", "model", "--model.model_name_or_path", str(model),
                     "--model.config", "null")
    assert code == 2
    if files == "none":
        expected = (f"Invalid tokenizer={str(model)!r}: {model} holds no tokenizer files (none of tokenizer.json, "
                    "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt, spiece.model, tekken.json, "
                    "*.tiktoken): it is a model checkpoint saved without its tokenizer.")
    else:
        expected = (f"Invalid tokenizer={str(model)!r}: its vocabulary holds special tokens only (GemmaTokenizer "
                    "with 5 tokens), so it would encode every text as its unknown token or as nothing")
    assert expected in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 2


@pytest.mark.parametrize("damaged, text, where", [
    ("tokenizer.json", '{"version": "1.0", "truncation": nul', "Expecting value: line 1 column 34"),
    ("tokenizer_config.json", '{"unk_token": "[UNK]",}', "Expecting property name enclosed in double quotes: line 1 "
                                                        "column 23"),
])
def test_a_damaged_tokenizer_file_is_named_with_where_it_breaks(tmp_path, capsys, damaged, text, where):
    """A tokenizer directory with a truncated or hand-edited JSON file: before, the message was json's alone
    ("Expecting value: line 1 column 34 (char 33)"), naming neither the argument nor the file. Now both, and where
    the file breaks, exit 2, nothing written."""
    from tiny_tokenizers import word_tokenizer

    folder = word_tokenizer(tmp_path / "tok", ["the", "cat"])
    (folder / damaged).write_text(text)
    code, err = _fit(tmp_path, capsys, "--data.tokenizer", str(folder))
    assert code == 2
    assert (f"Invalid tokenizer={str(folder)!r}: {folder / damaged} is not valid JSON ({where}); save the tokenizer "
            "again (tokenizer.save_pretrained(dir)) or copy the file anew.") in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_blocks_without_a_target_are_left_out_with_a_warning(tmp_path):
    records = [{"instruction": "x" * 15, "output": ""}] * 10 + [{"text": "some words to learn"}] * 10
    dm = TextDataModule(str(write_jsonl(tmp_path / "mixed.jsonl", records)), seq_len=16, pack=False, val_fraction=0.0,
                        prompt_template_no_input="{instruction}", overflow="split")  # default: dropped whole
    with pytest.warns(UserWarning, match=r"20 of 40 blocks hold no trainable label.*raise seq_len"):
        dm.setup()
    assert len(dm.train_dataset) == 20
    assert all((b["labels"][1:] != -100).any() for b in dm.train_dataset)


def test_a_bad_cache_limit_is_refused_before_anything_is_written(tmp_path, capsys):
    code, err = _fit(tmp_path, capsys, "--data.cache_limit_gb", "-5")
    assert code == 2
    assert err.splitlines()[0] == ("lowmem fit: error: Invalid cache_limit_gb=-5.0: expected a positive number of GiB, "
                                   "the most the token cache's files may hold in all (cache_dir=False turns the cache "
                                   "off).")
    assert len(err.strip().splitlines()) == 2


def test_missing_ckpt_path(tmp_path, capsys):
    code, err = _fit(tmp_path, capsys, "--ckpt_path", str(tmp_path / "nope.ckpt"))
    assert code == 2 and "ckpt_path=" in err and "nope.ckpt" in err and "no such checkpoint file" in err


@pytest.mark.parametrize("key", ["--trainer.logger.init_args.save_dir", "--trainer.default_root_dir",
                                 "--model.init_args.save_dir"])
def test_unwritable_output_directory(tmp_path, capsys, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code, err = _fit(tmp_path, capsys, key, str(blocker / "out"))
    assert code == 2 and "cannot create the directory" in err and "a_file is a file" in err
    assert key.lstrip("-").split(".")[-1] in err


@pytest.mark.parametrize("key", ["--trainer.logger.init_args.save_dir", "--trainer.default_root_dir",
                                 "--model.init_args.save_dir"])
def test_output_directory_name_too_long_for_the_file_system(tmp_path, capsys, key):
    """A directory name over the file system's NAME_MAX (255 bytes here) fails every look-up of the path
    (ENAMETOOLONG, not a missing file): refused, naming the argument and the reason, not a traceback."""
    code, err = _fit(tmp_path, capsys, key, str(tmp_path / ("a" * 300) / "out"))
    assert code == 2 and "cannot create the directory (File name too long)" in err, err
    assert key.lstrip("-").split(".")[-1] in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("keys", [("--trainer.default_root_dir",), ("--trainer.logger.init_args.save_dir",),
                                  ("--trainer.logger.save_dir",), ("--model.init_args.save_dir",),
                                  ("--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                                   "--trainer.callbacks.dirpath")])
def test_output_directory_where_nothing_can_be_created(tmp_path, capsys, keys):
    """/proc passes ``os.access(W_OK)`` for root, yet refuses every new entry: only a real attempt tells, and the
    refusal names the argument and says in words what failed, with the system's reason, instead of a
    FileNotFoundError traceback from the logger."""
    code, err = _fit(tmp_path, capsys, *keys, "/proc/lowmem-out/run")
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "='/proc/lowmem-out/run': cannot create /proc/lowmem-out/run: " in errors[0], err
    assert errors[0].endswith(": No such file or directory; choose a writable directory.") or (
        os.geteuid() != 0 and errors[0].endswith(": /proc is not writable; choose a writable directory.")), err
    assert keys[-1].lstrip("-").split(".")[-1] in err
    assert not Path("/proc/lowmem-out").exists()


def test_read_only_output_directory(tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    code, err = _fit(tmp_path, capsys, "--model.init_args.save_dir", str(locked / "model"))
    assert code == 2 and "model.save_dir=" in err and "not writable" in err


def test_model_config_values_from_the_command_line_are_typed():
    cfg = parse_fit_config(["--config", "tiny.yaml", "--model.config.hidden_size", "64",
                            "--model.config.rms_norm_eps", "1e-5", "--model.config.tie_word_embeddings", "true",
                            "--model.config.hidden_act", "gelu"])
    config = cfg.model.init_args.config
    assert config["hidden_size"] == 64 and type(config["hidden_size"]) is int
    assert config["rms_norm_eps"] == 1e-5 and type(config["rms_norm_eps"]) is float
    assert config["tie_word_embeddings"] is True
    assert config["hidden_act"] == "gelu" and config["num_hidden_layers"] == 2


def test_cli_model_config_override_trains(tmp_path, capsys):
    code = main(["fit", "--config", "tiny.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
                 "--model.config.hidden_size", "64", "--model.config.intermediate_size", "96",
                 "--data.seq_len", "32", "--trainer.callbacks.plot", "false"])
    assert code == 0, capsys.readouterr().err
