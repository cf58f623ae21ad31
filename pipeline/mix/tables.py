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

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.shards import open_shard
from pipeline.shards.arrow_format import ARROW_SCHEMA, ARROW_SCHEMA_V1, ipc_batch_layout


@dataclass
class RowTable:
    """All rows of one token dataset, in shard order (columns of equal length).

    String columns stay Arrow arrays so that tables of 10^7 rows never become Python lists.
    """

    shard: np.ndarray  # int32: index into the manifest's shards list
    row: np.ndarray  # int32: row inside that shard
    elem: np.ndarray  # int64: uint16 element offset of the row's tokens in the data file, -1 if not addressable
    num_frames: np.ndarray  # int32
    chunk: np.ndarray  # int64
    split: pa.Array
    dataset: pa.Array
    video_id: pa.Array
    label: pa.Array  # string, nullable
    # int64: uint32 element offset of the checksum of the row's first frame (column frame_sums of
    # format-2 Arrow shards) in the data file; None or -1: no per-frame checksums to read
    sums: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.shard)

    def take(self, idx: np.ndarray) -> RowTable:
        ix = pa.array(np.asarray(idx, dtype=np.int64))
        return RowTable(self.shard[idx], self.row[idx], self.elem[idx], self.num_frames[idx], self.chunk[idx],
                        self.split.take(ix), self.dataset.take(ix), self.video_id.take(ix), self.label.take(ix),
                        self.sums[idx] if self.sums is not None else None)

    def splits(self) -> list[str]:
        return sorted(x for x in pc.unique(self.split).to_pylist())


_STR_COLS = ("split", "dataset", "video_id", "label")


_META_READ = ("num_frames", "chunk", *_STR_COLS)


def _frame_sum_offsets(batch: pa.RecordBatch, lo: int, hi: int) -> np.ndarray:
    """uint32 element offsets in the file (mapped at [lo, hi)) of each row's first frame checksum
    (int64 [rows]); -1 where the shard has none (format 1) or they are not stored in place (zstd)."""
    n = batch.num_rows
    if "frame_sums" not in batch.schema.names:
        return np.full(n, -1, dtype=np.int64)
    col = batch.column("frame_sums")
    values = col.values
    vbuf = values.buffers()[1]
    start = vbuf.address + values.offset * 4 if vbuf is not None else -1
    if vbuf is None or not (lo <= start and start + values.nbytes <= hi and (start - lo) % 4 == 0):
        return np.full(n, -1, dtype=np.int64)
    return (start - lo) // 4 + col.offsets.to_numpy().astype(np.int64)[:-1] - col.offsets[0].as_py()


def _add_meta(num: dict, strs: dict, batch: pa.RecordBatch, first_row: int) -> None:
    n = batch.num_rows
    num["num_frames"].append(batch.column("num_frames").to_numpy())
    num["chunk"].append(batch.column("chunk").to_numpy())
    num["row"].append(np.arange(first_row, first_row + n, dtype=np.int32))
    for c in _STR_COLS:
        strs[c].append(batch.column(c))


def _read_remote_arrow(url: str, storage_options: dict | None, num: dict, strs: dict) -> int:
    """Rows of a remote Arrow shard by ranges: the footer, each batch's header, the metadata
    columns and the tokens' (and checksums') list offsets; never the token values. Returns rows read."""
    fs, path = storage.url_to_fs(url, storage_options)
    # A small read-ahead: a batch's header and metadata columns lie together at its start.
    with fs.open(path, "rb", block_size=8 << 10, cache_type="readahead") as f:
        schema = pa.ipc.open_file(pa.PythonFile(f, mode="r")).schema
        if not (schema.equals(ARROW_SCHEMA, check_metadata=False) or schema.equals(ARROW_SCHEMA_V1, check_metadata=False)):
            raise ValueError(f"{url} is not a Toto token shard (unexpected Arrow schema)")
        pos = ipc_batch_layout(fs, path, f.size, schema)
        opts = pa.ipc.IpcReadOptions(included_fields=[schema.names.index(c) for c in _META_READ])
        f.seek(0)
        meta = pa.ipc.open_file(pa.PythonFile(f, mode="r"), options=opts)  # reads only these columns' buffers
        got = 0
        for b in range(meta.num_record_batches):
            batch = meta.get_batch(b)
            _rows, elem, sums = pos[b]
            if len(elem) != batch.num_rows:
                raise ValueError(f"{url}: record batch {b} has {batch.num_rows} rows but its header says {len(elem)}")
            num["elem"].append(elem)
            num["sums"].append(sums)
            _add_meta(num, strs, batch, got)
            got += batch.num_rows
    return got


def read_row_table(dataset_url: str, manifest: dict[str, Any], storage_options: dict | None = None,
                   progress: str | None = None) -> RowTable:
    """Read the metadata of every row of a token dataset (one pass over its shards).

    ``progress``: a label for a progress bar on stderr (None: no bar).
    """
    num: dict[str, list[np.ndarray]] = {k: [] for k in ("shard", "row", "elem", "num_frames", "chunk", "sums")}
    strs: dict[str, list[pa.Array]] = {k: [] for k in _STR_COLS}
    shards = manifest["shards"]
    if progress is not None:
        from tqdm import tqdm

        shards = tqdm(shards, desc=progress, unit="shard", file=sys.stderr, leave=False)
    for si, sh in enumerate(shards):
        data_url = storage.join(dataset_url, sh["data_file"])
        got = 0
        if manifest["format"] == "arrow" and storage.is_local(data_url):
            base = pa.memory_map(storage.local_path(data_url), "r").read_buffer()
            reader = pa.ipc.open_file(base)
            lo, hi = base.address, base.address + base.size
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                n = batch.num_rows
                tok = batch.column("tokens")
                values = tok.values
                vbuf = values.buffers()[1]
                start = vbuf.address + values.offset * 2 if vbuf is not None else -1
                offsets = tok.offsets.to_numpy().astype(np.int64)[:-1] - tok.offsets[0].as_py()
                # Zero-copy (uncompressed) shards: the values buffer lies inside the file's bytes.
                if vbuf is not None and lo <= start and start + values.nbytes <= hi and (start - lo) % 2 == 0:
                    num["elem"].append((start - lo) // 2 + offsets)
                else:
                    num["elem"].append(np.full(n, -1, dtype=np.int64))
                num["sums"].append(_frame_sum_offsets(batch, lo, hi))
                _add_meta(num, strs, batch, got)
                got += n
        elif manifest["format"] == "arrow":
            got = _read_remote_arrow(data_url, storage_options, num, strs)
        else:
            with open_shard(data_url, storage_options) as rd:
                n = len(rd)
                num["num_frames"].append(np.asarray(rd.column("num_frames"), dtype=np.int32))
                num["chunk"].append(np.asarray(rd.column("chunk"), dtype=np.int64))
                for c in _STR_COLS:
                    strs[c].append(pa.array(rd.column(c), type=pa.string()))
                num["row"].append(np.arange(n, dtype=np.int32))
                num["elem"].append(np.full(n, -1, dtype=np.int64))
                num["sums"].append(np.full(n, -1, dtype=np.int64))
                got = n
        if got != sh["rows"]:
            raise ValueError(
                f"{data_url} has {got} rows but the manifest says {sh['rows']}: the dataset changed after its "
                "manifest was written; rebuild the manifest (toto-pipeline status URL --rebuild-manifest)"
            )
        num["shard"].append(np.full(got, si, dtype=np.int32))

    def cat(xs: list[np.ndarray], dt) -> np.ndarray:
        return np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)

    def cats(xs: list[pa.Array]) -> pa.Array:
        return pa.concat_arrays([x.cast(pa.string()) for x in xs]) if xs else pa.array([], pa.string())

    return RowTable(
        shard=cat(num["shard"], np.int32), row=cat(num["row"], np.int32), elem=cat(num["elem"], np.int64),
        sums=cat(num["sums"], np.int64),
        num_frames=cat(num["num_frames"], np.int32), chunk=cat(num["chunk"], np.int64),
        **{c: cats(strs[c]) for c in _STR_COLS},
    )


def detect_kind(rows: RowTable) -> str:
    """"image" when every row is one frame and no video has two rows, else "video"."""
    if len(rows) == 0:
        raise ValueError("cannot tell the kind of an empty dataset")
    if not bool((rows.num_frames == 1).all()):
        return "video"
    keys = pc.binary_join_element_wise(rows.dataset, rows.video_id, "/")
    return "image" if len(pc.unique(keys)) == len(rows) else "video"


@dataclass
class SplitTable:
    """Rows of one split in video order, with frame numbering and segments."""

    shard: np.ndarray  # int32 [R]
    row: np.ndarray  # int32 [R]
    elem: np.ndarray  # int64 [R]
    num_frames: np.ndarray  # int64 [R]
    sums: np.ndarray  # int64 [R]: see RowTable.sums (-1: none)
    cum: np.ndarray  # int64 [R+1]: first frame number of each row; cum[-1] = frames in the split
    segment: np.ndarray  # int64 [R]: segment id of each row
    video: np.ndarray  # int64 [R]: video number (increasing in video order)
    label: np.ndarray  # int32 [R]: index into ``labels``, -1 for none
    labels: list[str]
    video_names: pa.Array  # "dataset/video_id" of each video number

    @property
    def videos(self) -> list[str]:
        return self.video_names.to_pylist()

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k)
                for k in ("shard", "row", "elem", "sums", "num_frames", "cum", "segment", "video", "label")}


def split_table(rows: RowTable, split: str) -> SplitTable:
    """The rows of ``split`` in video order, with segments (runs of consecutive chunks)."""
    sel = np.flatnonzero(pc.equal(rows.split, split).to_numpy(zero_copy_only=False))
    sub = rows.take(sel)
    order = pc.sort_indices(
        pa.table({"d": sub.dataset, "v": sub.video_id, "c": pa.array(sub.chunk)}),
        sort_keys=[("d", "ascending"), ("v", "ascending"), ("c", "ascending")],
    ).to_numpy()
    t = sub.take(order)
    r = len(t)
    new_video = np.ones(r, dtype=bool)
    if r > 1:
        same_d = pc.equal(t.dataset.slice(1), t.dataset.slice(0, r - 1)).to_numpy(zero_copy_only=False)
        same_v = pc.equal(t.video_id.slice(1), t.video_id.slice(0, r - 1)).to_numpy(zero_copy_only=False)
        new_video[1:] = ~(same_d & same_v)
    video = np.cumsum(new_video) - 1
    new_seg = new_video.copy()
    if r > 1:
        new_seg[1:] |= t.chunk[1:] != t.chunk[:-1] + 1
    segment = np.cumsum(new_seg) - 1
    nf = t.num_frames.astype(np.int64)
    cum = np.zeros(r + 1, dtype=np.int64)
    np.cumsum(nf, out=cum[1:])
    enc = pc.dictionary_encode(t.label)
    dict_vals = enc.dictionary.to_pylist()
    labels = sorted(dict_vals)
    pos = {v: k for k, v in enumerate(labels)}
    remap = np.asarray([pos[x] for x in dict_vals], dtype=np.int32)
    idx = enc.indices.to_numpy(zero_copy_only=False)  # float with NaN where null
    label = np.full(r, -1, dtype=np.int32)
    valid = ~np.isnan(idx) if idx.dtype.kind == "f" else np.ones(r, dtype=bool)
    if len(remap):
        label[valid] = remap[idx[valid].astype(np.int64)]
    first = np.flatnonzero(new_video)
    names = pc.binary_join_element_wise(t.dataset.take(pa.array(first)), t.video_id.take(pa.array(first)), "/")
    sums = t.sums.astype(np.int64) if t.sums is not None else np.full(r, -1, dtype=np.int64)
    return SplitTable(shard=t.shard, row=t.row, elem=t.elem, num_frames=nf, sums=sums, cum=cum, segment=segment.astype(np.int64),
                      video=video.astype(np.int64), label=label, labels=labels, video_names=names)


def segment_bounds(t: SplitTable) -> tuple[np.ndarray, np.ndarray]:
    """(first frame, number of frames) of each segment, int64 [S] each."""
    if len(t.segment) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first_row = np.flatnonzero(np.r_[True, t.segment[1:] != t.segment[:-1]])
    last_row = np.r_[first_row[1:], len(t.segment)]
    start = t.cum[first_row]
    return start, t.cum[last_row] - start


def video_units(t: SplitTable, *, frames: int, stride: int, hop: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First frames of the clips of a video split: every ``hop`` frames inside each segment.

    A clip spans ``(frames-1)*stride + 1`` frames; segments shorter than that give no clip.
    Returns (units int64 [U], slack int32 [U], number of segments too short for one clip), where
    ``slack`` is how far a clip may start later and still end inside its segment (at most hop-1):
    the loader's per-pass jitter stays within it, so a jittered clip never leaves its segment.
    """
    span = (frames - 1) * stride + 1
    start, length = segment_bounds(t)
    per = np.where(length >= span, (length - span) // hop + 1, 0)
    total = int(per.sum())
    first = np.repeat(start, per)
    offs = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    units = first + offs * hop
    last_start = np.repeat(start + length - span, per)  # latest valid start in the unit's segment
    slack = np.minimum(hop - 1, last_start - units).astype(np.int32)
    return units, slack, int((per == 0).sum())


def image_units(t: SplitTable) -> np.ndarray:
    """Every frame of an image split is one unit (an image row has one frame)."""
    return np.arange(int(t.cum[-1]), dtype=np.int64)


def locate_frames(t_cum: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absolute frame numbers → (row position in video order, frame inside that row)."""
    q = np.searchsorted(t_cum, frames, side="right") - 1
    return q, frames - t_cum[q]
