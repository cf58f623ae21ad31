"""Token shard write/read throughput against raw numpy I/O of the same uint16 tokens, same run.

Baselines: ``numpy.ndarray.tofile`` (write) and a ``numpy.memmap`` read copied into memory (read).
Targets (issue 2): whole-shard Arrow read ≥ 0.5× the raw memmap read; write ≥ 0.5× the raw write.
Also bytes per token on disk for each format/compression, against 2.0 (raw uint16) and the
tokens' empirical unigram entropy (the floor for any order-0 code).

    python bench/shards.py [--tokens 33554432] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
from timing import interleaved_best  # bench/timing.py (this script's folder is on sys.path)

from pipeline.shards import ShardWriter, open_shard, unigram_stats

TOK = {"id": "bench", "sha256": "0" * 64, "vocab_size": 8192, "downsample": 8}


def zipf_tokens(n: int, codebook: int, seed: int) -> np.ndarray:
    # Visual tokens are far from uniform (the paper's Figure 3); a Zipf-like law is a fair stand-in.
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, codebook + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    return rng.choice(codebook, size=n, p=p).astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    frame = 16 * 16
    frames_per_row = 64
    rows_n = args.tokens // (frame * frames_per_row)
    n = rows_n * frame * frames_per_row
    toks = zipf_tokens(n, 8192, 0)
    rows = [
        dict(key=f"bench/v{i:06d}/00000", dataset="bench", split="train", video_id=f"v{i:06d}", chunk=0,
             t_start=0.0, fps=30.0, num_frames=frames_per_row, grid_h=16, grid_w=16, label=None,
             tokens=toks[i * frame * frames_per_row : (i + 1) * frame * frames_per_row])
        for i in range(rows_n)
    ]
    d = tempfile.mkdtemp(prefix="toto-bench-")
    formats = {"arrow": ("arrow", None), "arrow+zstd": ("arrow", "zstd"), "webdataset": ("webdataset", None)}
    dest = np.empty_like(toks)
    try:
        raw = os.path.join(d, "raw.u16")

        def fresh(path):  # every writer creates a fresh file; deleting the last one is setup
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
            os.sync()

        def write_shard(sub, fmt, comp):
            w = ShardWriter(sub, 0, codebook_size=8192, tokenizer=TOK, resolution=128, format=fmt, compression=comp)
            for r in rows:
                w.add(r)
            w.commit(input_shard={"id": 0, "worklist_sha256": "x", "num_items": rows_n})
            os.sync()

        writes = {"raw": (lambda: (toks.tofile(raw), os.sync()), lambda: fresh(raw))}
        paths = {}
        for name, (fmt, comp) in formats.items():
            sub = os.path.join(d, name)
            paths[name] = os.path.join(sub, "shard-000000." + ("arrow" if fmt == "arrow" else "tar"))
            writes[name] = (lambda sub=sub, fmt=fmt, comp=comp: write_shard(sub, fmt, comp), lambda sub=sub: fresh(sub))
        tw = interleaved_best(writes, args.repeat)

        def read_raw():
            mm = np.memmap(raw, dtype=np.uint16, mode="r")
            np.copyto(dest, mm)

        def read(path):  # whole shard, sequentially, as a loader streaming shards does
            with open_shard(path) as r:
                pos = 0
                for _, values in r.iter_token_batches():
                    dest[pos : pos + values.size] = values
                    pos += values.size
            assert pos == n

        def read_rows(path):  # random access path: one row at a time
            with open_shard(path) as r:
                pos = 0
                for i in range(len(r)):
                    t = r.tokens(i).reshape(-1)
                    dest[pos : pos + t.size] = t
                    pos += t.size
            assert pos == n

        reads = {"raw": (read_raw, None)}
        for name, path in paths.items():
            reads[name] = (lambda path=path: read(path), None)
            reads[name + " by row"] = (lambda path=path: read_rows(path), None)
        tr = interleaved_best(reads, args.repeat)
        for path in paths.values():
            read(path)
            np.testing.assert_array_equal(dest, toks)
        print(f"tokens: {n:,} in {rows_n} rows of {frames_per_row}×16×16; raw write {n / tw['raw'] / 1e9:.2f} G tok/s, "
              f"raw memmap read {n / tr['raw'] / 1e9:.2f} G tok/s")
        ent = unigram_stats(np.bincount(toks, minlength=8192))["entropy_bits"]
        out = {}
        for name, path in paths.items():
            size = os.path.getsize(path)
            w_ratio, r_ratio, rr_ratio = tw["raw"] / tw[name], tr["raw"] / tr[name], tr["raw"] / tr[name + " by row"]
            out[name] = (w_ratio, r_ratio)
            print(f"{name:16s} write {n / tw[name] / 1e6:8.1f} M tok/s ({w_ratio:.2f}× raw)  "
                  f"read {n / tr[name] / 1e6:8.1f} M tok/s ({r_ratio:.2f}× memmap; by row {rr_ratio:.2f}×)  "
                  f"{size / n:.3f} B/token (raw 2.000, unigram entropy {ent / 8:.3f})")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    a_w, a_r = out["arrow"]
    print(f"\nTARGETS arrow read ≥0.5× memmap: {a_r:.2f}×  {'OK' if a_r >= 0.5 else 'MISS'}; "
          f"arrow write ≥0.5× raw: {a_w:.2f}×  {'OK' if a_w >= 0.5 else 'MISS'}")


if __name__ == "__main__":
    main()
