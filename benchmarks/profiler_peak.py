"""The peak of allocated bytes in a torch profiler run (CPU memory events), for the memory benchmarks."""

from __future__ import annotations

__all__ = ["peak_bytes"]


def peak_bytes(prof) -> int:
    """Most bytes allocated at once during the profiled region, above what was allocated when it started: the
    running sum of the ``[memory]`` events of ``prof`` (a finished ``torch.profiler.profile(profile_memory=True)``),
    in time order."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
