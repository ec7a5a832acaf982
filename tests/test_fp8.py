"""FP8 per-tensor quantization must be byte-identical to ComfyUI 0.29's float8 layouts.

Three references: ComfyUI's own TensorCoreFP8E4M3Layout / TensorCoreFP8E5M2Layout (marked `comfyui`), comfy-kitchen's
eager ``quantize_per_tensor_fp8`` with the scale restated from ComfyUI's rule, and an independent statement of the rule
(float64 arithmetic + a nearest-even search over the 256 FP8 codes).
"""

from __future__ import annotations

import pytest
import torch

from nvfp4_lab.quant import fp8
from nvfp4_lab.quant.errors import NonFiniteTensorError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3", "e5m2"]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def make_data(kind: str, shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if kind == "tiny":  # amax < 448/65504: exercises ComfyUI's fp16 reciprocal clamp
        x = x * 1e-3
    elif kind == "huge":
        x = x * 3000.0
    elif kind == "outliers":
        x = x * 0.02
        x.view(-1)[:: max(1, x.numel() // 7)] *= 5000.0
    elif kind == "ties":  # many products land exactly on FP8 rounding midpoints
        x = torch.randint(-4096, 4097, shape, generator=g).float() / 64.0
    return x.to(dtype)


def comfy_rule_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's scale="recalculate" rule, restated."""
    scale = torch.amax(x.abs()).to(torch.float32) / torch.finfo(dtype).max
    if x.dtype not in (torch.float32, torch.bfloat16):
        info = torch.finfo(x.dtype)
        scale = 1.0 / torch.clamp(1.0 / scale, min=info.min, max=info.max)
    return scale


def fp8_rne_codes(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Independent FP8 rounding: nearest finite code, ties to the even code (y already within +-max)."""
    codes = torch.arange(0, 128, dtype=torch.uint8)
    vals = codes.view(dtype).double()
    finite = torch.isfinite(vals)
    codes, vals = codes[finite], vals[finite]  # sorted ascending for non-negative codes
    mag = y.double().abs().reshape(-1)
    hi = torch.searchsorted(vals, mag).clamp(max=len(vals) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = (mag - vals[lo]).abs(), (vals[hi] - mag).abs()
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    out = torch.where(pick_hi, codes[hi], codes[lo])
    out = out | (torch.signbit(y.reshape(-1)).to(torch.uint8) << 7)
    return out.reshape(y.shape)


def rule_reference(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented rule, computed without torch's mixed-dtype arithmetic or its fp8 cast."""
    scale = comfy_rule_scale(x, dtype)
    recip = (1.0 / scale).to(x.dtype)  # reciprocal in fp32, rounded to x's dtype
    prod = (x.double() * recip.double()).to(x.dtype)  # exact product, one rounding to x's dtype
    fmax = torch.finfo(dtype).max
    y = prod.double().clamp(-fmax, fmax)
    return fp8_rne_codes(y, dtype), scale


KINDS = ["normal", "tiny", "huge", "outliers", "ties"]


@pytest.mark.parametrize("fdt", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_direct_statement_of_rule(kind, dtype, fdt):
    x = make_data(kind, (257, 300), dtype, seed=KINDS.index(kind))
    q, s = fp8.quantize_fp8(x, fdt, name="blk.weight")
    assert q.dtype == fdt and q.shape == x.shape
    assert s.dtype == torch.float32 and s.dim() == 0
    ref_codes, ref_s = rule_reference(x, fdt)
    assert s.view(torch.int32).item() == ref_s.view(torch.int32).item()
    diff = int((q.view(torch.uint8) != ref_codes).sum())
    assert diff == 0, f"{diff} bytes differ"


@pytest.mark.parametrize("fdt", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_matches_kitchen_eager(dtype, fdt):
    ck = pytest.importorskip("comfy_kitchen")
    impl = ck.registry.get_implementation("quantize_per_tensor_fp8", backend="eager")
    deq = ck.registry.get_implementation("dequantize_per_tensor_fp8", backend="eager")
    x = make_data("outliers", (100, 72), dtype, seed=1)
    q, s = fp8.quantize_fp8(x, fdt)
    ref = impl(x, comfy_rule_scale(x, fdt), fdt)
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    for out in DTYPES:
        assert torch.equal(bits(fp8.dequantize_fp8(q, s, out)), bits(deq(q, s, out)))


@pytest.mark.parametrize("fdt", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_all_zero_gives_scale_one(dtype, fdt):
    x = torch.zeros(16, 40, dtype=dtype)
    x[0, :3] = -0.0
    q, s = fp8.quantize_fp8(x, fdt)
    assert s.item() == 1.0
    d = fp8.dequantize_fp8(q, s)
    assert torch.isfinite(d).all() and int(d.count_nonzero()) == 0


def test_all_zero_would_be_nan_in_comfyui_rule():
    """Documents why we deviate: the restated rule gives scale 0 and NaN bytes for an all-zero bf16 weight."""
    x = torch.zeros(4, 4, dtype=torch.bfloat16)
    s = comfy_rule_scale(x, torch.float8_e4m3fn)
    assert s.item() == 0.0
    assert torch.isnan((x * (1.0 / s).to(x.dtype)).float()).all()


def test_fp16_small_amax_uses_reciprocal_clamp():
    x = (torch.randn(32, 32) * 1e-4).to(torch.float16)
    _, s = fp8.quantize_fp8(x)
    assert s.item() == pytest.approx(1 / 65504, rel=1e-6)


def test_tiny_fp32_amax_does_not_overflow():
    x = torch.full((4, 4), 1e-37)
    q, s = fp8.quantize_fp8(x)
    d = fp8.dequantize_fp8(q, s)
    assert torch.isfinite(d).all() and int(q.view(torch.uint8).count_nonzero()) == 16


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(bad):
    x = torch.randn(8, 8, dtype=torch.bfloat16)
    x[1, 1] = bad
    x[2, 5] = bad
    x[7, 0] = bad
    with pytest.raises(NonFiniteTensorError) as err:
        fp8.quantize_fp8(x, name="final_layer.linear")
    assert "final_layer.linear" in str(err.value) and " 3 " in str(err.value)


def test_rejects_bad_dtypes_and_empty():
    with pytest.raises(ValueError):
        fp8.quantize_fp8(torch.ones(4, 4), torch.bfloat16)
    with pytest.raises(ValueError):
        fp8.quantize_fp8(torch.ones(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        fp8.quantize_fp8(torch.ones(0, 4))
    with pytest.raises(ValueError):
        fp8.dequantize_fp8(torch.ones(4, 4), torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(7,), (3, 5, 8), (1, 1)], ids=str)
def test_any_shape(shape):
    x = torch.randn(shape)
    q, s = fp8.quantize_fp8(x)
    assert q.shape == x.shape
    ref, _ = rule_reference(x, torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), ref)
    assert fp8.dequantize_fp8(q, float(s)).shape == x.shape


def test_accuracy_yardstick():
    x = torch.randn(256, 256)
    q, s = fp8.quantize_fp8(x)
    rel = ((fp8.dequantize_fp8(q, s) - x).norm() / x.norm()).item()
    assert rel < 0.04


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fdt", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_bytes_equal_cpu_bytes(dtype, fdt):
    for kind in KINDS:
        x = make_data(kind, (257, 300), dtype, seed=3)
        q, s = fp8.quantize_fp8(x, fdt)
        qc, sc = fp8.quantize_fp8(x.cuda(), fdt)
        assert torch.equal(q.view(torch.uint8), qc.view(torch.uint8).cpu())
        assert s.view(torch.int32).item() == sc.cpu().view(torch.int32).item()
        for out in DTYPES:
            assert torch.equal(bits(fp8.dequantize_fp8(q, s, out)), bits(fp8.dequantize_fp8(qc, sc, out).cpu()))
    g = torch.Generator().manual_seed(43)
    for a in (torch.rand(300, generator=g) * 50 + 1e-3).to(dtype):  # scale = amax/max must not depend on device
        x = torch.full((2, 2), float(a), dtype=dtype)
        on_cuda = fp8.weight_scale(x.cuda(), fdt).cpu()
        assert fp8.weight_scale(x, fdt).view(torch.int32).item() == on_cuda.view(torch.int32).item()


@pytest.fixture
def quant_ops(comfy_env):
    """ComfyUI's comfy.quant_ops, imported in-process on the CPU (conftest's comfy_env; skips if absent)."""
    import comfy.quant_ops

    return comfy.quant_ops


@pytest.mark.comfyui
@pytest.mark.parametrize("fdt", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_comfyui_layout(kind, dtype, fdt, quant_ops):
    qo = quant_ops
    layout = qo.TensorCoreFP8E4M3Layout if fdt == torch.float8_e4m3fn else qo.TensorCoreFP8E5M2Layout
    x = make_data(kind, (100, 72), dtype, seed=5)
    qdata, params = layout.quantize(x, scale="recalculate")
    q, s = fp8.quantize_fp8(x, fdt)
    assert qdata.dtype == q.dtype
    assert torch.equal(q.view(torch.uint8), qdata.view(torch.uint8))
    assert s.view(torch.int32).item() == params.scale.view(torch.int32).item()
    # ComfyUI dequantizes to the layer's dtype: our dequantize_fp8 with that dtype gives the same bits
    assert torch.equal(bits(fp8.dequantize_fp8(q, s, dtype)), bits(layout.dequantize(qdata, params)))


@pytest.mark.comfyui
def test_comfyui_all_zero_is_nan_for_bf16(quant_ops):
    """The documented deviation, observed in ComfyUI itself."""
    qo = quant_ops
    x = torch.zeros(8, 8, dtype=torch.bfloat16)
    qdata, params = qo.TensorCoreFP8E4M3Layout.quantize(x, scale="recalculate")
    assert params.scale.item() == 0.0
    assert torch.isnan(qdata.float()).all()
