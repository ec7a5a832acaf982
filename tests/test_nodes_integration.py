"""The pack's nodes in a real headless ComfyUI (shared session server) on tiny Flux models.

Covers: registration; convert -> save -> stock UNETLoader lists (without restart), loads and samples; user errors
(a regex matching nothing, a plan for another model, a bad regex, an existing file) shown as node errors with nothing
written; Emulate W4A4 (changes the output but stays close; no hook survives sampling; other clones unaffected; on an
NVFP4 file only activations are emulated); Inspect via a MODEL; Bake Input Scales; Sensitivity Probe labelling.
"""

from __future__ import annotations

import json

import pytest
from comfy_support import ComfyError
from test_example_workflows import check_payload, ensure_tiny_models, read_latent, sample_graph, tables

pytestmark = pytest.mark.comfyui

NODE_IDS = {
    "NVFP4LoadModel": "Load Model (NVFP4)",
    "NVFP4InspectLayers": "Inspect Layers (NVFP4)",
    "NVFP4BuildPlan": "Build Plan (NVFP4)",
    "NVFP4SaveCheckpoint": "Save NVFP4 Checkpoint",
    "NVFP4EmulateW4A4": "Emulate W4A4 (NVFP4)",
    "NVFP4BakeInputScales": "Bake Input Scales (NVFP4)",
    "NVFP4SensitivityProbe": "Sensitivity Probe (NVFP4)",
    "NVFP4CompareOutputs": "Compare Outputs (NVFP4)",
}
PLAN_INPUTS = dict(preset="auto", mode="preset", include="", exclude="", w4a16="", fp8="", keep_first=-1, keep_last=-1,
                   gguf="none", budget="", calibration_session="none", input_scale_method="percentile",
                   percentile=99.9, margin=1.0)


def load(model_name: str = "tiny_flux.safetensors") -> dict:
    return {"class_type": "NVFP4LoadModel", "inputs": {"model_name": model_name, "weight_dtype": "default"}}


def plan_node(source: list, **kw) -> dict:
    return {"class_type": "NVFP4BuildPlan", "inputs": {"source": source, **PLAN_INPUTS, **kw}}


def save_node(plan: list, filename: str, *, source: list | None = None, model: list | None = None,
              overwrite: bool = False) -> dict:
    inputs = {"plan": plan, "filename": filename, "overwrite": overwrite, "verify": True, "device": "cpu"}
    if source is not None:
        inputs["source"] = source
    if model is not None:
        inputs["model"] = model
    return {"class_type": "NVFP4SaveCheckpoint", "inputs": inputs}


def model_files(server) -> set[str]:
    return {p.name for p in server.models_dir.iterdir()}


@pytest.fixture(scope="module")
def server(comfy_server):
    ensure_tiny_models(comfy_server)
    return comfy_server


@pytest.fixture(scope="module")
def nvfp4_file(server):
    """An NVFP4 checkpoint of the tiny model written by Save NVFP4 Checkpoint from a MODEL input (preset plan)."""
    graph = {"1": load(), "2": plan_node(["1", 1]), "3": save_node(["2", 0], "it_base_nvfp4", model=["1", 0])}
    entry = server.run(graph)
    payload = tables(entry, "3")[0]
    assert any(s.startswith("verified: yes") for s in payload["summary"])
    assert payload["sort"] == {"column": 4, "descending": True}
    path = server.models_dir / "it_base_nvfp4.safetensors"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def calib_store(server, nvfp4_file):
    """A calibration session in output/nvfp4_calibration: amax for all but the last W4A4 layer of nvfp4_file, plus
    one layer the file keeps in bf16. Returns (path, W4A4 layers, kept layers)."""
    from nvfp4_lab.calibration.store import CalibrationStore
    from nvfp4_lab.quant.checkpoint import open_checkpoint

    with open_checkpoint(nvfp4_file) as ck:
        layers = ck.layers()
    w4a4 = [n for n, lay in layers.items() if lay.format == "nvfp4"]
    kept = [n for n, lay in layers.items() if lay.format == "bf16" and lay.linear]
    assert w4a4 and kept
    folder = server.output_dir / "nvfp4_calibration"
    folder.mkdir(exist_ok=True)
    store = CalibrationStore()
    for i, name in enumerate(w4a4[:-1] + kept[:1]):
        store.record(name, [1.0 + i, 2.0 + i, 3.0 + i], step=0)
    path = store.save(folder / "it_session.json")
    return path, w4a4, kept


# ---- registration -----------------------------------------------------------------------------------------------

def test_every_node_registers_with_category_and_name(server):
    info = server.object_info()
    for node_id, display in NODE_IDS.items():
        assert node_id in info, f"{node_id} is not registered:\n{server.log_tail()}"
        assert info[node_id]["display_name"] == display
        assert info[node_id]["category"] == "NVFP4"
    assert info["NVFP4SaveCheckpoint"]["output_node"] is True
    assert info["NVFP4LoadModel"]["output"] == ["MODEL", "NVFP4_SOURCE"]
    assert info["NVFP4BuildPlan"]["output"][0] == "NVFP4_PLAN"
    assert info["NVFP4SensitivityProbe"]["output"][0] == "NVFP4_SENSITIVITY"
    options = info["NVFP4LoadModel"]["input"]["required"]["model_name"][1]["options"]
    assert "tiny_flux.safetensors" in options


# ---- save -> stock loader ---------------------------------------------------------------------------------------

def test_saved_file_is_listed_without_restart_and_samples_with_unet_loader(server, nvfp4_file):
    listed = server.object_info("UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"]
    options = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
    assert nvfp4_file.name in options
    ours = server.object_info("NVFP4LoadModel")["NVFP4LoadModel"]["input"]["required"]["model_name"][1]["options"]
    assert nvfp4_file.name in ours
    entry = server.run(sample_graph(nvfp4_file.name, "nvfp4_lab_it/stock"))
    latent = read_latent(server.output_files(entry, "latents")[0])
    assert latent.shape[1] == 16 and bool(latent.isfinite().all())
    assert "Detected mixed precision quantization" in server.log_text()


def test_inspect_accepts_a_model_and_reports_formats(server, nvfp4_file):
    graph = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": nvfp4_file.name, "weight_dtype": "default"}},
             "2": {"class_type": "NVFP4InspectLayers", "inputs": {"model": ["1", 0], "sort": "params", "filter": ""}}}
    entry = server.run(graph)
    payload = tables(entry, "2")[0]
    formats = {r[1] for r in payload["rows"]}
    assert {"nvfp4", "bf16"} <= formats, formats
    assert payload["sort"] == {"column": 3, "descending": True}
    assert any(s.startswith("nvfp4:") for s in payload["summary"]) and any("flux" in s for s in payload["summary"])


# ---- user errors: node error message, nothing written ---------------------------------------------------------------

def test_regex_matching_nothing_is_a_node_error_and_nothing_is_written(server):
    before = model_files(server)
    graph = {"1": load(), "2": plan_node(["1", 1], include="no_such_layer_anywhere"),
             "3": save_node(["2", 0], "it_never_written", source=["1", 1])}
    with pytest.raises(ComfyError) as err:
        server.run(graph)
    msg = str(err.value)
    assert "NVFP4BuildPlan" in msg and "no_such_layer_anywhere" in msg and "match" in msg, msg
    assert model_files(server) == before


def test_invalid_regex_is_refused_when_queued(server):
    graph = {"1": load(), "2": plan_node(["1", 1], exclude="double_blocks\\.(0"),
             "3": save_node(["2", 0], "it_never_written_2", source=["1", 1])}
    with pytest.raises(ComfyError) as err:
        server.queue(graph)
    assert "exclude: line 1" in str(err.value) and "not a valid regular expression" in str(err.value)


def test_plan_for_another_model_is_refused_and_nothing_is_written(server):
    before = model_files(server)
    graph = {"1": load(), "2": load("tiny_flux_other.safetensors"), "3": plan_node(["1", 1]),
             "4": save_node(["3", 0], "it_wrong_model", source=["2", 1])}
    with pytest.raises(ComfyError) as err:
        server.run(graph)
    msg = str(err.value)
    assert "NVFP4SaveCheckpoint" in msg and "another model" in msg, msg
    assert model_files(server) == before


def test_failed_save_into_a_new_subfolder_leaves_no_folder(server):
    graph = {"1": load(), "2": load("tiny_flux_other.safetensors"), "3": plan_node(["1", 1]),
             "4": save_node(["3", 0], "it_new_subfolder/it_wrong_model", source=["2", 1])}
    with pytest.raises(ComfyError, match="another model"):
        server.run(graph)
    assert not (server.models_dir / "it_new_subfolder").exists()


def node_errors(server, graph: dict) -> dict:
    """POST /prompt and return its node_errors. A node failing validation is refused with HTTP 400 when no output
    remains, else ComfyUI queues the valid outputs (200) and reports the refused node in node_errors; either way the
    refused node never runs."""
    status, payload = server.request("POST", "/prompt", {"prompt": graph, "client_id": server.client_id})
    assert isinstance(payload, dict), payload
    if status == 200 and payload.get("prompt_id"):
        server.wait(payload["prompt_id"])
    return payload.get("node_errors") or {}


def test_save_refuses_to_overwrite_unless_asked(server, nvfp4_file):
    stamp = nvfp4_file.stat().st_mtime_ns
    graph = {"1": load(), "2": plan_node(["1", 1]), "3": save_node(["2", 0], "it_base_nvfp4", source=["1", 1])}
    errors = node_errors(server, graph)
    details = json.dumps(errors.get("3", {}))
    assert "already exists" in details and "overwrite" in details, errors
    assert nvfp4_file.stat().st_mtime_ns == stamp
    graph["3"]["inputs"]["overwrite"] = True
    entry = server.run(graph)
    assert nvfp4_file.stat().st_mtime_ns != stamp
    assert entry["outputs"]["3"]["nvfp4_table"][0]["title"].endswith("it_base_nvfp4.safetensors")


# ---- Emulate W4A4 -------------------------------------------------------------------------------------------------

def _compare_graph(model_node: dict, emulate_inputs: dict, size: int = 64, steps: int = 3) -> dict:
    return {
        "1": model_node, "2": load(), "3": plan_node(["2", 1]),
        "4": {"class_type": "NVFP4EmulateW4A4", "inputs": {"model": ["1", 0], "plan": ["3", 0], **emulate_inputs}},
        "5": {"class_type": "LotusConditioning", "inputs": {}},
        "6": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["5", 0]}},
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 3, "steps": steps, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0],
                                                   "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 3, "steps": steps, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["5", 0],
                                                   "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "10": {"class_type": "NVFP4CompareOutputs", "inputs": {"reference": ["8", 0], "candidate": ["9", 0],
                                                               "label": "emulated vs bf16"}},
    }


def _metrics(entry: dict) -> dict:
    return {r[0]: r[1] for r in tables(entry, "10")[0]["rows"]}


def test_emulate_w4a4_changes_output_but_stays_close(server):
    entry = server.run(_compare_graph(load(), {"activation_scale": "plan", "emulate_weights": True,
                                                      "cache_weights": True}))
    m = _metrics(entry)
    assert m["latent PSNR (dB, reference range)"] is not None, "emulation changed nothing"
    assert 0.9 < m["latent cosine"] < 1.0, m
    emu = tables(entry, "4")[0]
    assert any(r[2] == "W4A4 emulated" and r[3].endswith("(emulated)") for r in emu["rows"]), emu["rows"][:5]


def test_emulate_on_an_nvfp4_file_only_fakes_activations(server, nvfp4_file):
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": nvfp4_file.name, "weight_dtype": "default"}}
    graph = _compare_graph(unet, {"activation_scale": "dynamic", "emulate_weights": True,
                                                 "cache_weights": False})
    entry = server.run(graph)
    emu = tables(entry, "4")[0]
    w4a4 = [r for r in emu["rows"] if r[2] == "W4A4 emulated"]
    assert w4a4 and all(r[3] == "nvfp4 (loaded)" and r[4] == "dynamic amax/2688" for r in w4a4), w4a4[:3]
    assert not any(isinstance(r[3], str) and r[3].endswith("(emulated)") for r in emu["rows"])
    m = _metrics(entry)
    assert 0.9 < m["latent cosine"] < 1.0, m


def test_emulate_leaves_no_hooks_and_other_clones_unaffected(comfy, tmp_path):
    """In-process: sampling the emulated MODEL changes nothing for the plain MODEL sampled before and after it."""
    import comfy.sd
    import nodes
    import torch

    from nvfp4_lab.nodes import comfy_glue
    from nvfp4_lab.nodes.emulate_node import NVFP4EmulateW4A4
    from nvfp4_lab.quant.checkpoint import open_checkpoint
    from nvfp4_lab.quant.rules import PlanOptions, build_plan
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    path = write_tiny_model("flux", tmp_path / "tiny_flux.safetensors", depth=2, depth_single=3, hidden=256)
    with open_checkpoint(path) as ck:
        plan = build_plan(ck, PlanOptions(mode="all"))
    model = comfy.sd.load_diffusion_model(str(path))
    emulated = NVFP4EmulateW4A4.execute(model, plan, activation_scale="plan", emulate_weights=True,
                                        cache_weights=False).args[0]
    assert not model.weight_wrapper_patches and emulated.weight_wrapper_patches
    ctx = torch.zeros(1, 2, 1024)
    ctx[..., ::5] = 1.0
    pos, neg = [[ctx, {}]], [[torch.zeros_like(ctx), {}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}

    def sample(m):
        with torch.inference_mode():
            return nodes.common_ksampler(m, 0, 2, 2.0, "euler", "simple", pos, neg, latent)[0]["samples"].clone()

    before = sample(model)
    emu = sample(emulated)
    assert comfy_glue.count_forward_pre_hooks(emulated) == 0
    after = sample(model)
    assert comfy_glue.count_forward_pre_hooks(model) == 0
    assert torch.equal(before, after), "the plain MODEL computed differently after the emulated one sampled"
    assert not torch.equal(before, emu) and bool(emu.isfinite().all())
    cos = torch.nn.functional.cosine_similarity(before.flatten().double(), emu.flatten().double(), dim=0)
    assert cos > 0.9
    dm = model.model.diffusion_model
    assert all(not getattr(m, "weight_function", []) for m in dm.modules())


# ---- Bake Input Scales --------------------------------------------------------------------------------------------

def test_bake_input_scales_writes_scales_and_reports_unmatched(server, nvfp4_file, calib_store):
    from nvfp4_lab.quant.checkpoint import open_checkpoint

    _, w4a4, kept = calib_store
    graph = {"1": {"class_type": "NVFP4BakeInputScales", "inputs": {
        "checkpoint": nvfp4_file.name, "calibration_session": "it_session.json", "method": "max", "percentile": 99.9,
        "margin": 1.0, "filename": "it_baked", "overwrite": False}}}
    entry = server.run(graph)
    payload = tables(entry, "1")[0]
    statuses = {r[0]: r[1] for r in payload["rows"]}
    assert statuses[kept[0]] == "not quantized in file"
    assert statuses[w4a4[-1]].startswith("W4A4, no calibration")
    assert any("not NVFP4/FP8 layers" in s for s in payload["summary"]), payload["summary"]
    with open_checkpoint(server.models_dir / "it_baked.safetensors") as ck:
        baked = ck.layers()
    assert baked[w4a4[0]].input_scale == pytest.approx(3.0 / 2688, rel=1e-6)
    assert baked[w4a4[-1]].input_scale is None


def test_save_with_a_calibration_writes_static_input_scales(server, calib_store):
    from nvfp4_lab.quant.checkpoint import open_checkpoint

    path, w4a4, _ = calib_store
    graph = {"1": load(), "2": plan_node(["1", 1], input_scale_method="max"),
             "3": save_node(["2", 0], "it_save_calibrated", source=["1", 1])}
    graph["3"]["inputs"]["calibration"] = str(path)  # what Calibrate (NVFP4)'s session resolves to
    entry = server.run(graph)
    tables(entry, "3")
    with open_checkpoint(server.models_dir / "it_save_calibrated.safetensors") as ck:
        layers = ck.layers()
    assert layers[w4a4[1]].input_scale == pytest.approx(4.0 / 2688, rel=1e-6)
    assert layers[w4a4[-1]].input_scale is None


def test_sharded_model_is_listed_loaded_sampled_and_converted(server):
    import torch
    from safetensors.torch import load_file, save_file

    folder = server.models_dir / "it_sharded"
    folder.mkdir(exist_ok=True)
    sd = load_file(str(server.models_dir / "tiny_flux_other.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    options = server.object_info("NVFP4LoadModel")["NVFP4LoadModel"]["input"]["required"]["model_name"][1]["options"]
    assert "it_sharded/model.safetensors.index.json" in options
    assert not any(o.startswith("it_sharded/model-0000") for o in options), options
    graph = sample_graph("it_sharded/model.safetensors.index.json", "nvfp4_lab_it/sharded", loader="NVFP4LoadModel")
    graph["7"] = plan_node(["1", 1], mode="all")
    graph["8"] = save_node(["7", 0], "it_from_shards", source=["1", 1])
    entry = server.run(graph)
    latent = read_latent(server.output_files(entry, "latents")[0])
    assert bool(torch.isfinite(latent).all())
    assert (server.models_dir / "it_from_shards.safetensors").is_file()


def test_inspect_live_module_tree_of_a_quantized_model(comfy, tmp_path):
    """A MODEL without a file behind it is inspected from its modules (formats as loaded)."""
    import comfy.sd

    from nvfp4_lab.nodes.inspect_node import NVFP4InspectLayers
    from nvfp4_lab.quant.checkpoint import open_checkpoint
    from nvfp4_lab.quant.convert import convert
    from nvfp4_lab.quant.rules import PlanOptions, build_plan
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    src = write_tiny_model("flux", tmp_path / "src.safetensors", depth=2, depth_single=3, hidden=256)
    with open_checkpoint(src) as ck:
        plan = build_plan(ck, PlanOptions(mode="all", w4a16=["single_blocks"]))
    convert(src, tmp_path / "q.safetensors", plan, progress=False)
    model = comfy.sd.load_diffusion_model(str(tmp_path / "q.safetensors"))
    model.cached_patcher_init = None  # as if built in memory
    out = NVFP4InspectLayers.execute(model=model, sort="size", filter="")
    report = out.args[0]
    assert report.origin == "live model"
    fmts = {r["name"]: r["format"] for r in report.rows}
    assert fmts["double_blocks.0.img_attn.qkv"] == "nvfp4"
    assert fmts["single_blocks.1.linear1"] == "nvfp4-w4a16"
    assert fmts["img_in"] == "fp32" or fmts["img_in"] == "bf16"
    check_payload(out.ui["nvfp4_table"][0])


# ---- Sensitivity Probe -----------------------------------------------------------------------------------------------

def test_probe_labels_synthetic_inputs_and_feeds_a_budget_plan(server):
    graph = {"1": load(),
             "2": {"class_type": "NVFP4SensitivityProbe", "inputs": {
                 "source": ["1", 1], "calibration_session": "none", "device": "cpu",
                 "layers": r"^single_blocks\.[1-4]\.linear", "max_rows": 16, "top": 10}},
             "3": plan_node(["1", 1], budget="24.5MB", sensitivity=["2", 0])}
    entry = server.run(graph)
    probe = tables(entry, "2")[0]
    assert probe["chart"] == {"label": "nvfp4 output rel. RMSE", "column": 2, "top": 10}
    assert all(r[8] == "synthetic" for r in probe["rows"])
    assert any("SYNTHETIC fallback" in s for s in probe["summary"])
    plan = tables(entry, "3")[0]
    assert any("budget" in s for s in plan["summary"]), plan["summary"]
    json.dumps(entry["outputs"], allow_nan=False)


def test_budget_without_sensitivity_is_a_node_error(server):
    graph = {"1": load(), "2": plan_node(["1", 1], budget="20MB")}
    with pytest.raises(ComfyError, match="needs a SENSITIVITY report"):
        server.run(graph)
    with pytest.raises(ComfyError, match="bits-per-weight|not a size"):
        server.queue({"1": load(), "2": plan_node(["1", 1], budget="lots")})


def test_ui_payload_helper_truncates_and_cleans_cells(comfy):
    from nvfp4_lab.nodes import ui

    p = ui.table("t", ["a", "b"], ([i, float("nan") if i == 1 else i / 3] for i in range(2500)), sort=(1, True),
                 chart=("b", 1, 5), summary=["s"])
    check_payload(p)
    assert len(p["rows"]) == 2000 and p["rows"][1][1] is None and "2500" in p["summary"][-1]
    assert p["numeric"] == [True, True]


def test_emulate_converts_calibrated_scales_to_the_loaded_format(comfy):
    """A calibration session holds NVFP4 scales (amax/2688). A layer loaded as FP8 from its file (no input_scale of
    its own) must get the FP8 scale amax/448 = 6x, as the plan's own FP8 path does; an NVFP4 layer keeps it."""
    from types import SimpleNamespace

    import torch

    from nvfp4_lab.nodes.emulate_node import emulation_specs
    from nvfp4_lab.quant.plan import LayerDecision, Plan

    dm = torch.nn.Module()
    dm.fp8_loaded = torch.nn.Linear(32, 32)
    dm.fp8_loaded.quant_format = "float8_e4m3fn"
    dm.fp8_loaded._full_precision_mm = True          # not native: activations are emulated
    dm.nv_plain = torch.nn.Linear(32, 32)
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=dm))
    plan = Plan(source={"file": "x"}, preset="none", layers={
        "fp8_loaded": LayerDecision("fp8_loaded", "fp8", "test", (32, 32)),
        "nv_plain": LayerDecision("nv_plain", "nvfp4", "test", (32, 32))})
    cal = {"fp8_loaded": 0.01, "nv_plain": 0.02}
    _, _, rows = emulation_specs(model, plan, cal_scales=cal)
    scales = {r[0]: r[5] for r in rows}
    assert scales["nv_plain"] == pytest.approx(0.02)
    assert scales["fp8_loaded"] == pytest.approx(0.06), rows
