"""Arrow IPC file shards: one record batch per row group, ``tokens`` as list<uint16>.

Uncompressed by default so a local shard is memory-mapped and one row is read without reading
the file (the token values of a row are a zero-copy view into the map). Remote shards are read by
range requests: the footer, then only the record batch that holds the row.

Format version 2 adds ``frame_sums`` (list<uint32>, one value per frame of the row): a checksum
of each frame's tokens (:func:`frame_sums`), so a reader that fetches single frames by byte range
(the training loader on object stores) checks exactly what it read without downloading the file.
Version 1 files (no such column) are still read.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import hashlib
import io
import os
import queue
import threading
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.shards.cache import process_cache
from pipeline.shards.rows import META_COLUMNS

_FIELDS = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("chunk", pa.int32(), nullable=False),
        pa.field("t_start", pa.float64(), nullable=False),
        pa.field("fps", pa.float64(), nullable=False),
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("grid_h", pa.int32(), nullable=False),
        pa.field("grid_w", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
        pa.field("tokens", pa.list_(pa.field("item", pa.uint16(), nullable=False)), nullable=False),
]
ARROW_SCHEMA_V1 = pa.schema(_FIELDS, metadata={b"toto.format": b"token-shard", b"toto.format_version": b"1"})
ARROW_SCHEMA = pa.schema(
    [*_FIELDS, pa.field("frame_sums", pa.list_(pa.field("item", pa.uint32(), nullable=False)), nullable=False)],
    metadata={b"toto.format": b"token-shard", b"toto.format_version": b"2"},
)
FRAME_SUM = "mul32"  # the name of the frame checksum, recorded in sidecars

# Odd 32-bit weights, fixed forever (part of the format): frame_sum = sum_j tokens[j] * W[j] mod 2^32.
# An odd weight has an inverse mod 2^32, so any change confined to one token (a flipped byte, say)
# always changes the sum; other damage escapes it with probability about 2^-32.
_SUM_WEIGHTS = (np.random.Generator(np.random.PCG64(0x70707353)).integers(0, 2**32, size=65536, dtype=np.uint64)
                | np.uint64(1)).astype(np.uint32)


def frame_sums(frames: np.ndarray) -> np.ndarray:
    """Checksums of frames (uint16 [M, HW]) → uint32 [M] (vectorised: one integer matmul)."""
    hw = frames.shape[-1]
    if hw > len(_SUM_WEIGHTS):
        raise ValueError(f"frames of {hw} tokens: frame checksums cover at most {len(_SUM_WEIGHTS)} tokens per frame")
    return np.matmul(frames, _SUM_WEIGHTS[:hw])  # uint16 @ uint32 → uint32, wrapping mod 2^32


def rows_to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    arrays = [pa.array([r[c] for r in rows], type=ARROW_SCHEMA.field(c).type) for c in META_COLUMNS]
    lengths = np.fromiter((r["tokens"].size for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = _contiguous_span([r["tokens"] for r in rows], int(offsets[-1]))
    tokens = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(values, pa.uint16()), type=ARROW_SCHEMA.field("tokens").type
    )
    # One shard has one grid, so the rows' tokens are whole frames back to back: [frames, HW].
    hw = rows[0]["grid_h"] * rows[0]["grid_w"] if rows else 1
    nf = np.fromiter((r["num_frames"] for r in rows), dtype=np.int64, count=len(rows))
    sum_offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(nf, out=sum_offsets[1:])
    sums = frame_sums(np.asarray(values).reshape(-1, hw)) if len(values) else np.zeros(0, np.uint32)
    frame_col = pa.ListArray.from_arrays(
        pa.array(sum_offsets, pa.int32()), pa.array(sums, pa.uint32()), type=ARROW_SCHEMA.field("frame_sums").type
    )
    return pa.RecordBatch.from_arrays(arrays + [tokens, frame_col], schema=ARROW_SCHEMA)


def _root(a: np.ndarray):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else a.base


def _contiguous_span(parts: list[np.ndarray], total: int) -> np.ndarray:
    """The flat uint16 ``parts`` as one array: a zero-copy view when they lie back to back in one
    buffer (rows sliced from one tokenizer batch, the common case), else a concatenated copy."""
    if not parts:
        return np.zeros(0, np.uint16)
    first = parts[0]
    root = _root(first)
    end = pa.py_buffer(first).address  # (a pyarrow buffer's address is the cheapest pointer read)
    for p in parts:
        if pa.py_buffer(p).address != end or _root(p) is not root:
            return np.concatenate(parts)
        end += p.nbytes
    # Every part is alive (the caller holds the rows) and they tile [start, end) of one buffer,
    # so the strided view over the first part stays inside memory that the root owns.
    return np.lib.stride_tricks.as_strided(first, shape=(total,), strides=(first.itemsize,), writeable=False)


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``[offset, offset+nbytes)`` to disk now, without waiting,
    so the disk works while we encode the next row groups and the commit's fsync has little
    left to flush (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; no-op elsewhere)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _u32(b: bytes, p: int) -> int:
    return int.from_bytes(b[p : p + 4], "little")


def _fb_table(b: bytes, pos: int):
    """A flatbuffer table at ``pos``: field index → absolute position of the field (0 if absent)."""
    vt = pos - int.from_bytes(b[pos : pos + 4], "little", signed=True)
    vt_len = int.from_bytes(b[vt : vt + 2], "little")

    def field(i: int) -> int:
        o = 4 + 2 * i
        off = int.from_bytes(b[vt + o : vt + o + 2], "little") if o < vt_len else 0
        return pos + off if off else 0

    return field


def _fb_vector(b: bytes, field_pos: int) -> tuple[int, int]:
    """(position of the first element, length) of the vector a table field points to."""
    v = field_pos + _u32(b, field_pos)
    return v + 4, _u32(b, v)


def _buffer_index(schema: pa.Schema, name: str) -> int:
    """Index, in an IPC record batch's buffer list, of the values (child data) buffer of list field ``name``
    (buffers are listed field by field, depth first: validity, then offsets and/or data)."""
    def count(t: pa.DataType) -> int:
        if pa.types.is_list(t):
            return 2 + count(t.value_type)
        if pa.types.is_string(t) or pa.types.is_binary(t):
            return 3
        return 2

    i = 0
    for f in schema:
        if f.name == name:
            return i + 3  # list validity, list offsets, child validity, child data
        i += count(f.type)
    raise KeyError(name)


def ipc_batch_layout(fs, path: str, size: int, schema: pa.Schema) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per record batch of a remote Arrow IPC file: (rows, uint16 element offset of each row's tokens,
    uint32 element offset of each row's first frame checksum; -1 where absent or compressed).

    Read from the footer, each batch's message header and the two list-offsets buffers only
    (exact ranges, concurrently; layouts from Arrow's File.fbs and Message.fbs): no token bytes.
    """
    tail = fs.cat_file(path, start=size - 10, end=size)
    if tail[4:] != b"ARROW1":
        raise ValueError(f"{path} is not an Arrow IPC file (no ARROW1 trailer)")
    flen = int.from_bytes(tail[:4], "little")
    footer = fs.cat_file(path, start=size - 10 - flen, end=size - 10)
    blocks_at, n = _fb_vector(footer, _fb_table(footer, _u32(footer, 0))(3))  # Footer.recordBatches
    blocks = []
    for k in range(n):
        p = blocks_at + 24 * k  # struct Block {offset: long; metaDataLength: int; pad; bodyLength: long}
        blocks.append((int.from_bytes(footer[p : p + 8], "little", signed=True),
                       int.from_bytes(footer[p + 8 : p + 12], "little", signed=True)))
    metas = fs.cat_ranges([path] * n, [o for o, _ in blocks], [o + m for o, m in blocks], on_error="raise") if n else []
    want = [(_buffer_index(schema, c) if c in schema.names else None) for c in ("tokens", "frame_sums")]
    plan = []  # per batch: rows, then per column (offsets buffer position, values position) or None
    for k, ((offset, meta_len), meta) in enumerate(zip(blocks, metas, strict=True)):
        fb = meta[8:] if meta[:4] == b"\xff\xff\xff\xff" else meta[4:]  # continuation marker, length
        msg = _fb_table(fb, _u32(fb, 0))
        if not msg(1) or fb[msg(1)] != 3 or not msg(2):  # header_type must be RecordBatch
            raise ValueError(f"{path}: record batch {k} has an unexpected IPC message")
        rb = _fb_table(fb, msg(2) + _u32(fb, msg(2)))
        rows = int.from_bytes(fb[rb(0) : rb(0) + 8], "little", signed=True) if rb(0) else 0
        body = offset + meta_len
        cols = []
        for idx in want:
            if idx is None or rb(3):  # absent column, or compressed buffers (not addressable)
                cols.append(None)
                continue
            bufs_at, nb = _fb_vector(fb, rb(2))
            if idx >= nb:
                raise ValueError(f"{path}: record batch {k} has {nb} buffers, expected more than {idx}")
            at = [body + int.from_bytes(fb[q : q + 8], "little", signed=True)
                  for q in (bufs_at + 16 * (idx - 2), bufs_at + 16 * idx)]  # struct Buffer {offset; length}
            cols.append(tuple(at))
        plan.append((rows, cols))
    reads = [(c[0], c[0] + 4 * (rows + 1)) for rows, cols in plan for c in cols if c is not None]
    got = iter(fs.cat_ranges([path] * len(reads), [a for a, _ in reads], [z for _, z in reads], on_error="raise")
               if reads else [])
    out = []
    for rows, cols in plan:
        per = []
        for c, width in zip(cols, (2, 4), strict=True):
            if c is None or c[1] % width:
                per.append(np.full(rows, -1, dtype=np.int64))
                continue
            offs = np.frombuffer(next(got), dtype="<i4").astype(np.int64)
            per.append(c[1] // width + offs[:-1] - offs[0])
        out.append((rows, per[0], per[1]))
    return out


class HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through, so the sha256 needs no second read.

    Hashing runs on one background thread (hashlib releases the GIL on large buffers), in write
    order, overlapping the file writes and the final fsync; the buffers passed in are kept alive
    (queued) until hashed. A plain queue, not an executor: Arrow writes hundreds of small buffers
    per shard and a future per write costs more than the write.
    """

    SMALL = 64 * 1024
    WRITEBACK = 8 << 20

    def __init__(self, path: str):
        self._f = open(path, "wb", buffering=0)
        self._sha = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._hasher = threading.Thread(target=self._hash_loop, name="toto-sha256", daemon=True)
        self._hasher.start()
        self._small = bytearray()
        self.size = 0
        self._flushed = 0

    def _hash_loop(self) -> None:
        update, get = self._sha.update, self._queue.get
        while (b := get()) is not None:
            update(b)

    def _finish_hashing(self) -> None:
        if self._hasher.is_alive():
            self._queue.put(None)
            self._hasher.join()

    def writable(self) -> bool:
        return True

    def _drain(self) -> None:
        if self._small:
            b = bytes(self._small)
            self._small.clear()
            self._queue.put(b)
            self._f.write(b)

    def write(self, b) -> int:
        mv = memoryview(b)
        n = mv.nbytes
        self.size += n
        if n < self.SMALL:
            # Arrow writes a dozen tiny buffers (metadata, offsets, padding) per record batch:
            # gather them so each syscall and each hash step moves a useful amount of data.
            self._small += mv
            if len(self._small) >= self.SMALL:
                self._drain()
        else:
            self._drain()
            self._queue.put(mv)
            self._f.write(mv)
        if self.size - self._flushed >= self.WRITEBACK:
            _start_writeback(self._f.fileno(), self._flushed, self.size - self._flushed)
            self._flushed = self.size
        return n

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        return self._f.fileno()

    @property
    def sha256(self):
        if not self._f.closed:
            self._drain()
        self._finish_hashing()
        return self._sha

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._drain()
                self._f.flush()
                os.fsync(self._f.fileno())
            finally:
                self._f.close()
                self._finish_hashing()
        super().close()


class ArrowFileWriter:
    def __init__(self, path: str, compression: str | None):
        self._raw = HashingFile(path)
        self._sink = pa.PythonFile(self._raw, mode="w")
        opts = pa.ipc.IpcWriteOptions(compression=compression)
        self._writer = pa.ipc.new_file(self._sink, ARROW_SCHEMA, options=opts)

    def digest(self) -> tuple[str, int]:
        return self._raw.sha256.hexdigest(), self._raw.size

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._writer.write_batch(rows_to_batch(rows))

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        self._raw.close()

    def abort(self) -> None:
        try:
            self._raw.close()
        except Exception:  # noqa: BLE001 - best effort on an already failing path
            pass


def _bad_frame_indices(values: np.ndarray, want: np.ndarray, hw: int) -> np.ndarray:
    """Indices of the frames (runs of `hw` tokens of `values`) whose checksum is not `want`'s."""
    return np.flatnonzero(frame_sums(values.reshape(-1, hw)) != want)


class ArrowShardReader:
    """Random access to rows of an Arrow IPC token shard."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        if storage.is_local(url):
            self._source = pa.memory_map(storage.local_path(url), "r")
            self._file = None
        else:
            self._so = storage_options
            fs, path = storage.url_to_fs(url, storage_options)
            # Block cache of 1 MiB: the footer and one record batch per random read.
            self._file = fs.open(path, "rb", block_size=1 << 20, cache_type="bytes")
            self._source = pa.PythonFile(self._file, mode="r")
        self._reader = pa.ipc.open_file(self._source)
        schema = self._reader.schema
        if not (schema.equals(ARROW_SCHEMA, check_metadata=False) or schema.equals(ARROW_SCHEMA_V1, check_metadata=False)):
            raise ValueError(f"{url} is not a Toto token shard (unexpected Arrow schema)")
        self.has_frame_sums = "frame_sums" in schema.names
        # Set by readers that want every record batch decoded here checked against its frame
        # checksums (the loader on remote compressed shards: what is read is checked, no download).
        self.check_frames = False
        self._batches: dict[int, tuple[pa.RecordBatch, np.ndarray, np.ndarray]] = {}
        self._starts = [0]
        self._counts: list[int] | None = None

    def _ensure_counts(self) -> None:
        if self._counts is None:
            # Row counts per batch need each batch's header; for a memory map this reads no data,
            # remotely the headers are read by range (not the batches).
            if self._file is None:
                self._counts = [self._batch(b)[0].num_rows for b in range(self._reader.num_record_batches)]
            else:
                fs, path = storage.url_to_fs(self.url, self._so)
                self._counts = [n for n, _, _ in ipc_batch_layout(fs, path, self._file.size, self._reader.schema)]
            for n in self._counts:
                self._starts.append(self._starts[-1] + n)

    def _batch(self, b: int) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray, np.ndarray]:
        remote = self._file is not None
        # Remote batches are decoded copies: they live in the process-wide byte-budgeted cache
        # (shared by every reader of this process), local ones are views of the memory map.
        got = process_cache().get((self.url, "batch", b)) if remote else self._batches.get(b)
        if got is None:
            batch = self._reader.get_batch(b)
            col = batch.column("tokens")
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False)
            # (rows, 3): num_frames, grid_h, grid_w, read once per batch instead of per row
            shapes = np.stack([batch.column(c).to_numpy() for c in ("num_frames", "grid_h", "grid_w")], axis=1).tolist()
            if self.check_frames and self.has_frame_sums and len(values):
                self._check_frames(b, batch, values, shapes[0][1] * shapes[0][2])
            got = (batch, offsets, values, shapes)
            if remote:
                process_cache().put((self.url, "batch", b), got, batch.nbytes)
            else:
                self._batches[b] = got
        return got

    def _check_frames(self, b: int, batch: pa.RecordBatch, values: np.ndarray, hw: int) -> None:
        bad = _bad_frame_indices(values, batch.column("frame_sums").values.to_numpy(zero_copy_only=False), hw)
        if bad.size:
            raise ValueError(
                f"{self.url}: record batch {b}: {bad.size} frame(s) fail their checksum (the first is frame "
                f"{int(bad[0])} of the batch); the shard is corrupt or was replaced: re-run the job for this shard")

    def bad_frames(self) -> list[tuple[int, int]]:
        """(row, frame within the row) of every frame whose tokens fail their stored checksum.

        Reads the whole shard once, one record batch at a time (vectorised per batch). Empty for a
        format-1 file, which has no checksums: look at ``has_frame_sums`` for whether any ran.
        """
        if not self.has_frame_sums:
            return []
        bad: list[tuple[int, int]] = []
        row0 = 0
        for b in range(self._reader.num_record_batches):
            batch = self._reader.get_batch(b)
            values = batch.column("tokens").values.to_numpy(zero_copy_only=False)  # (tokens of the batch,)
            sums = batch.column("frame_sums")
            want = sums.values.to_numpy(zero_copy_only=False)  # (frames of the batch,)
            frame_offsets = sums.offsets.to_numpy()  # (rows + 1,): each row's first frame
            if len(want):
                # One shard has one grid: frames are the values cut into equal runs of grid_h * grid_w.
                hw = batch.column("grid_h")[0].as_py() * batch.column("grid_w")[0].as_py()
                if hw <= 0 or len(values) != len(want) * hw:
                    raise ValueError(f"record batch {b}: {len(values)} tokens are not {len(want)} frames of {hw}")
                for k in _bad_frame_indices(values, want, hw).tolist():
                    r = int(np.searchsorted(frame_offsets, k, side="right")) - 1
                    bad.append((row0 + r, k - int(frame_offsets[r])))
            row0 += batch.num_rows
        return bad

    def __len__(self) -> int:
        self._ensure_counts()
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        if self._counts is None:
            self._ensure_counts()
        n = self._starts[-1]
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {self.url} with {n} rows")
        i %= n
        b = bisect.bisect_right(self._starts, i) - 1
        return b, i - self._starts[b]

    def tokens(self, i: int) -> np.ndarray:
        """Tokens of row ``i`` as uint16 ``[num_frames, grid_h, grid_w]`` (a view when mapped)."""
        b, j = self._locate(i)
        _, offsets, values, shapes = self._batch(b)
        return values[offsets[j] : offsets[j + 1]].reshape(shapes[j])

    def iter_token_batches(self):
        """Whole-shard sequential read: per record batch, (offsets int32 [rows+1], values uint16 [n]).

        ``values`` is a view into the memory map for local uncompressed shards: no per-row work.
        """
        for b in range(self._reader.num_record_batches):
            col = self._reader.get_batch(b).column("tokens")
            yield col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)

    def row(self, i: int) -> dict[str, Any]:
        b, j = self._locate(i)
        batch = self._batch(b)[0]
        out = {c: batch.column(c)[j].as_py() for c in META_COLUMNS}
        out["tokens"] = self.tokens(i)
        return out

    def column(self, name: str) -> list:
        if name == "tokens":
            raise ValueError("use tokens(i) or iterate rows to read token arrays")
        self._ensure_counts()
        out: list = []
        for b in range(self._reader.num_record_batches):
            out.extend(self._batch(b)[0].column(name).to_pylist())
        return out

    def close(self) -> None:
        self._batches.clear()
        if self._file is not None:
            self._file.close()
