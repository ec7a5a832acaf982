"""Budget planner: pick each layer's format so the predicted output error is smallest for a given file size.

Why: presets and hand-made lists decide per layer *name*; the original scripts ranked layers by input-quantization
error alone. Neither knows what a layer costs in bytes or what it costs in output error. Given a sensitivity report
(`calibration.sensitivity`, measured output error per candidate format) and a size budget, this module solves the
multiple-choice knapsack "one format per layer, minimise Σ predicted error, Σ bytes ≤ budget".

Budgets (`parse_budget`)
    * file size: ``"9.5GB"``, ``"900MB"``, ``"123456B"``, ``"7.2GiB"``, ``"850 MiB"``. B/KB/MB/GB/TB are decimal
      (10³ steps), KiB/MiB/GiB/TiB binary (2¹⁰ steps); a bare number is bytes. The size compared is
      ``Plan.estimated_bytes(ckpt)`` (tensor data, the converter's own accounting) **plus a header allowance**:
      an upper bound of the safetensors header (every tensor name at its largest tensor count per layer, the
      `_quantization_metadata` and provenance entries, the source metadata) so the converted file never exceeds
      the budget.
    * bits per weight: ``"4.8bpw"``. Defined over the planned Linear weights only:
      ``bpw = 8 · Σ_l stored_weight_bytes(format_l, shape_l) / Σ_l out_l·in_l`` over every layer of the plan
      (quantized and kept). ``stored_weight_bytes`` counts codes, block scales, the per-tensor scale and the
      comfy_quant marker (NVFP4 ≈ 4.5 bpw, FP8 ≈ 8, BF16 = 16); biases, input scales, non-Linear tensors and the
      header are excluded.

Error model
    A layer l in candidate c contributes ``importance_l · rel_rmse_{l,c}²`` where rel_rmse is the probe's relative
    output error (W4A4 dynamic or static as the base plan says, FP8 W8A8 with ComfyUI's activation scale, or bf16).
    Importance is ``"uniform"`` (1 for every layer: relative errors in a residual network add up roughly
    independently; the default) or ``"energy"`` (the layer's share of the reference output energy,
    output_rms², normalised to mean 1: favours layers that write large values).

Which layers are decided
    Only layers the base plan quantizes. Layers the base plan keeps (preset ``never_quantize``/keep rules, user
    excludes, minimum size) stay exactly as they are; to let the planner decide every layer except the preset's
    ``never_quantize`` ones, start from a ``mode="all"`` plan. The candidate formats default to nvfp4 / fp8 /
    bf16 (bf16 = the plan's keep dtype). A layer the base plan put in ``nvfp4-w4a16`` stays in that family (its
    NVFP4 candidate is W4A16). ``nvfp4-w4a16`` can be allowed for every layer, but it costs the same bytes as W4A4
    with less error, so it wins every tie (it trades speed on Blackwell, which this error model does not see).
    Static input scales: a layer with a static ``input_scale`` in the base plan is predicted with the static W4A4
    error and keeps its scale; if it moves to FP8 it gets the same calibrated amax as ``amax/448`` when the plan's
    options asked for FP8 input scales (``--fp8-input-scale``; without recorded options: when the report measured
    ``fp8-static``), else none (ComfyUI then uses 1.0, and the ``fp8`` error measured with 1.0 is used).
    A layer whose weight is not finite is kept; layers missing from the report keep their base decision (noted).
    The result's ``report["budget"]`` holds the summary and a thinned trade-off curve (`curve_from_plan`).

Solver
    Per layer, the lower convex hull of (bytes, error) over its candidates; all hull steps of all layers sorted by
    error removed per byte; steps taken greedily while they fit (a step that does not fit freezes that layer); then
    a repair pass tries every remaining single-layer upgrade that fits. This is the classic LP-relaxation greedy for
    the multiple-choice knapsack; the hull walk also gives the size/error trade-off curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..quant import formats as F
from ..quant.errors import PlanError
from .sensitivity import FP8_STATIC, NVFP4_STATIC, STATUS_NONFINITE_WEIGHT, SensitivityReport

DEFAULT_CANDIDATES = (F.NVFP4, F.FP8, F.BF16)
IMPORTANCE_MODES = ("uniform", "energy")

_DECIMAL = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


# --------------------------------------------------------------------------------------------------------------
# budget parsing
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed budget: `kind` "bytes" (value = bytes, int) or "bpw" (value = bits per planned Linear weight)."""

    kind: str
    value: float
    text: str

    def describe(self) -> str:
        if self.kind == "bpw":
            return f"{self.value:g} bits per weight"
        return f"{human_bytes(self.value)} ({int(self.value):,} bytes)"


def parse_budget(text: str | float | int | Budget) -> Budget:
    """Parse "9.5GB" / "900MB" / "850MiB" / "123456" (bytes) / "4.8bpw" into a `Budget` (see module docstring).

    Raises PlanError naming the accepted units for anything else, and for zero/negative budgets."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text <= 0:
            raise PlanError(f"budget {text!r} must be a positive size")
        return Budget("bytes", float(int(text)), str(text))
    s = str(text).strip()
    m = _BUDGET_RE.match(s)
    if not m:
        raise PlanError(f"budget {text!r} is not a size or a bits-per-weight value; write e.g. 9.5GB, 900MB, "
                        f"850MiB, 123456 (bytes) or 4.8bpw")
    number, unit = float(m.group(1)), m.group(2).lower()
    if number <= 0 or not math.isfinite(number):
        raise PlanError(f"budget {text!r} must be positive")
    if unit == "bpw":
        if not 1.0 <= number <= 32.0:
            raise PlanError(f"budget {text!r}: bits per weight must be between 1 and 32 (NVFP4 is ~4.5, FP8 ~8, "
                            f"BF16 16)")
        return Budget("bpw", number, s)
    if unit == "":
        unit = "b"
    if unit in _DECIMAL:
        mult = _DECIMAL[unit]
    elif unit in _BINARY:
        mult = _BINARY[unit]
    else:
        raise PlanError(f"budget {text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB (decimal), "
                        f"KiB, MiB, GiB, TiB (binary) or bpw")
    return Budget("bytes", float(math.floor(number * mult)), s)


def human_bytes(n: float) -> str:
    """Decimal units, matching how budgets like "9.5GB" are read."""
    for unit, mult in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= mult:
            return f"{n / mult:.3g} {unit}" if abs(n) / mult < 100 else f"{n / mult:.1f} {unit}"
    return f"{int(n)} B"


def _signed_bytes(n: float) -> str:
    return ("+" if n >= 0 else "-") + human_bytes(abs(n))


# --------------------------------------------------------------------------------------------------------------
# trade-off curve
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TradeoffCurve:
    """Predicted error against size along the planner's greedy path, plus the chosen point and the budget."""

    points: list[dict]                 # {"bytes", "bpw", "predicted_error", "layer", "format"} in path order
    chosen: dict                       # {"bytes", "bpw", "predicted_error"}
    budget: dict                       # {"text", "kind", "value", "limit_bytes"|"limit_bpw"}
    min_bytes: int
    max_bytes: int
    header_allowance: int
    importance: str
    candidates: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)
    reference_points: list[dict] = dataclasses.field(default_factory=list)   # e.g. presets: {"label", "bytes", ...}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(_clean(self.to_dict()), indent=1, allow_nan=False) + "\n"

    def save_json(self, path: str | Path, *, force: bool = False) -> Path:
        from ..quant.atomic import atomic_output
        text = self.to_json()
        with atomic_output(path, force=force) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        return Path(path)

    def save_png(self, path: str | Path, *, force: bool = False, title: str | None = None) -> Path:
        """Size (x, MB) vs predicted error (y, log) with the budget line and the chosen plan marked."""
        from ..quant.atomic import atomic_output
        png = tradeoff_png(self, title=title)
        with atomic_output(path, force=force) as tmp:
            Path(tmp).write_bytes(png)
        return Path(path)


def tradeoff_png(curve: TradeoffCurve, *, title: str | None = None) -> bytes:
    """PNG bytes of the trade-off curve (matplotlib, Agg backend)."""
    import io

    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot(111)
    xs = [p["bytes"] / 1e6 for p in curve.points]
    ys = [max(p["predicted_error"], 1e-12) for p in curve.points]
    ax.plot(xs, ys, "-", color="#3465a4", lw=1.5, label="budget planner (greedy path)")
    ax.plot([curve.chosen["bytes"] / 1e6], [max(curve.chosen["predicted_error"], 1e-12)], "o", color="#cc0000",
            label="chosen plan")
    for ref in curve.reference_points:
        if ref.get("bytes") is not None and ref.get("predicted_error") is not None:
            ax.plot([ref["bytes"] / 1e6], [max(ref["predicted_error"], 1e-12)], "s", ms=6,
                    label=str(ref.get("label", "reference")))
    limit = curve.budget.get("limit_bytes")
    if limit:
        ax.axvline(limit / 1e6, color="#888", ls="--", lw=1, label=f"budget {human_bytes(limit)}")
    ax.set_yscale("log")
    ax.set_xlabel("estimated file size (MB)")
    ax.set_ylabel(f"predicted error (Σ {curve.importance} · rel_rmse²)")
    ax.set_title(title or "size vs predicted output error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------------------
# byte accounting (mirrors Plan.estimated_bytes per layer)
# --------------------------------------------------------------------------------------------------------------

def _layer_bytes(plan: Any, name: str, fmt: str, shape: tuple[int, ...], has_scale: bool,
                 bias_code: str | None, bias_numel: int) -> int:
    """Bytes the layer's weight (+ input_scale) and bias take in the converted file, as Plan.estimated_bytes counts
    them (the bias follows a kept layer's dtype, else the plan's rule for other tensors)."""
    total = F.stored_weight_bytes(fmt, tuple(shape))
    if fmt in F.QUANTIZED_FORMATS and has_scale:
        total += 4
    if bias_code is not None:
        from ..quant.plan import LayerDecision
        probe_plan = dataclasses.replace(plan, layers={name: LayerDecision(name, fmt, "", tuple(shape))})
        bfmt = probe_plan.dtype_for_tensor(name + ".bias", bias_code)
        if bfmt in F.PLAIN_DTYPES:
            total += bias_numel * F.PLAIN_DTYPES[bfmt].itemsize
        else:  # non-float bias: never cast
            total += bias_numel * 4
    return total


def header_allowance(plan: Any, ckpt: Any) -> int:
    """Upper bound of the converted file's header: every tensor entry (a quantized layer has at most 5 tensors:
    weight, weight_scale, weight_scale_2, input_scale, comfy_quant), the `_quantization_metadata` entry per layer,
    the provenance JSON and the source's metadata, plus 8 KiB slack."""
    per_entry = 96  # {"dtype":"F8_E4M3","shape":[12345,67890],"data_offsets":[1234567890,1234567890]}, quoted name
    total = 8192 + 8  # slack + the 8-byte length prefix
    planned = set(plan.layers)
    layer_of: dict[str, str] = {}
    for lname, layer in ckpt.layers().items():
        if lname in planned:
            for key in layer.keys:
                layer_of[key] = lname
    for name in ckpt.names():
        if name in layer_of:
            continue
        total += len(name) + per_entry
    for lname in planned:
        total += 5 * (len(lname) + 16 + per_entry)          # up to 5 tensors per layer (+ suffix)
        total += len(lname) + 64                              # _quantization_metadata entry
        total += len(lname) + 64                              # comfy_quant in provenance / plan summary
    meta = getattr(ckpt, "metadata", None) or {}
    total += sum(len(str(k)) + len(str(v)) * 2 + 8 for k, v in meta.items())   # JSON escaping can double
    total += 4096                                              # nvfp4_lab provenance summary
    return int(total)


def planned_weight_bits(plan: Any) -> tuple[int, int]:
    """(Σ stored weight bytes·8, Σ weight elements) over the plan's layers: the bits-per-weight definition."""
    bits = 0
    numel = 0
    for dec in plan.layers.values():
        bits += 8 * F.stored_weight_bytes(dec.format, tuple(dec.shape))
        numel += math.prod(dec.shape)
    return bits, numel


def plan_bpw(plan: Any) -> float:
    bits, numel = planned_weight_bits(plan)
    return bits / numel if numel else 0.0


# --------------------------------------------------------------------------------------------------------------
# the planner
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Option:
    candidate: str          # probe candidate name (nvfp4 / nvfp4-static / fp8 / fp8-static / bf16 / nvfp4-w4a16)
    fmt: str                # plan format
    input_scale: float | None
    scale_source: str | None
    has_scale: bool         # counted as a 4-byte input_scale tensor
    bytes: int              # file bytes (weight + scale + bias)
    wbits: int              # stored weight bits (for bpw)
    rel: float              # probe rel_rmse
    cost: float             # importance · rel²


@dataclasses.dataclass
class _Var:
    name: str
    options: list[_Option]
    hull: list[int]          # indices into options, increasing bytes, decreasing cost


@dataclasses.dataclass
class _Solution:
    """What the solver decided: per decided layer (option, reason), forced keeps, the curve and a summary."""
    chosen: dict[str, tuple[_Option, str]]
    forced: dict[str, tuple[str, str]]          # layer -> (keep format, reason)
    curve: TradeoffCurve
    summary: dict
    notes: list[str]


def _default_keep(plan: Any) -> str:
    if plan.other_dtype in F.PLAIN_FORMATS:
        return plan.other_dtype
    src = (plan.source or {}).get("dtype")
    return src if src in F.PLAIN_FORMATS else F.BF16


def _solve(base_plan: Any, report: SensitivityReport, budget: Budget, ckpt: Any, *, candidates: Sequence[str],
           importance: str, keep_format: str | None, header_bytes: int | None) -> _Solution:
    if importance not in IMPORTANCE_MODES:
        raise PlanError(f"importance {importance!r} is not one of {', '.join(IMPORTANCE_MODES)}")
    bad = [c for c in candidates if c not in (F.NVFP4, F.NVFP4_W4A16, F.FP8, F.BF16)]
    if bad or not candidates:
        raise PlanError(f"budget candidates {list(candidates)!r}: choose among nvfp4, nvfp4-w4a16, fp8, bf16")
    keep_format = keep_format or _default_keep(base_plan)
    if keep_format not in F.PLAIN_FORMATS:
        raise PlanError(f"keep format {keep_format!r} must be one of {', '.join(F.PLAIN_FORMATS)}")

    notes: list[str] = []
    entries = report.by_layer()
    _check_report_matches(base_plan, report, entries, ckpt, notes)

    names = set(ckpt.names())
    bias_info: dict[str, tuple[str, int]] = {}
    for lname in base_plan.layers:
        if lname + ".bias" in names:
            info = ckpt.info(lname + ".bias")
            bias_info[lname] = (info.dtype, math.prod(info.shape))
    imp = _importance(base_plan, entries, importance)

    variables: list[_Var] = []
    forced: dict[str, tuple[str, str]] = {}
    missing: list[str] = []
    for lname, dec in base_plan.layers.items():
        if not dec.quantized:
            continue
        entry = entries.get(lname)
        if entry is None:
            missing.append(lname)
            continue
        if entry.status == STATUS_NONFINITE_WEIGHT:
            forced[lname] = (keep_format, f"kept in {keep_format}: the sensitivity probe found a non-finite weight "
                                          f"(NVFP4/FP8 cannot store NaN/Inf)")
            continue
        opts = _options_for(base_plan, lname, dec, entry, candidates, keep_format, bias_info.get(lname),
                            imp.get(lname, 1.0))
        if not opts:
            notes.append(f"{lname}: no finite probe result for any candidate ({entry.status}); decision unchanged")
            continue
        variables.append(_make_var(lname, opts))
    if missing:
        notes.append(f"{len(missing)} quantized layer(s) are not in the sensitivity report and keep their preset "
                     f"decision (e.g. {', '.join(missing[:3])}); probe them for a complete plan")

    # fixed part = the converter's estimate of everything except the variables' weight/scale/bias bytes
    work = dataclasses.replace(base_plan, layers=dict(base_plan.layers))
    from ..quant.plan import LayerDecision
    for lname, (fmt, reason) in forced.items():
        work.layers[lname] = LayerDecision(lname, fmt, reason, tuple(base_plan.layers[lname].shape))
    base_total = work.estimated_bytes(ckpt)
    var_names = {v.name for v in variables}
    var_base = 0
    for v in variables:
        dec = work.layers[v.name]
        bi = bias_info.get(v.name)
        var_base += _layer_bytes(work, v.name, dec.format, dec.shape, dec.input_scale is not None,
                                 bi[0] if bi else None, bi[1] if bi else 0)
    fixed_bytes = base_total - var_base
    fixed_wbits = sum(8 * F.stored_weight_bytes(d.format, tuple(d.shape))
                      for n, d in work.layers.items() if n not in var_names)
    total_numel = sum(math.prod(d.shape) for d in base_plan.layers.values())
    allowance = header_allowance(base_plan, ckpt) if header_bytes is None else int(header_bytes)

    def size_of(choice: Sequence[int]) -> int:
        return fixed_bytes + sum(v.options[c].bytes for v, c in zip(variables, choice))

    def wbits_of(choice: Sequence[int]) -> int:
        return fixed_wbits + sum(v.options[c].wbits for v, c in zip(variables, choice))

    fixed_cost = 0.0
    for n, d in work.layers.items():
        if n in var_names:
            continue
        rel = _layer_rel(d, entries.get(n))
        if rel is not None:
            fixed_cost += imp.get(n, 1.0) * rel * rel

    def err_of(choice: Sequence[int]) -> float:
        return fixed_cost + sum(v.options[c].cost for v, c in zip(variables, choice))

    if budget.kind == "bytes":
        limit = int(budget.value) - allowance
        measure, unit = size_of, "bytes"
    else:
        limit = int(math.floor(budget.value * total_numel))  # stored weight bits
        measure, unit = wbits_of, "wbits"

    min_choice = [v.hull[0] for v in variables]
    max_choice = [v.hull[-1] for v in variables]
    if measure(min_choice) > limit:
        if budget.kind == "bytes":
            need = size_of(min_choice) + allowance
            raise PlanError(f"budget {budget.text} ({int(budget.value):,} bytes) is below the smallest file this plan "
                            f"can make: {human_bytes(need)} ({need:,} bytes: every eligible layer in its smallest "
                            f"format, preset-kept layers kept, {human_bytes(allowance)} header allowance); raise the "
                            f"budget to at least {human_bytes(need)} or relax the preset's keep rules")
        need_bpw = wbits_of(min_choice) / total_numel
        raise PlanError(f"budget {budget.text} is below the smallest achievable {need_bpw:.3f} bits per weight for "
                        f"this plan (every eligible layer in its smallest format, preset-kept layers kept); raise it "
                        f"to at least {math.ceil(need_bpw * 1000) / 1000:.3f}bpw")

    # greedy over convex-hull steps, best error removed per unit (bytes or bits) first
    steps: list[tuple[float, int, int, int]] = []
    for vi, v in enumerate(variables):
        for a, b in zip(v.hull, v.hull[1:]):
            oa, ob = v.options[a], v.options[b]
            du = getattr(ob, unit) - getattr(oa, unit)
            eff = (oa.cost - ob.cost) / du if du > 0 else math.inf
            steps.append((-eff, vi, a, b))
    steps.sort(key=lambda st: (st[0], st[1]))

    walk = list(min_choice)
    points = [_point(size_of(walk) + allowance, wbits_of(walk) / max(total_numel, 1), err_of(walk), None, None)]
    for _, vi, _a, b in steps:
        walk[vi] = b
        points.append(_point(size_of(walk) + allowance, wbits_of(walk) / max(total_numel, 1), err_of(walk),
                             variables[vi].name, variables[vi].options[b].candidate))

    choice = list(min_choice)
    current = measure(choice)
    frozen: set[int] = set()
    for _, vi, a, b in steps:
        if vi in frozen or choice[vi] != a:
            continue
        v = variables[vi]
        delta = getattr(v.options[b], unit) - getattr(v.options[a], unit)
        if current + delta <= limit:
            choice[vi] = b
            current += delta
        else:
            frozen.add(vi)
    # repair pass: any single-layer switch that lowers the error and still fits, best gain per unit first
    while True:
        best: tuple[float, int, int] | None = None
        for vi, v in enumerate(variables):
            cur = v.options[choice[vi]]
            for oi, o in enumerate(v.options):
                gain = cur.cost - o.cost
                if gain <= 0:
                    continue
                delta = getattr(o, unit) - getattr(cur, unit)
                if current + delta > limit:
                    continue
                score = gain / delta if delta > 0 else math.inf
                if best is None or score > best[0]:
                    best = (score, vi, oi)
        if best is None:
            break
        _, vi, oi = best
        current += getattr(variables[vi].options[oi], unit) - getattr(variables[vi].options[choice[vi]], unit)
        choice[vi] = oi

    chosen = {v.name: (v.options[c], _reason(v, c)) for v, c in zip(variables, choice)}
    est = size_of(choice)
    chosen_pt = _point(est + allowance, wbits_of(choice) / max(total_numel, 1), err_of(choice), None, None)
    chosen_pt["estimated_bytes"] = int(est)
    budget_info: dict = {"text": budget.text, "kind": budget.kind, "value": budget.value}
    if budget.kind == "bytes":
        budget_info["limit_bytes"] = int(budget.value)
    else:
        budget_info["limit_bpw"] = budget.value
    curve = TradeoffCurve(points=_thin(points), chosen=chosen_pt, budget=budget_info,
                          min_bytes=size_of(min_choice) + allowance, max_bytes=size_of(max_choice) + allowance,
                          header_allowance=allowance, importance=importance, candidates=list(candidates),
                          notes=list(notes))
    counts: dict[str, int] = {}
    for opt, _ in chosen.values():
        counts[opt.fmt] = counts.get(opt.fmt, 0) + 1
    summary = {"budget": budget.text, "kind": budget.kind, "estimated_bytes": int(est),
               "header_allowance": allowance, "estimated_file_bytes_max": int(est + allowance),
               "bpw": chosen_pt["bpw"], "predicted_error": chosen_pt["predicted_error"],
               "min_file_bytes": curve.min_bytes, "max_file_bytes": curve.max_bytes, "importance": importance,
               "candidates": list(candidates), "decided_layers": len(variables), "choices": counts,
               "sensitivity_source": report.source.get("file"), "sensitivity_inputs": report.inputs}
    return _Solution(chosen=chosen, forced=forced, curve=curve, summary=summary, notes=notes)


def _budget_note(sol: _Solution, report: SensitivityReport) -> list[str]:
    s = sol.summary
    out = [f"budget {s['budget']}: {s['decided_layers']} layers decided by measured output error "
           f"({', '.join(f'{k} {n}' for k, n in s['choices'].items())}); estimated {human_bytes(s['estimated_bytes'])}"
           f" + <= {human_bytes(s['header_allowance'])} header; predicted error {s['predicted_error']:.4g}"]
    if report.inputs != "recorded":
        out.append(f"sensitivity report used {report.inputs} inputs: predictions are less reliable than with recorded "
                   f"calibration rows")
    return out + list(sol.notes)


def plan_for_budget(base_plan: Any, report: SensitivityReport | str | Path, budget: str | float | Budget,
                    ckpt: Any, *, candidates: Sequence[str] = DEFAULT_CANDIDATES, importance: str = "uniform",
                    keep_format: str | None = None, header_bytes: int | None = None) -> tuple[Any, TradeoffCurve]:
    """Re-decide the base plan's quantized layers to minimise predicted output error within `budget`.

    `base_plan` is a finished preset/rules plan (input scales already assigned); its kept layers, W4A16 choices and
    other-tensor rules stay. A layer with a static input_scale is predicted with the static W4A4 / FP8 error and
    keeps the same calibrated amax when it switches between NVFP4 (amax/2688) and FP8 (amax/448). `report` is a
    `SensitivityReport` or its path; `ckpt` the opened source checkpoint (sizes from `Plan.estimated_bytes`).
    `keep_format` None = the plan's keep dtype (other_dtype, else the source dtype).
    Returns (new Plan, TradeoffCurve). PlanError when even the cheapest choice exceeds the budget (the message
    gives the minimum achievable size) or the report does not match the model."""
    from ..quant.plan import LayerDecision, Plan

    if not isinstance(base_plan, Plan):
        raise PlanError("plan_for_budget needs a quant.plan.Plan as base plan")
    if not isinstance(report, SensitivityReport):
        report = SensitivityReport.load(report)
    budget = parse_budget(budget)
    sol = _solve(base_plan, report, budget, ckpt, candidates=candidates, importance=importance,
                 keep_format=keep_format, header_bytes=header_bytes)
    layers: dict[str, LayerDecision] = {}
    for lname, dec in base_plan.layers.items():
        if lname in sol.forced:
            fmt, reason = sol.forced[lname]
            layers[lname] = LayerDecision(lname, fmt, f"budget: {reason}", tuple(dec.shape))
        elif lname in sol.chosen:
            opt, reason = sol.chosen[lname]
            layers[lname] = LayerDecision(lname, opt.fmt, f"budget: {reason} [preset: {dec.reason}]",
                                          tuple(dec.shape), input_scale=opt.input_scale,
                                          input_scale_source=opt.scale_source if opt.input_scale else None)
        else:
            layers[lname] = dataclasses.replace(dec)
    new_plan = dataclasses.replace(base_plan, layers=layers, options=dict(base_plan.options),
                                   report=json.loads(json.dumps(base_plan.report)) if base_plan.report else {})
    est = new_plan.estimated_bytes(ckpt)
    if est != sol.summary["estimated_bytes"]:   # would be an accounting bug; never let it break the budget
        sol.notes.append(f"size accounting differs from Plan.estimated_bytes by {est - sol.summary['estimated_bytes']}"
                         f" bytes")
        if budget.kind == "bytes" and est + sol.summary["header_allowance"] > budget.value:
            raise PlanError(f"internal size mismatch: plan estimate {est:,} + header allowance exceeds the budget "
                            f"{int(budget.value):,}; please report this")
    new_plan.options["budget"] = sol.summary
    new_plan.report["output_bytes"] = est
    new_plan.report["budget"] = _report_block(sol)
    new_plan.report.setdefault("notes", []).extend(_budget_note(sol, report))
    return new_plan, sol.curve


def _report_block(sol: _Solution, max_points: int = 120) -> dict:
    """What a plan file keeps of the budget run: the summary and a thinned curve (enough to re-plot)."""
    block = dict(sol.summary)
    block["curve"] = {"points": _thin(sol.curve.points, max_points), "chosen": sol.curve.chosen,
                      "budget": sol.curve.budget, "min_bytes": sol.curve.min_bytes, "max_bytes": sol.curve.max_bytes,
                      "header_allowance": sol.curve.header_allowance}
    return block


def curve_from_plan(plan: Any) -> TradeoffCurve | None:
    """Rebuild the (thinned) trade-off curve stored in a budget plan's report, e.g. to plot it later."""
    block = (getattr(plan, "report", None) or {}).get("budget")
    if not block or "curve" not in block:
        return None
    c = block["curve"]
    return TradeoffCurve(points=c["points"], chosen=c["chosen"], budget=c["budget"], min_bytes=c["min_bytes"],
                         max_bytes=c["max_bytes"], header_allowance=c["header_allowance"],
                         importance=block.get("importance", "uniform"), candidates=block.get("candidates", []))


def _point(nbytes: int, bpw: float, err: float, layer: str | None, cand: str | None) -> dict:
    p = {"bytes": int(nbytes), "bpw": float(bpw), "predicted_error": float(err)}
    if layer is not None:
        p["layer"] = layer
        p["format"] = cand
    return p


def _thin(points: list[dict], max_points: int = 2000) -> list[dict]:
    if len(points) <= max_points:
        return list(points)
    stride = math.ceil(len(points) / max_points)
    out = points[::stride]
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out


def _check_report_matches(plan: Any, report: SensitivityReport, entries: Mapping[str, Any], ckpt: Any,
                          notes: list[str]) -> None:
    shared = [n for n in plan.layers if n in entries]
    if not shared:
        raise PlanError(f"sensitivity report ({report.source.get('file', '?')}) has none of this plan's layers; "
                        f"was it made for another model? Run `nvfp4 probe` on {plan.source.get('file', 'the model')}")
    for n in shared:
        if list(entries[n].shape) != list(plan.layers[n].shape):
            raise PlanError(f"sensitivity report ({report.source.get('file', '?')}) gives {n} shape "
                            f"{list(entries[n].shape)} but the model has {list(plan.layers[n].shape)}; it was made "
                            f"for another model; re-run `nvfp4 probe`")
    want = report.source.get("header_sha256")
    try:
        have = ckpt.header_hash()
    except Exception:  # pragma: no cover
        have = None
    if want and have and want != have:
        notes.append(f"sensitivity report was made on {report.source.get('file', '?')} (other header hash); layer "
                     f"names and shapes match, using it")


def _importance(plan: Any, entries: Mapping[str, Any], mode: str) -> dict[str, float]:
    if mode == "uniform":
        return {n: 1.0 for n in plan.layers}
    energy = {n: (entries[n].output_rms or 0.0) ** 2 for n in plan.layers if n in entries
              and entries[n].output_rms is not None and math.isfinite(entries[n].output_rms)}
    mean = sum(energy.values()) / len(energy) if energy else 0.0
    if mean <= 0:
        return {n: 1.0 for n in plan.layers}
    return {n: energy.get(n, mean) / mean for n in plan.layers}


def _base_amax(dec: Any) -> float | None:
    if dec.input_scale is None:
        return None
    if F.is_nvfp4(dec.format):
        return dec.input_scale * F.NVFP4_SCALE_DENOM
    if dec.format in F.FP8_DTYPES:
        return dec.input_scale * F.F8_E4M3_MAX
    return None


def _options_for(plan: Any, lname: str, dec: Any, entry: Any, candidates: Sequence[str], keep_format: str,
                 bias: tuple[str, int] | None, importance: float) -> list[_Option]:
    """The layer's feasible options with bytes and predicted error (see "Static input scales" in the module doc)."""
    amax = _base_amax(dec)
    opts: list[_Option] = []
    bcode, bnumel = (bias if bias else (None, 0))
    nv_static = amax is not None
    # FP8 layers the planner creates get the layer's calibrated amax/448 as input_scale when the plan's options
    # asked for FP8 input scales (--fp8-input-scale); without recorded options, when the report has fp8-static
    wanted = ((plan.options or {}).get("input_scale") or {}).get("fp8") if isinstance(plan.options, dict) else None
    f8_static = amax is not None and (bool(wanted) if wanted is not None else entry.error(FP8_STATIC) is not None)
    for cand in candidates:
        scale: float | None = None
        if cand == F.NVFP4 and dec.format == F.NVFP4_W4A16:
            cand = F.NVFP4_W4A16          # the user asked W4A16 for this layer: keep it in that family
        if cand == F.NVFP4:
            fmt = F.NVFP4
            probe_name = NVFP4_STATIC if nv_static and entry.error(NVFP4_STATIC) is not None else F.NVFP4
            has_scale = nv_static
            if amax is not None:
                scale = amax / F.NVFP4_SCALE_DENOM
        elif cand == F.FP8:
            fmt = F.FP8
            probe_name = FP8_STATIC if f8_static and entry.error(FP8_STATIC) is not None else F.FP8
            has_scale = f8_static         # without an fp8-static result the scale-1.0 error is used (pessimistic)
            if f8_static and amax is not None:
                scale = amax / F.F8_E4M3_MAX
        elif cand == F.NVFP4_W4A16:
            fmt, probe_name, has_scale = F.NVFP4_W4A16, F.NVFP4_W4A16, nv_static
            if amax is not None:
                scale = amax / F.NVFP4_SCALE_DENOM
        else:
            fmt, probe_name, has_scale = keep_format, F.BF16, False
        if any(o.fmt == fmt for o in opts):
            continue
        if fmt == F.FP32:
            rel: float | None = 0.0
        else:
            rel = entry.error(probe_name)
        if rel is None:
            continue
        src = None
        if scale is not None:
            src = dec.input_scale_source if fmt == dec.format else f"{dec.input_scale_source or 'plan'} (same amax)"
        nbytes = _layer_bytes(plan, lname, fmt, dec.shape, has_scale, bcode, bnumel)
        opts.append(_Option(candidate=probe_name, fmt=fmt, input_scale=scale, scale_source=src, has_scale=has_scale,
                            bytes=nbytes, wbits=8 * F.stored_weight_bytes(fmt, tuple(dec.shape)), rel=rel,
                            cost=importance * rel * rel))
    return opts


def _make_var(name: str, opts: list[_Option]) -> _Var:
    # drop dominated options (a cheaper-or-equal option with lower-or-equal error exists)
    order = sorted(range(len(opts)), key=lambda i: (opts[i].bytes, opts[i].cost))
    kept: list[int] = []
    best_cost = math.inf
    for i in order:
        if opts[i].cost < best_cost:
            kept.append(i)
            best_cost = opts[i].cost
    # lower convex hull in (bytes, cost)
    hull: list[int] = []
    for i in kept:
        while len(hull) >= 2:
            a, b, c = opts[hull[-2]], opts[hull[-1]], opts[i]
            if (b.cost - a.cost) * (c.bytes - a.bytes) >= (c.cost - a.cost) * (b.bytes - a.bytes):
                hull.pop()   # b lies on or above the segment a-c
            else:
                break
        hull.append(i)
    return _Var(name=name, options=opts, hull=hull)


def _reason(v: _Var, c: int) -> str:
    """Why option `c` was chosen, e.g. "fp8 (err 0.004, +1.2 MB) beat nvfp4 (err 0.11)"."""
    o = v.options[c]
    cheapest = v.options[v.hull[0]]
    if c == v.hull[0]:
        better = [opt for opt in v.options if opt.cost < o.cost]
        if better:
            nxt = min(better, key=lambda opt: opt.bytes)
            return (f"{o.candidate} (err {o.rel:.3g}); {nxt.candidate} (err {nxt.rel:.3g}, "
                    f"{_signed_bytes(nxt.bytes - o.bytes)}) did not fit the budget")
        return f"{o.candidate} (err {o.rel:.3g}): smallest and most accurate candidate"
    return (f"{o.candidate} (err {o.rel:.3g}, {_signed_bytes(o.bytes - cheapest.bytes)}) beat "
            f"{cheapest.candidate} (err {cheapest.rel:.3g})")


def _layer_rel(dec: Any, entry: Any) -> float | None:
    """The probe's rel_rmse for a plan decision (None when the report has no finite value for it)."""
    if entry is None:
        return None
    if dec.format == F.FP32:
        return 0.0
    if dec.format in (F.BF16, F.FP16):
        return entry.error(F.BF16)          # fp16 keep: the bf16 error is an upper bound
    if dec.format == F.NVFP4:
        cand = NVFP4_STATIC if dec.input_scale is not None and entry.error(NVFP4_STATIC) is not None else F.NVFP4
    elif dec.format == F.NVFP4_W4A16:
        cand = F.NVFP4_W4A16
    elif dec.format == F.FP8:
        cand = FP8_STATIC if dec.input_scale is not None and entry.error(FP8_STATIC) is not None else F.FP8
    else:
        return None
    return entry.error(cand)


def predicted_error(plan: Any, report: SensitivityReport, *, importance: str = "uniform",
                    layers: Any = None) -> float | None:
    """Σ importance · rel_rmse² of an arbitrary plan under the report (None if a planned layer lacks a result).

    Used to place presets and other plans on the trade-off curve (same scale as the curve's predicted_error)."""
    entries = report.by_layer()
    imp = _importance(plan, entries, importance)
    total = 0.0
    for lname, dec in plan.layers.items():
        if layers is not None and lname not in layers:
            continue
        rel = _layer_rel(dec, entries.get(lname))
        if rel is None:
            return None
        total += imp.get(lname, 1.0) * rel * rel
    return total


__all__ = ["Budget", "TradeoffCurve", "parse_budget", "plan_for_budget", "predicted_error",
           "curve_from_plan", "header_allowance", "plan_bpw", "planned_weight_bits", "human_bytes", "tradeoff_png",
           "DEFAULT_CANDIDATES", "IMPORTANCE_MODES"]
