"""Test-wide setup.

Triton runs on CPU tensors through its interpreter: ``TRITON_INTERPRET=1`` must be set before
``triton`` is first imported, so it is set here, at collection time. Kernel-equality tests set
``LOWMEM_FORCE_TRITON=1`` (fixture ``force_triton``) to route CPU tensors to the Triton launchers.
Compile checks (``test_kernels_aot.py``) run in a subprocess without the interpreter.
The CPU path's torch.compile is disabled by default in tests (``LOWMEM_CPU_COMPILE=0``) to keep the
suite fast; tests that exercise the compiled path enable it explicitly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LOWMEM_CPU_COMPILE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def force_triton(monkeypatch):
    """Route CPU tensors to the Triton kernels (run by the interpreter)."""
    monkeypatch.setenv("LOWMEM_FORCE_TRITON", "1")
    yield


@pytest.fixture
def cpu_compile(monkeypatch):
    """Enable the torch.compile'd CPU path for one test."""
    monkeypatch.setenv("LOWMEM_CPU_COMPILE", "1")
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
