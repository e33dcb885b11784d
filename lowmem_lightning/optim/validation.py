"""Hyperparameter checks shared by every optimizer: each error names the argument, the value and
what is allowed, and is raised in the constructor, before any state exists."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_lr", "check_betas", "check_eps", "check_positive", "check_eps_pair", "check_non_negative",
           "check_bool", "check_choice", "check_bf16_rounding", "validate_optimizer_args"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        isinstance(value, torch.Tensor) and value.numel() == 1
    )


def check_lr(lr, name: str = "lr", allow_none: bool = False, torch_wording: bool = False) -> None:
    """``lr`` must be a finite number >= 0 (a 1-element tensor is accepted).

    A tensor of another size is refused in torch's words ("Tensor lr must be 1-element"); with
    ``torch_wording`` every refusal also starts with torch.optim's "Invalid learning rate: <lr>" (for
    optimizers that promise torch's errors), followed by our message naming the argument and what is allowed.
    """
    if lr is None and allow_none:
        return
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element ({name} has {lr.numel()} elements: expected a finite "
                         "number >= 0, or a 1-element tensor).")
    if not _is_number(lr) or not math.isfinite(float(lr)) or float(lr) < 0:
        ours = f"{name}={lr!r}: expected a finite number >= 0"
        if torch_wording:
            raise ValueError(f"Invalid learning rate: {lr} ({ours}).")
        raise ValueError(f"Invalid {ours}.")


def check_betas(betas: Sequence[float], count: int = 2, name: str = "betas") -> None:
    """``betas`` must hold ``count`` numbers, each in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid {name}={betas!r}: expected a tuple of {count} numbers in [0, 1).")
    for i, beta in enumerate(betas):
        if not _is_number(beta) or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid {name}[{i}]={beta!r}: expected a number in [0, 1).")


def check_positive(value, name: str) -> None:
    """``value`` must be a finite number > 0 (eps, clip_threshold, ...)."""
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"Invalid {name}={value!r}: expected a finite number > 0.")


def check_eps(eps, name: str = "eps") -> None:
    """``eps`` must be a finite number > 0."""
    check_positive(eps, name)


def check_eps_pair(eps, names: tuple[str, str]) -> None:
    """``eps`` must be a pair of finite numbers >= 0 (the factored optimizers' ``(eps1, eps2)``)."""
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"Invalid eps={eps!r}: expected a tuple of two finite numbers >= 0 {names}.")
    for value, name in zip(eps, names):
        check_non_negative(value, name)


def check_bool(value, name: str) -> None:
    """``value`` must be True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}={value!r}: expected True or False.")


def check_non_negative(value, name: str, torch_wording: bool = False) -> None:
    """``value`` must be a finite number >= 0 (weight decay, momentum, dampening, ...).

    With ``torch_wording`` the refusal starts with torch.optim's "Invalid <name> value: <value>" (for
    optimizers that promise torch's errors), followed by our message naming what is allowed.
    """
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) < 0:
        ours = f"{name}={value!r}: expected a finite number >= 0"
        if torch_wording:
            raise ValueError(f"Invalid {name} value: {value} ({ours}).")
        raise ValueError(f"Invalid {ours}.")


def check_choice(value, allowed: Sequence, name: str) -> None:
    """``value`` must be one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Invalid {name}={value!r}: expected one of {', '.join(map(repr, allowed))}.")


def check_bf16_rounding(value) -> None:
    """``bf16_rounding`` must be ``"stochastic"`` or ``"nearest"`` (:data:`.kernels.rounding.BF16_ROUNDINGS`)."""
    from ..kernels.rounding import BF16_ROUNDINGS

    if not isinstance(value, str) or value not in BF16_ROUNDINGS:
        raise ValueError(
            f"Invalid bf16_rounding={value!r}: expected one of {', '.join(map(repr, BF16_ROUNDINGS))} (how bf16/fp16 "
            "params are rounded when written: 'stochastic', the default, or 'nearest' = round-to-nearest-even)."
        )


_RESERVED_KWARGS = ("params", "lr", "weight_decay")


def validate_optimizer_args(
    optimizer: str, lr: float | None, weight_decay: float | None, optimizer_kwargs: dict | None
) -> tuple[dict, dict]:
    """Check an optimizer choice the way LowMemModule and LowMemOptimizerCallback take it.

    Returns ``(optimizer_kwargs, defaults)``: the kwargs as a new dict (``{}`` for ``None``) and the
    ``defaults`` dict the optimizer ends up with (its own defaults updated by the arguments).
    Raises ``ValueError`` naming the argument for an unknown name, a negative or non-finite ``lr``/``weight_decay``, an
    ``optimizer_kwargs`` that is not a dict or repeats ``lr``/``weight_decay``/``params``, and any
    hyperparameter the optimizer's own constructor rejects (it is built once over a 1-element dummy
    tensor, which allocates no state).
    """
    from lowmem_lightning.optim.registry import (  # the registry imports us
        available_optimizers,
        build_optimizer,
        unknown_optimizer_message,
    )

    if not isinstance(optimizer, str) or optimizer not in available_optimizers():
        raise ValueError(unknown_optimizer_message(optimizer, "Invalid optimizer="))
    check_lr(lr, "lr", allow_none=True)
    if weight_decay is not None:
        check_non_negative(weight_decay, "weight_decay")
    if optimizer_kwargs is None:
        optimizer_kwargs = {}
    if not isinstance(optimizer_kwargs, dict):
        raise ValueError(
            f"Invalid optimizer_kwargs={optimizer_kwargs!r}: expected a dict of keyword arguments "
            f"for {optimizer!r} or None."
        )
    clash = [key for key in _RESERVED_KWARGS if key in optimizer_kwargs]
    if clash:
        raise ValueError(
            f"Invalid optimizer_kwargs={optimizer_kwargs!r}: {', '.join(clash)} must not be given there; "
            "pass lr and weight_decay as their own arguments."
        )
    extra = {"lr": lr} if lr is not None else {}
    if weight_decay is not None:
        extra["weight_decay"] = weight_decay
    dummy = torch.zeros(1, requires_grad=True)
    try:
        probe = build_optimizer(optimizer, [dummy], **extra, **optimizer_kwargs)
    except (ValueError, TypeError) as err:
        if lr is not None or not _accepts_group_lr(optimizer, extra, optimizer_kwargs):
            raise ValueError(f"Invalid hyperparameters for optimizer={optimizer!r}: {err}") from err
        return dict(optimizer_kwargs), dict(build_optimizer(optimizer, [{"params": [dummy], "lr": 1.0}],
                                                            **extra, **optimizer_kwargs).defaults)
    return dict(optimizer_kwargs), dict(probe.defaults)


def _accepts_group_lr(optimizer: str, extra: dict, optimizer_kwargs: dict) -> bool:
    """Whether ``optimizer`` (which needs an lr, e.g. CAME) builds once each param group brings its own
    lr: then ``lr=None`` means "the module's learning rate", which the callback passes per group."""
    from lowmem_lightning.optim.registry import build_optimizer

    try:
        build_optimizer(optimizer, [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0}], **extra,
                        **optimizer_kwargs)
    except (ValueError, TypeError):
        return False
    return True
