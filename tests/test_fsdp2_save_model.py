"""``CausalLMModule.save_model`` writes a loadable model under FSDP2 and writes atomically.

Under ``ModelParallelStrategy`` (FSDP2, ``fully_shard``: DTensor params) every rank gathers the full state
dict and rank 0 writes it: 2 gloo CPU processes train a tiny Llama, and the saved directory loads with
``from_pretrained`` into exactly the unsharded params. Single-process saves go through a temporary directory:
other files in ``save_dir`` are kept, stale shard files removed, and a failed write leaves nothing partial.
"""

import errno
import os
import textwrap

import lightning as L
import pytest
import torch
from launched_scripts import run_script
from torch.utils.data import DataLoader

from lowmem_lightning.callbacks.checkpoint_io import CheckpointWriteError
from lowmem_lightning.modules.causal_lm import CausalLMModule

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 32}

SCRIPT = """
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lowmem_lightning.modules.causal_lm import CausalLMModule


class Sharded(CausalLMModule):
    def configure_model(self):
        if self.model is not None:
            return
        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def batches():
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    return [{{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2])}}
            for i in range(0, 8, 2)]


torch.manual_seed(0)
module = Sharded(config={config!r}, optimizer="adamw", lr=1e-2, save_dir={out!r} + "/model")
trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
trainer.fit(module, DataLoader(batches(), batch_size=None))
full = {{k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.model.state_dict().items()}}  # every rank joins each gather
sharded = sorted({{type(p).__name__ for p in module.model.parameters()}})
if trainer.is_global_zero:
    torch.save({{"params": full, "param_types": sharded}}, {out!r} + "/full.pt")
"""


@pytest.mark.slow
def test_fsdp2_sharded_model_is_saved_whole_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(config=TINY, out=str(tmp_path))))
    run_script(script, cwd=tmp_path, timeout=600)
    result = torch.load(tmp_path / "full.pt")
    assert result["param_types"] == ["DTensor"]  # the module really trained sharded params
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert set(loaded) == set(result["params"])
    for key, value in result["params"].items():
        assert torch.equal(loaded[key], value), key  # the whole tensor, as trained
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _batches():
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids[i:i + 2], "labels": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2])}
            for i in (0, 2)]


def _fit(save_dir) -> CausalLMModule:
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY, optimizer="adamw", lr=1e-2, save_dir=str(save_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(_batches(), batch_size=None))
    return module


def test_save_keeps_other_files_and_removes_stale_shards(tmp_path):
    from transformers import AutoModelForCausalLM

    save_dir = tmp_path / "model"
    save_dir.mkdir()
    (save_dir / "notes.txt").write_text("mine")
    (save_dir / "model-00001-of-00002.safetensors").write_bytes(b"an earlier sharded save")
    module = _fit(save_dir)
    assert (save_dir / "notes.txt").read_text() == "mine"
    assert not (save_dir / "model-00001-of-00002.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(save_dir).state_dict()
    for key, value in module.model.state_dict().items():
        assert torch.equal(loaded[key], value.detach()), key
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_failed_save_leaves_the_previous_files_and_no_partial_one(tmp_path, monkeypatch):
    save_dir = tmp_path / "model"
    module = _fit(save_dir)
    before = {p.name: p.read_bytes() for p in save_dir.iterdir()}

    def full_disk(directory, **kwargs):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module.model, "save_pretrained", full_disk)
    module._saved = False
    with pytest.raises(CheckpointWriteError, match=r"Could not write the model .*model: the file system is full"):
        module.save_model()
    assert {p.name: p.read_bytes() for p in save_dir.iterdir()} == before  # the complete earlier save
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
