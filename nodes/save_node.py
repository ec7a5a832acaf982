"""Save NVFP4 Checkpoint: stream the source's original weights through a plan into
`<models/diffusion_models>/<filename>.safetensors`, a file stock ComfyUI loads with UNETLoader.

The conversion is `quant.convert.convert` (bounded memory, atomic, verified); this node picks the output path,
reports progress to ComfyUI's progress bar, refuses to overwrite unless asked, and makes the new file appear in the
model lists without restarting ComfyUI.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from ..quant.errors import NVFP4Error
from ..quant.inspect import human_bytes
from ..quant.plan import Plan
from . import ui
from .types import (CATEGORY, Calibration, ModelSource, PlanSocket, Source, calibration_path, file_stamp,
                    model_folders, refresh_model_lists, resolve_source)

log = logging.getLogger("nvfp4_lab.nodes")

DEVICES = ["auto", "cpu", "cuda"]
SUFFIX = ".safetensors"
RESULT_COLUMNS = ["layer", "format", "from", "action", "weight rel_rmse", "SNR dB"]


def output_folder() -> Path:
    """The diffusion_models folder new checkpoints go to: the first configured folder named `diffusion_models`
    (ComfyUI lists models/unet first), else the first diffusion_models folder."""
    folders = model_folders()
    if not folders:
        raise NVFP4Error("ComfyUI has no diffusion_models folder configured")
    for f in folders:
        if f.name == "diffusion_models":
            return f
    return folders[0]


def check_filename(filename: str) -> str | None:
    """Error message for a filename that cannot be a model name below the output folder, else None."""
    name = (filename or "").strip()
    if not name:
        return "filename is empty"
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or name.startswith(("/", "\\")) or "\\" in name:
        return f"filename {filename!r} must be relative to models/diffusion_models (no '..', no absolute path)"
    if any(ch in name for ch in '<>:"|?*\0'):
        return f"filename {filename!r} contains a character file systems refuse (<>:\"|?*)"
    if p.name in ("", ".", SUFFIX):
        return f"filename {filename!r} has no file name"
    return None


def output_path(filename: str, folder: Path | None = None) -> Path:
    """`<folder>/<filename>.safetensors` (the suffix is added when missing)."""
    msg = check_filename(filename)
    if msg:
        raise NVFP4Error(msg)
    name = filename.strip()
    if not name.lower().endswith(SUFFIX):
        name += SUFFIX
    return (folder or output_folder()) / name


def existing_output_message(path: Path, filename: str) -> str:
    return (f"{path.name} already exists in {path.parent}; Save NVFP4 Checkpoint does not overwrite models unless "
            f"overwrite is true (or choose another filename than {filename!r})")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def with_calibration(plan: Plan, source: ModelSource, calibration: Any) -> Plan:
    """A copy of `plan` whose static input scales come from `calibration` (the plan's own method/percentile/margin)."""
    from ..quant.input_scales import InputScaleOptions, assign_input_scales

    path = calibration_path(calibration)
    if path is None:
        return plan
    plan = copy.deepcopy(plan)
    saved = dict(plan.options.get("input_scale") or {})
    opts = InputScaleOptions(method=saved.get("method", "percentile"), percentile=saved.get("percentile", 99.9),
                             margin=saved.get("margin", 1.0), calibration=str(path),
                             reference=saved.get("reference"), value=saved.get("value"), fp8=saved.get("fp8", False))
    with source.open() as ckpt:
        assign_input_scales(plan, opts, known_layers=set(ckpt.layers()))
    plan.options["input_scale"] = opts.to_dict()
    return plan


@contextlib.contextmanager
def output_parent(path: Path):
    """Create `path`'s missing parent folders; remove the ones created here (when still empty) if the body fails,
    so a refused save leaves nothing behind."""
    created = []
    p = path.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for d in created:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        raise


def save_checkpoint(plan: Plan, source: ModelSource, path: Path, *, overwrite: bool = False, verify: bool = True,
                    device: str = "auto", on_progress=None):
    """Convert `source` with `plan` into `path` (parent folders created) and refresh ComfyUI's model list."""
    from ..quant.convert import convert

    if not isinstance(plan, Plan):
        raise NVFP4Error(f"the PLAN input carries a {type(plan).__name__}, not a plan")
    if path.exists() and not overwrite:
        raise NVFP4Error(existing_output_message(path, path.name))
    try:
        with output_parent(path):
            report = convert(source.path, path, plan, device=resolve_device(device), force=overwrite,
                             verify=verify, progress=False, on_progress=on_progress)
    finally:
        refresh_model_lists()
    return report


def result_payload(report, plan: Plan, name: str) -> dict:
    import math

    rows = []
    for r in report.layers:
        snr = None
        if r.rel_rmse is not None and r.rel_rmse > 0:
            snr = -20 * math.log10(r.rel_rmse)
        rows.append([r.layer, r.format, r.source_format, r.action, r.rel_rmse, snr])
    ratio = report.output_bytes / report.input_bytes if report.input_bytes else 0.0
    summary = [f"wrote {name} ({human_bytes(report.output_bytes)}, {ratio:.1%} of the source's "
               f"{human_bytes(report.input_bytes)}) in {report.seconds:.1f} s",
               "layers: " + ", ".join(f"{f} {n}" for f, n in plan.counts().items()),
               f"verified: {'yes' if report.verified else 'no'}",
               f"load it with UNETLoader / Load Model (NVFP4) as {name!r}"]
    summary.extend(f"note: {n}" for n in report.notes)
    return ui.table(f"Saved {name}", RESULT_COLUMNS, rows, numeric=[False, False, False, False, True, True],
                    sort=(4, True), chart=("weight rel. RMSE (quantized layers)", 4, 20), summary=summary)


def validate_output(filename: str, overwrite: bool) -> bool | str:
    """Queue-time check of an output name (Save and Bake): True, or the message ComfyUI shows on the node."""
    msg = check_filename(filename)
    if msg:
        return msg
    try:
        path = output_path(filename)
    except NVFP4Error as exc:
        return str(exc)
    if path.exists() and not overwrite:
        return existing_output_message(path, filename)
    return True


class NVFP4SaveCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4SaveCheckpoint",
            display_name="Save NVFP4 Checkpoint",
            category=CATEGORY,
            is_output_node=True,
            description="Converts the source model with the plan and writes models/diffusion_models/<filename>"
                        ".safetensors (streamed layer by layer, atomic, verified). The file is listed by UNETLoader "
                        "and Load Model (NVFP4) right away. Existing files are refused unless overwrite is on.",
            inputs=[
                PlanSocket.Input("plan", tooltip="From Build Plan (NVFP4)."),
                Source.Input("source", optional=True, tooltip="The model the plan was made for."),
                io.Model.Input("model", optional=True,
                               tooltip="Alternatively a MODEL loaded from a file: its original file is converted "
                                       "(weight patches such as LoRAs are not included)."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="Optional calibration session: static input scales are re-chosen from it "
                                          "with the plan's method/percentile/margin."),
                io.String.Input("filename", default="model_nvfp4",
                                tooltip="Name below models/diffusion_models; '.safetensors' is added. Subfolders "
                                        "allowed (nvfp4/my_model)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
                io.Boolean.Input("verify", default=True, advanced=True,
                                 tooltip="Re-open the written file and check formats, shapes and a few layers."),
                io.Combo.Input("device", options=DEVICES, default="auto", advanced=True,
                               tooltip="Where weights are quantized (auto = CUDA when available)."),
                io.AnyType.Input("run_after", optional=True,
                                 tooltip="Connect the sampler's output when the calibration is recorded in the same "
                                         "workflow, so saving waits for it."),
            ],
            outputs=[io.String.Output(display_name="path"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, filename: str = "model_nvfp4", **kwargs) -> tuple | None:
        # re-run (when caching is on) if the output was deleted or replaced since the last run
        return None if check_filename(filename) else file_stamp(output_path(filename))

    @classmethod
    def validate_inputs(cls, filename: str = "model_nvfp4", overwrite: bool = False) -> bool | str:
        return validate_output(filename, overwrite)

    @classmethod
    def execute(cls, plan: Plan, source: ModelSource | None = None, model: Any = None, calibration: Any = None,
                filename: str = "model_nvfp4", overwrite: bool = False, verify: bool = True, device: str = "auto",
                run_after: Any = None) -> io.NodeOutput:
        import comfy.utils

        src = resolve_source(source, model)
        if calibration is not None:
            plan = with_calibration(plan, src, calibration)
        path = output_path(filename)
        pbar = comfy.utils.ProgressBar(1)
        report = save_checkpoint(plan, src, path, overwrite=overwrite, verify=verify, device=device,
                                 on_progress=lambda done, total: pbar.update_absolute(done, total))
        name = path.relative_to(output_folder()).as_posix()
        notes = []
        if model is not None and source is None and getattr(model, "patches", None):
            notes.append("the MODEL carried weight patches (e.g. LoRA); the file holds the unpatched weights")
        payload = result_payload(report, plan, name)
        payload["summary"].extend(f"note: {n}" for n in notes)
        log.info("Save NVFP4 Checkpoint: %s", payload["summary"][0])
        return io.NodeOutput(str(path), "\n".join(payload["summary"]), ui=ui.ui(payload))
