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
# Token ids of a sequence buffer (inputs and targets). int32 holds every vocabulary (codebooks of
# ≤ 65 536 codes plus the specials) and IGNORE_INDEX, and halves what the loader writes and copies
# per token against int64 (the widening of the uint16 shards is the loader's largest cost, and the
# batch crosses shared memory and PCIe at this width). Consumers that index with the ids take int32
# (`nn.Embedding`); cross-entropy widens its targets on the device (`.long()`), where that is free.
SEQ_DTYPE = np.int32


def make_specials(codebook_size: int) -> dict[str, int]:
    """Special token ids directly above the codebook: bos_video=C, bos_image=C+1, eos=C+2, pad=C+3."""
    if codebook_size < 2:
        raise ValueError(f"codebook_size={codebook_size}: must be ≥ 2")
    return {name: codebook_size + i for i, name in enumerate(SPECIAL_NAMES)}


def vocab_size_for(codebook_size: int) -> int:
    """Model vocabulary: the codebook plus the specials."""
    return codebook_size + len(SPECIAL_NAMES)


def layout(f: int, hw: int, *, start: int, seq_len: int, specials: dict[str, int]) -> dict[str, Any]:
    """The fixed part of a sequence of ``f`` frames: the template of S' (SEQ_DTYPE [T+1]), frame indices
    (int64).

    ``padded``: S is shorter than T+1, so targets on the padding must become ``IGNORE_INDEX``
    from target position ``keep - 1`` on.
    """
    t = int(seq_len)
    n = f * hw + 2  # length of S
    keep = min(n, t + 1)
    tmpl = np.full(t + 1, specials["pad"], dtype=SEQ_DTYPE)
    fidx = np.full(t + 1, -1, dtype=np.int64)
    tmpl[0] = start
    body = min(f * hw, keep - 1)  # frame tokens that fit
    fidx[1 : 1 + body] = np.repeat(np.arange(f, dtype=np.int64), hw)[:body]
    if keep == n:
        tmpl[n - 1] = specials["eos"]
    return {"body": body, "keep": keep, "padded": keep < t + 1, "sequence": tmpl,
            "frame_index": fidx[:t], "target_frame_index": fidx[1:]}


def assemble_into(seq: np.ndarray, rows: np.ndarray | slice, frames: np.ndarray, lay: dict[str, Any]) -> None:
    """Write S' of each sample of ``frames`` (integer [m, F, HW]) into rows ``rows`` of ``seq``
    (SEQ_DTYPE [B, T+1]); inputs and targets are then views of it (:func:`inputs_targets`).

    Every value is written once, frame tokens straight from the gathered (uint16) values, so the
    widening is the only pass over them.
    """
    m = frames.shape[0]
    body = lay["body"]
    seq[rows, 1 : 1 + body] = frames.reshape(m, -1)[:, :body]
    write_specials(seq, rows, lay)


def write_specials(seq: np.ndarray, rows: np.ndarray | slice, lay: dict[str, Any]) -> None:
    """The non-frame part of S' (start token; eos and padding after the body) into rows ``rows``."""
    tmpl = lay["sequence"]
    body = lay["body"]
    seq[rows, 0] = tmpl[0]
    if 1 + body < seq.shape[1]:
        seq[rows, 1 + body :] = tmpl[1 + body :]


def inputs_targets(seq: np.ndarray, padded: list[tuple[np.ndarray | slice, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``inputs`` = ``seq[:, :T]`` and ``targets`` = ``seq[:, 1:]``, both SEQ_DTYPE [B, T] views of one
    buffer (4 bytes written per token instead of 8), except when some rows are padded
    (``padded``: (rows, keep) per padded layout): then targets is a copy with ``IGNORE_INDEX``
    from position ``keep - 1`` on in those rows."""
    inputs, targets = seq[:, :-1], seq[:, 1:]
    if padded:
        targets = targets.copy()
        for rows, keep in padded:
            targets[rows, keep - 1 :] = IGNORE_INDEX
    return inputs, targets


def assemble(
    frames: np.ndarray, *, start: int, seq_len: int, specials: dict[str, int]
) -> dict[str, np.ndarray]:
    """Sequences for a batch of samples of one kind.

    ``frames``: integer tokens ``[B, F, HW]`` (raster order inside each frame). Returns
    ``inputs``, ``targets`` (SEQ_DTYPE) and ``frame_index``, ``target_frame_index`` (int64), each ``[B, seq_len]``
    (``inputs``/``targets`` may be views of one buffer, the frame indices broadcast views).
    """
    if frames.ndim != 3:
        raise ValueError(f"frames must be [B, F, HW], got shape {frames.shape}")
    b, f, hw = frames.shape
    lay = layout(f, hw, start=start, seq_len=seq_len, specials=specials)
    seq = np.empty((b, int(seq_len) + 1), dtype=SEQ_DTYPE)
    assemble_into(seq, slice(None), frames, lay)
    inputs, targets = inputs_targets(seq, [(slice(None), lay["keep"])] if lay["padded"] else [])
    return {"inputs": inputs, "targets": targets,
            "frame_index": np.broadcast_to(lay["frame_index"], (b, int(seq_len))),
            "target_frame_index": np.broadcast_to(lay["target_frame_index"], (b, int(seq_len)))}
