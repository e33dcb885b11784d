"""Clipping by the global norm under gradient release (LOMO's two backward passes, issue w1).

``LowMemOptimizerCallback(step_in_backward=True)`` with ``gradient_clip_val`` and algorithm "norm": the first backward
pass takes each gradient's norm and frees it, the second updates each tensor with its gradient times
``min(1, clip / (total + 1e-6))``. After N steps the params, the optimizer state and the logged metrics equal a normal
fit's with Lightning's norm clipping, bit for bit, for a clip that bites and one that does not, under 32, bf16-mixed
and bf16-true, with buckets, with reentrant and non-reentrant activation checkpointing (a weight shared by two
reentrant blocks: held back, its whole gradient's norm counted), a non-finite gradient, a user ``backward`` override
and a resume.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks.release import TWO_PASS_NOTICE, GradientRelease
from lowmem_lightning.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {
    "adamw_8bit": {},
    "came": {"optimizer_kwargs": {"momentum_dtype": "int8"}},
    "sgd": {"lr": 1e-2, "optimizer_kwargs": {"momentum": 0.9, "momentum_dtype": "int8"}},
    "adamw": {},
}
BITES, LOOSE = 0.05, 1e4  # far below the gradients' norm (every step clipped) / far above it (never)
STEPS = 4


class Net(L.LightningModule):
    """A small module (one 8-bit-state weight of 4800 elements); ``ckpt``: its middle blocks under activation
    checkpointing ("reentrant": two blocks share one Linear, so that weight's gradient arrives in two nested passes;
    "non-reentrant"); ``inf_at``: the batch whose ``head.bias`` gradient is inf; ``backward_calls`` counts the calls
    of the module's ``backward`` override when ``override`` is set."""

    def __init__(self, ckpt: str | None = None, inf_at: int | None = None, override: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(24, 48)
        self.shared = nn.Linear(48, 48)
        self.blocks = nn.ModuleList([nn.Linear(48, 100), nn.Linear(100, 48)])
        self.head = nn.Linear(48, 4)
        self.frozen = nn.Linear(24, 24)
        self.frozen.requires_grad_(False)
        self.ckpt, self.inf_at, self.override = ckpt, inf_at, override
        self.backward_calls = 0

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.blocks[1](torch.tanh(self.blocks[0](torch.tanh(self.shared(h))))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.inp(x + 0 * self.frozen(x))
        for _ in range(2 if self.ckpt == "reentrant" else 1):
            h = self._block(h) if self.ckpt is None else checkpoint(self._block, h,
                                                                    use_reentrant=self.ckpt == "reentrant")
        if batch_idx == self.inf_at:  # head.bias gets an inf/NaN gradient (in both passes), nothing else does
            self._inf_hook = self.head.bias.register_hook(lambda grad: grad * float("inf"))
        loss = (self.head(h).float() - y.float()).square().mean() * 10.0
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if getattr(self, "_inf_hook", None) is not None:
            self._inf_hook.remove()
            self._inf_hook = None

    def backward(self, loss, *args, **kwargs):
        if self.override:
            self.backward_calls += 1
        super().backward(loss, *args, **kwargs)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "interval": "step"}]


class Norms(L.Callback):
    """Each step's total gradient norm: the release's norm pass's, or (normal fit) ``clip_grad_norm_``'s own
    computation on the gradients before clipping."""

    def __init__(self, callback: LowMemOptimizerCallback):
        self.callback, self.norms, self.held_back = callback, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            self.norms.append(torch.nn.utils.get_total_norm(grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for release in self.callback.releases:
            self.norms.append(release.total_norm)
            self.held_back.append(release.held_back)


def _data(n=STEPS * 8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 24, generator=g)
    return DataLoader(TensorDataset(x, torch.tanh(x[:, :4]) * 3), batch_size=8)


def _fit(name="adamw_8bit", release=True, clip=BITES, module=None, bucket_bytes=0, ckpt_path=None,
         max_steps=STEPS, callbacks=(), **trainer_kwargs):
    module = module or Net()
    kwargs = dict(OPTIMIZERS[name])
    callback = LowMemOptimizerCallback(name, print_summary=False, plot=False, step_in_backward=release,
                                       bucket_bytes=bucket_bytes if release else None, **kwargs)
    norms = Norms(callback)
    options = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   gradient_clip_val=clip)
    options.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[callback, norms, *callbacks], **options)
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    module.held_back = norms.held_back
    return module, callback, trainer, norms.norms


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _assert_same_run(normal, released) -> None:
    """Params, optimizer state, logged metrics and per-step norms equal, bit for bit (NaN equal to NaN)."""
    (module_a, cb_a, trainer_a, norms_a), (module_b, cb_b, trainer_b, norms_b) = normal, released
    for (name, a), b in zip(module_a.named_parameters(), module_b.parameters()):
        assert _same(a, b), name
    state_a, state_b = cb_a.optimizers[0].state_dict()["state"], cb_b.optimizers[0].state_dict()["state"]
    assert state_a.keys() == state_b.keys() and state_a
    for key in state_a:
        for field, value in state_a[key].items():
            other = state_b[key][field]
            assert _same(value, other) if isinstance(value, torch.Tensor) else value == other, (key, field)
    metrics_a, metrics_b = trainer_a.logged_metrics, trainer_b.logged_metrics
    assert metrics_a.keys() == metrics_b.keys() and "train_loss" in metrics_a
    assert all(_same(torch.as_tensor(metrics_a[k]), torch.as_tensor(metrics_b[k])) for k in metrics_a)
    assert len(norms_a) == len(norms_b) == STEPS
    assert all(_same(a, b) for a, b in zip(norms_a, norms_b))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_pass_fit_equals_a_normal_fit_with_norm_clipping(name):
    normal = _fit(name, release=False)
    released = _fit(name)
    _assert_same_run(normal, released)
    coefs = [min(1.0, BITES / (float(n) + 1e-6)) for n in released[3]]
    assert max(coefs) < 1.0  # the clip bit on every step
    assert released[1].releases == [] and "backward" not in vars(released[2].precision_plugin)  # undone
    assert released[2].gradient_clip_val == BITES
    unclipped = _fit(name, release=True, clip=None)
    assert not torch.equal(unclipped[0].head.weight, released[0].head.weight)


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw"])
def test_a_clip_that_does_not_bite_equals_a_normal_fit_and_no_clipping(name):
    normal = _fit(name, release=False, clip=LOOSE)
    released = _fit(name, clip=LOOSE)
    _assert_same_run(normal, released)
    assert all(float(n) < LOOSE for n in released[3])  # coefficient 1
    unclipped = _fit(name, release=False, clip=None)
    for a, b in zip(unclipped[0].parameters(), released[0].parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_two_pass_under_bf16_precisions_equals_a_normal_fit(precision):
    normal = _fit("came", release=False, precision=precision)
    released = _fit("came", precision=precision)
    _assert_same_run(normal, released)
    assert released[3][0].dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)


@pytest.mark.filterwarnings("ignore:Gradient release with bucket_bytes")
@pytest.mark.parametrize("bucket_bytes", [0, 20_000, None], ids=["per-tensor", "buckets", "one-bucket"])
@pytest.mark.parametrize("ckpt", ["reentrant", "non-reentrant"])
def test_checkpointing_buckets_and_a_weight_held_back_equal_a_normal_fit(ckpt, bucket_bytes):
    normal = _fit("adamw_8bit", release=False, module=Net(ckpt=ckpt))
    released = _fit("adamw_8bit", module=Net(ckpt=ckpt), bucket_bytes=bucket_bytes)
    _assert_same_run(normal, released)
    # reentrant: the block's six tensors get their gradient in two nested passes each, so they are held back (their
    # norm taken of the whole gradient, once); non-reentrant: one block, nothing held back
    assert released[0].held_back == [6 if ckpt == "reentrant" else 0] * STEPS
    assert all(p.grad is None for p in released[0].parameters())


def test_non_finite_norm_skips_the_whole_step_like_a_normal_fit():
    for name in ("adamw_8bit", "sgd", "adamw"):
        normal = _fit(name, release=False, module=Net(inf_at=1))
        released = _fit(name, module=Net(inf_at=1))
        _assert_same_run(normal, released)
        assert not torch.isfinite(released[3][1])
        if name != "adamw":  # ours: every tensor of step 1 skipped, as the normal step's reused norm skips it
            assert released[1].optimizers[0].skipped_updates == normal[1].optimizers[0].skipped_updates == 10


def test_user_backward_override_runs_in_both_passes():
    normal = _fit(release=False, module=Net(override=True))
    released = _fit(module=Net(override=True))
    _assert_same_run(normal, released)
    assert normal[0].backward_calls == STEPS and released[0].backward_calls == 2 * STEPS


class NoKwargsBackward(Net):
    def backward(self, loss):
        loss.backward()


class DropsKwargsBackward(Net):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if getattr(self, "_inf_hook", None) is not None:
            self._inf_hook.remove()
            self._inf_hook = None

    def backward(self, loss, *args, **kwargs):
        loss.backward()


def test_override_without_keywords_is_refused_and_one_dropping_them_is_named():
    module = NoKwargsBackward()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"NoKwargsBackward.backward cannot take it; override it as "
                                         r"backward\(self, loss, \*args, \*\*kwargs\)"):
        _fit(module=module)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    with pytest.raises(RuntimeError, match="DropsKwargsBackward.backward must pass its keyword arguments on"):
        _fit(module=DropsKwargsBackward())
    _fit(module=NoKwargsBackward(), clip=0.5, gradient_clip_algorithm="value")  # by value: one pass, allowed


def test_resume_with_two_pass_clipping_is_bit_exact(tmp_path):
    straight = _fit("came", max_steps=-1, max_epochs=2)
    first = _fit("came", max_steps=-1, max_epochs=1)
    first[2].save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = _fit("came", max_steps=-1, max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    normal = _fit("came", release=False, max_steps=-1, max_epochs=2, ckpt_path=tmp_path / "epoch1.ckpt")
    for a, b in zip(straight[0].parameters(), normal[0].parameters()):
        assert torch.equal(a, b)


def test_notice_is_logged_once_at_fit_start(caplog):
    with caplog.at_level(logging.INFO):
        _fit()
    lines = [r.getMessage() for r in caplog.records if "backward runs twice" in r.getMessage()]
    assert lines == [TWO_PASS_NOTICE] and len(TWO_PASS_NOTICE) <= 80
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _fit(clip=0.5, gradient_clip_algorithm="value")
    assert not [r for r in caplog.records if "backward runs twice" in r.getMessage()]


@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_hf_causal_lm_with_gradient_checkpointing_equals_a_normal_fit(precision):
    """CausalLMModule(gradient_checkpointing=True): transformers' checkpointing, non-reentrant (ours and transformers'
    own default), recomputed in both passes."""
    from lowmem_lightning.modules.causal_lm import CausalLMModule

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32}
    ids = torch.randint(0, 259, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": b, "labels": b.clone()} for b in ids]
    runs = []
    for release in (False, True):
        torch.manual_seed(0)
        module = CausalLMModule(config=tiny, optimizer="adamw_8bit", lr=1e-3, gradient_checkpointing=True)
        callback = LowMemOptimizerCallback("adamw_8bit", print_summary=False, plot=False, step_in_backward=release,
                                           bucket_bytes=0 if release else None)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, gradient_clip_val=0.1, precision=precision, callbacks=[callback])
        trainer.fit(module, DataLoader(batches, batch_size=None))
        assert module.model.model.gradient_checkpointing
        runs.append(module)
    for (name, a), b in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- GradientRelease without Lightning


def _mixed_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    model[2].to(torch.bfloat16)
    return model


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(model[0](x))
    h = torch.tanh(model[2](h.bfloat16()).float())
    return model[4](h).square().mean() * 100


@pytest.mark.parametrize("bucket_bytes", [0, 3000])
def test_release_total_norm_and_update_equal_clip_grad_norm_with_mixed_dtypes(bucket_bytes):
    """fp32 and bf16 gradients in one optimizer: clip_grad_norm_ groups the norms by dtype (in its grouping's order,
    not the params'); the norm pass stacks them the same way, so the total and the steps are equal bit for bit."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    plain, released = _mixed_model(), _mixed_model()
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(released.parameters(), lr=0.1, momentum=0.9)
    release = GradientRelease(opt_b, bucket_bytes=bucket_bytes, clip_norm=0.5).attach()
    for _ in range(3):
        _forward(plain, x).backward()
        want = torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt_a.step()
        opt_a.zero_grad()
        loss = _forward(released, x)
        with release.norm_pass():
            loss.backward(retain_graph=True)
            alive = [p for p in released.parameters() if p.grad is not None]
        assert alive == []  # each gradient freed once its norm is taken
        loss.backward()
        release.finish_step()
        assert torch.equal(release.total_norm, want) and float(want) > 0.5
    for a, b in zip(plain.parameters(), released.parameters()):
        assert torch.equal(a, b)


def test_update_without_a_norm_pass_is_refused_and_arguments_are_checked():
    model = nn.Linear(4, 2)
    opt = build_optimizer("sgd", model.parameters(), lr=0.1)
    GradientRelease(opt, bucket_bytes=0, clip_norm=1.0).attach()
    with pytest.raises(RuntimeError, match=r"clip_norm=1.0\): a gradient is ready .* no norm pass ran"):
        model(torch.ones(1, 4)).sum().backward()
    with pytest.raises(ValueError, match="Invalid clip_norm=0: expected None or a finite number > 0"):
        GradientRelease(opt, bucket_bytes=0, clip_norm=0)
    with pytest.raises(ValueError, match="clip by value or by norm, not both"):
        GradientRelease(opt, bucket_bytes=0, clip_value=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match=r"norm_pass\(\) needs clip_norm"):
        with GradientRelease(opt, bucket_bytes=0).norm_pass():
            pass


@pytest.mark.parametrize("bucket_tensors", [0, 3])
def test_norm_pass_peak_is_not_above_the_update_pass_peak(bucket_tensors):
    """The norm pass frees each gradient once its norm is taken (no bucket, though every activation is still
    alive then): inside it the memory stays at or below the update pass's peak, so the two-pass step peaks no
    higher than a one-pass release step (profiler memory events, one profile per step)."""
    import sys
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile, record_function

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from profiler_peak import peak_bytes
    from release_norm_clip import PASSES, pass_peaks

    def step_peaks(clip_norm):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        release = GradientRelease(opt, bucket_bytes=bucket_tensors * 256 * 257 * 4, clip_norm=clip_norm).attach()
        x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(x).square().mean()
            if clip_norm is not None:
                with record_function(PASSES[0]), release.norm_pass():
                    loss.backward(retain_graph=True)
            with record_function(PASSES[1]):
                loss.backward()
                release.finish_step()
        return peak_bytes(prof), pass_peaks(prof)

    one_pass, _ = step_peaks(None)
    two_pass, (first, second) = step_peaks(0.01)
    norms = 6 * 2 * 16  # the 0-d norms kept until the pass ends (a gradient is 256 * 256 * 4 bytes)
    assert 0 < first <= second + norms and two_pass <= one_pass + norms, (first, second, two_pass, one_pass)


def test_benchmark_dry_run_trains_the_same_params(capsys):
    """``benchmarks/release_norm_clip.py --dry-run``: a tiny Llama, with and without activation checkpointing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import release_norm_clip

    release_norm_clip.main(["--dry-run"])
    assert capsys.readouterr().out.count("equals the normal step with clipping: True") == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw_8bit", "came"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_cuda_two_pass_fit_equals_a_normal_fit_with_norm_clipping(name, precision):
    """On CUDA (compiled Triton steps): the per-tensor ``_foreach_norm`` of the norm pass, stacked in
    ``clip_grad_norm_``'s order, gives its total and coefficient bit for bit, so the fits are equal as on CPU."""
    normal = _fit(name, release=False, accelerator="cuda", precision=precision)
    released = _fit(name, release=True, accelerator="cuda", precision=precision)
    _assert_same_run(normal, released)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_benchmark_dry_run_trains_the_same_params(capsys):
    """``benchmarks/release_norm_clip.py --device cuda --dtype bfloat16 --dry-run``: a tiny bf16 Llama on the GPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import release_norm_clip

    release_norm_clip.main(["--dry-run", "--device", "cuda", "--dtype", "bfloat16"])
    assert capsys.readouterr().out.count("equals the normal step with clipping: True") == 2
