"""Benchmark: the tokenization job's driver cost, per token and per event, and the GPUs one driver
core can feed.

Runs real jobs (embedded Ray, this machine's CPUs, committing to a moto S3 API server that runs in
its own process so its work is not charged to the driver) for two row kinds:

    images   ImageNet layout, one 128 px frame per row (256 tokens per row)
    video    folder layout, 64-frame chunks per row (16 384 tokens per row)

Each kind runs twice on the same inputs: with many small blocks (small decode blocks, few rows per
tokenizer call) and with few large ones. The driver's CPU is getrusage(RUSAGE_SELF) of the driver
process (every thread: Ray Data's streaming executor, Ray's core-worker threads, the job's poller),
as the job records it in run_summary.json ("driver"); the bench also reads each thread's CPU from
/proc/self/task to say where it went.

1. Whole job: driver CPU-s per 1e9 committed tokens (start-up included) and the H100s (1.7e6
   tokens/s each) that figure corresponds to at this machine's token rate.
2. Per event: over the streaming phase (stages built → last commit) of all jobs, a least-squares fit
       driver CPU-s = a + b × blocks + c × wall-s
   where blocks = the blocks Ray Data's executor moved (input shards + decode blocks + tokenizer
   calls; the job sets Ray Data's block target to the decode block bound, so each decode block is
   one Ray block): a is the per-job start-up (building the dataset, creating actors), b the
   driver's cost per block, c its cost per wall second (executor loop, Ray's threads, the 4 Hz
   poll of one writer).
3. Projection: at the GPU defaults (TokenizeConfig.tokenizer_batch_rows / decode_block_bytes with
   GPU actors, 128 px) the blocks per token of each row kind follow from the settings; one driver
   core keeps up with G GPUs while
       c + G/8 × 4 Hz × (poll cost per writer) + G × 1.7e6 × b × blocks per token ≤ 1
   (one writer per 8 GPUs, the default). Reported at --items-per-shard 64 (the default) and at the
   shard sizes docs/cluster.md recommends for large jobs.

    PYTHONPATH=. python bench/driver_cost.py --images 2048 --videos 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from pipeline.jobs.ray_job import POLL_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_TOKENS_PER_S = 1.7e6
POLL_HZ = 1.0 / POLL_S
# (label, --decode-block-mb, rows per tokenizer call, frames per forward pass) per row kind.
# The last of each kind runs with two executor actors: the driver only coordinates (polls the
# writers, waits for the executors), which is what its own CPU then measures.
JOBS = {
    "images": [("small blocks", 0.25, 8, 8, 1), ("large blocks", 32, 256, 256, 1), ("2 executors", 32, 256, 256, 2)],
    "video": [("small blocks", 0.25, 1, 1, 1), ("large blocks", 32, 16, 256, 1), ("2 executors", 32, 16, 256, 2)],
}
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


def thread_cpu() -> dict[int, tuple[str, float]]:
    """This process's live threads: tid -> (name, CPU seconds), from /proc/self/task; Python
    threads by their Python name (the OS names them all "python"), others by the OS name."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    py = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(tid)] = (py.get(int(tid), name), (int(fields[11]) + int(fields[12])) / tick)
    return out


def thread_groups(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per thread name (digits dropped) between two thread_cpu() readings."""
    groups: dict[str, float] = {}
    for tid, (name, t) in after.items():
        d = t - (before[tid][1] if tid in before else 0.0)
        key = name.rstrip("0123456789_-") or name
        groups[key] = groups.get(key, 0.0) + d
    return dict(sorted(((k, v) for k, v in groups.items() if v > 0.005), key=lambda kv: -kv[1]))


def run_job(kind: str, label: str, block_mb: float, rows_per_batch: int, batch_size: int, executors: int, data: str,
            out: str, tok: str, so: dict, args, limit: int) -> dict:
    from pipeline.jobs import TokenizeConfig, run_tokenize

    if kind == "images":
        kw = dict(dataset="imagenet", items_per_shard=args.image_items_per_shard)
    else:
        kw = dict(dataset="folder", items_per_shard=args.video_items_per_shard)
    cfg = TokenizeConfig(input=data, output=out, tokenizer=tok, resolution=128, max_fps=30.0, chunk_frames=64,
                         batch_size=batch_size, rows_per_batch=rows_per_batch, num_cpus=args.cpus, decode_cpus=0.5,
                         decode_block_mb=block_mb, progress=False, storage_options=so, limit=limit,
                         executors=executors, cpu_actors=executors, tokenizer_cpus=1.0 / executors, **kw)
    th0, ru0 = thread_cpu(), resource.getrusage(resource.RUSAGE_SELF)
    s = run_tokenize(cfg)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    threads = thread_groups(th0, thread_cpu())
    # Threads that ended during the job (Ray Data's executor thread ends with its dataset).
    total = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    threads["(ended)"] = round(total - sum(threads.values()), 3)
    d = s["driver"]
    tokens = s["counts"]["tokens"]
    blocks = d["input_blocks"] + d["decode_blocks"] + d["blocks"]
    per_1e9 = d["cpu_s"] / tokens * 1e9
    return {
        "kind": kind, "label": label, "inputs": limit, "tokens": tokens, "rows": s["counts"]["rows"],
        "shards": d["shards"], "input_blocks": d["input_blocks"], "decode_blocks": d["decode_blocks"],
        "tokenizer_calls": d["blocks"], "blocks": blocks, "polls": d["polls"],
        "poll_ms": 1e3 * d["poll_cpu_s"] / max(1, d["polls"]),
        "wall_s": d["wall_s"], "driver_cpu_s": d["cpu_s"], "startup_cpu_s": d["cpu_s"] - d["steady_cpu_s"],
        "steady_cpu_s": d["steady_cpu_s"], "steady_wall_s": d["steady_wall_s"], "loop_cpu_s": d["steady_loop_cpu_s"],
        "cpu_s_per_1e9": per_1e9, "gpus_per_driver": 1e9 / per_1e9 / H100_TOKENS_PER_S,
        "tokens_per_s": tokens / d["wall_s"], "threads": threads, "executors": executors,
        "executor_cpu_s": [x["cpu_s"] for x in d.get("executors", [])],
        "executor_blocks": [x["blocks"] + x["input_blocks"] for x in d.get("executors", [])],
    }


def coordinator_fit(results: list[dict]) -> dict:
    """Least squares over the jobs with executor actors: driver CPU-s = a + c × wall-s (the driver
    runs no Ray Data: it polls the writers and waits for the executors)."""
    x = np.array([[1.0, r["wall_s"]] for r in results])
    y = np.array([r["driver_cpu_s"] for r in results])
    (a, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"a_s": float(a), "c_cpu_per_wall_s": float(c), "residuals_s": [float(v) for v in y - x @ np.array([a, c])]}


def fit(results: list[dict]) -> dict:
    """Least squares: driver CPU-s = a + b × blocks + c × wall-s (streaming phase)."""
    x = np.array([[1.0, r["blocks"], r["wall_s"]] for r in results])
    y = np.array([r["driver_cpu_s"] for r in results])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ np.array([a, b, c])
    return {"a_s": float(a), "b_ms_per_block": 1e3 * float(b), "c_cpu_per_wall_s": float(c),
            "residuals_s": [float(v) for v in y - pred]}


def blocks_per_token(kind: str, items_per_shard: int, decode_block_mb: float | None = None,
                     video_s: float = 10.0) -> dict:
    """Blocks per token of a GPU job at the defaults (128 px), from the settings: one input block
    per shard, the decode blocks of a shard (decode_block_bytes of frames each, at least one), and
    the tokenizer calls (tokenizer_batch_rows rows each; calls span shards)."""
    from pipeline.jobs import TokenizeConfig

    dataset = "imagenet" if kind == "images" else "kinetics600"
    cfg = TokenizeConfig(dataset=dataset, input="x", output="y", items_per_shard=items_per_shard,
                         decode_block_mb=decode_block_mb)
    frame_bytes, frame_tokens = 3 * cfg.resolution ** 2, (cfg.resolution // 8) ** 2
    frames_per_item = 1 if kind == "images" else int(video_s * cfg.max_fps)
    shard_frames = items_per_shard * frames_per_item
    decode = max(1, math.ceil(shard_frames * frame_bytes / cfg.decode_block_bytes(gpu_actors=True)))
    rows_per_call = cfg.tokenizer_batch_rows(gpu_actors=True)
    call_frames = rows_per_call * (1 if kind == "images" else cfg.chunk_frames)
    shard_tokens = shard_frames * frame_tokens
    per_token = (1 + decode) / shard_tokens + 1 / (call_frames * frame_tokens)
    return {"items_per_shard": items_per_shard, "decode_block_mb": cfg.decode_block_bytes(gpu_actors=True) >> 20,
            "shard_tokens": shard_tokens, "decode_blocks_per_shard": decode,
            "call_frames": call_frames, "blocks_per_token": per_token}


def project(f: dict, poll_ms: float, bpt: float) -> float:
    """GPUs one driver core feeds: c + G/8 × POLL_HZ × poll + G × 1.7e6 × b × blocks/token = 1."""
    per_gpu = H100_TOKENS_PER_S * f["b_ms_per_block"] * 1e-3 * bpt + POLL_HZ * poll_ms * 1e-3 / 8
    return max(0.0, 1.0 - f["c_cpu_per_wall_s"]) / per_gpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048, help="images per image job")
    ap.add_argument("--videos", type=int, default=16, help="videos per video job")
    ap.add_argument("--video-frames", type=int, default=256, help="frames per video (30 fps): 4 chunks of 64")
    ap.add_argument("--image-items-per-shard", type=int, default=256)
    ap.add_argument("--video-items-per-shard", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each job (all enter the fit)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if min(args.images, args.videos, args.repeat) < 1:
        raise SystemExit("--images, --videos and --repeat take counts >= 1")
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    import boto3
    import ray

    tmp = tempfile.mkdtemp(prefix="toto-bench-driver-")
    make_images(os.path.join(tmp, "img"), args.images)
    make_videos(os.path.join(tmp, "vid"), args.videos, args.video_frames)
    tok = make_tokenizer(os.path.join(tmp, "tok"))
    moto, endpoint = start_moto()
    results = []
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        so = {"client_kwargs": {"endpoint_url": endpoint}}
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        k = 0
        for _ in range(args.repeat):
            for kind, jobs in JOBS.items():
                data, n = ("img", args.images) if kind == "images" else ("vid", args.videos)
                for label, block_mb, rows, bs, n_exec in jobs:
                    k += 1
                    results.append(run_job(kind, label, block_mb, rows, bs, n_exec, os.path.join(tmp, data),
                                           f"s3://bench/{data}{k}", tok, so, args, n))
                    report(results[-1])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        moto.kill()
        moto.wait()
    single = [r for r in results if r["executors"] == 1]
    multi = [r for r in results if r["executors"] > 1]
    f = fit(single)
    poll_ms = float(np.median([r["poll_ms"] for r in results]))
    print(f"executor in the driver, fit over {len(single)} jobs: CPU-s = {f['a_s']:.2f} + {f['b_ms_per_block']:.2f} ms"
          f" × blocks + {f['c_cpu_per_wall_s']:.3f} × wall-s (residuals {', '.join(f'{v:+.2f}' for v in f['residuals_s'])}"
          f" s); poll {poll_ms:.2f} ms per writer")
    cf = coordinator_fit(multi) if len(multi) >= 2 else None
    g_driver = None
    if cf:
        # The coordinator's cost per GPU is the writers' poll (one writer per 8 GPUs); its own
        # per-wall-second cost (waits, Ray's threads, one writer's poll) is what is left of a core.
        g_driver = max(0.0, 1.0 - cf["c_cpu_per_wall_s"]) / (POLL_HZ * poll_ms * 1e-3 / 8)
        print(f"driver with executor actors, fit over {len(multi)} jobs: CPU-s = {cf['a_s']:.2f} +"
              f" {cf['c_cpu_per_wall_s']:.3f} × wall-s (residuals {', '.join(f'{v:+.2f}' for v in cf['residuals_s'])} s)"
              f" → one driver core coordinates {g_driver:,.0f} H100s (one writer per 8, polled at {POLL_HZ:.0f} Hz)")
    proj = []
    # The defaults (--items-per-shard 16384 for images, 64 for video; --decode-block-mb 256 on
    # GPUs), then other shard and block sizes.
    for kind, ips, mb in (("images", 16384, None), ("images", 64, None), ("images", 16384, 512),
                          ("video", 64, None), ("video", 256, None), ("video", 64, 512)):
        b = blocks_per_token(kind, ips, mb)
        g = project(f, poll_ms, b["blocks_per_token"])
        execs_256 = math.ceil(256 / g) if g > 0 else None
        proj.append({"kind": kind, **b, "gpus_per_executor_core": g, "executors_for_256": execs_256})
        print(f"projected, GPU job, {kind} ({'1 frame per item' if kind == 'images' else '10 s clips'}),"
              f" --items-per-shard {ips} --decode-block-mb {b['decode_block_mb']}: {b['shard_tokens']:,} tokens and"
              f" {b['decode_blocks_per_shard']} decode blocks per shard, {b['call_frames']:,} frames per tokenizer call"
              f" → {b['blocks_per_token'] * 1e6:.3f} blocks per 1e6 tokens → {g:,.0f} H100s per executor core;"
              f" 256 H100s need {execs_256} executors (default --executors at 256 GPUs: 4)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"jobs": results, "fit": f, "coordinator_fit": cf, "gpus_per_driver": g_driver, "poll_ms": poll_ms,
                       "projection": proj}, fh, indent=2)


def report(r: dict) -> None:
    print(f"{r['kind']:6s} {r['label']:12s} {r['tokens']:>10,} tokens {r['rows']:>5,} rows {r['shards']:>3} shards;"
          f" blocks {r['blocks']:>4} = {r['input_blocks']} in + {r['decode_blocks']} decode + {r['tokenizer_calls']} calls;"
          f" wall {r['wall_s']:5.1f} s ({r['tokens_per_s']:,.0f} tok/s)")
    top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["threads"].items())[:5])
    if r["executors"] > 1:
        print(f"       {r['executors']} executor actors: CPU {', '.join(f'{c:.2f}' for c in r['executor_cpu_s'])} s over"
              f" {', '.join(str(b) for b in r['executor_blocks'])} blocks")
    print(f"       driver CPU {r['driver_cpu_s']:5.2f} s (start-up {r['startup_cpu_s']:.2f}; steady {r['steady_cpu_s']:.2f}"
          f" over {r['steady_wall_s']:.1f} s; loop thread {r['loop_cpu_s']:.2f}; {r['polls']} polls at {r['poll_ms']:.2f} ms)"
          f" | whole job {r['cpu_s_per_1e9']:,.0f} CPU-s per 1e9 tokens → {r['gpus_per_driver']:.2f} H100s"
          f" | threads (CPU-s, whole job): {top}", flush=True)


if __name__ == "__main__":
    main()
