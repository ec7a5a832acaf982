"""FP8 per-tensor quantize / dequantize, byte-identical to ComfyUI 0.29's float8 layouts.

Why: an FP8 layer we write (``L.weight`` float8, ``L.weight_scale`` fp32 0-dim) must hold the bytes ComfyUI itself
produces when it (re)quantizes a weight (``TensorCoreFP8E4M3Layout`` / ``TensorCoreFP8E5M2Layout`` ``.quantize`` with
``scale="recalculate"``, the path its LoRA/patch code uses), and dequantize the way ComfyUI does.

ComfyUI's rule (``comfy/quant_ops.py`` ``_TensorCoreFP8LayoutBase.quantize`` + comfy-kitchen eager
``quantize_per_tensor_fp8``), which this module follows step by step:

1. ``scale = fp32(amax(|x|)) / finfo(fp8).max`` (448 for E4M3, 57344 for E5M2), an fp32 division;
2. for inputs other than fp32/bf16 (i.e. fp16): ``scale = 1 / clamp(1 / scale, fp16.min, fp16.max)`` so that the
   reciprocal stays representable in fp16 (amax < 448/65504 gets scale 1/65504);
3. ``q = fp8( clamp( x * fp_x(1 / scale), -max, max ) )``: the reciprocal is computed in fp32 and **rounded to x's
   dtype**, the product is rounded to x's dtype, clamped, then cast to fp8 with round-to-nearest-even;
4. dequantize: ``fp8.to(dtype) * scale.to(dtype)`` in the output dtype.

Deliberate differences (cases where ComfyUI produces a broken layer):

* all-zero tensor: ComfyUI gets ``scale = 0`` and ``0 * inf = NaN`` for fp32/bf16 input (fp16 gets 1/65504). We use
  ``scale = 1.0`` for every dtype: zero bytes, dequantizes to exact zeros.
* fp32/bf16 tensor with amax so small (< ~1.3e-36) that ``1/scale`` overflows: ComfyUI would multiply by inf; we apply
  the same reciprocal clamp ComfyUI applies to fp16, with x's dtype limits.

The scale (steps 1-2) and the reciprocal are computed on the CPU whatever x's device: CUDA torch divides by a Python
scalar through its reciprocal, which differs from the true fp32 quotient by one ulp in ~25 % of cases, so ComfyUI on a
GPU can store a slightly different scale than ComfyUI on CPU; ours is the CPU value on every device (checked on an
H100).  NaN / Inf in the input raise :class:`NonFiniteTensorError`.
"""

from __future__ import annotations

import math

import torch

from .errors import NonFiniteTensorError

__all__ = ["FP8_DTYPES", "weight_scale", "quantize_fp8", "dequantize_fp8"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in FP8_DTYPES:
        raise ValueError(f"FP8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")


def _amax_checked(x: torch.Tensor, name: str) -> torch.Tensor:
    """amax(|x|) (0-dim, x's dtype, no full-size temporary); NonFiniteTensorError naming `name` on NaN/Inf."""
    mn, mx = torch.aminmax(x)
    amax = torch.maximum(mx, -mn)
    if not bool(torch.isfinite(amax)):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteTensorError(
            f"tensor {name!r} {tuple(x.shape)} holds {bad} NaN/Inf value(s) out of {x.numel()}; "
            "fix or exclude this tensor before quantizing (keep it in bf16/fp32)"
        )
    return amax


def _scale_from_amax(amax: torch.Tensor, x_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """The scale rule on the CPU (CUDA torch divides by a Python scalar via an inexact reciprocal), moved to amax's
    device, so the bytes do not depend on the device."""
    device = amax.device
    amax = amax.cpu()
    if float(amax) == 0.0:
        return torch.ones((), dtype=torch.float32, device=device)  # ComfyUI: 0 -> NaN weights (see module doc)
    scale = amax.to(dtype=torch.float32) / torch.finfo(dtype).max
    if x_dtype not in (torch.float32, torch.bfloat16) or not math.isfinite(float((1.0 / scale).to(x_dtype))):
        # ComfyUI applies this to fp16 input; we also apply it where 1/scale would overflow x's dtype.
        info = torch.finfo(x_dtype)
        scale = 1.0 / torch.clamp(1.0 / scale, min=info.min, max=info.max)
    return scale.to(device)


@torch.no_grad()
def weight_scale(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, name: str = "tensor") -> torch.Tensor:
    """The fp32 0-dim ``weight_scale`` ComfyUI computes for x (``scale="recalculate"``); 1.0 for an all-zero tensor."""
    _check_dtype(dtype)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"tensor {name!r}: FP8 input must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"tensor {name!r} is empty (shape {tuple(x.shape)}); nothing to quantize")
    return _scale_from_amax(_amax_checked(x, name), x.dtype, dtype)


@torch.no_grad()
def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, name: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to FP8 with a per-tensor scale, byte-identical to ComfyUI 0.29.

    Returns ``(weight in dtype, weight_scale fp32 0-dim)`` with ``W ~= weight * weight_scale``.  Any shape is
    accepted (ComfyUI's layout is shape-agnostic); input must be fp32/fp16/bf16.  Raises NonFiniteTensorError on
    NaN/Inf, ValueError on an empty tensor or unsupported dtype.
    """
    scale = weight_scale(x, dtype, name=name)
    fp8_max = torch.finfo(dtype).max
    recip = (1.0 / scale.cpu()).to(x.dtype).to(x.device)  # fp32 reciprocal (on CPU, see above), rounded to x's dtype
    temp = x * recip  # product rounded to x's dtype, as comfy-kitchen eager does
    torch.clamp(temp, -fp8_max, fp8_max, out=temp)
    return temp.to(dtype), scale


@torch.no_grad()
def dequantize_fp8(
    weight: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """FP8 weight -> dense ``dtype``: ``weight.to(dtype) * scale.to(dtype)`` (ComfyUI / comfy-kitchen eager)."""
    _check_dtype(weight.dtype)
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dequantize_fp8: dtype must be float32, float16 or bfloat16, got {dtype}")
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32)
    scale = scale.to(device=weight.device, dtype=torch.float32)
    if scale.numel() != 1:
        raise ValueError(f"FP8 weight_scale must be a single value, got shape {tuple(scale.shape)}")
    return weight.to(dtype=dtype) * scale.reshape(()).to(dtype=dtype)
