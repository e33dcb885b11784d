"""The one place that decides where optimizer math runs.

* CUDA tensors run the package's Triton kernels (``use_triton``).
* Everything else runs the pure-PyTorch reference of the same math; on CPU the reference is wrapped
  in ``torch.compile(dynamic=True)`` (``cpu_compiled``) so one compiled graph serves every tensor
  size (no per-shape recompiles, the 12-minute torchao failure mode) and the many elementwise ops
  fuse into one loop.

Environment switches (read at call time, so tests can flip them):

``LOWMEM_FORCE_TRITON=1``
    Run Triton kernels on CPU tensors too. Only meaningful with ``TRITON_INTERPRET=1`` (tests).
``LOWMEM_CPU_COMPILE=auto|1|0`` (default ``auto``)
    ``auto`` compiles the CPU step only for tensors of at least ``LOWMEM_CPU_COMPILE_MIN_NUMEL``
    elements (default 2**20): compiling costs tens of seconds once per process, which a small model
    (where the eager reference is already fast) never earns back; ``1`` compiles for every tensor,
    ``0`` never compiles (faster start, slower steps on large tensors).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

__all__ = [
    "triton_available",
    "use_triton",
    "cpu_compiled",
    "cpu_compile_wanted",
    "scalar_args",
    "triton_dtype",
    "PARAM_GRAD_DTYPE_PAIRS",
    "table_to_device",
]


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a hard dependency, but stay importable
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the update of ``tensor`` runs a Triton kernel (CUDA, or forced for interpreter tests)."""
    if not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return os.environ.get("LOWMEM_FORCE_TRITON", "0") == "1"


DEFAULT_COMPILE_MIN_NUMEL = 2**20
"""Smallest tensor (elements) whose CPU step is compiled under ``LOWMEM_CPU_COMPILE=auto``."""


def cpu_compile_wanted(tensor: torch.Tensor) -> bool:
    """Whether the CPU step of ``tensor`` runs compiled (``LOWMEM_CPU_COMPILE`` and the size rule below)."""
    return tensor.device.type == "cpu" and _compile_wanted((tensor,))


def _compile_wanted(args: tuple) -> bool:
    mode = os.environ.get("LOWMEM_CPU_COMPILE", "auto").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if mode != "auto":
        return True
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    min_numel = int(os.environ.get("LOWMEM_CPU_COMPILE_MIN_NUMEL", DEFAULT_COMPILE_MIN_NUMEL))
    return first is not None and first.numel() >= min_numel


def cpu_compiled(fn: Callable) -> Callable:
    """Wrap a reference step function for the CPU path.

    The wrapped function is compiled once with ``dynamic=True`` the first time it is called with
    compilation wanted (see ``LOWMEM_CPU_COMPILE``; under ``auto`` the size of its first tensor
    argument decides, so a given tensor always takes the same path); if the compiler is unusable
    (no C++ toolchain, an inductor bug) it warns once and falls back to eager for the rest of the
    process. Hyperparameters must reach ``fn`` as tensors, not Python floats, or an LR schedule
    would trigger recompiles.
    """
    compiled: dict[str, Callable | None] = {}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not _compile_wanted(args):
            return fn(*args, **kwargs)
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(fn, dynamic=True)
        cfn = compiled["fn"]
        if cfn is None:
            return fn(*args, **kwargs)
        try:
            return cfn(*args, **kwargs)
        except Exception as err:  # pragma: no cover - depends on the local toolchain
            warnings.warn(
                f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                "using the eager reference on CPU.",
                stacklevel=2,
            )
            compiled["fn"] = None
            return fn(*args, **kwargs)

    run.eager = fn  # type: ignore[attr-defined]
    return run


def scalar_args(*values: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Pack runtime hyperparameters into one fp32 tensor (so compiled CPU code never specializes on them)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def triton_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a float param/grad dtype (fp32, bf16, fp16) for a kernel's constexpr."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


PARAM_GRAD_DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
"""(param dtype, grad dtype) pairs the multi-tensor launchers are compiled for ahead of time."""


def table_to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host launch table to ``device`` without synchronising (pinned, non-blocking on CUDA)."""
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)
