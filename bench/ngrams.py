"""n-gram counting (`toto-pipeline inspect --plot`): memory flat in the dataset size, throughput
against the same run's plain unigram histogram (`numpy.bincount`, what `inspect` already does).

Datasets of N and 10·N frames of 256 Zipf-distributed tokens (8192 codes: 1-grams exact, 2- and
3-grams hashed) are written as token shards and counted with `dataset_ngrams`; peak traced Python
memory (tracemalloc: numpy's buffers included) of each count is printed with the ratio 10N / N.
Bound by construction: the count tables (2 × 2^22 int64 = 64 MiB by default) plus the summary's
sorted copies of the occupied counters (at most a few table sizes), whatever N; the ratio tends
to 1 once the hashed tables are saturated, and below that it grows with the distinct n-grams.

    python bench/ngrams.py [--frames 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import tracemalloc

import numpy as np

from pipeline.shards import ShardWriter, write_manifest
from pipeline.shards.ngrams import dataset_ngrams

TOK = {"id": "bench", "sha256": "0" * 64, "vocab_size": 8192, "downsample": 8}


def _write(out: str, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, 8193) ** 1.1
    p /= p.sum()
    per_shard = 1000
    for sid in range(max(1, frames // per_shard)):
        w = ShardWriter(out, sid, codebook_size=8192, tokenizer=TOK, resolution=128)
        for i in range(per_shard // 10):  # videos of 10 frames
            vid = f"v{sid}_{i}"
            w.add({"key": f"b/{vid}/00000", "dataset": "b", "split": "train", "video_id": vid, "chunk": 0,
                   "t_start": 0.0, "fps": 30.0, "num_frames": 10, "grid_h": 16, "grid_w": 16, "label": None,
                   "tokens": rng.choice(8192, size=(10, 16, 16), p=p).astype(np.uint16)})
        w.commit(input_shard={"id": sid, "worklist_sha256": "x", "num_items": per_shard // 10}, errors=[])
    write_manifest(out)


def _measure(out: str) -> tuple[float, float, float]:
    """(peak MiB, seconds of the n-gram count, seconds of a unigram bincount over the same shards)."""
    from pipeline.shards import committed_shards, token_histogram

    tracemalloc.start()
    t0 = time.perf_counter()
    dataset_ngrams(out)
    t_ngram = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    t0 = time.perf_counter()
    token_histogram(out, 8192, sidecars=committed_shards(out))
    return peak, t_ngram, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-ngrams-")
    try:
        rows = []
        for n in (args.frames, 10 * args.frames):
            d = os.path.join(tmp, f"n{n}")
            _write(d, n, seed=n)
            rows.append((n, *_measure(d)))
        for n, peak, tn, tu in rows:
            print(f"{n:>7} frames: peak {peak:7.1f} MiB   n-grams {n * 256 / tn / 1e6:6.2f} M tok/s   "
                  f"unigram bincount {n * 256 / tu / 1e6:6.2f} M tok/s   ratio {tu / tn:.3f}")
        print(f"peak memory 10N / N: {rows[1][1] / rows[0][1]:.3f} (target <= 1.2)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
