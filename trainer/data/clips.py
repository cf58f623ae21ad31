"""Labelled clips and images of one token dataset, for probes and evaluations (no mix needed).

Each video gives ``clips_per_video`` clips of ``frames`` frames at ``stride``, their first frames
evenly spaced over the video's valid starts (one clip: the middle one), never crossing a gap
between chunks or into another video. An image dataset gives ``images_per_seq`` consecutive images
per item (1: one item per image). Items are laid out like training sequences: the start token,
the frame tokens in raster order, optionally ``eos``.

A pixel dataset (`--tokenizer patch:P`, ``values_per_token`` = P*P*3 in its manifest) gives the
same items for the patch-input models: its rows are the patches of the frames, so each item also
carries ``pixels`` (T, P*P*3) uint8 (zeros at special positions) and its ``tokens`` hold code 0 at
every patch position (a patch model only reads which positions are special; trainer/patches.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.mix.access import TokenStore
from pipeline.mix.sequence import assemble
from pipeline.mix.tables import detect_kind, read_row_table, segment_bounds, split_table
from pipeline.shards import read_manifest


def _video_starts(t, span: int, clips: int) -> list[tuple[int, list[int]]]:
    """Per video: (video code, absolute first frames of its clips)."""
    start, length = segment_bounds(t)
    first_row = np.flatnonzero(np.r_[True, t.segment[1:] != t.segment[:-1]]) if len(t.segment) else np.zeros(0, int)
    seg_video = t.video[first_row]
    out = []
    for v in np.unique(seg_video):
        segs = np.flatnonzero(seg_video == v)
        valid = [(int(start[s]), int(length[s]) - span + 1) for s in segs if length[s] >= span]
        n = sum(c for _, c in valid)
        if n == 0:
            continue
        if clips == 1:
            picks = [(n - 1) // 2]
        else:
            picks = sorted(set(np.round(np.linspace(0, n - 1, clips)).astype(int).tolist()))
        firsts = []
        for p in picks:
            for s0, c in valid:
                if p < c:
                    firsts.append(s0 + p)
                    break
                p -= c
        out.append((int(v), firsts))
    return out


def iter_clips(
    dataset_url: str,
    *,
    frames: int,
    stride: int,
    images_per_seq: int = 1,
    clips_per_video: int = 1,
    specials: dict[str, int],
    split: str | None = None,
    kind: str | None = None,
    add_eos: bool = False,
    storage_options: dict | None = None,
    verify_sha256: bool = False,
    max_items: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield ``{"tokens": int32 [T], "label", "video_id", "frame_index": int64 [T], "split", "first_frame"}``
(and ``"pixels"``: uint8 [T, P*P*3] for a pixel dataset, module docstring).

    ``first_frame`` is counted inside its video.

    ``T = 1 + F*HW (+1 with add_eos)``, ``F`` = ``frames`` for videos and ``images_per_seq`` for
    images; ``frame_index`` is -1 on special tokens. ``split=None`` walks every split (sorted);
    ``kind`` overrides image/video detection. Videos shorter than one clip are skipped.
    """
    if frames < 1 or stride < 1 or images_per_seq < 1 or clips_per_video < 1:
        raise ValueError(
            f"frames={frames}, stride={stride}, images_per_seq={images_per_seq}, clips_per_video={clips_per_video}: "
            "all must be ≥ 1"
        )
    for k in ("bos_video", "bos_image", "eos", "pad"):
        if k not in specials:
            raise ValueError(f"specials lacks {k!r}; pass the mix manifest's (or loader's) specials")
    m = read_manifest(dataset_url, storage_options)
    rows = read_row_table(dataset_url, m, storage_options)
    kind = kind or detect_kind(rows)
    if kind not in ("image", "video"):
        raise ValueError(f"kind={kind!r}: use 'image' or 'video'")
    values = int(m["grid"][0]) * int(m["grid"][1])  # stored values per frame
    vpt = int((m.get("tokenizer") or {}).get("values_per_token", 1))  # P*P*3 for a pixel dataset
    hw = values // vpt  # positions per frame
    store = TokenStore(dataset_url, m, values, storage_options=storage_options,
                       verify="sha256" if verify_sha256 else "off")
    splits = [split] if split is not None else rows.splits()
    done = 0
    for sp in splits:
        t = split_table(rows, sp)
        if len(t.row) == 0:
            continue
        tab = t.arrays()
        f = frames if kind == "video" else images_per_seq
        seq_len = f * hw + 1 + (1 if add_eos else 0)
        if kind == "video":
            span = (frames - 1) * stride + 1
            items = [a0 + stride * np.arange(frames, dtype=np.int64)
                     for _, firsts in _video_starts(t, span, clips_per_video) for a0 in firsts]
            start_tok = specials["bos_video"]
        else:
            n = int(t.cum[-1]) // images_per_seq
            items = [np.arange(i * images_per_seq, (i + 1) * images_per_seq, dtype=np.int64) for i in range(n)]
            start_tok = specials["bos_image"]
        for fr in items:
            toks, q = store.gather(tab, fr[None, :])  # (1, F, values)
            pixels = None
            if vpt > 1:  # the patches (F*hw, P*P*3) in raster order after the start token; code 0 as their ids
                pixels = np.zeros((seq_len, vpt), dtype=np.uint8)
                pixels[1 : 1 + len(fr) * hw] = toks.reshape(-1, vpt)
                toks = np.zeros((1, len(fr), hw), dtype=toks.dtype)
            seq = assemble(toks, start=start_tok, seq_len=seq_len, specials=specials)
            r0 = int(q[0, 0])
            li = int(t.label[r0])
            vcode = int(t.video[r0])
            video_start = int(t.cum[int(np.searchsorted(t.video, vcode))])  # video numbers increase in row order
            item = {
                "tokens": seq["inputs"][0],
                "frame_index": seq["frame_index"][0],
                "label": t.labels[li] if li >= 0 else None,
                "video_id": t.video_names[vcode].as_py(),
                "split": sp,
                "first_frame": int(fr[0]) - video_start,  # frame number inside its video
            }
            if pixels is not None:
                item["pixels"] = pixels
            yield item
            done += 1
            if max_items is not None and done >= max_items:
                return
