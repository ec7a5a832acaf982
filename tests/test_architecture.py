"""Architecture detection (quant/architecture.py): every family and variant, naming, block groups, block_of.

Static key maps come from tests/model_keys.py; the `comfyui` tests check those maps against ComfyUI's own model
classes (built on the meta device) and our detection against ComfyUI's `detect_unet_config`.
"""

from __future__ import annotations

import json

import pytest

from nvfp4_lab.quant.architecture import (
    FAMILIES,
    Architecture,
    block_of,
    detect_architecture,
    discover_block_groups,
)
from nvfp4_lab.quant.formats import nvfp4_storage_shapes

import model_keys as mk

CASE_IDS = [c.name for c in mk.CASES]


@pytest.mark.parametrize("case", mk.CASES, ids=CASE_IDS)
def test_detects_every_family_and_variant(case: mk.Case) -> None:
    arch = detect_architecture(case.build())
    assert (arch.family, arch.variant, arch.naming) == (case.family, case.variant, case.naming)
    assert arch.block_groups == case.groups
    assert arch.preset == case.family  # one preset file per family, named after it
    assert arch.family in FAMILIES
    for key, value in case.details.items():
        assert arch.details[key] == value, key


def test_every_requested_variant_is_covered() -> None:
    variants = {(c.family, c.variant) for c in mk.CASES if c.naming == "comfyui"}
    wanted = {
        ("wan", v) for v in ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-i2v", "wan2.2-ti2v-5b", "wan-vace", "wan-camera",
                             "wan-s2v", "wan-animate", "wan-humo")
    } | {
        ("qwen_image", "qwen-image"), ("qwen_image", "qwen-image-edit-2511"), ("qwen_image", "qwen-image-layered"),
        ("flux", "flux-dev"), ("flux", "flux-schnell"), ("flux2", "flux2"), ("chroma", "chroma"),
        ("lumina2", "z-image"), ("lumina2", "lumina2"), ("hunyuan_video", "hunyuan-video"), ("ltxv", "ltxv"),
        ("sd3", "sd3"), ("generic", "generic-transformer"),
    }
    assert wanted <= variants, wanted - variants
    assert {c.family for c in mk.CASES} == set(FAMILIES)


def test_wan_variant_switches_follow_comfyui() -> None:
    # the key that flips each variant, as in comfy/model_detection.py:687-711
    base = mk.wan("t2v", dim=256, ffn_dim=512, num_layers=3)
    assert detect_architecture(base).variant == "wan2.1-t2v"
    i2v22 = dict(base, **{"patch_embedding.weight": (256, 36, 1, 2, 2)})
    assert detect_architecture(i2v22).variant == "wan2.2-i2v"
    assert detect_architecture(i2v22).details["in_dim"] == 36
    i2v21 = dict(i2v22, **{"img_emb.proj.0.bias": (1280,)})
    assert detect_architecture(i2v21).variant == "wan2.1-i2v"
    ti2v = dict(base, **{"head.head.weight": (192, 256)})
    assert detect_architecture(ti2v).variant == "wan2.2-ti2v-5b"
    assert detect_architecture(ti2v).details["out_dim"] == 48
    for key, shape, variant in (("casual_audio_encoder.encoder.final_linear.weight", (256, 256), "wan-s2v"),
                                ("audio_proj.audio_proj_glob_1.layer.bias", (512,), "wan-humo"),
                                ("face_adapter.fuser_blocks.0.k_norm.weight", (128,), "wan-animate")):
        assert detect_architecture({**base, key: shape}).variant == variant
    camera = dict(base, **{"control_adapter.conv.weight": (256, 1536, 2, 2)})
    assert detect_architecture(camera).variant == "wan-camera"
    assert detect_architecture(camera).details["model_type"] == "camera_2.2"
    assert detect_architecture(dict(camera, **{"img_emb.proj.0.bias": (1280,)})).details["model_type"] == "camera"
    vace = {**base, "vace_patch_embedding.weight": (256, 96, 1, 2, 2), "vace_blocks.0.after_proj.weight": (256, 256),
            "vace_blocks.4.after_proj.weight": (256, 256)}
    arch = detect_architecture(vace)
    assert arch.variant == "wan-vace" and arch.block_groups == {"blocks": 3, "vace_blocks": 5}


def test_qwen_variants_and_look_alikes() -> None:
    base = mk.qwen_image(num_layers=4)
    assert detect_architecture(base).variant == "qwen-image"
    assert detect_architecture(dict(base, __index_timestep_zero__=(0,))).variant == "qwen-image-edit-2511"
    layered = dict(base, **{"time_text_embed.addition_t_embedding.weight": (2, 3072)})
    assert detect_architecture(layered).variant == "qwen-image-layered"
    # Mage-Flow shares txt_norm; ComfyUI tells it apart by txt_norm 2560 / proj_out 128 (model_detection.py:887)
    mage = dict(base, **{"txt_norm.weight": (2560,), "proj_out.weight": (128, 3072)})
    assert detect_architecture(mage).family == "generic"
    # Lens shares txt_norm too (model_detection.py:863)
    lens = dict(base, **{"transformer_blocks.0.attn.norm_added_q.weight": (128,),
                         "transformer_blocks.0.img_mlp.w1.weight": (12288, 3072)})
    assert detect_architecture(lens).family == "generic"


def test_flux_family_switches() -> None:
    dev = mk.flux("dev", depth=2, depth_single=3)
    assert detect_architecture(dev).variant == "flux-dev"
    schnell = {k: v for k, v in dev.items() if not k.startswith("guidance_in.")}
    assert detect_architecture(schnell).variant == "flux-schnell"
    fill = dict(dev, **{"img_in.weight": (3072, 384)})
    assert detect_architecture(fill).variant == "flux-fill"
    assert detect_architecture(fill).details["in_channels"] == 96
    # BFL originals name the qk-norms `.scale` (renamed on load): still Flux
    assert detect_architecture(mk.flux("schnell", depth=2, depth_single=2, norm_suffix="scale")).family == "flux"
    assert detect_architecture(mk.flux2(depth=2, depth_single=2, norm_suffix="scale")).family == "flux2"
    assert detect_architecture(mk.chroma(depth=2, depth_single=2, norm_suffix="scale")).family == "chroma"


def test_hunyuan_video_before_flux() -> None:
    # HunyuanVideo has double/single blocks with Flux's qk-norm key; ComfyUI checks it first (model_detection.py:183)
    arch = detect_architecture(mk.hunyuan_video(naming="comfyui", depth=2, depth_single=2))
    assert arch.family == "hunyuan_video"
    assert arch.block_groups == {"double_blocks": 2, "single_blocks": 2}
    assert arch.details["context_dim"] == 4096


def test_lumina_variants_by_dim() -> None:
    assert detect_architecture(mk.lumina2("z-image", n_layers=3)).details["dim"] == 3840
    assert detect_architecture(mk.lumina2("lumina2", n_layers=3)).variant == "lumina2"


def test_full_checkpoint_prefix_is_stripped() -> None:
    bare = mk.wan("t2v", dim=256, ffn_dim=512, num_layers=3)
    full = {f"model.diffusion_model.{k}": v for k, v in bare.items()}
    full.update({"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3), "cond_stage_model.x.weight": (4, 4)})
    assert detect_architecture(full) == detect_architecture(bare)


def test_detection_of_an_already_quantized_file() -> None:
    # Our own output: NVFP4 layers have packed weights plus weight_scale / weight_scale_2 / comfy_quant keys.
    sd = mk.flux("dev", depth=3, depth_single=4)
    for layer, (o, i) in mk.linear_layers(sd).items():
        if layer.startswith(("double_blocks.1.", "single_blocks.2.")):
            w, s = nvfp4_storage_shapes(o, i)
            sd.update({f"{layer}.weight": w, f"{layer}.weight_scale": s, f"{layer}.weight_scale_2": (),
                       f"{layer}.comfy_quant": (20,)})
    arch = detect_architecture(sd)
    assert (arch.variant, arch.block_groups) == ("flux-dev", {"double_blocks": 3, "single_blocks": 4})


def test_block_counts_use_max_index() -> None:
    sd = mk.wan("t2v", dim=256, ffn_dim=512, num_layers=5)
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.2.")}  # a gap does not shorten the count
    assert detect_architecture(sd).block_groups == {"blocks": 5}


def test_block_of() -> None:
    arch = Architecture("wan", "wan-vace", {"blocks": 40, "vace_blocks": 8}, "wan", "comfyui")
    assert block_of("blocks.3.ffn.0", arch) == ("blocks", 3)
    assert block_of("blocks.39.self_attn.q.weight", arch) == ("blocks", 39)
    assert block_of("vace_blocks.3.after_proj", arch) == ("vace_blocks", 3)  # not ("blocks", 3)
    assert block_of("head.head", arch) is None
    assert block_of("text_embedding.0", arch) is None
    assert block_of("blocksx.1.a", arch) is None
    nested = Architecture("generic", "generic-transformer", {"stack": 2, "stack.layers": 24}, "generic", "comfyui")
    assert block_of("stack.layers.7.mlp.fc1", nested) == ("stack.layers", 7)  # longest prefix wins
    flux = detect_architecture(mk.flux("dev", depth=2, depth_single=3))
    assert block_of("single_blocks.2.linear1", flux) == ("single_blocks", 2)
    assert block_of("double_blocks.0.img_mod.lin", flux) == ("double_blocks", 0)


def test_generic_fallback_and_block_discovery() -> None:
    sd = mk.unknown_transformer(layers=6)
    arch = detect_architecture(sd)
    assert (arch.family, arch.variant, arch.preset, arch.naming) == ("generic", "generic-transformer", "generic",
                                                                     "comfyui")
    assert arch.block_groups == {"refiner": 2, "stack.layers": 6}
    # Sequential leaves (`<prefix>.<int>.weight`) are not blocks
    assert discover_block_groups(["text_embedding.0.weight", "img_emb.proj.1.bias", "blocks.0.ffn.0.weight",
                                  "blocks.3.norm3.weight", "vace_blocks.1.after_proj.weight"]) == {
        "blocks": 4, "vace_blocks": 2}
    assert detect_architecture({}).block_groups == {}
    assert detect_architecture({"w": (4, 4)}).family == "generic"


def test_detection_tolerates_partial_maps() -> None:
    # trigger key only: no head.head / patch_embedding / blocks -> still Wan, with unknown dims
    arch = detect_architecture({"head.modulation": (1, 2, 5120)})
    assert (arch.family, arch.variant, arch.block_groups) == ("wan", "wan2.1-t2v", {})
    assert arch.details == {"model_type": "t2v", "dim": 5120}


def test_architecture_value_semantics() -> None:
    a = detect_architecture(mk.wan("t2v", dim=256, ffn_dim=512, num_layers=2))
    b = detect_architecture(mk.wan("t2v", dim=256, ffn_dim=512, num_layers=2))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    data = json.loads(json.dumps(a.as_dict()))
    assert data["family"] == "wan" and data["block_groups"] == {"blocks": 2} and data["details"]["dim"] == 256
    assert "blocks×2" in a.describe()
    with pytest.raises(AttributeError):
        a.family = "flux"  # type: ignore[misc]


def test_diffusers_naming_is_reported() -> None:
    for name in ("wan-diffusers-t2v", "flux-diffusers-dev", "sd3-diffusers", "z-image-diffusers",
                 "hunyuan-video-diffusers", "ltxv-diffusers"):
        arch = detect_architecture(mk.CASES_BY_NAME[name].build())
        assert arch.naming == "diffusers", name
        assert "diffusers naming" in arch.describe()


# ---------------------------------------------------------------------------------------------------------------
# Against ComfyUI 0.29 itself


@pytest.mark.comfyui
@pytest.mark.parametrize("case", [c for c in mk.CASES if c.unet_config is not None and c.exact],
                         ids=[c.name for c in mk.CASES if c.unet_config is not None and c.exact])
def test_static_maps_match_comfyui(comfy, case: mk.Case) -> None:
    """The hand-written key maps are exactly ComfyUI's state dicts (after its load-time renames)."""
    cls, reference = mk.comfy_shapes(case.unet_config)
    assert cls == case.comfy_model
    assert mk.comfy_process(case.unet_config, case.build()) == reference


@pytest.mark.comfyui
@pytest.mark.parametrize("case", [c for c in mk.CASES if c.unet_config is not None],
                         ids=[c.name for c in mk.CASES if c.unet_config is not None])
def test_comfyui_detects_static_maps_as_expected(comfy, case: mk.Case) -> None:
    sd = mk.meta_state_dict(case.build())
    config = comfy.model_detection.detect_unet_config(sd, "")
    assert config == case.unet_config
    model_config = comfy.model_detection.model_config_from_unet_config(config, sd)
    assert type(model_config).__name__ == case.comfy_model


@pytest.mark.comfyui
@pytest.mark.parametrize("case", [c for c in mk.CASES if c.unet_config is not None],
                         ids=[c.name for c in mk.CASES if c.unet_config is not None])
def test_our_detection_agrees_with_comfyui_on_real_models(comfy, case: mk.Case) -> None:
    """Models built by ComfyUI (real configs, meta device) are detected as the case says."""
    _, shapes = mk.comfy_shapes(case.unet_config)
    arch = detect_architecture(shapes)
    assert (arch.family, arch.variant, arch.block_groups) == (case.family, case.variant, case.groups)


@pytest.mark.comfyui
def test_comfy_only_variants(comfy) -> None:
    for case in mk.comfy_only_cases():
        cls, shapes = mk.comfy_shapes(case.unet_config)
        assert cls == case.comfy_model, case.name
        arch = detect_architecture(shapes)
        assert (arch.family, arch.variant, arch.block_groups) == (case.family, case.variant, case.groups), case.name


@pytest.mark.comfyui
def test_diffusers_maps_use_comfyui_diffusers_names(comfy) -> None:
    """The static diffusers maps use the key names ComfyUI's own diffusers converters expect."""
    utils = comfy.utils
    flux_map = utils.flux_to_diffusers({"depth": 19, "depth_single_blocks": 38, "hidden_size": 3072})
    assert set(mk.flux_diffusers("dev")) <= set(flux_map)
    sd3_map = utils.mmdit_to_diffusers({"depth": 24, "num_blocks": 24})
    assert set(mk.sd3_diffusers()) <= set(sd3_map)
    z_map = utils.z_image_to_diffusers({"n_layers": 30, "dim": 3840})
    assert set(mk.zimage_diffusers()) <= set(z_map)
    # and ComfyUI does not detect them natively (it would have to rename the keys on load)
    for build in (mk.flux_diffusers, mk.sd3_diffusers, mk.zimage_diffusers, mk.wan_diffusers):
        assert comfy.model_detection.detect_unet_config(mk.meta_state_dict(build()), "") is None
