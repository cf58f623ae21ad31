"""The tokenization job's steps as plain functions and classes (no Ray here; pipeline.jobs.ray_job
wires them onto Ray Data).

Records flowing between the steps are dicts:

    chunk record  {"type": "chunk", "shard_id", "key", "dataset", "split", "video_id", "label",
                   "chunk", "t_start", "fps", "num_frames", "frames": uint8 (T, R, R, 3)}
                  after tokenization "frames" is replaced by "tokens": uint16 (T, gh, gw)
    end record    {"type": "end", "shard_id", "expected_rows", "num_items", "errors": [{uri, reason}],
                   "decode_s", "blocks"}: the last record of an input shard; it says how many chunk
                   records the shard produced, so the writer knows when the shard is complete even
                   though the stages in between may reorder records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from pipeline.decode import DecodeConfig, DecodeWorker
from pipeline.jobs.config import CPU_DECODE_BLOCK_BYTES
from pipeline.shards import ShardWriter

ROW_META = ("key", "dataset", "split", "video_id", "label", "chunk", "t_start", "fps", "num_frames")


def tokenizer_info(tok: Any, precision: str | None = None) -> dict[str, Any]:
    """`{id, sha256, vocab_size, downsample, precision}` of a VisualTokenizer, as ShardWriter records it.

    The tokenizer's `id` string includes its weights' sha256; `sha256` is taken from the attribute
    when the tokenizer has one, otherwise from the id's last ':'/'-'/'@'-separated hex part.
    `precision` is the one the job's tokenizer actors compute at (default: the tokenizer's own,
    fp32 for one without the attribute): codes of other precisions differ, so it is recorded.
    """
    tid = str(tok.id)
    sha = getattr(tok, "sha256", None)
    if not sha:
        parts = [p for p in tid.replace("@", ":").replace("-", ":").split(":") if p]
        hexes = [p for p in parts if len(p) >= 12 and all(c in "0123456789abcdef" for c in p.lower())]
        if not hexes:
            raise ValueError(f"tokenizer id {tid!r} carries no weights sha256; cannot record which weights made the shards")
        sha = hexes[-1]
    info = {"id": tid, "sha256": str(sha), "vocab_size": int(tok.vocab_size), "downsample": int(tok.downsample),
            "precision": str(precision or getattr(tok, "precision", "fp32"))}
    vpt = int(getattr(tok, "values_per_token", 1))
    if vpt > 1:  # the patch tokenizer: P*P*3 values per grid cell, copied exactly (no precision applies)
        info.update(values_per_token=vpt, precision="fp32")
    return info


def token_grid(info: dict[str, Any], resolution: int) -> tuple[int, int]:
    """The (grid_h, grid_w) the rows of a job at `resolution` have: its tokenizer's grid, each cell
    `values_per_token` values wide (1 for codes; P*P*3 for the patch tokenizer)."""
    g = resolution // int(info["downsample"])
    return g, g * int(info.get("values_per_token", 1))


def decode_input_shard(
    shard_id: int,
    items: Iterable[dict],
    worker: DecodeWorker,
    *,
    max_block_bytes: int = CPU_DECODE_BLOCK_BYTES,
) -> Iterator[list[dict]]:
    """Decode one input shard's items; yield lists of chunk records, the last list ending with the
    shard's end record.

    A list is yielded whenever it holds `max_block_bytes` of frames, so the memory one shard needs
    is bounded by one block, whatever its length. Every list becomes one block that Ray Data's
    executor (in the driver process) handles, so lists are as large as that bound allows: the end
    record rides in the last one rather than in a block of its own, and the end record counts the
    lists (`blocks`). Items that fail become `{uri, reason}` errors in the end record.
    """
    t0 = time.perf_counter()
    errors: list[dict] = []
    n_rows = n_items = 0
    block: list[dict] = []
    block_bytes = n_blocks = 0
    for item in items:
        n_items += 1
        for rec in worker.decode(item):
            if rec.get("type") == "error":
                errors.append({"uri": rec["uri"], "reason": rec["reason"]})
                continue
            out = {k: rec[k] for k in ROW_META}
            out["type"] = "chunk"
            out["shard_id"] = shard_id
            out["frames"] = rec["frames"]
            block.append(out)
            block_bytes += rec["frames"].nbytes
            n_rows += 1
            if block_bytes >= max_block_bytes:
                yield block
                block, block_bytes = [], 0
                n_blocks += 1
    block.append({
        "type": "end",
        "shard_id": shard_id,
        "expected_rows": n_rows,
        "num_items": n_items,
        "errors": errors,
        "decode_s": time.perf_counter() - t0,
        "blocks": n_blocks + 1,
    })
    yield block


def tokenize_records(tok: Any, records: list[dict], batch_size: int) -> list[dict]:
    """Replace each chunk record's frames by the tokenizer's codes; end records pass through.

    The frames of all the chunk records are handed to one `tok.encode` call as a list (no
    concatenated copy), which encodes them `batch_size` frames per forward pass across record
    boundaries (at least VisualTokenizer.GPU_MIN_FORWARD on a GPU), so images (1 frame per record)
    and video chunks (up to chunk_frames) batch alike, and a GPU overlaps each batch's copy with the
    previous batch's compute.
    """
    chunks = [r for r in records if r["type"] == "chunk"]
    if chunks:
        n = sum(int(r["frames"].shape[0]) for r in chunks)
        tokens = np.asarray(tok.encode([r["frames"] for r in chunks], batch_size=batch_size))  # (N, gh, gw)
        if tokens.ndim != 3 or tokens.shape[0] != n:
            raise RuntimeError(f"tokenizer returned shape {tokens.shape} for {n} frames; expected (N, h, w)")
        if tokens.dtype != np.uint16:
            if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) > 65535):
                raise RuntimeError("tokenizer produced codes outside uint16; a code that does not fit is an error")
            tokens = tokens.astype(np.uint16)
        at = 0
        for r in chunks:
            k = r["frames"].shape[0]
            r["tokens"] = tokens[at : at + k]
            at += k
            del r["frames"]
    return records


class ShardBuffer:
    """Tokenized rows of any number of input shards, arriving in any order and possibly repeated;
    says when a shard is complete (its end record and all the rows it announced are in).

    Rows are keyed by `key`, so a block that Ray delivers twice (a task retried after losing a
    worker mid-shard) cannot put a row in twice.
    """

    def __init__(self, planned: Iterable[int] | None = None) -> None:
        self.planned = None if planned is None else set(planned)
        self.rows: dict[int, dict[str, dict]] = {}   # shard id -> key -> record
        self.ends: dict[int, dict] = {}
        self.first_seen: dict[int, float] = {}
        self.taken: set[int] = set()                  # shards handed to `take` (written or being written)

    def in_flight(self) -> int:
        return len(set(self.rows) | set(self.ends))

    def add(self, rec: dict) -> int | None:
        """Take one record; returns its shard id when the shard is complete and not yet taken.

        Every record that touches a complete shard returns its id again, so a completion whose
        first report was lost (a retried task) is reported by the repeat."""
        sid = int(rec["shard_id"])
        if self.planned is not None and sid not in self.planned:
            raise RuntimeError(f"record for input shard {sid}, which this job did not plan")
        if sid in self.taken:
            return None  # a retried task's repeat of a shard already written
        self.first_seen.setdefault(sid, time.perf_counter())
        if rec["type"] == "end":
            if sid in self.ends and self.ends[sid]["expected_rows"] != rec["expected_rows"]:
                raise RuntimeError(f"input shard {sid} ended twice with different row counts")
            self.ends[sid] = rec
        else:
            self.rows.setdefault(sid, {})[rec["key"]] = rec
        end = self.ends.get(sid)
        if end is None:
            return None
        n = len(self.rows.get(sid, ()))
        if n > end["expected_rows"]:
            raise RuntimeError(f"input shard {sid}: more rows than its decoder produced")
        return sid if n == end["expected_rows"] else None

    def take(self, sid: int) -> tuple[list[dict], dict, float]:
        """(rows sorted by key, end record, seconds since its first record) of a complete shard."""
        end = self.ends.pop(sid)
        rows = [r for _, r in sorted(self.rows.pop(sid, {}).items())]
        assert len(rows) == end["expected_rows"], (sid, len(rows), end["expected_rows"])
        self.taken.add(sid)
        return rows, end, time.perf_counter() - self.first_seen.pop(sid)


def write_shard(
    out_url: str,
    sid: int,
    rows: list[dict],
    end: dict,
    *,
    input_shard: dict[str, Any],
    grid: tuple[int, int],
    wall_s: float,
    codebook_size: int,
    tokenizer: dict[str, Any],
    resolution: int,
    format: str,
    compression: str | None,
    settings: dict[str, Any],
    storage_options: dict | None = None,
) -> dict[str, Any]:
    """Write and commit `shard-{sid:06d}` from rows sorted by key: the data file (atomically, under
    its final name), then its sidecar (validated against its schema, written atomically: the
    commit point). Returns the sidecar.

    The bytes are a pure function of the rows, so a repeated attempt rewrites the same bytes, and
    a data file whose sidecar never came (a kill between the two) is debris that the next run cleans.
    A killed run's writer may finish this after the kill, racing a rerun: see store.clean_debris.
    """
    # The grid is the tokenizer's, not taken from the rows: a shard whose inputs all failed has none.
    w = ShardWriter(out_url, sid, grid=tuple(grid), codebook_size=codebook_size, tokenizer=tokenizer,
                    resolution=resolution, format=format, compression=compression,
                    storage_options=storage_options, settings=settings)
    try:
        for r in rows:
            t = r["tokens"]  # (T, gh, gw) uint16
            w.add({**{k: r[k] for k in ROW_META}, "grid_h": t.shape[1], "grid_w": t.shape[2], "tokens": t})
        return w.commit(
            input_shard=input_shard,
            errors=sorted(end["errors"], key=lambda e: (e["uri"], e["reason"])),
            timings={"decode_s": float(end["decode_s"]), "shard_wall_s": float(wall_s)},
            counts={"inputs": int(end["num_items"]), "inputs_ok": int(end["num_items"]) - len(end["errors"]),
                    "inputs_failed": len(end["errors"])},
        )
    except BaseException:
        w.abort()
        raise


class ShardAssembler:
    """In-process assembly and commit (no Ray): collects tokenized records of any number of input
    shards in any order and commits a shard (`shard-{input shard:06d}`) as soon as it is complete.

    Rows are sorted by key before writing, so the bytes do not depend on scheduling. The Ray job
    runs the same steps (ShardBuffer + write_shard) in its writer actors.
    """

    def __init__(
        self,
        out_url: str,
        shards: dict[int, dict[str, Any]],
        *,
        codebook_size: int,
        tokenizer: dict[str, Any],
        resolution: int,
        format: str,
        compression: str | None,
        settings: dict[str, Any],
        grid: tuple[int, int],
        storage_options: dict | None = None,
    ) -> None:
        self.out_url = out_url
        self.grid = grid
        self.shards = shards  # shard id -> input shard descriptor {id, worklist_sha256, num_items}
        self.kw = dict(codebook_size=codebook_size, tokenizer=tokenizer, resolution=resolution, format=format,
                       compression=compression, storage_options=storage_options, settings=settings)
        self.buffer = ShardBuffer(shards)
        self.committed: list[dict] = []

    def in_flight(self) -> int:
        return self.buffer.in_flight()

    def add(self, rec: dict) -> dict | None:
        """Take one tokenized record; returns the sidecar if this record completed a shard."""
        sid = self.buffer.add(rec)
        if sid is None:
            return None
        rows, end, wall_s = self.buffer.take(sid)
        side = write_shard(self.out_url, sid, rows, end, input_shard=self.shards[sid], grid=self.grid,
                           wall_s=wall_s, **self.kw)
        self.committed.append(side)
        return side


def count_tokens(records: list[dict]) -> tuple[int, int, int]:
    """(rows, frames, tokens) of the chunk records in a list (for progress display)."""
    rows = frames = tokens = 0
    for r in records:
        if r["type"] == "chunk":
            rows += 1
            frames += int(r["num_frames"])
            tokens += int(r["tokens"].size) if "tokens" in r else 0
    return rows, frames, tokens


def torch_threads(cpus: float) -> int:
    """Threads for a CPU tokenizer actor that reserved `cpus` CPUs (at least one)."""
    return max(1, math.ceil(cpus))


def new_decode_worker(cfg: DecodeConfig, storage_options: dict | None) -> DecodeWorker:
    return DecodeWorker(cfg, storage_options)
