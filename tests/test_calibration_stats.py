"""calibration.histogram and calibration.stats: percentile accuracy, moments, outlier fraction, exact merging."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nvfp4_lab.calibration.histogram import (
    BINS_PER_OCTAVE,
    MAX_EXP,
    MIN_EXP,
    STEP_BINS_PER_OCTAVE,
    LogHistogram,
    bin_indices,
)
from nvfp4_lab.calibration.stats import LayerStats, Moments

PS = [0, 0.1, 1, 10, 25, 50, 75, 90, 95, 99, 99.9, 100]


def _kurtosis(x: np.ndarray) -> float:
    d = x - x.mean()
    return float(np.mean(d ** 4) / np.mean(d ** 2) ** 2 - 3)


# -- histogram ------------------------------------------------------------------------------------------------------
def test_bin_grid_and_edges():
    v = np.array([1.0, 2.0, 0.5, 3.0, 2.0 ** (1 / BINS_PER_OCTAVE) * 1.0000001])
    idx = bin_indices(v)
    assert idx.tolist()[:4] == [0, BINS_PER_OCTAVE, -BINS_PER_OCTAVE, int(math.floor(math.log2(3) * BINS_PER_OCTAVE))]
    assert idx[4] == 1
    h = LogHistogram()
    lo, hi = h.edges(idx)
    assert np.all(lo <= v) and np.all(v < hi)
    assert np.allclose(hi / lo, 2 ** (1 / BINS_PER_OCTAVE))
    assert 2 ** (1 / BINS_PER_OCTAVE) - 1 < 0.0028  # bin width 0.27 %: the percentile error bound


def test_under_over_and_zero():
    h = LogHistogram()
    h.add(np.array([0.0, 2.0 ** (MIN_EXP - 1), 1.0, 2.0 ** MAX_EXP, 1e300]))
    assert (h.under, h.over, h.total) == (2, 2, 5)
    q = h.quantiles([0.0, 1.0], 0.0, 1e300)
    assert q[0] == 0.0 and q[1] == 1e300


def test_histogram_json_roundtrip_and_coarsen():
    rng = np.random.default_rng(0)
    x = rng.lognormal(0, 2, 5000)
    h = LogHistogram()
    h.add(x)
    h.add(np.array([0.0]))
    back = LogHistogram.from_json(h.to_json())
    assert back == h
    coarse = h.coarsen(STEP_BINS_PER_OCTAVE)
    direct = LogHistogram(STEP_BINS_PER_OCTAVE)
    direct.add(x)
    direct.add(np.array([0.0]))
    assert coarse == direct
    with pytest.raises(ValueError):
        LogHistogram(BINS_PER_OCTAVE * 2)
    with pytest.raises(ValueError):
        LogHistogram.from_json({"bins_per_octave": 256, "index_delta": [1, 0], "count": [1, 1]})


@pytest.mark.parametrize("sigma", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("n", [50, 1280, 200_000])
def test_percentile_accuracy_vs_numpy(sigma, n):
    rng = np.random.default_rng(int(sigma * 100) + n)
    x = rng.lognormal(1.0, sigma, n)
    s = LayerStats()
    s.add(x)
    est = s.percentiles(PS)
    ref = np.percentile(x, PS)
    rel = np.abs(est / ref - 1)
    assert rel.max() <= 0.0028, (rel.max(), PS[int(rel.argmax())])
    assert est[0] == x.min() and est[-1] == x.max()  # exact min and max


def test_percentile_on_discrete_bf16_like_values():
    # activations are bf16: amax takes few distinct values, many ties (like the seed summaries)
    rng = np.random.default_rng(3)
    import torch

    x = torch.tensor(rng.lognormal(0, 0.2, 3000)).to(torch.bfloat16).double().numpy()
    s = LayerStats()
    s.add(x)
    assert np.max(np.abs(s.percentiles(PS) / np.percentile(x, PS) - 1)) <= 0.0028


# -- moments ----------------------------------------------------------------------------------------------------------
def test_moments_match_numpy_and_merge_pairwise():
    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 3.0, 10_000)
    parts = np.array_split(x, [3, 100, 101, 5000, 9999])
    m = Moments()
    for p in parts:
        m = m.merge(Moments.from_values(p))
    whole = Moments.from_values(x)
    assert m.close_to(whole, 1e-10)
    assert m.n == x.size
    assert math.isclose(m.mean, x.mean(), rel_tol=1e-12)
    assert math.isclose(m.std, x.std(), rel_tol=1e-10)
    assert math.isclose(m.kurtosis, _kurtosis(x), rel_tol=1e-9)


def test_moments_stable_with_large_mean_small_spread():
    # cross_attn.q: amax ~ 50 with CV 0.002; raw power sums would lose the kurtosis
    rng = np.random.default_rng(2)
    x = 50.0 + 0.1 * rng.standard_normal(100_000)
    s = LayerStats()
    for chunk in np.array_split(x, 400):
        s.add(chunk)
    assert math.isclose(s.std, x.std(), rel_tol=1e-9)
    assert abs(s.kurtosis - _kurtosis(x)) < 1e-6


def test_undefined_statistics_are_none():
    s = LayerStats()
    assert s.count == 0 and s.mean is None and s.std is None and s.kurtosis is None and s.percentile(50) is None
    s.add([3.0])
    assert s.std == 0.0 and s.kurtosis is None and s.outlier_fraction() is None
    s.add([3.0])
    assert s.kurtosis is None and s.outlier_fraction() is None  # zero variance


def test_outlier_fraction_from_histogram():
    rng = np.random.default_rng(4)
    for x in (rng.lognormal(0, 0.6, 50_000), np.r_[rng.normal(10, 1, 5000).clip(0.1), [40, 41, 42]]):
        s = LayerStats()
        s.add(x)
        exact = np.mean(np.abs(x - x.mean()) > 3 * x.std())
        assert abs(s.outlier_fraction() - exact) <= 2e-4 + 0.01 * exact


def test_nonfinite_and_negative_values():
    s = LayerStats()
    s.add([1.0, float("nan"), float("inf"), 2.0])
    assert s.count == 2 and s.nonfinite == 2 and s.max == 2.0
    with pytest.raises(ValueError):
        s.add([-1.0])


def test_fraction_above():
    rng = np.random.default_rng(5)
    x = rng.lognormal(0, 1, 100_000)
    s = LayerStats()
    s.add(x)
    for t in (0.1, 1.0, 3.0, 20.0):
        assert abs(s.fraction_above(t) - np.mean(x > t)) < 2e-3
    assert s.fraction_above(x.max()) == 0.0
    assert s.fraction_above(x.min() / 2) == 1.0


# -- buckets ---------------------------------------------------------------------------------------------------------
def test_step_buckets_and_chunks():
    s = LayerStats()
    s.add([1.0, 2.0], step=0)
    s.add([4.0], step=1, cond="cond")
    s.add_chunk([0.5, 0.7], step=1, cond="uncond")
    assert s.count == 3 and s.max == 4.0  # chunks are not part of the totals
    steps = s.steps()
    assert list(steps) == [0, 1] and steps[0].count == 2 and steps[1].max == 4.0
    assert s.steps(cond="uncond")[1].count == 2
    assert set(s.by_cond()) == {"cond", "uncond"}
    assert s.conds() == ["cond", "uncond"]
    assert 1.0 <= steps[0].percentile(50) <= 2.0
    back = LayerStats.from_json(s.to_json())
    assert back.same_as(s)


# -- merge == record both -----------------------------------------------------------------------------------------
def _record(calls, stats=None):
    stats = stats or LayerStats()
    for values, step, cond in calls:
        stats.add(values, step, cond, fmt="nvfp4")
    return stats


def test_merge_equals_recording_both():
    rng = np.random.default_rng(6)
    calls = [(rng.lognormal(0, 0.4, int(rng.integers(1, 300))), int(rng.integers(0, 20)),
              [None, "cond", "uncond"][int(rng.integers(0, 3))]) for _ in range(200)]
    a, b = _record(calls[:77]), _record(calls[77:])
    a.add_provided(0.002, 3)
    both = _record(calls)
    both.add_provided(0.002, 3)
    merged = a.merge(b)
    assert merged.same_as(both)
    assert merged.hist == both.hist and merged.count == both.count
    assert merged.min == both.min and merged.max == both.max
    assert np.array_equal(merged.percentiles(PS), both.percentiles(PS))
    assert math.isclose(merged.kurtosis, both.kurtosis, rel_tol=1e-9)
    assert merged.outlier_fraction() == pytest.approx(both.outlier_fraction(), rel=1e-12)
    assert b.merge(a).same_as(both)  # order does not matter
    # the JSON round trip is exact
    assert LayerStats.from_json(merged.to_json()).same_as(merged, rtol=0)


def test_vectorized_add_equals_per_value_add():
    rng = np.random.default_rng(7)
    x = rng.lognormal(0, 1, 2000)
    one = LayerStats()
    one.add(x, step=3)
    many = LayerStats()
    for v in x:
        many.add([v], step=3)
    assert one.same_as(many)
