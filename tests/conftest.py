"""Test-wide setup.

Triton runs on CPU tensors through its interpreter: ``TRITON_INTERPRET=1`` must be set before
``triton`` is first imported, so it is set here, at collection time. Kernel-equality tests route CPU
tensors to the Triton launchers through the dispatch settings (fixture ``force_triton``, or
``dispatch.configure(force_triton=...)`` inside a test; every test starts from and returns to the
settings read at import). Compile checks (``test_kernels_aot.py``) run in a subprocess without the
interpreter. The CPU path's torch.compile is disabled by default in tests (``LOWMEM_CPU_COMPILE=0``,
read once when ``dispatch`` is imported) to keep the suite fast; tests of the compiled path enable it
(fixture ``cpu_compile``).

One intra-op thread (``OMP_NUM_THREADS=1``, unless set, read by torch here and by the subprocesses tests
start): the suite's tensors are tiny, and a second OpenMP thread spinning for each small op cost more than it
gave (on the shared 2-core machine, test_gradient_release.py took 95 s of user CPU with two threads, 6.5 s with
one; benchmarks/RESULTS.md).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LOWMEM_CPU_COMPILE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lowmem_lightning.kernels import dispatch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also when torch was imported before this file


@pytest.fixture(autouse=True)
def _dispatch_settings():
    """Every test starts from the settings read at import and cannot leak its changes."""
    with dispatch.override():
        yield


@pytest.fixture
def force_triton():
    """Route CPU tensors to the Triton kernels (run by the interpreter)."""
    with dispatch.override(force_triton=True):
        yield


@pytest.fixture
def cpu_compile():
    """Enable the torch.compile'd CPU path for one test."""
    with dispatch.override(cpu_compile="always"):
        yield


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(request, tmp_path_factory, monkeypatch):
    """TextDataModule's default token cache directory (``$LOWMEM_CACHE_DIR``) in pytest's temporary directory, one
    per test (created only when a test's data is worth caching), so no test writes under the user's home."""
    import hashlib

    name = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    monkeypatch.setenv("LOWMEM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token_cache" / name))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread avoids oversubscribing the shared CPU cores (restored after).
    Modules use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lightning_stream():
    """A StreamHandler on Lightning's logger (a ``StringIO`` it writes to), as Lightning installs one when the
    application configured none; removed afterwards."""
    import io
    import logging

    from lowmem_lightning.cli.held_logs import LIGHTNING_LOGGERS

    logger = logging.getLogger(LIGHTNING_LOGGERS[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def gloo_env(monkeypatch):
    """For a test whose Trainer starts gloo ranks itself (``ddp_spawn``): a local master address, no inherited OpenMP
    thread count, no global seed (left by an earlier ``seed_everything`` in this worker, it would reseed the
    sampler's shuffle in the ranks)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
