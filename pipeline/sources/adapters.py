"""Dataset adapters: a dataset root (local path or s3://) → work items + a ListReport.

Every adapter lists storage once (`fs.find`), matches files against the dataset's annotation
files, and reports what did not match (counts plus a few examples) instead of raising. Layouts
are documented in docs/datasets.md.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.sources._fs import full_url, is_local, join, url_to_fs
from pipeline.sources.items import (
    DEFAULT_CHUNK_SECONDS,
    DEFAULT_MAX_ITEM_SECONDS,
    IMAGE_EXTS,
    VIDEO_EXTS,
    ListReport,
    make_item,
    media_kind,
    safe_video_id,
    segment_video,
)

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


def _list_files(root: str, storage_options: dict | None) -> tuple[Any, str, list[tuple[str, str]]]:
    """All files under root as (url, path relative to root, '/'-separated), sorted."""
    fs, root_path = url_to_fs(root, storage_options)
    if not fs.isdir(root_path):
        raise ValueError(f"dataset root {root!r} is not a directory (or is empty); pass the folder that holds the dataset")
    paths = sorted(fs.find(root_path))
    out = []
    for p in paths:
        url = full_url(fs, root, root_path, p)
        out.append((url, url[len(root) + 1 :]))
    return fs, root_path, out


def _read_text(url: str, storage_options: dict | None) -> str:
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8-sig")


def probe_duration(uri: str, storage_options: dict | None = None) -> float | None:
    """Duration in seconds of a video's first video stream from its container header; None if unknown/unreadable.

    Reads only the header (and index) through fsspec, so it is cheap on object stores too.
    Unreadable files return None and are decoded (and reported) later by the decoder.
    """
    import av

    try:
        if is_local(uri):
            # Only regular files: opening a FIFO or device would block the listing forever.
            if not stat.S_ISREG(os.stat(uri[len("file://") :] if uri.startswith("file://") else uri).st_mode):
                return None
            ctx = av.open(uri, metadata_errors="ignore")
            fobj = None
        else:
            fs, path = url_to_fs(uri, storage_options)
            fobj = fs.open(path, "rb")
            ctx = av.open(fobj, metadata_errors="ignore")
        try:
            if not ctx.streams.video:
                return None
            s = ctx.streams.video[0]
            if s.duration is not None and s.time_base is not None:
                return float(s.duration * s.time_base)
            if ctx.duration is not None:
                return ctx.duration / 1_000_000
            return None
        finally:
            ctx.close()
            if fobj is not None:
                fobj.close()
    except Exception:
        return None


def _probe_all(uris: list[str], storage_options: dict | None, threads: int = 8) -> dict[str, float | None]:
    if not uris:
        return {}
    with ThreadPoolExecutor(max_workers=threads) as ex:
        durs = list(ex.map(lambda u: probe_duration(u, storage_options), uris))
    return dict(zip(uris, durs, strict=True))


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
    **_: Any,
) -> tuple[list[dict], ListReport]:
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options)
    csvs = [(u, r) for u, r in files if r.lower().endswith(".csv")]
    videos = [(u, r) for u, r in files if r.lower().endswith(VIDEO_EXTS)]
    report.num_files = len(videos)
    # basename stem → [(url, rel)]; clips may sit in {split}/ or {split}/{label}/ folders.
    by_stem: dict[str, list[tuple[str, str]]] = {}
    for u, r in videos:
        stem = os.path.splitext(r.rsplit("/", 1)[-1])[0]
        by_stem.setdefault(stem, []).append((u, r))
    want_splits = None if splits is None else {_split_name(s) for s in splits}
    items: list[dict] = []
    used: set[str] = set()
    seen_ids: set[str] = set()
    found_csv = False
    for cu, cr in csvs:
        rows = list(csv.DictReader(io.StringIO(_read_text(cu, storage_options))))
        if not rows or not {"youtube_id", "time_start", "time_end"} <= set(rows[0].keys()):
            continue
        found_csv = True
        for line_no, row in enumerate(rows, start=2):
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
            in_split = [c for c in cands if c[1].split("/", 1)[0].lower() in aliases]
            url, rel = (in_split or cands)[0]
            used.add(rel)
            items.append(
                make_item(
                    uri=url,
                    dataset=dataset,
                    split=split,
                    label=label,
                    video_id=video_id,
                    kind="video",
                    t_start=0.0 if trimmed else float(t0),
                    t_end=None if trimmed else float(t1),
                )
            )
    if not found_csv:
        raise ValueError(
            f"no Kinetics annotation CSV (columns label,youtube_id,time_start,time_end,split) found under "
            f"{root!r}; put train.csv/validate.csv/test.csv in {root}/annotations/ (see docs/datasets.md)"
        )
    untrimmed_used = {i["uri"] for i in items if i["t_end"] is not None}
    for u, r in videos:
        if r not in used and u not in untrimmed_used:
            report.add("unmatched_file", r)
    report.num_items = len(items)
    return items, report


def _kinetics_adapter(name: str) -> Callable[..., tuple[list[dict], ListReport]]:
    def adapter(root: str, **kw: Any) -> tuple[list[dict], ListReport]:
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
    dataset: str = "ego4d",
    **_: Any,
) -> tuple[list[dict], ListReport]:
    """ego4d.json (`videos[].video_uid`, `duration_sec`) + v2/full_scale/{uid}.mp4 (or v1/)."""
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options)
    meta_url = join(root, "ego4d.json")
    if not any(r == "ego4d.json" for _, r in files):
        raise ValueError(f"{meta_url} not found; Ego4D needs its metadata file ego4d.json at the dataset root")
    meta = json.loads(_read_text(meta_url, storage_options))
    videos = {r: u for u, r in files if r.lower().endswith(".mp4") and "/full_scale/" in f"/{r}"}
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
            uri=videos[rel], dataset=dataset, split=str(v.get("split", "train") or "train"), label=None,
            video_id=safe_video_id(uid), kind="video",
        )
        items.append((item, float(dur) if dur is not None else None))
        if dur is None:
            need_probe.append(item["uri"])
    probed = _probe_all(need_probe, storage_options)
    out = []
    for item, dur in items:
        dur = dur if dur is not None else probed.get(item["uri"])
        out.extend(segment_video(item, dur, max_item_seconds=max_item_seconds, chunk_seconds=chunk_seconds))
    for r in videos:
        if r not in used:
            report.add("unmatched_file", r)
    report.num_items = len(out)
    return out, report


# --------------------------------------------------------------------------------------------
# HowTo100M
# --------------------------------------------------------------------------------------------


def list_howto100m(
    root: str,
    *,
    storage_options: dict | None = None,
    max_item_seconds: float = DEFAULT_MAX_ITEM_SECONDS,
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
    probe_threads: int = 8,
    dataset: str = "howto100m",
    **_: Any,
) -> tuple[list[dict], ListReport]:
    """HowTo100M_v1.csv (`video_id,category_1,...`) + {video_id}.{mp4,webm,mkv} anywhere under root.

    Durations are not in the CSV, so each video's header is probed once (threads) to cut it into
    bounded items; an unreadable header leaves one item that the decoder reports.
    """
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options)
    csv_rel = next((r for _, r in files if r.rsplit("/", 1)[-1] == "HowTo100M_v1.csv"), None)
    if csv_rel is None:
        raise ValueError(f"HowTo100M_v1.csv not found under {root!r}; put the official CSV at the dataset root")
    vids = [(u, r) for u, r in files if r.lower().endswith((".mp4", ".webm", ".mkv"))]
    report.num_files = len(vids)
    by_stem: dict[str, list[tuple[str, str]]] = {}
    for u, r in vids:
        by_stem.setdefault(os.path.splitext(r.rsplit("/", 1)[-1])[0], []).append((u, r))
    pending, used, seen = [], set(), set()
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
        cands = sorted(by_stem.get(vid, []), key=lambda c: (VIDEO_EXTS.index(os.path.splitext(c[1])[1].lower()), c[1]))
        if not cands:
            report.add("missing_file", f"{vid}.mp4 (or .webm/.mkv)")
            continue
        url, rel = cands[0]
        used.add(rel)
        label = (row.get("category_1") or "").strip() or None
        pending.append(make_item(uri=url, dataset=dataset, split="train", label=label,
                                 video_id=safe_video_id(vid), kind="video"))
    durs = {}
    if pending:
        with ThreadPoolExecutor(max_workers=probe_threads) as ex:
            durs = dict(zip([p["uri"] for p in pending], ex.map(lambda p: probe_duration(p["uri"], storage_options), pending), strict=True))
    out = []
    for item in pending:
        out.extend(segment_video(item, durs.get(item["uri"]), max_item_seconds=max_item_seconds, chunk_seconds=chunk_seconds))
    for _, r in vids:
        if r not in used:
            report.add("unmatched_file", r)
    report.num_items = len(out)
    return out, report


# --------------------------------------------------------------------------------------------
# ImageNet (ILSVRC-2012 and 21k)
# --------------------------------------------------------------------------------------------


def _safe_member_name(name: str) -> bool:
    """Tar member names we accept: relative, no '..', no backslashes or NULs."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    return all(part not in ("", "..") for part in name.split("/") if part != ".")


def list_tar_members(uri: str, storage_options: dict | None = None) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Regular-file members of a tar as (name, data offset, size), read header by header.

    The archive is opened as a seekable stream through fsspec and only its 512-byte headers are
    read (member data is skipped), so a 21k class tar is never extracted. Links, devices,
    directories and unsafe names are returned in the second list (rejected) and never read.
    """
    fs, path = url_to_fs(uri, storage_options)
    members, rejected = [], []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isreg() or not _safe_member_name(m.name):
                rejected.append(m.name)
                continue
            members.append((m.name, m.offset_data, m.size))
    return members, rejected


def list_imagenet(
    root: str,
    *,
    storage_options: dict | None = None,
    dataset: str = "imagenet",
    splits: Iterable[str] | None = None,
    val_solution: str | None = None,
    **_: Any,
) -> tuple[list[dict], ListReport]:
    """ILSVRC-2012 (train/{wnid}/*.JPEG; val/ flat + LOC_val_solution.csv, or val/{wnid}/) or the
    21k layout ({wnid}/*.JPEG folders or {wnid}.tar archives). Label = wnid.

    val_solution: path/URL of LOC_val_solution.csv when it is not under root (Kaggle's layout
    keeps it above ILSVRC/Data/CLS-LOC/)."""
    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options)
    want = None if splits is None else {_split_name(s) for s in splits}
    items: list[dict] = []
    ids: set[str] = set()

    def add(url: str, split: str, wnid: str, stem: str, offset=None, size=None) -> None:
        vid = safe_video_id(stem)
        if vid in ids:
            report.add("duplicate_image", f"{split}/{wnid}/{stem}")
            return
        ids.add(vid)
        items.append(make_item(uri=url, dataset=dataset, split=split, label=wnid, video_id=vid, kind="image",
                               byte_offset=offset, byte_size=size))

    top = {r.split("/", 1)[0] for _, r in files if "/" in r}
    is_2012 = bool({"train", "val"} & top)
    solution: dict[str, str] = {}
    sol_rel = next((r for _, r in files if r.rsplit("/", 1)[-1] == "LOC_val_solution.csv"), None)
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
    for url, rel in files:
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
            if len(parts) == 1 and low.endswith(".tar") and _WNID.match(stem):
                members, rejected = list_tar_members(url, storage_options)
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
    flat_val = any(r.startswith("val/") and r.count("/") == 1 for _, r in files)
    if sol_rel is not None and flat_val and (want is None or "val" in want):
        for image_id in sorted(set(solution) - val_seen):
            report.add("missing_file", f"val/{image_id}.JPEG (listed in {sol_rel})")
    if not items and not report.problems:
        raise ValueError(f"no ImageNet images under {root!r}; expected train/{{wnid}}/*.JPEG, val/, {{wnid}}/ or {{wnid}}.tar")
    report.num_items = len(items)
    return items, report


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
    **_: Any,
) -> tuple[list[dict], ListReport]:
    """Any directory of images and videos (optionally filtered by a glob `pattern` relative to
    root, e.g. "clips/*.mp4"), optionally with an index file (CSV with a `path` column, or JSONL
    with "path") giving `label` and `split` per file; paths in it are relative to root.

    Without an index every image/video is an item with label None and split "train"; with one,
    only the listed files are items and unlisted media are reported as unmatched.
    """
    import fnmatch

    report = ListReport(dataset=dataset, root=root)
    _, _, files = _list_files(root, storage_options)
    media = {r: u for u, r in files if media_kind(r) and (pattern is None or fnmatch.fnmatch(r, pattern))}
    report.num_files = len(media)
    entries: list[tuple[str, str | None, str]] = []
    if index is not None:
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
        for n, row in enumerate(rows, start=1):
            path = str(row.get("path") or "").strip().lstrip("./")
            if not path:
                report.add("bad_row", f"{index}:{n}: {row}")
                continue
            label = row.get("label")
            label = None if label in (None, "") else str(label)
            entries.append((path, label, str(row.get("split") or "train")))
    else:
        entries = [(r, None, "train") for r in sorted(media)]
    items, used, ids, pending = [], set(), set(), []
    for rel, label, split in entries:
        if rel not in media:
            report.add("missing_file", rel)
            continue
        used.add(rel)
        vid = safe_video_id(os.path.splitext(rel)[0].replace("/", "__"))
        if vid in ids:
            report.add("duplicate_row", rel)
            continue
        ids.add(vid)
        item = make_item(uri=media[rel], dataset=dataset, split=split, label=label, video_id=vid, kind=media_kind(rel))
        (pending if item["kind"] == "video" else items).append(item)
    durs = _probe_all([p["uri"] for p in pending], storage_options) if probe else {}
    for item in pending:
        items.extend(segment_video(item, durs.get(item["uri"]), max_item_seconds=max_item_seconds, chunk_seconds=chunk_seconds))
    for rel in sorted(set(media) - used):
        report.add("unmatched_file", rel)
    report.num_items = len(items)
    return items, report


ADAPTERS: dict[str, Callable[..., tuple[list[dict], ListReport]]] = {
    "kinetics400": _kinetics_adapter("kinetics400"),
    "kinetics600": _kinetics_adapter("kinetics600"),
    "kinetics700": _kinetics_adapter("kinetics700"),
    "ego4d": list_ego4d,
    "howto100m": list_howto100m,
    "imagenet": list_imagenet,
    "folder": list_folder,
}


def list_items(
    dataset: str, root: str, *, storage_options: dict | None = None, name: str | None = None, **options: Any
) -> tuple[list[dict], ListReport]:
    """List a dataset: `(items sorted by key, report)`.

    dataset: one of ADAPTERS (kinetics400/600/700, ego4d, howto100m, imagenet, folder).
    root: local folder or s3://bucket/prefix. options: adapter options (splits=[...],
    max_item_seconds, chunk_seconds, index= and pattern= for folder, probe=False to skip
    duration probes). name: the dataset name written into items/keys (default: `dataset`).
    """
    if dataset not in ADAPTERS:
        raise ValueError(f"dataset={dataset!r} is not known; choose one of {sorted(ADAPTERS)}")
    root = _norm_root(root)
    if name is not None:
        options["dataset"] = name
    items, report = ADAPTERS[dataset](root, storage_options=storage_options, **options)
    items.sort(key=lambda i: i["key"])
    return items, report
