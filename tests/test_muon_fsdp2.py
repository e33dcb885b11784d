"""Muon under FSDP2 (Lightning's ModelParallelStrategy, 2 gloo processes on CPU), with the callback.

The run of ``tests/test_fsdp2.py`` (its script and helpers, reused) with ``muon`` / ``muon_8bit``: each
rank keeps the momentum of its shard, the momentum pass runs on the shard, ``U`` is gathered so
Newton–Schulz sees each whole matrix (the ``(1, 64)`` head has no rows at all on rank 1 and still joins),
and each rank applies its shard of the result. Checked: the first epoch equals one unsharded process on
the same global batches (to fp32 summation order of the gradients), the state is per shard, and the
resume from a ``torch.distributed.checkpoint`` folder ends bit for bit where the straight run does.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_fsdp2  # noqa: E402

# (class, bounds on this rank's state bytes per local element, distributed checkpoint): the 16- to 80-element
# biases keep fp32 AdamW moments (8 B), the 80x16 and 1x64 matrices an fp32 momentum (4 B), the 64x80 one 8-bit
# codes in muon_8bit (1.02 B)
MUON = {"muon": ("Muon", 3.5, 5.0, True), "muon_8bit": ("Muon8bit", 1.5, 3.5, True)}


@pytest.mark.parametrize("opt", [pytest.param("muon", marks=pytest.mark.slow), "muon_8bit"])  # ~60 s each
def test_muon_under_fsdp2_equals_unsharded_and_resumes_bit_exactly(tmp_path, opt, monkeypatch):
    monkeypatch.setitem(test_fsdp2.OPTIMIZERS, opt, MUON[opt])
    ranks = test_fsdp2._run_script(tmp_path, opt, "cpu", 2)
    for result in ranks:
        assert result["optimizer"] == MUON[opt][0]
        assert result["param_types"] == ["DTensor"]
        assert result["global_step"] == 4
        for a, b in zip(result["straight"], result["resumed"]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)  # bit-exact resume from the sharded checkpoint
        assert MUON[opt][1] < result["bytes_per_param"] < MUON[opt][2], result
    single = test_fsdp2._single_process_model(tmp_path, opt)
    assert ranks[0]["num_params"] + ranks[1]["num_params"] == sum(p.numel() for p in single.parameters())
    for (name, a), b in zip(single.named_parameters(), ranks[0]["epoch1"]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=2e-5, msg=name)
