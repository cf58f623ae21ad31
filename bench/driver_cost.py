"""Benchmark: the tokenization job's driver cost per committed token, and the GPUs one driver can feed.

Runs real jobs (embedded Ray, this machine's CPUs, committing to a moto S3 API server that runs in
its own process so its work is not charged to the driver) for two row kinds:

    images   ImageNet layout, one 128 px frame per row (256 tokens per row)
    video    folder layout, 64-frame chunks per row (16 384 tokens per row)

and reads the driver's own CPU seconds (getrusage RUSAGE_SELF: every thread of the driver process,
Ray Data's streaming executor and Ray's core-worker threads included) as the job records them in
run_summary.json ("driver"). Per job: driver CPU-s per 1e9 committed tokens for the whole job and
the H100s (1.7e6 tokens/s each) that figure corresponds to, at this machine's token rate.

The job's start-up (planning the dataset, creating actors: everything before the first output
batch) is reported apart. The steady state (first output batch → end) is split into the driver's
own work (its loop thread: fetching the stage's per-shard counts and acting on them; plus sidecar
commits), per token, and the rest of the process (Ray Data's executor, Ray's threads), per wall
second. The projection: one driver core keeps up with G GPUs while
rest rate + G × 1.7e6 × (own work per token) ≤ 1. Each kind runs at the sizes given.

    PYTHONPATH=. python bench/driver_cost.py --images 2048 --videos 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_TOKENS_PER_S = 1.7e6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a child process (its CPU must not count as the driver's)."""
    port = _port()
    code = ("from moto.server import ThreadedMotoServer; import time; "
            f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); time.sleep(1e9)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, endpoint
        except OSError:
            if time.time() > deadline:
                p.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def make_images(root: str, n: int) -> None:
    from pipeline.media import quadrant_frame, write_image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, "train", f"n{i % 10:08d}")
        os.makedirs(d, exist_ok=True)
        img = quadrant_frame(144, 160, float(i), 3.0)
        img = np.clip(img.astype(np.int16) + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
        write_image(os.path.join(d, f"n{i % 10:08d}_{i}.JPEG"), img)


def make_videos(root: str, n: int, frames: int) -> None:
    from pipeline.media import quadrant_frame, write_video

    os.makedirs(root, exist_ok=True)
    for i in range(n):
        write_video(os.path.join(root, f"v{i:04d}.mp4"), lambda k, t, i=i: quadrant_frame(144, 176, t + i, 3.0),
                    fps=30, num_frames=frames)


def make_tokenizer(out: str) -> str:
    """A dVAE with the demo's code count and few channels (random weights): 128 px → 16×16 codes.
    The driver's cost does not depend on the tokenizer; a cheap one makes more tokens per second here."""
    import torch

    from pipeline.tokenizers import make_config, save_tokenizer
    from pipeline.tokenizers.base import state_dict_of
    from pipeline.tokenizers.dalle import DVAEArch, DVAEEncoder

    torch.manual_seed(0)
    arch = DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1)
    cfg = make_config("dvae", "bench-driver", arch, resolution=128, has_decoder=False, source={"made_by": "bench"})
    save_tokenizer(out, cfg, state_dict_of(DVAEEncoder(arch), None, "dvae"))
    return f"dvae:{out}"


def run_job(kind: str, data: str, out: str, tok: str, so: dict, args, limit: int) -> dict:
    from pipeline.jobs import TokenizeConfig, run_tokenize

    if kind == "images":
        kw = dict(dataset="imagenet", items_per_shard=args.image_items_per_shard, rows_per_batch=args.image_rows_per_batch)
    else:
        kw = dict(dataset="folder", items_per_shard=args.video_items_per_shard, rows_per_batch=args.video_rows_per_batch)
    cfg = TokenizeConfig(input=data, output=out, tokenizer=tok, resolution=128, max_fps=30.0, chunk_frames=64,
                         batch_size=args.batch_size, num_cpus=args.cpus, decode_cpus=0.5, progress=False,
                         storage_options=so, limit=limit, **kw)
    s = run_tokenize(cfg)
    d = s["driver"]
    tokens = s["counts"]["tokens"]
    per_1e9 = d["cpu_s"] / tokens * 1e9
    # Steady state: from the first output batch to the end (start-up excluded). The loop thread's
    # CPU + the sidecar commits are the driver's own work; the rest of the process's CPU (Ray Data's
    # executor, Ray's threads) is expressed per wall second.
    work = d["steady_loop_cpu_s"] + d["commit_cpu_s"]
    if d["batches"] < 3:
        raise SystemExit(f"{kind}: {d['batches']} output batches; give more inputs for a steady state")
    rest_rate = max(0.0, d["steady_cpu_s"] - work) / d["steady_wall_s"]
    work_per_tok = work / tokens
    return {
        "kind": kind, "inputs": limit, "tokens": tokens, "rows": s["counts"]["rows"], "shards": d["shards"],
        "batches": d["batches"], "wall_s": d["wall_s"], "driver_cpu_s": d["cpu_s"], "startup_cpu_s": d["cpu_s"] - d["steady_cpu_s"],
        "steady_cpu_s": d["steady_cpu_s"], "steady_wall_s": d["steady_wall_s"], "work_cpu_s": work,
        "cpu_s_per_1e9": per_1e9, "gpus_per_driver": 1e9 / per_1e9 / H100_TOKENS_PER_S,
        "work_cpu_s_per_1e9": work_per_tok * 1e9, "rest_cpu_per_wall_s": rest_rate,
        "commit_ms_per_shard": 1e3 * d["commit_cpu_s"] / max(1, d["shards"]),
        "tokens_per_s": tokens / d["wall_s"],
        # One driver core keeps up with G GPUs while rest_rate + G * 1.7e6 * work_per_tok <= 1.
        "gpus_per_driver_projected": max(0.0, 1 - rest_rate) / (H100_TOKENS_PER_S * max(work_per_tok, 1e-15)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="2048", help="image counts, one job each")
    ap.add_argument("--videos", default="16", help="video counts, one job each")
    ap.add_argument("--video-frames", type=int, default=256, help="frames per video (30 fps): 4 chunks of 64")
    ap.add_argument("--image-items-per-shard", type=int, default=256)
    ap.add_argument("--image-rows-per-batch", type=int, default=256)
    ap.add_argument("--video-items-per-shard", type=int, default=8)
    ap.add_argument("--video-rows-per-batch", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3
    import ray

    n_img = [int(x) for x in args.images.split(",")]
    n_vid = [int(x) for x in args.videos.split(",")]
    if not n_img or not n_vid or min(n_img + n_vid) < 1:
        raise SystemExit("--images and --videos take comma-separated counts >= 1 (e.g. 2048 or 1024,3072)")
    tmp = tempfile.mkdtemp(prefix="toto-bench-driver-")
    make_images(os.path.join(tmp, "img"), max(n_img))
    make_videos(os.path.join(tmp, "vid"), max(n_vid), args.video_frames)
    tok = make_tokenizer(os.path.join(tmp, "tok"))
    moto, endpoint = start_moto()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        so = {"client_kwargs": {"endpoint_url": endpoint}}
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        results = []
        for kind, counts, data in (("images", n_img, "img"), ("video", n_vid, "vid")):
            for n in counts:
                results.append(run_job(kind, os.path.join(tmp, data), f"s3://bench/{data}{n}", tok, so, args, n))
                report(results[-1])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        moto.kill()
        moto.wait()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(r: dict) -> None:
    print(f"{r['kind']:6s} {r['tokens']:>11,} tokens {r['rows']:>6,} rows {r['shards']:>3} shards {r['batches']:>4} batches"
          f"  wall {r['wall_s']:6.1f} s ({r['tokens_per_s']:,.0f} tok/s)  driver CPU {r['driver_cpu_s']:5.2f} s"
          f" (start-up {r['startup_cpu_s']:.2f} s)")
    print(f"       whole job: {r['cpu_s_per_1e9']:,.0f} driver CPU-s per 1e9 tokens → {r['gpus_per_driver']:.2f} H100s"
          f" at this machine's token rate | steady: own work {r['work_cpu_s_per_1e9']:,.2f} CPU-s per 1e9 tokens"
          f" (commit {r['commit_ms_per_shard']:.2f} ms/shard), rest {r['rest_cpu_per_wall_s']:.3f} CPU-s per wall-s"
          f" → projected {r['gpus_per_driver_projected']:,.0f} H100s per driver core", flush=True)


if __name__ == "__main__":
    main()
