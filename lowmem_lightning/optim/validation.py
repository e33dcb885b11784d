"""Hyperparameter checks shared by every optimizer: each error names the argument, the value and
what is allowed, and is raised in the constructor, before any state exists."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_lr", "check_betas", "check_eps", "check_non_negative", "check_choice"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )


def check_lr(lr, name: str = "lr", allow_none: bool = False) -> None:
    """``lr`` must be a finite number >= 0 (a 1-element tensor is accepted)."""
    if lr is None and allow_none:
        return
    if not _is_number(lr) or not math.isfinite(float(lr)) or float(lr) < 0:
        raise ValueError(f"Invalid {name}={lr!r}: expected a finite number >= 0.")


def check_betas(betas: Sequence[float], count: int = 2, name: str = "betas") -> None:
    """``betas`` must hold ``count`` numbers, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid {name}={betas!r}: expected a tuple of {count} numbers in [0, 1).")
    for i, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid {name}[{i}]={beta!r}: expected a number in [0, 1).")


def check_eps(eps, name: str = "eps") -> None:
    """``eps`` must be a finite number > 0."""
    if not _is_number(eps) or not math.isfinite(float(eps)) or float(eps) <= 0:
        raise ValueError(f"Invalid {name}={eps!r}: expected a finite number > 0.")


def check_non_negative(value, name: str) -> None:
    """``value`` must be a finite number >= 0 (weight decay, momentum, dampening, ...)."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"Invalid {name}={value!r}: expected a finite number >= 0.")


def check_choice(value, allowed: Sequence, name: str) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Invalid {name}={value!r}: expected one of {', '.join(map(repr, allowed))}.")
