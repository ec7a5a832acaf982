"""Sensitivity Probe (NVFP4) and Compare Outputs (NVFP4).

The probe measures, per Linear layer, the output error of each candidate format (`calibration.sensitivity.probe`)
on real input rows recorded by Calibrate (NVFP4) when the session has them, else on synthetic rows, which the
report and the node's table label as such. Its SENSITIVITY output drives Build Plan's size budget.

Compare Outputs puts two sampler results side by side (`calibration.end_to_end.compare_outputs`): latent PSNR,
cosine and relative RMSE, plus image PSNR / SSIM when decoded images are connected.
"""

from __future__ import annotations

import math
from typing import Any

from comfy_api.latest import io

from ..quant.errors import NVFP4Error
from . import ui
from .types import (CATEGORY, NONE, Calibration, ModelSource, Sensitivity, Source, file_stamp, list_sessions,
                    pick_calibration, resolve_session, resolve_source, stamp_of)

DEVICES = ["auto", "cpu", "cuda"]
PROBE_COLUMNS = ["layer", "params", "nvfp4 rel_rmse", "nvfp4 SNR dB", "nvfp4-static rel_rmse",
                 "nvfp4-w4a16 rel_rmse", "fp8 rel_rmse", "bf16 rel_rmse", "inputs", "status"]
PROBE_NUMERIC = [False, True, True, True, True, True, True, True, False, False]


def run_probe(source: ModelSource, calibration_file, *, device: str = "auto", layers: str = "",
              max_rows: int = 512):
    """(SensitivityReport, samples label) via calibration.sensitivity.probe; the samples sidecar of the session is
    used when it exists, else the probe's synthetic rows."""
    import torch

    from ..calibration.recorder import input_samples_path
    from ..calibration.sensitivity import probe

    samples = None
    label = "synthetic inputs (no calibration session connected): less reliable than recorded activations"
    if calibration_file is not None:
        sidecar = input_samples_path(calibration_file)
        if sidecar.is_file():
            samples = sidecar
            label = f"recorded inputs from {sidecar.name}"
        else:
            label = (f"synthetic inputs scaled to the amax of {calibration_file.name} (the session has no recorded "
                     "input rows; enable record_input_samples in Calibrate (NVFP4) for real ones)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    report = probe(source.path, samples=samples, store=calibration_file, device=device,
                   layers=(layers or "").strip() or None, progress=False, max_rows=max_rows)
    return report, label


def probe_payload(report, label: str, top: int = 20) -> dict:
    rows = []
    for e in report.layers:
        nv = e.error("nvfp4")
        rows.append([e.layer, e.params, nv, e.error("nvfp4", "snr_db"), e.error("nvfp4-static"),
                     e.error("nvfp4-w4a16"), e.error("fp8"), e.error("bf16"), e.inputs, e.status])
    fails = report.failures()
    summary = [f"inputs: {report.inputs} ({label})",
               f"{len(report.layers)} of {report.source.get('layers_total', len(report.layers))} Linear layers probed "
               f"in {report.source.get('file', '?')}"]
    if report.inputs != "recorded":
        summary.append("SYNTHETIC fallback: rankings on synthetic rows are indicative only; record a calibration "
                       "session with input samples for a reliable report")
    if fails:
        summary.append(f"{len(fails)} layer(s) failed (not ranked): " + ", ".join(f"{n} ({s})" for n, s in fails[:5]))
    worst = report.ranking("nvfp4")[:5]
    if worst:
        summary.append("most sensitive to nvfp4: " + ", ".join(f"{n} ({v:.3g})" for n, v in worst))
    return ui.table(f"Sensitivity of {report.source.get('file', '?')}", PROBE_COLUMNS, rows, numeric=PROBE_NUMERIC,
                    sort=(2, True), chart=("nvfp4 output rel. RMSE", 2, top), summary=summary)


def png_to_image(png: bytes):
    """PNG bytes -> ComfyUI IMAGE tensor [1, H, W, 3] float in [0, 1]."""
    import io as _io

    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(_io.BytesIO(png)).convert("RGB")
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


class NVFP4SensitivityProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4SensitivityProbe",
            display_name="Sensitivity Probe (NVFP4)",
            category=CATEGORY,
            is_output_node=True,  # shows its table even when nothing consumes its outputs
            description="Measures each Linear layer's output error in every candidate format (NVFP4 W4A4 dynamic/"
                        "static, W4A16, FP8 as ComfyUI runs it, bf16) on input rows recorded by Calibrate (NVFP4), "
                        "or on clearly labelled synthetic rows without them. Feeds Build Plan's budget.",
            inputs=[
                Source.Input("source", optional=True, tooltip="From Load Model (NVFP4)."),
                io.Model.Input("model", optional=True, tooltip="Alternatively a MODEL loaded from a file."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="From Calibrate (NVFP4): recorded input rows and amax (wins over "
                                          "calibration_session)."),
                io.Combo.Input("calibration_session", options=list_sessions(), default=NONE,
                               tooltip="A session in output/nvfp4_calibration; none = synthetic inputs."),
                io.Combo.Input("device", options=DEVICES, default="auto"),
                io.String.Input("layers", default="", tooltip="Regex: only probe matching layers (empty = all)."),
                io.Int.Input("max_rows", default=512, min=16, max=65536, advanced=True,
                             tooltip="Input rows per layer (evenly subsampled)."),
                io.Int.Input("top", default=20, min=1, max=200, tooltip="Layers shown in the chart and plot."),
                io.AnyType.Input("run_after", optional=True,
                                 tooltip="Connect the sampler's output when the session is recorded in the same "
                                         "workflow."),
            ],
            outputs=[Sensitivity.Output(display_name="SENSITIVITY"), io.Image.Output(display_name="plot"),
                     io.String.Output(display_name="text")],
        )

    @classmethod
    def fingerprint_inputs(cls, calibration_session: str = NONE, **kwargs) -> tuple:
        from ..calibration.recorder import input_samples_path

        store = stamp_of(resolve_session, calibration_session)
        samples = file_stamp(input_samples_path(store[0])) if store else None
        return store, samples

    @classmethod
    def validate_inputs(cls, layers: str = "") -> bool | str:
        import re

        if layers and layers.strip():
            try:
                re.compile(layers.strip())
            except re.error as exc:
                return f"layers: /{layers}/ is not a valid regular expression ({exc})"
        return True

    @classmethod
    def execute(cls, source: ModelSource | None = None, model: Any = None, calibration: Any = None,
                calibration_session: str = NONE, device: str = "auto", layers: str = "", max_rows: int = 512,
                top: int = 20, run_after: Any = None) -> io.NodeOutput:
        from ..calibration.sensitivity import ranking_png

        src = resolve_source(source, model)
        cal = pick_calibration(calibration, calibration_session)
        report, label = run_probe(src, cal, device=device, layers=layers, max_rows=max_rows)
        payload = probe_payload(report, label, top)
        image = png_to_image(ranking_png(report, "nvfp4", top=top))
        return io.NodeOutput(report, image, ui.text_table(payload), ui=ui.ui(payload))


COMPARE_COLUMNS = ["metric", "value"]


def compare_payload(metrics: dict, label: str) -> dict:
    rows = [["latent PSNR (dB, reference range)", metrics.get("latent_psnr")],
            ["latent cosine", metrics.get("cosine")],
            ["latent rel. RMSE", metrics.get("rel_rmse")]]
    if metrics.get("image_psnr") is not None or metrics.get("ssim") is not None:
        rows += [["image PSNR (dB)", metrics.get("image_psnr")], ["image SSIM", metrics.get("ssim")]]
    summary = [f"status: {metrics.get('status')}"]
    if metrics.get("identical"):
        summary.append("the two latents are identical (PSNR infinite)")
    if label:
        summary.insert(0, label)
    return ui.table("Compare outputs" + (f": {label}" if label else ""), COMPARE_COLUMNS, rows,
                    numeric=[False, True], sort=None, chart=None, summary=summary)


class NVFP4CompareOutputs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4CompareOutputs",
            display_name="Compare Outputs (NVFP4)",
            category=CATEGORY,
            is_output_node=True,
            description="Compares a candidate sampler result with a reference (same prompt, seed and size): latent "
                        "PSNR, cosine and relative RMSE, plus image PSNR and SSIM when images are connected.",
            inputs=[
                io.Latent.Input("reference", tooltip="LATENT of the original model."),
                io.Latent.Input("candidate", tooltip="LATENT of the converted / emulated model."),
                io.Image.Input("reference_image", optional=True),
                io.Image.Input("candidate_image", optional=True),
                io.String.Input("label", default="", tooltip="Shown in the table title."),
            ],
            outputs=[io.String.Output(display_name="summary"), io.Float.Output(display_name="latent_psnr"),
                     io.Float.Output(display_name="cosine")],
        )

    @classmethod
    def execute(cls, reference: dict, candidate: dict, reference_image: Any = None, candidate_image: Any = None,
                label: str = "") -> io.NodeOutput:
        from ..calibration.end_to_end import compare_outputs

        try:
            metrics = compare_outputs(reference, candidate, reference_image, candidate_image)
        except ValueError as exc:
            raise NVFP4Error(str(exc)) from None
        payload = compare_payload(metrics, label)
        psnr = metrics.get("latent_psnr")
        psnr = math.inf if psnr is None and metrics.get("identical") else (psnr if psnr is not None else math.nan)
        cos = metrics.get("cosine")
        return io.NodeOutput(ui.text_table(payload), float(psnr), float(cos if cos is not None else math.nan),
                             ui=ui.ui(payload))
