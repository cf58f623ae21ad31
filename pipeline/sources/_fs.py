"""Small fsspec helpers shared by the adapters and the work list (local paths and s3://)."""

from __future__ import annotations

import os
from typing import Any

import fsspec


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """Return (filesystem, path) for a local path or a URL such as s3://bucket/key."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def full_url(fs: Any, root_url: str, root_path: str, path: str) -> str:
    """Turn a path returned by `fs.find` under `root_path` back into a URL under `root_url`.

    Keeps the user's spelling of the root (s3://bucket/prefix or a local path) so work items
    carry URLs that the decoder can open with the same storage options.
    """
    rel = os.path.relpath(path, root_path) if is_local(root_url) else path[len(root_path.rstrip("/")) + 1 :]
    return join(root_url, rel.replace(os.sep, "/"))
