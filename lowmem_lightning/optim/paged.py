"""Paged 8-bit AdamW: the quantized state lives in host memory and visits the device per update.

Same math and bit-identical results as :class:`~lowmem_lightning.optim.adamw8bit.AdamW8bit` (the
same kernel runs on the same values); only where the 8-bit state is kept differs.

* **Host pages.** ``exp_avg_codes``, ``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax`` of
  every quantized parameter live in host memory (pinned on CUDA, so copies are asynchronous). They
  are the optimizer's ``state`` (what ``state_dict`` saves). Step counters and the fp32 state of
  small tensors (< 4096 elements) stay on the param's device.
* **Residency ("fits -> resident").** Each step, :func:`plan_paging` (a pure function of the update
  order, the page sizes, what is resident and the budget) picks the tensors whose state stays on the
  device between steps: those already resident first, then the others in update order, while their
  bytes fit ``gpu_budget_bytes``. Their pages are copied in once and then stay: no host traffic per
  step once the budget covers the state. The other tensors are streamed: copied in (prefetched one
  ahead), updated, written back, dropped. Resident buffers are written back to their pages only when
  evicted (write-back, not write-through) or when the full state is read (:meth:`PagedAdamW8bit.flush_pages`,
  called by ``state_dict``, ``load_state_dict``, deepcopy and pickling).
* **Few launches.** All tensors resident at the start of a step are updated in one kernel call (one
  launch per dtype group on CUDA); the first streamed tensor's copy is issued before it, so it overlaps.
* **Overlap (CUDA).** Copies run on a side stream; the compute stream waits on an event before using
  a buffer, and the side stream waits on the compute stream before writing back; buffers used on both
  streams are protected with ``record_stream``. CUDA managed memory is never used. Only
  :class:`PagedAdamW8bit`'s ``_copy_in`` / ``_copy_out`` / ``_wait_ready`` touch streams.

:attr:`PagedAdamW8bit.paging_stats` counts the copies and bytes moved each way and the update calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from ..kernels.adamw8bit import AdamWScalars
from ..kernels.rounding import BF16Rounding
from .adamw8bit import AdamW8bit
from .base import StateSpec

__all__ = ["PagedAdamW8bit", "PageAction", "plan_paging"]

_CPU_AUTO_BUDGET = 0
"""Resident budget on CPU (bytes) when ``gpu_budget_bytes`` is None: 0, since device and host are the same
memory there; only the staging buffers of the tensor being updated (and the prefetched next) exist."""


class PageAction(NamedTuple):
    """One step of a paging plan: ``kind`` is ``"fetch"`` (copy the pages of ``keys`` to the device),
    ``"update"`` (one optimizer call over ``keys``, all resident) or ``"evict"`` (write ``keys`` back to
    their pages if they changed since, and free their device buffers)."""

    kind: str
    keys: tuple


def plan_paging(
    order: Sequence[Hashable],
    nbytes: Mapping[Hashable, int],
    resident: Sequence[Hashable],
    budget: int,
    prefetch: bool = True,
) -> list[PageAction]:
    """The paging plan of one step: which pages to fetch, update together, and evict, in what order.

    Args:
        order: the tensors to update this step (keys, each once).
        nbytes: device bytes of each key's state (keys of ``order`` and ``resident``).
        resident: keys whose state is on the device now, least recently used first.
        budget: most bytes of state that may stay resident between steps.
        prefetch: issue the copy of the next streamed tensor before the current update.

    Kept resident after the step: the keys of ``order`` already resident, then the others in ``order``,
    while their bytes fit ``budget``; then resident keys not updated this step, most recent first, while
    they still fit. Every other resident key is evicted (first the idle ones, before any fetch). The keys
    of ``order`` already resident are updated in one call; the rest are fetched (prefetched one ahead),
    updated one call each, and evicted right after unless kept. During the step the device holds at most
    the kept keys plus two streamed ones. Keys are compared by hash and identity (tensors work).
    """
    if budget < 0:
        raise ValueError(f"Invalid budget={budget!r}: expected bytes >= 0.")
    order = list(dict.fromkeys(order))
    is_resident = dict.fromkeys(resident)
    ready = [k for k in order if k in is_resident]
    queue = [k for k in order if k not in is_resident]
    kept, used = {}, 0
    for key in ready + queue:
        if used + nbytes[key] <= budget:
            kept[key], used = None, used + nbytes[key]
    updated = dict.fromkeys(order)
    for key in reversed(resident):
        if key not in updated and used + nbytes[key] <= budget:
            kept[key], used = None, used + nbytes[key]
    plan = []
    idle = tuple(k for k in resident if k not in updated and k not in kept)
    if idle:
        plan.append(PageAction("evict", idle))
    fetched: dict = {}

    def fetch(key) -> None:
        if key not in fetched:
            fetched[key] = None
            plan.append(PageAction("fetch", (key,)))

    if prefetch and queue:
        fetch(queue[0])
    if ready:
        plan.append(PageAction("update", tuple(ready)))
        streamed = tuple(k for k in ready if k not in kept)
        if streamed:
            plan.append(PageAction("evict", streamed))
    for position, key in enumerate(queue):
        fetch(key)
        if prefetch and position + 1 < len(queue):
            fetch(queue[position + 1])
        plan.append(PageAction("update", (key,)))
        if key not in kept:
            plan.append(PageAction("evict", (key,)))
    return plan


class _Resident:
    """Device copies of one parameter's four quantized state tensors."""

    __slots__ = ("buffers", "nbytes", "ready", "dirty")

    def __init__(self, buffers: dict[str, torch.Tensor], ready):
        self.buffers = buffers
        self.nbytes = sum(t.numel() * t.element_size() for t in buffers.values())
        self.ready = ready  # CUDA: event after the last copy touching the buffers; None on CPU
        self.dirty = False  # updated since the pages were last written


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with its 8-bit state paged between host memory and the device.

    Args (besides AdamW8bit's):
        gpu_budget_bytes: most bytes of quantized state kept resident on the device between
            updates (an int >= 0). ``None`` (auto): 1/8 of the free GPU memory at the first step
            on CUDA, 0 on CPU (only the staging buffers of the tensor being updated). The tensor
            being updated and the prefetched next one are always allowed.
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
        bf16_rounding: BF16Rounding = "stochastic",
        quantize_state: bool = True,
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
        super().__init__(params, lr, betas, eps, weight_decay, maximize=maximize, seed=seed,
                         bf16_rounding=bf16_rounding, quantize_state=quantize_state, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable)
        self.gpu_budget_bytes = gpu_budget_bytes
        self.page_prefetch = bool(page_prefetch)
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Fresh residency caches (after construction, deepcopy or unpickling); pages pinned again on CUDA."""
        self._budgets: dict[torch.device, int] = {}
        self._resident: OrderedDict[torch.Tensor, _Resident] = OrderedDict()
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.__dict__.setdefault("_paging_stats", _zero_stats())
        for param, state in self._param_states():
            for key in self._host_keys(param):
                if key in state and param.device.type == "cuda" and not state[key].is_pinned():
                    state[key] = _host_page(state[key].detach().cpu(), param.device)

    @property
    def paging_stats(self) -> dict[str, int]:
        """Counters since construction: ``to_device_copies`` / ``to_device_bytes`` (pages fetched),
        ``to_host_copies`` / ``to_host_bytes`` (pages written back), ``update_calls`` (kernel calls over
        paged tensors; one launch per dtype group each on CUDA). A copy is one tensor's four state tensors."""
        return self._paging_stats

    def __getstate__(self) -> dict:
        """As :class:`LowMemOptimizer`'s, after the resident state was written to the pages (they are the state)."""
        self.flush_pages()
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

    def flush_pages(self) -> None:
        """Write every resident buffer updated since its last write-back to its host page and wait for it:
        afterwards ``state`` holds the full, current state (the buffers stay resident)."""
        for param, resident in self._resident.items():
            if resident.dirty:
                self._copy_out(param, resident)
        self._drain()

    def state_dict(self) -> dict:
        """The state dict (host pages), after :meth:`flush_pages`."""
        self.flush_pages()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as :class:`AdamW8bit` does, then move the params' quantized state to host pages and drop residents
        (entries a load-state-dict post-hook stored in ``state`` beside the params' are left as they are).
        A refused state dict leaves the optimizer's state current (the residents are flushed first)."""
        self.flush_pages()
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
    def _update(self, work: dict, flags: list, hyper: AdamWScalars) -> None:
        small = [i for i, absmax in enumerate(work["m_absmax"]) if absmax is None]
        paged = [i for i, absmax in enumerate(work["m_absmax"]) if absmax is not None]
        if small:
            super()._update({k: [v[i] for i in small] for k, v in work.items()}, [flags[i] for i in small], hyper)
        if paged:
            self._update_paged(work, flags, hyper, paged)

    def _update_paged(self, work: dict, flags: list, hyper: AdamWScalars, order: list[int]) -> None:
        """Run :func:`plan_paging`'s plan for the quantized tensors ``order`` (indices into ``work``; one device)."""
        owners = work["owners"]  # the params keying self.state (DTensors for sharded params)
        position = {owners[i]: i for i in order}
        device = owners[order[0]].device
        resident = [p for p in self._resident if p.device == device]
        nbytes = {p: r.nbytes for p, r in self._resident.items()}
        for i in order:
            if owners[i] not in nbytes:
                nbytes[owners[i]] = sum(self.state[owners[i]][k].nbytes for k in self._host_keys(owners[i]))
        plan = plan_paging([owners[i] for i in order], nbytes, resident, self._budget(device), self.page_prefetch)
        for action in plan:
            if action.kind == "fetch":
                self._fetch(action.keys[0])
            elif action.kind == "evict":
                for param in action.keys:
                    self._evict(param)
            else:
                self._update_resident(work, flags, hyper, [position[p] for p in action.keys])

    def _update_resident(self, work: dict, flags: list, hyper: AdamWScalars, chosen: list[int]) -> None:
        """One kernel call over the tensors ``chosen`` (indices into ``work``), their state in resident buffers."""
        residents = []
        for i in chosen:
            param = work["owners"][i]
            resident = self._resident[param]
            self._resident.move_to_end(param)
            self._wait_ready(resident, param.device)
            resident.dirty = True
            residents.append(resident)
        batch = {key: [work[key][i] for i in chosen]
                 for key in ("params", "owners", "grads", "steps", "seeds", "stochastic")}
        for key, name in (("m", "exp_avg_codes"), ("m_absmax", "exp_avg_absmax"), ("v", "exp_avg_sq_codes"),
                          ("v_absmax", "exp_avg_sq_absmax")):
            batch[key] = [r.buffers[name] for r in residents]
        super()._update(batch, [flags[i] for i in chosen], hyper)
        self.paging_stats["update_calls"] += 1

    def _budget(self, device: torch.device) -> int:
        if self.gpu_budget_bytes is not None:
            return self.gpu_budget_bytes
        if device not in self._budgets:
            if device.type == "cuda":
                self._budgets[device] = torch.cuda.mem_get_info(device)[0] // 8
            else:
                self._budgets[device] = _CPU_AUTO_BUDGET
        return self._budgets[device]

    def _fetch(self, param: torch.Tensor) -> None:
        """Copy ``param``'s pages into new device buffers and make them resident (clean)."""
        pages = {key: self.state[param][key] for key in self._host_keys(param)}
        buffers = {key: torch.empty_like(page, device=param.device) for key, page in pages.items()}
        resident = self._resident[param] = _Resident(buffers, None)
        self._copy_in(param, resident, pages)
        self.paging_stats["to_device_copies"] += 1
        self.paging_stats["to_device_bytes"] += resident.nbytes

    def _evict(self, param: torch.Tensor) -> None:
        """Drop ``param``'s device buffers, written back to its pages first if they changed since."""
        resident = self._resident.pop(param)
        if resident.dirty:
            self._copy_out(param, resident)

    # ------------------------------------------------------------------ the copies (the only stream code)
    def _copy_in(self, param: torch.Tensor, resident: _Resident, pages: dict[str, torch.Tensor]) -> None:
        """Pages -> buffers: on CPU a plain copy; on CUDA on the side stream, ``resident.ready`` recorded after."""
        if param.device.type != "cuda":
            for key, page in pages.items():
                resident.buffers[key].copy_(page)
            return
        stream = self._copy_stream(param.device)
        stream.wait_stream(torch.cuda.current_stream(param.device))  # buffers may reuse freed memory
        with torch.cuda.stream(stream):
            for key, page in pages.items():
                resident.buffers[key].copy_(page, non_blocking=True)
            resident.ready = torch.cuda.Event()
            resident.ready.record(stream)
        for buffer in resident.buffers.values():
            buffer.record_stream(stream)

    def _copy_out(self, param: torch.Tensor, resident: _Resident) -> None:
        """Buffers -> pages (asynchronously on CUDA, after the updates queued so far); the buffers become clean."""
        pages = self.state[param]
        resident.dirty = False
        self.paging_stats["to_host_copies"] += 1
        self.paging_stats["to_host_bytes"] += resident.nbytes
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

    def _wait_ready(self, resident: _Resident, device: torch.device) -> None:
        if resident.ready is not None:
            torch.cuda.current_stream(device).wait_event(resident.ready)
            resident.ready = None

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device)
        return stream


def _zero_stats() -> dict[str, int]:
    return dict(to_device_copies=0, to_device_bytes=0, to_host_copies=0, to_host_bytes=0, update_calls=0)


def _host_page(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) as a host page: pinned when the param lives on CUDA."""
    if device.type == "cuda" and torch.cuda.is_available():
        return tensor.pin_memory()
    return tensor
