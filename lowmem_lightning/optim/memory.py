"""Measure optimizer-state memory from the real storage of every state tensor."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from .sharding import local

__all__ = ["StateMemory", "state_memory", "iter_state_tensors"]


@dataclass(frozen=True)
class StateMemory:
    """Optimizer-state memory in bytes.

    ``device_bytes`` is state on the params' device (the GPU when training on CUDA, the CPU when
    training on CPU); ``host_bytes`` is state kept off that device (pinned host pages of a paged
    optimizer). ``num_params`` counts the elements of every parameter in the param groups that is
    trainable or has state (a frozen param holds none until it is unfrozen and trained); for a
    sharded DTensor param: of its local shard, so the figures are this rank's;
    ``bytes_per_param`` = ``total_bytes / num_params``.
    """

    total_bytes: int
    device_bytes: int
    host_bytes: int
    num_params: int

    @property
    def bytes_per_param(self) -> float:
        """State bytes per trainable parameter element."""
        return self.total_bytes / self.num_params if self.num_params else 0.0

    @property
    def total_mib(self) -> float:
        """``total_bytes`` in MiB (2**20 bytes)."""
        return self.total_bytes / 2**20

    def as_dict(self) -> dict:
        """Plain dict (for JSON / logging), including ``bytes_per_param``."""
        return {**asdict(self), "bytes_per_param": self.bytes_per_param}


def iter_state_tensors(optimizer: torch.optim.Optimizer) -> Iterator[tuple[torch.Tensor, bool]]:
    """Yield ``(tensor, on_host)`` for every tensor the optimizer holds as state.

    Optimizers may define ``_state_tensors()`` yielding the same pairs (paged optimizers do, to
    report their host pages and device buffers); otherwise ``optimizer.state`` is walked and a
    tensor counts as host memory when it is on the CPU while its parameter is not.
    """
    custom = getattr(optimizer, "_state_tensors", None)
    if callable(custom):
        yield from custom()
        return
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor) or not isinstance(state, dict):
            continue  # an entry a hook stored beside the params' state (torch's own hook test does)
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value, value.device.type == "cpu" and param.device.type != "cpu"


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = local(tensor).untyped_storage()  # a DTensor (torch AdamW's state of FSDP2 params): its shard
    return (tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes())


def state_memory(optimizer: torch.optim.Optimizer) -> StateMemory:
    """Measure the optimizer's state: bytes of every distinct storage behind its state tensors.

    Counts quantized codes, block scales, fp32 fallbacks, step counters and buffers alike; storage
    shared by several state tensors is counted once. Nothing is estimated.
    """
    seen: set[tuple] = set()
    device_bytes = host_bytes = 0
    for tensor, on_host in iter_state_tensors(optimizer):
        if tensor.device.type == "meta":
            nbytes = tensor.numel() * tensor.element_size()
            key = ("meta", id(tensor))
        else:
            key = _storage_key(tensor)
            nbytes = key[3]
        if key in seen:
            continue
        seen.add(key)
        if on_host:
            host_bytes += nbytes
        else:
            device_bytes += nbytes
    num_params = sum(local(p).numel() for group in optimizer.param_groups for p in group["params"]
                     if p.requires_grad or p in optimizer.state)  # frozen params without state: not counted
    return StateMemory(device_bytes + host_bytes, device_bytes, host_bytes, num_params)
