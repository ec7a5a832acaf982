"""`nvfp4 calib run` (calibration.batch + cli/calib_run.py).

Unit tests: workflow validation, prompt/seed targets, job expansion, refusal/error messages, and the HTTP flow
(submit, poll, stop on error, Ctrl-C interrupts the prompt in flight) against a small fake server. Integration
(`comfyui`): the real headless server runs a tiny-Flux calibration workflow once per prompt × seed; prompts are
emulated by varying the KSampler's cfg (tiny models have no text encoder), and the session accumulates every run.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from comfy_support import REPO_ROOT

from nvfp4_lab.calibration import batch
from nvfp4_lab.calibration.batch import (
    BatchError,
    ComfyClient,
    find_prompt_target,
    find_seed_targets,
    format_refusal,
    load_api_workflow,
    make_jobs,
    read_prompts,
    run_batch,
    validate_api_workflow,
)
from nvfp4_lab.cli.main import main as cli_main

API_TWIN = REPO_ROOT / "tests" / "workflows" / "calibrate_tiny_flux_api.json"


def text_workflow() -> dict:
    """A real-model shaped API workflow: CLIPTextEncode positive/negative, KSampler, Calibrate."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "m.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "NVFP4Calibrate", "inputs": {"model": ["1", 0], "session": "s",
                                                          "record_input_samples": False, "sample_rows": 256}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["9", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["9", 0]}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 40, "steps": 4, "cfg": 3.5,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "9": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors", "type": "flux"}},
    }


# ---------------------------------------------------------------------------------------------------- workflow
def test_validate_rejects_ui_format_foreign_and_missing_calibrate(tmp_path):
    ui = json.loads((REPO_ROOT / "example_workflows" / "calibrate_tiny_flux.json").read_text())
    with pytest.raises(BatchError, match="UI-format workflow.*Export \\(API\\)"):
        validate_api_workflow(ui)
    with pytest.raises(BatchError, match="no Calibrate"):
        validate_api_workflow({"1": {"class_type": "KSampler", "inputs": {}}})
    with pytest.raises(BatchError, match="not an API-format node"):
        validate_api_workflow({"1": {"inputs": {}}})
    with pytest.raises(BatchError, match="not an API-format workflow"):
        validate_api_workflow([1, 2])
    wf = text_workflow()
    assert validate_api_workflow({"prompt": wf, "client_id": "x"}) == wf     # a saved POST body
    p = tmp_path / "wf.json"
    p.write_text("{not json")
    with pytest.raises(BatchError, match="not a JSON workflow"):
        load_api_workflow(p)
    with pytest.raises(BatchError, match="no such workflow"):
        load_api_workflow(tmp_path / "missing.json")
    assert load_api_workflow(API_TWIN)["5"]["class_type"] == "NVFP4Calibrate"


def test_prompt_target_defaults_to_the_positive_encoder_and_checks_explicit_targets():
    wf = text_workflow()
    assert find_prompt_target(wf) == ("3", "text")
    assert find_prompt_target(wf, "4") == ("4", "text")
    assert find_prompt_target(wf, "5", "cfg") == ("5", "cfg")
    with pytest.raises(BatchError, match="no such node id"):
        find_prompt_target(wf, "99")
    with pytest.raises(BatchError, match="has no 'text' input.*--prompt-input"):
        find_prompt_target(wf, "5")
    with pytest.raises(BatchError, match="no input 'nope'"):
        find_prompt_target(wf, "5", "nope")
    with pytest.raises(BatchError, match="connected to another node"):
        find_prompt_target(wf, "5", "model")
    with pytest.raises(BatchError, match="needs --prompt-node"):
        find_prompt_target(wf, None, "cfg")
    tiny = json.loads(API_TWIN.read_text())
    with pytest.raises(BatchError, match="no CLIPTextEncode.*--prompt-node"):
        find_prompt_target(tiny)
    del wf["5"]["inputs"]["positive"]
    with pytest.raises(BatchError, match="several prompt encoders"):
        find_prompt_target(wf)


def test_jobs_replace_prompt_and_every_seed_with_type_conversion():
    wf = text_workflow()
    seeds = find_seed_targets(wf)
    assert seeds == [("5", "seed"), ("7", "noise_seed")]
    jobs = make_jobs(wf, ["a dog", "a house"], 3, prompt_target=("3", "text"), seed_targets=seeds)
    assert [(j.prompt, j.seed) for j in jobs] == [("a dog", 40), ("a dog", 41), ("a dog", 42),
                                                  ("a house", 40), ("a house", 41), ("a house", 42)]
    assert [j.graph["7"]["inputs"]["noise_seed"] for j in jobs] == [7, 8, 9, 7, 8, 9]
    assert jobs[4].graph["3"]["inputs"]["text"] == "a house" and wf["3"]["inputs"]["text"] == "a cat"
    cfg = make_jobs(wf, ["2", "4.5"], 1, prompt_target=("5", "cfg"), seed_targets=seeds)
    assert [j.graph["5"]["inputs"]["cfg"] for j in cfg] == [2.0, 4.5]
    # the prompt may itself be the seed: that input is then not varied by --seeds
    assert find_seed_targets(wf, exclude=("5", "seed")) == [("7", "noise_seed")]
    width = make_jobs(wf, ["256"], 1, prompt_target=("6", "width"), seed_targets=[])
    assert width[0].graph["6"]["inputs"]["width"] == 256 and isinstance(width[0].graph["6"]["inputs"]["width"], int)
    with pytest.raises(BatchError, match="not a valid int for input 'width' of node 6"):
        make_jobs(wf, ["wide"], 1, prompt_target=("6", "width"), seed_targets=[])
    with pytest.raises(BatchError, match="at least 1"):
        make_jobs(wf, ["x"], 0, prompt_target=("3", "text"), seed_targets=seeds)


def test_read_prompts_skips_blank_and_comment_lines(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# my prompts\na red car\n\n  a blue house  \n#skip\n", encoding="utf-8")
    assert read_prompts(p) == ["a red car", "a blue house"]
    p.write_text("# nothing\n\n")
    with pytest.raises(BatchError, match="holds no prompt"):
        read_prompts(p)
    with pytest.raises(BatchError, match="no such prompts file"):
        read_prompts(tmp_path / "none.txt")


def test_refusal_messages_name_node_and_problem():
    payload = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                         "details": ""},
               "node_errors": {"1": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                 "details": "unet_name: 'x.safetensors' not in []"}],
                                     "class_type": "UNETLoader"}}}
    msg = format_refusal(payload, {})
    assert "Prompt outputs failed validation" in msg and "node 1 (UNETLoader)" in msg and "unet_name" in msg


# ---------------------------------------------------------------------------------------------------- fake server
class FakeComfy:
    """Just enough of ComfyUI's HTTP API: prompts finish after `polls` history requests, or fail/never finish."""

    def __init__(self, mode: str = "ok", polls: int = 2):
        self.mode = mode
        self.polls = polls
        self.prompts: list[dict] = []
        self.seen: dict[str, int] = {}
        self.interrupts: list = []
        self.deleted: list = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, obj):
                raw = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/system_stats":
                    return self._send(200, {"system": {}})
                if self.path == "/object_info/NVFP4Calibrate":
                    return self._send(200, {"NVFP4Calibrate": {}} if fake.mode != "no_pack" else {})
                if self.path.startswith("/history/"):
                    pid = self.path.rsplit("/", 1)[1]
                    fake.seen[pid] = fake.seen.get(pid, 0) + 1
                    if fake.mode == "hang" or fake.seen[pid] < fake.polls:
                        return self._send(200, {})
                    if fake.mode == "fail":
                        status = {"status_str": "error", "completed": False, "messages": [
                            ["execution_error", {"node_id": "6", "node_type": "KSampler",
                                                 "exception_type": "RuntimeError",
                                                 "exception_message": "out of\nmemory"}]]}
                        return self._send(200, {pid: {"status": status, "outputs": {}}})
                    out = {"5": {"nvfp4_session": [{"session": "s", "path": "/out/nvfp4_calibration/s.json"}]}}
                    return self._send(200, {pid: {"status": {"status_str": "success", "completed": True},
                                                  "outputs": out}})
                return self._send(404, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/prompt":
                    if fake.mode == "refuse":
                        return self._send(400, {"error": {"message": "Prompt outputs failed validation"},
                                                "node_errors": {"1": {"class_type": "UNETLoader", "errors": [
                                                    {"message": "Value not in list", "details": "unet_name"}]}}})
                    fake.prompts.append(body["prompt"])
                    return self._send(200, {"prompt_id": f"p{len(fake.prompts)}", "number": 0, "node_errors": {}})
                if self.path == "/interrupt":
                    fake.interrupts.append(body)
                    return self._send(200, {})
                if self.path == "/queue":
                    fake.deleted.extend(body.get("delete", []))
                    return self._send(200, {})
                return self._send(404, {})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_batch_submits_each_job_waits_and_reports_sessions():
    wf = text_workflow()
    done = []
    with FakeComfy(polls=3) as fake:
        res = run_batch(wf, ["a", "b"], seeds=2, server=fake.url, poll=0.01, progress=False,
                        on_job_done=lambda job, entry: done.append(job.index))
    assert res.completed == 4 and done == [0, 1, 2, 3]
    assert [(p["3"]["inputs"]["text"], p["5"]["inputs"]["seed"]) for p in fake.prompts] == \
        [("a", 40), ("a", 41), ("b", 40), ("b", 41)]
    assert all(fake.seen[f"p{i}"] == 3 for i in range(1, 5))       # each waited for before the next
    assert res.sessions == ["/out/nvfp4_calibration/s.json"]


@pytest.mark.parametrize("mode,match", [
    ("fail", r"prompt p1 failed in node 6 \(KSampler\): RuntimeError: out of memory"),
    ("refuse", r"refused the workflow: Prompt outputs failed validation \| node 1 \(UNETLoader\): Value not in list"),
    ("no_pack", "has no NVFP4Calibrate node"),
])
def test_batch_stops_at_the_first_error_with_the_node_message(mode, match):
    with FakeComfy(mode=mode) as fake:
        with pytest.raises(BatchError, match=match):
            run_batch(text_workflow(), ["a", "b", "c"], server=fake.url, poll=0.01, progress=False)
    assert len(fake.prompts) <= 1


def test_unreachable_server_and_timeout():
    with pytest.raises(BatchError, match="cannot reach ComfyUI"):
        ComfyClient("127.0.0.1:9", timeout=2).check()
    with FakeComfy(mode="hang") as fake:
        with pytest.raises(BatchError, match="did not finish within"):
            run_batch(text_workflow(), ["a"], server=fake.url, poll=0.01, timeout=0.2, progress=False)
        assert fake.deleted == ["p1"] and fake.interrupts == [{"prompt_id": "p1"}]


def test_ctrl_c_interrupts_the_prompt_in_flight(monkeypatch, tmp_path, capsys):
    wf_path = tmp_path / "wf.json"
    wf_path.write_text(json.dumps(text_workflow()))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")

    def ctrl_c(_):
        raise KeyboardInterrupt

    with FakeComfy(mode="hang") as fake:
        monkeypatch.setattr(batch.time, "sleep", ctrl_c)
        rc = cli_main(["calib", "run", str(wf_path), "--prompts", str(prompts), "--server", fake.url,
                       "--no-progress"])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert len(fake.prompts) == 1 and fake.deleted == ["p1"] and fake.interrupts == [{"prompt_id": "p1"}]


def test_cli_reports_user_errors_on_one_line(tmp_path, capsys):
    ui = REPO_ROOT / "example_workflows" / "calibrate_tiny_flux.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    rc = cli_main(["calib", "run", str(ui), "--prompts", str(prompts)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "API format" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def server(comfy_server):
    from test_example_workflows import ensure_tiny_models

    ensure_tiny_models(comfy_server)
    return comfy_server


def tiny_workflow(tmp_path: Path, session: str, steps: int = 2) -> Path:
    graph = json.loads(API_TWIN.read_text())
    graph["4"]["inputs"].update(width=64, height=64)
    graph["5"]["inputs"]["session"] = session
    graph["6"]["inputs"]["steps"] = steps
    graph["8"]["inputs"]["session"] = session
    p = tmp_path / f"{session}_api.json"
    p.write_text(json.dumps(graph))
    return p


def test_calib_run_against_real_comfyui_accumulates_every_prompt_and_seed(server, tmp_path, capsys):
    from nvfp4_lab.calibration.store import CalibrationStore

    session = f"batch_{uuid.uuid4().hex[:6]}"
    wf = tiny_workflow(tmp_path, session)
    prompts = tmp_path / "cfgs.txt"
    prompts.write_text("# prompts emulated by the KSampler's cfg\n2.0\n3.5\n")
    rc = cli_main(["calib", "run", str(wf), "--prompts", str(prompts), "--seeds", "2", "--server", server.url,
                   "--prompt-node", "6", "--prompt-input", "cfg", "--no-progress", "--timeout", "300"])
    out = capsys.readouterr().out
    path = server.output_dir / "nvfp4_calibration" / f"{session}.json"
    assert rc == 0, out
    assert "4 prompt(s) recorded" in out and f"calibration session: {path}" in out
    store = CalibrationStore.load(path)
    assert store.provenance["prompts"] == 4
    assert store.layers["txt_in"].count == 4 * 2                     # 4 prompts x 2 steps, cond+uncond batched
    assert all(st.count == 8 for st in store.layers.values())
    # the API: which values went where
    seen = []
    run_batch(json.loads(wf.read_text()), ["5.0"], seeds=2, server=server.url, prompt_node="6",
              prompt_input="cfg", progress=False,
              on_job_done=lambda job, entry: seen.append((job.graph["6"]["inputs"]["cfg"],
                                                          job.graph["6"]["inputs"]["seed"])))
    assert seen == [(5.0, 0), (5.0, 1)]
    assert CalibrationStore.load(path).layers["txt_in"].count == 12


def test_calib_run_real_server_errors_stop_the_batch(server, tmp_path):
    session = f"batch_err_{uuid.uuid4().hex[:6]}"
    graph = json.loads(tiny_workflow(tmp_path, session).read_text())
    missing = json.loads(json.dumps(graph))
    missing["1"]["inputs"]["unet_name"] = "no_such_model.safetensors"
    with pytest.raises(BatchError, match=r"node 1 \(UNETLoader\).*unet_name"):
        run_batch(missing, ["2.0", "3.0"], server=server.url, prompt_node="6", prompt_input="cfg", progress=False)
    failing = json.loads(json.dumps(graph))
    failing["8"]["inputs"] = {"session": "no_such_session_" + session, "top_layers": 4,   # report without data,
                              "run_after": ["6", 0]}                                      # after the sampler
    with pytest.raises(BatchError, match=r"failed in node 8 \(NVFP4CalibrationReport\).*no_such_session"):
        run_batch(failing, ["2.0", "3.0"], server=server.url, prompt_node="6", prompt_input="cfg", progress=False)
    from nvfp4_lab.calibration.store import CalibrationStore

    store = CalibrationStore.load(server.output_dir / "nvfp4_calibration" / f"{session}.json")
    assert store.provenance["prompts"] == 1                          # stopped after the first failing prompt
