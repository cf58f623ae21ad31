"""Frozen features of a trained model, extracted once per layer for probes and tracking."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["backbone_features", "visual_count", "extract_features", "stack_clips"]


def visual_count(frame_index: torch.Tensor) -> int:
    """Visual tokens per sample of frame_index (N, T) (-1 on specials); every sample must have as many."""
    counts = (frame_index >= 0).sum(dim=1)
    if counts.numel() == 0:
        raise ValueError("no samples to extract features from")
    if not bool((counts == counts[0]).all()):
        raise ValueError("samples have different numbers of visual tokens; use clips of one length per dataset")
    p = int(counts[0])
    if p == 0:
        raise ValueError("samples contain no visual tokens (frame_index is -1 everywhere)")
    return p


def backbone_features(
    model: nn.Module, tokens: torch.Tensor, frame_index: torch.Tensor, layers: list[int], *, pool_tokens: int = 1
) -> dict[int, torch.Tensor]:
    """The one place evaluations run the frozen backbone on token sequences (probes, the feature
    cache, `extract_features`, the patch features of tracking and STA, `trainer.evals.davis`): a
    longer-context wrapper (RoPE extension) plugs in here.

    tokens (b, T) int64 and frame_index (b, T) on any device; returns {layer: (b, P, D) float32}
    on the model's device, P = visual tokens / pool_tokens. On CUDA the backbone runs under bf16
    autocast (the frozen trunk is the cost; heads train in fp32 on what this returns)."""
    device = next(model.parameters()).device
    tok = tokens.to(device)
    visual = (frame_index >= 0).to(device)  # (b, T)
    p = visual_count(frame_index)
    if pool_tokens < 1 or p % pool_tokens:
        raise ValueError(f"pool_tokens={pool_tokens} must be >= 1 and divide the {p} visual tokens per sample")
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model.features(tok, layers=list(layers))  # list of (b, T, D)
    out = {}
    for layer, h in zip(layers, hidden, strict=True):
        h = h.float()[visual].reshape(tok.shape[0], p, -1)  # (b, P, D)
        if pool_tokens > 1:
            h = h.reshape(h.shape[0], p // pool_tokens, pool_tokens, -1).mean(dim=2)  # (b, P/K, D)
        out[layer] = h
    return out


def extract_features(
    model: nn.Module,
    tokens: torch.Tensor,
    frame_index: torch.Tensor,
    layers: list[int],
    *,
    batch_size: int = 16,
    pool_tokens: int = 1,
    dtype: torch.dtype = torch.float16,
    progress=None,
) -> dict[int, torch.Tensor]:
    """Hidden states after each requested block at the visual-token positions.

    tokens (N, T) int64 and frame_index (N, T) int64 (-1 on special tokens, as yielded by
    `trainer.data.iter_clips`). Every sample must have the same number of visual tokens (the
    same clip length). ``pool_tokens`` > 1 averages that many consecutive visual tokens, which
    bounds memory for long clips (it is a spatial pooling along raster order; 1 keeps all).
    Returns {layer: (N, P, D)} stored in ``dtype`` on the CPU, P = visual tokens / pool_tokens.
    """
    if tokens.ndim != 2 or frame_index.shape != tokens.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and frame_index {tuple(frame_index.shape)} must both be (N, T)")
    p = visual_count(frame_index)
    if pool_tokens < 1 or p % pool_tokens:
        raise ValueError(f"pool_tokens={pool_tokens} must be >= 1 and divide the {p} visual tokens per sample")
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    model.eval()
    for i in range(0, tokens.shape[0], batch_size):
        feats = backbone_features(model, tokens[i : i + batch_size], frame_index[i : i + batch_size], layers,
                                  pool_tokens=pool_tokens)
        for layer in layers:
            out[layer].append(feats[layer].cpu().to(dtype))
        if progress is not None:
            progress(feats[layers[0]].shape[0])
    return {layer: torch.cat(v) for layer, v in out.items()}


def stack_clips(clips: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Stack `iter_clips` items into (tokens (N, T), frame_index (N, T), labels, video_ids)."""
    if not clips:
        raise ValueError("no clips: the dataset has no labelled samples for this split")
    tokens = torch.from_numpy(np.stack([np.asarray(c["tokens"], dtype=np.int64) for c in clips]))
    frame_index = torch.from_numpy(np.stack([np.asarray(c["frame_index"], dtype=np.int64) for c in clips]))
    return tokens, frame_index, [c["label"] for c in clips], [c["video_id"] for c in clips]
