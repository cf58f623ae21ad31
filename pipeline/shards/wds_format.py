"""WebDataset tar shards: members ``{key}.tokens.npy`` and ``{key}.json`` per row.

Readable by the plain ``webdataset`` library. Every header field that could vary between runs
(mtime, owner, group, mode, order) is pinned, so the same rows give the same bytes. Reading
accepts regular files with validated names only: absolute paths, ``..`` components, links and
devices are refused, and ``.npy`` members are loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.shards.rows import META_COLUMNS, check_key

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


def check_member(ti: tarfile.TarInfo, url: str) -> str:
    """The member's name if it is a safe regular file; raise ValueError otherwise."""
    name = ti.name
    if not ti.isreg():
        kind = "symlink" if ti.issym() else "hard link" if ti.islnk() else "directory" if ti.isdir() else "special file"
        raise ValueError(f"{url}: refusing tar member {name!r}: it is a {kind}, only regular files are read")
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm.startswith("..") or "/../" in f"/{name}/" or "\\" in name or norm != name:
        raise ValueError(f"{url}: refusing tar member {name!r}: unsafe path")
    return name


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is everything before the first dot of the base name."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext


class TarShardReader:
    """Rows of a WebDataset tar shard, by index (member offsets are read once)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        fs, path = storage.url_to_fs(url, storage_options)
        self._f = fs.open(path, "rb")
        self._index: list[dict[str, tuple[int, int]]] = []
        keys: list[str] = []
        with tarfile.open(fileobj=self._f, mode="r:") as tar:
            for ti in tar:
                name = check_member(ti, url)
                key, ext = split_member(name)
                check_key(key)
                if ext not in (TOKENS_EXT, META_EXT):
                    raise ValueError(f"{url}: unexpected tar member {name!r} (expected .{TOKENS_EXT} or .{META_EXT})")
                if not keys or keys[-1] != key:
                    keys.append(key)
                    self._index.append({})
                self._index[-1][ext] = (ti.offset_data, ti.size)
        for k, entry in zip(keys, self._index, strict=True):
            if set(entry) != {TOKENS_EXT, META_EXT}:
                raise ValueError(f"{url}: row {k} lacks a member (has {sorted(entry)})")
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, off: int, size: int) -> bytes:
        self._f.seek(off)
        return self._f.read(size)

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

    def column(self, name: str) -> list:
        if name == "key":
            return list(self._keys)
        return [json.loads(self._read(*e[META_EXT]))[name] for e in self._index]

    def close(self) -> None:
        self._f.close()
