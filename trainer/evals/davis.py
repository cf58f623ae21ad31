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

from trainer.evals.features import backbone_features
from trainer.evals.jf import VOID, sequence_scores, summarize
from trainer.evals.propagation import (
    PropagationConfig,
    downsample_labels,
    labels_to_onehot,
    propagate,
    upsample_to_ids,
)

__all__ = ["DavisSequence", "list_sequences", "load_sequence", "track_sequences", "model_patch_features",
           "patch_features", "plot_track_layers"]


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


def patch_features(
    model: torch.nn.Module,
    frame_tokens: np.ndarray,
    *,
    bos: int | None,
    layers: list[int],
    window: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[int, torch.Tensor]:
    """Per-patch features of a video after each of `layers`, from one backbone pass per window:
    (F, h, w) tokens, or for a patch-input model (F, h, w, P*P*3) pixel patches, -> {layer: (F, h, w, D)}
    in `dtype` on the CPU.

    The clip is fed as ``[bos] + frames`` in raster order, as in training (``bos=None``: frames
    only, the drop_bos layout). Clips longer than the model's context are covered by windows of
    ``window`` frames that overlap by half; each frame takes its features from the window in which
    it has the most preceding context. The backbone runs through
    `trainer.evals.features.backbone_features` (bf16 autocast on CUDA, as for the probes); STA's
    features come from here too.
    """
    n, h, w = frame_tokens.shape[:3]
    hw = h * w
    head = [] if bos is None else [bos]
    max_frames = (model.cfg.max_seq_len - len(head)) // hw
    window = min(window or max_frames, max_frames)
    if window < 1:
        raise ValueError(
            f"one frame of {hw} tokens{' plus bos' if head else ''} does not fit the model's context of "
            f"{model.cfg.max_seq_len}; pass --context auto (extends it) or drop_bos"
        )
    hop = max(1, window - window // 2)
    out: dict[int, list[torch.Tensor | None]] = {layer: [None] * n for layer in layers}
    start = 0
    while True:
        end = min(n, start + window)
        if frame_tokens.ndim == 4:  # pixel patches: the patch model's packed (T, 1 + P*P*3) sequence
            from trainer.patches import pack_inputs

            body = frame_tokens[start:end].reshape((end - start) * hw, -1)
            ids = np.concatenate([head, np.zeros(len(body), dtype=np.int64)])
            seq = pack_inputs(ids[None], np.concatenate([np.zeros((len(head), body.shape[1]), body.dtype), body])[None])[0]
        else:
            seq = np.concatenate([head, frame_tokens[start:end].reshape(-1)]).astype(np.int64)  # (T,)
        fi = np.zeros(seq.shape[0], dtype=np.int64)
        fi[: len(head)] = -1  # bos is not a visual position
        # The evaluations' one backbone pass (no grad; bf16 autocast on CUDA, as the probes run it).
        feats = backbone_features(model, torch.from_numpy(seq)[None], torch.from_numpy(fi)[None], list(layers))
        first_kept = 0 if start == 0 else window // 2
        for layer in layers:
            per_frame = feats[layer][0].to("cpu", dtype).reshape(end - start, h, w, -1)  # (f·h·w, D) -> (f, h, w, D)
            for i in range(first_kept, end - start):
                out[layer][start + i] = per_frame[i]
        if end == n:
            break
        start += hop
    assert all(o is not None for frames in out.values() for o in frames)
    return {layer: torch.stack(frames) for layer, frames in out.items()}  # (F, h, w, D) each


def model_patch_features(
    model: torch.nn.Module,
    frame_tokens: np.ndarray,
    *,
    bos: int | None,
    layer: int,
    window: int | None = None,
) -> torch.Tensor:
    """`patch_features` for one layer: (F, h, w) tokens -> (F, h, w, D) float32."""
    return patch_features(model, frame_tokens, bos=bos, layers=[layer], window=window)[layer]


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def _score(seq: DavisSequence, feats: torch.Tensor, cfg: PropagationConfig) -> dict[int, dict]:
    """Propagate one sequence's first-frame masks with features (F, h, w, D) and score them per object."""
    _, h, w, _ = feats.shape
    first = downsample_labels(labels_to_onehot(seq.masks[0], seq.object_ids), h, w)  # (K, h, w)
    soft = propagate(feats, first, cfg)  # (F, K, h, w)
    H, W = seq.masks.shape[1:]
    pred = upsample_to_ids(soft, H, W, seq.object_ids)  # (F, H, W)
    return sequence_scores(pred, seq.masks, seq.object_ids)


def _rows(per_seq: dict[str, dict[int, dict]]) -> list[dict]:
    return [{"sequence": name, "object": obj, "J": s["J"], "F": s["F"], "JF": (s["J"] + s["F"]) / 2}
            for name, scores in per_seq.items() for obj, s in scores.items()]


def track_sequences(
    sequences: list[DavisSequence],
    features_fn: Callable[[np.ndarray], torch.Tensor | dict[int, torch.Tensor]],
    *,
    resolution: int,
    cfg: PropagationConfig | None = None,
    progress: Callable[[str], None] | None = None,
    n_layers: int | None = None,
) -> dict:
    """Propagate each sequence's first-frame masks and score them; returns a track_result doc body.

    ``features_fn`` maps frames (F, R, R, 3) uint8 (resized to ``resolution`` square) to per-patch
    features (F, h, w, D), or to {layer: (F, h, w, D)} for a layer sweep: then every layer is scored,
    the body gains ``layers`` (J/F/J&F per layer, relative depth = layer / ``n_layers``) and
    ``peak_layer``, and its objects and summary are the peak layer's (the paper reports the best
    layer). Predictions are upsampled to the original frame size for scoring.
    """
    cfg = cfg or PropagationConfig()
    per_layer: dict[int | None, dict[str, dict[int, dict]]] = {}
    for seq in sequences:
        if not seq.object_ids:
            raise ValueError(f"sequence {seq.name!r}: the first frame's annotation contains no objects")
        feats = features_fn(_resize_frames(seq.frames, resolution))
        by_layer = feats if isinstance(feats, dict) else {None: feats}
        for layer, f in by_layer.items():
            per_layer.setdefault(layer, {})[seq.name] = _score(seq, f, cfg)
        if progress is not None:
            jf = max(np.mean([(s["J"] + s["F"]) / 2 for s in per_layer[k][seq.name].values()]) for k in by_layer)
            progress(f"{seq.name}: J&F {100 * jf:.1f}" + (" (best layer)" if len(by_layer) > 1 else ""))
    body = {"propagation": vars(cfg).copy()}
    if None in per_layer:
        return {"objects": _rows(per_layer[None]), "summary": summarize(per_layer[None]), **body}
    sweep = [{"layer": int(k), "relative_depth": k / (n_layers or max(per_layer)), **summarize(per_layer[k])}
             for k in sorted(per_layer)]
    peak = max(sweep, key=lambda r: r["JF_mean"])["layer"]
    return {"objects": _rows(per_layer[peak]), "summary": summarize(per_layer[peak]), "layers": sweep,
            "peak_layer": peak, **body}


def plot_track_layers(doc: dict, path: str) -> str:
    """J&F by relative depth of a track layer sweep (the paper's tracking-by-layer view), peak marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["layers"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["relative_depth"] for r in rows], [100 * r["JF_mean"] for r in rows], marker="o", label="J&F")
    ax.plot([r["relative_depth"] for r in rows], [100 * r["J_mean"] for r in rows], ls="--", lw=1, label="J")
    ax.plot([r["relative_depth"] for r in rows], [100 * r["F_mean"] for r in rows], ls=":", lw=1, label="F")
    peak = next(r for r in rows if r["layer"] == doc["peak_layer"])
    ax.annotate(f"peak: layer {peak['layer']} ({100 * peak['JF_mean']:.1f})",
                (peak["relative_depth"], 100 * peak["JF_mean"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_xlabel("relative depth (layer / layers)")
    ax.set_ylabel("DAVIS-2017 score (%)")
    ax.set_title(f"label propagation by depth at {doc.get('resolution', '?')} px "
                 f"(paper, large: 44.8 at 256 px, 62.4 at 512 px)", fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
