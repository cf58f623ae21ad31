"""Global sample id → tokens: the read side of a mix, in numpy (no torch).

``MixReader(mix_url, split)`` maps a batch of global sample ids to their sequences in a few
vectorised steps: blend lookup (memory-mapped index, O(1) formula past its end) → source-local
stream positions → seeded per-pass permutation → absolute first frames → (row, frame) by binary
search → token gather straight from the shard bytes → sequence assembly.

Token gather. For uncompressed Arrow shards the build step recorded where each row's tokens sit
in the data file, so a frame is ``HW`` consecutive uint16 values at a known element offset:
- local files of a source are mapped into one address range (:class:`~pipeline.mix.arena.FileArena`)
  and a batch's clips or frames of all shards come out of one fancy index (:class:`_Direct`);
  where that is not available, each file is memory-mapped once per process and frames are copied
  with one fancy index per shard over an overlapping-window view (each window = one frame's worth);
- remote files (s3://...) are read by byte ranges: each distinct frame of a batch once, nearby
  frames merged into one request while the extra bytes stay within ``read_slack`` per byte asked
  for, all shards' ranges of a batch in one concurrent ``fs.cat_ranges``; what was fetched goes
  into one byte-budgeted LRU cache per process (``cache_mb``, shared by all files);
- other shards (WebDataset, zstd) go through :func:`pipeline.shards.open_shard`, a row's frames
  with one reader call.
Integrity (``verify``): ``"auto"`` (default) checks every frame read from a remote shard against
its checksum stored in the shard (column ``frame_sums``, fetched by range with it), and hashes a
local shard (or a remote one without checksums, with a warning) once per process on first use
against the sha256 pinned in its dataset manifest; ``"sha256"`` always does the latter (a remote
shard is then downloaded once per process); ``"off"`` checks nothing.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import mmap
import os
import warnings
from typing import Any

import numpy as np

import schemas
from pipeline import storage
from pipeline.mix import arena
from pipeline.mix.arena import FileArena
from pipeline.mix.blend import Blend, PassCache, SourceOrder, _mix64
from pipeline.mix.build import TABLE_ARRAYS, order_key
from pipeline.mix.sequence import SEQ_DTYPE, assemble_into, inputs_targets, layout, write_specials
from pipeline.mix.tables import locate_frames
from pipeline.shards import open_shard, read_manifest
from pipeline.shards.arrow_format import frame_sums
from pipeline.shards.cache import process_cache


def read_mix_manifest(mix_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read and validate a mix manifest; checks its content hash."""
    doc = storage.read_json(mix_url, "mix_manifest", storage_options)
    if schemas.content_hash(doc) != doc["content_hash"]:
        raise ValueError(f"{mix_url}: content_hash does not match its content (edited by hand?); rebuild it with toto-pipeline mix")
    return doc


def _parent(url: str) -> str:
    base = storage.basename(url)
    return url[: len(url) - len(base)].rstrip("/") or "."


VERIFY_MODES = ("auto", "sha256", "off")


def check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise ValueError(
            f"verify={verify!r}: choose 'auto' (per-frame checksums for remote shards that have them, else "
            "sha256 of each data file once per process), 'sha256' (always the whole-file sha256) or 'off'"
        )
    return verify


MAX_OPEN_READERS = 16  # per TokenStore: shard readers (WebDataset, zstd) kept open, least recently used closed

# Bytes and requests this process fetched for token frames and their checksums (for benchmarks).
REMOTE_FETCHES = {"requests": 0, "bytes": 0}

class _ShardFile:
    """Token access to one shard's data file (opened lazily, once per process).

    Local files are memory-mapped. Remote files are read by byte ranges (:meth:`TokenStore.gather`
    fetches every shard's ranges of a batch in one concurrent ``cat_ranges``); nothing is kept
    per file: fetched ranges live in the process-wide cache (:func:`pipeline.shards.cache.process_cache`).
    """

    def __init__(self, url: str, sha256: str, fmt: str, hw: int, storage_options: dict | None, verify: str):
        self.url, self.sha256, self.fmt, self.hw = url, sha256, fmt, hw
        self.so, self.verify = storage_options, verify
        self._win: np.ndarray | None = None
        self._mmap: mmap.mmap | None = None
        self._reader = None
        self._checked = False
        self._warned = False

    def check_file(self) -> None:
        """The whole-file sha256 against the dataset manifest, once per process (reads the file)."""
        if self.verify != "off" and not self._checked:
            got = storage.sha256_file(self.url, self.so)
            if got != self.sha256:
                raise ValueError(
                    f"{self.url}: sha256 {got} does not match the dataset manifest ({self.sha256}); the shard is "
                    "corrupt or was replaced: re-run the job for this shard or rebuild the mix"
                )
        self._checked = True

    def check_remote(self, has_sums: bool) -> bool:
        """Before a remote range read: whether to check the frames read against their checksums;
        falls back to (and runs once) the whole-file sha256 where they cannot be used."""
        if self.verify == "off":
            return False
        if self.verify == "auto" and has_sums:
            return True
        if self.verify == "auto" and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.url} has no per-frame checksums (written by an older Toto, or compressed): checking its "
                "sha256 instead, which downloads the whole file once in every process that reads it; re-run the "
                "job for this shard (or re-tokenize) to read it by ranges", stacklevel=4)
        self.check_file()
        return False

    def frames_local(self, starts: np.ndarray) -> np.ndarray:
        """Frames whose first token is at uint16 element ``starts`` (int64 [M]) → uint16 [M, HW]."""
        self.check_file()
        if self._win is None:
            with open(storage.local_path(self.url), "rb") as fh:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            # A plain ndarray over the map (np.memmap's subclass hooks cost µs per fancy index).
            u16 = np.frombuffer(self._mmap, dtype=np.uint16, count=len(self._mmap) // 2)
            # Overlapping windows: row e of this view is u16[e : e + HW] (no copy).
            self._win = np.lib.stride_tricks.as_strided(
                u16, shape=(u16.size - self.hw + 1, self.hw), strides=(2, 2), writeable=False
            )
        return self._win[starts]

    def frames_by_row(self, rows: np.ndarray, frames: np.ndarray, open_readers: collections.OrderedDict) -> np.ndarray:
        """Frames ``frames`` of shard rows ``rows`` via the shard reader (any format) → uint16 [M, HW].

        ``open_readers`` (the store's) bounds how many shard readers stay open: a remote reader
        holds a file handle and its read buffer, so touching 10× the shards must not mean 10× those.
        """
        if self._reader is None:
            reader = open_shard(self.url, self.so)
            impl = reader._impl
            if storage.is_local(self.url):
                self.check_file()
            elif self.verify == "auto" and getattr(impl, "has_frame_sums", False):
                impl.check_frames = True  # each batch checked as it is decoded (zstd shards)
            else:
                self.check_remote(False)
            self._reader = reader
            open_readers[self.url] = self
            while len(open_readers) > MAX_OPEN_READERS:
                _, old = open_readers.popitem(last=False)
                old._reader.close()
                old._reader = None
        else:
            open_readers.move_to_end(self.url)
        out = np.empty((len(rows), self.hw), dtype=np.uint16)
        # One reader call per row, not per frame: a row's frames come out of one (cached) batch.
        for r, sel in _groups(rows):
            t = self._reader.tokens(r).reshape(-1, self.hw)
            out[sel] = t[frames[sel]]
        return out


def _groups(keys: np.ndarray):
    """(key, positions) per distinct value of ``keys`` (a stable sort, then runs)."""
    order = np.argsort(keys, kind="stable")
    s = keys[order]
    bounds = [0, *(np.flatnonzero(s[1:] != s[:-1]) + 1).tolist(), len(order)]
    for a, z in zip(bounds[:-1], bounds[1:], strict=True):
        yield int(s[a]), order[a:z]


def coalesce(lo: np.ndarray, hi: np.ndarray, max_hole: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte ranges sorted by start (int64 [N] each) → (group of each range [N], group starts, group ends).

    Neighbours are fetched as one request when the hole between them is at most ``max_hole``
    (per range: the hole before it), so the bytes fetched beyond those asked for are bounded by
    the holes allowed.
    """
    n = len(lo)
    new = np.ones(n, dtype=bool)
    if n > 1:
        reach = np.maximum.accumulate(hi)[:-1]
        new[1:] = (lo[1:] - reach) > (max_hole[1:] if isinstance(max_hole, np.ndarray) else max_hole)
    first = np.flatnonzero(new)
    gid = np.cumsum(new) - 1
    return gid, lo[first], np.maximum.reduceat(hi, first) if n else hi[:0]


class TokenStore:
    """Frame tokens of one token dataset, addressed through a split table (see tables.SplitTable).

    ``verify``: see :data:`VERIFY_MODES` and docs/mixing.md. ``read_slack``: for remote reads,
    how many extra bytes per byte asked for may be fetched to merge two nearby frames into one
    request (0.5: at most 1.5 bytes fetched per byte delivered; larger values mean fewer requests).
    """

    def __init__(self, url: str, manifest: dict[str, Any], hw: int, *, storage_options: dict | None = None,
                 verify: str = "auto", read_slack: float = 0.5, cache_mb: int = 256):
        self.url, self.manifest, self.hw = url, manifest, hw
        self.storage_options, self.verify = storage_options, check_verify(verify)
        if not read_slack >= 0:
            raise ValueError(f"read_slack={read_slack!r}: give extra bytes per byte read, ≥ 0 (e.g. 0.5)")
        if not isinstance(cache_mb, int) or cache_mb < 0:
            raise ValueError(f"cache_mb={cache_mb!r}: give the process-wide cache budget in MiB, ≥ 0")
        self.read_slack, self.cache_mb = float(read_slack), cache_mb
        self.remote = not storage.is_local(url)
        self._files: dict[int, _ShardFile] = {}
        self._readers: collections.OrderedDict[str, _ShardFile] = collections.OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # Memory maps and open files are per process: DataLoader workers reopen them lazily.
        d = dict(self.__dict__)
        d["_files"], d["_readers"] = {}, collections.OrderedDict()
        return d

    def _file(self, shard: int) -> _ShardFile:
        if self._pid != os.getpid():
            self._files, self._readers, self._pid = {}, collections.OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            sh = self.manifest["shards"][shard]
            f = self._files[shard] = _ShardFile(
                storage.join(self.url, sh["data_file"]), sh["sha256"], self.manifest["format"], self.hw,
                self.storage_options, self.verify)
        return f

    def gather(self, table: dict[str, np.ndarray], frames: np.ndarray, out: np.ndarray | None = None,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of absolute frames (int64 [m, F]) → (tokens [m, F, HW], row position [m, F]).

        Without ``out`` the tokens are a new uint16 array. With ``out`` (any integer dtype,
        [B, F, HW], e.g. an int32 view into the batch's sequence buffer) frame ``f`` of sample ``i``
        is written to ``out[rows[i], f]`` directly, widened on the way: no intermediate copy.
        """
        frames = np.asarray(frames, dtype=np.int64)
        m, nf = frames.shape
        if out is None:
            out = np.empty((m, nf, self.hw), dtype=np.uint16)
            rows = np.arange(m)
        flat = frames.reshape(-1)
        q, k = locate_frames(table["cum"], flat)
        elem = table["elem"][q]
        starts = elem + k * self.hw
        ri = np.repeat(np.asarray(rows), nf)  # destination row of each flat frame
        fi = np.arange(m * nf) % nf  # and its frame slot
        shard = table["shard"][q]
        direct = elem >= 0  # offsets known: uncompressed Arrow
        if self.remote and direct.any():
            sel = np.flatnonzero(direct)
            s0 = np.asarray(table["sums"][q[sel]])
            sums = np.where(s0 >= 0, s0 + k[sel], -1)  # uint32 element of each frame's checksum; -1: none
            out[ri[sel], fi[sel]] = self._frames_remote(shard[sel], starts[sel], sums)
        for sh, seg in _groups(shard):
            f = self._file(sh)
            seg_direct = direct[seg]
            if seg_direct.all() and not self.remote:
                out[ri[seg], fi[seg]] = f.frames_local(starts[seg])
            elif not seg_direct.all():
                seg = seg[~seg_direct]
                out[ri[seg], fi[seg]] = f.frames_by_row(table["row"][q[seg]], k[seg], self._readers)
        return out if out.shape[0] == m else out[rows], q.reshape(m, nf)

    def _frames_remote(self, shard: np.ndarray, starts: np.ndarray, sums: np.ndarray) -> np.ndarray:
        """Frames at uint16 elements ``starts`` of remote shards ``shard`` (int64 [M] each) → uint16 [M, HW].

        Each distinct frame is fetched once: every shard's ranges of the call go out in one
        concurrent ``cat_ranges`` (minus those in the process cache), and where the shard has
        per-frame checksums (``sums``: uint32 element of each frame's checksum, -1 if none) they
        are fetched alongside and compared before anything is returned or cached.
        """
        hw, fb = self.hw, 2 * self.hw
        shard = shard.astype(np.int64)
        key = shard * (1 << 40) + starts  # (shard, element) as one sortable int64 (files < 2 TiB)
        uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
        u_shard, u_start, u_sum = shard[first], starts[first], sums[first]
        checked = np.zeros(len(uniq), dtype=bool)
        for sh, sel in _groups(u_shard):
            checked[sel] = self._file(sh).check_remote(bool((u_sum[sel] >= 0).all()))
        frames_lo = u_start * 2
        reqs = [(u_shard, frames_lo, frames_lo + fb, np.int64(int(self.read_slack * fb)))]
        ci = np.flatnonzero(checked)
        if len(ci):
            sum_lo = u_sum[ci] * 4
            order = np.lexsort((sum_lo, u_shard[ci]))
            ci = ci[order]
            # The checksums of a clip's frames lie a few bytes apart: the same slack per frame merges them.
            reqs.append((u_shard[ci], u_sum[ci] * 4, u_sum[ci] * 4 + 4, np.int64(int(self.read_slack * fb))))
        bufs, new = self._fetch(reqs)
        frames_buf, frames_pos = bufs[0]
        u16 = np.frombuffer(frames_buf, dtype=np.uint16)
        win = np.lib.stride_tricks.as_strided(u16, shape=(max(u16.size - hw + 1, 0), hw), strides=(2, 2), writeable=False)
        got = win[frames_pos // 2]  # uint16 [U, HW], one fancy index for the whole call
        if len(ci):
            sums_buf, sums_pos = bufs[1]
            want = np.frombuffer(sums_buf, dtype="<u4")[sums_pos // 4]  # (ranges and pieces are 4-byte multiples)
            bad = np.flatnonzero(frame_sums(got[ci]) != want)
            if bad.size:
                b = ci[bad[0]]
                f = self._file(int(u_shard[b]))
                raise ValueError(
                    f"{f.url}: {bad.size} frame(s) read fail their checksum (the first at byte {int(u_start[b]) * 2}); "
                    "the shard is corrupt or was replaced: re-run the job for this shard or rebuild the mix")
        cache = process_cache(self.cache_mb << 20)
        for k, v in new:
            cache.put(k, v, len(v))
        return got[inv]

    def _fetch(self, reqs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.int64]]):
        """Byte ranges (shard, lo, hi sorted by (shard, lo), allowed hole) of several kinds in one
        concurrent ``cat_ranges`` → per kind (one buffer holding them, offset of each range in it),
        and the (key, bytes) of what was fetched (to cache once checked)."""
        cache = process_cache(self.cache_mb << 20)
        fs = None
        plan, paths, lo_all, hi_all, want_keys = [], [], [], [], []
        for shard, lo, hi, hole in reqs:
            groups = []
            for sh, sel in _groups(shard):
                f = self._file(sh)
                gid, g_lo, g_hi = coalesce(lo[sel], hi[sel], hole)
                parts = []
                for a, z in zip(g_lo.tolist(), g_hi.tolist(), strict=True):
                    k = (f.url, a, z)
                    got = cache.get(k)
                    if got is None:
                        if fs is None:
                            fs, _ = storage.url_to_fs(f.url, self.storage_options)
                        parts.append(len(paths))
                        paths.append(fs._strip_protocol(f.url))
                        lo_all.append(a)
                        hi_all.append(z)
                        want_keys.append(k)
                    else:
                        parts.append(got)
                groups.append((sel, gid, g_lo, g_hi, parts))
            plan.append(groups)
        fetched: list = []
        if paths:
            fetched = fs.cat_ranges(paths, lo_all, hi_all, on_error="return")
            for p, a, z, url in zip(fetched, lo_all, hi_all, (k[0] for k in want_keys), strict=True):
                if isinstance(p, BaseException):
                    raise OSError(f"{url}: reading bytes [{a}, {z}) failed: {p}") from p
                if len(p) != z - a:
                    raise ValueError(f"{url}: bytes [{a}, {z}) gave {len(p)} bytes (the file is shorter than the "
                                     "mix index says): the shard was truncated or replaced; rebuild the mix")
            REMOTE_FETCHES["requests"] += len(paths)
            REMOTE_FETCHES["bytes"] += sum(len(p) for p in fetched)
        out = []
        for (_shard, lo, _hi, _hole), groups in zip(reqs, plan, strict=True):
            pieces, pos = [], np.empty(len(lo), dtype=np.int64)
            at = 0
            for sel, gid, g_lo, _g_hi, parts in groups:
                base = np.empty(len(g_lo), dtype=np.int64)
                for j, p in enumerate(parts):
                    b = fetched[p] if isinstance(p, int) else p
                    pieces.append(b)
                    base[j] = at
                    at += len(b)
                pos[sel] = base[gid] + (lo[sel] - g_lo[gid])
            out.append((b"".join(pieces), pos))
        return out, list(zip(want_keys, fetched, strict=True))


class _Direct:
    """One source's frames as offsets into one :class:`~pipeline.mix.arena.FileArena` over all of
    its (local, uncompressed Arrow) data files: a batch's frames, or whole clips, of every shard
    come out of one fancy index, whatever the number of shards.

    Frames are located by *runs*: maximal stretches of consecutive rows of the split table (video
    order) whose tokens are also consecutive in one data file (the chunks of a video written one
    after another, or the images of one record batch). Frame ``a`` of run ``n`` starts at element
    ``run_elem[n] + (a - run_cum[n]) * HW``, and a clip whose first and last frames lie in one run
    is a single strided window of the arena (``F`` frames ``stride * HW`` elements apart).
    """

    def __init__(self, store: TokenStore, table: dict[str, np.ndarray], *, video: bool, frames: int, stride: int):
        hw = self.hw = store.hw
        self.store, self.frames_per_clip, self.stride = store, frames, stride
        shards = store.manifest["shards"]
        self.arena = FileArena([storage.local_path(storage.join(store.url, sh["data_file"])) for sh in shards])
        shard = np.asarray(table["shard"], dtype=np.int64)
        elem = np.asarray(table["elem"], dtype=np.int64)
        nf = np.asarray(table["num_frames"], dtype=np.int64)
        cum = np.asarray(table["cum"], dtype=np.int64)
        self.arena.check_extents(shard, elem, nf * hw)
        # Every frame a sample can ask for must lie in the split, or a wrong offset could reach
        # unmapped memory (numpy's bounds check covers the whole range, not each file).
        units = np.asarray(table["units"], dtype=np.int64)
        last = units + np.asarray(table["slack"], dtype=np.int64) + (frames - 1) * stride if video else units
        if len(units) and (units.min() < 0 or last.max() >= cum[-1]):
            raise ValueError(f"{store.url}: the mix index asks for frames outside the split (0..{int(cum[-1]) - 1}); "
                             "the index does not belong to these shards: rebuild the mix")
        g = self.arena.base[shard] + elem
        cont = np.zeros(len(g), dtype=bool)
        cont[1:] = (shard[1:] == shard[:-1]) & (g[1:] == g[:-1] + nf[:-1] * hw)
        first = np.flatnonzero(~cont)
        self.run_cum = np.append(cum[first], cum[-1])  # int64 [N+1]
        self.run_elem = g[first]  # int64 [N]: arena element of each run's first token
        self.run_shard = shard[first]
        self.steps = stride * np.arange(frames, dtype=np.int64)  # a clip's frames after its first
        # Per run, indexed by searchsorted(run_cum, frame, "right") = run + 1 (entry 0 unused), so
        # that a batch needs no "- 1": frame f of run n starts at element f * HW + _off[n + 1], and a
        # clip starting at f stays inside run n (one strided window) iff f < _whole_below[n + 1].
        self._off = np.append(0, self.run_elem - self.run_cum[:-1] * hw)
        self._whole_below = np.append(0, self.run_cum[1:] - self.steps[-1])
        self._shard1 = np.append(-1, self.run_shard)
        # Where every row is one frame (images: frame number = row), a frame's element is read off
        # its row (the index's memory-mapped arrays) instead of searched for among the runs.
        self._rows = (table["shard"], table["elem"]) if bool((nf == 1).all()) else None
        self.verified = np.zeros(len(shards), dtype=bool)
        self.all_verified = store.verify == "off"
        u16 = self.arena.u16
        # Row e of ``win`` is u16[e : e + HW]; item e of ``clips`` is the F frames at e, e + stride*HW, ...
        # (overlapping views, no copy; the arena's bounds are checked by numpy, a run's by the index).
        self.win = np.lib.stride_tricks.as_strided(u16, shape=(max(u16.size - hw + 1, 0), hw), strides=(2, 2),
                                                   writeable=False)
        span = (frames - 1) * stride * hw + hw
        self.clips_view = np.lib.stride_tricks.as_strided(
            u16, shape=(max(u16.size - span + 1, 0), frames, hw), strides=(2, stride * hw * 2, 2), writeable=False)

    def _runs(self, frames: np.ndarray) -> np.ndarray:
        """Absolute frames (int64, any shape) → their run + 1 (the index into the per-run tables);
        checks each shard they lie in once, first (unless ``verify="off"``)."""
        q1 = np.searchsorted(self.run_cum, frames, side="right")
        if not self.all_verified:
            self._verify(self._shard1[q1])
        return q1

    def _verify(self, sh: np.ndarray) -> None:
        """Check the shards ``sh`` not checked yet (the whole-file sha256), before any of them is read."""
        for k in np.unique(sh[~self.verified[sh]]).tolist():
            self.store._file(k).check_file()  # raises on a corrupt shard
            self.verified[k] = True
        self.all_verified = bool(self.verified.all())

    def frames(self, frames: np.ndarray) -> np.ndarray:
        """Absolute frames (int64, any shape) → uint16 [..., HW]."""
        if self._rows is not None:
            shard, elem = self._rows
            sh = shard[frames]
            if not self.all_verified:
                self._verify(sh)
            return self.win[self.arena.base[sh] + elem[frames]]
        return self.win[self._off[self._runs(frames)] + frames * self.hw]

    def clips(self, first: np.ndarray) -> np.ndarray:
        """Clips by absolute first frame (int64 [m]) → uint16 [m, F, HW] (frames ``stride`` apart)."""
        out = np.empty((len(first), self.frames_per_clip, self.hw), dtype=np.uint16)
        self.clips_into(out, slice(None), first)
        return out

    def clips_into(self, out: np.ndarray, rows: np.ndarray | slice, first: np.ndarray) -> None:
        """Clips by absolute first frame (int64 [m]) → ``out[rows]`` (integer [B, F, HW], e.g. an
        int32 view of the batch's sequence buffer: widened by the assignment).

        A clip inside one run is one strided window; a clip that runs from one data file (or record
        batch) into the next is read frame by frame, in a second gather of only those clips.
        """
        q1 = self._runs(first)
        e = self._off[q1] + first * self.hw
        split = first >= self._whole_below[q1]  # the clip's last frame lies in a later run
        if not split.any():
            out[rows] = self.clips_view[e]
            return
        rows = np.arange(out.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows)
        whole = np.flatnonzero(~split)
        if len(whole):
            out[rows[whole]] = self.clips_view[e[whole]]
        split = np.flatnonzero(split)
        out[rows[split]] = self.frames(first[split, None] + self.steps)


class MixReader:
    """Read sequences of a mix by global sample id (one split)."""

    def __init__(self, mix_url: str, *, split: str = "train", storage_options: dict | None = None,
                 verify: str = "auto", read_slack: float = 0.5, cache_mb: int = 256):
        self.mix_url = mix_url
        self.storage_options = storage_options
        self.verify = check_verify(verify)
        m = self.manifest = read_mix_manifest(mix_url, storage_options)
        if split not in m["splits"]:
            raise ValueError(f"split {split!r} is not in {mix_url}; it has {sorted(m['splits'])}")
        self.split = split
        self.mix_hash: str = m["content_hash"]
        self.seq_len: int = m["seq_len"]
        self.vocab_size: int = m["vocab_size"]
        self.specials: dict[str, int] = dict(m["specials"])
        self.hw: int = m["sequence"]["tokens_per_frame"]
        sp = m["splits"][split]
        self.sources: list[str] = list(sp["sources"])
        self.num_samples: int = sp["num_samples"]
        self.blend = Blend(sp["weights"], sp["period"])
        by_name = {s["name"]: s for s in m["sources"]}
        self._src = [by_name[n] for n in self.sources]
        self._dsm: dict[str, dict] = {}
        for s in self._src:
            got = read_manifest(s["url"], storage_options)
            if got["content_hash"] != s["manifest_hash"]:
                raise ValueError(
                    f"source {s['name']} ({s['url']}) changed since the mix was built: its manifest hash is now "
                    f"{got['content_hash']}, the mix pinned {s['manifest_hash']}; rebuild the mix "
                    "(toto-pipeline mix ...) to train on the new data"
                )
            self._dsm[s["name"]] = got
        self._index_url = storage.join(_parent(mix_url), m["index"]["dir"])
        self._load_index()
        self._orders = [SourceOrder(len(self._tab[i]["units"]), order_key(m["seed"], s["name"], split))
                        for i, s in enumerate(self._src)]
        # Whole-pass jitter tables where the pass order is a table too (None: computed per batch).
        self._jitter_tables = [PassCache(functools.partial(self._jitter_pass, i))
                               if o.n <= o.table_max and self._src[i]["kind"] == "video" else None
                               for i, o in enumerate(self._orders)]
        self._layouts: dict[int, dict[str, Any]] = {}
        self._single = len(self.sources) == 1
        self._image_slots = np.arange(m["images_per_seq"], dtype=np.int64)[None, :]  # (1, K)
        self._direct: dict[int, _Direct | None] = {}
        self._stores = [TokenStore(s["url"], self._dsm[s["name"]], self.hw, storage_options=storage_options,
                                   verify=verify, read_slack=read_slack, cache_mb=cache_mb) for s in self._src]

    # -- index -----------------------------------------------------------------------------
    def _npy(self, name: str) -> np.ndarray:
        url = storage.join(self._index_url, name)
        if storage.is_local(url):
            # A plain ndarray over the map: np.memmap's subclass hooks cost µs on every index.
            return np.asarray(np.load(storage.local_path(url), mmap_mode="r", allow_pickle=False))
        fs, path = storage.url_to_fs(url, self.storage_options)
        return np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)

    def _json(self, name: str) -> Any:
        fs, path = storage.url_to_fs(storage.join(self._index_url, name), self.storage_options)
        with fs.open(path, "rb") as f:
            return json.loads(f.read())

    def _load_index(self) -> None:
        try:
            done = self._json("index.json")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the index of {self.mix_url} is missing ({self._index_url}); rebuild it with the same "
                "toto-pipeline mix command (it is cached by hash and beside the manifest)"
            ) from None
        if done.get("files") != self.manifest["index"]["files"]:
            raise ValueError(f"{self._index_url} does not belong to {self.mix_url} (file hashes differ); rebuild the mix")
        sp = self.split
        if self.verify != "off" and not getattr(self, "_index_checked", False):
            # Once per reader (not again in workers): a flipped byte here would silently reorder data.
            files = self.manifest["index"]["files"]
            for name in sorted(n for n in files if n.startswith(f"{sp}.")):
                got = storage.sha256_file(storage.join(self._index_url, name), self.storage_options)
                if got != files[name]:
                    raise ValueError(
                        f"index file {storage.join(self._index_url, name)} is corrupt (sha256 {got}, manifest says "
                        f"{files[name]}); delete {self._index_url} and rerun the same toto-pipeline mix command"
                    )
            self._index_checked = True
        self._blend_src = self._npy(f"{sp}.blend_source.npy")
        self._blend_local = self._npy(f"{sp}.blend_local.npy")
        self._tab = []
        for s in self._src:
            files = self.manifest["index"]["files"]
            # (An index built before per-frame checksums has no sums array: -1 = none, like a v1 shard.)
            t = {a: self._npy(f"{sp}.{s['name']}.{a}.npy") for a in TABLE_ARRAYS if f"{sp}.{s['name']}.{a}.npy" in files}
            if "sums" not in t:
                t["sums"] = np.full(len(t["row"]), -1, dtype=np.int64)
            t["labels"] = self._json(f"{sp}.{s['name']}.labels.json")
            self._tab.append(t)

    def __getstate__(self) -> dict:
        # Index arrays and the shards' arenas are memory maps: a worker started by "spawn" maps
        # them again instead of receiving a pickled copy.
        d = dict(self.__dict__)
        # Caches derived from them are rebuilt on first use too: the per-row label table alone is
        # 4 bytes per row of every source, and the shared frame_index row is a [B, T] view.
        for k in ("_blend_src", "_blend_local", "_tab", "_all_labels", "_rows_cache", "_fi_same"):
            d.pop(k, None)
        d["_direct"] = {}
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._load_index()

    # -- mapping ---------------------------------------------------------------------------
    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ids → (source index, source-local sample index), int64 arrays."""
        src, local = self._locate(np.asarray(ids, dtype=np.int64))
        return src.astype(np.int64, copy=False), local

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`locate` for int64 ``ids``, the sources as the index stores them (uint8 for ≤ 255)."""
        # (As uint64 a negative id is huge: it takes the formula's path, which refuses it.)
        if ids.size and int(ids.view(np.uint64).max()) < self.num_samples:
            return self._blend_src[ids], np.asarray(self._blend_local[ids], dtype=np.int64)
        return self.blend.source_and_local(ids)

    def sample_frames(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per source present in ``ids``: (source index, positions in ``ids``, absolute frames [m, F])."""
        return [(si, pos, self.sample_frames_of(starts) if starts.ndim == 1 else starts)
                for si, pos, starts in self._sample_starts(ids)]

    def _sample_starts(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per source present in ``ids``: (source index, positions in ``ids``, starts), where starts
        is a video clip's absolute first frame (int64 [m]) or an image sequence's frames ([m, K])."""
        return self._starts(np.asarray(ids, dtype=np.int64))[1]

    def _starts(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
        """(source of each id, :meth:`_sample_starts`) for int64 ``ids``."""
        src, local = self._locate(ids)
        m = self.manifest
        out = []
        if self._single:
            groups = [(0, np.arange(len(src)))]
        else:
            # Positions of each source's samples, in order: one stable sort for all sources.
            by_src = np.argsort(src, kind="stable")
            ends = np.cumsum(np.bincount(src, minlength=len(self.sources))).tolist()
            groups = [(si, by_src[a:z]) for si, (a, z) in enumerate(zip([0, *ends[:-1]], ends, strict=True)) if z > a]
        for si, pos in groups:
            j = local[pos]
            order = self._orders[si]
            if self._src[si]["kind"] == "video":
                uid, epoch = order.units_and_pass(j)  # (m,) unit ids; their pass (int: one for all)
                starts = self._tab[si]["units"][uid]  # (m,) absolute first frames, int64
                if m["jitter"]:
                    starts = starts + self._jitter(si, epoch, uid)
            else:
                stream = j[:, None] * m["images_per_seq"] + self._image_slots  # (m, K)
                starts = self._tab[si]["units"][order.units_and_pass(stream)[0]]
            out.append((si, pos, starts))
        return src, out

    def _jitter(self, si: int, epoch: int | np.ndarray, uid: np.ndarray) -> np.ndarray:
        """Seeded per-pass start offsets in [0, slack[uid]] ([m], int64 or, from a pass table, uint8/
        uint16; ``epoch``: the pass of each unit, or one int for all): each pass sees new clip phases.

        Offset of unit u in pass e = splitmix64(u ^ key(e)) mod (slack[u] + 1). For sources of up
        to ``table_max`` units the offsets of a whole pass are computed at once and cached with the
        pass's order, so a batch looks them up with one index.
        """
        tables = self._jitter_tables[si]
        if not isinstance(epoch, np.ndarray):  # the usual case: one batch, one pass
            return tables.get(epoch)[uid] if tables is not None else self._jitter_of(si, epoch, uid)
        out = np.empty(len(uid), dtype=np.int64)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            out[sel] = tables.get(e)[uid[sel]] if tables is not None else self._jitter_of(si, e, uid[sel])
        return out

    def _jitter_of(self, si: int, epoch: int, uid: np.ndarray) -> np.ndarray:
        slack = self._tab[si]["slack"][uid].astype(np.uint64)
        with np.errstate(over="ignore"):
            h = _mix64(uid.astype(np.uint64) ^ self._jitter_key(si, epoch))
            return (h % (slack + np.uint64(1))).astype(np.int64)

    def _jitter_pass(self, si: int, epoch: int) -> np.ndarray:
        """The offsets of every unit of source ``si`` in pass ``epoch`` (uint8 when hop ≤ 256)."""
        slack_max = int(self._tab[si]["slack"].max())
        dt = np.uint8 if slack_max < 256 else np.uint16 if slack_max < 65536 else np.int64
        return self._jitter_of(si, epoch, np.arange(self._orders[si].n, dtype=np.int64)).astype(dt)

    def _jitter_key(self, si: int, epoch: int) -> np.uint64:
        cache = self.__dict__.setdefault("_jitter_keys", {})
        key = cache.get((si, epoch))
        if key is None:
            if len(cache) > 64:
                cache.clear()
            key = cache[(si, epoch)] = np.random.SeedSequence(
                [*order_key(self.manifest["seed"], self._src[si]["name"], self.split), epoch, 0x4A495454]
            ).generate_state(1, dtype=np.uint64)[0]
        return key

    def gather(self, si: int, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of absolute frames (int64 [m, F]) of source ``si`` → (uint16 [m, F, HW], row pos [m, F])."""
        return self._stores[si].gather(self._tab[si], frames)

    def _layout(self, si: int) -> dict[str, Any]:
        lay = self._layouts.get(si)
        if lay is None:
            m = self.manifest
            video = self._src[si]["kind"] == "video"
            lay = self._layouts[si] = layout(
                m["frames"] if video else m["images_per_seq"], self.hw,
                start=self.specials["bos_video" if video else "bos_image"], seq_len=self.seq_len, specials=self.specials)
        return lay

    def _direct_access(self, si: int) -> _Direct | None:
        """Source ``si``'s arena access, made on first use; None where it does not apply (remote
        or compressed shards, or a platform without it): then frames go through the shard files."""
        if si not in self._direct:
            store, tab = self._stores[si], self._tab[si]
            ok = (arena.supported() and storage.is_local(store.url) and store.manifest["format"] == "arrow"
                  and len(tab["elem"]) > 0 and bool((tab["elem"] >= 0).all()))
            direct = None
            if ok:
                try:
                    direct = _Direct(store, tab, video=self._src[si]["kind"] == "video", frames=self.manifest["frames"],
                                     stride=self.manifest["stride"])
                except OSError as e:  # e.g. more shards than vm.max_map_count allows, or no mmap on this filesystem
                    warnings.warn(f"{store.url}: cannot map its shards into one address range ({e}); reading "
                                  "them one memory map per shard instead (same data, slower)", stacklevel=2)
            self._direct[si] = direct
        return self._direct[si]

    def _labels_all(self) -> tuple[list[str | None], list[np.ndarray]]:
        """Every source's label names in one list (``None`` last), and per source the index into
        it of each row's label (int32 [R], -1 = ``None``), so a batch looks labels up once."""
        got = self.__dict__.get("_all_labels")
        if got is None:
            names: list[str | None] = []
            rows = []
            for tab in self._tab:
                li = np.asarray(tab["label"])
                rows.append(np.where(li >= 0, li + len(names), -1).astype(np.int32))
                names.extend(tab["labels"])
            got = self._all_labels = ([*names, None], rows)
        return got

    def batch(self, ids: np.ndarray) -> dict[str, Any]:
        """The sequences of global sample ids ``ids`` (int64 [B]) as numpy arrays and lists.

        ``inputs``/``targets`` are int32 (SEQ_DTYPE) [B, T] views of one [B, T+1] buffer (targets =
        inputs shifted by one); ``frame_index`` is int64 [B, T], a read-only broadcast of one row when
        every sample of the batch has the same layout (the usual case: it depends only on it).
        """
        ids = np.asarray(ids, dtype=np.int64)
        b, t, hw = len(ids), self.seq_len, self.hw
        seq = np.empty((b, t + 1), dtype=SEQ_DTYPE)
        label_id = np.empty(b, dtype=np.int32)  # into _labels_all()'s list; -1 = None
        names, row_label = self._labels_all()
        groups = []
        bodies: dict[int, np.ndarray] = {}
        src, per_source = self._starts(ids)
        for si, pos, starts in per_source:
            rows = slice(None) if len(pos) == b else pos
            lay = self._layout(si)
            tab = self._tab[si]
            direct = self._direct_access(si)
            video = starts.ndim == 1
            nf = self.manifest["frames"] if video else starts.shape[1]
            # Every frame fits (the usual case): frames go straight into the sequence buffer, widened
            # on the way; else (S cut before its last frame) through a uint16 [m, F, HW] batch.
            body = None
            if lay["body"] == nf * hw:
                body = bodies.get(nf)
                if body is None:
                    body = bodies[nf] = seq[:, 1 : 1 + lay["body"]].reshape(b, nf, hw)  # a view
            if direct is not None:
                # One gather across all shards (whole clips: one strided window each).
                if body is None:
                    assemble_into(seq, rows, direct.clips(starts) if video else direct.frames(starts), lay)
                elif video:
                    direct.clips_into(body, rows, starts)
                else:
                    body[rows] = direct.frames(starts)
                # An image row holds one frame (frame number = row); a clip's label is its first frame's row's.
                row0 = np.searchsorted(tab["cum"], starts, side="right") - 1 if video else starts[:, 0]
            else:
                frames = self.sample_frames_of(starts) if video else starts
                if body is not None:
                    _, q = self._stores[si].gather(tab, frames, out=body, rows=pos)
                else:
                    toks, q = self.gather(si, frames)
                    assemble_into(seq, rows, toks, lay)
                row0 = q[:, 0]
            if body is not None:
                write_specials(seq, rows, lay)
            groups.append((rows, lay))
            label_id[rows] = row_label[si][row0]
        inputs, targets = inputs_targets(seq, [(rows, lay["keep"]) for rows, lay in groups if lay["padded"]])
        fi0 = groups[0][1]["frame_index"]
        if self._same_frame_index() or all(np.array_equal(lay["frame_index"], fi0) for _, lay in groups):
            frame_index = self._broadcast_rows(fi0, b)
        else:
            frame_index = np.empty((b, t), dtype=np.int64)
            for rows, lay in groups:
                frame_index[rows] = lay["frame_index"]
        return {"inputs": inputs, "targets": targets, "frame_index": frame_index,
                "source": list(map(self.sources.__getitem__, src.tolist())),
                "label": list(map(names.__getitem__, label_id.tolist())),
                "sample_index": ids.copy()}

    def sample_frames_of(self, first: np.ndarray) -> np.ndarray:
        """Video clips' absolute first frames (int64 [m]) → all their frames (int64 [m, F])."""
        m = self.manifest
        return first[:, None] + m["stride"] * np.arange(m["frames"], dtype=np.int64)[None, :]

    def _broadcast_rows(self, row: np.ndarray, b: int) -> np.ndarray:
        """``row`` (int64 [T]) as a read-only [b, T] broadcast, cached: every batch can share it."""
        cache = self.__dict__.setdefault("_rows_cache", {})
        key = (id(row), b)
        got = cache.get(key)
        if got is None or got[0] is not row:  # (the id of a freed row may be reused)
            got = cache[key] = (row, np.broadcast_to(row, (b, len(row))))
        return got[1]

    def _same_frame_index(self) -> bool:
        """Whether every source's sequences have the same frame_index row (cached)."""
        same = self.__dict__.get("_fi_same")
        if same is None:
            fi = [self._layout(si)["frame_index"] for si in range(len(self.sources))]
            same = self._fi_same = all(np.array_equal(x, fi[0]) for x in fi)
        return same

    def sequence(self, i: int) -> dict[str, Any]:
        """One sequence: like :meth:`batch` for ``[i]`` with the batch axis removed."""
        got = self.batch(np.asarray([i], dtype=np.int64))
        return {k: (v[0] if not isinstance(v, np.ndarray) or v.ndim > 0 else v) for k, v in got.items()}
