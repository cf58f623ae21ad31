import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.evals.davis import list_sequences, load_sequence, model_patch_features, track_sequences
from trainer.evals.propagation import PropagationConfig, downsample_labels, labels_to_onehot, propagate

PALETTE = [0, 0, 0, 200, 0, 0, 0, 200, 0] + [0, 0, 0] * 253


def _write_davis(root, name, frames, masks):
    img_dir = os.path.join(root, "JPEGImages", "480p", name)
    ann_dir = os.path.join(root, "Annotations", "480p", name)
    os.makedirs(img_dir)
    os.makedirs(ann_dir)
    for t, (f, m) in enumerate(zip(frames, masks, strict=True)):
        Image.fromarray(f).save(os.path.join(img_dir, f"{t:05d}.png"))  # PNG: lossless frames for exact tests
        p = Image.fromarray(m, mode="P")
        p.putpalette(PALETTE)
        p.save(os.path.join(ann_dir, f"{t:05d}.png"))


def _moving_squares(n=6, size=64, step=8):
    """Object 1 (red) moves right by `step` px per frame; object 2 (green) is still."""
    frames = np.full((n, size, size, 3), 90, dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for t in range(n):
        x = 8 + step * t
        frames[t, 16:32, x : x + 16] = (230, 20, 20)
        masks[t, 16:32, x : x + 16] = 1
        frames[t, 40:56, 8:24] = (20, 230, 20)
        masks[t, 40:56, 8:24] = 2
    return frames, masks


def _colour_features(frames: np.ndarray) -> torch.Tensor:
    """Per 8x8 patch mean colour: (F, 64, 64, 3) -> (F, 8, 8, 3), centred so grey is not parallel to red."""
    f = torch.from_numpy(frames).float().reshape(frames.shape[0], 8, 8, 8, 8, 3).mean(dim=(2, 4))
    return f - 128.0


def test_static_video_with_positional_features_propagates_exactly():
    h = w = 6
    n = 5
    feats = torch.eye(h * w).reshape(1, h, w, h * w).repeat(n, 1, 1, 1)  # each patch unique, same in every frame
    ids = np.zeros((h, w), dtype=np.uint8)
    ids[1:3, 2:5] = 1
    ids[4, 0] = 2
    first = labels_to_onehot(ids, [1, 2])
    out = propagate(feats, first, PropagationConfig())
    assert out.shape == (n, 3, h, w)
    for t in range(n):
        torch.testing.assert_close(out[t], first, atol=1e-6, rtol=0)


def test_radius_limits_the_context():
    # Frame 1 looks like frame 0 mirrored: the matching patch is far away, so a small radius cannot reach it.
    feats = torch.zeros(2, 1, 8, 8)
    feats[0, 0, :, :] = torch.eye(8)
    feats[1, 0, :, :] = torch.eye(8).flip(0)
    first = torch.zeros(2, 1, 8)
    first[1, 0, 0] = 1.0  # the object is patch x=0
    first[0, 0, 1:] = 1.0
    far = propagate(feats, first, PropagationConfig(radius=12))
    assert far[1, 1, 0, 7] == pytest.approx(1.0, abs=1e-6)  # found at the mirrored position
    near = propagate(feats, first, PropagationConfig(radius=1))
    assert near[1, 1, 0, 7] < 0.01


def test_downsample_labels_area_average():
    ids = np.zeros((16, 16), dtype=np.uint8)
    ids[:8, :4] = 1
    soft = downsample_labels(labels_to_onehot(ids, [1]), 2, 2)
    torch.testing.assert_close(soft[1], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(soft.sum(0), torch.ones(2, 2))


def test_track_synthetic_davis_sequences(tmp_path):
    root = str(tmp_path / "davis")
    frames, masks = _moving_squares()
    _write_davis(root, "squares", frames, masks)
    still = np.zeros_like(masks)
    still[:] = masks[0]
    _write_davis(root, "still", np.repeat(frames[:1], 6, axis=0), still)
    os.makedirs(os.path.join(root, "ImageSets", "2017"))
    with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
        f.write("squares\nstill\n")
    assert list_sequences(root) == ["squares", "still"]
    seqs = [load_sequence(root, n) for n in list_sequences(root)]
    assert seqs[0].object_ids == [1, 2] and seqs[0].frames.shape == (6, 64, 64, 3)
    doc = track_sequences(seqs, _colour_features, resolution=64)
    by = {(r["sequence"], r["object"]): r for r in doc["objects"]}
    # The still sequence is propagated losslessly at the 8x8 grid; what remains is the bilinear
    # upsampling of grid labels to pixels, which rounds each 16x16 square's corners: 6 pixels per
    # corner fall below 0.5 (e.g. 0.5625² at the corner pixel), so J = (256 - 24) / 256.
    assert by[("still", 1)]["J"] == pytest.approx(232 / 256)
    assert by[("still", 2)]["J"] == pytest.approx(232 / 256)
    f_still = by[("still", 1)]["F"]
    assert 0.85 < f_still < 1.0  # the rounded corners leave the 1 px boundary tolerance in places
    # The moving square is followed by colour exactly as well as the still one.
    for obj in (1, 2):
        assert by[("squares", obj)]["J"] == pytest.approx(232 / 256)
        assert by[("squares", obj)]["F"] == pytest.approx(f_still)
    assert doc["summary"]["JF_mean"] == pytest.approx((232 / 256 + f_still) / 2)
    assert doc["summary"]["objects"] == 4
    from schemas import validate

    validate(json.loads(json.dumps({"schema": "track_result", "version": 1, **doc})), "track_result")


def test_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="not a DAVIS-2017 root"):
        list_sequences(str(tmp_path))


class _Causal(torch.nn.Module):
    """Feature of a position = running mean of the token embeddings so far (a causal 'model')."""

    def __init__(self, max_seq_len):
        super().__init__()
        import types

        self.cfg = types.SimpleNamespace(max_seq_len=max_seq_len)
        self.emb = torch.nn.Parameter(torch.eye(16))

    def features(self, tokens, layers):
        e = self.emb[tokens]  # (B, T, 16)
        mean = e.cumsum(1) / torch.arange(1, tokens.shape[1] + 1)[None, :, None]
        return [mean for _ in layers]


def test_model_patch_features_windows_cover_every_frame():
    tokens = np.arange(10 * 4).reshape(10, 2, 2) % 15
    model = _Causal(max_seq_len=1 + 4 * 4)  # room for 4 frames per window
    feats = model_patch_features(model, tokens, bos=15, layer=1)
    assert feats.shape == (10, 2, 2, 16)
    whole = _Causal(max_seq_len=1 + 10 * 4)
    ref = model_patch_features(whole, tokens, bos=15, layer=1)
    # The first window's frames see the same context in both.
    torch.testing.assert_close(feats[:4], ref[:4])
    assert not torch.allclose(feats[9], ref[9])  # later frames see a shorter, windowed context


def test_patch_features_run_the_backbone_under_the_evaluations_autocast(monkeypatch):
    """Tracking and STA features come from the one backbone pass of the probes
    (`backbone_features`): no grad, and torch.autocast (bf16, enabled on CUDA only) around it."""
    seen = []
    real = torch.autocast

    def spy(device_type, dtype=None, enabled=True, **kw):
        seen.append((device_type, dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, **kw)

    class Recording(_Causal):
        def features(self, tokens, layers):
            seen.append(("grad", torch.is_grad_enabled()))
            return super().features(tokens, layers)

    monkeypatch.setattr(torch, "autocast", spy)
    tokens = np.arange(3 * 4).reshape(3, 2, 2) % 15
    feats = model_patch_features(Recording(max_seq_len=1 + 3 * 4), tokens, bos=15, layer=1)
    assert seen == [("cpu", torch.bfloat16, False), ("grad", False)]
    e = Recording(max_seq_len=13).emb[torch.tensor([15, *range(12)])]  # the one window: [bos] + 3 frames
    want = (e.cumsum(0) / torch.arange(1, 14)[:, None])[1:].reshape(3, 2, 2, 16)
    torch.testing.assert_close(feats, want.detach())
