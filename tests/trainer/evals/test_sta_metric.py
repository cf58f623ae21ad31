"""Known answers for the Ego4D STA Top-5 mAP (trainer.evals.sta_metric)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.evals.sta_metric import VARIANTS, iou_matrix, sta_map

GT = {"boxes": [[0, 0, 99, 99], [200, 200, 299, 299]], "nouns": [1, 2], "verbs": [5, 6], "ttcs": [1.0, 2.0]}


def _pred(boxes, nouns, verbs, ttcs, scores):
    return {"boxes": boxes, "nouns": nouns, "verbs": verbs, "ttcs": ttcs, "scores": scores}


def test_perfect_predictions_score_100_on_every_variant():
    pred = _pred(GT["boxes"], [1, 2], [5, 6], [1.0, 2.0], [0.9, 0.8])
    assert sta_map([(pred, GT)]) == {v: 100.0 for v in VARIANTS}


def test_one_wrong_noun_zeroes_that_class():
    # Object 2 predicted as noun 1: class 1 has one TP and one FP ranked below it -> AP 1; class 2 -> 0.
    pred = _pred(GT["boxes"], [1, 1], [5, 6], [1.0, 2.0], [0.9, 0.8])
    assert sta_map([(pred, GT)], top_k=1) == {v: 50.0 for v in VARIANTS}


def test_wrong_verb_and_ttc_only_hit_their_variants():
    pred = _pred(GT["boxes"], [1, 2], [5, 7], [1.0, 2.26], [0.9, 0.8])  # object 2: wrong verb, TTC off by 0.26
    m = sta_map([(pred, GT)])
    assert m == {"noun": 100.0, "noun_verb": 50.0, "noun_ttc": 50.0, "overall": 50.0}


def test_ttc_tolerance_is_inclusive_at_a_quarter_second():
    gt = {"boxes": [[0, 0, 99, 99]], "nouns": [1], "verbs": [5], "ttcs": [1.0]}
    inside = _pred([[0, 0, 99, 99]], [1], [5], [1.25], [0.9])
    outside = _pred([[0, 0, 99, 99]], [1], [5], [1.2501], [0.9])
    assert sta_map([(inside, gt)])["noun_ttc"] == 100.0
    assert sta_map([(outside, gt)])["noun_ttc"] == 0.0 and sta_map([(outside, gt)])["noun"] == 100.0


def _box_with_iou(target: float) -> list[float]:
    """A box [0, 0, w-1, 99] against [0, 0, 99, 99]: IoU = w / 100 in inclusive pixels."""
    return [0, 0, round(100 * target) - 1, 99]


def test_iou_threshold_049_misses_051_matches():
    gt = {"boxes": [[0, 0, 99, 99]], "nouns": [1], "verbs": [5], "ttcs": [1.0]}
    assert iou_matrix([_box_with_iou(0.49)], gt["boxes"])[0, 0] == pytest.approx(0.49)
    low = _pred([_box_with_iou(0.49)], [1], [5], [1.0], [0.9])
    high = _pred([_box_with_iou(0.51)], [1], [5], [1.0], [0.9])
    assert sta_map([(low, gt)]) == {v: 0.0 for v in VARIANTS}
    assert sta_map([(high, gt)]) == {v: 100.0 for v in VARIANTS}


def test_top5_discounts_four_false_positives_per_object_not_five():
    gt = {"boxes": [[0, 0, 99, 99]], "nouns": [1], "verbs": [5], "ttcs": [1.0]}
    far = [[300, 300, 350, 350]] * 5
    # Four wrong guesses above the right one: discounted, AP 100. Five: the fifth counts, AP 1/2.
    four = _pred(far[:4] + [[0, 0, 99, 99]], [1] * 5, [5] * 5, [1.0] * 5, [0.9, 0.8, 0.7, 0.6, 0.5])
    five = _pred(far + [[0, 0, 99, 99]], [1] * 6, [5] * 6, [1.0] * 6, [0.9, 0.8, 0.7, 0.6, 0.55, 0.5])
    assert sta_map([(four, gt)])["overall"] == 100.0
    assert sta_map([(five, gt)])["overall"] == pytest.approx(50.0)
    assert sta_map([(four, gt)], top_k=1)["overall"] == pytest.approx(20.0)


def test_each_ground_truth_is_matched_once_and_missing_classes_score_zero():
    gt = {"boxes": [[0, 0, 99, 99]], "nouns": [1], "verbs": [5], "ttcs": [1.0]}
    dup = _pred([[0, 0, 99, 99], [0, 0, 99, 99]], [1, 1], [5, 5], [1.0, 1.0], [0.9, 0.8])
    assert sta_map([(dup, gt)], top_k=1)["noun"] == 100.0  # the duplicate ranks below the TP
    empty = _pred(np.zeros((0, 4)), [], [], [], [])
    # Frame 2's class 2 object has no predictions at all: its AP is 0, the mean halves.
    gt2 = {"boxes": [[0, 0, 9, 9]], "nouns": [2], "verbs": [5], "ttcs": [1.0]}
    perfect = _pred(gt["boxes"], [1], [5], [1.0], [0.9])
    assert sta_map([(perfect, gt), (empty, gt2)])["noun"] == 50.0


def test_bad_input_names_the_missing_field():
    with pytest.raises(ValueError, match="scores"):
        sta_map([({"boxes": [], "nouns": [], "verbs": [], "ttcs": []}, GT)])
