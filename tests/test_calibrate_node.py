"""Calibrate (NVFP4) and Calibration Report (NVFP4) in a real ComfyUI 0.29.

In-process (the `comfy` fixture, CPU): every Linear of a bf16 and of a mixed NVFP4/W4A16/FP8 model (loaded through
mixed_precision_ops) is recorded, with the same per-layer count and max as independent plain hooks on the same run;
no hook remains; other clones are unaffected; failed runs record nothing; sessions accumulate; another model's
session and torch.compile are refused; re-queuing an identical prompt through PromptExecutor (classic cache) records
again, and would not without fingerprint_inputs. Over HTTP (the `comfy_server` fixture): the shipped example's API
twin over several seeds writes a session covering every Linear whose values equal an in-process measurement of the
same runs, and the report node returns plots and a table.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch
from comfy_support import REPO_ROOT

pytestmark = pytest.mark.comfyui

API_TWIN = REPO_ROOT / "tests" / "workflows" / "calibrate_tiny_flux_api.json"
UI_EXAMPLE = REPO_ROOT / "example_workflows" / "calibrate_tiny_flux.json"
FLUX_KW = {"depth": 2, "depth_single": 2, "hidden": 256}
SIZE = 64          # 64x64 image -> 8x8 latent -> 16 tokens: seconds per run on a CPU
STEPS = 3


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def out_dir(comfy, tmp_path_factory):
    """ComfyUI's output folder pointed at a temp dir for this module (restored afterwards)."""
    import folder_paths

    old = folder_paths.get_output_directory()
    d = tmp_path_factory.mktemp("comfy_output")
    folder_paths.set_output_directory(str(d))
    yield d
    folder_paths.set_output_directory(old)


@pytest.fixture(scope="module")
def model_dir(comfy, tmp_path_factory):
    import folder_paths

    d = tmp_path_factory.mktemp("diffusion_models")
    folder_paths.add_model_folder_path("diffusion_models", str(d))
    return d


@pytest.fixture(scope="module")
def bf16_file(model_dir):
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    return write_tiny_model("flux", model_dir / "calib_tiny_flux.safetensors", **FLUX_KW)


@pytest.fixture(scope="module")
def nvfp4_file(bf16_file, model_dir):
    """The project's converter: NVFP4 W4A4 blocks, W4A16 layers, one FP8 layer, bf16 edge layers."""
    from nvfp4_lab.quant.checkpoint import open_checkpoint
    from nvfp4_lab.quant.convert import convert
    from nvfp4_lab.quant.rules import PlanOptions, build_plan

    with open_checkpoint(bf16_file) as ck:
        plan = build_plan(ck, PlanOptions(keep_first=0, keep_last=0, fp8=[r"double_blocks\.1\.txt_mlp\.2"],
                                          w4a16=[r"single_blocks\.1\.linear2"]))
    counts = plan.counts()
    assert counts.get("nvfp4") and counts.get("nvfp4-w4a16") and counts.get("fp8") and counts.get("bf16"), counts
    out = model_dir / "calib_tiny_flux_nvfp4.safetensors"
    convert(bf16_file, out, plan, progress=False)
    return out


def expected_linears(path: Path) -> set[str]:
    """Every Linear of a Flux file: the layers with a 2-D logical weight (quantized ones have a comfy_quant)."""
    from nvfp4_lab.quant.checkpoint import open_checkpoint

    with open_checkpoint(path) as ck:
        return {name for name, lay in ck.layers().items() if lay.linear}


def load(path: Path):
    """UNETLoader's call, under inference mode as the executor runs every node (quantized weights need it)."""
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_diffusion_model(str(path))


def conds():
    from comfy_extras.nodes_lotus import LotusConditioning

    pos = LotusConditioning.execute().args[0]
    neg = [[torch.zeros_like(pos[0][0]), {}]]
    return pos, neg


def sample(model, seed: int, steps: int = STEPS, cfg: float = 2.0, size: int = SIZE):
    import nodes

    pos, neg = conds()
    lat = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, neg, lat)[0]["samples"]


class PlainHooks:
    """Independent measurement: plain pre-hooks recording x.abs().amax().item() per call."""

    def __init__(self, model):
        from nvfp4_lab.nodes.comfy_glue import linear_modules

        self.calls: dict[str, list[float]] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linear_modules(model)]

    def _hook(self, name):
        def hook(module, args):
            self.calls.setdefault(name, []).append(float(args[0].detach().abs().amax().item()))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def read_store(path):
    from nvfp4_lab.calibration.store import CalibrationStore

    return CalibrationStore.load(path)


def assert_store_matches(store, calls: dict[str, list[float]], expected: set[str], rel: float = 0.0):
    assert set(store.layers) == expected, (sorted(expected - set(store.layers)), sorted(set(store.layers) - expected))
    assert set(calls) == expected
    for name in expected:
        st = store.layers[name]
        assert st.count == len(calls[name]), name
        assert st.max == pytest.approx(max(calls[name]), rel=rel, abs=0), name
        assert st.min == pytest.approx(min(calls[name]), rel=rel, abs=0), name


# ---------------------------------------------------------------------------------------------------- glue
def test_is_linear_finds_every_linear_of_bf16_and_mixed_models(comfy, bf16_file, nvfp4_file):
    from nvfp4_lab.nodes.comfy_glue import bare_layer_name, diffusion_model, is_linear, linear_modules

    expected = expected_linears(bf16_file)
    assert expected == expected_linears(nvfp4_file)
    bf16, q = load(bf16_file), load(nvfp4_file)
    assert {n for n, _ in linear_modules(bf16)} == expected
    assert {n for n, _ in linear_modules(q)} == expected
    mixed = dict(diffusion_model(q).named_modules())
    not_nn = [n for n in expected if not isinstance(mixed[n], torch.nn.Linear)]
    assert not_nn, "the NVFP4 model was not loaded through mixed_precision_ops"
    assert all(is_linear(mixed[n]) for n in not_nn)
    assert not any(is_linear(m) for n, m in mixed.items() if n not in expected)   # norms, embedders, blocks
    assert bare_layer_name("model.diffusion_model.double_blocks.0.img_attn.qkv.weight") == \
        "double_blocks.0.img_attn.qkv"
    assert bare_layer_name("diffusion_model.txt_in.bias") == "txt_in"


@pytest.mark.parametrize("which", ["bf16", "nvfp4"])
def test_calibration_equals_independent_hooks_and_leaves_nothing_behind(which, comfy, out_dir, bf16_file,
                                                                         nvfp4_file):
    from nvfp4_lab.nodes.calibrate_node import calibrate
    from nvfp4_lab.nodes.comfy_glue import count_forward_pre_hooks

    path = bf16_file if which == "bf16" else nvfp4_file
    model = load(path)
    wrappers_before = json.dumps({k: sorted(v) for k, v in model.wrappers.items()})
    session = f"eq_{which}_{uuid.uuid4().hex[:6]}"
    patched, sess, text = calibrate(model, session)
    assert sess.store_path == out_dir / "nvfp4_calibration" / f"{session}.json"
    assert "0 calls" in text and not sess.store_path.exists()
    assert count_forward_pre_hooks(model) == 0                     # nothing registered outside sampling
    plain = PlainHooks(model)
    try:
        sample(patched, seed=1)
        sample(patched, seed=2)
    finally:
        plain.remove()
    assert count_forward_pre_hooks(model) == 0 and count_forward_pre_hooks(patched) == 0
    assert json.dumps({k: sorted(v) for k, v in model.wrappers.items()}) == wrappers_before   # input untouched
    store = read_store(sess.store_path)
    expected = expected_linears(path)
    assert_store_matches(store, plain.calls, expected)
    st = store.layers["double_blocks.0.img_attn.qkv"]
    assert sorted(s for s in st.steps() if s is not None) == list(range(STEPS))
    assert st.conds() == ["cond", "uncond"]                         # cfg 2: cond and uncond batched on CPU
    assert sum(b.count for b in st.chunk_buckets.values()) == 2 * st.count
    prov = store.provenance
    assert prov["prompts"] == 1                                     # one node execution, two sampler runs
    assert prov["models"][0]["file"] == path.name and prov["models"][0]["architecture"] == "FluxSchnell"
    from nvfp4_lab.quant.checkpoint import open_checkpoint

    with open_checkpoint(path) as ck:
        assert prov["models"][0]["header_sha256"] == ck.header_hash()
    assert prov["comfyui_versions"] == ["0.29.0"]
    # the original patcher and other clones never record
    before = store.layers["txt_in"].count
    sample(model, seed=3)
    sample(model.clone(), seed=4)
    assert read_store(sess.store_path).layers["txt_in"].count == before


def test_wan_video_model_is_covered_and_equals_independent_hooks(comfy, out_dir, model_dir):
    """5-D video latents (Wan 2.1): chunks still split along the batch; every Linear recorded exactly."""
    import nodes

    from nvfp4_lab.nodes.calibrate_node import calibrate
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    path = write_tiny_model("wan", model_dir / "calib_tiny_wan.safetensors")
    model = load(path)
    patched, sess, _ = calibrate(model, f"wan_{uuid.uuid4().hex[:6]}")
    plain = PlainHooks(model)
    pos, neg = conds()
    try:
        with torch.inference_mode():
            nodes.common_ksampler(patched, 0, STEPS, 3.0, "euler", "simple", pos, neg,
                                  {"samples": torch.zeros(1, 16, 2, 8, 8)})
    finally:
        plain.remove()
    store = read_store(sess.store_path)
    assert_store_matches(store, plain.calls, expected_linears(path))
    assert store.provenance["models"][0]["architecture"] == "WAN21_T2V"
    assert store.layers["blocks.0.cross_attn.k"].conds() == ["cond", "uncond"]


def test_sessions_accumulate_samples_sidecar_and_another_model_is_refused(comfy, out_dir, bf16_file, model_dir):
    from nvfp4_lab.calibration.recorder import load_input_samples
    from nvfp4_lab.nodes.calibrate_node import calibrate
    from nvfp4_lab.quant.errors import CalibrationError
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    model = load(bf16_file)
    session = f"acc_{uuid.uuid4().hex[:6]}"
    p1, sess, _ = calibrate(model, session, record_input_samples=True, sample_rows=16)
    sample(p1, seed=0)
    n1 = read_store(sess.store_path).layers["img_in"].count
    p2, _, text = calibrate(model, session + "!!", record_input_samples=True, sample_rows=16)   # sanitized: same
    assert "1 prompts" in text
    sample(p2, seed=0)
    store = read_store(sess.store_path)
    assert store.layers["img_in"].count == 2 * n1 and store.provenance["prompts"] == 2
    rows = load_input_samples(sess.store_path)
    assert set(rows) == expected_linears(bf16_file)
    assert rows["double_blocks.0.img_attn.qkv"].shape == (16, 256)
    other = write_tiny_model("flux", model_dir / "calib_other.safetensors", depth=1, depth_single=1, hidden=256)
    with pytest.raises(CalibrationError, match="different models"):
        calibrate(load(other), session)


def test_failed_run_records_nothing_and_removes_hooks(comfy, out_dir, bf16_file):
    from comfy.patcher_extension import WrappersMP

    from nvfp4_lab.nodes.calibrate_node import calibrate
    from nvfp4_lab.nodes.comfy_glue import count_forward_pre_hooks

    model = load(bf16_file)
    patched, sess, _ = calibrate(model, f"fail_{uuid.uuid4().hex[:6]}")
    seen = {"n": 0}

    def boom(executor, *args, **kwargs):
        seen["n"] += 1
        if seen["n"] == 2:
            raise RuntimeError("sampler failed on purpose")
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "test.boom", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        sample(patched, seed=0)
    assert count_forward_pre_hooks(model) == 0
    assert not sess.store_path.exists()
    patched.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, "test.boom")
    sample(patched, seed=0)                                    # the same MODEL records normally afterwards
    assert read_store(sess.store_path).layers["txt_in"].count == STEPS


def test_torch_compile_is_refused(comfy, out_dir, bf16_file):
    from nvfp4_lab.nodes.calibrate_node import calibrate
    from nvfp4_lab.quant.errors import NVFP4Error

    model = load(bf16_file).clone()
    model.model_options["torch_compile_kwargs"] = {"backend": "inductor"}
    with pytest.raises(NVFP4Error, match="torch.compile"):
        calibrate(model, "compiled")


def test_install_linear_pre_hooks_stacks_and_publishes_steps(comfy, bf16_file):
    from nvfp4_lab.nodes.comfy_glue import count_forward_pre_hooks, install_linear_pre_hooks

    model = load(bf16_file)
    seen: dict[str, int] = {}
    steps: list[int] = []
    runs: list = []

    def make_hook(name, module):
        if not name.startswith("double_blocks.0."):
            return None
        def hook(mod, args):
            seen[name] = seen.get(name, 0) + 1
        return hook

    a = install_linear_pre_hooks(model, "test.a", make_hook, runs.append,
                                 on_model_call=lambda call: steps.append(int(call.step)))
    b = install_linear_pre_hooks(a, "test.a", make_hook, runs.append)           # same key: stacks, not replaces
    sample(b, seed=0)
    assert steps == list(range(STEPS))
    assert len(runs) == 2 and all(r.ok and r.error is None for r in runs)
    assert set(runs[0].layers) == set(seen) and all(n.startswith("double_blocks.0.") for n in seen)
    assert all(v == 2 * STEPS for v in seen.values())            # two installations, one call per step each
    assert count_forward_pre_hooks(model) == 0


# ---------------------------------------------------------------------------------------------------- executor
class NullServer:
    client_id = last_node_id = last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


@pytest.fixture(scope="module")
def executor_nodes(comfy):
    """Built-in nodes plus this pack's nodes registered in-process (no custom_nodes folder needed)."""
    import nodes

    if "LotusConditioning" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from nvfp4_lab.nodes.registry import node_classes

    for cls in node_classes():
        nodes.NODE_CLASS_MAPPINGS.setdefault(cls.GET_SCHEMA().node_id, cls)
    return nodes


def api_graph(unet: str, session: str, seed: int = 0) -> dict:
    graph = json.loads(API_TWIN.read_text())
    graph["1"]["inputs"]["unet_name"] = unet
    graph["4"]["inputs"].update(width=SIZE, height=SIZE)
    graph["5"]["inputs"]["session"] = session
    graph["6"]["inputs"].update(seed=seed, steps=STEPS)
    graph["8"]["inputs"]["session"] = session
    return graph


def test_requeued_identical_prompt_records_again_with_classic_cache(executor_nodes, out_dir, bf16_file,
                                                                    monkeypatch):
    import execution

    ex = execution.PromptExecutor(NullServer(), cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    session = f"requeue_{uuid.uuid4().hex[:6]}"
    graph = api_graph(bf16_file.name, session)
    cal_cls = executor_nodes.NODE_CLASS_MAPPINGS["NVFP4Calibrate"]

    def run_prompt():
        # a fresh dict per prompt, as the server parses each POST: the executor stores the fingerprint in the
        # prompt's node dicts, so reusing one dict would reuse the very same NaN object (and hit the cache)
        prompt = json.loads(json.dumps(graph))
        pid = str(uuid.uuid4())
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        assert ok, (err, node_errors)
        asyncio.run(ex.execute_async(prompt, pid, {}, outputs))
        assert ex.success, ex.status_messages
        return ex.history_result["outputs"]

    from nvfp4_lab.nodes import comfy_glue

    events = []
    monkeypatch.setattr(comfy_glue, "send_event", lambda event, data, sid=None: events.append((event, data)))
    path = out_dir / "nvfp4_calibration" / f"{session}.json"
    out1 = run_prompt()
    n1 = read_store(path).layers["txt_in"].count
    assert n1 == STEPS
    assert out1["8"]["text"][0].startswith("Calibration report")
    assert out1["5"]["nvfp4_session"] == [{"session": session, "path": str(path)}]
    # live counts for the web extension: the node id, totals and this run
    (event, data), = events
    assert event == "nvfp4lab.calibration" and data["node"] == "5" and data["session"] == session
    assert (data["layers"], data["calls"], data["prompts"]) == (32, 32 * STEPS, 1)
    assert data["run"] == {"layers": 32, "calls": 32 * STEPS, "hooked": 32}
    run_prompt()                                       # identical prompt, classic cache
    assert read_store(path).layers["txt_in"].count == 2 * n1
    assert read_store(path).provenance["prompts"] == 2
    # control: without fingerprint_inputs the cache serves the KSampler and nothing is recorded
    monkeypatch.delattr(cal_cls, "fingerprint_inputs")
    run_prompt()                                       # is_changed went NaN -> False: runs once more
    assert read_store(path).layers["txt_in"].count == 3 * n1
    run_prompt()                                       # now identical and cached: nothing recorded
    assert read_store(path).layers["txt_in"].count == 3 * n1


# ---------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(comfy_server):
    from test_example_workflows import ensure_tiny_models

    ensure_tiny_models(comfy_server)
    return comfy_server


def test_ui_example_converts_to_its_api_twin(server):
    from test_example_workflows import ui_to_api

    api = ui_to_api(json.loads(UI_EXAMPLE.read_text()), server.object_info())
    assert api == json.loads(API_TWIN.read_text())


def test_server_session_covers_every_linear_and_equals_in_process_measurement(server, comfy):
    from test_example_workflows import check_payload

    session = f"server_{uuid.uuid4().hex[:6]}"
    seeds = [0, 1, 2]
    entry = None
    for seed in seeds:
        entry = server.run(api_graph("tiny_flux.safetensors", session, seed))
    path = server.output_dir / "nvfp4_calibration" / f"{session}.json"
    assert path.is_file()
    model_path = server.models_dir / "tiny_flux.safetensors"
    expected = expected_linears(model_path)
    # independent measurement of the same three runs, in this process
    model = load(model_path)
    plain = PlainHooks(model)
    try:
        for seed in seeds:
            sample(model, seed)
    finally:
        plain.remove()
    store = read_store(path)
    assert_store_matches(store, plain.calls, expected, rel=1e-5)
    assert store.provenance["prompts"] == 3
    # calibrate node ui names the session; the report renders plots and a table
    outs = entry["outputs"]
    assert outs["5"]["nvfp4_session"][0]["path"] == str(path)
    assert outs["8"]["images"], outs["8"].keys()
    table = outs["8"]["nvfp4_table"][0]
    check_payload(table)
    assert {r[0] for r in table["rows"]} == expected
    assert "Calibration report" in outs["8"]["text"][0]
    # the identical prompt queued again records again
    server.run(api_graph("tiny_flux.safetensors", session, seeds[-1]))
    assert read_store(path).layers["txt_in"].count == store.layers["txt_in"].count + STEPS


def test_report_node_errors_are_clear(server):
    graph = {
        "1": {"class_type": "NVFP4CalibrationReport", "inputs": {"session": "no_such_session_xyz", "top_layers": 4}},
    }
    from comfy_support import ComfyError

    with pytest.raises(ComfyError, match="no_such_session_xyz"):
        server.run(graph)
