"""The tokenization job on Ray Data (the only module of the pipeline that knows Ray).

    pending input shards (one row each: shard id + its items as JSON)
      → DecodeStage    actor pool, `decode_concurrency` actors × `decode_cpus` CPUs; each actor keeps
                       one watchdog decode subprocess and streams a shard's chunks as blocks of
                       ≤ 32 MB of frames, then the shard's end record
      → TokenizeStage  actor pool, one GPU per actor (or `tokenizer_cpus` CPUs each), `batch_size`
                       frames per forward pass; frames are replaced by uint16 codes
      → driver         ShardAssembler commits `shard-{input shard:06d}` when a shard is complete
      → manifest.json, then run_summary.json

The two stages ask for different resources, so Ray Data keeps them as separate operators (it would
otherwise fuse a map into the following one) and sizes them independently. The streaming
executor's backpressure bounds the frames in flight, so memory does not grow with the inputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.jobs.config import TokenizeConfig
from pipeline.jobs.plan import RUN_SUMMARY, JobPlan, prepare
from pipeline.jobs.progress import Progress
from pipeline.jobs.steps import (
    ROW_META,
    ShardAssembler,
    decode_input_shard,
    new_decode_worker,
    tokenize_records,
    torch_threads,
)

RECORD_SCHEMA = pa.schema([
    ("type", pa.string()),
    ("shard_id", pa.int64()),
    ("key", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("video_id", pa.string()),
    ("label", pa.string()),
    ("chunk", pa.int64()),
    ("t_start", pa.float64()),
    ("fps", pa.float64()),
    ("num_frames", pa.int64()),
    ("h", pa.int64()),
    ("w", pa.int64()),
    ("c", pa.int64()),
    ("payload", pa.large_binary()),   # frames (T, h, w, c) uint8 or tokens (T, h, w) uint16, C order
    ("dtype", pa.string()),
    ("end", pa.string()),             # JSON of the end record's fields (errors, counts, timings)
])


def records_to_table(records: list[dict]) -> pa.Table:
    cols: dict[str, list] = {n: [] for n in RECORD_SCHEMA.names}
    for r in records:
        cols["type"].append(r["type"])
        cols["shard_id"].append(int(r["shard_id"]))
        if r["type"] == "chunk":
            arr = r["frames"] if "frames" in r else r["tokens"]
            for k in ROW_META:
                cols[k].append(r[k])
            cols["h"].append(arr.shape[1])
            cols["w"].append(arr.shape[2])
            cols["c"].append(arr.shape[3] if arr.ndim == 4 else 0)
            cols["payload"].append(np.ascontiguousarray(arr).tobytes())
            cols["dtype"].append(arr.dtype.str)
            cols["end"].append(None)
        else:
            for k in (*ROW_META, "h", "w", "c", "payload", "dtype"):
                cols[k].append(None)
            cols["end"].append(json.dumps({k: r[k] for k in ("expected_rows", "num_items", "errors", "decode_s")}))
    return pa.table(cols, schema=RECORD_SCHEMA)


def table_to_records(table: pa.Table) -> list[dict]:
    out = []
    for r in table.to_pylist():
        if r["type"] == "chunk":
            shape = (r["num_frames"], r["h"], r["w"]) + ((r["c"],) if r["c"] else ())
            arr = np.frombuffer(r["payload"], dtype=np.dtype(r["dtype"])).reshape(shape)
            rec = {k: r[k] for k in ROW_META}
            rec.update(type="chunk", shard_id=r["shard_id"])
            rec["frames" if r["c"] else "tokens"] = arr
        else:
            rec = {"type": "end", "shard_id": r["shard_id"], **json.loads(r["end"])}
        out.append(rec)
    return out


class DecodeStage:
    """Ray Data actor: decode the input shards of a batch (one per call), streaming blocks."""

    def __init__(self, decode_cfg: dict, storage_options: dict | None) -> None:
        from pipeline.decode import DecodeConfig

        self.worker = new_decode_worker(DecodeConfig.from_dict(decode_cfg), storage_options)

    def __call__(self, batch: pa.Table):
        for row in batch.to_pylist():
            for block in decode_input_shard(row["shard_id"], json.loads(row["items"]), self.worker):
                yield records_to_table(block)


class TokenizeStage:
    """Ray Data actor: load the tokenizer once (on this actor's GPU if it has one) and encode."""

    def __init__(self, spec: str, batch_size: int, cpus: float) -> None:
        import torch

        from pipeline.tokenizers import load_tokenizer

        self.tok = load_tokenizer(spec)
        if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "":
            self.tok = self.tok.to("cuda")
        else:
            torch.set_num_threads(torch_threads(cpus))
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        return records_to_table(tokenize_records(self.tok, table_to_records(batch), self.batch_size))


def _init_ray(cfg: TokenizeConfig):
    import ray

    if ray.is_initialized():
        return ray, False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(
            num_cpus=cfg.num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    return ray, True


def stage_sizes(cfg: TokenizeConfig, cluster: dict[str, float]) -> dict[str, Any]:
    """Actors and resources per stage from the cluster's CPUs/GPUs and the config."""
    gpus = int(cluster.get("GPU", 0))
    n_gpu = gpus if cfg.num_gpus is None else min(cfg.num_gpus, gpus)
    if cfg.num_gpus and cfg.num_gpus > gpus:
        raise RuntimeError(f"--num-gpus {cfg.num_gpus} but the Ray cluster has {gpus} GPUs")
    cpus = float(cluster.get("CPU", 1))
    if n_gpu:
        tok = {"actors": n_gpu, "num_gpus": 1, "num_cpus": min(1.0, cfg.tokenizer_cpus)}
    else:
        tok = {"actors": cfg.cpu_actors, "num_gpus": 0, "num_cpus": cfg.tokenizer_cpus}
    left = cpus - tok["actors"] * tok["num_cpus"]
    dec_cpus = cfg.decode_cpus
    if cfg.decode_concurrency is not None:
        n_dec = cfg.decode_concurrency
    else:
        n_dec = max(1, math.floor(left / dec_cpus + 1e-9))
    if n_dec * dec_cpus > left + 1e-9:
        # Fit the decode actors into what the tokenizer leaves (they mostly wait on their subprocess).
        dec_cpus = max(0.05, left / n_dec) if left > 0 else 0.05
    return {"decode": {"actors": n_dec, "num_cpus": dec_cpus}, "tokenize": tok}


def run_tokenize(cfg: TokenizeConfig, *, out=sys.stderr) -> dict[str, Any]:
    """Run (or resume) a tokenization job; returns the run summary (also written to OUT)."""
    t0 = time.perf_counter()
    plan = prepare(cfg)
    progress = Progress(total_shards=len(plan.shards), done=plan.done, enabled=cfg.progress, file=out)
    sizes: dict[str, Any] = {}
    if plan.pending:
        ray, owns = _init_ray(cfg)
        try:
            sizes = stage_sizes(cfg, ray.cluster_resources())
            _execute(ray, cfg, plan, sizes, progress)
        finally:
            if owns:
                ray.shutdown()
    progress.close()
    return finish(cfg, plan, progress, time.perf_counter() - t0, sizes)


def _execute(ray, cfg: TokenizeConfig, plan: JobPlan, sizes: dict, progress: Progress) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    # Ray Data logs every execution plan at INFO on the console; the job's own progress line and
    # table say what matters. Its log files (in the Ray session directory) keep everything.
    for h in logging.getLogger("ray.data").handlers:
        if type(h) is logging.StreamHandler:
            h.setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False
    # Most pipelines have fewer input shards in flight than actors would want: keep the object
    # store from filling with decoded frames ahead of the tokenizer.
    ctx.target_max_block_size = 64 << 20

    rows = [{"shard_id": s.id, "items": s.items_json()} for s in plan.pending]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    dec, tok = sizes["decode"], sizes["tokenize"]
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={"decode_cfg": cfg.decode_config().to_dict(), "storage_options": cfg.storage_options},
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=dec["actors"]),
        num_cpus=dec["num_cpus"],
    )
    tok_args: dict[str, Any] = {"num_gpus": tok["num_gpus"]} if tok["num_gpus"] else {}
    ds = ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs={"spec": cfg.tokenizer, "batch_size": cfg.batch_size, "cpus": tok["num_cpus"]},
        batch_size=cfg.rows_per_batch,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=tok["actors"]),
        num_cpus=tok["num_cpus"],
        **tok_args,
    )
    asm = ShardAssembler(
        cfg.output,
        {s.id: s.descriptor() for s in plan.pending},
        codebook_size=plan.codebook_size,
        tokenizer=plan.tokenizer,
        resolution=cfg.resolution,
        format=cfg.format,
        compression=cfg.compression,
        settings=cfg.settings(),
        grid=(cfg.resolution // plan.tokenizer["downsample"],) * 2,
        storage_options=cfg.storage_options,
    )
    progress.start()
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
        for rec in table_to_records(batch):
            side = asm.add(rec)
            progress.record(rec)
            if side is not None:
                progress.committed(side)
    if asm.in_flight():
        raise RuntimeError(f"{asm.in_flight()} input shards did not complete; rerun the same command to resume")


def finish(cfg: TokenizeConfig, plan: JobPlan, progress: Progress, elapsed: float, sizes: dict) -> dict[str, Any]:
    """manifest.json (from the sidecars), then run_summary.json; prints the final table."""
    import schemas
    from pipeline.shards import committed_shards, errors_by_reason, write_manifest

    so = cfg.storage_options
    # One listing; only the sidecars committed by this run are fetched (plan.done was read at planning).
    sides = committed_shards(cfg.output, so, known=plan.done)
    missing = sorted({s.id for s in plan.shards} - {s["shard_id"] for s in sides})
    if missing:
        raise RuntimeError(f"shards {missing[:5]} are not committed; rerun the same command to resume")
    manifest = write_manifest(cfg.output, so, sidecars=sides)
    counts = {k: sum(int(s["counts"].get(k, 0)) for s in sides) for k in ("rows", "frames", "tokens")}
    counts["inputs"] = sum(int(s["counts"].get("inputs", 0)) for s in sides)
    counts["inputs_failed"] = sum(len(s["errors"]) for s in sides)
    run_tokens = progress.tokens
    summary = schemas.new_document(
        "run_summary",
        dataset=cfg.dataset,
        input=storage.redact(cfg.input),
        output=storage.redact(cfg.output),
        tokenizer=plan.tokenizer,
        settings={**cfg.settings(), "stages": sizes, "ray_address": cfg.ray_address or "embedded",
                  "batch_size": cfg.batch_size, "rows_per_batch": cfg.rows_per_batch},
        shards={"total": len(plan.shards), "committed": len(plan.pending), "skipped": len(plan.done)},
        counts=counts,
        errors_by_reason=errors_by_reason(sides),
        elapsed_s=elapsed,
        tokens_per_s=(run_tokens / progress.work_s) if progress.work_s > 0 else 0.0,
        steady_tokens_per_s=progress.steady_tokens_per_s or 0.0,
        manifest_hash=manifest["content_hash"],
    )
    storage.write_json(storage.join(cfg.output, RUN_SUMMARY), summary, "run_summary", so)
    progress.final_table(summary)
    return summary
