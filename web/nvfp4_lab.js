// NVFP4 Lab: ComfyUI frontend extension.
//
// Our nodes (types starting with "NVFP4") return ui={"nvfp4_table": [payload, ...]} where
//   payload = {title, columns, rows, numeric, sort: {column, descending}|null,
//              chart: {label, column, top}|null, summary: [str]}
// (built by nodes/ui.py). This file renders each payload inside the node as a DOM widget: the summary lines, a bar
// chart of the chart column's largest values and a sortable, filterable, scrollable table. The calibration node
// also streams "nvfp4lab.calibration" websocket events; they are shown as a live status line on that node.
//
// Plain ES module, no build step. Only the public extension API is used: app.registerExtension,
// beforeRegisterNodeDef, node.onExecuted / onConfigure, node.addDOMWidget and api.addEventListener.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const VERSION = "0.1.0";
const EXTENSION = "nvfp4lab.table";
const UI_KEY = "nvfp4_table";
const CALIBRATION_EVENT = "nvfp4lab.calibration";
const CALIBRATE_NODE = "NVFP4Calibrate";
const TABLE_WIDGET = "nvfp4lab_table";
const STATUS_WIDGET = "nvfp4lab_status";
const CACHE_PROPERTY = "nvfp4lab_table";   // last payloads (trimmed), so a reloaded workflow shows them again
const CACHE_ROWS = 100;                     // rows kept per payload in the workflow file
const VIEW_MIN_HEIGHT = 300;               // incl. the frontend's DOM widget margins
const CHART_VISIBLE_BARS = 5;               // the chart shows this many bars; the rest of its top N scrolls
const VIEW_GROW_HEIGHT = 420;               // height added to a node at its natural size when a table arrives
const VIEW_MIN_WIDTH = 600;
const STATUS_HEIGHT = 24;
const STATUS_MIN_WIDTH = 380;
const DOM_WIDGET_MARGIN = 10;               // the frontend insets DOM widgets by this much on every side

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

// ---------------------------------------------------------------------------------------------------------------
// stylesheet (web/nvfp4_lab.css, next to this file)

function loadStylesheet() {
  if (document.querySelector("link[data-nvfp4lab]")) return;
  const link = document.createElement("link");
  link.rel = "stylesheet";
  link.href = new URL("./nvfp4_lab.css", import.meta.url).href;
  link.dataset.nvfp4lab = VERSION;
  document.head.appendChild(link);
}

// ---------------------------------------------------------------------------------------------------------------
// small helpers

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function isNumber(v) {
  return typeof v === "number" && Number.isFinite(v);
}

function isBytesColumn(name) {
  return /bytes/i.test(String(name));
}

function humanBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Math.abs(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  const s = i === 0 ? String(v) : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2);
  return (n < 0 ? "-" : "") + s + " " + units[i];
}

function formatNumber(v) {
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(3);
  return String(Number(v.toPrecision(4)));
}

function formatCell(v, column, numeric) {
  if (v === null || v === undefined) return "";
  if (numeric && isNumber(v)) return isBytesColumn(column) ? humanBytes(v) : formatNumber(v);
  return String(v);
}

// Numeric-aware comparison; empty cells always sort last.
function compareCells(a, b, numeric) {
  const ea = a === null || a === undefined || a === "";
  const eb = b === null || b === undefined || b === "";
  if (ea || eb) return ea === eb ? 0 : ea ? 1 : -1;
  if (numeric && isNumber(a) && isNumber(b)) return a - b;
  return collator.compare(String(a), String(b));
}

function sortedRows(payload, sort) {
  const rows = payload.rows.map((row, index) => ({ row, index }));
  if (!sort || sort.column < 0 || sort.column >= payload.columns.length) return rows;
  const col = sort.column;
  const numeric = !!payload.numeric[col];
  const dir = sort.descending ? -1 : 1;
  rows.sort((x, y) => {
    const a = x.row[col];
    const b = y.row[col];
    const empty = (v) => v === null || v === undefined || v === "";
    if (empty(a) || empty(b)) return compareCells(a, b, numeric) || x.index - y.index;  // empties last both ways
    return dir * compareCells(a, b, numeric) || x.index - y.index;
  });
  return rows;
}

// The column that names a row in the chart: the first non-numeric column (usually "layer").
function labelColumn(payload) {
  const i = payload.numeric.findIndex((n) => !n);
  return i >= 0 ? i : 0;
}

function validPayload(p) {
  return p && typeof p === "object" && Array.isArray(p.columns) && Array.isArray(p.rows);
}

function normalise(p) {
  const columns = p.columns.map(String);
  const numeric = columns.map((_, i) => !!(Array.isArray(p.numeric) && p.numeric[i]));
  return {
    title: String(p.title ?? ""),
    columns,
    rows: p.rows.filter(Array.isArray),
    numeric,
    sort: p.sort && Number.isInteger(p.sort.column) ? { column: p.sort.column, descending: !!p.sort.descending } : null,
    chart: p.chart && Number.isInteger(p.chart.column) ? {
      label: String(p.chart.label ?? columns[p.chart.column] ?? ""),
      column: p.chart.column,
      top: Math.max(1, Number(p.chart.top) || 20),
    } : null,
    summary: Array.isArray(p.summary) ? p.summary.map(String) : [],
    cached: p.cached ?? null,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// the view of one payload

class TableView {
  constructor(payload) {
    this.payload = payload;
    this.sort = payload.sort ? { ...payload.sort } : null;
    this.filter = "";
    this.root = el("div", "nvfp4lab-panel");
    this.root.dataset.nvfp4labTitle = payload.title;
    this.build();
  }

  build() {
    const p = this.payload;
    this.root.replaceChildren();
    if (p.title) this.root.appendChild(el("div", "nvfp4lab-title", p.title));
    const lines = p.cached ? [...p.summary, p.cached] : p.summary;
    if (lines.length) {
      const ul = el("ul", "nvfp4lab-summary");
      for (const line of lines) {
        const li = el("li", null, line);
        li.title = line;
        ul.appendChild(li);
      }
      this.root.appendChild(ul);
    }
    const chart = this.buildChart();
    if (chart) this.root.appendChild(chart);

    const toolbar = el("div", "nvfp4lab-toolbar");
    this.filterInput = el("input", "nvfp4lab-filter");
    this.filterInput.type = "search";
    this.filterInput.placeholder = "filter rows (text or /regex/)";
    this.filterInput.addEventListener("input", () => {
      this.filter = this.filterInput.value;
      this.renderBody();
    });
    // keep typing inside the box (ComfyUI binds single-key shortcuts on the document)
    this.filterInput.addEventListener("keydown", (e) => e.stopPropagation());
    this.count = el("span", "nvfp4lab-count");
    toolbar.append(this.filterInput, this.count);
    this.root.appendChild(toolbar);

    const scroll = el("div", "nvfp4lab-scroll");
    this.table = el("table", "nvfp4lab-table");
    const thead = el("thead");
    const tr = el("tr");
    this.headers = p.columns.map((name, i) => {
      const th = el("th", p.numeric[i] ? "nvfp4lab-num" : null);
      th.dataset.col = String(i);
      th.title = "sort by " + name;
      th.append(el("span", null, name), el("span", "nvfp4lab-arrow"));
      th.addEventListener("click", () => this.toggleSort(i));
      tr.appendChild(th);
      return th;
    });
    thead.appendChild(tr);
    this.tbody = el("tbody");
    this.table.append(thead, this.tbody);
    scroll.appendChild(this.table);
    this.root.appendChild(scroll);
    this.renderBody();
  }

  buildChart() {
    const p = this.payload;
    const c = p.chart;
    if (!c || c.column < 0 || c.column >= p.columns.length) return null;
    const lab = labelColumn(p);
    const items = p.rows
      .filter((r) => isNumber(r[c.column]))
      .map((r) => ({ label: String(r[lab] ?? ""), value: r[c.column] }))
      .sort((a, b) => b.value - a.value)
      .slice(0, c.top);
    if (!items.length) return null;
    const max = Math.max(...items.map((i) => Math.abs(i.value))) || 1;
    const box = el("div", "nvfp4lab-chart");
    box.style.setProperty("--nvfp4lab-bars", String(Math.min(items.length, CHART_VISIBLE_BARS)));
    box.appendChild(el("div", "nvfp4lab-chart-label", `${c.label}: top ${items.length}`));
    const column = p.columns[c.column];
    for (const it of items) {
      const row = el("div", "nvfp4lab-bar-row");
      row.title = `${it.label}: ${it.value}`;
      const bar = el("div", "nvfp4lab-bar");
      const fill = el("div", "nvfp4lab-bar-fill");
      fill.style.width = `${Math.max(0.5, (100 * Math.abs(it.value)) / max)}%`;
      bar.appendChild(fill);
      row.append(el("span", "nvfp4lab-bar-name", it.label), bar,
        el("span", "nvfp4lab-bar-value", formatCell(it.value, column, true)));
      box.appendChild(row);
    }
    return box;
  }

  toggleSort(col) {
    if (this.sort && this.sort.column === col) {
      this.sort = { column: col, descending: !this.sort.descending };
    } else {
      this.sort = { column: col, descending: !!this.payload.numeric[col] };  // numbers: largest first
    }
    this.renderBody();
  }

  matcher() {
    const f = this.filter.trim();
    if (!f) return null;
    const m = /^\/(.+)\/$/.exec(f);
    if (m) {
      try {
        const re = new RegExp(m[1], "i");
        return (text) => re.test(text);
      } catch {
        return () => false;
      }
    }
    const needle = f.toLowerCase();
    return (text) => text.toLowerCase().includes(needle);
  }

  renderBody() {
    const p = this.payload;
    for (const th of this.headers) {
      const col = Number(th.dataset.col);
      const active = this.sort && this.sort.column === col;
      th.classList.toggle("nvfp4lab-sorted", !!active);
      th.dataset.sort = active ? (this.sort.descending ? "descending" : "ascending") : "";
      th.lastChild.textContent = active ? (this.sort.descending ? " \u25BC" : " \u25B2") : "";
    }
    const match = this.matcher();
    const frag = document.createDocumentFragment();
    let shown = 0;
    for (const { row } of sortedRows(p, this.sort)) {
      const texts = row.map((v, i) => formatCell(v, p.columns[i], p.numeric[i]));
      if (match && !texts.some(match) && !row.some((v) => v !== null && match(String(v)))) continue;
      const tr = el("tr");
      texts.forEach((text, i) => {
        const td = el("td", p.numeric[i] ? "nvfp4lab-num" : null, text);
        const raw = row[i];
        if (p.numeric[i] && isNumber(raw) && text !== String(raw)) td.title = String(raw);
        else if (text.length > 40) td.title = text;
        tr.appendChild(td);
      });
      frag.appendChild(tr);
      shown += 1;
    }
    this.tbody.replaceChildren(frag);
    this.table.dataset.nvfp4labRows = String(shown);
    this.count.textContent = match ? `${shown} of ${p.rows.length} rows` : `${p.rows.length} rows`;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// the node widget: tabs when a node sends several payloads

class NodeView {
  constructor(node) {
    this.node = node;
    this.root = el("div", "nvfp4lab-view");
    this.root.dataset.nvfp4labNode = String(node.id);
    this.tabs = el("div", "nvfp4lab-tabs");
    this.body = el("div", "nvfp4lab-body");
    this.root.append(this.tabs, this.body);
    this.views = [];
    this.active = 0;
    // wheel over the table scrolls the table, not the canvas (unless there is nothing to scroll)
    this.root.addEventListener("wheel", (e) => {
      const scroller = e.target.closest?.(".nvfp4lab-scroll");
      if (scroller && scroller.scrollHeight > scroller.clientHeight) e.stopPropagation();
    }, { passive: true });
  }

  show(payloads) {
    this.views = payloads.map((p) => new TableView(p));
    this.active = Math.min(this.active, Math.max(0, this.views.length - 1));
    this.tabs.replaceChildren();
    this.tabs.hidden = this.views.length < 2;
    this.views.forEach((v, i) => {
      const b = el("button", "nvfp4lab-tab", v.payload.title || `table ${i + 1}`);
      b.type = "button";
      b.addEventListener("click", () => this.select(i));
      this.tabs.appendChild(b);
    });
    this.select(this.active);
  }

  select(i) {
    this.active = i;
    [...this.tabs.children].forEach((b, j) => b.classList.toggle("nvfp4lab-active", i === j));
    this.body.replaceChildren(...(this.views[i] ? [this.views[i].root] : []));
  }
}

function ensureView(node, grow) {
  if (node.nvfp4labView) return node.nvfp4labView;
  const view = new NodeView(node);
  const natural = node.computeSize()[1];  // the node's height without the view
  const widget = node.addDOMWidget(TABLE_WIDGET, "nvfp4lab-table", view.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => VIEW_MIN_HEIGHT,
  });
  widget.serialize = false;
  node.nvfp4labView = view;
  // A node at its natural height grows to make room for the view; a node the workflow already sized larger keeps
  // its size (the view fills the room), so a saved layout is not pushed into its neighbours. Restored views keep
  // the saved size too.
  const [w, h] = node.size;
  const min = node.computeSize();
  let height = Math.max(h, min[1]);
  if (grow && h <= natural + 24) height = Math.max(height, h + VIEW_GROW_HEIGHT);
  node.setSize([Math.max(w, grow ? VIEW_MIN_WIDTH : min[0]), height]);
  node.setDirtyCanvas?.(true, true);
  return view;
}

function showPayloads(node, raw, { cache = true } = {}) {
  const payloads = (Array.isArray(raw) ? raw : [raw]).filter(validPayload).map(normalise);
  if (!payloads.length) return false;
  ensureView(node, cache).show(payloads);
  if (cache) {
    node.properties = node.properties || {};
    node.properties[CACHE_PROPERTY] = payloads.map(trimForCache);
  }
  node.setDirtyCanvas?.(true, true);
  return true;
}

// The first CACHE_ROWS rows in the payload's initial order, so a reload shows the rows the user saw first.
function trimForCache(p) {
  if (p.rows.length <= CACHE_ROWS) return p;
  const rows = sortedRows(p, p.sort).slice(0, CACHE_ROWS).map((r) => r.row);
  return { ...p, rows, cached: `saved with the workflow: ${CACHE_ROWS} of ${p.rows.length} rows (run again for all)` };
}

// ---------------------------------------------------------------------------------------------------------------
// calibration status

function findNode(id) {
  const graph = app.graph;
  if (!graph || id === undefined || id === null) return null;
  const parts = String(id).split(":");
  let g = graph;
  let node = null;
  for (const part of parts) {
    node = g?.getNodeById?.(Number.isNaN(Number(part)) ? part : Number(part)) ?? g?.getNodeById?.(part) ?? null;
    if (!node) return null;
    g = node.subgraph ?? null;
  }
  return node;
}

function numberText(v) {
  return isNumber(v) ? v.toLocaleString("en-US") : String(v ?? "?");
}

function plural(n, word) {
  return `${numberText(n)} ${word}${n === 1 ? "" : "s"}`;
}

function calibrationText(d) {
  const parts = [];
  if (d.layers !== undefined) parts.push(plural(d.layers, "layer"));
  if (d.calls !== undefined) parts.push(plural(d.calls, "call"));
  if (d.prompts !== undefined) parts.push(plural(d.prompts, "prompt"));
  const run = d.run && isNumber(d.run.calls) ? ` (+${numberText(d.run.calls)} this run)` : "";
  return parts.length ? `recorded: ${parts.join(" \u00B7 ")}${run}` : "calibrating\u2026";
}

function calibrationTitle(d) {
  const lines = [];
  if (d.session) lines.push(`session: ${d.session}`);
  if (d.path) lines.push(`file: ${d.path}`);
  if (d.layers !== undefined) lines.push(`layers seen: ${numberText(d.layers)}`);
  if (d.calls !== undefined) lines.push(`calls: ${numberText(d.calls)}`);
  if (d.prompts !== undefined) lines.push(`prompts: ${numberText(d.prompts)}`);
  if (d.run) lines.push(`last sampler run: ${numberText(d.run.calls)} calls over ${numberText(d.run.layers)} of ` +
    `${numberText(d.run.hooked)} hooked layers`);
  return lines.join("\n");
}

function ensureStatus(node) {
  if (node.nvfp4labStatus) return node.nvfp4labStatus;
  const status = el("div", "nvfp4lab-status");
  status.dataset.nvfp4labStatus = "calibration";
  status.dataset.nvfp4labNode = String(node.id);
  const w = node.addDOMWidget(STATUS_WIDGET, "nvfp4lab-status", status, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => STATUS_HEIGHT + 2 * DOM_WIDGET_MARGIN,
    getMaxHeight: () => STATUS_HEIGHT + 2 * DOM_WIDGET_MARGIN,
  });
  w.serialize = false;
  node.nvfp4labStatus = status;
  node.setSize([Math.max(node.size[0], STATUS_MIN_WIDTH), Math.max(node.size[1], node.computeSize()[1])]);
  return status;
}

// Live counts from a "nvfp4lab.calibration" event.
function showCalibration(node, detail) {
  const status = ensureStatus(node);
  status.textContent = calibrationText(detail);
  status.title = calibrationTitle(detail);
  status.classList.add("nvfp4lab-live");
  for (const key of ["layers", "calls", "prompts", "session"]) {
    if (detail[key] !== undefined && detail[key] !== null) status.dataset[key] = String(detail[key]);
  }
  node.setDirtyCanvas?.(true, false);
}

// The text a node returns in ui.text (Calibrate: the session's totals so far, before the sampler runs).
function showText(node, text) {
  const lines = text.flatMap((t) => String(t).split("\n")).filter((l) => l.trim());
  if (!lines.length) return;
  const status = ensureStatus(node);
  status.textContent = lines.find((l) => /^so far/i.test(l)) ?? lines[0];
  status.title = lines.join("\n");
  node.setDirtyCanvas?.(true, false);
}

function onCalibration(event) {
  const d = event?.detail ?? {};
  const id = d.node ?? d.node_id ?? d.unique_id ?? d.display_node;
  let targets = [];
  const node = findNode(id);
  if (node) targets = [node];
  else targets = (app.graph?._nodes ?? []).filter((n) => (n.comfyClass ?? n.type) === CALIBRATE_NODE);
  for (const n of targets) showCalibration(n, d);
  window.NVFP4Lab.lastCalibration = d;
}

// ---------------------------------------------------------------------------------------------------------------
// registration

const isOurs = (name) => typeof name === "string" && name.startsWith("NVFP4");

app.registerExtension({
  name: EXTENSION,

  async setup() {
    api.addEventListener(CALIBRATION_EVENT, onCalibration);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isOurs(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const r = onExecuted?.apply(this, arguments);
      if (output && output[UI_KEY]) showPayloads(this, output[UI_KEY]);
      else if (output && Array.isArray(output.text) && nodeData.name === CALIBRATE_NODE) showText(this, output.text);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      const cached = this.properties?.[CACHE_PROPERTY];
      if (cached) {
        // after the node is in the graph and sized from the workflow
        queueMicrotask(() => showPayloads(this, cached, { cache: false }));
      }
      return r;
    };
  },
});

loadStylesheet();

// A marker for tests and for other extensions.
window.NVFP4Lab = {
  version: VERSION,
  extension: EXTENSION,
  uiKey: UI_KEY,
  calibrationEvent: CALIBRATION_EVENT,
  show: (node, payloads) => showPayloads(node, payloads),
  lastCalibration: null,
};
