"""Shared pytest fixtures: a real ComfyUI (in-process or as a headless server) and tiny model files.

Fixtures (all session-scoped; any test using the ComfyUI ones is marked `comfyui` automatically):
  comfyui_path   Path of ComfyUI (COMFYUI_PATH, default ~/ComfyUI)
  comfy          ComfyUI importable in this process, on the CPU; the `comfy` package (see comfy_support.import_comfy)
  comfy_env      alias of `comfy`
  comfy_server   a ComfyServer: ComfyUI's main.py with only this pack loaded, on 127.0.0.1 (see comfy_support)
  tiny_flux_file / tiny_wan_file   default tiny models (quant.tiny_models) written once into a temp folder
  chromium_path  Path of a Chromium executable (tests marked `browser`)
`comfyui` / `browser` tests skip with a visible reason when ComfyUI / Chromium is absent, and fail under CI=true.
`import nvfp4_lab` always loads this checkout (see _pin_package_to_checkout), here and in subprocesses.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from comfy_support import (
    REPO_ROOT,
    ComfyServer,
    comfyui_available,
    comfyui_path as _comfyui_path,
    comfyui_python,
    import_comfy,
    in_ci,
    require_chromium,
    require_comfyui,
)

COMFY_FIXTURES = {"comfyui_path", "comfy", "comfy_env", "comfy_server"}  # their users get the `comfyui` mark


def _pin_package_to_checkout() -> None:
    """Make `import nvfp4_lab` load this checkout, in this process and in subprocesses.

    The editable install in ComfyUI's venv may point at another clone (CI clones, other worktrees); tests must
    exercise the files next to them. In-process: load the package from REPO_ROOT. Subprocesses: a temp folder
    holding `nvfp4_lab -> REPO_ROOT`, first on PYTHONPATH (sys.path beats the editable finder).
    """
    if "nvfp4_lab" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nvfp4_lab", REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["nvfp4_lab"] = module
        spec.loader.exec_module(module)
    shim = Path(tempfile.mkdtemp(prefix="nvfp4_lab_pythonpath_"))
    (shim / "nvfp4_lab").symlink_to(REPO_ROOT, target_is_directory=True)
    atexit.register(shutil.rmtree, shim, True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


_pin_package_to_checkout()


def pytest_report_header(config):
    state = "found" if comfyui_available() else "NOT FOUND (comfyui tests " + ("fail: CI=true)" if in_ci() else "skip)")
    import nvfp4_lab

    return [f"ComfyUI: {_comfyui_path()} {state}; server python: {comfyui_python()}",
            f"nvfp4_lab under test: {Path(nvfp4_lab.__file__).parent}"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if COMFY_FIXTURES.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker("comfyui"):
            item.add_marker(pytest.mark.comfyui)


def pytest_runtest_setup(item):
    if item.get_closest_marker("comfyui"):
        require_comfyui()
    if item.get_closest_marker("browser"):
        require_chromium()


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return require_comfyui()


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    return require_chromium()


@pytest.fixture(scope="session")
def comfy():
    return import_comfy()


@pytest.fixture(scope="session")
def comfy_env(comfy):
    return comfy


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, comfyui_path):
    root = tmp_path_factory.mktemp("comfy_server")
    (root / "cwd").mkdir()
    server = ComfyServer(base=root / "base", workdir=root / "cwd", python=comfyui_python(), comfy_root=comfyui_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.log_path.exists():  # kept for CI debugging (test-artifacts/ is git-ignored)
            artifacts = REPO_ROOT / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            shutil.copyfile(server.log_path, artifacts / "comfy_server.log")
    failures = server.import_failures()
    assert not failures, "ComfyUI could not import the pack:\n" + "\n".join(failures) + "\n" + server.log_tail()


@pytest.fixture(scope="session")
def tiny_flux_file(tmp_path_factory) -> Path:
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    return write_tiny_model("flux", tmp_path_factory.mktemp("tiny") / "tiny_flux.safetensors")


@pytest.fixture(scope="session")
def tiny_wan_file(tmp_path_factory) -> Path:
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    return write_tiny_model("wan", tmp_path_factory.mktemp("tiny") / "tiny_wan.safetensors")
