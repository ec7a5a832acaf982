"""Build Plan (NVFP4): a format per Linear layer (preset + rules, optional GGUF guide, optional sensitivity
report + size budget, optional calibrated static input scales), previewed in the node. Nothing is written.

All decisions are `quant.rules.build_plan`'s; this node only turns widgets into `PlanOptions`. Static mistakes
(a bad regex, an unreadable budget) are refused at queue time by `validate_inputs`; mistakes that need the model
(a regex matching no layer, a report or calibration for another model) raise the core's PlanError /
CalibrationError at run time, which ComfyUI shows on the node.
"""

from __future__ import annotations

import re
from typing import Any

from comfy_api.latest import io

from ..quant import formats
from ..quant.errors import PlanError
from ..quant.plan import Plan
from . import ui
from .types import (CATEGORY, NONE, Calibration, ModelSource, PlanSocket, Sensitivity, Source, list_gguf,
                    list_sessions, pick_calibration, resolve_model, resolve_session, stamp_of)

MODES = ["preset", "all"]
SCALE_METHODS = ["percentile", "max", "mse"]
PLAN_COLUMNS = ["layer", "format", "shape", "params", "weight bytes", "input_scale", "reason"]
PLAN_NUMERIC = [False, False, False, True, True, True, False]
_REGEX_FIELDS = ("include", "exclude", "w4a16", "fp8")


def preset_choices() -> list[str]:
    from ..quant.presets import preset_names

    return ["auto", *preset_names(), "none"]


def patterns(text: str | None) -> list[str]:
    """One regex per line; blank lines and lines starting with '#' are ignored."""
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.strip().startswith("#")]


def check_patterns(field: str, text: str | None) -> str | None:
    """Error message for the first line of `text` that is not a valid regex, else None."""
    for i, pat in enumerate(patterns(text), 1):
        try:
            re.compile(pat, re.IGNORECASE)
        except re.error as exc:
            return f"{field}: line {i} /{pat}/ is not a valid regular expression ({exc})"
    return None


def plan_payload(plan: Plan, title: str | None = None) -> dict:
    """The node's preview table of a plan: one row per Linear layer, in plan order."""
    import math

    rows = []
    for name, d in plan.layers.items():
        rows.append([name, d.format, list(d.shape), int(math.prod(d.shape)),
                     formats.stored_weight_bytes(d.format, tuple(d.shape)), d.input_scale, d.reason])
    return ui.table(title or f"Plan for {plan.source.get('file', '?')}", PLAN_COLUMNS, rows, numeric=PLAN_NUMERIC,
                    sort=None, chart=("weight bytes", 4, 20), summary=plan.summary_lines())


def _slim_options(plan: Plan, sensitivity: Any) -> None:
    """Keep provenance of the sensitivity report in plan.options short (not the whole report)."""
    if sensitivity is None:
        return
    src = getattr(sensitivity, "source", {}) or {}
    plan.options["sensitivity"] = {"file": src.get("file"), "header_sha256": src.get("header_sha256"),
                                   "inputs": getattr(sensitivity, "inputs", None),
                                   "layers": len(getattr(sensitivity, "layers", []) or [])}


def build_node_plan(source: ModelSource, *, preset: str = "auto", mode: str = "preset", include: str = "",
                    exclude: str = "", w4a16: str = "", fp8: str = "", keep_first: int = -1, keep_last: int = -1,
                    gguf: str = NONE, budget: str = "", sensitivity: Any = None, calibration: Any = None,
                    calibration_session: str = NONE, input_scale_method: str = "percentile",
                    percentile: float = 99.9, margin: float = 1.0) -> Plan:
    """PlanOptions from the node's widgets, then quant.rules.build_plan on the source."""
    from ..quant.input_scales import InputScaleOptions
    from ..quant.rules import PlanOptions, build_plan

    budget = (budget or "").strip()
    if budget and sensitivity is None:
        raise PlanError(f"budget {budget!r} needs a SENSITIVITY report: connect Sensitivity Probe (NVFP4)")
    if sensitivity is not None and not budget:
        raise PlanError("a SENSITIVITY report is connected but budget is empty: give a size (e.g. 9.5GB, 900MB) "
                        "or bits per weight (e.g. 4.8bpw), or disconnect the report")
    cal_path = pick_calibration(calibration, calibration_session)
    scales = InputScaleOptions(calibration=str(cal_path) if cal_path else None, method=input_scale_method,
                               percentile=float(percentile), margin=float(margin))
    gguf_path = None if not gguf or gguf == NONE else str(resolve_model(gguf))
    options = PlanOptions(
        preset=preset, mode=mode, include=patterns(include), exclude=patterns(exclude), fp8=patterns(fp8),
        w4a16=patterns(w4a16), keep_first=None if keep_first is None or keep_first < 0 else int(keep_first),
        keep_last=None if keep_last is None or keep_last < 0 else int(keep_last), gguf=gguf_path,
        input_scale=scales, sensitivity=sensitivity, budget=budget or None)
    with source.open() as ckpt:
        if ckpt.header_hash() != source.header_sha256:
            raise PlanError(f"{source.name} changed on disk since it was loaded; re-run Load Model (NVFP4)")
        plan = build_plan(ckpt, options)
    _slim_options(plan, sensitivity)
    return plan


class NVFP4BuildPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4BuildPlan",
            display_name="Build Plan (NVFP4)",
            category=CATEGORY,
            is_output_node=True,  # shows its table even when nothing consumes its outputs
            description="Decides a format for every Linear layer: the preset's rules, your include/exclude/W4A16/FP8 "
                        "regexes and edge blocks, optionally guided by a GGUF file or by a sensitivity report within "
                        "a size budget, with static input scales from a calibration session. Preview only: nothing "
                        "is written until Save NVFP4 Checkpoint.",
            inputs=[
                Source.Input("source", tooltip="From Load Model (NVFP4)."),
                io.Combo.Input("preset", options=preset_choices(), default="auto",
                               tooltip="auto = the preset of the detected architecture; none = no preset rules."),
                io.Combo.Input("mode", options=MODES, default="preset",
                               tooltip="preset: the preset decides; all: NVFP4 for every Linear the loader allows."),
                io.String.Input("include", multiline=True, default="",
                                tooltip="Regexes (one per line, searched, case-insensitive): these layers become "
                                        "NVFP4 (beats exclude)."),
                io.String.Input("exclude", multiline=True, default="",
                                tooltip="Regexes: these layers stay in the source precision."),
                io.String.Input("w4a16", multiline=True, default="",
                                tooltip="Regexes: NVFP4 layers that keep full-precision activations (W4A16)."),
                io.String.Input("fp8", multiline=True, default="", tooltip="Regexes: these layers become FP8."),
                io.Int.Input("keep_first", default=-1, min=-1, max=1000,
                             tooltip="Keep the first N blocks of every block group; -1 = the preset's value."),
                io.Int.Input("keep_last", default=-1, min=-1, max=1000,
                             tooltip="Keep the last N blocks of every block group; -1 = the preset's value."),
                io.Combo.Input("gguf", options=list_gguf(), default=NONE, advanced=True,
                               tooltip="Optional GGUF of the same model: its tensor types choose the formats."),
                Sensitivity.Input("sensitivity", optional=True,
                                  tooltip="From Sensitivity Probe (NVFP4); needs a budget."),
                io.String.Input("budget", default="",
                                tooltip="With a sensitivity report: file size (9.5GB, 900MB, 850MiB) or bits per "
                                        "weight (4.8bpw). The planner picks the least-error formats that fit."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="Calibration session from Calibrate (NVFP4) (wins over "
                                          "calibration_session): static input scales for W4A4 layers."),
                io.Combo.Input("calibration_session", options=list_sessions(), default=NONE,
                               tooltip="A saved session in output/nvfp4_calibration."),
                io.Combo.Input("input_scale_method", options=SCALE_METHODS, default="percentile",
                               tooltip="How a static input_scale is chosen from the recorded amax."),
                io.Float.Input("percentile", default=99.9, min=50.0, max=100.0, step=0.01),
                io.Float.Input("margin", default=1.0, min=0.5, max=4.0, step=0.01,
                               tooltip="Multiplier on the chosen amax."),
                io.AnyType.Input("run_after", optional=True,
                                 tooltip="Connect the sampler's output here when using a calibration session "
                                         "recorded in the same workflow, so the plan is built after sampling."),
            ],
            outputs=[PlanSocket.Output(display_name="PLAN"), io.String.Output(display_name="table")],
        )

    @classmethod
    def fingerprint_inputs(cls, calibration_session: str = NONE, gguf: str = NONE, **kwargs) -> tuple:
        return stamp_of(resolve_session, calibration_session), stamp_of(resolve_model, gguf)

    @classmethod
    def validate_inputs(cls, include: str = "", exclude: str = "", w4a16: str = "", fp8: str = "",
                        budget: str = "") -> bool | str:
        for field, text in zip(_REGEX_FIELDS, (include, exclude, w4a16, fp8), strict=True):
            msg = check_patterns(field, text)
            if msg:
                return msg
        if budget and budget.strip():
            from ..calibration.budget import parse_budget

            try:
                parse_budget(budget.strip())
            except PlanError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, source: ModelSource, preset: str = "auto", mode: str = "preset", include: str = "",
                exclude: str = "", w4a16: str = "", fp8: str = "", keep_first: int = -1, keep_last: int = -1,
                gguf: str = NONE, sensitivity: Any = None, budget: str = "", calibration: Any = None,
                calibration_session: str = NONE, input_scale_method: str = "percentile", percentile: float = 99.9,
                margin: float = 1.0, run_after: Any = None) -> io.NodeOutput:
        plan = build_node_plan(source, preset=preset, mode=mode, include=include, exclude=exclude, w4a16=w4a16,
                               fp8=fp8, keep_first=keep_first, keep_last=keep_last, gguf=gguf, budget=budget,
                               sensitivity=sensitivity, calibration=calibration,
                               calibration_session=calibration_session, input_scale_method=input_scale_method,
                               percentile=percentile, margin=margin)
        return io.NodeOutput(plan, plan.table(), ui=ui.ui(plan_payload(plan)))
