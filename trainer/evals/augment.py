"""ImageNet probing augmentation: random resized crop + horizontal flip of the raw images,
re-tokenized every epoch with the checkpoint's own tokenizer (MAE's and AIM's probing recipe).

Why re-tokenize rather than a pre-tokenized crop set: a crop set of K crops per image fixes the
augmentations to K (K x the token storage, and epochs beyond K repeat crops), while the
paper's recipe draws a fresh crop every epoch. The cost of re-tokenizing is one tokenizer encoder
pass per image per epoch, small next to the backbone's pass (a dVAE encoder is a few conv layers;
the backbone is a transformer over 257 tokens), and it runs batched on the same device.

The crop of sample i in epoch e is drawn from a generator seeded by (seed, e, i): independent of
batch composition and rank, so resumed and data-parallel runs see the same crops. Validation
(epoch -1) uses the pipeline's own short-side resize + centre crop, as the token datasets do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.evals.features import backbone_features

__all__ = ["random_resized_crop_box", "augment_image", "ImageSource", "list_probe_images"]


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop with area in ``scale`` x the image and aspect ratio
    (w/h) log-uniform in ``ratio``; ten tries, then the largest centred crop within ``ratio``."""
    area = w * h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(lo, hi))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    ar = w / h
    if ar < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif ar > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def augment_image(im: Image.Image, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """Random resized crop to resolution x resolution (bicubic) and a flip with probability 1/2 -> uint8 (R, R, 3)."""
    box = random_resized_crop_box(im.size[0], im.size[1], rng)
    out = np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


def list_probe_images(root: str, layout: str, split: str | None, storage_options: dict | None = None) -> list[dict]:
    """Labelled image items of a raw dataset (`pipeline.sources.adapters`: imagenet, folder), sorted by key."""
    from pipeline.sources.adapters import list_items

    items, _ = list_items(layout, root, storage_options=storage_options)
    keep = [it for it in items if it["kind"] == "image" and it["label"] is not None
            and (split is None or it["split"] == split)]
    if not keep:
        raise ValueError(f"{root} ({layout} layout, split {split or 'all'}) has no labelled images; "
                         "pass the raw image root the token dataset was made from")
    return keep


class ImageSource:
    """A feature source over raw images: decode, crop (augmented in training epochs), tokenize,
    run the backbone. Returns {layer: (b, P, D) float32} on the model's device, rounded to fp16 like
    the other sources."""

    def __init__(self, model, items: list[dict], tokenize: Callable[[np.ndarray], np.ndarray], *, bos: int,
                 layers: list[int], resolution: int, seed: int = 0, augment: bool = True, pool_tokens: int = 1,
                 storage_options: dict | None = None) -> None:
        self.model, self.items, self.tokenize, self.bos = model, items, tokenize, int(bos)
        self.layers, self.resolution, self.seed, self.augment = list(layers), int(resolution), int(seed), augment
        self.pool_tokens, self.storage_options = pool_tokens, storage_options
        self.n = len(items)
        # A patch-input model reads the crops' own P x P patches (trainer.patches.image_inputs), no tokenizer.
        self.patch = int(model.cfg.patch_size) if model.cfg.input == "patches" else None
        if self.patch is not None:
            if resolution % self.patch:
                raise ValueError(f"resolution {resolution} is not a multiple of the model's {self.patch} px patches")
            p = (resolution // self.patch) ** 2
        else:
            p = int(np.prod(np.asarray(tokenize(np.zeros((1, resolution, resolution, 3), np.uint8))).shape[1:]))
        if pool_tokens < 1 or p % pool_tokens:
            raise ValueError(f"pool_tokens={pool_tokens} must be >= 1 and divide the {p} visual tokens per image")
        self.tokens, self.dim = p // pool_tokens, int(model.cfg.dim)

    def frame(self, i: int, epoch: int) -> np.ndarray:
        """Sample i as the uint8 (R, R, 3) frame the tokenizer sees in ``epoch`` (-1: validation)."""
        from pipeline.decode.image import resize_crop, to_rgb
        from pipeline.decode.media_io import open_source

        src, closer = open_source(self.items[i], self.storage_options)
        try:
            with Image.open(src) as im:
                im.load()
                rgb = to_rgb(ImageOps.exif_transpose(im), (255, 255, 255))
        finally:
            if closer is not None:
                closer.close()
        if epoch < 0 or not self.augment:
            return resize_crop(rgb, self.resolution)
        return augment_image(rgb, np.random.default_rng([self.seed, epoch, i]), self.resolution)

    def features(self, idx: np.ndarray, epoch: int) -> dict[int, torch.Tensor]:
        frames = np.stack([self.frame(int(i), epoch) for i in idx])  # (b, R, R, 3)
        if self.patch is not None:
            from trainer.patches import image_inputs

            x = torch.from_numpy(image_inputs(frames, self.patch, self.bos))  # (b, 1+hw, 1+P*P*3)
            fi = torch.zeros(x.shape[:2], dtype=torch.int64)
            fi[:, 0] = -1
            feats = backbone_features(self.model, x, fi, self.layers, pool_tokens=self.pool_tokens)
            return {layer: f.to(torch.float16).float() for layer, f in feats.items()}
        codes = np.asarray(self.tokenize(frames)).reshape(len(idx), -1).astype(np.int64)  # (b, h·w) raster order
        tokens = torch.from_numpy(np.concatenate([np.full((len(idx), 1), self.bos), codes], axis=1))  # (b, 1+hw)
        fi = torch.zeros_like(tokens)
        fi[:, 0] = -1  # the start token is not a visual position
        feats = backbone_features(self.model, tokens, fi, self.layers, pool_tokens=self.pool_tokens)
        return {layer: f.to(torch.float16).float() for layer, f in feats.items()}
