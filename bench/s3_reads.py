"""Remote reads of the mix loader against a real S3 API (moto's server on 127.0.0.1).

Workload: the loader's random clips. A video dataset (16×16 tokens per frame, 300-frame videos in
64-frame chunks) is written to a bucket, a mix over it is built (16 frames at stride 4, the
paper's clip), and ``MixReader.batch`` assembles batches of 64 sequences (global samples in
order: the blend and per-pass permutation scatter them over the whole dataset).

Measured, in this run:
- bytes fetched ÷ bytes delivered (cache off, and fewer sequences than clips in one pass, so no
  frame is read twice): what the loader requested from the object store for token
  frames and their checksums (``pipeline.mix.access.REMOTE_FETCHES``: every token read of this
  workload goes through it) over the token bytes it put into sequences (frames × 256 × 2 bytes);
  with ``verify="auto"`` (per-frame checks, the default) at ``read_slack`` 0.5 (default) and 3.
  Setup reads (manifests, the mix index: once per process) are reported apart.
  For comparison, the bytes of the shards the workload touched (what a whole-file check per
  process downloads: the previous default, ``verify="sha256"``).
- peak RSS (current resident set sampled after every batch; the kernel's high-water mark of a
  child includes the parent it was forked from) of a fresh process reading the same number of batches from a dataset with S shards
  and one with 10·S shards (10× the shards touched), ``cache_mb`` 64: the ratio should stay ≤ 1.2.

    python bench/s3_reads.py [--videos 400] [--batches 8] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = (16, 16)
TOK = {"id": "bench", "sha256": "0" * 64, "vocab_size": 8192, "downsample": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_videos(url: str, so: dict, videos: int, rows_per_shard: int, seed: int) -> None:
    from pipeline.shards import ShardWriter, write_manifest

    rng = np.random.default_rng(seed)
    hw = GRID[0] * GRID[1]
    rows = []
    for v in range(videos):
        for c, f0 in enumerate(range(0, 300, 64)):
            nf = min(64, 300 - f0)
            rows.append(dict(key=f"k600/v{v:06d}/{c:05d}", dataset="k600", split="train", video_id=f"v{v:06d}",
                             chunk=c, t_start=f0 / 30, fps=30.0, num_frames=nf, grid_h=GRID[0], grid_w=GRID[1],
                             label=f"c{v % 10}", tokens=rng.integers(0, 8192, size=nf * hw, dtype=np.uint16)))
    for s, lo in enumerate(range(0, len(rows), rows_per_shard)):
        w = ShardWriter(url, s, codebook_size=8192, tokenizer=TOK, resolution=128, storage_options=so)
        for r in rows[lo : lo + rows_per_shard]:
            w.add(r)
        w.commit(input_shard={"id": s, "worklist_sha256": "0" * 64, "num_items": 1}, errors=[])
    write_manifest(url, so)


def build(url: str, so: dict) -> str:
    from pipeline.mix import MixConfig, build_mix

    mix = f"{url}/mix.json"
    cfg = MixConfig(ratios={"v": "1"}, inputs={"v": url}, frames=16, stride=4, seq_len=4096)
    build_mix(cfg, mix, so, progress=False)
    return mix


def read(mix: str, so: dict, batches: int, batch: int, slack: float, cache_mb: int) -> dict:
    """Read ``batches`` batches; the fetch counters, delivered bytes and shards touched."""
    from pipeline.mix import MixReader, access

    t0 = time.perf_counter()
    r = MixReader(mix, storage_options=so, read_slack=slack, cache_mb=cache_mb)
    setup_s = time.perf_counter() - t0
    rss0 = _rss_kb()
    peak = rss0
    before = dict(access.REMOTE_FETCHES)
    delivered, touched = 0, set()
    t0 = time.perf_counter()
    for k in range(batches):
        ids = np.arange(k * batch, (k + 1) * batch, dtype=np.int64)
        r.batch(ids)
        for si, _pos, frames in r.sample_frames(ids):
            delivered += frames.size * r.hw * 2
            q = np.searchsorted(np.asarray(r._tab[si]["cum"]), frames.reshape(-1), side="right") - 1
            touched.update(np.unique(np.asarray(r._tab[si]["shard"])[q]).tolist())
        peak = max(peak, _rss_kb())
    dt = time.perf_counter() - t0
    shards = r._dsm[r.sources[0]]["shards"]
    return {"fetched": access.REMOTE_FETCHES["bytes"] - before["bytes"],
            "requests": access.REMOTE_FETCHES["requests"] - before["requests"], "delivered": delivered,
            "touched": len(touched), "touched_bytes": sum(shards[i]["bytes"] for i in touched),
            "shards": len(shards), "seconds": dt, "setup_s": setup_s,
            "rss_before_kb": rss0, "rss_peak_kb": peak, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def _rss_kb() -> int:
    """This process's resident set now (KiB; Linux /proc, else the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args: argparse.Namespace) -> None:
    so = {"client_kwargs": {"endpoint_url": args.endpoint}}
    print(json.dumps(read(args.mix, so, args.batches, args.batch, args.slack, args.cache_mb)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=400,
                    help="videos of 300 frames (≈4.7 clips each: keep videos × 4.7 above batches × batch, so no clip repeats)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rss-batches", type=int, default=24, help="batches for the RSS runs (enough to touch ~every shard)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mix", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--slack", type=float, default=0.5, help=argparse.SUPPRESS)
    ap.add_argument("--cache-mb", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Dummy credentials for the local server only (set for this process and its children).
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    so = {"client_kwargs": {"endpoint_url": endpoint}}
    try:
        # Same videos per shard count ratio: "big" has 10× the shards of "small" (40 rows per shard
        # vs 4), so the same batches touch about 10× as many shards.
        t0 = time.perf_counter()
        small, big = f"s3://{bucket}/small", f"s3://{bucket}/big"
        write_videos(small, so, args.videos, rows_per_shard=40, seed=0)
        write_videos(big, so, args.videos, rows_per_shard=4, seed=0)
        t1 = time.perf_counter()
        mixes = {name: build(url, so) for name, url in (("small", small), ("big", big))}
        print(f"data: {args.videos} videos × 300 frames (16×16 tokens, 64-frame chunks) written to moto twice "
              f"(40 and 4 rows per shard) in {t1 - t0:.0f} s, mixed in {time.perf_counter() - t1:.0f} s; clips of 16 frames at "
              f"stride 4, {args.batches} batches of {args.batch}")

        def run(mix: str, slack: float, cache_mb: int, batches: int) -> dict:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--mix", mix, "--endpoint",
                                  endpoint, "--batches", str(batches), "--batch", str(args.batch),
                                  "--slack", str(slack), "--cache-mb", str(cache_mb)],
                                 check=True, capture_output=True, text=True)
            return json.loads(out.stdout.strip().splitlines()[-1])

        for slack in (0.5, 3.0):
            g = run(mixes["big"], slack, 0, args.batches)  # no cache: every frame read is fetched (no reuse can flatter it)
            print(f"  read_slack {slack}: fetched/delivered = {g['fetched'] / g['delivered']:.3f} "
                  f"({g['fetched'] / 2**20:.1f} MiB for {g['delivered'] / 2**20:.1f} MiB), "
                  f"{g['requests'] / (args.batches * args.batch):.1f} requests per sequence, "
                  f"{args.batches * args.batch / g['seconds']:.0f} sequences/s against moto")
        print(f"  whole-file check instead (verify='sha256', once per process): the {g['touched']} shards touched "
              f"hold {g['touched_bytes'] / 2**20:.1f} MiB = {g['touched_bytes'] / g['delivered']:.1f}× the bytes "
              "delivered, downloaded again by every rank and worker")
        rss = {}
        # (read_slack 3 here: fewer requests, so moto serves more batches in the time; the memory
        # held does not depend on it beyond the 64 MiB cache budget)
        print(f"  RSS runs: {args.rss_batches} batches each, read_slack 3, cache_mb 64")
        for name in ("small", "big"):
            rss[name] = run(mixes[name], 3.0, 64, args.rss_batches)
            r = rss[name]
            print(f"  {name}: {r['shards']} shards, {r['touched']} touched; peak RSS while reading {r['rss_peak_kb'] / 1024:.0f} MiB "
                  f"(after opening the mix {r['rss_before_kb'] / 1024:.0f} MiB, high-water mark {r['maxrss_kb'] / 1024:.0f} MiB); "
                  f"setup (manifests + index) {r['setup_s']:.2f} s")
        a, b = rss["small"], rss["big"]
        print(f"  shards touched ×{b['touched'] / a['touched']:.1f} → peak RSS ×{b['rss_peak_kb'] / a['rss_peak_kb']:.2f} "
              f"(growth while reading: {(a['rss_peak_kb'] - a['rss_before_kb']) / 1024:.1f} → "
              f"{(b['rss_peak_kb'] - b['rss_before_kb']) / 1024:.1f} MiB)")
    finally:
        server.stop()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
