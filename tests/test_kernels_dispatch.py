"""The launcher protocol (kernels/dispatch.py): one dispatch call partitions a step's tensors by backend.

A recording family stands in for a kernel family, so each rule is checked on its own: host groups by
``host_key`` with flags and steps read once (skipped and empty tensors left out), per-tensor host
steps with the size rule, sharded tensors always eager, Triton launches grouped by device and
``launch_key``; and the named scalars: packed in field order, launched by name.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from lowmem_lightning.kernels import dispatch
from lowmem_lightning.kernels.dispatch import Family, HostStep, pack, unpack


class _Tensors(NamedTuple):
    params: list
    steps: list
    flags: list
    kinds: list


class _Sharded(NamedTuple):
    params: list
    steps: list
    flags: list
    kinds: list
    reduces: list


class _Scalars(NamedTuple):
    lr: float
    grad_sign: float


def _recording_family(bucketed: bool) -> tuple[Family, list]:
    calls = []

    def launch(t, scalars):
        calls.append(("triton", [p.numel() for p in t.params], scalars))

    def host(t, scalars, backend, steps):
        calls.append((backend, [p.numel() for p in t.params], steps))

    family = Family("recording", launch, host, launch_key=lambda t, i: t.kinds[i],
                    host_key=lambda t, i: t.kinds[i], bucketed=bucketed)
    return family, calls


def _batch(sizes, kinds, flags=None, steps=None, cls=_Tensors, **extra):
    n = len(sizes)
    flags = flags or [1.0] * n
    steps = steps or [float(i + 1) for i in range(n)]
    return cls([torch.zeros(s) for s in sizes], [torch.tensor(s) for s in steps], [torch.tensor(f) for f in flags],
               kinds, **extra)


def test_bucketed_host_groups_by_key_and_leaves_out_skipped_and_empty_tensors():
    family, calls = _recording_family(bucketed=True)
    batch = _batch([10, 20, 0, 30, 40], ["a", "b", "a", "a", "b"], flags=[1.0, 1.0, 1.0, 0.0, 1.0])
    with dispatch.override(cpu_compile="never"):
        dispatch.dispatch(family, batch, _Scalars(0.1, 1.0))
    # the empty tensor and the skipped one (flag 0) are gone; steps read on the host, per group
    assert calls == [("eager", [10], [1.0]), ("eager", [20, 40], [2.0, 5.0])]


def test_bucketed_compile_choice_is_per_group_on_its_total(monkeypatch):
    family, calls = _recording_family(bucketed=True)
    monkeypatch.setattr(dispatch, "_eager_bucket_numel", 0)
    with dispatch.override(cpu_compile="auto", compile_min_numel=50, compile_after_numel=10**9):
        dispatch.dispatch(family, _batch([30, 30, 40], ["a", "a", "b"]), _Scalars(0.1, 1.0))
    assert [(backend, sizes) for backend, sizes, _ in calls] == [("compiled", [30, 30]), ("eager", [40])]


def test_per_tensor_host_steps_get_each_tensor_with_its_flag_and_the_size_rule():
    family, calls = _recording_family(bucketed=False)
    batch = _batch([10, 100], ["a", "a"], flags=[0.0, 1.0])
    with dispatch.override(cpu_compile="auto", compile_min_numel=50):
        dispatch.dispatch(family, batch, _Scalars(0.1, 1.0))
    # not bucketed: a skipped tensor still comes (its flag masks the reference), steps are not read
    assert calls == [("eager", [10], None), ("compiled", [100], None)]


def test_sharded_tensors_run_eagerly_even_when_empty_or_on_triton():
    family, calls = _recording_family(bucketed=False)
    batch = _batch([0, 10, 20], ["a", "a", "a"], cls=_Sharded, reduces=[object(), None, object()])
    with dispatch.override(force_triton=True, cpu_compile="always"):
        dispatch.dispatch(family, batch, _Scalars(0.1, 1.0))
    assert sorted(calls, key=str) == sorted([("eager", [0], None), ("eager", [20], None),
                                             ("triton", [10], _Scalars(0.1, 1.0))], key=str)


def test_triton_launches_group_by_launch_key():
    family, calls = _recording_family(bucketed=True)
    with dispatch.override(force_triton=True):
        dispatch.dispatch(family, _batch([10, 20, 30, 0], ["a", "b", "a", "a"]), _Scalars(0.1, -1.0))
    assert calls == [("triton", [10, 30], _Scalars(0.1, -1.0)), ("triton", [20], _Scalars(0.1, -1.0))]


def test_pack_keeps_field_order_and_unpack_names_them():
    scalars = _Scalars(1e-3, -1.0)
    packed = pack(scalars)
    assert packed.dtype == torch.float32 and packed.tolist() == [pytest.approx(1e-3), -1.0]
    named = unpack(_Scalars, packed)
    assert named.lr.shape == () and float(named.grad_sign) == -1.0


def test_host_step_never_decides_a_backend():
    def double(x):
        return x * 2

    step = HostStep(double)
    assert step.on("eager") is double
    assert not callable(step)  # no self-deciding call: dispatch chooses, the caller asks with .on()


def test_launch_over_passes_scalars_by_name(force_triton):
    # a NamedTuple whose fields are not the kernel's argument names fails loudly, never silently swapped
    from lowmem_lightning.kernels import adamw8bit
    from lowmem_lightning.kernels.multitensor import launch_over

    class Wrong(NamedTuple):
        lr: float
        beta_one: float
        beta2: float
        eps: float
        weight_decay: float
        grad_sign: float

    p, g = torch.zeros(256), torch.zeros(256)
    step, flag = torch.tensor(1.0), torch.tensor(1.0)
    with pytest.raises(TypeError, match="beta"):
        launch_over(adamw8bit._adamw8bit_kernel, [p], [g], [[0], [0], [0], [0]], [step], [flag], [0],
                    Wrong(1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0), 1024, QUANTIZED=False, ROWS=4, BLOCK=256)
