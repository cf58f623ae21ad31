"""The token row: one image, or one chunk of at most ``chunk_frames`` frames of one video."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# Columns of every shard, in storage order. ``tokens`` is stored flat (num_frames*grid_h*grid_w).
COLUMNS: tuple[str, ...] = (
    "key", "dataset", "split", "video_id", "chunk", "t_start", "fps",
    "num_frames", "grid_h", "grid_w", "label", "tokens",
)
META_COLUMNS: tuple[str, ...] = COLUMNS[:-1]
_COLUMN_SET = frozenset(COLUMNS)

# At least two '/'-separated parts of [A-Za-z0-9_-]; one match per row (this runs for every row).
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)+")


def make_key(dataset: str, video_id: str, chunk: int) -> str:
    """``{dataset}/{video_id}/{chunk:05d}``; refuses parts that would break WebDataset keys."""
    key = f"{dataset}/{video_id}/{chunk:05d}"
    check_key(key)
    return key


def check_key(key: str) -> None:
    if _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid row key {key!r}: keys are '/'-separated parts of letters, digits, '_' and '-' "
            "(no dots, no empty parts), e.g. 'kinetics600/abc123_000010_000020/00000'"
        )


def normalize_row(row: dict[str, Any], codebook_size: int) -> dict[str, Any]:
    """Check a row and return it with ``tokens`` as a flat, C-contiguous uint16 array.

    The range check happens on the original integer values, so a code that does not fit the
    codebook (or uint16) is an error rather than a silent wrap. (This runs once per row of every
    shard, so it avoids work it can prove unnecessary.)
    """
    if not _COLUMN_SET <= row.keys():
        missing = [c for c in COLUMNS if c not in row]
        raise ValueError(f"row {row.get('key')!r} lacks columns {missing}; every row needs {list(COLUMNS)}")
    key = str(row["key"])
    check_key(key)
    nf, gh, gw = int(row["num_frames"]), int(row["grid_h"]), int(row["grid_w"])
    if nf < 1 or gh < 1 or gw < 1:
        raise ValueError(f"row {key}: num_frames, grid_h, grid_w must be ≥ 1, got {nf}, {gh}, {gw}")
    tok = row["tokens"]
    if type(tok) is not np.ndarray:
        tok = np.asarray(tok)
    dt = tok.dtype
    if dt.kind not in "iu":
        raise ValueError(f"row {key}: tokens must be integers, got dtype {dt}")
    if tok.size != nf * gh * gw:
        raise ValueError(
            f"row {key}: tokens has {tok.size} values but num_frames*grid_h*grid_w = {nf}*{gh}*{gw} = {nf * gh * gw}"
        )
    if dt == np.uint16:
        if codebook_size < 65536 and tok.size and int(tok.max()) >= codebook_size:
            _out_of_codebook(key, int(tok.max()), codebook_size)
        flat = tok.reshape(-1) if tok.flags.c_contiguous else np.ascontiguousarray(tok).reshape(-1)
    else:
        if tok.size:
            # unsigned inputs cannot be negative: skip a full pass over the data
            lo = 0 if dt.kind == "u" else int(tok.min())
            hi = int(tok.max())
            if lo < 0 or hi >= codebook_size:
                _out_of_codebook(key, lo if lo < 0 else hi, codebook_size)
        flat = np.ascontiguousarray(tok.reshape(-1).astype(np.uint16))
    fps = float(row["fps"])
    t_start = float(row["t_start"])
    if not (math.isfinite(fps) and fps >= 0 and math.isfinite(t_start)):
        raise ValueError(f"row {key}: fps and t_start must be finite (fps ≥ 0), got {fps}, {t_start}")
    label = row["label"]
    return {
        "key": key,
        "dataset": str(row["dataset"]),
        "split": str(row["split"]),
        "video_id": str(row["video_id"]),
        "chunk": int(row["chunk"]),
        "t_start": t_start,
        "fps": fps,
        "num_frames": nf,
        "grid_h": gh,
        "grid_w": gw,
        "label": None if label is None else str(label),
        "tokens": flat,
    }


def _out_of_codebook(key: str, bad: int, codebook_size: int) -> None:
    raise ValueError(
        f"row {key}: token value {bad} is outside the codebook [0, {codebook_size}); "
        "the tokenizer and the shard's codebook_size disagree"
    )
