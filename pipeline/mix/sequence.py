"""Special tokens and the assembly of training sequences from frame tokens.

Layout of one sample (``F`` frames, ``HW`` tokens per frame, raster order inside a frame):

    S = [start] + frame_0 tokens + ... + frame_{F-1} tokens + [eos]        (F*HW + 2 tokens)

``start`` is ``bos_video`` for a video clip and ``bos_image`` for a sequence of images. A model with
context ``T`` (= ``seq_len``) is trained on ``inputs = S'[:T]`` and ``targets = S'[1:T+1]`` where
``S'`` is ``S`` cut or padded to ``T + 1`` tokens:

- ``len(S) > T + 1``: the tail is cut. At the paper's 16 frames × 256 tokens and T = 4096,
  S has 4098 tokens; the inputs are ``bos`` + the first 4095 frame tokens and the targets are all
  4096 frame tokens, so every frame token is predicted and ``eos`` falls off the end.
- ``len(S) == T + 1``: everything, ``eos`` included, is a target (e.g. T = 4097).
- ``len(S) < T + 1``: ``S`` is padded with ``pad``; targets on padding are :data:`IGNORE_INDEX`
  (-100, PyTorch's ``cross_entropy`` default ``ignore_index``), so padding is never learnt.

``frame_index`` is the frame (clip position 0..F-1, or image slot for image sequences) of each
input token, -1 on specials and padding; ``target_frame_index`` is the same for each target.
"""

from __future__ import annotations

import numpy as np

SPECIAL_NAMES: tuple[str, ...] = ("bos_video", "bos_image", "eos", "pad")
IGNORE_INDEX = -100


def make_specials(codebook_size: int) -> dict[str, int]:
    """Special token ids directly above the codebook: bos_video=C, bos_image=C+1, eos=C+2, pad=C+3."""
    if codebook_size < 2:
        raise ValueError(f"codebook_size={codebook_size}: must be ≥ 2")
    return {name: codebook_size + i for i, name in enumerate(SPECIAL_NAMES)}


def vocab_size_for(codebook_size: int) -> int:
    """Model vocabulary: the codebook plus the specials."""
    return codebook_size + len(SPECIAL_NAMES)


def assemble(
    frames: np.ndarray, *, start: int, seq_len: int, specials: dict[str, int]
) -> dict[str, np.ndarray]:
    """Sequences for a batch of samples of one kind.

    ``frames``: integer tokens ``[B, F, HW]`` (raster order inside each frame). Returns int64 arrays
    ``inputs``, ``targets``, ``frame_index``, ``target_frame_index``, each ``[B, seq_len]``.
    """
    if frames.ndim != 3:
        raise ValueError(f"frames must be [B, F, HW], got shape {frames.shape}")
    b, f, hw = frames.shape
    t = int(seq_len)
    n = f * hw + 2  # length of S
    keep = min(n, t + 1)
    seq = np.full((b, t + 1), specials["pad"], dtype=np.int64)  # (B, T+1)
    fidx = np.full(t + 1, -1, dtype=np.int64)  # (T+1,) the same for every sample
    seq[:, 0] = start
    body = min(f * hw, keep - 1)  # frame tokens that fit
    seq[:, 1 : 1 + body] = frames.reshape(b, f * hw)[:, :body]
    fidx[1 : 1 + body] = np.repeat(np.arange(f, dtype=np.int64), hw)[:body]
    if keep == n:
        seq[:, n - 1] = specials["eos"]
    targets = seq[:, 1:].copy()  # (B, T)
    if keep < t + 1:
        targets[:, keep - 1 :] = IGNORE_INDEX
    return {
        "inputs": seq[:, :t],
        "targets": targets,
        "frame_index": np.broadcast_to(fidx[:t], (b, t)).copy(),
        "target_frame_index": np.broadcast_to(fidx[1:], (b, t)).copy(),
    }
