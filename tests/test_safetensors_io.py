"""safetensors_io: header parsing and validation, dtype maps, and the streaming atomic writer."""

from __future__ import annotations

import gc
import json
import struct
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4_lab.quant.errors import CheckpointError
from nvfp4_lab.quant.safetensors_io import (
    SafetensorsWriter,
    TensorInfo,
    dtype_code,
    header_bytes,
    read_header,
    torch_dtype,
)


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 17, generator=g)
    return {
        "u8": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),  # odd byte count first
        "blocks.0.attn.weight": w.to(torch.bfloat16),
        "f16": w.to(torch.float16),
        "f32": w,
        "f64": w.double(),
        "fp8": (w / 4).to(torch.float8_e4m3fn),
        "fp8_e5m2": w.to(torch.float8_e5m2),
        "i8": torch.randint(-128, 127, (5, 3), dtype=torch.int8, generator=g),
        "i16": torch.randint(-1000, 1000, (3,), dtype=torch.int16, generator=g),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i64": torch.arange(5, dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(0.125, dtype=torch.float32),
        "empty": torch.zeros(0, 4),
        "non_contiguous": w.t(),
    }


def _bytes(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, **kw) -> None:
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata or {}, **kw) as w:
        for k, v in tensors.items():
            w.write(k, v)


def _raw(path: Path, header: dict | bytes, data: bytes = b"", n: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if n is None else n) + body + data)
    return path


# -- dtype maps ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code,dtype",
    [("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32), ("F64", torch.float64),
     ("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2), ("U8", torch.uint8), ("I8", torch.int8),
     ("I16", torch.int16), ("I32", torch.int32), ("I64", torch.int64), ("BOOL", torch.bool)],
)
def test_dtype_maps_round_trip(code, dtype):
    assert torch_dtype(code) == dtype
    assert dtype_code(dtype) == code


def test_dtype_map_errors():
    with pytest.raises(CheckpointError, match="unknown safetensors dtype"):
        torch_dtype("F7")
    with pytest.raises(CheckpointError, match="no torch equivalent"):
        torch_dtype("F4")
    with pytest.raises(ValueError):
        dtype_code(torch.complex128)


# -- writer round trips ----------------------------------------------------------------------------------------------
def test_writer_round_trip_matches_save_file(tmp_path):
    tensors = _sample_tensors()
    ours, ref = tmp_path / "ours.safetensors", tmp_path / "ref.safetensors"
    _write(ours, tensors, {"config": '{"a": 1}', "x": "y"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref), metadata={"config": '{"a": 1}', "x": "y"})

    loaded, expected = load_file(str(ours)), load_file(str(ref))
    assert set(loaded) == set(expected) == set(tensors)
    for k in tensors:
        assert loaded[k].dtype == expected[k].dtype
        assert loaded[k].shape == expected[k].shape
        assert _bytes(loaded[k]) == _bytes(expected[k]) == _bytes(tensors[k])
    with safe_open(str(ours), framework="pt") as f:
        assert f.metadata() == {"config": '{"a": 1}', "x": "y"}
        assert torch.equal(f.get_tensor("f32"), tensors["f32"])
        assert torch.equal(f.get_tensor("non_contiguous"), tensors["non_contiguous"])


def test_writer_header_layout(tmp_path):
    tensors = _sample_tensors()
    out = tmp_path / "o.safetensors"
    _write(out, tensors, {"k": "v"})
    infos, meta = read_header(out)
    assert meta == {"k": "v"}
    assert list(infos) == list(tensors)  # header lists tensors in spec order
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0  # padded header: data section starts 8-byte aligned
    for name, info in infos.items():
        assert isinstance(info, TensorInfo) and info.file == out and info.name == name
        assert info.dtype == dtype_code(tensors[name].dtype)
        assert info.shape == tuple(tensors[name].shape)
        assert info.data_offsets[0] % tensors[name].dtype.itemsize == 0  # every tensor aligned to its item size
        assert info.nbytes == tensors[name].numel() * tensors[name].dtype.itemsize
    assert header_bytes(out) == raw[: 8 + n]


def test_read_header_agrees_with_safetensors(tmp_path):
    tensors = _sample_tensors()
    ref = tmp_path / "ref.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ref), metadata={"m": "1"})
    infos, meta = read_header(ref)
    assert meta == {"m": "1"}
    with safe_open(str(ref), framework="pt") as f:
        assert sorted(infos) == sorted(f.keys())
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            sl = f.get_slice(k)
            assert list(infos[k].shape) == list(sl.get_shape())
            assert infos[k].dtype == sl.get_dtype()


def test_writer_no_metadata_and_no_tensors(tmp_path):
    out = tmp_path / "empty.safetensors"
    with SafetensorsWriter(out, [], {}):
        pass
    assert load_file(str(out)) == {}
    assert read_header(out) == ({}, {})


# -- writer checks and atomicity ---------------------------------------------------------------------------------
def test_writer_checks_name_dtype_shape_and_order(tmp_path):
    t = torch.zeros(2, 3)
    specs = [("a", torch.float32, (2, 3)), ("b", torch.float32, (2, 3))]
    for bad in [("b", t), ("a", t.half()), ("a", torch.zeros(3, 2))]:
        out = tmp_path / "o.safetensors"
        with pytest.raises(CheckpointError, match="o.safetensors"), SafetensorsWriter(out, specs, {}) as w:
            w.write(*bad)
        assert not out.exists()
        assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_writer_incomplete_is_discarded(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    with pytest.raises(CheckpointError, match="never written"), SafetensorsWriter(out, specs, {}) as w:
        w.write("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_leaves_no_file(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="boom"), SafetensorsWriter(out, specs, {}) as w:
        w.write("a", torch.zeros(2))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_output_equal_to_input(tmp_path):
    src = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    before = src.read_bytes()
    with pytest.raises(CheckpointError, match="same file as input"):
        SafetensorsWriter(src, [("a", torch.float32, (2,))], {}, force=True, inputs=[src])
    with pytest.raises(CheckpointError, match="same file as input"):  # same file through another spelling
        SafetensorsWriter(tmp_path / "." / "model.safetensors", [("a", torch.float32, (2,))], {}, force=True,
                          inputs=[src])
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_writer_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(CheckpointError, match="already exists"):
        SafetensorsWriter(out, [("a", torch.float32, (2,))], {})
    assert out.read_bytes() == b"old"
    _write(out, {"a": torch.ones(2)}, force=True)
    assert torch.equal(load_file(str(out))["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_writer_metadata_must_be_str(tmp_path):
    with pytest.raises(TypeError, match="str"):
        SafetensorsWriter(tmp_path / "o.safetensors", [], {"n": 1})
    with pytest.raises(ValueError, match="twice"):
        SafetensorsWriter(tmp_path / "o.safetensors", [("a", torch.float32, (1,))] * 2, {})


def test_writer_output_has_normal_permissions(tmp_path):
    out = tmp_path / "o.safetensors"
    _write(out, {"a": torch.ones(2)})
    assert out.stat().st_mode & 0o044  # readable by others (mkstemp's 0600 would not be)


def test_writer_memory_is_bounded_by_one_tensor(tmp_path):
    """Python-visible allocations while streaming 40 tensors stay near the largest one, not the file size.

    Tensors are made from numpy arrays, whose buffers tracemalloc tracks, so a writer that buffered data (or kept
    references to written tensors) would show up in the peak.
    """
    n_tensors, numel, big = 40, 256 * 1024, 512 * 1024  # 1 MiB fp32 each, one of 2 MiB
    shapes = [(numel,)] * n_tensors + [(big,)]
    specs = [(f"t{i}", torch.float32, s) for i, s in enumerate(shapes)]
    out = tmp_path / "many.safetensors"
    largest = big * 4
    refs = []
    tracemalloc.start()
    try:
        with SafetensorsWriter(out, specs, {"k": "v"}) as w:
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            for i, (name, _, shape) in enumerate(specs):
                t = torch.from_numpy(np.full(shape, float(i), dtype=np.float32))
                w.write(name, t)
                refs.append(weakref.ref(t))
                del t
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gc.collect()
    total = sum(s[0] * 4 for s in shapes)
    assert total > 20 * largest
    assert peak - base < largest + 256 * 1024, f"peak {peak - base} bytes for a largest tensor of {largest}"
    assert all(r() is None for r in refs)  # the writer keeps no reference to written tensors
    loaded = load_file(str(out))
    assert loaded["t3"][0].item() == 3.0 and loaded[f"t{n_tensors}"].shape == (big,)


# -- header validation ---------------------------------------------------------------------------------------------
def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "name,make,match",
    [
        ("empty", lambda p: p.write_bytes(b"") or p, "too short"),
        ("short", lambda p: p.write_bytes(b"\x01\x02\x03") or p, "too short"),
        ("huge_len", lambda p: _raw(p, b"{}", n=2**40), "absurd"),
        ("len_past_end", lambda p: _raw(p, b'{"a":1}', n=4096), "truncated"),
        ("bad_json", lambda p: _raw(p, b'{"a": {"dtype": "F32",'), "not valid JSON"),
        ("not_object_start", lambda p: _raw(p, b"[1, 2]  "), "does not start"),
        ("not_utf8", lambda p: _raw(p, b"{\xff\xfe}"), "not UTF-8"),
        ("duplicate", lambda p: _raw(p, b'{"a":' + json.dumps(_entry()).encode() + b',"a":'
                                     + json.dumps(_entry()).encode() + b"}", b"\0" * 8), "duplicate"),
        ("unknown_dtype", lambda p: _raw(p, {"a": _entry(dtype="F7")}, b"\0" * 8), "unknown dtype"),
        ("bad_shape", lambda p: _raw(p, {"a": _entry(shape=(-1,))}, b"\0" * 8), "invalid shape"),
        ("bad_offsets", lambda p: _raw(p, {"a": _entry(offsets=(8, 0))}, b"\0" * 8), "invalid data_offsets"),
        ("size_mismatch", lambda p: _raw(p, {"a": _entry(offsets=(0, 12))}, b"\0" * 12), "needs 8 bytes"),
        ("overlap", lambda p: _raw(p, {"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12), "overlaps"),
        ("gap", lambda p: _raw(p, {"a": _entry(offsets=(4, 12))}, b"\0" * 12), "gap"),
        ("truncated_data", lambda p: _raw(p, {"a": _entry(), "b": _entry(offsets=(8, 16))}, b"\0" * 10),
         "truncated"),
        ("trailing", lambda p: _raw(p, {"a": _entry()}, b"\0" * 20), "not described"),
        ("bad_metadata", lambda p: _raw(p, {"__metadata__": {"n": 1}, "a": _entry()}, b"\0" * 8), "__metadata__"),
        ("entry_not_object", lambda p: _raw(p, {"a": 3}, b""), "not an object"),
    ],
)
def test_read_header_rejects_corrupt_files(tmp_path, name, make, match):
    path = tmp_path / f"{name}.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=match) as exc:
        read_header(path)
    assert str(path) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_read_header_truncated_real_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(64, 64), "b": torch.ones(10)}, str(good))
    raw = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(bad)
    bad.write_bytes(raw[:50])  # cut inside the header
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(bad)


def test_read_header_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        read_header(tmp_path)


def test_read_header_reads_no_tensor_data(tmp_path, monkeypatch):
    out = tmp_path / "big.safetensors"
    save_file({"a": torch.zeros(1024, 1024)}, str(out))
    reads = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            reads.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    import nvfp4_lab.quant.safetensors_io as mod

    monkeypatch.setattr(mod, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    read_header(out)
    assert sum(reads) < 1024
