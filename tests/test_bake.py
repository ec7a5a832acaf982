"""Baking calibrated input scales: only `input_scale` tensors change; unmatched layers are reported."""

from __future__ import annotations

import math

import numpy as np
import pytest
import safetensors.torch
import torch

from nvfp4_lab.calibration.store import CalibrationStore
from nvfp4_lab.cli.main import main as cli_main
from nvfp4_lab.quant import formats
from nvfp4_lab.quant.bake import bake_input_scales
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.convert import convert
from nvfp4_lab.quant.errors import CheckpointError
from nvfp4_lab.quant.rules import PlanOptions, build_plan
from nvfp4_lab.quant.tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def nvfp4_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake")
    src = write_tiny_model("flux", d / "src.safetensors", depth=4, depth_single=6, hidden=256)
    with open_checkpoint(src) as ckpt:
        plan = build_plan(ckpt, PlanOptions(fp8=[r"double_blocks\.1\.img_mlp\.0"]))
    out = d / "nvfp4.safetensors"
    convert(src, out, plan, progress=False)
    return out, plan


def test_bake_writes_only_input_scales(nvfp4_file, tmp_path):
    src, plan = nvfp4_file
    nv = [n for n, d in plan.layers.items() if d.format == formats.NVFP4]
    f8 = [n for n, d in plan.layers.items() if d.format == formats.FP8]
    amax = {nv[0]: 5.376, nv[1]: 2.0, f8[0]: 44.8, "img_in": 3.0, "no.such.layer": 1.0}
    report = bake_input_scales(src, tmp_path / "baked.safetensors", amax)
    assert math.isclose(report.baked[nv[0]], 5.376 / 2688, rel_tol=1e-9)
    assert math.isclose(report.baked[f8[0]], 44.8 / 448, rel_tol=1e-9)  # FP8: amax / 448
    assert set(report.unmatched_scales) == {"img_in", "no.such.layer"}  # bf16 layer and unknown name
    assert set(report.without_scale) == set(nv[2:])
    before = safetensors.torch.load_file(str(src))
    after = safetensors.torch.load_file(str(tmp_path / "baked.safetensors"))
    added = set(after) - set(before)
    assert added == {f"{n}.input_scale" for n in (nv[0], nv[1], f8[0])}
    for key, value in before.items():
        assert torch.equal(value.reshape(-1).view(torch.uint8), after[key].reshape(-1).view(torch.uint8)), key
    with open_checkpoint(tmp_path / "baked.safetensors") as ckpt:
        assert math.isclose(ckpt.layers()[nv[1]].input_scale, 2.0 / 2688, rel_tol=1e-6)
        assert ckpt.metadata["_quantization_metadata"] == safetensors.safe_open(str(src), "pt").metadata()[
            "_quantization_metadata"]


def test_bake_refuses_bad_values_and_same_path(nvfp4_file, tmp_path):
    src, plan = nvfp4_file
    nv = next(n for n, d in plan.layers.items() if d.format == formats.NVFP4)
    with pytest.raises(CheckpointError, match="positive"):
        bake_input_scales(src, tmp_path / "x.safetensors", {nv: 0.0})
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(CheckpointError, match="same file"):
        bake_input_scales(src, src, {nv: 1.0})


def test_cli_bake_from_a_store(nvfp4_file, tmp_path, capsys):
    src, plan = nvfp4_file
    nv = [n for n, d in plan.layers.items() if d.format == formats.NVFP4]
    store = CalibrationStore()
    rng = np.random.default_rng(0)
    for layer in nv:
        store.record(layer, rng.uniform(1.0, 4.0, size=200))
    store_path = tmp_path / "session.json"
    store.save(store_path)
    out = tmp_path / "baked_cli.safetensors"
    assert cli_main(["calib", "bake", str(src), str(store_path), "-o", str(out), "--method", "max",
                     "--margin", "1.0"]) == 0
    assert f"baked {len(nv)} input_scale" in capsys.readouterr().out
    with open_checkpoint(out) as ckpt:
        layers = ckpt.layers()
        for layer in nv:
            expected = float(store.layers[layer].max) / 2688
            assert math.isclose(layers[layer].input_scale, expected, rel_tol=1e-6), layer


def test_bake_does_not_call_already_scaled_layers_dynamic(nvfp4_file, tmp_path):
    """Re-baking one layer: layers that keep the input_scale they already had are not reported as dynamic."""
    src, plan = nvfp4_file
    nv = [n for n, d in plan.layers.items() if d.format == formats.NVFP4]
    first = bake_input_scales(src, tmp_path / "a.safetensors", {nv[0]: 5.376, nv[1]: 2.0})
    assert set(first.without_scale) == set(nv[2:])
    second = bake_input_scales(tmp_path / "a.safetensors", tmp_path / "b.safetensors", {nv[2]: 3.0})
    assert set(second.without_scale) == set(nv[3:])
