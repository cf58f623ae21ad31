"""VisualTokenizer interface: shapes, dtypes, batching, ids, errors; the bundled demo tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.tokenizers import (
    DVAEArch,
    DVAEDecoder,
    DVAEEncoder,
    load_tokenizer,
    make_config,
    save_tokenizer,
)
from pipeline.tokenizers.base import state_dict_of


@pytest.fixture()
def small_dvae(tmp_path):
    """A tiny random dVAE folder (width 8, 64 codes) and its spec."""
    def make(seed: int = 0, decoder: bool = True, name: str = "small"):
        torch.manual_seed(seed)
        arch = DVAEArch(vocab_size=64, n_hid=8, n_blk_per_group=1, n_init=8)
        enc, dec = DVAEEncoder(arch), (DVAEDecoder(arch) if decoder else None)
        out = tmp_path / f"{name}-{seed}-{decoder}"
        save_tokenizer(str(out), make_config("dvae", name, arch, resolution=32, has_decoder=decoder, source={}),
                       state_dict_of(enc, dec, "dvae"))
        return f"dvae:{out}", out
    return make


def _frames(n=5, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encode_decode_shapes_dtypes_and_batching(small_dvae):
    spec, _ = small_dvae()
    tok = load_tokenizer(spec)
    assert (tok.vocab_size, tok.downsample, tok.resolution) == (64, 8, 32)
    frames = _frames(5, 32)
    codes = tok.encode(frames)
    assert codes.dtype == np.uint16 and codes.shape == (5, 4, 4) and int(codes.max()) < 64
    # Batch boundaries and torch input give the same codes.
    assert np.array_equal(tok.encode(frames, batch_size=2), codes)
    assert np.array_equal(tok.encode(torch.from_numpy(frames)), codes)
    # Non-square frames: (H/8, W/8).
    assert tok.encode(_frames(2, 48)[:, :, :40]).shape == (2, 6, 5)
    # Codes equal the argmax of the encoder's logits.
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 0.8 + 0.1
    with torch.no_grad():
        assert np.array_equal(tok._encoder(x).argmax(1).numpy(), codes)
    out = tok.decode(codes)
    assert out.dtype == np.uint8 and out.shape == (5, 32, 32, 3)
    assert np.array_equal(tok.decode(codes, batch_size=3), out)
    assert tok.to("cpu") is tok


def test_bad_inputs_raise_value_error(small_dvae):
    tok = load_tokenizer(small_dvae()[0])
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        tok.encode(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="multiple of"):
        tok.encode(np.zeros((1, 30, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(np.full((1, 2, 2), 64))


def test_id_carries_weights_sha_and_changes_with_weights(small_dvae):
    spec_a, dir_a = small_dvae(seed=0)
    spec_b, _ = small_dvae(seed=1)
    a, a2, b = load_tokenizer(spec_a), load_tokenizer(spec_a), load_tokenizer(spec_b)
    cfg = json.loads((dir_a / "config.json").read_text())
    assert a.id == a2.id == f"dvae:small:{cfg['weights_sha256']}" and a.sha256 == cfg["weights_sha256"]
    assert a.id != b.id


def test_corrupt_weights_and_bad_specs(small_dvae):
    spec, d = small_dvae()
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_tokenizer(spec)
    with pytest.raises(ValueError, match="use the spec dvae:"):
        load_tokenizer("dalle:" + spec.split(":", 1)[1])
    for bad in ("nope", "dvae:", "clip:/x"):
        with pytest.raises(ValueError, match="tokenizer spec"):
            load_tokenizer(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(f"dvae:{d}-missing")


def test_encoder_only_has_no_decode(small_dvae):
    tok = load_tokenizer(small_dvae(decoder=False)[0])
    assert not tok.has_decoder and not hasattr(tok, "decode")
    with pytest.raises(AttributeError, match="no decoder"):
        tok.decode(np.zeros((1, 4, 4), np.uint16))


def _demo_frame() -> np.ndarray:
    """A deterministic 64 px frame: a bright disc on a gradient (demo-data-like content)."""
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([xx * 4, yy * 4, np.full_like(xx, 90)], -1).astype(np.float64)
    img[(yy - 30) ** 2 + (xx - 34) ** 2 < 150] = (250, 240, 40)
    return img.clip(0, 255).astype(np.uint8)[None]


def test_demo_tokenizer_is_bundled_and_deterministic():
    tok = load_tokenizer("demo")
    assert (tok.vocab_size, tok.downsample, tok.resolution, tok.kind) == (512, 8, 64, "dvae")
    assert tok.has_decoder and tok.id.startswith("dvae:demo:")
    frame = _demo_frame()
    codes = tok.encode(frame)
    assert codes.shape == (1, 8, 8) and codes.dtype == np.uint16
    assert np.array_equal(tok.encode(frame), codes)
    # The same tokens in a fresh process (no state carried between runs).
    prog = ("import numpy as np, sys; from pipeline.tokenizers import load_tokenizer; "
            "f = np.frombuffer(sys.stdin.buffer.read(), np.uint8).reshape(1, 64, 64, 3); "
            "print(load_tokenizer('demo').encode(f).flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", prog], input=frame.tobytes(), capture_output=True, check=True)
    assert json.loads(out.stdout) == codes.flatten().tolist()
    # Decoding carries the frame's layout: closer to it than its flat mean colour is.
    rec = tok.decode(codes).astype(np.float64)
    flat = np.broadcast_to(frame.reshape(-1, 3).mean(0), frame.shape)
    assert ((rec - frame) ** 2).mean() < ((flat - frame) ** 2).mean()
