import numpy as np
import pytest

from trainer.evals.jf import VOID, boundary_f, boundary_map, region_j, sequence_scores, summarize


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


def test_boundary_map_is_one_pixel_inner_contour():
    m = _square(10, 10, 2, 2, 4)
    b = boundary_map(m)
    assert b.sum() == 4 * 4 - 2 * 2  # the ring of a 4x4 square
    assert not b[3:5, 3:5].any()
    assert not b[~m].any()


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
