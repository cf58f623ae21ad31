import numpy as np
import pytest

from trainer.evals.jf import (
    VOID,
    boundary_f,
    boundary_map,
    region_j,
    sequence_scores,
    summarize,
    tolerance_px,
)


def _square(h, w, y, x, size):
    m = np.zeros((h, w), dtype=bool)
    m[y : y + size, x : x + size] = True
    return m


def test_perfect_prediction_scores_one():
    gt = np.zeros((5, 48, 64), dtype=np.uint8)
    for t in range(5):
        gt[t][_square(48, 64, 5 + t, 4 + 2 * t, 12)] = 1
        gt[t][_square(48, 64, 30, 40 - t, 10)] = 2
    scores = sequence_scores(gt.copy(), gt)
    assert set(scores) == {1, 2}
    for s in scores.values():
        assert s["J"] == 1.0 and s["F"] == 1.0
        assert len(s["J_frames"]) == 3  # first and last frames excluded, as in the DAVIS evaluation
    assert summarize({"seq": scores}) == {"J_mean": 1.0, "F_mean": 1.0, "JF_mean": 1.0, "objects": 2}


def test_known_shift_gives_known_j():
    # A 20x20 square shifted right by 5 px: overlap 20*15 = 300, union 2*400 - 300 = 500 -> J = 0.6.
    gt = _square(100, 100, 40, 40, 20)
    pred = _square(100, 100, 40, 45, 20)
    assert region_j(pred, gt) == pytest.approx(0.6)
    # Shifted down and right by 4: overlap 16*16, union 800 - 256.
    assert region_j(_square(100, 100, 44, 44, 20), gt) == pytest.approx(256 / 544)


def test_boundary_f_tolerance():
    gt = _square(100, 100, 30, 30, 40)
    # Tolerance = ceil(0.008 * diag(100, 100)) = ceil(1.13) = 2 px: a 1 px shift is within it ...
    assert boundary_f(_square(100, 100, 30, 31, 40), gt) == 1.0
    # ... a 10 px shift is not: the vertical edges are all missed, horizontal edges partly hit.
    far = boundary_f(_square(100, 100, 30, 40, 40), gt)
    assert 0.0 < far < 0.8
    assert boundary_f(np.zeros_like(gt), gt) == 0.0
    assert boundary_f(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    # Far-apart masks: no boundary pixel is matched.
    assert boundary_f(_square(100, 100, 0, 0, 10), _square(100, 100, 80, 80, 10)) == 0.0


def test_boundary_map_is_the_toolkits_seg2bmap():
    # A 4x4 square at rows/cols 2..5: its last row and column inside, the row above and the column to
    # the left of it outside (pixels whose E, S or SE neighbour differs) -> 4n = 16 pixels.
    want = np.zeros((10, 10), dtype=bool)
    want[1, 1:6] = True  # outer top row, from the SE-corner pixel (1, 1)
    want[2:6, 1] = True  # outer left column
    want[5, 2:6] = True  # inner bottom row
    want[2:6, 5] = True  # inner right column
    assert np.array_equal(boundary_map(_square(10, 10, 2, 2, 4)), want) and want.sum() == 16
    # One pixel: the 2x2 block ending at it.
    one = np.zeros((6, 6), dtype=bool)
    one[3, 3] = True
    assert sorted(zip(*np.nonzero(boundary_map(one)), strict=True)) == [(2, 2), (2, 3), (3, 2), (3, 3)]
    # No boundary along the image border: the whole image has none, the right half only its left edge.
    assert not boundary_map(np.ones((5, 7), dtype=bool)).any()
    half = np.zeros((5, 8), dtype=bool)
    half[:, 4:] = True
    b = boundary_map(half)
    assert b[:, 3].all() and b.sum() == 5
    # Mapped to twice the size: boundary pixel (y, x) -> (2y, 2x); a smaller or other-aspect size is refused.
    up = boundary_map(one, 12, 12)
    assert sorted(zip(*np.nonzero(up), strict=True)) == [(4, 4), (4, 6), (6, 4), (6, 6)]
    with pytest.raises(ValueError, match="aspect"):
        boundary_map(one, 6, 12)


def test_boundary_f_matches_the_toolkits_formulas_on_hand_computed_cases():
    assert tolerance_px(480, 854) == 8 and tolerance_px(100, 100) == 2 and tolerance_px(10, 10, 3) == 3
    # Two single pixels 2 px apart, radius 1 (a plus-shaped disk): their 2x2 boundaries touch on one
    # side, so 2 of 4 pixels match each way: P = R = 1/2 (an inner-contour boundary would give 0).
    a, b = np.zeros((12, 12), dtype=bool), np.zeros((12, 12), dtype=bool)
    a[5, 5], b[5, 7] = True, True
    assert boundary_f(b, a, tolerance=1) == pytest.approx(0.5)
    # A 4x4 square shifted right by 1 px: every boundary pixel has its twin 1 px away -> F = 1.
    gt = _square(12, 12, 2, 2, 4)
    assert boundary_f(_square(12, 12, 2, 3, 4), gt, tolerance=1) == 1.0
    # Shifted by 2 px: 10 of the 16 boundary pixels are within 1 px of the other boundary, each way.
    assert boundary_f(_square(12, 12, 2, 4, 4), gt, tolerance=1) == pytest.approx(10 / 16)
    # Empty masks: both -> 1, one -> 0 (P = 1, R = 0 and the reverse).
    empty = np.zeros_like(gt)
    assert boundary_f(empty, empty) == 1.0 and boundary_f(empty, gt) == 0.0 and boundary_f(gt, empty) == 0.0
    # Void pixels are cleared from both masks first: a prediction that differs only on void scores 1,
    # and J counts neither the void pixels of the prediction nor of the truth.
    void = np.zeros_like(gt)
    void[2:6, 6:8] = True
    pred = gt | void
    assert boundary_f(pred, gt, void, tolerance=1) == 1.0 and region_j(pred, gt, void) == 1.0
    pred2 = gt.copy()
    pred2[2:4, 6:8] = True  # 4 extra pixels, all on void: not counted
    pred2[6, 2:4] = True  # 2 extra pixels off the void: union 18
    assert region_j(pred2, gt, void) == pytest.approx(16 / 18)


def test_void_pixels_are_ignored():
    gt = np.zeros((3, 20, 20), dtype=np.uint8)
    gt[:, 5:10, 5:10] = 1
    gt[:, 0:5, :] = VOID
    pred = gt.copy()
    pred[pred == VOID] = 1  # predicting the object over void pixels costs nothing
    s = sequence_scores(pred, gt)
    assert list(s) == [1] and s[1]["J"] == 1.0 and s[1]["F"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        sequence_scores(pred[:2], gt)
