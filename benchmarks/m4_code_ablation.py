"""Issue 29.4's ablation of the 4-bit AdamW moment codes: the convergence study's model trained by a pure-PyTorch
AdamW whose m and v are stored as decoded 4-bit blocks (128) in a chosen code, swapped one moment at a time.

The simulation equals the package where it claims to (``ours/ours`` = ``adamw_4bit`` bit for bit: our
``encode_m4_reference`` / ``encode_v4_reference``, op order and hash stream); ``torchao`` codes re-enact torchao's
AdamW4bit (its dynamic-exponent signed map for m, linear-without-zero for v, nearest rounding); within 1-3e-3 per seed.
m codes: ``ours`` (stall-aware), ``ours_nearest``, ``ours_sr`` (stochastic everywhere), ``damp{p}`` (damped stall
release: a stalled element released with probability p, then stochastic with u / p; ``damp{p}nz`` keeps the zero
code), ``taosa{p}`` (torchao's map, stall-aware rounding), ``torchao``, ``fp32``; a ``_salt`` suffix draws another
hash stream. v codes: ``ours``, ``torchao``, ``fp32``, ``floor16``. Variant names (``VARIANTS``) are the rows of
RESULTS.md "Issue 29.4" sections; ``torch`` is ``torch.optim.AdamW``. Needs torchao for its codes.

    python benchmarks/m4_code_ablation.py damp0.5 0 --lr-scale 0.5        # one 200-step run, one thread
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence as cv  # noqa: E402

from lowmem_lightning.kernels.adamw4bit import (  # noqa: E402
    M_SEED_SALT,
    decode_m4_reference,
    decode_v4_reference,
    encode_m4_reference,
    encode_v4_reference,
)
from lowmem_lightning.kernels.adamw8bit import AdamWScalars, _host_terms, adamw_math  # noqa: E402
from lowmem_lightning.kernels.codec import block_scale_rcp_reference, sqrt_floor_reference  # noqa: E402
from lowmem_lightning.kernels.rounding import SEED_INDEX, SEED_MASK, SEED_STEP, hash_uniform_reference  # noqa: E402


def _dynamic_map_signed():  # torchao create_dynamic_map(True, 3, 4)
    from torchao.optim.quant_utils import create_dynamic_map
    return torch.tensor(create_dynamic_map(True, 3, 4), dtype=torch.float32)


TAO_M = None


def encode_damped(m, absmax, u, previous, p, keep_zero=False):
    """encode_m4_reference with damped stall release: where nearest == previous, release with prob p, then SR."""
    r = m * block_scale_rcp_reference(absmax)
    a = r.abs()
    k = (sqrt_floor_reference(a) * 7.0).to(torch.int32).clamp(max=6)
    kf = k.to(torch.float32)
    width = 2.0 * kf + 1.0
    above = a * 49.0 - kf * kf
    c_near = k + (above * 2.0 >= width).to(torch.int32)
    near = torch.where(r < 0, -c_near, c_near) & 15
    pf = torch.tensor(p, dtype=torch.float32)
    c = k + (u * width < above * pf).to(torch.int32)
    sr = torch.where(r < 0, -c, c) & 15
    release = (near == previous) & (u < pf)
    if keep_zero:
        release &= previous != 0
    return torch.where(release, sr, near)
TAO_V = torch.linspace(0, 1, 17)[1:].to(torch.float32)


def tao_q(x, qmap):  # nearest, as quantize_4bit_with_qmap
    codes = torch.where(x >= qmap[8], 8, 0)
    codes += torch.where(x >= qmap[codes + 4], 4, 0)
    codes += torch.where(x >= qmap[codes + 2], 2, 0)
    codes += torch.where(x >= qmap[codes + 1], 1, 0)
    up = (codes + 1).clip(max=15)
    lo, hi = qmap[codes], qmap[up]
    return torch.where(x - lo >= (hi - lo) * 0.5, up, codes)


def tao_roundtrip(x, qmap, signed):
    scale = (x.abs() if signed else x).amax(-1, keepdim=True).clip(1e-12)  # torchao scale_tensor
    return qmap[tao_q(x / scale, qmap)] * scale


class Sim:
    """AdamW on every param; params >= 4096 elements keep m, v as decoded 4-bit codes (blocks of 128).

    m_code: ours | ours_nearest | ours_sr (stochastic everywhere) | torchao | fp32;
    v_code: ours | torchao | fp32 | floor16 (fp32 v floored at blockmax/16, torchao's floor without its grid)."""

    def __init__(self, params, lr, m_code, v_code, eps=1e-8, betas=(0.9, 0.999), math_mode="ours"):
        global TAO_M
        TAO_M = _dynamic_map_signed()
        self.params = list(params)
        self.param_groups = [{"lr": lr}]
        self.m_code, self.v_code, self.eps, (self.b1, self.b2) = m_code, v_code, eps, betas
        self.t = 0
        self.state = {}
        self.math_mode = math_mode
        self.salt = 0 if not m_code.endswith("_salt") else 12345
        self.m_code = m_code.removesuffix("_salt")
        self.step_t = torch.tensor(0.0)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        self.step_t += 1
        t, b1, b2, lr = self.t, self.b1, self.b2, self.param_groups[0]["lr"]
        f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        sc = AdamWScalars(f32(lr), f32(b1), f32(b2), f32(self.eps), f32(0.0), f32(1.0))
        step_size, inv_bc2 = (f32(x) for x in _host_terms(lr, b1, b2, t))
        for i, p in enumerate(self.params):
            g = p.grad.float()
            quant = p.numel() >= 4096
            g = g.reshape((-1, 128) if quant else (-1,))
            st = self.state.setdefault(i, {"m": torch.zeros_like(g), "v": torch.zeros_like(g),
                                             "mc": torch.zeros(g.shape, dtype=torch.int32)})
            pf = p.detach().float().reshape(g.shape)
            if self.math_mode == "tao":  # torchao's single_param_adam, op for op (eager)
                lr_t = f32(lr)
                bc1, bc2 = 1 - b1 ** self.step_t, 1 - b2 ** self.step_t
                m = st["m"].lerp(g, 1 - b1)
                v = st["v"].lerp(g.square(), 1 - b2)
                w = v.sqrt()
                pf = pf - lr_t * (m / bc1) / (w / bc2.sqrt() + self.eps)
            elif quant and self.v_code == "floor16":  # adamw_math with v floored at blockmax/16 in the update
                m = b1 * st["m"] + (1 - b1) * g
                v = b2 * st["v"] + (1 - b2) * (g * g)
                w = sqrt_floor_reference(torch.maximum(v, v.amax(-1, keepdim=True) / 16))
                pf = pf - step_size * (m / (w * inv_bc2 + self.eps))
            else:
                pf, m, v, w = adamw_math(pf, g, st["m"], st["v"], sc, step_size, inv_bc2)
            p.copy_(pf.reshape(p.shape))
            if not quant:
                st["m"], st["v"] = m, v
                continue
            if self.v_code != "torchao" and self.math_mode == "tao":
                w = sqrt_floor_reference(v)
            st["m"] = self._m(m, st, i, t)
            st["v"] = self._v(v, w)

    def _m(self, m, st, i, t):
        code = self.m_code
        if code == "fp32":
            return m
        if code == "torchao":
            return tao_roundtrip(m, TAO_M, True)
        absmax = m.abs().amax(-1, keepdim=True)
        if code.startswith("taosa"):  # torchao's dynamic-exponent m map, stall-aware (damped p) rounding
            p = float(code[5:])
            scale = m.abs().amax(-1, keepdim=True).clip(1e-12)
            x = m / scale
            idx = torch.bucketize(x, TAO_M).clamp(1, 15)
            lo, hi = TAO_M[idx - 1], TAO_M[idx]
            near = torch.where(x - lo >= (hi - lo) * 0.5, idx, idx - 1)
            seed = (t * SEED_STEP + i * SEED_INDEX + self.salt) & SEED_MASK
            u = hash_uniform_reference(torch.arange(m.numel()).view(m.shape), seed + M_SEED_SALT)
            sr = torch.where(u * (hi - lo) < (x - lo) * p, idx, idx - 1)
            nib = near if t == 1 else torch.where((near == st["mc"]) & (u < p), sr, near)
            st["mc"] = nib
            return TAO_M[nib] * scale
        if code.startswith("damp"):
            seed = (t * SEED_STEP + i * SEED_INDEX + self.salt) & SEED_MASK
            offs = torch.arange(m.numel()).view(m.shape)
            u = hash_uniform_reference(offs, seed + M_SEED_SALT)
            nib = encode_damped(m, absmax, u, st["mc"], float(code[4:].removesuffix("nz")), code.endswith("nz"))
            st["mc"] = nib
            return decode_m4_reference(nib, absmax)
        if code == "ours_nearest":
            nib = encode_m4_reference(m, absmax, None)
        else:
            seed = (t * SEED_STEP + i * SEED_INDEX + self.salt) & SEED_MASK
            offs = torch.arange(m.numel()).view(m.shape)
            u = hash_uniform_reference(offs, seed + M_SEED_SALT)
            nib = encode_m4_reference(m, absmax, u, st["mc"] if code == "ours" else None)
        st["mc"] = nib
        return decode_m4_reference(nib, absmax)

    def _v(self, v, w):
        code = self.v_code
        if code in ("fp32", "floor16"):
            return v
        if code == "torchao":
            return tao_roundtrip(v, TAO_V, False)
        vmax = v.amax(-1, keepdim=True)
        nib = encode_v4_reference(w, 1.0 / sqrt_floor_reference(vmax))
        return decode_v4_reference(nib, vmax)


def _tao_param_step(p, g, m_old, v_old, step_t, lr_t, b1: float, b2: float, eps: float):
    """torchao's single_param_adam (no weight decay) with its 4-bit round trips of both moments, on decoded
    states; compiled (fullgraph, static), as torchao compiles it."""
    bc1, bc2 = 1 - b1 ** step_t, 1 - b2 ** step_t
    m = m_old.lerp(g, 1 - b1)
    v = v_old.lerp(g.square(), 1 - b2)
    m_q = tao_roundtrip(m, TAO_M, True)
    v_q = tao_roundtrip(v, TAO_V, False)
    p = p - lr_t * (m / bc1) / ((v.sqrt() / bc2.sqrt()) + eps)
    return p, m_q, v_q


class TaoCompiled(Sim):
    """torchao AdamW4bit re-enacted: the whole per-param step compiled (quantized params) as torchao does."""

    @torch.no_grad()
    def step(self):
        self.t += 1
        self.step_t += 1
        lr_t = torch.tensor(self.param_groups[0]["lr"], dtype=torch.float32)
        fn = torch.compile(_tao_param_step, fullgraph=True, dynamic=False)
        for i, p in enumerate(self.params):
            quant = p.numel() >= 4096
            g = p.grad.float().reshape((-1, 128) if quant else (-1,))
            st = self.state.setdefault(i, {"m": torch.zeros_like(g), "v": torch.zeros_like(g)})
            pf = p.detach().float().reshape(g.shape)
            if quant:
                pf, st["m"], st["v"] = fn(pf, g, st["m"], st["v"], self.step_t, lr_t, self.b1, self.b2, self.eps)
            else:
                bc1, bc2 = 1 - self.b1 ** self.step_t, 1 - self.b2 ** self.step_t
                st["m"] = st["m"].lerp(g, 1 - self.b1)
                st["v"] = st["v"].lerp(g.square(), 1 - self.b2)
                pf = pf - lr_t * (st["m"] / bc1) / ((st["v"].sqrt() / bc2.sqrt()) + self.eps)
            p.copy_(pf.reshape(p.shape))


VARIANTS = {
    "sim_ours": ("ours", "ours"), "sim_tao": ("torchao", "torchao"), "sim_tao_exact": ("torchao", "torchao", "tao"),
    "a": ("ours", "torchao"), "b": ("torchao", "ours"), "c": ("ours_nearest", "ours"), "d": ("fp32", "floor16"),
    "fp32": ("fp32", "fp32"), "ours_salt": ("ours_salt", "ours"), "mfp32_vours": ("fp32", "ours"),
    "mours_vfp32": ("ours", "fp32"), "mnear_vfp32": ("ours_nearest", "fp32"), "c_salt": ("ours_nearest", "ours"),
}
"""Named (m code, v code[, op order]) pairs; ``damp*`` / ``taosa*`` names pair their m code with our v."""


def build(name: str, params, peak: float, beta1: float):
    """The optimizer of variant ``name``."""
    if name == "torch":
        return torch.optim.AdamW(params, lr=peak, betas=(beta1, 0.999), weight_decay=0.0)
    if name == "tao_compiled":
        return TaoCompiled(params, peak, "torchao", "torchao", betas=(beta1, 0.999))
    if name in VARIANTS:
        v = VARIANTS[name]
    elif name.startswith(("damp", "taosa")):
        v = (name, "ours")
    else:
        raise SystemExit(f"unknown variant {name!r}: one of torch, tao_compiled, damp<p>[nz][_salt], taosa<p>, "
                         f"{', '.join(VARIANTS)}")
    return Sim(params, peak, v[0], v[1], betas=(beta1, 0.999), math_mode=v[2] if len(v) > 2 else "ours")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant")
    parser.add_argument("seed", type=int)
    parser.add_argument("--lr-scale", type=float, default=0.5, help="x the convergence study's AdamW peak lr")
    parser.add_argument("--beta1", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = argparse.Namespace(steps=args.steps, batch=16, seq=128, hidden=128, layers=2, warmup=30, eval_batches=20)
    train_data, val_data, _ = cv.stdlib_corpus(4_000_000)
    model = cv.tiny_llama(args.seed, 128, 2, 128)
    peak = cv.LR["adamw"] * args.lr_scale
    opt = build(args.variant, model.parameters(), peak, args.beta1)
    start = time.perf_counter()
    _, val = cv.train(model, opt, train_data, val_data, run, args.seed, peak)
    print(f"{args.variant} lr x{args.lr_scale:g} beta1 {args.beta1:g} seed {args.seed}: val loss {val:.4f} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
