"""Token datasets whose tokens encode their own positions (for tests, benchmarks and demos).

Frame ``f`` of video number ``v`` has tokens ``[v, f % C, f // C, 3, 4, 5, ...]`` (position ``p`` ≥ 3
holds ``p % C``), where ``C`` is the codebook size; :func:`decode_frame` inverts it. A sequence built
from such shards says exactly which video and frame every token came from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.shards import ShardWriter, write_manifest

TOKENIZER = {"id": "synthetic-positions", "sha256": "0" * 64, "vocab_size": 512, "downsample": 8}


def frame_tokens(video: int, frame: int, hw: int, codebook: int) -> np.ndarray:
    if video >= codebook:
        raise ValueError(f"video number {video} does not fit the codebook {codebook}")
    t = np.arange(hw, dtype=np.int64) % codebook
    t[0], t[1], t[2] = video, frame % codebook, frame // codebook
    return t.astype(np.uint16)


def decode_frame(tokens: np.ndarray, codebook: int) -> tuple[int, int]:
    """(video number, frame number) of one frame's tokens."""
    t = np.asarray(tokens).reshape(-1)
    return int(t[0]), int(t[1]) + codebook * int(t[2])


def write_positional_dataset(
    out_url: str,
    videos: list[dict[str, Any]],
    *,
    dataset: str,
    grid: tuple[int, int] = (2, 2),
    codebook: int = 512,
    chunk_frames: int = 64,
    rows_per_shard: int = 8,
    row_group_size: int = 4,
    format: str = "arrow",
    tokenizer: dict | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Write shards + manifest. ``videos``: [{"frames": N, "split": "train", "label": "x", "number": v}].

    Videos are cut into chunks of ``chunk_frames``; rows are written in the order given, so chunks of
    one video may land in different shards. Returns the manifest.
    """
    gh, gw = grid
    hw = gh * gw
    rows = []
    for i, v in enumerate(videos):
        num = int(v.get("number", i))
        n = int(v["frames"])
        for c, f0 in enumerate(range(0, n, chunk_frames)):
            nf = min(chunk_frames, n - f0)
            tok = np.stack([frame_tokens(num, f0 + k, hw, codebook) for k in range(nf)])
            rows.append({
                "key": f"{dataset}/v{num:05d}/{c:05d}", "dataset": dataset, "split": v.get("split", "train"),
                "video_id": f"v{num:05d}", "chunk": c, "t_start": f0 / 30.0, "fps": 30.0, "num_frames": nf,
                "grid_h": gh, "grid_w": gw, "label": v.get("label"), "tokens": tok,
            })
    for s, lo in enumerate(range(0, len(rows), rows_per_shard)):
        w = ShardWriter(out_url, s, codebook_size=codebook, tokenizer=tokenizer or TOKENIZER, resolution=8 * gh,
                        format=format, row_group_size=row_group_size, storage_options=storage_options)
        for r in rows[lo : lo + rows_per_shard]:
            w.add(r)
        w.commit(input_shard={"id": s, "worklist_sha256": "0" * 64, "num_items": rows_per_shard}, errors=[])
    return write_manifest(out_url, storage_options)
