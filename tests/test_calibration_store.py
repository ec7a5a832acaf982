"""calibration.store (file format, locked merge-on-save, errors) and calibration.legacy (original log and summary)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nvfp4_lab.calibration import legacy
from nvfp4_lab.calibration.stats import LayerStats
from nvfp4_lab.calibration.store import CalibrationStore, file_lock
from nvfp4_lab.quant.errors import CalibrationError

SEED = Path("/work/shared/seed-data")
SEED_SUMMARIES = sorted(SEED.glob("scales_summary_wan22_*.json")) if SEED.exists() else []
needs_seed = pytest.mark.skipif(not SEED_SUMMARIES, reason="seed data /work/shared/seed-data not present")
D = 2688.0


def strict_load(path: Path):
    """A JSON parser that rejects NaN/Infinity literals."""
    def bad(name):
        raise ValueError(f"non-standard constant {name}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


def _fill(store: CalibrationStore, seed: int, layers=("blocks.0.self_attn.q", "blocks.0.ffn.0"), calls=30):
    rng = np.random.default_rng(seed)
    for i in range(calls):
        for j, name in enumerate(layers):
            store.record(name, rng.lognormal(j, 0.3, 8), step=i % 10, cond=["cond", "uncond"][i % 2])
    store.count_prompt(2)
    return store


# -- store file ------------------------------------------------------------------------------------------------------
def test_save_load_roundtrip_is_exact_and_standard_json(tmp_path):
    s = _fill(CalibrationStore(), 0)
    s.record("blocks.1.k", [5.0])                      # n = 1: undefined kurtosis
    s.record("blocks.1.nan", [float("nan")])           # only non-finite values
    s.record_provided("blocks.2.q", 0.0031, 4, fmt="nvfp4")
    s.set_model(file="/abs/dir/wan.safetensors", header_sha256="ab" * 32, architecture="wan22_5b")
    s.note_comfyui_version("0.29.0")
    path = s.save(tmp_path / "a.calib.json")
    data = strict_load(path)
    assert data["format"] == "nvfp4-lab-calibration" and data["version"] == 1
    assert data["provenance"]["models"][0]["file"] == "wan.safetensors"   # no directories
    assert data["provenance"]["prompts"] == 2
    back = CalibrationStore.load(path)
    assert back.same_as(s, rtol=0)
    assert back.layers["blocks.1.nan"].nonfinite == 1
    assert back.layers["blocks.2.q"].provided == {0.0031: 4}
    assert not back.dirty


def test_merge_equals_record_both(tmp_path):
    a, b = _fill(CalibrationStore(), 1), _fill(CalibrationStore(), 2, layers=("blocks.0.ffn.0", "blocks.3.o"))
    both = _fill(_fill(CalibrationStore(), 1), 2, layers=("blocks.0.ffn.0", "blocks.3.o"))
    merged = a.merge(b)
    assert merged.same_as(both)
    assert merged.provenance["prompts"] == 4
    for name in both.layers:
        assert merged.layers[name].hist == both.layers[name].hist
        assert np.array_equal(merged.layers[name].percentiles([50, 99.9]), both.layers[name].percentiles([50, 99.9]))
    # through files
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert CalibrationStore.load(tmp_path / "a.json").merge(CalibrationStore.load(tmp_path / "b.json")).same_as(both)


def test_merge_refuses_different_models():
    a, b = CalibrationStore(), CalibrationStore()
    a.set_model(file="x.safetensors", header_sha256="11" * 32)
    b.set_model(file="y.safetensors", header_sha256="22" * 32)
    with pytest.raises(CalibrationError, match="different models"):
        a.merge(b)
    assert len(a.merge(b, allow_different_models=True).provenance["models"]) == 2


def test_save_adds_only_the_delta(tmp_path):
    path = tmp_path / "session.json"
    s1 = CalibrationStore.open(path)
    s1.record("L", [1.0, 2.0])
    s1.save()
    s1.save()                                   # nothing new: no double counting
    s2 = CalibrationStore.open(path)            # "ComfyUI restart": a second store on the same file
    s2.record("L", [3.0])
    s1.record("L", [4.0])
    s2.save()
    s1.save()
    final = CalibrationStore.load(path)
    assert final.layers["L"].count == 4 and final.layers["L"].max == 4.0
    assert s1.layers["L"].count == 4            # the view now includes the other process's data
    # saving elsewhere writes the full view; an existing unbound target is refused
    s1.save(tmp_path / "copy.json")
    other = CalibrationStore()
    other.record("L", [9.0])
    with pytest.raises(CalibrationError, match="already exists"):
        other.save(tmp_path / "copy.json")
    other.save(tmp_path / "copy.json", overwrite=True)
    assert CalibrationStore.load(tmp_path / "copy.json").layers["L"].count == 1


_WORKER = """
import sys
import numpy as np
import nvfp4_lab
from nvfp4_lab.calibration.store import CalibrationStore
import os, time
path, seed, rounds, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print(nvfp4_lab.__file__, flush=True)
while not os.path.exists(go):       # start together so that the saves really interleave
    time.sleep(0.005)
store = CalibrationStore.open(path)
rng = np.random.default_rng(seed)
for i in range(rounds):
    store.record("blocks.0.q", rng.lognormal(0, 1, 50), step=i)
    store.record(f"only.{seed}", [float(i + 1)])
    store.count_prompt()
    store.save()
"""


def test_concurrent_saves_lose_nothing(tmp_path):
    # two processes (fresh interpreters: conftest's PYTHONPATH pins this checkout) save into one file,
    # each after every round; every save must merge its delta into what the other wrote
    path, go = tmp_path / "shared.json", tmp_path / "go"
    rounds = 40
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(seed), str(rounds), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for p in procs:
        first = p.stdout.readline().strip()   # imported (from this checkout) and waiting
        assert Path(first).resolve().parent == Path(legacy.__file__).resolve().parent.parent, first
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    final = CalibrationStore.load(path)
    assert final.layers["blocks.0.q"].count == 2 * rounds * 50
    assert final.layers["only.1"].count == rounds and final.layers["only.2"].count == rounds
    assert final.provenance["prompts"] == 2 * rounds
    # and the per-step buckets add up
    assert sum(b.count for b in final.layers["blocks.0.q"].steps().values()) == 2 * rounds * 50


def test_lock_timeout_names_the_file(tmp_path):
    path = tmp_path / "locked.json"
    s = CalibrationStore()
    s.record("L", [1.0])
    with file_lock(path):
        with pytest.raises(CalibrationError, match="locked.json"):
            s.save(path, lock_timeout=0.2)
    s.save(path)
    assert (tmp_path / "locked.json.lock").exists()


# -- corrupt and foreign files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, match", [
    ("{not json", "invalid JSON"),
    ('{"format": "nvfp4-lab-calibration", "version": 1, "x": NaN}', "invalid JSON"),
    ('{"format": "something-else", "version": 1}', "not an NVFP4 Lab calibration store"),
    ("[1, 2]", "not an NVFP4 Lab calibration store"),
    ('{"format": "nvfp4-lab-calibration", "version": 99}', "newer"),
    ('{"format": "nvfp4", "mode": "dynamic", "percentiles": [99.9], "layers": []}', "nvfp4 calib import"),
    ("nvfp4\tdynamic\tblocks.0.q\t0.1\t268.8\t(1, 16)\n", "input-scale log"),
])
def test_corrupt_or_foreign_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match) as exc:
        CalibrationStore.load(path)
    assert "bad.json" in str(exc.value)


def test_corrupt_layer_entry_and_binary(tmp_path):
    s = CalibrationStore()
    s.record("blocks.0.q", [1.0, 2.0])
    good = s.to_json_dict()
    good["layers"]["blocks.0.q"]["count"] = 7
    (tmp_path / "c.json").write_text(json.dumps(good))
    with pytest.raises(CalibrationError, match=r"c\.json.*blocks\.0\.q"):
        CalibrationStore.load(tmp_path / "c.json")
    del good["layers"]["blocks.0.q"]["hist"]
    (tmp_path / "d.json").write_text(json.dumps(good))
    with pytest.raises(CalibrationError, match="missing key"):
        CalibrationStore.load(tmp_path / "d.json")
    (tmp_path / "e.json").write_bytes(gzip.compress(b"{}"))
    with pytest.raises(CalibrationError, match="compressed"):
        CalibrationStore.load(tmp_path / "e.json")
    with pytest.raises(CalibrationError, match="no such"):
        CalibrationStore.load(tmp_path / "missing.json")
    with pytest.raises(CalibrationError, match="directory"):
        CalibrationStore.load(tmp_path)


# -- original log import -------------------------------------------------------------------------------------------
def _log_lines(rng, layers=("blocks.0.self_attn.q", "blocks.1.ffn.0"), calls=40):
    lines, amaxes = [], {name: [] for name in layers}
    for _ in range(calls):
        for name in layers:
            a = float(rng.lognormal(1, 0.4))
            amaxes[name].append(round(a, 6))
            lines.append(f"nvfp4\tdynamic\t{name}\t{a / D:.6f}\t{a:.6f}\t(33440, 3072)")
    return lines, amaxes


def _write(path: Path, text: str) -> Path:
    data = text.encode()
    opener = {".gz": gzip.compress, ".xz": lzma.compress, ".bz2": bz2.compress}.get(path.suffix)
    path.write_bytes(opener(data) if opener else data)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz", ".xz", ".bz2"])
def test_import_log_all_line_kinds(tmp_path, suffix):
    rng = np.random.default_rng(0)
    lines, amaxes = _log_lines(rng)
    lines += [
        "nvfp4\tprovided\tblocks.5.cross_attn.k\t0.000737\t-\t(512, 5120)",
        "nvfp4\tprovided\tblocks.5.cross_attn.k\t0.000737\t-\t(512, 5120)",
        "dynamic\tblocks.9.legacy\t0.001000\t2.688000\t(16, 16)",          # legacy 5 fields
        "float8_e4m3fn\tdynamic\tblocks.7.fp8\t0.010000\t26.880000\t(8, 16)",
        "nvfp4\tdynamic\tblocks.8.scaleonly\t0.002000\tbad\t(8, 16)",       # amax unreadable -> scale*2688
        "garbage line",
        "",
    ]
    path = _write(tmp_path / f"scales.log{suffix}", "\n".join(lines) + "\n")
    store, report = legacy.import_log(path)
    assert report.dynamic == 80 + 3 and report.provided == 2 and report.legacy == 1 and report.skipped == 1
    assert report.amax_from_scale == 1
    for name, vals in amaxes.items():
        st = store.layers[name]
        assert st.count == len(vals) and st.max == max(vals) and st.min == min(vals)
        assert math.isclose(st.mean, float(np.mean(vals)), rel_tol=1e-12)
        assert st.formats == {"nvfp4": len(vals)}
    assert store.layers["blocks.5.cross_attn.k"].provided == {0.000737: 2}
    assert store.layers["blocks.5.cross_attn.k"].count == 0
    assert store.layers["blocks.9.legacy"].max == 2.688
    assert store.layers["blocks.8.scaleonly"].max == pytest.approx(0.002 * D)
    assert "provided" in report.text()
    # provided lines are summarized (mode provided), not dropped
    doc = legacy.store_summary(store, mode="provided")
    (row,) = doc["layers"]
    assert row["layer"] == "blocks.5.cross_attn.k" and row["count"] == 2
    assert row["scale_p99_9"] == 0.000737 and row["amax_max"] == pytest.approx(0.000737 * D)
    # format filter as the original: nvfp4 keeps legacy lines, drops fp8
    s2, _ = legacy.import_log(path, fmt="nvfp4", mode="dynamic")
    assert "blocks.7.fp8" not in s2.layers and "blocks.9.legacy" in s2.layers
    assert "blocks.5.cross_attn.k" not in s2.layers


def test_import_log_steps_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    lines, _ = _log_lines(rng, layers=("L",), calls=24)
    path = _write(tmp_path / "s.log", "\n".join(lines))
    store, _ = legacy.import_log(path, steps=6, cfg_passes=2)
    st = store.layers["L"]
    assert sorted(s for _, s in st.buckets) == sorted(list(range(6)) * 2)
    assert st.conds() == ["pass0", "pass1"]
    assert store.provenance["prompts"] == 2
    _write(tmp_path / "empty.log", "")
    with pytest.raises(CalibrationError, match="empty"):
        legacy.import_log(tmp_path / "empty.log")
    _write(tmp_path / "junk.log", "hello\nworld\n")
    with pytest.raises(CalibrationError, match="no input-scale log lines"):
        legacy.import_log(tmp_path / "junk.log")
    (tmp_path / "broken.log.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    with pytest.raises(CalibrationError, match="broken.log.xz"):
        legacy.import_log(tmp_path / "broken.log.xz")


def test_log_import_then_summary_matches_exact_statistics(tmp_path):
    rng = np.random.default_rng(2)
    lines, amaxes = _log_lines(rng, layers=("blocks.3.ffn.0",), calls=1280)
    store, _ = legacy.import_log(_write(tmp_path / "a.log", "\n".join(lines)))
    doc = legacy.store_summary(store)
    (row,) = doc["layers"]
    x = np.asarray(amaxes["blocks.3.ffn.0"])
    assert list(row) == legacy.summary_fields()          # the original 24 keys, in order
    assert len(row) == 24
    assert row["count"] == 1280 and row["amax_max"] == x.max() and row["amax_min"] == x.min()
    assert row["amax_std"] == pytest.approx(x.std(), rel=1e-12)
    for p in legacy.DEFAULT_PERCENTILES:
        assert row[f"amax_{legacy.pct_key(p)}"] == pytest.approx(np.percentile(x, p), rel=0.003)
    exact_outl = np.mean(np.abs(x - x.mean()) > 3 * x.std())
    assert abs(row["amax_outlier_frac_3std"] - exact_outl) < 2e-3
    for k, v in row.items():
        if k.startswith("scale_") and not k.endswith(("kurtosis", "outlier_frac_3std")):
            assert v == row["amax_" + k[6:]] / D                # full precision, no 6-decimal rounding


# -- original summaries ------------------------------------------------------------------------------------------------
def _check_summary_invariants(doc: dict):
    rows = doc["layers"]
    assert [r["layer"] for r in rows] == sorted(r["layer"] for r in rows)
    keys = [legacy.pct_key(p) for p in doc["percentiles"]]
    for r in rows:
        assert set(r) == set(legacy.summary_fields(doc["percentiles"]))
        for f in ("min", "max", "mean", "std", *keys):
            assert abs(r[f"scale_{f}"] - r[f"amax_{f}"] / D) <= 1e-15 * max(1.0, r[f"amax_{f}"])
        chain = [r["amax_min"]] + [r[f"amax_{k}"] for k in keys] + [r["amax_max"]]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(chain, chain[1:])), (r["layer"], chain)
        assert all(v is None or (isinstance(v, (int, float, str)) and not (isinstance(v, float) and
                                                                             not math.isfinite(v)))
                   for v in r.values())


@needs_seed
@pytest.mark.parametrize("path", SEED_SUMMARIES, ids=lambda p: p.name)
def test_seed_summary_reexport_roundtrip(tmp_path, path):
    summary = legacy.load_summary(path)
    original = json.loads(path.read_text())
    doc = legacy.legacy_summary_document(summary)
    _check_summary_invariants(doc)
    out = legacy.write_summary(tmp_path / "out.json", doc)
    again = strict_load(out)
    assert again["format"] == original["format"] and again["percentiles"] == original["percentiles"]
    orig_rows = {r["layer"]: r for r in original["layers"]}
    assert len(again["layers"]) == len(orig_rows)
    for r in again["layers"]:
        o = orig_rows[r["layer"]]
        for k, v in r.items():
            if k.startswith("amax_") or k in ("count", "layer"):
                assert v == o[k]                                 # amax fields are carried over unchanged
            elif k.endswith(("kurtosis", "outlier_frac_3std")):
                assert v == r["amax_" + k[6:]]     # scale-invariant: from the amax, not the 6-decimal scales
            else:
                assert v == pytest.approx(o[k], abs=6e-7, rel=1e-2)  # the original's 6-decimal scales
    # summary -> (approximate) store -> summary keeps counts/moments and nearly the percentiles
    store = legacy.summary_to_store(summary)
    assert all(st.approximate for st in store.layers.values())
    doc2 = legacy.store_summary(store, original["percentiles"])
    _check_summary_invariants(doc2)
    for r in doc2["layers"]:
        o = orig_rows[r["layer"]]
        assert r["count"] == o["count"] and r["amax_min"] == o["amax_min"] and r["amax_max"] == o["amax_max"]
        assert r["amax_mean"] == pytest.approx(o["amax_mean"], rel=1e-12)
        assert r["amax_std"] == pytest.approx(o["amax_std"], rel=1e-12)
        assert r["amax_kurtosis"] == pytest.approx(o["amax_kurtosis"], rel=1e-9, abs=1e-9)
        for p in original["percentiles"]:
            k = f"amax_{legacy.pct_key(p)}"
            assert r[k] == pytest.approx(o[k], rel=0.004)


def test_summary_with_nan_and_errors(tmp_path):
    (tmp_path / "nan.json").write_text(
        '{"format": "nvfp4", "mode": "dynamic", "percentiles": [50.0], "layers": [{"layer": "a", "count": 1, '
        '"scale_min": 0.001, "scale_max": 0.001, "scale_mean": 0.001, "scale_std": 0.0, "scale_kurtosis": NaN, '
        '"scale_outlier_frac_3std": NaN, "scale_p50": 0.001, "amax_min": 2.688, "amax_max": 2.688, '
        '"amax_mean": 2.688, "amax_std": 0.0, "amax_kurtosis": NaN, "amax_outlier_frac_3std": NaN, '
        '"amax_p50": 2.688}]}')
    s = legacy.load_summary(tmp_path / "nan.json")
    assert s.rows[0]["amax_kurtosis"] is None
    doc = legacy.legacy_summary_document(s)
    assert doc["nan_as_null"] is True and doc["layers"][0]["amax_kurtosis"] is None
    legacy.write_summary(tmp_path / "nan_out.json", doc)
    strict_load(tmp_path / "nan_out.json")
    with pytest.raises(CalibrationError, match="calibration store"):
        legacy.summary_from_dict(CalibrationStore().to_json_dict(), "x.json")
    with pytest.raises(CalibrationError, match="count"):
        legacy.summary_from_dict({"percentiles": [], "layers": [{"layer": "a", "count": "many"}]}, "y.json")
    assert legacy.detect_kind(tmp_path / "nan.json") == "summary"
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(CalibrationError, match="neither"):
        legacy.detect_kind(tmp_path / "x.json")


def test_store_summary_no_nan_for_degenerate_layers(tmp_path):
    s = CalibrationStore()
    s.record("one", [1.5])
    s.record("flat", [2.0, 2.0, 2.0])
    doc = legacy.store_summary(s)
    assert doc["nan_as_null"] is True
    legacy.write_summary(tmp_path / "s.json", doc)
    rows = {r["layer"]: r for r in strict_load(tmp_path / "s.json")["layers"]}
    assert rows["one"]["amax_std"] == 0.0 and rows["one"]["amax_kurtosis"] is None
    assert rows["flat"]["amax_p99_9"] == 2.0 and rows["flat"]["amax_outlier_frac_3std"] is None
    legacy.write_csv(tmp_path / "s.csv", doc)
    header, *lines = (tmp_path / "s.csv").read_text().splitlines()
    assert header.split(",") == legacy.summary_fields() and len(lines) == 2


def test_layerstats_from_json_rejects_garbage():
    good = LayerStats()
    good.add([1.0, 2.0], step=1)
    d = good.to_json()
    d["buckets"]["step"][0] = "one"
    with pytest.raises(TypeError):
        LayerStats.from_json(d)


def test_queued_records_fold_like_direct_adds(monkeypatch):
    # the store queues record()/record_cond() and folds them per layer in one grouped pass; the result must be
    # what LayerStats.add / add_chunk give call by call
    import nvfp4_lab.calibration.store as store_mod

    rng = np.random.default_rng(9)
    calls = [(f"L{i % 3}", rng.lognormal(0, 0.5, int(rng.integers(1, 40))), int(rng.integers(0, 8)),
              [None, "cond"][i % 2]) for i in range(300)]
    direct: dict[str, LayerStats] = {}
    for name, v, step, cond in calls:
        direct.setdefault(name, LayerStats()).add(v, step, cond, fmt="nvfp4")
        direct[name].add_chunk(v * 0.5, step, "uncond")
    monkeypatch.setattr(store_mod, "PENDING_FOLD_VALUES", 500)   # force several intermediate folds
    s = CalibrationStore()
    for name, v, step, cond in calls:
        s.record(name, v, step=step, cond=cond, fmt="nvfp4")
        s.record_cond(name, v * 0.5, step=step, cond="uncond")
    assert s.dirty
    for name, st in direct.items():
        assert s.layers[name].same_as(st), name
    assert s.layers["L0"].chunk_buckets and s.layers["L0"].steps(cond="uncond")
    with pytest.raises(ValueError, match="negative"):
        s.record("L0", [-1.0])
    with pytest.raises(TypeError):
        s.record("L0", [1.0], cond=3)
