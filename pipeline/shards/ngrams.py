"""n-gram statistics of a token dataset (the paper's Figure 3 and its appendix n-gram figures).

Within each frame, tokens are read in raster order and every 1-, 2- and 3-gram of consecutive
tokens is counted (n-grams never cross frames: the next frame starts a new raster scan). Shards are
streamed row group by row group, so memory is bounded by the count tables whatever the dataset size:

- exact counts when the codebook allows (V^n <= the table size): one counter per possible n-gram;
- otherwise hashed counts: an n-gram's id (its codes in base V) is mixed by a multiplicative hash
  into one of `buckets` counters (default 2^22). Colliding n-grams share a counter, so the top of
  the rank-frequency curve is exact while the tail merges; the number of distinct n-grams is the
  linear-counting estimate -M·ln(1 - occupied/M) (Whang et al. 1990), and `exact` is false.

Per n the summary gives: total n-grams, distinct (estimated when hashed), possible (V^n), coverage
(distinct / possible, the fraction of possible n-grams seen), the number of most frequent n-grams
that cover 90% of occurrences, the entropy in bits, and the rank-frequency curve at log-spaced ranks.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline import storage
from pipeline.shards import store

__all__ = ["NGRAM_ORDERS", "DEFAULT_BUCKETS", "NgramCounter", "count_dataset", "ngram_doc", "dataset_ngrams",
           "plot_ngrams"]

NGRAM_ORDERS = (1, 2, 3)
DEFAULT_BUCKETS = 1 << 22  # 32 MiB of int64 counters per hashed order
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: odd, spreads consecutive ids


class NgramCounter:
    """Counts of 1/2/3-grams of frames of codes in [0, V); `add(frames)` with frames (F, HW)."""

    def __init__(self, codebook_size: int, buckets: int = DEFAULT_BUCKETS) -> None:
        if codebook_size < 1 or codebook_size > (1 << 21):
            raise ValueError(f"codebook_size={codebook_size}: 3-gram ids need V^3 < 2^64; use 1 <= V <= 2^21")
        if buckets < 2 or buckets & (buckets - 1):
            raise ValueError(f"buckets={buckets}: use a power of two >= 2 (e.g. {DEFAULT_BUCKETS})")
        self.v = codebook_size
        self.buckets = buckets
        self.exact = {n: codebook_size**n <= buckets for n in NGRAM_ORDERS}
        self.counts = {n: np.zeros(codebook_size**n if self.exact[n] else buckets, dtype=np.int64)
                       for n in NGRAM_ORDERS}
        self._shift = np.uint64(64 - int(math.log2(buckets)))

    def add(self, frames: np.ndarray) -> None:
        """frames (F, HW) integer codes, raster order inside each frame."""
        a = frames.astype(np.uint64)
        if a.size and int(a.max()) >= self.v:
            raise ValueError(f"code {int(a.max())} is outside the codebook of {self.v}; pass the dataset's codebook size")
        v = np.uint64(self.v)
        for n in NGRAM_ORDERS:
            if a.shape[1] < n:
                continue
            ids = a[:, : a.shape[1] - n + 1].copy()  # (F, HW-n+1): the n-gram's codes in base V
            for k in range(1, n):
                ids = ids * v + a[:, k : a.shape[1] - n + 1 + k]
            ids = ids.reshape(-1)
            if not self.exact[n]:
                ids = (ids * _GOLDEN) >> self._shift  # wraps mod 2^64 by design
            self.counts[n] += np.bincount(ids.astype(np.int64), minlength=len(self.counts[n]))

    def summary(self, curve_points: int = 200) -> dict:
        out = {}
        for n in NGRAM_ORDERS:
            c = self.counts[n]
            total = int(c.sum())
            occupied = int((c > 0).sum())
            if self.exact[n]:
                distinct = float(occupied)
            elif occupied >= len(c):
                distinct = float("inf")
            else:
                distinct = -len(c) * math.log(1.0 - occupied / len(c))
            freq = np.sort(c[c > 0])[::-1]
            cum = np.cumsum(freq) / max(total, 1)
            p = freq / max(total, 1)
            ranks = np.unique(np.geomspace(1, max(len(freq), 1), curve_points).round().astype(np.int64))
            ranks = ranks[ranks <= len(freq)]
            possible = float(self.v) ** n
            out[str(n)] = {
                "n": n,
                "total": total,
                "distinct": distinct if math.isfinite(distinct) else None,
                "possible": possible,
                "coverage": min(1.0, distinct / possible) if math.isfinite(distinct) else None,
                "ngrams_for_90pct": int(np.searchsorted(cum, 0.9) + 1) if total else 0,
                "entropy_bits": float(-(p * np.log2(p)).sum()) if total else 0.0,
                "exact": bool(self.exact[n]),
                "table_size": int(len(c)),
                "rank": ranks.tolist(),
                "frequency": (freq[ranks - 1] / total).tolist() if total else [],
            }
        return out


def count_dataset(target: str, storage_options: dict | None = None, *, buckets: int = DEFAULT_BUCKETS,
                  sidecars: list[dict] | None = None) -> tuple[NgramCounter, list[dict]]:
    """The n-gram counts of a token dataset directory (every committed shard, or these sidecars), streamed
    row group by row group; returns (counter, sidecars)."""
    sides = sidecars if sidecars is not None else store.committed_shards(target, storage_options)
    if not sides:
        raise ValueError(f"{target}: no committed shards found")
    cb = int(sides[0]["codebook_size"])
    grids = {tuple(s["grid"]) for s in sides}
    if len(grids) != 1:
        raise ValueError(f"{target}: shards have different grids {sorted(grids)}; inspect one grid at a time")
    hw = int(np.prod(next(iter(grids))))
    counter = NgramCounter(cb, buckets)
    for s in sides:
        with store.ShardReader(storage.join(target, s["data_file"]), s, storage_options) as r:
            for _, values in r.iter_token_batches():
                counter.add(np.asarray(values).reshape(-1, hw))  # rows hold whole frames: (F, HW)
    return counter, sides


def ngram_doc(target: str, counter: NgramCounter, sides: list[dict]) -> dict:
    """The `ngram_stats` entry of one dataset from its counts."""
    return {"target": target, "tokenizer": sides[0]["tokenizer"]["id"], "codebook_size": counter.v,
            "grid": list(sides[0]["grid"]), "ngrams": counter.summary()}


def dataset_ngrams(target: str, storage_options: dict | None = None, *, buckets: int = DEFAULT_BUCKETS,
                   sidecars: list[dict] | None = None) -> dict:
    """n-gram summary of a token dataset directory (every committed shard), streamed row group by row group."""
    counter, sides = count_dataset(target, storage_options, buckets=buckets, sidecars=sidecars)
    return ngram_doc(target, counter, sides)


def plot_ngrams(datasets: list[dict], path: str) -> str:
    """Rank-frequency of 1-, 2- and 3-grams (log-log), one line per dataset, coverage in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NGRAM_ORDERS), figsize=(4.2 * len(NGRAM_ORDERS), 3.6))
    for ax, n in zip(axes, NGRAM_ORDERS, strict=True):
        for i, d in enumerate(datasets):
            g = d["ngrams"][str(n)]
            if not g["rank"]:
                continue
            cov = "n/a" if g["coverage"] is None else f"{100 * g['coverage']:.3g}%"
            label = f"{d.get('label') or d['tokenizer']} (cov. {cov}, 90%: {g['ngrams_for_90pct']:,})"
            ax.plot(g["rank"], g["frequency"], "-", color=f"C{i % 10}", lw=1.2, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{n}-gram rank")
        ax.set_ylabel("frequency")
        ax.set_title(f"{n}-grams")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
