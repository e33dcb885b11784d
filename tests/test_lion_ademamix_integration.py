"""Lion8bit and AdEMAMix8bit in the rest of the house: the overflow guard, gradient release (bit for bit a
normal step), a bit-exact Lightning resume from a checkpoint holding the 8-bit codes, and FSDP2 (per-rank
shards of the 8-bit state, bit-exact sharded resume), reusing the harnesses of the AdamW tests."""

import pytest
import test_checkpoint_resume as resume
import test_fsdp2 as fsdp2
import test_gradient_release as release
import torch

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.optim import build_optimizer, optimizer_class

CONFIGS = [("lion_8bit", {"lr": 1e-3, "weight_decay": 0.1}), ("lion", {"lr": 1e-3}),
           ("ademamix_8bit", {"lr": 1e-3, "t_alpha": 3, "t_beta3": 3}), ("ademamix", {"lr": 1e-3})]
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items() if k != "lr") for name, kw in CONFIGS]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter computes, then masks
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_overflowing_square_skips_the_tensor(name, kwargs, path):
    """A finite gradient element of 3e19 (its square overflows fp32) skips that tensor's update: param, state
    and step counter unchanged; the other tensor updates."""
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(300))]
    opt = build_optimizer(name, params, **kwargs)
    with dispatch.override(force_triton=path == "triton"):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        before = [p.detach().clone() for p in params]
        state = {k: v.clone() for k, v in opt.state[params[0]].items()}
        params[0].grad = torch.randn_like(params[0])
        params[0].grad[3, 4] = 3e19
        params[1].grad = torch.randn_like(params[1])
        opt.step()
    assert torch.equal(params[0], before[0]) and not torch.equal(params[1], before[1])
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())
    assert float(opt.state[params[0]]["step"]) == 1.0 and opt.skipped_updates == 1


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_release_equals_a_normal_step_bit_for_bit(name, kwargs, dtype):
    release._assert_same_run(release._train(name, kwargs, dtype, release=False),
                             release._train(name, kwargs, dtype, release=True))


@pytest.mark.parametrize("name", ["lion_8bit", "ademamix_8bit"])
def test_lightning_resume_is_bit_exact_with_8bit_codes_in_the_checkpoint(tmp_path, name):
    _, straight = resume._fit(tmp_path / "a", max_epochs=2, optimizer=name, lr=1e-3)
    first, _ = resume._fit(tmp_path / "b", max_epochs=1, optimizer=name, lr=1e-3)
    path = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["optimizer_states"][0]["state"]
    assert torch.int8 in {value.dtype for state in states.values() for value in state.values()}
    resumed_trainer, resumed = resume._fit(tmp_path / "c", max_epochs=2, optimizer=name, lr=1e-3, ckpt_path=path)
    assert resumed_trainer.global_step == 6 and type(resumed_trainer.optimizers[0]) is optimizer_class(name)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


FSDP2 = {"lion_8bit": ("Lion8bit", 1.0, 4.0, True), "ademamix_8bit": ("AdEMAMix8bit", 3.0, 12.5, False)}
"""As ``test_fsdp2.OPTIMIZERS``: class, bounds on a rank's state bytes per local element (its small tensors
keep fp32 state), distributed (per-rank) or single-file checkpoint."""


@pytest.mark.slow  # two gloo processes, three fits each (~1 min)
@pytest.mark.parametrize("opt", list(FSDP2))
def test_fsdp2_trains_shards_and_resumes_bit_exact(tmp_path, opt, monkeypatch):
    monkeypatch.setitem(fsdp2.OPTIMIZERS, opt, FSDP2[opt])
    ranks = fsdp2._run_script(tmp_path, opt, "cpu", 2)
    for result in ranks:
        assert result["optimizer"] == FSDP2[opt][0] and result["param_types"] == ["DTensor"]
        assert result["global_step"] == 4
        for a, b in zip(result["straight"], result["resumed"]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert FSDP2[opt][1] < result["bytes_per_param"] < FSDP2[opt][2], result
    single = fsdp2._single_process_model(tmp_path, opt)
    assert ranks[0]["num_params"] + ranks[1]["num_params"] == sum(p.numel() for p in single.parameters())
    for a, b in zip(single.parameters(), ranks[0]["epoch1"]):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=2e-5)
