"""Hugging Face Hub repo ids wherever a model or tokenizer directory is accepted (:mod:`lowmem_lightning.hub`).

There is no network here, so the Hub is a hand-built HF cache in ``tmp_path`` (``HF_HOME``; ``models--ORG--NAME/``
with ``refs/main`` naming a ``snapshots/<40 hex>/`` folder, as huggingface_hub writes it) and the ``lowmem``
processes run with ``HF_HUB_OFFLINE=1``, as a user on an offline cluster node whose cache was filled online. Its
``tiny-org/tiny-llama`` holds a tiny Llama (``save_pretrained``) and a word-level tokenizer at ``main``, and another
model at tag ``v1``; ``tiny-org/pickled`` holds ``pytorch_model.bin`` weights only; ``meta-llama/Llama-2-7b-hf``
holds only the ``config.json`` of the recipes' ``llama-2-7b`` folder (what ``lowmem estimate`` downloads). The
online refusals (401/403/404, gated, no such revision) are checked on the resolver with huggingface_hub's own
exceptions raised from a replaced ``snapshot_download``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lowmem_calls import LOWMEM, lowmem_in_process
from tiny_tokenizers import word_tokenizer

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.hub import is_repo_id, resolve_pretrained, split_repo_id

MAIN, V1 = "1" * 40, "2" * 40  # commit hashes of the hand-built snapshots
SMALL = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--data.init_args.seq_len", "32", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 259}


def _snapshot(cache: Path, repo_id: str, commit: str, *refs: str) -> Path:
    """``cache/models--ORG--NAME/snapshots/COMMIT`` (created), named by ``refs/REF`` for each of ``refs``."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    folder = storage / "snapshots" / commit
    folder.mkdir(parents=True)
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A folder holding ``hf/`` (the HF_HOME of the hand-built cache, ``hf/hub``) and the tiny recipe ``tiny.yaml``
    (no plot)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf" / "hub"
    for commit, refs, seed in ((MAIN, ("main",), 0), (V1, ("v1",), 1)):
        folder = _snapshot(cache, "tiny-org/tiny-llama", commit, *refs)
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
        word_tokenizer(folder, ["the", "a", "of"] if seed == 0 else ["the", "a", "of", "to"])
    pickled = _snapshot(cache, "tiny-org/pickled", MAIN, "main")
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    llama7b = _snapshot(cache, "meta-llama/Llama-2-7b-hf", MAIN, "main")
    shutil.copy(RECIPES_DIR / "llama-2-7b" / "config.json", llama7b / "config.json")
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    for callback in recipe["trainer"]["callbacks"]:
        callback["init_args"]["plot"] = False
    recipe["model"]["init_args"].pop("config")
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_CACHE")}
    return {**env, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _lowmem(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LOWMEM, *args], cwd=root, capture_output=True, text=True, timeout=600, env=_env(root))


def _fit(root: Path, run: str, *args: str) -> Path:
    """``lowmem fit`` of the tiny recipe with ``args``, logging to ``root/runs/RUN``; its last checkpoint."""
    proc = _lowmem(root, "fit", "--config", "tiny.yaml", "--trainer.logger.init_args.name", run,
                   "--trainer.default_root_dir", f"runs/{run}", *SMALL, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [ckpt] = (root / "runs" / run).glob("version_*/checkpoints/*.ckpt")
    return ckpt


@pytest.mark.slow
def test_fit_from_a_hub_id_full_and_qlora_then_export_and_resume(hub):
    """``lowmem fit`` trains from ``tiny-org/tiny-llama`` (full fine-tune, with the repo's tokenizer given by id;
    QLoRA nf4): the weights are the snapshot's, the checkpoint keeps the ids as given, a resume from it accepts the
    tokenizer (same snapshot, same fingerprint), and ``lowmem export`` of the QLoRA run writes an adapter naming its
    base model by repo id."""
    from transformers import AutoModelForCausalLM

    full = _fit(hub, "full", "--model.model_name_or_path", "tiny-org/tiny-llama",
                "--data.tokenizer", "tiny-org/tiny-llama")
    saved = torch.load(full, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["model_name_or_path"] == "tiny-org/tiny-llama"
    assert saved["datamodule_hyper_parameters"]["tokenizer"] == "tiny-org/tiny-llama"
    proc = _lowmem(hub, "fit", "--config", "tiny.yaml", "--trainer.logger.init_args.name", "full",
                   "--trainer.default_root_dir", "runs/full", *SMALL, "--trainer.max_steps", "3",
                   "--model.model_name_or_path", "tiny-org/tiny-llama", "--data.tokenizer", "tiny-org/tiny-llama",
                   "--ckpt_path", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokenizer:" not in proc.stderr  # no tokenizer change reported

    qlora = _fit(hub, "qlora", "--model.model_name_or_path", "tiny-org/tiny-llama@v1", "--model.quantize", "nf4",
                 "--model.lora", "{r: 4}")
    assert torch.load(qlora, map_location="cpu", weights_only=False)["hyper_parameters"]["model_name_or_path"] == \
        "tiny-org/tiny-llama@v1"
    proc = _lowmem(hub, "export", "--config", "tiny.yaml", "--ckpt_path", str(qlora), "--model_from_ckpt", "true",
                   "--save_dir", "adapter")
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = json.loads((hub / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-org/tiny-llama"
    assert adapter["revision"] == V1  # the commit trained on, so AutoPeftModel loads that base, not main's
    # the v1 snapshot's weights were the base: its (frozen, NF4) embeddings are in the checkpoint
    v1 = AutoModelForCausalLM.from_pretrained(hub / "hf/hub/models--tiny-org--tiny-llama/snapshots" / V1)
    state = torch.load(qlora, map_location="cpu", weights_only=False)["state_dict"]
    [embedding] = [value for key, value in state.items() if key.endswith("embed_tokens.weight")]
    assert torch.equal(embedding, v1.model.embed_tokens.weight)


def test_estimate_from_a_hub_id_reads_only_its_config(hub, capsys, monkeypatch):
    """``lowmem estimate --config qlora_7b.yaml`` from ``meta-llama/Llama-2-7b-hf``, whose cache holds config.json
    only, gives the numbers of the recipe's local architecture folder. The id is estimated by a real ``lowmem``
    process; the local folder by the same entry point in this process."""
    command = ("estimate", "--config", "qlora_7b.yaml", "--format", "json")
    proc = _lowmem(hub, *command, "--model.model_name_or_path", "meta-llama/Llama-2-7b-hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_id = json.loads(proc.stdout)
    local = _lowmem_in_process(hub, monkeypatch, capsys, *command)
    assert local.returncode == 0, local.stderr[-3000:]
    assert by_id == json.loads(local.stdout)
    assert by_id["trainable_bytes"] > 0


def _refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "error:" in line]
    for text in expected:
        assert text in line, line
    return line


SUBPROCESS_REFUSALS = ("not_cached",)
"""The refusal of :func:`test_fit_refuses_an_id_it_cannot_resolve_before_any_work` run as a real ``lowmem fit`` (the
environment's ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` read at import, as users meet them): an id not in the cache. The
cached repo refused for its files reads the same cache in this process."""


def _lowmem_in_process(root: Path, monkeypatch, capsys, *args: str) -> subprocess.CompletedProcess:
    """``lowmem ARGS`` in ``root`` by the console script's entry point in this process, reading the hand-built cache
    offline (:func:`offline_cache`'s settings), as a :class:`subprocess.CompletedProcess`."""
    from huggingface_hub import constants

    for key, value in _env(root).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return lowmem_in_process(capsys, monkeypatch, root, *args)


@pytest.mark.parametrize(("args", "expected"), [
    (["--model.model_name_or_path", "tiny-org/absent"],
     ["model_name_or_path='tiny-org/absent': no local directory 'tiny-org/absent' (relative to the working directory ",
      "; as a Hub repo id: HF_HUB_OFFLINE=1 is set and Hub repo 'tiny-org/absent' is not in the Hugging Face cache",
      "download it once online", "pass a local directory"]),
    (["--model.model_name_or_path", "tiny-org/tiny-llama@v9"],
     ["model_name_or_path='tiny-org/tiny-llama@v9'", "at revision 'v9'", "not in the Hugging Face cache"]),
    (["--model.model_name_or_path", "not/a/repo"],
     ["model_name_or_path='not/a/repo': no such local directory (",
      "/not/a/repo), and not a Hugging Face Hub repo id"]),
    (["--model.model_name_or_path", "./tiny-org/tiny-llama"],  # the cached repo's id, written as a path
     ["model_name_or_path='./tiny-org/tiny-llama': no such local directory (", "/tiny-org/tiny-llama); a value "
      "starting with ./, ../, / or ~ is a local path, never a Hugging Face Hub repo id"]),
    (["--model.model_name_or_path", "../tiny-org/tiny-llama"],
     ["model_name_or_path='../tiny-org/tiny-llama': no such local directory (", "is a local path, never"]),
    (["--model.model_name_or_path", "tiny-org/pickled"],
     ["model_name_or_path='tiny-org/pickled'", "PyTorch pickle weights (['pytorch_model.bin'])", "safetensors"]),
    (["--model.model_name_or_path", "tiny-org/tiny-llama", "--data.tokenizer", "tiny-org/absent-tokenizer"],
     ["tokenizer='tiny-org/absent-tokenizer'", "not in the Hugging Face cache"]),
], ids=["not_cached", "revision_not_cached", "malformed", "dot_slash_path", "dot_dot_path", "pickle_only",
        "tokenizer_not_cached"])
def test_fit_refuses_an_id_it_cannot_resolve_before_any_work(hub, args, expected, request, capsys, monkeypatch):
    """Exit 2, one line naming the argument, the value and the fix; no run folder written. One case runs as a real
    ``lowmem`` process (:data:`SUBPROCESS_REFUSALS`); the others call its entry point in this process with the
    same offline cache (:func:`_lowmem_in_process`)."""
    command = ("fit", "--config", "tiny.yaml", "--trainer.default_root_dir", "runs/refused",
               "--trainer.logger.init_args.name", "refused", *SMALL, *args)
    if request.node.callspec.id in SUBPROCESS_REFUSALS:
        _refused(_lowmem(hub, *command), *expected)
    else:
        _refused(_lowmem_in_process(hub, monkeypatch, capsys, *command), *expected)
    assert not (hub / "runs" / "refused").exists()


# ------------------------------------------------------------------------------------------ in process
@pytest.fixture
def offline_cache(hub, monkeypatch):
    """This process reads the hand-built cache, offline (huggingface_hub reads its environment at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub / "hf" / "hub"


def test_repo_id_spelling():
    assert split_repo_id("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", None)
    assert split_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    for bad in ("name", "a/b/c", "/abs/path", "./rel", "./models/llama", "../x/y", "~/x/y", "~x/y",
                "org//name", "org/na--me", "org/name@", "org/na me", "-a/b"):
        assert not is_repo_id(bad), bad


def test_tokenizer_by_id_and_revision_with_a_stable_fingerprint(offline_cache, tmp_path):
    """The tokenizer of ``org/name`` and of ``org/name@v1`` are the snapshots'; the resume fingerprint of the id is
    that of the same files in a local directory (by content), stable across loads, and names the id."""
    from lowmem_lightning.data.fingerprint import tokenizer_fingerprint
    from lowmem_lightning.data.tokenizer import load_tokenizer

    main, v1 = load_tokenizer("tiny-org/tiny-llama"), load_tokenizer("tiny-org/tiny-llama@v1")
    assert (main.name, main.vocab_size, v1.vocab_size) == ("tiny-org/tiny-llama", 7, 8)
    local = tmp_path / "tok"
    shutil.copytree(offline_cache / "models--tiny-org--tiny-llama" / "snapshots" / MAIN, local)
    vocab = tuple(main.tokenizer.vocab_files_names.values())
    by_id = tokenizer_fingerprint("tiny-org/tiny-llama", vocab)
    assert by_id["source"] == "tokenizer='tiny-org/tiny-llama'"
    assert by_id["sha256"] == tokenizer_fingerprint(str(local), vocab)["sha256"] == \
        tokenizer_fingerprint("tiny-org/tiny-llama", vocab)["sha256"]
    assert by_id["sha256"] != tokenizer_fingerprint("tiny-org/tiny-llama@v1", vocab)["sha256"]


def test_model_loaders_take_an_id(offline_cache):
    """``validate_model_args``, ``read_model_config``, the NF4 loader and its header check take the id; a commit
    hash works as a revision."""
    from lowmem_lightning.modules.causal_lm import validate_model_args
    from lowmem_lightning.quant.loading import (
        check_pretrained_checkpoint,
        load_pretrained_causal_lm,
        read_model_config,
    )

    validate_model_args("tiny-org/tiny-llama", None, None, None)
    assert read_model_config(f"tiny-org/tiny-llama@{V1}").hidden_size == 32
    check_pretrained_checkpoint("tiny-org/tiny-llama", "nf4", torch.float32)
    model = load_pretrained_causal_lm(f"tiny-org/tiny-llama@{V1}", torch_dtype=torch.float32)
    snapshots = offline_cache / "models--tiny-org--tiny-llama" / "snapshots"
    v1, main = (load_pretrained_causal_lm(snapshots / commit, torch_dtype=torch.float32) for commit in (V1, MAIN))
    assert torch.equal(model.model.embed_tokens.weight, v1.model.embed_tokens.weight)
    assert not torch.equal(model.model.embed_tokens.weight, main.model.embed_tokens.weight)
    with pytest.raises(ValueError, match=r"Invalid path='tiny-org/gone': no local directory 'tiny-org/gone' "
                       r"\(relative to the working directory .*\); as a Hub repo id: HF_HUB_OFFLINE"):
        load_pretrained_causal_lm("tiny-org/gone")


def _raising(error: Exception):
    def snapshot_download(*args, **kwargs):
        raise error
    return snapshot_download


def _http(cls, status: int, message: str = "refused"):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))
    return cls(message, response=response)


def _hub_errors():
    from huggingface_hub import errors

    return [
        (_http(errors.GatedRepoError, 403), ["is gated", "accept its license on https://huggingface.co/org/name",
                                             "hf auth login", "HF_TOKEN"]),
        (_http(errors.RepositoryNotFoundError, 401), ["not found or is not accessible (HTTP 401)", "check the id",
                                                      "HF_TOKEN"]),
        (_http(errors.RepositoryNotFoundError, 404), ["(HTTP 404)"]),
        (_http(errors.HfHubHTTPError, 403), ["(HTTP 403)", "huggingface-cli login"]),
        (_http(errors.RevisionNotFoundError, 404), ["has no revision 'dev'"]),
        (errors.LocalEntryNotFoundError("no connection"), ["the Hub cannot be reached", "not in the Hugging Face cache",
                                                           "pass a local directory"]),
    ]


@pytest.mark.parametrize("case", range(6), ids=["gated", "401", "404", "403", "revision", "no_network"])
def test_hub_errors_become_one_line_refusals(case, monkeypatch):
    """huggingface_hub's exceptions from ``snapshot_download`` become a ``ValueError`` naming the argument, the value
    and what to do."""
    import huggingface_hub
    from huggingface_hub import constants

    error, expected = _hub_errors()[case]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _raising(error))
    with pytest.raises(ValueError) as info:
        resolve_pretrained("org/name@dev", "tokenizer", need="tokenizer")
    message = str(info.value)
    assert message.startswith("Invalid tokenizer='org/name@dev': no local directory 'org/name@dev' (relative to the "
                              f"working directory {Path.cwd()}); as a Hub repo id: ") and "\n" not in message
    for text in expected:
        assert text in message, message


def test_pickle_only_repo_named_from_the_hubs_file_list(monkeypatch, tmp_path):
    """Online, the snapshot holds what was asked for (config.json); the repo's file list (cached by huggingface_hub
    while downloading) shows pickles only: refused naming them, before any weights are read."""
    import huggingface_hub
    from huggingface_hub import RepoFile

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    listing = [RepoFile(path=name, size=1, oid="0") for name in ("config.json", "pytorch_model.bin")]
    monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree", lambda *a, **k: listing)
    with pytest.raises(ValueError, match=r"'org/name' holds PyTorch pickle weights \(\['pytorch_model.bin'\]\)"):
        resolve_pretrained("org/name", "model_name_or_path")
