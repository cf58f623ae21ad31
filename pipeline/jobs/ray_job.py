"""The tokenization job on Ray Data (the only module of the pipeline that knows Ray).

    pending input shards (one row each: shard id + its row range of the work list, whose compact
                       Arrow rows a Ray task loads into the object store once)
      → DecodeStage    autoscaling actor pool (CPU); each actor keeps one watchdog decode subprocess
                       and streams a shard's chunks as blocks of ≤ decode_block_bytes of frames
                       (32 MB for CPU tokenizers, 256 MB for GPU ones), the end record riding in
                       the last block
      → TokenizeStage  autoscaling actor pool, one GPU per actor when GPUs are asked for (or
                       `tokenizer_cpus` CPUs each), `batch_size` frames per forward pass, calls of
                       tokenizer_batch_rows rows (≈ 1 GB of frames on a GPU: many forward passes)
                       at the job's precision; frames are replaced by uint16 codes, which go
                       straight to the shard's writer actor; the stage hands Ray Data one number
      → ShardWriterActor  `writers` actors; shard s belongs to writer s % writers, which holds its
                       rows (deduplicated by key) and, once the shard is complete, commits it itself,
                       exactly once, on its own threads: sorts, encodes, hashes and uploads the data
                       file under its final name, then writes the sidecar (the commit point)
      → driver         runs Ray Data's streaming executor (`--executors 1`) or waits for K
                       StreamExecutor actors, each running one over every K-th pending shard with
                       its own pools (the default: one per EXECUTOR_GPUS tokenizer GPUs); the stage's
                       output blocks are taken without fetching them; a poller thread asks the
                       writers 4 times per second what they committed (sidecars, counts, placement)
      → manifest.json, then run_summary.json (with where each stage ran)

No token and no commit passes through the driver: an executor's cost is per block Ray Data moves
and per wall second, the driver's per wall second × writers (the poll), not per token or per
shard (bench/driver_cost.py). A SIGKILL
at any instant leaves at worst data files without sidecars (debris, cleaned by the next run),
never a partial shard. Writers outlive the killed driver by seconds, so a rerun's clean-up may race
their last commits; store.clean_debris says why that is safe.

The two stages ask for different resources, so Ray Data keeps them as separate operators (it would
otherwise fuse a map into the following one). Pools have a minimum and a maximum: on a cluster the
tokenizer pool is created with its GPU request whether or not a GPU node is up (the pending actor
is what makes Ray's autoscaler start one), and Ray Data grows each pool with its queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.jobs.config import CPU_DECODE_BLOCK_BYTES, EXECUTOR_GPUS, TokenizeConfig
from pipeline.jobs.plan import RUN_SUMMARY, JobError, JobPlan, prepare
from pipeline.jobs.progress import Progress
from pipeline.jobs.steps import (
    ROW_META,
    ShardBuffer,
    decode_input_shard,
    new_decode_worker,
    token_grid,
    tokenize_records,
    torch_threads,
    write_shard,
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


# How often the driver asks the writers what they committed: its cost is per wall second × writers.
POLL_S = 0.25


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
            cols["end"].append(json.dumps({k: r[k] for k in ("expected_rows", "num_items", "errors", "decode_s", "blocks", "node")
                                           if k in r}))
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


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class DecodeStage:
    """Ray Data actor: decode the input shards of a batch (one per call), streaming blocks."""

    def __init__(self, decode_cfg: dict, storage_options: dict | None, worklist: list, shards: list,
                 block_bytes: int = CPU_DECODE_BLOCK_BYTES) -> None:
        import ray

        from pipeline.decode import DecodeConfig

        self.worker = new_decode_worker(DecodeConfig.from_dict(decode_cfg), storage_options)
        self.node = _node_id()
        self.block_bytes = block_bytes
        # [ObjectRef] of the work list's compact rows (WORKLIST_SCHEMA), put once by the driver: read
        # from this node's object store without a copy, shared by every decode actor on the node.
        self.worklist: pa.Table = ray.get(worklist[0])
        self.shards: np.ndarray = ray.get(shards[0])  # (n, 3) int64 [shard id, start, stop], by dataset row

    def __call__(self, batch: pa.Table):
        from pipeline.sources.items import expand_items

        for i in batch["id"].to_pylist():
            sid, start, stop = (int(v) for v in self.shards[i])
            items = expand_items(self.worklist.slice(start, stop - start)).to_pylist()
            for block in decode_input_shard(sid, items, self.worker, max_block_bytes=self.block_bytes):
                if block[-1]["type"] == "end":
                    block[-1]["node"] = self.node  # where the shard was decoded, for the run summary
                yield records_to_table(block)


# What the tokenizer stage hands Ray Data: one row per call, which nobody reads (the driver counts
# the blocks without fetching them; counts and completions reach it from the writers).
DONE_SCHEMA = pa.schema([("frames", pa.int64())])


def device_for(torch_mod) -> str:
    """"cuda" when this process has a usable CUDA device, else "cpu".

    Ray sets CUDA_VISIBLE_DEVICES for an actor that reserved a GPU, but a node may declare GPUs it
    cannot drive (a fake or misconfigured node, a missing driver): the device is what torch can
    use, not what Ray reserved.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "cpu"
    return "cuda" if torch_mod.cuda.is_available() else "cpu"


class TokenizeStage:
    """Ray Data actor: load the tokenizer once (on this actor's GPU if it has one), encode at the
    job's precision, and hand the tokens to their shards' writer actors; returns one row (its
    frame count, DONE_SCHEMA) that nobody fetches.

    A call encodes all its frames in forward passes of `batch_size` frames (at least
    VisualTokenizer.GPU_MIN_FORWARD on a GPU) across record boundaries; the job sizes the calls so
    that they hold at least that many frames, on GPUs many times that
    (TokenizeConfig.tokenizer_batch_rows). Nothing is held back between calls, so an input shard's
    last records never wait for a call that may not come."""

    def __init__(self, spec: str, batch_size: int, cpus: float, precision: str,
                 writers: list | None = None) -> None:
        import torch

        from pipeline.tokenizers import load_tokenizer

        self.tok = load_tokenizer(spec)
        self.device = device_for(torch)
        if self.device == "cuda":
            self.tok = self.tok.to("cuda", precision)
        else:
            torch.set_num_threads(torch_threads(cpus))
            self.tok = self.tok.to("cpu", precision)
        self.batch_size = batch_size
        self.writers = writers or []
        self.node = _node_id() if self.writers else ""

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        recs = tokenize_records(self.tok, table_to_records(batch), self.batch_size)
        if not self.writers:
            return records_to_table(recs)
        n = len(self.writers)
        groups: dict[int, list[dict]] = {}
        for r in recs:
            groups.setdefault(int(r["shard_id"]) % n, []).append(r)
        # Wait for the writers to hold the rows before returning: when the stage's last output is
        # in, every record is with its writer (and every complete shard queued for its commit).
        ray.get([self.writers[w].add.remote(g, self.node, self.device) for w, g in groups.items()])
        frames = sum(int(r["num_frames"]) for r in recs if r["type"] == "chunk")
        return pa.table({"frames": [frames]}, schema=DONE_SCHEMA)


class ShardWriterActor:
    """Holds the tokenized rows of the input shards routed to it and commits each shard itself,
    exactly once, as soon as it is complete: on its own threads it sorts, encodes, hashes and
    uploads the data file, then writes the sidecar (the commit point). The driver learns what
    happened by polling (`poll`, a few times per second): committed sidecars, counts, placement.

    Threaded (Ray's max_concurrency): the stages' `add` calls and the driver's polls are served
    while commits run."""

    def __init__(self, out_url: str, shards: dict[int, dict], grid: tuple[int, int], kw: dict,
                 commit_threads: int = 4) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.out_url = out_url
        self.shards = shards
        self.grid = tuple(grid)
        self.kw = kw
        self.buffer = ShardBuffer(shards)
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        # Commits wait on storage (PUTs, fsync): a few threads keep a slow one from holding the rest.
        self.pool = ThreadPoolExecutor(max_workers=commit_threads, thread_name_prefix="commit")
        self.node = _node_id()
        self.error: str | None = None
        self.queued = 0  # complete shards handed to the pool, not yet committed (or failed)
        self._new()

    def _new(self) -> None:
        """Start a new report: what happened since the last poll."""
        self.report: dict[str, Any] = {"sidecars": [], "rows": 0, "frames": 0, "tokens": 0, "adds": 0,
                                       "decode_blocks": 0, "tokenize": {}, "devices": {}, "decode": {},
                                       "commit_cpu_s": 0.0}

    def add(self, records: list[dict], node: str = "", device: str = "") -> None:
        """Take records from one tokenizer call; queue the commit of each shard they complete."""
        with self.lock:
            if self.error:
                raise RuntimeError(f"shard writer on node {self.node} stopped after a failed commit: {self.error}")
            rep = self.report
            rep["adds"] += 1
            touched: set[int] = set()
            for r in records:
                touched.add(int(r["shard_id"]))
                if r["type"] == "chunk":
                    rep["rows"] += 1
                    rep["frames"] += int(r["num_frames"])
                    rep["tokens"] += int(r["tokens"].size)
                sid = self.buffer.add(r)
                if sid is None:
                    continue
                # Taken now, under the lock: a repeat of this shard's records (a retried task) is
                # ignored from here on, so the shard is committed once.
                rows, end, wall_s = self.buffer.take(sid)
                rep["decode_blocks"] += int(end.get("blocks", 1))
                dnode = end.get("node")
                if dnode:
                    rep["decode"][dnode] = rep["decode"].get(dnode, 0) + 1
                self.queued += 1
                self.pool.submit(self._commit, sid, rows, end, wall_s)
            if node:
                rep["tokenize"][node] = rep["tokenize"].get(node, 0) + len(touched)
            if device:
                rep["devices"][device] = rep["devices"].get(device, 0) + len(touched)

    def _commit(self, sid: int, rows: list[dict], end: dict, wall_s: float) -> None:
        c0 = time.thread_time()
        try:
            side = write_shard(self.out_url, sid, rows, end, input_shard=self.shards[sid], grid=self.grid,
                               wall_s=wall_s, **self.kw)
        except BaseException as e:  # noqa: BLE001 - reported to the driver, which fails the job
            with self.lock:
                self.error = self.error or f"shard {sid}: {type(e).__name__}: {storage.redact(str(e))}"
                self.queued -= 1
                self.idle.notify_all()
            return
        with self.lock:
            self.report["sidecars"].append(side)
            self.report["commit_cpu_s"] += time.thread_time() - c0
            self.queued -= 1
            self.idle.notify_all()

    def poll(self, drain: bool = False) -> dict[str, Any]:
        """What happened since the last poll: committed sidecars (as written), counts, where the
        work ran, and a failed commit's message (`error`). `drain`: first wait until every queued
        commit has finished (the job's end)."""
        with self.lock:
            if drain:
                self.idle.wait_for(lambda: self.queued == 0)
            rep = self.report
            self._new()
            return {**rep, "node": self.node, "error": self.error}


def job_precision(cfg: TokenizeConfig) -> str:
    """The precision the job's tokenizer actors compute at: --precision, else bf16 when stage_sizes
    gives them GPUs and fp32 otherwise. Asks the cluster for its resources when it must (joining it
    if --ray-address is given); an embedded job that has not started Ray counts this machine's."""
    if cfg.num_gpus == 0:
        return cfg.tokenizer_precision(gpu_actors=False)
    import ray

    if ray.is_initialized() or cfg.ray_address:
        _init_ray(cfg)
        cluster = ray.cluster_resources()
    else:
        import torch

        # What the embedded ray.init() will find.
        cluster = {"CPU": float(cfg.num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    sizes = stage_sizes(cfg, cluster, fixed=cfg.ray_address is None)
    return cfg.tokenizer_precision(gpu_actors=bool(sizes["tokenize"]["num_gpus"]))


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


@contextlib.contextmanager
def ray_session(cfg: TokenizeConfig) -> Iterator[None]:
    """Ray for several `run_tokenize` calls in a row: each joins the running Ray and leaves it up, so
    its start and stop are paid once; stopped on exit when it was started here. `cfg` says which Ray:
    embedded with `num_cpus`, or the cluster at `ray_address`."""
    ray, owns = _init_ray(cfg)
    try:
        yield
    finally:
        if owns:
            ray.shutdown()


def stage_sizes(cfg: TokenizeConfig, cluster: dict[str, float], *, fixed: bool) -> dict[str, Any]:
    """Pool bounds and per-actor resources of each stage.

    `fixed`: the Ray instance is this machine's embedded one (no autoscaler), so `cluster` is all
    there will ever be and pools are sized to fill it. Otherwise (a cluster) nothing is derived
    from what happens to be up now except the default GPU count: pools start at one actor and may
    grow to their maximum (None = no bound), and Ray's autoscaler is asked for the nodes.
    """
    gpus_now = int(cluster.get("GPU", 0))
    n_gpu = gpus_now if cfg.num_gpus is None else cfg.num_gpus
    if fixed and n_gpu > gpus_now:
        raise RuntimeError(f"--num-gpus {n_gpu} but this machine's embedded Ray has {gpus_now} GPUs; "
                           "join an (autoscaling) cluster with --ray-address to get more")
    if n_gpu:
        tok = {"min": 1, "max": n_gpu, "num_gpus": 1, "num_cpus": min(1.0, cfg.tokenizer_cpus)}
    else:
        tok = {"min": 1, "max": cfg.cpu_actors, "num_gpus": 0, "num_cpus": cfg.tokenizer_cpus}
    n_writers = cfg.writers if cfg.writers is not None else max(1, math.ceil(tok["max"] / 8))
    write = {"actors": n_writers, "num_cpus": cfg.writer_cpus}
    n_exec = cfg.executors if cfg.executors is not None else max(1, math.ceil(n_gpu / EXECUTOR_GPUS))
    if n_exec > tok["max"]:
        raise RuntimeError(f"--executors {n_exec} needs at least {n_exec} tokenizer actors (each executor runs its own "
                           f"pool) but the job has {tok['max']}; lower --executors or raise "
                           f"{'--num-gpus' if n_gpu else '--cpu-actors'}")
    # An executor actor is a driver's worth of Ray Data work: on a cluster it reserves a core (on
    # a CPU node: the launcher's head has none); embedded, it is not counted, as the driver is not.
    execs = {"count": n_exec, "num_cpus": 0.0 if (fixed or n_exec == 1) else 1.0}
    dec_cpus = cfg.decode_cpus
    if not fixed:
        dec = {"min": 1, "max": cfg.decode_concurrency, "num_cpus": dec_cpus}
        return {"decode": dec, "tokenize": tok, "write": write, "executors": execs}
    left = float(cluster.get("CPU", 1)) - tok["max"] * tok["num_cpus"] - n_writers * cfg.writer_cpus
    if cfg.decode_concurrency is not None:
        n_dec = cfg.decode_concurrency
    else:
        n_dec = max(1, math.floor(left / dec_cpus + 1e-9))
    n_dec = max(n_dec, n_exec)
    if n_dec * dec_cpus > left + 1e-9:
        # Fit the decode actors into what the tokenizer leaves (they mostly wait on their subprocess).
        dec_cpus = max(0.05, left / n_dec) if left > 0 else 0.05
    tok = {**tok, "min": tok["max"]}
    return {"decode": {"min": n_dec, "max": n_dec, "num_cpus": dec_cpus}, "tokenize": tok, "write": write,
            "executors": execs}


def executor_share(sizes: dict, k: int) -> dict:
    """Executor k's part of the job's pools: the bounds split as evenly as integers allow (each at
    least one actor; an unbounded maximum stays unbounded)."""
    n = sizes["executors"]["count"]

    def part(v: int | None) -> int | None:
        return None if v is None else max(1, v // n + (k < v % n))

    return {**sizes, **{st: {**sizes[st], "min": part(sizes[st]["min"]), "max": part(sizes[st]["max"])}
                        for st in ("decode", "tokenize")}}


def run_tokenize(cfg: TokenizeConfig, *, out=None) -> dict[str, Any]:
    """Run (or resume) a tokenization job; returns the run summary (also written to OUT).

    `out`: where progress goes (default: sys.stderr as it is at call time, not at import).
    """
    out = sys.stderr if out is None else out
    t0 = time.perf_counter()
    try:
        precision = job_precision(cfg)
    except ValueError as e:
        raise JobError(str(e)) from None
    plan = prepare(cfg, precision=precision)
    progress = Progress(total_shards=len(plan.shards), done=plan.done, enabled=cfg.progress, file=out)
    sizes: dict[str, Any] = {}
    placement: dict[str, Any] = {}
    if plan.pending:
        ray, owns = _init_ray(cfg)
        try:
            sizes = stage_sizes(cfg, ray.cluster_resources(), fixed=cfg.ray_address is None)
            placement = _execute(ray, cfg, plan, sizes, progress)
        finally:
            if owns:
                ray.shutdown()
    progress.close()
    return finish(cfg, plan, progress, time.perf_counter() - t0, sizes, placement)


def _pool(bounds: dict) -> Any:
    from ray.data import ActorPoolStrategy

    if bounds["max"] is not None and bounds["min"] == bounds["max"]:
        return ActorPoolStrategy(size=bounds["min"])
    return ActorPoolStrategy(min_size=bounds["min"], max_size=bounds["max"])


class _Driver:
    """The driver's view of the writers: folds their poll reports into the plan (committed
    sidecars), the progress line and the placement, and keeps the costs bench/driver_cost.py reads."""

    def __init__(self, ray, writers: list, plan: JobPlan, progress: Progress) -> None:
        import threading

        self.ray, self.writers, self.plan, self.progress = ray, writers, plan, progress
        self.lock = threading.Lock()
        self.placement: dict[str, dict[str, int]] = {"decode": {}, "tokenize": {}, "write": {}}
        self.devices: dict[str, int] = {}
        self.committed: set[int] = set()
        self.error: str | None = None
        self.lost: str | None = None
        self.stats = {"polls": 0, "poll_cpu_s": 0.0, "commit_cpu_s": 0.0, "writer_adds": 0, "decode_blocks": 0}

    def poll(self, drain: bool = False) -> None:
        """Ask every writer what happened since the last poll (`drain`: after its queued commits)."""
        c0 = time.thread_time()
        try:
            reports = self.ray.get([w.poll.remote(drain) for w in self.writers])
        except self.ray.exceptions.RayActorError as e:
            # A writer held the rows of its shards in flight: they are gone (it is not restarted).
            with self.lock:
                self.lost = self.lost or f"a shard writer actor was lost ({type(e).__name__})"
            return
        with self.lock:
            for rep in reports:
                self._apply(rep)
            self.stats["polls"] += 1
            self.stats["poll_cpu_s"] += time.thread_time() - c0

    def _apply(self, rep: dict) -> None:
        if rep["adds"]:
            self.progress.counts(rep["rows"], rep["frames"], rep["tokens"])
        for key in ("tokenize", "decode"):
            for node, n in rep[key].items():
                self.placement[key][node] = self.placement[key].get(node, 0) + n
        for dev, n in rep["devices"].items():
            self.devices[dev] = self.devices.get(dev, 0) + n
        for side in rep["sidecars"]:
            sid = int(side["shard_id"])
            if sid in self.committed:  # cannot happen (a writer takes a shard once); never count twice
                continue
            self.committed.add(sid)
            self.plan.committed.append(side)
            self.progress.committed(side)
        if rep["sidecars"]:
            self.placement["write"][rep["node"]] = self.placement["write"].get(rep["node"], 0) + len(rep["sidecars"])
        # One per (tokenizer call, writer it fed): the tokenizer calls themselves are the driver's "blocks".
        self.stats["writer_adds"] += rep["adds"]
        self.stats["decode_blocks"] += rep["decode_blocks"]
        self.stats["commit_cpu_s"] += rep["commit_cpu_s"]
        if rep["error"] and not self.error:
            self.error = rep["error"]

    def failure(self) -> str | None:
        with self.lock:
            if self.error:
                return f"committing a shard failed ({self.error}); fix the cause and rerun the same command to resume"
            if self.lost:
                return f"{self.lost}: the shards it held are not committed; rerun the same command to resume"
            return None


def _rusage_cpu(a, b) -> float:
    return (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)


def _worklist_rows(out_url: str, storage_options: dict | None, sha256: str, limit: int | None) -> pa.Table:
    """The job's frozen work list's compact rows (WORKLIST_SCHEMA), first `limit` rows when given:
    run as a Ray task, so the table is made in the object store by a worker (reconstructible from
    the frozen file if its node goes), never copied through the driver."""
    from pipeline.jobs.plan import WORKLIST_DIR
    from pipeline.sources import load_worklist

    wl = load_worklist(storage.join(out_url, WORKLIST_DIR), storage_options=storage_options)
    if wl.sha256 != sha256:
        raise RuntimeError(f"the work list in {storage.redact(out_url)} changed under the job "
                           f"(sha256 {wl.sha256[:12]}…, planned {sha256[:12]}…); rerun to plan again")
    return wl.table.slice(0, limit) if limit else wl.table


def stream_inputs(ray, cfg: TokenizeConfig, plan: JobPlan) -> tuple[np.ndarray, list]:
    """What the decode stage is handed: `[shard id, start, stop]` (int64, (n, 3)) per pending
    input shard, its row range of the work list, and `[ObjectRef]` of the work list's compact rows,
    which a Ray task loads from the frozen work list into the object store once. The driver adds
    nothing per item to the plan (no item dicts, no JSON, no copy of the table); each decode actor
    reads the table from its node's object store without a copy and expands its shard's rows."""
    if any(s.source_start for s in plan.pending):
        raise RuntimeError("input shards of a job plan index the whole work list (source_start 0)")
    shards = np.array([(s.id, s.start, s.stop) for s in plan.pending], dtype=np.int64).reshape(-1, 3)
    task = ray.remote(_worklist_rows).options(num_cpus=0, max_retries=3)
    return shards, [task.remote(cfg.output, cfg.storage_options, plan.worklist_sha256, cfg.limit)]


def _shard_rows(n: int):
    """A Ray Data datasource of the rows {"id": i}, i < n, one per block (one read task each)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read(i: int):
        return lambda: [pa.table({"id": pa.array([i], type=pa.int64())})]

    class ShardRows(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return 8 * n

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(read(i), BlockMetadata(num_rows=1, size_bytes=8, exec_stats=None)) for i in range(n)]

    return ShardRows()


def _stream(ray, cfg: TokenizeConfig, shards: np.ndarray, worklist: list, writers: list, sizes: dict, precision: str,
            stop: Callable[[], bool]) -> dict[str, Any]:
    """Build the decode → tokenize dataset over `shards` (pending input shards as row ranges of
    the work list `worklist` = [ObjectRef], from `stream_inputs`) and run Ray Data's
    streaming executor over it in this process, taking the stage's output blocks without fetching
    them, until it ends or `stop()` says so. Returns this process's costs (what
    bench/driver_cost.py turns into "GPUs one executor can feed")."""
    from ray.data import DataContext

    # Ray Data logs every execution plan at INFO on the console; the job's own progress line and
    # table say what matters. Its log files (in the Ray session directory) keep everything.
    for h in logging.getLogger("ray.data").handlers:
        if type(h) is logging.StreamHandler:
            h.setLevel(logging.WARNING)
    dec, tok = sizes["decode"], sizes["tokenize"]
    gpu = bool(tok["num_gpus"])
    block_bytes = cfg.decode_block_bytes(gpu_actors=gpu)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.execution_options.preserve_order = False
    ctx.execution_options.verbose_progress = False
    # Decode blocks are cut at the first chunk past block_bytes of frames. With Ray Data's target at
    # the same bound each of them leaves the actor as one block as soon as it is made (Ray Data
    # slices only blocks 1.5x past the target), and the shard's last one when its call ends.
    ctx.target_max_block_size = block_bytes

    ru0, loop0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
    # One dataset row (and block) per shard, made by read tasks that ask for no CPU: the driver
    # holds the read tasks, not a block per shard (from_items made them here, ~6 KB each), and the
    # reads never wait for a CPU the decode pool holds. Decode actors look the row's shard up in `index`.
    index = [ray.put(shards)]
    ds = ray.data.read_datasource(_shard_rows(len(shards)), num_cpus=0, override_num_blocks=len(shards))
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_kwargs={"decode_cfg": cfg.decode_config().to_dict(), "storage_options": cfg.storage_options,
                               "worklist": worklist, "shards": index, "block_bytes": block_bytes},
        batch_size=1,
        batch_format="pyarrow",
        compute=_pool(dec),
        num_cpus=dec["num_cpus"],
    )
    tok_args: dict[str, Any] = {"num_gpus": tok["num_gpus"]} if gpu else {}
    ds = ds.map_batches(
        TokenizeStage,
        fn_constructor_kwargs={"spec": cfg.tokenizer, "batch_size": cfg.batch_size, "cpus": tok["num_cpus"],
                               "precision": precision, "writers": writers},
        batch_size=cfg.tokenizer_batch_rows(gpu_actors=gpu),
        batch_format="pyarrow",
        compute=_pool(tok),
        num_cpus=tok["num_cpus"],
        **tok_args,
    )
    stats: dict[str, Any] = {"blocks": 0, "input_blocks": len(shards)}
    steady0: tuple = ()
    for bundle in ds.iter_internal_ref_bundles():
        if not stats["blocks"]:
            # Everything before the first output is start-up (planning the dataset, creating the
            # actors); from here on the executor runs in its steady state.
            steady0 = (resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter())
        stats["blocks"] += len(bundle.blocks)
        if stop():
            break
    ru1, loop1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
    stats.update(cpu_s=_rusage_cpu(ru0, ru1), loop_cpu_s=loop1 - loop0, wall_s=wall1 - wall0)
    if steady0:
        stats.update(steady_cpu_s=_rusage_cpu(steady0[0], ru1), steady_loop_cpu_s=loop1 - steady0[1],
                     steady_wall_s=wall1 - steady0[2])
    return stats


class StreamExecutor:
    """An actor running one Ray Data streaming executor (`_stream`) over its part of the pending
    shards, when the job has more than one. Its pools and their actors are its own (they end with
    it); the writers are the job's. Not restarted: a lost executor fails the job, and a rerun
    resumes from what the writers committed."""

    def run(self, cfg: TokenizeConfig, shards: np.ndarray, worklist: list, writers: list, sizes: dict,
            precision: str) -> dict:
        import ray

        return {**_stream(ray, cfg, shards, worklist, writers, sizes, precision, stop=lambda: False), "node": _node_id()}


def _execute(ray, cfg: TokenizeConfig, plan: JobPlan, sizes: dict, progress: Progress) -> dict[str, Any]:
    """Stream the pending shards through the stages; returns where each stage ran."""
    import threading

    descriptors = {s.id: s.descriptor() for s in plan.pending}
    kw = dict(codebook_size=plan.codebook_size, tokenizer=plan.tokenizer, resolution=cfg.resolution,
              format=cfg.format, compression=cfg.compression, settings=cfg.settings(),
              storage_options=cfg.storage_options)
    grid = token_grid(plan.tokenizer, cfg.resolution)
    wr = sizes["write"]
    # Writers are the only holders of rows in flight: a restarted writer would have lost them, so
    # it is not restarted; its shards stay uncommitted and the job says to rerun (exactly-once
    # holds: nothing half-made is ever committed).
    writer_cls = ray.remote(ShardWriterActor).options(num_cpus=wr["num_cpus"], max_concurrency=16, max_restarts=0)
    writers = [writer_cls.remote(cfg.output, {k: v for k, v in descriptors.items() if k % wr["actors"] == w}, grid, kw)
               for w in range(wr["actors"])]

    shards, worklist = stream_inputs(ray, cfg, plan)
    precision = plan.tokenizer["precision"]
    n_exec = min(sizes["executors"]["count"], len(shards))
    sizes = {**sizes, "executors": {**sizes["executors"], "count": n_exec}}  # no executor without shards
    state = _Driver(ray, writers, plan, progress)
    stop = threading.Event()

    def poller() -> None:
        # Cost per wall second × writers, whatever the token rate.
        while not stop.wait(POLL_S):
            try:
                state.poll()
            except Exception as e:  # noqa: BLE001 - a dead poller would freeze progress and hide failures
                with state.lock:
                    state.error = state.error or f"polling the shard writers failed: {type(e).__name__}: {e}"
                return

    # The driver's own CPU (this process, all threads) over the streaming phase, and each
    # executor's (in the driver itself when there is one): bench/driver_cost.py reads them.
    ru0, loop0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
    progress.start()
    thread = threading.Thread(target=poller, name="toto-poll", daemon=True)
    thread.start()
    execs: list = []
    try:
        if n_exec == 1:
            executors = [_stream(ray, cfg, shards, worklist, writers, sizes, precision,
                                 stop=lambda: state.failure() is not None)]
        else:
            ex_cls = ray.remote(StreamExecutor).options(num_cpus=sizes["executors"]["num_cpus"], max_restarts=0,
                                                        scheduling_strategy="SPREAD")
            execs = [ex_cls.remote() for _ in range(n_exec)]
            # Shard k goes to executor k % n: each sees the plan's order, and their shards interleave.
            waiting = {e.run.remote(cfg, shards[k::n_exec].copy(), worklist, writers, executor_share(sizes, k), precision): k
                       for k, e in enumerate(execs)}
            done_stats: dict[int, dict] = {}
            while waiting and state.failure() is None:
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    done_stats[waiting.pop(ref)] = ray.get(ref)
            executors = [done_stats[k] for k in sorted(done_stats)]
    except Exception as e:
        stop.set()
        thread.join()
        _kill(ray, execs)
        state.poll()
        why = state.failure()
        if why:
            raise RuntimeError(why) from e
        if isinstance(e, ray.exceptions.RayActorError):
            raise RuntimeError(f"a stream executor actor was lost ({type(e).__name__}); rerun the same command "
                               "to resume") from e
        raise
    stop.set()
    thread.join()
    _kill(ray, execs)  # after a failure, the others' pools stop with them
    state.poll(drain=True)  # every record is with its writer: wait for the commits they queued
    ru1, loop1, wall1 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
    why = state.failure()
    if why:
        raise RuntimeError(why)

    driver: dict[str, Any] = {**state.stats, "cpu_s": _rusage_cpu(ru0, ru1), "loop_cpu_s": loop1 - loop0,
                              "wall_s": wall1 - wall0, "shards": len(state.committed), "input_blocks": len(shards),
                              "blocks": sum(x["blocks"] for x in executors)}
    if n_exec == 1:
        # The executor's start-up (building the dataset, creating the actors) ran in this process.
        ex = executors[0]
        if "steady_cpu_s" in ex:
            driver.update(steady_cpu_s=driver["cpu_s"] - (ex["cpu_s"] - ex["steady_cpu_s"]),
                          steady_loop_cpu_s=driver["loop_cpu_s"] - (ex["loop_cpu_s"] - ex["steady_loop_cpu_s"]),
                          steady_wall_s=driver["wall_s"] - (ex["wall_s"] - ex["steady_wall_s"]))
    else:
        # The driver only polls and waits: its steady state is the whole phase.
        driver.update(steady_cpu_s=driver["cpu_s"], steady_loop_cpu_s=driver["loop_cpu_s"],
                      steady_wall_s=driver["wall_s"], executors=executors)
    left = len(plan.pending) - len(state.committed)
    if left:
        raise RuntimeError(f"{left} input shards did not complete; rerun the same command to resume")
    return {**_describe_placement(ray, state.placement, state.devices), "driver": driver}


def _kill(ray, actors: list) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _describe_placement(ray, placement: dict[str, dict[str, int]], devices: dict[str, int]) -> dict[str, Any]:
    """Per stage: the nodes it ran on (id, declared resources, node type when the cluster says) and
    how much of its work each did; the tokenizer's device(s) too."""
    nodes = {n["NodeID"]: n for n in ray.nodes()}

    def where(node_id: str) -> dict[str, Any]:
        n = nodes.get(node_id, {})
        res = {k: v for k, v in (n.get("Resources") or {}).items() if k in ("CPU", "GPU") or k.startswith("accelerator")}
        labels = n.get("Labels") or {}
        kind = labels.get("ray.io/node-group") or labels.get("ray.io/node-type") or n.get("NodeName", "")
        return {"node_id": node_id, "resources": res, "node_type": str(kind), "head": "node:__internal_head__" in (n.get("Resources") or {})}

    out: dict[str, Any] = {}
    unit = {"decode": "shards", "tokenize": "shard_batches", "write": "shards"}
    for stage, counts in placement.items():
        out[stage] = {"nodes": [{**where(k), unit[stage]: v} for k, v in sorted(counts.items())]}
    out["tokenize"]["devices"] = dict(sorted(devices.items()))
    return out


def finish(cfg: TokenizeConfig, plan: JobPlan, progress: Progress, elapsed: float, sizes: dict,
           placement: dict | None = None) -> dict[str, Any]:
    """manifest.json (from the sidecars), then run_summary.json; prints the final table."""
    import schemas
    from pipeline.shards import committed_shards, errors_by_reason, write_manifest

    placement = dict(placement or {})
    driver = placement.pop("driver", {})
    so = cfg.storage_options
    # One listing and no sidecar GET: plan.done was read at planning and the driver wrote the rest.
    sides = committed_shards(cfg.output, so, known=[*plan.done, *plan.committed])
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
        placement=placement,
        driver=driver,
    )
    storage.write_json(storage.join(cfg.output, RUN_SUMMARY), summary, "run_summary", so)
    progress.final_table(summary)
    return summary
