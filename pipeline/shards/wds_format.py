"""WebDataset tar shards: members ``{key}.tokens.npy`` and ``{key}.json`` per row.

Readable by the plain ``webdataset`` library. Every header field that could vary between runs
(mtime, owner, group, mode, order) is pinned, so the same rows give the same bytes. Reading
accepts regular files with validated names only: absolute paths, ``..`` components, links and
devices are refused, and ``.npy`` members are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.shards.rows import META_COLUMNS, check_key
from pipeline.sources.tar_index import index_tar

TOKENS_EXT = "tokens.npy"
META_EXT = "json"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


class TarFileWriter:
    def __init__(self, path: str):
        from pipeline.shards.arrow_format import HashingFile

        self._f = HashingFile(path)
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            meta = {c: r[c] for c in META_COLUMNS}
            shaped = r["tokens"].reshape(r["num_frames"], r["grid_h"], r["grid_w"])
            members = [
                (f"{r['key']}.{META_EXT}", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
                (f"{r['key']}.{TOKENS_EXT}", _npy_bytes(shaped.astype("<u2", copy=False))),
            ]
            for name, data in members:
                self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    def digest(self) -> tuple[str, int]:
        return self._f.sha256.hexdigest(), self._f.size

    def close(self) -> None:
        self._tar.close()
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # noqa: BLE001
            pass


def check_member_name(name: str, url: str) -> str:
    """``name`` if it is a safe relative path; raise ValueError otherwise."""
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm.startswith("..") or "/../" in f"/{name}/" or "\\" in name or norm != name:
        raise ValueError(f"{url}: refusing tar member {name!r}: unsafe path")
    return name


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the base name."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext


class _LocalRanges:
    """The part of the fsspec interface TarShardReader uses (size, cat_file, cat_ranges), over one
    file descriptor kept open with os.pread: fsspec's local cat_file opens and closes the file on
    every call, and a shard's index reads one header per member."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)

    def size(self, path: str) -> int:
        return os.fstat(self.fd).st_size

    def cat_file(self, path: str, start: int = 0, end: int | None = None) -> bytes:
        end = self.size(path) if end is None else end
        return os.pread(self.fd, max(0, end - start), start)

    def cat_ranges(self, paths: list[str], starts: list[int], ends: list[int], on_error: str = "raise") -> list[bytes]:
        return [self.cat_file(p, s, e) for p, s, e in zip(paths, starts, ends, strict=True)]

    def close(self) -> None:
        os.close(self.fd)


class TarShardReader:
    """Rows of a WebDataset tar shard, by index.

    Member offsets come from the 512-byte headers alone (:func:`pipeline.sources.tar_index.index_tar`)
    and every member is read with one explicit byte range (``fs.cat_file(path, start, end)``): no
    stream is opened, so on an object store no read-ahead pulls in the rest of the archive. A local
    shard is read the same way through one open file descriptor (:class:`_LocalRanges`).
    ``bytes_fetched`` counts what this reader fetched.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        if storage.is_local(url):
            self._path = storage.local_path(url)
            self._fs = _LocalRanges(self._path)
        else:
            self._fs, self._path = storage.url_to_fs(url, storage_options)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        url = self.url
        idx = index_tar(self._fs, self._path)
        if idx.rejected:
            raise ValueError(
                f"{url}: refusing tar member {idx.rejected[0]!r}: only regular files with safe relative paths are "
                "read (no links, directories, devices or sparse files)")
        self.bytes_fetched = idx.bytes_fetched
        self._index: list[dict[str, tuple[int, int]]] = []
        keys: list[str] = []
        for name, offset, size in idx.members:
            key, ext = split_member(check_member_name(name, url))
            check_key(key)
            if ext not in (TOKENS_EXT, META_EXT):
                raise ValueError(f"{url}: unexpected tar member {name!r} (expected .{TOKENS_EXT} or .{META_EXT})")
            if not keys or keys[-1] != key:
                keys.append(key)
                self._index.append({})
            self._index[-1][ext] = (offset, size)
        for k, entry in zip(keys, self._index, strict=True):
            if set(entry) != {TOKENS_EXT, META_EXT}:
                raise ValueError(f"{url}: row {k} lacks a member (has {sorted(entry)})")
        self._keys = keys
        self._meta_cache: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, off: int, size: int) -> bytes:
        data = self._fs.cat_file(self._path, start=off, end=off + size) if size else b""
        self.bytes_fetched += len(data)
        if len(data) != size:
            raise ValueError(f"{self.url}: member bytes [{off}, {off + size}) gave {len(data)} bytes: the shard is "
                             "truncated; re-run the job for this shard")
        return data

    def row(self, i: int) -> dict[str, Any]:
        entry = self._index[i]
        meta = json.loads(self._read(*entry[META_EXT]))
        meta["tokens"] = self.tokens(i)
        return meta

    def tokens(self, i: int) -> np.ndarray:
        raw = io.BytesIO(self._read(*self._index[i][TOKENS_EXT]))
        arr = np.lib.format.read_array(raw, allow_pickle=False)
        if arr.dtype != np.dtype("<u2") or arr.ndim != 3:
            raise ValueError(f"{self.url}: row {self._keys[i]} tokens have dtype {arr.dtype}, shape {arr.shape}")
        return arr

    def _metas(self) -> list[dict[str, Any]]:
        """Every row's metadata (its ``.json`` member), fetched once, all ranges in one concurrent
        ``cat_ranges``; the tokens members are not read."""
        if self._meta_cache is None:
            spans = [e[META_EXT] for e in self._index]
            got = (self._fs.cat_ranges([self._path] * len(spans), [o for o, _ in spans], [o + n for o, n in spans],
                                      on_error="raise") if spans else [])
            for (o, n), data in zip(spans, got, strict=True):
                if len(data) != n:
                    raise ValueError(f"{self.url}: member bytes [{o}, {o + n}) gave {len(data)} bytes: the shard is "
                                     "truncated; re-run the job for this shard")
            self.bytes_fetched += sum(len(d) for d in got)
            self._meta_cache = [json.loads(d) for d in got]
        return self._meta_cache

    def column(self, name: str) -> list:
        if name == "key":
            return list(self._keys)
        return [m[name] for m in self._metas()]

    def close(self) -> None:
        """Closes a local shard's descriptor (remote shards keep nothing open between reads)."""
        if isinstance(self._fs, _LocalRanges) and self._fs.fd >= 0:
            self._fs.close()
            self._fs.fd = -1
