"""Opening an item's bytes: a local path, an fsspec URL, or a byte range inside a tar."""

from __future__ import annotations

import io
import os
import stat
from typing import Any

from pipeline.decode.config import DecodeError
from pipeline.sources._fs import is_local, url_to_fs


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def open_source(item: dict, storage_options: dict | None = None) -> tuple[Any, Any]:
    """(what to hand to av.open / Image.open, object to close afterwards or None).

    Local files go to FFmpeg/Pillow by path (native I/O, fastest); remote files as fsspec file
    objects (range reads); tar members as their bytes in memory (they are single images).
    Raises DecodeError("zero bytes") for empty files and DecodeError("missing file: ...") for
    files that vanished after listing.
    """
    uri = item["uri"]
    off, size = item.get("byte_offset"), item.get("byte_size")
    if off is not None:
        if not size:
            raise DecodeError("zero bytes")
        fs, path = url_to_fs(uri, storage_options)
        data = fs.cat_file(path, start=int(off), end=int(off) + int(size))
        if len(data) != size:
            raise DecodeError(f"truncated: tar member has {len(data)} of {size} bytes")
        return io.BytesIO(data), None
    if is_local(uri):
        path = local_path(uri)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DecodeError(f"missing file: {path}") from None
        # Only regular files have a meaningful size; FIFOs and devices are opened as they are.
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            raise DecodeError("zero bytes")
        return path, None
    fs, path = url_to_fs(uri, storage_options)
    try:
        if fs.size(path) == 0:
            raise DecodeError("zero bytes")
    except FileNotFoundError:
        raise DecodeError(f"missing file: {uri}") from None
    f = fs.open(path, "rb", block_size=4 * 1024 * 1024)
    return f, f


def sniff(src: Any, n: int = 16) -> bytes:
    """First bytes of the source (to tell a truncated container from a non-media file)."""
    try:
        if isinstance(src, str):
            with open(src, "rb") as f:
                return f.read(n)
        pos = src.tell()
        src.seek(0)
        head = src.read(n)
        src.seek(pos)
        return head
    except OSError:
        return b""


def looks_like_container(head: bytes) -> bool:
    """ISO-BMFF (mp4/mov: 'ftyp' at 4), Matroska/WebM (EBML magic) or AVI (RIFF)."""
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or head[:4] == b"RIFF"
