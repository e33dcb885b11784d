"""End-of-fit report of :class:`~lowmem_lightning.callbacks.StateMemoryMonitor`: a text summary
and, when matplotlib is installed, a PNG of optimizer-state memory per optimizer step against fp32
AdamW on the same params, with the training and validation loss."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from lowmem_lightning.kernels.codec import MIN_QUANTIZED_NUMEL
from lowmem_lightning.optim import StateMemory
from lowmem_lightning.optim.layout import quantizes_state
from lowmem_lightning.optim.sharding import local

__all__ = [
    "adamw_fp32_state_bytes", "small_tensor_summary", "summary_dict", "format_summary", "StateHistory",
    "build_figure", "write_plot",
]

MIB = 2**20


def adamw_fp32_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes torch's fp32 ``AdamW`` would hold for the same params: ``exp_avg`` + ``exp_avg_sq`` in the
    param's shape (4 bytes each per element for fp32 params) plus a 4-byte ``step`` tensor per param.
    A sharded (DTensor) param counts its local shard, like :func:`~lowmem_lightning.optim.state_memory`."""
    total = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad or param in optimizer.state:  # the params state_memory counts
                    total += 2 * 4 * local(param).numel() + 4
    return total


def small_tensor_summary(optimizers: list[torch.optim.Optimizer]) -> dict:
    """Params that keep 32-bit state in a quantizing optimizer, and the state bytes they hold: in tensors under
    :data:`MIN_QUANTIZED_NUMEL` (4096) elements (as in bitsandbytes and torchao), ``{"small_params": elements,
    "small_state_bytes": bytes}``, and larger ones in groups with ``quantize_state=False`` (``fp32_state``),
    ``{"fp32_state_params", "fp32_state_bytes"}`` (trainable or stateful params, local shards; the rule is
    :func:`~lowmem_lightning.optim.layout.quantizes_state`), to merge into :func:`summary_dict`'s result."""
    out = dict.fromkeys(("small_params", "small_state_bytes", "fp32_state_params", "fp32_state_bytes"), 0)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if quantizes_state(param, group) or not (param.requires_grad or param in optimizer.state):
                    continue
                kind = "fp32_state" if quantizes_state(param) else "small"
                state = optimizer.state.get(param, {})
                out[f"{kind}_params"] += local(param).numel()
                out[f"{kind}_{'bytes' if kind == 'fp32_state' else 'state_bytes'}"] += sum(
                    local(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return out


SMALL_TENSOR_NOTE_SHARE = 0.05
"""The summary explains small tensors' 32-bit state when it is at least this share of all state."""


def _small_tensor_lines(summary: dict) -> list[str]:
    params, nbytes = summary.get("small_params", 0), summary.get("small_state_bytes", 0)
    if not params or not nbytes or nbytes < SMALL_TENSOR_NOTE_SHARE * summary["state_bytes"]:
        return []
    share = 100.0 * params / summary["num_params"] if summary["num_params"] else 0.0
    per_param = nbytes / params
    if per_param <= summary["bytes_per_param"] * 1.01:  # they cost no more than the rest: nothing to explain
        return []
    if per_param < 4.0:  # less than one fp32 value per element: step counters (SGD without momentum), no 32-bit state
        return []
    return [
        f"  {params:,} params ({share:.1f}%) are in tensors under {MIN_QUANTIZED_NUMEL:,} elements, which keep",
        f"  32-bit state ({per_param:.2f} bytes/param there), as in bitsandbytes and torchao",
    ]


def _fp32_state_lines(summary: dict) -> list[str]:
    """One line for params kept in 32-bit state by choice (``fp32_state`` / ``quantize_state=False``), if any."""
    params, nbytes = summary.get("fp32_state_params", 0), summary.get("fp32_state_bytes", 0)
    if not params:
        return []
    share = 100.0 * params / summary["num_params"] if summary["num_params"] else 0.0
    return [f"  {params:,} params ({share:.1f}%) keep 32-bit state by choice (fp32_state,",
            f"  quantize_state=False): {nbytes / params:.2f} bytes/param there"]


def summary_dict(name: str, memory: StateMemory, peak_bytes: int, baseline_bytes: int, steps: int,
                 sharded: bool = False, reporter: str = "LowMemOptimizerCallback") -> dict:
    """The numbers of the end-of-fit summary (bytes, MiB, bytes/param, saving vs fp32 AdamW).

    ``sharded``: the params are DTensors and the figures are this rank's shard. ``reporter``: the
    callback named in the summary's first line.
    """
    saving = baseline_bytes - memory.total_bytes
    return {
        "reporter": reporter,
        "optimizer": name,
        "steps": steps,
        "sharded": sharded,
        "num_params": memory.num_params,
        "state_bytes": memory.total_bytes,
        "state_MiB": memory.total_bytes / MIB,
        "state_MiB_device": memory.device_bytes / MIB,
        "state_MiB_host": memory.host_bytes / MIB,
        "peak_state_MiB": peak_bytes / MIB,
        "bytes_per_param": memory.bytes_per_param,
        "adamw_fp32_MiB": baseline_bytes / MIB,
        "adamw_fp32_bytes_per_param": baseline_bytes / memory.num_params if memory.num_params else 0.0,
        "saving_MiB": saving / MIB,
        "saving_pct": 100.0 * saving / baseline_bytes if baseline_bytes else 0.0,
    }


def _mib(value: float) -> str:
    """A MiB figure with 4 significant digits or so (``0.529``, ``77.44``, ``305.0``, ``2,048``)."""
    if abs(value) < 10:
        return f"{value:.3f}"
    if abs(value) < 100:
        return f"{value:.2f}"
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"


def _this_run(summary: dict) -> list[str]:
    """A line saying how many of the steps this fit made, when it reached a later global step: a run resumed from a
    checkpoint, or a second ``trainer.fit`` of the same Trainer (``resumed`` False), whose optimizer Lightning built
    anew (its state counts only this fit's steps)."""
    here = summary.get("steps_this_run")
    if here is None or here == summary["steps"]:
        return []
    if not summary.get("resumed", True):
        return [f"  (a second fit of this Trainer: {here:,} of these {summary['steps']:,} steps made by it, "
                "from a new optimizer state)"]
    return [f"  (resumed: {here:,} of these {summary['steps']:,} steps made by this run)"]


def _skipped_lines(summary: dict) -> list[str]:
    """Tensor updates skipped for inf/NaN gradients in this fit (none: no line), and the stop they caused."""
    skipped = summary.get("skipped_updates") or 0
    if not skipped:
        return []
    steps = summary.get("steps_this_run", summary["steps"])
    lines = [f"  skipped {skipped:,} tensor updates (inf/NaN gradients) in {summary['skipped_steps']:,} of "
             f"{steps:,} steps"]
    if summary.get("stopped_at_step") is not None:
        lines.append(f"  stopped at step {summary['stopped_at_step']:,}: every update of the last "
                     f"{summary['stop_after_skipped_steps']:,} steps skipped")
    return lines


def _lost_weights_lines(summary: dict) -> list[str]:
    """Trainable tensors holding inf/NaN at the end of the fit (none: no line), and the stop they caused."""
    lost = summary.get("lost_weights") or 0
    if not lost:
        return []
    stopped = summary.get("lost_weights_stopped_at_step")
    stop = f"; stopped at step {stopped:,}" if stopped is not None else ""
    return [f"  weights not finite: {lost:,} of {summary['trainable_tensors']:,} trainable tensors hold inf/NaN",
            f"  (the training loss was not finite from step {summary['loss_not_finite_since']:,} on{stop})"]


def _saving_words(pct: float) -> str:
    """The saving against fp32 AdamW in words: ``saving 74.5%``, or ``50.0% more state here`` for an
    optimizer that keeps more (AdEMAMix's three fp32 states)."""
    return f"saving {pct:.1f}%" if pct >= 0 else f"{-pct:.1f}% more state here"


def _less_or_more(pct: float) -> str:
    """``74.5% less`` or, for an optimizer that keeps more state than fp32 AdamW, ``50.0% more``."""
    return f"{pct:.1f}% less" if pct >= 0 else f"{-pct:.1f}% more"


def format_summary(summary: dict, plot_path: str | None) -> str:
    """Human-readable lines for :func:`summary_dict`'s result, each within 80 columns for the usual
    sizes (so the summary reads well in an 80x24 terminal)."""
    lines = [
        f"{summary.get('reporter', 'LowMemOptimizerCallback')}: {summary['optimizer']} on "
        f"{summary['num_params']:,} trainable params",
        f"  state after {summary['steps']:,} steps: {_mib(summary['state_MiB'])} MiB "
        f"({summary['bytes_per_param']:.2f} bytes/param), peak {_mib(summary['peak_state_MiB'])} MiB",
    ]
    lines += _this_run(summary)
    if summary.get("sharded"):
        lines.insert(1, "  (rank 0: the figures are its shard of the sharded params)")
    if summary["state_MiB_host"]:
        lines.append(
            f"  on device {_mib(summary['state_MiB_device'])} MiB, on host {_mib(summary['state_MiB_host'])} MiB"
        )
    lines.append(
        f"  fp32 AdamW would hold {_mib(summary['adamw_fp32_MiB'])} MiB "
        f"({summary['adamw_fp32_bytes_per_param']:.2f} bytes/param): {_saving_words(summary['saving_pct'])}"
    )
    lines += _small_tensor_lines(summary) + _fp32_state_lines(summary) + _skipped_lines(summary)
    lines += _lost_weights_lines(summary)
    if summary.get("checkpoint_note"):
        lines += summary["checkpoint_note"].splitlines()
    if plot_path:
        lines.append(f"  plot: {plot_path}")
    return "\n".join(lines)


@dataclass
class StateHistory:
    """What the callback recorded during a fit, per optimizer step, for :func:`build_figure`.

    ``steps``: ``trainer.global_step`` after each optimizer step; ``state_mib``: optimizer-state MiB
    (device + host) at that step; ``host_mib``: the part in host memory (paged optimizers; zeros
    otherwise); ``losses``: training loss of that step (``None`` where not finite or not returned);
    ``val_losses``: ``(global_step, value)`` of each validation run's loss, named ``val_name``.
    """

    steps: list[int] = field(default_factory=list)
    state_mib: list[float] = field(default_factory=list)
    host_mib: list[float] = field(default_factory=list)
    losses: list[float | None] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    val_name: str = "val_loss"


def _centered_mean(values: list[float], window: int) -> list[float]:
    """Mean of the ``window`` values centred on each one (fewer at the ends): a smoothed curve without lag."""
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    half, n = window // 2, len(values)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i - half + window)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _plot_state(ax, history: StateHistory, summary: dict) -> None:
    steps = history.steps
    if any(history.host_mib):
        device = [t - h for t, h in zip(history.state_mib, history.host_mib)]
        ax.stackplot(steps, device, history.host_mib, colors=("tab:blue", "tab:cyan"), alpha=0.8,
                     labels=(f"{summary['optimizer']} on device: {_mib(summary['state_MiB_device'])} MiB",
                             f"{summary['optimizer']} on host: {_mib(summary['state_MiB_host'])} MiB"))
    else:
        ax.plot(steps, history.state_mib, color="tab:blue", linewidth=2,
                label=f"{summary['optimizer']}: {_mib(summary['state_MiB'])} MiB, "
                f"{summary['bytes_per_param']:.2f} bytes/param")
    ax.axhline(summary["adamw_fp32_MiB"], color="tab:red", linestyle="--",
               label=f"fp32 AdamW on the same params: {_mib(summary['adamw_fp32_MiB'])} MiB, "
               f"{summary['adamw_fp32_bytes_per_param']:.2f} bytes/param")
    top = max([summary["adamw_fp32_MiB"], *history.state_mib])
    ax.set_ylim(0, 1.45 * top if top > 0 else 1.0)  # the legend goes in the top quarter, above both lines
    ax.set_ylabel("optimizer state (MiB)")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)


def _plot_loss(ax, history: StateHistory) -> bool:
    points = [(s, v) for s, v in zip(history.steps, history.losses) if v is not None]
    if not points and not history.val_losses:
        return False
    if points:
        xs, ys = [s for s, _ in points], [v for _, v in points]
        window = max(1, len(ys) // 30)
        if window > 1:
            ax.plot(xs, ys, color="tab:orange", alpha=0.3, linewidth=1, label="train loss")
            ax.plot(xs, _centered_mean(ys, window), color="tab:orange", linewidth=2,
                    label=f"train loss, mean of {window} steps")
        else:
            ax.plot(xs, ys, color="tab:orange", linewidth=2, label="train loss")
    if history.val_losses:
        ax.plot([s for s, _ in history.val_losses], [v for _, v in history.val_losses], color="tab:green",
                marker="o", linewidth=2, label=history.val_name.replace("_", " "))
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(alpha=0.3)
    return True


def build_figure(history: StateHistory, summary: dict):
    """The ``state_memory.png`` figure (a matplotlib ``Figure`` on the Agg canvas, pyplot untouched).

    Top: optimizer-state MiB per optimizer step (device and host parts stacked for paged optimizers)
    against the dashed line of what torch's fp32 AdamW would hold for the same params; bottom (when
    there is a loss): training loss per step (and its running mean) and validation loss. The title
    names the optimizer, its bytes/param and the saving. ``summary``: :func:`summary_dict`'s result.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    has_loss = any(v is not None for v in history.losses) or bool(history.val_losses)
    fig = Figure(figsize=(8, 6.5 if has_loss else 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if has_loss else 1, 1, sharex=True, squeeze=False)[:, 0]
    _plot_state(axes[0], history, summary)
    if has_loss:
        _plot_loss(axes[1], history)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # no "1.25" steps on a short run
    fig.suptitle(
        f"{summary['optimizer']}: {summary['bytes_per_param']:.2f} bytes/param of optimizer state "
        f"(fp32 AdamW {summary['adamw_fp32_bytes_per_param']:.2f}): {_less_or_more(summary['saving_pct'])}\n"
        f"{summary['num_params']:,} trainable params, {summary['steps']:,} optimizer steps",
        fontsize="medium",
    )
    fig.tight_layout()
    return fig


def write_plot(path: str, history: StateHistory, summary: dict) -> str | None:
    """Write :func:`build_figure`'s PNG to ``path`` (folders created); ``None`` without matplotlib or
    without recorded steps."""
    if not history.steps:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    fig = build_figure(history, summary)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path
