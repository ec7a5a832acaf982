"""checkpoint: opening single / sharded / folder / GGUF files, prefixes, layer grouping, formats, dequantization.

NVFP4 and FP8 fixtures are built with comfy_kitchen directly and the per-tensor scale rule (amax/2688 in the weight's
dtype, then fp32), so these tests do not depend on quant/nvfp4.py or quant/fp8.py, except the dequantization tests,
which skip when those modules are missing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nvfp4_lab.quant.checkpoint import Checkpoint, Layer, open_checkpoint
from nvfp4_lab.quant.errors import CheckpointError
from nvfp4_lab.quant.safetensors_io import read_header


# -- fixtures ------------------------------------------------------------------------------------------------------
def _marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def nvfp4_layer(name: str, w: torch.Tensor, *, bias: bool = True, input_scale: float | None = None,
                fpmm: bool = False, marker: bool = True, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one NVFP4 layer exactly as ComfyUI writes them (comfy_kitchen quantizer)."""
    import comfy_kitchen as ck

    s = (w.abs().amax() / 2688).to(torch.float32)
    out_f, in_f = w.shape
    pad = out_f % 16 != 0 or in_f % 16 != 0
    q, bs = ck.quantize_nvfp4(w, s, pad_16x=pad)
    sd = {f"{name}.weight": q, f"{name}.weight_scale": bs, f"{name}.weight_scale_2": s.reshape(())}
    if marker:
        conf = {"format": "nvfp4"}
        if fpmm:
            conf["full_precision_matrix_mult"] = True
        conf.update(extra or {})
        sd[f"{name}.comfy_quant"] = _marker(conf)
    if input_scale is not None:
        sd[f"{name}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    if bias:
        sd[f"{name}.bias"] = torch.linspace(-1, 1, out_f).to(w.dtype)
    return sd


def fp8_layer(name: str, w: torch.Tensor, *, input_scale: float | None = None, marker: bool = True):
    scale = (w.float().abs().amax() / 448).to(torch.float32)
    sd = {f"{name}.weight": (w.float() / scale).to(torch.float8_e4m3fn), f"{name}.weight_scale": scale.reshape(())}
    if marker:
        sd[f"{name}.comfy_quant"] = _marker({"format": "float8_e4m3fn"})
    if input_scale is not None:
        sd[f"{name}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    return sd


def _w(out_f: int, in_f: int, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_f, in_f, generator=g) * 0.05).to(dtype)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd["img_in.weight"] = _w(64, 32)
    sd["img_in.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    sd.update(nvfp4_layer("blocks.0.attn.qkv", _w(192, 64, 1), input_scale=0.002))
    sd.update(nvfp4_layer("blocks.0.attn.proj", _w(64, 64, 2), fpmm=True))
    sd.update(fp8_layer("blocks.0.mlp.fc1", _w(128, 64, 3), input_scale=0.01))
    sd["blocks.0.mlp.fc2.weight"] = _w(64, 128, 4).half()
    sd["blocks.0.norm.scale"] = torch.ones(64, dtype=torch.float32)
    sd["blocks.0.modulation"] = torch.zeros(1, 6, 64, dtype=torch.bfloat16)
    sd["head.modulation"] = torch.zeros(1, 2, 64, dtype=torch.bfloat16)
    sd["head.head.weight"] = _w(16, 64, 5)
    return {k: v.contiguous() for k, v in sd.items()}


def _bytes_of(sd, keys):
    return sum(sd[k].numel() * sd[k].element_size() for k in keys)


@pytest.fixture()
def mixed(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = mixed_state_dict()
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path), metadata={"config": '{"x": 1}'})
    return path, sd


# -- single file ---------------------------------------------------------------------------------------------------
def test_single_file_layers(mixed):
    path, sd = mixed
    with open_checkpoint(path) as ck:
        assert isinstance(ck, Checkpoint)
        assert ck.kind == "safetensors" and ck.files == [path] and ck.prefix == ""
        assert ck.metadata == {"config": '{"x": 1}'}
        assert set(ck.names()) == set(sd)
        layers = ck.layers()
    assert list(layers) == list(dict.fromkeys(_stem(k) for k in ck.names()))  # ordered by first key
    qkv = layers["blocks.0.attn.qkv"]
    assert isinstance(qkv, Layer)
    assert qkv.format == "nvfp4" and qkv.shape == (192, 64) and qkv.linear
    assert qkv.params == 192 * 64 + 192  # logical, not stored elements
    assert qkv.stored_bytes == _bytes_of(sd, qkv.keys)
    assert qkv.input_scale == pytest.approx(0.002)
    assert qkv.full_precision_matrix_mult is False
    assert qkv.comfy_quant == {"format": "nvfp4"} and qkv.quant_source == "tensor"
    assert set(qkv.keys) == {f"blocks.0.attn.qkv.{s}" for s in
                             ("weight", "weight_scale", "weight_scale_2", "comfy_quant", "input_scale", "bias")}
    proj = layers["blocks.0.attn.proj"]
    assert proj.format == "nvfp4-w4a16" and proj.full_precision_matrix_mult and proj.input_scale is None
    fc1 = layers["blocks.0.mlp.fc1"]
    assert fc1.format == "fp8" and fc1.shape == (128, 64) and fc1.params == 128 * 64
    assert fc1.input_scale == pytest.approx(0.01)
    assert layers["blocks.0.mlp.fc2"].format == "fp16"
    assert layers["img_in"].format == "bf16" and layers["img_in"].params == 64 * 32 + 64
    # parameters that are not `.weight` are their own layer, never a pseudo-layer summing a subtree
    assert layers["blocks.0.modulation"].keys == ["blocks.0.modulation"]
    assert layers["blocks.0.modulation"].shape == (1, 6, 64) and not layers["blocks.0.modulation"].linear
    assert layers["head.modulation"].params == 128
    assert "head" not in layers and "blocks.0" not in layers
    assert layers["blocks.0.norm.scale"].format == "fp32"
    assert sum(lay.stored_bytes for lay in layers.values()) == _bytes_of(sd, sd)


def _stem(k: str) -> str:
    for s in ("weight_scale_2", "weight_scale", "input_scale", "comfy_quant", "weight", "bias"):
        if k.endswith("." + s):
            return k[: -len(s) - 1]
    return k


def test_tensor_and_info(mixed):
    path, sd = mixed
    with open_checkpoint(path) as ck:
        assert torch.equal(ck.tensor("img_in.weight"), sd["img_in.weight"])
        info = ck.info("blocks.0.attn.qkv.weight")
        assert info.dtype == "U8" and info.shape == (192, 32) and info.file == path
        with pytest.raises(CheckpointError, match="no tensor named"):
            ck.tensor("nope")
        with pytest.raises(CheckpointError, match="no layer named"):
            ck.layer("nope")


def test_header_hash_is_sha256_of_raw_header(mixed):
    path, _ = mixed
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    with open_checkpoint(path) as ck:
        assert ck.header_hash() == hashlib.sha256(raw[: 8 + n]).hexdigest()


def test_nvfp4_padded_shapes(tmp_path):
    sd = {}
    sd.update(nvfp4_layer("odd_bias", _w(100, 72)))  # bias pins out=100; in is padded to 80
    sd.update(nvfp4_layer("odd_nobias", _w(100, 72), bias=False))
    sd.update(nvfp4_layer("orig", _w(100, 72), bias=False, extra={"orig_shape": [100, 72]}))
    sd.update(nvfp4_layer("even", _w(384, 128), bias=False))
    path = tmp_path / "pad.safetensors"
    save_file(sd, str(path))
    with open_checkpoint(path) as ck:
        layers = ck.layers()
    assert layers["odd_bias"].shape == (100, 80) and layers["odd_bias"].shape_padded
    assert layers["odd_bias"].params == 100 * 80 + 100
    assert layers["odd_nobias"].shape == (112, 80)  # not recoverable from the header (documented)
    assert layers["orig"].shape == (100, 72) and not layers["orig"].shape_padded
    assert layers["even"].shape == (384, 128) and not layers["even"].shape_padded
    assert layers["even"].params == 384 * 128


# -- header metadata, legacy -----------------------------------------------------------------------------------------
def _header_only(sd: dict[str, torch.Tensor], names_prefix: str = "") -> tuple[dict, str]:
    layers, out = {}, {}
    for k, v in sd.items():
        if k.endswith(".comfy_quant"):
            layers[names_prefix + k[: -len(".comfy_quant")]] = json.loads(bytes(v.tolist()))
        else:
            out[k] = v
    return out, json.dumps({"format_version": "1.0", "layers": layers})


@pytest.mark.parametrize("header_prefix", ["", "model.diffusion_model."])
def test_header_only_quantization_metadata(tmp_path, header_prefix):
    sd, qmeta = _header_only(mixed_state_dict(), header_prefix)
    path = tmp_path / "hdr.safetensors"
    save_file(sd, str(path), metadata={"_quantization_metadata": qmeta})
    with open_checkpoint(path) as ck:
        layers = ck.layers()
    assert layers["blocks.0.attn.qkv"].format == "nvfp4"
    assert layers["blocks.0.attn.qkv"].quant_source == "header"
    assert layers["blocks.0.attn.proj"].format == "nvfp4-w4a16"
    assert layers["blocks.0.mlp.fc1"].format == "fp8"
    assert layers["img_in"].format == "bf16"


def test_tensor_and_header_agree_or_error(tmp_path):
    sd = mixed_state_dict()
    _, qmeta = _header_only(sd)
    ok = tmp_path / "ok.safetensors"
    save_file(sd, str(ok), metadata={"_quantization_metadata": qmeta})
    with open_checkpoint(ok) as ck:
        assert ck.layers()["blocks.0.attn.proj"].format == "nvfp4-w4a16"
    conf = json.loads(qmeta)
    conf["layers"]["blocks.0.attn.proj"] = {"format": "nvfp4"}  # header says W4A4, tensor says W4A16
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={"_quantization_metadata": json.dumps(conf)})
    with open_checkpoint(bad) as ck, pytest.raises(CheckpointError, match="blocks.0.attn.proj.*disagrees"):
        ck.layers()


def test_corrupt_quantization_metadata(tmp_path):
    sd = mixed_state_dict()
    for meta, match in [("{not json", "not valid JSON"), ('{"format_version": "1.0"}', "no \"layers\"")]:
        path = tmp_path / "c.safetensors"
        save_file(sd, str(path), metadata={"_quantization_metadata": meta})
        with open_checkpoint(path) as ck, pytest.raises(CheckpointError, match=match):
            ck.layers()
    path = tmp_path / "m.safetensors"
    sd["blocks.0.attn.qkv.comfy_quant"] = torch.tensor(list(b"nope"), dtype=torch.uint8)
    save_file(sd, str(path))
    with open_checkpoint(path) as ck, pytest.raises(CheckpointError, match="blocks.0.attn.qkv"):
        ck.layers()


def _legacy_sd(marker_elems: int, scale_input: float) -> dict[str, torch.Tensor]:
    w = _w(32, 64)
    scale = (w.float().abs().amax() / 448).reshape(())
    return {
        "scaled_fp8": torch.zeros(marker_elems, dtype=torch.float8_e4m3fn),
        "a.weight": (w.float() / scale).to(torch.float8_e4m3fn),
        "a.scale_weight": scale,
        "a.scale_input": torch.tensor(scale_input),
        "a.bias": torch.zeros(32, dtype=torch.bfloat16),
        "b.weight": _w(32, 32),
    }


@pytest.mark.parametrize("elems,fpmm", [(1, False), (2, True)])
def test_legacy_scaled_fp8(tmp_path, elems, fpmm):
    path = tmp_path / "legacy.safetensors"
    save_file(_legacy_sd(elems, 1.0), str(path))
    with open_checkpoint(path) as ck:
        layers = ck.layers()
        assert "scaled_fp8" not in layers and "scaled_fp8" in ck.names()
    a = layers["a"]
    assert a.format == "fp8" and a.full_precision_matrix_mult is fpmm and a.quant_source == "legacy"
    assert a.input_scale is None  # a 1.0 scale_input is dropped, as ComfyUI does
    assert set(a.keys) == {"a.weight", "a.scale_weight", "a.scale_input", "a.bias"}
    assert a.params == 32 * 64 + 32
    assert layers["b"].format == "bf16"

    path2 = tmp_path / "legacy2.safetensors"
    save_file(_legacy_sd(elems, 0.5), str(path2))
    with open_checkpoint(path2) as ck:
        assert ck.layers()["a"].input_scale == 0.5


def test_legacy_marker_ignored_when_header_present(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file(_legacy_sd(1, 1.0), str(path),
              metadata={"_quantization_metadata": json.dumps({"layers": {"b": {"format": "float8_e4m3fn"}}})})
    with open_checkpoint(path) as ck:
        layers = ck.layers()
    assert layers["a"].quant_source is None and layers["a"].format == "fp8"  # plain fp8 weight, not legacy-scaled
    assert layers["b"].format == "fp8" and layers["b"].quant_source == "header"


# -- prefixes ------------------------------------------------------------------------------------------------------
def test_prefixed_full_checkpoint(tmp_path):
    sd = mixed_state_dict()
    full = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    full["first_stage_model.decoder.conv.weight"] = torch.zeros(4, 4, 3, 3)
    full["cond_stage_model.t5.weight"] = torch.zeros(8, 8)
    path = tmp_path / "full.safetensors"
    save_file(full, str(path))
    with open_checkpoint(path) as ck:
        assert ck.prefix == "model.diffusion_model."
        assert set(ck.names()) == set(sd)
        assert torch.equal(ck.tensor("img_in.weight"), sd["img_in.weight"])
        layers = ck.layers()
        assert layers["blocks.0.attn.qkv"].format == "nvfp4"
        notes = " ".join(ck.notes)
    assert "prefix" in notes and "first_stage_model." in notes and "cond_stage_model." in notes


# -- sharded and folders ---------------------------------------------------------------------------------------------
def _sharded(tmp_path: Path, sd: dict[str, torch.Tensor], index_meta: dict | None = None,
             shard_meta: dict | None = None) -> Path:
    keys = list(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname), metadata=shard_meta)
        weight_map.update({k: fname for k in ks})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": index_meta or {"total_size": 123}, "weight_map": weight_map}))
    return index


def test_sharded_index(tmp_path):
    sd = mixed_state_dict()
    sd_noq, qmeta = _header_only(sd)
    index = _sharded(tmp_path, sd_noq, index_meta={"total_size": 1, "_quantization_metadata": json.loads(qmeta)},
                     shard_meta={"config": "c"})
    with open_checkpoint(index) as ck:
        assert ck.kind == "sharded" and len(ck.files) == 2
        expected = [n for f in ck.files for n in read_header(f)[0]]
        assert ck.names() == expected and set(expected) == set(sd_noq)  # shard order, then header order
        assert ck.metadata["config"] == "c" and ck.metadata["total_size"] == "1"
        layers = ck.layers()  # the index's _quantization_metadata is a JSON object, not a string
        assert layers["blocks.0.attn.proj"].format == "nvfp4-w4a16"
        assert torch.equal(ck.tensor("head.head.weight"), sd["head.head.weight"])
        h1 = ck.header_hash()
    raw = b"".join(_raw_header(p) for p in sorted(tmp_path.glob("*.safetensors")))
    assert h1 == hashlib.sha256(raw).hexdigest()
    with open_checkpoint(tmp_path) as ck:  # the folder finds its index
        assert ck.kind == "sharded" and ck.header_hash() == h1


def _raw_header(p: Path) -> bytes:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + n]


def test_sharded_errors(tmp_path):
    sd = mixed_state_dict()
    index = _sharded(tmp_path, sd)
    shard2 = tmp_path / "model-00002-of-00002.safetensors"
    data = shard2.read_bytes()

    shard2.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*truncated"):
        open_checkpoint(index)
    shard2.unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        open_checkpoint(index)
    shard2.write_bytes(data)

    obj = json.loads(index.read_text())
    obj["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(obj))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        open_checkpoint(index)

    index.write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(index)
    index.write_text(json.dumps({"foo": 1}))
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        open_checkpoint(index)


def test_folder_rules(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    save_file({"a.weight": torch.zeros(2, 2)}, str(one / "m.safetensors"))
    (one / "readme.txt").write_text("x")
    with open_checkpoint(one) as ck:
        assert ck.kind == "safetensors" and ck.names() == ["a.weight"]

    two = tmp_path / "two"
    two.mkdir()
    for n in ("x.safetensors", "y.safetensors"):
        save_file({"a.weight": torch.zeros(2, 2)}, str(two / n))
    with pytest.raises(CheckpointError, match="x.safetensors, y.safetensors"):
        open_checkpoint(two)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    with pytest.raises(CheckpointError, match="no model here.*notes.md"):
        open_checkpoint(empty)

    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip (torch .ckpt)
    with pytest.raises(CheckpointError, match="model.ckpt"):
        open_checkpoint(p)


# -- GGUF ----------------------------------------------------------------------------------------------------------
def _write_gguf(path: Path) -> dict[str, np.ndarray]:
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    arrays = {
        "img_in.weight": rng.standard_normal((48, 32)).astype(np.float16),
        "img_in.bias": rng.standard_normal(48).astype(np.float32),
        "blocks.0.attn.qkv.weight": rng.standard_normal((96, 64)).astype(np.float32),
        "blocks.0.mlp.fc1.weight": rng.standard_normal((128, 64)).astype(np.float32),
        "conv.weight": rng.standard_normal((16, 4, 2, 2)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_tensor("img_in.weight", arrays["img_in.weight"])
    w.add_tensor("img_in.bias", arrays["img_in.bias"])
    q8 = quantize(arrays["blocks.0.attn.qkv.weight"], gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blocks.0.attn.qkv.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    q4 = quantize(arrays["blocks.0.mlp.fc1.weight"], gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("blocks.0.mlp.fc1.weight", q4, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    # ComfyUI-GGUF stores some tensors flattened with their real shape in comfy.gguf.orig_shape.<name>
    w.add_tensor("conv.weight", arrays["conv.weight"].reshape(16, 16))
    w.add_array("comfy.gguf.orig_shape.conv.weight", [16, 4, 2, 2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arrays


def test_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    arrays = _write_gguf(path)
    with open_checkpoint(path) as ck:
        assert ck.kind == "gguf" and ck.prefix == ""
        assert ck.metadata.get("general.architecture") == "flux"
        assert ck.names() == list(arrays)
        qkv = ck.info("blocks.0.attn.qkv.weight")
        assert qkv.dtype == "gguf:Q8_0" and qkv.shape == (96, 64)  # logical (out, in), not GGUF's reversed dims
        assert ck.info("img_in.weight").dtype == "gguf:F16" and ck.info("img_in.weight").shape == (48, 32)
        assert ck.info("conv.weight").shape == (16, 4, 2, 2)
        layers = ck.layers()
        assert layers["blocks.0.attn.qkv"].format == "gguf:Q8_0" and layers["blocks.0.attn.qkv"].linear
        assert layers["blocks.0.mlp.fc1"].format == "gguf:Q4_0"
        assert layers["blocks.0.attn.qkv"].params == 96 * 64
        assert layers["blocks.0.attn.qkv"].stored_bytes == 96 * 64 // 32 * 34
        assert layers["img_in"].params == 48 * 32 + 48
        assert np.array_equal(ck.tensor("img_in.weight").numpy(), arrays["img_in.weight"])
        assert np.array_equal(ck.tensor("conv.weight").numpy(), arrays["conv.weight"])
        with pytest.raises(CheckpointError, match="Q8_0.*only guide"):
            ck.tensor("blocks.0.attn.qkv.weight")
        with pytest.raises(CheckpointError, match="only guide"):
            ck.dequantized_weight("blocks.0.mlp.fc1")
        assert torch.equal(ck.dequantized_weight("img_in"), torch.from_numpy(arrays["img_in.weight"]).float())
        raw = path.read_bytes()
        assert len(ck.header_hash()) == 64
    with open_checkpoint(tmp_path) as ck:  # a folder with one .gguf
        assert ck.kind == "gguf"
    assert raw[:4] == b"GGUF"


def test_gguf_corrupt(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(CheckpointError, match="bad.gguf.*GGUF"):
        open_checkpoint(p)


# -- dequantization ------------------------------------------------------------------------------------------------
def _module_or_skip(name: str, attr: str):
    try:
        mod = importlib.import_module(f"nvfp4_lab.quant.{name}")
    except ImportError:
        pytest.skip(f"quant/{name}.py is not written yet")
    if not hasattr(mod, attr):
        pytest.skip(f"quant/{name}.py has no {attr} yet")
    return mod


def test_dequantize_plain_and_plain_fp8(mixed, tmp_path):
    path, sd = mixed
    with open_checkpoint(path) as ck:
        assert torch.equal(ck.dequantized_weight("img_in"), sd["img_in.weight"].float())
        assert ck.dequantized_weight("blocks.0.mlp.fc2", torch.float16).dtype == torch.float16
    p = tmp_path / "fp8plain.safetensors"
    w = _w(16, 16).to(torch.float8_e4m3fn)
    save_file({"a.weight": w}, str(p))
    with open_checkpoint(p) as ck:
        assert ck.layers()["a"].format == "fp8"
        assert torch.equal(ck.dequantized_weight("a"), w.float())


def test_dequantize_nvfp4_matches_kitchen(tmp_path):
    _module_or_skip("nvfp4", "dequantize")
    import comfy_kitchen as ck_

    w = _w(100, 72, 7)
    sd = nvfp4_layer("l", w, bias=False, extra={"orig_shape": [100, 72]})
    path = tmp_path / "n.safetensors"
    save_file(sd, str(path))
    ref = ck_.dequantize_nvfp4(sd["l.weight"], sd["l.weight_scale_2"], sd["l.weight_scale"], torch.float32)[:100, :72]
    with open_checkpoint(path) as ck:
        got = ck.dequantized_weight("l")
    assert got.shape == (100, 72) and torch.equal(got, ref)


def test_dequantize_fp8_and_legacy(tmp_path):
    _module_or_skip("fp8", "dequantize_fp8")
    w = _w(32, 64)
    sd = fp8_layer("f", w)
    sd.update({k.replace("a.", "g."): v for k, v in _legacy_sd(1, 1.0).items() if k.startswith("a.")})
    path = tmp_path / "f.safetensors"
    save_file(sd, str(path))
    with open_checkpoint(path) as ck:
        got = ck.dequantized_weight("f")
        assert torch.allclose(got, sd["f.weight"].float() * sd["f.weight_scale"])
    legacy = tmp_path / "legacy.safetensors"
    lsd = _legacy_sd(1, 1.0)
    save_file(lsd, str(legacy))
    with open_checkpoint(legacy) as ck:
        assert torch.allclose(ck.dequantized_weight("a"), lsd["a.weight"].float() * lsd["a.scale_weight"])


def test_concurrent_reads_open_each_file_once(tmp_path, monkeypatch):
    """The converter's prefetch thread and the writer read the same shard at once: one handle per file, no leak."""
    import threading
    import time

    from nvfp4_lab.quant import checkpoint as ckmod

    src = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.ones(4, 4), "b.weight": torch.zeros(4, 4)}, str(src))
    opened = []
    real_open = open

    def slow_open(*a, **k):
        time.sleep(0.05)  # widen the window between "no handle yet" and storing the new one
        fh = real_open(*a, **k)
        opened.append(fh)
        return fh

    monkeypatch.setattr(ckmod, "open", slow_open, raising=False)
    with open_checkpoint(src) as ckpt:
        opened.clear()  # open_checkpoint itself peeks at the file's magic bytes
        threads = [threading.Thread(target=ckpt.tensor, args=(n,)) for n in ("a.weight", "b.weight")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(opened) == 1
    assert all(fh.closed for fh in opened)
