"""Loss by position on a video token dataset (the paper's Figure 10), behind `toto-train position-loss`.

Clips of `frames` frames at `stride` (`trainer.data.iter_clips`, `clips` per video, evenly spaced)
are scored by the checkpoint; `trainer.evals.position_loss` gives the mean next-token loss at every
position and per target frame. A clip of F frames is `1 + F·HW` tokens (bos + frames); the model reads
all but the last token and predicts all but the bos, so a 16-frame clip of 256-token frames (4097
tokens) fits the paper's 4096-token context.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from trainer.evals.position_loss import per_position_loss, plot_position_loss, summarize_position_loss

__all__ = ["check_video_dataset", "clip_batches", "position_loss_job"]


def check_video_dataset(url: str, storage_options: dict | None = None) -> None:
    """Refuse an image-only dataset: loss by position inside a clip needs videos."""
    from pipeline.mix.tables import detect_kind, read_row_table
    from pipeline.shards import read_manifest

    m = read_manifest(url, storage_options)
    if detect_kind(read_row_table(url, m, storage_options)) != "video":
        raise ValueError(f"{url} is an image dataset (one frame per row): loss by position compares frames of a "
                         "clip, so pass a video token dataset such as Kinetics-400's")


def clip_batches(url: str, *, specials: dict, frames: int, stride: int, clips: int, split: str | None,
                 batch_size: int, max_clips: int | None, max_seq_len: int,
                 storage_options: dict | None = None) -> Iterator[dict]:
    """Batches {"inputs", "targets", "target_frame_index"} int64 (B, T-1) of clips, streamed."""
    from trainer.data import iter_clips

    buf: list[dict] = []
    n = 0
    for c in iter_clips(url, frames=frames, stride=stride, clips_per_video=clips, specials=specials, split=split,
                        storage_options=storage_options, max_items=max_clips, kind="video"):
        if len(c["tokens"]) - 1 > max_seq_len:
            raise ValueError(f"{url}: a clip of {frames} frames needs {len(c['tokens']) - 1} input positions, more "
                             f"than the checkpoint's context of {max_seq_len}; pass fewer --frames")
        buf.append(c)
        n += 1
        if len(buf) == batch_size:
            yield _batch(buf)
            buf = []
    if buf:
        yield _batch(buf)
    if n == 0:
        raise ValueError(f"{url} (split {split or 'all'}) has no video as long as one clip of {frames} frames at "
                         f"stride {stride}; pass fewer --frames or a smaller --stride")


def _batch(items: list[dict]) -> dict:
    tok = torch.from_numpy(np.stack([np.asarray(c["tokens"], dtype=np.int64) for c in items]))  # (B, T)
    fi = torch.from_numpy(np.stack([np.asarray(c["frame_index"], dtype=np.int64) for c in items]))  # (B, T)
    # Input t predicts token t+1, whose frame is frame_index[t+1].
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "target_frame_index": fi[:, 1:].numpy()}


def position_loss_job(model: torch.nn.Module, meta: dict, data: str, out_dir: str, *, frames: int = 16,
                      stride: int = 4, clips: int = 1, split: str | None = "val", batch_size: int = 8,
                      max_clips: int | None = None, storage_options: dict | None = None) -> tuple[dict, str, str]:
    """Per-position and per-frame loss of a checkpoint on a video dataset; writes position_loss.{json,png}."""
    from pipeline.shards import read_manifest
    from pipeline.storage import write_json

    check_video_dataset(data, storage_options)
    grid = read_manifest(data, storage_options)["grid"]
    hw = int(grid[0]) * int(grid[1])
    batches = clip_batches(data, specials=meta["specials"], frames=frames, stride=stride, clips=clips, split=split,
                           batch_size=batch_size, max_clips=max_clips, max_seq_len=int(model.cfg.max_seq_len),
                           storage_options=storage_options)
    counted: list[int] = []

    def counting():
        for b in batches:
            counted.append(int(b["inputs"].shape[0]))
            yield b

    device = next(model.parameters()).device
    amp = torch.bfloat16 if device.type == "cuda" else None
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        loss, tframe = per_position_loss(model, counting())
    doc = summarize_position_loss(loss, tframe)
    doc.update({"checkpoint": str(meta.get("step_dir", "")), "data": data, "split": split or "all", "frames": frames,
                "stride": stride, "tokens_per_frame": hw, "num_clips": sum(counted),
                "paper": "Kinetics val, 16 frames x 256 tokens: the first frame's loss is clearly higher than the "
                         "following frames'"})
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "position_loss.json")
    write_json(json_path, doc, "clip_loss")
    png = plot_position_loss(doc, hw, os.path.join(out_dir, "position_loss.png"))
    return doc, json_path, png
