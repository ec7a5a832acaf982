"""`nvfp4 calib summarize|merge|import|scales`: outputs, exit codes, error lines."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from nvfp4_lab.calibration import legacy
from nvfp4_lab.calibration.store import CalibrationStore
from nvfp4_lab.cli import calib as calib_cli
from nvfp4_lab.cli import main as cli_main

SEED = Path("/work/shared/seed-data")
SUMMARY_5B = SEED / "scales_summary_wan22_5b.json"
needs_seed = pytest.mark.skipif(not SUMMARY_5B.exists(), reason="seed data /work/shared/seed-data not present")
D = 2688.0


def run(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main.main(["calib", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


def strict_load(path: Path):
    def bad(name):
        raise ValueError(f"non-standard constant {name}")
    return json.loads(Path(path).read_text(), parse_constant=bad)


@pytest.fixture()
def log_xz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(64):
        for name, mu in (("blocks.0.self_attn.q", 2.0), ("blocks.0.ffn.0", 1.0), ("blocks.1.cross_attn.k", 0.3)):
            a = float(rng.lognormal(mu, 0.3))
            lines.append(f"nvfp4\tdynamic\t{name}\t{a / D:.6f}\t{a:.6f}\t(1024, 3072)")
    lines.append("nvfp4\tprovided\tblocks.2.self_attn.o\t0.004000\t-\t(1024, 3072)")
    lines.append("dynamic\tblocks.3.legacy\t0.001000\t2.688000\t(16, 16)")
    path = tmp_path / "comfy_scales.log.xz"
    path.write_bytes(lzma.compress(("\n".join(lines) + "\n").encode()))
    return path


def test_calib_is_registered_and_needs_a_subcommand(capsys):
    assert "calib" in cli_main.COMMANDS
    rc, out, _ = run([], capsys)
    assert rc == 2 and "summarize" in out
    rc, _, err = run(["summarize", "x.json"], capsys)  # -o missing: usage error
    assert rc == 2 and "-o" in err


def test_import_summarize_scales(tmp_path, capsys, log_xz):
    store = tmp_path / "s.calib.json"
    rc, _, err = run(["import", log_xz, "-o", store], capsys)
    assert rc == 0, err
    assert "1 'provided' calls" in err and "1 legacy" in err
    st = CalibrationStore.load(store)
    assert st.layers["blocks.0.ffn.0"].count == 64 and st.layers["blocks.2.self_attn.o"].provided == {0.004: 1}

    out_json, out_csv, plots = tmp_path / "summary.json", tmp_path / "summary.csv", tmp_path / "plots"
    rc, _, err = run(["summarize", store, "-o", out_json, "--csv", out_csv, "--plots", plots,
                      "--percentiles", "99.9,50,90"], capsys)
    assert rc == 0, err
    doc = strict_load(out_json)
    assert doc["percentiles"] == [50.0, 90.0, 99.9] and doc["format"] == "nvfp4" and doc["mode"] == "dynamic"
    names = [r["layer"] for r in doc["layers"]]
    assert names == sorted(names) and "blocks.3.legacy" in names and "blocks.2.self_attn.o" not in names
    for r in doc["layers"]:
        assert r["scale_p99_9"] == r["amax_p99_9"] / D
    assert out_csv.read_text().splitlines()[0].startswith("layer,count,scale_min")
    pngs = sorted(p.name for p in plots.iterdir())
    assert "scale_cv_hist_4.png" in pngs and "kurtosis_hist_4.png" in pngs and "outlier_frac_3std_hist_4.png" in pngs
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    # the same directly from the log
    rc, _, err = run(["summarize", log_xz, "-o", tmp_path / "from_log.json"], capsys)
    assert rc == 0, err
    from_log = {r["layer"]: r for r in strict_load(tmp_path / "from_log.json")["layers"]}
    for r in doc["layers"]:
        assert (from_log[r["layer"]]["count"], from_log[r["layer"]]["amax_p99_9"]) == (r["count"], r["amax_p99_9"])
    # provided mode
    rc, _, _ = run(["summarize", store, "-o", tmp_path / "prov.json", "--mode", "provided"], capsys)
    assert rc == 0 and [r["layer"] for r in strict_load(tmp_path / "prov.json")["layers"]] == ["blocks.2.self_attn.o"]

    rc, out, err = run(["scales", store, "--method", "percentile", "--percentile", "99", "--margin", "1.0"], capsys)
    assert rc == 0, err
    assert "blocks.0.ffn.0" in out and "clip %" in out and "4 layers" in out
    rc, out, _ = run(["scales", store, "--method", "mse", "--json"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert doc["method"] == "mse" and len(doc["layers"]) == 4
    for row in doc["layers"]:
        assert row["clip_fraction"] == 0.0 and row["input_scale"] > 0


def test_existing_output_and_same_file_refused(tmp_path, capsys, log_xz):
    store = tmp_path / "s.json"
    assert run(["import", log_xz, "-o", store], capsys)[0] == 0
    rc, _, err = run(["import", log_xz, "-o", store], capsys)
    assert rc == 1 and err.startswith("error:") and "--force" in err
    assert run(["import", log_xz, "-o", store, "--force"], capsys)[0] == 0
    assert run(["import", log_xz, "-o", store, "--append"], capsys)[0] == 0
    assert CalibrationStore.load(store).layers["blocks.0.ffn.0"].count == 128
    rc, _, err = run(["summarize", store, "-o", store, "--force"], capsys)
    assert rc == 1 and "same file" in err
    rc, _, err = run(["import", store, "-o", tmp_path / "t.json"], capsys)
    assert rc == 1 and "merge" in err


def test_merge_equals_recording_both(tmp_path, capsys):
    rng = np.random.default_rng(1)
    runs = [[(f"blocks.{i % 3}.q", rng.lognormal(0, 0.5, 20), i % 5) for i in range(30)] for _ in range(3)]
    paths, both = [], CalibrationStore()
    for k, calls in enumerate(runs):
        s = CalibrationStore()
        for name, v, step in calls:
            s.record(name, v, step=step)
            both.record(name, v, step=step)
        s.count_prompt()
        both.count_prompt()
        paths.append(s.save(tmp_path / f"run{k}.json"))
    out = tmp_path / "merged.json"
    rc, _, err = run(["merge", *paths, "-o", out], capsys)
    assert rc == 0, err
    merged = CalibrationStore.load(out)
    assert merged.same_as(both) and merged.provenance["prompts"] == 3
    assert run(["merge", *paths, "-o", out], capsys)[0] == 1           # exists
    assert run(["merge", *paths, "-o", out, "--force"], capsys)[0] == 0
    rc, _, err = run(["merge", paths[0], "-o", paths[0], "--force"], capsys)
    assert rc == 1 and "same file" in err


def test_merge_different_models(tmp_path, capsys):
    a, b = CalibrationStore(), CalibrationStore()
    a.record("L", [1.0])
    b.record("L", [2.0])
    a.set_model(file="a.safetensors", header_sha256="1" * 64)
    b.set_model(file="b.safetensors", header_sha256="2" * 64)
    pa, pb = a.save(tmp_path / "a.json"), b.save(tmp_path / "b.json")
    rc, _, err = run(["merge", pa, pb, "-o", tmp_path / "m.json"], capsys)
    assert rc == 1 and "different models" in err
    assert run(["merge", pa, pb, "-o", tmp_path / "m.json", "--allow-different-models"], capsys)[0] == 0


@pytest.mark.parametrize("content, match", [
    ("{broken", "invalid JSON"),
    ('{"hello": 1}', "neither"),
])
def test_foreign_inputs_fail_with_one_line(tmp_path, capsys, content, match):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for argv in (["summarize", bad, "-o", tmp_path / "o.json"], ["scales", bad], ["merge", bad, "-o", tmp_path / "m"]):
        rc, _, err = run(argv, capsys)
        assert rc == 1 and match in err and "bad.json" in err
        assert err.count("\n") == 1 and "Traceback" not in err
    rc, _, err = run(["scales", tmp_path / "missing.json"], capsys)
    assert rc == 1 and "missing.json" in err


@needs_seed
def test_seed_summary_through_the_cli(tmp_path, capsys):
    out = tmp_path / "re.json"
    rc, _, err = run(["summarize", SUMMARY_5B, "-o", out], capsys)
    assert rc == 0, err
    doc = strict_load(out)
    assert len(doc["layers"]) == 182 and all(len(r) == 24 for r in doc["layers"])
    rc, _, err = run(["summarize", SUMMARY_5B, "-o", tmp_path / "p.json", "--percentiles", "97"], capsys)
    assert rc == 0 and "interpolated" in err
    rc, out_text, _ = run(["scales", SUMMARY_5B], capsys)        # defaults: p99.9 × 1.08
    assert rc == 0
    line = next(ln for ln in out_text.splitlines() if ln.startswith("blocks.10.cross_attn.k "))
    assert "0.000737" in line and line.endswith("~")
    rc, _, err = run(["scales", SUMMARY_5B, "--percentile", "97.5"], capsys)
    assert rc == 1 and "lists percentiles" in err
    store = tmp_path / "5b.json"
    rc, _, err = run(["import", SUMMARY_5B, "-o", store], capsys)
    assert rc == 0 and "approximate" in err
    assert all(st.approximate for st in CalibrationStore.load(store).layers.values())


def test_extension_hook(capsys):
    seen = []

    def add(sub):
        p = sub.add_parser("hello", help="test extension")
        p.set_defaults(func=lambda args: seen.append(1) or 0)

    calib_cli.register_calib_subcommand(add)
    try:
        rc, _, _ = run(["hello"], capsys)
        assert rc == 0 and seen == [1]
    finally:
        calib_cli._EXTRA_SUBCOMMANDS.remove(add)


def test_percentile_parser():
    assert legacy.parse_percentiles("99.9, 50,50") == [50.0, 99.9]
    with pytest.raises(ValueError):
        legacy.parse_percentiles("101")
    with pytest.raises(ValueError):
        legacy.parse_percentiles("abc")


def test_plots_with_steps(tmp_path, capsys, log_xz):
    from nvfp4_lab.calibration import plots
    from nvfp4_lab.quant.errors import CalibrationError

    store_path = tmp_path / "steps.json"
    assert run(["import", log_xz, "-o", store_path, "--steps", "8"], capsys)[0] == 0
    store = CalibrationStore.load(store_path)
    assert sorted(s for s in store.layers["blocks.0.ffn.0"].steps()) == list(range(8))
    top = plots.most_variable_layers(store, 2)
    assert len(top) == 2 and top[0][1] >= top[1][1]
    png = plots.amax_vs_step(store, top_n=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, err = run(["summarize", store_path, "-o", tmp_path / "s.json", "--plots", tmp_path / "p"], capsys)
    assert rc == 0, err
    assert (tmp_path / "p" / "amax_vs_step.png").exists() and (tmp_path / "p" / "scale_cv_ranking.png").exists()
    assert plots.ranking_bar([], [], title="t", xlabel="x")[:4] == b"\x89PNG"
    assert plots.ranking_bar(["a", "b"], [1.0, float("nan")], title="t", xlabel="x")[:4] == b"\x89PNG"
    no_steps = CalibrationStore()
    no_steps.record("L", [1.0, 2.0])
    with pytest.raises(CalibrationError, match="per-step"):
        plots.amax_vs_step(no_steps)
