"""Helpers for tests that need a real ComfyUI: where it is, importing it in-process, and a headless server.

ComfyUI is found through `COMFYUI_PATH` (default `~/ComfyUI`); its python through `COMFYUI_PYTHON` (default
`$COMFYUI_PATH/.venv/bin/python`). Without ComfyUI, `comfyui`-marked tests skip with the reason shown by
`pytest -ra`; with `CI=true` they fail instead, so integration tests can never silently vanish from CI.
The fixtures built on these helpers live in `conftest.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "nvfp4_lab"  # folder name of the pack under custom_nodes (and the whitelist entry)
SERVER_START_TIMEOUT = 120.0


def in_ci() -> bool:
    """True when running under CI (`CI=true`/`1`/`yes`): missing ComfyUI is then an error, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def comfyui_path() -> Path:
    """ComfyUI's folder: `COMFYUI_PATH`, else `~/ComfyUI` (not checked; see `comfyui_available`)."""
    return Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser()


def comfyui_python() -> Path:
    """The python that runs ComfyUI: `COMFYUI_PYTHON`, else `$COMFYUI_PATH/.venv/bin/python`, else this one."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return Path(env).expanduser()
    venv = comfyui_path() / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def comfyui_available() -> bool:
    return (comfyui_path() / "main.py").is_file()


def missing_reason() -> str:
    return f"ComfyUI not found at {comfyui_path()} (no main.py); set COMFYUI_PATH"


def require_comfyui() -> Path:
    """Return ComfyUI's path; skip the test when it is absent (fail under CI)."""
    if comfyui_available():
        return comfyui_path()
    if in_ci():
        pytest.fail(missing_reason() + " — integration tests must run in CI (CI=true)", pytrace=False)
    pytest.skip(missing_reason())


def import_comfy() -> ModuleType:
    """Make ComfyUI importable in this process, forced onto the CPU; return the `comfy` package.

    `comfy.cli_args.args.cpu` is set before anything imports `comfy.model_management` (which reads it once).
    Raises RuntimeError if model_management was already imported without --cpu.
    """
    root = str(require_comfyui())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    if not args.cpu and "comfy.model_management" in sys.modules:
        raise RuntimeError("comfy.model_management was imported before import_comfy(); it is not on the CPU")
    args.cpu = True
    import comfy

    return comfy


def chromium_executable() -> Path | None:
    """Chromium for browser tests: `CHROMIUM_PATH`, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return Path(env) if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def require_chromium() -> Path:
    """Return Chromium's path; skip the test without it (fail under CI, which installs it in .ci/run)."""
    exe = chromium_executable()
    if exe is not None:
        return exe
    reason = "Chromium not found (install Debian's chromium or set CHROMIUM_PATH)"
    if in_ci():
        pytest.fail(reason + " — browser tests must run in CI (CI=true)", pytrace=False)
    pytest.skip(reason)


class ComfyError(RuntimeError):
    """A prompt was refused (HTTP 400) or failed while executing; the message says which node and why."""


class ComfyServer:
    """A ComfyUI server started by the `comfy_server` fixture (loopback only).

    base: the --base-directory; models_dir: base/models/diffusion_models; output_dir: base/output.
    """

    def __init__(self, base: Path, workdir: Path, python: Path, comfy_root: Path):
        self.base = base
        self.workdir = workdir
        self.models_dir = base / "models" / "diffusion_models"
        self.input_dir = base / "input"
        self.output_dir = base / "output"
        self.log_path = workdir / "server.log"
        self.python = python
        self.comfy_root = comfy_root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        # Never route loopback requests through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- lifecycle -------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [str(self.python), str(self.comfy_root / "main.py"), "--cpu",
                "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
                "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME, "--disable-api-nodes",
                "--cache-none",  # every prompt re-executes every node: tests do not depend on each other's cache
                "--listen", "127.0.0.1", "--port", str(self.port), "--dont-print-server"]

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        for d in (self.base / "custom_nodes", self.models_dir, self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            # cwd = workdir: ComfyUI writes comfyui_detail.log into its working directory.
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer GET /system_stats within {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 15 s)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=15)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- logs ------------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self) -> list[str]:
        """Log lines saying our pack failed to import (ComfyUI logs them and carries on)."""
        return [ln for ln in self.log_text().splitlines()
                if "(IMPORT FAILED)" in ln and Path(ln.rsplit(": ", 1)[-1].strip()).name == PACK_NAME]

    # -- HTTP ------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        """(status, decoded JSON or text) for `method path`; HTTP errors are returned, not raised."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def get_json(self, path: str, timeout: float = 30) -> Any:
        status, payload = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> HTTP {status}: {payload}")
        return payload

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (or /object_info/<node_class>): {node id: definition}."""
        path = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self.get_json(path, timeout=120)

    def queue(self, graph: dict) -> str:
        """POST an API-format graph to /prompt; return its prompt_id. Raises ComfyError (with node_errors) on 400."""
        status, payload = self.request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200:
            if isinstance(payload, dict):
                detail = json.dumps({"error": payload.get("error"), "node_errors": payload.get("node_errors")},
                                    indent=1)
            else:
                detail = str(payload)
            raise ComfyError(f"POST /prompt refused (HTTP {status}):\n{detail}")
        return payload["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Poll /history/<prompt_id> until the prompt finished; return its history entry.

        Raises ComfyError with the node, exception and traceback if execution failed, or on timeout / server exit.
        """
        deadline = time.monotonic() + timeout
        while True:
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if isinstance(hist, dict) else None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "success":
                    return entry
                raise ComfyError(_execution_error(prompt_id, status))
            if not self.alive():
                raise ComfyError(f"ComfyUI died while running prompt {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """queue() + wait(): run a graph to completion and return its history entry."""
        return self.wait(self.queue(graph), timeout=timeout)

    # -- files -----------------------------------------------------------------------------------------------
    def upload_model(self, path: str | Path, name: str | None = None) -> str:
        """Copy a model into models/diffusion_models; return the name UNETLoader's `unet_name` takes."""
        name = name or Path(path).name
        shutil.copyfile(path, self.models_dir / name)
        return name

    def output_files(self, entry: dict, kind: str | None = None) -> list[Path]:
        """Paths of the files a history entry's output nodes reported (ui lists such as "images", "latents")."""
        files = []
        for node_out in entry.get("outputs", {}).values():
            for key, items in node_out.items():
                if kind is not None and key != kind:
                    continue
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        root = self.output_dir if item.get("type", "output") == "output" else self.base / item["type"]
                        files.append(root / item.get("subfolder", "") / item["filename"])
        return files


def _execution_error(prompt_id: str, status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (f"prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
        if kind == "execution_interrupted":
            return f"prompt {prompt_id} was interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"prompt {prompt_id} ended with status {json.dumps(status)}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- graphs shared by the integration tests -----------------------------------------------------------------
def sampling_graph(unet_name: str, latent: dict, prefix: str, *, loader: str = "UNETLoader", steps: int = 4) -> dict:
    """A model loader (UNETLoader or NVFP4LoadModel) -> KSampler (cfg 2, Lotus conditioning, zeroed negative) ->
    SaveLatent; no VAE."""
    name_input = "unet_name" if loader == "UNETLoader" else "model_name"
    return {
        "1": {"class_type": loader, "inputs": {name_input: unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "LotusConditioning", "inputs": {}},
        "3": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["2", 0]}},
        "4": latent,
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 0, "steps": steps, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": prefix}},
    }


FLUX_LATENT = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}}
WAN_LATENT = {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}}
