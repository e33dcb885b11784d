"""AdamW8bit state dicts: exact round trips, import of torch.optim.AdamW state, and clear errors
(optimizer unchanged) for state dicts that do not fit."""

import copy
import io

import pytest
import torch
from optim_helpers import one_cpu_thread  # noqa: F401 (autouse fixture)

from lowmem_lightning.kernels.codec import dequantize_reference
from lowmem_lightning.optim.adamw8bit import AdamW8bit

SHAPES = [(4097,), (1000, 5), (33,)]




def _params(dtypes=(torch.float32, torch.bfloat16, torch.float32)):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(d)) for s, d in zip(SHAPES, dtypes)]


def _train(opt, params, steps, gen):
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
        opt.step()


def _snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}, copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    )


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_round_trip_continues_bit_identically():
    ref_params = _params()
    ref = AdamW8bit(ref_params, lr=1e-2, weight_decay=0.1)
    _train(ref, ref_params, 5, torch.Generator().manual_seed(1))

    gen = torch.Generator().manual_seed(1)
    params = _params()
    first = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    _train(first, params, 3, gen)
    saved = _round_trip(first.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    second = AdamW8bit(resumed, lr=123.0)
    second.load_state_dict(saved)
    assert second.param_groups[0]["lr"] == 1e-2
    state = second.state[resumed[1]]  # bf16 param: its fp32 absmax and int8 codes keep their dtypes
    assert state["exp_avg_absmax"].dtype == torch.float32 and state["exp_avg_codes"].dtype == torch.int8
    _train(second, resumed, 2, gen)
    for a, b in zip(resumed, ref_params):
        assert torch.equal(a, b)
    for a, b in zip(resumed, ref_params):
        for key, value in ref.state[b].items():
            assert torch.equal(second.state[a][key], value), key


def test_loading_torch_adamw_state_quantizes_and_tracks_torch():
    shapes = [(64, 128), (4097,), (50,)]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    grads = torch.Generator().manual_seed(1)
    torch_params = [torch.nn.Parameter(p.clone()) for p in start]
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.01)
    for _ in range(10):
        for p in torch_params:
            p.grad = torch.randn(p.shape, generator=grads) * 0.01
        torch_opt.step()
    switch = [p.detach().clone() for p in torch_params]
    eight_params = [torch.nn.Parameter(p.clone()) for p in switch]
    eight = AdamW8bit(eight_params)
    eight.load_state_dict(_round_trip(torch_opt.state_dict()))

    state = eight.state[eight_params[0]]
    assert set(state) == {"step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"}
    assert state["step"].item() == 10.0 and state["step"].dtype == torch.float32
    m_torch = torch_opt.state[torch_params[0]]["exp_avg"].reshape(-1)
    m_back = dequantize_reference(state["exp_avg_codes"], state["exp_avg_absmax"])
    assert (m_back - m_torch).norm() / m_torch.norm() < 0.02
    assert set(eight.state[eight_params[2]]) == {"step", "exp_avg", "exp_avg_sq"}  # small: fp32 copies

    for _ in range(20):
        for p8, p32 in zip(eight_params, torch_params):
            p32.grad = torch.randn(p32.shape, generator=grads) * 0.01
            p8.grad = p32.grad.clone()
        torch_opt.step()
        eight.step()
    for p8, p32, p0 in zip(eight_params, torch_params, switch):
        d8, d32 = (p8.detach() - p0).flatten(), (p32.detach() - p0).flatten()
        assert ((d8 - d32).norm() / d32.norm()).item() < 0.03
        assert torch.nn.functional.cosine_similarity(d8, d32, dim=0).item() > 0.999


def _trained():
    params = _params()
    opt = AdamW8bit(params, lr=1e-2)
    _train(opt, params, 2, torch.Generator().manual_seed(1))
    return params, opt


def _corrupt_shape(sd):
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"][:-1]


def _corrupt_dtype(sd):
    sd["state"][0]["exp_avg_sq_codes"] = sd["state"][0]["exp_avg_sq_codes"].to(torch.int8)


def _missing_key(sd):
    del sd["state"][1]["exp_avg_sq_absmax"]


def _nan_absmax(sd):
    sd["state"][0]["exp_avg_absmax"][3] = float("nan")


def _nan_small_state(sd):
    sd["state"][2]["exp_avg"][0] = float("inf")


def _extra_group(sd):
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))


def _fewer_params(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:2]


def _unknown_param(sd):
    sd["state"][99] = sd["state"][0]


def _bad_lr(sd):
    sd["param_groups"][0]["lr"] = -1.0


def _bad_betas(sd):
    sd["param_groups"][0]["betas"] = (0.9, 1.5)


def _foreign_wrong_shape(sd):
    sd["state"][0] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4096), "exp_avg_sq": torch.zeros(4097)}


def _amsgrad(sd):
    sd["param_groups"][0]["amsgrad"] = True


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_shape, "exp_avg_codes"),
        (_corrupt_dtype, "exp_avg_sq_codes"),
        (_missing_key, "exp_avg_sq_absmax"),
        (_nan_absmax, "inf or NaN"),
        (_nan_small_state, "inf or NaN"),
        (_extra_group, "param groups"),
        (_fewer_params, "params"),
        (_unknown_param, "unknown param"),
        (_bad_lr, "lr"),
        (_bad_betas, r"betas\[1\]"),
        (_foreign_wrong_shape, "exp_avg"),
        (_amsgrad, "amsgrad"),
    ],
)
def test_corrupt_state_dict_raises_and_leaves_optimizer_unchanged(corrupt, message):
    params, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before_state, before_groups = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    after_state, after_groups = _snapshot(opt)
    assert after_groups == before_groups
    assert after_state.keys() == before_state.keys()
    for pid, state in before_state.items():
        for key, value in state.items():
            assert torch.equal(after_state[pid][key], value)
    _train(opt, params, 1, torch.Generator().manual_seed(2))  # still usable


def test_not_a_state_dict_raises():
    _, opt = _trained()
    with pytest.raises(ValueError, match="state"):
        opt.load_state_dict({"weights": 1})
