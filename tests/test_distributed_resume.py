"""Mid-epoch resume of a 2-process run through ``lowmem fit`` (issue 30, 2): DDP and FSDP2.

The run of ``tests/test_resume_midepoch.py`` (its config, data and ``SignalAt`` callback) on 2 gloo CPU
processes: ``strategy: ddp``, or Lightning's ``ModelParallelStrategy`` (FSDP2) with a module that
shards the model with ``fully_shard`` (:class:`FSDP2CausalLM`, importable from this file). Every rank
kills itself with SIGKILL at step 23 (the whole job dies), the run is resumed from the mid-epoch
checkpoint of step 20 with ``--ckpt_path``, and its final checkpoint is compared with the
uninterrupted 2-process run's: params and optimizer state equal (max |diff| 0), every logged loss
equal. Each rank reads its own half of every global batch, so a rank that resumed at another place
in the data would change the averaged gradients and show in the params.

Each run starts 2 processes; the module is marked slow (several minutes on 2 CPU cores).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from test_resume_midepoch import MAX_STEPS, _assert_same_run, _losses, _lowmem, _signal_args, _write_data

from lowmem_lightning.modules.causal_lm import CausalLMModule

pytestmark = pytest.mark.slow


class FSDP2CausalLM(CausalLMModule):
    """``CausalLMModule`` whose ``configure_model`` shards the model the FSDP2 way (each decoder layer,
    then the whole model, with ``fully_shard`` over the strategy's data-parallel mesh)."""

    def configure_model(self) -> None:
        """Build the model, then shard it (once)."""
        from torch.distributed.fsdp import fully_shard

        if self.model is not None:
            return
        super().configure_model()
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


STRATEGIES = {
    "ddp": ["--trainer.devices=2", "--trainer.strategy=ddp"],
    "fsdp2": ["--trainer.devices=2", "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
              "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
              "--model.class_path=test_distributed_resume.FSDP2CausalLM"],
}


def _run(root: Path, data: Path, strategy: str, *extra: str):
    return _lowmem(root, data, *STRATEGIES[strategy], *extra)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_process_run_killed_mid_epoch_resumes_exactly(tmp_path, strategy):
    data = _write_data(tmp_path / "words.txt")
    reference = _run(tmp_path / "reference", data, strategy)
    assert reference.returncode == 0, reference.stderr[-3000:]
    root = tmp_path / "killed"
    killed = _run(root, data, strategy, *_signal_args("SIGKILL", 23, "end"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = sorted(p.name for p in (root / "ckpt").iterdir())
    assert f"step={MAX_STEPS}.ckpt" not in saved and "step=20.ckpt" in saved, saved
    resumed = _run(root, data, strategy, "--ckpt_path", str(root / "ckpt" / "step=20.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if strategy == "ddp":
        _assert_same_run(tmp_path / "reference", root, 20)
    else:
        _assert_same_sharded_run(tmp_path / "reference", root)


def _assert_same_sharded_run(ref: Path, resumed: Path) -> None:
    """Sharded checkpoints (folders of per-rank files): every tensor of the final one equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    name = f"step={MAX_STEPS}.ckpt"
    out = {}
    for label, root in (("ref", ref), ("resumed", resumed)):
        dcp_to_torch_save(root / "ckpt" / name, root / f"{label}.pt")
        out[label] = torch.load(root / f"{label}.pt", weights_only=False)
    assert dcp is not None and out["ref"].keys() == out["resumed"].keys()
    compared = 0
    for key, value in _tensors(out["ref"]).items():
        assert torch.equal(value, _tensors(out["resumed"])[key]), key
        compared += 1
    assert compared > 10  # params and optimizer state (codes, scales, steps) of every param
    losses_ref, losses = _losses(ref), _losses(resumed)
    assert losses and losses == {s: losses_ref[s] for s in losses}


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested checkpoint dict, keyed by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _tensors(value, f"{prefix}/{i}").items()}
    return {}
