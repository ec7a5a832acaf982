"""Bake Input Scales (NVFP4): write a copy of an NVFP4/FP8 checkpoint whose quantized layers carry static
`input_scale`s chosen from a calibration session (`calibration.scale_selection` + `quant.bake.bake_input_scales`).

Every other tensor is copied byte for byte. Calibrated layers the file does not quantize are listed, never dropped
silently; W4A4 layers without calibration data stay dynamic and are listed too.
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ..quant import formats
from ..quant.errors import CalibrationError, NVFP4Error
from . import ui
from .plan_node import SCALE_METHODS
from .save_node import (check_filename, existing_output_message, output_folder, output_parent, output_path,
                        validate_output)
from .types import (CATEGORY, NONE, Calibration, file_stamp, list_models, list_sessions, pick_calibration,
                    refresh_model_lists, resolve_model, resolve_session, stamp_of)

BAKE_COLUMNS = ["layer", "status", "input_scale", "amax x margin", "clip fraction", "calls"]


def bake(checkpoint: str, calibration_file, *, method: str, percentile: float, margin: float, filename: str,
         overwrite: bool):
    """(BakeReport, choices, output path): select scales from the store, then bake them into a new file."""
    from ..calibration.scale_selection import select_input_scales
    from ..quant.bake import bake_input_scales
    from ..quant.input_scales import load_calibration

    src = resolve_model(checkpoint)
    store = load_calibration(calibration_file)
    choices = select_input_scales(store, method=method, percentile=percentile, margin=margin)
    if not choices:
        raise CalibrationError(f"{calibration_file.name}: holds no layer with recorded amax; nothing to bake")
    amax = {layer: ch.input_scale * formats.NVFP4_SCALE_DENOM for layer, ch in choices.items()}
    out = output_path(filename)
    if out.exists() and not overwrite:
        raise NVFP4Error(existing_output_message(out, filename))
    try:
        with output_parent(out):
            report = bake_input_scales(src, out, amax, force=overwrite, provenance={
                "calibration": calibration_file.name, "method": method, "percentile": percentile, "margin": margin,
                "source": src.name})
    finally:
        refresh_model_lists()
    return report, choices, out


def bake_payload(report, choices: dict, name: str) -> dict:
    rows = []
    unmatched = set(report.unmatched_scales)
    for layer, ch in choices.items():
        if layer in report.baked:
            status, scale = "baked", report.baked[layer]
        elif layer in unmatched:
            status, scale = "not quantized in file", None
        else:
            status, scale = "skipped", None
        rows.append([layer, status, scale, ch.threshold, ch.clip_fraction, ch.count])
    for layer in report.without_scale:
        rows.append([layer, "W4A4, no calibration: stays dynamic", None, None, None, None])
    return ui.table(f"Baked input scales: {name}", BAKE_COLUMNS, rows,
                    numeric=[False, False, True, True, True, True], sort=(4, True),
                    chart=("clip fraction of recorded calls", 4, 20), summary=report.summary().splitlines())


class NVFP4BakeInputScales(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4BakeInputScales",
            display_name="Bake Input Scales (NVFP4)",
            category=CATEGORY,
            is_output_node=True,
            description="Writes a copy of an NVFP4/FP8 checkpoint with static input_scale tensors chosen from a "
                        "calibration session (percentile x margin, max, or error-minimising). Nothing else changes.",
            inputs=[
                io.Combo.Input("checkpoint", options=list_models(),
                               tooltip="An NVFP4/FP8 .safetensors (e.g. written by Save NVFP4 Checkpoint)."),
                io.Combo.Input("calibration_session", options=list_sessions(), default=NONE,
                               tooltip="A session in output/nvfp4_calibration."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="Calibration from Calibrate (NVFP4); wins over calibration_session."),
                io.Combo.Input("method", options=SCALE_METHODS, default="percentile"),
                io.Float.Input("percentile", default=99.9, min=50.0, max=100.0, step=0.01),
                io.Float.Input("margin", default=1.0, min=0.5, max=4.0, step=0.01),
                io.String.Input("filename", default="model_nvfp4_static",
                                tooltip="Output name below models/diffusion_models ('.safetensors' is added)."),
                io.Boolean.Input("overwrite", default=False),
                io.AnyType.Input("run_after", optional=True,
                                 tooltip="Connect the sampler's output when the session is recorded in the same "
                                         "workflow."),
            ],
            outputs=[io.String.Output(display_name="path"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint: str = "", calibration_session: str = NONE,
                           filename: str = "model_nvfp4_static", **kwargs) -> tuple:
        out = None if check_filename(filename) else file_stamp(output_path(filename))
        return stamp_of(resolve_model, checkpoint), stamp_of(resolve_session, calibration_session), out

    @classmethod
    def validate_inputs(cls, filename: str = "model_nvfp4_static", overwrite: bool = False) -> bool | str:
        return validate_output(filename, overwrite)

    @classmethod
    def execute(cls, checkpoint: str, calibration_session: str = NONE, calibration: Any = None,
                method: str = "percentile", percentile: float = 99.9, margin: float = 1.0,
                filename: str = "model_nvfp4_static", overwrite: bool = False, run_after: Any = None
                ) -> io.NodeOutput:
        cal = pick_calibration(calibration, calibration_session)
        if cal is None:
            raise CalibrationError("Bake Input Scales (NVFP4): choose a calibration_session or connect a calibration")
        report, choices, out = bake(checkpoint, cal, method=method, percentile=percentile, margin=margin,
                                    filename=filename, overwrite=overwrite)
        name = out.relative_to(output_folder()).as_posix()
        payload = bake_payload(report, choices, name)
        return io.NodeOutput(str(out), report.summary(), ui=ui.ui(payload))
