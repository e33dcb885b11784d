"""What a weight average costs a LoRA run: Lightning's full copy against the average that shares the frozen base.

Lightning's ``EMAWeightAveraging`` builds torch's ``AveragedModel`` from a deep copy of the whole module and at every
update averages every param of the copy with the module's (``avg_fn``: ``decay * average + (1 - decay) * current``,
one tensor at a time) and copies every buffer (``use_buffers=False``). With
:class:`~lowmem_lightning.callbacks.averaging.AverageSharesFrozen` the copy shares what does not train and
:class:`~lowmem_lightning.callbacks.averaging.AverageOfItself` leaves a shared tensor as it is, so an update touches
the adapters alone. A shared average's update also lists the pairs it averages once
(:class:`~lowmem_lightning.callbacks.averaging.SharedAverageUpdate`: torch's walks both module trees at every update)
and averages them with :class:`~lowmem_lightning.callbacks.averaging.EMAMultiFunction` (the same EMA, bit for bit,
in a few multi-tensor calls): the ``shared, torch's update`` row is the shared average without either. Last, a
validation's swap of the shared average into the model and back: Lightning's (clones every tensor of the average,
the shared frozen ones too) against ours (``swap_unshared``).

The model: a Llama decoder (default hidden 1024, intermediate 2816, 8 layers, vocab 32000: 0.17 B params) in bf16,
frozen, with peft LoRA r=16 on its seven projections (fp32 adapters), on the CPU. Measured: the average's own bytes,
and the time of ``update_parameters`` for each, interleaved over ``--repeats`` rounds of ``--updates`` updates each
(median time per update and the median of the per-round ratios: this machine is noisy, a single run means little).

    python benchmarks/ema_update.py [--repeats 7] [--updates 5] [--threads 1] [--hidden 1024] [--layers 8]
        [--device cuda]   # gpu_check.py --parts ema: the 7B architecture on the GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn


def lora_model(hidden: int = 1024, layers: int = 8, device: str = "cpu") -> torch.nn.Module:
    """The bf16 Llama with fp32 LoRA adapters described above (random weights), built on ``device``; ``hidden`` and
    ``layers`` size it (intermediate 2.75 x hidden, 64-wide heads)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000,
                         tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads``, ``--hidden`` and ``--layers`` (:func:`lora_model`'s sizes)."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size, a multiple of 64 (default 1024)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")


def averages(model: torch.nn.Module, decay: float) -> dict[str, AveragedModel]:
    """``{"full copy": Lightning's average, "shared, torch's update": ours as the sharing first shipped (torch's
    ``update_parameters``, which walks both module trees, and its EMA one tensor at a time), "shared": ours now
    (:class:`SharedAverageUpdate` over the pairs listed once, :class:`EMAMultiFunction`)}`` of ``model``, each updated
    once (the first update copies)."""
    from lowmem_lightning.callbacks.averaging import (
        AverageOfItself,
        _average_shared_as_themselves,
        _sharing_copy,
        shareable_parts,
    )

    built = {"full copy": AveragedModel(model, avg_fn=get_ema_avg_fn(decay), use_buffers=False)}
    for name in ("shared, torch's update", "shared"):
        shared = AveragedModel(torch.nn.Identity(), avg_fn=get_ema_avg_fn(decay), use_buffers=False)
        shared.module = _sharing_copy(model, shareable_parts(model, use_buffers=False))
        _average_shared_as_themselves(shared)
        built[name] = shared
    first = built["shared, torch's update"]
    del first.update_parameters  # back to AveragedModel's own, and to the EMA of one tensor at a time
    first.avg_fn, first.multi_avg_fn = AverageOfItself(get_ema_avg_fn(decay), multi=False), None
    for average in built.values():
        average.update_parameters(model)
    return built


def own_bytes(average: AveragedModel, model: torch.nn.Module) -> int:
    """Bytes of ``average``'s module in storages ``model`` does not hold."""
    theirs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    own = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
           for t in [*average.module.parameters(), *average.module.buffers()]}
    return sum(n for ptr, n in own.items() if ptr not in theirs)


def seconds_per_update(average: AveragedModel, model: torch.nn.Module, updates: int) -> float:
    """Mean seconds of ``updates`` updates (the device's queue drained before and after)."""
    return _timed(model, lambda: [average.update_parameters(model) for _ in range(updates)]) / updates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--updates", type=int, default=5, help="updates per round (default 5)")
    parser.add_argument("--device", default="cpu", help="where the model and the averages live (default cpu)")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = lora_model(args.hidden, args.layers, args.device)
    built = averages(model, decay=0.999)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, average in built.items():
            times[name].append(seconds_per_update(average, model, args.updates))
    ratios = [f / s for f, s in zip(times["full copy"], times["shared"])]
    multi = [f / s for f, s in zip(times["shared, torch's update"], times["shared"])]
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, "
          f"{sum(t.nbytes for t in [*model.parameters(), *model.buffers()]):,} bytes; trainable {trainable:,} bytes")
    print("| average | own bytes | ms per update (median) |")
    print("|---|---:|---:|")
    for name, average in built.items():
        print(f"| {name} | {own_bytes(average, model):,} | {1e3 * statistics.median(times[name]):.2f} |")
    print(f"full copy / shared time per update: median {statistics.median(ratios):.1f}x "
          f"(rounds: {min(ratios):.1f}-{max(ratios):.1f}x, {args.repeats} rounds, {args.threads} thread(s))")
    same = _same_average(built["shared, torch's update"], built["shared"])
    print(f"shared with torch's update / shared: median {statistics.median(multi):.2f}x "
          f"(rounds: {min(multi):.2f}-{max(multi):.2f}x); averages bit-equal: {same}")
    swaps = swap_seconds(built["shared"], model, args.repeats)
    print(f"validation swap of the shared average (there and back, median of {args.repeats}): Lightning's "
          f"{1e3 * swaps['lightning']:.2f} ms, ours {1e3 * swaps['ours']:.2f} ms "
          f"({swaps['lightning'] / swaps['ours']:.1f}x)")
    drift = sum(not torch.equal(a, b) for a, b in zip(built["full copy"].module.parameters(), model.parameters())
                if not b.requires_grad)
    print(f"frozen params the full copy's average no longer equals: {drift} (shared: 0 by construction)")
    return 0


def swap_seconds(average: AveragedModel, model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Median seconds of a validation's two swaps of ``average`` (shared) into ``model`` and back: Lightning's
    ``WeightAveraging._swap_models`` (clones every tensor of the average) and ours
    (:func:`~lowmem_lightning.callbacks.averaging.swap_unshared`), interleaved."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging

    from lowmem_lightning.callbacks.averaging import swap_unshared

    callback = EMAWeightAveraging()
    callback._average_model = average
    swaps = {"lightning": lambda: WeightAveraging._swap_models(callback, model),
             "ours": lambda: swap_unshared(callback, model)}
    times: dict[str, list[float]] = {name: [] for name in swaps}
    for _ in range(repeats):
        for name, swap in swaps.items():
            times[name].append(_timed(model, lambda swap=swap: (swap(), swap())))
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def _timed(model: torch.nn.Module, work) -> float:
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _same_average(a: AveragedModel, b: AveragedModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.module.parameters(), b.module.parameters()))


if __name__ == "__main__":
    raise SystemExit(main())
