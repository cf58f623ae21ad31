"""DAVIS metrics: J (region similarity, IoU) and F (boundary F-measure), per object and overall.

Conventions follow the DAVIS-2017 semi-supervised benchmark (Pont-Tuset et al. 2017):
- J of one frame is |pred ∧ gt| / |pred ∨ gt| over non-void pixels; both empty counts as 1.
- F of one frame compares the toolkit's `seg2bmap` boundaries (`boundary_map`), each matched to
  the other's boundary dilated by a disk (x² + y² <= r²) of radius r = ceil(0.008 · image diagonal)
  pixels (the standard tolerance); precision P = matched predicted boundary pixels / predicted
  ones, recall R likewise for the ground truth, F = 2PR / (P + R); both boundaries empty counts as
  1, one empty as 0 (P = 1, R = 0 or the reverse), P + R = 0 as 0. Void pixels are cleared from
  both masks before their boundaries are taken.
- A sequence's score for an object is the mean over frames, excluding the first frame (its
  mask is the given input) and the last frame, as the official evaluation does.
- J-mean and F-mean average the per-object scores over all objects of all sequences;
  J&F-mean = (J-mean + F-mean) / 2.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "BOUNDARY_TOLERANCE",
    "VOID",
    "region_j",
    "boundary_map",
    "boundary_f",
    "tolerance_px",
    "sequence_scores",
    "summarize",
]

BOUNDARY_TOLERANCE = 0.008  # fraction of the image diagonal
VOID = 255  # DAVIS palette index of pixels excluded from scoring


def region_j(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """IoU of two boolean masks (H, W), ignoring void pixels."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    if void is not None:
        keep = ~void.astype(bool)
        pred, gt = pred & keep, gt & keep
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def boundary_map(mask: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    """The DAVIS-2017 toolkit's `seg2bmap` boundary of a boolean mask (H, W) -> bool (height, width).

    A pixel is on the boundary when it differs from its east, south or south-east neighbour; on the
    last row only the east neighbour is compared, on the last column only the south one, and the
    bottom-right pixel never is, so a mask gets no boundary along the image border. The boundary is
    thin and lies on both sides of the edge (a square of side n has 4n boundary pixels: its last row
    and column inside, the row above and the column left of it outside).
    A larger (height, width) of the same aspect ratio (within 0.01, as the toolkit asserts) maps
    boundary pixel (y, x) to (floor(y·height/H), floor(x·width/W)); the evaluation itself always
    uses the mask's own size.
    """
    m = mask.astype(bool)
    h, w = m.shape
    height, width = height or h, width or w
    if height < h or width < w or abs(width / height - w / h) > 0.01:
        raise ValueError(f"cannot map a {w}x{h} mask's boundary to {width}x{height}: use a larger size of the same "
                         "aspect ratio")
    e, s, se = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    e[:, :-1] = m[:, 1:]
    s[:-1, :] = m[1:, :]
    se[:-1, :-1] = m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    if (height, width) == (h, w):
        return b
    out = np.zeros((height, width), dtype=bool)
    ys, xs = np.nonzero(b)
    out[ys * height // h, xs * width // w] = True
    return out


def tolerance_px(height: int, width: int, tolerance: float = BOUNDARY_TOLERANCE) -> int:
    """Boundary matching radius in pixels: `tolerance` itself when >= 1, else ceil(tolerance · diagonal)
    (the toolkit's `bound_th`; 480x854 DAVIS frames: 8 px)."""
    return int(tolerance) if tolerance >= 1 else math.ceil(tolerance * math.hypot(height, width))


def _disk(radius: int) -> np.ndarray:
    r = int(radius)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def boundary_f(
    pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None, tolerance: float = BOUNDARY_TOLERANCE
) -> float:
    """Boundary F-measure of two boolean masks (H, W) with a tolerance in fractions of the diagonal."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    if void is not None:
        keep = ~void.astype(bool)
        pred, gt = pred & keep, gt & keep
    radius = tolerance_px(*gt.shape, tolerance)
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    disk = _disk(radius)
    g_dil = ndimage.binary_dilation(gb, structure=disk)
    p_dil = ndimage.binary_dilation(pb, structure=disk)
    precision = float((pb & g_dil).sum()) / n_p
    recall = float((gb & p_dil).sum()) / n_g
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def sequence_scores(
    pred: np.ndarray, gt: np.ndarray, object_ids: list[int] | None = None, skip_first_last: bool = True
) -> dict[int, dict[str, object]]:
    """Per-object J and F of one sequence.

    pred, gt: integer label maps (F, H, W); 0 is background, VOID (255) in gt is ignored.
    Returns {object_id: {"J": mean, "F": mean, "J_frames": [...], "F_frames": [...]}}.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if pred.ndim != 3:
        raise ValueError(f"expected label maps (F, H, W), got {pred.shape}")
    void = gt == VOID
    if object_ids is None:
        object_ids = sorted(int(i) for i in np.unique(gt) if i not in (0, VOID))
    frames = range(1, pred.shape[0] - 1) if skip_first_last and pred.shape[0] > 2 else range(pred.shape[0])
    out: dict[int, dict[str, object]] = {}
    for obj in object_ids:
        js = [region_j(pred[t] == obj, gt[t] == obj, void[t]) for t in frames]
        fs = [boundary_f(pred[t] == obj, gt[t] == obj, void[t]) for t in frames]
        out[int(obj)] = {"J": float(np.mean(js)), "F": float(np.mean(fs)), "J_frames": js, "F_frames": fs}
    return out


def summarize(per_sequence: dict[str, dict[int, dict]]) -> dict[str, float]:
    """J-mean, F-mean and J&F-mean over all objects of all sequences (DAVIS averaging)."""
    js = [o["J"] for seq in per_sequence.values() for o in seq.values()]
    fs = [o["F"] for seq in per_sequence.values() for o in seq.values()]
    if not js:
        raise ValueError("no objects were scored: the annotations contain no object ids")
    j, f = float(np.mean(js)), float(np.mean(fs))
    return {"J_mean": j, "F_mean": f, "JF_mean": (j + f) / 2, "objects": len(js)}
