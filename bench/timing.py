"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time


def interleaved_best(variants: dict, repeat: int, cpu: dict | None = None) -> dict[str, float]:
    """Best time of each variant over ``repeat`` rounds, the variants taking turns in every round,
    so that a slow spell of the machine (page-cache writeback, other jobs) hits all of them alike.

    ``variants``: name -> (fn, setup or None); setup runs before its timed call, untimed.
    Returns wall-clock seconds. ``cpu``: if given, filled with each variant's best CPU seconds of
    this process (``time.process_time``: all its threads), which a machine shared with other
    jobs inflates less than wall time (it still pays for the caches they evict)."""
    times = {name: float("inf") for name in variants}
    for name in variants:
        if cpu is not None:
            cpu[name] = float("inf")
    for _ in range(repeat):
        for name, (fn, setup) in variants.items():
            if setup is not None:
                setup()
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            times[name] = min(times[name], t1 - t0)
            if cpu is not None:
                cpu[name] = min(cpu[name], time.process_time() - c0)
    return times
