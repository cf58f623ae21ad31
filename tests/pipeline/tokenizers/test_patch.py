"""The patch tokenizer: frames -> P x P pixel patches at the token grid, exactly and invertibly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.jobs.steps import token_grid, tokenizer_info
from pipeline.tokenizers import load_tokenizer
from pipeline.tokenizers.patch import PatchTokenizer, patchify, unpatchify


def test_encode_lays_out_each_patch_in_raster_order_and_decode_inverts_it():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    tok = load_tokenizer("patch:8")
    assert isinstance(tok, PatchTokenizer) and tok.values_per_token == 192 and tok.downsample == 8
    codes = tok.encode([frames[:1], frames[1:]])  # a list is taken as its concatenation, like VisualTokenizer
    assert codes.dtype == np.uint16 and codes.shape == (3, 2, 3 * 192)
    # Patch (i, j) of frame n is the frame's crop [8i:8i+8, 8j:8j+8], row by row, RGB interleaved.
    cells = codes.reshape(3, 2, 3, 192)
    for n, i, j in ((0, 0, 0), (1, 1, 2), (2, 0, 1)):
        np.testing.assert_array_equal(cells[n, i, j], frames[n, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].reshape(-1))
    np.testing.assert_array_equal(tok.decode(codes), frames)
    np.testing.assert_array_equal(unpatchify(patchify(frames, 4), 4), frames)
    assert tok.grid(16, 24) == (2, 3 * 192)


def test_identity_and_job_info_name_the_layout_and_values_per_token():
    a, b = PatchTokenizer(8), PatchTokenizer(16)
    assert a.id.startswith("patch:P8:") and a.id != b.id and a.sha256 == PatchTokenizer(8).sha256
    info = tokenizer_info(a.to("cuda", "bf16"), "bf16")  # a copy: no precision applies, whatever the job says
    assert info["values_per_token"] == 192 and info["precision"] == "fp32" and info["vocab_size"] == 256
    assert token_grid(info, 128) == (16, 16 * 192)
    assert token_grid({"downsample": 8}, 128) == (16, 16)  # a code tokenizer: one value per cell


def test_bad_input_is_refused_with_the_fix():
    tok = PatchTokenizer(8)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        tok.encode(np.zeros((1, 12, 16, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((1, 16, 16, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="patch size 7 is not supported"):
        load_tokenizer("patch:7")
    with pytest.raises(ValueError, match="e.g. patch:8"):
        load_tokenizer("patch:x")
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode(np.full((1, 1, 192), 300, dtype=np.uint16))
