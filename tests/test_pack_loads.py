"""The pack loads in a real ComfyUI, registers its nodes, leaves ComfyUI untouched, and its core stays ComfyUI-free."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap

import pytest
from comfy_support import PACK_NAME, REPO_ROOT, comfyui_path, comfyui_python

# Every node id the project promises (README node list). Missing ones fail here until their module lands.
REQUIRED_NODE_IDS = [
    "NVFP4LoadModel",
    "NVFP4InspectLayers",
    "NVFP4BuildPlan",
    "NVFP4SaveCheckpoint",
    "NVFP4EmulateW4A4",
    "NVFP4Calibrate",
    "NVFP4CalibrationReport",
    "NVFP4BakeInputScales",
    "NVFP4SensitivityProbe",
]

# Modules of ComfyUI itself (comfy_kitchen is the kernel library, allowed in the core).
COMFY_TOP_LEVEL = {"folder_paths", "nodes", "execution", "server", "node_helpers", "latent_preview", "comfyui_version"}


def _is_comfyui_module(name: str) -> bool:
    top = name.split(".", 1)[0]
    return (top.startswith("comfy") and not top.startswith("comfy_kitchen")) or top in COMFY_TOP_LEVEL


def _node_id(cls) -> str:
    return cls.define_schema().node_id


# ---- (a) in a running server ------------------------------------------------------------------------------


def test_server_imports_pack_and_lists_its_nodes(comfy_server, comfy):
    from nvfp4_lab.nodes.registry import node_classes

    assert not comfy_server.import_failures(), comfy_server.log_tail()
    assert re.search(rf"seconds: .*custom_nodes[/\\]{PACK_NAME}\s*$", comfy_server.log_text(), re.M), \
        "ComfyUI's import-times list does not show the pack:\n" + comfy_server.log_tail()
    info = comfy_server.object_info()
    registered = [_node_id(c) for c in node_classes()]
    assert len(registered) == len(set(registered)), f"duplicate node ids: {registered}"
    missing_registered = [n for n in registered if n not in info]
    assert not missing_registered, f"registered by the pack but absent from /object_info: {missing_registered}"
    missing_required = [n for n in REQUIRED_NODE_IDS if n not in info]
    assert not missing_required, f"node ids the project must provide are not registered: {missing_required}"


# ---- (b) in-process, importing the pack exactly as ComfyUI's nodes.load_custom_node does ------------------


def _comfy_attribute_snapshot() -> dict[str, dict[str, object]]:
    return {name: dict(vars(mod)) for name, mod in list(sys.modules.items())
            if mod is not None and _is_comfyui_module(name)}


def test_pack_import_changes_no_comfy_attribute(comfy, tmp_path):
    import importlib.util
    import types

    import comfy.model_management  # noqa: F401  - everything the nodes may touch, imported before the snapshot
    import comfy.ops  # noqa: F401
    import comfy.sd  # noqa: F401
    import nodes  # noqa: F401
    from comfy_api.latest import ComfyExtension, io

    pack_dir = tmp_path / "custom_nodes" / PACK_NAME
    pack_dir.parent.mkdir()
    pack_dir.symlink_to(REPO_ROOT, target_is_directory=True)
    module_path = str(pack_dir)
    module_name = module_path.replace(".", "_x_")  # ComfyUI's sys.modules name for a folder pack

    before = _comfy_attribute_snapshot()
    try:
        spec = importlib.util.spec_from_file_location(module_name, pack_dir / "__init__.py",
                                                      submodule_search_locations=[module_path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        assert getattr(module, "NODE_CLASS_MAPPINGS", None) is None, \
            "a NODE_CLASS_MAPPINGS makes ComfyUI treat the pack as V1 and ignore comfy_entrypoint"

        async def load():
            ext = await module.comfy_entrypoint()
            assert isinstance(ext, ComfyExtension)
            await ext.on_load()
            return await ext.get_node_list()

        node_list = asyncio.run(load())
    finally:
        for name in [n for n in sys.modules if n == module_name or n.startswith(module_name + ".")]:
            del sys.modules[name]
    assert isinstance(node_list, list)
    assert all(isinstance(c, type) and issubclass(c, io.ComfyNode) for c in node_list), node_list

    after = _comfy_attribute_snapshot()
    changed = []
    for mod_name, attrs in before.items():
        now = after.get(mod_name, {})
        for attr, value in attrs.items():
            if attr not in now:
                changed.append(f"{mod_name}.{attr} deleted")
            elif now[attr] is not value:
                changed.append(f"{mod_name}.{attr} replaced")
        for attr in now.keys() - attrs.keys():  # new submodules appear as attributes of their parent: fine
            if not isinstance(now[attr], types.ModuleType):
                changed.append(f"{mod_name}.{attr} added")
    assert not changed, "importing/loading the pack modified ComfyUI:\n" + "\n".join(sorted(changed))


# ---- (c) plain Python: the core never imports ComfyUI -----------------------------------------------------


def _core_modules() -> list[str]:
    mods = ["nvfp4_lab"]
    for pkg in ("quant", "calibration", "cli"):
        if (REPO_ROOT / pkg / "__init__.py").exists():
            mods.append(f"nvfp4_lab.{pkg}")
            mods += sorted(f"nvfp4_lab.{pkg}.{p.stem}" for p in (REPO_ROOT / pkg).glob("*.py") if p.stem != "__init__")
    return mods


CHECK_IMPORTS = textwrap.dedent("""
    import importlib, importlib.util, json, sys
    repo, comfy_root, mods = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    allowed, top = tuple(json.loads(sys.argv[4])), set(json.loads(sys.argv[5]))
    sys.path.insert(0, comfy_root)  # ComfyUI importable: a stray `import comfy` would succeed and be seen
    spec = importlib.util.spec_from_file_location("nvfp4_lab", repo + "/__init__.py", submodule_search_locations=[repo])
    pkg = importlib.util.module_from_spec(spec); sys.modules["nvfp4_lab"] = pkg; spec.loader.exec_module(pkg)
    def comfy_mods():
        return {m for m in sys.modules if m.split(".")[0] in top or (m.split(".")[0].startswith("comfy") and not m.split(".")[0].startswith(allowed))}
    report = {"failed": {}, "leaks": {}}
    for m in mods:
        before = comfy_mods()
        try:
            importlib.import_module(m)
        except Exception as e:
            report["failed"][m] = f"{type(e).__name__}: {e}"
        new = sorted(comfy_mods() - before)
        if new:
            report["leaks"][m] = new[:8]
    print("REPORT " + json.dumps(report))
""")


def test_core_imports_no_comfyui(tmp_path):
    mods = _core_modules()
    assert "nvfp4_lab.quant.formats" in mods and "nvfp4_lab.calibration" in mods
    proc = subprocess.run(
        [str(comfyui_python()), "-c", CHECK_IMPORTS, str(REPO_ROOT), str(comfyui_path()), json.dumps(mods),
         json.dumps(["comfy_kitchen"]), json.dumps(sorted(COMFY_TOP_LEVEL))],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    report = json.loads(line[len("REPORT "):])
    assert not report["failed"], "core modules fail to import:\n" + json.dumps(report["failed"], indent=1)
    assert not report["leaks"], ("core modules import ComfyUI (only nodes/ may):\n"
                                 + json.dumps(report["leaks"], indent=1))


# ---- (d) packaging metadata -------------------------------------------------------------------------------


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _requirements(lines) -> set[str]:
    from packaging.requirements import Requirement

    out = set()
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            out.add(f"{r.name.lower().replace('_', '-')}{r.specifier}{';' + str(r.marker) if r.marker else ''}")
    return out


def test_pyproject_is_registry_ready():
    py = _pyproject()
    project, comfy_tool = py["project"], py.get("tool", {}).get("comfy", {})
    assert "comfyui" not in project["name"].lower(), "the Comfy Registry rejects 'ComfyUI' in the name"
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?", project["version"]), project["version"]
    lic = project["license"]
    if isinstance(lic, dict) and "file" in lic:
        assert (REPO_ROOT / lic["file"]).is_file(), f"license file {lic['file']} is missing"
    else:
        assert (REPO_ROOT / "LICENSE").is_file()
    assert project.get("urls", {}).get("Repository", "").startswith("https://")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert key in comfy_tool, f"[tool.comfy] {key} missing"
    assert comfy_tool["PublisherId"] and comfy_tool["DisplayName"]
    reqs = _requirements((REPO_ROOT / "requirements.txt").read_text().splitlines())
    assert reqs == _requirements(project["dependencies"]), \
        "requirements.txt (ComfyUI-Manager installs it) and [project].dependencies differ"
