"""Mix loader throughput against a raw memmap read of the same token bytes, same run.

Delivered = global sample ids → blend lookup → per-source permutation and jitter → run search →
token gather (whole strided clips) from the Arrow shards mapped into one address range per source
(pipeline/mix/arena.py), widened straight into one int32 [B, T+1] buffer that the int32
inputs/targets [B, T] are views of, plus frame_index (a broadcast row) and the per-sample source
and label (``MixReader.batch``; ``MixLoader`` adds only the torch wrap).

What is timed: each variant's whole pass over the same 60 batches, the variants taking turns in
each round (best of ``--repeat`` rounds), both in wall time and in CPU time of this process. The
bench is single-threaded (no prefetch thread, no workers), so on an idle machine the two agree;
on a shared one the CPU time leaves out the time other jobs held the cores. "delivered" drops each
batch before making the next (the allocator hands the same buffer back); "MixLoader, 0 workers"
keeps each batch alive until the next is made, as a training loop does, and is what a trainer
with ``num_workers=0`` waits for per step.

Baselines, timed on the very same frames (their element offsets are computed before timing):
- "raw gather": the frames copied out of ``numpy.memmap`` views of the same data files with one
  fancy index per shard, nothing else (2 bytes written per token); the issue's target is
  delivered ≥ 0.5× this.
- "raw gather + int32": the same frames gathered straight into one int32 [B, T+1] buffer, the
  least the loader contract (int32 inputs and targets, ``SEQ_DTYPE``) requires (4 bytes written
  per token); "raw gather + int64" the same into int64, the contract before it became int32.
- "raw sequential": the same number of bytes copied contiguously from a memmap (the ceiling of any
  reader; reported for context).
- "raw gather over the FileArena": the same frames with one fancy index per source over the
  address range that maps all of its shards (what the loader itself gathers from; for context).
Also printed: the rate the 1b model needs per H100 at 45% MFU (~60k tokens/s).

    python bench/loader.py [--videos 240] [--images 20000] [--batches 60] [--batch 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time

import numpy as np
from timing import interleaved_best  # bench/timing.py (this script's folder is on sys.path)

from pipeline.mix import MixConfig, MixReader, build_mix
from pipeline.mix.sequence import SEQ_DTYPE
from pipeline.mix.tables import locate_frames
from pipeline.shards import ShardWriter, write_manifest
from trainer.data import MixLoader  # imports torch before any timing, so every measurement runs alike

TOK = {"id": "bench", "sha256": "0" * 64, "vocab_size": 8192, "downsample": 8}
GRID = (16, 16)


def write_dataset(url: str, *, dataset: str, items: list[int], chunk: int, rows_per_shard: int, seed: int) -> None:
    """Random tokens; ``items`` = frames per video (1 for images)."""
    rng = np.random.default_rng(seed)
    hw = GRID[0] * GRID[1]
    rows = []
    for v, n in enumerate(items):
        for c, f0 in enumerate(range(0, n, chunk)):
            nf = min(chunk, n - f0)
            rows.append(dict(key=f"{dataset}/v{v:06d}/{c:05d}", dataset=dataset, split="train", video_id=f"v{v:06d}",
                             chunk=c, t_start=f0 / 30, fps=30.0, num_frames=nf, grid_h=GRID[0], grid_w=GRID[1],
                             label=f"c{v % 10}", tokens=rng.integers(0, 8192, size=nf * hw, dtype=np.uint16)))
    for s, lo in enumerate(range(0, len(rows), rows_per_shard)):
        w = ShardWriter(url, s, codebook_size=8192, tokenizer=TOK, resolution=128)
        for r in rows[lo : lo + rows_per_shard]:
            w.add(r)
        w.commit(input_shard={"id": s, "worklist_sha256": "0" * 64, "num_items": 1}, errors=[])
    write_manifest(url)


def h100_need() -> tuple[float, float]:
    """Tokens/s the 1b model (2048 d, 22 layers, 1.1B params, T=4096) consumes per H100 at 45% MFU."""
    n_params, layers, d, t = 1.1e9, 22, 2048, 4096
    # 6N per token for the dense layers (fwd+bwd) + causal attention scores/values: 6 * L * T * d.
    flops_per_token = 6 * n_params + 6 * layers * t * d
    return 989e12 * 0.45 / flops_per_token, flops_per_token


def index_scale(n_samples: int, n_rows: int) -> None:
    """Time the index builders at ImageNet/HowTo100M-like sizes (no shards needed)."""
    import pyarrow as pa

    from pipeline.mix.blend import Blend, SourceOrder, exact_weights
    from pipeline.mix.tables import RowTable, image_units, split_table, video_units

    t0 = time.perf_counter()
    Blend(*exact_weights(["0.2", "0.1", "0.1", "0.6"])).build(n_samples)
    t1 = time.perf_counter()
    SourceOrder(n_rows, (0, 1, 2)).units(np.arange(16, dtype=np.int64))  # materialises one pass
    t2 = time.perf_counter()
    rng = np.random.default_rng(0)
    ids = rng.permutation(n_rows)
    names = pa.array([f"v{i:08d}" for i in ids])
    rows = RowTable(shard=(np.arange(n_rows) // 4096).astype(np.int32), row=(np.arange(n_rows) % 4096).astype(np.int32),
                    elem=np.arange(n_rows, dtype=np.int64) * 256, num_frames=np.ones(n_rows, np.int32),
                    chunk=np.zeros(n_rows, np.int64), split=pa.array(["train"] * n_rows), dataset=pa.array(["in"] * n_rows),
                    video_id=names, label=pa.array([f"c{i % 1000}" for i in ids]))
    t3 = time.perf_counter()
    t = split_table(rows, "train")
    image_units(t)
    t4 = time.perf_counter()
    vrows = RowTable(shard=rows.shard, row=rows.row, elem=rows.elem, num_frames=np.full(n_rows, 64, np.int32),
                     chunk=np.arange(n_rows, dtype=np.int64) % 8, split=rows.split, dataset=rows.dataset,
                     video_id=pa.array([f"v{i // 8:08d}" for i in range(n_rows)]), label=rows.label)
    t5 = time.perf_counter()
    vt = split_table(vrows, "train")
    u, _, _ = video_units(vt, frames=16, stride=4, hop=64)
    t6 = time.perf_counter()
    print(f"index build: blend of {n_samples / 1e6:.0f} M samples {t1 - t0:.2f} s; one pass of a {n_rows / 1e6:.0f} M-unit "
          f"source order {t2 - t1:.2f} s; image split table of {n_rows / 1e6:.0f} M rows {t4 - t3:.2f} s; video split "
          f"table of {n_rows / 1e6:.0f} M chunks ({len(u) / 1e6:.0f} M clips) {t6 - t5:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=240, help="videos of 300 frames (64-frame chunks)")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--index-samples", type=int, default=50_000_000, help="blend index size for the build timing")
    ap.add_argument("--index-rows", type=int, default=2_000_000, help="rows for the split-table build timing")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="toto-bench-loader-")
    try:
        t0 = time.perf_counter()
        write_dataset(f"{d}/video", dataset="k600", items=[300] * args.videos, chunk=64, rows_per_shard=128, seed=0)
        write_dataset(f"{d}/image", dataset="imagenet", items=[1] * args.images, chunk=1, rows_per_shard=4096, seed=1)
        t1 = time.perf_counter()
        cfg = MixConfig(ratios={"video": "0.8", "image": "0.2"}, inputs={"video": f"{d}/video", "image": f"{d}/image"},
                        frames=16, stride=4, images_per_seq=16, seq_len=4096)
        build_mix(cfg, f"{d}/mix.json", progress=False)
        t2 = time.perf_counter()
        r = MixReader(f"{d}/mix.json", verify="off")
        n = args.batches * args.batch
        batches = [np.arange(k * args.batch, (k + 1) * args.batch, dtype=np.int64) for k in range(args.batches)]
        r.batch(batches[0])  # map the shards

        # Element offsets of every frame of every sample, per (source, shard): the raw baseline's input.
        plan = []
        arena_plan = []  # the same frames as elements of each source's FileArena (one index per source)
        total_frames = 0
        for ids in batches:
            per, per_arena = [], []
            for si, _pos, frames in r.sample_frames(ids):
                t = r._tab[si]
                q, k = locate_frames(np.asarray(t["cum"]), frames.reshape(-1))
                shard = np.asarray(t["shard"][q])
                starts = np.asarray(t["elem"][q]) + k * r.hw
                for sh in np.unique(shard):
                    f = r._stores[si]._file(int(sh))
                    per.append((f, starts[shard == sh]))
                direct = r._direct_access(si)
                if direct is not None:
                    per_arena.append((direct.win, direct.arena.base[shard] + starts))
                total_frames += frames.size
            plan.append(per)
            arena_plan.append(per_arena)
        tokens_frames = total_frames * r.hw

        def delivered() -> None:
            for ids in batches:
                r.batch(ids)

        def raw_gather() -> None:
            for per in plan:
                for f, starts in per:
                    f.frames_local(starts)

        def raw_arena() -> None:
            for per in arena_plan:
                for win, elems in per:
                    win[elems]

        t_len = r.seq_len

        def raw_gather_into(dtype):
            # The least any loader honouring the contract does: the same frames, widened into one
            # [B, T+1] buffer that the inputs and targets [B, T] are views of (no blend, no
            # permutation, no index lookups, no specials).
            def run() -> None:
                for per in plan:
                    seq = np.empty((args.batch, t_len + 1), dtype)
                    flat = np.concatenate([f.frames_local(starts) for f, starts in per]).reshape(args.batch, -1)
                    seq[:, 1:] = flat[:, :t_len]
            return run

        raw_gather_int32, raw_gather_int64 = raw_gather_into(SEQ_DTYPE), raw_gather_into(np.int64)

        maps = []
        for name in sorted(os.listdir(f"{d}/video")):
            if name.endswith(".arrow"):
                mm = np.memmap(f"{d}/video/{name}", dtype=np.uint8, mode="r")
                maps.append(mm[: mm.size - mm.size % 2].view(np.uint16))
        chunk_elems = args.batch * 16 * r.hw

        def raw_sequential() -> None:
            # The same number of tokens copied contiguously, batch by batch, walking through the files.
            left, k, off = tokens_frames, 0, 0
            while left > 0:
                u16 = maps[k % len(maps)]
                m = min(chunk_elems, left, u16.size - off)
                np.array(u16[off : off + m])
                left -= m
                off += m
                if off >= u16.size:
                    k, off = k + 1, 0

        loader = MixLoader(f"{d}/mix.json", global_batch=args.batch, num_workers=0, verify="off")
        held: dict = {}

        def loader_start() -> None:
            loader.load_state_dict({**loader.state_dict(), "consumed_samples": 0})
            held["it"] = iter(loader)

        def through_loader() -> None:
            # The same batches as "delivered"; each one stays alive until the next is made (the loop
            # variable), as in a training loop.
            for _ in itertools.islice(held["it"], args.batches):
                pass

        def with_workers(workers: int) -> float:
            """Wall-clock tokens/s through MixLoader with ``workers`` DataLoader workers (context:
            not in the rounds above; its work runs in other processes)."""
            wl = MixLoader(f"{d}/mix.json", global_batch=args.batch, num_workers=workers, verify="off")
            rates = []
            for _rep in range(args.repeat):
                wl.load_state_dict({**wl.state_dict(), "consumed_samples": 0})
                it = iter(wl)
                next(it)  # start the workers
                t0 = time.perf_counter()
                for _ in itertools.islice(it, args.batches - 1):
                    pass
                rates.append((args.batches - 1) * args.batch * r.seq_len / (time.perf_counter() - t0))
                del it
            return max(rates)

        # Taking turns within each round: a slow spell of the (shared) machine hits all alike.
        runs = {"delivered": (delivered, None), "raw": (raw_gather, None), "loader0": (through_loader, loader_start),
                "sequential": (raw_sequential, None), "int32": (raw_gather_int32, None),
                "int64": (raw_gather_int64, None)}
        if all(arena_plan):
            runs["arena"] = (raw_arena, None)
        load0 = os.getloadavg()
        cpu: dict[str, float] = {}
        got = interleaved_best(runs, args.repeat, cpu)
        load1 = os.getloadavg()
        seq_tokens = n * r.seq_len
        need, fpt = h100_need()
        print(f"data: {args.videos} videos × 300 frames + {args.images} images, 16×16 tokens, written in {t1 - t0:.1f} s; "
              f"mix built in {t2 - t1:.2f} s")
        print(f"{n} sequences of {r.seq_len} tokens ({seq_tokens / 1e6:.1f} M tokens, {tokens_frames / 1e6:.1f} M frame tokens read), "
              f"batch {args.batch}, best of {args.repeat}; load average {load0[0]:.1f} before, {load1[0]:.1f} after "
              f"({os.cpu_count()} CPUs)")
        print("  M tokens/s (best wall time | best CPU time of this process); ratios = delivered ÷ this")
        rows = [("delivered (MixReader.batch)", "delivered", seq_tokens), ("MixLoader, 0 workers (torch)", "loader0", seq_tokens),
                ("raw memmap gather, same frames", "raw", tokens_frames), ("raw gather into int32 [B, T+1]", "int32", tokens_frames),
                ("raw gather into int64 [B, T+1]", "int64", tokens_frames),
                ("raw gather over the FileArena", "arena", tokens_frames), ("raw memmap sequential, same n", "sequential", tokens_frames)]
        for label, key, tokens in rows:
            if key not in got:
                continue
            line = f"  {label:32s} {tokens / got[key] / 1e6:8.1f} | {tokens / cpu[key] / 1e6:8.1f}"
            if key not in ("delivered", "loader0"):
                line += (f"   delivered/this = {(seq_tokens / got['delivered']) / (tokens / got[key]):.2f} | "
                         f"{(seq_tokens / cpu['delivered']) / (tokens / cpu[key]):.2f}")
                if key == "raw":
                    line += (f"   MixLoader 0 workers/this = {(seq_tokens / got['loader0']) / (tokens / got[key]):.2f} | "
                             f"{(seq_tokens / cpu['loader0']) / (tokens / cpu[key]):.2f}   (target ≥ 0.5)")
            print(line)
        print(f"  MixLoader, 2 workers (torch)     {with_workers(2) / 1e6:8.1f} (wall; not interleaved)")
        td = got["delivered"]
        print(f"  needed by the 1b model per H100 at 45% MFU: {need / 1e3:.0f} k tokens/s "
              f"({fpt / 1e9:.1f} GFLOP/token, 989 TFLOP/s bf16 peak); one loader process covers "
              f"{seq_tokens / td / need:.0f} GPUs")
        index_scale(args.index_samples, args.index_rows)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
