"""End-of-fit report of :class:`~lowmem_lightning.callbacks.LowMemOptimizerCallback`: a text summary
and, when matplotlib is installed, a PNG of optimizer-state memory (and loss) per optimizer step."""

from __future__ import annotations

import os

import torch

from lowmem_lightning.optim import StateMemory
from lowmem_lightning.optim.sharding import local

__all__ = ["adamw_fp32_state_bytes", "summary_dict", "format_summary", "write_plot"]

MIB = 2**20


def adamw_fp32_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes torch's fp32 ``AdamW`` would hold for the same params: ``exp_avg`` + ``exp_avg_sq`` in the
    param's shape (4 bytes each per element for fp32 params) plus a 4-byte ``step`` tensor per param.
    A sharded (DTensor) param counts its local shard, like :func:`~lowmem_lightning.optim.state_memory`."""
    total = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                total += 2 * 4 * local(param).numel() + 4
    return total


def summary_dict(name: str, memory: StateMemory, peak_bytes: int, baseline_bytes: int, steps: int,
                 sharded: bool = False) -> dict:
    """The numbers of the end-of-fit summary (bytes, MiB, bytes/param, saving vs fp32 AdamW).

    ``sharded``: the params are DTensors and the figures are this rank's shard.
    """
    saving = baseline_bytes - memory.total_bytes
    return {
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


def format_summary(summary: dict, plot_path: str | None) -> str:
    """Human-readable lines for :func:`summary_dict`'s result."""
    lines = [
        f"LowMemOptimizerCallback: {summary['optimizer']} over {summary['num_params']:,} trainable params"
        f"{' (rank 0: its shard of the sharded params)' if summary.get('sharded') else ''}, "
        f"{summary['steps']} optimizer steps",
        f"  optimizer state: {summary['state_MiB']:.3f} MiB ({summary['bytes_per_param']:.2f} bytes/param), "
        f"peak {summary['peak_state_MiB']:.3f} MiB",
    ]
    if summary["state_MiB_host"]:
        lines.append(
            f"  on device {summary['state_MiB_device']:.3f} MiB, on host {summary['state_MiB_host']:.3f} MiB"
        )
    lines.append(
        f"  fp32 AdamW would hold {summary['adamw_fp32_MiB']:.3f} MiB "
        f"({summary['adamw_fp32_bytes_per_param']:.2f} bytes/param): saving {summary['saving_MiB']:.3f} MiB "
        f"({summary['saving_pct']:.1f}%)"
    )
    if plot_path:
        lines.append(f"  plot: {plot_path}")
    return "\n".join(lines)


def write_plot(path: str, steps: list[int], state_mib: list[float], losses: list[float | None]) -> str | None:
    """Write a PNG of state MiB (and loss, on a second panel) per optimizer step; ``None`` without
    matplotlib or without data. Uses the Agg canvas directly, so the user's pyplot backend is untouched."""
    if not steps:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    loss_points = [(s, v) for s, v in zip(steps, losses) if v is not None]
    fig = Figure(figsize=(7, 5 if loss_points else 3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if loss_points else 1, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(steps, state_mib, color="tab:blue")
    axes[0].set_ylabel("optimizer state (MiB)")
    axes[0].set_ylim(bottom=0)
    axes[0].grid(alpha=0.3)
    if loss_points:
        axes[1].plot([s for s, _ in loss_points], [v for _, v in loss_points], color="tab:orange")
        axes[1].set_ylabel("training loss")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path
