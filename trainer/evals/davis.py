"""Reading a DAVIS-2017-layout dataset and scoring label propagation on it.

Layout (the official one; the demo's sequences use it too):
    ROOT/JPEGImages/480p/<sequence>/00000.jpg ...
    ROOT/Annotations/480p/<sequence>/00000.png ...   palette PNGs: 0 background, 1..K objects,
                                                     255 void
    ROOT/ImageSets/2017/<split>.txt                  optional list of sequence names
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.evals.jf import VOID, sequence_scores, summarize
from trainer.evals.propagation import (
    PropagationConfig,
    downsample_labels,
    labels_to_onehot,
    propagate,
    upsample_to_ids,
)

__all__ = ["DavisSequence", "list_sequences", "load_sequence", "track_sequences", "model_patch_features"]


@dataclass
class DavisSequence:
    name: str
    frames: np.ndarray  # (F, H, W, 3) uint8
    masks: np.ndarray  # (F, H, W) uint8 object ids (255 void); frames without annotation are all 0
    object_ids: list[int]


def list_sequences(root: str, split: str | None = "val", resolution: str = "480p") -> list[str]:
    """Sequence names: from ImageSets/2017/<split>.txt when present, else every JPEGImages folder."""
    images = os.path.join(root, "JPEGImages", resolution)
    if not os.path.isdir(images):
        raise ValueError(
            f"{root} is not a DAVIS-2017 root: {images} is missing (expected JPEGImages/{resolution}/<seq>/*.jpg)"
        )
    listing = os.path.join(root, "ImageSets", "2017", f"{split}.txt") if split else None
    if listing and os.path.exists(listing):
        with open(listing) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = sorted(d for d in os.listdir(images) if os.path.isdir(os.path.join(images, d)))
    if not names:
        raise ValueError(f"no sequences found under {images}")
    return names


def load_sequence(root: str, name: str, resolution: str = "480p", max_frames: int | None = None) -> DavisSequence:
    img_dir = os.path.join(root, "JPEGImages", resolution, name)
    ann_dir = os.path.join(root, "Annotations", resolution, name)
    if not os.path.isdir(img_dir):
        raise ValueError(f"sequence {name!r}: {img_dir} is missing")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if max_frames is not None:
        stems = stems[:max_frames]
    if not stems:
        raise ValueError(f"sequence {name!r} has no frames in {img_dir}")
    frames, masks = [], []
    for stem in stems:
        path = next(
            os.path.join(img_dir, stem + ext)
            for ext in (".jpg", ".jpeg", ".png")
            if os.path.exists(os.path.join(img_dir, stem + ext))
        )
        frames.append(np.asarray(Image.open(path).convert("RGB")))
        ann = os.path.join(ann_dir, stem + ".png")
        if os.path.exists(ann):
            m = Image.open(ann)
            if m.mode not in ("P", "L"):
                raise ValueError(f"{ann}: expected a palette (P) or greyscale PNG of object ids, got mode {m.mode}")
            masks.append(np.asarray(m, dtype=np.uint8))
        else:
            masks.append(np.zeros(frames[-1].shape[:2], dtype=np.uint8))
    if not os.path.exists(os.path.join(ann_dir, stems[0] + ".png")):
        raise ValueError(f"sequence {name!r}: the first frame's annotation {ann_dir}/{stems[0]}.png is missing")
    masks_arr = np.stack(masks)
    ids = sorted(int(i) for i in np.unique(masks_arr[0]) if i not in (0, VOID))
    return DavisSequence(name=name, frames=np.stack(frames), masks=masks_arr, object_ids=ids)


def model_patch_features(
    model: torch.nn.Module,
    frame_tokens: np.ndarray,
    *,
    bos: int,
    layer: int,
    window: int | None = None,
) -> torch.Tensor:
    """Per-patch features of a video from a causal model: (F, h, w) tokens -> (F, h, w, D).

    The clip is fed as ``[bos] + frames`` in raster order, as in training. Clips longer than the
    model's context are covered by windows of ``window`` frames that overlap by half; each frame
    takes its features from the window in which it has the most preceding context.
    """
    n, h, w = frame_tokens.shape
    hw = h * w
    max_frames = (model.cfg.max_seq_len - 1) // hw
    window = min(window or max_frames, max_frames)
    if window < 1:
        raise ValueError(f"one frame of {hw} tokens does not fit the model's context of {model.cfg.max_seq_len}")
    hop = max(1, window - window // 2)
    out: list[torch.Tensor | None] = [None] * n
    device = next(model.parameters()).device
    start = 0
    with torch.no_grad():
        while True:
            end = min(n, start + window)
            seq = np.concatenate([[bos], frame_tokens[start:end].reshape(-1)]).astype(np.int64)
            hidden = model.features(torch.from_numpy(seq)[None].to(device), layers=[layer])[0][0]  # (T, D)
            per_frame = hidden[1:].float().cpu().reshape(end - start, h, w, -1)  # (f, h, w, D)
            first_kept = 0 if start == 0 else window // 2
            for i in range(first_kept, end - start):
                out[start + i] = per_frame[i]
            if end == n:
                break
            start += hop
    assert all(o is not None for o in out)
    return torch.stack(out)  # (F, h, w, D)


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def track_sequences(
    sequences: list[DavisSequence],
    features_fn: Callable[[np.ndarray], torch.Tensor],
    *,
    resolution: int,
    cfg: PropagationConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Propagate each sequence's first-frame masks and score them; returns a track_result doc body.

    ``features_fn`` maps frames (F, R, R, 3) uint8 (resized to ``resolution`` square) to per-patch
    features (F, h, w, D). Predictions are upsampled to the original frame size for scoring.
    """
    cfg = cfg or PropagationConfig()
    per_seq: dict[str, dict[int, dict]] = {}
    rows = []
    for seq in sequences:
        if not seq.object_ids:
            raise ValueError(f"sequence {seq.name!r}: the first frame's annotation contains no objects")
        feats = features_fn(_resize_frames(seq.frames, resolution))  # (F, h, w, D)
        _, h, w, _ = feats.shape
        first = downsample_labels(labels_to_onehot(seq.masks[0], seq.object_ids), h, w)  # (K, h, w)
        soft = propagate(feats, first, cfg)  # (F, K, h, w)
        H, W = seq.masks.shape[1:]
        pred = upsample_to_ids(soft, H, W, seq.object_ids)  # (F, H, W)
        scores = sequence_scores(pred, seq.masks, seq.object_ids)
        per_seq[seq.name] = scores
        for obj, s in scores.items():
            rows.append({"sequence": seq.name, "object": obj, "J": s["J"], "F": s["F"], "JF": (s["J"] + s["F"]) / 2})
        if progress is not None:
            jf = np.mean([(s["J"] + s["F"]) / 2 for s in scores.values()])
            progress(f"{seq.name}: J&F {100 * jf:.1f}")
    return {"objects": rows, "summary": summarize(per_seq), "propagation": vars(cfg).copy()}
