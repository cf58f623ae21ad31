"""ImageNet probing augmentation on generated images: crop boxes, re-tokenized crops, a probe on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.evals.augment import ImageSource, augment_image, list_probe_images, random_resized_crop_box
from trainer.evals.probes import ProbeConfig
from trainer.evals.stream_probe import HeadSpec, train_heads


def test_crop_boxes_follow_scale_and_ratio():
    areas, flips = [], 0
    for s in range(300):
        rng = np.random.default_rng([7, s])
        x0, y0, x1, y1 = random_resized_crop_box(120, 80, rng)
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
        w, h = x1 - x0, y1 - y0
        areas.append(w * h / (120 * 80))
        assert 3 / 4 - 0.06 <= w / h <= 4 / 3 + 0.06  # rounding to whole pixels
    assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
    assert np.median(areas) < 0.7 and max(areas) > 0.8  # a spread of scales, not one size
    im = Image.fromarray(np.arange(80 * 120 * 3, dtype=np.uint8).reshape(80, 120, 3))
    for s in range(200):
        a = augment_image(im, np.random.default_rng([1, s]), 32)
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, augment_image(im, np.random.default_rng([1, s]), 32))  # reproducible
        rng = np.random.default_rng([1, s])
        random_resized_crop_box(120, 80, rng)
        flips += rng.random() < 0.5
    assert 70 <= flips <= 130
    # An image outside the ratio range falls back to the largest centred crop within it.
    assert random_resized_crop_box(400, 10, np.random.default_rng(0), scale=(0.99, 1.0)) == (193, 0, 206, 10)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """train/WNID/*.JPEG of 3 classes: red, green and blue scenes with noise, 72x96 px."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"n0000000{c}"
        d.mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 60, size=(72, 96, 3))
            a[..., c] += 180
            Image.fromarray(a.astype(np.uint8)).save(d / f"n0000000{c}_{i}.JPEG", quality=95)
    return str(root)


def test_probe_on_augmented_retokenized_images(imagenet_root, toy_backbone):
    from pipeline.tokenizers import load_tokenizer

    tok = load_tokenizer("demo")  # 64 px -> 8 x 8 codes

    def tokenize(frames):
        return np.asarray(tok.encode(frames))

    items = list_probe_images(imagenet_root, "imagenet", "train")
    assert len(items) == 24 and {it["label"] for it in items} == {"n00000000", "n00000001", "n00000002"}
    model = type(toy_backbone)(vocab=tok.vocab_size + 4, dim=8, n_layers=2)
    bos = tok.vocab_size + 1
    src = ImageSource(model, items, tokenize, bos=bos, layers=[2], resolution=64, seed=3)
    assert (src.n, src.tokens, src.dim) == (24, 64, 8)
    # Training crops change with the epoch and repeat for the same (epoch, sample); validation is the centre crop.
    assert not np.array_equal(src.frame(5, 0), src.frame(5, 1))
    np.testing.assert_array_equal(src.frame(5, 1), src.frame(5, 1))
    from pipeline.decode.image import resize_crop

    with Image.open(items[5]["uri"]) as im:
        np.testing.assert_array_equal(src.frame(5, -1), resize_crop(im.convert("RGB"), 64))
    # Features are the backbone's on [bos] + the crop's codes in raster order.
    codes = torch.from_numpy(tokenize(src.frame(5, 1)[None]).reshape(1, -1).astype(np.int64))
    want = model.features(codes, [2])[0]
    torch.testing.assert_close(src.features(np.array([5]), 1)[2], want.half().float())
    labels = sorted({it["label"] for it in items})
    y = torch.tensor([labels.index(it["label"]) for it in items])
    val = ImageSource(model, items, tokenize, bos=bos, layers=[2], resolution=64, augment=False)
    [(res, _)] = train_heads(src, y, val, y, [HeadSpec(2, "average")], labels,
                             ProbeConfig(epochs=4, batch_size=8, lr=3e-2, num_heads=2))
    assert res.top1 >= 90.0  # colour survives crops and flips
    assert math.isfinite(res.train_loss[-1]) and res.train_loss[-1] < res.train_loss[0]
