"""The one place that decides where optimizer math runs: :func:`choose`.

* CUDA tensors run the package's Triton kernels (``"triton"``).
* Everything else runs the pure-PyTorch reference of the same math; on CPU the reference is wrapped
  in ``torch.compile(dynamic=True)`` (``"compiled"``, see :func:`cpu_compiled`) so one compiled graph
  serves every tensor size (no per-shape recompiles, the 12-minute torchao failure mode) and the many
  elementwise ops fuse into one loop; small tensors (or compilation turned off) run it eagerly
  (``"eager"``). AdamW8bit and SGD step their CPU tensors in buckets (``cpu_buckets``: many tensors
  per call, big ones in place by chunks), each bucket compiled or eager as :func:`choose_bucket` says.
* The caller may demand the eager reference (``eager=True``): the optimizer layer does so for
  sharded (DTensor) params, whose sums are completed across ranks by the reference.

Settings (:class:`DispatchSettings`) are read once from the environment at import and changed only
through :func:`configure` / :func:`override` (tests use the scoped :func:`override`):

``LOWMEM_FORCE_TRITON=1``
    Run Triton kernels on CPU tensors too. Only meaningful with ``TRITON_INTERPRET=1`` (tests).
``LOWMEM_CPU_COMPILE=auto|1|0`` (default ``auto``)
    ``auto`` compiles the CPU step only for tensors of at least ``LOWMEM_CPU_COMPILE_MIN_NUMEL``
    elements (default 2**20): compiling costs tens of seconds once per process, which a small model
    (where the eager reference is already fast) never earns back; ``1`` compiles for every tensor,
    ``0`` never compiles (faster start, slower steps on large tensors).
``LOWMEM_CPU_COMPILE_AFTER_NUMEL`` (default 2**29)
    The bucketed CPU steps (:func:`choose_bucket`: a step's tensors of one kind, in few calls) compile
    under ``auto`` when the step covers ``compile_min_numel`` elements, or once this process has
    stepped that many elements eagerly (ski rental: by then the eager path has cost about one compile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import types
import warnings
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "DispatchSettings",
    "settings",
    "configure",
    "override",
    "update_backend",
    "per_layout",
    "choose",
    "choose_bucket",
    "triton_available",
    "use_triton",
    "cpu_compiled",
    "cpu_compile_wanted",
    "scalar_args",
    "triton_dtype",
]

DEFAULT_COMPILE_MIN_NUMEL = 2**20
"""Smallest tensor (elements) whose CPU step is compiled under ``cpu_compile="auto"``."""

DEFAULT_COMPILE_AFTER_NUMEL = 2**29
"""Element-steps run eagerly by bucketed CPU steps after which ``"auto"`` compiles them anyway.

Measured on one thread of a loaded 2-core machine (``benchmarks/cpu_sizes.py``, RESULTS.md, "CPU path
by size"): the eager bucketed 8-bit AdamW step costs ~40-150 ns per element more than the compiled
one, and compiling its two graphs 17 s (warm inductor cache) to 60 s (cold), so 2**29 (5.4e8) eager
element-steps cost about one compile: compiling then spends at most about twice what the best choice
in hindsight would have (the ski-rental bound), whatever the number of steps."""

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


def choose(device: torch.device, numel: int, *, eager: bool = False) -> str:
    """``"triton"``, ``"compiled"`` or ``"eager"`` for the update of a tensor of ``numel`` elements on
    ``device``. ``eager=True`` (the optimizer's choice, e.g. for a sharded param) forces the eager
    reference; otherwise CUDA (or ``force_triton``) runs Triton, and a CPU tensor runs compiled when
    ``cpu_compile`` is ``"always"``, or ``"auto"`` with ``numel >= compile_min_numel``."""
    if eager:
        return "eager"
    device = torch.device(device)
    if triton_available() and (device.type == "cuda" or _settings.force_triton):
        return "triton"
    if device.type == "cpu" and _compile_wanted(numel):
        return "compiled"
    return "eager"


_eager_bucket_numel = 0
"""Element-steps run eagerly by :func:`choose_bucket`'s ``"auto"`` choice in this process."""


def choose_bucket(numel: int) -> str:
    """``"compiled"`` or ``"eager"`` for the bucketed CPU step of ``numel`` elements: the tensors of one
    kind in one optimizer step, run as a few calls of a reference step function over buckets of them
    (``cpu_buckets``; see ``adamw8bit_update``, ``sgd_update``).

    ``"always"``/``"never"`` decide alone. ``"auto"`` compiles a step of at least ``compile_min_numel``
    elements (the rule of :func:`choose` for one tensor), and every step once this process has run
    ``compile_after_numel`` element-steps eagerly (each eager step adds its ``numel``): a small model
    pays a compile only after its eager steps have cost about as much. The count depends only on the
    elements stepped, never on time, and the bucketed steps compute the same bits compiled or eager
    (``tests/test_cpu_path.py``), so when the switch happens changes no result.
    """
    global _eager_bucket_numel
    mode = _settings.cpu_compile
    if mode != "auto":
        return "compiled" if mode == "always" else "eager"
    if numel >= _settings.compile_min_numel or _eager_bucket_numel >= _settings.compile_after_numel:
        return "compiled"
    _eager_bucket_numel += numel
    return "eager"


def update_backend(param: torch.Tensor, backend: str | None, reduce=None) -> str | None:
    """The backend of one in-place update of ``param``: ``backend``, or :func:`choose`'s pick when None;
    None when there is nothing to do (an empty param; a sharded one still joins its ranks' collectives).
    ``reduce``, the ``SumReduce`` of a sharded param, needs ``"eager"`` (the reference completes its sums
    across ranks): any other backend raises ``ValueError``."""
    if param.numel() == 0 and reduce is None:
        return None
    backend = backend or choose(param.device, param.numel())
    if reduce is not None and backend != "eager":
        raise ValueError(f"Invalid backend={backend!r} for a sharded tensor: expected 'eager' (the reference "
                         "completes its sums across ranks).")
    return backend


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the update of ``tensor`` runs a Triton kernel (``choose(...) == "triton"``)."""
    return choose(tensor.device, tensor.numel()) == "triton"


def cpu_compile_wanted(tensor: torch.Tensor) -> bool:
    """Whether the CPU step of ``tensor`` runs compiled (``choose(...) == "compiled"``)."""
    return tensor.device.type == "cpu" and _compile_wanted(tensor.numel())


def _compile_wanted(numel: int | None) -> bool:
    mode = _settings.cpu_compile
    if mode != "auto":
        return mode == "always"
    return numel is not None and numel >= _settings.compile_min_numel


def cpu_compiled(fn: Callable) -> Callable:
    """Wrap a reference step function for the CPU path.

    ``wrapped.on(backend)`` is the compiled callable for ``"compiled"`` and ``fn`` itself otherwise
    (the launchers pass :func:`choose`'s answer); calling the wrapper directly decides from the
    settings. The wrapped function is compiled once with ``dynamic=True`` the first time it is called with
    compilation wanted (the settings; under ``"auto"`` the size of its first tensor argument decides,
    so a given tensor always takes the same path). If compiling or running *this* function fails (no
    C++ toolchain, an inductor bug) it warns once and runs ``fn`` eagerly from then on; other
    functions keep compiling. Hyperparameters must reach ``fn`` as tensors or Python scalars that
    torch.compile treats as symbolic, or an LR schedule would trigger recompiles.
    """
    compiled: dict[str, Callable | None] = {}

    def run_compiled(*args, **kwargs):
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(fn, dynamic=True)
        cfn = compiled["fn"]
        if cfn is None:
            return fn(*args, **kwargs)
        try:
            return cfn(*args, **kwargs)
        except Exception as err:  # pragma: no cover - depends on the local toolchain
            warnings.warn(
                f"torch.compile of {fn.__qualname__} failed ({type(err).__name__}: {err}); "
                "running that function eagerly from now on (others still compile).",
                stacklevel=2,
            )
            compiled["fn"] = None
            return fn(*args, **kwargs)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if not _compile_wanted(None if first is None else first.numel()):
            return fn(*args, **kwargs)
        return run_compiled(*args, **kwargs)

    run.eager = fn  # type: ignore[attr-defined]
    run.on = lambda backend: run_compiled if backend == "compiled" else fn  # type: ignore[attr-defined]
    return run


def scalar_args(*values: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pack runtime hyperparameters into one fp32 tensor (so compiled CPU code never specializes on them)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a float param/grad dtype (fp32, bf16, fp16) for a kernel's constexpr."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def per_layout(fn: Callable) -> dict[bool, Callable]:
    """:func:`cpu_compiled` entry points of ``fn`` for the factored (``True``, ``(B, R, C)``) and
    the flat (``False``) layout: two copies of ``fn`` on their own code objects (the same code, renamed),
    so each layout has its own ``torch.compile`` cache and neither recompiles for the other."""

    def clone(tag: str) -> Callable:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = f"{fn.__qualname__}_{tag}"
        copy.__kwdefaults__ = fn.__kwdefaults__
        return copy

    return {True: cpu_compiled(clone("factored")), False: cpu_compiled(clone("flat"))}
