import numpy as np
import pytest
import torch

from schemas import validate
from trainer.evals.position_loss import (
    per_position_loss,
    plot_position_loss,
    summarize_position_loss,
    target_frames,
    token_losses,
)


class _Oracle(torch.nn.Module):
    """Predicts the next token perfectly, except inside frame 0, where it is uniform."""

    def __init__(self, vocab, targets, first_frame_positions):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.targets, self.first = vocab, targets, first_frame_positions

    def forward(self, tokens):
        B, T = tokens.shape
        logits = torch.full((B, T, self.vocab), -1e4)
        logits.scatter_(2, self.targets.clamp(min=0)[..., None], 1e4)
        logits[:, self.first] = 0.0  # uniform: loss log(V)
        return logits + self.w


def test_loss_by_frame_and_first_frame_finding(tmp_path):
    vocab, hw, frames = 16, 4, 3
    # Sequence layout [bos, f0 x4, f1 x4, f2 x4] -> inputs 12 positions, targets = next tokens.
    seq = torch.randint(0, 12, (2, 1 + frames * hw))
    inputs, targets = seq[:, :-1], seq[:, 1:].clone()
    frame_index = torch.tensor([-1] + [f for f in range(frames) for _ in range(hw)])[:-1].expand(2, -1)
    targets[1, -1] = -100  # one padded target is ignored
    model = _Oracle(vocab, targets, first_frame_positions=slice(0, hw))  # positions predicting frame 0
    loss, tframe = per_position_loss(model, [{"inputs": inputs, "targets": targets, "frame_index": frame_index}])
    assert tframe.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    np.testing.assert_allclose(loss[:hw], np.log(vocab), rtol=1e-5)
    np.testing.assert_allclose(loss[hw:], 0.0, atol=1e-4)
    doc = summarize_position_loss(loss, tframe)
    validate(doc, "clip_loss")
    assert doc["first_frame"] == pytest.approx(np.log(vocab), rel=1e-5)
    assert doc["later_frames"] == pytest.approx(0.0, abs=1e-4)
    assert doc["first_frame_higher"] is True
    assert len(doc["per_frame"]) == 3
    assert plot_position_loss(doc, hw, str(tmp_path / "p.png")).endswith("p.png")


def test_needs_two_frames():
    with pytest.raises(ValueError, match="at least two frames"):
        summarize_position_loss(np.ones(4), np.zeros(4, dtype=np.int64))


def test_token_losses_and_target_frames():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    got = token_losses(logits, targets)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    lp = torch.log_softmax(logits.float(), dim=-1)
    for b, t in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]:
        assert got[b, t].item() == pytest.approx(-lp[b, t, targets[b, t]].item(), rel=1e-6)
    assert got[0, 2].item() == 0.0  # padding scores nothing
    fi = torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, -1, -1]])
    assert target_frames(fi).tolist() == [[0, 0, 1, 1, 1], [0, 1, -1, -1, -1]]
