"""Aligned and general kernel variants give identical results (Triton interpreter).

The launchers send tensors whose data pointers are 16-byte aligned and whose sizes are multiples of
16 to the ``ALIGNED=True`` variant of the multi-tensor kernels (vector accesses on a GPU, see
``test_kernels_aot.py``) and everything else (offset views, odd sizes) to the general one. Here one
optimizer step over a mix of both kinds equals the reference bit for bit, and each tensor is shown to
take the variant its layout allows. The plain-pointer kernels (codec, NF4) are checked on offset views.
"""

import pytest
import torch

from lowmem_lightning.kernels import adamw8bit as adamw_kernel
from lowmem_lightning.kernels import codec, dispatch, nf4
from lowmem_lightning.kernels import sgd as sgd_kernel
from lowmem_lightning.kernels.multitensor import is_aligned
from lowmem_lightning.optim.adamw8bit import AdamW8bit
from lowmem_lightning.optim.sgd import SGD


def _offset_view(numel: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    """A contiguous 1-D view starting one element into its storage: not 16-byte aligned."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel + 1, generator=g) * 0.5).to(dtype)
    view = base[1:]
    assert view.data_ptr() % 16 != 0
    return view


def _params(dtype):
    """Two aligned tensors (multiples of 16 elements), an offset view, an odd size, a small one."""
    g = torch.Generator().manual_seed(0)
    made = [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in [(64, 80), (4096,)]]
    made.append(_offset_view(4112, dtype, seed=1))
    made += [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in [(4099,), (48,)]]
    return [torch.nn.Parameter(t) for t in made]


def test_is_aligned_predicate():
    x = torch.zeros(4096)
    assert is_aligned(x, None, torch.zeros(16, dtype=torch.int8))
    assert not is_aligned(x[1:17])  # offset view
    assert not is_aligned(torch.zeros(4099))  # size not a multiple of 16
    assert not is_aligned(torch.zeros(32, 64).t())  # not contiguous


class _Spy:
    """Stands in for a ``@triton.jit`` kernel; records each launch's ``ALIGNED`` and tensor count."""

    def __init__(self, real):
        self.real, self.launches = real, []

    def __getitem__(self, grid):
        def launch(table, owner, count, *args, **kwargs):
            self.launches.append((kwargs["ALIGNED"], count))
            return self.real[grid](table, owner, count, *args, **kwargs)
        return launch


def _run(make_opt, params, steps=2):
    opt = make_opt(params)
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        for i, p in enumerate(params):
            grad = (torch.randn(p.shape, generator=g) * 0.1).to(p.dtype)
            if i == 2:  # the offset param gets an offset gradient as well
                holder = torch.empty(p.numel() + 1, dtype=p.dtype)
                holder[1:].copy_(grad)
                grad = holder[1:]
            p.grad = grad
        if step == 1:
            p.grad.view(-1)[3] = float("nan")  # the last tensor is skipped, the others update
        opt.step()
    return opt


OPTIMIZERS = {
    "adamw_8bit": (adamw_kernel, "_adamw8bit_kernel", lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1)),
    "sgd_8bit": (sgd_kernel, "_sgd_kernel",
                 lambda ps: SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, momentum_dtype="int8")),
    "sgd_fp32": (sgd_kernel, "_sgd_kernel", lambda ps: SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_and_general_variants_equal_reference(monkeypatch, name, dtype):
    module, attr, make_opt = OPTIMIZERS[name]
    spy = _Spy(getattr(module, attr))
    monkeypatch.setattr(module, attr, spy)
    with dispatch.override(force_triton=True):
        tri_params = _params(dtype)
        tri = _run(make_opt, tri_params)
    ref_params = _params(dtype)
    ref = _run(make_opt, ref_params)
    assert {aligned for aligned, _ in spy.launches} == {True, False}
    aligned_tensors = sum(count for aligned, count in spy.launches if aligned) // 2  # per step
    assert aligned_tensors == 3  # (64, 80), (4096,), (48,); the offset view and 4099 are general
    for p_tri, p_ref in zip(tri_params, ref_params):
        assert torch.equal(p_tri, p_ref)
        for key, value in ref.state[p_ref].items():
            assert torch.equal(tri.state[p_tri][key], value), key
    assert tri.skipped_updates == ref.skipped_updates == 1


@pytest.mark.parametrize("signed", [True, False])
def test_codec_on_offset_views_equals_reference(force_triton, signed):
    for x in (_offset_view(4112), torch.randn(4096), _offset_view(4099)):
        x = x if signed else x.abs()
        ref_codes, ref_absmax = codec.quantize_reference(x, signed)
        codes, absmax = codec.quantize_blockwise(x, signed)
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
        assert torch.equal(codec.dequantize_blockwise(codes, absmax), codec.dequantize_reference(codes, absmax))


@pytest.mark.parametrize("numel", [4096, 4112, 4099, 63])
def test_nf4_on_offset_views_and_odd_sizes_equals_reference(force_triton, numel):
    for x in (_offset_view(numel, torch.bfloat16), (torch.randn(numel) * 0.1).to(torch.bfloat16)):
        ref = nf4.quantize_nf4_reference(x, 64, True)
        got = nf4.quantize_nf4(x, 64, True)
        assert torch.equal(got.packed, ref.packed)
        out = nf4.dequantize_nf4(got)
        assert torch.equal(out, nf4.dequantize_nf4_reference(ref))
