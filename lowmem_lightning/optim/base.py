"""Bookkeeping shared by the package's optimizers (no update math lives here).

* **Non-finite guard.** ``_finite_flags(grads)`` returns, for each gradient, a 0/1 fp32 flag on the
  device (1 = every element finite), with no host sync: one fused ``_foreach_norm(inf)`` launch on
  CUDA, an fp32 ``sum`` per tensor on CPU. Kernels receive the flag and leave params and state
  untouched where it is 0; the number of skipped tensor updates accumulates on the device and is
  read (one sync) only through :attr:`LowMemOptimizer.skipped_updates`. For DTensor (sharded)
  gradients the flags agree across the ranks that shard them (:mod:`.sharding`).
* **Step counters** are 0-d fp32 tensors on the param's device (like torch's ``capturable`` mode):
  they advance by the finite flag, so a skipped update does not advance the bias correction, and
  kernels read them from memory (no ``.item()``).
* **Sharded params** (DTensor, FSDP2): updates and state cover the local shard;
  :meth:`~LowMemOptimizer.state_dict` presents that state as DTensors (:mod:`.sharding`).
* **State dicts** keep the dtypes of quantized state (torch's ``Optimizer.load_state_dict`` casts
  every floating state tensor to the param dtype, which would turn fp32 block scales of a bf16 param
  into bf16) and are validated: a state that does not fit its parameter raises ``ValueError``.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import torch

from .sharding import agree_on_flags, is_dtensor, local, unwrap_state, wrap_state

__all__ = ["LowMemOptimizer"]


class LowMemOptimizer(torch.optim.Optimizer):
    """Base class: non-finite guard, device step counters, dtype-preserving validated state dicts.

    Subclasses implement ``step`` and may override :meth:`_expected_state` to describe the state
    tensors a param must carry (used to validate loaded state dicts) and :meth:`_convert_foreign_state`
    to accept another optimizer's state (e.g. torch AdamW -> 8-bit).
    """

    def __init__(self, params: Iterable, defaults: dict):
        super().__init__(params, defaults)
        self._skipped: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ param groups
    def _check_group(self, group: dict) -> None:
        """Validate one param group's hyperparameters (``ValueError`` naming the argument); default: none."""

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group, validated by :meth:`_check_group`; an invalid group is not added (``ValueError``)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ non-finite guard
    @property
    def skipped_updates(self) -> int:
        """Number of (tensor, step) updates skipped because the gradient held inf or NaN.

        Reading it synchronises with the device; the step itself never does.
        """
        return int(sum(int(t.item()) for t in self._skipped.values()))

    def _finite_flags(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """fp32 tensor ``(len(grads),)`` on the grads' device: 1.0 where the whole gradient is finite.

        DTensor gradients are checked on the local shard and the flags combined across ranks (one
        collective), so all ranks skip or apply an update together.
        """
        if not grads:
            return torch.empty(0)
        distributed = [g for g in grads if is_dtensor(g)]
        grads = [local(g) for g in grads]
        if grads[0].device.type == "cpu":
            # an fp32 sum per tensor is inf/NaN iff an element is (or the sum overflows fp32, i.e. the
            # gradient has blown up anyway); 6x faster on CPU than _foreach_norm(inf), which has no fused path
            norms = [g.sum(dtype=torch.float32) for g in grads]
        else:
            norms = torch._foreach_norm(list(grads), float("inf"))  # one multi-tensor launch
        flags = torch.stack(norms).isfinite().to(torch.float32)
        if distributed:
            agree_on_flags(flags, distributed)
        device = flags.device
        counter = self._skipped.get(device)
        if counter is None:
            counter = self._skipped[device] = torch.zeros((), dtype=torch.float32, device=device)
        counter.add_(flags.numel() - flags.sum())
        return flags

    @staticmethod
    def _new_step(param: torch.Tensor) -> torch.Tensor:
        """A step counter for ``param``: 0-d fp32 tensor on its device."""
        return torch.zeros((), dtype=torch.float32, device=param.device)

    def _params_by_device(self) -> Iterator[tuple[dict, list[list[tuple[int, torch.Tensor]]]]]:
        """Yield ``(group, per_device)`` for every param group, where ``per_device`` lists, per device, the
        ``(global_index, param)`` pairs of the params that have a gradient (the global index counts
        every param of every group, so it is stable across steps). Sparse gradients raise."""
        index = 0
        for group in self.param_groups:
            by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is not None:
                    if param.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
                    by_device[param.device].append((index, param))
                index += 1
            yield group, list(by_device.values())

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        """``param``'s state, created on first use: a step counter and zeros for every other tensor of
        :meth:`_expected_state`."""
        state = self.state[param]
        if "step" in state:
            return state
        state["step"] = self._new_step(param)
        for key, (shape, dtype) in self._expected_state(param, group).items():
            if key != "step":
                state[key] = torch.zeros(shape, dtype=dtype, device=param.device)
        return state

    # ------------------------------------------------------------------ state dicts
    def _expected_state(self, param: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{key: (shape, dtype)}`` every state tensor of ``param`` must have; empty = no check."""
        return {}

    def _convert_foreign_state(self, param: torch.Tensor, state: dict, group: dict) -> dict:
        """Turn a state saved by another optimizer into ours; default: return it unchanged."""
        return state

    def state_dict(self) -> dict:
        """torch's state dict; the state of a DTensor param is presented as DTensors (see :mod:`.sharding`)."""
        out = super().state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        if any(is_dtensor(p) for p in params):
            out["state"] = {pid: wrap_state(params[pid], state) for pid, state in out["state"].items()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict, keeping saved state dtypes, converting foreign states and validating shapes.

        Raises ``ValueError`` naming the parameter and key when a state tensor does not fit, and
        leaves the optimizer unchanged in that case.
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else "-"
            raise ValueError(
                "Invalid optimizer state dict: expected a dict with keys 'state' and 'param_groups', "
                f"got {type(state_dict).__name__} with keys {keys}."
            )
        saved = copy.deepcopy(state_dict)
        saved_groups = saved["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"Invalid optimizer state dict: it has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}."
            )
        by_id = {}
        for group, saved_group in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved_group["params"]):
                raise ValueError(
                    "Invalid optimizer state dict: a param group holds "
                    f"{len(saved_group['params'])} params, this optimizer's holds {len(group['params'])}."
                )
            for param, pid in zip(group["params"], saved_group["params"]):
                by_id[pid] = (param, group)
        converted = {}
        for pid, state in saved["state"].items():
            if pid not in by_id:
                raise ValueError(f"Invalid optimizer state dict: state for unknown param id {pid!r}.")
            param, group = by_id[pid]
            state = self._convert_foreign_state(param, unwrap_state(param, dict(state), pid), group)
            self._validate_state(pid, param, group, state)
            converted[pid] = state
        saved["state"] = converted
        super().load_state_dict(saved)
        self._restore_dtypes(by_id, converted)

    def _validate_state(self, pid, param: torch.Tensor, group: dict, state: dict) -> None:
        for key, (shape, dtype) in self._expected_state(param, group).items():
            value = state.get(key)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"Invalid optimizer state dict: param {pid!r} (shape {tuple(param.shape)}) lacks state "
                    f"{key!r}; expected a {dtype} tensor of shape {shape}. Keys present: {sorted(state)}."
                )
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise ValueError(
                    f"Invalid optimizer state dict: param {pid!r} state {key!r} is {value.dtype} "
                    f"{tuple(value.shape)}, expected {dtype} {tuple(shape)} for a param of shape "
                    f"{tuple(param.shape)}."
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"Invalid optimizer state dict: param {pid!r} state {key!r} holds inf or NaN.")

    def _state_device(self, param: torch.Tensor) -> torch.device:
        """Where ``param``'s state lives (its own device; paged optimizers override)."""
        return param.device

    def _restore_dtypes(self, by_id: dict, saved_state: dict) -> None:
        for pid, state in saved_state.items():
            param, _ = by_id[pid]
            loaded = self.state[param]
            device = self._state_device(param)
            for key, value in state.items():
                current = loaded.get(key)
                if isinstance(value, torch.Tensor) and (current.dtype != value.dtype or current.device != device):
                    loaded[key] = value.to(device=device)
