"""taming VQGAN conversion: code parity with taming's Encoder + VectorQuantizer, Lightning metadata."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

pytest.importorskip("taming")
from taming.modules.diffusionmodules.model import Decoder, Encoder  # noqa: E402
from taming.modules.vqvae.quantize import VectorQuantizer  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.tokenizers import load_tokenizer  # noqa: E402
from pipeline.tokenizers.convert import convert_taming  # noqa: E402
from pipeline.tokenizers.unpickle import UnsafePickleError  # noqa: E402


def _make_taming(tmp_path, n_embed: int, seed: int = 0, extra: dict | None = None):
    torch.manual_seed(seed)
    # Small widths, the released models' structure: f16 (5 levels), attention at 16 px, z = embed = 32.
    dd = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
              ch_mult=[1, 1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    enc, dec = Encoder(**dd).eval(), Decoder(**dd).eval()
    q = VectorQuantizer(n_embed, 32, 0.25)
    q.embedding.weight.data.normal_(std=0.1)  # taming inits ±1/n; spread codes out so many are in play
    qc, pqc = torch.nn.Conv2d(32, 32, 1), torch.nn.Conv2d(32, 32, 1)
    sd = {}
    for pre, m in [("encoder.", enc), ("decoder.", dec), ("quantize.", q), ("quant_conv.", qc), ("post_quant_conv.", pqc)]:
        sd.update({pre + k: v for k, v in m.state_dict().items()})
    sd["loss.discriminator.main.0.weight"] = torch.zeros(4)  # GAN-loss weights are dropped
    ckpt = {"state_dict": sd, "global_step": 7, "epoch": 1, **(extra or {})}
    torch.save(ckpt, tmp_path / "last.ckpt")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": {
        "target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 32, "n_embed": n_embed, "ddconfig": dd}}}))
    return enc, q, qc, dec, pqc


@pytest.mark.parametrize("n_embed", [1024, 16384])
def test_codes_match_taming(tmp_path, n_embed):
    enc, q, qc, dec, pqc = _make_taming(tmp_path, n_embed)
    cfg = convert_taming(str(tmp_path / "last.ckpt"), str(tmp_path / "model.yaml"), str(tmp_path / "tok"))
    assert (cfg["vocab_size"], cfg["downsample"], cfg["kind"]) == (n_embed, 16, "vqgan")
    tok = load_tokenizer(f"vqgan:{tmp_path / 'tok'}")
    frames = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        zq, _, (_, _, idx) = q(qc(enc(x)))
        ref = idx.view(4, 4, 4).numpy()
        rec = ((dec(pqc(zq)).clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    codes = tok.encode(frames)
    assert codes.dtype == np.uint16 and codes.shape == (4, 4, 4)
    assert (codes == ref).mean() >= 0.999
    assert len(np.unique(ref)) > 4  # the comparison is not trivially one code
    out = tok.decode(codes)
    assert out.shape == (4, 64, 64, 3) and np.abs(out - rec).max() <= 1.0


def test_lightning_metadata_is_inert_and_other_globals_refused(tmp_path, monkeypatch):
    # A checkpoint whose callbacks dict is keyed by a Lightning class (as real taming checkpoints are),
    # made without Lightning installed: the class exists only while saving.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    _make_taming(tmp_path, 1024, extra={"callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(1.0)}}})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    res = CliRunner().invoke(main, ["convert-tokenizer", "--from", "taming", str(tmp_path / "last.ckpt"),
                                    "--config", str(tmp_path / "model.yaml"), "--out", str(tmp_path / "tok"),
                                    "--no-decoder"])
    assert res.exit_code == 0, res.output
    tok = load_tokenizer(f"vqgan:{tmp_path / 'tok'}")
    assert tok.vocab_size == 1024 and not tok.has_decoder

    import subprocess
    torch.save({"state_dict": {}, "x": subprocess.Popen}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafePickleError, match="subprocess.Popen"):
        convert_taming(str(tmp_path / "evil.ckpt"), str(tmp_path / "model.yaml"), str(tmp_path / "t2"))


def test_yaml_errors(tmp_path):
    _make_taming(tmp_path, 1024)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.GumbelVQ",
                                                                 "params": {"ddconfig": {}}}}))
    with pytest.raises(ValueError, match="not supported"):
        convert_taming(str(tmp_path / "last.ckpt"), str(tmp_path / "bad.yaml"), str(tmp_path / "tok"))
    res = CliRunner().invoke(main, ["convert-tokenizer", "--from", "taming", str(tmp_path / "last.ckpt"),
                                    "--out", str(tmp_path / "tok")])
    assert res.exit_code != 0 and "--config" in res.output
