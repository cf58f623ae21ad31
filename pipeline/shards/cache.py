"""One byte-budgeted LRU cache per process for what readers fetched from object stores.

Readers of remote shards (the training loader's frame ranges, the decoded record batches of
remote Arrow shards) keep what they fetched here instead of in per-file caches, so the memory a
process spends on remote data is bounded by one budget however many shards it touches: the least
recently used entries are dropped first. Entries are immutable (bytes, read-only arrays, tuples
of them) and keyed by tuples that start with the file's URL.

A DataLoader worker started by fork inherits its parent's entries (valid data, shared copy on
write) and then evicts on its own: the budget holds per process.
"""

from __future__ import annotations

import collections
import os
from typing import Any

DEFAULT_BUDGET = 256 << 20


class ByteLRU:
    """Least-recently-used mapping that holds at most ``budget`` bytes of values.

    Sizes are given by the caller on :meth:`put` (``nbytes`` of what the value holds). A value
    larger than the whole budget is not kept. Not thread-safe: the loader calls it from the one
    thread that assembles batches.
    """

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self._d: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0
        self.budget = 0
        self.resize(budget)

    def resize(self, budget: int) -> None:
        if not isinstance(budget, int) or budget < 0:
            raise ValueError(f"cache budget {budget!r}: give a number of bytes ≥ 0 (0 keeps nothing)")
        self.budget = budget
        self._evict()

    def get(self, key: tuple) -> Any | None:
        got = self._d.get(key)
        if got is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return got[0]

    def put(self, key: tuple, value: Any, nbytes: int) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        if nbytes > self.budget:
            return
        self._d[key] = (value, nbytes)
        self.nbytes += nbytes
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.budget and self._d:
            _, (_, n) = self._d.popitem(last=False)
            self.nbytes -= n

    def clear(self) -> None:
        self._d.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._d)


_CACHE: ByteLRU | None = None
_PID = 0


def process_cache(budget: int | None = None) -> ByteLRU:
    """This process's cache; ``budget`` (bytes), when given, becomes its budget from now on."""
    global _CACHE, _PID
    if _CACHE is None or _PID != os.getpid():
        # (A forked child keeps the inherited entries but counts its own hits and misses.)
        if _CACHE is None:
            _CACHE = ByteLRU(DEFAULT_BUDGET if budget is None else budget)
        _CACHE.hits = _CACHE.misses = 0
        _PID = os.getpid()
    if budget is not None and budget != _CACHE.budget:
        _CACHE.resize(budget)
    return _CACHE
