"""One way to reach storage: local paths and s3:// (any fsspec URL), with atomic commits.

Atomicity: locally a file is written under a temporary name in the same directory, fsynced and
renamed over the final name (then the directory is fsynced). On object stores a single PUT (or a
completed multipart upload) of the final key is the atomic step, so nothing is written under the
final key before the data is whole.

Credentials come from the environment / AWS configuration or from ``storage_options``; they are
never written into documents or log lines (see :func:`redact`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

import schemas

_CHUNK = 8 << 20
TMP_MARK = ".tmp-"


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or URL."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"expected a path or URL, got {url!r}")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    """The filesystem path of a local URL."""
    return url[len("file://") :] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or URL (always with '/')."""
    out = url.rstrip("/") if url not in ("/",) else url
    for p in parts:
        out = f"{out}/{p.strip('/')}" if out else p
    return out


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


_SECRET_RE = re.compile(r"(?i)(aws_secret_access_key|secret|token|password|key)=([^&\s]+)")


def redact(text: str) -> str:
    """Remove credential-looking values and userinfo from URLs before they reach a log."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    return _SECRET_RE.sub(r"\1=***", text)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(final_name: str) -> str:
    """A temporary name beside ``final_name`` that debris cleaning recognises."""
    return f".{final_name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def commit_local_file(tmp_path: str, url: str, storage_options: dict | None = None) -> None:
    """Move a finished local file to ``url`` atomically (rename locally, one upload remotely).

    The caller has written and fsynced the temporary file (the shard writers fsync on close); it
    is consumed (renamed or deleted) in every case.
    """
    if is_local(url):
        dest = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        os.replace(tmp_path, dest)
        _fsync_dir(os.path.dirname(os.path.abspath(dest)))
        return
    fs, path = url_to_fs(url, storage_options)
    try:
        fs.put_file(tmp_path, path)
    finally:
        os.unlink(tmp_path)


def atomic_write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or the whole content."""
    if is_local(url):
        dest = local_path(url)
        d = os.path.dirname(os.path.abspath(dest))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, tmp_name(os.path.basename(dest)))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(d)
        return
    fs, path = url_to_fs(url, storage_options)
    fs.pipe_file(path, data)


@contextmanager
def staging_file(url: str) -> Iterator[str]:
    """A local path to write a file destined for ``url``; same directory when local.

    The caller commits it with :func:`commit_local_file`; on an exception it is removed.
    """
    if is_local(url):
        dest = local_path(url)
        d = os.path.dirname(os.path.abspath(dest))
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, tmp_name(os.path.basename(dest)))
    else:
        fd, tmp = tempfile.mkstemp(prefix="toto-", suffix=TMP_MARK + basename(url))
        os.close(fd)
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(url: str, doc: dict, kind: str, storage_options: dict | None = None) -> dict:
    """Validate ``doc`` as ``kind`` and write it atomically (sorted keys, indented, newline)."""
    schemas.validate(doc, kind, source=url)
    data = (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    atomic_write_bytes(url, data, storage_options)
    return doc


def read_json(url: str, kind: str, storage_options: dict | None = None) -> dict:
    """Read and validate a document of ``kind``; errors name the file."""
    fs, path = url_to_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{kind} document not found: {url}") from None
    return _parse_json(raw, kind, url)


def _parse_json(raw: bytes, kind: str, url: str) -> dict:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise schemas.SchemaError(f"{url} is not valid JSON ({e}); the file is damaged: rebuild it") from None
    return schemas.validate(doc, kind, source=url)


def read_json_many(urls: list[str], kind: str, storage_options: dict | None = None, threads: int = 32) -> list[dict]:
    """:func:`read_json` of many documents on one filesystem, fetched concurrently, in `urls` order.

    Object stores get one batched ``fs.cat`` (s3fs issues the GETs concurrently); local paths are
    read by `threads` threads. One GET per document, no HEAD, no read-ahead.
    """
    if not urls:
        return []
    fs, _ = url_to_fs(urls[0], storage_options)
    paths = [fs._strip_protocol(u) for u in urls]
    if isinstance(fs, LocalFileSystem):
        from concurrent.futures import ThreadPoolExecutor

        def get(p: str) -> bytes | BaseException:
            try:
                return fs.cat_file(p)
            except Exception as e:  # noqa: BLE001 - re-raised below with the document's URL
                return e

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as ex:
            raws = list(ex.map(get, paths))
    else:
        got = fs.cat(paths, on_error="return")
        raws = [got.get(p, FileNotFoundError(p)) for p in paths]
    out = []
    for url, raw in zip(urls, raws, strict=True):
        if isinstance(raw, FileNotFoundError):
            raise FileNotFoundError(f"{kind} document not found: {url}")
        if isinstance(raw, BaseException):
            raise raw
        out.append(_parse_json(raw, kind, url))
    return out


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path)


def sha256_file(url: str, storage_options: dict | None = None) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def listdir(url: str, storage_options: dict | None = None) -> list[str]:
    """Base names of the entries directly under ``url`` (empty if it does not exist)."""
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []
    try:
        fs.invalidate_cache(path)
        return sorted(basename(p) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = url_to_fs(url, storage_options)
    if isinstance(fs, LocalFileSystem) and os.path.isdir(path):
        shutil.rmtree(path)
    else:
        fs.rm(path)


def check_writable(url: str, storage_options: dict | None = None) -> None:
    """Fail fast (before any work) with a clear message if ``url`` cannot be written."""
    # TMP_MARK in the name: a probe left behind by a kill between its write and its removal is
    # debris that the next run's clean-up removes.
    probe = join(url, f".toto-write-probe{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        atomic_write_bytes(probe, b"ok", storage_options)
        remove(probe, storage_options)
    except Exception as e:  # noqa: BLE001 - any failure means "not writable"; say why
        raise RuntimeError(f"output location {redact(url)} is not writable: {type(e).__name__}: {redact(str(e))}") from None
