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

Ctrl+C as in a terminal: a suite started in the background by a non-interactive shell (``pytest ... &`` in a script,
a CI runner's job) inherits SIGINT *ignored* (POSIX), and so would every process a test starts. The Ctrl+C tests
(``test_notebook_session.py``, the SIGINT cases of ``test_resume_midepoch.py``) send SIGINT to such processes, which
would then run on as if nothing was pressed. Python's own handler is put back here (a process it starts gets the
default action, so its Python raises ``KeyboardInterrupt`` again).

Forked ranks after compiled models: each worker runs its first backward here, before any test (``_first_backward``).
"""

import os
import signal

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LOWMEM_CPU_COMPILE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lowmem_lightning.kernels import dispatch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also when torch was imported before this file


def _first_backward() -> None:
    """Run this process's first backward before any test compiles a model: autograd's engine decides at its first
    backward, once, whether to start threads for devices, and once it has, a forked child's backward fails. On
    torch's CUDA builds without a GPU a ``torch.compile``d forward makes it count one, and the suite's forked ranks
    (``ddp_fork``, ``forked_ranks``) would then fail after a compiling test (``tests/test_fork_after_compile.py``)."""
    (torch.ones(1, requires_grad=True) * 2).sum().backward()


_first_backward()

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background: see the module doc
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _patch_triton_language_once() -> None:
    """Let Triton's interpreter patch ``triton.language`` once per launch instead of once per helper call.

    The interpreter replaces ``tl``'s builtins with host versions at each launch (and puts them back after it), but
    it also calls its ``_patch_lang`` again at every call of a ``@triton.jit`` helper inside the kernel (ours, and
    ``tl.sum``, ``tl.max``, ``tl.zeros``, which are helpers of ``triton.language.standard``), and never puts those
    back: once the launch (or the helper's first call) has patched the language modules the helper's globals name,
    the call changes nothing, yet it walks every member of ``tl``, ``tl.tensor`` and ``tl.math`` with
    ``inspect.getmembers``, ~1.3 ms a call. The factored kernels call helpers per tile: 22,000 calls, 29 of the 48 s
    of one test of ``test_factored_batched.py`` (cProfile). Here a helper's call skips the walk when the running
    launch has already patched every language module (``tl``, ``tl.core``) the helper's globals name; the launch
    itself and a helper's first call that needs another module still go through Triton's own ``_patch_lang``. The
    kernels compute what they did: only host-side re-patching is skipped. A Triton without ``_patch_lang``
    (another version) is left as it is."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import inspect

    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_lowmem_once", False):
        return
    tl = interpreter.tl
    patched: list[set] = []  # the language modules patched in the running launch (empty between launches)
    named: dict = {}  # (fn, size of its globals) -> the language modules its globals name

    def langs(fn) -> frozenset:
        key = (fn, len(fn.__globals__))  # the interpreter adds names to a kernel's globals when it rewrites it
        if key not in named:
            named[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        return named[key]

    class _Unchanged:
        def restore(self) -> None:
            pass

    class _Launch:
        def __init__(self, scope):
            self.scope = scope

        def restore(self) -> None:
            patched.clear()
            self.scope.restore()

    def patch_lang(fn):
        if not patched:  # a launch (GridExecutor): patch, and note what until it restores
            scope = original(fn)
            patched.append(set(langs(fn)))
            return _Launch(scope)
        need = langs(fn)
        if need <= patched[0]:  # a helper called inside that launch: nothing left to patch
            return _Unchanged()
        scope = original(fn)  # Triton never restores a helper's patches: they hold for the rest of the launch
        patched[0] |= need
        return scope

    patch_lang._lowmem_once = True
    interpreter._patch_lang = patch_lang


_patch_triton_language_once()


def _cache_interpreter_numpy_dtypes() -> None:
    """Let Triton's interpreter look up the numpy dtype of a Triton dtype in a dict kept across calls.

    Its ``_get_np_dtype`` builds a dict of 19 Triton dtypes (each hashed by a Python ``__hash__``) at every call, and
    it is called for every load, store, cast and constant of every program: 362,000 calls, ~10 of the 125 s of
    ``test_factored_batched.py`` under cProfile. The answer depends only on the dtype (its ``name`` holds the element
    type, the block shape and pointer-ness; equal names, equal answers), so each dtype's answer is kept after its
    first call; the kernels compute what they did. A Triton without ``_get_np_dtype`` is left as it is."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_get_np_dtype", None)
    if original is None or getattr(original, "_lowmem_cached", False):
        return
    known: dict = {}

    def np_dtype(tt_dtype):
        try:
            return known[tt_dtype]
        except KeyError:
            known[tt_dtype] = found = original(tt_dtype)
            return found
        except TypeError:  # not hashable: not a Triton dtype
            return original(tt_dtype)

    np_dtype._lowmem_cached = True
    interpreter._get_np_dtype = np_dtype


_cache_interpreter_numpy_dtypes()


def pytest_collection_finish(session):
    """Leave what collection made (the modules of torch, transformers, peft, Lightning, the test modules) out of the
    garbage collector's full passes until the session ends (``gc.freeze``; ``gc.unfreeze`` in
    :func:`pytest_unconfigure`): every full collection walked all of it, ~680,000 objects, ~0.3 s a pass (the
    ``gc.collect()`` of ``benchmarks/lora_activations.profiled_peak``: 35 passes, 11.7 of test_estimate.py's 51 s; the
    interpreter's own full passes as well). Objects made by the tests are collected as before; those made before
    are alive for the whole session anyway (modules, classes, functions, module-level values)."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_unconfigure(config):
    """Give the objects :func:`pytest_collection_finish` froze back to the collector before the interpreter exits
    (else nanobind reports Triton's bound objects as leaked)."""
    import gc

    gc.unfreeze()


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


@pytest.fixture(scope="module")
def dense_llama():
    """A tiny full-precision Llama (hidden 64, 2 layers, vocabulary 128, 32 positions) in eval mode, the model the
    peft-on-NF4 tests quantize copies of (so two bases hold identical codes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


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


@pytest.fixture
def no_pyarrow(monkeypatch):
    """Parquet as without ``pyarrow`` installed (it is the optional ``parquet`` extra, installed by ``dev``)."""
    from lowmem_lightning.data import formats

    monkeypatch.setattr(formats, "parquet_readable", lambda: False)


@pytest.fixture
def bitsandbytes_flag(monkeypatch):
    """``model.is_loaded_in_4bit`` reads as on a machine with bitsandbytes (true while a 4-bit layer remains),
    installed or not: what peft does with a 4-bit model, tested without the optional peer (the test must not call
    what imports it, transformers' ``num_parameters()``)."""
    import sys

    from lowmem_lightning.quant import convert

    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        monkeypatch.delitem(sys.modules, "bitsandbytes")
    monkeypatch.setattr(convert, "_bitsandbytes_installed", lambda: True)
