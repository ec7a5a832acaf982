"""Inspect Layers (NVFP4): per-layer format, shape, parameters and bytes of a model, with totals per format, the
detected architecture and its default preset, shown as a sortable table in the node.

A SOURCE (or a MODEL loaded from a file) is read from the file header (`quant.inspect`). A MODEL without a file
behind it is inspected from its live module tree instead (formats as loaded: QuantizedTensor weights report their
comfy_quant format, plain weights their dtype; sizes are the bytes the tensors would take on disk).
"""

from __future__ import annotations

import math
from typing import Any

from comfy_api.latest import io

from ..quant import formats
from ..quant import inspect as qinspect
from ..quant.errors import NVFP4Error
from . import ui
from .types import CATEGORY, LayerReport, LayerReportSocket, ModelSource, Source, source_from_model

SORTS = ["size", "params", "name", "file order"]
COLUMNS = ["layer", "format", "shape", "params", "bytes", "input_scale", "W4A16 flag"]
NUMERIC = [False, False, False, True, True, True, False]
_SORT_COLUMN = {"size": (4, True), "params": (3, True), "name": (0, False), "file order": None}


def report_from_source(source: ModelSource) -> LayerReport:
    """LayerReport of a model file (header and a few scalars only)."""
    from ..quant.architecture import detect_architecture
    from ..quant.presets import preset_for

    with source.open() as ckpt:
        rows = qinspect.rows(ckpt)
        arch = detect_architecture({n: tuple(ckpt.info(n).shape) for n in ckpt.names()})
        notes = list(ckpt.notes)
    preset = _preset_name(arch, preset_for)
    return LayerReport(source=source.name, rows=rows, totals=qinspect.totals(rows), architecture=arch.describe(),
                       preset=preset, origin="file", notes=notes)


def _preset_name(arch: Any, preset_for: Any) -> str | None:
    try:
        return preset_for(arch).name
    except NVFP4Error as exc:  # diffusers naming: no preset applies
        return f"none ({exc})"


def report_from_live_model(model: Any) -> LayerReport:
    """LayerReport of a MODEL's module tree (for models not loaded from a file)."""
    from ..quant.architecture import detect_architecture
    from ..quant.presets import preset_for

    dm = model.model.diffusion_model
    rows: list[dict] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name, mod in dm.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        if not params:
            continue
        weight = params.get("weight")
        fmt, shape, wbytes = _weight_facts(mod, weight)
        for pname, p in params.items():
            if pname != "weight":
                shapes[f"{name}.{pname}"] = tuple(p.shape)
        if weight is not None:
            shapes[f"{name}.weight"] = shape
        extra = sum(p.numel() * p.element_size() for n, p in params.items() if n != "weight")
        bias = params.get("bias")
        scale = getattr(mod, "input_scale", None)
        rows.append({
            "name": name, "format": fmt, "shape": list(shape),
            "params": int(math.prod(shape)) + (bias.numel() if bias is not None else 0),
            "bytes": int(wbytes + extra),
            "input_scale": float(scale.float().reshape(-1)[0]) if scale is not None and scale.numel() else None,
            "full_precision_matrix_mult": bool(getattr(mod, "_full_precision_mm_config", False)),
            "shape_padded": False,
        })
    arch = detect_architecture(shapes)
    return LayerReport(source=type(model.model).__name__, rows=rows, totals=qinspect.totals(rows),
                       architecture=arch.describe(), preset=_preset_name(arch, preset_for), origin="live model",
                       notes=["inspected from the live module tree (the MODEL has no file behind it)"])


def _weight_facts(mod: Any, weight: Any) -> tuple[str, tuple[int, ...], int]:
    """(format, logical shape, bytes on disk) of a module's weight as loaded."""
    if weight is None:
        return "param", (), 0
    quant_format = getattr(mod, "quant_format", None)
    if quant_format is not None:
        shape = tuple(getattr(mod, "_orig_shape", None) or weight.shape)
        conf = {"format": quant_format,
                "full_precision_matrix_mult": bool(getattr(mod, "_full_precision_mm_config", False))}
        try:
            fmt = formats.format_from_comfy_quant(conf)
        except ValueError:
            return f"comfy:{quant_format}", shape, int(weight.numel() * weight.element_size())
        return fmt, shape, formats.stored_weight_bytes(fmt, shape)
    import torch

    shape = tuple(weight.shape)
    nbytes = int(weight.numel() * weight.element_size())
    dt = weight.dtype
    if dt == torch.float8_e4m3fn:
        return formats.FP8, shape, nbytes
    if dt == torch.float8_e5m2:
        return formats.FP8_E5M2, shape, nbytes
    try:
        return formats.dtype_format(dt), shape, nbytes
    except ValueError:
        return str(dt).removeprefix("torch."), shape, nbytes


def report_payload(report: LayerReport, sort: str = "size", pattern: str | None = None) -> dict:
    rows = qinspect.filter_rows(report.rows, pattern)
    totals = qinspect.totals(rows)
    grand = totals["total"]["bytes"] or 1
    summary = [f"source: {report.source} ({report.origin})", f"architecture: {report.architecture}",
               f"default preset: {report.preset}"]
    if pattern:
        summary.append(f"filter /{pattern}/: {len(rows)} of {len(report.rows)} layers")
    for fmt, t in totals.items():
        summary.append(f"{fmt}: {t['layers']} layers, {qinspect.human_count(t['params'])} params, "
                       f"{qinspect.human_bytes(t['bytes'])} ({100 * t['bytes'] / grand:.1f}%)")
    summary.extend(f"note: {n}" for n in report.notes)
    table_rows = [[r["name"], r["format"], r["shape"], r["params"], r["bytes"],
                   None if r.get("input_scale_nonfinite") else r["input_scale"], r["full_precision_matrix_mult"]]
                  for r in rows]
    return ui.table(f"Layers of {report.source}", COLUMNS, table_rows, numeric=NUMERIC,
                    sort=_SORT_COLUMN.get(sort), chart=("size (bytes)", 4, 20), summary=summary)


class NVFP4InspectLayers(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4InspectLayers",
            display_name="Inspect Layers (NVFP4)",
            category=CATEGORY,
            is_output_node=True,  # shows its table even when nothing consumes its outputs
            description="Lists every layer of a model with its format (nvfp4, nvfp4-w4a16, fp8, bf16, ...), shape, "
                        "parameter count and size, totals per format, and the detected architecture and preset.",
            inputs=[
                Source.Input("source", optional=True, tooltip="From Load Model (NVFP4)."),
                io.Model.Input("model", optional=True,
                               tooltip="Alternatively a MODEL: its file is inspected when it was loaded from one, "
                                       "else its live module tree."),
                io.Combo.Input("sort", options=SORTS, default="size", tooltip="Initial sort of the table."),
                io.String.Input("filter", default="", tooltip="Regex: only layers whose name matches (searched)."),
            ],
            outputs=[LayerReportSocket.Output(display_name="LAYER_REPORT"), io.String.Output(display_name="text")],
        )

    @classmethod
    def validate_inputs(cls, filter: str = "") -> bool | str:
        try:
            qinspect.compile_filter(filter or None)
        except NVFP4Error as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, source: ModelSource | None = None, model: Any = None, sort: str = "size",
                filter: str = "") -> io.NodeOutput:
        if source is not None:
            report = report_from_source(source)
        elif model is not None:
            try:
                report = report_from_source(source_from_model(model))
            except NVFP4Error:
                report = report_from_live_model(model)
        else:
            raise NVFP4Error("Inspect Layers (NVFP4): connect a SOURCE or a MODEL")
        payload = report_payload(report, sort, filter or None)
        rows = qinspect.filter_rows(report.rows, filter or None)
        rows = qinspect.sort_rows(rows, {"size": "size", "params": "params", "name": "name"}.get(sort))
        text = "\n".join(payload["summary"]) + "\n\n" + qinspect.render_table(rows) + "\n\n" + \
            qinspect.render_totals(qinspect.totals(rows))
        return io.NodeOutput(report, text, ui=ui.ui(payload))
