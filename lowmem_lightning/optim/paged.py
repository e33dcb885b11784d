"""Paged 8-bit AdamW: the quantized state lives in host memory and visits the device per update.

Same math and bit-identical results as :class:`~lowmem_lightning.optim.adamw8bit.AdamW8bit` (the
same kernel runs on the same values); only where the 8-bit state is kept differs.

* **Host pages.** ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax`` of
  every quantized parameter live in host memory (pinned on CUDA, so copies are asynchronous). They
  are the optimizer's ``state`` (what ``state_dict`` saves). Step counters and the fp32 state of
  small tensors (< 4096 elements) stay on the param's device.
* **Residency.** Before a tensor's update its pages are copied into device buffers (a staging
  buffer on CPU); resident buffers are kept in an LRU within ``gpu_budget_bytes`` so a tensor whose
  state is still resident next step is not copied again. During a step the current tensor and the
  prefetched next one are always allowed, even over budget; after the step the LRU is trimmed back
  to the budget.
* **Overlap (CUDA).** Copies run on a side stream: the copy of tensor ``i+1`` is issued before the
  update of tensor ``i``, and the compute stream waits on an event before using the buffers
  (double buffering). After the update the results are copied back to the pages on the side stream
  (write-through), so the pages are always the latest state once that stream is drained. Buffers
  used on both streams are protected with ``record_stream``. CUDA managed memory is never used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch

from .adamw8bit import AdamW8bit
from .base import StateSpec

__all__ = ["PagedAdamW8bit"]

_CPU_AUTO_BUDGET = 0
"""Resident budget on CPU (bytes) when ``gpu_budget_bytes`` is None: 0, since device and host are the same
memory there; only the staging buffers of the tensor being updated (and the prefetched next) exist."""


class _Resident:
    """Device copies of one parameter's four quantized state tensors."""

    __slots__ = ("buffers", "nbytes", "ready")

    def __init__(self, buffers: dict[str, torch.Tensor], ready):
        self.buffers = buffers
        self.nbytes = sum(t.numel() * t.element_size() for t in buffers.values())
        self.ready = ready  # CUDA: event after the last copy touching the buffers; None on CPU


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its 8-bit state paged between host memory and the device.

    Args (besides AdamW8bit's):
        gpu_budget_bytes: most bytes of quantized state kept resident on the device between
            updates (an int >= 0). ``None`` (auto): 1/8 of the free GPU memory at the first step
            on CUDA, 64 MiB of staging on CPU. The tensor being updated and the prefetched next
            one are always allowed.
        page_prefetch: copy the next tensor's state while the current one updates (CUDA: on a
            side stream).

    ``state_memory`` reports host pages as ``host_bytes`` and resident buffers as ``device_bytes``.
    """

    is_paged = True
    _transient_attributes = ("_resident", "_copy_streams", "_budgets")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        seed: int = 0,
        gpu_budget_bytes: int | None = None,
        page_prefetch: bool = True,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        if gpu_budget_bytes is not None and (
            not isinstance(gpu_budget_bytes, int) or isinstance(gpu_budget_bytes, bool) or gpu_budget_bytes < 0
        ):
            raise ValueError(f"Invalid gpu_budget_bytes={gpu_budget_bytes!r}: expected None (auto) or an int >= 0.")
        super().__init__(params, lr, betas, eps, weight_decay, maximize=maximize, seed=seed, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)
        self.gpu_budget_bytes = gpu_budget_bytes
        self.page_prefetch = bool(page_prefetch)
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Fresh residency caches (after construction, deepcopy or unpickling); pages pinned again on CUDA."""
        self._budgets: dict[torch.device, int] = {}
        self._resident: OrderedDict[torch.Tensor, _Resident] = OrderedDict()
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        for param, state in self._param_states():
            for key in self._host_keys(param):
                if key in state and param.device.type == "cuda" and not state[key].is_pinned():
                    state[key] = _host_page(state[key].detach().cpu(), param.device)

    def __getstate__(self) -> dict:
        """As :class:`LowMemOptimizer`'s, after pending copies back to the pages finished (they are the state)."""
        self._drain()
        return super().__getstate__()

    # ------------------------------------------------------------------ host pages
    def _param_states(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """``(param, state)`` for every param of the groups that has state.

        Walks the params, not ``self.state``: torch lets a load-state-dict post-hook (or a user) keep other
        entries there (torch's own hook test stores ``optimizer.state["ran_load_state_dict_post_hook"] = True``),
        which are neither params nor dicts; they are kept as they are and never paged."""
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if isinstance(state, dict) and state:
                    yield param, state

    def _host_keys(self, param: torch.Tensor) -> list[str]:
        """Names of ``param``'s state kept in host pages (the :meth:`state_layout` specs with ``host``)."""
        return [spec.name for spec in self.state_layout(param) if spec.host]

    def _new_state_tensor(self, spec: StateSpec, param: torch.Tensor) -> torch.Tensor:
        """Host specs (the 8-bit moments) in a host page (pinned when the param is on CUDA)."""
        if spec.host:
            return _host_page(torch.zeros(spec.shape, dtype=spec.dtype), param.device)
        return super()._new_state_tensor(spec, param)

    def _state_tensors(self) -> Iterator[tuple[torch.Tensor, bool]]:
        """``(tensor, on_host)`` for every state tensor: pages on the host, buffers on the device."""
        for param, state in self._param_states():
            host = self._host_keys(param)
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    yield value, key in host
        for resident in self._resident.values():
            for buffer in resident.buffers.values():
                yield buffer, False

    def state_dict(self) -> dict:
        """The state dict (host pages); waits for pending copies back to the pages first."""
        self._drain()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as :class:`AdamW8bit` does, then move the params' quantized state to host pages and drop residents
        (entries a load-state-dict post-hook stored in ``state`` beside the params' are left as they are)."""
        self._drain()
        super().load_state_dict(state_dict)
        self._resident.clear()
        for param, state in self._param_states():
            if "step" in state:
                state["step"] = state["step"].to(param.device)
            for key in self._host_keys(param):
                if key in state:
                    state[key] = _host_page(state[key].detach().cpu(), param.device)

    def _drain(self) -> None:
        for stream in self._copy_streams.values():
            stream.synchronize()

    # ------------------------------------------------------------------ update with paging
    def _update(self, work: dict, flags: list, hyper: dict) -> None:
        small = [i for i, absmax in enumerate(work["m_absmax"]) if absmax is None]
        paged = [i for i, absmax in enumerate(work["m_absmax"]) if absmax is not None]
        if small:
            super()._update({k: [v[i] for i in small] for k, v in work.items()}, [flags[i] for i in small], hyper)
        if paged:
            self._update_paged(work, flags, hyper, paged)

    def _update_paged(self, work: dict, flags: list, hyper: dict, order: list[int]) -> None:
        owners = work["owners"]  # the params keying self.state (DTensors for sharded params)
        for position, i in enumerate(order):
            param = owners[i]
            keep = {param}
            resident = self._fetch(param, keep)
            if self.page_prefetch and position + 1 < len(order):
                upcoming = owners[order[position + 1]]
                keep.add(upcoming)
                self._fetch(upcoming, keep)
            self._wait_ready(resident, param.device)
            b = resident.buffers
            super()._update(
                {
                    "params": [work["params"][i]],
                    "owners": [param],
                    "grads": [work["grads"][i]],
                    "m": [b["exp_avg_codes"]],
                    "m_absmax": [b["exp_avg_absmax"]],
                    "v": [b["exp_avg_sq_codes"]],
                    "v_absmax": [b["exp_avg_sq_absmax"]],
                    "steps": [work["steps"][i]],
                    "seeds": [work["seeds"][i]],
                },
                [flags[i]],
                hyper,
            )
            self._write_back(param, resident)
        self._evict(0, self._budget(owners[order[-1]].device), keep=set())  # between steps: within budget

    def _budget(self, device: torch.device) -> int:
        if self.gpu_budget_bytes is not None:
            return self.gpu_budget_bytes
        if device not in self._budgets:
            if device.type == "cuda":
                self._budgets[device] = torch.cuda.mem_get_info(device)[0] // 8
            else:
                self._budgets[device] = _CPU_AUTO_BUDGET
        return self._budgets[device]

    def _fetch(self, param: torch.Tensor, keep: set) -> _Resident:
        """Device buffers holding ``param``'s state (copied from the pages unless still resident)."""
        resident = self._resident.get(param)
        if resident is not None:
            self._resident.move_to_end(param)
            return resident
        pages = {key: self.state[param][key] for key in self._host_keys(param)}
        nbytes = sum(t.numel() * t.element_size() for t in pages.values())
        self._evict(nbytes, self._budget(param.device), keep)
        buffers = {key: torch.empty_like(page, device=param.device) for key, page in pages.items()}
        ready = None
        if param.device.type == "cuda":
            stream = self._copy_stream(param.device)
            stream.wait_stream(torch.cuda.current_stream(param.device))  # buffers may reuse freed memory
            with torch.cuda.stream(stream):
                for key, page in pages.items():
                    buffers[key].copy_(page, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(stream)
            for buffer in buffers.values():
                buffer.record_stream(stream)
        else:
            for key, page in pages.items():
                buffers[key].copy_(page)
        resident = self._resident[param] = _Resident(buffers, ready)
        return resident

    def _evict(self, incoming: int, budget: int, keep: set) -> None:
        used = sum(r.nbytes for r in self._resident.values())
        for param in list(self._resident):
            if used + incoming <= budget:
                break
            if param in keep:
                continue
            used -= self._resident.pop(param).nbytes  # pages are already up to date (write-through)

    def _wait_ready(self, resident: _Resident, device: torch.device) -> None:
        if resident.ready is not None:
            torch.cuda.current_stream(device).wait_event(resident.ready)
            resident.ready = None

    def _write_back(self, param: torch.Tensor, resident: _Resident) -> None:
        """Copy the updated buffers back into the host pages (asynchronously on CUDA)."""
        pages = self.state[param]
        if param.device.type != "cuda":
            for key, buffer in resident.buffers.items():
                pages[key].copy_(buffer)
            return
        stream = self._copy_stream(param.device)
        stream.wait_stream(torch.cuda.current_stream(param.device))
        with torch.cuda.stream(stream):
            for key, buffer in resident.buffers.items():
                pages[key].copy_(buffer, non_blocking=True)
            resident.ready = torch.cuda.Event()  # the next update of these buffers waits for this read
            resident.ready.record(stream)
        for buffer in resident.buffers.values():
            buffer.record_stream(stream)

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device)
        return stream


def _host_page(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) as a host page: pinned when the param lives on CUDA."""
    if device.type == "cuda" and torch.cuda.is_available():
        return tensor.pin_memory()
    return tensor
