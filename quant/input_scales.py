"""Static `input_scale` per NVFP4 layer (and optionally per FP8 layer): where it comes from, and which wins.

Sources (each optional):

* **none** (`none=True`, `--no-input-scale`): no layer gets a static scale; ComfyUI then computes amax/2688 of every
  activation at run time (dynamic). It cannot be combined with another source (the original silently turned the
  others into no-ops).
* **reference** (`reference=PATH`, `--input-scale-from`): copy `L.input_scale` from an existing NVFP4/FP8 checkpoint.
  Names are validated against the model (unknown names are an error with suggestions); a value is copied only between
  the same format family (an FP8 scale is amax/448, an NVFP4 one amax/2688); any stored shape becomes a 0-dim fp32.
* **calibration** (`calibration=PATH`, `--input-scale-summary`): a CalibrationStore or an original
  `scales_summary_*.json`, turned into scales by `calibration.scale_selection.select_input_scales` (percentile ×
  margin, max, or mse). A percentile the summary lacks is an error, never a silent fallback to `scale_max`.
* **value** (`value=F`, `--input-scale-value`): one fixed scale (finite, > 0) for every NVFP4 layer not covered above.

Priority, per layer (first that has a value): **reference > calibration > value > dynamic**. This is what the
original documented; its code instead let a summary erase calibration results for all layers and fell back to a
made-up 10/2688. W4A16 layers receive a scale too (ComfyUI ignores it there, but it lets a plan flip them to W4A4);
W4A4 layers left without a source are listed in the plan report.

FP8 layers (`fp8=True`, `--fp8-input-scale`): ComfyUI's FP8 path uses activation scale **1.0** when `input_scale`
is absent, i.e. activations are clamped to ±448 and small values flush. With calibration data we write
`amax/448` (= the NVFP4 scale × 6, margin included) so W8A8 runs at the measured range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import formats
from .errors import CalibrationError, PlanError
from .layer_lists import describe_unknown

METHODS = ("percentile", "max", "mse")
_NVFP4_FAMILY = (formats.NVFP4, formats.NVFP4_W4A16)
_FP8_FAMILY = (formats.FP8, formats.FP8_E5M2)


@dataclass
class InputScaleOptions:
    """How static input scales are chosen (see the module docstring for semantics and priority)."""
    none: bool = False
    value: float | None = None
    reference: str | None = None
    calibration: str | None = None
    method: str = "percentile"
    percentile: float = 99.9
    margin: float = 1.0
    fp8: bool = False

    def validate(self) -> None:
        """PlanError for contradictory or out-of-range settings (no silent no-ops)."""
        if self.none and (self.value is not None or self.reference or self.calibration or self.fp8):
            given = [n for n, v in (("--input-scale-value", self.value is not None),
                                    ("--input-scale-from", self.reference),
                                    ("--input-scale-summary", self.calibration),
                                    ("--fp8-input-scale", self.fp8)) if v]
            raise PlanError(f"--no-input-scale contradicts {', '.join(given)}; choose one")
        if self.value is not None:
            v = self.value
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise PlanError(f"--input-scale-value must be a finite number > 0, got {v!r}")
        if self.method not in METHODS:
            raise PlanError(f"input-scale method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise PlanError(f"--input-scale-percentile must be in (0, 100], got {self.percentile!r}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin > 0):
            raise PlanError(f"--input-scale-margin must be a finite number > 0, got {self.margin!r}")
        if self.fp8 and not (self.calibration or self.reference):
            raise PlanError("--fp8-input-scale needs calibration data (--input-scale-summary) or a reference file "
                            "(--input-scale-from)")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- sources -------------------------------------------------------------------------------------------------

def reference_scales(path: str | Path) -> dict[str, tuple[float, str]]:
    """layer -> (input_scale as float, the layer's format) for every layer of a reference checkpoint that has one."""
    from .checkpoint import open_checkpoint
    out: dict[str, tuple[float, str]] = {}
    with open_checkpoint(path) as ref:
        for name, layer in ref.layers().items():
            value = layer.input_scale
            if value is None and f"{name}.input_scale" in set(layer.keys):
                value = _tensor_scalar(ref.tensor(f"{name}.input_scale"), f"{name}.input_scale", path)
            if value is None:
                continue
            value = float(value)
            if not math.isfinite(value) or value <= 0:
                raise PlanError(f"{path}: {name}.input_scale is {value}; a static scale must be finite and > 0")
            out[name] = (value, layer.format)
    return out


def _tensor_scalar(t: Any, what: str, path: str | Path) -> float:
    if t.numel() != 1:
        raise PlanError(f"{path}: {what} has {t.numel()} elements; an input_scale is one number")
    return float(t.float().reshape(()).item())


def load_calibration(path: str | Path) -> Any:
    """A CalibrationStore, an original scales_summary JSON (LegacySummary) or a ComfyUI scale log, via
    calibration.legacy.load_any (the one reader of those formats)."""
    from ..calibration.legacy import load_any
    return load_any(path)


def calibration_scales(source: Any, *, method: str, percentile: float, margin: float) -> dict[str, Any]:
    """layer -> ScaleChoice via calibration.scale_selection (the single implementation of the selection rules)."""
    from ..calibration.scale_selection import select_input_scales
    return select_input_scales(source, method=method, percentile=percentile, margin=margin)


# ---- assignment ----------------------------------------------------------------------------------------------

def assign_input_scales(plan: Any, options: InputScaleOptions, *, known_layers: Collection[str],
                        allow_unmatched: bool = False,
                        load_reference: Callable[[str], Mapping[str, tuple[float, str]]] = reference_scales,
                        load_calibration_fn: Callable[[str], Any] = load_calibration,
                        select: Callable[..., Mapping[str, Any]] = calibration_scales) -> None:
    """Set input_scale / input_scale_source on every NVFP4 (and, with options.fp8, FP8) decision of `plan`.

    Existing scales are cleared first, so this can be re-run after apply_overrides. `known_layers` = every layer
    name of the model (for validating the names of reference files and calibration data). Notes go to plan.notes,
    the W4A4 layers left dynamic to plan.report["missing_input_scale"].
    """
    options.validate()
    notes = plan.notes
    for dec in plan.layers.values():
        dec.input_scale = None
        dec.input_scale_source = None
    plan.report.pop("missing_input_scale", None)
    if options.none:
        n = len(plan.by_format(formats.NVFP4))
        notes.append(f"input_scale: none requested; {n} W4A4 layer(s) quantize activations dynamically (amax/2688 "
                     f"per call)")
        return

    ref: Mapping[str, tuple[float, str]] = {}
    ref_label = cal_label = ""
    if options.reference:
        ref = load_reference(options.reference)
        ref_label = f"reference:{Path(options.reference).name}"
        if not ref:
            raise PlanError(f"{options.reference}: no layer has an input_scale; it cannot be a reference")
        _check_names(ref, known_layers, what=f"input scales of {options.reference}", allow=allow_unmatched,
                     notes=notes)
    cal: Mapping[str, Any] = {}
    if options.calibration:
        store = load_calibration_fn(options.calibration)
        cal = select(store, method=options.method, percentile=options.percentile, margin=options.margin)
        how = f"p{options.percentile:g}" if options.method == "percentile" else options.method
        cal_label = f"calibration:{Path(options.calibration).name} {how}x{options.margin:g}"
        if not cal:
            raise CalibrationError(f"{options.calibration}: holds no layer; nothing to take input scales from")
        _check_names(cal, known_layers, what=f"calibration {options.calibration}", allow=allow_unmatched,
                     notes=notes)

    used = {"reference": 0, "calibration": 0, "value": 0, "fp8": 0}
    fp8_missing: list[str] = []
    for name, dec in plan.layers.items():
        if dec.format in _NVFP4_FAMILY:
            r = ref.get(name)
            if r is not None and r[1] in _NVFP4_FAMILY:
                dec.input_scale, dec.input_scale_source = r[0], ref_label
                used["reference"] += 1
            elif name in cal:
                dec.input_scale = _finite_scale(_choice_scale(cal[name]), name, options.calibration)
                dec.input_scale_source = cal_label
                used["calibration"] += 1
            elif options.value is not None:
                dec.input_scale, dec.input_scale_source = float(options.value), "value"
                used["value"] += 1
        elif dec.format in _FP8_FAMILY:
            r = ref.get(name)
            if r is not None and r[1] in _FP8_FAMILY:
                dec.input_scale, dec.input_scale_source = r[0], ref_label
                used["reference"] += 1
            elif options.fp8 and name in cal:
                # NVFP4 scale = amax*margin/2688 -> FP8 scale = amax*margin/448 = 6 x the NVFP4 scale.
                s = _finite_scale(_choice_scale(cal[name]), name, options.calibration)
                dec.input_scale = s * formats.F4_E2M1_MAX
                dec.input_scale_source = cal_label + " amax/448"
                used["fp8"] += 1
            elif options.fp8:
                fp8_missing.append(name)

    # Report sources that did not apply, and W4A4 layers without a static scale.
    if ref:
        skipped = [n for n, (_, f) in ref.items() if n in plan.layers and not _same_family(f, plan.layers[n].format)]
        if skipped:
            notes.append(f"{ref_label}: {len(skipped)} layer(s) have a scale there but a different format family "
                         f"here (not copied), e.g. {skipped[0]}")
    if cal:
        unused = [n for n in cal if n in plan.layers and plan.layers[n].format not in _NVFP4_FAMILY
                  and not (options.fp8 and plan.layers[n].format in _FP8_FAMILY)]
        if unused:
            notes.append(f"{cal_label}: {len(unused)} calibrated layer(s) are not NVFP4 in this plan (scale unused), "
                         f"e.g. {', '.join(unused[:3])}")
    parts = [f"{k} {v}" for k, v in used.items() if v]
    if parts:
        notes.append("input_scale sources: " + ", ".join(parts) + " (priority: reference > calibration > value)")
    missing = plan.layers_without_input_scale()
    if missing:
        plan.report["missing_input_scale"] = missing
        if options.reference or options.calibration or options.value is not None:
            notes.append(f"{len(missing)} W4A4 layer(s) have no input_scale source and stay dynamic: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if fp8_missing:
        notes.append(f"{len(fp8_missing)} FP8 layer(s) have no calibration data and keep ComfyUI's activation scale "
                     f"1.0: {', '.join(fp8_missing[:5])}{' ...' if len(fp8_missing) > 5 else ''}")


def _same_family(a: str, b: str) -> bool:
    return (a in _NVFP4_FAMILY and b in _NVFP4_FAMILY) or (a in _FP8_FAMILY and b in _FP8_FAMILY)


def _choice_scale(choice: Any) -> float:
    value = getattr(choice, "input_scale", choice)
    if hasattr(value, "item"):
        value = value.item()
    return float(value) if value is not None else math.nan


def _finite_scale(value: float, layer: str, source: Any) -> float:
    if not math.isfinite(value) or value <= 0:
        raise CalibrationError(f"{source}: layer {layer} gives input_scale {value}; a static scale must be finite "
                               f"and > 0 (re-record calibration for this layer or exclude it)")
    return value


def _check_names(names: Collection[str], known: Collection[str], *, what: str, allow: bool,
                 notes: list[str]) -> None:
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    msg = describe_unknown(unknown, known, what=what)
    if not allow:
        raise PlanError(msg + "; is it data for another model? (pass allow_unmatched / --allow-unmatched to ignore)")
    notes.append(msg + "; ignored (allow_unmatched)")


def summary_dict(options: InputScaleOptions) -> dict:
    """JSON-safe options record for plan provenance."""
    return json.loads(json.dumps(options.to_dict()))
