"""Which diffusion model a checkpoint holds, read from tensor names and shapes only (the header, no tensor data).

Why: every later decision (which preset, which layers ComfyUI's loader reads, how many blocks there are) depends on
the architecture, and it must be known before a single tensor is read. The rules mirror ComfyUI 0.29's own
`comfy/model_detection.py` (`detect_unet_config`): the same trigger keys, checked in the same order, so a file we
call "flux-dev" is one ComfyUI also loads as Flux dev. Line numbers below refer to that file.

Families and variants (``Architecture.family`` / ``Architecture.variant``):

=============  =========================================================================================
family         variants
=============  =========================================================================================
wan            wan2.1-t2v (also Wan 2.2 T2V A14B: identical keys), wan2.1-i2v, wan2.1-flf2v,
               wan2.1-fun-control, wan2.2-i2v, wan2.2-ti2v-5b, wan-vace, wan-camera, wan-s2v,
               wan-animate, wan-humo, wan-scail, wan-dancer
qwen_image     qwen-image (also Qwen-Image-Edit / 2509 / 2512: identical keys), qwen-image-edit-2511,
               qwen-image-layered
flux           flux-dev (also Kontext), flux-schnell, flux-fill
flux2          flux2
chroma         chroma, chroma-radiance
lumina2        lumina2, z-image, z-image-pixel
hunyuan_video  hunyuan-video, hunyuan-video-i2v, hunyuan-video-1.5, hunyuan-image-2.1
ltxv           ltxv, ltxav (LTX-2 audio+video)
sd3            sd3, sd3.5-large, sd3.5-medium
generic        generic-transformer (anything else; block groups discovered from `<prefix>.<int>.` names)
=============  =========================================================================================

Diffusers-named checkpoints of Wan, Flux/Flux.2/Chroma, SD3, Z-Image, HunyuanVideo and LTX-Video are recognised and
reported with ``naming="diffusers"``. ComfyUI either cannot load them at all (Wan, HunyuanVideo, LTX) or converts
their keys on load with `convert_diffusers_mmdit` (`comfy/model_detection.py:1462-1529`), which keeps only the keys
it maps, so the `weight_scale` / `comfy_quant` tensors of a quantized file would be dropped. The converter must
refuse them; `quant.presets.preset_for` raises a `PlanError` saying so. (Qwen-Image needs no such case: ComfyUI's
names for it are the diffusers names.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

FAMILIES = ("wan", "qwen_image", "flux", "flux2", "chroma", "lumina2", "hunyuan_video", "ltxv", "sd3", "generic")
NAMINGS = ("comfyui", "diffusers")

# Prefixes under which a diffusion model's tensors may sit in a full checkpoint (ComfyUI:
# `unet_prefix_from_state_dict`, comfy/model_detection.py:1244-1264). Bare names are the norm for our files.
_MODEL_PREFIXES = ("model.diffusion_model.",)


@dataclass(frozen=True)
class Architecture:
    """What a checkpoint is: family, variant, its stacks of transformer blocks, default preset and key naming.

    `block_groups` maps a block-stack prefix to its number of blocks (max index + 1), e.g. ``{"blocks": 40}`` or
    ``{"double_blocks": 19, "single_blocks": 38}``. `details` carries the dimensions detection read (for reports);
    it is not part of equality.
    """

    family: str
    variant: str
    block_groups: dict[str, int]
    preset: str
    naming: str
    details: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __hash__(self) -> int:  # block_groups is a dict: hash a frozen view of it
        return hash((self.family, self.variant, tuple(sorted(self.block_groups.items())), self.preset, self.naming))

    @property
    def num_blocks(self) -> int:
        """Total number of blocks over all block groups."""
        return sum(self.block_groups.values())

    def describe(self) -> str:
        """One line for reports, e.g. ``wan2.2-i2v (wan; blocks×40; preset wan)``."""
        groups = ", ".join(f"{p}×{n}" for p, n in self.block_groups.items()) or "no block groups"
        naming = "" if self.naming == "comfyui" else "; diffusers naming"
        return f"{self.variant} ({self.family}; {groups}; preset {self.preset}{naming})"

    def as_dict(self) -> dict[str, object]:
        """JSON-safe dict (for plan provenance and reports)."""
        return {
            "family": self.family,
            "variant": self.variant,
            "block_groups": dict(self.block_groups),
            "preset": self.preset,
            "naming": self.naming,
            "details": {k: _json_safe(v) for k, v in self.details.items()},
        }


def _json_safe(value: object) -> object:
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Key-set helpers


class _Keys:
    """Bare tensor names -> shapes, with the few queries detection needs."""

    def __init__(self, shapes: Mapping[str, object]):
        items = {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}
        for prefix in _MODEL_PREFIXES:
            inside = {k[len(prefix):]: v for k, v in items.items() if k.startswith(prefix)}
            if len(inside) > 5:  # same threshold as ComfyUI's unet_prefix_from_state_dict
                items = inside
                break
        self.shapes = items
        self.names = list(items)

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.shapes.get(key)

    def dim(self, key: str, axis: int) -> int | None:
        shape = self.shapes.get(key)
        if shape is None:
            return None
        try:
            return shape[axis]
        except IndexError:
            return None

    def any_suffix(self, stem: str, suffixes: tuple[str, ...] = ("weight", "scale")) -> bool:
        """ComfyUI's `any_suffix_in` (model_detection.py:23-27): norms are `.weight` or `.scale` (BFL originals)."""
        return any(stem + s in self.shapes for s in suffixes)

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.names)

    def count(self, prefix: str) -> int:
        """Blocks under `prefix` (e.g. "blocks"): max index + 1 over keys `prefix.<int>.…`, 0 if none."""
        pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        best = -1
        for k in self.names:
            m = pat.match(k)
            if m:
                best = max(best, int(m.group(1)))
        return best + 1

    def groups(self, *prefixes: str) -> dict[str, int]:
        """Block counts for the given prefixes, leaving out those with no blocks."""
        out = {}
        for p in prefixes:
            n = self.count(p)
            if n:
                out[p] = n
        return out


_GROUP_RE = re.compile(r"((?:[A-Za-z_]\w*\.)*?[A-Za-z_]\w*)\.(\d+)\.[^.]+\.")


def discover_block_groups(names: Iterable[str]) -> dict[str, int]:
    """Block groups of an unknown model: every shortest `<prefix>.<int>.` with at least two more name components.

    Why two: `<prefix>.<int>.weight` is one Linear inside an `nn.Sequential` (Wan `text_embedding.0`, Qwen
    `img_mod.1`), not a block. The prefix is the shortest run of non-numeric components before the first numeric
    one, so `blocks.3.ffn.0.weight` gives `blocks` and `vace_blocks.3.…` gives `vace_blocks` (never `blocks`).
    Counts are max index + 1. The order is the order of first appearance.
    """
    counts: dict[str, int] = {}
    for k in names:
        m = _GROUP_RE.match(k)
        if m:
            prefix, idx = m.group(1), int(m.group(2))
            counts[prefix] = max(counts.get(prefix, 0), idx + 1)
    return counts


def block_of(layer: str, arch: Architecture) -> tuple[str, int] | None:
    """The (block-group prefix, block index) a layer (or tensor) name belongs to, or None outside every block group.

    Why: "keep the first/last N blocks" needs it, and it must not confuse `vace_blocks.3` with `blocks.3` (the
    original scripts' regexes did). The longest matching prefix wins.
    """
    best: tuple[str, int] | None = None
    for prefix in arch.block_groups:
        if layer.startswith(prefix + "."):
            rest = layer[len(prefix) + 1:]
            head, _, _ = rest.partition(".")
            if head.isdigit() and (best is None or len(prefix) > len(best[0])):
                best = (prefix, int(head))
    return best


# ---------------------------------------------------------------------------------------------------------------
# Family detectors, in ComfyUI's order (detect_unet_config). Each returns an Architecture or None.


def _arch(family: str, variant: str, groups: dict[str, int], preset: str | None = None, naming: str = "comfyui",
          **details: object) -> Architecture:
    return Architecture(family=family, variant=variant, block_groups=groups, preset=preset or family, naming=naming,
                        details={k: v for k, v in details.items() if v is not None})


def _sd3(k: _Keys) -> Architecture | None:
    # model_detection.py:47-86 (MMDiT)
    if "joint_blocks.0.context_block.attn.qkv.weight" not in k:
        return None
    if any(n.startswith("joint_blocks.") and n.endswith(".x_block.attn2.qkv.weight") for n in k.names):
        variant = "sd3.5-medium"
    elif "joint_blocks.0.context_block.attn.ln_q.weight" in k:
        variant = "sd3.5-large"
    else:
        variant = "sd3"
    x = k.shape("x_embedder.proj.weight")
    ctx = k.shape("context_embedder.weight")
    return _arch("sd3", variant, k.groups("joint_blocks"),
                 hidden_size=x[0] if x else None, in_channels=x[1] if x and len(x) > 1 else None,
                 context_dim=ctx[1] if ctx and len(ctx) > 1 else None)


def _hunyuan_video(k: _Keys) -> Architecture | None:
    # model_detection.py:183-233
    if "txt_in.individual_token_refiner.blocks.0.norm1.weight" not in k:
        return None
    in_w = k.shape("img_in.proj.weight")
    in_channels = in_w[1] if in_w and len(in_w) > 1 else None
    if "vision_in.proj.0.weight" in k:
        variant = "hunyuan-video-1.5"
    elif in_w is not None and len(in_w) == 4:  # 2-D patch: HunyuanImage 2.1
        variant = "hunyuan-image-2.1"
    elif in_channels in (32, 33):  # SkyReels / HunyuanVideo I2V (supported_models.py HunyuanVideoI2V)
        variant = "hunyuan-video-i2v"
    else:
        variant = "hunyuan-video"
    return _arch("hunyuan_video", variant, k.groups("double_blocks", "single_blocks"),
                 hidden_size=in_w[0] if in_w else None, in_channels=in_channels,
                 context_dim=k.dim("txt_in.input_embedder.weight", 1))


def _flux_like(k: _Keys) -> Architecture | None:
    # model_detection.py:235-329 (Flux, Flux 2, Chroma, Chroma Radiance)
    if not (k.any_suffix("double_blocks.0.img_attn.norm.key_norm.")
            and ("img_in.weight" in k or k.any_suffix("distilled_guidance_layer.norms.0."))):
        return None
    groups = k.groups("double_blocks", "single_blocks")
    img_in = k.shape("img_in.weight")
    txt_in = k.shape("txt_in.weight")
    dims = dict(hidden_size=img_in[0] if img_in else None, context_dim=txt_in[1] if txt_in else None,
                vec_in_dim=k.dim("vector_in.in_layer.weight", 1))
    if "double_stream_modulation_img.lin.weight" in k:  # :237
        return _arch("flux2", "flux2", groups, in_channels=img_in[1] if img_in else None, **dims)
    if k.any_suffix("distilled_guidance_layer.0.norms.0.") or k.any_suffix("distilled_guidance_layer.norms.0."):  # :291
        variant = "chroma-radiance" if k.any_suffix("nerf_blocks.0.norm.") else "chroma"  # :300
        groups.update(k.groups("nerf_blocks"))
        return _arch("chroma", variant, groups, **dims)
    in_channels = img_in[1] // 4 if img_in else None  # patch 2x2
    if "guidance_in.in_layer.weight" in k:  # :321
        variant = "flux-fill" if in_channels == 96 else "flux-dev"  # supported_models.py FluxInpaint: 96 channels
    else:
        variant = "flux-schnell"
    return _arch("flux", variant, groups, in_channels=in_channels, **dims)


def _ltxv(k: _Keys) -> Architecture | None:
    # model_detection.py:358-371 (PixArt diffusers shares the trigger and is excluded first)
    trigger = "adaln_single.emb.timestep_embedder.linear_1."
    if not k.any_suffix(trigger, ("bias", "weight")) or k.any_suffix("pos_embed.proj.", ("bias", "weight")):
        return None
    variant = "ltxav" if "audio_adaln_single.linear.weight" in k else "ltxv"  # :364
    to_k = k.shape("transformer_blocks.0.attn2.to_k.weight")
    return _arch("ltxv", variant, k.groups("transformer_blocks"),
                 cross_attention_dim=to_k[1] if to_k else None, inner_dim=to_k[0] if to_k else None)


def _lumina2(k: _Keys) -> Architecture | None:
    # model_detection.py:518-582 (Lumina 2, Z-Image, Z-Image pixel space, NewBie)
    if not ("cap_embedder.1.weight" in k and "noise_refiner.0.attention.k_norm.weight" in k):
        return None
    cap = k.shape("cap_embedder.1.weight")
    dim = cap[0] if cap else None
    if dim == 3840:  # :540
        variant = "z-image-pixel" if "dec_net.cond_embed.weight" in k else "z-image"  # :559-561
    else:
        variant = "lumina2"
    groups = k.groups("layers", "noise_refiner", "context_refiner", "siglip_refiner")
    return _arch("lumina2", variant, groups, dim=dim, cap_feat_dim=cap[1] if cap and len(cap) > 1 else None)


def _wan(k: _Keys) -> Architecture | None:
    # model_detection.py:670-724
    if "head.modulation" not in k:
        return None
    out_rows = k.dim("head.head.weight", 0)
    out_dim = out_rows // 4 if out_rows else None
    in_dim = k.dim("patch_embedding.weight", 1)
    has_img_emb = "img_emb.proj.0.bias" in k
    if "vace_patch_embedding.weight" in k:  # :687
        model_type, variant = "vace", "wan-vace"
    elif "control_adapter.conv.weight" in k:  # :691
        model_type, variant = ("camera" if has_img_emb else "camera_2.2"), "wan-camera"
    elif "casual_audio_encoder.encoder.final_linear.weight" in k:  # :696
        model_type, variant = "s2v", "wan-s2v"
    elif "audio_proj.audio_proj_glob_1.layer.bias" in k:  # :698
        model_type, variant = "humo", "wan-humo"
    elif "face_adapter.fuser_blocks.0.k_norm.weight" in k:  # :700
        model_type, variant = "animate", "wan-animate"
    elif "patch_embedding_mask.weight" in k:
        model_type, variant = "scail2", "wan-scail"
    elif "patch_embedding_pose.weight" in k:
        model_type, variant = "scail", "wan-scail"
    elif "patch_embedding_global.weight" in k:
        model_type, variant = "wandancer", "wan-dancer"
    elif has_img_emb:  # :709
        model_type = "i2v"
        if "img_emb.emb_pos" in k:
            variant = "wan2.1-flf2v"
        elif in_dim == 48:  # supported_models.py WAN21_FunControl2V
            variant = "wan2.1-fun-control"
        else:
            variant = "wan2.1-i2v"
    else:
        model_type = "t2v"
        if out_dim == 48:  # supported_models.py WAN22_T2V (TI2V 5B: Wan 2.2 VAE, 48 channels)
            variant = "wan2.2-ti2v-5b"
        elif in_dim == 36:  # Wan 2.2 I2V A14B: image latent concatenated, no CLIP image embedding
            variant = "wan2.2-i2v"
        else:
            variant = "wan2.1-t2v"
    mod = k.shape("head.modulation")
    return _arch("wan", variant, k.groups("blocks", "vace_blocks"), model_type=model_type,
                 dim=mod[-1] if mod else None, in_dim=in_dim, out_dim=out_dim,
                 ffn_dim=k.dim("blocks.0.ffn.0.weight", 0))


def _qwen_image(k: _Keys) -> Architecture | None:
    # model_detection.py:894-904; Lens (:863-885) and Mage-Flow (:887-892) share `txt_norm` and come first.
    if "txt_norm.weight" not in k:
        return None
    if "transformer_blocks.0.attn.norm_added_q.weight" in k and "transformer_blocks.0.img_mlp.w1.weight" in k:
        return None  # Lens
    if k.dim("txt_norm.weight", 0) == 2560 and k.dim("proj_out.weight", 0) == 128:
        return None  # Mage-Flow
    if "img_in.weight" not in k:
        return None
    if "__index_timestep_zero__" in k:  # :899
        variant = "qwen-image-edit-2511"
    elif "time_text_embed.addition_t_embedding.weight" in k:  # :901
        variant = "qwen-image-layered"
    else:
        variant = "qwen-image"
    return _arch("qwen_image", variant, k.groups("transformer_blocks"),
                 in_channels=k.dim("img_in.weight", 1), hidden_size=k.dim("img_in.weight", 0))


# Diffusers-named checkpoints (after every ComfyUI-named family failed).


def _wan_diffusers(k: _Keys) -> Architecture | None:
    if not ("condition_embedder.time_embedder.linear_1.weight" in k and k.has_prefix("blocks.0.attn1.")):
        return None
    in_dim = k.dim("patch_embedding.weight", 1)
    out_rows = k.dim("proj_out.weight", 0)
    if k.has_prefix("vace_blocks."):
        variant = "wan-vace"
    elif k.has_prefix("condition_embedder.image_embedder."):
        variant = "wan2.1-i2v"
    elif out_rows == 192:  # 48 channels x (2x2) patch
        variant = "wan2.2-ti2v-5b"
    elif in_dim == 36:
        variant = "wan2.2-i2v"
    else:
        variant = "wan2.1-t2v"
    return _arch("wan", variant, k.groups("blocks", "vace_blocks"), preset="wan", naming="diffusers", in_dim=in_dim)


def _flux_diffusers(k: _Keys) -> Architecture | None:
    blocks = k.has_prefix("single_transformer_blocks.0.") or k.has_prefix("transformer_blocks.0.attn.add_q_proj.")
    if not ("x_embedder.weight" in k and "context_embedder.weight" in k and blocks):
        return None
    groups = k.groups("transformer_blocks", "single_transformer_blocks")
    if "double_stream_modulation_img.linear.weight" in k:
        return _arch("flux2", "flux2", groups, naming="diffusers")
    if k.has_prefix("distilled_guidance_layer."):
        return _arch("chroma", "chroma", groups, naming="diffusers")
    variant = "flux-dev" if k.has_prefix("time_text_embed.guidance_embedder.") else "flux-schnell"
    return _arch("flux", variant, groups, naming="diffusers")


def _sd3_diffusers(k: _Keys) -> Architecture | None:
    # convert_diffusers_mmdit's SD3 test (model_detection.py:1485)
    if not ("transformer_blocks.0.attn.add_q_proj.weight" in k and "pos_embed.proj.weight" in k):
        return None
    return _arch("sd3", "sd3", k.groups("transformer_blocks"), naming="diffusers")


def _zimage_diffusers(k: _Keys) -> Architecture | None:
    # convert_diffusers_mmdit's Z-Image test (model_detection.py:1472)
    if "noise_refiner.0.attention.norm_k.weight" not in k:
        return None
    return _arch("lumina2", "z-image", k.groups("layers", "noise_refiner", "context_refiner"), naming="diffusers")


def _hunyuan_video_diffusers(k: _Keys) -> Architecture | None:
    if not (k.has_prefix("context_embedder.token_refiner.refiner_blocks.0.") and "x_embedder.proj.weight" in k):
        return None
    return _arch("hunyuan_video", "hunyuan-video", k.groups("transformer_blocks", "single_transformer_blocks"),
                 naming="diffusers")


def _ltxv_diffusers(k: _Keys) -> Architecture | None:
    if not ("time_embed.emb.timestep_embedder.linear_1.weight" in k and "proj_in.weight" in k
            and "transformer_blocks.0.attn2.to_k.weight" in k):
        return None
    return _arch("ltxv", "ltxv", k.groups("transformer_blocks"), naming="diffusers")


_DETECTORS = (_sd3, _hunyuan_video, _flux_like, _ltxv, _lumina2, _wan, _qwen_image,
              _wan_diffusers, _flux_diffusers, _sd3_diffusers, _zimage_diffusers, _hunyuan_video_diffusers,
              _ltxv_diffusers)


def detect_architecture(shapes: Mapping[str, tuple[int, ...]]) -> Architecture:
    """Detect the architecture from bare tensor names -> shapes (header only; no tensor data is needed).

    A `model.diffusion_model.` prefix on more than five keys is stripped (and other keys ignored), as ComfyUI does
    for full checkpoints. Anything no family matches is ``generic`` / ``generic-transformer`` with block groups
    discovered by `discover_block_groups`; detection never raises.
    """
    keys = _Keys(shapes)
    for detector in _DETECTORS:
        arch = detector(keys)
        if arch is not None:
            return arch
    return _arch("generic", "generic-transformer", discover_block_groups(keys.names), preset="generic")
