"""The converter: bytes equal ComfyUI's own quantizer, protected layers stay, files load and sample in stock
ComfyUI, quantized sources are re-quantized, bad input leaves nothing behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

from nvfp4_lab.cli.main import main as cli_main
from nvfp4_lab.quant import formats, fp8
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.convert import convert
from nvfp4_lab.quant.errors import CheckpointError, NVFP4Error
from nvfp4_lab.quant.plan import Plan
from nvfp4_lab.quant.rules import PlanOptions, build_plan
from nvfp4_lab.quant.tiny_models import write_tiny_model

FLUX_KW = {"depth": 4, "depth_single": 6, "hidden": 256}
WAN_KW = {"num_layers": 6, "dim": 256, "ffn_dim": 512}


def _plan(path, **options) -> Plan:
    with open_checkpoint(path) as ckpt:
        return build_plan(ckpt, PlanOptions(**options))


@pytest.fixture(scope="module")
def flux_src(tmp_path_factory):
    return write_tiny_model("flux", tmp_path_factory.mktemp("src") / "tiny_flux.safetensors", **FLUX_KW)


@pytest.fixture(scope="module")
def wan_src(tmp_path_factory):
    return write_tiny_model("wan", tmp_path_factory.mktemp("src") / "tiny_wan.safetensors", **WAN_KW)


@pytest.fixture(scope="module")
def flux_out(flux_src, tmp_path_factory):
    plan = _plan(flux_src, fp8=[r"double_blocks\.1\.img_mlp\.0"], w4a16=[r"single_blocks\.2\.linear2"])
    out = tmp_path_factory.mktemp("out") / "tiny_flux_nvfp4.safetensors"
    report = convert(flux_src, out, plan, progress=False)
    return out, plan, report


def test_nvfp4_and_fp8_bytes_equal_comfyui_quantizer(flux_src, flux_out, comfy):
    """Every quantized layer holds exactly the bytes ComfyUI's own layouts produce for the source weight."""
    from comfy.quant_ops import QuantizedTensor, TensorCoreFP8E4M3Layout, TensorCoreNVFP4Layout

    out, plan, _ = flux_out
    src = safetensors.torch.load_file(str(flux_src))
    got = safetensors.torch.load_file(str(out))
    checked = {formats.NVFP4: 0, formats.NVFP4_W4A16: 0, formats.FP8: 0}
    for name, dec in plan.layers.items():
        if dec.format not in checked:
            continue
        if formats.is_nvfp4(dec.format):
            layout, kwargs = TensorCoreNVFP4Layout, {}
        else:  # ComfyUI computes an FP8 weight scale only with "recalculate" (its LoRA/requantize path)
            layout, kwargs = TensorCoreFP8E4M3Layout, {"scale": "recalculate"}
        qdata, params = layout.quantize(src[name + ".weight"], **kwargs)
        ref = QuantizedTensor(qdata, layout.__name__, params).state_dict(name + ".weight")
        for key, value in ref.items():
            mine = got[key]
            assert mine.dtype == value.dtype, key
            assert mine.shape == value.shape, key
            assert torch.equal(mine.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
        assert formats.decode_comfy_quant(got[name + ".comfy_quant"]) == formats.comfy_quant_config(dec.format)
        checked[dec.format] += 1
    assert all(checked.values()), checked


def test_protected_layers_metadata_and_markers(flux_out, flux_src):
    out, plan, report = flux_out
    with open_checkpoint(out) as ckpt, open_checkpoint(flux_src) as src:
        layers = ckpt.layers()
        for name in ("img_in", "txt_in", "final_layer.linear", "time_in.in_layer"):
            assert layers[name].format == formats.BF16, name
        header = json.loads(ckpt.metadata["_quantization_metadata"])["layers"]
        quantized = {n: lay.comfy_quant for n, lay in layers.items() if lay.comfy_quant}
        assert header == quantized  # the header and the per-layer markers agree
        assert set(header) == {n for n, d in plan.layers.items() if d.quantized}
        provenance = json.loads(ckpt.metadata["nvfp4_lab"])
        assert provenance["source"]["file"] == "tiny_flux.safetensors"  # a name, never a local path
        assert os.sep not in json.dumps(provenance["source"]["file"])
        for key, value in src.metadata.items():  # the source's header metadata is kept
            assert ckpt.metadata[key] == value, key
    assert report.verified
    assert all(0.05 < r.rel_rmse < 0.2 for r in report.layers if r.format.startswith("nvfp4"))


def test_wan_config_metadata_survives(wan_src, tmp_path):
    plan = _plan(wan_src)
    out = tmp_path / "wan.safetensors"
    convert(wan_src, out, plan, progress=False)
    with open_checkpoint(wan_src) as src, open_checkpoint(out) as dst:
        assert dst.metadata["config"] == src.metadata["config"]
        assert dst.layers()["head.head"].format == formats.BF16
        assert plan.counts().get(formats.NVFP4, 0) > 0


def test_other_dtype_and_bias_dtype(flux_src, tmp_path):
    plan = _plan(flux_src, other_dtype="fp16")
    out = tmp_path / "fp16.safetensors"
    convert(flux_src, out, plan, progress=False)
    with open_checkpoint(out) as ckpt:
        layers = ckpt.layers()
        nv = next(n for n, d in plan.layers.items() if d.format == formats.NVFP4)
        assert ckpt.info(nv + ".bias").dtype == "F16"
        assert ckpt.info("img_in.weight").dtype == "F16"
        assert layers["img_in"].format == formats.FP16


def test_sharded_source_gives_the_same_file(flux_src, flux_out, tmp_path):
    """A model split into shards + index converts to the same tensors as the single file."""
    out_single, plan, _ = flux_out
    sd = safetensors.torch.load_file(str(flux_src))
    meta = safetensors.safe_open(str(flux_src), "pt").metadata()
    names = list(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    weight_map = {}
    for i, part in enumerate(halves, 1):
        fname = f"model-{i:05d}-of-00002.safetensors"
        safetensors.torch.save_file({n: sd[n] for n in part}, str(shard_dir / fname), metadata=meta)
        weight_map.update({n: fname for n in part})
    index = shard_dir / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "from_shards.safetensors"
    convert(shard_dir, out, plan, progress=False)
    a, b = safetensors.torch.load_file(str(out_single)), safetensors.torch.load_file(str(out))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key


def test_fp8_source_is_requantized_and_nvfp4_source_copied(flux_src, flux_out, tmp_path):
    """FP8 community files convert to NVFP4 (dequantize + requantize); NVFP4 layers are kept byte for byte."""
    sd = safetensors.torch.load_file(str(flux_src))
    meta = safetensors.safe_open(str(flux_src), "pt").metadata()
    plan = _plan(flux_src)
    fp8_sd = dict(sd)
    for name, dec in plan.layers.items():
        if dec.format == formats.NVFP4:
            w8, scale = fp8.quantize_fp8(sd[name + ".weight"])
            fp8_sd[name + ".weight"], fp8_sd[name + ".weight_scale"] = w8, scale
            fp8_sd[name + ".comfy_quant"] = formats.encode_comfy_quant({"format": "float8_e4m3fn"})
    fp8_file = tmp_path / "tiny_flux_fp8.safetensors"
    safetensors.torch.save_file(fp8_sd, str(fp8_file), metadata=meta)
    fp8_plan = _plan(fp8_file)
    assert fp8_plan.counts() == plan.counts()
    out = tmp_path / "fp8_to_nvfp4.safetensors"
    report = convert(fp8_file, out, fp8_plan, progress=False)
    actions = {r.layer: r.action for r in report.layers if r.format == formats.NVFP4}
    assert actions and set(actions.values()) == {"requantized"}
    with open_checkpoint(out) as ckpt:
        for name in actions:
            err = (ckpt.dequantized_weight(name) - sd[name + ".weight"].float()).norm() / sd[name + ".weight"].float().norm()
            assert float(err) < 0.12, name  # fp8 adds little on top of NVFP4's ~0.095

    # Re-converting our own NVFP4 output with a W4A16 flag copies the codes and only changes the marker.
    nv_out, nv_plan, _ = flux_out
    renv = _plan(nv_out, w4a16_all=True)
    out2 = tmp_path / "w4a16.safetensors"
    report2 = convert(nv_out, out2, renv, progress=False)
    a, b = safetensors.torch.load_file(str(nv_out)), safetensors.torch.load_file(str(out2))
    copied = [r.layer for r in report2.layers if r.action == "copied"]
    assert copied
    for name in copied:
        assert torch.equal(a[name + ".weight"], b[name + ".weight"])
        assert formats.decode_comfy_quant(b[name + ".comfy_quant"])["full_precision_matrix_mult"] is True


def test_input_scales_from_plan_are_written(flux_src, tmp_path):
    plan = _plan(flux_src)
    layer = next(n for n, d in plan.layers.items() if d.format == formats.NVFP4)
    plan.layers[layer].input_scale = 0.00123
    plan.layers[layer].input_scale_source = "test"
    out = tmp_path / "scaled.safetensors"
    convert(flux_src, out, plan, progress=False)
    with open_checkpoint(out) as ckpt:
        assert ckpt.info(layer + ".input_scale").shape == ()
        assert math.isclose(ckpt.layers()[layer].input_scale, 0.00123, rel_tol=1e-6)


def test_output_equal_to_input_and_existing_output_refused(flux_src, flux_out, tmp_path):
    plan = _plan(flux_src)
    with pytest.raises(CheckpointError, match="same file"):
        convert(flux_src, flux_src, plan, progress=False)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(flux_src, existing, plan, progress=False)
    assert existing.read_bytes() == b"keep me"


def test_corrupt_shard_leaves_no_output(flux_src, tmp_path):
    plan = _plan(flux_src)
    bad = tmp_path / "bad.safetensors"
    data = flux_src.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError):
        convert(bad, out, plan, progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.safetensors*"))


def test_plan_for_another_model_is_refused(flux_src, wan_src, tmp_path):
    plan = _plan(wan_src)
    out = tmp_path / "x.safetensors"
    with pytest.raises(NVFP4Error):
        convert(flux_src, out, plan, progress=False)
    assert not out.exists()


def test_cli_convert_and_errors(flux_src, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert cli_main(["convert", str(flux_src), str(out), "--quiet"]) == 0
    assert out.exists()
    capsys.readouterr()
    assert cli_main(["convert", str(flux_src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--force" in err[0]
    assert cli_main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "y.safetensors")]) == 1
    assert "Traceback" not in capsys.readouterr().err
    plan_file = tmp_path / "plan.json"
    assert cli_main(["plan", str(flux_src), "-o", str(plan_file)]) == 0
    out2 = tmp_path / "from_plan.safetensors"
    assert cli_main(["convert", str(flux_src), str(out2), "--plan", str(plan_file), "--quiet"]) == 0
    assert safetensors.torch.load_file(str(out2)).keys() == safetensors.torch.load_file(str(out)).keys()


def test_demo_runs(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "verified" in text and "rel_rmse" in text
    assert (tmp_path / "demo" / "tiny_flux_nvfp4.safetensors").exists()


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Converting a 384 MiB model raises peak RSS by far less than the model: measured, not timed."""
    src = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.ffn.{j}.weight": torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
          for i in range(48) for j in (0, 2)}
    safetensors.torch.save_file(sd, str(src))
    model_bytes = sum(t.numel() * 2 for t in sd.values())
    del sd
    # A fresh process, so the peak RSS it reports belongs to the conversion alone.
    script = textwrap.dedent(f"""
        import json
        from nvfp4_lab.quant.checkpoint import open_checkpoint
        from nvfp4_lab.quant.convert import convert
        from nvfp4_lab.quant.rules import PlanOptions, build_plan
        src = {str(src)!r}
        with open_checkpoint(src) as ck:
            plan = build_plan(ck, PlanOptions(preset="generic", mode="all"))
        def status(key):  # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across exec
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
        before = status("VmRSS")
        convert(src, {str(tmp_path / 'out.safetensors')!r}, plan, progress=False, verify=False)
        print(json.dumps({{"before": before, "peak": status("VmHWM")}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    extra = m["peak"] - m["before"]
    # largest tensor is 4 MiB; quantization temporaries ~27 B/element = ~57 MiB; allow generous slack
    assert extra < 0.35 * model_bytes, (m, model_bytes)


# ---- review fixes ---------------------------------------------------------------------------------------------------
def _full_checkpoint(flux_src, path):
    """A ComfyUI full checkpoint: the diffusion model under `model.diffusion_model.` plus VAE / text-encoder keys."""
    sd = safetensors.torch.load_file(str(flux_src))
    full = {"model.diffusion_model." + k: v for k, v in sd.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3)
    full["text_encoders.clip_l.transformer.text_model.fc.weight"] = torch.randn(32, 32)
    safetensors.torch.save_file(full, str(path))
    return path


def test_full_checkpoint_says_before_writing_that_other_components_are_dropped(flux_src, tmp_path, capsys):
    """The plan (and so `convert --dry-run` / `nvfp4 plan`) tells up front that the VAE and text encoders are not
    part of the output, not only after the file was written."""
    src = _full_checkpoint(flux_src, tmp_path / "full.safetensors")
    assert cli_main(["convert", str(src), str(tmp_path / "out.safetensors"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "first_stage_model." in text and "text_encoders." in text
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(src), str(out), "--quiet"]) == 0
    keys = safetensors.torch.load_file(str(out)).keys()
    assert keys and all(not k.startswith(("model.", "first_stage_model.", "text_encoders.")) for k in keys)


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:99", "cpu:x"])
def test_bad_device_is_a_one_line_error(flux_src, tmp_path, capsys, device):
    out = tmp_path / "dev.safetensors"
    assert cli_main(["convert", str(flux_src), str(out), "--quiet", "--device", device]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1 and "--device" in err
    assert not out.exists()


def test_rule_options_with_plan_are_refused(flux_src, tmp_path, capsys):
    """`convert --plan` takes every decision from the plan: rule options given with it would be silently ignored."""
    plan_file = tmp_path / "plan.json"
    assert cli_main(["plan", str(flux_src), "-o", str(plan_file)]) == 0
    capsys.readouterr()
    out = tmp_path / "o.safetensors"
    for extra in (["--other-dtype", "fp16"], ["--include", "img_in"], ["--input-scale-value", "0.5"]):
        assert cli_main(["convert", str(flux_src), str(out), "--plan", str(plan_file), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and extra[0] in err[0], err
        assert not out.exists()


def test_demo_runs_twice(tmp_path, capsys):
    """The README's run command works again on a second run (it reuses the tiny model, replaces its own outputs)."""
    assert cli_main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert cli_main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert "verified" in capsys.readouterr().out


def test_sharded_output_is_self_describing_and_equals_single_file(flux_src, flux_out, tmp_path, capsys):
    """--shard-size: every shard is a complete safetensors with its own markers; together they equal one file."""
    single, plan, _ = flux_out
    out = tmp_path / "sharded" / "tiny_flux_nvfp4.safetensors"
    out.parent.mkdir()
    report = convert(flux_src, out, plan, progress=False, shard_bytes=4_000_000)
    index = out.parent / "tiny_flux_nvfp4.safetensors.index.json"
    assert report.output == index and report.verified
    shards = sorted(out.parent.glob("tiny_flux_nvfp4-*-of-*.safetensors"))
    assert len(shards) > 2 and not out.exists()
    doc = json.loads(index.read_text())
    assert set(doc["weight_map"].values()) == {p.name for p in shards}
    merged = {}
    for shard in shards:
        with open_checkpoint(shard) as ckpt:  # self-describing: each shard alone knows its formats
            meta = ckpt.metadata
            header = json.loads(meta.get("_quantization_metadata", '{"layers": {}}'))["layers"]
            markers = {n: lay.comfy_quant for n, lay in ckpt.layers().items() if lay.comfy_quant}
            assert header == markers
            for name in ckpt.layers():  # no layer is split across shards
                assert name not in merged
                merged[name] = shard.name
        assert json.loads(meta["nvfp4_lab"])["source"]["file"] == "tiny_flux.safetensors"
    a = safetensors.torch.load_file(str(single))
    b = {}
    for shard in shards:
        b.update(safetensors.torch.load_file(str(shard)))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].reshape(-1).view(torch.uint8), b[key].reshape(-1).view(torch.uint8)), key
    # existing shards are refused without --force, and the CLI takes a human size
    assert cli_main(["convert", str(flux_src), str(out), "--plan", str(_saved(plan, tmp_path)), "--quiet",
                     "--shard-size", "4MB"]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli_main(["convert", str(flux_src), str(out), "--plan", str(_saved(plan, tmp_path)), "--quiet",
                     "--shard-size", "4.5bpw"]) == 1


def _saved(plan: Plan, folder) -> object:
    path = folder / "plan_for_shards.json"
    if not path.exists():
        plan.save(path)
    return path


def test_sharded_output_loads_and_samples_in_comfyui(flux_src, flux_out, tmp_path, comfy):
    """Load Model (NVFP4)'s sharded path builds the same mixed-precision model as the single file."""
    import nodes as comfy_nodes

    from nvfp4_lab.nodes.loader import load_model_file

    single, plan, _ = flux_out
    out = tmp_path / "tiny_flux_nvfp4.safetensors"
    report = convert(flux_src, out, plan, progress=False, shard_bytes=4_000_000)
    latents = []
    for path in (single, report.output):
        ctx = torch.zeros(1, 2, 1024)
        ctx[0, :, ::7] = 1.0
        with torch.inference_mode():  # load and sample as ComfyUI's executor does
            model, _source = load_model_file(str(path))
            (latent,) = comfy_nodes.common_ksampler(model, 0, 2, 2.0, "euler", "simple", [[ctx, {}]],
                                                    [[torch.zeros_like(ctx), {}]],
                                                    {"samples": torch.zeros(1, 16, 16, 16)})
        latents.append(latent["samples"])
    assert torch.isfinite(latents[1]).all()
    assert torch.equal(latents[0], latents[1])
