"""Per-layer sensitivity probe: how much each candidate format perturbs each Linear's OUTPUT.

Why this exists: the original analyzers (reference/original-scripts.md §6, §9 A3-A5) measured only the error of
quantizing a layer's *input* (the weight was never quantized), fed random N(0,1) latents, and let NaN rows break the
ranking. Their numbers mostly flagged scale mismatches, not sensitive layers. This probe measures what actually
matters for a mixed-precision plan: the error of the layer output ``y = x Wᵀ`` when both the weight and the
activation are treated the way ComfyUI would treat them in each candidate format, on real input rows recorded during
calibration prompts.

Emulation per candidate (all matmuls in fp32, TF32 off, on the dequantized operands; the reference is the fp32
matmul of the unquantized source weight with the same input rows; bias is left out of both since it cancels in the
error):

==============  ================================================================================================
``nvfp4``       W4A4 with a dynamic activation scale: weight quantized with ``quant.nvfp4.quantize``; activation
                ``nvfp4.fake_quantize(x, None)`` with one amax over all probed rows (ComfyUI computes one amax per
                call; rows from several calls share one here, which is slightly pessimistic).
``nvfp4-static``  W4A4 with the static ``input_scale`` chosen from the calibration store (only when one exists).
``nvfp4-w4a16``   NVFP4 weight, activation unquantized (the W4A16 path; what CPU/Hopper/Ada always run).
``fp8``         FP8 E4M3 weight (per-tensor scale) and W8A8 activation as ComfyUI's ``TensorCoreFP8Layout`` does it:
                ``clamp(x * (1/scale), ±448) → e4m3`` with scale **1.0** (ComfyUI's default when the file has no
                FP8 ``input_scale``).
``fp8-static``  The same with the activation scale ``amax/448`` from the calibration store (what the converter writes
                as the FP8 ``input_scale`` when static scales are requested).
``bf16``        weight and activation rounded to bf16 ("keep").
==============  ================================================================================================

Metrics per format: ``rel_rmse`` = ‖ŷ−y‖/‖y‖ (Frobenius), ``snr_db`` = −20·log10(rel_rmse), ``cosine`` of the
flattened outputs, ``max_abs`` = max|ŷ−y|, ``clip_rate`` = fraction of activation elements that saturate.
Weight-only metrics: SNR of the dequantized weight per format, excess kurtosis, dynamic range (amax/median|w| and
its log2). Non-finite results never enter a ranking: a format whose output is not finite gets
``status = "non-finite output"`` and null metrics, and the layer gets the same status.

Inputs: real rows recorded during calibration (``calibration.recorder.load_input_samples``). Where no rows exist
for a layer the probe falls back to **synthetic** rows, and labels them so: Gaussian-times-Student-t values with
lognormal per-channel scales and a few dominant channels (the diffusion-transformer pattern), rescaled so their amax
equals the layer's calibrated amax when a calibration store is given. Without a store the absolute scale is
arbitrary, so the ``fp8`` (scale 1.0) result is then flagged as not representative.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..quant import formats as F
from ..quant.errors import CalibrationError, NVFP4Error

REPORT_VERSION = 1
NVFP4_STATIC = "nvfp4-static"
FP8_STATIC = "fp8-static"
#: every candidate the probe knows, in report order
ALL_CANDIDATES = (F.NVFP4, NVFP4_STATIC, F.NVFP4_W4A16, F.FP8, FP8_STATIC, F.BF16)
#: candidates that need a static input scale
STATIC_CANDIDATES = (NVFP4_STATIC, FP8_STATIC)
#: storage format each candidate becomes in a plan (static variants differ only by the plan's input_scale)
CANDIDATE_FORMAT = {F.NVFP4: F.NVFP4, NVFP4_STATIC: F.NVFP4, F.NVFP4_W4A16: F.NVFP4_W4A16, F.FP8: F.FP8,
                    FP8_STATIC: F.FP8, F.BF16: F.BF16}

STATUS_OK = "ok"
STATUS_NONFINITE_OUTPUT = "non-finite output"
STATUS_NONFINITE_WEIGHT = "non-finite weight"
STATUS_NONFINITE_INPUT = "non-finite input"
STATUS_ZERO_OUTPUT = "zero reference output"
STATUS_SKIPPED = "skipped"

DEFAULT_MAX_ROWS = 512
SYNTHETIC_ROWS = 256


# --------------------------------------------------------------------------------------------------------------
# report data
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerSensitivity:
    """One layer's probe result (see module docstring for the meaning of every field)."""

    layer: str
    params: int
    shape: list[int]
    status: str = STATUS_OK
    inputs: str = "recorded"               # "recorded" | "synthetic" | "none"
    rows: int = 0
    input_scale: float | None = None       # static NVFP4 input scale used for nvfp4-static (amax/2688)
    fp8_input_scale: float | None = None   # static FP8 activation scale used for fp8-static (amax/448)
    input_amax: float | None = None        # max |x| over the probed rows
    output_rms: float | None = None        # RMS of the reference output (for energy-weighted importance)
    weight: dict = dataclasses.field(default_factory=dict)
    input_error: dict = dataclasses.field(default_factory=dict)   # the old analyzers' input-only metric, for comparison
    formats: dict[str, dict] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def error(self, candidate: str, metric: str = "rel_rmse") -> float | None:
        """The finite metric value of `candidate`, or None when missing / not finite / failed."""
        entry = self.formats.get(candidate)
        if not entry or entry.get("status", STATUS_OK) != STATUS_OK:
            return None
        value = entry.get(metric)
        if value is None or not math.isfinite(value):
            return None
        return float(value)

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))


@dataclasses.dataclass
class SensitivityReport:
    """The probe's result for a whole model; JSON round trip with `save`/`load` (standard JSON, no NaN)."""

    inputs: str                              # "recorded" | "synthetic" | "mixed"
    source: dict
    layers: list[LayerSensitivity]
    candidates: list[str] = dataclasses.field(default_factory=lambda: list(ALL_CANDIDATES))
    options: dict = dataclasses.field(default_factory=dict)
    version: int = REPORT_VERSION

    # -- access ------------------------------------------------------------------------------------------------
    def by_layer(self) -> dict[str, LayerSensitivity]:
        return {entry.layer: entry for entry in self.layers}

    def ranking(self, candidate: str = F.NVFP4, metric: str = "rel_rmse", *, descending: bool = True
                ) -> list[tuple[str, float]]:
        """Layers ordered by `metric` of `candidate`, worst first. Layers whose value is missing or not finite are
        left out (never sorted among the finite ones: that was bug A4 of the original analyzers)."""
        rows = [(e.layer, v) for e in self.layers if (v := e.error(candidate, metric)) is not None]
        worst_high = metric not in ("snr_db", "cosine")
        rows.sort(key=lambda r: r[1], reverse=descending == worst_high)
        return rows

    def failures(self) -> list[tuple[str, str]]:
        """(layer, status) of every layer whose status is not ok."""
        return [(e.layer, e.status) for e in self.layers if e.status != STATUS_OK]

    # -- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": self.version, "inputs": self.inputs, "source": _clean(self.source),
                "candidates": list(self.candidates), "options": _clean(self.options),
                "layers": [e.to_dict() for e in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict, *, origin: str = "report") -> SensitivityReport:
        if not isinstance(data, dict) or "layers" not in data:
            raise CalibrationError(f"{origin}: not a sensitivity report (no 'layers')")
        layers_raw = data["layers"]
        if layers_raw and isinstance(layers_raw[0], dict) and "rel_rmse_mean" in layers_raw[0]:
            nan_rows = sum(1 for r in layers_raw if not _finite(r.get("rel_rmse_mean")))
            raise CalibrationError(
                f"{origin}: this is an input-precision report from the original analyzer (input-only error, random "
                f"inputs; {nan_rows} of {len(layers_raw)} rows are NaN). It cannot drive a plan; run "
                f"`nvfp4 probe` on the model instead")
        if "version" not in data or "formats" not in (layers_raw[0] if layers_raw else {"formats": 1}):
            raise CalibrationError(f"{origin}: not an NVFP4 Lab sensitivity report (missing 'version'/'formats')")
        if int(data["version"]) > REPORT_VERSION:
            raise CalibrationError(f"{origin}: report version {data['version']} is newer than this tool "
                                   f"({REPORT_VERSION}); update NVFP4 Lab")
        fields = {f.name for f in dataclasses.fields(LayerSensitivity)}
        layers = [LayerSensitivity(**{k: v for k, v in row.items() if k in fields}) for row in layers_raw]
        return cls(inputs=data.get("inputs", "recorded"), source=data.get("source", {}), layers=layers,
                   candidates=list(data.get("candidates", ALL_CANDIDATES)), options=data.get("options", {}),
                   version=int(data["version"]))

    @classmethod
    def from_json(cls, text: str, *, origin: str = "report") -> SensitivityReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{origin}: not valid JSON ({exc})") from None
        return cls.from_dict(data, origin=origin)

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the report atomically (standard JSON; non-finite numbers are null); an existing file is replaced
        only with force=True (project convention)."""
        from ..quant.atomic import atomic_output

        text = self.to_json()
        with atomic_output(path, force=force) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> SensitivityReport:
        p = Path(path)
        if not p.is_file():
            raise CalibrationError(f"{p}: sensitivity report not found; create one with `nvfp4 probe`")
        return cls.from_json(p.read_text(encoding="utf-8"), origin=str(p))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _clean(obj: Any) -> Any:
    """Recursively replace non-finite floats by None so `json.dumps(allow_nan=False)` never fails."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return obj


# --------------------------------------------------------------------------------------------------------------
# numerics
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _exact_fp32():
    """Disable TF32 so fp32 matmuls on Ampere+ GPUs are real fp32 (the probe compares ~1e-3 effects)."""
    old_mm = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm
        torch.backends.cudnn.allow_tf32 = old_cudnn


def error_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """rel_rmse / snr_db / cosine / max_abs of `out` against `ref` (fp64 reductions). Non-finite `out` gives
    ``{"status": "non-finite output"}`` with null metrics; an exact match gives snr_db None with ``exact: True``."""
    if not bool(torch.isfinite(out).all()):
        return {"status": STATUS_NONFINITE_OUTPUT, "rel_rmse": None, "snr_db": None, "cosine": None,
                "max_abs": None}
    r = ref.double().flatten()
    o = out.double().flatten()
    diff = o - r
    err = float(torch.linalg.vector_norm(diff))
    sig = float(torch.linalg.vector_norm(r))
    onorm = float(torch.linalg.vector_norm(o))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    if sig == 0.0:
        if err == 0.0:
            return {"status": STATUS_OK, "rel_rmse": 0.0, "snr_db": None, "exact": True, "cosine": 1.0,
                    "max_abs": 0.0}
        return {"status": STATUS_ZERO_OUTPUT, "rel_rmse": None, "snr_db": None, "cosine": None, "max_abs": max_abs}
    rel = err / sig
    cos = float(torch.dot(r, o)) / (sig * onorm) if onorm > 0 else 0.0
    entry = {"status": STATUS_OK, "rel_rmse": rel, "snr_db": (-20.0 * math.log10(rel)) if rel > 0 else None,
             "cosine": cos, "max_abs": max_abs}
    if rel == 0.0:
        entry["exact"] = True
    return entry


def fp8_activation_qdq(x: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize an activation exactly as ComfyUI's FP8 W8A8 path does (comfy-kitchen eager
    ``quantize_per_tensor_fp8``): ``clamp(x * (1/scale).to(x.dtype), ±448).to(e4m3)``; scale None means 1.0
    (ComfyUI's default for a float8 layer without ``input_scale``). Returns fp32."""
    s = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32, device=x.device)
    t = x * (1.0 / s).to(x.dtype)
    t = torch.clamp(t, -F.F8_E4M3_MAX, F.F8_E4M3_MAX)
    return t.to(torch.float8_e4m3fn).float() * s


def fp8_activation_clip_rate(x: torch.Tensor, scale: float | None) -> float:
    """Fraction of activation elements that saturate at ±448 under the FP8 activation scale."""
    s = 1.0 if scale is None else float(scale)
    return float((x.float().abs() > F.F8_E4M3_MAX * s).double().mean()) if x.numel() else 0.0


def weight_for_quantization(w: torch.Tensor) -> torch.Tensor:
    """The tensor the converter quantizes: bf16/fp32 as stored, anything else (fp16, already quantized) as fp32."""
    return w if w.dtype in (torch.bfloat16, torch.float32) else w.float()


class _WeightVariants:
    """The dequantized (fp32) weight of every format, computed once per layer and reused across metrics."""

    def __init__(self, w: torch.Tensor, name: str):
        self.w = w
        self.name = name
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, fmt: str) -> torch.Tensor:
        if fmt not in self._cache:
            self._cache[fmt] = self._make(fmt)
        return self._cache[fmt]

    def _make(self, fmt: str) -> torch.Tensor:
        if fmt == "ref":
            return self.w.float()
        if F.is_nvfp4(fmt):
            from ..quant import nvfp4
            return nvfp4.dequantize(nvfp4.quantize(weight_for_quantization(self.w), name=self.name), torch.float32)
        if fmt in F.FP8_DTYPES:
            from ..quant import fp8
            w8, sc = fp8.quantize_fp8(weight_for_quantization(self.w), F.FP8_DTYPES[fmt], name=self.name)
            return fp8.dequantize_fp8(w8, sc, torch.float32)
        if fmt in F.PLAIN_DTYPES:
            return self.w.to(F.PLAIN_DTYPES[fmt]).float()
        raise ValueError(f"no weight variant for {fmt!r}")


def candidate_output(candidate: str, x: torch.Tensor, wv: _WeightVariants, *, input_scale: float | None = None,
                     fp8_input_scale: float | None = None) -> tuple[torch.Tensor, float]:
    """(emulated output ``x̂ Ŵᵀ`` in fp32, activation clip rate) of one candidate. This is the definition the probe
    reports; see the module docstring for each candidate's emulation."""
    from ..quant import nvfp4

    if candidate in (F.NVFP4, NVFP4_STATIC):
        scale = None if candidate == F.NVFP4 else input_scale
        if candidate == NVFP4_STATIC and scale is None:
            raise ValueError("nvfp4-static needs an input scale")
        xq = nvfp4.fake_quantize(x, scale).float()
        s_clip = float(nvfp4.per_tensor_scale(x)) if scale is None else float(scale)
        clip = float(nvfp4.clip_fraction(x, s_clip))
        return xq @ wv.get(F.NVFP4).T, clip
    if candidate == F.NVFP4_W4A16:
        return x.float() @ wv.get(F.NVFP4).T, 0.0
    if candidate in (F.FP8, FP8_STATIC):
        scale = None if candidate == F.FP8 else fp8_input_scale
        if candidate == FP8_STATIC and scale is None:
            raise ValueError("fp8-static needs an input scale")
        xq = fp8_activation_qdq(x, scale)
        return xq @ wv.get(F.FP8).T, fp8_activation_clip_rate(x, scale)
    if candidate == F.BF16:
        return x.to(torch.bfloat16).float() @ wv.get(F.BF16).T, 0.0
    raise ValueError(f"unknown probe candidate {candidate!r}; expected one of {', '.join(ALL_CANDIDATES)}")


def weight_metrics(w: torch.Tensor, wv: _WeightVariants | None = None,
                   snr_formats: Sequence[str] = (F.NVFP4, F.FP8, F.BF16)) -> dict:
    """Weight-only statistics: amax, rms, excess kurtosis, dynamic range (amax/median|w|, log2), SNR per format."""
    wf = w.double().flatten()
    if wf.numel() == 0:
        return {"amax": 0.0}
    finite = bool(torch.isfinite(wf).all())
    if not finite:
        n_bad = int((~torch.isfinite(wf)).sum())
        return {"finite": False, "non_finite_count": n_bad}
    absw = wf.abs()
    amax = float(absw.max())
    mean = float(wf.mean())
    centered = wf - mean
    var = float((centered ** 2).mean())
    kurt = float((centered ** 4).mean()) / (var * var) - 3.0 if var > 0 else None
    # median of |w|: kthvalue on a bounded subsample keeps this cheap on 70M-element weights
    sample = absw if absw.numel() <= 4_000_000 else absw[torch.randperm(absw.numel(), generator=torch.Generator()
                                                                        .manual_seed(0))[:4_000_000].to(absw.device)]
    median = float(sample.float().median())
    dyn = amax / median if median > 0 else None
    out = {"finite": True, "amax": amax, "rms": math.sqrt(float((wf ** 2).mean())), "excess_kurtosis": kurt,
           "dynamic_range": dyn, "dynamic_range_log2": math.log2(dyn) if dyn and dyn > 0 else None,
           "zero": amax == 0.0}
    del wf, absw, centered, sample   # fp64 copies of the weight: free them before the SNR pass needs its own
    if wv is not None:
        snr = {}
        ref = wv.get("ref")
        for fmt in snr_formats:
            m = error_metrics(ref, wv.get(fmt))
            snr[fmt] = m.get("snr_db")
            if m.get("exact"):
                snr[fmt + "_exact"] = True
            if m.get("status") != STATUS_OK:
                snr[fmt + "_status"] = m.get("status")
        out["snr_db"] = snr
    return out


def input_error_metrics(x: torch.Tensor, input_scale: float | None) -> dict:
    """The original analyzers' input-only metric (quantize-dequantize the activation alone): kept for comparison;
    it is *not* what the planner ranks by."""
    from ..quant import nvfp4

    xq = nvfp4.fake_quantize(x, input_scale).float()
    m = error_metrics(x.float(), xq)
    s = float(nvfp4.per_tensor_scale(x)) if input_scale is None else float(input_scale)
    return {"rel_rmse": m.get("rel_rmse"), "clip_rate": float(nvfp4.clip_fraction(x, s)),
            "scale": "static" if input_scale is not None else "dynamic"}


def probe_layer(name: str, w: torch.Tensor, x: torch.Tensor, *, candidates: Sequence[str] = ALL_CANDIDATES,
                input_scale: float | None = None, fp8_input_scale: float | None = None, device: str = "cpu",
                params: int | None = None) -> LayerSensitivity:
    """Probe one Linear: `w` [out, in] in its stored dtype, `x` [rows, in] input rows. Returns the layer entry.

    Candidates needing a static scale are skipped when none is given. Any non-finite weight, input or output is
    reported as a status, never as a number."""
    dev = torch.device(device)
    shape = [int(s) for s in w.shape]
    entry = LayerSensitivity(layer=name, params=int(params if params is not None else w.numel()), shape=shape,
                             rows=int(x.shape[0]), input_scale=input_scale, fp8_input_scale=fp8_input_scale)
    w = w.to(dev)
    x = x.to(dev)
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise CalibrationError(f"{name}: input rows have shape {list(x.shape)} but the weight expects "
                               f"{w.shape[1]} input features; are the samples from another model?")
    if not bool(torch.isfinite(w).all()):
        entry.status = STATUS_NONFINITE_WEIGHT
        entry.weight = weight_metrics(w)
        entry.formats = {c: _failed(STATUS_NONFINITE_WEIGHT) for c in candidates
                         if c not in STATIC_CANDIDATES or _has_scale(c, input_scale, fp8_input_scale)}
        return entry
    if not bool(torch.isfinite(x).all()):
        entry.status = STATUS_NONFINITE_INPUT
        entry.notes.append("input rows contain NaN/Inf; re-record calibration")
        entry.weight = weight_metrics(w)
        return entry
    entry.input_amax = float(x.float().abs().max()) if x.numel() else 0.0
    wv = _WeightVariants(w, name)
    with _exact_fp32():
        ref = x.float() @ wv.get("ref").T
        if not bool(torch.isfinite(ref).all()):
            entry.status = STATUS_NONFINITE_OUTPUT
            entry.notes.append("the unquantized reference output overflows (non-finite); weights or inputs too large")
            entry.weight = weight_metrics(w)
            entry.formats = {c: _failed(STATUS_NONFINITE_OUTPUT) for c in candidates
                             if c not in STATIC_CANDIDATES or _has_scale(c, input_scale, fp8_input_scale)}
            return entry
        entry.output_rms = float(ref.double().pow(2).mean().sqrt()) if ref.numel() else 0.0
        entry.weight = weight_metrics(w, wv, sorted({CANDIDATE_FORMAT[c] if c != F.NVFP4_W4A16 else F.NVFP4
                                                     for c in candidates}, key=list(F.ALL_FORMATS).index))
        entry.input_error = {"nvfp4": input_error_metrics(x, None)}
        if input_scale is not None:
            entry.input_error[NVFP4_STATIC] = input_error_metrics(x, input_scale)
        for cand in candidates:
            if cand in STATIC_CANDIDATES and not _has_scale(cand, input_scale, fp8_input_scale):
                continue
            out, clip = candidate_output(cand, x, wv, input_scale=input_scale, fp8_input_scale=fp8_input_scale)
            m = error_metrics(ref, out)
            m["clip_rate"] = clip
            entry.formats[cand] = m
            del out
    bad = [c for c, m in entry.formats.items() if m.get("status") != STATUS_OK]
    if bad:
        statuses = {entry.formats[c]["status"] for c in bad}
        entry.status = STATUS_NONFINITE_OUTPUT if STATUS_NONFINITE_OUTPUT in statuses else sorted(statuses)[0]
        entry.notes.append(f"{', '.join(bad)}: {', '.join(sorted(statuses))}")
    return entry


def _failed(status: str) -> dict:
    return {"status": status, "rel_rmse": None, "snr_db": None, "cosine": None, "max_abs": None, "clip_rate": None}


def _has_scale(cand: str, input_scale: float | None, fp8_input_scale: float | None) -> bool:
    return (cand == NVFP4_STATIC and input_scale is not None) or (cand == FP8_STATIC and fp8_input_scale is not None)


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------

def synthetic_inputs(name: str, in_features: int, *, rows: int = SYNTHETIC_ROWS, amax: float | None = None,
                     seed: int = 0) -> torch.Tensor:
    """Deterministic diffusion-like activation rows for `name` (fallback only; the report labels them "synthetic").

    Per-channel scales are lognormal(0, 0.75); max(1, in/64) channels are dominant (×20), the way DiT residual
    streams carry a few massive channels; values are Student-t(4) (heavy tails). If `amax` (the calibrated max |x|)
    is given the rows are rescaled to that amax, else to unit RMS."""
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed * 7919) & 0x7FFFFFFF)
    ch = torch.exp(torch.randn(in_features, generator=g) * 0.75)
    n_dom = max(1, in_features // 64)
    dom = torch.randperm(in_features, generator=g)[:n_dom]
    ch[dom] *= 20.0
    # Student-t(4) = N(0,1) / sqrt(chi²(4)/4), drawn with our own generator for determinism
    z = torch.randn(rows, in_features, generator=g)
    chi = torch.zeros(rows, in_features)
    for _ in range(4):
        chi += torch.randn(rows, in_features, generator=g) ** 2
    x = z / torch.sqrt(chi / 4.0) * ch
    if amax is not None and amax > 0:
        x = x * (amax / float(x.abs().max()))
    else:
        x = x / float(x.pow(2).mean().sqrt())
    return x


def _subsample_rows(x: torch.Tensor, max_rows: int | None) -> torch.Tensor:
    if max_rows is None or x.shape[0] <= max_rows:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_rows).round().long()
    return x[idx]


def _load_samples(samples: str | Path | Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor], str | None]:
    if samples is None:
        return {}, None
    if isinstance(samples, Mapping):
        return dict(samples), None
    from .recorder import load_input_samples
    p = Path(samples)
    return dict(load_input_samples(p)), p.name


def _load_scales(store: Any, *, method: str, percentile: float, margin: float
                 ) -> tuple[dict[str, float], dict[str, float], str | None]:
    """(nvfp4 input_scale per layer, amax per layer, store file name) from a calibration store (path or object)."""
    if store is None:
        return {}, {}, None
    from .scale_selection import select_input_scales
    name = None
    if isinstance(store, (str, Path)):
        from ..quant.input_scales import load_calibration   # a CalibrationStore or an original scales_summary
        name = Path(store).name
        store = load_calibration(store)
    choices = select_input_scales(store, method=method, percentile=percentile, margin=margin)
    scales: dict[str, float] = {}
    amaxes: dict[str, float] = {}
    for layer, ch in choices.items():
        if ch.input_scale is not None and _finite(float(ch.input_scale)) and float(ch.input_scale) > 0:
            scales[layer] = float(ch.input_scale)
        if getattr(ch, "amax", None) is not None and _finite(float(ch.amax)):
            amaxes[layer] = float(ch.amax)
    return scales, amaxes, name


# --------------------------------------------------------------------------------------------------------------
# the probe
# --------------------------------------------------------------------------------------------------------------

def probe(ckpt_path: str | Path, samples: str | Path | Mapping[str, torch.Tensor] | None = None,
          store: Any = None, device: str = "cpu", layers: str | Sequence[str] | None = None,
          progress: bool = True, *, candidates: Sequence[str] = ALL_CANDIDATES,
          input_scales: Mapping[str, float] | None = None, scale_method: str = "percentile",
          percentile: float = 99.9, margin: float = 1.0, max_rows: int | None = DEFAULT_MAX_ROWS,
          synthetic_rows: int = SYNTHETIC_ROWS, seed: int = 0) -> SensitivityReport:
    """Probe every Linear of a checkpoint (streamed one layer at a time) and return a `SensitivityReport`.

    - `samples`: recorded input rows (`<session>.samples.safetensors` path, or a dict layer → [rows, in]).
    - `store`: calibration store (path or `CalibrationStore`): static input scales (nvfp4-static, fp8-static) and
      the amax used to scale synthetic rows. `input_scales` (layer → amax/2688) overrides the store's choice.
    - `layers`: a regex (search) or a list of exact layer names.
    - `device`: "cpu", "cuda[:N]" or "auto" (CUDA when present). Results agree across devices to float rounding.
    - Layers without recorded rows get synthetic rows (labelled per layer and in `report.inputs`).
    Memory: one layer's weight, its dequantized variants and at most `max_rows` input rows at a time."""
    from ..quant.checkpoint import open_checkpoint

    for c in candidates:
        if c not in ALL_CANDIDATES:
            raise NVFP4Error(f"unknown probe candidate {c!r}; expected one of {', '.join(ALL_CANDIDATES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise NVFP4Error("--device cuda was asked but no CUDA device is available; use --device cpu")
    rows_by_layer, samples_name = _load_samples(samples)
    scales, amaxes, store_name = _load_scales(store, method=scale_method, percentile=percentile, margin=margin)
    if input_scales:
        scales.update({k: float(v) for k, v in input_scales.items()})

    with open_checkpoint(ckpt_path) as ckpt:
        all_layers = {n: l for n, l in ckpt.layers().items() if l.linear}
        selected = _select_layers(all_layers, layers)
        unknown = sorted(set(rows_by_layer) - set(all_layers))
        entries: list[LayerSensitivity] = []
        kinds: set[str] = set()
        iterator: Iterable[str] = selected
        if progress:
            try:
                from tqdm import tqdm
                iterator = tqdm(selected, desc="probe", unit="layer")
            except ImportError:  # pragma: no cover
                pass
        for name in iterator:
            layer = all_layers[name]
            w = _load_weight(ckpt, layer)
            static = scales.get(name)
            if static is None and layer.input_scale is not None and F.is_nvfp4(layer.format):
                static = float(layer.input_scale)
            amax = amaxes.get(name, static * F.NVFP4_SCALE_DENOM if static is not None else None)
            # FP8 static scale as quant.input_scales writes it: amax·margin/448 = 6 × the NVFP4 scale
            fp8_scale = static * F.F4_E2M1_MAX if static is not None else None
            x = rows_by_layer.get(name)
            if x is not None and x.shape[0] > 0:
                kind = "recorded"
                x = _subsample_rows(x, max_rows)
            else:
                kind = "synthetic"
                x = synthetic_inputs(name, int(w.shape[1]), rows=synthetic_rows, amax=amax, seed=seed)
            entry = probe_layer(name, w, x, candidates=candidates, input_scale=static, fp8_input_scale=fp8_scale,
                                device=device, params=layer.params)
            entry.inputs = kind
            if kind == "synthetic":
                if amax is None:
                    entry.notes.append("synthetic inputs with arbitrary absolute scale: the fp8 (activation scale "
                                       "1.0) result is not representative")
                else:
                    entry.notes.append("synthetic inputs scaled to the calibrated amax")
            kinds.add(kind)
            entries.append(entry)
            del w, x
        source = {"file": Path(ckpt_path).name, "header_sha256": _safe_header_hash(ckpt),
                  "samples": samples_name, "calibration": store_name,
                  "layers_total": len(all_layers), "layers_probed": len(entries)}
        if unknown:
            source["samples_unknown_layers"] = unknown[:20]
    inputs = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "recorded")
    options = {"device": str(device), "max_rows": max_rows, "synthetic_rows": synthetic_rows, "seed": seed,
               "scale_method": scale_method if store is not None else None,
               "percentile": percentile if store is not None else None, "margin": margin if store is not None else None,
               "layers": layers if isinstance(layers, str) or layers is None else list(layers)}
    return SensitivityReport(inputs=inputs, source=source, layers=entries, candidates=list(candidates),
                             options=options)


def _select_layers(all_layers: Mapping[str, Any], layers: str | Sequence[str] | None) -> list[str]:
    names = list(all_layers)
    if layers is None:
        return names
    if isinstance(layers, str):
        try:
            rx = re.compile(layers)
        except re.error as exc:
            raise NVFP4Error(f"--layers {layers!r} is not a valid regular expression: {exc}") from None
        chosen = [n for n in names if rx.search(n)]
        if not chosen:
            raise NVFP4Error(f"--layers {layers!r} matches no Linear layer of the model (e.g. {names[:3]})")
        return chosen
    missing = [n for n in layers if n not in all_layers]
    if missing:
        raise NVFP4Error(f"layers not in the model (or not Linear): {', '.join(missing[:5])}")
    return list(layers)


def _load_weight(ckpt: Any, layer: Any) -> torch.Tensor:
    """The layer's weight as the converter would see it: the stored tensor for plain bf16/fp16/fp32 layers, the
    dequantized fp32 weight for already-quantized ones."""
    if layer.format in F.PLAIN_FORMATS:
        return ckpt.tensor(layer.name + ".weight")
    return ckpt.dequantized_weight(layer.name, torch.float32)


def _safe_header_hash(ckpt: Any) -> str | None:
    try:
        return ckpt.header_hash()
    except Exception:  # pragma: no cover - provenance only
        return None


# --------------------------------------------------------------------------------------------------------------
# figures (matplotlib, Agg; PNG bytes)
# --------------------------------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=110)


def _png(fig) -> bytes:
    import io
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def ranking_png(report: SensitivityReport, candidate: str = F.NVFP4, *, top: int = 20,
                metric: str = "rel_rmse") -> bytes:
    """Horizontal bar chart of the `top` worst layers for `candidate` (finite values only; failures listed in the
    title count)."""
    rows = report.ranking(candidate, metric)[:top]
    fig = _figure(8, max(2.5, 0.28 * len(rows) + 1.2))
    ax = fig.add_subplot(111)
    if rows:
        names = [r[0] for r in rows][::-1]
        vals = [r[1] for r in rows][::-1]
        ax.barh(range(len(rows)), vals, color="#3465a4")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel(f"{metric} of the layer output ({candidate})")
    n_fail = sum(1 for e in report.layers if e.formats.get(candidate, {}).get("status", STATUS_OK) != STATUS_OK)
    ax.set_title(f"worst {len(rows)} layers, {candidate}, {report.inputs} inputs"
                 + (f" ({n_fail} non-finite, not ranked)" if n_fail else ""), fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def snr_histogram_png(report: SensitivityReport, candidates: Sequence[str] | None = None) -> bytes:
    """Histogram of the per-layer output SNR (dB) for each candidate present in the report."""
    cands = [c for c in (candidates or report.candidates)
             if any(e.error(c, "snr_db") is not None for e in report.layers)]
    fig = _figure(7, 4)
    ax = fig.add_subplot(111)
    for c in cands:
        vals = [v for e in report.layers if (v := e.error(c, "snr_db")) is not None]
        if vals:
            ax.hist(vals, bins=min(40, max(5, len(vals) // 2)), alpha=0.55, label=f"{c} ({len(vals)})")
    ax.set_xlabel("layer output SNR (dB)")
    ax.set_ylabel("layers")
    ax.set_title(f"per-layer output SNR, {report.inputs} inputs", fontsize=9)
    if cands:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _png(fig)


def write_plots(report: SensitivityReport, folder: str | Path, *, top: int = 20, force: bool = False) -> list[Path]:
    """Write `ranking_<candidate>.png` for every candidate present and `snr_histogram.png` into `folder`."""
    from ..quant.atomic import atomic_output

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figures: list[tuple[str, bytes]] = []
    for c in report.candidates:
        if any(e.error(c) is not None for e in report.layers):
            figures.append((f"ranking_{c}.png", ranking_png(report, c, top=top)))
    figures.append(("snr_histogram.png", snr_histogram_png(report)))
    for fname, data in figures:
        with atomic_output(out / fname, force=force) as tmp:
            Path(tmp).write_bytes(data)
        written.append(out / fname)
    return written
