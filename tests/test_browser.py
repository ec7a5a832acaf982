"""The web extension (web/nvfp4_lab.js) in a real browser: headless Chromium (Playwright, no browser download) on the
ComfyUI page of the headless test server.

Checks: the frontend loads our extension; every shipped example workflow loads in the frontend with all its node
types registered and its widget values intact; queuing convert_with_preset.json from the page renders our tables
(sortable, filterable, with a bar chart) inside the nodes; the tables come back from the node properties when the
workflow is reloaded; Calibrate (NVFP4) shows live counts from the "nvfp4lab.calibration" websocket event.

Screenshot of the executed example: test-artifacts/browser_graph.png; with NVFP4LAB_UPDATE_DOCS=1 it is also copied to
docs/graph.png (the README picture). Chromium: the `chromium_path` fixture (CHROMIUM_PATH or chromium on PATH).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
from comfy_support import REPO_ROOT, in_ci
from test_example_workflows import EXAMPLES, ensure_tiny_models

pytestmark = [pytest.mark.comfyui, pytest.mark.browser]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the `test` extra installs it
    if in_ci():
        raise
    pytest.skip("the playwright package is not installed (pip install -e '.[test]')", allow_module_level=True)

ARTIFACTS = REPO_ROOT / "test-artifacts"
DOCS_PICTURE = REPO_ROOT / "docs" / "graph.png"
EXTENSION_JS = "/extensions/nvfp4_lab/nvfp4_lab.js"
VIEWPORT = {"width": 1600, "height": 1000}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--no-proxy-server"]
# Frontend settings for a clean, deterministic page: no first-run template browser, no minimap / fps overlay, full
# node detail at the zoom a fitted view needs.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
}
# Console errors that are not about our pack: the frontend probing the internet for the default workflow's models
# (blocked offline by its Content-Security-Policy) and optional per-user files that a fresh server lacks.
BENIGN_ERRORS = [r"Content Security Policy", r"Failed to load resource: .*\b404\b.*\((?:.*/api/userdata|.*/user\.css)",
                 r"Failed to load resource: .*\b404\b.*\(\)$"]
APP_TIMEOUT_MS = 180_000  # first page load compiles a large bundle; 2 slow cores in CI
RUN_TIMEOUT_MS = 300_000


# ---- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server):
    ensure_tiny_models(comfy_server)
    for key, value in SETTINGS.items():
        status, body = comfy_server.request("POST", "/settings/" + key, value)
        assert status == 200, (key, status, body)
    return comfy_server


class Page:
    """A Playwright page on the ComfyUI app, with the console errors, page errors and responses it saw."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.responses: list[tuple[int, str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("response", self._response)

    def _response(self, response) -> None:
        self.responses.append((response.status, response.url))
        if response.status >= 400 and "nvfp4" in response.url.lower():
            self.errors.append(f"HTTP {response.status}: {response.url}")

    def _console(self, message) -> None:
        if message.type != "error":
            return
        url = (message.location or {}).get("url", "")
        text = f"console.error: {message.text} ({url})"
        if not any(re.search(p, text) for p in BENIGN_ERRORS):
            self.errors.append(text)

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def wait(self, expression: str, arg=None, timeout: float = 60_000):
        return self.page.wait_for_function(expression, arg=arg, timeout=timeout)

    def errors_since(self, mark: int) -> list[str]:
        return self.errors[mark:]


@pytest.fixture(scope="module")
def app_page(server, chromium_path, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(chromium_path), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            device_scale_factor=1)
        try:
            page = Page(context.pages[0] if context.pages else context.new_page())
            page.page.goto(server.url + "/", wait_until="domcontentloaded", timeout=APP_TIMEOUT_MS)
            # `app.canvas.graph` (not `app.graph`, which logs an error when read before the app is initialised)
            page.wait("() => !!(window.NVFP4Lab && window.app && window.app.canvas && window.app.canvas.graph)",
                      timeout=APP_TIMEOUT_MS)
            page.js("() => new Promise(r => setTimeout(r, 500))")  # let start-up toasts and dialogs settle
            dismiss_overlays(page)
            yield page
        finally:
            context.close()


def dismiss_overlays(page: Page) -> None:
    """Close toasts and dialogs the frontend may show on start (they would cover the screenshot)."""
    page.js("""() => {
        document.querySelectorAll('.p-toast-close-button, .p-dialog-close-button').forEach(b => b.click());
        document.querySelectorAll('.p-toast-message').forEach(t => t.remove());
    }""")
    page.page.keyboard.press("Escape")


# ---- page helpers ---------------------------------------------------------------------------------------------------

def load_workflow(page: Page, workflow: dict, name: str | None = None) -> None:
    page.js("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [workflow, name])
    page.wait("() => window.app.canvas.graph && window.app.canvas.graph._nodes.length > 0")


def graph_nodes(page: Page) -> list[dict]:
    return page.js("""() => window.app.canvas.graph._nodes.map(n => ({
        id: n.id, type: n.type, comfyClass: n.comfyClass || null,
        registered: !!(window.LiteGraph.registered_node_types[n.type]),
        widgets_values: n.serialize().widgets_values ?? null,
        has_errors: !!n.has_errors,
    }))""")


def queue_and_wait(page: Page, timeout: float = RUN_TIMEOUT_MS) -> dict:
    """Queue the page's graph as the Run button does; wait for the prompt's end; return {prompt_id, ok, error}."""
    page.js("""() => {
        window.__nvfp4labTest = {done: null};
        const api = window.comfyAPI.api.api;
        if (!window.__nvfp4labTestHooked) {
            window.__nvfp4labTestHooked = true;
            api.addEventListener('execution_success', e => { window.__nvfp4labTest.done = {ok: true, ...e.detail}; });
            api.addEventListener('execution_error', e => { window.__nvfp4labTest.done = {ok: false, ...e.detail}; });
            api.addEventListener('execution_interrupted', e => {
                window.__nvfp4labTest.done = {ok: false, interrupted: true, ...e.detail}; });
        }
    }""")
    queued = page.js("async () => await window.app.queuePrompt(0, 1)")
    assert queued is not False, "app.queuePrompt refused the graph: " + "\n".join(page.errors[-10:])
    page.wait("() => window.__nvfp4labTest.done !== null", timeout=timeout)
    return page.js("() => window.__nvfp4labTest.done")


def rendered_tables(page: Page) -> dict[str, list[dict]]:
    """{node id: [{title, rows (data attribute), headers, bars}]} for every table our extension rendered."""
    return page.js("""() => {
        const out = {};
        for (const view of document.querySelectorAll('.nvfp4lab-view')) {
            const id = view.dataset.nvfp4labNode;
            out[id] = [...view.querySelectorAll('.nvfp4lab-panel')].map(p => ({
                title: p.dataset.nvfp4labTitle,
                rows: Number(p.querySelector('.nvfp4lab-table').dataset.nvfp4labRows),
                tr: p.querySelectorAll('.nvfp4lab-table tbody tr').length,
                headers: [...p.querySelectorAll('.nvfp4lab-table th')].map(th => th.firstChild.textContent),
                bars: p.querySelectorAll('.nvfp4lab-bar-row').length,
                visible: p.getBoundingClientRect().width > 0,
            }));
        }
        return out;
    }""")


def column_texts(page: Page, node_id, col: int) -> list[str]:
    return page.js("""([id, col]) => [...document.querySelectorAll(
        `.nvfp4lab-view[data-nvfp4lab-node="${id}"] .nvfp4lab-table tbody tr`)]
        .map(tr => tr.children[col].textContent)""", [str(node_id), col])


def set_focus_mode(page: Page, on: bool) -> None:
    """Focus mode hides the menus and side bars: the canvas gets the whole window (clean screenshots, no overlap)."""
    page.js("""async (on) => {
        const manager = window.app.extensionManager;
        if (!!manager.focusMode !== on) await manager.command.execute('Workspace.ToggleFocusMode');
    }""", on)
    page.js("() => new Promise(r => setTimeout(r, 400))")


def fit_view(page: Page, margin: int = 24) -> float:
    """Zoom and pan so every node and group fills the canvas (no upscaling past 100%); return the zoom."""
    scale = page.js("""(margin) => {
        const c = window.app.canvas, g = c.graph;
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        const add = (b) => { if (!b) return; x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                             x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); };
        for (const n of g._nodes) add(n.boundingRect);
        for (const group of (g._groups ?? g.groups ?? [])) add(group._bounding ?? group.boundingRect);
        const W = c.canvas.clientWidth, H = c.canvas.clientHeight;
        const s = Math.min((W - 2 * margin) / (x1 - x0), (H - 2 * margin) / (y1 - y0), 1);
        c.deselectAll?.();
        c.ds.scale = s;
        c.ds.offset[0] = (W / s - (x1 - x0)) / 2 - x0;
        c.ds.offset[1] = (H / s - (y1 - y0)) / 2 - y0;
        c.setDirty(true, true);
        return s;
    }""", margin)
    page.js("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 300))))")
    return scale


def save_screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    dismiss_overlays(page)
    page.page.mouse.move(2, VIEWPORT["height"] - 2)  # no hover highlight
    path = ARTIFACTS / name
    page.page.screenshot(path=str(path))
    return path


def as_number(text: str) -> float | None:
    t = text.strip().replace(",", "")
    if not t:
        return None
    return float(t)


# ---- tests ---------------------------------------------------------------------------------------------------------

def test_frontend_loads_the_extension(app_page):
    ok = [(s, u) for s, u in app_page.responses if u.split("?")[0].endswith(EXTENSION_JS)]
    assert ok and all(s == 200 for s, _ in ok), f"{EXTENSION_JS} was not served: {ok}"
    state = app_page.js("""() => ({
        marker: window.NVFP4Lab && window.NVFP4Lab.version,
        registered: window.app.extensions.some(e => e.name === window.NVFP4Lab.extension),
        css: !!document.querySelector('link[data-nvfp4lab]'),
        ourTypes: Object.keys(window.LiteGraph.registered_node_types).filter(t => t.startsWith('NVFP4')),
    })""")
    assert state["marker"], state
    assert state["registered"], "app.registerExtension did not register nvfp4lab.table"
    assert state["css"]
    assert {"NVFP4LoadModel", "NVFP4InspectLayers", "NVFP4BuildPlan", "NVFP4SaveCheckpoint"} <= set(state["ourTypes"])
    css = [(s, u) for s, u in app_page.responses if u.endswith("/extensions/nvfp4_lab/nvfp4_lab.css")]
    assert css and css[-1][0] == 200, css
    ours = [e for e in app_page.errors if "nvfp4" in e.lower()]
    assert not ours, ours


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_example_workflow_loads_in_the_frontend(app_page, server, name):
    workflow = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    mark = len(app_page.errors)
    load_workflow(app_page, workflow, Path(name).stem)
    nodes = graph_nodes(app_page)
    assert len(nodes) == len(workflow["nodes"]), (len(nodes), len(workflow["nodes"]))
    missing = sorted({n["type"] for n in nodes if not n["registered"]})
    assert not missing, f"{name}: node types the frontend does not know (missing nodes): {missing}"
    info = server.object_info()
    frontend_only = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
    unknown = sorted({n["type"] for n in nodes if n["type"] not in info and n["type"] not in frontend_only})
    assert not unknown, f"{name}: types the server does not register: {unknown}"
    # widget values survive the round trip through the node definitions (a renamed/removed widget would shift them)
    saved = {str(n["id"]): n.get("widgets_values") for n in workflow["nodes"]}
    for n in nodes:
        if saved.get(str(n["id"])) is not None:
            assert n["widgets_values"] == saved[str(n["id"])], (name, n["id"], n["type"], n["widgets_values"],
                                                           saved[str(n["id"])])
    links = app_page.js("() => { const l = window.app.canvas.graph.links; return l instanceof Map ? l.size : "
                        "Object.keys(l).length; }")
    assert links == len(workflow["links"]), (links, len(workflow["links"]))
    # the frontend can turn it into an API prompt (what the Run button sends)
    prompt = app_page.js("async () => (await window.app.graphToPrompt()).output")
    assert {v["class_type"] for v in prompt.values()} <= set(info)
    errors = app_page.errors_since(mark)
    assert not errors, f"{name}: errors while loading:\n" + "\n".join(errors)


def test_convert_example_renders_sortable_tables(app_page, server):
    workflow = json.loads((EXAMPLES / "convert_with_preset.json").read_text(encoding="utf-8"))
    load_workflow(app_page, workflow, "convert_with_preset")
    nodes = graph_nodes(app_page)
    ours = {str(n["id"]): n["type"] for n in nodes if n["type"].startswith("NVFP4")}
    assert {"NVFP4LoadModel", "NVFP4BuildPlan", "NVFP4SaveCheckpoint"} <= set(ours.values()), ours
    # a fresh output name: the shared server's models folder may already hold the example's file
    filename = f"nvfp4lab_browser_{uuid.uuid4().hex[:8]}"
    set_ok = app_page.js("""(name) => {
        const node = window.app.canvas.graph._nodes.find(n => n.type === 'NVFP4SaveCheckpoint');
        const w = node && node.widgets.find(w => w.name === 'filename');
        if (!w) return false;
        w.value = name;
        return true;
    }""", filename)
    assert set_ok
    mark = len(app_page.errors)
    t0 = time.monotonic()
    done = queue_and_wait(app_page)
    assert done.get("ok"), f"prompt failed: {done}\n{server.log_tail(30)}"
    entry = server.wait(done["prompt_id"])
    expected = {nid: out["nvfp4_table"] for nid, out in entry["outputs"].items() if "nvfp4_table" in out}
    assert expected, f"no node reported a table: {list(entry['outputs'])}"
    app_page.wait("(n) => document.querySelectorAll('.nvfp4lab-view').length >= n", len(expected))
    app_page.wait("() => document.querySelector('.nvfp4lab-table tbody tr') !== null")
    print(f"run + render: {time.monotonic() - t0:.1f} s; tables from nodes {sorted(expected)}")

    shown = rendered_tables(app_page)
    for nid, payloads in expected.items():
        assert nid in shown, f"node {nid} ({ours.get(nid)}) sent a table that was not rendered"
        assert len(shown[nid]) == len(payloads)
        for view, payload in zip(shown[nid], payloads):
            assert view["title"] == payload["title"]
            assert view["headers"] == payload["columns"]
            assert view["rows"] == view["tr"] == len(payload["rows"]) > 0
            assert view["visible"]
            if payload["chart"]:
                values = [r[payload["chart"]["column"]] for r in payload["rows"]]
                want = min(payload["chart"]["top"], sum(isinstance(v, (int, float)) for v in values))
                assert view["bars"] == want

    # layout: a node placed in a group still ends inside it once its table arrived (nodes grow when they render)
    outside = app_page.js("""() => {
        const g = window.app.canvas.graph;
        const out = [];
        for (const grp of g._groups ?? g.groups ?? []) {
            const [gx, gy, gw, gh] = Array.from(grp._bounding ?? grp.bounding);
            for (const n of g._nodes) {
                const [x, y] = n.pos, [w, h] = n.size;
                if (x >= gx && y >= gy && x < gx + gw && y < gy + gh && (x + w > gx + gw + 1 || y + h > gy + gh + 1))
                    out.push([grp.title, n.id, n.type, [x, y, w, h], [gx, gy, gw, gh]]);
            }
        }
        return out;
    }""")
    assert not outside, f"nodes stick out of their group after rendering: {outside}"

    # the README picture: the executed example with its tables, fitted into the window without menus
    set_focus_mode(app_page, True)
    zoom = fit_view(app_page)  # also puts every table on screen: clicks need their elements in the viewport
    shot = save_screenshot(app_page, "browser_graph.png")
    print(f"screenshot at zoom {zoom:.2f}: {shot}")
    assert shot.stat().st_size > 20_000
    scrolls = app_page.js("""() => [...document.querySelectorAll('.nvfp4lab-view')].map(v => {
        const s = v.querySelector('.nvfp4lab-scroll');
        return {id: v.dataset.nvfp4labNode, scrollable: s.scrollHeight > s.clientHeight + 1,
                inside: s.getBoundingClientRect().bottom <= v.getBoundingClientRect().bottom + 1};
    })""")
    assert all(s["inside"] for s in scrolls), scrolls
    assert any(s["scrollable"] for s in scrolls), "long tables scroll inside the node"

    # sorting: the plan table by a numeric column, then by layer name
    plan_id = next(nid for nid in expected if ours.get(nid) == "NVFP4BuildPlan")
    payload = expected[plan_id][0]
    col = next(i for i, (c, num) in enumerate(zip(payload["columns"], payload["numeric"]))
               if num and "bytes" not in c and len({r[i] for r in payload["rows"]}) > 1)
    header = app_page.page.locator(f'.nvfp4lab-view[data-nvfp4lab-node="{plan_id}"] .nvfp4lab-table th').nth(col)
    header.click()
    assert header.get_attribute("data-sort") == "descending"
    values = [as_number(t) for t in column_texts(app_page, plan_id, col)]
    present = [v for v in values if v is not None]
    assert present == sorted(present, reverse=True) and values[:len(present)] == present, values[:12]
    header.click()
    assert header.get_attribute("data-sort") == "ascending"
    present = [v for v in (as_number(t) for t in column_texts(app_page, plan_id, col)) if v is not None]
    assert present == sorted(present)
    name_header = app_page.page.locator(f'.nvfp4lab-view[data-nvfp4lab-node="{plan_id}"] .nvfp4lab-table th').nth(0)
    name_header.click()
    assert name_header.get_attribute("data-sort") == "ascending"
    names = column_texts(app_page, plan_id, 0)
    block_numbers = [int(m.group(1)) for t in names if (m := re.match(r"double_blocks\.(\d+)\.img_attn\.qkv$", t))]
    assert block_numbers == sorted(block_numbers), "text columns sort numbers inside names naturally"

    # filtering
    box = app_page.page.locator(f'.nvfp4lab-view[data-nvfp4lab-node="{plan_id}"] .nvfp4lab-filter')
    box.fill("/^single_blocks/")
    filtered = column_texts(app_page, plan_id, 0)
    assert filtered and all(t.startswith("single_blocks") for t in filtered)
    assert len(filtered) < len(payload["rows"])
    box.fill("")
    assert len(column_texts(app_page, plan_id, 0)) == len(payload["rows"])

    errors = [e for e in app_page.errors_since(mark) if "nvfp4" in e.lower() or "pageerror" in e]
    assert not errors, errors
    set_focus_mode(app_page, False)

    # the tables were cached in the node properties: a reload of the serialised workflow shows them again
    serialised = app_page.js("() => window.app.canvas.graph.serialize()")
    cached = {str(n["id"]) for n in serialised["nodes"] if (n.get("properties") or {}).get("nvfp4lab_table")}
    assert set(expected) <= cached, (sorted(expected), sorted(cached))
    app_page.js("() => window.app.canvas.graph.clear()")
    app_page.wait("() => document.querySelectorAll('.nvfp4lab-view').length === 0 || "
                  "[...document.querySelectorAll('.nvfp4lab-view')].every(v => !v.isConnected || "
                  "v.getBoundingClientRect().width === 0)")
    load_workflow(app_page, serialised)
    app_page.wait("(n) => document.querySelectorAll('.nvfp4lab-view .nvfp4lab-table tbody tr').length > 0 && "
                  "document.querySelectorAll('.nvfp4lab-view').length >= n", len(expected))
    restored = rendered_tables(app_page)
    for nid in expected:
        assert restored.get(nid) and restored[nid][0]["rows"] > 0, (nid, restored)

    if os.environ.get("NVFP4LAB_UPDATE_DOCS") == "1":  # only a picture from a passing run goes into the docs
        DOCS_PICTURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_PICTURE)


def test_large_table_renders_sorts_and_filters(app_page):
    """2000 rows (ui.MAX_ROWS) with empty cells, rendered directly through the extension's show() hook."""
    app_page.js("() => window.app.canvas.graph.clear()")
    result = app_page.js("""() => {
        const g = window.app.canvas.graph;
        const node = window.LiteGraph.createNode('NVFP4InspectLayers');
        node.pos = [60, 60];
        g.add(node);
        const rows = [];
        for (let i = 0; i < 2000; i++) {
            rows.push([`blocks.${i}.linear`, i % 3 ? 'nvfp4' : 'bf16', i % 7 === 0 ? null : (i * 7919) % 2003,
                       i % 11 === 0 ? null : i / 3]);
        }
        const payload = {title: 'many rows', columns: ['layer', 'format', 'params', 'score'], rows,
                         numeric: [false, false, true, true], sort: {column: 2, descending: true},
                         chart: {label: 'params', column: 2, top: 15}, summary: ['2000 synthetic rows']};
        const t0 = performance.now();
        window.NVFP4Lab.show(node, [payload]);
        const ms = performance.now() - t0;
        return {id: String(node.id), ms, cached: node.properties.nvfp4lab_table[0].rows.length};
    }""")
    print(f"2000-row table rendered in {result['ms']:.0f} ms")
    view = f'.nvfp4lab-view[data-nvfp4lab-node="{result["id"]}"]'
    assert app_page.js(f"() => document.querySelectorAll('{view} .nvfp4lab-table tbody tr').length") == 2000
    assert app_page.js(f"() => document.querySelectorAll('{view} .nvfp4lab-bar-row').length") == 15
    assert result["cached"] == 100  # the workflow keeps a trimmed copy
    params = [as_number(t) for t in column_texts(app_page, result["id"], 2)]
    present = [v for v in params if v is not None]
    assert present == sorted(present, reverse=True), "initial sort from the payload (descending)"
    assert params[len(present):] == [None] * (2000 - len(present)), "empty cells sort last"
    fit_view(app_page)
    header = app_page.page.locator(f"{view} .nvfp4lab-table th").nth(3)
    header.click()
    header.click()
    scores = [as_number(t) for t in column_texts(app_page, result["id"], 3)]
    present = [v for v in scores if v is not None]
    assert header.get_attribute("data-sort") == "ascending" and present == sorted(present)
    assert scores[len(present):] == [None] * (2000 - len(present)), "empty cells sort last in both directions"
    box = app_page.page.locator(f"{view} .nvfp4lab-filter")
    box.fill("blocks.19")
    assert sorted(column_texts(app_page, result["id"], 0)) == sorted(
        f"blocks.{i}.linear" for i in range(2000) if f"blocks.{i}.linear".find("blocks.19") >= 0)
    assert "of 2000 rows" in app_page.js(f"() => document.querySelector('{view} .nvfp4lab-count').textContent")


def test_calibrate_node_shows_live_counts(app_page, server):
    info = server.object_info()
    if "NVFP4Calibrate" not in info:
        pytest.fail("NVFP4Calibrate is not registered")
    session = f"browser_{uuid.uuid4().hex[:8]}"
    app_page.js("() => window.app.canvas.graph.clear()")
    # Load Model (NVFP4) -> Calibrate -> KSampler (Lotus/zero conditioning, 64x64) -> SaveLatent, built in the page
    built = app_page.js("""(session) => {
        const LG = window.LiteGraph, g = window.app.canvas.graph;
        const add = (type, x, y) => { const n = LG.createNode(type); n.pos = [x, y]; g.add(n); return n; };
        const slot = (list, pred) => list.findIndex(pred);
        const load = add('NVFP4LoadModel', 40, 80);
        const cal = add('NVFP4Calibrate', 420, 80);
        const pos = add('LotusConditioning', 40, 320);
        const neg = add('ConditioningZeroOut', 40, 420);
        const lat = add('EmptySD3LatentImage', 40, 520);
        const ks = add('KSampler', 780, 80);
        const save = add('SaveLatent', 1140, 80);
        load.widgets.find(w => w.name === 'model_name').value = 'tiny_flux.safetensors';
        cal.widgets.find(w => w.name === 'session').value = session;
        lat.widgets.find(w => w.name === 'width').value = 64;
        lat.widgets.find(w => w.name === 'height').value = 64;
        ks.widgets.find(w => w.name === 'steps').value = 2;
        save.widgets.find(w => w.name === 'filename_prefix').value = 'nvfp4_lab_test/browser_calibration';
        load.connect(slot(load.outputs, o => o.type === 'MODEL'), cal, slot(cal.inputs, i => i.name === 'model'));
        cal.connect(slot(cal.outputs, o => o.type === 'MODEL'), ks, slot(ks.inputs, i => i.name === 'model'));
        pos.connect(0, neg, 0);
        pos.connect(0, ks, slot(ks.inputs, i => i.name === 'positive'));
        neg.connect(0, ks, slot(ks.inputs, i => i.name === 'negative'));
        lat.connect(0, ks, slot(ks.inputs, i => i.name === 'latent_image'));
        ks.connect(0, save, 0);
        return {cal: cal.id};
    }""", session)
    done = queue_and_wait(app_page)
    assert done.get("ok"), f"prompt failed: {done}\n{server.log_tail(30)}"
    selector = f".nvfp4lab-status[data-nvfp4lab-node='{built['cal']}']"
    app_page.wait("(sel) => { const s = document.querySelector(sel); return !!(s && s.dataset.calls); }", selector,
                  timeout=30_000)
    status = app_page.js("""(sel) => { const s = document.querySelector(sel);
        return {text: s.textContent, ...s.dataset, last: window.NVFP4Lab.lastCalibration}; }""", selector)
    assert status["session"] == session, status
    assert int(status["layers"]) > 0 and int(status["calls"]) > 0 and int(status["prompts"]) == 1, status
    assert f"{int(status['layers'])} layers" in status["text"], status
    assert f"{int(status['calls']):,} calls" in status["text"], status
    assert str(status["last"]["node"]) == str(built["cal"]), status
    fit_view(app_page)
    save_screenshot(app_page, "browser_calibration.png")
