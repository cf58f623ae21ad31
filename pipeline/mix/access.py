"""Global sample id → tokens: the read side of a mix, in numpy (no torch).

``MixReader(mix_url, split)`` maps a batch of global sample ids to their sequences in a few
vectorised steps: blend lookup (memory-mapped index, O(1) formula past its end) → source-local
stream positions → seeded per-pass permutation → absolute first frames → (row, frame) by binary
search → token gather straight from the shard bytes → sequence assembly.

Token gather. For uncompressed Arrow shards the build step recorded where each row's tokens sit
in the data file, so a frame is ``HW`` consecutive uint16 values at a known element offset:
- local files are memory-mapped once per process and frames are copied with one fancy index per
  shard over an overlapping-window view (each window = one frame's worth of values);
- remote files (s3://...) are read by byte ranges through fsspec with a bounded in-memory block
  cache (``cache_type="blockcache"``, at most ``block_cache_mb`` per open shard, LRU);
- other shards (WebDataset, zstd) go through :func:`pipeline.shards.open_shard`.
With ``verify_sha256`` each shard's data file is hashed once per process on first use and compared
with the sha256 pinned in its dataset manifest (for a remote shard this reads it fully once).
"""

from __future__ import annotations

import io
import json
import mmap
import os
from typing import Any

import numpy as np

import schemas
from pipeline import storage
from pipeline.mix.blend import Blend, SourceOrder, _mix64
from pipeline.mix.build import TABLE_ARRAYS, order_key
from pipeline.mix.sequence import assemble_into, inputs_targets, layout, write_specials
from pipeline.mix.tables import locate_frames
from pipeline.shards import open_shard, read_manifest


def read_mix_manifest(mix_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read and validate a mix manifest; checks its content hash."""
    doc = storage.read_json(mix_url, "mix_manifest", storage_options)
    if schemas.content_hash(doc) != doc["content_hash"]:
        raise ValueError(f"{mix_url}: content_hash does not match its content (edited by hand?); rebuild it with toto-pipeline mix")
    return doc


def _parent(url: str) -> str:
    base = storage.basename(url)
    return url[: len(url) - len(base)].rstrip("/") or "."


class _ShardFile:
    """Token access to one shard's data file (opened lazily, once per process)."""

    def __init__(self, url: str, sha256: str, fmt: str, hw: int, storage_options: dict | None,
                 verify: bool, block_cache_mb: int):
        self.url, self.sha256, self.fmt, self.hw = url, sha256, fmt, hw
        self.so, self.verify, self.block_cache_mb = storage_options, verify, block_cache_mb
        self._win: np.ndarray | None = None
        self._mmap: mmap.mmap | None = None
        self._file = None
        self._reader = None
        self._checked = False

    def _check(self) -> None:
        if self.verify and not self._checked:
            got = storage.sha256_file(self.url, self.so)
            if got != self.sha256:
                raise ValueError(
                    f"{self.url}: sha256 {got} does not match the dataset manifest ({self.sha256}); the shard is "
                    "corrupt or was replaced: re-run the job for this shard or rebuild the mix"
                )
        self._checked = True

    def frames_direct(self, starts: np.ndarray) -> np.ndarray:
        """Frames whose first token is at uint16 element ``starts`` (int64 [M]) → uint16 [M, HW]."""
        self._check()
        if storage.is_local(self.url):
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
        if self._file is None:
            fs, path = storage.url_to_fs(self.url, self.so)
            block = 1 << 20
            self._file = fs.open(path, "rb", block_size=block, cache_type="blockcache",
                                 cache_options={"maxblocks": max(1, self.block_cache_mb)})
        out = np.empty((len(starts), self.hw), dtype=np.uint16)
        # One range per run of nearby frames (frames of one clip lie within one row).
        order = np.argsort(starts, kind="stable")
        i = 0
        while i < len(order):
            j = i
            lo = int(starts[order[i]])
            while j + 1 < len(order) and int(starts[order[j + 1]]) - lo < (1 << 18):
                j += 1
            hi = int(starts[order[j]]) + self.hw
            self._file.seek(lo * 2)
            buf = np.frombuffer(self._file.read((hi - lo) * 2), dtype=np.uint16)
            for k in order[i : j + 1]:
                s = int(starts[k]) - lo
                out[k] = buf[s : s + self.hw]
            i = j + 1
        return out

    def frames_by_row(self, rows: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Frames ``frames`` of shard rows ``rows`` via the shard reader (any format) → uint16 [M, HW]."""
        if self._reader is None:
            self._check()
            self._reader = open_shard(self.url, self.so)
        out = np.empty((len(rows), self.hw), dtype=np.uint16)
        for k, (r, f) in enumerate(zip(rows.tolist(), frames.tolist(), strict=True)):
            out[k] = self._reader.tokens(r)[f].reshape(-1)
        return out


class TokenStore:
    """Frame tokens of one token dataset, addressed through a split table (see tables.SplitTable)."""

    def __init__(self, url: str, manifest: dict[str, Any], hw: int, *, storage_options: dict | None = None,
                 verify_sha256: bool = True, block_cache_mb: int = 64):
        self.url, self.manifest, self.hw = url, manifest, hw
        self.storage_options, self.verify_sha256, self.block_cache_mb = storage_options, verify_sha256, block_cache_mb
        self._files: dict[int, _ShardFile] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        # Memory maps and open files are per process: DataLoader workers reopen them lazily.
        d = dict(self.__dict__)
        d["_files"] = {}
        return d

    def _file(self, shard: int) -> _ShardFile:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            sh = self.manifest["shards"][shard]
            f = self._files[shard] = _ShardFile(
                storage.join(self.url, sh["data_file"]), sh["sha256"], self.manifest["format"], self.hw,
                self.storage_options, self.verify_sha256, self.block_cache_mb)
        return f

    def gather(self, table: dict[str, np.ndarray], frames: np.ndarray, out: np.ndarray | None = None,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of absolute frames (int64 [m, F]) → (tokens [m, F, HW], row position [m, F]).

        Without ``out`` the tokens are a new uint16 array. With ``out`` (any integer dtype,
        [B, F, HW], e.g. an int64 view into the batch's sequence buffer) frame ``f`` of sample ``i``
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
        for seg, sh in _by_shard(table["shard"][q]):
            f = self._file(sh)
            if elem[seg].min() >= 0:  # offsets known: uncompressed Arrow
                out[ri[seg], fi[seg]] = f.frames_direct(starts[seg])
            else:
                out[ri[seg], fi[seg]] = f.frames_by_row(table["row"][q[seg]], k[seg])
        return out if out.shape[0] == m else out[rows], q.reshape(m, nf)


def _by_shard(shard: np.ndarray):
    """(positions, shard id) per distinct shard in ``shard`` (a stable sort, then runs: a batch
    touches each shard of a source once, so per-shard costs are paid once per batch)."""
    order = np.argsort(shard, kind="stable")
    s = shard[order]
    bounds = [0, *(np.flatnonzero(s[1:] != s[:-1]) + 1).tolist(), len(order)]
    for a, z in zip(bounds[:-1], bounds[1:], strict=True):
        yield order[a:z], int(s[a])


class MixReader:
    """Read sequences of a mix by global sample id (one split)."""

    def __init__(self, mix_url: str, *, split: str = "train", storage_options: dict | None = None,
                 verify_sha256: bool = True, block_cache_mb: int = 64):
        self.mix_url = mix_url
        self.storage_options = storage_options
        self.verify_sha256 = verify_sha256
        self.block_cache_mb = block_cache_mb
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
        self._layouts: dict[int, dict[str, Any]] = {}
        self._stores = [TokenStore(s["url"], self._dsm[s["name"]], self.hw, storage_options=storage_options,
                                   verify_sha256=verify_sha256, block_cache_mb=block_cache_mb) for s in self._src]

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
        if self.verify_sha256 and not getattr(self, "_index_checked", False):
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
            t = {a: self._npy(f"{sp}.{s['name']}.{a}.npy") for a in TABLE_ARRAYS}
            t["labels"] = self._json(f"{sp}.{s['name']}.labels.json")
            self._tab.append(t)

    def __getstate__(self) -> dict:
        # Index arrays are memory maps: a worker started by "spawn" maps them again instead of
        # receiving a pickled copy.
        d = dict(self.__dict__)
        for k in ("_blend_src", "_blend_local", "_tab"):
            d.pop(k, None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._load_index()

    # -- mapping ---------------------------------------------------------------------------
    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ids → (source index, source-local sample index), int64 arrays."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = ids < self.num_samples
        if inside.all():
            return self._blend_src[ids].astype(np.int64), np.asarray(self._blend_local[ids], dtype=np.int64)
        return self.blend.source_and_local(ids)

    def sample_frames(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Per source present in ``ids``: (source index, positions in ``ids``, absolute frames [m, F])."""
        src, local = self.locate(ids)
        m = self.manifest
        out = []
        for si in np.unique(src):
            pos = np.flatnonzero(src == si)
            j = local[pos]
            if self._src[si]["kind"] == "video":
                uid = self._orders[si].units(j)  # (m,) unit ids
                first = np.asarray(self._tab[si]["units"][uid])  # (m,) absolute first frames
                if m["jitter"]:
                    first = first + self._jitter(si, j // self._orders[si].n, uid)
                frames = first[:, None] + m["stride"] * np.arange(m["frames"], dtype=np.int64)[None, :]
            else:
                k = m["images_per_seq"]
                stream = j[:, None] * k + np.arange(k, dtype=np.int64)[None, :]  # (m, K)
                frames = np.asarray(self._tab[si]["units"][self._orders[si].units(stream)])
            out.append((int(si), pos, frames))
        return out

    def _jitter(self, si: int, epoch: np.ndarray, uid: np.ndarray) -> np.ndarray:
        """Seeded per-pass start offsets in [0, slack[uid]] (int64 [m]): each pass sees new clip phases."""
        slack = np.asarray(self._tab[si]["slack"][uid]).astype(np.uint64)
        out = np.empty(len(uid), dtype=np.int64)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            with np.errstate(over="ignore"):
                h = _mix64(uid[sel].astype(np.uint64) ^ self._jitter_key(si, e))
            out[sel] = (h % (slack[sel] + np.uint64(1))).astype(np.int64)
        return out

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

    def batch(self, ids: np.ndarray) -> dict[str, Any]:
        """The sequences of global sample ids ``ids`` (int64 [B]) as numpy arrays and lists.

        ``inputs``/``targets`` are int64 [B, T] views of one [B, T+1] buffer (targets = inputs
        shifted by one); ``frame_index`` is int64 [B, T], a read-only broadcast of one row when
        every sample of the batch has the same layout (the usual case: it depends only on it).
        """
        ids = np.asarray(ids, dtype=np.int64)
        b, t = len(ids), self.seq_len
        seq = np.empty((b, t + 1), dtype=np.int64)
        source: list[str] = [""] * b
        label: list[str | None] = [None] * b
        groups = []
        for si, pos, frames in self.sample_frames(ids):
            rows = slice(None) if len(pos) == b else pos
            lay = self._layout(si)
            nf = frames.shape[1]
            if lay["body"] == nf * self.hw:
                # Every frame fits: gather straight into the sequence buffer, int64 on the way.
                body = seq[:, 1 : 1 + lay["body"]].reshape(b, nf, self.hw)  # a view
                _, q = self._stores[si].gather(self._tab[si], frames, out=body, rows=pos)
                write_specials(seq, rows, lay)
            else:
                toks, q = self.gather(si, frames)
                assemble_into(seq, rows, toks, lay)
            groups.append((rows, lay))
            tab = self._tab[si]
            names, name = tab["labels"], self.sources[si]
            for p, li in zip(pos.tolist(), np.asarray(tab["label"][q[:, 0]]).tolist(), strict=True):
                source[p] = name
                label[p] = names[li] if li >= 0 else None
        inputs, targets = inputs_targets(seq, [(rows, lay["keep"]) for rows, lay in groups if lay["padded"]])
        fi0 = groups[0][1]["frame_index"]
        if all(lay["frame_index"] is fi0 or np.array_equal(lay["frame_index"], fi0) for _, lay in groups):
            frame_index = np.broadcast_to(fi0, (b, t))
        else:
            frame_index = np.empty((b, t), dtype=np.int64)
            for rows, lay in groups:
                frame_index[rows] = lay["frame_index"]
        return {"inputs": inputs, "targets": targets, "frame_index": frame_index, "source": source,
                "label": label, "sample_index": ids.copy()}

    def sequence(self, i: int) -> dict[str, Any]:
        """One sequence: like :meth:`batch` for ``[i]`` with the batch axis removed."""
        got = self.batch(np.asarray([i], dtype=np.int64))
        return {k: (v[0] if not isinstance(v, np.ndarray) or v.ndim > 0 else v) for k, v in got.items()}
