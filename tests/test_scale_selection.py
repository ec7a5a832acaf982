"""calibration.scale_selection: percentile / max / mse choices, clip fractions, the error model and its table."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvfp4_lab.calibration import legacy, scale_selection as ss
from nvfp4_lab.calibration.store import CalibrationStore
from nvfp4_lab.quant.errors import CalibrationError

SEED = Path("/work/shared/seed-data")
SUMMARY_5B = SEED / "scales_summary_wan22_5b.json"
needs_seed = pytest.mark.skipif(not SUMMARY_5B.exists(), reason="seed data /work/shared/seed-data not present")
D = 2688.0


def _store(values_by_layer: dict[str, np.ndarray]) -> CalibrationStore:
    s = CalibrationStore()
    for name, v in values_by_layer.items():
        s.record(name, v)
    return s


def test_constants_match_quant_formats_and_no_torch_import():
    from nvfp4_lab.quant import formats

    assert legacy.NVFP4_SCALE_DENOM == formats.NVFP4_SCALE_DENOM
    code = ("import sys, nvfp4_lab.calibration.scale_selection, nvfp4_lab.calibration.plots, "
            "nvfp4_lab.calibration.legacy; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # the calibration CLI paths stay light


def test_percentile_and_max_methods_and_clip_fraction():
    rng = np.random.default_rng(0)
    x = rng.lognormal(1.0, 0.5, 20_000)
    store = _store({"L": x})
    p = ss.select_input_scales(store, "percentile", 99.0, 1.0)["L"]
    assert p.amax == pytest.approx(np.percentile(x, 99.0), rel=0.003)
    assert p.input_scale == pytest.approx(p.amax / D, rel=1e-12)
    assert p.clip_fraction == pytest.approx(np.mean(x > p.threshold), abs=2e-3)
    pm = ss.select_input_scales(store, "percentile", 99.0, 1.08)["L"]
    assert pm.input_scale == pytest.approx(1.08 * p.input_scale, rel=1e-12)
    assert pm.clip_fraction == pytest.approx(np.mean(x > pm.threshold), abs=2e-3)
    m = ss.select_input_scales(store, "max")["L"]
    assert m.amax == x.max() and m.clip_fraction == 0.0 and m.input_scale == pytest.approx(x.max() / D)
    assert m.expected_error == pytest.approx(1.0)
    assert p.expected_error > 1.0              # clipping 1 % of calls costs something under the model
    half = ss.select_input_scales(store, "max", margin=0.5)["L"]
    assert half.clip_fraction == pytest.approx(np.mean(x > x.max() / 2), abs=2e-3)


def test_mse_equals_max_for_a_tight_distribution():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 1.0, 5000).clip(1)
    ch = ss.select_input_scales(_store({"L": x}), "mse")["L"]
    # below r = 1 the model is flat, clipping costs: the smallest error-free scale is the max
    assert ch.input_scale == pytest.approx(x.max() / D, rel=1e-9)
    assert ch.clip_fraction == 0.0 and ch.expected_error == pytest.approx(1.0)


def test_mse_clips_rare_huge_calls_when_the_spread_is_extreme():
    # most calls ~1, a few calls 1e5 larger: covering them would push the common calls past the knee (r < 2^-10)
    rng = np.random.default_rng(2)
    x = np.r_[rng.lognormal(0, 0.2, 10_000), [1e5, 1.2e5]]
    store = _store({"L": x})
    mse = ss.select_input_scales(store, "mse")["L"]
    mx = ss.select_input_scales(store, "max")["L"]
    assert mse.input_scale < mx.input_scale / 100
    assert 0 < mse.clip_fraction <= 3 / x.size
    assert mse.expected_error < mx.expected_error
    for s in (mse.input_scale * 0.5, mse.input_scale * 4, mx.input_scale):
        assert ss.expected_error(store.layers["L"], s) >= mse.expected_error - 1e-12


def test_mse_margin_and_gaussian_model():
    x = np.linspace(1, 2, 1000)
    store = _store({"L": x})
    a = ss.select_input_scales(store, "mse", margin=1.0)["L"]
    b = ss.select_input_scales(store, "mse", margin=1.5)["L"]
    assert b.input_scale == pytest.approx(1.5 * a.input_scale)
    g = ss.select_input_scales(store, "mse", model="gaussian")["L"]
    assert g.input_scale <= a.input_scale * (1 + 1e-9)
    with pytest.raises(ValueError):
        ss.relative_error(1.0, "nope")


def test_error_curve_shape():
    r = np.array([2.0 ** -8, 0.5, 1.0, 1.1, 1.5, 2.0, 4.0])
    for model in ("outliers", "gaussian"):
        f = ss.relative_error(r, model)
        assert np.all(f[:3] == 1.0)
        assert np.all(np.diff(f[2:]) > 0)
    assert ss.relative_error(2.0 ** -13, "outliers") > 2  # the flush knee
    assert ss.relative_error(2.0, "outliers") > ss.relative_error(2.0, "gaussian")


def test_error_table_matches_simulation():
    # a cheap re-simulation (1 seed, smaller tensor) lands near the tabulated curve
    pts = np.array([-12.0, -4.0, 0.25, 0.5, 1.0, 2.0])
    for model in ("outliers", "gaussian"):
        _, raw = ss.simulate_error_curve(model, pts, seeds=1, shape=(128, 1024))
        table = ss.relative_error(2.0 ** pts, model)
        assert np.all(np.abs(np.log(raw / table)) < 0.35), (model, raw, table)


def test_layers_without_data_and_bad_arguments():
    s = CalibrationStore()
    s.record_provided("P", 0.001, 3)
    s.record("N", [float("nan")])
    s.record("L", [1.0, 2.0])
    assert set(ss.select_input_scales(s, "max")) == {"L"}
    assert set(ss.select_input_scales(s, "max", layers=["L", "P"])) == {"L"}
    with pytest.raises(CalibrationError, match="method"):
        ss.select_input_scales(s, "median")
    with pytest.raises(CalibrationError, match="percentile"):
        ss.select_input_scales(s, "percentile", percentile=101)
    with pytest.raises(CalibrationError, match="margin"):
        ss.select_input_scales(s, "max", margin=0)
    z = _store({"Z": np.zeros(4)})
    assert ss.select_input_scales(z, "max")["Z"].input_scale == ss.MIN_SCALE


# -- original summaries ------------------------------------------------------------------------------------------------
@needs_seed
def test_golden_mapping_on_the_5b_summary():
    summary = legacy.load_summary(SUMMARY_5B)
    ch = ss.select_input_scales(summary, "percentile", 99.9, 1.08)["blocks.10.cross_attn.k"]
    row = summary.layers["blocks.10.cross_attn.k"]
    assert ch.amax == row["amax_p99_9"]
    assert ch.input_scale == pytest.approx(row["amax_p99_9"] * 1.08 / D, rel=1e-15)   # full precision
    assert ch.input_scale == pytest.approx(0.00073764, rel=1e-3)   # the original's 6-decimal scale_p99_9 × 1.08
    assert ch.approximate and ch.count == 1280
    m = ss.select_input_scales(summary, "max")["blocks.10.cross_attn.k"]
    assert m.amax == row["amax_max"] and m.clip_fraction == 0.0
    p99 = ss.select_input_scales(summary, "percentile", 99.0, 1.0)
    assert p99["blocks.10.cross_attn.k"].amax == row["amax_p99"]


@needs_seed
def test_summary_percentile_must_be_listed_and_mse_is_approximate():
    summary = legacy.load_summary(SUMMARY_5B)
    with pytest.raises(CalibrationError, match="lists percentiles"):
        ss.select_input_scales(summary, "percentile", 97.5)
    mse = ss.select_input_scales(summary, "mse")
    assert len(mse) == len(summary.rows) and all(c.approximate for c in mse.values())
    for name, c in mse.items():
        assert c.input_scale * D <= summary.layers[name]["amax_max"] * (1 + 1e-9)
        assert c.expected_error is not None and math.isfinite(c.expected_error)


def test_scales_document_is_standard_json():
    import json

    store = _store({"L": np.array([1.0, 2.0, 3.0])})
    doc = ss.scales_document(ss.select_input_scales(store, "mse"), method="mse", percentile=99.9, margin=1.0)
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["layers"][0]["layer"] == "L"
