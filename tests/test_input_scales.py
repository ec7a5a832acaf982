"""quant.input_scales: sources (none / value / reference file / calibration summary), their priority, validation,
the missing-percentile error, FP8 amax/448 scales, and the report of layers left dynamic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from plan_fakes import FakeCheckpoint, fake_block_of, wan_arch, wan_preset, wan_tensors
from safetensors.torch import save_file

from nvfp4_lab.quant import formats
from nvfp4_lab.quant.errors import CalibrationError, PlanError
from nvfp4_lab.quant.input_scales import InputScaleOptions, assign_input_scales, reference_scales
from nvfp4_lab.quant.plan import Plan
from nvfp4_lab.quant.rules import PlanOptions, build_plan

SEED = Path("/work/shared/seed-data")
if not SEED.is_dir():
    SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data"
SUMMARY_5B = SEED / "scales_summary_wan22_5b.json"
needs_seed = pytest.mark.skipif(not SUMMARY_5B.is_file(), reason=f"seed data not found ({SEED})")

NV, W4, FP8 = formats.NVFP4, formats.NVFP4_W4A16, formats.FP8


def make_plan(blocks=30, scales=None, **kw) -> Plan:
    ck = FakeCheckpoint(wan_tensors(blocks))
    opts = PlanOptions(input_scale=scales or InputScaleOptions(), **kw)
    return build_plan(ck, opts, arch=wan_arch(blocks), preset=wan_preset(), block_of=fake_block_of)


def nvfp4_layer(sd: dict, name: str, out: int, inp: int, input_scale, fmt=formats.NVFP4) -> None:
    (wr, wc), (sr, sc) = formats.nvfp4_storage_shapes(out, inp)
    sd[f"{name}.weight"] = torch.zeros(wr, wc, dtype=torch.uint8)
    sd[f"{name}.weight_scale"] = torch.zeros(sr, sc, dtype=torch.float8_e4m3fn)
    sd[f"{name}.weight_scale_2"] = torch.tensor(0.01, dtype=torch.float32)
    sd[f"{name}.bias"] = torch.zeros(out, dtype=torch.bfloat16)
    if input_scale is not None:
        sd[f"{name}.input_scale"] = input_scale
    sd[f"{name}.comfy_quant"] = formats.encode_comfy_quant(formats.comfy_quant_config(fmt))


def write_reference(path: Path, extra: bool = False) -> Path:
    sd: dict[str, torch.Tensor] = {}
    nvfp4_layer(sd, "blocks.3.ffn.0", 128, 256, torch.tensor([0.0123], dtype=torch.float32))       # shape [1]
    nvfp4_layer(sd, "blocks.3.self_attn.q", 64, 256, torch.tensor(0.02, dtype=torch.bfloat16))     # bf16 0-dim
    nvfp4_layer(sd, "blocks.4.cross_attn.k", 64, 256, torch.tensor(0.03), fmt=formats.NVFP4_W4A16)
    sd["blocks.4.ffn.2.weight"] = torch.zeros(64, 256, dtype=torch.float8_e4m3fn)                  # FP8 layer
    sd["blocks.4.ffn.2.weight_scale"] = torch.tensor(0.1)
    sd["blocks.4.ffn.2.input_scale"] = torch.tensor(0.5)
    sd["blocks.4.ffn.2.comfy_quant"] = formats.encode_comfy_quant({"format": "float8_e4m3fn"})
    sd["blocks.5.self_attn.q.weight"] = torch.zeros(64, 256, dtype=torch.bfloat16)
    if extra:
        nvfp4_layer(sd, "blocks.3.ffn.00", 128, 256, torch.tensor(0.01))
    save_file(sd, str(path))
    return path


# ---------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("kw, msg", [
    (dict(value=0.0), "finite number > 0"), (dict(value=-1.0), "finite number > 0"),
    (dict(value=math.nan), "finite number > 0"), (dict(value=math.inf), "finite number > 0"),
    (dict(none=True, value=0.1), "--no-input-scale contradicts --input-scale-value"),
    (dict(none=True, calibration="x.json"), "contradicts --input-scale-summary"),
    (dict(margin=0.0), "margin"), (dict(percentile=0.0), "percentile"), (dict(percentile=101), "percentile"),
    (dict(method="mean"), "method"), (dict(fp8=True), "--fp8-input-scale needs calibration"),
])
def test_option_validation(kw, msg):
    with pytest.raises(PlanError, match=msg):
        InputScaleOptions(**kw).validate()


def test_default_is_dynamic_and_no_note():
    p = make_plan(8)
    assert all(d.input_scale is None for d in p.layers.values())
    assert p.report["missing_input_scale"] == p.by_format(NV)
    assert not any("no input_scale source" in n for n in p.notes)   # nothing was asked for


def test_none_is_explicit():
    p = make_plan(8, InputScaleOptions(none=True))
    assert all(d.input_scale is None for d in p.layers.values())
    assert any("none requested" in n for n in p.notes)


def test_fixed_value_for_nvfp4_layers_only():
    p = make_plan(8, InputScaleOptions(value=0.002), fp8=[r"blocks\.3\.ffn\.0"], w4a16=[r"blocks\.4\.ffn\.0"])
    assert p.layers["blocks.3.self_attn.q"].input_scale == 0.002
    assert p.layers["blocks.3.self_attn.q"].input_scale_source == "value"
    assert p.layers["blocks.4.ffn.0"].format == W4 and p.layers["blocks.4.ffn.0"].input_scale == 0.002
    assert p.layers["blocks.3.ffn.0"].format == FP8 and p.layers["blocks.3.ffn.0"].input_scale is None
    assert p.layers["head.head"].input_scale is None
    assert "missing_input_scale" not in p.report


# ---------------------------------------------------------------------------------------------------- calibration
@needs_seed
def test_summary_percentile_times_margin_golden():
    p = make_plan(30, InputScaleOptions(calibration=str(SUMMARY_5B), percentile=99.9, margin=1.08))
    row = {r["layer"]: r for r in json.loads(SUMMARY_5B.read_text())["layers"]}["blocks.10.cross_attn.k"]
    d = p.layers["blocks.10.cross_attn.k"]
    assert d.input_scale == pytest.approx(row["amax_p99_9"] * 1.08 / 2688, rel=1e-12)
    assert d.input_scale == pytest.approx(0.00073764, rel=1e-3)
    p99 = make_plan(30, InputScaleOptions(calibration=str(SUMMARY_5B), percentile=99, margin=1.0))
    assert p99.layers["blocks.10.cross_attn.k"].input_scale == pytest.approx(0.000683, rel=2e-3)
    # the preset keeps v/ffn.2 and edge blocks: the summary covers exactly the NVFP4 layers here
    assert "missing_input_scale" not in p.report


@needs_seed
def test_missing_percentile_is_an_error_not_a_fallback():
    with pytest.raises(CalibrationError, match="lists percentiles 50, 90, 95, 99, 99.9 only"):
        make_plan(30, InputScaleOptions(calibration=str(SUMMARY_5B), percentile=99.5))


@needs_seed
def test_summary_for_another_model_is_refused_with_suggestions():
    # an 8-block model: the 5B summary names blocks 8..27, which do not exist
    with pytest.raises(PlanError, match=r"calibration .*: 140 name\(s\) are not layers of the model.*another model"):
        make_plan(8, InputScaleOptions(calibration=str(SUMMARY_5B)))
    p = make_plan(8, InputScaleOptions(calibration=str(SUMMARY_5B)), allow_unmatched=True)
    assert p.layers["blocks.3.ffn.0"].input_scale_source.startswith("calibration:")
    assert any("ignored (allow_unmatched)" in n for n in p.notes)


@needs_seed
def test_layers_without_source_are_listed():
    # mode all quantizes v / ffn.2 / edge blocks too: the summary does not cover them
    p = make_plan(30, InputScaleOptions(calibration=str(SUMMARY_5B)), mode="all")
    missing = p.report["missing_input_scale"]
    assert "blocks.3.self_attn.v" in missing and "blocks.0.ffn.2" in missing
    assert all(p.layers[n].format == NV and p.layers[n].input_scale is None for n in missing)
    assert any(f"{len(missing)} W4A4 layer(s) have no input_scale source and stay dynamic" in n for n in p.notes)
    # ... unless a fixed value fills the gaps (calibration wins where it has data)
    p = make_plan(30, InputScaleOptions(calibration=str(SUMMARY_5B), value=0.003), mode="all")
    assert p.layers["blocks.3.self_attn.v"].input_scale == 0.003
    assert p.layers["blocks.3.self_attn.q"].input_scale_source.startswith("calibration:")
    assert "missing_input_scale" not in p.report


@needs_seed
def test_fp8_layers_get_amax_over_448():
    scales = InputScaleOptions(calibration=str(SUMMARY_5B), margin=1.08, fp8=True)
    p = make_plan(30, scales, fp8=[r"blocks\.5\.ffn\.0", r"blocks\.5\.self_attn\.v"])
    row = {r["layer"]: r for r in json.loads(SUMMARY_5B.read_text())["layers"]}["blocks.5.ffn.0"]
    d = p.layers["blocks.5.ffn.0"]
    assert d.format == FP8 and d.input_scale == pytest.approx(row["amax_p99_9"] * 1.08 / 448, rel=1e-12)
    assert d.input_scale_source.endswith("amax/448")
    assert p.layers["blocks.5.self_attn.v"].input_scale is None          # not calibrated: ComfyUI uses 1.0
    assert any("1 FP8 layer(s) have no calibration data" in n for n in p.notes)
    p = make_plan(30, InputScaleOptions(calibration=str(SUMMARY_5B)), fp8=[r"blocks\.5\.ffn\.0"])
    assert p.layers["blocks.5.ffn.0"].input_scale is None                 # only with fp8=True


def test_missing_calibration_file():
    with pytest.raises(CalibrationError, match="no such file"):
        make_plan(8, InputScaleOptions(calibration="/nonexistent/summary.json"))


# ---------------------------------------------------------------------------------------------------- reference file
def test_reference_file_scales(tmp_path):
    ref = write_reference(tmp_path / "ref.safetensors")
    got = reference_scales(ref)
    assert got["blocks.3.ffn.0"] == (pytest.approx(0.0123), NV)           # [1] coerced to a number
    assert got["blocks.3.self_attn.q"][0] == pytest.approx(0.02, rel=1e-2)
    assert got["blocks.4.ffn.2"] == (0.5, FP8)
    assert "blocks.5.self_attn.q" not in got
    p = make_plan(8, InputScaleOptions(reference=str(ref), value=0.001), w4a16=[r"blocks\.4\.cross_attn\.k"],
                  fp8=[r"blocks\.4\.ffn\.2"], include=[r"blocks\.4\.ffn\.2"])
    assert p.layers["blocks.3.ffn.0"].input_scale == pytest.approx(0.0123)
    assert p.layers["blocks.3.ffn.0"].input_scale_source == "reference:ref.safetensors"
    assert p.layers["blocks.4.cross_attn.k"].input_scale == pytest.approx(0.03)   # W4A16 keeps a scale too
    assert p.layers["blocks.4.ffn.2"].input_scale == 0.5                          # FP8 -> FP8 family only
    assert p.layers["blocks.5.self_attn.q"].input_scale == 0.001                  # value fills the rest
    assert isinstance(p.layers["blocks.3.ffn.0"].input_scale, float)


def test_reference_has_priority_over_calibration(tmp_path):
    ref = write_reference(tmp_path / "ref.safetensors")

    def fake_select(store, **kw):
        return {"blocks.3.ffn.0": 0.5, "blocks.4.ffn.0": 0.25}

    p = make_plan(8)
    assign_input_scales(p, InputScaleOptions(reference=str(ref), calibration="cal.json", value=0.1),
                        known_layers=set(FakeCheckpoint(wan_tensors(8)).layers()),
                        load_calibration_fn=lambda path: object(), select=fake_select)
    assert p.layers["blocks.3.ffn.0"].input_scale_source == "reference:ref.safetensors"   # reference > calibration
    assert p.layers["blocks.4.ffn.0"].input_scale == 0.25                                # calibration > value
    assert p.layers["blocks.5.ffn.0"].input_scale == 0.1
    assert any("priority: reference > calibration > value" in n for n in p.notes)


def test_reference_family_mismatch_is_noted(tmp_path):
    ref = write_reference(tmp_path / "ref.safetensors")
    p = make_plan(8, InputScaleOptions(reference=str(ref)), include=[r"blocks\.4\.ffn\.2"])
    assert p.layers["blocks.4.ffn.2"].format == NV and p.layers["blocks.4.ffn.2"].input_scale is None
    assert any("different format family here (not copied), e.g. blocks.4.ffn.2" in n for n in p.notes)


def test_reference_names_are_validated(tmp_path):
    ref = write_reference(tmp_path / "ref.safetensors", extra=True)
    with pytest.raises(PlanError, match=r"'blocks\.3\.ffn\.00' \(did you mean 'blocks\.3\.ffn\.0'"):
        make_plan(8, InputScaleOptions(reference=str(ref)))


def test_bad_calibration_value_is_an_error():
    p = make_plan(8)
    with pytest.raises(CalibrationError, match="layer blocks.3.ffn.0 gives input_scale nan"):
        assign_input_scales(p, InputScaleOptions(calibration="c.json"), known_layers=set(p.layers),
                            load_calibration_fn=lambda path: object(),
                            select=lambda s, **kw: {"blocks.3.ffn.0": math.nan})
