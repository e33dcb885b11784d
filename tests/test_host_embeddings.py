"""``host_embeddings``: the embedding tables LoRA leaves frozen and no output head shares are held in host memory
(:class:`~lowmem_lightning.quant.host_embeddings.HostEmbedding`) and train exactly as on the device.

On tiny checkpoints written by ``save_pretrained`` (a Gemma 4 with per-layer input embeddings, whose main embedding is
tied to the head; an untied Llama): QLoRA and bf16 LoRA builds give the same logits, LoRA gradients and state dict
with and without it; only the right tables move; casts and ``load_state_dict`` keep them on the host; ``lowmem
estimate`` counts them as host memory; a ``lowmem fit`` with it trains, resumes and exports as one without it. The
GPU side (page-locked tables read by the Triton gather through unified addressing) is ``benchmarks/gpu_check.py
--parts host_embeddings``.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lowmem_calls import LOWMEM, lowmem_in_process
from tiny_checkpoints import checkpoint_maker, same_contents
from torch import nn

from lowmem_lightning.cli import RECIPES_DIR
from lowmem_lightning.modules.causal_lm import CausalLMModule, build_causal_lm
from lowmem_lightning.quant.host_embeddings import HostEmbedding, host_table_bytes, host_table_names

ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 320}
LORA = {"r": 4, "alpha": 8}
PER_LAYER = ["base_model.model.model.embed_tokens_per_layer"]
HOSTED = {"gemma4": PER_LAYER, "gemma3n": PER_LAYER, "llama": ["base_model.model.model.embed_tokens"]}
"""The tables each checkpoint's LoRA build holds on the host (Gemma's main embedding is its tied head's)."""


def _build(name: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if name == "gemma4":  # E2B-like: sliding and full layers, shared KV, per-layer input embeddings
        from transformers import Gemma4TextConfig  # (the device image's transformers may predate it)

        config = Gemma4TextConfig(**ARCH, num_hidden_layers=4, head_dim=16, global_head_dim=16, sliding_window=8,
                                  num_kv_shared_layers=2, hidden_size_per_layer_input=8,
                                  vocab_size_per_layer_input=320,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    elif name == "gemma3n":  # its per-layer embedding has a padding_idx (the pad token, 256) past a probe's rows
        config = AutoConfig.for_model("gemma3n_text", **ARCH, num_hidden_layers=4, head_dim=16, sliding_window=8,
                                      num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2, pad_token_id=256,
                                      hidden_size_per_layer_input=8, vocab_size_per_layer_input=320)
    else:
        config = LlamaConfig(**ARCH, num_hidden_layers=2, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory.mktemp("host_embeddings"), _build)


def _quiet_build(path: Path, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return build_causal_lm(str(path), lora=LORA, torch_dtype="bfloat16", device="cpu", **kwargs)


def _ids() -> torch.Tensor:
    return torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("quantize", ["nf4", None])
@pytest.mark.parametrize("name", ["gemma4", "gemma3n", "llama"])
def test_the_same_logits_gradients_and_state_dict_with_the_tables_on_the_host(checkpoints, name, quantize):
    runs = {}
    for host in (False, True):
        model = _quiet_build(checkpoints(name), quantize=quantize, host_embeddings=host)
        out = model(input_ids=_ids(), labels=_ids())
        out.loss.backward()
        runs[host] = (model, out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (plain, logits, grads), (hosted, host_logits, host_grads) = runs[False], runs[True]
    assert [n for n, m in hosted.named_modules() if isinstance(m, HostEmbedding)] == HOSTED[name]
    assert torch.equal(logits, host_logits)
    assert grads.keys() == host_grads.keys() and all(torch.equal(grads[k], host_grads[k]) for k in grads)
    state, host_state = plain.state_dict(), hosted.state_dict()
    assert list(state) == list(host_state) and all(torch.equal(state[k], host_state[k]) for k in state)
    table = hosted.get_submodule(HOSTED[name][0]).table
    assert table.device.type == "cpu" and table.dtype == torch.bfloat16
    assert host_table_bytes(hosted) == table.numel() * 2 > 0
    tensors = [*hosted.parameters(), *hosted.buffers()]
    assert not any(t.data_ptr() == table.data_ptr() for t in tensors)  # the optimizer, DDP and FSDP never see it


class _ShiftedEmbedding(nn.Embedding):
    def forward(self, input_ids):
        return super().forward(input_ids) + 1


def test_tied_lora_targeted_and_unknown_lookups_stay_where_they_are(checkpoints):
    """Gemma 4's main embedding is its head's weight; an embedding LoRA adapts trains; a subclass whose forward does
    more than look rows up (and scale them) is not reproduced: none of them is chosen."""
    gemma = _quiet_build(checkpoints("gemma4"), quantize="nf4")
    assert host_table_names(gemma, LORA) == ["base_model.model.model.embed_tokens_per_layer"]
    llama = _quiet_build(checkpoints("llama"))
    assert host_table_names(llama, ["q_proj", "embed_tokens"]) == []
    shifted = _ShiftedEmbedding(10, 4).requires_grad_(False)
    assert host_table_names(nn.ModuleDict({"emb": shifted}), None) == []
    assert host_table_names(nn.ModuleDict({"emb": nn.Embedding(10, 4).requires_grad_(False)}), None) == ["emb"]
    assert host_table_names(nn.ModuleDict({"emb": nn.Embedding(10, 4)}), None) == []  # it trains


def test_the_model_summary_counts_the_tables_as_without_them(checkpoints):
    """Lightning's summary counts ``parameters()``; a table in host memory is none, so the totals would drop by it.
    The package's summary counts it as the parameter it was (elements, and bytes at the precision's width)."""
    from lowmem_lightning.callbacks.model_summary import NF4ModelSummary

    summaries = []
    for host in (False, True):
        module = CausalLMModule(str(checkpoints("gemma3n")), quantize="nf4", lora=LORA, host_embeddings=host)
        module.model = _quiet_build(checkpoints("gemma3n"), quantize="nf4", host_embeddings=host)
        summary = NF4ModelSummary(module, max_depth=1)
        summaries.append((summary.total_parameters, summary.trainable_parameters, summary.model_size))
    assert summaries[0] == summaries[1]


def test_a_copy_holds_its_own_table(checkpoints):
    """Lightning's weight averaging deep-copies the module, ``ddp_spawn`` pickles it: the copy looks rows up in a table
    of its own (page-locked again for a GPU, which the original's lock does not cover)."""
    import copy
    import pickle

    model = _quiet_build(checkpoints("gemma4"), quantize="nf4", host_embeddings=True)
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        table, twin_table = (m.get_submodule(PER_LAYER[0]).table for m in (model, twin))
        assert twin_table.data_ptr() != table.data_ptr() and torch.equal(twin_table, table)
        with torch.no_grad():
            assert torch.equal(twin(input_ids=_ids()).logits, want)


def test_a_dtype_cast_keeps_a_gpu_models_table_page_locked(monkeypatch):
    """Where ``_apply`` moves the model, told from its function alone: Lightning's precision plugin casts a model that
    runs on the GPU with ``module.to(dtype=...)``, which must keep the table page-locked (the GPU reads it in place:
    unlocked memory would be an illegal address); ``.cpu()`` unlocks it, ``.to("meta")`` drops it. The page-locking
    is stood in for (this machine has no CUDA)."""
    from lowmem_lightning.quant import host_embeddings

    locks = []

    def page_lock(table):  # records the table locked; returns its unlock, as _page_lock's finalizer
        locks.append(table.data_ptr())
        return lambda: locks.remove(table.data_ptr())

    monkeypatch.setattr(host_embeddings, "_page_lock", page_lock)
    monkeypatch.setattr(host_embeddings, "_check_device_reads", lambda table, device: None)
    hosted = HostEmbedding(torch.randn(10, 4, dtype=torch.bfloat16))
    hosted.set_table(hosted.table, "cuda")  # as the loader places it for a model on the GPU
    assert locks == [hosted.table.data_ptr()] and hosted._runs_on.type == "cuda"
    hosted.to(dtype=torch.float32)
    assert hosted.table.dtype == torch.float32 and locks == [hosted.table.data_ptr()] and hosted._runs_on.type == "cuda"
    hosted.float()
    assert locks == [hosted.table.data_ptr()]
    hosted.share_memory()  # a function a meta tensor does not take: no move
    assert locks == [hosted.table.data_ptr()] and hosted._runs_on.type == "cuda"
    hosted.cpu()
    assert locks == [] and hosted._runs_on.type == "cpu" and hosted.table.device.type == "cpu"
    hosted.to("meta")
    assert hosted.table.device.type == "meta" and locks == []


def test_casts_and_load_state_dict_keep_the_table_on_the_host(checkpoints):
    model = _quiet_build(checkpoints("gemma4"), quantize="nf4", host_embeddings=True)
    module = model.get_submodule(HOSTED["gemma4"][0])
    model.to(torch.float32)
    assert module.table.dtype == torch.float32 and module.table.device.type == "cpu"
    assert module.embed_scale.dtype == torch.float32
    model.to(torch.bfloat16)
    plain = _quiet_build(checkpoints("gemma4"), quantize="nf4")
    key = HOSTED["gemma4"][0] + ".weight"
    state = plain.state_dict()
    state[key] = state[key] + 1
    assert model.load_state_dict(state, strict=True).missing_keys == []
    assert torch.equal(module.table, state[key]) and module.table.device.type == "cpu"
    del state[key]
    with pytest.raises(RuntimeError, match="Missing key.*embed_tokens_per_layer.weight"):
        model.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch for .*embed_tokens_per_layer.weight"):
        model.load_state_dict({**state, key: torch.zeros(3, 3)}, strict=True)


@pytest.mark.parametrize("kwargs, words", [
    ({"lora": None}, "Invalid host_embeddings=True with lora=None: a full fine-tune trains the embedding tables"),
    ({"resize_embeddings": True}, "Invalid host_embeddings=True with resize_embeddings=True: the new token rows"),
    ({"host_embeddings": "yes"}, "Invalid host_embeddings='yes': expected True or False."),
])
def test_refused_where_the_tables_train_or_the_value_is_not_a_bool(checkpoints, kwargs, words):
    args = {"model_name_or_path": str(checkpoints("llama")), "lora": LORA, "host_embeddings": True, **kwargs}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        CausalLMModule(**args)


def _recipe(root: Path, checkpoint: Path, host: bool, **model) -> Path:
    """A QLoRA recipe on ``checkpoint`` (the tiny recipe's trainer and data, adamw_8bit, 2 steps, no validation), with
    a full checkpoint every step in ``ckpts``."""
    recipe = yaml.safe_load((RECIPES_DIR / "tiny.yaml").read_text())
    trainer = recipe["trainer"]
    trainer.update({"max_steps": 2, "limit_val_batches": 0, "enable_progress_bar": False,
                    "enable_model_summary": False})
    trainer["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"dirpath": "ckpts", "filename": "{step}", "every_n_train_steps": 1,
                                           "save_top_k": -1}}]
    init = recipe["model"]["init_args"]
    init.pop("config")
    init.update({"model_name_or_path": str(checkpoint), "quantize": "nf4", "lora": LORA, "optimizer": "adamw_8bit",
                 "host_embeddings": host, **model})
    recipe["data"]["init_args"].update({"seq_len": 32, "batch_size": 4})
    (root / "run.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _trained(folder: Path, step: int) -> dict:
    return torch.load(folder / "ckpts" / f"step={step}.ckpt", map_location="cpu", weights_only=False)


def test_a_qlora_fit_trains_and_exports_as_without_it(checkpoints, tmp_path, capsys, monkeypatch):
    """Two ``lowmem fit`` steps of Gemma 4 QLoRA: the weights and optimizer state each step checkpoints are those of
    the fit without ``host_embeddings``, and the merged export holds the per-layer table as the checkpoint stores it
    (loaded back by ``from_pretrained``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    runs = {}
    for host in (False, True):
        (tmp_path / f"host-{host}").mkdir()
        root = _recipe(tmp_path / f"host-{host}", checkpoints("gemma4"), host, save_dir="merged", save_merged=True)
        proc = lowmem_in_process(capsys, monkeypatch, root, "fit", "--config", "run.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[host] = root
    for step in (1, 2):
        plain, hosted = _trained(runs[False], step), _trained(runs[True], step)
        assert same_contents(plain["state_dict"], hosted["state_dict"])
        assert same_contents(plain["optimizer_states"], hosted["optimizer_states"])
        assert hosted["hyper_parameters"]["host_embeddings"] is True
    merged = AutoModelForCausalLM.from_pretrained(runs[True] / "merged", local_files_only=True)
    stored = {}
    for file in checkpoints("gemma4").glob("*.safetensors"):
        stored.update(load_file(file))
    assert torch.equal(merged.model.embed_tokens_per_layer.weight.to(torch.bfloat16),
                       stored["model.embed_tokens_per_layer.weight"])


@pytest.mark.slow
def test_a_killed_run_resumes_as_if_uninterrupted(checkpoints, tmp_path):
    """A real ``lowmem fit`` process with ``host_embeddings`` stopped after step 2 and resumed with ``--ckpt_path
    last`` to step 4 checkpoints the weights and optimizer state of 4 steps straight."""
    env = {**os.environ, "COLUMNS": "200"}
    for name, args in (("straight", ["--trainer.max_steps", "4"]), ("resumed", ["--trainer.max_steps", "2"])):
        (tmp_path / name).mkdir()
        _recipe(tmp_path / name, checkpoints("gemma4"), True)
        proc = subprocess.run([LOWMEM, "fit", "--config", "run.yaml", *args], cwd=tmp_path / name, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([LOWMEM, "fit", "--config", "run.yaml", "--trainer.max_steps", "4", "--ckpt_path", "last"],
                          cwd=tmp_path / "resumed", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = _trained(tmp_path / "straight", 4), _trained(tmp_path / "resumed", 4)
    assert same_contents(straight["state_dict"], resumed["state_dict"])
    assert same_contents(straight["optimizer_states"], resumed["optimizer_states"])


def test_lowmem_estimate_counts_the_tables_as_host_memory(checkpoints, tmp_path, capsys, monkeypatch):
    """The same recipe with and without ``host_embeddings``: the device total drops by the table's bytes exactly, the
    JSON says them as ``host_table_bytes``, and the table's weights row names them."""
    reports = {}
    for host in (False, True):
        root = tmp_path / f"host-{host}"
        root.mkdir()
        _recipe(root, checkpoints("llama"), host)
        proc = lowmem_in_process(capsys, monkeypatch, root, "estimate", "--config", "run.yaml", "--format", "json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[host] = json.loads(proc.stdout)
        table = lowmem_in_process(capsys, monkeypatch, root, "estimate", "--config", "run.yaml")
        weights_row = next(line for line in table.stdout.splitlines() if line.strip().startswith("weights"))
        assert ("of embedding tables in host memory" in weights_row) is host, weights_row
    table_bytes = 320 * 64 * 4  # the tiny recipe's 32-true precision builds fp32 weights
    assert reports[True]["host_table_bytes"] == table_bytes and reports[False]["host_table_bytes"] == 0
    assert reports[True]["params"] == reports[False]["params"]
    for row, est in reports[False]["optimizers"].items():
        assert est["total_device_bytes"] - reports[True]["optimizers"][row]["total_device_bytes"] == table_bytes


def test_the_readme_rows_of_llama_2_7b_are_what_lowmem_estimate_says(tmp_path, capsys, monkeypatch):
    """``benchmarks/host_embeddings.py``'s Llama-2-7B rows (the recipe as shipped: its ``config.json`` alone), as the
    README's table prints them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for host in (False, True):
        proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qlora_7b.yaml",
                                 "--model.host_embeddings", str(host).lower(), "--format", "json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        est = json.loads(proc.stdout)
        total = est["optimizers"][est["configured_optimizer"]]["total_device_bytes"]
        weights = est["frozen_bytes"] + est["trainable_bytes"]
        hosted = f"{est['host_table_bytes'] / 1e9:.3f}" if host else "0"
        row = f"| Llama-2-7B | {str(host).lower()} | {weights / 1e9:.3f} | {total / 1e9:.3f} | {hosted} |"
        assert row in readme, row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_table_takes_no_device_memory_and_the_rows_are_the_hosts(checkpoints):
    """On a GPU: the Gemma 3n QLoRA build (Gemma 3n: in the device image's transformers, which may predate Gemma 4) with
    the per-layer table page-locked on the host gives the logits of the build without it, takes none of the table's
    bytes of device memory, and keeps it page-locked through the precision plugin's dtype cast (the next forward
    reads it in place)."""
    device = torch.device("cuda")
    logits, allocated = [], []
    for host in (False, True):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = build_causal_lm(str(checkpoints("gemma3n")), quantize="nf4", lora=LORA, torch_dtype="bfloat16",
                                    device=device, host_embeddings=host)
        model.to(dtype=torch.bfloat16)
        allocated.append(torch.cuda.memory_allocated() - before)
        with torch.no_grad():
            logits.append(model(input_ids=_ids().to(device)).logits.cpu())
        if host:
            module = model.get_submodule(PER_LAYER[0])
            assert module.table.device.type == "cpu" and module._page_locked is not None
        del model
    assert torch.equal(*logits)
    assert allocated[0] - allocated[1] >= 320 * 4 * 8 * 2  # the per-layer table's bytes (320 x layers x 8, bf16)


def test_an_estimate_over_budget_names_host_embeddings_with_what_it_saves(tmp_path, capsys, monkeypatch):
    """A QLoRA recipe that does not fit (Llama-2-7B at 2 GB): the advice names ``host_embeddings: true`` and the
    bytes it takes off the device, those the run with it holds in host memory; with it, the advice says it no more."""
    said = {}
    for host in (False, True):
        proc = lowmem_in_process(capsys, monkeypatch, tmp_path, "estimate", "--config", "qlora_7b.yaml",
                                 "--budget-gb", "2", "--model.host_embeddings", str(host).lower(), "--format", "json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        said[host] = json.loads(proc.stdout)
    advice = said[False]["recommendation"]
    assert said[False]["hostable_table_bytes"] == said[True]["host_table_bytes"] == 32000 * 4096 * 2
    assert "hold the frozen embedding tables in host memory (host_embeddings: true, 0.262 GB off the device)" in advice
    assert "host_embeddings" not in said[True]["recommendation"] and said[True]["hostable_table_bytes"] == 0


def test_a_fit_says_what_it_holds_or_that_there_is_nothing_to_hold(checkpoints, tmp_path, caplog):
    """One line names the tables held and their size; a model whose only table is tied to its head (a tied Llama)
    gets a warning that nothing moved, instead of a silent no-op."""
    import logging

    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem_lightning.lowmem_warning import LowMemWarning

    with caplog.at_level(logging.INFO):
        _quiet_build(checkpoints("gemma4"), quantize="nf4", host_embeddings=True)
    assert ("host_embeddings: 0.02 MiB of frozen embedding tables in host memory (model.embed_tokens_per_layer); "
            "each step gathers its batch's rows.") in caplog.text
    LlamaForCausalLM(LlamaConfig(**ARCH, num_hidden_layers=1, tie_word_embeddings=True)).save_pretrained(tmp_path)
    with pytest.warns(LowMemWarning, match="host_embeddings=True: this model has no frozen embedding table that no "
                                           "output head shares"):
        build_causal_lm(str(tmp_path), quantize="nf4", lora=LORA, device="cpu", host_embeddings=True)


@pytest.mark.parametrize("damage, words", [
    ("missing", "lacks 1 tensor the model of config.json needs (e.g. ['model.embed_tokens_per_layer.weight'])"),
    ("shape", "holds 'model.embed_tokens_per_layer.weight' with shape (319, 32), but the model that config.json "
              "describes needs (320, 32)"),
    ("nan", "holds nan/inf in 1 tensor: model.embed_tokens_per_layer.weight in model.safetensors: 1 non-finite "
            "element (1 nan)"),
])
def test_a_bad_table_in_the_checkpoint_is_refused_naming_it(checkpoints, tmp_path, damage, words):
    """The table read straight into host memory is checked as every tensor the loader reads: missing, of another
    shape (both before any tensor is read) or holding a nan, the checkpoint is refused naming it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lowmem_lightning.quant import ModelFileError

    path = tmp_path / "damaged"
    shutil.copytree(checkpoints("gemma4"), path)
    [file] = [f for f in path.glob("*.safetensors") if "model.embed_tokens_per_layer.weight" in load_file(f)]
    tensors, key = load_file(file), "model.embed_tokens_per_layer.weight"
    if damage == "missing":
        del tensors[key]
    elif damage == "shape":
        tensors[key] = tensors[key][:-1].clone()
    else:
        tensors[key][3, 2] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelFileError) as caught:
        _quiet_build(path, quantize="nf4", host_embeddings=True)
    assert words.replace("model.safetensors", file.name) in str(caught.value), str(caught.value)
