"""Row tables of a token dataset and the sampling units built from them.

A token dataset's rows are read once (metadata columns plus, for uncompressed Arrow shards, the
byte position of each row's tokens inside its data file, so that the loader later reads a frame
with one slice of a memory map or one range request, without parsing Arrow again).

Per split, rows are put in *video order*: sorted by (dataset, video_id, chunk). A *segment* is a
maximal run of consecutive chunks (chunk numbers k, k+1, ...) of one video: the frames of a segment
are contiguous in time, so a clip may run across chunk boundaries inside a segment but never across
segments (a missing chunk, e.g. one that failed to decode, ends a segment) and never across videos.
Frames of the split are numbered consecutively in video order (``cum[q]`` = first frame of row q);
a *unit* is the absolute number of a clip's first frame (video) or an image's frame (image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.shards import open_shard


@dataclass
class RowTable:
    """All rows of one token dataset, in shard order (arrays of equal length)."""

    shard: np.ndarray  # int32: index into the manifest's shards list
    row: np.ndarray  # int32: row inside that shard
    elem: np.ndarray  # int64: uint16 element offset of the row's tokens in the data file, -1 if not addressable
    num_frames: np.ndarray  # int32
    chunk: np.ndarray  # int64
    split: list[str]
    dataset: list[str]
    video_id: list[str]
    label: list[str | None]

    def __len__(self) -> int:
        return len(self.shard)


def _arrow_buffer(url: str, storage_options: dict | None) -> pa.Buffer:
    if storage.is_local(url):
        mm = pa.memory_map(storage.local_path(url), "r")
        return mm.read_buffer()
    fs, path = storage.url_to_fs(url, storage_options)
    return pa.py_buffer(fs.cat_file(path))


def read_row_table(dataset_url: str, manifest: dict[str, Any], storage_options: dict | None = None) -> RowTable:
    """Read the metadata of every row of a token dataset (one pass over its shards)."""
    cols: dict[str, list] = {k: [] for k in ("shard", "row", "elem", "num_frames", "chunk", "split", "dataset", "video_id", "label")}
    for si, sh in enumerate(manifest["shards"]):
        data_url = storage.join(dataset_url, sh["data_file"])
        n0 = len(cols["row"])
        if manifest["format"] == "arrow":
            base = _arrow_buffer(data_url, storage_options)
            reader = pa.ipc.open_file(base)
            lo, hi = base.address, base.address + base.size
            r = 0
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                tok = batch.column("tokens")
                values = tok.values
                vbuf = values.buffers()[1]
                start = vbuf.address + values.offset * 2 if vbuf is not None else -1
                offsets = tok.offsets.to_numpy().astype(np.int64)[:-1] - tok.offsets[0].as_py()
                # Zero-copy (uncompressed) shards: the values buffer lies inside the file's bytes.
                if vbuf is not None and lo <= start and start + values.nbytes <= hi and (start - lo) % 2 == 0:
                    cols["elem"].extend(((start - lo) // 2 + offsets).tolist())
                else:
                    cols["elem"].extend([-1] * batch.num_rows)
                for c in ("num_frames", "chunk", "split", "dataset", "video_id", "label"):
                    cols[c].extend(batch.column(c).to_pylist())
                cols["row"].extend(range(r, r + batch.num_rows))
                r += batch.num_rows
        else:
            with open_shard(data_url, storage_options) as rd:
                for c in ("num_frames", "chunk", "split", "dataset", "video_id", "label"):
                    cols[c].extend(rd.column(c))
                n = len(rd)
                cols["row"].extend(range(n))
                cols["elem"].extend([-1] * n)
        got = len(cols["row"]) - n0
        if got != sh["rows"]:
            raise ValueError(
                f"{data_url} has {got} rows but the manifest says {sh['rows']}: the dataset changed after its "
                "manifest was written; rebuild the manifest (toto-pipeline status URL --rebuild-manifest)"
            )
        cols["shard"].extend([si] * got)
    return RowTable(
        shard=np.asarray(cols["shard"], dtype=np.int32),
        row=np.asarray(cols["row"], dtype=np.int32),
        elem=np.asarray(cols["elem"], dtype=np.int64),
        num_frames=np.asarray(cols["num_frames"], dtype=np.int32),
        chunk=np.asarray(cols["chunk"], dtype=np.int64),
        split=cols["split"],
        dataset=cols["dataset"],
        video_id=cols["video_id"],
        label=cols["label"],
    )


def detect_kind(rows: RowTable) -> str:
    """"image" when every row is one frame and no video has two rows, else "video"."""
    if len(rows) == 0:
        raise ValueError("cannot tell the kind of an empty dataset")
    single = bool((rows.num_frames == 1).all())
    unique = len(set(zip(rows.dataset, rows.video_id, strict=True))) == len(rows)
    return "image" if single and unique else "video"


@dataclass
class SplitTable:
    """Rows of one split in video order, with frame numbering and segments."""

    shard: np.ndarray  # int32 [R]
    row: np.ndarray  # int32 [R]
    elem: np.ndarray  # int64 [R]
    num_frames: np.ndarray  # int64 [R]
    cum: np.ndarray  # int64 [R+1]: first frame number of each row; cum[-1] = frames in the split
    segment: np.ndarray  # int64 [R]: segment id of each row
    video: np.ndarray  # int64 [R]: video id (index into ``videos``)
    label: np.ndarray  # int32 [R]: index into ``labels``, -1 for none
    labels: list[str]
    videos: list[str]  # "dataset/video_id"

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("shard", "row", "elem", "num_frames", "cum", "segment", "video", "label")}


def split_table(rows: RowTable, split: str) -> SplitTable:
    """The rows of ``split`` in video order, with segments (runs of consecutive chunks)."""
    idx = [i for i, s in enumerate(rows.split) if s == split]
    idx.sort(key=lambda i: (rows.dataset[i], rows.video_id[i], int(rows.chunk[i])))
    ix = np.asarray(idx, dtype=np.int64)
    vid_names = [f"{rows.dataset[i]}/{rows.video_id[i]}" for i in idx]
    videos = sorted(set(vid_names))
    vcode = {v: k for k, v in enumerate(videos)}
    video = np.asarray([vcode[v] for v in vid_names], dtype=np.int64)
    chunk = rows.chunk[ix] if len(ix) else np.zeros(0, np.int64)
    new_seg = np.ones(len(ix), dtype=bool)
    if len(ix) > 1:
        new_seg[1:] = (video[1:] != video[:-1]) | (chunk[1:] != chunk[:-1] + 1)
    segment = np.cumsum(new_seg) - 1
    nf = rows.num_frames[ix].astype(np.int64) if len(ix) else np.zeros(0, np.int64)
    cum = np.zeros(len(ix) + 1, dtype=np.int64)
    np.cumsum(nf, out=cum[1:])
    lab = [rows.label[i] for i in idx]
    labels = sorted({x for x in lab if x is not None})
    lcode = {v: k for k, v in enumerate(labels)}
    label = np.asarray([lcode[x] if x is not None else -1 for x in lab], dtype=np.int32)
    return SplitTable(
        shard=rows.shard[ix] if len(ix) else np.zeros(0, np.int32),
        row=rows.row[ix] if len(ix) else np.zeros(0, np.int32),
        elem=rows.elem[ix] if len(ix) else np.zeros(0, np.int64),
        num_frames=nf,
        cum=cum,
        segment=segment.astype(np.int64),
        video=video,
        label=label,
        labels=labels,
        videos=videos,
    )


def segment_bounds(t: SplitTable) -> tuple[np.ndarray, np.ndarray]:
    """(first frame, number of frames) of each segment, int64 [S] each."""
    if len(t.segment) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first_row = np.flatnonzero(np.r_[True, t.segment[1:] != t.segment[:-1]])
    last_row = np.r_[first_row[1:], len(t.segment)]
    start = t.cum[first_row]
    return start, t.cum[last_row] - start


def video_units(t: SplitTable, *, frames: int, stride: int, hop: int) -> tuple[np.ndarray, int]:
    """First frames of the clips of a video split: every ``hop`` frames inside each segment.

    A clip spans ``(frames-1)*stride + 1`` frames; segments shorter than that give no clip.
    Returns (units int64 [U], number of segments too short for one clip).
    """
    span = (frames - 1) * stride + 1
    start, length = segment_bounds(t)
    per = np.where(length >= span, (length - span) // hop + 1, 0)
    total = int(per.sum())
    first = np.repeat(start, per)
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    return first + offs * hop, int((per == 0).sum())


def image_units(t: SplitTable) -> np.ndarray:
    """Every frame of an image split is one unit (an image row has one frame)."""
    return np.arange(int(t.cum[-1]), dtype=np.int64)


def locate_frames(t_cum: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute frame numbers → (row position in video order, frame inside that row)."""
    q = np.searchsorted(t_cum, frames, side="right") - 1
    return q, frames - t_cum[q]
