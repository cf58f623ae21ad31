"""The Ego4D STA metric: Top-5 mAP for Noun, Noun+Verb, Noun+TTC and Overall (Noun+Verb+TTC).

The rules are those of the official evaluation (EGO4D/forecasting, `STAMeanAveragePrecision`),
reimplemented here:

- IoU uses the inclusive-pixel convention (width = x2 - x1 + 1); a box matches when IoU > 0.5.
- A TTC matches when |predicted - true| <= 0.25 s.
- In each annotated frame, predictions are taken from the highest score down; each is matched to
  the not-yet-matched ground-truth object with the highest IoU among those that satisfy the
  variant's conditions (box, plus noun; noun and verb; noun and TTC; all three).
- Top-K (K = 5): in each frame the (K - 1) × (number of ground-truth objects) highest-scoring
  false positives are discarded before AP, so a right answer among the first K guesses per object
  costs nothing. (This is the official rule; it is not "keep the K best predictions".)
- AP per noun class of the ground truth (VOC all-point interpolation over the predictions whose
  noun is that class, across all frames); a class with ground truth but no predictions scores 0;
  mAP = mean over those classes, in percent.
"""

from __future__ import annotations

import numpy as np

__all__ = ["VARIANTS", "iou_matrix", "average_precision", "sta_map"]

VARIANTS = ("noun", "noun_verb", "noun_ttc", "overall")


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, 4) x (G, 4) boxes [x1, y1, x2, y2] -> (P, G) IoU, inclusive pixels as the official code."""
    a, b = np.asarray(a, float).reshape(-1, 4)[:, None], np.asarray(b, float).reshape(-1, 4)[None]

    def area(x):
        return np.clip(x[..., 2] - x[..., 0] + 1, 0, None) * np.clip(x[..., 3] - x[..., 1] + 1, 0, None)

    inter = area(np.concatenate([np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])], -1))
    return inter / (area(a) + area(b) - inter + 1e-11)


def average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    """VOC all-point AP of true-positive flags ranked by score, against n_gt ground truths."""
    order = np.argsort(-scores, kind="stable")
    tp = tp[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    rec = ctp / n_gt
    prec = ctp / np.maximum(ctp + cfp, 1e-12)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope, non-increasing in recall
    i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def _arrays(d: dict, with_score: bool) -> dict[str, np.ndarray]:
    keys = ("boxes", "nouns", "verbs", "ttcs") + (("scores",) if with_score else ())
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"STA {'prediction' if with_score else 'ground truth'} lacks {missing}; "
                         f"each needs {list(keys)}")
    out = {k: np.asarray(d[k], dtype=float) for k in keys}
    out["boxes"] = out["boxes"].reshape(-1, 4)
    n = len(out["boxes"])
    if any(len(v) != n for v in out.values()):
        raise ValueError(f"STA entry has fields of different lengths: { {k: len(v) for k, v in out.items()} }")
    return out


def sta_map(frames: list[tuple[dict, dict]], *, iou_threshold: float = 0.5, ttc_threshold: float = 0.25,
            top_k: int = 5) -> dict[str, float]:
    """frames: [(prediction, ground truth)] per annotated frame; prediction has boxes (P, 4), scores,
    nouns, verbs, ttcs (P,); ground truth has boxes (G, 4), nouns, verbs, ttcs (G,).
    Returns {variant: mAP in percent} for VARIANTS."""
    tps = {v: [] for v in VARIANTS}
    scores, classes, gt_classes = [], [], []
    for pred, gt in frames:
        p, g = _arrays(pred, True), _arrays(gt, False)
        n_p, n_g = len(p["boxes"]), len(g["boxes"])
        gt_classes.append(g["nouns"])
        if n_p == 0:
            continue
        iou = iou_matrix(p["boxes"], g["boxes"])  # (P, G)
        order = np.argsort(-p["scores"], kind="stable")
        box_ok = iou > iou_threshold
        noun_ok = p["nouns"][:, None] == g["nouns"][None]
        verb_ok = p["verbs"][:, None] == g["verbs"][None]
        ttc_ok = np.abs(p["ttcs"][:, None] - g["ttcs"][None]) <= ttc_threshold
        conds = {"noun": box_ok & noun_ok, "noun_verb": box_ok & noun_ok & verb_ok,
                 "noun_ttc": box_ok & noun_ok & ttc_ok, "overall": box_ok & noun_ok & verb_ok & ttc_ok}
        for v, ok in conds.items():
            tp = np.zeros(n_p)
            taken = np.zeros(n_g, dtype=bool)
            for i in order:  # highest score first; each ground truth is matched at most once
                cand = ok[i] & ~taken
                if cand.any():
                    j = int(np.argmax(np.where(cand, iou[i], -1.0)))
                    tp[i], taken[j] = 1.0, True
            if top_k > 1:
                # Discount the (K-1)·G highest-scoring false positives of this frame (NaN = not counted).
                budget = (top_k - 1) * n_g
                fp_rank = np.cumsum(tp[order] == 0)
                drop = order[(tp[order] == 0) & (fp_rank <= budget)]
                tp[drop] = np.nan
            tps[v].append(tp)
        scores.append(p["scores"])
        classes.append(p["nouns"])
    gtc = np.concatenate(gt_classes) if gt_classes else np.zeros(0)
    if len(gtc) == 0:
        raise ValueError("STA metric: the ground truth holds no objects; mAP is undefined")
    sc = np.concatenate(scores) if scores else np.zeros(0)
    cl = np.concatenate(classes) if classes else np.zeros(0)
    out = {}
    for v in VARIANTS:
        tp_all = np.concatenate(tps[v]) if tps[v] else np.zeros(0)
        aps = []
        for c in np.unique(gtc):
            sel = (cl == c) & ~np.isnan(tp_all)
            aps.append(average_precision(tp_all[sel], sc[sel], int(np.sum(gtc == c))) if sel.any() else 0.0)
        out[v] = 100.0 * float(np.mean(aps))
    return out
