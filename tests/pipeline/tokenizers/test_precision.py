"""Precision is part of the tokenizer: the bf16 branch (the one CUDA runs by default) exercised on CPU
under torch.autocast("cpu"), the fp32 last step (dVAE logits, VQGAN distances), ties to the lowest
index, and the checks on precision names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.tokenizers import (
    DVAEArch,
    DVAEEncoder,
    VisualTokenizer,
    VQGANArch,
    load_tokenizer,
    make_config,
    save_tokenizer,
)
from pipeline.tokenizers.base import state_dict_of
from pipeline.tokenizers.dalle import Conv
from pipeline.tokenizers.numerics import check_precision, default_precision, numerics
from pipeline.tokenizers.vqgan import Quantizer


def _smooth_frames(n: int, size: int, seed: int = 1) -> np.ndarray:
    """Photo-like frames (correlated along rows): bf16 and fp32 codes differ on some positions."""
    walk = np.cumsum(np.random.default_rng(seed).normal(0, 8, (n, size, size, 3)), axis=2)
    return np.clip(walk + 128, 0, 255).astype(np.uint8)


@pytest.fixture()
def tiny_dvae(tmp_path):
    """An encoder-only dVAE (width 8, 64 codes) folder; `tie` makes code 5's logit row a copy of code 3's."""
    def make(tie: bool = False) -> str:
        torch.manual_seed(0)
        arch = DVAEArch(vocab_size=64, n_hid=8, n_blk_per_group=1, n_init=8)
        enc = DVAEEncoder(arch)
        if tie:
            with torch.no_grad():
                conv = enc.logits_conv
                conv.w[5] = conv.w[3]
                conv.b[5] = conv.b[3] = 10.0  # 3 and 5 are the best codes almost everywhere, and tie
        out = tmp_path / f"tiny-{tie}"
        save_tokenizer(str(out), make_config("dvae", "tiny", arch, resolution=32, has_decoder=False, source={}),
                       state_dict_of(enc, None, "dvae"))
        return f"dvae:{out}"
    return make


def _reference_bf16_codes(spec: str, frames: np.ndarray) -> np.ndarray:
    """Independent of VisualTokenizer.encode: the unfolded encoder's features under CPU bf16 autocast
    with plain conv2d (no oneDNN prepacking), then fp32 logits and torch's argmax."""
    tok = load_tokenizer(spec)
    enc = DVAEEncoder(DVAEArch(**tok.config["arch"]))
    from safetensors.torch import load_file

    sd = load_file(f"{spec.split(':', 1)[1]}/model.safetensors")
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
    enc.eval()
    for m in enc.modules():
        if isinstance(m, Conv):
            assert not m.cpu_prepack  # a fresh (unfolded) encoder never takes the oneDNN path
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() * (0.8 / 255) + 0.1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = enc.features(x)
    assert feats.dtype == torch.bfloat16
    conv = enc.logits_conv
    logits = F.conv2d(feats.float(), conv.w, conv.b)  # fp32
    return logits.argmax(1).numpy().astype(np.uint16)


def test_bf16_on_cpu_is_the_autocast_branch_with_an_fp32_argmax(tiny_dvae):
    spec = tiny_dvae()
    frames = _smooth_frames(8, 32)
    fp32 = load_tokenizer(spec)
    bf16 = load_tokenizer(spec).to("cpu", "bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    codes_bf16 = bf16.encode(frames)
    assert np.array_equal(codes_bf16, _reference_bf16_codes(spec, frames))
    codes_fp32 = fp32.encode(frames)
    agree = float((codes_bf16 == codes_fp32).mean())
    # bf16 really ran (the fp32-only oneDNN fast path would have given the fp32 codes), and is close.
    assert 0.95 < agree < 1.0, agree
    # Deterministic, and independent of how the frames are batched or passed.
    assert np.array_equal(bf16.encode(frames, batch_size=3), codes_bf16)
    assert np.array_equal(bf16.encode([frames[:2], frames[2:7], frames[7:]]), codes_bf16)


def test_the_gpu_feeding_path_on_cpu_gives_the_same_codes(tiny_dvae, monkeypatch):
    """CUDA's staged path (two staging buffers, fixed-shape forwards padded with black frames, a list
    of arrays split across batch boundaries) run on CPU: the codes of the plain path, at fp32 and bf16."""
    spec = tiny_dvae()
    frames = _smooth_frames(7, 32)
    parts = [frames[:1], frames[1:5], frames[5:]]
    plain = {p: load_tokenizer(spec).to("cpu", p).encode(frames) for p in ("fp32", "bf16")}
    monkeypatch.setattr(VisualTokenizer, "stage_on_cpu", True)
    for precision, want in plain.items():
        tok = load_tokenizer(spec).to("cpu", precision)
        assert np.array_equal(tok.encode(parts, batch_size=3), want), precision  # 3 + 3 + (1 + 2 padding)
        assert np.array_equal(tok.encode(torch.from_numpy(frames), batch_size=4), want), precision


def test_ties_go_to_the_lowest_code_at_every_precision(tiny_dvae):
    spec = tiny_dvae(tie=True)
    frames = _smooth_frames(4, 32)
    for precision in ("fp32", "bf16"):
        codes = load_tokenizer(spec).to("cpu", precision).encode(frames)
        assert (codes == 3).mean() > 0.5, precision  # the tied pair wins most positions...
        assert not (codes == 5).any(), precision  # ...and the lower index always takes the tie


def test_vqgan_distances_are_fp32_under_autocast():
    torch.manual_seed(0)
    q = Quantizer(512, 16)
    with torch.no_grad():  # a crowded codebook: many codes within bf16's resolution of the nearest
        q.embedding.weight.copy_(torch.randn(1, 16) * 4 + 0.05 * torch.randn(512, 16))
    z = q.embedding.weight[:1, :, None, None].detach() + 0.05 * torch.randn(2, 16, 8, 8)
    exact = q.codes(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.codes(z), exact)
        # What autocast would have done to the nearest-code matmul: different codes.
        zf, e = z.permute(0, 2, 3, 1).reshape(-1, 16), q.embedding.weight
        naive = torch.addmm((e * e).sum(1).neg(), zf, e.t(), beta=1.0, alpha=2.0).argmax(1).view(2, 8, 8)
    assert not torch.equal(naive, exact)


def test_vqgan_tokenizer_encodes_in_bf16(tmp_path):
    from pipeline.tokenizers import VQGAN

    torch.manual_seed(0)
    arch = VQGANArch(n_embed=64, embed_dim=8, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                     attn_resolutions=[], resolution=16)
    model = VQGAN(arch, with_decoder=False)
    save_tokenizer(str(tmp_path / "vq"), make_config("vqgan", "vq", arch, resolution=16, has_decoder=False, source={}),
                   state_dict_of(model, None, "vqgan"))
    frames = _smooth_frames(3, 16)
    fp32 = load_tokenizer(f"vqgan:{tmp_path / 'vq'}").encode(frames)
    tok = load_tokenizer(f"vqgan:{tmp_path / 'vq'}").to("cpu", "bf16")
    codes = tok.encode(frames)
    assert codes.shape == (3, 8, 8) and codes.dtype == np.uint16
    assert float((codes == fp32).mean()) > 0.9
    assert np.array_equal(tok.encode(frames, batch_size=1), codes)


def test_precision_names_and_devices():
    assert default_precision("cpu") == "fp32" and default_precision("cuda") == "bf16"
    assert check_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="tf32' needs a CUDA GPU"):
        check_precision("tf32", "cpu")
    with pytest.raises(ValueError, match="not one of"):
        check_precision("fp16", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            check_precision("bf16", "cuda")
    with numerics("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    with numerics("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    tok = load_tokenizer("demo")
    with pytest.raises(ValueError, match="tf32"):
        tok.to("cpu", "tf32")
    assert "precision=fp32" in repr(tok)
