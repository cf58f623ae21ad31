"""The bf16-screened argmax of the dVAE's logit layer must equal the plain fp32 argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tokenizers import base
from pipeline.tokenizers.argmax import ScreenedArgmax


def _full(r, w, b):
    return torch.addmm(b, r, w.t()).argmax(1)


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 1e-3), (2, 50.0)])
def test_screened_argmax_equals_the_fp32_argmax(seed, scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1000, 256, generator=g) * scale / 16
    b = torch.randn(1000, generator=g) * scale * 0.1
    r = torch.relu(torch.randn(300, 256, generator=g))
    sa = ScreenedArgmax(w, b)
    assert torch.equal(sa(r), _full(r, w, b))
    assert 1 <= sa.last_candidates < 20  # the screen keeps a few codes per position, not all


def test_near_ties_are_resolved_in_fp32_and_exact_ties_by_the_lowest_index():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g)
    r = torch.relu(torch.randn(50, 32, generator=g))
    # codes 7 and 40 differ by ~1e-3 on logits near 100: far below bf16's resolution there (0.5),
    # far above fp32 rounding (~1e-5), so only the fp32 recomputation can order them
    w[40] = w[7] * (1 + 2**-12)
    b = torch.zeros(64)
    b[7] = b[40] = 100.0  # make them the winners
    sa = ScreenedArgmax(w, b)
    assert torch.equal(sa(r), _full(r, w, b))
    # all-zero features and equal biases: every code ties; torch.argmax answers 0
    z = torch.zeros(5, 32)
    assert ScreenedArgmax(w, torch.zeros(64))(z).tolist() == [0] * 5
    # exact tie between two codes: the lower index wins
    w2, b2 = w.clone(), torch.zeros(64)
    w2[12] = w2[30] = torch.ones(32) * 5
    assert ScreenedArgmax(w2, b2)(torch.ones(3, 32)).tolist() == [12] * 3


def test_positions_with_many_candidates_fall_back_to_a_full_row():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(500, 64, generator=g), torch.randn(500, generator=g)
    r = torch.relu(torch.randn(40, 64, generator=g))
    sa = ScreenedArgmax(w, b)
    sa.MAX_CANDIDATES = 0  # every position takes the full fp32 row
    assert torch.equal(sa(r), _full(r, w, b))
    sa.MAX_CANDIDATES = 2  # a mix of both paths
    assert torch.equal(sa(r), _full(r, w, b))


def test_tokenizer_codes_are_the_same_with_and_without_the_screen(tmp_path, monkeypatch):
    dall_e = pytest.importorskip("dall_e")
    from pipeline.tokenizers import load_tokenizer
    from pipeline.tokenizers.convert import convert_dalle

    torch.manual_seed(0)
    torch.save(dall_e.Encoder(n_hid=32, vocab_size=512), tmp_path / "enc.pkl")
    convert_dalle(str(tmp_path / "enc.pkl"), str(tmp_path / "tok"))
    frames = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    codes = {}
    for screen in (False, True):
        monkeypatch.setattr(base, "_BF16_SCREEN", screen)
        codes[screen] = load_tokenizer(f"dalle:{tmp_path / 'tok'}").encode(frames)
    assert codes[True].shape == (3, 8, 8) and np.array_equal(codes[True], codes[False])
