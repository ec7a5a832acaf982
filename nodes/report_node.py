"""Calibration Report (NVFP4): a calibration session's statistics as plots (IMAGE) and a per-layer table (STRING).

Why a node: after a calibration workflow ran, the user wants to see in ComfyUI itself which layers have outlier
activations, how amax moves with the sampling step, and what static input_scale each layer would get. Connect the
sampler's output (e.g. its LATENT) to `run_after` so the report renders after the sampler recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from ..calibration.store import CalibrationStore
from ..quant.errors import CalibrationError
from ..quant.formats import NVFP4_SCALE_DENOM
from . import comfy_glue, ui
from .types import CATEGORY, NONE, Calibration, calibration_path

REPORT_COLUMNS = ["layer", "calls", "min", "mean", "max", "p99.9", "cv", "kurtosis", "outliers 3σ",
                  "input_scale p99.9", "clip %", "steps", "conds"]
REPORT_NUMERIC = [False, True, True, True, True, True, True, True, True, True, True, True, False]


def resolve_report_store(calibration: Any, session: str) -> Path:
    """The store to report: the connected calibration wins; else `session` = a session name (sanitized, in
    output/nvfp4_calibration) or a `.json` path relative to that folder. CalibrationError when absent."""
    if calibration is not None:
        p = calibration_path(calibration)
        if p is not None:
            return p
    name = (session or "").strip()
    if not name or name == NONE:
        raise CalibrationError("Calibration Report (NVFP4): connect a calibration or type a session name")
    root = comfy_glue.calibration_dir()
    rel = Path(name)
    if name.endswith(".json") and not rel.is_absolute() and ".." not in rel.parts:
        p = root / rel
    else:
        p = comfy_glue.session_store_path(name)
    if not p.is_file():
        raise CalibrationError(f"calibration session {name!r} has no data ({p} does not exist); run a workflow with "
                               "Calibrate (NVFP4) first, and connect the sampler's output to run_after")
    return p


def _f(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def report_rows(store: CalibrationStore) -> list[list[Any]]:
    """One row per layer with recorded calls (REPORT_COLUMNS)."""
    from ..calibration.scale_selection import select_input_scales

    choices = select_input_scales(store, "percentile", 99.9, 1.0)
    rows = []
    for name in sorted(store.layers):
        st = store.layers[name]
        if not st.count:
            continue
        ch = choices.get(name)
        steps = [s for s in st.steps() if s is not None]
        rows.append([name, st.count, _f(st.min), _f(st.mean), _f(st.max), _f(st.percentile(99.9)), _f(st.cv),
                     _f(st.kurtosis), _f(st.outlier_fraction()), _f(ch.input_scale) if ch else None,
                     _f(100.0 * ch.clip_fraction) if ch else None, len(steps), ",".join(st.conds())])
    return rows


def report_payload(store: CalibrationStore, path: Path) -> dict:
    prov = store.provenance
    models = ", ".join(f"{m.get('file') or '?'} ({m.get('architecture') or '?'})" for m in prov.get("models", []))
    rows = report_rows(store)
    summary = [f"{path.name}: {len(rows)} layers, {sum(r[1] for r in rows)} calls, {prov.get('prompts', 0)} prompts",
               f"model: {models or 'unknown'}; ComfyUI {', '.join(prov.get('comfyui_versions', [])) or '?'}",
               f"input_scale p99.9 = p99.9 amax / {NVFP4_SCALE_DENOM:g}; clip % = share of recorded calls above "
               "2688·input_scale; cv = std/mean of per-call amax"]
    return ui.table(f"Calibration report: {path.stem}", REPORT_COLUMNS, rows, numeric=REPORT_NUMERIC,
                    sort=(4, True), chart=("max input amax", 4, 20), summary=summary)


def report_images(store: CalibrationStore, top_n: int = 8):
    """All standard plots plus a max-amax ranking, as one IMAGE batch [B, H, W, 3] (padded white to one size)."""
    import io as _io

    import numpy as np
    import torch
    from PIL import Image

    from ..calibration import plots

    figs = plots.standard_plots(store, top_n)
    names = sorted(n for n, st in store.layers.items() if st.count and st.max is not None)
    figs["amax_max_ranking.png"] = plots.ranking_bar(names, [store.layers[n].max for n in names],
                                                     title="layers by max input amax", xlabel="max per-call amax",
                                                     top_n=30)
    arrays = [np.asarray(Image.open(_io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
              for png in figs.values()]
    h = max(a.shape[0] for a in arrays)
    w = max(a.shape[1] for a in arrays)
    batch = np.ones((len(arrays), h, w, 3), dtype=np.float32)
    for i, a in enumerate(arrays):
        batch[i, : a.shape[0], : a.shape[1]] = a
    return torch.from_numpy(batch), list(figs)


class NVFP4CalibrationReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4CalibrationReport",
            display_name="Calibration Report (NVFP4)",
            category=CATEGORY,
            is_output_node=True,
            description="Renders a calibration session: amax histograms, amax vs sampling step, rankings (IMAGE) and "
                        "a per-layer table with the p99.9 input_scale and its clip share (STRING). Connect the "
                        "sampler's output to run_after so it runs after recording.",
            inputs=[
                Calibration.Input("calibration", optional=True, tooltip="From Calibrate (NVFP4); wins over session."),
                io.String.Input("session", default="calibration",
                                tooltip="Session name (output/nvfp4_calibration/<session>.json) when no "
                                        "calibration is connected."),
                io.Int.Input("top_layers", default=8, min=1, max=40, tooltip="Layers drawn in amax vs step."),
                io.AnyType.Input("run_after", optional=True,
                                 tooltip="Connect the sampler's output (e.g. LATENT) so the report renders after "
                                         "the sampler recorded."),
            ],
            outputs=[io.Image.Output(display_name="plots"), io.String.Output(display_name="table")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # the session file changes between prompts

    @classmethod
    def execute(cls, calibration: Any = None, session: str = "calibration", top_layers: int = 8,
                run_after: Any = None) -> io.NodeOutput:
        path = resolve_report_store(calibration, session)
        store = CalibrationStore.load(path)
        if not any(st.count for st in store.layers.values()):
            raise CalibrationError(f"{path}: holds no recorded amax yet; run a sampler through Calibrate (NVFP4)")
        payload = report_payload(store, path)
        text = ui.text_table(payload, limit=10_000)
        images, _names = report_images(store, top_layers)
        ui_out = dict(ui.ui(payload))
        try:
            from comfy_api.latest import ui as comfy_ui

            ui_out.update(comfy_ui.PreviewImage(images, cls=cls).as_dict())
        except Exception:  # noqa: BLE001 - preview files are optional (server-less tests)
            pass
        ui_out["text"] = [text]
        return io.NodeOutput(images, text, ui=ui_out)
