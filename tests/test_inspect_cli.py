"""inspect (rows, totals, filter, compare, table) and the `nvfp4` CLI: `layers`, errors, exit codes, --version."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nvfp4_lab.cli import main as cli_main
from nvfp4_lab.cli.common import human_bytes
from nvfp4_lab.quant import inspect
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.errors import NVFP4Error

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpoint import _sharded, _write_gguf, mixed_state_dict  # noqa: E402

REQUIRED_KEYS = {"name", "format", "shape", "params", "bytes", "input_scale", "full_precision_matrix_mult"}


@pytest.fixture()
def mixed(tmp_path) -> Path:
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_state_dict(), str(path))
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- inspect -------------------------------------------------------------------------------------------------------
def test_rows_totals_filter(mixed):
    with open_checkpoint(mixed) as ck:
        rows = inspect.rows(ck)
    assert all(REQUIRED_KEYS <= set(r) for r in rows)
    by = {r["name"]: r for r in rows}
    assert by["blocks.0.attn.qkv"]["format"] == "nvfp4" and by["blocks.0.attn.qkv"]["shape"] == [192, 64]
    assert by["blocks.0.attn.qkv"]["params"] == 192 * 64 + 192
    tot = inspect.totals(rows)
    assert list(tot)[-1] == "total"
    assert tot["nvfp4"]["layers"] == 1 and tot["nvfp4-w4a16"]["layers"] == 1 and tot["fp8"]["layers"] == 1
    assert tot["total"]["bytes"] == sum(r["bytes"] for r in rows) == mixed.stat().st_size - _header_len(mixed)
    assert tot["total"]["params"] == sum(r["params"] for r in rows)
    assert {r["name"] for r in inspect.filter_rows(rows, r"attn\.")} == {"blocks.0.attn.qkv", "blocks.0.attn.proj"}
    assert {r["name"] for r in inspect.filter_rows(rows, None, ["fp8", "fp16"])} == {"blocks.0.mlp.fc1",
                                                                                     "blocks.0.mlp.fc2"}
    with pytest.raises(NVFP4Error, match="invalid regular expression"):
        inspect.filter_rows(rows, "blocks.[")
    assert inspect.sort_rows(rows, "size")[0]["bytes"] == max(r["bytes"] for r in rows)
    assert inspect.sort_rows(rows, "params")[0]["name"] == "blocks.0.attn.qkv"
    assert [r["name"] for r in inspect.sort_rows(rows, "name")] == sorted(by)
    table = inspect.render_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "format", "shape"]
    assert len({line.index("format") if i == 0 else None for i, line in enumerate(lines)} - {None}) == 1
    assert "192x64" in table and "KiB" in table
    assert "nvfp4-w4a16" in inspect.render_totals(tot)


def _header_len(p: Path) -> int:
    return 8 + int.from_bytes(p.read_bytes()[:8], "little")


def test_nonfinite_input_scale_is_null_with_flag():
    class L:
        name, format, shape, params, stored_bytes = "x", "nvfp4", (16, 16), 256, 200
        input_scale, full_precision_matrix_mult = float("nan"), False

    (row,) = inspect.rows_from_layers([L()])
    assert row["input_scale"] is None and row["input_scale_nonfinite"] is True
    json.dumps(row, allow_nan=False)


def test_compare_rows():
    a = [{"name": n, "format": f, "bytes": 1, "params": 1} for n, f in [("x", "bf16"), ("y", "bf16"), ("z", "bf16")]]
    b = [{"name": n, "format": f, "bytes": 1, "params": 1} for n, f in [("x", "bf16"), ("y", "nvfp4"), ("w", "fp8")]]
    diffs = inspect.compare(a, b)
    assert [(d["name"], d["change"], d["a_format"], d["b_format"]) for d in diffs] == [
        ("y", "format", "bf16", "nvfp4"), ("z", "only_a", "bf16", None), ("w", "only_b", None, "fp8")]
    text = inspect.render_compare(diffs, a, b)
    assert "1 layer(s) same format, 1 changed, 1 only in A, 1 only in B" in text


def test_human_bytes():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(5 * 2**30) == "5.00 GiB"
    assert human_bytes(300 * 2**20) == "300.0 MiB"


# -- CLI -----------------------------------------------------------------------------------------------------------
def test_layers_json(mixed, capsys):
    rc, out, err = run(["layers", mixed, "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)
    assert isinstance(rows, list) and all(REQUIRED_KEYS <= set(r) for r in rows)
    by = {r["name"]: r for r in rows}
    assert by["blocks.0.attn.qkv"]["input_scale"] == pytest.approx(0.002)
    assert by["blocks.0.attn.proj"]["full_precision_matrix_mult"] is True
    assert by["img_in"]["input_scale"] is None


def test_layers_table_filter_format_sort(mixed, capsys):
    rc, out, _ = run(["layers", mixed], capsys)
    assert rc == 0 and "blocks.0.attn.qkv" in out and "total" in out
    rc, out, _ = run(["layers", mixed, "--filter", r"mlp", "--sort", "size", "--json"], capsys)
    assert rc == 0 and [r["name"] for r in json.loads(out)] == ["blocks.0.mlp.fc2", "blocks.0.mlp.fc1"]
    rc, out, _ = run(["layers", mixed, "--format", "nvfp4,nvfp4-w4a16", "--json"], capsys)
    assert rc == 0 and {r["format"] for r in json.loads(out)} == {"nvfp4", "nvfp4-w4a16"}
    rc, out, err = run(["layers", mixed, "--format", "nvfp5"], capsys)
    assert rc == 1 and err.startswith("error: unknown format 'nvfp5'")


def test_layers_compare(tmp_path, mixed, capsys):
    sd = mixed_state_dict()
    plain = {}
    for k, v in sd.items():
        if k.startswith(("blocks.0.attn.", "blocks.0.mlp.fc1")):
            continue
        plain[k] = v
    plain["blocks.0.attn.qkv.weight"] = torch.zeros(192, 64, dtype=torch.bfloat16)
    plain["extra.weight"] = torch.zeros(4, 4)
    b = tmp_path / "b.safetensors"
    save_file(plain, str(b))
    rc, out, _ = run(["layers", b, "--compare", mixed, "--json"], capsys)
    assert rc == 0
    diffs = {d["name"]: d for d in json.loads(out)}
    assert diffs["blocks.0.attn.qkv"]["change"] == "format"
    assert (diffs["blocks.0.attn.qkv"]["a_format"], diffs["blocks.0.attn.qkv"]["b_format"]) == ("bf16", "nvfp4")
    assert diffs["extra"]["change"] == "only_a"
    assert diffs["blocks.0.attn.proj"]["change"] == "only_b"
    assert "img_in" not in diffs
    rc, out, _ = run(["layers", b, "--compare", mixed], capsys)
    assert rc == 0 and "only in B" in out and "changed" in out


def test_layers_gguf_and_sharded(tmp_path, capsys):
    g = tmp_path / "m.gguf"
    _write_gguf(g)
    rc, out, err = run(["layers", g, "--json"], capsys)
    assert rc == 0, err
    by = {r["name"]: r for r in json.loads(out)}
    assert by["blocks.0.attn.qkv"]["format"] == "gguf:Q8_0" and by["blocks.0.attn.qkv"]["shape"] == [96, 64]
    rc, out, _ = run(["layers", g, "--format", "gguf:Q4_0", "--json"], capsys)
    assert [r["name"] for r in json.loads(out)] == ["blocks.0.mlp.fc1"]

    folder = tmp_path / "sharded"
    folder.mkdir()
    _sharded(folder, mixed_state_dict())
    single = tmp_path / "single.safetensors"
    save_file(mixed_state_dict(), str(single))
    rc, out, err = run(["layers", folder, "--json"], capsys)
    assert rc == 0, err
    rc2, out2, _ = run(["layers", single, "--json"], capsys)
    key = lambda r: r["name"]  # noqa: E731
    assert sorted(json.loads(out), key=key) == sorted(json.loads(out2), key=key)
    rc, out, _ = run(["layers", folder / "model.safetensors.index.json", "--compare", single, "--json"], capsys)
    assert rc == 0 and json.loads(out) == []


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "missing.safetensors", "no such file"),
        (lambda d: (d / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}      ")
         and d / "bad.safetensors", "not valid JSON"),
        (lambda d: (d / "big.safetensors").write_bytes(b"\xff" * 16) and d / "big.safetensors", "absurd"),
        (lambda d: d, "no model here"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, make, match):
    path = make(tmp_path)
    rc, out, err = run(["layers", path], capsys)
    assert rc == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]
    assert "Traceback" not in err


def test_debug_shows_traceback(tmp_path, capsys):
    rc, _, err = run(["layers", tmp_path / "missing.safetensors", "--debug"], capsys)
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")
    rc, _, err = run(["--debug", "layers", tmp_path / "missing.safetensors"], capsys)
    assert rc == 1 and "Traceback" in err


def test_invalid_regex_and_usage(mixed, capsys):
    rc, _, err = run(["layers", mixed, "--filter", "a("], capsys)
    assert rc == 1 and err.startswith("error: invalid regular expression") and "Traceback" not in err
    rc, _, err = run(["layers"], capsys)
    assert rc == 2 and "usage:" in err
    rc, _, err = run(["layers", mixed, "--sort", "bogus"], capsys)
    assert rc == 2
    rc, _, err = run(["frobnicate"], capsys)
    assert rc == 2


def test_version_and_help(capsys):
    from nvfp4_lab import __version__

    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"nvfp4 {__version__}"
    rc, out, _ = run([], capsys)
    assert rc == 0 and "usage: nvfp4" in out and "layers" in out
    rc, out, _ = run(["layers", "--help"], capsys)
    assert rc == 0 and "--compare" in out


def test_commands_registry():
    assert "layers" in cli_main.COMMANDS
    parser = cli_main.build_parser()
    args = parser.parse_args(["layers", "x.safetensors"])
    assert callable(args.func) and args.debug is False


# -- with ComfyUI's own quantizer ------------------------------------------------------------------------------------
def _comfy_mixed_state_dict() -> dict[str, torch.Tensor]:
    """NVFP4 (W4A4 + W4A16 + input_scale), FP8 and bf16 layers, quantized by ComfyUI's own layouts (§7.5)."""
    from comfy.quant_ops import QuantizedTensor, TensorCoreFP8E4M3Layout, TensorCoreNVFP4Layout

    def marker(conf: dict) -> torch.Tensor:
        return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)

    g = torch.Generator().manual_seed(0)

    def w(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) * 0.05).to(torch.bfloat16)

    sd: dict[str, torch.Tensor] = {}
    for name, (o, i), conf in [
        ("double_blocks.0.img_attn.qkv", (384, 128), {"format": "nvfp4"}),
        ("double_blocks.0.img_mlp.0", (512, 128), {"format": "nvfp4"}),
        ("single_blocks.0.linear2", (128, 640), {"format": "nvfp4", "full_precision_matrix_mult": True}),
    ]:
        qdata, params = TensorCoreNVFP4Layout.quantize(w(o, i))
        sd.update(QuantizedTensor(qdata, "TensorCoreNVFP4Layout", params).state_dict(name + ".weight"))
        sd[name + ".comfy_quant"] = marker(conf)
        sd[name + ".bias"] = torch.zeros(o, dtype=torch.bfloat16)
    sd["double_blocks.0.img_attn.qkv.input_scale"] = torch.tensor(0.0125, dtype=torch.float32)
    qdata, params = TensorCoreFP8E4M3Layout.quantize(w(128, 512), scale="recalculate")
    sd.update(QuantizedTensor(qdata, "TensorCoreFP8E4M3Layout", params).state_dict("double_blocks.0.img_mlp.2.weight"))
    sd["double_blocks.0.img_mlp.2.comfy_quant"] = marker({"format": "float8_e4m3fn"})
    sd["img_in.weight"] = w(128, 64)
    sd["img_in.bias"] = torch.zeros(128, dtype=torch.bfloat16)
    sd["final_layer.linear.weight"] = w(64, 128)
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.mark.comfyui
def test_layers_json_on_comfyui_quantized_file(comfy, tmp_path, capsys):
    out_file = tmp_path / "comfy_mixed.safetensors"
    save_file(_comfy_mixed_state_dict(), str(out_file))

    rc, out, err = run(["layers", out_file, "--json"], capsys)
    assert rc == 0, err
    by = {r["name"]: r for r in json.loads(out)}
    assert len(by) == 6
    qkv = by["double_blocks.0.img_attn.qkv"]
    assert qkv["format"] == "nvfp4" and qkv["shape"] == [384, 128] and qkv["params"] == 384 * 128 + 384
    assert qkv["input_scale"] == pytest.approx(0.0125)
    assert qkv["full_precision_matrix_mult"] is False
    # weight (384 x 64 codes) + swizzled scales (384 x 8) + weight_scale_2 + input_scale + marker + bf16 bias
    assert qkv["bytes"] == 384 * 64 + 384 * 8 + 4 + 4 + len('{"format": "nvfp4"}') + 384 * 2
    l2 = by["single_blocks.0.linear2"]
    assert l2["format"] == "nvfp4-w4a16" and l2["full_precision_matrix_mult"] is True and l2["shape"] == [128, 640]
    assert l2["input_scale"] is None
    fp8 = by["double_blocks.0.img_mlp.2"]
    assert fp8["format"] == "fp8" and fp8["shape"] == [128, 512] and fp8["full_precision_matrix_mult"] is False
    assert by["img_in"]["format"] == "bf16" and by["final_layer.linear"]["params"] == 64 * 128
    assert all(r["shape_padded"] is False for r in by.values())

    rc, out, _ = run(["layers", out_file], capsys)  # the table and totals too
    assert rc == 0 and "nvfp4-w4a16" in out and "fp8" in out and "total" in out
