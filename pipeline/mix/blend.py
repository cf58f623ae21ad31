"""The blend index (which source each global sample comes from) and per-source sample orders.

Blend: a greedy interleave in the manner of Megatron's BlendedDataset, step by step, each sample
going to a source that lags its share. Megatron picks the largest absolute lag,
``argmax_s w_s*n - c_s``; that rule can drift past one sample with several sources (weights
200,35,987,818,125,848 over 3013 reach 1.004). We use the deadline form of the same greedy
(Tijdeman's chairman-assignment rule): among the sources whose next sample is due, the one whose
lag would first reach one sample. It is proven to keep every prefix of every source within one
sample of its share (|c_s(n) - w_s n| < 1 for all n), and coincides with Megatron's order for
many simple weight sets.

Why this is fast without a compiled helper: the weights are turned into exact integers ``W_s`` over
a common denominator ``D`` (``w_s = W_s / D``) and the greedy runs in integer arithmetic, so there is
no floating-point drift. If after ``D`` steps every count equals ``W_s`` exactly, every error is back
at zero, i.e. the state is the initial one, and the whole sequence is that first period repeated.
We check that condition (it is not assumed), run the Python loop only over one period (``D`` ≤
2**20 steps; ``D`` = 10 for the paper's 0.2/0.1/0.1/0.6), and tile it with numpy: tens of millions
of samples take well under a second. Sample ``i`` is then computable in O(1) from the period alone,
which is how the loader extends the index past ``num_samples``.

Per-source order: source-local sample stream position ``p`` belongs to pass (epoch) ``p // n`` and
maps to unit ``perm_e(p % n)``, where ``perm_e`` is a seeded permutation of ``[0, n)`` drawn afresh
for each pass. A small source is thereby repeated as often as needed, each pass in a new order. The
permutation is a keyed (unbalanced) Feistel network with cycle walking: a bijection on ``[0, n)`` evaluated
element-wise and vectorised, so no table of ``n`` entries per pass is ever stored (HowTo100M-sized
sources have ~10^8 units) and every worker computes the same order from (seed, source, pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

MAX_PERIOD = 1 << 20
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def exact_weights(ratios: list[str | float | int]) -> tuple[list[int], int]:
    """Integers ``W`` and denominator ``D`` with ``W_s / D`` = the normalised ratios.

    Decimal strings are taken exactly (``"0.1"`` is 1/10). When the exact common denominator would
    exceed :data:`MAX_PERIOD`, the shares are rounded to multiples of 1/2**20 by largest remainder
    (an error below 1e-6 per share); the manifest records the realised shares either way.
    """
    if not ratios:
        raise ValueError("ratios is empty: give at least one source, e.g. --ratios imagenet=1")
    fr = []
    for r in ratios:
        try:
            f = Fraction(str(r)) if not isinstance(r, Fraction) else r
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"ratio {r!r} is not a number; use e.g. 0.2 or 1/5") from None
        if f <= 0:
            raise ValueError(f"ratio {r!r} must be > 0; drop the source instead of giving it weight 0")
        fr.append(f)
    total = sum(fr)
    shares = [f / total for f in fr]
    den = 1
    for s in shares:
        den = den * s.denominator // math.gcd(den, s.denominator)
    if den <= MAX_PERIOD:
        w = [int(s * den) for s in shares]
    else:
        den = MAX_PERIOD
        raw = [s * den for s in shares]
        w = [max(1, int(x)) for x in raw]
        rem = sorted(range(len(raw)), key=lambda i: -(raw[i] - int(raw[i])))
        k = 0
        while sum(w) < den:
            w[rem[k % len(rem)]] += 1
            k += 1
        while sum(w) > den:
            j = max(range(len(w)), key=lambda i: w[i])
            w[j] -= 1
    g = 0
    for x in w:
        g = math.gcd(g, x)
    g = math.gcd(g, den)
    return [x // g for x in w], den // g


def _next_source(weights: list[int], period: int, counts: list[int], n: int) -> int:
    """The source of step ``n`` (1-based): earliest deadline among the sources that are due.

    Source ``s``'s k-th sample must land at a step ``n`` with ``(k-1)/w_s < n < k/w_s`` for the prefix
    error to stay below one sample; with ``w_s = W_s / D`` in integers the release test is
    ``c_s * D < n * W_s`` and the deadline order is ``(c_s + 1) / W_s`` (ties to the lower index).
    """
    best = -1
    for s in range(len(weights)):
        if counts[s] * period < n * weights[s] and (
            best < 0 or (counts[s] + 1) * weights[best] < (counts[best] + 1) * weights[s]
        ):
            best = s
    assert best >= 0, "some source is always due: sum(c)*D = (n-1)*D < n*D = sum(n*W)"
    return best


def greedy_period(weights: list[int], period: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One period of the interleave: (source per step, source-local index per step).

    Returns None when the counts after ``period`` steps differ from ``weights`` (the sequence is
    then not periodic with this period and must be built step by step).
    """
    counts = [0] * len(weights)
    src = np.empty(period, dtype=np.int64)
    local = np.empty(period, dtype=np.int64)
    for i in range(period):
        best = _next_source(weights, period, counts, i + 1)
        src[i] = best
        local[i] = counts[best]
        counts[best] += 1
    if counts != list(weights):
        return None
    return src, local


def _greedy_direct(weights: list[int], period: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The interleave for ``n`` steps without the periodicity shortcut (exact, slow; a safety net)."""
    counts = [0] * len(weights)
    src = np.empty(n, dtype=np.int64)
    local = np.empty(n, dtype=np.int64)
    for i in range(n):
        best = _next_source(weights, period, counts, i + 1)
        src[i] = best
        local[i] = counts[best]
        counts[best] += 1
    return src, local


class Blend:
    """The interleave for integer weights ``W`` over denominator ``D``.

    >>> b = Blend([5, 3, 2], 10)
    >>> b.source_and_local(np.arange(10))[0].tolist()
    [0, 1, 0, 2, 0, 1, 0, 1, 0, 2]
    """

    def __init__(self, weights: list[int], period: int):
        if sum(weights) != period or any(w <= 0 for w in weights):
            raise ValueError(f"weights {weights} must be positive integers summing to the period {period}")
        self.weights = [int(w) for w in weights]
        self.period = int(period)
        got = greedy_period(self.weights, self.period)
        if got is None:
            # Not observed for any weights we tried; kept so that correctness never rests on a proof.
            self._src, self._local = None, None
        else:
            self._src, self._local = got

    @property
    def periodic(self) -> bool:
        return self._src is not None

    def source_and_local(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global sample ids ``idx`` (int64 [N]): (source index [N], source-local index [N])."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and idx.min() < 0:
            raise ValueError("sample ids must be ≥ 0")
        if self._src is None:
            top = int(idx.max()) + 1 if idx.size else 0
            src, local = _greedy_direct(self.weights, self.period, top)
            return src[idx], local[idx]
        block, r = np.divmod(idx, self.period)
        src = self._src[r]
        w = np.asarray(self.weights, dtype=np.int64)
        return src, block * w[src] + self._local[r]

    def build(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` entries as (source uint8/int16 [n], local int64 [n]) by tiling one period."""
        dt = np.uint8 if len(self.weights) <= 255 else np.int16
        if self._src is None:
            src, local = _greedy_direct(self.weights, self.period, n)
            return src.astype(dt), local
        reps = -(-n // self.period)
        src = np.tile(self._src.astype(dt), reps)[:n]
        w = np.asarray(self.weights, dtype=np.int64)
        # local[b*D + r] = b * W[src[r]] + local_in_period[r]: one broadcast over a (reps, D) grid.
        local = np.empty((reps, self.period), dtype=np.int64)
        np.multiply(np.arange(reps, dtype=np.int64)[:, None], w[self._src][None, :], out=local)
        local += self._local[None, :]
        return src, local.reshape(-1)[:n]

    def counts(self, n: int) -> np.ndarray:
        """How many of the first ``n`` samples each source gets (int64 [K])."""
        w = np.asarray(self.weights, dtype=np.int64)
        if self._src is None:
            src, _ = _greedy_direct(self.weights, self.period, n)
            return np.bincount(src, minlength=len(w)).astype(np.int64)
        block, r = divmod(int(n), self.period)
        return block * w + np.bincount(self._src[:r], minlength=len(w)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Seeded permutations (keyed Feistel network with cycle walking)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of ``[0, n)``, evaluated element-wise: ``perm(np.arange(n))`` is a shuffle.

    Keys come from ``np.random.SeedSequence(key)``, so ``key`` is any tuple of non-negative ints,
    e.g. (seed, source, split, pass). The network works on ``bits = ceil(log2 n)`` bits (an
    unbalanced Feistel: each round moves the low ``s`` bits to the top and xors a keyed hash of them
    into the rest, a bijection of ``[0, 2^bits)``), so the domain is < 2n and cycle walking needs
    fewer than two rounds per element on average.
    """

    ROUNDS = 8

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError(f"cannot permute an empty range (n={n})")
        self.n = int(n)
        self.bits = max(2, (self.n - 1).bit_length())
        self.low = self.bits // 2  # s: bits moved to the top each round
        self.high = self.bits - self.low
        self.keys = np.random.SeedSequence(list(key)).generate_state(self.ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        s, hb = np.uint64(self.low), np.uint64(self.high)
        lmask = np.uint64((1 << self.low) - 1)
        hmask = np.uint64((1 << self.high) - 1)
        for k in self.keys:
            lo = x & lmask
            hi = x >> s
            # (hi, lo) -> (lo, hi ^ F_k(lo)): invertible given lo, so each round is a bijection.
            x = (lo << hb) | (hi ^ (_mix64(lo ^ k) & hmask))
        return x

    def __call__(self, pos: np.ndarray) -> np.ndarray:
        """Permuted positions (int64, same shape as ``pos``); every ``pos`` must be in [0, n)."""
        pos = np.asarray(pos, dtype=np.int64)
        if self.n == 1:
            return np.zeros_like(pos)
        with np.errstate(over="ignore"):
            x = self._encrypt(pos.astype(np.uint64))
            # Cycle walking: the network permutes [0, 2^bits) ⊇ [0, n); re-encrypting values that land
            # outside [0, n) until they fall inside keeps it a bijection of [0, n).
            out = np.flatnonzero(x >= np.uint64(self.n))
            while out.size:
                x[out] = self._encrypt(x[out])
                out = out[x[out] >= np.uint64(self.n)]
        return x.astype(np.int64)


class PassCache:
    """Tables computed once per pass over a source (``build(epoch)``), the most recent kept while
    they fit in ``cache_bytes`` (at least ``keep`` of them, at most :attr:`MAX_PASSES`): a source
    smaller than its share of one batch spans many passes in every batch, and rebuilding them each
    time would cost more than the read."""

    MAX_PASSES = 4096

    def __init__(self, build: Callable[[int], Any], keep: int = 2, cache_bytes: int = 64 << 20):
        self._build, self._keep, self._cache_bytes = build, keep, cache_bytes
        self._items: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_items"] = {}  # rebuilt on demand in each worker
        return d

    def epochs(self) -> list[int]:
        """The passes held, oldest first."""
        return list(self._items)

    def get(self, epoch: int) -> Any:
        got = self._items.get(epoch)
        if got is None:
            got = self._build(epoch)
            each = got.nbytes if isinstance(got, np.ndarray) else 0
            keep = max(self._keep, min(self.MAX_PASSES, self._cache_bytes // max(each, 1)))
            while len(self._items) >= keep:
                self._items.pop(next(iter(self._items)))  # the oldest pass
            self._items[epoch] = got
        return got


class SourceOrder:
    """Source-local stream position → unit id, repeating the source with a new order each pass.

    Passes of up to ``table_max`` units are materialised once per pass (one vectorised evaluation of
    the permutation, int32/int64 table) so a lookup is a single index; bigger sources are permuted
    element-wise and never held in memory. Recent passes are kept in a :class:`PassCache`.
    """

    def __init__(self, n_units: int, key: tuple[int, ...], cache: int = 2, table_max: int = 1 << 24,
                 cache_bytes: int = 64 << 20):
        if n_units < 1:
            raise ValueError("a source with no usable units cannot be sampled")
        self.n = int(n_units)
        self.key = tuple(int(k) for k in key)
        self.table_max = table_max
        self._perms = PassCache(self._build, keep=cache, cache_bytes=cache_bytes)

    def _build(self, epoch: int) -> Permutation | np.ndarray:
        perm = Permutation(self.n, (*self.key, epoch))
        if self.n <= self.table_max:
            dt = np.int32 if self.n < (1 << 31) else np.int64
            return perm(np.arange(self.n, dtype=np.int64)).astype(dt)
        return perm

    def _perm(self, epoch: int) -> Permutation | np.ndarray:
        return self._perms.get(epoch)

    def units(self, pos: np.ndarray) -> np.ndarray:
        """Unit ids (int64) for stream positions ``pos`` (int64, any shape, ≥ 0)."""
        uid, _ = self.units_and_pass(pos)
        return uid.astype(np.int64, copy=False)

    def units_and_pass(self, pos: np.ndarray) -> tuple[np.ndarray, int | np.ndarray]:
        """(unit ids, pass) for stream positions ``pos`` (int64, any shape, ≥ 0). The pass is an int
        when every position lies in one pass (the usual case for a batch: then the ids may be the
        pass table's int32), else int64 per position."""
        pos = np.asarray(pos, dtype=np.int64)
        if pos.size:
            e0, e1 = int(pos.min()) // self.n, int(pos.max()) // self.n
            if e0 == e1:
                p = self._perm(e0)
                r = pos - e0 * self.n if e0 else pos
                return (p[r] if isinstance(p, np.ndarray) else p(r)), e0
        epoch, r = np.divmod(pos, self.n)
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            m = epoch == e
            p = self._perm(int(e))
            out[m] = p[r[m]] if isinstance(p, np.ndarray) else p(r[m])
        return out, epoch
