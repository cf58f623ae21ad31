"""The "patch" tokenizer: a frame's P x P pixel patches at the dVAE's token grid (the paper's Table 3).

`load_tokenizer("patch:8")` gives a tokenizer that the tokenize job runs like any other, so a pixel
dataset is written by the same job, writer, sidecars, manifest and resume contract as a token
dataset (docs/storage.md); run on the same input and settings as the dVAE job it has the same keys,
rows and frames, which is what `trainer.data.pixels` checks and relies on to pair them.

Layout of one frame (uint8 values stored as uint16, like codes): patch-major,
`[grid_h, grid_w, P, P, 3]` flattened, i.e. the row's grid is `(H/P, W/P * P*P*3)`: grid_h patch
rows, each holding its grid_w patches' `values_per_token = P*P*3` values back to back. The
tokenizer id carries `values_per_token`, so readers recover the patch grid `(H/P, W/P)`.
Encoding is an exact copy (no numerics): the recorded precision is always fp32.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["PatchTokenizer", "patchify", "unpatchify", "PATCH_SIZES"]

PATCH_SIZES = (4, 8, 16, 32)
# Bumped if the layout above ever changes: it is part of the id, so old and new shards never mix.
_LAYOUT = "toto-patch-tokenizer-v1:layout=gh,gw,p,p,3"


def patchify(frames: np.ndarray, p: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, H/p, W/p, p*p*3): each patch's pixels in (row, column, channel) order."""
    n, h, w, c = frames.shape
    x = frames.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (N, gh, gw, p, p, 3)
    return x.reshape(n, h // p, w // p, p * p * c)


def unpatchify(patches: np.ndarray, p: int) -> np.ndarray:
    """(N, gh, gw, p*p*3) -> (N, gh*p, gw*p, 3): the inverse of patchify."""
    n, gh, gw, _ = patches.shape
    x = patches.reshape(n, gh, gw, p, p, 3).transpose(0, 1, 3, 2, 4, 5)  # (N, gh, p, gw, p, 3)
    return x.reshape(n, gh * p, gw * p, 3)


class PatchTokenizer:
    """Frames -> their P x P patches (uint16 (N, H/P, W/P * P*P*3)); `decode` inverts it exactly."""

    kind = "patch"
    vocab_size = 256  # pixel values
    has_decoder = True

    def __init__(self, patch: int) -> None:
        if patch not in PATCH_SIZES:
            raise ValueError(f"patch size {patch!r} is not supported; use one of {PATCH_SIZES} (tokenizer spec patch:8)")
        self.patch = self.downsample = int(patch)
        self.values_per_token = 3 * patch * patch
        self.name = f"P{patch}"
        # No weights: the sha256 names the layout and patch size, so the sidecars and the mix's
        # "same tokenizer" checks still identify exactly what made the shards.
        self.sha256 = hashlib.sha256(f"{_LAYOUT}:patch={patch}".encode()).hexdigest()
        self.id = f"patch:{self.name}:{self.sha256}"
        self.precision = "fp32"
        self.batch_size = 64

    def __repr__(self) -> str:
        return f"PatchTokenizer({self.id}, {self.patch}x{self.patch}, {self.values_per_token} values per patch)"

    def to(self, device=None, precision: str | None = None) -> PatchTokenizer:
        """A no-op (a copy needs no device, and no precision applies): the job's actors call it."""
        return self

    def forward_frames(self, batch_size: int | None = None) -> int:
        return int(batch_size or self.batch_size)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """The stored (grid_h, grid_w) of an H x W frame."""
        return h // self.patch, (w // self.patch) * self.values_per_token

    def encode(self, frames, batch_size: int | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) numpy/torch, or a list of them (concatenated) -> uint16 (N, H/P, W/P*P*P*3)."""
        parts = list(frames) if isinstance(frames, (list, tuple)) else [frames]
        arrs = [np.asarray(p.cpu().numpy() if hasattr(p, "cpu") else p) for p in parts]
        if not arrs:
            raise ValueError("frames is an empty list; pass at least one uint8 [N, H, W, 3] array")
        for a in arrs:
            if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
                raise ValueError(f"frames must be uint8 [N, H, W, 3] RGB, got {a.dtype} {a.shape}; decode frames with "
                                 "pipeline.decode (RGB uint8) first")
        h, w = arrs[0].shape[1:3]
        if any(a.shape[1:] != arrs[0].shape[1:] for a in arrs):
            raise ValueError(f"frames of one call must share one size; got {sorted({a.shape[1:] for a in arrs})}")
        if h % self.patch or w % self.patch:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {self.patch}; choose a "
                             "resolution that is (the dVAE's /8 grid needs one anyway)")
        x = np.concatenate(arrs) if len(arrs) > 1 else arrs[0]
        gh, gw = self.grid(h, w)
        return patchify(x, self.patch).reshape(len(x), gh, gw).astype(np.uint16)

    def decode(self, codes: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """uint16 (N, gh, gw*P*P*3) as encode writes it -> uint8 (N, gh*P, gw*P, 3)."""
        c = np.asarray(codes)
        if c.ndim != 3 or c.shape[2] % self.values_per_token:
            raise ValueError(f"patch codes must be [N, gh, gw*{self.values_per_token}], got shape {c.shape}")
        if c.size and int(c.max()) > 255:
            raise ValueError(f"patch codes are pixel values in [0, 255], got a maximum of {int(c.max())}")
        n, gh, gwv = c.shape
        return unpatchify(c.astype(np.uint8).reshape(n, gh, gwv // self.values_per_token, -1), self.patch)


def load_patch_tokenizer(spec: str) -> PatchTokenizer:
    """`patch:8` (or patch:16, ...) -> PatchTokenizer(8)."""
    _, _, p = spec.partition(":")
    try:
        size = int(p)
    except ValueError:
        raise ValueError(f"tokenizer spec {spec!r}: give the patch size in pixels, e.g. patch:8") from None
    return PatchTokenizer(size)
