"""Next-token loss by position inside a clip: per token position, per frame, first frame vs later.

The paper finds the first frame of a clip clearly harder to predict than the following frames
(later frames are largely predictable from earlier ones). Losses are grouped by the frame of the
*target* token, so frame 0 means "predicting the tokens of the first frame".
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.mix.sequence import IGNORE_INDEX
from trainer.patches import pixel_losses, target_ids

__all__ = ["token_losses", "next_losses", "target_frames", "per_position_loss", "summarize_position_loss",
           "plot_position_loss"]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position: logits (B, T, V), targets int32/int64 (B, T) → fp32 (B, T).

    Computed in fp32 whatever the logits' dtype; 0 where the target is ``IGNORE_INDEX`` (padding),
    so callers mask with ``targets != IGNORE_INDEX`` before averaging.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(targets)


def next_losses(out: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own loss at every position and where it counts: (loss fp32 (B, T), valid bool (B, T)).

    Cross-entropy for token targets (B, T); for a patch -> patch model's packed pixel targets
    (B, T, 1 + P*P*3, trainer/patches.py) the MSE on the next per-patch-normalised patch."""
    loss = pixel_losses(out, targets) if targets.ndim == 3 else token_losses(out, targets)
    return loss, target_ids(targets) != IGNORE_INDEX


def target_frames(frame_index: torch.Tensor) -> torch.Tensor:
    """Frame of each *target* from the frame of each input: frame_index (B, T) → (B, T).

    The target at t is input t+1, so its frame is ``frame_index[:, t+1]``; the last target lies past
    the window and is given the last input's frame (the clip's last frame, or -1 on specials).
    """
    return torch.cat([frame_index[:, 1:], frame_index[:, -1:]], dim=1)


def per_position_loss(
    model: torch.nn.Module, batches: Iterable[dict], *, max_batches: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy per sequence position and the target frame of each position.

    ``batches`` yield dicts with "inputs" and "targets" int64 (B, T) (a patch model's packed inputs and
    targets, trainer/patches.py: the loss is then its own, MSE for pixel targets) and either
    "target_frame_index" (B, T) or "frame_index" (B, T) (the frame of each input; the target
    frame is then the next position's). Targets of -100 (padding) are ignored.
    Returns (loss (T,), target_frame (T,)), with NaN loss where no target was scored.
    """
    device = next(model.parameters()).device
    total = None
    count = None
    tframe = None
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs = torch.as_tensor(batch["inputs"]).to(device)
            targets = torch.as_tensor(batch["targets"]).to(device)
            loss, valid = next_losses(model(inputs), targets)  # (B, T) each
            valid = valid.float()
            if total is None:
                total = torch.zeros(inputs.shape[1], dtype=torch.float64)  # (T,)
                count = torch.zeros(inputs.shape[1], dtype=torch.float64)
                if "target_frame_index" in batch:
                    tframe = np.asarray(batch["target_frame_index"])[0].astype(np.int64)
                else:
                    fi = torch.as_tensor(np.asarray(batch["frame_index"])[:1]).long()  # (1, T)
                    tframe = target_frames(fi)[0].numpy()
            total += (loss * valid).sum(dim=0).double().cpu()
            count += valid.sum(dim=0).double().cpu()
    if total is None:
        raise ValueError("no batches to measure the loss on")
    mean = (total / count.clamp(min=1)).numpy()
    mean[count.numpy() == 0] = np.nan
    return mean, tframe


def summarize_position_loss(loss: np.ndarray, target_frame: np.ndarray) -> dict:
    """Per-frame mean loss, first frame vs the mean of later frames, and their ratio."""
    frames = sorted(int(f) for f in np.unique(target_frame) if f >= 0)
    if len(frames) < 2:
        raise ValueError("need clips of at least two frames to compare the first frame with later ones")
    per_frame = [float(np.nanmean(loss[target_frame == f])) for f in frames]
    first, later = per_frame[0], float(np.mean(per_frame[1:]))
    return {
        "schema": "clip_loss",
        "version": 1,
        "per_frame": per_frame,
        "per_position": [None if np.isnan(x) else float(x) for x in loss],
        "first_frame": first,
        "later_frames": later,
        "first_over_later": first / later if later > 0 else None,
        "first_frame_higher": bool(first > later),
    }


def plot_position_loss(doc: dict, tokens_per_frame: int, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9, 3.3))
    pos = np.array([np.nan if x is None else x for x in doc["per_position"]])
    a0.plot(np.arange(len(pos)), pos, lw=0.6)
    for f in range(1, len(doc["per_frame"])):
        a0.axvline(f * tokens_per_frame, color="grey", lw=0.3)
    a0.set_xlabel("token position")
    a0.set_ylabel("MSE (normalised patch)" if doc.get("loss") == "mse_next_patch" else "loss (nats)")
    a0.set_title("loss per position")
    a1.bar(np.arange(len(doc["per_frame"])), doc["per_frame"])
    a1.set_xlabel("frame in clip")
    a1.set_title("mean loss per frame")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
