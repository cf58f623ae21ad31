"""OpenAI dVAE conversion: parity with the `dall-e` package, legacy/zip pickles, malicious pickles."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

dall_e = pytest.importorskip("dall_e")  # installed with --no-deps by the Makefile (dev environment)

from pipeline.cli import main  # noqa: E402
from pipeline.tokenizers import load_tokenizer  # noqa: E402
from pipeline.tokenizers.convert import convert_dalle  # noqa: E402
from pipeline.tokenizers.unpickle import UnsafePickleError  # noqa: E402


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _ref_logits(enc, frames: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return enc(dall_e.map_pixels(x))


def test_full_size_encoder_parity_with_reference(tmp_path):
    # OpenAI's architecture (n_hid 256, 8192 codes) at random weights, saved exactly as their files were.
    torch.manual_seed(0)
    ref = dall_e.Encoder()
    torch.save(ref, tmp_path / "encoder.pkl")
    cfg = convert_dalle(str(tmp_path / "encoder.pkl"), str(tmp_path / "tok"))
    assert (cfg["vocab_size"], cfg["downsample"], cfg["arch"]["n_hid"], cfg["has_decoder"]) == (8192, 8, 256, False)
    tok = load_tokenizer(f"dalle:{tmp_path / 'tok'}")
    frames = _images(2, 48)
    want = _ref_logits(ref, frames)  # (2, 8192, 6, 6)
    with torch.inference_mode():
        got = tok._encoder(tok._pixels(torch.from_numpy(frames)))
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-4
    codes = tok.encode(frames)
    assert codes.dtype == np.uint16 and codes.shape == (2, 6, 6)
    assert (codes == want.argmax(1).numpy()).mean() >= 0.999
    assert not hasattr(tok, "decode")


@pytest.mark.parametrize("legacy", [False, True])
def test_small_encoder_and_decoder_round_trip(tmp_path, legacy):
    torch.manual_seed(1)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_hid=64, n_blk_per_group=1, n_init=32, vocab_size=512)
    torch.save(enc, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=not legacy)
    torch.save(dec, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=not legacy)
    res = CliRunner().invoke(main, ["convert-tokenizer", "--from", "dalle", str(tmp_path / "encoder.pkl"),
                                    "--decoder", str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "tok")])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith(f"dalle:{tmp_path / 'tok'}")
    tok = load_tokenizer(f"dalle:{tmp_path / 'tok'}")
    assert tok.has_decoder and tok.vocab_size == 512
    frames = _images(3, 32, seed=2)
    codes = tok.encode(frames)
    assert np.array_equal(codes, _ref_logits(enc, frames).argmax(1).numpy())
    # Decoder: ours from integer codes vs the reference on the one-hot.
    onehot = torch.nn.functional.one_hot(torch.from_numpy(codes.astype(np.int64)), 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        want = dall_e.unmap_pixels(torch.sigmoid(dec(onehot)[:, :3]))
    want_u8 = (want * 255).round().permute(0, 2, 3, 1).numpy()
    got = tok.decode(codes)
    assert got.dtype == np.uint8 and got.shape == (3, 32, 32, 3)
    assert np.abs(got.astype(np.float64) - want_u8).max() <= 1.0


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip", "torch-legacy", "inside-module"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    if container == "raw-pickle":
        path.write_bytes(pickle.dumps(_Evil(str(marker))))
    elif container == "torch-zip":
        torch.save({"w": torch.zeros(2), "x": _Evil(str(marker))}, path)
    elif container == "torch-legacy":
        torch.save(_Evil(str(marker)), path, _use_new_zipfile_serialization=False)
    else:
        enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
        enc.payload = _Evil(str(marker))  # a real module carrying a payload among its attributes
        torch.save(enc, path)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="system"):
        convert_dalle(str(path), str(tmp_path / "tok"))
    res = CliRunner().invoke(main, ["convert-tokenizer", "--from", "dalle", str(path), "--out", str(tmp_path / "t2")])
    assert res.exit_code != 0 and "refusing" in res.output and "nothing was executed" in res.output
    assert not marker.exists()
    assert not (tmp_path / "tok").exists() and not (tmp_path / "t2" / "config.json").exists()


def test_wrong_module_is_refused(tmp_path):
    dec = dall_e.Decoder(n_hid=64, n_blk_per_group=1, n_init=32, vocab_size=512)
    torch.save(dec, tmp_path / "decoder.pkl")
    with pytest.raises(ValueError, match="expected a pickled dall_e.encoder.Encoder"):
        convert_dalle(str(tmp_path / "decoder.pkl"), str(tmp_path / "tok"))
