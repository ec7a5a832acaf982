"""`nvfp4 calib run`: drive a running ComfyUI through a calibration workflow once per prompt × seed.

Why: calibration needs many representative prompts. Queuing them by hand in the UI is tedious; this submits a saved
API-format workflow (one that contains Calibrate (NVFP4)) to ComfyUI's standard HTTP API (`POST /prompt`, polling
`GET /history/<id>`), replacing the prompt text and the seeds each time, and stops cleanly on the first error.

What is replaced per job:
- the prompt: the `text` input of the workflow's positive CLIPTextEncode (the node wired to a sampler's
  `positive`; or the only CLIPTextEncode), or `--prompt-node ID [--prompt-input NAME]` for any node input. The
  line's text is converted to the type of the value it replaces (int, float, bool, str), so a workflow without a
  text encoder can vary e.g. a sampler's `cfg` or a latent's `width` — this is how the tests emulate prompts;
- the seed: every literal `seed` / `noise_seed` input (KSampler, KSamplerAdvanced, RandomNoise, ...), set to
  `base + i` for seed index i (`base` = the workflow's own value), unless the prompt itself goes to that input.

Only the standard library talks HTTP (urllib); no ComfyUI import.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..quant.errors import NVFP4Error

__all__ = [
    "BatchError",
    "BatchResult",
    "ComfyClient",
    "Job",
    "CALIBRATE_CLASS",
    "find_prompt_target",
    "find_seed_targets",
    "load_api_workflow",
    "make_jobs",
    "read_prompts",
    "run_batch",
]

CALIBRATE_CLASS = "NVFP4Calibrate"
PROMPT_CLASSES = ("CLIPTextEncode",)
SEED_INPUTS = ("seed", "noise_seed")
DEFAULT_SERVER = "http://127.0.0.1:8188"


class BatchError(NVFP4Error):
    """The workflow, the prompts file or the server refused the batch; the message says which and what to do."""


# ------------------------------------------------------------------------------------------------ workflow
def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def validate_api_workflow(data: Any, where: str = "workflow") -> dict:
    """Check `data` is an API-format graph containing NVFP4Calibrate; return it (unwrapped from {"prompt": ...})."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data:
        data = data["prompt"]                      # a saved POST /prompt body
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise BatchError(f"{where}: this is a UI-format workflow (nodes/links as the editor saves it); export it in "
                         "API format (ComfyUI menu: Workflow > Export (API)) and pass that file")
    if not isinstance(data, dict) or not data:
        raise BatchError(f"{where}: not an API-format workflow (expected an object of node id -> "
                         "{class_type, inputs})")
    for nid, node in data.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise BatchError(f"{where}: node {nid!r} is not an API-format node (needs class_type and inputs); "
                             "export the workflow in API format")
    if not any(n["class_type"] == CALIBRATE_CLASS for n in data.values()):
        raise BatchError(f"{where}: contains no Calibrate (NVFP4) node ({CALIBRATE_CLASS}); add one between the "
                         "model loader and the sampler, then export the workflow in API format again")
    return data


def load_api_workflow(path: str | Path) -> dict:
    """Read and validate an API-format workflow file (see validate_api_workflow)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BatchError(f"{p}: no such workflow file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BatchError(f"{p}: not a JSON workflow ({exc})") from None
    return validate_api_workflow(data, str(p))


def find_prompt_target(workflow: dict, node: str | None = None, input_name: str | None = None) -> tuple[str, str]:
    """(node id, input name) that receives each prompt line. See the module docstring for the default."""
    if node is not None:
        node = str(node)
        if node not in workflow:
            raise BatchError(f"--prompt-node {node}: no such node id in the workflow (ids: "
                             f"{', '.join(sorted(workflow, key=_id_key))})")
        inputs = workflow[node].get("inputs", {})
        name = input_name or ("text" if "text" in inputs else None)
        if name is None:
            raise BatchError(f"--prompt-node {node} ({workflow[node]['class_type']}) has no 'text' input; name the "
                             f"input with --prompt-input (literal inputs: {', '.join(_literal_inputs(inputs))})")
        if name not in inputs:
            raise BatchError(f"node {node} ({workflow[node]['class_type']}) has no input {name!r} (literal inputs: "
                             f"{', '.join(_literal_inputs(inputs)) or 'none'})")
        if _is_link(inputs[name]):
            raise BatchError(f"input {name!r} of node {node} is connected to another node; choose a widget value")
        return node, name
    if input_name is not None:
        raise BatchError("--prompt-input needs --prompt-node")
    encoders = [nid for nid, n in workflow.items()
                if n["class_type"] in PROMPT_CLASSES and not _is_link(n.get("inputs", {}).get("text"))]
    positive = []
    for n in workflow.values():
        link = n.get("inputs", {}).get("positive")
        if _is_link(link) and link[0] in encoders and link[0] not in positive:
            positive.append(link[0])
    cands = positive or encoders
    if len(cands) == 1:
        return cands[0], "text"
    if not cands:
        raise BatchError("the workflow has no CLIPTextEncode with a text widget; pass --prompt-node ID "
                         "(and --prompt-input NAME) to say which node input each prompt line replaces")
    raise BatchError(f"several prompt encoders ({', '.join(sorted(cands, key=_id_key))}); pass --prompt-node ID")


def find_seed_targets(workflow: dict, exclude: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """Every literal integer `seed` / `noise_seed` input (node id, input), except `exclude`."""
    out = []
    for nid in sorted(workflow, key=_id_key):
        inputs = workflow[nid].get("inputs", {})
        for name in SEED_INPUTS:
            v = inputs.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and (nid, name) != exclude:
                out.append((nid, name))
    return out


def _id_key(nid: str) -> tuple:
    return (0, int(nid), "") if str(nid).isdigit() else (1, 0, str(nid))


def _literal_inputs(inputs: dict) -> list[str]:
    return [k for k, v in inputs.items() if not _is_link(v)]


def read_prompts(path: str | Path) -> list[str]:
    """Prompt lines of a text file: one prompt per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BatchError(f"{p}: no such prompts file") from None
    except UnicodeDecodeError:
        raise BatchError(f"{p}: prompts file is not UTF-8 text") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise BatchError(f"{p}: holds no prompt (one per line; '#' starts a comment)")
    return prompts


def coerce(text: str, current: Any, where: str) -> Any:
    """`text` as the type of the value it replaces (bool, int, float or str)."""
    try:
        if isinstance(current, bool):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(current, int):
            return int(text.strip())
        if isinstance(current, float):
            return float(text.strip())
    except ValueError:
        raise BatchError(f"prompt line {text!r} is not a valid {type(current).__name__} for {where}") from None
    return text


@dataclass
class Job:
    """One submission: the graph to POST, and what was set in it."""

    index: int
    prompt: str
    seed: int | None
    graph: dict


def make_jobs(workflow: dict, prompts: Sequence[str], seeds: int = 1, *, prompt_target: tuple[str, str],
              seed_targets: Sequence[tuple[str, str]]) -> list[Job]:
    """Prompt-major list of jobs: for each prompt line, `seeds` jobs with seed = workflow seed + i."""
    if seeds < 1:
        raise BatchError("--seeds must be at least 1")
    node, name = prompt_target
    current = workflow[node]["inputs"][name]
    where = f"input {name!r} of node {node} ({workflow[node]['class_type']})"
    values = [coerce(p, current, where) for p in prompts]
    bases = {t: int(workflow[t[0]]["inputs"][t[1]]) for t in seed_targets}
    jobs = []
    for pi, (text, value) in enumerate(zip(prompts, values)):
        for si in range(seeds):
            graph = json.loads(json.dumps(workflow))
            graph[node]["inputs"][name] = value
            seed = None
            for (snode, sname), base in bases.items():
                graph[snode]["inputs"][sname] = (base + si) & 0xFFFFFFFFFFFFFFFF
                seed = graph[snode]["inputs"][sname] if seed is None else seed
            jobs.append(Job(len(jobs), text, seed, graph))
    return jobs


# ------------------------------------------------------------------------------------------------ HTTP
class ComfyClient:
    """Minimal client of ComfyUI's HTTP API (loopback or remote), standard library only."""

    def __init__(self, server: str = DEFAULT_SERVER, *, timeout: float = 30.0, client_id: str | None = None):
        server = server.strip()
        if "://" not in server:
            server = "http://" + server
        self.url = server.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or f"nvfp4-calib-{uuid.uuid4().hex[:12]}"
        # A loopback ComfyUI must never be reached through an HTTP proxy from the environment.
        host = urllib.parse.urlparse(self.url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BatchError(f"cannot reach ComfyUI at {self.url} ({reason}); start it or pass --server URL") from None
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def check(self) -> None:
        """The server answers and has this pack's Calibrate node (BatchError otherwise)."""
        status, _ = self.request("GET", "/system_stats")
        if status != 200:
            raise BatchError(f"{self.url} does not look like ComfyUI (GET /system_stats -> HTTP {status})")
        status, info = self.request("GET", "/object_info/" + CALIBRATE_CLASS)
        if status != 200 or not isinstance(info, dict) or CALIBRATE_CLASS not in info:
            raise BatchError(f"ComfyUI at {self.url} has no {CALIBRATE_CLASS} node: install NVFP4 Lab in its "
                             "custom_nodes folder and restart it")

    def submit(self, graph: dict) -> str:
        """POST /prompt; the prompt id. BatchError with the node errors when ComfyUI refuses the graph."""
        status, payload = self.request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        if status == 200 and isinstance(payload, dict) and payload.get("prompt_id"):
            return str(payload["prompt_id"])
        raise BatchError("ComfyUI refused the workflow: " + format_refusal(payload, graph))

    def history(self, prompt_id: str) -> dict | None:
        status, payload = self.request("GET", f"/history/{urllib.parse.quote(prompt_id)}")
        if status != 200 or not isinstance(payload, dict):
            return None
        return payload.get(prompt_id)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Stop `prompt_id` if it runs and drop it from the queue if it waits (errors ignored)."""
        try:
            if prompt_id:
                self.request("POST", "/queue", {"delete": [prompt_id]})
            self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        except BatchError:
            pass

    def wait(self, prompt_id: str, timeout: float, poll: float = 0.25) -> dict:
        """Poll /history until the prompt finished; its history entry. BatchError on failure or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "success" or (status.get("completed") and
                                                             status.get("status_str") is None):
                    return entry
                raise BatchError(format_execution_error(prompt_id, status))
            if time.monotonic() > deadline:
                self.interrupt(prompt_id)
                raise BatchError(f"prompt {prompt_id} did not finish within {timeout:g} s (interrupted); raise "
                                 "--timeout for long workflows")
            time.sleep(poll)


def format_refusal(payload: Any, graph: dict) -> str:
    """One readable line from a POST /prompt refusal ({error, node_errors})."""
    if not isinstance(payload, dict):
        return str(payload)[:500]
    err = payload.get("error")
    parts = []
    if isinstance(err, dict):
        parts.append(" ".join(str(x) for x in (err.get("message"), err.get("details")) if x))
    elif err:
        parts.append(str(err))
    for nid, ne in (payload.get("node_errors") or {}).items():
        cls = ne.get("class_type") or graph.get(nid, {}).get("class_type", "?")
        msgs = "; ".join(" ".join(str(x) for x in (e.get("message"), e.get("details")) if x)
                         for e in ne.get("errors", []))
        parts.append(f"node {nid} ({cls}): {msgs}")
    return " | ".join(p for p in parts if p) or json.dumps(payload)[:500]


def format_execution_error(prompt_id: str, status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {' '.join(str(data.get('exception_message')).split())}")
        if kind == "execution_interrupted":
            return f"prompt {prompt_id} was interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"prompt {prompt_id} ended with status {status.get('status_str')!r}"


# ------------------------------------------------------------------------------------------------ batch
@dataclass
class BatchResult:
    """What ran: per job (prompt, seed, prompt id, seconds), and the session files Calibrate reported."""

    jobs: list[dict] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.jobs)


SESSION_UI_KEY = "nvfp4_session"     # nodes.calibrate_node.SESSION_UI_KEY


def _sessions(entry: dict, graph: dict) -> list[str]:
    """Session files the Calibrate nodes of a finished prompt reported in their ui."""
    out = []
    for node_out in (entry.get("outputs") or {}).values():
        for item in node_out.get(SESSION_UI_KEY, []) if isinstance(node_out, dict) else []:
            if isinstance(item, dict) and item.get("path"):
                out.append(str(item["path"]))
    return out


def run_batch(workflow: dict, prompts: Sequence[str], *, seeds: int = 1, server: str = DEFAULT_SERVER,
              prompt_node: str | None = None, prompt_input: str | None = None, timeout: float = 600.0,
              progress: bool | None = None, poll: float = 0.25,
              on_job_done: Callable[[Job, dict], None] | None = None) -> BatchResult:
    """Submit the workflow once per prompt × seed, one at a time, waiting for each; see the module docstring.

    Stops at the first refused or failed prompt (BatchError with the node's error). Ctrl-C interrupts the prompt in
    flight (and removes it from the queue) before KeyboardInterrupt propagates."""
    import sys

    from tqdm.auto import tqdm

    workflow = validate_api_workflow(workflow)
    target = find_prompt_target(workflow, prompt_node, prompt_input)
    seed_targets = find_seed_targets(workflow, exclude=target)
    if seeds > 1 and not seed_targets:
        raise BatchError("--seeds > 1 but the workflow has no literal seed / noise_seed input to vary")
    jobs = make_jobs(workflow, prompts, seeds, prompt_target=target, seed_targets=seed_targets)
    client = ComfyClient(server)
    client.check()
    result = BatchResult()
    enabled = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(jobs), desc="calibration prompts", unit="prompt", disable=not enabled, file=sys.stderr,
               dynamic_ncols=True)
    current: str | None = None
    try:
        for job in jobs:
            t0 = time.monotonic()
            current = client.submit(job.graph)
            entry = client.wait(current, timeout, poll)
            current = None
            dt = time.monotonic() - t0
            result.jobs.append({"index": job.index, "prompt": job.prompt, "seed": job.seed, "seconds": round(dt, 3)})
            for s in _sessions(entry, job.graph):
                if s not in result.sessions:
                    result.sessions.append(s)
            if on_job_done is not None:
                on_job_done(job, entry)
            bar.set_postfix_str(f"seed {job.seed}" if job.seed is not None else "", refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        if current is not None:
            client.interrupt(current)
        raise
    finally:
        bar.close()
    return result
