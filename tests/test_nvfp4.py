"""NVFP4 quantize/dequantize must be byte-identical to comfy-kitchen eager (ComfyUI's CPU/cu12x path).

The reference is called explicitly through ``ck.registry.get_implementation(..., backend="eager")`` with the
per-tensor scale computed the way ComfyUI computes it (``amax(|x|)/2688`` in x's dtype, then fp32).
"""

from __future__ import annotations

import pytest
import torch

from nvfp4_lab.quant import formats, nvfp4
from nvfp4_lab.quant.errors import NonFiniteTensorError, NVFP4Error

ck = pytest.importorskip("comfy_kitchen", reason="comfy_kitchen (the byte reference) is not installed")
from comfy_kitchen import float_utils as ck_float  # noqa: E402

CK_QUANT = ck.registry.get_implementation("quantize_nvfp4", backend="eager")
CK_DEQUANT = ck.registry.get_implementation("dequantize_nvfp4", backend="eager")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def comfy_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale exactly as ComfyUI's TensorCoreNVFP4Layout.quantize computes it."""
    return (torch.amax(x.abs()) / (ck_float.F8_E4M3_MAX * ck_float.F4_E2M1_MAX)).to(torch.float32)


def needs_pad(shape) -> bool:
    return shape[0] % 16 != 0 or shape[1] % 16 != 0


def ck_quantize(x: torch.Tensor, s: torch.Tensor):
    return CK_QUANT(x, s, pad_16x=needs_pad(x.shape))


def assert_same_bytes(q: nvfp4.NVFP4Tensor, ref_q: torch.Tensor, ref_bs: torch.Tensor, ref_s: torch.Tensor):
    assert q.qdata.dtype == torch.uint8 and q.block_scale.dtype == torch.float8_e4m3fn
    assert q.tensor_scale.dtype == torch.float32 and q.tensor_scale.dim() == 0
    assert q.qdata.shape == ref_q.shape
    assert q.block_scale.shape == ref_bs.shape
    diff = (q.qdata != ref_q).sum().item()
    assert diff == 0, f"{diff} of {ref_q.numel()} packed bytes differ"
    sdiff = (q.block_scale.view(torch.uint8) != ref_bs.view(torch.uint8)).sum().item()
    assert sdiff == 0, f"{sdiff} block-scale bytes differ"
    assert q.tensor_scale.view(torch.int32).item() == ref_s.to(torch.float32).view(torch.int32).item()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def make_data(kind: str, shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "student_t":  # Student-t with 3 degrees of freedom: heavy tails
        z = torch.randn(shape, generator=g)
        chi2 = torch.randn((3, rows, cols), generator=g).pow(2).sum(0)
        x = z / torch.sqrt(chi2 / 3).clamp_min(1e-6)
    elif kind == "outliers":  # a few huge input channels, a few tiny output rows (subnormal / zero block scales)
        x = torch.randn(shape, generator=g) * 0.02
        cols_hot = torch.randint(0, cols, (max(1, cols // 97),), generator=g)
        x[:, cols_hot] *= 3000.0
        rows_cold = torch.randint(0, rows, (rows // 13,), generator=g)
        x[rows_cold] *= 1e-7
    else:
        raise AssertionError(kind)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# byte identity against comfy-kitchen eager
# ----------------------------------------------------------------------------------------------------------------------

SHAPES = [(1, 16), (100, 72), (200, 48), (257, 300), (16, 16), (33, 17), (128, 64), (3, 4100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["normal", "student_t", "outliers"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_kitchen_eager(shape, kind, dtype):
    x = make_data(kind, shape, dtype, seed=hash((shape, kind)) % 2**31)
    s = comfy_scale(x)
    ref_q, ref_bs = ck_quantize(x, s)
    q = nvfp4.quantize(x, name="blk.weight")
    assert q.shape == shape
    assert_same_bytes(q, ref_q, ref_bs, s)
    assert (tuple(q.qdata.shape), tuple(q.block_scale.shape)) == formats.nvfp4_storage_shapes(*shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(130, 4096), (1000, 3080)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_kitchen_eager_larger(shape, dtype):
    x = make_data("student_t", shape, dtype, seed=7)
    x[:, 5] *= 40.0
    s = comfy_scale(x)
    ref_q, ref_bs = ck_quantize(x, s)
    assert_same_bytes(nvfp4.quantize(x), ref_q, ref_bs, s)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kitchen_backend_matches_torch_backend(dtype):
    x = make_data("outliers", (257, 300), dtype, seed=3)
    a = nvfp4.quantize(x)
    b = nvfp4.quantize(x, backend="kitchen", chunk_rows=64)
    assert torch.equal(a.qdata, b.qdata)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))
    assert torch.equal(a.tensor_scale, b.tensor_scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("log2_scale", [-7, -10, 0])
def test_power_of_two_static_scale_exact_ties(dtype, log2_scale):
    """Power-of-two scales make x/(s*d) exact, so RNE ties are hit constantly (the case where CUDA differs)."""
    g = torch.Generator().manual_seed(11)
    s = 2.0**log2_scale
    x = (torch.randint(-48, 49, (96, 160), generator=g).float() * 0.125).to(dtype)
    x = x * (s * 128)  # block amax 6*s*128 -> d = 128 (exact) for rows that reach 6
    x[::3, ::16] = 6.0 * s * 128
    ref_q, ref_bs = ck_quantize(x, torch.tensor(s, dtype=torch.float32))
    assert_same_bytes(nvfp4.quantize(x, s), ref_q, ref_bs, torch.tensor(s))


def test_all_e2m1_ties_and_signed_zero():
    """Every E2M1 tie (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5), both signs, -0.0 and tiny values, with t = s*d = 1."""
    block = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, -0.0, -1e-30, 1e-30, 0.5, 3.0, 4.0, 1.0, 6.0]
    row = torch.tensor(block + [-v for v in block], dtype=torch.float32)
    x = row.repeat(16, 1)
    s = torch.tensor(2.0**-7)  # block amax 6 -> d = (6/6)/2^-7 = 128 exactly -> t = 1 -> v = x
    ref_q, ref_bs = ck_quantize(x, s)
    q = nvfp4.quantize(x, s)
    assert_same_bytes(q, ref_q, ref_bs, s)
    codes = torch.stack([q.qdata >> 4, q.qdata & 15], dim=-1).reshape(16, 32)[0].tolist()
    pos = [0, 2, 2, 4, 4, 6, 6, 0, 8, 8, 0, 1, 5, 6, 2, 7]
    neg = [8, 10, 10, 12, 12, 14, 14, 8, 0, 0, 8, 9, 13, 14, 10, 15]
    assert codes == pos + neg


def test_encoder_exhaustive_against_kitchen_bit_trick():
    """Our E2M1 encoder == torchao/comfy-kitchen's RNE bit trick on every bf16 pattern, random fp32 bits and
    values next to each threshold."""
    enc = ck_float._f32_to_floatx_unpacked
    all_bf16 = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=g, dtype=torch.int64).to(torch.int32)
    rnd = rnd.view(torch.float32)
    thr = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.0, 24.0])
    near = torch.cat([thr, torch.nextafter(thr, torch.tensor(100.0)), torch.nextafter(thr, torch.tensor(-100.0))])
    infs = torch.tensor([float("inf"), -float("inf")])
    v = torch.cat([all_bf16, rnd, near, -near, torch.linspace(-7, 7, 20001), infs])
    v = v[~torch.isnan(v)]
    ref = enc(v.clamp(-6, 6), 2, 1)
    ours = nvfp4._encode_e2m1(v)
    assert torch.equal(ours, ref)


def test_worked_example_3_and_6_packs_to_0x57():
    """Scaled values (3.0, 6.0) are codes (5, 7) -> byte 0x57 (element 0 in the high nibble)."""
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 3.0, 6.0
    q = nvfp4.quantize(x, 1.0)  # block amax 6 -> d = 1 -> t = 1
    assert q.qdata[0, 0].item() == 0x57
    assert q.block_scale.view(torch.uint8)[0, 0].item() == 0x38  # e4m3 1.0
    assert torch.equal(nvfp4.dequantize(q)[0, :2], torch.tensor([3.0, 6.0]))
    x[0, 0], x[0, 1] = 0.5, 6.0
    assert nvfp4.quantize(x, 1.0).qdata[0, 0].item() == 0x17
    x[0, 0] = -0.06
    assert nvfp4.quantize(x, 1.0).qdata[0, 0].item() == 0x87  # negative zero keeps its sign


# ----------------------------------------------------------------------------------------------------------------------
# chunking, scales, edge cases
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [16, 48, 128, 272, 4096])
def test_chunked_equals_unchunked(chunk_rows):
    x = make_data("outliers", (257, 300), torch.bfloat16, seed=5)
    a = nvfp4.quantize(x)
    b = nvfp4.quantize(x, chunk_rows=chunk_rows)
    assert torch.equal(a.qdata, b.qdata)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))


def test_chunked_equals_unchunked_wide():
    x = make_data("student_t", (1000, 3080), torch.float32, seed=9)
    a = nvfp4.quantize(x)
    b = nvfp4.quantize(x, chunk_rows=336)
    assert torch.equal(a.qdata, b.qdata)
    assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))


@pytest.mark.parametrize("bad", [0, -16, 8, 20])
def test_chunk_rows_must_be_positive_multiple_of_16(bad):
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4.quantize(torch.randn(32, 32), chunk_rows=bad)


def test_default_chunk_keeps_temporaries_bounded():
    for cols in (16, 3072, 13824, 65536, 10**6):
        rows = nvfp4._default_chunk_rows(cols)
        assert rows % 16 == 0 and rows >= 16
        assert rows == 16 or rows * cols * nvfp4._TEMP_BYTES_PER_ELEMENT <= nvfp4.DEFAULT_TEMP_BYTES


def test_non_contiguous_input():
    x = make_data("normal", (96, 200), torch.bfloat16, seed=1)
    xt = x.t()  # (200, 96), not contiguous
    ref_q, ref_bs = ck_quantize(xt.contiguous(), comfy_scale(xt))
    assert_same_bytes(nvfp4.quantize(xt, chunk_rows=32), ref_q, ref_bs, comfy_scale(xt))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_tensor_scale_is_computed_in_input_dtype(dtype):
    x = make_data("normal", (64, 64), dtype, seed=2)
    x[3, 3] = 9.8765  # the amax; its quotient rounds differently in bf16 than in fp32
    s = nvfp4.per_tensor_scale(x)
    assert s.dtype == torch.float32 and s.dim() == 0
    assert bits(s).item() == bits(comfy_scale(x)).item()
    if dtype == torch.bfloat16:
        assert s.item() != (x.abs().amax().float() / 2688).item()


def test_all_zero_tensor_gives_zero_codes_not_nan():
    x = torch.zeros(40, 48, dtype=torch.bfloat16)
    x[3, :7] = -0.0
    q = nvfp4.quantize(x)
    assert q.tensor_scale.item() == 1.0
    assert int(q.qdata.count_nonzero()) == 0
    assert int(q.block_scale.view(torch.uint8).count_nonzero()) == 0
    d = nvfp4.dequantize(q)
    assert torch.isfinite(d).all() and int(d.count_nonzero()) == 0
    # documented difference: comfy-kitchen eager with ComfyUI's s = 0 gives NaN everywhere
    s0 = comfy_scale(x)
    assert s0.item() == 0.0
    ref_q, ref_bs = ck_quantize(x, s0)
    assert torch.isnan(CK_DEQUANT(ref_q, s0, ref_bs, torch.float32)).all()


def test_zero_and_tiny_blocks_inside_a_tensor():
    """Zero blocks and blocks so small their e4m3 scale flushes to 0 must give code 0 (also for negatives)."""
    x = torch.randn(48, 64)
    x[0, :16] = 0.0
    x[1, 16:32] = -1e-12  # flushed block of negatives: eager gives +0 codes, not -0
    x[2, 32:48] = 3e-7 * torch.randn(16)  # subnormal e4m3 scale
    x[5, :] = -0.0
    s = comfy_scale(x)
    ref_q, ref_bs = ck_quantize(x, s)
    q = nvfp4.quantize(x)
    assert_same_bytes(q, ref_q, ref_bs, s)
    assert int(q.qdata[1, 8:16].count_nonzero()) == 0


@pytest.mark.parametrize("shape", [(1, 1), (1, 15), (2, 3), (15, 1), (17, 16), (1, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_tiny_matrices(shape, dtype):
    x = make_data("normal", shape, dtype, seed=shape[0] * 100 + shape[1])
    s = comfy_scale(x)
    ref_q, ref_bs = ck_quantize(x, s)
    q = nvfp4.quantize(x)
    assert_same_bytes(q, ref_q, ref_bs, s)
    d = nvfp4.dequantize(q)
    ref_d = CK_DEQUANT(ref_q, s, ref_bs, torch.float32)[: shape[0], : shape[1]]
    assert d.shape == shape and torch.equal(bits(d), bits(ref_d))


def test_fp16_underflow_uses_fp32_scale():
    """fp16 with amax < ~8e-5: ComfyUI's fp16 quotient is 0 (layer silently zeroed); we compute it in fp32."""
    x = (torch.randn(64, 64) * 1e-5).to(torch.float16)
    assert comfy_scale(x).item() == 0.0  # what ComfyUI would store
    s = nvfp4.per_tensor_scale(x)
    assert s.item() > 0 and bits(s).item() == bits(x.abs().amax().float() / 2688).item()
    q = nvfp4.quantize(x)
    ref_q, ref_bs = ck_quantize(x, s)
    assert_same_bytes(q, ref_q, ref_bs, s)
    d = nvfp4.dequantize(q)
    rel = (d - x.float()).norm() / x.float().norm()
    assert rel < 0.2


@pytest.mark.parametrize("bad_value,kind", [(float("nan"), "NaN"), (float("inf"), "+Inf"), (-float("inf"), "-Inf")])
def test_non_finite_raises_with_name_and_count(bad_value, kind):
    x = torch.randn(32, 48, dtype=torch.bfloat16)
    x[3, 4] = bad_value
    x[7, 40] = bad_value
    with pytest.raises(NonFiniteTensorError) as err:
        nvfp4.quantize(x, name="double_blocks.0.img_mlp.0")
    msg = str(err.value)
    assert "double_blocks.0.img_mlp.0" in msg and " 2 " in msg
    assert isinstance(err.value, NVFP4Error)
    with pytest.raises(NonFiniteTensorError):
        nvfp4.fake_quantize(x, None)
    with pytest.raises(NonFiniteTensorError):
        nvfp4.per_tensor_scale(x)


@pytest.mark.parametrize("shape", [(64,), (2, 16, 16), (1, 1, 1, 16), ()], ids=str)
def test_rejects_non_2d(shape):
    with pytest.raises(ValueError) as err:
        nvfp4.quantize(torch.randn(shape), name="some.layer")
    assert "some.layer" in str(err.value) and str(tuple(shape)) in str(err.value)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        nvfp4.quantize(torch.ones(16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        nvfp4.quantize(torch.ones(0, 16))
    for s in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError):
            nvfp4.quantize(torch.ones(16, 16), s)
    with pytest.raises(ValueError, match="backend"):
        nvfp4.quantize(torch.ones(16, 16), backend="cuda")


@pytest.mark.parametrize("scale", [0.01, torch.tensor(0.01, dtype=torch.float16), torch.tensor([0.01])])
def test_static_scale_is_used_as_fp32(scale):
    x = make_data("normal", (32, 48), torch.bfloat16, seed=4)
    s32 = (scale if isinstance(scale, torch.Tensor) else torch.tensor(scale)).reshape(()).float()
    ref_q, ref_bs = ck_quantize(x, s32)
    assert_same_bytes(nvfp4.quantize(x, scale), ref_q, ref_bs, s32)


# ----------------------------------------------------------------------------------------------------------------------
# dequantize
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(100, 72), (257, 300), (130, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_matches_kitchen_eager(shape, out_dtype):
    x = make_data("outliers", shape, torch.bfloat16, seed=13)
    q = nvfp4.quantize(x)
    ref = CK_DEQUANT(q.qdata, q.tensor_scale, q.block_scale, out_dtype)[: shape[0], : shape[1]]
    d = nvfp4.dequantize(q, out_dtype)
    assert d.shape == shape and d.dtype == out_dtype and d.is_contiguous()
    assert torch.equal(bits(d), bits(ref))


def test_dequantize_accepts_uint8_scales_and_has_expected_error():
    x = make_data("normal", (64, 64), torch.float32, seed=21)
    q = nvfp4.quantize(x)
    q_u8 = nvfp4.NVFP4Tensor(q.qdata, q.block_scale.view(torch.uint8), q.tensor_scale, q.shape)
    assert torch.equal(nvfp4.dequantize(q), nvfp4.dequantize(q_u8))
    rel = ((nvfp4.dequantize(q) - x).norm() / x.norm()).item()
    assert 0.08 < rel < 0.11  # the documented ~9.5 % relative RMSE on Gaussian data


# ----------------------------------------------------------------------------------------------------------------------
# swizzle
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 13), (128, 4), (1, 1), (129, 5), (256, 8), (7, 250)], ids=str)
def test_to_blocked_matches_kitchen_and_round_trips(shape):
    g = torch.Generator().manual_seed(0)
    m = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    b = nvfp4.to_blocked(m)
    assert torch.equal(b, ck_float.to_blocked(m, flatten=False))
    assert torch.equal(nvfp4.from_blocked(b, *shape), m)
    # float8 stays float8
    f8 = m.view(torch.float8_e4m3fn)
    b8 = nvfp4.to_blocked(f8)
    assert b8.dtype == torch.float8_e4m3fn and torch.equal(b8.view(torch.uint8), b)
    assert torch.equal(nvfp4.from_blocked(b8, *shape).view(torch.uint8), m)


def test_blocked_offset_formula():
    """Byte offset of (r, c) = ((r//128)*ncb + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4."""
    rows, cols = 300, 13
    r = torch.arange(rows).view(-1, 1).expand(rows, cols)
    c = torch.arange(cols).view(1, -1).expand(rows, cols)
    ids = (r * cols + c).to(torch.int32)
    flat = nvfp4.to_blocked(ids).reshape(-1)
    ncb = -(-cols // 4)
    offs = ((r // 128) * ncb + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    assert torch.equal(flat[offs.reshape(-1)], ids.reshape(-1))
    assert int((flat != 0).sum()) == rows * cols - 1  # every other slot is zero padding (id 0 is (0, 0))


def test_from_blocked_rejects_wrong_size():
    with pytest.raises(ValueError):
        nvfp4.from_blocked(torch.zeros(128, 4, dtype=torch.uint8), 200, 4)


# ----------------------------------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------------------------------


def ck_fake_quant(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    q, bs = ck_quantize(x2, s)
    return CK_DEQUANT(q, s, bs, torch.float32)[: x2.shape[0], : x2.shape[1]].to(x.dtype).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 77, 72), (154, 3072), (1, 5, 300), (3, 2, 4, 40)], ids=str)
def test_fake_quantize_dynamic_matches_kitchen(shape, dtype):
    x = make_data("student_t", (shape[0], int(torch.tensor(shape[1:]).prod())), dtype, seed=17).reshape(shape)
    y = nvfp4.fake_quantize(x, None)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = ck_fake_quant(x, comfy_scale(x))
    assert torch.equal(bits(y), bits(ref))


@pytest.mark.parametrize("input_scale", [1e-4, torch.tensor(3e-3)])
def test_fake_quantize_static_scale(input_scale):
    x = make_data("normal", (66, 64), torch.bfloat16, seed=19).reshape(2, 33, 64)
    s = (input_scale if isinstance(input_scale, torch.Tensor) else torch.tensor(input_scale)).float()
    y = nvfp4.fake_quantize(x, input_scale)
    assert torch.equal(bits(y), bits(ck_fake_quant(x, s)))


def test_fake_quantize_edge_cases():
    v = torch.randn(16)
    assert torch.equal(nvfp4.fake_quantize(v, None), v)  # ComfyUI does not quantize 1-D input
    z = torch.zeros(4, 8, 32, dtype=torch.bfloat16)
    assert int(nvfp4.fake_quantize(z, None).count_nonzero()) == 0
    e = torch.zeros(0, 32)
    assert nvfp4.fake_quantize(e, None).shape == (0, 32)
    with pytest.raises(ValueError):
        nvfp4.fake_quantize(torch.tensor(1.0), None)


def test_clip_fraction():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-4.0, 5.0, -6.0, 7.0]])
    assert nvfp4.clip_fraction(x, 2.5 / 2688) == pytest.approx(5 / 8)
    assert nvfp4.clip_fraction(x, torch.tensor(10.0)) == 0.0
    dyn = (x.abs() > nvfp4.per_tensor_scale(x) * 2688).float().mean().item()
    assert nvfp4.clip_fraction(x, None) == pytest.approx(dyn)
    assert nvfp4.clip_fraction(torch.zeros(0, 4), 1.0) == 0.0
    xb = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    # the threshold is compared in fp32, not rounded to bf16
    assert nvfp4.clip_fraction(xb, 2.999 / 2688) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------------------------
# larger / device / ComfyUI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_large_matrix_matches_kitchen(dtype):
    x = make_data("student_t", (3072, 5120), dtype, seed=23)
    s = comfy_scale(x)
    ref_q, ref_bs = ck_quantize(x, s)
    assert_same_bytes(nvfp4.quantize(x, chunk_rows=1024), ref_q, ref_bs, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_bytes_equal_cpu_bytes(dtype):
    for kind, shape in (("outliers", (1000, 3080)), ("student_t", (257, 300))):
        x = make_data(kind, shape, dtype, seed=29)
        a = nvfp4.quantize(x)
        b = nvfp4.quantize(x.cuda())
        assert torch.equal(a.qdata, b.qdata.cpu())
        assert torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8).cpu())
        assert torch.equal(a.tensor_scale, b.tensor_scale.cpu())
        for out in DTYPES:
            assert torch.equal(bits(nvfp4.dequantize(a, out)), bits(nvfp4.dequantize(b, out).cpu()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_per_tensor_scale_equals_cpu(dtype):
    """CUDA torch divides by a Python scalar via its reciprocal; our scale must not depend on the device."""
    g = torch.Generator().manual_seed(41)
    amaxes = (torch.rand(400, generator=g) * 20 + 1e-3).to(dtype)
    for a in amaxes:
        x = torch.zeros(1, 16, dtype=dtype)
        x[0, 3] = a
        assert bits(nvfp4.per_tensor_scale(x)).item() == bits(nvfp4.per_tensor_scale(x.cuda()).cpu()).item()
        assert bits(nvfp4.per_tensor_scale(x)).item() == bits(comfy_scale(x)).item()


@pytest.fixture
def quant_ops(comfy_env):
    """ComfyUI's comfy.quant_ops, imported in-process on the CPU (conftest's comfy_env; skips if absent)."""
    import comfy.quant_ops

    return comfy.quant_ops


@pytest.mark.comfyui
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(100, 72), (257, 300), (128, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_comfyui_layout(shape, dtype, quant_ops):
    qo = quant_ops
    x = make_data("outliers", shape, dtype, seed=31)
    qdata, params = qo.TensorCoreNVFP4Layout.quantize(x)
    q = nvfp4.quantize(x)
    assert_same_bytes(q, qdata, params.block_scale, params.scale)
    assert tuple(params.orig_shape) == q.shape
    # dynamic activation quantization as the W4A4 forward does it (QuantizedTensor.from_float(x, layout, scale=None))
    act = make_data("student_t", (154, shape[1]), dtype, seed=37)
    qt = qo.QuantizedTensor.from_float(act, "TensorCoreNVFP4Layout", scale=None)
    qa = nvfp4.quantize(act, None)
    assert_same_bytes(qa, qt._qdata, qt._params.block_scale, qt._params.scale)
    # ComfyUI dequantizes to the layer's dtype with eager's rounding; ours with dtype= does the same
    assert torch.equal(bits(qt.dequantize()), bits(nvfp4.dequantize(qa, dtype)))
