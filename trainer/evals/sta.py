"""Ego4D short-term anticipation from frozen Toto features: `toto-train sta`.

For each annotated frame the clip's last ``frames`` frames up to it (every ``stride``-th) are
tokenized with the checkpoint's tokenizer and run through the frozen model; the annotated frame's
per-patch features at one block are the input. As in the FRCNN+SlowFast baseline of Ego4D (and
StillFast), boxes and nouns come from the detector: each detected box gets RoI features (the mean
of the patch features under the box on the token grid, with the frame's mean and the box geometry)
and small MLP heads predict its verb and its time to contact. The detector's noun is kept (not
re-scored) and the final score is detector score × verb probability (our choice: the baseline ranks by the
detector score alone).
Training boxes are the training split's detections plus its ground-truth boxes (the baseline's
PROPOSAL_APPEND_GT); a box takes the verb and TTC of the ground truth it overlaps (IoU > 0.5).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import click
import numpy as np
import torch
from torch import nn

from trainer.evals.sta_data import (
    Detection,
    StaAnnotation,
    clip_path,
    load_detections,
    load_sta_split,
    read_frames_before,
)
from trainer.evals.sta_metric import VARIANTS, iou_matrix, sta_map

__all__ = ["StaConfig", "StaHeads", "roi_features", "sta_job", "sta_command"]

PAPER_OVERALL = 2.70  # shared/PAPER_NUMBERS.md: Toto-large, Ego4D STA overall Top-5 mAP


@dataclass
class StaConfig:
    frames: int = 4  # frames fed to the model, ending at the annotated frame
    stride: int = 4  # clip frames between them (30 fps clips: 4 = 7.5 fps)
    layer: int | None = None  # block whose features are used; None = the middle block
    hidden: int = 256
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    min_score: float = 0.0  # detections below this score are dropped (the baseline's DETECTION_SCORE_THRESH)
    seed: int = 0

    def __post_init__(self) -> None:
        for k in ("frames", "stride", "hidden", "epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k}={getattr(self, k)} must be >= 1")


def roi_features(feats: torch.Tensor, boxes: np.ndarray, width: int, height: int) -> torch.Tensor:
    """feats (h, w, D) patch features of the annotated frame; boxes (B, 4) [x1, y1, x2, y2] pixels of a
    width x height frame -> (B, 2D + 4): mean over the grid cells the box covers (at least the cell of
    its centre), the frame's mean, and the box normalised to [0, 1]."""
    h, w, d = feats.shape
    f = feats.float()
    glob = f.reshape(-1, d).mean(0)  # (D,)
    out = []
    for x1, y1, x2, y2 in np.asarray(boxes, float).reshape(-1, 4):
        c0 = min(w - 1, max(0, math.floor(x1 / width * w)))
        r0 = min(h - 1, max(0, math.floor(y1 / height * h)))
        c1 = max(c0 + 1, min(w, math.ceil((x2 + 1) / width * w)))
        r1 = max(r0 + 1, min(h, math.ceil((y2 + 1) / height * h)))
        geom = torch.tensor([x1 / width, y1 / height, x2 / width, y2 / height], dtype=torch.float32)
        out.append(torch.cat([f[r0:r1, c0:c1].reshape(-1, d).mean(0), glob, geom]))
    return torch.stack(out) if out else torch.zeros(0, 2 * d + 4)


class StaHeads(nn.Module):
    """RoI features (B, F) -> verb logits (B, V) and time to contact in seconds (B,) (softplus: >= 0)."""

    def __init__(self, in_dim: int, n_verbs: int, hidden: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden), nn.GELU())
        self.verb = nn.Linear(hidden, n_verbs)
        self.ttc = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return self.verb(z), nn.functional.softplus(self.ttc(z)).squeeze(-1)


def _frame_features(ann: StaAnnotation, videos_dir: str, features_fn, resolution: int, cfg: StaConfig):
    """(h, w, D) features of the annotated frame (with the preceding frames as context), and (W, H)."""
    from trainer.evals.davis import _resize_frames

    frames = read_frames_before(clip_path(videos_dir, ann.clip_uid), ann.clip_frame, cfg.frames, cfg.stride)
    height, width = frames.shape[1:3]
    feats = features_fn(_resize_frames(frames, resolution))  # (F, h, w, D)
    return feats[-1], width, height


def _targets(boxes: np.ndarray, ann: StaAnnotation, verb_index: dict[int, int]):
    """For each box the (verb index, ttc) of the ground truth it overlaps most with IoU > 0.5, else None."""
    gt = np.array([o.box for o in ann.objects], float).reshape(-1, 4)
    if len(boxes) == 0 or len(gt) == 0:
        return [None] * len(boxes)
    iou = iou_matrix(boxes, gt)
    out = []
    for row in iou:
        j = int(np.argmax(row))
        out.append((verb_index[ann.objects[j].verb], ann.objects[j].ttc) if row[j] > 0.5 else None)
    return out


def _dets(dets: list[Detection], min_score: float) -> list[Detection]:
    return [d for d in dets if d.score >= min_score]


def train_heads(x: torch.Tensor, verbs: torch.Tensor, ttcs: torch.Tensor, n_verbs: int, cfg: StaConfig,
                device: str | torch.device = "cpu") -> StaHeads:
    """x (N, F) RoI features, verbs (N,) class indices, ttcs (N,) seconds -> trained heads (eval mode)."""
    torch.manual_seed(cfg.seed)
    heads = StaHeads(x.shape[1], n_verbs, cfg.hidden).to(device)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    heads.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x), generator=g).split(cfg.batch_size):
            logits, ttc = heads(x[idx].to(device).float())
            loss = nn.functional.cross_entropy(logits, verbs[idx].to(device)) + \
                nn.functional.smooth_l1_loss(ttc, ttcs[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return heads.eval()


def sta_job(
    model: torch.nn.Module,
    meta: dict,
    annotations_dir: str,
    videos_dir: str,
    detections_path: str,
    out_dir: str,
    *,
    tokenize: Callable[[np.ndarray], np.ndarray],
    resolution: int,
    cfg: StaConfig | None = None,
    max_annotations: int | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> tuple[dict, str]:
    """Train verb/TTC heads on fho_sta_train, score fho_sta_val; writes sta.json and predictions.json."""
    from pipeline.storage import write_json
    from trainer.evals.run import default_track_layer, features_fn_for, parse_layers

    cfg = cfg or StaConfig()
    n_layers = int(model.cfg.n_layers)
    layer = cfg.layer or default_track_layer(n_layers)
    parse_layers(str(layer), n_layers)
    train, val = load_sta_split(annotations_dir, "train"), load_sta_split(annotations_dir, "val")
    if max_annotations:
        train.annotations, val.annotations = train.annotations[:max_annotations], val.annotations[:max_annotations]
    dets = load_detections(detections_path, [a.uid for a in train.annotations + val.annotations])
    verb_ids = sorted(train.verbs)
    verb_index = {v: i for i, v in enumerate(verb_ids)}
    features_fn = features_fn_for(model, meta, layer, tokenize)

    xs, vs, ts = [], [], []
    for k, ann in enumerate(train.annotations):
        feats, width, height = _frame_features(ann, videos_dir, features_fn, resolution, cfg)
        boxes = np.array([d.box for d in _dets(dets[ann.uid], cfg.min_score)] + [o.box for o in ann.objects],
                         float).reshape(-1, 4)
        keep = [(i, t) for i, t in enumerate(_targets(boxes, ann, verb_index)) if t is not None]
        if keep:
            # float16 halves the memory of Ego4D's ~100k training frames' boxes; heads train in float32.
            xs.append(roi_features(feats, boxes[[i for i, _ in keep]], width, height).half())
            vs += [t[0] for _, t in keep]
            ts += [t[1] for _, t in keep]
        if (k + 1) % 50 == 0:
            log(f"train features: {k + 1}/{len(train.annotations)}")
    if not xs:
        raise ValueError("no training box overlaps a ground-truth object (IoU > 0.5): nothing to train the heads on")
    x = torch.cat(xs)
    heads = train_heads(x, torch.tensor(vs), torch.tensor(ts, dtype=torch.float32), len(verb_ids), cfg)
    log(f"trained heads on {len(x)} boxes of {len(train.annotations)} annotated frames (layer {layer})")

    frames, results, n_dets = [], {}, 0
    for ann in val.annotations:
        feats, width, height = _frame_features(ann, videos_dir, features_fn, resolution, cfg)
        ds = _dets(dets[ann.uid], cfg.min_score)
        n_dets += len(ds)
        boxes = np.array([d.box for d in ds], float).reshape(-1, 4)
        with torch.no_grad():
            logits, ttc = heads(roi_features(feats, boxes, width, height))
        prob = logits.softmax(-1)
        vp, vi = prob.max(-1) if len(ds) else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        pred = {"boxes": boxes, "nouns": [d.noun for d in ds], "verbs": [verb_ids[int(i)] for i in vi],
                "ttcs": ttc.tolist(), "scores": [d.score * float(p) for d, p in zip(ds, vp, strict=True)]}
        gt = {"boxes": [o.box for o in ann.objects], "nouns": [o.noun for o in ann.objects],
              "verbs": [o.verb for o in ann.objects], "ttcs": [o.ttc for o in ann.objects]}
        frames.append((pred, gt))
        results[ann.uid] = [{"box": list(map(float, b)), "noun_category_id": int(n), "verb_category_id": int(v),
                             "time_to_contact": float(t), "score": float(s)}
                            for b, n, v, t, s in zip(boxes, pred["nouns"], pred["verbs"], pred["ttcs"],
                                                     pred["scores"], strict=True)]
    maps = sta_map(frames)
    doc = {"schema": "sta_result", "version": 1, "checkpoint": str(meta.get("step_dir", "")), "layer": layer,
           "resolution": resolution, "config": asdict(cfg) | {"layer": layer}, "noun_source": "detector",
           "score": "detector score x verb probability",
           "counts": {"train_frames": len(train.annotations), "train_boxes": len(x),
                      "val_frames": len(val.annotations), "val_detections": n_dets},
           "top5_map": maps, "paper": {"overall": PAPER_OVERALL, "model": "Toto-large"}}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sta.json")
    write_json(path, doc, "sta_result")
    # The challenge's submission layout, so val (or test) predictions can be scored elsewhere too.
    import json
    with open(os.path.join(out_dir, "predictions.json"), "w") as f:
        json.dump({"version": "1.0", "challenge": "ego4d_short_term_object_interaction_anticipation",
                   "results": results}, f)
    return doc, path


@click.command("sta")
@click.argument("ckpt")
@click.option("--annotations", "annotations_dir", required=True,
              help="Folder with fho_sta_train.json and fho_sta_val.json (Ego4D v2/annotations).")
@click.option("--videos", "videos_dir", required=True, help="Folder of <clip_uid>.mp4 (Ego4D v2/clips).")
@click.option("--detections", "detections_path", required=True,
              help="Object detections per annotation uid (Ego4D sta_models/object_detections.json).")
@click.option("--out", "out_dir", required=True, help="Output folder (sta.json, predictions.json).")
@click.option("--layer", default=None, type=int, help="Block whose features are used. Default: the middle one.")
@click.option("--frames", default=4, show_default=True, type=int, help="Frames up to the annotated one fed to the model.")
@click.option("--stride", default=4, show_default=True, type=int, help="Clip frames between those frames.")
@click.option("--resolution", default=None, type=int, help="Frame size for the tokenizer. Default: the checkpoint's.")
@click.option("--tokenizer", "tokenizer_spec", default=None,
              help="Tokenizer the checkpoint was trained with (dalle:DIR, vqgan:DIR, dvae:DIR, demo). Default: recorded.")
@click.option("--epochs", default=40, show_default=True, type=int, help="Head training epochs.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak AdamW learning rate (cosine decay).")
@click.option("--min-score", default=0.0, show_default=True, type=float, help="Drop detections scored below this.")
@click.option("--max-annotations", default=None, type=int, help="Use only the first N annotated frames per split (quick runs).")
@click.option("--device", default="cpu", show_default=True, help="Device for the frozen model (cpu, cuda).")
@click.option("--threads", default=None, type=int, help="Torch intra-op threads on CPU (default: torch's).")
def sta_command(ckpt, annotations_dir, videos_dir, detections_path, out_dir, layer, frames, stride, resolution,
                tokenizer_spec, epochs, lr, min_score, max_annotations, device, threads) -> None:
    """Ego4D short-term object-interaction anticipation on frozen features: Top-5 mAP (Noun, Noun+Verb,
    Noun+TTC, Overall).

    Boxes and nouns come from the detections file; verb and time-to-contact heads are trained on
    fho_sta_train over the frozen checkpoint's RoI features and scored on fho_sta_val with the
    official Top-5 mAP rules (IoU > 0.5, |TTC error| <= 0.25 s).

    Example:

    \b
        toto-train sta runs/large --annotations ego4d/v2/annotations --videos ego4d/v2/clips \\
            --detections ego4d/v2/sta_models/object_detections.json --out sta-out --device cuda
    """
    from trainer.checkpoint import load_model
    from trainer.evals.probes import torch_threads
    from trainer.evals.run import frame_inputs_for, resolution_from_meta

    try:
        cfg = StaConfig(frames=frames, stride=stride, layer=layer, epochs=epochs, lr=lr, min_score=min_score)
        model, meta = load_model(ckpt, device=device)
        res = resolution or resolution_from_meta(meta)
        with torch_threads(threads):
            doc, path = sta_job(model, meta, annotations_dir, videos_dir, detections_path, out_dir,
                                tokenize=frame_inputs_for(model, meta, tokenizer_spec), resolution=res, cfg=cfg,
                                max_annotations=max_annotations)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    m = doc["top5_map"]
    click.echo("Top-5 mAP  " + "  ".join(f"{v} {m[v]:.2f}" for v in VARIANTS) +
               f"   (paper, Toto-large overall: {PAPER_OVERALL:.2f})   wrote {path}")
