"""Run a function on forked gloo ranks of one machine (CPU), for the sharded / FSDP tests.

Each rank is a forked process with one thread that joins a gloo group through a file store in ``tmp``, calls
``fn(rank, *args)``, saves what it returned as ``result{rank}.pt`` and, on an exception, writes its traceback to
``error{rank}.txt`` and exits 1 (``timeout_s``: how long a collective waits for a peer, so that a rank that failed
frees the others). A rank's stderr (fd 2: Python's, and C++'s such as gloo's ``terminate called ...``) goes to
``stderr{rank}.txt`` with :mod:`faulthandler` on it, so a rank that dies from a signal (``Fatal Python error:
Aborted``) leaves its message and every thread's Python stack there, and a rank that hangs leaves its stacks before
it is killed; a failure's message quotes them, with the threads the parent had when it forked.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def grace_s(timeout_s: float) -> float:
    """Seconds a rank gets beyond ``timeout_s`` before it is taken as hung (its stacks dumped halfway, then it is
    killed): ``timeout_s`` itself, between 5 and 60."""
    return max(5.0, min(60.0, timeout_s))


_CONSEQUENCES = ("Connection", "Timed out")
"""Words of the errors a rank's peers fail with after it failed, hung or died (a closed connection, a timeout)."""

STDERR_TAIL = 6000
"""Characters of a failed rank's stderr quoted in a failure message."""


def run_forked_ranks(tmp, world: int, fn, *args, timeout_s: float = 300) -> tuple[list, list[str]]:
    """``(what each rank returned, the failures)``: no results when any rank failed. A failure is a rank's
    traceback (a Python exception), or for a rank that died from a signal, exited without a traceback or hung, a
    message naming it with the tail of its stderr. The first rank to fail comes first: signal deaths, then
    tracebacks other than a connection error or a timeout, then hung ranks, then those errors (what the peers of
    a rank that failed, died or hung fail with)."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("store", *(f"{kind}{rank}.{ext}" for rank in range(world)
                           for kind, ext in (("result", "pt"), ("error", "txt"), ("stderr", "txt")))):
        (tmp / name).unlink(missing_ok=True)  # an earlier run's in the same folder: its ranks exit without cleanup
    threads = _thread_names()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(rank, world, str(tmp), timeout_s, fn, args))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    hung = _join(procs, time.monotonic() + timeout_s + grace_s(timeout_s))
    failed = [_failure(tmp, rank, proc, rank in hung, timeout_s) for rank, proc in enumerate(procs)]
    failed = [f for f in sorted(failed, key=lambda f: f[0] if f else 9) if f is not None]
    if failed:
        note = "" if len(threads) <= 1 else f"\n(the parent forked these ranks with {len(threads)} threads: {threads})"
        return [], [text + note for _, text in failed]
    return [torch.load(tmp / f"result{rank}.pt", weights_only=False) for rank in range(world)], []


def forked_ranks(tmp, world: int, fn, *args, timeout_s: float = 300) -> list:
    """What ``fn(rank, *args)`` returned on each of ``world`` forked gloo ranks; the first failure (a traceback, or
    a rank's signal / exit code / hang with its stderr) fails the test."""
    results, failed = run_forked_ranks(tmp, world, fn, *args, timeout_s=timeout_s)
    assert not failed, failed[0]
    return results


def _join(procs: list, deadline: float) -> set[int]:
    """Wait for every rank until ``deadline`` (``time.monotonic()``); kill those still running (after their
    faulthandler dumped their stacks) and return their ranks."""
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = {rank for rank, proc in enumerate(procs) if proc.is_alive()}
    for rank in hung:
        procs[rank].kill()
        procs[rank].join(10)
    return hung


def _failure(tmp: Path, rank: int, proc, hung: bool, timeout_s: float) -> tuple[int, str] | None:
    """``(order, message)`` for a rank that failed, None for one that succeeded (exit code 0 and a result)."""
    error = tmp / f"error{rank}.txt"
    if error.exists() and not hung and (proc.exitcode or 0) >= 0:
        text = error.read_text()
        return (3 if any(word in text for word in _CONSEQUENCES) else 1), text
    code = proc.exitcode
    if hung:
        why, order = f"had not finished {timeout_s + grace_s(timeout_s):.0f} s after it started: killed", 2
    elif code is not None and code < 0:
        why, order = f"died from {signal.Signals(-code).name} (exit code {code}) without a Python exception", 0
    elif code != 0:
        why, order = f"exited with code {code} without a traceback", 0
    elif not (tmp / f"result{rank}.pt").exists():
        why, order = "exited with code 0 without saving its result", 0
    else:
        return None
    return order, f"forked rank {rank} {why}; its stderr ({tmp / f'stderr{rank}.txt'}):\n{_tail(tmp, rank)}"


def _tail(tmp: Path, rank: int) -> str:
    """The rank's stderr, at most :data:`STDERR_TAIL` characters: its head (faulthandler's "Fatal Python error"
    line and the innermost frames come first) and its end (the last messages before the process died)."""
    path = tmp / f"stderr{rank}.txt"
    text = path.read_text(errors="replace") if path.exists() else "(none written)"
    if len(text) <= STDERR_TAIL:
        return text
    head = STDERR_TAIL * 2 // 3
    return text[:head] + "\n...\n" + text[-(STDERR_TAIL - head):]


def _thread_names() -> list[str]:
    """The OS threads of this process (their names), which a fork does not copy into the child."""
    try:
        tasks = sorted(os.listdir("/proc/self/task"))
        return [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in tasks]
    except OSError:  # no procfs: a count of the Python-visible threads only
        import threading

        return [t.name for t in threading.enumerate()]


def _rank_main(rank: int, world: int, tmp: str, timeout_s: float, fn, args) -> None:
    try:
        _own_stderr(os.path.join(tmp, f"stderr{rank}.txt"), timeout_s)
        warnings.simplefilter("ignore")  # FSDP1's deprecation notices
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, *args)
        torch.save(result, os.path.join(tmp, f"result{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(tmp, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


def _own_stderr(path: str, timeout_s: float) -> None:
    """This rank's fd 2 and ``sys.stderr`` into ``path``, :mod:`faulthandler` writing there (every thread's stack
    on a fatal signal, and once more just before the parent would kill this rank as hung)."""
    log = open(path, "w", buffering=1)  # noqa: SIM115 - open until os._exit
    sys.stderr.flush()
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    faulthandler.disable()  # enable() alone keeps the handlers it believes installed: something in the parent (a
    faulthandler.enable(file=log, all_threads=True)  # Lightning DDP fit) may have reset SIGABRT's since
    faulthandler.dump_traceback_later(timeout_s + grace_s(timeout_s) / 2, file=log)
