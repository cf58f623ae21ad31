"""Dataset adapters: a dataset root (local path or s3://) → work items (an Arrow table of
items.WORKLIST_SCHEMA, the work list's compact rows) + a ListReport.

Every adapter lists storage once (os.scandir locally, `fs.find` on object stores, or a `listing=`
file of relative paths), matches files against the dataset's annotation files, and reports what
did not match (counts plus a few examples) instead of raising. Header probes (RangeReader) and
tar indexes (tar_index) read explicit byte ranges, in threads. Layouts: docs/datasets.md.
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sources._fs import is_local, join, url_to_fs
from pipeline.sources.items import (
    DEFAULT_CHUNK_SECONDS,
    DEFAULT_MAX_ITEM_SECONDS,
    IMAGE_EXTS,
    URI_PARTS,
    VIDEO_EXTS,
    WORKLIST_POOL,
    WORKLIST_SCHEMA,
    ItemColumns,
    ListReport,
    expand_items,
    make_item,
    media_kind,
    safe_video_id,
    segment_video,
)
from pipeline.sources.tar_index import TarIndex, index_tar

_WNID = re.compile(r"^n\d{8}$")
_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "validate", "valid", "validation"),
    "validate": ("val", "validate", "valid", "validation"),
    "test": ("test", "testing"),
}


def _norm_root(root: str) -> str:
    root = root.rstrip("/")
    if is_local(root):
        root = root[len("file://") :] if root.startswith("file://") else root
        return os.path.abspath(root)
    return root


def _url(root: str, rel: str) -> str:
    """The URL of `rel` (a '/'-separated path under the normalised root)."""
    return f"{root}/{rel}"


_BATCH = 65536


def _walk_local(top: str, prefix: str, out: list[str]) -> Iterator[list[str]]:
    # os.scandir instead of fsspec's find, which builds an info dict per file (~1 KB each) before
    # returning names. Symlinks are followed like fsspec's local listing does. Yields (and clears)
    # `out` whenever it holds _BATCH paths.
    with os.scandir(top) as it:
        for e in it:
            if e.is_dir():
                yield from _walk_local(e.path, f"{prefix}{e.name}/", out)
            elif e.is_file():
                out.append(prefix + e.name)
                if len(out) >= _BATCH:
                    yield out[:]
                    out.clear()


def _listing_batches(root: str, storage_options: dict | None, listing: str | None) -> Iterator[list[str]]:
    """The files under root as '/'-separated paths relative to it, unsorted, in batches."""
    fs, root_path = url_to_fs(root, storage_options)
    if listing is not None:
        yield from _read_listing(listing, storage_options)
        return
    if not fs.isdir(root_path):
        raise ValueError(f"dataset root {root!r} is not a directory (or is empty); pass the folder that holds the dataset")
    if is_local(root):
        out: list[str] = []
        yield from _walk_local(root_path, "", out)
        yield out
        return
    base = len(root_path.rstrip("/")) + 1
    paths = fs.find(root_path)
    fs.invalidate_cache(root_path)  # s3fs keeps every listed object's info otherwise
    for i in range(0, len(paths), _BATCH):
        yield [p[base:] for p in paths[i : i + _BATCH]]


def _list_files(root: str, storage_options: dict | None, listing: str | None = None) -> tuple[Any, str, list[str]]:
    """(fs, root path, all files under root as '/'-separated paths relative to it, sorted).

    A file's URL is `_url(root, rel)`: only the relative paths are kept. `listing`: a text file
    (local or remote, optionally .gz/.zst/.bz2) with one path relative to root per line, used
    instead of listing storage, e.g. made from an S3 Inventory report: a LIST of 1e7 objects takes
    hours, the file seconds.
    """
    fs, root_path = url_to_fs(root, storage_options)
    rels = [r for batch in _listing_batches(root, storage_options, listing) for r in batch]
    rels.sort()
    return fs, root_path, rels


def _list_files_arrow(root: str, storage_options: dict | None, listing: str | None = None) -> pa.Array:
    """:func:`_list_files` as one sorted Arrow string array: ~30 bytes per file instead of a
    Python string (~80) each; Python holds one batch of names at a time."""
    pool = WORKLIST_POOL
    chunks = [pa.array(b, type=pa.string(), memory_pool=pool)
              for b in _listing_batches(root, storage_options, listing) if b]
    if not chunks:
        return pa.array([], type=pa.string())
    arr = pa.chunked_array(chunks).combine_chunks(memory_pool=pool)
    del chunks
    # UTF-8 byte order is code-point order: the same order as Python's sorted().
    return pc.take(arr, pc.array_sort_indices(arr, memory_pool=pool), memory_pool=pool)


def _iter_strings(arr: pa.Array) -> Iterator[str]:
    """The values of a string array as Python strings, _BATCH at a time."""
    for i in range(0, len(arr), _BATCH):
        yield from arr.slice(i, _BATCH).to_pylist()


def _read_listing(listing: str, storage_options: dict | None) -> Iterator[list[str]]:
    import fsspec

    batch: list[str] = []
    with fsspec.open(listing, "rt", compression="infer", encoding="utf-8", **(storage_options or {})) as f:
        for n, line in enumerate(f, start=1):
            rel = line.strip()
            if not rel:
                continue
            if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
                raise ValueError(f"{listing}:{n}: {rel!r} is not a plain path relative to the dataset root "
                                 "(no leading '/', '.', '..' or empty parts); write paths as in 'train/a/b.mp4'")
            batch.append(rel)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
    yield batch


def _read_text(url: str, storage_options: dict | None) -> str:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8-sig")


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over an fsspec path where every read is one explicit byte range.

    fsspec's buffered files read ahead (s3fs: 5 MB blocks by default), which turns a header probe
    into a download; here `read(n)` at position p fetches exactly bytes [p, p + n) with
    `fs.cat_file(path, start, end)` (one ranged GET on object stores), and `bytes_fetched` counts
    what came back.
    """

    def __init__(self, fs: Any, path: str, size: int | None = None) -> None:
        super().__init__()
        self.fs, self.path = fs, path
        self.size = int(fs.size(path)) if size is None else int(size)
        self.pos = 0
        self.bytes_fetched = 0
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"seek to {base + offset} before the start of {self.path}")
        self.pos = base + offset
        return self.pos

    def read_range(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) clipped to the file (one request)."""
        end = min(self.size, start + length)
        if end <= start:
            return b""
        data = self.fs.cat_file(self.path, start=start, end=end)
        self.bytes_fetched += len(data)
        self.requests += 1
        return data

    def readinto(self, b: Any) -> int:
        data = self.read_range(self.pos, len(b))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        self.pos += n
        return n


# PyAV's I/O buffer: each refill is one ranged read of this many bytes.
PROBE_BUFFER_BYTES = 32 << 10


def probe_video_header(uri: str, storage_options: dict | None = None) -> tuple[float | None, int]:
    """(duration in seconds of the first video stream or None, bytes read from storage).

    Remote files are read through RangeReader (explicit byte ranges of PROBE_BUFFER_BYTES, no
    read-ahead), so a probe costs the container's header and index, not the file. Unreadable
    files give None and are decoded (and reported) later by the decoder.
    """
    import av

    reader: RangeReader | None = None
    try:
        if is_local(uri):
            # Only regular files: opening a FIFO or device would block the listing forever.
            if not stat.S_ISREG(os.stat(uri[len("file://") :] if uri.startswith("file://") else uri).st_mode):
                return None, 0
            ctx = av.open(uri, metadata_errors="ignore")
        else:
            fs, path = url_to_fs(uri, storage_options)
            reader = RangeReader(fs, path)
            ctx = av.open(reader, metadata_errors="ignore", buffer_size=PROBE_BUFFER_BYTES)
        try:
            if not ctx.streams.video:
                return None, _fetched(reader)
            s = ctx.streams.video[0]
            if s.duration is not None and s.time_base is not None:
                return float(s.duration * s.time_base), _fetched(reader)
            if ctx.duration is not None:
                return ctx.duration / 1_000_000, _fetched(reader)
            return None, _fetched(reader)
        finally:
            ctx.close()
    except Exception:
        return None, _fetched(reader)


def _fetched(reader: RangeReader | None) -> int:
    return reader.bytes_fetched if reader is not None else 0


def probe_duration(uri: str, storage_options: dict | None = None) -> float | None:
    """Duration in seconds of a video's first video stream from its container header; None if unknown/unreadable."""
    return probe_video_header(uri, storage_options)[0]


def _probe_list(uris: list[str], storage_options: dict | None, threads: int = 16) -> list[float | None]:
    """Durations of `uris` (in their order), probed in `threads` threads (the probes wait on I/O)."""
    if not uris:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as ex:
        return list(ex.map(lambda u: probe_duration(u, storage_options), uris))


def _probe_all(uris: list[str], storage_options: dict | None, threads: int = 16) -> dict[str, float | None]:
    return dict(zip(uris, _probe_list(uris, storage_options, threads), strict=True))


def _split_name(split: str) -> str:
    s = split.strip().lower()
    return "val" if s in ("validate", "valid", "validation") else s


# --------------------------------------------------------------------------------------------
# Kinetics
# --------------------------------------------------------------------------------------------


def _kinetics(
    root: str,
    *,
    dataset: str,
    storage_options: dict | None = None,
    splits: Iterable[str] | None = None,
    listing: str | None = None,
    **_: Any,
) -> tuple[pa.Table, ListReport]:
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options, listing)
    csvs = [r for r in files if r.lower().endswith(".csv")]
    videos = [r for r in files if r.lower().endswith(VIDEO_EXTS)]
    del files
    report.num_files = len(videos)
    # basename stem → [rel]; clips may sit in {split}/ or {split}/{label}/ folders.
    by_stem: dict[str, list[str]] = {}
    for r in videos:
        stem = os.path.splitext(r.rsplit("/", 1)[-1])[0]
        by_stem.setdefault(stem, []).append(r)
    want_splits = None if splits is None else {_split_name(s) for s in splits}
    items = ItemColumns()
    used: set[str] = set()
    seen_ids: set[str] = set()
    found_csv = False
    for cr in csvs:
        reader = csv.DictReader(io.StringIO(_read_text(_url(root, cr), storage_options)))
        first = next(reader, None)
        if first is None or not {"youtube_id", "time_start", "time_end"} <= set(first.keys()):
            continue
        found_csv = True
        for line_no, row in enumerate(itertools.chain([first], reader), start=2):
            try:
                yid = row["youtube_id"].strip()
                t0, t1 = int(float(row["time_start"])), int(float(row["time_end"]))
                split = _split_name(row.get("split") or os.path.splitext(cr.rsplit("/", 1)[-1])[0])
            except (ValueError, AttributeError):
                report.add("bad_row", f"{cr}:{line_no}: {dict(row)}")
                continue
            if want_splits is not None and split not in want_splits:
                continue
            label = (row.get("label") or "").strip() or None
            clip_stem = f"{yid}_{t0:06d}_{t1:06d}"
            video_id = safe_video_id(clip_stem)
            if video_id in seen_ids:
                report.add("duplicate_row", f"{cr}:{line_no}: {clip_stem}")
                continue
            cands = by_stem.get(clip_stem)
            trimmed = True
            if not cands:
                cands, trimmed = by_stem.get(yid), False
            if not cands:
                report.add("missing_file", f"{split}/{clip_stem}.mp4 (label {label!r})")
                continue
            seen_ids.add(video_id)
            aliases = _SPLIT_ALIASES.get(split, (split,))
            in_split = [c for c in cands if c.split("/", 1)[0].lower() in aliases]
            rel = (in_split or cands)[0]
            used.add(rel)
            items.add(
                uri=_url(root, rel),
                dataset=dataset,
                split=split,
                label=label,
                video_id=video_id,
                kind="video",
                t_start=0.0 if trimmed else float(t0),
                t_end=None if trimmed else float(t1),
            )
    if not found_csv:
        raise ValueError(
            f"no Kinetics annotation CSV (columns label,youtube_id,time_start,time_end,split) found under "
            f"{root!r}; put train.csv/validate.csv/test.csv in {root}/annotations/ (see docs/datasets.md)"
        )
    for r in videos:
        if r not in used:  # every item's file (trimmed or untrimmed) is in `used`
            report.add("unmatched_file", r)
    report.num_items = len(items)
    return items.table(), report


def _kinetics_adapter(name: str) -> Callable[..., tuple[pa.Table, ListReport]]:
    def adapter(root: str, **kw: Any) -> tuple[pa.Table, ListReport]:
        kw.setdefault("dataset", name)
        return _kinetics(root, **kw)

    adapter.__name__ = f"list_{name}"
    adapter.__doc__ = f"{name}: annotation CSVs + clips under {{split}}/ (trimmed or untrimmed)."
    return adapter


# --------------------------------------------------------------------------------------------
# Ego4D
# --------------------------------------------------------------------------------------------


def list_ego4d(
    root: str,
    *,
    storage_options: dict | None = None,
    max_item_seconds: float = DEFAULT_MAX_ITEM_SECONDS,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    probe_threads: int = 16,
    dataset: str = "ego4d",
    listing: str | None = None,
    **_: Any,
) -> tuple[pa.Table, ListReport]:
    """ego4d.json (`videos[].video_uid`, `duration_sec`) + v2/full_scale/{uid}.mp4 (or v1/)."""
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options, listing)
    meta_url = join(root, "ego4d.json")
    if "ego4d.json" not in files:
        raise ValueError(f"{meta_url} not found; Ego4D needs its metadata file ego4d.json at the dataset root")
    meta = json.loads(_read_text(meta_url, storage_options))
    videos = {r for r in files if r.lower().endswith(".mp4") and "/full_scale/" in f"/{r}"}
    del files
    report.num_files = len(videos)
    items, used, need_probe = [], set(), []
    for v in meta.get("videos", []):
        uid = str(v.get("video_uid", "")).strip()
        if not uid:
            report.add("bad_row", json.dumps(v)[:120])
            continue
        rel = next((c for c in (f"v2/full_scale/{uid}.mp4", f"v1/full_scale/{uid}.mp4") if c in videos), None)
        if rel is None:
            report.add("missing_file", f"v2/full_scale/{uid}.mp4")
            continue
        used.add(rel)
        dur = v.get("duration_sec")
        item = make_item(
            uri=_url(root, rel), dataset=dataset, split=str(v.get("split", "train") or "train"), label=None,
            video_id=safe_video_id(uid), kind="video",
        )
        items.append((item, float(dur) if dur is not None else None))
        if dur is None:
            need_probe.append(item["uri"])
    probed = _probe_all(need_probe, storage_options, probe_threads)
    out = ItemColumns()
    for item, dur in items:
        dur = dur if dur is not None else probed.get(item["uri"])
        out.extend(segment_video(item, dur, max_item_seconds=max_item_seconds, chunk_seconds=chunk_seconds))
    for r in sorted(videos):
        if r not in used:
            report.add("unmatched_file", r)
    report.num_items = len(out)
    return out.table(), report


# --------------------------------------------------------------------------------------------
# HowTo100M
# --------------------------------------------------------------------------------------------


def list_howto100m(
    root: str,
    *,
    storage_options: dict | None = None,
    max_item_seconds: float = DEFAULT_MAX_ITEM_SECONDS,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    probe_threads: int = 16,
    dataset: str = "howto100m",
    listing: str | None = None,
    **_: Any,
) -> tuple[pa.Table, ListReport]:
    """HowTo100M_v1.csv (`video_id,category_1,...`) + {video_id}.{mp4,webm,mkv} anywhere under root.

    Durations are not in the CSV, so each video's header is probed once (by byte ranges, in
    `probe_threads` threads) to cut it into bounded items; an unreadable header leaves one item
    that the decoder reports.
    """
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options, listing)
    csv_rel = next((r for r in files if r.rsplit("/", 1)[-1] == "HowTo100M_v1.csv"), None)
    if csv_rel is None:
        raise ValueError(f"HowTo100M_v1.csv not found under {root!r}; put the official CSV at the dataset root")
    vids = [r for r in files if r.lower().endswith((".mp4", ".webm", ".mkv"))]
    del files
    report.num_files = len(vids)
    by_stem: dict[str, list[str]] = {}
    for r in vids:
        by_stem.setdefault(os.path.splitext(r.rsplit("/", 1)[-1])[0], []).append(r)
    # (uri, label, video id) per video: a tuple, not an item dict, until its duration is known.
    pending: list[tuple[str, str | None, str]] = []
    used, seen = set(), set()
    rows = csv.DictReader(io.StringIO(_read_text(join(root, csv_rel), storage_options)))
    for line_no, row in enumerate(rows, start=2):
        vid = (row.get("video_id") or "").strip()
        if not vid:
            report.add("bad_row", f"{csv_rel}:{line_no}: {dict(row)}")
            continue
        if vid in seen:
            report.add("duplicate_row", f"{csv_rel}:{line_no}: {vid}")
            continue
        seen.add(vid)
        cands = sorted(by_stem.get(vid, []), key=lambda c: (VIDEO_EXTS.index(os.path.splitext(c)[1].lower()), c))
        if not cands:
            report.add("missing_file", f"{vid}.mp4 (or .webm/.mkv)")
            continue
        rel = cands[0]
        used.add(rel)
        label = (row.get("category_1") or "").strip() or None
        pending.append((_url(root, rel), label, safe_video_id(vid)))
    del seen, by_stem
    durs = _probe_list([p[0] for p in pending], storage_options, probe_threads)
    out = ItemColumns()
    for (uri, label, video_id), dur in zip(pending, durs, strict=True):
        item = make_item(uri=uri, dataset=dataset, split="train", label=label, video_id=video_id, kind="video")
        out.extend(segment_video(item, dur, max_item_seconds=max_item_seconds, chunk_seconds=chunk_seconds))
    for r in vids:
        if r not in used:
            report.add("unmatched_file", r)
    report.num_items = len(out)
    return out.table(), report


# --------------------------------------------------------------------------------------------
# ImageNet (ILSVRC-2012 and 21k)
# --------------------------------------------------------------------------------------------


def list_tar_members(uri: str, storage_options: dict | None = None) -> TarIndex:
    """Regular-file members of a tar as (name, data offset, size), read header by header.

    Only the 512-byte headers (and long-name / pax records) are fetched, each by an explicit byte
    range, and member data is skipped, so a 21k class tar is never downloaded or extracted
    (pipeline.sources.tar_index). Links, devices, directories, sparse files and unsafe names are
    returned in `rejected` and never read. Returns a TarIndex (members, rejected, bytes_fetched,
    archive_bytes).
    """
    fs, path = url_to_fs(uri, storage_options)
    return index_tar(fs, path)


def _ordered_map(fn: Callable[[Any], Any], args: list[Any], threads: int, ahead: int = 64) -> Iterator[Any]:
    """`map(fn, args)` run in `threads` threads, yielding in order with at most `ahead` results
    waiting, so the memory held does not grow with the number of arguments."""
    if not args:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(args)))) as ex:
        futs: collections.deque = collections.deque()
        it = iter(args)
        for a in itertools.islice(it, ahead):
            futs.append(ex.submit(fn, a))
        while futs:
            res = futs.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                futs.append(ex.submit(fn, nxt))
            yield res


def list_imagenet(
    root: str,
    *,
    storage_options: dict | None = None,
    dataset: str = "imagenet",
    splits: Iterable[str] | None = None,
    val_solution: str | None = None,
    tar_threads: int = 32,
    listing: str | None = None,
    **_: Any,
) -> tuple[pa.Table, ListReport]:
    """ILSVRC-2012 (train/{wnid}/*.JPEG; val/ flat + LOC_val_solution.csv, or val/{wnid}/) or the
    21k layout ({wnid}/*.JPEG folders or {wnid}.tar archives). Label = wnid.

    val_solution: path/URL of LOC_val_solution.csv when it is not under root (Kaggle's layout
    keeps it above ILSVRC/Data/CLS-LOC/). The 21k tars are indexed `tar_threads` at a time, each
    by its headers only (list_tar_members)."""
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options, listing)
    want = None if splits is None else {_split_name(s) for s in splits}
    items = ItemColumns()
    ids: set[str] = set()

    def add(url: str, split: str, wnid: str, stem: str, offset=None, size=None) -> None:
        vid = safe_video_id(stem)
        if vid in ids:
            report.add("duplicate_image", f"{split}/{wnid}/{stem}")
            return
        ids.add(vid)
        items.add(uri=url, dataset=dataset, split=split, label=wnid, video_id=vid, kind="image",
                  byte_offset=offset, byte_size=size)

    top = {r.split("/", 1)[0] for r in files if "/" in r}
    is_2012 = bool({"train", "val"} & top)
    solution: dict[str, str] = {}
    sol_rel = next((r for r in files if r.rsplit("/", 1)[-1] == "LOC_val_solution.csv"), None)
    sol_url = join(root, sol_rel) if sol_rel is not None else None
    if val_solution is not None:
        sol_url = val_solution
        sol_rel = sol_rel or os.path.basename(val_solution.rstrip("/"))
    if sol_url is not None:
        for row in csv.DictReader(io.StringIO(_read_text(sol_url, storage_options))):
            pred = (row.get("PredictionString") or "").split()
            if row.get("ImageId") and pred:
                solution[row["ImageId"].strip()] = pred[0]
    val_seen: set[str] = set()

    def is_class_tar(rel: str) -> bool:
        return "/" not in rel and rel.lower().endswith(".tar") and bool(_WNID.match(os.path.splitext(rel)[0]))

    tar_rels = [] if is_2012 or (want is not None and "train" not in want) else [r for r in files if is_class_tar(r)]
    tar_indexes = _ordered_map(lambda r: _index_or_error(_url(root, r), storage_options), tar_rels, tar_threads)
    for rel in files:
        url = _url(root, rel)
        parts = rel.split("/")
        name = parts[-1]
        stem, ext = os.path.splitext(name)
        low = name.lower()
        if rel == sol_rel or low.endswith((".csv", ".txt", ".json", ".md")):
            continue
        report.num_files += 1
        if is_2012:
            split = _split_name(parts[0])
            if split not in ("train", "val", "test") or len(parts) < 2:
                report.add("unmatched_file", rel)
                continue
            if want is not None and split not in want:
                continue
            if not low.endswith(IMAGE_EXTS):
                report.add("unmatched_file", rel)
                continue
            if len(parts) == 3 and _WNID.match(parts[1]):
                add(url, split, parts[1], stem)
            elif len(parts) == 2 and split == "val":
                val_seen.add(stem)
                if stem in solution:
                    add(url, split, solution[stem], stem)
                else:
                    report.add("unlabelled_image", rel + (" (no LOC_val_solution.csv found)" if sol_rel is None else ""))
            elif len(parts) == 2 and split == "test":
                add(url, split, None, stem)  # ILSVRC test images carry no public labels
            else:
                report.add("unmatched_file", rel)
        else:
            if want is not None and "train" not in want:
                continue
            if is_class_tar(rel):
                index = next(tar_indexes)
                if isinstance(index, str):
                    report.add("unreadable_tar", f"{rel}: {index}")
                    continue
                members, rejected = index.members, index.rejected
                for mname in rejected:
                    report.add("rejected_tar_member", f"{rel}:{mname}")
                for mname, off, size in members:
                    mstem = os.path.splitext(mname.rsplit("/", 1)[-1])[0]
                    if not mname.lower().endswith(IMAGE_EXTS):
                        report.add("unmatched_file", f"{rel}:{mname}")
                    elif size == 0:
                        report.add("empty_tar_member", f"{rel}:{mname}")
                        add(url, "train", stem, mstem, off, size)
                    else:
                        add(url, "train", stem, mstem, off, size)
            elif len(parts) == 2 and _WNID.match(parts[0]) and low.endswith(IMAGE_EXTS):
                add(url, "train", parts[0], stem)
            else:
                report.add("unmatched_file", rel)
    flat_val = any(r.startswith("val/") and r.count("/") == 1 for r in files)
    if sol_rel is not None and flat_val and (want is None or "val" in want):
        for image_id in sorted(set(solution) - val_seen):
            report.add("missing_file", f"val/{image_id}.JPEG (listed in {sol_rel})")
    if not items and not report.problems:
        raise ValueError(f"no ImageNet images under {root!r}; expected train/{{wnid}}/*.JPEG, val/, {{wnid}}/ or {{wnid}}.tar")
    report.num_items = len(items)
    return items.table(), report


def _index_or_error(uri: str, storage_options: dict | None) -> TarIndex | str:
    """The archive's TarIndex, or why it cannot be read (reported, not raised: one bad tar
    must not stop the listing of 21k others)."""
    try:
        return list_tar_members(uri, storage_options)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


# --------------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------------


def list_folder(
    root: str,
    *,
    storage_options: dict | None = None,
    dataset: str = "folder",
    index: str | None = None,
    pattern: str | None = None,
    probe: bool = True,
    max_item_seconds: float = DEFAULT_MAX_ITEM_SECONDS,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    listing: str | None = None,
    **_: Any,
) -> tuple[pa.Table, ListReport]:
    """Any directory of images and videos (optionally filtered by a glob `pattern` relative to
    root, e.g. "clips/*.mp4"), optionally with an index file (CSV with a `path` column, or JSONL
    with "path") giving `label` and `split` per file; paths in it are relative to root.

    Without an index every image/video is an item with label None and split "train"; with one,
    only the listed files are items and unlisted media are reported as unmatched.
    """
    import fnmatch

    report = ListReport(dataset=dataset, root=root)
    files = _list_files_arrow(root, storage_options, listing)
    keep = [bool(media_kind(r)) and (pattern is None or fnmatch.fnmatch(r, pattern)) for r in _iter_strings(files)]
    media = pc.filter(files, pa.array(keep, type=pa.bool_()), memory_pool=WORKLIST_POOL)
    del files, keep
    report.num_files = len(media)
    if index is not None:
        cols = ItemColumns()
        media_set = set(media.to_pylist())
        index_url = index if ("://" in index or os.path.isabs(index)) else join(root, index)
        text = _read_text(index_url, storage_options)
        if index.lower().endswith(".jsonl"):
            rows = []
            for n, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        report.add("bad_row", f"{index}:{n}: {line[:80]}")
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        used: set[str] = set()
        for n, row in enumerate(rows, start=1):
            rel = str(row.get("path") or "").strip().lstrip("./")
            if not rel:
                report.add("bad_row", f"{index}:{n}: {row}")
                continue
            if rel not in media_set:
                report.add("missing_file", rel)
                continue
            used.add(rel)
            label = row.get("label")
            label = None if label in (None, "") else str(label)
            cols.add(uri=_url(root, rel), dataset=dataset, split=str(row.get("split") or "train"), label=label,
                     video_id=_folder_video_id(rel), kind=media_kind(rel))
        unmatched = sorted(media_set - used)
        table = cols.table()
    else:
        # Every file is an item: its compact row is computed from the listing in Arrow (no Python
        # object per file, which left ~100 bytes per file of heap behind at the listing's peak).
        table = _folder_rows(media, root, dataset)
        unmatched = []
    del media
    table = _drop_duplicate_ids(table, root, report)
    if probe:
        is_video = pc.equal(table["kind"], "video")
        videos = expand_items(table.filter(is_video)).to_pylist()
        if videos:
            durs = _probe_list([v["uri"] for v in videos], storage_options)
            segs = ItemColumns()
            for item, dur in zip(videos, durs, strict=True):
                segs.extend(segment_video(item, dur, max_item_seconds=max_item_seconds, chunk_seconds=chunk_seconds))
            table = pa.concat_tables([table.filter(pc.invert(is_video)), segs.table()])
    for rel in unmatched:
        report.add("unmatched_file", rel)
    report.num_items = table.num_rows
    return table, report


def _folder_video_id(rel: str) -> str:
    return safe_video_id(os.path.splitext(rel)[0].replace("/", "__"))


# A relative path whose video id is the path without its extension, '/' → '__', unchanged by
# safe_video_id: key-safe folder and stem names, and one extension.
_SIMPLE_REL = r"^([A-Za-z0-9_-]+/)*[A-Za-z0-9_-]+\.[^./]+$"
_VIDEO_RE = "(" + "|".join(re.escape(e) for e in VIDEO_EXTS) + ")$"


def _folder_rows(media: pa.Array, root: str, dataset: str) -> pa.Table:
    """The folder adapter's items (no index) for media paths relative to root, as compact rows
    (items.WORKLIST_SCHEMA) computed in Arrow, batch by batch: the same rows as ItemColumns.add of
    make_item(uri=root/rel, split "train", label None, video_id=_folder_video_id(rel), kind=media_kind(rel)).
    """
    pool = WORKLIST_POOL
    empty = pa.scalar("", pa.string())
    out = []
    for start in range(0, len(media), _BATCH):
        rel = media.slice(start, _BATCH)
        n = len(rel)
        parts = pc.extract_regex(rel, URI_PARTS, memory_pool=pool)
        folder = pc.binary_join_element_wise(pa.scalar(root + "/"), pc.struct_field(parts, [0]), empty,
                                             memory_pool=pool)
        vid = pc.replace_substring(pc.replace_substring_regex(rel, r"\.[^./]+$", "", memory_pool=pool), "/", "__",
                                   memory_pool=pool)
        odd = pc.invert(pc.match_substring_regex(rel, _SIMPLE_REL, memory_pool=pool))
        if pc.any(odd).as_py():  # dots, spaces, other characters: safe_video_id's replacement and hash
            vid = pc.replace_with_mask(vid, odd, pa.array([_folder_video_id(r) for r in rel.filter(odd).to_pylist()],
                                                          type=pa.string()))
        sep = pa.scalar("/", pa.string())
        key = pc.binary_join_element_wise(pa.scalar(dataset), vid, pa.scalar(f"{0:05d}"), sep, memory_pool=pool)
        is_video = pc.match_substring_regex(rel, _VIDEO_RE, ignore_case=True, memory_pool=pool)
        zeros = pa.array(np.zeros(n, dtype=np.int32))
        cols = {
            "key": key,
            "dir": pc.dictionary_encode(folder, memory_pool=pool),
            "name": pc.struct_field(parts, [1]),
            "split": pa.DictionaryArray.from_arrays(zeros, pa.array(["train"])),
            "label": pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.string())),
            "kind": pa.DictionaryArray.from_arrays(pc.cast(is_video, pa.int32()), pa.array(["image", "video"])),
            "t_start": pa.array(np.zeros(n)),
            **{c: pa.nulls(n, WORKLIST_SCHEMA.field(c).type) for c in ("t_end", "byte_offset", "byte_size")},
        }
        out.append(pa.table(cols, schema=WORKLIST_SCHEMA))
        del parts, folder, vid, odd, key, is_video, cols
    return pa.concat_tables(out) if out else WORKLIST_SCHEMA.empty_table()


def _drop_duplicate_ids(table: pa.Table, root: str, report: ListReport) -> pa.Table:
    """The rows sorted by key, keeping the first row (in table order) of each video id; the
    others are reported as duplicate_row.

    Different paths can map to one id (e.g. `a/b.jpg` and `a__b.jpg`). The rows are one dataset's,
    all chunk 0 (before segmentation), so their keys are equal exactly when their video ids are:
    after a stable sort, a duplicate is a key equal to the one before it. That costs a bit per
    row, where a hash of every id (count_distinct) held ~100 bytes per row at the listing's peak.
    """
    from pipeline.sources.worklist import sort_items

    table = sort_items(table)
    keys = table["key"]
    if len(keys) < 2:
        return table
    dup = pc.equal(keys[1:], keys[:-1], memory_pool=WORKLIST_POOL)
    if not pc.any(dup).as_py():
        return table
    dup = pa.concat_arrays([pa.array([False]), *dup.chunks])
    for uri in expand_items(table.filter(dup))["uri"].to_pylist():  # only when ids collide: rare, reported
        report.add("duplicate_row", uri[len(root) + 1 :])
    return table.filter(pc.invert(dup))


# --------------------------------------------------------------------------------------------
# CATER (snitch localisation lists)
# --------------------------------------------------------------------------------------------

# CATER's localisation lists -> grid side: `lists/localize/` is the 6x6 grid of the table (36
# classes); `localize_4x4` and `localize_8x8` are the CATER paper's grid-size ablations (16 and 64
# classes over the same table).
CATER_TASKS = {"localize": 6, "localize_4x4": 4, "localize_8x8": 8}
CATER_SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}


def list_cater(
    root: str,
    *,
    dataset: str = "cater",
    storage_options: dict | None = None,
    splits: Iterable[str] | None = None,
    task: str = "localize",
    listing: str | None = None,
    **_: Any,
) -> tuple[pa.Table, ListReport]:
    """CATER as released (`all_actions/`): `videos/*.avi` + `lists/{task}/{train,val}.txt`, one
    `VIDEO_NAME CLASS` per line (CATER's gen_train_test.py writes `'{} {}'.format(video, label)`;
    a comma between them is accepted too). The class of `localize` is the snitch's final cell on
    the 6x6 grid of the table: `y * 6 + x` with `x, y = floor(pos) + 3` of its last (x, y) location.

    label = the class as a string ("0".."35"), split = the list's name (train, val); video_id = the
    file stem (`CLEVR_new_000001`). A listed video found nowhere under ROOT is a `missing_file`;
    a class outside the grid or an unparsable line a `bad_row`.
    """
    if task not in CATER_TASKS:
        raise ValueError(f"CATER task={task!r} is not a localisation list; use one of {sorted(CATER_TASKS)} "
                         "(the folders under ROOT/lists/)")
    n_classes = CATER_TASKS[task] ** 2
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options, listing)
    videos = [r for r in files if r.lower().endswith(VIDEO_EXTS)]
    report.num_files = len(videos)
    by_name: dict[str, str] = {}
    for r in videos:  # the first path in sorted order wins; `videos/` sorts before most other folders
        base = r.rsplit("/", 1)[-1]
        by_name.setdefault(base, r)
        by_name.setdefault(os.path.splitext(base)[0], r)
    want = list(CATER_SPLIT_FILES) if splits is None else [_split_name(s) for s in splits]
    unknown = [s for s in want if s not in CATER_SPLIT_FILES]
    if unknown:
        raise ValueError(f"CATER splits {unknown} are not released; use {sorted(CATER_SPLIT_FILES)}")
    items = ItemColumns()
    used: set[str] = set()
    seen: dict[str, str] = {}
    for split in want:
        rel_list = f"lists/{task}/{CATER_SPLIT_FILES[split]}"
        url = _url(root, rel_list)
        fs, path = url_to_fs(url, storage_options)
        if not fs.isfile(path):
            raise ValueError(
                f"CATER list {url} is missing: unpack the release's lists.zip into {root}/lists/ so that "
                f"{rel_list} holds one 'VIDEO_NAME CLASS' per line (see docs/datasets.md), or pass splits=[...]"
            )
        for line_no, line in enumerate(_read_text(url, storage_options).splitlines(), start=1):
            parts = line.replace(",", " ").split()
            if not parts:
                continue
            try:
                name, cls = parts[0].rsplit("/", 1)[-1], int(parts[1])
                if len(parts) != 2 or not 0 <= cls < n_classes:
                    raise ValueError
            except (ValueError, IndexError):
                report.add("bad_row", f"{rel_list}:{line_no}: {line.strip()[:80]!r} (want 'VIDEO_NAME CLASS', "
                                      f"CLASS in 0..{n_classes - 1})")
                continue
            video_id = safe_video_id(os.path.splitext(name)[0])
            if video_id in seen:
                report.add("duplicate_row", f"{rel_list}:{line_no}: {name} (already in {seen[video_id]})")
                continue
            rel = by_name.get(name) or by_name.get(os.path.splitext(name)[0])
            if rel is None:
                report.add("missing_file", f"videos/{name} (listed in {rel_list}:{line_no}, class {cls})")
                continue
            seen[video_id] = rel_list
            used.add(rel)
            items.add(uri=_url(root, rel), dataset=dataset, split=split, label=str(cls), video_id=video_id,
                      kind="video")
    if len(items) == 0 and report.problems.get("missing_file"):
        raise ValueError(
            f"none of the videos listed in {root}/lists/{task}/ is under {root}: unpack the release's "
            f"videos.zip into {root}/videos/ (e.g. {report.examples['missing_file'][0].split(' ')[0]})"
        )
    for r in videos:
        if r not in used:
            report.add("unmatched_file", r)
    report.num_items = len(items)
    return items.table(), report


ADAPTERS: dict[str, Callable[..., tuple[pa.Table, ListReport]]] = {
    "kinetics400": _kinetics_adapter("kinetics400"),
    "kinetics600": _kinetics_adapter("kinetics600"),
    "kinetics700": _kinetics_adapter("kinetics700"),
    "ego4d": list_ego4d,
    "howto100m": list_howto100m,
    "imagenet": list_imagenet,
    "folder": list_folder,
    "cater": list_cater,
}


def list_table(
    dataset: str, root: str, *, storage_options: dict | None = None, name: str | None = None, **options: Any
) -> tuple[pa.Table, ListReport]:
    """List a dataset: `(items sorted by key as a table of items.WORKLIST_SCHEMA, report)`
    (`items.expand_items(table)` gives them as ARROW_SCHEMA items).

    dataset: one of ADAPTERS (kinetics400/600/700, ego4d, howto100m, imagenet, folder, cater).
    root: local folder or s3://bucket/prefix. options: adapter options (splits=[...],
    max_item_seconds, chunk_seconds, index= and pattern= for folder, probe=False to skip
    duration probes, probe_threads / tar_threads, listing= a file of relative paths used instead
    of listing storage). name: the dataset name written into
    items/keys (default: `dataset`).
    """
    from pipeline.sources.worklist import sort_items

    if dataset not in ADAPTERS:
        raise ValueError(f"dataset={dataset!r} is not known; choose one of {sorted(ADAPTERS)}")
    root = _norm_root(root)
    if name is not None:
        options["dataset"] = name
    table, report = ADAPTERS[dataset](root, storage_options=storage_options, **options)
    return sort_items(table), report


def list_items(
    dataset: str, root: str, *, storage_options: dict | None = None, name: str | None = None, **options: Any
) -> tuple[list[dict], ListReport]:
    """`list_table` with the items as dicts (sorted by key): handy for small datasets and tests."""
    table, report = list_table(dataset, root, storage_options=storage_options, name=name, **options)
    return expand_items(table).to_pylist(), report
