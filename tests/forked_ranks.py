"""Run a function on forked gloo ranks of one machine (CPU), for the sharded / FSDP tests.

Each rank is a forked process with one thread that joins a gloo group through a file store in ``tmp``, calls
``fn(rank, *args)``, saves what it returned as ``result{rank}.pt`` and, on an exception, writes its traceback to
``error{rank}.txt`` and exits 1 (``timeout_s``: how long a collective waits for a peer, so that a rank that failed
frees the others).
"""

from __future__ import annotations

import datetime
import os
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_forked_ranks(tmp, world: int, fn, *args, timeout_s: float = 300) -> tuple[list, list[str]]:
    """``(what each rank returned, the tracebacks of the ranks that failed)``: the first rank to fail first (its
    peers fail after it with a connection error); no results when any rank failed."""
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(rank, world, str(tmp), timeout_s, fn, args))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s + 60)
    failed = [(tmp / f"error{r}.txt").read_text() for r in range(world) if (tmp / f"error{r}.txt").exists()]
    failed.sort(key=lambda text: "Connection" in text)
    if failed:
        return [], failed
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return [torch.load(tmp / f"result{rank}.pt", weights_only=False) for rank in range(world)], []


def forked_ranks(tmp, world: int, fn, *args, timeout_s: float = 300) -> list:
    """What ``fn(rank, *args)`` returned on each of ``world`` forked gloo ranks; the first failure's traceback
    fails the test."""
    results, failed = run_forked_ranks(tmp, world, fn, *args, timeout_s=timeout_s)
    assert not failed, failed[0]
    return results


def _rank_main(rank: int, world: int, tmp: str, timeout_s: float, fn, args) -> None:
    try:
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
    os._exit(0)
