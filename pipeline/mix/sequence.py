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

from typing import Any

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


def layout(f: int, hw: int, *, start: int, seq_len: int, specials: dict[str, int]) -> dict[str, Any]:
    """The fixed part of a sequence of ``f`` frames: token/frame templates of S' (length T+1)."""
    t = int(seq_len)
    n = f * hw + 2  # length of S
    keep = min(n, t + 1)
    tmpl = np.full(t + 1, specials["pad"], dtype=np.int64)
    fidx = np.full(t + 1, -1, dtype=np.int64)
    tmpl[0] = start
    body = min(f * hw, keep - 1)  # frame tokens that fit
    fidx[1 : 1 + body] = np.repeat(np.arange(f, dtype=np.int64), hw)[:body]
    if keep == n:
        tmpl[n - 1] = specials["eos"]
    tgt = tmpl[1:].copy()
    if keep < t + 1:
        tgt[keep - 1 :] = IGNORE_INDEX
    return {"body": body, "inputs": tmpl[:t], "targets": tgt, "frame_index": fidx[:t], "target_frame_index": fidx[1:]}


def assemble_into(out: dict[str, np.ndarray], rows: np.ndarray | slice, frames: np.ndarray, lay: dict[str, Any],
                  starts: np.ndarray | None = None) -> None:
    """Write the sequences of ``frames`` (integer [m, F, HW]) into rows ``rows`` of ``out``'s
    int64 [B, T] arrays ``inputs``, ``targets``, ``frame_index`` (and ``target_frame_index`` if present).

    Every output value is written once: frame tokens straight from the gathered uint16 values,
    specials and padding from the layout's templates only where there are no frame tokens.
    ``starts`` (int64 [m]) overrides the start token per row (samples of both kinds sharing one
    layout, i.e. videos and image sequences with the same number of frames).
    """
    m = frames.shape[0]
    body = lay["body"]
    flat = frames.reshape(m, -1)  # (m, F*HW)
    t = out["inputs"].shape[1]
    nb = min(body, t - 1)  # frame tokens among the inputs (after the start token)
    inp, tgt = out["inputs"], out["targets"]
    if isinstance(rows, slice):
        inp[rows, 0] = lay["inputs"][0] if starts is None else starts
        inp[rows, 1 : 1 + nb] = flat[:, :nb]
        inp[rows, 1 + nb :] = lay["inputs"][1 + nb :]
        tgt[rows, :body] = flat[:, :body]
        tgt[rows, body:] = lay["targets"][body:]
    else:
        # Fancy row indices: fill the rows in one go from a full template (copies are unavoidable).
        seq = np.empty((m, t), dtype=np.int64)
        seq[:, 0] = lay["inputs"][0] if starts is None else starts
        seq[:, 1 : 1 + nb] = flat[:, :nb]
        seq[:, 1 + nb :] = lay["inputs"][1 + nb :]
        inp[rows] = seq
        seq[:, :body] = flat[:, :body]
        seq[:, body:] = lay["targets"][body:]
        tgt[rows] = seq
    for k in ("frame_index", "target_frame_index"):
        if k in out:  # target_frame_index is optional (derivable; the loader leaves it out)
            out[k][rows] = lay[k]


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
    lay = layout(f, hw, start=start, seq_len=seq_len, specials=specials)
    out = {k: np.empty((b, int(seq_len)), dtype=np.int64) for k in ("inputs", "targets", "frame_index", "target_frame_index")}
    assemble_into(out, slice(None), frames, lay)
    return out
