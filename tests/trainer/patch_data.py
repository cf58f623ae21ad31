"""Paired token + pixel datasets for the patch-model tests, written with the real shard writer.

Frames are seeded random pixels; the "token" of a patch is its first pixel value (its top-left red
value), so any sequence says whether its tokens and its pixels come from the same place.
"""

from __future__ import annotations

import numpy as np

from pipeline.jobs.steps import tokenizer_info
from pipeline.shards import ShardWriter, write_manifest
from pipeline.tokenizers.patch import PatchTokenizer, patchify

CODEBOOK = 512


def frames_of(video: int, n: int, res: int) -> np.ndarray:
    return np.random.default_rng(video).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def write_pair(root, videos: list[dict], *, dataset: str, patch: int = 4, grid: int = 2, chunk_frames: int = 16,
               token_rows_per_shard: int = 2, pixel_rows_per_shard: int = 3, pixel_res: int | None = None,
               drop_pixel_video: int | None = None) -> tuple[str, str]:
    """Write ROOT/tok and ROOT/px for `videos` ([{"frames", "split", "label"}]); returns their URLs."""
    res = grid * patch
    ptok = PatchTokenizer(patch)
    tok_rows, px_rows = [], []
    for v, spec in enumerate(videos):
        n = int(spec["frames"])
        fr = frames_of(v, n, res)
        for c, f0 in enumerate(range(0, n, chunk_frames)):
            part = fr[f0 : f0 + chunk_frames]
            meta = {"key": f"{dataset}/v{v:05d}/{c:05d}", "dataset": dataset, "split": spec.get("split", "train"),
                    "video_id": f"v{v:05d}", "chunk": c, "t_start": f0 / 30.0, "fps": 30.0, "num_frames": len(part),
                    "label": spec.get("label")}
            codes = patchify(part, patch)[..., 0].astype(np.uint16)  # (n, grid, grid): the first pixel value
            tok_rows.append({**meta, "grid_h": grid, "grid_w": grid, "tokens": codes})
            if v != drop_pixel_video:
                pr = ptok.encode(part if pixel_res is None else np.resize(part, (len(part), pixel_res, pixel_res, 3)))
                px_rows.append({**meta, "grid_h": pr.shape[1], "grid_w": pr.shape[2], "tokens": pr})
    tok_info = {"id": "first-pixel", "sha256": "1" * 64, "vocab_size": CODEBOOK, "downsample": patch}
    out = []
    for sub, rows, info, per, codebook in (("tok", tok_rows, tok_info, token_rows_per_shard, CODEBOOK),
                                           ("px", px_rows, tokenizer_info(ptok), pixel_rows_per_shard, 256)):
        url = str(root / sub)
        r = pixel_res or res if sub == "px" else res
        for s, lo in enumerate(range(0, len(rows), per)):
            w = ShardWriter(url, s, codebook_size=codebook, tokenizer=info, resolution=r)
            for row in rows[lo : lo + per]:
                w.add(row)
            w.commit(input_shard={"id": s, "worklist_sha256": "0" * 64, "num_items": per}, errors=[])
        write_manifest(url)
        out.append(url)
    return out[0], out[1]
