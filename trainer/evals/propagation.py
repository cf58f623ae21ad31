"""Semi-supervised label propagation with frozen per-patch features (Jabri et al. 2020, as Toto does).

For every frame t > 0, each patch of t attends to the patches of a context made of the first
frame (ground-truth labels) and the previous ``n_context`` frames (their propagated soft labels):
affinities are dot products of L2-normalised features, restricted to context patches within
``radius`` grid cells of the query patch, of which the ``topk`` strongest are kept and
soft-maxed at ``temperature``; the query's label distribution is the weighted sum of theirs.
Labels live at the feature grid (h, w) and are upsampled bilinearly to the image to score them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PropagationConfig", "propagate", "labels_to_onehot", "downsample_labels", "upsample_to_ids"]


@dataclass
class PropagationConfig:
    """The paper's (and Jabri et al.'s) settings are the defaults."""

    topk: int = 10
    temperature: float = 0.05
    radius: float = 12.0  # in feature-grid cells
    n_context: int = 20  # previous frames, in addition to the first frame

    def __post_init__(self) -> None:
        if not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"PropagationConfig.topk={self.topk!r} is invalid: use a positive integer (paper: 10)")
        if not (self.temperature > 0):
            raise ValueError(f"PropagationConfig.temperature={self.temperature!r} is invalid: use > 0 (paper: 0.05)")
        if not (self.radius > 0):
            raise ValueError(f"PropagationConfig.radius={self.radius!r} is invalid: use > 0 grid cells (paper: 12)")
        if not isinstance(self.n_context, int) or self.n_context < 0:
            raise ValueError(f"PropagationConfig.n_context={self.n_context!r} is invalid: use an integer >= 0 (paper: 20)")


def labels_to_onehot(ids: np.ndarray, object_ids: list[int]) -> torch.Tensor:
    """Integer map (H, W) -> one-hot (K, H, W) float over [background] + object_ids (void -> background)."""
    classes = [0] + [int(o) for o in object_ids]
    out = np.stack([(ids == c) for c in classes]).astype(np.float32)
    return torch.from_numpy(out)


def downsample_labels(onehot: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(K, H, W) -> (K, h, w) by area averaging: soft labels at the feature grid."""
    return F.adaptive_avg_pool2d(onehot[None], (h, w))[0]


def upsample_to_ids(soft: torch.Tensor, height: int, width: int, object_ids: list[int]) -> np.ndarray:
    """(F, K, h, w) soft labels -> integer maps (F, H, W) with the original object ids."""
    up = F.interpolate(soft, size=(height, width), mode="bilinear", align_corners=False)  # (F, K, H, W)
    arg = up.argmax(dim=1).numpy()  # (F, H, W) indices into [0] + object_ids
    lut = np.array([0] + [int(o) for o in object_ids], dtype=np.uint8)
    return lut[arg]


def propagate(feats: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig | None = None) -> torch.Tensor:
    """Propagate the first frame's soft labels through a clip.

    feats: (F, h, w, D) per-patch features; first_labels: (K, h, w) soft labels of frame 0.
    Returns (F, K, h, w) soft labels; frame 0 is ``first_labels`` itself.
    """
    cfg = cfg or PropagationConfig()
    n, h, w, d = feats.shape
    k = first_labels.shape[0]
    if first_labels.shape[1:] != (h, w):
        raise ValueError(f"first-frame labels {tuple(first_labels.shape)} do not match the feature grid ({h}, {w})")
    f = F.normalize(feats.float().reshape(n, h * w, d), dim=-1)  # (F, P, D)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).float()  # (P, 2)
    near = torch.cdist(pos, pos) <= cfg.radius  # (P, P) query x context patch
    labels = torch.zeros(n, k, h * w)
    labels[0] = first_labels.reshape(k, h * w)
    for t in range(1, n):
        ctx = [0] + [s for s in range(max(1, t - cfg.n_context), t)]
        keys = f[ctx]  # (M, P, D)
        aff = torch.einsum("pd,mqd->pmq", f[t], keys)  # (P, M, P)
        aff = aff.masked_fill(~near[:, None, :], float("-inf")).reshape(h * w, -1)  # (P, M·P)
        kk = min(cfg.topk, aff.shape[1])
        val, idx = aff.topk(kk, dim=1)  # (P, kk)
        weights = torch.softmax(val / cfg.temperature, dim=1)  # (P, kk); -inf entries get weight 0
        ctx_labels = labels[ctx].permute(0, 2, 1).reshape(-1, k)  # (M·P, K)
        labels[t] = (weights[:, :, None] * ctx_labels[idx]).sum(dim=1).T  # (K, P)
    return labels.reshape(n, k, h, w)
