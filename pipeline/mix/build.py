"""Build a mix: pin the input token datasets, check they agree, write the index files and manifest.

Files (``MIX.json`` is the manifest; the index lives beside it, cached by hash):

    MIX.json
    MIX.index/<key>/index.json                  list of files with sha256 (written last = complete)
    MIX.index/<key>/<split>.blend_source.npy    uint8 [N]  source of global sample i
    MIX.index/<key>/<split>.blend_local.npy     int64 [N]  index of sample i inside its source
    MIX.index/<key>/<split>.<source>.<array>.npy per-source tables (rows in video order, units)
    MIX.index/<key>/<split>.<source>.labels.json

``<key>`` is the sha256 (first 16 hex) of everything that determines the index (input manifest
hashes, ratios, seed, frames, stride, hop, images per sequence, sample counts), so rebuilding the
same mix reuses the index and a changed input can never reuse a stale one. The manifest's
``content_hash`` covers the index files' sha256 too.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import schemas
from pipeline import storage
from pipeline.mix.blend import Blend, exact_weights
from pipeline.mix.sequence import SPECIAL_NAMES, make_specials, vocab_size_for
from pipeline.mix.tables import (
    RowTable,
    detect_kind,
    image_units,
    read_row_table,
    segment_bounds,
    split_table,
    video_units,
)
from pipeline.shards import read_manifest

TABLE_ARRAYS = ("shard", "row", "elem", "sums", "num_frames", "cum", "segment", "video", "label", "units", "slack")


@dataclass
class MixConfig:
    """What to blend and how to cut sequences (validated on creation)."""

    ratios: dict[str, str]  # source name -> ratio as given ("0.2"); normalised to shares
    inputs: dict[str, str]  # source name -> token dataset URL
    seed: int = 0
    seq_len: int | None = None  # None: frames × tokens per frame (4096 at the paper's settings)
    frames: int = 16
    stride: int = 4
    hop: int | None = None  # None: frames × stride (clips tile each video once per pass)
    jitter: bool = True  # shift each clip start by a seeded per-pass offset in [0, hop) inside its segment
    images_per_seq: int = 16
    num_samples: int | None = None  # train split; None: until every source has had one full pass
    kinds: dict[str, str] = field(default_factory=dict)  # override "image"/"video" detection

    def __post_init__(self) -> None:
        if set(self.ratios) != set(self.inputs):
            missing = sorted(set(self.ratios) ^ set(self.inputs))
            raise ValueError(
                f"ratios and inputs name different sources (only in one of them: {missing}); give each source "
                "both a ratio and an input, e.g. --ratios a=0.5,b=0.5 --inputs a=tok/a,b=tok/b"
            )
        if not self.ratios:
            raise ValueError("ratios is empty: give at least one source, e.g. --ratios imagenet=1 --inputs imagenet=tok/in")
        for name in self.ratios:
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"source name {name!r}: use letters, digits, '_' and '-' only")
        for fname in ("frames", "stride", "images_per_seq"):
            v = getattr(self, fname)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{fname}={v!r}: must be an integer ≥ 1")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: must be ≥ 0")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len}: must be ≥ 2 (or leave it unset for frames × tokens per frame)")
        if self.hop is not None and self.hop < 1:
            raise ValueError(f"hop={self.hop}: must be ≥ 1 (or unset for frames × stride)")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples}: must be ≥ 1 (or unset for one pass over every source)")
        for k, v in self.kinds.items():
            if k not in self.ratios or v not in ("image", "video"):
                raise ValueError(f"kinds[{k!r}]={v!r}: name a source from --ratios and 'image' or 'video'")


def index_dir_url(mix_url: str, key: str) -> str:
    base = mix_url[: -len(".json")] if mix_url.endswith(".json") else mix_url
    return f"{base}.index/{key}"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _abs_url(url: str) -> str:
    return os.path.abspath(storage.local_path(url)) if storage.is_local(url) else url


def check_compatible(manifests: dict[str, dict[str, Any]]) -> None:
    """Refuse inputs that disagree on tokenizer, grid or codebook, naming the sources and values."""
    names = list(manifests)
    ref_name = names[0]
    ref = manifests[ref_name]
    checks = [
        ("tokenizer", lambda m: m["tokenizer"]["id"]),
        ("tokenizer weights sha256", lambda m: m["tokenizer"]["sha256"]),
        # Codes of one tokenizer at fp32 and at bf16 differ on a share of positions: not one vocabulary.
        ("tokenizer precision", lambda m: m["tokenizer"].get("precision", "unrecorded")),
        ("grid", lambda m: list(m["grid"])),
        ("codebook_size", lambda m: m["codebook_size"]),
        ("resolution", lambda m: m["resolution"]),
    ]
    problems = []
    for name in names[1:]:
        for what, get in checks:
            a, b = get(ref), get(manifests[name])
            if a != b:
                problems.append(f"{what}: {ref_name} has {a!r} but {name} has {b!r}")
    if problems:
        raise ValueError(
            "the inputs were tokenized differently and cannot be mixed:\n  " + "\n  ".join(problems)
            + "\nre-tokenize them with one tokenizer, precision (--precision) and resolution"
        )


def build_mix(cfg: MixConfig, out_url: str, storage_options: dict | None = None, *, progress: bool = True) -> dict:
    """Build (or reuse) the index files and write the mix manifest to ``out_url``; returns it."""
    names = list(cfg.ratios)
    urls = {n: _abs_url(cfg.inputs[n]) for n in names}
    manifests = {n: read_manifest(urls[n], storage_options) for n in names}
    check_compatible(manifests)
    ref = manifests[names[0]]
    codebook = int(ref["codebook_size"])
    grid = [int(x) for x in ref["grid"]]
    hw = grid[0] * grid[1]
    seq_len = cfg.seq_len if cfg.seq_len is not None else cfg.frames * hw
    hop = cfg.hop if cfg.hop is not None else cfg.frames * cfg.stride
    w_int, period = exact_weights([cfg.ratios[n] for n in names])

    rows: dict[str, RowTable] = {}
    for n in names:
        rows[n] = read_row_table(urls[n], manifests[n], storage_options, progress=f"rows of {n}" if progress else None)
    kinds = {n: cfg.kinds.get(n) or detect_kind(rows[n]) for n in names}
    splits = sorted({s for n in names for s in rows[n].splits()})
    for sp in splits:
        if not sp or not all(c.isalnum() or c in "_-" for c in sp):
            raise ValueError(f"split name {sp!r} in the inputs: index files are named after splits, so use letters, "
                             "digits, '_' and '-' only (re-tokenize with a clean split name)")

    # Per split: tables and units of each source that has rows in it.
    tables: dict[tuple[str, str], Any] = {}
    split_info: dict[str, Any] = {}
    for sp in splits:
        present, info = [], {}
        for n in names:
            if sp not in rows[n].splits():
                continue
            t = split_table(rows[n], sp)
            if kinds[n] == "video":
                units, slack, short = video_units(t, frames=cfg.frames, stride=cfg.stride, hop=hop)
                per_pass = len(units)
            else:
                units, short = image_units(t), 0
                slack = np.zeros(0, dtype=np.int32)  # images have no temporal jitter
                per_pass = len(units) // cfg.images_per_seq
            if per_pass == 0 and sp == "train":
                if kinds[n] == "video":
                    _, seg_len = segment_bounds(t)
                    raise ValueError(
                        f"source {n} has no clip of {cfg.frames} frames at stride {cfg.stride} "
                        f"({(cfg.frames - 1) * cfg.stride + 1} frames) in its train split: its longest run of "
                        f"consecutive frames is {int(seg_len.max())}; lower --stride or --frames"
                    )
                raise ValueError(
                    f"source {n} has {len(units)} train images, fewer than --images-per-seq {cfg.images_per_seq}; "
                    "lower --images-per-seq"
                )
            if per_pass == 0:
                info[n] = {"rows": len(t.row), "units": int(len(units)), "samples_per_pass": 0,
                           "segments_too_short": short, "used": False}
                continue
            present.append(n)
            tables[(sp, n)] = (t, units, slack)
            info[n] = {"rows": int(len(t.row)), "videos": int(t.video[-1]) + 1, "segments": int(t.segment[-1]) + 1,
                       "frames": int(t.cum[-1]), "units": int(len(units)), "samples_per_pass": int(per_pass),
                       "segments_too_short": short, "used": True}
        if not present:
            continue
        w_sp, d_sp = exact_weights([cfg.ratios[n] for n in present])
        blend = Blend(w_sp, d_sp)
        if cfg.num_samples is not None and sp == "train":
            nsamp = cfg.num_samples
        else:
            nsamp = max(math.ceil(info[n]["samples_per_pass"] * d_sp / w) for n, w in zip(present, w_sp, strict=True))
        counts = blend.counts(nsamp)
        for n, c in zip(present, counts, strict=True):
            info[n]["samples"] = int(c)
            info[n]["passes"] = round(int(c) / info[n]["samples_per_pass"], 6)
        split_info[sp] = {"sources": present, "weights": w_sp, "period": d_sp, "num_samples": int(nsamp),
                          "per_source": info}
    if "train" not in split_info:
        raise ValueError(f"no source has usable train rows (splits found: {splits}); a mix needs a train split")

    specials = make_specials(codebook)
    doc = schemas.new_document(
        "mix_manifest",
        seed=cfg.seed,
        seq_len=seq_len,
        frames=cfg.frames,
        stride=cfg.stride,
        hop=hop,
        jitter=bool(cfg.jitter),
        images_per_seq=cfg.images_per_seq,
        num_samples=split_info["train"]["num_samples"],
        sources=[
            {
                "name": n,
                "url": urls[n],
                "ratio": str(cfg.ratios[n]),
                "weight": w / period,
                "manifest_hash": manifests[n]["content_hash"],
                "kind": kinds[n],
                "format": manifests[n]["format"],
                "shards": len(manifests[n]["shards"]),
                "rows": int(manifests[n]["totals"]["rows"]),
                "tokens": int(manifests[n]["totals"]["tokens"]),
            }
            for n, w in zip(names, w_int, strict=True)
        ],
        specials=specials,
        special_names=list(SPECIAL_NAMES),
        vocab_size=vocab_size_for(codebook),
        codebook_size=codebook,
        grid=grid,
        tokenizer=ref["tokenizer"],
        resolution=ref["resolution"],
        sequence={
            "tokens_per_frame": hw,
            "layout": "[bos_video|bos_image] frame tokens (raster order, frame after frame) [eos]; "
            "inputs = first seq_len tokens, targets = the next seq_len; cut at the end or padded with pad "
            "(targets on padding = ignore_index)",
            "ignore_index": -100,
            "video_tokens": cfg.frames * hw + 2,
            "image_tokens": cfg.images_per_seq * hw + 2,
        },
        blend={"rule": "deadline-greedy (Megatron-style, prefix error < 1 sample)", "weights": w_int, "period": period},
        splits=split_info,
    )
    # The array list is part of the key: an index cached by a Toto that wrote other arrays is not reused.
    key = hashlib.sha256(schemas.canonical_json({"manifest": doc, "arrays": TABLE_ARRAYS})).hexdigest()[:16]
    idx_url = index_dir_url(out_url, key)
    files = _write_index(idx_url, key, split_info, tables, cfg, storage_options, progress)
    doc["index"] = {"dir": storage.basename(out_url.rstrip("/")).removesuffix(".json") + f".index/{key}", "key": key,
                    "files": files}
    doc = schemas.with_content_hash(doc)
    storage.write_json(out_url, doc, "mix_manifest", storage_options)
    return doc


def _write_index(idx_url: str, key: str, split_info: dict, tables: dict, cfg: MixConfig,
                 storage_options: dict | None, progress: bool) -> dict[str, str]:
    done_url = storage.join(idx_url, "index.json")
    if storage.exists(done_url, storage_options):
        fs, path = storage.url_to_fs(done_url, storage_options)
        with fs.open(path, "rb") as f:
            got = json.loads(f.read())
        if got.get("key") == key:
            if progress:
                print(f"reusing cached index {idx_url}", file=sys.stderr)
            return got["files"]
    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        storage.atomic_write_bytes(storage.join(idx_url, name), data, storage_options)
        files[name] = hashlib.sha256(data).hexdigest()

    for sp, info in split_info.items():
        blend = Blend(info["weights"], info["period"])
        src, local = blend.build(info["num_samples"])
        put(f"{sp}.blend_source.npy", _npy_bytes(src))
        put(f"{sp}.blend_local.npy", _npy_bytes(local))
        for n in info["sources"]:
            t, units, slack = tables[(sp, n)]
            arrays = {**t.arrays(), "units": units, "slack": slack}
            for a in TABLE_ARRAYS:
                put(f"{sp}.{n}.{a}.npy", _npy_bytes(arrays[a]))
            put(f"{sp}.{n}.labels.json", json.dumps(t.labels).encode())
    # Written last: its presence means the index is complete.
    storage.atomic_write_bytes(done_url, json.dumps({"key": key, "files": files}, sort_keys=True).encode(), storage_options)
    return files


def order_key(seed: int, source: str, split: str) -> tuple[int, int, int]:
    """The permutation key of one source in one split (stable across runs and machines)."""
    return (int(seed), zlib.crc32(source.encode()), zlib.crc32(split.encode()))
