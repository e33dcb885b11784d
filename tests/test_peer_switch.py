"""A Lightning project that saved memory with a peer's optimizer (bitsandbytes, torchao, came-pytorch, transformers'
Adafactor) adds LowMemOptimizerCallback and resumes its checkpoint: the peer's moments are decoded from the
checkpoint's tensors and carried into ours (our codes of the peer's decoded moments), the run continues close
to an uninterrupted peer run, one info line says what was converted, and a different algorithm is refused."""

import logging
import subprocess
import sys

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowmem_lightning import AdamW8bit
from lowmem_lightning.callbacks import LowMemOptimizerCallback
from lowmem_lightning.callbacks.checkpoint_io import AtomicCheckpointIO
from lowmem_lightning.cli import main
from lowmem_lightning.kernels.adamw4bit import dequantize4_reference
from lowmem_lightning.kernels.codec import dequantize_reference, quantize_reference
from lowmem_lightning.optim.peer_convert import converted_peer_state, identify_peer

STEPS, MORE = 4, 4  # peer steps before the checkpoint, steps after it


class PeerNet(L.LightningModule):
    """A 4096-element weight (quantized by every peer: >= 4096 elements, a multiple of 256) and small tensors
    (fp32 state), trained with the peer optimizer ``make(params)`` in configure_optimizers."""

    def __init__(self, make):
        super().__init__()
        self.make = make
        self.net = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return self.make(self.parameters())


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, generator=g)  # one batch per epoch: every step sees the same data
    return DataLoader(TensorDataset(x, torch.sin(x.sum(1, keepdim=True))), batch_size=32)


def _fit(root, make, steps, callbacks=(), ckpt_path=None):
    torch.manual_seed(0)
    model = PeerNet(make)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=list(callbacks))
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return trainer, model


def _bnb(name):
    bnb = pytest.importorskip("bitsandbytes")
    return lambda params: getattr(bnb.optim, name)(params, lr=2e-3, weight_decay=0.01)


def _torchao(name):
    optim = pytest.importorskip("torchao.optim")
    return lambda params: getattr(optim, name)(params, lr=2e-3, weight_decay=0.01)


def _came():
    came = pytest.importorskip("came_pytorch")
    return lambda params: came.CAME(params, lr=2e-3, weight_decay=0.01)


def _adafactor():
    optimization = pytest.importorskip("transformers.optimization")
    return lambda params: optimization.Adafactor(params, lr=2e-3, relative_step=False, scale_parameter=False,
                                                 warmup_init=False)


def _peer_moments(state: dict) -> dict[str, torch.Tensor]:
    """A peer's saved moments for one param, decoded by the peer's own code (bitsandbytes' functional
    dequantize, torchao's subclass) or as saved (fp32, factored statistics), under our names."""
    if "__bnb_optimizer_quant_state__" in state:
        from bitsandbytes.functional import dequantize_blockwise

        quant, out = state["__bnb_optimizer_quant_state__"], {}
        for index, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
            s = quant.get(f"state{index}")
            if s is not None:
                out[key] = s.float() if s.dtype != torch.uint8 else dequantize_blockwise(
                    s, absmax=quant[f"absmax{index}"], code=quant[f"qmap{index}"], blocksize=256)
        return out
    return {k: (v.dequantize() if hasattr(v, "codes") else v).float() for k, v in state.items()
            if k.startswith("exp_avg")}


def _our_moments(state: dict, numel: int) -> dict[str, torch.Tensor]:
    """Our state of one param decoded to fp32 (flat for codes), with the fp32 tensors as they are."""
    out = {k: v for k, v in state.items() if k.startswith("exp_avg") and v.dtype == torch.float32
           and not k.endswith("absmax")}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes = state.get(f"{key}_codes")
        if codes is None:
            continue
        absmax = state[f"{key}_absmax"]
        eight_bit = codes.numel() >= numel  # 4-bit codes: two per byte
        out[key] = dequantize_reference(codes, absmax)[:numel] if eight_bit else \
            dequantize4_reference(codes, absmax, numel, signed)
    return out


class _Restored(L.Callback):
    """Our optimizer's state of each param at train start (after the restore), and the params."""

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.states = [{k: t.detach().clone() for k, t in opt.state[p].items()} for p in pl_module.parameters()]


# id: (peer factory, our optimizer, bound on |resumed - uninterrupted peer| / |the peer's movement| over the MORE
# steps after the checkpoint). Measured (this model, CPU): the same math (bnb 32-bit AdamW -> torch AdamW, CAME,
# Adafactor) 0 (bit-exact); our 8-bit codes after a peer's 8-bit 0.026-0.029; Lion8bit 0.066; our 4-bit codes
# after bnb's 8-bit 0.31, after torchao's 4-bit 0.24 (our 4-bit codes themselves: our own adamw_8bit checkpoint
# resumed as adamw_4bit ends 0.31 from the uninterrupted adamw_8bit run, a torch AdamW one 0.31).
PEERS = {
    "bnb_adamw8bit": (lambda: _bnb("AdamW8bit"), "adamw_8bit", 0.05),
    "bnb_paged_adamw8bit": (lambda: _bnb("PagedAdamW8bit"), "paged_adamw_8bit", 0.05),
    "bnb_adamw8bit_to_4bit": (lambda: _bnb("AdamW8bit"), "adamw_4bit", 0.4),
    "bnb_adamw32bit_to_torch": (lambda: _bnb("AdamW"), "adamw", 1e-6),
    "bnb_lion8bit": (lambda: _bnb("Lion8bit"), "lion_8bit", 0.1),
    "torchao_adamw8bit": (lambda: _torchao("AdamW8bit"), "adamw_8bit", 0.05),
    "torchao_adamw4bit": (lambda: _torchao("AdamW4bit"), "adamw_4bit", 0.4),
    "came_pytorch": (_came, "came", 1e-6),
    "transformers_adafactor": (_adafactor, "adafactor", 1e-6),
}


PEER_LABELS = {"bnb": "bitsandbytes", "torchao": "torchao", "came": "came-pytorch CAME",
               "transformers": "transformers Adafactor"}


@pytest.mark.parametrize("peer", list(PEERS))
def test_a_peers_checkpoint_resumes_with_ours(peer, tmp_path, caplog):
    make, target, bound = PEERS[peer][0](), PEERS[peer][1], PEERS[peer][2]
    trainer, before = _fit(tmp_path / "peer", make, STEPS)
    start = [p.detach().clone() for p in before.parameters()]
    trainer.save_checkpoint(tmp_path / "peer.ckpt")
    saved = torch.load(tmp_path / "peer.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    _, straight = _fit(tmp_path / "straight", make, STEPS + MORE)  # the uninterrupted peer run

    restored = _Restored()
    caplog.set_level(logging.INFO)
    ours = LowMemOptimizerCallback(target, print_summary=False, plot=False)
    trainer, resumed = _fit(tmp_path / "ours", make, STEPS + MORE, [ours, restored], tmp_path / "peer.ckpt")

    lines = [r.getMessage() for r in caplog.records if "converting the checkpoint's" in r.getMessage()]
    assert len(lines) == 1 and f"optimizer state to {target!r}" in lines[0], lines
    assert PEER_LABELS[peer.split("_")[0]] in lines[0] and "step counters" in lines[0], lines
    assert trainer.global_step == STEPS + MORE
    for p, state, index in zip(resumed.parameters(), restored.states, range(len(saved))):
        assert float(state["step"]) == STEPS
        peer_m, our_m = _peer_moments(saved[index]), _our_moments(state, p.numel())
        assert set(peer_m) <= set(our_m) | {"exp_avg_sq"} and peer_m, (set(peer_m), set(our_m))
        for key, expected in peer_m.items():
            got = our_m[key].reshape(-1)
            expected = expected.reshape(-1)
            if f"{key}_codes" not in state:  # fp32 state: the peer's decode exactly
                assert torch.equal(got, expected), key
            elif state[f"{key}_codes"].numel() >= p.numel():  # our 8-bit codes of the peer's moments
                codes, absmax = quantize_reference(expected, signed=key == "exp_avg")
                assert torch.equal(got, dequantize_reference(codes, absmax)[: p.numel()]), key
            else:  # our 4-bit codes: within one of our code steps (the largest gap, 1/7 of the block scale)
                scale = expected.abs().view(-1, 128).amax(1).repeat_interleave(128)
                assert ((got - expected).abs() <= scale / 7 + 1e-30).all(), key
    moved = sum(float((s.detach() - p0).norm()) ** 2 for s, p0 in zip(straight.parameters(), start)) ** 0.5
    apart = sum(float((r - s).detach().norm()) ** 2 for r, s in zip(resumed.parameters(), straight.parameters())) ** 0.5
    assert apart <= bound * moved, (apart, moved)


REFUSED = {  # id: (peer factory, our optimizer, what the refusal names)
    "bnb_lion8bit_to_adamw_8bit": (lambda: _bnb("Lion8bit"), "adamw_8bit",
                                   r"bitsandbytes Lion8bit's \(lion\), which LowMemOptimizerCallback\(optimizer="
                                   r"'adamw_8bit'\) cannot continue.*optimizer='lion' or 'lion_8bit'"),
    "came_to_adafactor": (_came, "adafactor", r"came-pytorch CAME's \(came\).*optimizer='came'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_peers_state_of_another_algorithm_is_refused(case, tmp_path):
    make, target, message = REFUSED[case][0](), REFUSED[case][1], REFUSED[case][2]
    trainer, _ = _fit(tmp_path / "peer", make, 2)
    trainer.save_checkpoint(tmp_path / "peer.ckpt")
    ours = LowMemOptimizerCallback(target, print_summary=False, plot=False)
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path / "ours", make, 4, [ours], tmp_path / "peer.ckpt")


def test_a_torchao_checkpoint_without_torchao_installed_says_to_install_it(tmp_path):
    trainer, _ = _fit(tmp_path / "peer", _torchao("AdamW8bit"), 1)
    trainer.save_checkpoint(tmp_path / "peer.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "peer.ckpt")["optimizer_states"]  # torchao: it loads
    script = ("import sys; sys.modules['torchao'] = None  # as if torchao were not installed\n"
              "from lowmem_lightning.callbacks.checkpoint_io import AtomicCheckpointIO\n"
              "try:\n    AtomicCheckpointIO().load_checkpoint(sys.argv[1])\n"
              "except ModuleNotFoundError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "peer.ckpt")], capture_output=True, text=True,
                         timeout=120).stdout
    assert "holds torchao's quantized tensors" in out and "Install it (pip install torchao)" in out, out


class CliPeerNet(PeerNet):
    """:class:`PeerNet` as a ``lowmem fit`` model (``--model test_peer_switch.CliPeerNet``): a user's module whose
    configure_optimizers returns bitsandbytes' AdamW8bit.

    Args:
        lr: The AdamW8bit learning rate.
    """

    def __init__(self, lr: float = 2e-3):
        super().__init__(lambda params: _bnb("AdamW8bit")(params))
        self.lr = lr


class PeerData(L.LightningDataModule):
    """The one-batch regression data of :func:`_data`, as a ``lowmem fit`` data module."""

    def train_dataloader(self):
        return _data()


def test_lowmem_fit_resumes_a_bitsandbytes_checkpoint_with_optim(tmp_path, caplog):
    """A user's project trained with bitsandbytes' AdamW8bit, then ``lowmem fit --optim adamw_4bit --ckpt_path``:
    it trains on from the checkpoint with ours, the one conversion line printed, our state saved."""
    _fit(tmp_path / "peer", _bnb("AdamW8bit"), STEPS)[0].save_checkpoint(tmp_path / "peer.ckpt")
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 0, "model": {"class_path": "test_peer_switch.CliPeerNet"},
        "data": {"class_path": "test_peer_switch.PeerData"},
        "trainer": {"max_steps": STEPS + 2, "logger": False, "accelerator": "cpu", "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "ours"), "enable_progress_bar": False}}))
    caplog.set_level(logging.INFO)
    saved_argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        code = main(["fit", "--config", str(config), "--optim", "adamw_4bit",
                     "--ckpt_path", str(tmp_path / "peer.ckpt")])
    finally:
        sys.argv = saved_argv
    assert code == 0
    lines = [r.getMessage() for r in caplog.records if "converting the checkpoint's" in r.getMessage()]
    assert len(lines) == 1 and "bitsandbytes 8-bit AdamW" in lines[0] and "to 'adamw_4bit'" in lines[0], lines
    last = sorted((tmp_path / "ours").rglob("*.ckpt"))
    saved = torch.load(last[-1], weights_only=False)
    assert saved["callbacks"]["LowMemOptimizerCallback"]["optimizer"] == "adamw_4bit"
    states = saved["optimizer_states"][0]["state"].values()
    assert all(float(s["step"]) == STEPS + 2 for s in states)
    assert any(s.get("exp_avg_codes") is not None and s["exp_avg_codes"].dtype == torch.uint8 for s in states)


def test_a_bitsandbytes_state_whose_scales_do_not_fit_is_refused_naming_the_key():
    params = [nn.Parameter(torch.randn(64, 64))]
    opt = _bnb("AdamW8bit")(params)
    params[0].grad = torch.randn(64, 64)
    opt.step()
    state_dict = opt.state_dict()
    assert identify_peer(state_dict) == "bnb_adamw_8bit"
    state_dict["state"][0]["__bnb_optimizer_quant_state__"]["absmax2"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"param 0: 'qmap2' / 'absmax2' have shapes \(256,\) / \(3,\); 8-bit codes "
                                         r"of 4096 elements need \(256,\) and \(16,\)"):
        converted_peer_state(state_dict, "bnb_adamw_8bit", "adamw_8bit")


def test_torch_and_our_own_states_are_no_peers():
    params = [nn.Parameter(torch.randn(64, 64))]
    for opt in (torch.optim.AdamW(params), AdamW8bit(params)):
        params[0].grad = torch.randn(64, 64)
        opt.step()
        assert identify_peer(opt.state_dict()) is None
