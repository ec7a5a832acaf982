"""Realistic {bare tensor name: shape} maps of real diffusion models, for tests that must not download anything.

Two sources:

* Static generators (`wan`, `qwen_image`, `flux`, ...): plain Python, no ComfyUI, no torch. With their default
  (real, full-size) configs they reproduce exactly the state dict of ComfyUI 0.29's own model classes; the
  `comfyui`-marked test `test_static_maps_match_comfyui` checks that for every entry of `CASES` marked exact.
* `comfy_shapes(unet_config)`: instantiates ComfyUI's model class for a detected `unet_config` on the meta device
  (no memory, well under a second even for Qwen-Image's 60 blocks) and returns its state-dict shapes, plus
  `comfy_linear_names` (which names are real `nn.Linear` modules). Needs ComfyUI (`COMFYUI_PATH`, default
  `~/ComfyUI`); `comfy()` imports it in CPU mode through tests/comfy_support.py.

`CASES` lists every family/variant the tests cover: the static map, the expected detection, and the `unet_config`
that ComfyUI's `detect_unet_config` gives for the real model.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable

Shapes = dict[str, tuple[int, ...]]


# ---------------------------------------------------------------------------------------------------------------
# small builders


def _lin(sd: Shapes, name: str, out: int, inp: int, bias: bool = True) -> None:
    sd[f"{name}.weight"] = (out, inp)
    if bias:
        sd[f"{name}.bias"] = (out,)


def _norm(sd: Shapes, name: str, n: int, bias: bool = False, suffix: str = "weight") -> None:
    sd[f"{name}.{suffix}"] = (n,)
    if bias:
        sd[f"{name}.bias"] = (n,)


def _conv(sd: Shapes, name: str, out: int, inp: int, *kernel: int, bias: bool = True) -> None:
    sd[f"{name}.weight"] = (out, inp, *kernel)
    if bias:
        sd[f"{name}.bias"] = (out,)


# ---------------------------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 (comfy/ldm/wan/model.py)

WAN_VARIANTS = ("t2v", "i2v", "flf2v", "fun-control", "2.2-i2v", "ti2v-5b", "vace", "camera", "camera-2.2",
                "s2v", "humo", "animate")


def _wan_block(sd: Shapes, p: str, dim: int, ffn: int, *, img: bool = False) -> None:
    sd[f"{p}.modulation"] = (1, 6, dim)
    for part in ("self_attn", "cross_attn"):
        for x in ("q", "k", "v", "o"):
            _lin(sd, f"{p}.{part}.{x}", dim, dim)
        _norm(sd, f"{p}.{part}.norm_q", dim)
        _norm(sd, f"{p}.{part}.norm_k", dim)
        if part == "self_attn":
            _norm(sd, f"{p}.norm3", dim, bias=True)
    if img:
        _lin(sd, f"{p}.cross_attn.k_img", dim, dim)
        _lin(sd, f"{p}.cross_attn.v_img", dim, dim)
        _norm(sd, f"{p}.cross_attn.norm_k_img", dim)
    _lin(sd, f"{p}.ffn.0", ffn, dim)
    _lin(sd, f"{p}.ffn.2", dim, ffn)


def _wan_img_emb(sd: Shapes, dim: int, flf: bool = False) -> None:
    _norm(sd, "img_emb.proj.0", 1280, bias=True)
    _lin(sd, "img_emb.proj.1", 1280, 1280)
    _lin(sd, "img_emb.proj.3", dim, 1280)
    _norm(sd, "img_emb.proj.4", dim, bias=True)
    if flf:
        sd["img_emb.emb_pos"] = (1, 514, 1280)


def wan(variant: str = "t2v", *, dim: int | None = None, ffn_dim: int | None = None, num_layers: int | None = None,
        in_dim: int | None = None, out_dim: int | None = None, text_dim: int = 4096, vace_layers: int = 8) -> Shapes:
    """A Wan model in ComfyUI naming (= the original Wan-AI naming). Defaults: the 14B (or, for ti2v-5b, 5B) config."""
    if variant not in WAN_VARIANTS:
        raise ValueError(f"unknown Wan variant {variant!r}; expected one of {WAN_VARIANTS}")
    five_b = variant == "ti2v-5b"
    dim = dim or (3072 if five_b else 5120)
    ffn_dim = ffn_dim or (14336 if five_b else 13824)
    num_layers = num_layers or (30 if five_b else 40)
    default_in = {"i2v": 36, "flf2v": 36, "fun-control": 48, "2.2-i2v": 36, "ti2v-5b": 48, "camera": 32,
                  "camera-2.2": 36, "animate": 36}
    in_dim = in_dim or default_in.get(variant, 16)
    out_dim = out_dim or (48 if five_b else 16)
    img = variant in ("i2v", "flf2v", "fun-control", "camera", "animate")

    sd: Shapes = {}
    _conv(sd, "patch_embedding", dim, in_dim, 1, 2, 2)
    _lin(sd, "text_embedding.0", dim, text_dim)
    _lin(sd, "text_embedding.2", dim, dim)
    _lin(sd, "time_embedding.0", dim, 256)
    _lin(sd, "time_embedding.2", dim, dim)
    _lin(sd, "time_projection.1", 6 * dim, dim)
    for i in range(num_layers):
        _wan_block(sd, f"blocks.{i}", dim, ffn_dim, img=img)
    sd["head.modulation"] = (1, 2, dim)
    _lin(sd, "head.head", out_dim * 4, dim)
    if img:
        _wan_img_emb(sd, dim, flf=variant == "flf2v")

    if variant == "vace":
        _conv(sd, "vace_patch_embedding", dim, 96, 1, 2, 2)
        for i in range(vace_layers):
            _wan_block(sd, f"vace_blocks.{i}", dim, ffn_dim)
            if i == 0:
                _lin(sd, f"vace_blocks.{i}.before_proj", dim, dim)
            _lin(sd, f"vace_blocks.{i}.after_proj", dim, dim)
    elif variant in ("camera", "camera-2.2"):
        _conv(sd, "control_adapter.conv", dim, 24 * 64, 2, 2)
        _conv(sd, "control_adapter.residual_blocks.0.conv1", dim, dim, 3, 3)
        _conv(sd, "control_adapter.residual_blocks.0.conv2", dim, dim, 3, 3)
    elif variant == "s2v":
        sd["trainable_cond_mask.weight"] = (3, dim)
        sd["casual_audio_encoder.weights"] = (1, 25, 1, 1)
        enc = "casual_audio_encoder.encoder"
        sd[f"{enc}.padding_tokens"] = (1, 1, 1, dim)
        _conv(sd, f"{enc}.conv1_local.conv", dim, 1024, 3)
        _conv(sd, f"{enc}.conv1_global.conv", dim // 4, 1024, 3)
        _conv(sd, f"{enc}.conv2.conv", dim // 2, dim // 4, 3)
        _conv(sd, f"{enc}.conv3.conv", dim, dim // 2, 3)
        _lin(sd, f"{enc}.final_linear", dim, dim)
        _conv(sd, "cond_encoder", dim, 16, 1, 2, 2)
        for i in range(12):
            p = f"audio_injector.injector.{i}"
            for x in ("q", "k", "v", "o"):
                _lin(sd, f"{p}.{x}", dim, dim)
            _norm(sd, f"{p}.norm_q", dim)
            _norm(sd, f"{p}.norm_k", dim)
            _lin(sd, f"audio_injector.injector_adain_layers.{i}.linear", 2 * dim, dim)
        _conv(sd, "frame_packer.proj", dim, 16, 1, 2, 2)
        _conv(sd, "frame_packer.proj_2x", dim, 16, 2, 4, 4)
        _conv(sd, "frame_packer.proj_4x", dim, 16, 4, 8, 8)
    elif variant == "humo":
        for i in range(num_layers):
            p = f"blocks.{i}.audio_cross_attn_wrapper"
            _lin(sd, f"{p}.audio_cross_attn.q", dim, dim)
            _lin(sd, f"{p}.audio_cross_attn.k", dim, 1536)
            _lin(sd, f"{p}.audio_cross_attn.v", dim, 1536)
            _lin(sd, f"{p}.audio_cross_attn.o", dim, dim)
            _norm(sd, f"{p}.audio_cross_attn.norm_q", dim)
            _norm(sd, f"{p}.audio_cross_attn.norm_k", dim)
            _norm(sd, f"{p}.norm1_audio", dim, bias=True)
        _lin(sd, "audio_proj.audio_proj_glob_1.layer", 512, 51200)
        _lin(sd, "audio_proj.audio_proj_glob_2.layer", 512, 512)
        _lin(sd, "audio_proj.audio_proj_glob_3.layer", 16 * 1536, 512)
        _norm(sd, "audio_proj.audio_proj_glob_norm.layer", 1536, bias=True)
    elif variant == "animate":
        _conv(sd, "pose_patch_embedding", dim, 16, 1, 2, 2)
        me = "motion_encoder.enc.net_app.convs"
        sd[f"{me}.0.0.weight"] = (32, 3, 1, 1)
        sd[f"{me}.0.1.bias"] = (1, 32, 1, 1)
        chans = [(32, 64), (64, 128), (128, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
        for i, (cin, cout) in enumerate(chans, start=1):
            sd[f"{me}.{i}.conv1.0.weight"] = (cin, cin, 3, 3)
            sd[f"{me}.{i}.conv1.1.bias"] = (1, cin, 1, 1)
            sd[f"{me}.{i}.conv2.0.kernel"] = (4, 4)
            sd[f"{me}.{i}.conv2.1.weight"] = (cout, cin, 3, 3)
            sd[f"{me}.{i}.conv2.2.bias"] = (1, cout, 1, 1)
            sd[f"{me}.{i}.skip.0.kernel"] = (4, 4)
            sd[f"{me}.{i}.skip.1.weight"] = (cout, cin, 1, 1)
        sd[f"{me}.8.weight"] = (512, 512, 4, 4)
        for i in range(4):
            _lin(sd, f"motion_encoder.enc.fc.{i}", 512, 512)
        _lin(sd, "motion_encoder.enc.fc.4", 20, 512)
        sd["motion_encoder.dec.direction.weight"] = (512, 20)
        for i in range(num_layers // 5):
            p = f"face_adapter.fuser_blocks.{i}"
            _lin(sd, f"{p}.linear1_kv", 2 * dim, dim)
            _lin(sd, f"{p}.linear1_q", dim, dim)
            _lin(sd, f"{p}.linear2", dim, dim)
            _norm(sd, f"{p}.q_norm", 128)
            _norm(sd, f"{p}.k_norm", 128)
        sd["face_encoder.padding_tokens"] = (1, 1, 1, dim)
        _conv(sd, "face_encoder.conv1_local.conv", 4096, 512, 3)
        _conv(sd, "face_encoder.conv2.conv", 1024, 1024, 3)
        _conv(sd, "face_encoder.conv3.conv", 1024, 1024, 3)
        _lin(sd, "face_encoder.out_proj", dim, 1024)
    return sd


def wan_diffusers(variant: str = "t2v", *, dim: int = 5120, ffn_dim: int = 13824, num_layers: int = 40,
                  in_dim: int | None = None, out_dim: int = 16) -> Shapes:
    """A diffusers `WanTransformer3DModel` state dict (what ComfyUI cannot load)."""
    in_dim = in_dim or (36 if variant in ("i2v", "2.2-i2v") else 16)
    sd: Shapes = {}
    _conv(sd, "patch_embedding", dim, in_dim, 1, 2, 2)
    ce = "condition_embedder"
    _lin(sd, f"{ce}.time_embedder.linear_1", dim, 256)
    _lin(sd, f"{ce}.time_embedder.linear_2", dim, dim)
    _lin(sd, f"{ce}.time_proj", 6 * dim, dim)
    _lin(sd, f"{ce}.text_embedder.linear_1", dim, 4096)
    _lin(sd, f"{ce}.text_embedder.linear_2", dim, dim)
    if variant == "i2v":
        _norm(sd, f"{ce}.image_embedder.norm1", 1280, bias=True)
        _lin(sd, f"{ce}.image_embedder.ff.net.0.proj", 1280, 1280)
        _lin(sd, f"{ce}.image_embedder.ff.net.2", dim, 1280)
        _norm(sd, f"{ce}.image_embedder.norm2", dim, bias=True)
    for i in range(num_layers):
        p = f"blocks.{i}"
        sd[f"{p}.scale_shift_table"] = (1, 6, dim)
        for a in ("attn1", "attn2"):
            for x in ("to_q", "to_k", "to_v", "to_out.0"):
                _lin(sd, f"{p}.{a}.{x}", dim, dim)
            _norm(sd, f"{p}.{a}.norm_q", dim)
            _norm(sd, f"{p}.{a}.norm_k", dim)
        if variant == "i2v":
            _lin(sd, f"{p}.attn2.add_k_proj", dim, dim)
            _lin(sd, f"{p}.attn2.add_v_proj", dim, dim)
            _norm(sd, f"{p}.attn2.norm_added_k", dim)
        _norm(sd, f"{p}.norm2", dim, bias=True)
        _lin(sd, f"{p}.ffn.net.0.proj", ffn_dim, dim)
        _lin(sd, f"{p}.ffn.net.2", dim, ffn_dim)
    sd["scale_shift_table"] = (1, 2, dim)
    _lin(sd, "proj_out", out_dim * 4, dim)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Qwen-Image (comfy/ldm/qwen_image/model.py; same names as diffusers)


def qwen_image(variant: str = "qwen-image", *, num_layers: int = 60, dim: int = 3072, joint_dim: int = 3584,
               in_channels: int = 64) -> Shapes:
    """Qwen-Image / Edit-2511 / Layered. Default: the real 60-block, 3072-wide model."""
    sd: Shapes = {}
    _lin(sd, "time_text_embed.timestep_embedder.linear_1", dim, 256)
    _lin(sd, "time_text_embed.timestep_embedder.linear_2", dim, dim)
    if variant == "qwen-image-layered":
        sd["time_text_embed.addition_t_embedding.weight"] = (2, dim)
    _norm(sd, "txt_norm", joint_dim)
    _lin(sd, "img_in", dim, in_channels)
    _lin(sd, "txt_in", dim, joint_dim)
    for i in range(num_layers):
        p = f"transformer_blocks.{i}"
        for s in ("img", "txt"):
            _lin(sd, f"{p}.{s}_mod.1", 6 * dim, dim)
            _lin(sd, f"{p}.{s}_mlp.net.0.proj", 4 * dim, dim)
            _lin(sd, f"{p}.{s}_mlp.net.2", dim, 4 * dim)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _norm(sd, f"{p}.attn.{n}", 128)
        for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _lin(sd, f"{p}.attn.{x}", dim, dim)
    _lin(sd, "norm_out.linear", 2 * dim, dim)
    _lin(sd, "proj_out", in_channels, dim)
    if variant == "qwen-image-edit-2511":
        sd["__index_timestep_zero__"] = (0,)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Flux.1 / Flux.2 / Chroma (comfy/ldm/flux/model.py, comfy/ldm/chroma/model.py; BFL originals use `.scale` norms)


def _flux_double(sd: Shapes, p: str, h: int, mlp: int, *, bias: bool, mods: bool, norm: str, glu: bool = False) -> None:
    for s in ("img", "txt"):
        if mods:
            _lin(sd, f"{p}.{s}_mod.lin", 6 * h, h, bias)
        _lin(sd, f"{p}.{s}_attn.qkv", 3 * h, h, bias)
        _norm(sd, f"{p}.{s}_attn.norm.query_norm", 128, suffix=norm)
        _norm(sd, f"{p}.{s}_attn.norm.key_norm", 128, suffix=norm)
        _lin(sd, f"{p}.{s}_attn.proj", h, h, bias)
        _lin(sd, f"{p}.{s}_mlp.0", 2 * mlp if glu else mlp, h, bias)
        _lin(sd, f"{p}.{s}_mlp.2", h, mlp, bias)


def _flux_single(sd: Shapes, p: str, h: int, mlp: int, *, bias: bool, mods: bool, norm: str, glu: bool = False) -> None:
    _lin(sd, f"{p}.linear1", 3 * h + (2 * mlp if glu else mlp), h, bias)
    _lin(sd, f"{p}.linear2", h, h + mlp, bias)
    _norm(sd, f"{p}.norm.query_norm", 128, suffix=norm)
    _norm(sd, f"{p}.norm.key_norm", 128, suffix=norm)
    if mods:
        _lin(sd, f"{p}.modulation.lin", 3 * h, h, bias)


def flux(variant: str = "dev", *, depth: int = 19, depth_single: int = 38, hidden: int = 3072, context_dim: int = 4096,
         vec_dim: int = 768, in_channels: int | None = None, norm_suffix: str = "weight") -> Shapes:
    """FLUX.1 dev / schnell / fill. `norm_suffix="scale"` gives the BFL original's norm names."""
    in_channels = in_channels or (96 if variant == "fill" else 16)
    sd: Shapes = {}
    _lin(sd, "img_in", hidden, in_channels * 4)
    _lin(sd, "time_in.in_layer", hidden, 256)
    _lin(sd, "time_in.out_layer", hidden, hidden)
    _lin(sd, "vector_in.in_layer", hidden, vec_dim)
    _lin(sd, "vector_in.out_layer", hidden, hidden)
    if variant in ("dev", "fill"):
        _lin(sd, "guidance_in.in_layer", hidden, 256)
        _lin(sd, "guidance_in.out_layer", hidden, hidden)
    _lin(sd, "txt_in", hidden, context_dim)
    for i in range(depth):
        _flux_double(sd, f"double_blocks.{i}", hidden, 4 * hidden, bias=True, mods=True, norm=norm_suffix)
    for i in range(depth_single):
        _flux_single(sd, f"single_blocks.{i}", hidden, 4 * hidden, bias=True, mods=True, norm=norm_suffix)
    _lin(sd, "final_layer.linear", 16 * 4, hidden)
    _lin(sd, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return sd


def flux2(*, depth: int = 8, depth_single: int = 48, hidden: int = 6144, context_dim: int = 15360,
          norm_suffix: str = "weight") -> Shapes:
    """FLUX.2 [dev] (defaults) or klein (depth 5/20, hidden 3072, context 7680): no biases, global modulation."""
    mlp = 3 * hidden
    sd: Shapes = {}
    _lin(sd, "img_in", hidden, 128, False)
    _lin(sd, "time_in.in_layer", hidden, 256, False)
    _lin(sd, "time_in.out_layer", hidden, hidden, False)
    _lin(sd, "guidance_in.in_layer", hidden, 256, False)
    _lin(sd, "guidance_in.out_layer", hidden, hidden, False)
    _lin(sd, "txt_in", hidden, context_dim, False)
    for i in range(depth):
        _flux_double(sd, f"double_blocks.{i}", hidden, mlp, bias=False, mods=False, norm=norm_suffix, glu=True)
    for i in range(depth_single):
        _flux_single(sd, f"single_blocks.{i}", hidden, mlp, bias=False, mods=False, norm=norm_suffix, glu=True)
    _lin(sd, "final_layer.linear", 128, hidden, False)
    _lin(sd, "final_layer.adaLN_modulation.1", 2 * hidden, hidden, False)
    _lin(sd, "double_stream_modulation_img.lin", 6 * hidden, hidden, False)
    _lin(sd, "double_stream_modulation_txt.lin", 6 * hidden, hidden, False)
    _lin(sd, "single_stream_modulation.lin", 3 * hidden, hidden, False)
    return sd


def chroma(*, depth: int = 19, depth_single: int = 38, hidden: int = 3072, norm_suffix: str = "weight") -> Shapes:
    """Chroma (Flux-derived; modulation from `distilled_guidance_layer`)."""
    sd: Shapes = {}
    _lin(sd, "img_in", hidden, 64)
    _lin(sd, "txt_in", hidden, 4096)
    g = "distilled_guidance_layer"
    _lin(sd, f"{g}.in_proj", 5120, 64)
    for i in range(5):
        _lin(sd, f"{g}.layers.{i}.in_layer", 5120, 5120)
        _lin(sd, f"{g}.layers.{i}.out_layer", 5120, 5120)
    for i in range(5):
        _norm(sd, f"{g}.norms.{i}", 5120, suffix=norm_suffix)
    _lin(sd, f"{g}.out_proj", hidden, 5120)
    for i in range(depth):
        _flux_double(sd, f"double_blocks.{i}", hidden, 4 * hidden, bias=True, mods=False, norm=norm_suffix)
    for i in range(depth_single):
        _flux_single(sd, f"single_blocks.{i}", hidden, 4 * hidden, bias=True, mods=False, norm=norm_suffix)
    _lin(sd, "final_layer.linear", 64, hidden)
    return sd


def flux_diffusers(variant: str = "dev", *, depth: int = 19, depth_single: int = 38, hidden: int = 3072) -> Shapes:
    """A diffusers `FluxTransformer2DModel` state dict (names as in ComfyUI's `flux_to_diffusers` map)."""
    sd: Shapes = {}
    _lin(sd, "x_embedder", hidden, 64)
    _lin(sd, "context_embedder", hidden, 4096)
    t = "time_text_embed"
    _lin(sd, f"{t}.timestep_embedder.linear_1", hidden, 256)
    _lin(sd, f"{t}.timestep_embedder.linear_2", hidden, hidden)
    if variant == "dev":
        _lin(sd, f"{t}.guidance_embedder.linear_1", hidden, 256)
        _lin(sd, f"{t}.guidance_embedder.linear_2", hidden, hidden)
    _lin(sd, f"{t}.text_embedder.linear_1", hidden, 768)
    _lin(sd, f"{t}.text_embedder.linear_2", hidden, hidden)
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        _lin(sd, f"{p}.norm1.linear", 6 * hidden, hidden)
        _lin(sd, f"{p}.norm1_context.linear", 6 * hidden, hidden)
        for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _lin(sd, f"{p}.attn.{x}", hidden, hidden)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _norm(sd, f"{p}.attn.{n}", 128)
        for f in ("ff", "ff_context"):
            _lin(sd, f"{p}.{f}.net.0.proj", 4 * hidden, hidden)
            _lin(sd, f"{p}.{f}.net.2", hidden, 4 * hidden)
    for i in range(depth_single):
        p = f"single_transformer_blocks.{i}"
        _lin(sd, f"{p}.norm.linear", 3 * hidden, hidden)
        _lin(sd, f"{p}.proj_mlp", 4 * hidden, hidden)
        for x in ("to_q", "to_k", "to_v"):
            _lin(sd, f"{p}.attn.{x}", hidden, hidden)
        _norm(sd, f"{p}.attn.norm_q", 128)
        _norm(sd, f"{p}.attn.norm_k", 128)
        _lin(sd, f"{p}.proj_out", hidden, 5 * hidden)
    _lin(sd, "norm_out.linear", 2 * hidden, hidden)
    _lin(sd, "proj_out", 64, hidden)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Lumina 2 / Z-Image (comfy/ldm/lumina/model.py)


def _nextdit_block(sd: Shapes, p: str, dim: int, qkv: int, ffn: int, head: int, ada: tuple[str, int] | None) -> None:
    _lin(sd, f"{p}.attention.qkv", qkv, dim, False)
    _lin(sd, f"{p}.attention.out", dim, dim, False)
    _norm(sd, f"{p}.attention.q_norm", head)
    _norm(sd, f"{p}.attention.k_norm", head)
    _lin(sd, f"{p}.feed_forward.w1", ffn, dim, False)
    _lin(sd, f"{p}.feed_forward.w2", dim, ffn, False)
    _lin(sd, f"{p}.feed_forward.w3", ffn, dim, False)
    for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        _norm(sd, f"{p}.{n}", dim)
    if ada is not None:
        name, ada_in = ada
        _lin(sd, f"{p}.adaLN_modulation.{name}", 4 * dim, ada_in)


def lumina2(variant: str = "z-image", *, n_layers: int | None = None) -> Shapes:
    """Z-Image (dim 3840, 30 layers, Qwen3 2560 captions) or Lumina Image 2.0 (dim 2304, 26 layers, Gemma2 2304)."""
    if variant == "z-image":
        dim, cap, layers, qkv, ffn, head, ada, t_out = 3840, 2560, 30, 3 * 3840, 10240, 128, ("0", 256), 256
    else:
        dim, cap, layers, qkv, ffn, head, ada, t_out = 2304, 2304, 26, 3840, 9216, 96, ("1", 1024), 1024
    n_layers = n_layers or layers
    sd: Shapes = {}
    if variant == "z-image":
        sd["x_pad_token"] = (1, dim)
        sd["cap_pad_token"] = (1, dim)
    _lin(sd, "x_embedder", dim, 64)
    for i in range(2):
        _nextdit_block(sd, f"noise_refiner.{i}", dim, qkv, ffn, head, ada)
    for i in range(2):
        _nextdit_block(sd, f"context_refiner.{i}", dim, qkv, ffn, head, None)
    _lin(sd, "t_embedder.mlp.0", 1024, 256)
    _lin(sd, "t_embedder.mlp.2", t_out, 1024)
    _norm(sd, "cap_embedder.0", cap)
    _lin(sd, "cap_embedder.1", dim, cap)
    for i in range(n_layers):
        _nextdit_block(sd, f"layers.{i}", dim, qkv, ffn, head, ada)
    _lin(sd, "final_layer.linear", 64, dim)
    _lin(sd, "final_layer.adaLN_modulation.1", dim, ada[1])
    return sd


def zimage_diffusers(*, n_layers: int = 30, dim: int = 3840) -> Shapes:
    """Diffusers `ZImageTransformer2DModel` names (as in ComfyUI's `z_image_to_diffusers` map)."""
    sd: Shapes = {}

    def block(p: str, ada: bool) -> None:
        for x in ("to_q", "to_k", "to_v"):
            _lin(sd, f"{p}.attention.{x}", dim, dim, False)
        _lin(sd, f"{p}.attention.to_out.0", dim, dim, False)
        _norm(sd, f"{p}.attention.norm_q", 128)
        _norm(sd, f"{p}.attention.norm_k", 128)
        _lin(sd, f"{p}.feed_forward.w1", 10240, dim, False)
        _lin(sd, f"{p}.feed_forward.w2", dim, 10240, False)
        _lin(sd, f"{p}.feed_forward.w3", 10240, dim, False)
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            _norm(sd, f"{p}.{n}", dim)
        if ada:
            _lin(sd, f"{p}.adaLN_modulation.0", 4 * dim, 256)

    for i in range(n_layers):
        block(f"layers.{i}", True)
    for i in range(2):
        block(f"noise_refiner.{i}", True)
        block(f"context_refiner.{i}", False)
    _lin(sd, "all_x_embedder.2-1", dim, 64)
    _lin(sd, "all_final_layer.2-1.linear", 64, dim)
    _lin(sd, "all_final_layer.2-1.adaLN_modulation.1", dim, 256)
    sd["x_pad_token"] = (1, dim)
    sd["cap_pad_token"] = (1, dim)
    _norm(sd, "cap_embedder.0", 2560)
    _lin(sd, "cap_embedder.1", dim, 2560)
    _lin(sd, "t_embedder.mlp.0", 1024, 256)
    _lin(sd, "t_embedder.mlp.2", 256, 1024)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo (comfy/ldm/hunyuan_video/model.py); original Tencent files use other names, renamed on load
# (supported_models.py HunyuanVideo.process_unet_state_dict)

_TENCENT_RENAMES = (  # (ComfyUI name part, Tencent name part), applied in this order
    ("txt_in.t_embedder.in_layer.", "txt_in.t_embedder.mlp.0."),
    ("txt_in.t_embedder.out_layer.", "txt_in.t_embedder.mlp.2."),
    ("txt_in.c_embedder.in_layer.", "txt_in.c_embedder.linear_1."),
    ("txt_in.c_embedder.out_layer.", "txt_in.c_embedder.linear_2."),
    ("_mod.lin.", "_mod.linear."),
    ("_attn.qkv.", "_attn_qkv."),
    ("_attn.proj.", "_attn_proj."),
    ("_mlp.0.", "_mlp.fc1."),
    ("_mlp.2.", "_mlp.fc2."),
    ("refiner.blocks.0.mlp.0.", "refiner.blocks.0.mlp.fc1."),
    ("refiner.blocks.0.mlp.2.", "refiner.blocks.0.mlp.fc2."),
    ("refiner.blocks.1.mlp.0.", "refiner.blocks.1.mlp.fc1."),
    ("refiner.blocks.1.mlp.2.", "refiner.blocks.1.mlp.fc2."),
    ("_attn.norm.query_norm.weight", "_attn_q_norm.weight"),
    ("_attn.norm.key_norm.weight", "_attn_k_norm.weight"),
    (".norm.query_norm.weight", ".q_norm.weight"),
    (".norm.key_norm.weight", ".k_norm.weight"),
    (".modulation.lin.", ".modulation.linear."),
    ("time_in.in_layer.", "time_in.mlp.0."),
    ("time_in.out_layer.", "time_in.mlp.2."),
    ("guidance_in.in_layer.", "guidance_in.mlp.0."),
    ("guidance_in.out_layer.", "guidance_in.mlp.2."),
)


def _to_tencent(name: str) -> str:
    for comfy_part, tencent_part in _TENCENT_RENAMES:
        name = name.replace(comfy_part, tencent_part)
    return name


def hunyuan_video(variant: str = "hunyuan-video", *, naming: str = "tencent", depth: int = 20,
                  depth_single: int = 40, hidden: int = 3072) -> Shapes:
    """HunyuanVideo T2V (default) or I2V (33 input channels), in original Tencent (default) or ComfyUI naming."""
    in_ch = 33 if variant == "hunyuan-video-i2v" else 16
    sd: Shapes = {}
    _conv(sd, "img_in.proj", hidden, in_ch, 1, 2, 2)
    for e, i in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        _lin(sd, f"{e}.in_layer", hidden, i)
        _lin(sd, f"{e}.out_layer", hidden, hidden)
    _lin(sd, "txt_in.input_embedder", hidden, 4096)
    _lin(sd, "txt_in.t_embedder.in_layer", hidden, 256)
    _lin(sd, "txt_in.t_embedder.out_layer", hidden, hidden)
    _lin(sd, "txt_in.c_embedder.in_layer", hidden, 4096)
    _lin(sd, "txt_in.c_embedder.out_layer", hidden, hidden)
    for i in range(2):
        p = f"txt_in.individual_token_refiner.blocks.{i}"
        _lin(sd, f"{p}.adaLN_modulation.1", 2 * hidden, hidden)
        _norm(sd, f"{p}.norm1", hidden, bias=True)
        _lin(sd, f"{p}.self_attn.qkv", 3 * hidden, hidden)
        _lin(sd, f"{p}.self_attn.proj", hidden, hidden)
        _norm(sd, f"{p}.norm2", hidden, bias=True)
        _lin(sd, f"{p}.mlp.0", 4 * hidden, hidden)
        _lin(sd, f"{p}.mlp.2", hidden, 4 * hidden)
    for i in range(depth):
        _flux_double(sd, f"double_blocks.{i}", hidden, 4 * hidden, bias=True, mods=True, norm="weight")
    for i in range(depth_single):
        _flux_single(sd, f"single_blocks.{i}", hidden, 4 * hidden, bias=True, mods=True, norm="weight")
    _lin(sd, "final_layer.linear", 16 * 4, hidden)
    _lin(sd, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    if naming == "tencent":
        sd = {_to_tencent(k): v for k, v in sd.items()}
    return sd


def hunyuan_video_diffusers(*, depth: int = 20, depth_single: int = 40, hidden: int = 3072) -> Shapes:
    """A diffusers `HunyuanVideoTransformer3DModel` state dict (main names only)."""
    sd: Shapes = {}
    _conv(sd, "x_embedder.proj", hidden, 16, 1, 2, 2)
    ce = "context_embedder"
    _lin(sd, f"{ce}.time_text_embed.timestep_embedder.linear_1", hidden, 256)
    _lin(sd, f"{ce}.time_text_embed.text_embedder.linear_1", hidden, 4096)
    _lin(sd, f"{ce}.proj_in", hidden, 4096)
    for i in range(2):
        p = f"{ce}.token_refiner.refiner_blocks.{i}"
        for x in ("to_q", "to_k", "to_v", "to_out.0"):
            _lin(sd, f"{p}.attn.{x}", hidden, hidden)
        _lin(sd, f"{p}.ff.net.0.proj", 4 * hidden, hidden)
        _lin(sd, f"{p}.ff.net.2", hidden, 4 * hidden)
        _lin(sd, f"{p}.norm_out.linear", 2 * hidden, hidden)
    _lin(sd, "time_text_embed.timestep_embedder.linear_1", hidden, 256)
    _lin(sd, "time_text_embed.guidance_embedder.linear_1", hidden, 256)
    _lin(sd, "time_text_embed.text_embedder.linear_1", hidden, 768)
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        _lin(sd, f"{p}.norm1.linear", 6 * hidden, hidden)
        for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _lin(sd, f"{p}.attn.{x}", hidden, hidden)
        _lin(sd, f"{p}.ff.net.0.proj", 4 * hidden, hidden)
    for i in range(depth_single):
        p = f"single_transformer_blocks.{i}"
        for x in ("to_q", "to_k", "to_v"):
            _lin(sd, f"{p}.attn.{x}", hidden, hidden)
        _lin(sd, f"{p}.proj_mlp", 4 * hidden, hidden)
        _lin(sd, f"{p}.proj_out", hidden, 5 * hidden)
    _lin(sd, "norm_out.linear", 2 * hidden, hidden)
    _lin(sd, "proj_out", 64, hidden)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# LTX-Video (comfy/ldm/lightricks/model.py)


def ltxv(variant: str = "ltxv", *, num_layers: int = 28, dim: int = 2048, context_dim: int = 4096) -> Shapes:
    """LTX-Video 2B 0.9.x (defaults). `variant="ltxav"` adds the LTX-2 audio stream's top-level keys (not exact)."""
    sd: Shapes = {}
    sd["scale_shift_table"] = (2, dim)
    _lin(sd, "patchify_proj", dim, 128)
    _lin(sd, "adaln_single.emb.timestep_embedder.linear_1", dim, 256)
    _lin(sd, "adaln_single.emb.timestep_embedder.linear_2", dim, dim)
    _lin(sd, "adaln_single.linear", 6 * dim, dim)
    _lin(sd, "caption_projection.linear_1", dim, context_dim)
    _lin(sd, "caption_projection.linear_2", dim, dim)
    for i in range(num_layers):
        p = f"transformer_blocks.{i}"
        sd[f"{p}.scale_shift_table"] = (6, dim)
        for a in ("attn1", "attn2"):
            _norm(sd, f"{p}.{a}.q_norm", dim)
            _norm(sd, f"{p}.{a}.k_norm", dim)
            _lin(sd, f"{p}.{a}.to_q", dim, dim)
            kv_in = context_dim if a == "attn2" else dim
            _lin(sd, f"{p}.{a}.to_k", dim, kv_in)
            _lin(sd, f"{p}.{a}.to_v", dim, kv_in)
            _lin(sd, f"{p}.{a}.to_out.0", dim, dim)
        _lin(sd, f"{p}.ff.net.0.proj", 4 * dim, dim)
        _lin(sd, f"{p}.ff.net.2", dim, 4 * dim)
    _lin(sd, "proj_out", 128, dim)
    if variant == "ltxav":
        adim = dim // 2
        sd["audio_scale_shift_table"] = (2, adim)
        _lin(sd, "audio_patchify_proj", adim, 128)
        _lin(sd, "audio_adaln_single.emb.timestep_embedder.linear_1", adim, 256)
        _lin(sd, "audio_adaln_single.emb.timestep_embedder.linear_2", adim, adim)
        _lin(sd, "audio_adaln_single.linear", 6 * adim, adim)
        _lin(sd, "audio_caption_projection.linear_1", adim, context_dim)
        _lin(sd, "audio_caption_projection.linear_2", adim, adim)
        for i in range(num_layers):
            p = f"transformer_blocks.{i}"
            for x in ("to_q", "to_k", "to_v", "to_out.0"):
                _lin(sd, f"{p}.audio_attn1.{x}", adim, adim)
            _lin(sd, f"{p}.audio_ff.net.0.proj", 4 * adim, adim)
            _lin(sd, f"{p}.audio_ff.net.2", adim, 4 * adim)
        _lin(sd, "audio_proj_out", 128, adim)
    return sd


def ltxv_diffusers(*, num_layers: int = 28, dim: int = 2048) -> Shapes:
    """A diffusers `LTXVideoTransformer3DModel` state dict (main names only)."""
    sd: Shapes = {}
    _lin(sd, "proj_in", dim, 128)
    sd["scale_shift_table"] = (2, dim)
    _lin(sd, "time_embed.emb.timestep_embedder.linear_1", dim, 256)
    _lin(sd, "time_embed.emb.timestep_embedder.linear_2", dim, dim)
    _lin(sd, "time_embed.linear", 6 * dim, dim)
    _lin(sd, "caption_projection.linear_1", dim, 4096)
    _lin(sd, "caption_projection.linear_2", dim, dim)
    for i in range(num_layers):
        p = f"transformer_blocks.{i}"
        sd[f"{p}.scale_shift_table"] = (6, dim)
        for a in ("attn1", "attn2"):
            kv_in = 4096 if a == "attn2" else dim
            _lin(sd, f"{p}.{a}.to_q", dim, dim)
            _lin(sd, f"{p}.{a}.to_k", dim, kv_in)
            _lin(sd, f"{p}.{a}.to_v", dim, kv_in)
            _lin(sd, f"{p}.{a}.to_out.0", dim, dim)
        _lin(sd, f"{p}.ff.net.0.proj", 4 * dim, dim)
        _lin(sd, f"{p}.ff.net.2", dim, 4 * dim)
    _lin(sd, "proj_out", 128, dim)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (comfy/ldm/modules/diffusionmodules/mmdit.py)


def sd3(variant: str = "sd3", *, depth: int | None = None) -> Shapes:
    """SD3 Medium (default), SD3.5 Large ("sd3.5-large": depth 38, rms qk-norm) or Medium ("sd3.5-medium": MMDiT-X)."""
    depth = depth or (38 if variant == "sd3.5-large" else 24)
    h = 64 * depth
    qk = variant != "sd3"
    patches = 147456 if variant == "sd3.5-medium" else 36864
    sd: Shapes = {}
    sd["pos_embed"] = (1, patches, h)
    _conv(sd, "x_embedder.proj", h, 16, 2, 2)
    _lin(sd, "t_embedder.mlp.0", h, 256)
    _lin(sd, "t_embedder.mlp.2", h, h)
    _lin(sd, "y_embedder.mlp.0", h, 2048)
    _lin(sd, "y_embedder.mlp.2", h, h)
    _lin(sd, "context_embedder", h, 4096)
    for i in range(depth):
        last = i == depth - 1
        for blk in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{blk}"
            pre_only = blk == "context_block" and last
            _lin(sd, f"{p}.attn.qkv", 3 * h, h)
            if not pre_only:
                _lin(sd, f"{p}.attn.proj", h, h)
            if qk:
                _norm(sd, f"{p}.attn.ln_q", 64)
                _norm(sd, f"{p}.attn.ln_k", 64)
            x_attn2 = blk == "x_block" and variant == "sd3.5-medium" and i <= 12
            if x_attn2:
                _lin(sd, f"{p}.attn2.qkv", 3 * h, h)
                _lin(sd, f"{p}.attn2.proj", h, h)
                _norm(sd, f"{p}.attn2.ln_q", 64)
                _norm(sd, f"{p}.attn2.ln_k", 64)
            if not pre_only:
                _lin(sd, f"{p}.mlp.fc1", 4 * h, h)
                _lin(sd, f"{p}.mlp.fc2", h, 4 * h)
            n_mod = 2 if pre_only else (9 if x_attn2 else 6)
            _lin(sd, f"{p}.adaLN_modulation.1", n_mod * h, h)
    _lin(sd, "final_layer.linear", 64, h)
    _lin(sd, "final_layer.adaLN_modulation.1", 2 * h, h)
    return sd


def sd3_diffusers(*, depth: int = 24) -> Shapes:
    """A diffusers `SD3Transformer2DModel` state dict (main names only)."""
    h = 64 * depth
    sd: Shapes = {}
    _conv(sd, "pos_embed.proj", h, 16, 2, 2)
    _lin(sd, "time_text_embed.timestep_embedder.linear_1", h, 256)
    _lin(sd, "time_text_embed.text_embedder.linear_1", h, 2048)
    _lin(sd, "context_embedder", h, 4096)
    for i in range(depth):
        p = f"transformer_blocks.{i}"
        _lin(sd, f"{p}.norm1.linear", 6 * h, h)
        _lin(sd, f"{p}.norm1_context.linear", 6 * h, h)
        for x in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"):
            _lin(sd, f"{p}.attn.{x}", h, h)
        _lin(sd, f"{p}.ff.net.0.proj", 4 * h, h)
        _lin(sd, f"{p}.ff.net.2", h, 4 * h)
    _lin(sd, "norm_out.linear", 2 * h, h)
    _lin(sd, "proj_out", 64, h)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# An unknown transformer (for the generic fallback)


def unknown_transformer(*, layers: int = 24, dim: int = 1536) -> Shapes:
    """A made-up DiT no family detector knows: input embedders, a 2-block refiner, a main stack, an output head."""
    sd: Shapes = {}
    _conv(sd, "patch_embed.proj", dim, 16, 2, 2)
    _lin(sd, "cond_in", dim, 4096)
    _lin(sd, "timestep_embedder.mlp.0", dim, 256)
    _lin(sd, "timestep_embedder.mlp.2", dim, dim)
    _lin(sd, "global_modulation", 6 * dim, dim)
    for group, n in (("refiner", 2), ("stack.layers", layers)):
        for i in range(n):
            p = f"{group}.{i}"
            _norm(sd, f"{p}.norm1", dim)
            _lin(sd, f"{p}.attn.wqkv", 3 * dim, dim)
            _lin(sd, f"{p}.attn.wo", dim, dim)
            _lin(sd, f"{p}.attn2.to_q", dim, dim)
            _lin(sd, f"{p}.attn2.to_k", dim, 4096)
            _lin(sd, f"{p}.attn2.to_v", dim, 4096)
            _lin(sd, f"{p}.mlp.fc1", 4 * dim, dim)
            _lin(sd, f"{p}.mlp.fc2", dim, 4 * dim)
            _lin(sd, f"{p}.adaLN.linear", 6 * dim, dim)
    _norm(sd, "final_norm", dim)
    _lin(sd, "out_head", 64, dim)
    return sd


# ---------------------------------------------------------------------------------------------------------------
# The cases the tests iterate over


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Shapes]
    family: str
    variant: str
    groups: dict[str, int]
    unet_config: dict | None = None      # what ComfyUI's detect_unet_config gives for the real model
    comfy_model: str | None = None       # ComfyUI supported_models class it detects as
    exact: bool = True                   # the static map equals ComfyUI's state dict (after process_unet_state_dict)
    naming: str = "comfyui"
    details: dict = field(default_factory=dict)


_WAN14 = dict(image_model="wan2.1", dim=5120, out_dim=16, num_heads=40, ffn_dim=13824, num_layers=40,
              patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
              in_dim=16, model_type="t2v")
_FLUX = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=16,
             qkv_bias=True, txt_ids_dims=[], in_channels=16, hidden_size=3072, context_in_dim=4096, patch_size=2,
             vec_in_dim=768, depth=19, depth_single_blocks=38, guidance_embed=True, yak_mlp=False, txt_norm=False)
_HY = dict(image_model="hunyuan_video", in_channels=16, patch_size=[1, 2, 2], out_channels=16, vec_in_dim=768,
           axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
           depth=20, depth_single_blocks=40, theta=256, qkv_bias=True, byt5=False, guidance_embed=True,
           use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
_SD3 = dict(in_channels=16, patch_size=2, out_channels=16, depth=24, input_size=None, adm_in_channels=2048,
            context_embedder_config={"target": "torch.nn.Linear",
                                     "params": {"in_features": 4096, "out_features": 1536}},
            num_patches=36864, pos_embed_max_size=192, pos_embed_scaling_factor=None, x_block_self_attn_layers=[])

_W = {"blocks": 40}
CASES: list[Case] = [
    Case("wan2.1-t2v-14b", lambda: wan("t2v"), "wan", "wan2.1-t2v", _W, _WAN14, "WAN21_T2V",
         details={"dim": 5120, "in_dim": 16, "out_dim": 16, "ffn_dim": 13824}),
    Case("wan2.1-i2v-14b", lambda: wan("i2v"), "wan", "wan2.1-i2v", _W,
         dict(_WAN14, model_type="i2v", in_dim=36), "WAN21_I2V"),
    Case("wan2.1-flf2v-14b", lambda: wan("flf2v"), "wan", "wan2.1-flf2v", _W,
         dict(_WAN14, model_type="i2v", in_dim=36, flf_pos_embed_token_number=514), "WAN21_I2V"),
    Case("wan2.1-fun-control-14b", lambda: wan("fun-control"), "wan", "wan2.1-fun-control", _W,
         dict(_WAN14, model_type="i2v", in_dim=48), "WAN21_FunControl2V"),
    Case("wan2.2-i2v-14b", lambda: wan("2.2-i2v"), "wan", "wan2.2-i2v", _W,
         dict(_WAN14, in_dim=36), "WAN21_T2V", details={"in_dim": 36}),
    Case("wan2.2-ti2v-5b", lambda: wan("ti2v-5b"), "wan", "wan2.2-ti2v-5b", {"blocks": 30},
         dict(_WAN14, dim=3072, num_heads=24, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48), "WAN22_T2V",
         details={"dim": 3072, "out_dim": 48, "in_dim": 48}),
    Case("wan-vace-14b", lambda: wan("vace"), "wan", "wan-vace", {"blocks": 40, "vace_blocks": 8},
         dict(_WAN14, model_type="vace", vace_in_dim=96, vace_layers=8), "WAN21_Vace"),
    Case("wan2.1-camera-14b", lambda: wan("camera"), "wan", "wan-camera", _W,
         dict(_WAN14, model_type="camera", in_dim=32), "WAN21_Camera"),
    Case("wan2.2-camera-14b", lambda: wan("camera-2.2"), "wan", "wan-camera", _W,
         dict(_WAN14, model_type="camera_2.2", in_dim=36), "WAN22_Camera"),
    Case("wan2.2-s2v-14b", lambda: wan("s2v"), "wan", "wan-s2v", _W, dict(_WAN14, model_type="s2v"), "WAN22_S2V"),
    Case("wan-humo-14b", lambda: wan("humo"), "wan", "wan-humo", _W, dict(_WAN14, model_type="humo"), "WAN21_HuMo"),
    Case("wan2.2-animate-14b", lambda: wan("animate"), "wan", "wan-animate", _W,
         dict(_WAN14, model_type="animate", in_dim=36), "WAN22_Animate"),
    Case("qwen-image", lambda: qwen_image(), "qwen_image", "qwen-image", {"transformer_blocks": 60},
         dict(image_model="qwen_image", in_channels=64, num_layers=60), "QwenImage"),
    Case("qwen-image-edit-2511", lambda: qwen_image("qwen-image-edit-2511"), "qwen_image", "qwen-image-edit-2511",
         {"transformer_blocks": 60},
         dict(image_model="qwen_image", in_channels=64, num_layers=60, default_ref_method="index_timestep_zero"),
         "QwenImage"),
    Case("qwen-image-layered", lambda: qwen_image("qwen-image-layered"), "qwen_image", "qwen-image-layered",
         {"transformer_blocks": 60},
         dict(image_model="qwen_image", in_channels=64, num_layers=60, use_additional_t_cond=True,
              default_ref_method="negative_index"), "QwenImage"),
    Case("flux-dev", lambda: flux("dev"), "flux", "flux-dev", {"double_blocks": 19, "single_blocks": 38}, _FLUX,
         "Flux"),
    Case("flux-dev-bfl-scale", lambda: flux("dev", norm_suffix="scale"), "flux", "flux-dev",
         {"double_blocks": 19, "single_blocks": 38}, _FLUX, "Flux"),
    Case("flux-schnell", lambda: flux("schnell"), "flux", "flux-schnell", {"double_blocks": 19, "single_blocks": 38},
         dict(_FLUX, guidance_embed=False), "FluxSchnell"),
    Case("flux-fill", lambda: flux("fill"), "flux", "flux-fill", {"double_blocks": 19, "single_blocks": 38},
         dict(_FLUX, in_channels=96), "FluxInpaint"),
    Case("flux2-dev", lambda: flux2(), "flux2", "flux2", {"double_blocks": 8, "single_blocks": 48},
         dict(image_model="flux2", axes_dim=[32, 32, 32, 32], num_heads=48, mlp_ratio=3.0, theta=2000,
              out_channels=128, global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False,
              default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1, in_channels=128,
              hidden_size=6144, context_in_dim=15360, vec_in_dim=None, depth=8, depth_single_blocks=48,
              guidance_embed=True, yak_mlp=False, txt_norm=False), "Flux2"),
    Case("chroma", lambda: chroma(), "chroma", "chroma", {"double_blocks": 19, "single_blocks": 38},
         dict(image_model="chroma", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, out_channels=64,
              qkv_bias=True, txt_ids_dims=[], in_channels=64, hidden_size=3072, context_in_dim=4096, patch_size=2,
              vec_in_dim=None, depth=19, depth_single_blocks=38, in_dim=64, out_dim=3072, hidden_dim=5120,
              n_layers=5), "Chroma"),
    Case("z-image", lambda: lumina2("z-image"), "lumina2", "z-image",
         {"layers": 30, "noise_refiner": 2, "context_refiner": 2},
         dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30,
              qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
              rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
              pad_tokens_multiple=32), "ZImage"),
    Case("lumina2", lambda: lumina2("lumina2"), "lumina2", "lumina2",
         {"layers": 26, "noise_refiner": 2, "context_refiner": 2},
         dict(image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=26,
              qk_norm=True, n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512],
              rope_theta=10000.0, ffn_dim_multiplier=4.0), "Lumina2"),
    Case("hunyuan-video", lambda: hunyuan_video(), "hunyuan_video", "hunyuan-video",
         {"double_blocks": 20, "single_blocks": 40}, _HY, "HunyuanVideo"),
    Case("hunyuan-video-comfy-names", lambda: hunyuan_video(naming="comfyui"), "hunyuan_video", "hunyuan-video",
         {"double_blocks": 20, "single_blocks": 40}, _HY, "HunyuanVideo"),
    Case("hunyuan-video-i2v", lambda: hunyuan_video("hunyuan-video-i2v"), "hunyuan_video", "hunyuan-video-i2v",
         {"double_blocks": 20, "single_blocks": 40}, dict(_HY, in_channels=33), "HunyuanVideoI2V"),
    Case("ltxv", lambda: ltxv(), "ltxv", "ltxv", {"transformer_blocks": 28},
         dict(image_model="ltxv", num_layers=28, attention_head_dim=64, cross_attention_dim=4096), "LTXV"),
    Case("ltxav", lambda: ltxv("ltxav", num_layers=48, dim=4096), "ltxv", "ltxav", {"transformer_blocks": 48},
         dict(image_model="ltxav", num_layers=48, attention_head_dim=128, cross_attention_dim=4096), "LTXAV",
         exact=False),
    Case("sd3-medium", lambda: sd3(), "sd3", "sd3", {"joint_blocks": 24}, _SD3, "SD3"),
    Case("sd3.5-large", lambda: sd3("sd3.5-large"), "sd3", "sd3.5-large", {"joint_blocks": 38},
         dict(_SD3, depth=38, qk_norm="rms", context_embedder_config={
             "target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 2432}}), "SD3"),
    Case("sd3.5-medium", lambda: sd3("sd3.5-medium"), "sd3", "sd3.5-medium", {"joint_blocks": 24},
         dict(_SD3, qk_norm="rms", num_patches=147456, pos_embed_max_size=384,
              x_block_self_attn_layers=list(range(13))), "SD3"),
    # diffusers naming: detected and reported, refused by preset_for
    Case("wan-diffusers-t2v", lambda: wan_diffusers("t2v"), "wan", "wan2.1-t2v", {"blocks": 40}, naming="diffusers"),
    Case("wan-diffusers-i2v", lambda: wan_diffusers("i2v"), "wan", "wan2.1-i2v", {"blocks": 40}, naming="diffusers"),
    Case("flux-diffusers-dev", lambda: flux_diffusers("dev"), "flux", "flux-dev",
         {"transformer_blocks": 19, "single_transformer_blocks": 38}, naming="diffusers"),
    Case("flux-diffusers-schnell", lambda: flux_diffusers("schnell"), "flux", "flux-schnell",
         {"transformer_blocks": 19, "single_transformer_blocks": 38}, naming="diffusers"),
    Case("sd3-diffusers", lambda: sd3_diffusers(), "sd3", "sd3", {"transformer_blocks": 24}, naming="diffusers"),
    Case("z-image-diffusers", lambda: zimage_diffusers(), "lumina2", "z-image",
         {"layers": 30, "noise_refiner": 2, "context_refiner": 2}, naming="diffusers"),
    Case("hunyuan-video-diffusers", lambda: hunyuan_video_diffusers(), "hunyuan_video", "hunyuan-video",
         {"transformer_blocks": 20, "single_transformer_blocks": 40}, naming="diffusers"),
    Case("ltxv-diffusers", lambda: ltxv_diffusers(), "ltxv", "ltxv", {"transformer_blocks": 28}, naming="diffusers"),
    # generic fallback
    Case("unknown-transformer", lambda: unknown_transformer(), "generic", "generic-transformer",
         {"refiner": 2, "stack.layers": 24}),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def linear_layers(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """Layer name -> (out, in) of every 2-D `.weight` (what a plan would consider quantizing)."""
    return {k[: -len(".weight")]: v for k, v in shapes.items() if k.endswith(".weight") and len(v) == 2}


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI on the meta device


def comfy():
    """ComfyUI imported in CPU mode (tests/comfy_support.py); the `comfyui` marker skips or fails without it."""
    from comfy_support import import_comfy  # noqa: PLC0415

    pkg = import_comfy()
    import comfy.model_detection  # noqa: F401,PLC0415
    import comfy.ops  # noqa: F401,PLC0415
    import comfy.supported_models  # noqa: F401,PLC0415
    import comfy.utils  # noqa: F401,PLC0415

    return pkg


def _meta_model(unet_config: dict):
    import torch  # noqa: PLC0415

    c = comfy()
    model_config = c.model_detection.model_config_from_unet_config(dict(unet_config))
    if model_config is None:
        raise ValueError(f"ComfyUI has no model for {unet_config}")
    model_config.custom_operations = c.ops.disable_weight_init
    with torch.device("meta"):
        base = model_config.get_model({}, device=torch.device("meta"))
    return model_config, base.diffusion_model


_BUILT: dict[str, tuple[str, Shapes, frozenset[str]]] = {}


def _built(unet_config: dict) -> tuple[str, Shapes, frozenset[str]]:
    import torch  # noqa: PLC0415

    key = repr(sorted(unet_config.items()))
    if key not in _BUILT:
        model_config, net = _meta_model(unet_config)
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        linears = frozenset(name for name, mod in net.named_modules() if isinstance(mod, torch.nn.Linear))
        _BUILT[key] = (type(model_config).__name__, shapes, linears)
    return _BUILT[key]


def comfy_shapes(unet_config: dict) -> tuple[str, Shapes]:
    """(ComfyUI model-config class name, state-dict shapes) of ComfyUI's model for `unet_config`, built on meta."""
    cls, shapes, _ = _built(unet_config)
    return cls, dict(shapes)


def comfy_linear_names(unet_config: dict) -> frozenset[str]:
    """Names of the modules of ComfyUI's model that are `torch.nn.Linear` (the only ones that load quantized)."""
    return _built(unet_config)[2]


def comfy_process(unet_config: dict, shapes: Shapes) -> Shapes:
    """Apply the model config's `process_unet_state_dict` (key renames done on load) to a shapes map."""
    c = comfy()
    model_config = c.model_detection.model_config_from_unet_config(dict(unet_config))
    out = model_config.process_unet_state_dict(dict(shapes))
    return dict(out)


def meta_state_dict(shapes: Shapes) -> dict:
    """Meta tensors with these shapes (what `detect_unet_config` needs: names and `.shape`)."""
    import torch  # noqa: PLC0415

    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def comfy_only_cases() -> list[Case]:
    """Variants covered only through ComfyUI meta builds (no static map): `build` is None-safe via comfy_shapes."""
    import torch  # noqa: PLC0415  (the Chroma Radiance config holds a dtype)

    hy15 = dict(_HY, in_channels=65, patch_size=[1, 1, 1], out_channels=32, vec_in_dim=None, hidden_size=2048,
                num_heads=16, depth=54, depth_single_blocks=0, byt5=True, guidance_embed=False,
                use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True, context_in_dim=3584)
    hyimg = dict(_HY, in_channels=64, patch_size=[1, 1], out_channels=64, vec_in_dim=None, axes_dim=[64, 64],
                 hidden_size=3584, num_heads=28, depth=20, depth_single_blocks=40, byt5=True, guidance_embed=False,
                 context_in_dim=3584)
    chroma_cfg = CASES_BY_NAME["chroma"].unet_config
    radiance = dict(chroma_cfg, image_model="chroma_radiance", in_channels=3, out_channels=3, patch_size=16,
                    nerf_hidden_size=64, nerf_mlp_ratio=4, nerf_depth=4, nerf_max_freqs=8, nerf_tile_size=512,
                    nerf_final_head_type="linear", nerf_embedder_dtype=torch.float32, use_x0=False,
                    use_sequential_txt_ids=False)
    zpixel = dict(CASES_BY_NAME["z-image"].unet_config, image_model="zimage_pixel", patch_size=16, in_channels=3,
                  decoder_in_channels=768, decoder_hidden_size=64, decoder_num_res_blocks=4, decoder_max_freqs=8)
    sdxl = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": 2048, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_attention": False, "use_temporal_resblock": False}
    hidream = {"image_model": "hidream", "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32],
               "caption_channels": [4096, 4096], "max_resolution": [128, 128], "in_channels": 16,
               "llama_layers": list(range(32)) + [31] * 16, "num_attention_heads": 20, "num_routed_experts": 4,
               "num_activated_experts": 2, "num_layers": 16, "num_single_layers": 32, "out_channels": 16,
               "patch_size": 2, "text_emb_dim": 2048}

    def none() -> Shapes:
        raise RuntimeError("comfy-only case: use comfy_shapes(case.unet_config)")

    return [
        Case("hunyuan-video-1.5", none, "hunyuan_video", "hunyuan-video-1.5", {"double_blocks": 54}, hy15,
             "HunyuanVideo15", exact=False),
        Case("hunyuan-image-2.1", none, "hunyuan_video", "hunyuan-image-2.1",
             {"double_blocks": 20, "single_blocks": 40}, hyimg, "HunyuanImage21", exact=False),
        Case("chroma-radiance", none, "chroma", "chroma-radiance",
             {"double_blocks": 19, "single_blocks": 38, "nerf_blocks": 4}, radiance, "ChromaRadiance", exact=False),
        Case("z-image-pixel", none, "lumina2", "z-image-pixel",
             {"layers": 30, "noise_refiner": 2, "context_refiner": 2}, zpixel, "ZImagePixelSpace", exact=False),
        Case("sdxl-unet", none, "generic", "generic-transformer",
             {"label_emb": 1, "input_blocks": 9, "middle_block": 3, "output_blocks": 9}, sdxl, "SDXL", exact=False),
        Case("hidream", none, "generic", "generic-transformer",
             {"double_stream_blocks": 16, "single_stream_blocks": 32, "caption_projection": 49}, hidream, "HiDream",
             exact=False),
    ]
