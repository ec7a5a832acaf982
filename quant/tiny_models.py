"""Tiny random Flux / Wan 2.1 checkpoints that stock ComfyUI detects, loads and samples on a CPU.

Why: the converter, the calibration nodes, the demo and the benchmarks all need a real diffusion-model file
that ComfyUI recognises (FluxSchnell, WAN21_T2V) without downloading gigabytes. The files are built here with
plain torch (no ComfyUI import), key for key and shape for shape what ComfyUI's own `comfy.ldm.flux.model.Flux` /
`comfy.ldm.wan.model.WanModel` hold for the same config (`tests/test_tiny_models.py` checks this against the real
classes). Each file takes well under a second to build.

Values: every Linear/bias/modulation parameter is `normal(0, 0.05)` (the recipe verified to sample), norm weights
are 1 and norm biases 0 (what a trained model is close to; a normal(0, 0.05) RMSNorm weight would shrink q/k to
noise). The default sizes keep every block Linear at >= 256 in both dims (`img_in` / `head` are inherently
narrower: 64 latent channels after patching).

`sensitive` makes chosen layers hard to quantize to NVFP4, the way real outlier layers are: the weight becomes
heavy-tailed (Student-t, 3 degrees of freedom) and one input channel per 16-wide NVFP4 block is scaled by 30, so
the block scale is set by the outlier and the other 15 weights of the block are crushed. So that the forward pass
keeps its scale (and the model still samples sanely), the matching output rows of the layer that *produces* those
input channels are divided by 30 (SmoothQuant in reverse). Measured with NVFP4 weights (comfy-kitchen): on the
layer's real inputs its relative output error rises from ~0.10 to ~0.40, and quantizing that layer alone moves the
whole model's output 4-5x more than quantizing the same layer of the plain model; the model output's scale is
unchanged. On isotropic random inputs the layer looks *less* sensitive (the outlier columns dominate both the output
and its error), so measure sensitivity with recorded activations or on the model's output.
Only layers whose input comes from one producer Linear through element-wise ops / attention can be made
sensitive (`SENSITIVE_ELIGIBLE`); a pattern matching any other layer raises ValueError.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from .atomic import atomic_output

__all__ = [
    "tiny_flux",
    "tiny_wan",
    "save_tiny",
    "write_tiny_model",
    "SENSITIVE_ELIGIBLE",
    "OUTLIER_FACTOR",
]

INIT_STD = 0.05
OUTLIER_FACTOR = 30.0
OUTLIER_BLOCK = 16  # one dominant input channel per NVFP4 block of 16
STUDENT_T_DF = 3
HEAD_DIM = 128  # Flux axes_dim [16, 56, 56] and Wan detection (heads = dim // 128) both fix it

FLUX_AXES_DIM = (16, 56, 56)
FLUX_PATCH = 2
FLUX_LATENT_CHANNELS = 16
FLUX_TIME_DIM = 256

# Layers that `sensitive` may name (regex over bare layer names, full match), per architecture.
SENSITIVE_ELIGIBLE = {
    "flux": (r"double_blocks\.\d+\.img_mlp\.2", r"double_blocks\.\d+\.txt_mlp\.2", r"single_blocks\.\d+\.linear2"),
    "wan": (r"blocks\.\d+\.ffn\.2", r"blocks\.\d+\.self_attn\.o", r"blocks\.\d+\.cross_attn\.o"),
}

Shape = tuple[int, ...]


def _check_multiple(name: str, value: int, of: int) -> None:
    if value <= 0 or value % of:
        raise ValueError(f"{name}={value} must be a positive multiple of {of} (ComfyUI derives heads = {name}/{of})")


def _flux_spec(depth: int, depth_single: int, hidden: int, context_dim: int, mlp_ratio: float) -> list[tuple[str, Shape]]:
    """(key, shape) of comfy.ldm.flux.model.Flux for FluxSchnell detection, in the module's state_dict order."""
    h = hidden
    mlp = int(h * mlp_ratio)
    lat = FLUX_LATENT_CHANNELS * FLUX_PATCH * FLUX_PATCH

    def lin(name: str, out: int, inp: int) -> list[tuple[str, Shape]]:
        return [(f"{name}.weight", (out, inp)), (f"{name}.bias", (out,))]

    spec = lin("img_in", h, lat) + lin("time_in.in_layer", h, FLUX_TIME_DIM) + lin("time_in.out_layer", h, h)
    spec += lin("txt_in", h, context_dim)
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            spec += lin(f"{p}_mod.lin", 6 * h, h) + lin(f"{p}_attn.qkv", 3 * h, h)
            spec += [(f"{p}_attn.norm.query_norm.weight", (HEAD_DIM,)), (f"{p}_attn.norm.key_norm.weight", (HEAD_DIM,))]
            spec += lin(f"{p}_attn.proj", h, h) + lin(f"{p}_mlp.0", mlp, h) + lin(f"{p}_mlp.2", h, mlp)
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        spec += lin(f"{p}.linear1", 3 * h + mlp, h) + lin(f"{p}.linear2", h, h + mlp)
        spec += [(f"{p}.norm.query_norm.weight", (HEAD_DIM,)), (f"{p}.norm.key_norm.weight", (HEAD_DIM,))]
        spec += lin(f"{p}.modulation.lin", 3 * h, h)
    spec += lin("final_layer.linear", lat, h) + lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return spec


def _flux_producer(layer: str, hidden: int, mlp: int) -> tuple[str, torch.Tensor] | None:
    """(producer layer, its output row for each input channel of `layer`) for the eligible Flux layers."""
    m = re.fullmatch(r"(double_blocks\.\d+\.(?:img|txt)_mlp)\.2", layer)
    if m:
        return f"{m.group(1)}.0", torch.arange(mlp)
    m = re.fullmatch(r"(single_blocks\.\d+)\.linear2", layer)
    if m:
        # linear2's input = cat(attention output (v rows 2h..3h of linear1), act(mlp rows 3h..3h+mlp of linear1))
        return f"{m.group(1)}.linear1", torch.cat([torch.arange(2 * hidden, 3 * hidden),
                                                   torch.arange(3 * hidden, 3 * hidden + mlp)])
    return None


def _wan_spec(dim: int, ffn_dim: int, num_layers: int, text_dim: int, in_dim: int, out_dim: int,
              freq_dim: int) -> list[tuple[str, Shape]]:
    """(key, shape) of comfy.ldm.wan.model.WanModel (t2v, patch (1, 2, 2)) in the module's state_dict order."""
    d = dim

    def lin(name: str, out: int, inp: int) -> list[tuple[str, Shape]]:
        return [(f"{name}.weight", (out, inp)), (f"{name}.bias", (out,))]

    spec = [("patch_embedding.weight", (d, in_dim, 1, 2, 2)), ("patch_embedding.bias", (d,))]
    spec += lin("text_embedding.0", d, text_dim) + lin("text_embedding.2", d, d)
    spec += lin("time_embedding.0", d, freq_dim) + lin("time_embedding.2", d, d)
    spec += lin("time_projection.1", 6 * d, d)
    for i in range(num_layers):
        p = f"blocks.{i}"
        spec.append((f"{p}.modulation", (1, 6, d)))
        for a in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                spec += lin(f"{p}.{a}.{proj}", d, d)
            spec += [(f"{p}.{a}.norm_q.weight", (d,)), (f"{p}.{a}.norm_k.weight", (d,))]
            if a == "self_attn":
                spec += [(f"{p}.norm3.weight", (d,)), (f"{p}.norm3.bias", (d,))]
        spec += lin(f"{p}.ffn.0", ffn_dim, d) + lin(f"{p}.ffn.2", d, ffn_dim)
    spec += [("head.modulation", (1, 2, d))] + lin("head.head", out_dim * 4, d)
    return spec


def _wan_producer(layer: str, dim: int, ffn_dim: int) -> tuple[str, torch.Tensor] | None:
    m = re.fullmatch(r"(blocks\.\d+)\.ffn\.2", layer)
    if m:
        return f"{m.group(1)}.ffn.0", torch.arange(ffn_dim)
    m = re.fullmatch(r"(blocks\.\d+\.(?:self|cross)_attn)\.o", layer)
    if m:  # attention output channel c is a convex combination of v channel c
        return f"{m.group(1)}.v", torch.arange(dim)
    return None


def _is_norm(key: str) -> bool:
    return bool(re.search(r"(norm\.(query|key)_norm|norm_[qk]|norm3)\.weight$", key))


def _fill(spec: list[tuple[str, Shape]], seed: int) -> dict[str, torch.Tensor]:
    """fp32 values: norm weights 1, norm biases 0, everything else normal(0, INIT_STD), in spec order."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in spec:
        if _is_norm(key):
            sd[key] = torch.ones(shape)
        elif key.endswith("norm3.bias"):
            sd[key] = torch.zeros(shape)
        else:
            sd[key] = torch.randn(shape, generator=gen) * INIT_STD
    return sd


def _layer_gen(seed: int, layer: str) -> torch.Generator:
    # Per-layer stream, so marking a layer sensitive changes nothing else in the file.
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(layer.encode())) % (2**63))


def _make_sensitive(sd: dict[str, torch.Tensor], layer: str, producer: str, rows: torch.Tensor, seed: int) -> None:
    """Heavy-tailed weight with one dominant input channel per 16-block; compensate in the producer's rows."""
    w = sd[f"{layer}.weight"]
    out_f, in_f = w.shape
    if rows.numel() != in_f:
        raise AssertionError(f"producer map of {layer} has {rows.numel()} rows for {in_f} input channels")
    gen = _layer_gen(seed, layer)
    z = torch.randn(out_f, in_f, generator=gen)
    chi2 = torch.randn(STUDENT_T_DF, out_f, in_f, generator=gen).pow(2).sum(0)
    t = z / torch.sqrt(chi2 / STUDENT_T_DF)
    t = t / (STUDENT_T_DF / (STUDENT_T_DF - 2)) ** 0.5 * INIT_STD  # unit-variance Student-t, then INIT_STD
    n_blocks = (in_f + OUTLIER_BLOCK - 1) // OUTLIER_BLOCK
    offs = torch.randint(0, OUTLIER_BLOCK, (n_blocks,), generator=gen)
    cols = (torch.arange(n_blocks) * OUTLIER_BLOCK + offs).clamp(max=in_f - 1)
    t[:, cols] *= OUTLIER_FACTOR
    sd[f"{layer}.weight"] = t
    prow = rows[cols]
    sd[f"{producer}.weight"][prow] /= OUTLIER_FACTOR
    sd[f"{producer}.bias"][prow] /= OUTLIER_FACTOR


def _apply_sensitive(sd: dict[str, torch.Tensor], kind: str, sensitive: Sequence[str], seed: int, producer_of) -> list[str]:
    if isinstance(sensitive, str):
        sensitive = (sensitive,)
    layers = [k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    chosen: list[str] = []
    for pattern in sensitive:
        rx = re.compile(pattern)
        hits = [name for name in layers if rx.fullmatch(name)]
        if not hits:
            raise ValueError(f"sensitive pattern {pattern!r} matches no Linear layer of the tiny {kind} model "
                             f"(full match on bare names such as {layers[len(layers) // 2]!r})")
        for name in hits:
            if producer_of(name) is None:
                raise ValueError(f"layer {name!r} (matched by {pattern!r}) cannot be made sensitive: its input does "
                                 f"not come from a single producer Linear; eligible layers match "
                                 f"{', '.join(SENSITIVE_ELIGIBLE[kind])}")
            if name not in chosen:
                chosen.append(name)
    for name in chosen:
        producer, rows = producer_of(name)
        _make_sensitive(sd, name, producer, rows, seed)
    return chosen


def _finish(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def tiny_flux(depth: int = 2, depth_single: int = 2, hidden: int = 256, context_dim: int = 1024,
              mlp_ratio: float = 4.0, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
              sensitive: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A random Flux state dict that ComfyUI detects as FluxSchnell (no guidance_in, no vector_in).

    Bare keys (no `model.diffusion_model.` prefix), exactly the keys/shapes of ComfyUI's Flux built with
    in_channels=16, patch 2, axes_dim [16, 56, 56], heads = hidden/128, qkv_bias, the given depths/context dim.
    ComfyUI's detection assumes mlp_ratio 4.0: with another value ComfyUI would build wrong MLP shapes.
    Returns (state dict, header metadata). Conditioning: context [B, T, context_dim] (LotusConditioning gives
    [1, 2, 1024]); latent: 16 channels (EmptySD3LatentImage).
    """
    _check_multiple("hidden", hidden, HEAD_DIM)
    if context_dim == 3584:
        raise ValueError("context_dim=3584 without vector_in is detected as LongCat-Image, not Flux; pick another")
    if depth < 1:
        raise ValueError("depth must be >= 1: detection needs double_blocks.0")
    mlp = int(hidden * mlp_ratio)
    sd = _fill(_flux_spec(depth, depth_single, hidden, context_dim, mlp_ratio), seed)
    chosen = _apply_sensitive(sd, "flux", sensitive, seed, lambda n: _flux_producer(n, hidden, mlp))
    meta = {"tiny_model": json.dumps({"kind": "flux", "depth": depth, "depth_single": depth_single, "hidden": hidden,
                                      "context_dim": context_dim, "mlp_ratio": mlp_ratio, "seed": seed,
                                      "sensitive": chosen})}
    return _finish(sd, dtype), meta


def tiny_wan(dim: int = 256, ffn_dim: int = 512, num_layers: int = 4, text_dim: int = 1024, in_dim: int = 16,
             out_dim: int = 16, freq_dim: int = 256, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
             sensitive: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A random Wan 2.1 text-to-video state dict that ComfyUI detects as WAN21_T2V.

    Keys/shapes of ComfyUI's WanModel(model_type="t2v") with heads = dim/128. ComfyUI cannot detect text_dim (nor
    a non-default freq_dim) from the weights, so the metadata carries them in `config` = {"transformer": {...}},
    which detection merges. Latent: [B, in_dim, T', H/8, W/8] (EmptyHunyuanLatentVideo for in_dim 16).
    """
    _check_multiple("dim", dim, HEAD_DIM)
    if num_layers < 1:
        raise ValueError("num_layers must be >= 1: detection reads blocks.0.ffn.0")
    sd = _fill(_wan_spec(dim, ffn_dim, num_layers, text_dim, in_dim, out_dim, freq_dim), seed)
    chosen = _apply_sensitive(sd, "wan", sensitive, seed, lambda n: _wan_producer(n, dim, ffn_dim))
    transformer: dict[str, int] = {"text_dim": text_dim}
    if freq_dim != 256:
        transformer["freq_dim"] = freq_dim
    meta = {
        "config": json.dumps({"transformer": transformer}),
        "tiny_model": json.dumps({"kind": "wan", "dim": dim, "ffn_dim": ffn_dim, "num_layers": num_layers,
                                  "text_dim": text_dim, "in_dim": in_dim, "out_dim": out_dim,
                                  "freq_dim": freq_dim, "seed": seed, "sensitive": chosen}),
    }
    return _finish(sd, dtype), meta


def save_tiny(path: str | Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
              force: bool = True) -> Path:
    """Write a tiny state dict as .safetensors (header metadata = `metadata`), atomically; returns the path.

    Creates the parent folder. Replaces an existing file by default (the content is a deterministic function of
    the arguments); `force=False` refuses one with CheckpointError instead.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=force) as tmp:
        save_file(sd, str(tmp), metadata=dict(metadata or {}))
    return path


def write_tiny_model(kind: str, path: str | Path, *, force: bool = True, **kw) -> Path:
    """Build (`tiny_flux` / `tiny_wan` with `kw`) and save a tiny model of `kind` ("flux" | "wan") to `path`."""
    builders = {"flux": tiny_flux, "wan": tiny_wan}
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of: {', '.join(builders)}")
    sd, meta = builders[kind](**kw)
    return save_tiny(path, sd, meta, force=force)
