"""NVFP4 exactly as ComfyUI 0.29 stores it: quantize, dequantize, fake-quantize, scale swizzling.

Why this module exists
----------------------
A checkpoint we write must load in stock ComfyUI and give the *same bytes* ComfyUI itself would produce with
comfy-kitchen's eager backend (the backend ComfyUI runs on CPU and on every torch build below cu130). This file is an
independent pure-torch implementation of that algorithm (``../shared/reference/comfy-kitchen-nvfp4.md`` §4.2):

1. zero-pad the weight to multiples of 16 rows / columns;
2. per 16-element block along K: ``amax_blk`` (exact, input dtype) -> fp32, ``d = (amax_blk / 6) / s`` as **two** fp32
   divisions, ``d = min(d, 448)``, ``d8 = e4m3(d)`` (round-to-nearest-even), ``d32 = fp32(d8)``;
3. ``t = s * d32``; blocks with ``t == 0`` get codes 0; otherwise ``v = fp32(x) / t`` (a true division, not a
   reciprocal multiply), clamped to +-6 and rounded RNE to E2M1 (negative values that round to zero keep their sign:
   code 8);
4. two codes per byte, element ``2j`` in the **high** nibble;
5. block scales stored in the cuBLAS 128x4 swizzled layout, zero padded.

Every step is an exactly-rounded IEEE operation (true division, e4m3 cast, floor/ceil, table lookup), so the result
is byte-identical on CPU and CUDA (checked on an H100 up to 5120x13824, fp32/fp16/bf16).  Two CUDA traps are avoided
on purpose: CUDA torch turns ``tensor / python_scalar`` into a multiply by the reciprocal (for fp32 quotients
``x/6`` and ``x/2688`` that differs from the true quotient in ~25-33 % of values, by one ulp), so the per-tensor scale
is computed on the CPU and the ``/ 6`` divides by a device tensor.  comfy-kitchen's eager code run *on a GPU* has that
reciprocal in ``amax / 6`` and in the scale, so on rare inputs (fp32 weights mostly) it can differ from eager on CPU,
the byte reference; ours never does.

``backend="auto"`` therefore means this torch implementation: it is the same on every device, is ~3x faster than
comfy-kitchen's eager code on CPU, and -- unlike comfy-kitchen's CUDA backend, which multiplies by a reciprocal and
differs from eager in ~0.05 % of codes -- always equals the eager reference.  ``backend="kitchen"`` calls
comfy-kitchen's *eager* implementation explicitly (never its CUDA kernel) on our per-tensor scale; it exists as a
cross-check and gives the same bytes on CPU.

Deliberate differences from ComfyUI (both are cases where ComfyUI produces a broken layer):

* all-zero tensor: ComfyUI computes ``s = 0`` and comfy-kitchen eager then produces NaN block scales (0/0), so the layer
  dequantizes to NaN.  We use ``tensor_scale = 1.0``: zero block scales, zero codes, dequantizes to exact zeros.
* fp16 tensor with ``amax < ~8e-5``: ``amax / 2688`` underflows to 0 in fp16 and ComfyUI silently turns the layer into
  zeros.  We then compute the quotient in fp32 instead (see :func:`per_tensor_scale`).

NaN / Inf anywhere in the input raise :class:`NonFiniteTensorError` (comfy-kitchen would poison whole 16-blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .errors import NonFiniteTensorError
from .formats import F4_E2M1_MAX, F8_E4M3_MAX, NVFP4_BLOCK, NVFP4_SCALE_DENOM

__all__ = [
    "NVFP4Tensor",
    "per_tensor_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "clip_fraction",
    "to_blocked",
    "from_blocked",
    "E2M1_VALUES",
    "DEFAULT_TEMP_BYTES",
]

#: magnitudes of the E2M1 codes 0..7 (codes 8..15 are the negatives, code 8 = -0.0)
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: budget for the temporaries of one row chunk in :func:`quantize` when ``chunk_rows`` is None
DEFAULT_TEMP_BYTES = 256 * 2**20
# Peak temporaries of the torch backend, bytes per (padded) element of a chunk: three fp32 scratch buffers (12; the
# int32 index and the codes live in them), plus the zero-padded copy of the input chunk when padding is needed (<= 4).
_TEMP_BYTES_PER_ELEMENT = 16
# comfy-kitchen's eager quantize: ~27 B/element of live temporaries (reference §6.1), ~2x that in peak RSS measured.
_KITCHEN_TEMP_BYTES_PER_ELEMENT = 64
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "torch", "kitchen")


@dataclass(frozen=True)
class NVFP4Tensor:
    """One NVFP4 weight as ComfyUI stores it (``L.weight``, ``L.weight_scale``, ``L.weight_scale_2``).

    qdata:        uint8 ``[roundup(out,16), roundup(in,16)//2]``; element 2j of a row in the high nibble of byte j.
    block_scale:  float8_e4m3fn ``[roundup(R16,128), roundup(C16/16,4)]`` in the cuBLAS 128x4 swizzled layout.
    tensor_scale: float32 0-dim per-tensor scale ``s`` (``weight_scale_2``).
    shape:        logical (unpadded) ``(out, in)``.
    """

    qdata: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor
    shape: tuple[int, int]


# ----------------------------------------------------------------------------------------------------------------------
# E2M1 rounding table
# ----------------------------------------------------------------------------------------------------------------------


def _e2m1_rne_code(value: Fraction) -> int:
    """Magnitude code (0..7) of a non-negative exact value: nearest E2M1 value, ties to the even code, saturating."""
    best = None
    for code, mag in enumerate(E2M1_VALUES):
        dist = abs(value - Fraction(mag))
        key = (dist, code % 2)  # on a tie the even code (mantissa bit 0) wins
        if best is None or key < best[0]:
            best = (key, code)
    return best[1]


def _build_code_lut() -> torch.Tensor:
    """Table from the lookup index of :func:`_encode_e2m1_into` to the 4-bit code.

    With ``m = min(|v| * 4, 24)`` every rounding threshold of E2M1 (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) is an integer
    ``m``, and the rounding is constant on each open interval between two integers.  ``j = floor(m) + ceil(m)`` is
    ``2k`` for ``m == k`` and ``2k+1`` for ``k < m < k+1`` (0..48, computed exactly: both terms are small integers;
    note that ``m + ceil(m)`` would NOT be exact), so it tells exact thresholds from the intervals.  The sign (``-0.0``
    included) is attached with ``copysign(j + 1, v)``; ``+ 49`` gives the index 0..98 (49 itself is unused).
    """
    lut = torch.zeros(99, dtype=torch.uint8)
    for j in range(49):
        k, inside = divmod(j, 2)
        m = Fraction(k) if not inside else Fraction(2 * k + 1, 2)  # a representative of the class
        code = _e2m1_rne_code(m / 4)
        lut[49 + (j + 1)] = code
        lut[49 - (j + 1)] = code | 8
    return lut


_CODE_LUT = _build_code_lut()
_LUT_CACHE: dict[tuple, torch.Tensor] = {}


def _device_lut(key: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    cache_key = (key, str(device), dtype)
    lut = _LUT_CACHE.get(cache_key)
    if lut is None:
        if key == "code":
            lut = _CODE_LUT.to(device)
        else:  # "pair": byte -> (value of high nibble, value of low nibble)
            vals = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)
            byte = torch.arange(256)
            lut = torch.stack([vals[byte >> 4], vals[byte & 15]], dim=1).to(device=device, dtype=dtype)
        _LUT_CACHE[cache_key] = lut
    return lut


def _encode_e2m1_into(v4: torch.Tensor, a: torch.Tensor, f: torch.Tensor, codes: torch.Tensor) -> None:
    """RNE-encode ``v4 / 4`` (fp32; the caller supplies four times the scaled value) to 4-bit E2M1 codes written into
    ``codes`` (uint8, ``v4.numel()`` elements), saturating at +-6 and keeping the sign of zero.

    ``a`` and ``f`` are fp32 scratch buffers of v4's shape; ``v4`` is read until its sign has been taken and may share
    storage with ``codes``.  Only exact operations are used (abs, clamp, floor/ceil, small-integer adds, conversion of
    small integers, table lookup), so the result is the same on every device.
    """
    torch.abs(v4, out=a)
    a.clamp_(max=24.0)  # |v| > 6 saturates exactly like clamp(+-6) first
    torch.floor(a, out=f)
    a.ceil_().add_(f)  # j = floor(m) + ceil(m): 2k at m == k, 2k+1 for k < m < k+1 (exact small integers)
    a.add_(1.0).copysign_(v4).add_(49.0)  # sign of v, -0.0 included (cheaper than signbit + a bool add)
    idx = f.view(torch.int32)
    idx.copy_(a)  # a holds exact small integers
    torch.index_select(_device_lut("code", v4.device), 0, idx.view(-1), out=codes.view(-1))


def _encode_e2m1(v: torch.Tensor) -> torch.Tensor:
    """RNE-encode fp32 values to E2M1 codes (uint8, same shape); a convenience wrapper used by tests."""
    v4 = v.to(torch.float32) * 4.0  # exact (an overflow to inf saturates either way)
    codes = torch.empty(v4.shape, dtype=torch.uint8, device=v4.device)
    _encode_e2m1_into(v4, torch.empty_like(v4), torch.empty_like(v4), codes)
    return codes


# ----------------------------------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------------------------------


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _amax(x: torch.Tensor) -> torch.Tensor:
    """amax(|x|) as a 0-dim tensor in x's dtype (exact), without a full-size temporary."""
    mn, mx = torch.aminmax(x)
    return torch.maximum(mx, -mn)


def _count_nonfinite(x: torch.Tensor, rows_per_step: int = 4096) -> int:
    flat = x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)
    step = max(1, rows_per_step * (x.shape[-1] if x.dim() else 1))
    return int(sum(int((~torch.isfinite(flat[i : i + step])).sum()) for i in range(0, flat.numel(), step)))


def _check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise NonFiniteTensorError naming `name` if x holds NaN/Inf; returns amax(|x|) (0-dim, x's dtype)."""
    amax = _amax(x)
    if not bool(torch.isfinite(amax)):
        bad = _count_nonfinite(x)
        raise NonFiniteTensorError(
            f"tensor {name!r} {tuple(x.shape)} holds {bad} NaN/Inf value(s) out of {x.numel()}; "
            "fix or exclude this tensor before quantizing (keep it in bf16/fp32)"
        )
    return amax


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """ComfyUI rule ``amax / 2688`` in the input dtype, then fp32; with our two documented exceptions.

    The 0-dim division runs on the CPU whatever x's device: on CUDA, torch divides by a Python scalar as a multiply by
    its reciprocal, which can differ from the true quotient by one ulp of x's dtype; the CPU computes the true quotient
    (what ComfyUI gets on CPU, our byte reference).
    """
    device = amax.device
    amax = amax.cpu()
    if float(amax) == 0.0:
        s = torch.ones((), dtype=torch.float32)
    else:
        s = (amax / NVFP4_SCALE_DENOM).to(torch.float32)
        if float(s) == 0.0:
            # The quotient underflowed in the input dtype (fp16 with amax < ~8e-5). ComfyUI would store s = 0 and
            # silently zero the layer; compute it in fp32 instead.
            s = amax.to(torch.float32) / NVFP4_SCALE_DENOM
            if float(s) == 0.0:  # amax below ~3.8e-42: nothing representable is left; quantize as zeros
                s = torch.ones((), dtype=torch.float32)
    return s.to(device)


@torch.no_grad()
def per_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor NVFP4 scale (``weight_scale_2``): ``amax(|x|) / 2688`` computed in x's dtype, then cast to fp32.

    This is exactly ComfyUI's ``TensorCoreNVFP4Layout.quantize`` rule (a bf16 weight gets a bf16-rounded quotient),
    which changes bytes versus an fp32 quotient, so it must be replicated.  Exceptions (where ComfyUI would produce a
    NaN or all-zero layer): an all-zero tensor gives 1.0; a non-zero tensor whose quotient underflows to 0 in its dtype
    (fp16 with amax < ~8e-5) gets the quotient computed in fp32.  Returns a float32 0-dim tensor on x's device.
    Raises NonFiniteTensorError if x holds NaN/Inf.
    """
    if x.numel() == 0:
        raise ValueError(f"per_tensor_scale: empty tensor of shape {tuple(x.shape)}")
    return _scale_from_amax(_check_finite(x, "tensor"))


def _as_scale(value: torch.Tensor | float, device: torch.device, what: str) -> torch.Tensor:
    """A user-given per-tensor scale as an fp32 0-dim tensor; must be finite and > 0 (0 would give NaN scales)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single value, got a tensor of shape {tuple(value.shape)}")
        s = value.detach().reshape(()).to(device=device, dtype=torch.float32)
    else:
        s = torch.tensor(float(value), dtype=torch.float32, device=device)
    fs = float(s)
    if not math.isfinite(fs) or fs <= 0.0:
        raise ValueError(f"{what} must be a finite number > 0, got {fs!r}")
    return s


# ----------------------------------------------------------------------------------------------------------------------
# Swizzle
# ----------------------------------------------------------------------------------------------------------------------


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 and t.dtype != torch.uint8 else t


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """Swizzle a plain ``[R, C]`` block-scale matrix into cuBLAS's 128x4-tile layout: 2-D
    ``[roundup(R,128), roundup(C,4)]``.

    Zero-padded; tiles of 128 rows x 4 columns are contiguous 512-byte chunks in row-major tile order, and inside a tile
    row ``r`` / column ``c`` sits at ``(r % 32) * 16 + (r // 32) * 4 + c``.  Overall byte offset of (r, c), with
    ``ncb = roundup(C,4) / 4``: ``((r//128)*ncb + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4``.  This is the layout
    ComfyUI's ``weight_scale`` must have; a plain row-major matrix of the same shape loads silently but wrong.
    """
    if scales.dim() != 2:
        raise ValueError(f"to_blocked expects a 2-D scale matrix, got shape {tuple(scales.shape)}")
    rows, cols = scales.shape
    rp, cp = _roundup(max(rows, 1), 128), _roundup(max(cols, 1), 4)
    src = _byte_view(scales)
    padded = torch.zeros((rp, cp), dtype=src.dtype, device=src.device)
    padded[:rows, :cols] = src
    out = padded.view(rp // 128, 4, 32, cp // 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, cp)
    return out.view(scales.dtype) if src is not scales else out


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_blocked`: the plain ``[rows, cols]`` matrix (unpadded sizes) from a swizzled buffer."""
    rp, cp = _roundup(max(rows, 1), 128), _roundup(max(cols, 1), 4)
    if blocked.numel() != rp * cp:
        raise ValueError(
            f"from_blocked: a swizzled buffer for {rows}x{cols} needs {rp}x{cp} = {rp * cp} elements, "
            f"got shape {tuple(blocked.shape)}"
        )
    src = _byte_view(blocked)
    plain = src.reshape(rp // 128, cp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(rp, cp)
    plain = plain[:rows, :cols].contiguous()
    return plain.view(blocked.dtype) if src is not blocked else plain


# ----------------------------------------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------------------------------------


def _default_chunk_rows(cols16: int, bytes_per_element: int = _TEMP_BYTES_PER_ELEMENT) -> int:
    rows = DEFAULT_TEMP_BYTES // (max(cols16, 16) * bytes_per_element)
    return max(16, rows // 16 * 16)


def _pad_chunk(chunk: torch.Tensor, rows16: int, cols16: int) -> torch.Tensor:
    r, c = chunk.shape
    if (r, c) == (rows16, cols16):
        return chunk.contiguous()
    out = torch.zeros((rows16, cols16), dtype=chunk.dtype, device=chunk.device)
    out[:r, :c] = chunk
    return out


class _Workspace:
    """Three fp32 scratch buffers reused by every row chunk of one quantize call.

    Reusing them matters on CPU: a fresh 40 MB allocation is returned to the OS and page-faulted in again on every
    use, which costs more than the arithmetic itself."""

    def __init__(self, numel: int, device: torch.device):
        self.bufs = [torch.empty(numel, dtype=torch.float32, device=device) for _ in range(3)]

    def get(self, shape: tuple[int, ...]) -> list[torch.Tensor]:
        n = math.prod(shape)
        return [b[:n].view(shape) for b in self.bufs]


def _quantize_chunk_torch(
    xc: torch.Tensor, s: torch.Tensor, ws: _Workspace, q_out: torch.Tensor
) -> torch.Tensor:
    """Quantize one padded ``[R, C]`` chunk (R, C multiples of 16) into ``q_out`` (uint8 ``[R, C/2]``, packed);
    returns the plain e4m3 block scales ``[R, C/16]``."""
    rows, cols = xc.shape
    nb = cols // NVFP4_BLOCK
    shape = (rows, nb, NVFP4_BLOCK)
    v, a, f = ws.get(shape)
    if xc.dtype == torch.float32:
        xf = xc.view(shape)
    else:
        xf = v
        v.copy_(xc.view(shape))  # exact upcast to fp32
    torch.abs(xf, out=a)
    amax_blk = a.amax(dim=-1)  # exact: same value as the amax in the input dtype
    # Two true fp32 divisions, exactly as eager does on CPU.  The 6 is a tensor on x's device because CUDA torch turns
    # a division by a Python scalar into a multiply by its (inexact) reciprocal.
    d = amax_blk / torch.full((), F4_E2M1_MAX, dtype=torch.float32, device=amax_blk.device)
    d = d / s
    d.clamp_(max=F8_E4M3_MAX)
    d8 = d.to(torch.float8_e4m3fn)
    t = s * d8.to(torch.float32)
    zero = t == 0
    # Blocks with t == 0 are encoded as code 0 (eager's rule).  Dividing them by +inf keeps everything NaN-free; the
    # sign of the resulting zeros is cleared below.
    t = torch.where(zero, torch.full_like(t, math.inf), t)
    # The encoder wants 4*x/t.  x / (t/4) is the same value rounded once, provided t/4 is exact (t >= 2^-124, true
    # for any sane scale): scaling by a power of two commutes with rounding, and quotients too small for that to hold
    # encode to (signed) zero either way.  Otherwise multiply by 4 after the division.
    t4 = t * 0.25
    if torch.equal(t4 * 4.0, t):
        torch.div(xf, t4.unsqueeze(-1), out=v)
    else:
        torch.div(xf, t.unsqueeze(-1), out=v).mul_(4.0)
    codes = v.view(-1).view(torch.uint8)[: rows * cols].view(shape)  # v's storage is free once encoded
    _encode_e2m1_into(v, a, f, codes)
    if bool(zero.any()):
        codes.masked_fill_(zero.unsqueeze(-1), 0)
    pairs = codes.view(rows, cols // 2, 2)
    torch.bitwise_left_shift(pairs[..., 0], 4, out=q_out)
    q_out.bitwise_or_(pairs[..., 1])
    return d8


def _kitchen_eager_quantize():
    """comfy-kitchen's eager ``quantize_nvfp4`` (never the CUDA/Triton kernels, which differ from eager)."""
    try:
        import comfy_kitchen as ck
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(f"backend='kitchen' needs comfy_kitchen: {exc}") from None
    return ck.registry.get_implementation("quantize_nvfp4", backend="eager")


def _plain_scales_of_kitchen(impl, xc: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = xc.shape
    q, bs = impl(xc, s, pad_16x=False)
    return q, from_blocked(bs, rows, cols // NVFP4_BLOCK)


@torch.no_grad()
def quantize(
    x: torch.Tensor,
    tensor_scale: torch.Tensor | float | None = None,
    *,
    name: str = "tensor",
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> NVFP4Tensor:
    """Quantize a 2-D ``(out, in)`` weight to NVFP4, byte-identical to ComfyUI / comfy-kitchen eager.

    tensor_scale: None = :func:`per_tensor_scale` (ComfyUI's rule); otherwise the fp32 value given (must be > 0).
    name:         tensor / layer name used in error messages.
    chunk_rows:   rows processed at a time (a multiple of 16); None = chosen so temporaries stay below ~256 MiB.
                  The output does not depend on it (blocks never straddle rows).
    backend:      "auto" / "torch" = this module's implementation (identical bytes on every device);
                  "kitchen" = comfy-kitchen's eager implementation (a cross-check; same bytes, slower).
    Raises ValueError for non-2-D / empty / unsupported-dtype input or a bad scale, NonFiniteTensorError for NaN/Inf.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"NVFP4 quantizes 2-D (out, in) Linear weights only; tensor {name!r} has shape {shape}"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"tensor {name!r}: NVFP4 input must be float32, float16 or bfloat16, got {x.dtype}")
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        raise ValueError(f"tensor {name!r} is empty (shape {tuple(x.shape)}); nothing to quantize")
    if chunk_rows is not None and (int(chunk_rows) <= 0 or int(chunk_rows) % 16):
        raise ValueError(f"chunk_rows must be a positive multiple of 16, got {chunk_rows}")

    amax = _check_finite(x, name)
    s = _scale_from_amax(amax) if tensor_scale is None else _as_scale(tensor_scale, x.device, "tensor_scale")

    r16, c16 = _roundup(rows, 16), _roundup(cols, 16)
    if chunk_rows is not None:
        step = int(chunk_rows)
    else:
        per_element = _KITCHEN_TEMP_BYTES_PER_ELEMENT if backend == "kitchen" else _TEMP_BYTES_PER_ELEMENT
        step = _default_chunk_rows(c16, per_element)
    qdata = torch.empty((r16, c16 // 2), dtype=torch.uint8, device=x.device)
    plain = torch.empty((r16, c16 // NVFP4_BLOCK), dtype=torch.float8_e4m3fn, device=x.device)
    impl = _kitchen_eager_quantize() if backend == "kitchen" else None
    ws = _Workspace(min(step, r16) * c16, x.device) if impl is None else None
    for r0 in range(0, r16, step):
        r1 = min(r0 + step, r16)
        xc = _pad_chunk(x[r0 : min(r1, rows)], r1 - r0, c16)
        if impl is None:
            plain[r0:r1] = _quantize_chunk_torch(xc, s, ws, qdata[r0:r1])
        else:
            q, d8 = _plain_scales_of_kitchen(impl, xc, s)
            qdata[r0:r1] = q
            plain[r0:r1] = d8
        del xc
    return NVFP4Tensor(qdata=qdata, block_scale=to_blocked(plain), tensor_scale=s, shape=(rows, cols))


# ----------------------------------------------------------------------------------------------------------------------
# Dequantize
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def dequantize(q: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NVFP4 -> dense tensor of the logical shape, bit-identical to comfy-kitchen eager ``dequantize_nvfp4``.

    Value = ``E2M1(code) * (s.to(dtype) * d.to(dtype))`` computed in ``dtype``, exactly as eager does (and therefore as
    ComfyUI does when it dequantizes to the compute dtype): fp32 output is exact, bf16/fp16 outputs carry eager's
    extra rounding of the combined scale (fp16 can make ``s`` subnormal).
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dequantize: dtype must be float32, float16 or bfloat16, got {dtype}")
    qd = q.qdata
    if qd.dtype != torch.uint8 or qd.dim() != 2:
        raise ValueError(f"NVFP4 qdata must be 2-D uint8, got {qd.dtype} {tuple(qd.shape)}")
    rows, half = qd.shape
    cols = half * 2
    if cols % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 qdata width {half} does not hold whole 16-element blocks")
    out_r, out_c = q.shape
    if out_r > rows or out_c > cols:
        raise ValueError(f"NVFP4 logical shape {q.shape} exceeds the stored {rows}x{cols}")
    nb = cols // NVFP4_BLOCK
    bs = q.block_scale
    if bs.dtype == torch.uint8:
        bs = bs.view(torch.float8_e4m3fn)
    scales = from_blocked(bs, rows, nb)
    total = q.tensor_scale.to(device=qd.device, dtype=torch.float32).reshape(()).to(dtype) * scales.to(dtype)
    lut = _device_lut("pair", qd.device, dtype)
    vals = lut.index_select(0, qd.reshape(-1).to(torch.int32)).view(rows, nb, NVFP4_BLOCK)
    vals.mul_(total.unsqueeze(-1))
    out = vals.view(rows, cols)
    if (out_r, out_c) != (rows, cols):
        out = out[:out_r, :out_c].contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def fake_quantize(x: torch.Tensor, input_scale: torch.Tensor | float | None) -> torch.Tensor:
    """Quantize -> dequantize an activation exactly as ComfyUI's native W4A4 path quantizes it.

    ComfyUI flattens the input to 2-D ``(-1, in_features)``, pads K (and rows) to 16 and calls
    ``TensorCoreNVFP4Layout.quantize(x, scale=input_scale)``.  ``input_scale=None`` is the dynamic case: one scale
    ``amax(|x|)/2688`` (in x's dtype) over the **whole call** (all tokens, all batch rows); a static scale is used as
    the fp32 value given.  The result is dequantized to fp32 (what the tensor-core GEMM sees) and cast to x's dtype;
    shape and dtype are x's.  A 1-D input is returned unchanged (copied), as ComfyUI does not quantize it.
    Deviations, only where ComfyUI breaks: an all-zero activation gives zeros (eager would give NaN), and an fp16
    underflow of the dynamic scale is computed in fp32 (see :func:`per_tensor_scale`).
    """
    if x.dim() == 0:
        raise ValueError("fake_quantize needs an activation with a last dimension (in_features), got a scalar")
    if x.dim() == 1 or x.numel() == 0:
        return x.clone()
    x2 = x.reshape(-1, x.shape[-1])
    q = quantize(x2, input_scale, name="activation")
    return dequantize(q, torch.float32).to(x.dtype).reshape(x.shape)


@torch.no_grad()
def clip_fraction(x: torch.Tensor, input_scale: torch.Tensor | float | None) -> float:
    """Fraction of elements of x whose magnitude exceeds ``input_scale * 2688`` (they saturate under W4A4).

    Used by calibration to judge a static ``input_scale``.  The threshold is computed in fp32 and compared with the fp32
    value of each element.  ``None`` uses the dynamic scale :func:`per_tensor_scale` (its bf16/fp16 rounding can make
    the largest elements exceed it slightly).  Raises NonFiniteTensorError on NaN/Inf, 0.0 for an empty tensor.
    """
    if x.numel() == 0:
        return 0.0
    amax = _check_finite(x, "activation")
    s = _scale_from_amax(amax) if input_scale is None else _as_scale(input_scale, x.device, "input_scale")
    thr = s * NVFP4_SCALE_DENOM  # fp32
    flat = x.reshape(-1)
    step = 1 << 24
    count = 0
    for i in range(0, flat.numel(), step):
        count += int((flat[i : i + step].to(torch.float32).abs() > thr).sum())
    return count / x.numel()
