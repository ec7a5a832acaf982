"""quant.rules / quant.layer_lists: precedence per option family, every original flag's equivalent, the author's
recipes, name validation, glued list lines, regexes that match nothing, and the CLI option group."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from plan_fakes import (FakeCheckpoint, Rule, fake_block_of, flux_arch, flux_preset, flux_tensors, wan_arch,
                        wan_preset, wan_q5_k_m_layout, wan_tensors, write_gguf)

from nvfp4_lab.cli.plan import add_plan_options, plan_options_from_args
from nvfp4_lab.quant import formats
from nvfp4_lab.quant.errors import PlanError
from nvfp4_lab.quant.input_scales import InputScaleOptions
from nvfp4_lab.quant.layer_lists import normalize_name, resolve_layer_list, split_glued, suggest
from nvfp4_lab.quant.rules import W4A16_SHORTCUTS, PlanOptions, apply_overrides, build_plan

SEED = Path("/work/shared/seed-data")
if not SEED.is_dir():  # the repo-relative location used by CI checkouts
    SEED = Path(__file__).resolve().parents[2] / "shared" / "seed-data"
needs_seed = pytest.mark.skipif(not SEED.is_dir(), reason=f"seed data not found ({SEED})")

NV, W4, FP8 = formats.NVFP4, formats.NVFP4_W4A16, formats.FP8


def plan_wan(blocks: int = 8, preset=None, **kw):
    ck = FakeCheckpoint(wan_tensors(blocks))
    return build_plan(ck, PlanOptions(**kw), arch=wan_arch(blocks), preset=preset or wan_preset(),
                      block_of=fake_block_of)


def fmt(plan, name):
    return plan.layers[name].format


# ---------------------------------------------------------------------------------------------------- base rules
def test_preset_base_rules_and_reasons():
    p = plan_wan()
    assert fmt(p, "head.head") == "fp32" and p.layers["head.head"].reason.startswith("never_quantize")
    assert fmt(p, "blocks.0.self_attn.q") == "fp32"          # first 2 blocks
    assert "preset.edge_blocks" in p.layers["blocks.7.ffn.0"].reason
    assert fmt(p, "blocks.3.self_attn.v") == "fp32"          # preset keep
    assert p.layers["blocks.3.self_attn.v"].reason.startswith("preset.keep:")
    assert fmt(p, "blocks.3.self_attn.q") == NV
    # every Linear is planned, nothing else is
    assert "blocks.3.self_attn.norm_q" not in p.layers and "patch_embedding" not in p.layers
    assert "blocks.3.modulation" not in p.layers


def test_other_dtype_applies_to_kept_layers_and_fp32_keep_never_upcasts():
    p = plan_wan(other_dtype="fp16")
    assert fmt(p, "blocks.3.self_attn.v") == "fp16"
    assert p.tensor_dtypes.get("patch_embedding.weight") == "fp32"   # preset keep_fp32, source fp32
    ck = FakeCheckpoint(wan_tensors(8, dtype="BF16"))
    p2 = build_plan(ck, PlanOptions(other_dtype="fp16"), arch=wan_arch(8), preset=wan_preset(), block_of=fake_block_of)
    assert "patch_embedding.weight" not in p2.tensor_dtypes          # bf16 source: no up-cast to fp32
    assert p2.dtype_for_tensor("blocks.3.norm3.weight", "BF16") == "fp16"
    p3 = plan_wan()  # keep = source dtype
    assert p3.dtype_for_tensor("blocks.3.norm3.weight", "F32") == "fp32"
    assert p3.dtype_for_tensor("blocks.3.ffn.0.bias", "F32") == "fp32"


def test_mode_all_quantizes_everything_but_never_quantize():
    p = plan_wan(mode="all")
    assert fmt(p, "head.head") == "fp32"                      # never_quantize survives mode all
    assert fmt(p, "blocks.0.self_attn.q") == NV               # preset edge blocks ignored
    assert fmt(p, "blocks.3.self_attn.v") == NV               # preset keep ignored
    assert fmt(p, "text_embedding.0") == "fp32"               # never_quantize in the fake preset
    assert p.layers["blocks.3.ffn.2"].reason == "mode all: every Linear layer"


def test_preset_fp8_needs_use_fp8():
    pre = wan_preset(fp8=(Rule(r"blocks\.\d+\.ffn\.0", "test"),))
    p = plan_wan(preset=pre)
    assert fmt(p, "blocks.3.ffn.0") == "fp32" and "fp8 not allowed" in p.layers["blocks.3.ffn.0"].reason
    p = plan_wan(preset=pre, fp8_instead_of_keep=True)
    assert fmt(p, "blocks.3.ffn.0") == FP8


def test_min_size_rules():
    p = plan_wan(min_params=64 * 256 + 1)
    assert fmt(p, "blocks.3.self_attn.q") == "fp32" and p.layers["blocks.3.self_attn.q"].reason.startswith("min_params")
    assert fmt(p, "blocks.3.ffn.0") == NV                     # 128x256 is large enough
    p = plan_wan(min_dim=65)
    assert fmt(p, "blocks.3.self_attn.q") == "fp32" and fmt(p, "blocks.3.ffn.0") == NV
    # include beats the size rule
    p = plan_wan(min_dim=65, include=[r"blocks\.3\.self_attn\.q"])
    assert fmt(p, "blocks.3.self_attn.q") == NV


def test_keep_first_last_replace_preset_values_and_work_per_group():
    p = plan_wan(keep_first=0, keep_last=0)
    assert fmt(p, "blocks.0.self_attn.q") == NV and fmt(p, "blocks.7.self_attn.q") == NV
    p = plan_wan(keep_first=3)
    assert fmt(p, "blocks.2.self_attn.q") == "fp32" and "keep_edge" in p.layers["blocks.2.self_attn.q"].reason
    assert fmt(p, "blocks.6.self_attn.q") == "fp32"           # preset's keep_last (2) still applies
    # Flux: every block group
    ck = FakeCheckpoint(flux_tensors(4, 6))
    p = build_plan(ck, PlanOptions(preset="none", keep_first=1, keep_last=2), arch=flux_arch(4, 6),
                   preset=flux_preset(keep_first_blocks=0, keep_last_blocks=0),
                   block_of=fake_block_of)
    assert fmt(p, "double_blocks.0.img_attn.qkv") == "bf16" and fmt(p, "double_blocks.1.img_attn.qkv") == NV
    assert fmt(p, "double_blocks.2.img_attn.qkv") == "bf16" and fmt(p, "single_blocks.0.linear1") == "bf16"
    assert fmt(p, "single_blocks.3.linear1") == NV and fmt(p, "single_blocks.4.linear1") == "bf16"


def test_preset_none():
    ck = FakeCheckpoint(wan_tensors(4))
    p = build_plan(ck, PlanOptions(preset="none"), arch=wan_arch(4), block_of=fake_block_of)
    assert p.preset == "none" and set(p.counts()) == {NV}


# ---------------------------------------------------------------------------------------------------- user regexes
def test_exclude_include_fp8_precedence():
    # exclude -> keep; include beats exclude and preset keep/edge; fp8 beats include
    p = plan_wan(exclude=[r"self_attn"], include=[r"blocks\.3\.self_attn\.q", r"blocks\.0\.ffn\.0"],
                 fp8=[r"blocks\.3\.self_attn\.q$"])
    assert fmt(p, "blocks.4.self_attn.q") == "fp32" and p.layers["blocks.4.self_attn.q"].reason.startswith("exclude")
    assert fmt(p, "blocks.0.ffn.0") == NV                     # include over preset.edge_blocks
    assert "[over preset.edge_blocks" in p.layers["blocks.0.ffn.0"].reason
    assert fmt(p, "blocks.3.self_attn.q") == FP8
    assert p.layers["blocks.3.self_attn.q"].reason.startswith("fp8: /blocks")
    assert "include" in p.layers["blocks.3.self_attn.q"].reason and "exclude" in p.layers["blocks.3.self_attn.q"].reason


def test_user_regexes_are_case_insensitive_search():
    p = plan_wan(exclude=["FFN\\.2"])
    assert p.layers["blocks.3.ffn.2"].reason.startswith("exclude")
    p = plan_wan(w4a16=["CROSS_ATTN\\.Q"])
    assert fmt(p, "blocks.3.cross_attn.q") == W4


def test_never_quantize_cannot_be_overridden_and_is_reported():
    p = plan_wan(include=["head"], fp8=["head\\.head"], w4a16=["ffn"])
    assert fmt(p, "head.head") == "fp32"
    joined = "\n".join(p.notes)
    assert "include /head/ hits 1 never_quantize layer(s) (kept): head.head" in joined
    assert "fp8 /head\\.head/ hits 1 never_quantize" in joined
    assert p.report["warnings"]


@pytest.mark.parametrize("option", ["include", "exclude", "fp8", "w4a16"])
def test_regex_matching_nothing_is_an_error_naming_it(option):
    with pytest.raises(PlanError, match=r"regex /blocks\\.99\\./ matches no Linear layer"):
        plan_wan(**{option: [r"blocks\.99\."]})
    p = plan_wan(allow_unmatched=True, **{option: [r"blocks\.99\."]})
    assert any("blocks\\.99\\." in n and "allow_unmatched" in n for n in p.notes)


def test_regex_matching_only_non_linear_layers_says_so():
    with pytest.raises(PlanError, match="matches only .* non-Linear layer"):
        plan_wan(exclude=[r"norm_q"])


def test_invalid_regex_is_a_plan_error():
    with pytest.raises(PlanError, match=r"include regex /\(/ is invalid"):
        plan_wan(include=["("])


# ---------------------------------------------------------------------------------------------------- W4A16
@pytest.mark.parametrize("short, hit, miss", [
    ("cross-attn-kv", "blocks.3.cross_attn.k", "blocks.3.cross_attn.q"),
    ("cross-attn-qkvo", "blocks.3.cross_attn.q", "blocks.3.self_attn.q"),
    ("self-attn-qkvo", "blocks.3.self_attn.o", "blocks.3.cross_attn.o"),
    ("ffn-up", "blocks.3.ffn.0", "blocks.3.self_attn.q"),
    ("ffn-down", "blocks.3.ffn.2", "blocks.3.ffn.0"),
])
def test_w4a16_shortcuts(short, hit, miss):
    p = plan_wan(mode="all", w4a16_shortcuts=[short])
    assert fmt(p, hit) == W4 and p.layers[hit].reason.startswith(f"w4a16: shortcut {short}")
    assert fmt(p, miss) == NV


def test_cross_attn_w4a16_contract_field_and_all():
    p = plan_wan(mode="all", cross_attn_w4a16="kv")
    assert fmt(p, "blocks.3.cross_attn.v") == W4 and fmt(p, "blocks.3.cross_attn.o") == NV
    p = plan_wan(w4a16_all=True)
    assert p.counts().get(NV, 0) == 0 and p.counts()[W4] > 0
    assert fmt(p, "head.head") == "fp32"


def test_w4a16_touches_only_nvfp4_and_reports_the_rest():
    p = plan_wan(w4a16_shortcuts=["cross-attn-kv"])   # preset keeps v, edge blocks kept
    assert fmt(p, "blocks.3.cross_attn.v") == "fp32" and fmt(p, "blocks.3.cross_attn.k") == W4
    note = next(n for n in p.notes if n.startswith("w4a16: shortcut cross-attn-kv"))
    assert "not nvfp4 here" in note and "blocks.0.cross_attn.k (kept)" in note


def test_shortcut_without_matching_architecture_is_an_error():
    ck = FakeCheckpoint(flux_tensors())
    with pytest.raises(PlanError, match="cross-attn-qkvo matches no Linear layer of this flux"):
        build_plan(ck, PlanOptions(cross_attn_w4a16="qkvo"), arch=flux_arch(), preset=flux_preset(),
                   block_of=fake_block_of)
    p = build_plan(ck, PlanOptions(w4a16_shortcuts=["ffn-down", "self-attn-qkvo"]), arch=flux_arch(),
                   preset=flux_preset(), block_of=fake_block_of)
    assert fmt(p, "double_blocks.1.img_mlp.2") == W4 and fmt(p, "double_blocks.1.txt_attn.qkv") == W4
    assert fmt(p, "double_blocks.1.img_mlp.0") == NV


def test_min_ffn_fp8_and_min_ffn2_keep():
    p = plan_wan(mode="all", min_ffn_fp8=True)
    assert fmt(p, "blocks.3.ffn.0") == FP8 and fmt(p, "blocks.3.ffn.2") == FP8   # even without --use-fp8
    p = plan_wan(mode="all", min_ffn_fp8=True, min_ffn2_keep=True)
    assert fmt(p, "blocks.3.ffn.0") == FP8 and fmt(p, "blocks.3.ffn.2") == "fp32"
    assert p.layers["blocks.3.ffn.2"].reason.startswith("min_ffn2_keep")


def write_list(tmp_path, text, name="list.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_w4a16_file_validation_and_reports(tmp_path):
    lst = write_list(tmp_path, "# comment\n\nblocks.3.ffn.0\nmodel.diffusion_model.blocks.4.ffn.0.weight  # x\n"
                               "blocks.3.cross_attn.norm_q\nblocks.0.ffn.0\n")
    p = plan_wan(w4a16_files=[lst])
    assert fmt(p, "blocks.3.ffn.0") == W4 and fmt(p, "blocks.4.ffn.0") == W4
    assert p.layers["blocks.4.ffn.0"].reason.startswith("w4a16: list list.txt line 4")
    joined = "\n".join(p.notes)
    assert "1 name(s) are not Linear layers (no W4A16 effect): blocks.3.cross_attn.norm_q" in joined
    assert "blocks.0.ffn.0 (kept)" in joined


def test_unknown_list_name_suggests_closest(tmp_path):
    lst = write_list(tmp_path, "blocks.3.cross_atn.k\nblocks.3.ffn.0\n")
    with pytest.raises(PlanError, match=r"'blocks\.3\.cross_atn\.k' \(did you mean 'blocks\.3\.cross_attn\.k'") as e:
        plan_wan(w4a16_files=[lst])
    assert "line 1" in str(e.value)
    p = plan_wan(w4a16_files=[lst], allow_unmatched=True)
    assert fmt(p, "blocks.3.ffn.0") == W4 and any("cross_atn" in n for n in p.notes)


def test_missing_list_file():
    with pytest.raises(PlanError, match="layer list file not found"):
        plan_wan(w4a16_files=["/nonexistent/list.txt"])


def test_glued_lines_split_or_error(tmp_path):
    known = {"blocks.8.ffn.0", "blocks.0.cross_attn.k", "blocks.8.ffn.2", "blocks.1.ffn.0", "blocks.10.ffn.0"}
    assert split_glued("blocks.8.ffn.0blocks.0.cross_attn.k", known) == ["blocks.8.ffn.0", "blocks.0.cross_attn.k"]
    assert split_glued("blocks.8.ffn.0", known) is None              # a single name is not glued
    assert split_glued("blocks.8.ffn.0blocks.9", known) is None
    lst = write_list(tmp_path, "blocks.3.ffn.0blocks.4.self_attn.q\n")
    p = plan_wan(w4a16_files=[lst])
    assert fmt(p, "blocks.3.ffn.0") == W4 and fmt(p, "blocks.4.self_attn.q") == W4
    assert any("2 names glued together" in n for n in p.notes)
    assert "glued line split" in p.layers["blocks.3.ffn.0"].reason
    with pytest.raises(PlanError, match="glued together .* put each name on its own line"):
        plan_wan(w4a16_files=[lst], glued="error")


def test_name_helpers():
    assert normalize_name(" model.diffusion_model.blocks.1.ffn.0.weight ") == "blocks.1.ffn.0"
    assert suggest("blocks.1.ffn0", ["blocks.1.ffn.0", "blocks.1.ffn.2", "head.head"])[0] == "blocks.1.ffn.0"
    assert suggest("blocks.1.cros_attn.k", ["blocks.1.cross_attn.k", "blocks.1.self_attn.k"])[0] == \
        "blocks.1.cross_attn.k"
    assert suggest("zzz", ["blocks.1.ffn.0"]) == []


# ---------------------------------------------------------------------------------------------------- overrides hook
def test_apply_overrides_extension_point():
    p = plan_wan()
    changed = apply_overrides(p, {"blocks.3.ffn.0": ("fp8", "sensitive"), "head.head": ("nvfp4", "x"),
                                  "blocks.4.ffn.0": ("keep", "probe")})
    assert changed == ["blocks.3.ffn.0", "blocks.4.ffn.0"]
    assert fmt(p, "blocks.3.ffn.0") == FP8 and p.layers["blocks.3.ffn.0"].reason.startswith("override: sensitive")
    assert fmt(p, "blocks.4.ffn.0") == "fp32"                 # keep = source dtype
    assert fmt(p, "head.head") == "fp32" and any("never_quantize" in n for n in p.notes)
    with pytest.raises(PlanError, match="did you mean 'blocks.3.ffn.0'"):
        apply_overrides(p, {"blocks.3.ffn0": ("fp8", "x")})
    with pytest.raises(PlanError, match="not a format"):
        apply_overrides(p, {"blocks.3.ffn.0": ("int4", "x")})


def test_budget_options_need_both():
    with pytest.raises(PlanError, match="--budget needs --sensitivity"):
        plan_wan(budget="9GB")


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, msg", [
    (dict(mode="safe"), "--mode preset --min-dim 256"),
    (dict(other_dtype="int8"), "other dtype"),
    (dict(keep_first=-1), "--keep-first"),
    (dict(gguf_max_bits=0), "--gguf-max-bits"),
    (dict(gguf_keep_edge_blocks=True), "needs --gguf"),
    (dict(w4a16_shortcuts=["ffn-middle"]), "shortcut"),
    (dict(glued="join"), "glued"),
])
def test_option_validation(kw, msg):
    with pytest.raises(PlanError, match=msg):
        plan_wan(**kw)


def test_unknown_preset_name_suggests():
    ck = FakeCheckpoint(wan_tensors(4))
    with pytest.raises(PlanError, match="preset 'wann' is unknown \\(did you mean 'wan'\\?\\)"):
        build_plan(ck, PlanOptions(preset="wann"), arch=wan_arch(4), block_of=fake_block_of)


def test_preset_from_a_json_file(tmp_path):
    from nvfp4_lab.quant.presets import load_preset
    data = load_preset("wan").to_dict()
    data.update(name="mywan", keep_first_blocks=0, keep_last_blocks=3)
    path = tmp_path / "mywan.json"
    path.write_text(json.dumps(data))
    p = build_plan(FakeCheckpoint(wan_tensors(8)), PlanOptions(preset=str(path)), arch=wan_arch(8),
                   block_of=fake_block_of)
    assert p.preset == "mywan" and fmt(p, "blocks.1.self_attn.q") == NV and fmt(p, "blocks.5.self_attn.q") == "fp32"


def test_architecture_without_preset_or_with_diffusers_names():
    from plan_fakes import FakeArch
    ck = FakeCheckpoint(wan_tensors(4))
    generic = FakeArch("mystery", "mystery-1", {"blocks": 4}, "mystery")   # a family without a preset file
    with pytest.raises(PlanError, match="no preset for this architecture .*--preset none"):
        build_plan(ck, PlanOptions(), arch=generic, block_of=fake_block_of)
    assert build_plan(ck, PlanOptions(preset="none"), arch=generic, block_of=fake_block_of).counts() == {NV: 46}
    diffusers = FakeArch("wan", "wan2.1-t2v", {"blocks": 4}, "wan", naming="diffusers")
    with pytest.raises(PlanError, match="diffusers key names"):
        build_plan(ck, PlanOptions(), arch=diffusers, block_of=fake_block_of)


# ---------------------------------------------------------------------------------------------------- CLI options
def parse(argv):
    parser = argparse.ArgumentParser()
    add_plan_options(parser)
    return plan_options_from_args(parser.parse_args(argv))


def test_original_flag_aliases_map_to_options():
    o = parse(["-i", "a", "-x", "b", "-F", "--min-ffn-fp8", "--min-ffn2-fp16", "--gguf", "g.gguf",
               "--gguf-nvfp4-max-bitdepth", "5", "--gguf-keep-edge-blocks-fp16", "--full-precision-mm-layers", "l.txt",
               "--full-precision-mm-pattern", "p", "--full-precision-mm-cross-attn-kv",
               "--full-precision-mm-cross-attn-qkvo", "--full-precision-mm-self-attn-qkvo",
               "--full-precision-mm-ffn-up",
               "--full-precision-mm-ffn-down", "--full-precision-mm", "--input-scale-summary-json", "s.json",
               "--input-scale-summary-percentile", "99.9", "--input-scale-summary-multiplier", "1.08",
               "--input-scale-from", "ref.safetensors", "--input-scale-value", "0.002", "-m", "all", "-p", "wan"])
    assert o.include == ["a"] and o.exclude == ["b"] and o.fp8_instead_of_keep and o.min_ffn_fp8 and o.min_ffn2_keep
    assert o.gguf == "g.gguf" and o.gguf_max_bits == 5 and o.gguf_keep_edge_blocks
    assert o.w4a16_files == ["l.txt"] and o.w4a16 == ["p"] and o.w4a16_all
    assert o.w4a16_shortcuts == list(W4A16_SHORTCUTS)
    s = o.input_scale
    assert (s.calibration, s.percentile, s.margin, s.reference, s.value) == ("s.json", 99.9, 1.08,
                                                                           "ref.safetensors", 0.002)
    assert o.mode == "all" and o.preset == "wan"


def test_cli_defaults_and_new_flags():
    o = parse([])
    assert o == PlanOptions(input_scale=InputScaleOptions())
    o = parse(["--other-dtype", "float16", "--keep-first", "2", "--keep-last", "3", "--min-params", "12000",
               "--min-dim", "256", "--fp8", "ffn", "--w4a16", "q", "--no-input-scale", "--allow-unmatched",
               "--glued", "error", "--fp8-input-scale", "--input-scale-method", "max"])
    assert (o.other_dtype, o.keep_first, o.keep_last, o.min_params, o.min_dim) == ("fp16", 2, 3, 12000, 256)
    assert o.fp8 == ["ffn"] and o.w4a16 == ["q"] and o.input_scale.none and o.allow_unmatched and o.glued == "error"
    assert o.input_scale.fp8 and o.input_scale.method == "max"


def test_options_dict_round_trip():
    o = PlanOptions(include=["a"], input_scale=InputScaleOptions(value=0.1), keep_first=2)
    assert PlanOptions.from_dict(o.to_dict()) == o
    with pytest.raises(PlanError, match="unknown plan option"):
        PlanOptions.from_dict({"inclde": []})


# ---------------------------------------------------------------------------------------------------- recipes (§8.4)
def recipe_plan(tmp_path, blocks, seed_list, summary, use_fp8=False, list_path=None, **kw):
    """The author's final command on a synthetic Wan key map with the Q5_K_M GGUF layout, real preset/arch."""
    model = wan_tensors(blocks)
    gguf = write_gguf(tmp_path / f"wan{blocks}.gguf", wan_q5_k_m_layout(model))
    ck = FakeCheckpoint(model, path=f"wan{blocks}_fp32.safetensors")
    opts = PlanOptions(gguf=str(gguf), gguf_max_bits=5, gguf_keep_edge_blocks=True, other_dtype="fp16",
                       fp8_instead_of_keep=use_fp8,
                       input_scale=InputScaleOptions(calibration=str(SEED / summary), percentile=99.9, margin=1.08),
                       w4a16_files=[list_path or str(SEED / seed_list)], cross_attn_w4a16="qkvo", **kw)
    return build_plan(ck, opts)   # real architecture detection and preset


@needs_seed
def test_recipe_wan22_5b(tmp_path):
    p = recipe_plan(tmp_path, 30, "sensitive_layers_wan22_5b.txt", "scales_summary_wan22_5b.json")
    nv = p.by_format(NV, W4)
    assert len(nv) == 182
    assert {n.split(".", 2)[2] for n in nv} == {"self_attn.q", "self_attn.k", "self_attn.o", "cross_attn.q",
                                                 "cross_attn.k", "cross_attn.o", "ffn.0"}
    assert {int(n.split(".")[1]) for n in nv} == set(range(2, 28))
    w4 = p.by_format(W4)
    cross = [n for n in w4 if ".cross_attn." in n]
    assert len(cross) == 78
    # the glued line 'blocks.8.ffn.0blocks.0.cross_attn.k' is split: blocks.8.ffn.0 gets the W4A16 the author
    # intended (the original silently dropped it and made 104)
    assert len(w4) == 105 and "blocks.8.ffn.0" in w4
    assert len(p.by_format(NV)) == 77 and not p.by_format(FP8)
    assert p.counts() == {NV: 77, W4: 105, "fp16": 124}
    # every NVFP4 layer has its scale from the summary (coverage = the 182 rows); golden value p99.9 x 1.08
    assert not p.report.get("missing_input_scale")
    d = p.layers["blocks.10.cross_attn.k"]
    assert d.input_scale == pytest.approx(1.8349609999999998 * 1.08 / 2688, rel=1e-12)
    assert d.input_scale == pytest.approx(0.00073764, rel=1e-3)      # the scale_p99_9-based golden (6 dp rounding)
    assert d.input_scale_source == "calibration:scales_summary_wan22_5b.json p99.9x1.08"
    assert p.tensor_dtypes["patch_embedding.weight"] == "fp32"         # GGUF F32 (5-D via orig_shape) and preset
    assert p.tensor_dtypes["blocks.5.norm3.weight"] == "fp32"
    assert fmt(p, "blocks.1.self_attn.q") == "fp16"
    assert "gguf_keep_edge_blocks" in p.layers["blocks.1.self_attn.q"].reason


@needs_seed
def test_recipe_wan22_5b_original_count_without_the_glued_line(tmp_path):
    src = (SEED / "sensitive_layers_wan22_5b.txt").read_text().splitlines()
    fixed = [line for line in src if line != "blocks.8.ffn.0blocks.0.cross_attn.k"]
    assert len(fixed) == len(src) - 1
    lst = write_list(tmp_path, "\n".join(fixed), "no_glued.txt")
    p = recipe_plan(tmp_path, 30, None, "scales_summary_wan22_5b.json", list_path=lst)
    assert len(p.by_format(W4)) == 104 and len(p.by_format(NV)) == 78      # exactly the original's 104 / 78
    with pytest.raises(PlanError, match="line 52: 'blocks.8.ffn.0blocks.0.cross_attn.k' is 2 names glued"):
        recipe_plan(tmp_path, 30, "sensitive_layers_wan22_5b.txt", "scales_summary_wan22_5b.json", glued="error")


@needs_seed
@pytest.mark.parametrize("seed_list, summary, w4a16", [
    ("sensitive_layers_wan22_i2v_14b_high.txt", "scales_summary_wan22_14b_highnoise.json", 144),
    ("sensitive_layers_wan22_i2v_14b_low.txt", "scales_summary_wan22_14b_lownoise.json", 154),
])
def test_recipe_wan22_14b(tmp_path, seed_list, summary, w4a16):
    p = recipe_plan(tmp_path, 40, seed_list, summary, use_fp8=True)
    assert len(p.by_format(NV, W4)) == 252
    assert len(p.by_format(FP8)) == 108                     # inner v and ffn.2 (Q6_K > Q5, --use-fp8)
    assert len(p.by_format(W4)) == w4a16                    # original 143 / 153 + the recovered glued name
    assert not p.report.get("missing_input_scale")
    kept = p.by_format("fp16")
    assert len(kept) == 40 + 6 and all(not n.startswith("blocks.") or int(n.split(".")[1]) in (0, 1, 38, 39)
                                       for n in kept)


def test_recipe_seed_copy_is_read_only_safe(tmp_path):
    # lists may be given by relative path and the seed folder is read-only: we never write next to inputs
    if not SEED.is_dir():
        pytest.skip("seed data not found")
    dst = tmp_path / "l.txt"
    shutil.copy(SEED / "sensitive_layers_wan22_5b.txt", dst)
    known = {f"blocks.{b}.{x}" for b in range(30) for x in ("ffn.0", "self_attn.q", "self_attn.k", "self_attn.o",
                                                           "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                                           "cross_attn.o", "cross_attn.norm_q", "cross_attn.norm_k")}
    lst = resolve_layer_list(dst, known)
    assert len(lst.entries) == 184 and sum(e.glued for e in lst.entries) == 2


# ---------------------------------------------------------------------------------------------------- calibration-
# and report-driven rules (the original's fp16-std and sensitivity/clip-rate flags)
@needs_seed
@pytest.mark.parametrize("summary, blocks, flagged, thr", [
    ("scales_summary_wan22_5b.json", 30, 23, "0.0004544"),
    ("scales_summary_wan22_14b_highnoise.json", 40, 32, None),
    ("scales_summary_wan22_14b_lownoise.json", 40, 35, None),
])
def test_keep_high_variance_matches_the_original_counts(summary, blocks, flagged, thr):
    # original-scripts.md §10.1: 23 / 32 / 35 layers flagged with the default thresholds (auto std thr 4.544e-4)
    p = plan_wan(blocks, mode="all", keep_high_variance=True,
                 input_scale=InputScaleOptions(calibration=str(SEED / summary)))
    kept = [n for n, d in p.layers.items() if d.reason.startswith("high_variance")]
    assert len(kept) == flagged and all(fmt(p, n) == "fp32" for n in kept)
    note = next(n for n in p.notes if n.startswith("high variance"))
    assert f"{flagged} calibrated layer(s) flagged" in note and (thr is None or thr in note)
    # their scales are unused and reported; the other calibrated layers keep their static scale
    assert all(p.layers[n].input_scale is None for n in kept)


def test_keep_high_variance_needs_calibration():
    with pytest.raises(PlanError, match="--keep-high-variance needs calibration data"):
        plan_wan(keep_high_variance=True)


def write_report(path, rows):
    from nvfp4_lab.calibration.sensitivity import LayerSensitivity, SensitivityReport
    layers = [LayerSensitivity(layer=n, params=64 * 256, shape=[64, 256], formats=f) for n, f in rows.items()]
    SensitivityReport(inputs="recorded", source={"file": "model.safetensors"}, layers=layers).save(path)
    return str(path)


def test_sensitivity_and_clip_rate_thresholds(tmp_path):
    ok = {"status": "ok"}
    rep = write_report(tmp_path / "r.json", {
        "blocks.3.self_attn.q": {NV: {**ok, "rel_rmse": 0.30, "clip_rate": 0.0}},
        "blocks.3.self_attn.k": {NV: {**ok, "rel_rmse": 0.05, "clip_rate": 0.2}},
        "blocks.3.ffn.0": {NV: {**ok, "rel_rmse": 0.05, "clip_rate": 0.0}},
        "blocks.3.cross_attn.q": {NV: {"status": "non-finite output", "rel_rmse": None}},
    })
    p = plan_wan(sensitivity=rep, sensitivity_threshold=0.1, clip_rate_threshold=0.1)
    assert fmt(p, "blocks.3.self_attn.q") == "fp32"
    assert p.layers["blocks.3.self_attn.q"].reason.startswith("sensitivity: rel_rmse 0.3 > 0.1")
    assert fmt(p, "blocks.3.self_attn.k") == "fp32" and "clip_rate: clip_rate 0.2 > 0.1" in \
        p.layers["blocks.3.self_attn.k"].reason
    assert fmt(p, "blocks.3.ffn.0") == NV
    assert any("not judged: blocks.3.cross_attn.q" in n for n in p.notes)
    p = plan_wan(sensitivity=rep, sensitivity_threshold=0.1, sensitivity_action="w4a16")
    assert fmt(p, "blocks.3.self_attn.q") == W4
    assert p.layers["blocks.3.self_attn.q"].reason.startswith("w4a16: sensitivity: rel_rmse 0.3 > 0.1")


def test_sensitivity_report_names_are_validated(tmp_path):
    rep = write_report(tmp_path / "r.json", {"blocks.3.cross_attn.k_img": {NV: {"status": "ok", "rel_rmse": 0.5}}})
    with pytest.raises(PlanError, match="'blocks.3.cross_attn.k_img'.*another model"):
        plan_wan(sensitivity=rep, sensitivity_threshold=0.1)


@needs_seed
def test_original_sensitivity_json_is_refused():
    from nvfp4_lab.quant.errors import CalibrationError
    with pytest.raises(CalibrationError, match="input-precision report from the original analyzer"):
        plan_wan(30, sensitivity=str(SEED / "sensitivity_wan22_5b.json"), sensitivity_threshold=0.1)


@pytest.mark.parametrize("kw, msg", [
    (dict(sensitivity_threshold=0.1), "need --sensitivity REPORT"),
    (dict(sensitivity="r.json"), "--sensitivity needs --budget"),
    (dict(sensitivity="r.json", sensitivity_threshold=0.0), "--sensitivity-threshold must be a finite number > 0"),
    (dict(sensitivity="r.json", clip_rate_threshold=0.1, clip_rate_action="fp16"), "--clip-rate-action"),
])
def test_report_option_validation(kw, msg):
    with pytest.raises(PlanError, match=msg):
        plan_wan(**kw)


def test_budget_hook_hands_the_rule_plan_to_the_budget_planner(monkeypatch):
    import nvfp4_lab.calibration.budget as budget
    seen = {}

    def fake_plan_for_budget(base_plan, report, spec, ckpt, **kw):
        seen.update(report=report, spec=spec, scales=base_plan.layers["blocks.3.ffn.0"].input_scale)
        apply_overrides(base_plan, {"blocks.3.ffn.0": ("fp8", "budget says so")}, source="budget")
        return base_plan, None

    monkeypatch.setattr(budget, "plan_for_budget", fake_plan_for_budget)
    p = plan_wan(sensitivity="r.json", budget="4.8bpw", input_scale=InputScaleOptions(value=0.01))
    assert seen == {"report": "r.json", "spec": "4.8bpw", "scales": 0.01}   # scales assigned before the budget
    assert fmt(p, "blocks.3.ffn.0") == FP8 and p.layers["blocks.3.ffn.0"].reason.startswith("budget: budget says so")
    assert p.layers["blocks.3.ffn.0"].input_scale is None                   # left the NVFP4 family


def test_cli_report_flags_and_aliases():
    o = parse(["--input-scale-summary-fp16-std", "--input-scale-summary-std-threshold", "0.001",
               "--input-scale-summary-cv-threshold", "0.3", "--sensitivity-json", "r.json", "--sensitivity-threshold",
               "0.2", "--sensitivity-action", "full_precision_mm", "--clip-rate-threshold", "0.05",
               "--clip-rate-action", "fp16", "--budget", "9GB"])
    assert o.keep_high_variance and o.variance_std_threshold == 0.001 and o.variance_cv_threshold == 0.3
    assert (o.sensitivity, o.sensitivity_threshold, o.sensitivity_action) == ("r.json", 0.2, "w4a16")
    assert (o.clip_rate_threshold, o.clip_rate_action, o.budget) == (0.05, "keep", "9GB")
