"""The shipped example workflows (example_workflows/*.json, UI format as the frontend saves them) execute as they are.

Each file is converted to the API format with `ui_to_api` (widget values mapped to inputs in /object_info's input
order, links resolved) and queued on the shared headless server, on tiny Flux models written into its
models/diffusion_models. Also holds the helpers test_nodes_integration.py reuses (tiny models, payload checks).
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
from comfy_support import REPO_ROOT, ComfyServer, sampling_graph

pytestmark = pytest.mark.comfyui

EXAMPLES = REPO_ROOT / "example_workflows"
TINY = {  # name -> tiny_models.write_tiny_model kwargs (enough blocks that presets leave layers to quantize)
    "tiny_flux.safetensors": dict(kind="flux", depth=4, depth_single=6, hidden=256),
    "tiny_flux_other.safetensors": dict(kind="flux", depth=2, depth_single=3, hidden=256, seed=1),
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")


# ---- helpers shared with test_nodes_integration.py ------------------------------------------------------------

def ensure_tiny_models(server: ComfyServer) -> dict[str, Path]:
    """Write the tiny models into the server's diffusion_models folder (once per session; deterministic)."""
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    out = {}
    for name, kw in TINY.items():
        path = server.models_dir / name
        if not path.exists():
            kw = dict(kw)
            write_tiny_model(kw.pop("kind"), path, **kw)
        out[name] = path
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (frontend save, version 0.4) to the API format /prompt takes.

    Widget values are consumed in the node's /object_info input order (required, then optional); an INT with
    `control_after_generate` (seeds) is followed by one extra UI-only value. A widget input that is connected takes
    the link (its widget value is still stored and skipped). Notes are dropped; muted nodes (mode 2) are dropped;
    bypassed nodes (mode 4), reroutes and primitive nodes are not supported (ValueError).
    """
    links = {lk[0]: lk for lk in workflow.get("links", [])}
    api: dict[str, dict] = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4 or ntype in ("Reroute", "PrimitiveNode"):
            raise ValueError(f"node {node['id']} ({ntype}): bypass/reroute/primitive nodes are not supported")
        if ntype not in object_info:
            raise ValueError(f"node {node['id']}: type {ntype!r} is not registered on the server")
        info = object_info[ntype]
        order = list(info["input_order"].get("required", [])) + list(info["input_order"].get("optional", []))
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                lk = links[inp["link"]]
                linked[inp["name"]] = [str(lk[1]), lk[2]]
        values = node.get("widgets_values", [])
        named = isinstance(values, dict)
        it = iter([] if named else values)
        inputs: dict = {}
        for name in order:
            spec = specs[name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            is_widget = isinstance(typ, list) or (typ in WIDGET_TYPES and not opts.get("forceInput"))
            value = None
            if is_widget:
                if named:
                    value = values.get(name)
                else:
                    try:
                        value = next(it)
                    except StopIteration:
                        raise ValueError(f"node {node['id']} ({ntype}): no widget value for {name!r}") from None
                    if opts.get("control_after_generate"):
                        next(it, None)
            if name in linked:
                inputs[name] = linked[name]
            elif is_widget:
                inputs[name] = value
        leftover = [] if named else list(it)
        if leftover:
            raise ValueError(f"node {node['id']} ({ntype}): {len(leftover)} widget value(s) left over: {leftover}")
        api[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return api


def check_payload(payload: dict) -> None:
    """Assert one ui table payload follows the web contract exactly."""
    assert set(payload) == {"title", "columns", "rows", "numeric", "sort", "chart", "summary"}, payload.keys()
    assert isinstance(payload["title"], str)
    cols = payload["columns"]
    assert isinstance(cols, list) and all(isinstance(c, str) for c in cols) and cols
    assert isinstance(payload["numeric"], list) and len(payload["numeric"]) == len(cols)
    assert all(isinstance(b, bool) for b in payload["numeric"])
    assert isinstance(payload["rows"], list) and len(payload["rows"]) <= 2000
    for row in payload["rows"]:
        assert len(row) == len(cols), row
        for i, c in enumerate(row):
            assert c is None or isinstance(c, (str, int, float)), (cols[i], c)
            if payload["numeric"][i]:
                assert c is None or (isinstance(c, (int, float)) and not isinstance(c, bool)), (cols[i], c)
            if isinstance(c, float):
                assert math.isfinite(c)
    if payload["sort"] is not None:
        assert set(payload["sort"]) == {"column", "descending"}
        assert 0 <= payload["sort"]["column"] < len(cols) and isinstance(payload["sort"]["descending"], bool)
    if payload["chart"] is not None:
        assert set(payload["chart"]) == {"label", "column", "top"}
        assert payload["numeric"][payload["chart"]["column"]] and payload["chart"]["top"] > 0
    assert isinstance(payload["summary"], list) and all(isinstance(s, str) for s in payload["summary"])
    json.dumps(payload, allow_nan=False)


def tables(entry: dict, node_id: str | int) -> list[dict]:
    """The nvfp4_table payloads a node reported in a history entry (each checked against the contract)."""
    out = entry["outputs"].get(str(node_id), {}).get("nvfp4_table", [])
    for p in out:
        check_payload(p)
    return out


def read_latent(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def sample_graph(unet_name: str, prefix: str, *, loader: str = "UNETLoader", size: int = 64, steps: int = 3) -> dict:
    """comfy_support.sampling_graph on a small Flux latent."""
    latent = {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    return sampling_graph(unet_name, latent, prefix, loader=loader, steps=steps)


# ---- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server):
    ensure_tiny_models(comfy_server)
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def load_example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def clear_outputs(server: ComfyServer, api: dict) -> None:
    """Remove files the graph's savers will write: the session server is shared, and another test (the browser
    test runs the examples too) may have written them; Save refuses to overwrite by design."""
    for node in api.values():
        if node["class_type"] in ("NVFP4SaveCheckpoint", "NVFP4BakeInputScales"):
            (server.models_dir / f"{node['inputs']['filename']}.safetensors").unlink(missing_ok=True)


# ---- the converter itself -----------------------------------------------------------------------------------------

def test_ui_to_api_maps_widgets_links_and_seed_control(object_info):
    wf = {"nodes": [
        {"id": 1, "type": "UNETLoader", "inputs": [], "outputs": [], "widgets_values": ["tiny_flux.safetensors",
                                                                                        "default"]},
        {"id": 2, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "seed", "type": "INT", "link": None,
                                                                    "widget": {"name": "seed"}}],
         "widgets_values": [7, "randomize", 3, 2.0, "euler", "simple", 1.0]},
        {"id": 3, "type": "Note", "widgets_values": ["hello"]},
    ], "links": [[1, 1, 0, 2, 0, "MODEL"]]}
    api = ui_to_api(wf, object_info)
    assert set(api) == {"1", "2"}
    assert api["1"]["inputs"] == {"unet_name": "tiny_flux.safetensors", "weight_dtype": "default"}
    assert api["2"]["inputs"] == {"model": ["1", 0], "seed": 7, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
                                  "scheduler": "simple", "denoise": 1.0}
    wf["nodes"][1]["widgets_values"].append("extra")
    with pytest.raises(ValueError, match="left over"):
        ui_to_api(wf, object_info)


def test_every_example_is_ui_format_and_uses_known_nodes(object_info):
    files = sorted(EXAMPLES.glob("*.json"))
    names = {p.name for p in files}
    assert {"convert_with_preset.json", "probe_budget_compare.json", "calibrate_then_save.json"} <= names, names
    for p in files:
        wf = json.loads(p.read_text(encoding="utf-8"))
        assert wf.get("version") == 0.4 and isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list)
        if "id" in wf:  # the frontend's schema: an optional UUID string
            uuid.UUID(wf["id"])
        assert all(isinstance(g.get("id", 0), int) and len(g["bounding"]) == 4 for g in wf.get("groups", []))
        for node in wf["nodes"]:
            assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= set(node), (p.name, node)
        ui_to_api(wf, object_info)  # every node registered, every widget accounted for


# ---- (a) convert with a preset --------------------------------------------------------------------------------------

def test_convert_with_preset_example_runs_and_result_samples(server, object_info):
    api = ui_to_api(load_example("convert_with_preset.json"), object_info)
    clear_outputs(server, api)
    save_id = next(k for k, v in api.items() if v["class_type"] == "NVFP4SaveCheckpoint")
    filename = api[save_id]["inputs"]["filename"]
    entry = server.run(api)
    by_type = {v["class_type"]: k for k, v in api.items()}
    inspect = tables(entry, by_type["NVFP4InspectLayers"])[0]
    assert any("flux" in s for s in inspect["summary"])
    plan = tables(entry, by_type["NVFP4BuildPlan"])[0]
    assert any(r[1] == "nvfp4" for r in plan["rows"]) and any(r[1] == "bf16" for r in plan["rows"])
    saved = tables(entry, save_id)[0]
    assert any(s.startswith("verified: yes") for s in saved["summary"]), saved["summary"]
    out = server.models_dir / f"{filename}.safetensors"
    assert out.is_file()
    # stock UNETLoader lists the file without a restart, loads it and samples a finite latent
    listed = server.object_info("UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"]
    options = listed[0] if isinstance(listed[0], list) else listed[1]["options"]
    assert out.name in options
    entry = server.run(sample_graph(out.name, "nvfp4_lab_test/example_a"))
    latents = server.output_files(entry, "latents")
    assert latents and bool(read_latent(latents[0]).isfinite().all())


# ---- (b) calibrate, then save with the calibration -----------------------------------------------------------------

def test_calibrate_then_save_example_runs(server, object_info):
    if "NVFP4Calibrate" not in object_info:
        pytest.fail("NVFP4Calibrate is not registered: the calibrate_then_save example cannot run")
    api = ui_to_api(load_example("calibrate_then_save.json"), object_info)
    clear_outputs(server, api)
    entry = server.run(api)
    save_id = next(k for k, v in api.items() if v["class_type"] == "NVFP4SaveCheckpoint")
    filename = api[save_id]["inputs"]["filename"]
    out = server.models_dir / f"{filename}.safetensors"
    assert out.is_file()
    tables(entry, save_id)
    from nvfp4_lab.quant.checkpoint import open_checkpoint

    with open_checkpoint(out) as ck:
        static = [n for n, lay in ck.layers().items() if lay.format == "nvfp4" and lay.input_scale is not None]
    assert static, "the calibration session gave no W4A4 layer a static input_scale"


# ---- (c) probe -> budget plan -> save -> load and compare -----------------------------------------------------------

def test_probe_budget_compare_example_runs(server, object_info):
    api = ui_to_api(load_example("probe_budget_compare.json"), object_info)
    clear_outputs(server, api)
    entry = server.run(api)
    by_type: dict[str, list[str]] = {}
    for k, v in api.items():
        by_type.setdefault(v["class_type"], []).append(k)
    probe = tables(entry, by_type["NVFP4SensitivityProbe"][0])[0]
    assert any("synthetic" in s.lower() for s in probe["summary"]), probe["summary"]
    plan_id = by_type["NVFP4BuildPlan"][0]
    plan = tables(entry, plan_id)[0]
    assert any("budget" in s for s in plan["summary"]), plan["summary"]
    budget = api[plan_id]["inputs"]["budget"]
    save_id = by_type["NVFP4SaveCheckpoint"][0]
    out = server.models_dir / f"{api[save_id]['inputs']['filename']}.safetensors"
    from nvfp4_lab.calibration.budget import parse_budget

    assert out.stat().st_size <= parse_budget(budget).value
    compare = tables(entry, by_type["NVFP4CompareOutputs"][0])[0]
    metrics = {r[0]: r[1] for r in compare["rows"]}
    assert 0.9 < metrics["latent cosine"] <= 1.0, metrics
    latents = server.output_files(entry, "latents")
    assert len(latents) == 2 and all(bool(read_latent(p).isfinite().all()) for p in latents)
