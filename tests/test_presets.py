"""Presets (quant/presets.py + quant/presets/*.json): loading, validation, and that they protect what must stay
high precision. The `comfyui` tests prove `never_quantize` complete: quantizing every other Linear to NVFP4
shapes leaves ComfyUI's `detect_unet_config` result unchanged."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from nvfp4_lab.quant.architecture import FAMILIES, Architecture, block_of, detect_architecture
from nvfp4_lab.quant.errors import PlanError
from nvfp4_lab.quant.formats import nvfp4_storage_shapes
from nvfp4_lab.quant.presets import (
    PRESET_DIR,
    RULE_LISTS,
    Preset,
    Rule,
    load_preset,
    parse_preset,
    preset_for,
    preset_names,
)

import model_keys as mk
from comfy_support import comfyui_available

NATIVE = [c for c in mk.CASES if c.naming == "comfyui"]
NATIVE_IDS = [c.name for c in NATIVE]
WITH_COMFY = [c for c in mk.CASES if c.unet_config is not None]
WITH_COMFY_IDS = [c.name for c in WITH_COMFY]
HIGH_PRECISION = ("never", "keep_fp32", "keep", "edge")


def decide(layer: str, arch: Architecture, preset: Preset) -> str:
    """Reference reading of a preset, with the precedence documented in quant/presets.py (test-only)."""
    if preset.protected_by(layer):
        return "never"
    if preset.first_match("keep_fp32", layer):
        return "keep_fp32"
    if preset.first_match("keep", layer):
        return "keep"
    where = block_of(layer, arch)
    if where is not None:
        prefix, idx = where
        n = arch.block_groups[prefix]
        if idx < preset.keep_first_blocks or idx >= n - preset.keep_last_blocks:
            return "edge"
    if preset.first_match("fp8", layer):
        return "fp8"
    if preset.first_match("w4a16", layer):
        return "w4a16"
    return "nvfp4"


def plan_counts(shapes: mk.Shapes) -> tuple[Architecture, dict[str, str]]:
    arch = detect_architecture(shapes)
    preset = preset_for(arch)
    return arch, {layer: decide(layer, arch, preset) for layer in mk.linear_layers(shapes)}


# ---------------------------------------------------------------------------------------------------------------
# loading and validation


def test_every_preset_loads_and_validates() -> None:
    names = preset_names()
    assert names == sorted(["wan", "qwen_image", "flux", "chroma", "flux2", "lumina2", "hunyuan_video", "ltxv",
                            "sd3", "generic"])
    for name in names:
        preset = load_preset(name)
        assert preset.name == name and preset.family in FAMILIES and preset.description
        raw = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
        assert preset.to_dict() == raw  # round trip: nothing dropped or defaulted
        assert parse_preset(preset.to_dict(), "x") == preset
        for kind in RULE_LISTS:
            for rule in getattr(preset, kind):
                assert isinstance(rule, Rule) and rule.why.strip()
    assert {load_preset(n).family for n in names} == set(FAMILIES)


def test_never_quantize_reasons_cite_comfyui() -> None:
    for name in preset_names():
        for rule in load_preset(name).never_quantize:
            assert "comfy/" in rule.why or "model_detection.py" in rule.why, (name, rule.pattern)


def test_preset_for_every_detected_architecture() -> None:
    for case in mk.CASES:
        arch = detect_architecture(case.build())
        if case.naming == "diffusers":
            with pytest.raises(PlanError, match="diffusers"):
                preset_for(arch)
        else:
            preset = preset_for(arch)
            assert preset.family == arch.family and preset.name == arch.preset


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(PlanError) as info:
        load_preset("wan22")
    message = str(info.value)
    assert "'wan22'" in message
    for name in preset_names():
        assert name in message


def test_load_preset_from_a_path(tmp_path: Path) -> None:
    data = load_preset("flux").to_dict()
    data["name"] = "my-flux"
    data["keep_first_blocks"] = 3
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    preset = load_preset(str(path))
    assert (preset.name, preset.keep_first_blocks) == ("my-flux", 3)


def _write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def _valid() -> dict:
    return load_preset("wan").to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(extra=1), "unknown key.*'extra'"),
        (lambda d: d.pop("keep"), "missing key.*'keep'"),
        (lambda d: d["keep"].append({"pattern": "a(b", "why": "x"}), "bad regular expression 'a\\(b'"),
        (lambda d: d["fp8"].append({"pattern": "x", "why": "y", "format": "fp8"}), "unknown key.*'format'"),
        (lambda d: d["fp8"].append({"pattern": "x"}), "'why' must be a non-empty string"),
        (lambda d: d["fp8"].append({"pattern": "", "why": "y"}), "'pattern' must be a non-empty string"),
        (lambda d: d["fp8"].append("x.*"), r"fp8\[\d+\] must be an object"),
        (lambda d: d.update(keep="x"), "'keep' must be a list"),
        (lambda d: d.update(family="sdxl"), "unknown family 'sdxl'"),
        (lambda d: d.update(keep_first_blocks=-1), "'keep_first_blocks' must be a non-negative integer"),
        (lambda d: d.update(keep_last_blocks=True), "'keep_last_blocks' must be a non-negative integer"),
        (lambda d: d.update(keep_last_blocks=1.5), "'keep_last_blocks' must be a non-negative integer"),
        (lambda d: d.update(description=""), "'description' must be a non-empty string"),
        (lambda d: d["keep"].append(dict(d["keep"][0])), "appears twice"),
    ],
)
def test_invalid_presets_are_rejected_naming_the_file(tmp_path: Path, mutate, message: str) -> None:
    data = _valid()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(PlanError, match=message) as info:
        load_preset(path)
    assert path in str(info.value)


def test_invalid_json_and_non_object(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"name": "x",')
    with pytest.raises(PlanError, match="not valid JSON") as info:
        load_preset(path)
    assert path in str(info.value)
    with pytest.raises(PlanError, match="expected a JSON object"):
        load_preset(_write(tmp_path, "[1, 2]"))


def test_builtin_name_must_match_file() -> None:
    data = _valid()
    data["name"] = "other"
    with pytest.raises(PlanError, match="must agree"):
        parse_preset(data, "wan.json", expected_name="wan")


def test_rule_matching_is_fullmatch() -> None:
    rule = Rule("img_in", "x")
    assert rule.matches("img_in")
    assert not rule.matches("img_in_patch") and not rule.matches("x.img_in")
    preset = load_preset("flux")
    assert preset.protected_by("txt_in").pattern == "txt_in"
    assert preset.protected_by("double_blocks.0.img_attn.qkv") is None
    with pytest.raises(ValueError, match="unknown rule list"):
        preset.first_match("nvfp4", "x")


# ---------------------------------------------------------------------------------------------------------------
# what the presets protect

# Layers whose in- or out-dim ComfyUI's detect_unet_config reads, per family (comfy/model_detection.py).
DETECTION_READS = {
    "wan": ["head.head", "blocks.0.ffn.0"],
    "flux": ["img_in", "txt_in", "vector_in.in_layer"],
    "flux2": ["img_in", "txt_in"],
    "chroma": ["img_in", "txt_in"],
    "qwen_image": ["img_in", "proj_out"],
    "sd3": ["context_embedder", "y_embedder.mlp.0", "final_layer.linear"],
    "hunyuan_video": ["txt_in.input_embedder", "final_layer.linear"],
    "ltxv": ["transformer_blocks.0.attn2.to_k"],
    "lumina2": ["cap_embedder.1"],
}

# Layers that must stay high precision wherever they exist (the original scripts quantized several by mistake).
KEY_LAYERS = ["head.head", "img_in", "txt_in", "proj_out", "norm_out.linear", "vector_in.in_layer",
              "context_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1", "txt_in.input_embedder",
              "cap_embedder.1", "x_embedder", "patchify_proj", "time_projection.1", "text_embedding.0",
              "time_embedding.0", "time_in.in_layer", "guidance_in.in_layer", "img_emb.proj.1",
              "time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", "y_embedder.mlp.0",
              "adaln_single.linear", "caption_projection.linear_1", "distilled_guidance_layer.in_proj",
              "cond_in", "out_head", "timestep_embedder.mlp.0"]


@pytest.mark.parametrize("family", sorted(DETECTION_READS))
def test_layers_read_by_detection_are_never_quantized(family: str) -> None:
    preset = load_preset(family)
    for layer in DETECTION_READS[family]:
        assert preset.protected_by(layer) is not None, layer


@pytest.mark.parametrize("case", NATIVE, ids=NATIVE_IDS)
def test_key_layers_stay_high_precision(case: mk.Case) -> None:
    shapes = case.build()
    arch, plan = plan_counts(shapes)
    if arch.family in DETECTION_READS:
        for layer in DETECTION_READS[arch.family]:
            if layer in plan:
                assert plan[layer] == "never", layer
    present = [layer for layer in KEY_LAYERS if layer in plan]
    assert present, "each case has some key layers"
    for layer in present:
        assert plan[layer] in HIGH_PRECISION, (layer, plan[layer])


@pytest.mark.parametrize("case", NATIVE, ids=NATIVE_IDS)
def test_no_nvfp4_outside_the_blocks_and_edges_kept(case: mk.Case) -> None:
    shapes = case.build()
    arch, plan = plan_counts(shapes)
    preset = preset_for(arch)
    for layer, decision in plan.items():
        where = block_of(layer, arch)
        if where is None:
            assert decision != "nvfp4", layer  # embeddings, in/out projections, adapters: never W4A4 by default
            continue
        prefix, idx = where
        if idx < preset.keep_first_blocks or idx >= arch.block_groups[prefix] - preset.keep_last_blocks:
            assert decision in HIGH_PRECISION, layer
    assert "nvfp4" in plan.values()  # and the preset does quantize the bulk


def test_expected_plans_for_main_models() -> None:
    # Wan 14B T2V: 10 Linears per block; blocks 1..38 NVFP4; blocks 0, 39 + 6 outside layers kept
    _, plan = plan_counts(mk.wan("t2v"))
    assert Counter(plan.values()) == {"nvfp4": 380, "edge": 19, "keep": 5, "never": 2}
    # Qwen-Image: 14 Linears per block; blocks 2..57 quantized, their 2 modulation Linears W4A16
    _, plan = plan_counts(mk.qwen_image())
    assert Counter(plan.values()) == {"nvfp4": 56 * 12, "w4a16": 56 * 2, "edge": 4 * 14, "keep": 4, "never": 2}
    assert plan["transformer_blocks.30.img_mod.1"] == "w4a16"
    assert plan["norm_out.linear"] == "keep" and plan["proj_out"] == "never" and plan["img_in"] == "never"
    # Flux dev: 10 Linears per double block (2 mods), 3 per single block (1 mod)
    _, plan = plan_counts(mk.flux("dev"))
    assert Counter(plan.values()) == {"nvfp4": 17 * 8 + 36 * 2, "w4a16": 17 * 2 + 36, "edge": 2 * 10 + 2 * 3,
                                      "keep": 7, "never": 3}


def test_tencent_and_comfyui_names_get_the_same_decisions() -> None:
    comfy_names = mk.hunyuan_video(naming="comfyui", depth=4, depth_single=4)
    tencent_of = {k[: -len(".weight")]: mk._to_tencent(k)[: -len(".weight")]
                  for k in comfy_names if k.endswith(".weight")}
    arch_c, plan_c = plan_counts(comfy_names)
    arch_t, plan_t = plan_counts(mk.hunyuan_video(naming="tencent", depth=4, depth_single=4))
    assert arch_c.block_groups == arch_t.block_groups
    for layer, decision in plan_c.items():
        assert plan_t[tencent_of[layer]] == decision, (layer, tencent_of[layer])


def test_generic_preset_on_an_unknown_transformer() -> None:
    shapes = mk.unknown_transformer(layers=8)
    arch, plan = plan_counts(shapes)
    assert arch.preset == "generic"
    for layer in ("cond_in", "timestep_embedder.mlp.0", "out_head", "stack.layers.3.attn2.to_k",
                  "refiner.0.attn2.to_k"):
        assert plan[layer] == "never", layer
    assert plan["global_modulation"] == "keep"  # outside the blocks
    assert plan["refiner.1.mlp.fc1"] == "edge"  # a 2-block group is kept whole
    assert plan["stack.layers.0.attn.wqkv"] == "edge" and plan["stack.layers.7.mlp.fc2"] == "edge"
    assert plan["stack.layers.4.attn.wqkv"] == "nvfp4"
    assert plan["stack.layers.4.attn2.to_v"] == "nvfp4"
    assert plan["stack.layers.4.adaLN.linear"] == "nvfp4"
    shapes["stack.layers.4.img_mod.lin.weight"] = (6 * 1536, 1536)
    assert plan_counts(shapes)[1]["stack.layers.4.img_mod.lin"] == "w4a16"  # modulation-named: W4A16
    preset = load_preset("generic")
    # the input-embedding heuristic, documented in the preset
    for name in ("x_embedder", "cap_embedder.1", "context_embedder", "label_emb.0.0", "time_embedding.0",
                 "img_in", "txt_in", "vector_in.in_layer", "latent_in", "proj_in", "input_proj", "first",
                 "txtfusion.projector", "proj_out", "final_layer.linear", "norm_out.linear", "head.head",
                 "input_blocks.4.1.transformer_blocks.0.attn2.to_k"):
        assert preset.protected_by(name) is not None, name
    for name in ("blocks.3.self_attn.q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                 "double_blocks.2.img_mlp.0", "layers.5.feed_forward.w1"):
        assert preset.protected_by(name) is None, name


def test_every_rule_matches_something() -> None:
    """No dead rules (a typo in a pattern would silently protect nothing)."""
    names: dict[str, set[str]] = {}
    for case in NATIVE:
        shapes = case.build()
        bucket = names.setdefault(case.family, set())
        for key in shapes:
            bucket.add(key)
            bucket.add(key.rsplit(".", 1)[0])
    # rules for variants that have no static map (covered by test_every_rule_matches_something_in_comfyui_models)
    comfy_only = {"img_in_patch", "nerf_.*", "x_embedder", "dec_net\\.final_layer\\.linear",
                  "dec_net\\.input_embedder\\.embedder\\.0", "dec_net\\.cond_embed", "siglip_embedder\\.0",
                  "clip_text_pooled_proj\\.0", "(siglip_embedder|clip_text_pooled_proj)\\..*", "dec_net\\..*",
                  "vision_in\\.proj\\.0", "cond_type_embedding", "(byt5_in|vision_in)\\..*", "ref_conv",
                  "vector_in\\.in_layer", "(audio|video)_embeddings_connector\\..*"}
    for name in preset_names():
        preset = load_preset(name)
        if preset.family == "generic":
            continue
        for kind in RULE_LISTS:
            for rule in getattr(preset, kind):
                if preset.family == "flux2" and rule.pattern == "vector_in\\.in_layer":
                    continue
                hit = any(rule.matches(n) for n in names[preset.family])
                assert hit or rule.pattern in comfy_only, (name, kind, rule.pattern)


# ---------------------------------------------------------------------------------------------------------------
# proof against ComfyUI 0.29: never_quantize is complete


def _quantize_unprotected(shapes: mk.Shapes, preset: Preset, *, also: tuple[str, ...] = ()) -> tuple[mk.Shapes, int]:
    """Replace every Linear the preset does not `never_quantize` by NVFP4-shaped tensors (plus `also`)."""
    out = dict(shapes)
    count = 0
    for layer, (rows, cols) in mk.linear_layers(shapes).items():
        if preset.protected_by(layer) and layer not in also:
            continue
        weight, scale = nvfp4_storage_shapes(rows, cols)
        out.update({f"{layer}.weight": weight, f"{layer}.weight_scale": scale, f"{layer}.weight_scale_2": (),
                    f"{layer}.comfy_quant": (20,)})
        count += 1
    return out, count


def _detect(comfy, shapes: mk.Shapes):
    return comfy.model_detection.detect_unet_config(mk.meta_state_dict(shapes), "")


def _comfy_cases():
    cases = list(WITH_COMFY)
    if not comfyui_available():  # collected without ComfyUI: the comfyui-marked tests skip (or fail under CI)
        return cases
    mk.comfy()
    return cases + mk.comfy_only_cases()


def _shapes_of(case: mk.Case) -> mk.Shapes:
    """The static map (file naming) where there is one, else ComfyUI's meta-built state dict."""
    return case.build() if case in WITH_COMFY else mk.comfy_shapes(case.unet_config)[1]


@pytest.mark.comfyui
@pytest.mark.parametrize("preset_name", ["family", "generic"])
def test_quantizing_everything_not_protected_keeps_comfyui_detection(comfy, preset_name: str) -> None:
    """For Flux, Wan and every other family (real configs): NVFP4 on every Linear outside `never_quantize` leaves
    `detect_unet_config` unchanged, so the file loads as the same model. Also for the generic preset."""
    checked = 0
    for case in _comfy_cases():
        shapes = _shapes_of(case)
        arch = detect_architecture(shapes)
        preset = load_preset(arch.preset if preset_name == "family" else "generic")
        quantized, count = _quantize_unprotected(shapes, preset)
        assert count > 100, case.name
        original = _detect(comfy, shapes)
        assert original is not None, case.name
        assert _detect(comfy, quantized) == original, case.name
        model_config = comfy.model_detection.model_config_from_unet_config(_detect(comfy, quantized),
                                                                           mk.meta_state_dict(quantized))
        assert type(model_config).__name__ == case.comfy_model, case.name
        checked += 1
    assert checked >= len(WITH_COMFY)


@pytest.mark.comfyui
def test_flux_and_wan_detection_proof_is_sensitive(comfy) -> None:
    """Negative controls: quantizing a protected layer does change what ComfyUI detects."""
    flux = mk.CASES_BY_NAME["flux-dev"]
    shapes = flux.build()
    broken, _ = _quantize_unprotected(shapes, load_preset("flux"), also=("txt_in",))
    assert _detect(comfy, broken)["context_in_dim"] == 2048  # 4096 in the original
    broken, _ = _quantize_unprotected(shapes, load_preset("flux"), also=("img_in",))
    assert _detect(comfy, broken)["in_channels"] == 8
    # Wan: an out-dim that is not a multiple of 16 is padded by NVFP4 (3 channels: head.head has 12 rows)
    tiny = mk.wan("t2v", dim=128, ffn_dim=256, num_layers=2, out_dim=3)
    assert _detect(comfy, tiny)["out_dim"] == 3
    ok, _ = _quantize_unprotected(tiny, load_preset("wan"))
    assert _detect(comfy, ok)["out_dim"] == 3
    broken, _ = _quantize_unprotected(tiny, load_preset("wan"), also=("head.head",))
    assert _detect(comfy, broken)["out_dim"] == 4


@pytest.mark.comfyui
def test_non_linear_2d_weights_are_never_quantized(comfy) -> None:
    """2-D weights of modules that are not Linear (Embeddings, EqualLinear, raw Parameters) cannot load quantized:
    every one of them in every ComfyUI-built model is in the family preset's never_quantize."""
    for case in _comfy_cases():
        if case.family == "generic":
            continue
        _, shapes = mk.comfy_shapes(case.unet_config)
        linears = mk.comfy_linear_names(case.unet_config)
        preset = load_preset(detect_architecture(shapes).preset)
        for layer in mk.linear_layers(shapes):
            if layer not in linears:
                assert preset.protected_by(layer) is not None, (case.name, layer)


@pytest.mark.comfyui
def test_every_rule_matches_something_in_comfyui_models(comfy) -> None:
    names: dict[str, set[str]] = {}
    for case in _comfy_cases():
        _, shapes = mk.comfy_shapes(case.unet_config)
        if case.build is not None and case.exact:
            shapes = {**shapes, **case.build()}  # file naming too (HunyuanVideo's Tencent names)
        bucket = names.setdefault(case.family, set())
        for key in shapes:
            bucket.add(key)
            bucket.add(key.rsplit(".", 1)[0])
    unmatched = []
    for name in preset_names():
        preset = load_preset(name)
        if preset.family == "generic":
            continue
        for kind in RULE_LISTS:
            for rule in getattr(preset, kind):
                if not any(rule.matches(n) for n in names[preset.family]):
                    unmatched.append((name, kind, rule.pattern))
    # expected: variants ComfyUI builds we do not instantiate here
    allowed = {("wan", "never_quantize", "ref_conv"), ("flux2", "never_quantize", "vector_in\\.in_layer"),
               ("lumina2", "never_quantize", "siglip_embedder\\.0"),
               ("lumina2", "never_quantize", "clip_text_pooled_proj\\.0"),
               ("lumina2", "keep", "(siglip_embedder|clip_text_pooled_proj)\\..*")}
    assert set(unmatched) <= allowed, set(unmatched) - allowed
