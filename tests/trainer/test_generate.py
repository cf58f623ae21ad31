"""Generation: KV-cache sampling equals naive decoding; the requested number of frames comes out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer import checkpoint as ck
from trainer.generate import continue_frames, generate, sample_tokens, write_side_by_side
from trainer.model import ModelConfig, Transformer

CODES = 64
SPECIALS = {"bos_video": 64, "bos_image": 65, "eos": 66, "pad": 67}


class BlockTokenizer:
    """A transparent test tokenizer: each 8x8 block's mean grey level, quantised to 64 codes."""

    id = "test-block-64"
    vocab_size = CODES
    downsample = 8

    def encode(self, frames: np.ndarray) -> np.ndarray:
        f = np.asarray(frames, dtype=np.float64).mean(-1)  # (N, H, W)
        n, h, w = f.shape
        blocks = f.reshape(n, h // 8, 8, w // 8, 8).mean((2, 4))
        return np.clip(blocks / 4, 0, CODES - 1).astype(np.uint16)  # (N, h, w)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        g = (np.asarray(tokens, dtype=np.float64) * 4 + 2).astype(np.uint8)
        g = g.repeat(8, 1).repeat(8, 2)
        return np.repeat(g[..., None], 3, axis=-1)  # (N, H, W, 3)


def _model(max_seq_len=400):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=2, vocab_size=68, max_seq_len=max_seq_len, mlp_hidden=64)
    return Transformer(cfg).eval()


def test_cached_greedy_sampling_equals_naive_decoding():
    m = _model()
    prefix = torch.randint(0, CODES, (2, 7))
    got = sample_tokens(m, prefix, 12, temperature=0)
    seq = prefix.clone()
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 7:])
    # top_k=1 sampling is greedy too; sampling respects the codebook restriction.
    assert torch.equal(sample_tokens(m, prefix, 12, temperature=1.0, top_k=1), got)
    s = sample_tokens(m, prefix, 50, temperature=2.0, allowed=10, generator=torch.Generator().manual_seed(0))
    assert s.max().item() < 10
    with pytest.raises(ValueError, match="exceed the model's context"):
        sample_tokens(m, prefix, 400)


def test_continue_frames_gives_requested_frames():
    m = _model()
    meta = {"specials": SPECIALS, "codebook_size": CODES, "grid": [2, 2]}
    frames = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    res = continue_frames(m, meta, BlockTokenizer(), frames, 5, temperature=1.0, top_k=10, seed=1)
    assert res["prompt_tokens"].shape == (3, 2, 2) and res["new_tokens"].shape == (5, 2, 2)
    assert res["generated"].shape == (5, 16, 16, 3) and res["prompt_recon"].shape == (3, 16, 16, 3)
    assert res["new_tokens"].max() < CODES
    again = continue_frames(m, meta, BlockTokenizer(), frames, 5, temperature=1.0, top_k=10, seed=1)
    assert np.array_equal(again["new_tokens"], res["new_tokens"])  # seeded


def _write_video(path, n=12, size=64):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.zeros((size, size, 3), np.uint8)
            img[:, : 4 * (i + 1)] = 200  # a bar growing to the right
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _checkpoint(run, max_seq_len):
    m = _model(max_seq_len)
    w = ck.CheckpointWriter(run, 7)
    w.write_model(m.state_dict())
    return w.commit({
        "model_config": m.cfg.to_dict(), "train_config": {}, "scheduler": {"kind": "warmup_cosine", "step": 7},
        "loader_state": None, "world_size": 1, "specials": SPECIALS, "codebook_size": CODES, "grid": [8, 8],
        "stride": 2, "tokenizer": {"id": BlockTokenizer.id, "sha256": "0" * 64},
    })


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_generate_from_a_video_writes_the_requested_frames(tmp_path, ext):
    video = tmp_path / "clip.mp4"
    _write_video(video)
    _checkpoint(tmp_path / "run", max_seq_len=5 * 64 + 1)  # room for 2 prompt + 3 new frames of 8x8
    out = tmp_path / f"gen{ext}"
    s = generate(str(tmp_path / "run"), str(video), str(out), frames=3, tokenizer=BlockTokenizer(), top_k=5)
    assert s["prompt_frames"] == 2 and s["generated_frames"] == 3 and s["stride"] == 2
    assert len(s["new_tokens"]) == 3 and all(len(t) == 64 for t in s["new_tokens"])
    assert json.loads((tmp_path / f"gen{ext}.json").read_text())["generated_frames"] == 3
    import av

    with av.open(str(out)) as c:
        n = sum(1 for _ in c.decode(video=0))
        st = c.streams.video[0]
        assert (st.width, st.height) in ((64 * 2 + 2, 64), (130, 64))
    assert n == 5  # prompt + continuation, side by side with the real frames


def test_side_by_side_pads_missing_real_frames(tmp_path):
    model_frames = np.full((4, 8, 8, 3), 100, np.uint8)
    real = np.full((2, 8, 8, 3), 50, np.uint8)
    p = write_side_by_side(tmp_path / "x.gif", real, model_frames)
    from PIL import Image

    im = Image.open(p)
    assert im.n_frames == 4 and im.size == (18, 8)
    with pytest.raises(ValueError, match=r"\.gif or \.mp4"):
        write_side_by_side(tmp_path / "x.avi", real, model_frames)
