"""train-tokenizer: end to end on generated media, exact resume, report and outputs."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.tokenizers import load_tokenizer
from pipeline.tokenizers.train import TrainConfig, kl_weight, temperature, train_tokenizer


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """24 small PNGs (coloured squares on gradients) and one 12-frame MPEG-4 clip."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for i in range(24):
        yy, xx = np.mgrid[0:40, 0:40]
        img = np.stack([xx * 6, yy * 6, np.full_like(xx, 40 * (i % 6))], -1)
        x0, y0 = rng.integers(0, 24, 2)
        img[y0:y0 + 14, x0:x0 + 14] = rng.integers(0, 256, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"img{i:02d}.png")
    with av.open(str(root / "clip.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=12)
        s.width = s.height = 48
        s.pix_fmt = "yuv420p"
        for t in range(12):
            f = np.zeros((48, 48, 3), np.uint8)
            f[:, :, 0] = 20 * t
            f[10:30, 2 * t:2 * t + 16] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return root


def _cfg(media, out, **kw):
    base = dict(data=str(media), out=str(out), codebook=16, width=8, n_init=8, resolution=32, steps=6, batch=4,
                warmup=2, frame_stride=2, val_fraction=0.25, ckpt_every=2, lr=3e-3,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_schedules():
    cfg = TrainConfig(data="d", out="o", steps=100, anneal_frac=0.5, kl_ramp_frac=0.2, kl_weight=6.6)
    assert temperature(0, cfg) == pytest.approx(1.0)
    assert temperature(50, cfg) == pytest.approx(1 / 16) and temperature(99, cfg) == pytest.approx(1 / 16)
    assert 1 / 16 < temperature(25, cfg) < 1.0
    assert kl_weight(0, cfg) == 0.0 and kl_weight(10, cfg) == pytest.approx(3.3) and kl_weight(90, cfg) == 6.6
    with pytest.raises(ValueError, match="TrainConfig.resolution=30"):
        TrainConfig(data="d", out="o", resolution=30)


def test_train_resume_is_exact_and_writes_a_loadable_tokenizer(media, tmp_path):
    full = train_tokenizer(_cfg(media, tmp_path / "a"), progress=False)
    assert full is not None
    # Interrupted after 3 steps (checkpoint), then resumed: the same weights. Not asserted bit for
    # bit: oneDNN's CPU conv kernels now and then sum in another order (seen in repeated
    # uninterrupted runs too), a last-bit difference that resuming neither causes nor hides.
    assert train_tokenizer(_cfg(media, tmp_path / "b"), progress=False, exit_after_steps=3) is None
    assert not (tmp_path / "b" / "config.json").exists()
    resumed = train_tokenizer(_cfg(media, tmp_path / "b"), progress=False)
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert resumed["source"]["resumed_from_step"] == 3

    m = full["source"]["heldout"]
    assert set(m) >= {"psnr", "codebook_usage", "unigram_entropy_bits", "codes_used"}
    assert 0 < m["codebook_usage"] <= 1 and m["codes_used"] == round(m["codebook_usage"] * 16)
    assert 0 <= m["unigram_entropy_bits"] <= 4.0 and m["psnr"] > 5
    assert full["source"]["data"]["train_frames"] > 0 and full["source"]["data"]["val_frames"] > 0
    assert (tmp_path / "a" / "reconstructions.png").exists()
    png = Image.open(tmp_path / "a" / "reconstructions.png")
    assert png.size[1] == 2 * png.size[0] // min(8, full["source"]["data"]["val_frames"])
    tok = load_tokenizer(f"dvae:{tmp_path / 'a'}")
    assert (tok.vocab_size, tok.downsample, tok.resolution) == (16, 8, 32)
    assert tok.encode(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 4, 4)

    # Other settings on the same folder are refused rather than silently mixed.
    with pytest.raises(ValueError, match="other settings"):
        train_tokenizer(_cfg(media, tmp_path / "a", lr=1e-4), progress=False)


def test_cli(media, tmp_path):
    res = CliRunner().invoke(main, ["train-tokenizer", "--data", str(media), "--out", str(tmp_path / "t"),
                                    "--codebook", "16", "--width", "8", "--n-init", "8", "--resolution", "32",
                                    "--steps", "2", "--batch", "4", "--val-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    assert "held-out PSNR" in res.output and "codebook usage" in res.output
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["schema"] == "tokenizer_config" and cfg["kind"] == "dvae"
    assert "train-tokenizer" in cfg["source"]["command"]
