"""Blend index (deadline greedy), exact weights and seeded per-source orders."""

from fractions import Fraction

import numpy as np
import pytest

from pipeline.mix.blend import MAX_PERIOD, Blend, Permutation, SourceOrder, exact_weights, greedy_period


def _prefix_error(src: np.ndarray, weights: list[int], period: int) -> float:
    k = len(weights)
    onehot = np.zeros((len(src), k))
    onehot[np.arange(len(src)), src.astype(np.int64)] = 1
    counts = onehot.cumsum(0)
    ideal = np.outer(np.arange(1, len(src) + 1), np.asarray(weights) / period)
    return float(np.abs(counts - ideal).max())


def test_exact_weights_take_decimals_exactly():
    assert exact_weights(["0.2", "0.1", "0.1", "0.6"]) == ([2, 1, 1, 6], 10)
    assert exact_weights(["0.5", "0.3", "0.2"]) == ([5, 3, 2], 10)
    assert exact_weights(["1", "1", "1"]) == ([1, 1, 1], 3)
    assert exact_weights(["2", "6"]) == ([1, 3], 4)


def test_exact_weights_round_huge_denominators_to_max_period():
    w, d = exact_weights([Fraction(1, 999_983), Fraction(1, 999_979), Fraction(1, 3)])
    assert d <= MAX_PERIOD and sum(w) == d and all(x >= 1 for x in w)


@pytest.mark.parametrize("bad", [["0"], ["-1", "2"], ["abc"], []])
def test_exact_weights_refuse_bad_ratios(bad):
    with pytest.raises(ValueError):
        exact_weights(bad)


def test_golden_blend_small_weights():
    # Hand-computed: at step n a source is due when c*D < n*W; the due source with the smallest
    # (c+1)/W goes next, ties to the lower index.
    src, local = Blend([5, 3, 2], 10).build(10)
    assert src.tolist() == [0, 1, 0, 2, 0, 1, 0, 1, 0, 2]
    assert local.tolist() == [0, 0, 1, 0, 2, 1, 3, 2, 4, 1]
    paper, _ = Blend(*exact_weights(["0.2", "0.1", "0.1", "0.6"])).build(20)
    assert paper.tolist() == [3, 3, 0, 3, 1, 3, 3, 0, 2, 3] * 2


def test_every_prefix_within_one_sample_random_weights():
    rng = np.random.default_rng(0)
    for _ in range(60):
        k = int(rng.integers(1, 9))
        ratios = [f"{x:.3f}" for x in rng.uniform(0.001, 1, k)]
        w, d = exact_weights(ratios)
        b = Blend(w, d)
        assert b.periodic
        src, _ = b.build(min(3 * d, 60_000))
        assert _prefix_error(src, w, d) < 1.0


def test_weights_where_megatron_max_error_drifts_stay_within_one_sample():
    w, d = [200, 35, 987, 818, 125, 848], 3013
    src, _ = Blend(w, d).build(2 * d)
    assert _prefix_error(src, w, d) < 1.0


def test_period_formula_equals_built_index_and_counts():
    b = Blend(*exact_weights(["0.2", "0.1", "0.1", "0.6"]))
    src, local = b.build(1_000_003)
    ids = np.array([0, 1, 9, 10, 11, 999_999, 1_000_002, 123_457])
    s2, l2 = b.source_and_local(ids)
    assert (s2 == src[ids]).all() and (l2 == local[ids]).all()
    # local index of sample i = how many earlier samples came from the same source
    for s in range(4):
        assert (local[src == s] == np.arange((src == s).sum())).all()
    assert b.counts(1_000_003).tolist() == np.bincount(src, minlength=4).tolist()


def test_greedy_period_closes():
    src, local = greedy_period([2, 1, 1, 6], 10)
    assert np.bincount(src, minlength=4).tolist() == [2, 1, 1, 6]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 12345])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, (0, 1, 2))
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_permutation_is_seeded():
    a = Permutation(1000, (0, 1))(np.arange(1000))
    b = Permutation(1000, (0, 1))(np.arange(1000))
    c = Permutation(1000, (1, 1))(np.arange(1000))
    assert (a == b).all() and (a != c).any()
    assert (a != np.arange(1000)).mean() > 0.9


def test_source_order_repeats_small_source_each_pass_reshuffled():
    n = 50
    order = SourceOrder(n, (0, 7))
    u = order.units(np.arange(3 * n))
    passes = u.reshape(3, n)
    for p in passes:
        assert sorted(p.tolist()) == list(range(n))
    assert (passes[0] != passes[1]).any() and (passes[1] != passes[2]).any()
    # element-wise evaluation agrees with the bulk one
    assert order.units(np.array([2 * n + 5]))[0] == passes[2, 5]


def test_source_order_keeps_the_passes_that_fit_its_cache_budget():
    n = 50  # int32 tables: 200 bytes a pass
    roomy = SourceOrder(n, (0, 7))
    tight = SourceOrder(n, (0, 7), cache=2, cache_bytes=3 * 200)
    lean = SourceOrder(n, (0, 7), cache=2, cache_bytes=1)
    pos = np.arange(10 * n)
    u = roomy.units(pos)
    # A source smaller than a batch's share spans many passes per batch: all of them stay cached.
    assert sorted(roomy._perms.epochs()) == list(range(10))
    assert np.array_equal(tight.units(pos), u) and sorted(tight._perms.epochs()) == [7, 8, 9]
    assert np.array_equal(lean.units(pos), u) and sorted(lean._perms.epochs()) == [8, 9]  # never fewer than `cache`
    # Going back to an evicted pass rebuilds the same order.
    assert np.array_equal(lean.units(np.arange(n)), u[:n]) and lean._perms.epochs() == [9, 0]
