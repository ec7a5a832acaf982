"""Small header-only fakes for the planner tests: a Checkpoint, Wan/Flux key maps, an architecture and presets.

Why fakes: plans only need names, dtypes and shapes, so a 30-block Wan key map costs nothing here, and the planner
tests do not depend on the architecture/preset data of other modules (whose real versions get their own tests).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from nvfp4_lab.quant.checkpoint import Layer
from nvfp4_lab.quant.safetensors_io import TensorInfo

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1, "I64": 8, "I32": 4}
ROLES = ("weight", "bias")


class FakeCheckpoint:
    """names/info/layers/header_hash like quant.checkpoint.Checkpoint, from {name: (shape, dtype)}."""

    def __init__(self, tensors: dict[str, tuple[tuple[int, ...], str]], path: str = "model.safetensors",
                 kind: str = "safetensors", input_scales: dict[str, float] | None = None):
        self.path = Path(path)
        self.kind = kind
        self.metadata: dict[str, str] = {}
        self.prefix = ""
        self._infos: dict[str, TensorInfo] = {}
        off = 0
        for name, (shape, dtype) in tensors.items():
            n = math.prod(shape) * _BYTES.get(dtype, 2)
            self._infos[name] = TensorInfo(name, dtype, tuple(shape), self.path, (off, off + n))
            off += n
        self._input_scales = input_scales or {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def close(self):
        pass

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def header_hash(self) -> str:
        text = json.dumps([(i.name, i.dtype, i.shape) for i in self._infos.values()])
        return hashlib.sha256(text.encode()).hexdigest()

    def layers(self) -> dict[str, Layer]:
        groups: dict[str, dict[str, str]] = {}
        for name in self._infos:
            stem, _, last = name.rpartition(".")
            if stem and last in ROLES + ("input_scale",):
                groups.setdefault(stem, {})[last] = name
            else:
                groups.setdefault(name, {})["param"] = name
        out = {}
        for stem, roles in groups.items():
            main = self._infos[roles.get("weight") or roles.get("param")]
            fmt = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}.get(main.dtype, main.dtype.lower())
            out[stem] = Layer(name=stem, format=fmt, shape=main.shape, params=main.numel,
                              stored_bytes=sum(self._infos[k].nbytes for k in roles.values()),
                              input_scale=self._input_scales.get(stem), full_precision_matrix_mult=False,
                              keys=list(roles.values()), comfy_quant=None, roles=dict(roles))
        return out


def wan_tensors(num_blocks: int = 30, dim: int = 64, ffn: int = 128, dtype: str = "F32",
                cross_img: bool = False, in_dim: int = 256) -> dict[str, tuple[tuple[int, ...], str]]:
    """A Wan key map (ComfyUI names). Linear in-dims are multiples of 256 so they can be GGUF K-quants."""
    t: dict[str, tuple[tuple[int, ...], str]] = {}
    t["patch_embedding.weight"] = ((dim, 48, 1, 2, 2), dtype)
    t["patch_embedding.bias"] = ((dim,), dtype)
    for i in (0, 2):
        t[f"text_embedding.{i}.weight"] = ((dim, in_dim), dtype)
        t[f"text_embedding.{i}.bias"] = ((dim,), dtype)
        t[f"time_embedding.{i}.weight"] = ((dim, in_dim), dtype)
        t[f"time_embedding.{i}.bias"] = ((dim,), dtype)
    t["time_projection.1.weight"] = ((dim * 6, in_dim), dtype)
    t["time_projection.1.bias"] = ((dim * 6,), dtype)
    for b in range(num_blocks):
        p = f"blocks.{b}"
        for att in ("self_attn", "cross_attn"):
            for x in ("q", "k", "v", "o"):
                t[f"{p}.{att}.{x}.weight"] = ((dim, in_dim), dtype)
                t[f"{p}.{att}.{x}.bias"] = ((dim,), dtype)
            if att == "cross_attn" and cross_img:
                for x in ("k_img", "v_img"):
                    t[f"{p}.{att}.{x}.weight"] = ((dim, in_dim), dtype)
            t[f"{p}.{att}.norm_q.weight"] = ((dim,), dtype)
            t[f"{p}.{att}.norm_k.weight"] = ((dim,), dtype)
        t[f"{p}.norm3.weight"] = ((dim,), dtype)
        t[f"{p}.norm3.bias"] = ((dim,), dtype)
        t[f"{p}.ffn.0.weight"] = ((ffn, in_dim), dtype)
        t[f"{p}.ffn.0.bias"] = ((ffn,), dtype)
        t[f"{p}.ffn.2.weight"] = ((dim, in_dim), dtype)
        t[f"{p}.ffn.2.bias"] = ((dim,), dtype)
        t[f"{p}.modulation"] = ((1, 6, dim), dtype)
    t["head.head.weight"] = ((48, in_dim), dtype)
    t["head.head.bias"] = ((48,), dtype)
    t["head.modulation"] = ((1, 2, dim), dtype)
    return t


def flux_tensors(double: int = 4, single: int = 6, dim: int = 64, dtype: str = "BF16",
                 in_dim: int = 256) -> dict[str, tuple[tuple[int, ...], str]]:
    """A Flux key map (ComfyUI names) with `double` double blocks and `single` single blocks."""
    t: dict[str, tuple[tuple[int, ...], str]] = {}
    t["img_in.weight"] = ((dim, in_dim), dtype)
    t["txt_in.weight"] = ((dim, in_dim), dtype)
    for b in range(double):
        p = f"double_blocks.{b}"
        for s in ("img", "txt"):
            t[f"{p}.{s}_attn.qkv.weight"] = ((dim * 3, in_dim), dtype)
            t[f"{p}.{s}_attn.proj.weight"] = ((dim, in_dim), dtype)
            t[f"{p}.{s}_attn.norm.query_norm.scale"] = ((dim,), dtype)
            t[f"{p}.{s}_attn.norm.key_norm.scale"] = ((dim,), dtype)
            t[f"{p}.{s}_mlp.0.weight"] = ((dim * 4, in_dim), dtype)
            t[f"{p}.{s}_mlp.2.weight"] = ((dim, in_dim), dtype)
            t[f"{p}.{s}_mod.lin.weight"] = ((dim * 6, in_dim), dtype)
    for b in range(single):
        p = f"single_blocks.{b}"
        t[f"{p}.linear1.weight"] = ((dim * 7, in_dim), dtype)
        t[f"{p}.linear2.weight"] = ((dim, in_dim), dtype)
        t[f"{p}.modulation.lin.weight"] = ((dim * 3, in_dim), dtype)
    t["final_layer.linear.weight"] = ((64, in_dim), dtype)
    return t


@dataclass
class FakeArch:
    family: str
    variant: str | None
    block_groups: dict[str, int]
    preset: str
    naming: str = "comfyui"


_BLOCK_RX = re.compile(r"^((?:[a-z_]*_)?blocks)\.(\d+)\.")


def fake_block_of(layer: str, arch: FakeArch):
    m = _BLOCK_RX.match(layer)
    if m and m.group(1) in arch.block_groups:
        return m.group(1), int(m.group(2))
    return None


def wan_arch(num_blocks: int = 30) -> FakeArch:
    return FakeArch("wan", "t2v", {"blocks": num_blocks}, "wan")


def flux_arch(double: int = 4, single: int = 6) -> FakeArch:
    return FakeArch("flux", "dev", {"double_blocks": double, "single_blocks": single}, "flux")


@dataclass(frozen=True)
class Rule:
    pattern: str
    why: str = ""


@dataclass
class FakePreset:
    name: str
    family: str
    description: str = ""
    never_quantize: tuple = ()
    keep: tuple = ()
    keep_fp32: tuple = ()
    fp8: tuple = ()
    w4a16: tuple = ()
    keep_first_blocks: int = 0
    keep_last_blocks: int = 0


def wan_preset(**kw) -> FakePreset:
    base = dict(
        name="wan", family="wan",
        never_quantize=(Rule(r"head\.head", "output projection"), Rule(r"patch_embedding", "conv"),
                        Rule(r"(text|time)_embedding\.\d+", "embeddings"), Rule(r"time_projection\.\d+", "embedding"),
                        Rule(r".*modulation.*", "modulation"), Rule(r".*norm.*", "norms")),
        keep_fp32=(Rule(r"patch_embedding", "conv input"),),
        keep=(Rule(r"blocks\.\d+\.(self_attn|cross_attn)\.v", "V projections"),
              Rule(r"blocks\.\d+\.ffn\.2", "FFN down")),
        keep_first_blocks=2, keep_last_blocks=2,
    )
    base.update(kw)
    return FakePreset(**base)


def flux_preset(**kw) -> FakePreset:
    base = dict(name="flux", family="flux",
                never_quantize=(Rule(r"img_in|txt_in", "input projections"), Rule(r"final_layer\..*", "output"),
                                Rule(r".*_mod\.lin|.*modulation\.lin", "modulation")),
                keep_first_blocks=1, keep_last_blocks=1)
    base.update(kw)
    return FakePreset(**base)


# ---- GGUF files ------------------------------------------------------------------------------------------------

def write_gguf(path, tensors: dict[str, tuple[tuple[int, ...], str]], *, arch: str = "wan",
               prefix: str = "") -> Path:
    """Write a GGUF with zero data: {name: (logical shape, GGUF type name)}. 5-D tensors are stored reshaped to
    4-D with city96's `comfy.gguf.orig_shape.<name>` metadata, as ComfyUI-GGUF's fix_5d_tensors does."""
    import gguf
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    w = gguf.GGUFWriter(str(path), arch)
    for name, (shape, tname) in tensors.items():
        t = T[tname]
        full = prefix + name
        if len(shape) > 4:
            w.add_array(f"comfy.gguf.orig_shape.{full}", list(shape))
            shape = (*shape[:3], math.prod(shape[3:]))
        if t in (T.F32, T.F16):
            w.add_tensor(full, np.zeros(shape, dtype=np.float32 if t == T.F32 else np.float16))
        elif t == T.BF16:
            w.add_tensor(full, np.zeros(shape, dtype=np.uint16).view(np.uint8).reshape(*shape[:-1], shape[-1] * 2),
                         raw_dtype=t)
        else:
            blk, nbytes = GGML_QUANT_SIZES[t]
            assert shape[-1] % blk == 0, (name, shape, tname)
            w.add_tensor(full, np.zeros((*shape[:-1], shape[-1] // blk * nbytes), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def wan_q5_k_m_layout(model: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The Wan Q5_K_M layout the author measured (original-scripts.md §8.3): per block Q5_K for self/cross q, k, o and
    ffn.0, Q6_K for self/cross v and ffn.2; patch_embedding and 1-D tensors F32; head and embeddings F16."""
    out = {}
    for name, (shape, _) in model.items():
        if re.fullmatch(r"blocks\.\d+\.(self_attn|cross_attn)\.[qko]\.weight|blocks\.\d+\.ffn\.0\.weight", name):
            t = "Q5_K"
        elif re.fullmatch(r"blocks\.\d+\.(self_attn|cross_attn)\.v\.weight|blocks\.\d+\.ffn\.2\.weight", name):
            t = "Q6_K"
        elif len(shape) == 2:
            t = "F16"
        else:
            t = "F32"
        out[name] = (shape, t)
    return out
