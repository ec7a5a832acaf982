"""The per-layer storage formats a plan can choose, and how ComfyUI 0.29 marks them in a checkpoint.

One name per format is used everywhere (plans, reports, CLI, nodes):

=============  ===========================================================  =====================
name           meaning                                                      ComfyUI `comfy_quant`
=============  ===========================================================  =====================
nvfp4          NVFP4 weight, W4A4 on Blackwell (activations quantized)      {"format": "nvfp4"}
nvfp4-w4a16    NVFP4 weight, activations stay in the compute dtype          + full_precision_matrix_mult
fp8            FP8 E4M3 weight, per-tensor scale                            {"format": "float8_e4m3fn"}
fp8-e5m2       FP8 E5M2 weight, per-tensor scale                            {"format": "float8_e5m2"}
bf16/fp16/fp32 plain tensor in that dtype                                   (no marker)
=============  ===========================================================  =====================
"""

from __future__ import annotations

import json
import math

import torch

F4_E2M1_MAX = 6.0
F8_E4M3_MAX = 448.0
F8_E5M2_MAX = 57344.0
# Per-tensor NVFP4 scale = amax / (448 * 6): the largest block scale times the largest E2M1 magnitude.
NVFP4_SCALE_DENOM = F8_E4M3_MAX * F4_E2M1_MAX
NVFP4_BLOCK = 16

NVFP4 = "nvfp4"
NVFP4_W4A16 = "nvfp4-w4a16"
FP8 = "fp8"
FP8_E5M2 = "fp8-e5m2"
BF16 = "bf16"
FP16 = "fp16"
FP32 = "fp32"

QUANTIZED_FORMATS = (NVFP4, NVFP4_W4A16, FP8, FP8_E5M2)
PLAIN_FORMATS = (BF16, FP16, FP32)
ALL_FORMATS = QUANTIZED_FORMATS + PLAIN_FORMATS

PLAIN_DTYPES: dict[str, torch.dtype] = {BF16: torch.bfloat16, FP16: torch.float16, FP32: torch.float32}
FP8_DTYPES: dict[str, torch.dtype] = {FP8: torch.float8_e4m3fn, FP8_E5M2: torch.float8_e5m2}

_COMFY_FORMAT = {NVFP4: "nvfp4", NVFP4_W4A16: "nvfp4", FP8: "float8_e4m3fn", FP8_E5M2: "float8_e5m2"}


def is_nvfp4(fmt: str) -> bool:
    return fmt in (NVFP4, NVFP4_W4A16)


def check_format(fmt: str) -> str:
    """Return `fmt` if it is a known format name, else raise a ValueError listing the valid ones."""
    if fmt not in ALL_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(ALL_FORMATS)}")
    return fmt


def dtype_format(dtype: torch.dtype) -> str:
    """Format name of a plain floating dtype (bf16/fp16/fp32)."""
    for name, dt in PLAIN_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"{dtype} is not a plain floating dtype (bf16, fp16, fp32)")


def comfy_quant_config(fmt: str) -> dict | None:
    """The JSON dict ComfyUI expects in `<layer>.comfy_quant` for `fmt`; None for plain formats."""
    check_format(fmt)
    if fmt not in _COMFY_FORMAT:
        return None
    conf: dict = {"format": _COMFY_FORMAT[fmt]}
    if fmt == NVFP4_W4A16:
        conf["full_precision_matrix_mult"] = True
    return conf


def format_from_comfy_quant(conf: dict) -> str:
    """Our format name for a `comfy_quant` dict read from a file (raises ValueError for formats we do not write)."""
    name = conf.get("format")
    full_precision = bool(conf.get("full_precision_matrix_mult", False))
    if name == "nvfp4":
        return NVFP4_W4A16 if full_precision else NVFP4
    if name == "float8_e4m3fn":
        return FP8
    if name == "float8_e5m2":
        return FP8_E5M2
    raise ValueError(f"comfy_quant format {name!r} is not one NVFP4 Lab handles")


def encode_comfy_quant(conf: dict) -> torch.Tensor:
    """`comfy_quant` marker tensor: the UTF-8 bytes of `json.dumps(conf)` as 1-D uint8, exactly as ComfyUI writes it."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_comfy_quant(tensor: torch.Tensor) -> dict:
    """Inverse of `encode_comfy_quant`; raises ValueError on bytes that are not a JSON object."""
    raw = bytes(tensor.to(torch.uint8).flatten().tolist())
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"comfy_quant marker is not valid JSON ({exc}): {raw[:40]!r}") from None
    if not isinstance(conf, dict):
        raise ValueError(f"comfy_quant marker is not a JSON object: {raw[:40]!r}")
    return conf


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def nvfp4_storage_shapes(out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of `weight` (uint8 packed codes) and `weight_scale` (swizzled E4M3) for a (out, in) Linear weight."""
    rows, cols = _roundup(out_features, 16), _roundup(in_features, 16)
    return (rows, cols // 2), (_roundup(rows, 128), _roundup(cols // 16, 4))


def stored_weight_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes a layer's weight (with its scales and marker) takes on disk in `fmt`; bias not included."""
    check_format(fmt)
    numel = math.prod(shape)
    if is_nvfp4(fmt):
        (wr, wc), (sr, sc) = nvfp4_storage_shapes(shape[0], math.prod(shape[1:]))
        marker = len(json.dumps(comfy_quant_config(fmt)))
        return wr * wc + sr * sc + 4 + marker
    if fmt in FP8_DTYPES:
        return numel + 4 + len(json.dumps(comfy_quant_config(fmt)))
    return numel * PLAIN_DTYPES[fmt].itemsize
