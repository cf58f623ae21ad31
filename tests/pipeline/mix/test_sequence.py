"""Sequence layout: specials, cut/pad rules, frame indices."""

import numpy as np

from pipeline.mix.sequence import IGNORE_INDEX, assemble, make_specials, vocab_size_for

SP = make_specials(8192)


def _frames(b=2, f=3, hw=4):
    return (np.arange(b * f * hw).reshape(b, f, hw) % 8192).astype(np.uint16)


def test_specials_sit_above_the_codebook():
    assert SP == {"bos_video": 8192, "bos_image": 8193, "eos": 8194, "pad": 8195}
    assert vocab_size_for(8192) == 8196


def test_default_length_predicts_every_frame_token_and_drops_eos():
    fr = _frames()
    out = assemble(fr, start=SP["bos_video"], seq_len=12, specials=SP)
    assert out["inputs"].shape == (2, 12) and out["inputs"].dtype == np.int32
    assert out["inputs"][0].tolist() == [8192] + list(range(11))
    assert out["targets"][0].tolist() == list(range(12))
    assert out["frame_index"][0].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert out["target_frame_index"][0].tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_one_longer_makes_eos_a_target():
    out = assemble(_frames(), start=SP["bos_image"], seq_len=13, specials=SP)
    assert out["inputs"][1, 0] == SP["bos_image"]
    assert out["targets"][1, -1] == SP["eos"]
    assert out["target_frame_index"][1, -1] == -1


def test_short_samples_are_padded_and_ignored():
    out = assemble(_frames(), start=SP["bos_video"], seq_len=16, specials=SP)
    # S = bos + 12 + eos = 14 tokens; T+1 = 17 → 3 pads; inputs end with eos, pad, pad
    assert out["inputs"][0, 13:].tolist() == [SP["eos"], SP["pad"], SP["pad"]]
    assert out["targets"][0, 12] == SP["eos"]
    assert out["targets"][0, 13:].tolist() == [IGNORE_INDEX] * 3
    assert out["frame_index"][0, 13:].tolist() == [-1] * 3


def test_long_samples_are_cut():
    out = assemble(_frames(), start=SP["bos_video"], seq_len=5, specials=SP)
    assert out["inputs"][0].tolist() == [8192, 0, 1, 2, 3]
    assert out["targets"][0].tolist() == [0, 1, 2, 3, 4]


def test_paper_layout_4096():
    fr = np.zeros((1, 16, 256), dtype=np.uint16)
    out = assemble(fr, start=SP["bos_video"], seq_len=4096, specials=SP)
    assert out["inputs"].shape == (1, 4096)
    assert (out["targets"] != IGNORE_INDEX).all()
    assert out["frame_index"][0, 0] == -1 and out["frame_index"][0, -1] == 15
