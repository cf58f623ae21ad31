"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import time


def interleaved_best(variants: dict, repeat: int) -> dict[str, float]:
    """Best time of each variant over ``repeat`` rounds, the variants taking turns in every round,
    so that a slow spell of the machine (page-cache writeback, other jobs) hits all of them alike.

    ``variants``: name -> (fn, setup or None); setup runs before its timed call, untimed."""
    times = {name: float("inf") for name in variants}
    for _ in range(repeat):
        for name, (fn, setup) in variants.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return times
