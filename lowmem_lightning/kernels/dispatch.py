"""Where optimizer math runs, decided in one place: :func:`dispatch` and the :class:`Family` protocol.

An optimizer step is one call, ``dispatch(FAMILY, tensors, scalars)``. It partitions the tensors by
backend: CUDA tensors (or all, with ``force_triton``) go to the family's Triton launches, one per
``launch_key`` group; the others run the family's pure-PyTorch step on the host, ``"compiled"``
(``torch.compile(dynamic=True)``, :class:`HostStep`) or ``"eager"`` as :func:`choose_host` says; a
sharded tensor (its ``reduces`` entry set) runs the family's launches keyed by ``shard_key``, which complete
its sums across ranks between passes, or else the eager reference, which completes them itself. Nothing else
in the package decides a backend.

How to add a kernel family (``kernels/lion8bit.py``, say):

1. Scalars: a ``NamedTuple`` of floats in the order of the Triton kernel's scalar arguments, e.g.
   ``LionScalars(lr, beta1, beta2, weight_decay, grad_sign)``. Launch with ``kernel[grid](...,
   **scalars._asdict())`` (by name: a swap cannot go silent); the host step gets them as one fp32
   tensor from :func:`pack` (an LR change never recompiles) and reads them by name with :func:`unpack`.
2. Tensors: a ``NamedTuple`` of per-tensor sequences with at least ``params``, ``steps`` and ``flags``
   (0-d fp32 on the param's device, read-only; flag 0 = leave the tensor untouched; a CPU tensor checked on
   the host gets the shared :func:`host_flag` constants); ``reduces`` (per tensor, a
   ``SumReduce`` or None) only if the family supports sharded params that need cross-rank sums (with
   ``shard_key`` when its launches can complete them, see :class:`Family`).
3. ``launch(tensors, scalars)``: one Triton launch (or launch sequence) over tensors that share a
   device and a ``launch_key(tensors, i)`` (what changes the compiled kernel: dtypes, state form,
   alignment); ``launch_key=None`` launches every tensor alone.
4. ``host(tensors, scalars, backend, steps)``: the reference step on the host, ``backend``
   ``"compiled"`` or ``"eager"`` (pass it to ``HostStep.on``). With ``bucketed=True`` dispatch groups
   the host tensors by ``host_key``, reads their flags and step counters once per device (a memory read
   on the CPU; :func:`host_flag` constants are not read at all), leaves out the skipped ones and hands
   over ``steps`` (host floats); with ``bucketed=False`` every tensor comes alone, flag and all, and
   ``steps`` is None.
5. ``LION_8BIT = Family("lion_8bit", launch, host, launch_key=..., host_key=..., bucketed=True)``; the
   optimizer calls ``dispatch(LION_8BIT, LionTensors(...), LionScalars(...))``.

Settings (:class:`DispatchSettings`) are read once from the environment at import and changed only
through :func:`configure` / :func:`override` (tests use the scoped :func:`override`):

``LOWMEM_FORCE_TRITON=1``
    Run Triton kernels on CPU tensors too. Only meaningful with ``TRITON_INTERPRET=1`` (tests).
``LOWMEM_CPU_COMPILE=auto|1|0`` (default ``auto``)
    ``auto`` compiles host steps of at least ``LOWMEM_CPU_COMPILE_MIN_NUMEL`` elements (default 2**20):
    compiling costs tens of seconds once per process, which a small model never earns back; ``1``
    compiles every host step, ``0`` none.
``LOWMEM_CPU_COMPILE_AFTER_NUMEL`` (default 2**29)
    Bucketed host steps also compile under ``auto`` once this process has stepped that many elements
    eagerly (ski rental: by then the eager path has cost about one compile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import types
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any, NamedTuple

import torch

from lowmem_lightning.lowmem_warning import LowMemWarning

__all__ = [
    "DispatchSettings",
    "settings",
    "configure",
    "override",
    "Family",
    "dispatch",
    "choose",
    "choose_host",
    "choose_bucket",
    "HostStep",
    "HOST_APPLY",
    "HOST_SKIP",
    "host_flag",
    "host_flag_values",
    "per_layout",
    "pack",
    "packed",
    "unpack",
    "subset",
    "triton_available",
    "triton_dtype",
]

DEFAULT_COMPILE_MIN_NUMEL = 2**20
"""Smallest host step (elements) compiled under ``cpu_compile="auto"``."""

DEFAULT_COMPILE_AFTER_NUMEL = 2**29
"""Element-steps run eagerly by bucketed host steps after which ``"auto"`` compiles them anyway: about
the cost of one compile (measurements: ``benchmarks/RESULTS.md``, "CPU path by size"), so compiling
then spends at most about twice what the best choice in hindsight would have (the ski-rental bound)."""

BACKENDS = ("triton", "compiled", "eager")
"""What :func:`choose` returns."""


@dataclasses.dataclass(frozen=True)
class DispatchSettings:
    """Where kernels run: ``force_triton`` (Triton on CPU tensors, interpreter tests),
    ``cpu_compile`` (``"auto"``, ``"always"`` or ``"never"``), ``compile_min_numel`` (elements; the
    size from which ``"auto"`` compiles) and ``compile_after_numel`` (element-steps run eagerly by
    bucketed steps after which ``"auto"`` compiles those too, see :func:`choose_bucket`)."""

    force_triton: bool = False
    cpu_compile: str = "auto"
    compile_min_numel: int = DEFAULT_COMPILE_MIN_NUMEL
    compile_after_numel: int = DEFAULT_COMPILE_AFTER_NUMEL

    def __post_init__(self) -> None:
        if self.cpu_compile not in ("auto", "always", "never"):
            raise ValueError(f"Invalid cpu_compile={self.cpu_compile!r}: expected 'auto', 'always' or 'never'.")
        for name in ("compile_min_numel", "compile_after_numel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name}={value!r}: expected an int >= 0.")

    @classmethod
    def from_env(cls, env=os.environ) -> DispatchSettings:
        """Settings from ``LOWMEM_FORCE_TRITON``, ``LOWMEM_CPU_COMPILE``, ``LOWMEM_CPU_COMPILE_MIN_NUMEL``,
        ``LOWMEM_CPU_COMPILE_AFTER_NUMEL``."""
        mode = env.get("LOWMEM_CPU_COMPILE", "auto").lower()
        mode = "never" if mode in ("0", "false", "no", "off") else ("auto" if mode == "auto" else "always")
        min_numel = int(env.get("LOWMEM_CPU_COMPILE_MIN_NUMEL", DEFAULT_COMPILE_MIN_NUMEL))
        after_numel = int(env.get("LOWMEM_CPU_COMPILE_AFTER_NUMEL", DEFAULT_COMPILE_AFTER_NUMEL))
        return cls(env.get("LOWMEM_FORCE_TRITON", "0") == "1", mode, min_numel, after_numel)


_settings = DispatchSettings.from_env()


def settings() -> DispatchSettings:
    """The settings in force."""
    return _settings


def configure(**changes) -> DispatchSettings:
    """Replace fields of the settings in force (see :class:`DispatchSettings`); returns the previous ones."""
    global _settings
    previous = _settings
    _settings = dataclasses.replace(_settings, **changes)
    return previous


@contextlib.contextmanager
def override(**changes) -> Iterator[DispatchSettings]:
    """``with override(force_triton=True): ...`` — the changed settings inside the block only."""
    global _settings
    previous = configure(**changes)
    try:
        yield _settings
    finally:
        _settings = previous


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but stay importable
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------


def choose(device: torch.device | str, numel: int, *, eager: bool = False) -> str:
    """``"triton"``, ``"compiled"`` or ``"eager"`` for one tensor of ``numel`` elements on ``device``:
    ``eager=True`` (a sharded tensor) forces the reference; CUDA (or ``force_triton``) runs Triton; a
    CPU tensor runs compiled as :func:`choose_host` says for ``numel`` elements alone."""
    if eager:
        return "eager"
    device = torch.device(device)
    if _on_triton(device):
        return "triton"
    return choose_host(device, numel)


def choose_host(device: torch.device, numel: int) -> str:
    """``"compiled"`` or ``"eager"`` for a host step of ``numel`` elements: compiled on the CPU when
    ``cpu_compile`` is ``"always"``, or ``"auto"`` with ``numel >= compile_min_numel``."""
    mode = _settings.cpu_compile
    wanted = mode == "always" or (mode == "auto" and numel >= _settings.compile_min_numel)
    return "compiled" if torch.device(device).type == "cpu" and wanted else "eager"


_eager_bucket_numel = 0
"""Element-steps run eagerly by :func:`choose_bucket`'s ``"auto"`` choice in this process."""


def choose_bucket(numel: int) -> str:
    """``"compiled"`` or ``"eager"`` for the bucketed host step of ``numel`` elements (one ``host_key``
    group of a :class:`Family` with ``bucketed=True``).

    ``"always"``/``"never"`` decide alone. ``"auto"`` compiles a step of at least ``compile_min_numel``
    elements, and every step once this process has run ``compile_after_numel`` element-steps eagerly
    (each eager step adds its ``numel``). The count depends only on the elements stepped, and the
    bucketed steps compute the same bits compiled or eager (``tests/test_cpu_path.py``), so when the
    switch happens changes no result.
    """
    global _eager_bucket_numel
    mode = _settings.cpu_compile
    if mode != "auto":
        return "compiled" if mode == "always" else "eager"
    if numel >= _settings.compile_min_numel or _eager_bucket_numel >= _settings.compile_after_numel:
        return "compiled"
    _eager_bucket_numel += numel
    return "eager"


def _on_triton(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or _settings.force_triton)


# --------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """How one kernel family plugs into :func:`dispatch` (see the module docstring, steps 3-5).

    ``launch(tensors, scalars)``: Triton over one group; ``host(tensors, scalars, backend, steps)``: the
    reference on the host; ``launch_key`` / ``host_key`` ``(tensors, i) -> hashable``: what must be equal
    for tensors to share a launch / a host call (None: every tensor alone); ``bucketed``: host tensors
    come in groups with their flags and steps read on the host (else one tensor at a time, flag as a
    tensor); ``shard_key`` ``(tensors, i) -> hashable | None``: the launch key of a sharded tensor
    (``reduces[i]`` set) whose launches complete its sums across ranks, equal on every rank, or None
    for one that runs the eager reference (also every sharded tensor of a family without it)."""

    name: str
    launch: Callable[[Any, Any], None]
    host: Callable[[Any, Any, str, list[float] | None], None]
    launch_key: Callable[[Any, int], Hashable] | None = None
    host_key: Callable[[Any, int], Hashable] | None = None
    bucketed: bool = False
    shard_key: Callable[[Any, int], Hashable | None] | None = None


HOST_APPLY = torch.ones((), dtype=torch.float32)
"""The finite flag 1 (apply the update) of a CPU tensor whose check ran on the host: one shared 0-d fp32 CPU
tensor, so the flag's value is known from its identity (:func:`host_flag_values`) with no read. Every flag is
read-only; this one is shared by every optimizer of the process."""

HOST_SKIP = torch.zeros((), dtype=torch.float32)
"""The finite flag 0 (leave the tensor untouched) of a host-checked CPU tensor (see :data:`HOST_APPLY`)."""


def host_flag(apply: bool) -> torch.Tensor:
    """:data:`HOST_APPLY` when ``apply`` else :data:`HOST_SKIP`: the flag of a CPU tensor checked on the host."""
    return HOST_APPLY if apply else HOST_SKIP


def host_flag_values(flags: list[torch.Tensor]) -> list[bool] | None:
    """Each flag's value (True = apply) when every one is a :func:`host_flag` constant, else None (flags that
    would have to be read from memory: a device's, or computed ones). No tensor is read."""
    values = []
    for flag in flags:
        if flag is HOST_APPLY:
            values.append(True)
        elif flag is HOST_SKIP:
            values.append(False)
        else:
            return None
    return values


def subset(tensors: NamedTuple, idx: list[int]) -> NamedTuple:
    """The same kind of NamedTuple holding only the tensors ``idx`` of every per-tensor field."""
    return type(tensors)(*([field[i] for i in idx] for field in tensors))


def dispatch(family: Family, tensors: NamedTuple, scalars: Any) -> None:
    """Run one step of ``family`` over ``tensors`` (its per-tensor NamedTuple) with ``scalars``.

    Empty tensors are left out, except sharded ones (``reduces[i]`` set: every rank joins the
    collectives): on Triton those with a ``shard_key`` share launches by it (empty shards too), the others
    run the eager reference one at a time. The rest go to Triton (CUDA, or ``force_triton``), grouped by
    device and ``launch_key``, or to the host step, grouped by device and ``host_key`` (or alone), compiled
    or eager by :func:`choose_bucket` (bucketed) or :func:`choose_host`. Never synchronizes with a CUDA
    device.
    """
    reduces = getattr(tensors, "reduces", None)
    launches: dict[Hashable, list[int]] = {}
    hosts: dict[Hashable, list[int]] = {}
    for i, param in enumerate(tensors.params):
        if reduces is not None and reduces[i] is not None:
            key = _shard_key(family, tensors, i)
            if key is None:
                family.host(subset(tensors, [i]), scalars, "eager", None)
            else:
                launches.setdefault((param.device, key), []).append(i)
        elif param.numel() == 0:
            continue
        elif _on_triton(param.device):
            key = i if family.launch_key is None else family.launch_key(tensors, i)
            launches.setdefault((param.device, key), []).append(i)
        else:
            hosts.setdefault(param.device, []).append(i)
    for idx in launches.values():
        family.launch(subset(tensors, idx), scalars)
    for idx in hosts.values():
        if family.bucketed:
            _host_buckets(family, tensors, scalars, idx)
        else:
            for i in idx:
                one = subset(tensors, [i])
                family.host(one, scalars, choose_host(one.params[0].device, one.params[0].numel()), None)


def _shard_key(family: Family, tensors: NamedTuple, i: int) -> Hashable | None:
    """The launch key of the sharded tensor ``i`` on Triton (:attr:`Family.shard_key`), or None: the eager reference."""
    if family.shard_key is None or not _on_triton(tensors.params[i].device):
        return None
    return family.shard_key(tensors, i)


def _host_buckets(family: Family, tensors: NamedTuple, scalars: Any, idx: list[int]) -> None:
    """The host tensors ``idx`` of one device: flags and steps read once, skipped tensors left out, one
    ``host`` call per ``host_key`` group with its compile choice."""
    groups: dict[Hashable, list[tuple[int, float]]] = {}
    for i, t in _live_steps(tensors, idx):
        groups.setdefault(i if family.host_key is None else family.host_key(tensors, i), []).append((i, t))
    everything = list(range(len(tensors.params)))
    for group in groups.values():
        chosen_idx = [i for i, _ in group]
        chosen = tensors if chosen_idx == everything else subset(tensors, chosen_idx)  # the usual case: no copy
        backend = choose_bucket(sum(p.numel() for p in chosen.params))
        family.host(chosen, scalars, backend, [t for _, t in group])


def _live_steps(tensors: NamedTuple, idx: list[int]) -> list[tuple[int, float]]:
    """``(i, step counter value)`` of the tensors ``idx`` whose flag is set. Flags given as :func:`host_flag`
    constants are known without a read, and only the live counters are read (one ``item`` each: a memory read
    on the host); other flags and every counter are read together (one ``stack``, one ``tolist``)."""
    ok = host_flag_values([tensors.flags[i] for i in idx])
    if ok is not None:
        return [(i, tensors.steps[i].item()) for i, good in zip(idx, ok) if good]
    host = torch.stack([tensors.flags[i] for i in idx] + [tensors.steps[i] for i in idx]).tolist()
    return [(i, t) for i, good, t in zip(idx, host[:len(idx)], host[len(idx):]) if good]


# --------------------------------------------------------------------------------------------------
# Scalars and host steps
# --------------------------------------------------------------------------------------------------


def pack(scalars: NamedTuple, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every field of ``scalars`` (numbers) in one fp32 tensor, in field order: the host steps take their
    hyperparameters this way so that torch.compile never specializes on them (no recompile per LR)."""
    return torch.tensor([float(v) for v in scalars], dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _packed(scalars: NamedTuple, device: torch.device) -> torch.Tensor:
    return pack(scalars, device)


def packed(scalars: NamedTuple, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`pack` cached per ``(scalars, device)``: the host steps' hyperparameter operand, built once per
    value (a new learning rate makes a new one). Shared: read it, never write into it."""
    return _packed(scalars, torch.device(device))


def unpack(cls: type, packed: torch.Tensor) -> NamedTuple:
    """``cls`` (a NamedTuple of scalars) with 0-d fp32 tensors read from ``packed`` (:func:`pack`)."""
    return cls(*packed.unbind(0))


class HostStep:
    """A reference step function for the host: ``step.on(backend)`` is ``fn`` for ``"eager"`` and its
    ``torch.compile(dynamic=True)`` form for ``"compiled"`` (compiled once, on first use).

    It never decides a backend itself: :func:`dispatch` does. If compiling or running *this* function
    fails (no C++ toolchain, an inductor bug) it warns once and runs ``fn`` eagerly from then on; other
    functions keep compiling. Hyperparameters must reach ``fn`` as tensors (:func:`pack`) or
    torch.compile would recompile for every new value.

    The first call compiles without duck shaping (sizes that happen to be equal at that call, such as a
    bucket of 256 rows of 256 elements, must not become one symbol: the next size would compile again) and,
    when no argument is a float, with float globals as constants.
    Later calls skip torch.compile's per-call frame machinery when they can (:class:`_CachedGraph`): the
    graphs' own guards are checked (up to :data:`_MAX_CACHED_GRAPHS`, e.g. one per param dtype: a model with
    bf16 and fp32 params), then the compiled code of the first that passes runs directly; anything else (no
    graph's guards pass, a torch without these internals) goes through the compiled function as usual.
    """

    def __init__(self, fn: Callable):
        self.eager = fn
        self._compiled: Callable | None | bool = False  # False: not compiled yet; None: compiling failed
        self._cached: tuple[_CachedGraph, ...] = ()
        self._cache_refreshes = 0
        functools.update_wrapper(self, fn)

    def on(self, backend: str) -> Callable:
        """The callable for ``backend`` (``"compiled"`` or ``"eager"``)."""
        return self._run_compiled if backend == "compiled" else self.eager

    def _run_compiled(self, *args, **kwargs):
        if not kwargs:
            for cached in self._cached:
                if cached.matches(args):
                    return cached.code(*args)
        if self._compiled is False:
            self._compiled = torch.compile(self.eager, dynamic=True, options=_COMPILE_OPTIONS)
            with _no_duck_shapes(), _constant_globals(args, kwargs):
                return self._call(args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict):
        if self._compiled is None:
            return self.eager(*args, **kwargs)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as err:  # pragma: no cover - depends on the local toolchain
            warnings.warn(
                f"torch.compile of {self.eager.__qualname__} failed ({type(err).__name__}: {err}); "
                "running that function eagerly from now on (others still compile).",
                LowMemWarning,
                stacklevel=3,
            )
            self._compiled = None
            return self.eager(*args, **kwargs)
        if self._cache_refreshes < _CACHE_REFRESHES:  # a function that keeps recompiling stops looking
            self._cache_refreshes += 1
            self._cached = _CachedGraph.all_of(self.eager)
        return out


_COMPILE_OPTIONS = {"size_asserts": False}
"""Inductor options of every host step: no per-call size/stride asserts on the inputs (~1 us each per call); the
graph's guards (checked on every call) already pin dtypes, ranks and strides."""

_CACHE_REFRESHES = 8
"""Compiled calls after which a :class:`HostStep` stops looking for its :class:`_CachedGraph` entries."""

_MAX_CACHED_GRAPHS = 4
"""Most compiled graphs of one :class:`HostStep` run through :class:`_CachedGraph` (checked one after another)."""


class _CachedGraph:
    """One compiled entry torch.compile holds for a function: its transformed code (which gathers the
    graph's inputs and calls the compiled graph) and its guards. :meth:`matches` runs the guards on the
    call's arguments (and the global state they check: grad mode, threads, ...); when they pass, calling
    :attr:`code` is what torch.compile would run, without its per-call wrapper (measured ~20 us of ~45 per
    call of a small bucket step: ``benchmarks/RESULTS.md``, "CPU path by size")."""

    def __init__(self, code: Callable, guards, names: tuple[str, ...]):
        self.code, self._guards, self._names = code, guards, names

    @classmethod
    def all_of(cls, fn: Callable) -> tuple[_CachedGraph, ...]:
        """The cached graphs of ``fn``, in the order torch.compile holds them, when it holds 1 to
        :data:`_MAX_CACHED_GRAPHS` entries; else ``()`` (also when this torch lacks the internals read here).
        Graphs whose guards both pass compute the same function: which one runs changes no result."""
        try:
            from torch._dynamo.eval_frame import _debug_get_cache_entry_list

            entries = _debug_get_cache_entry_list(fn.__code__)
            if not 1 <= len(entries) <= _MAX_CACHED_GRAPHS or fn.__kwdefaults__:
                return ()
            names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
            fn_globals = _direct_globals(fn.__globals__)
            graphs = []
            for entry in entries:
                code = types.FunctionType(entry.code, fn_globals, fn.__name__, None, fn.__closure__)
                guards = entry.guard_manager
                guards.check  # noqa: B018 - present, or no cached calls
                graphs.append(cls(code, guards, names))
        except Exception:  # pragma: no cover - another torch version's internals
            return ()
        return tuple(graphs)

    def matches(self, args: tuple) -> bool:
        """Whether the guards pass for positional ``args`` (every parameter passed: no defaults filled in)."""
        return len(args) == len(self._names) and self._guards.check(dict(zip(self._names, args)))


_DYNAMO_UTILS = "__import_torch_dot__dynamo_dot_utils"
"""The global through which dynamo's transformed code reaches ``torch._dynamo.utils``."""

_PER_CALL_HELPERS = ("call_size", "record_pregraph_bytecode_enter", "record_pregraph_bytecode_exit")
"""``torch._dynamo.utils`` functions the transformed code calls on every call, each behind ``torch._disable_dynamo``."""


class _Undecorated:
    """``torch._dynamo.utils`` as the transformed code sees it, with :data:`_PER_CALL_HELPERS` undecorated (the
    same functions without their ``torch._disable_dynamo`` wrapper, ~1 us per call; they only read sizes and open
    the profiler's "Pregraph bytecode" range); any other attribute is the module's."""

    def __init__(self, module: types.ModuleType):
        self._module = module
        for name in _PER_CALL_HELPERS:
            setattr(self, name, inspect.unwrap(getattr(module, name)))

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _direct_globals(fn_globals: dict) -> dict:
    """The globals :class:`_CachedGraph` runs a transformed code with: ``fn_globals`` (a copy taken once compiled:
    the transformed code reads only the compiled graph and dynamo's modules from it) with dynamo's utilities
    :class:`_Undecorated`; ``fn_globals`` itself when this torch has no such global or helpers."""
    module = fn_globals.get(_DYNAMO_UTILS)
    if not isinstance(module, types.ModuleType) or not all(hasattr(module, n) for n in _PER_CALL_HELPERS):
        return fn_globals
    return {**fn_globals, _DYNAMO_UTILS: _Undecorated(module)}


def _constant_globals(args: tuple, kwargs: dict):
    """Context in which torch.compile bakes float globals (the codec's level counts) into the graph as constants
    instead of lifting them into per-call tensor inputs (~6 us per call); only for a call without float
    arguments (a float argument would become a constant too, and a new value would compile again)."""
    if any(isinstance(a, float) for a in (*args, *kwargs.values())):
        return contextlib.nullcontext()
    try:
        import torch._dynamo.config as dynamo_config

        return dynamo_config.patch(specialize_float=True)
    except Exception:  # pragma: no cover - another torch version
        return contextlib.nullcontext()


def _no_duck_shapes():
    """Context in which torch.compile gives every dynamic size its own symbol (see :class:`HostStep`)."""
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(use_duck_shape=False)
    except Exception:  # pragma: no cover - another torch version
        return contextlib.nullcontext()


def per_layout(fn: Callable) -> dict[bool, HostStep]:
    """:class:`HostStep` s of ``fn`` for the factored (``True``, ``(B, R, C)``) and the flat (``False``)
    layout: two copies of ``fn`` on their own code objects (the same code, renamed), so each layout has
    its own ``torch.compile`` cache and neither recompiles for the other."""

    def clone(tag: str) -> Callable:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = f"{fn.__qualname__}_{tag}"
        copy.__kwdefaults__ = fn.__kwdefaults__
        return copy

    return {True: HostStep(clone("factored")), False: HostStep(clone("flat"))}


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a float param/grad dtype (fp32, bf16, fp16) for a kernel's constexpr."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
