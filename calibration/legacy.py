"""Compatibility with the original jorismak/convert_nvfp4 tooling: its ComfyUI log and its scales summary.

Why: existing calibration runs exist only as these files. We import

* the TSV log written by the original ``comfy/ops.py`` patch (plain, ``.gz``, ``.xz``, ``.bz2``):
  ``fmt⇥dynamic⇥layer⇥amax/2688⇥amax⇥(rows, cols)``, ``fmt⇥provided⇥layer⇥scale⇥-⇥(rows, cols)`` and legacy 5-field
  lines ``mode⇥layer⇥scale⇥amax⇥shape``. Unlike the original analyzer, 'provided' lines (layers that already ran with
  a static input_scale, amax not logged) are kept as provided-scale counts instead of being dropped, and an amax
  field that cannot be parsed falls back to scale × 2688;
* ``scales_summary_*.json`` (``{"format","mode","percentiles","layers":[24-key rows]}``, possibly with bare NaN);

and export that summary schema from a store: the same 24 field names for the default percentiles, standard JSON
(undefined statistics are ``null`` and the document carries ``"nan_as_null": true``), rows sorted by layer name,
``scale_* = amax_* / 2688`` at full precision (the original wrote 6-decimal scales: 0.25 % steps at 4e-4).

A summary holds only a few percentiles, so :func:`summary_to_store` reconstructs an *approximate* distribution: the
count is kept, the sorted sample is rebuilt by interpolating the quantile function log-linearly through
(0, min), (p/100, amax_p…), (1, max), and the exact mean, std and kurtosis of the summary replace the moments of the
rebuilt sample. Such layers are flagged ``approximate``.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..quant.atomic import atomic_output
from ..quant.errors import CalibrationError
from .stats import LayerStats, Moments
from .store import STORE_FORMAT, CalibrationStore

# = quant.formats.NVFP4_SCALE_DENOM (448 · 6), repeated so that calibration code never imports torch (checked by a test)
NVFP4_SCALE_DENOM = 2688.0
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)
STAT_FIELDS = ("min", "max", "mean", "std", "kurtosis", "outlier_frac_3std")
MODES = ("dynamic", "provided", "all")


def pct_key(p: float) -> str:
    """The original's percentile key: 99.9 -> 'p99_9', 50 -> 'p50'."""
    return "p" + str(float(p)).rstrip("0").rstrip(".").replace(".", "_")


def parse_percentiles(text: str | Iterable[float]) -> list[float]:
    """'50,90,99.9' or numbers -> sorted unique floats in [0, 100] (ValueError otherwise)."""
    items = [t for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    out = set()
    for t in items:
        try:
            p = float(t)
        except (TypeError, ValueError):
            raise ValueError(f"percentile {t!r} is not a number") from None
        if not (0.0 <= p <= 100.0) or math.isnan(p):
            raise ValueError(f"percentile {p} is outside [0, 100]")
        out.add(p)
    if not out:
        raise ValueError("no percentiles given")
    return sorted(out)


def summary_fields(percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[str]:
    """Row keys in the original order: layer, count, scale_* (6 stats + percentiles), amax_* (same)."""
    keys = ["layer", "count"]
    for prefix in ("scale", "amax"):
        keys += [f"{prefix}_{f}" for f in STAT_FIELDS] + [f"{prefix}_{pct_key(p)}" for p in percentiles]
    return keys


# ---------------------------------------------------------------------------------------------------- the log
@dataclass(frozen=True)
class LogRecord:
    """One parsed log line. amax is None for 'provided' lines (not logged)."""

    fmt: str | None
    mode: str
    layer: str
    scale: float | None
    amax: float | None
    shape: tuple[int, ...] | None
    legacy: bool = False


def _float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _shape(text: str) -> tuple[int, ...] | None:
    t = text.strip().strip("()[] ")
    if not t:
        return None
    try:
        return tuple(int(x) for x in t.replace(" ", "").split(",") if x)
    except ValueError:
        return None


def parse_log_line(line: str) -> LogRecord | None:
    """Parse one TSV line of the original ops.py patch; None for blank, comment or unparseable lines."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) < 5:
        return None
    if len(parts) == 5:
        mode, layer, scale_s, amax_s, shape_s = parts
        fmt, legacy = None, True
    else:
        fmt, mode, layer, scale_s, amax_s, shape_s = parts[:6]
        fmt, legacy = fmt.strip(), False
    mode, layer = mode.strip(), layer.strip()
    if not layer or not mode:
        return None
    scale, amax = _float(scale_s.strip()), _float(amax_s.strip())
    if mode == "provided":
        if scale is None:
            return None
        return LogRecord(fmt, mode, layer, scale, None, _shape(shape_s), legacy)
    if amax is None and scale is None:
        return None
    return LogRecord(fmt, mode, layer, scale, amax, _shape(shape_s), legacy)


def _is_compressed(path: Path, head: bytes) -> str | None:
    if head[:2] == b"\x1f\x8b":
        return "gz"
    if head[:3] == b"BZh":
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    suffixes = {s.lower() for s in path.suffixes}
    for kind in ("gz", "xz", "bz2"):
        if f".{kind}" in suffixes:
            return kind
    return None


def _head(p: Path, nbytes: int, expected: str) -> bytes:
    """The first bytes of an input file; CalibrationError naming it when it is missing or a folder."""
    try:
        with open(p, "rb") as fh:
            return fh.read(nbytes)
    except FileNotFoundError:
        raise CalibrationError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise CalibrationError(f"{p}: is a directory; give {expected}") from None


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a log as UTF-8 text (errors replaced), decompressing gzip / xz / bzip2 by magic bytes or suffix."""
    p = Path(path)
    kind = _is_compressed(p, _head(p, 8, "a log file"))
    opener = {"gz": gzip.open, "xz": lzma.open, "bz2": bz2.open, None: open}[kind]
    return opener(p, "rt", encoding="utf-8", errors="replace")  # type: ignore[operator]


def iter_log(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a possibly compressed log; decompression errors become CalibrationError."""
    try:
        with open_text(path) as fh:
            yield from enumerate(fh, 1)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise CalibrationError(f"{path}: cannot decompress / read the log ({exc})") from None


@dataclass
class LogImportReport:
    """What an import did: counts of lines by kind, and what was skipped (so nothing is silently dropped)."""

    path: str
    lines: int = 0
    dynamic: int = 0
    provided: int = 0
    legacy: int = 0
    skipped: int = 0
    filtered: int = 0
    amax_from_scale: int = 0
    layers: int = 0
    provided_layers: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    first_skipped: list[tuple[int, str]] = field(default_factory=list)

    def text(self) -> str:
        parts = [f"{self.path}: {self.lines} lines, {self.dynamic} dynamic calls for {self.layers} layers"]
        if self.provided:
            parts.append(f"{self.provided} 'provided' calls for {self.provided_layers} layers (static input_scale "
                         "already set: amax not logged, kept as provided-scale counts)")
        if self.legacy:
            parts.append(f"{self.legacy} legacy 5-field lines")
        if self.amax_from_scale:
            parts.append(f"{self.amax_from_scale} amax taken as scale×2688 (amax field unreadable)")
        if self.filtered:
            parts.append(f"{self.filtered} lines filtered out by --format/--mode")
        if self.skipped:
            shown = "; ".join(f"line {n}: {t[:60]!r}" for n, t in self.first_skipped)
            parts.append(f"{self.skipped} unparseable lines skipped (first: {shown})")
        return ", ".join(parts)


def import_log(path: str | Path, *, fmt: str = "all", mode: str = "all", steps: int | None = None,
               cfg_passes: int = 1, store: CalibrationStore | None = None) -> tuple[CalibrationStore, LogImportReport]:
    """Import an original ComfyUI input-scale log into a (new or given) store.

    fmt: 'all' or a logged format name ('nvfp4', 'float8_e4m3fn', ...); legacy lines have no format and pass only
    'all' and 'nvfp4' (as in the original). mode: 'dynamic', 'provided' or 'all'.
    steps / cfg_passes: the log has no step column; when given, the i-th logged call of a layer is assigned
    step (i // cfg_passes) % steps and cond label 'pass<i % cfg_passes>' (only valid with unlimited logging, i.e.
    COMFY_NFP4_LOG_INPUT_SCALE_MAX=-1, and the same step count for every prompt).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if steps is not None and steps <= 0:
        raise ValueError("steps must be > 0")
    if cfg_passes <= 0:
        raise ValueError("cfg_passes must be > 0")
    report = LogImportReport(path=str(path))
    dyn: dict[tuple[str, str | None, int | None, str | None], list[float]] = defaultdict(list)
    prov: dict[tuple[str, str | None, float], int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    for lineno, line in iter_log(path):
        report.lines += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rec = parse_log_line(line)
        if rec is None:
            report.skipped += 1
            if len(report.first_skipped) < 3:
                report.first_skipped.append((lineno, line.strip()))
            continue
        if fmt != "all" and not (rec.fmt == fmt or (rec.fmt is None and fmt == "nvfp4")):
            report.filtered += 1
            continue
        if mode != "all" and rec.mode != mode:
            report.filtered += 1
            continue
        i = calls[rec.layer]
        calls[rec.layer] += 1
        step = cond = None
        if steps is not None:
            step = (i // cfg_passes) % steps
            cond = f"pass{i % cfg_passes}" if cfg_passes > 1 else None
        report.legacy += rec.legacy
        if rec.fmt:
            report.formats[rec.fmt] = report.formats.get(rec.fmt, 0) + 1
        if rec.mode == "provided":
            report.provided += 1
            prov[(rec.layer, rec.fmt, rec.scale)] += 1
            continue
        amax = rec.amax
        if amax is None:
            amax = rec.scale * NVFP4_SCALE_DENOM
            report.amax_from_scale += 1
        if amax < 0:
            report.skipped += 1
            continue
        report.dynamic += 1
        dyn[(rec.layer, rec.fmt, step, cond)].append(amax)
    if report.lines == 0:
        raise CalibrationError(f"{path}: the log is empty")
    if report.dynamic == 0 and report.provided == 0:
        raise CalibrationError(f"{path}: no input-scale log lines found ({report.skipped} unparseable, "
                               f"{report.filtered} filtered); is this a ComfyUI log written with "
                               "COMFY_NFP4_LOG_INPUT_SCALE_PATH?")
    store = store if store is not None else CalibrationStore()
    for (layer, f, step, cond), values in dyn.items():
        store.record(layer, np.asarray(values), step=step, cond=cond, fmt=f)
    for (layer, f, scale), n in prov.items():
        store.record_provided(layer, scale, n, fmt=f)
    report.layers = len({k[0] for k in dyn})
    report.provided_layers = len({k[0] for k in prov})
    info = {"lines": report.lines, "dynamic": report.dynamic, "provided": report.provided}
    if steps is not None:
        info.update(steps=steps, cfg_passes=cfg_passes)
        per = steps * cfg_passes
        store.count_prompt(max(math.ceil(max(calls.values()) / per), 0) if calls else 0)
    store.add_source("log", str(path), **info)
    return store, report


# ---------------------------------------------------------------------------------------------------- summaries
@dataclass
class LegacySummary:
    """A scales_summary JSON (the original analyzer's output or ours). rows keep the file's values; NaN -> None."""

    path: str
    format: str
    mode: str
    percentiles: list[float]
    rows: list[dict]

    @property
    def layers(self) -> dict[str, dict]:
        return {r["layer"]: r for r in self.rows}

    def amax_percentile(self, row: dict, p: float) -> float | None:
        """amax at percentile p if the summary lists it (None otherwise)."""
        key = f"amax_{pct_key(p)}"
        if key in row and row[key] is not None:
            return float(row[key])
        skey = f"scale_{pct_key(p)}"
        if skey in row and row[skey] is not None:
            return float(row[skey]) * NVFP4_SCALE_DENOM
        return None

    def points(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        """Known (quantile in [0,1], amax) points of a row, sorted, including min (0) and max (1)."""
        qs, vs = [0.0], [float(row["amax_min"])]
        for p in self.percentiles:
            v = self.amax_percentile(row, p)
            if v is not None and 0.0 < p < 100.0:
                qs.append(p / 100.0)
                vs.append(v)
        qs.append(1.0)
        vs.append(float(row["amax_max"]))
        q, v = np.asarray(qs), np.maximum.accumulate(np.asarray(vs))  # enforce monotonicity
        return q, v


def is_summary_dict(data: object) -> bool:
    return isinstance(data, dict) and isinstance(data.get("layers"), list) and "percentiles" in data


def _nan_to_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summary_from_dict(data: object, source: str | Path = "<memory>") -> LegacySummary:
    """Validate a summary document (our export or the original's)."""
    where = str(source)
    if isinstance(data, dict) and data.get("format") == STORE_FORMAT:
        raise CalibrationError(f"{where}: this is a calibration store, not a scales_summary; use it directly or "
                               "run `nvfp4 calib summarize` on it")
    if not is_summary_dict(data):
        raise CalibrationError(f"{where}: not a scales_summary (expected an object with 'percentiles' and a "
                               "'layers' list)")
    try:
        percentiles = [float(p) for p in data["percentiles"]]
    except (TypeError, ValueError):
        raise CalibrationError(f"{where}: 'percentiles' must be a list of numbers") from None
    rows = []
    for i, row in enumerate(data["layers"]):
        if not isinstance(row, dict) or not isinstance(row.get("layer"), str):
            raise CalibrationError(f"{where}: layers[{i}] is not a row with a 'layer' name")
        row = {k: _nan_to_none(v) for k, v in row.items()}
        name = row["layer"]
        cnt = row.get("count")
        if not isinstance(cnt, (int, float)) or isinstance(cnt, bool) or cnt < 0 or int(cnt) != cnt:
            raise CalibrationError(f"{where}: layer {name!r} has no valid integer 'count'")
        row["count"] = int(cnt)
        for f in STAT_FIELDS[:4]:
            if row.get(f"amax_{f}") is None and row.get(f"scale_{f}") is not None:
                row[f"amax_{f}"] = float(row[f"scale_{f}"]) * NVFP4_SCALE_DENOM
        for f in ("amax_min", "amax_max"):
            if row["count"] and not isinstance(row.get(f), (int, float)):
                raise CalibrationError(f"{where}: layer {name!r} lacks a numeric {f!r}")
        if row["count"] and row["amax_min"] > row["amax_max"]:
            raise CalibrationError(f"{where}: layer {name!r} has amax_min > amax_max")
        rows.append(row)
    return LegacySummary(where, str(data.get("format", "nvfp4")), str(data.get("mode", "dynamic")), percentiles, rows)


def load_summary(path: str | Path) -> LegacySummary:
    """Read a scales_summary JSON (bare NaN accepted, as the original wrote it)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{p}: no such file") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CalibrationError(f"{p}: not a scales_summary (invalid JSON: {exc})") from None
    return summary_from_dict(data, p)


def rebuild_sample(summary: LegacySummary, row: dict) -> np.ndarray:
    """An approximate sorted sample of `count` values consistent with a row's min, max and percentiles.

    Percentile p sits at fractional rank k = (n-1)·p/100 between order statistics f = floor(k) and f+1 (the
    original's linear interpolation). Anchors: (0, min), (n-1, max) and per percentile either (k, amax_p) when k
    is an integer, or — when f+1 is the max (f is the min) — the order statistic f (f+1) that the known max (min)
    implies exactly, or else both f and f+1 at amax_p, so the rebuilt sample reproduces every listed percentile.
    Order statistics between anchors are interpolated log-linearly in rank.
    """
    n = int(row["count"])
    q, v = summary.points(row)
    vmin, vmax = float(v[0]), float(v[-1])
    if n == 1:
        return np.array([vmax])
    ranks, vals = [0.0], [vmin]
    for qk, vk in zip(q[1:-1], v[1:-1]):
        k = (n - 1) * float(qk)
        f = math.floor(k)
        t = k - f
        if t < 1e-9:
            ranks.append(float(f))
            vals.append(float(vk))
        elif f + 1 == n - 1:  # between order statistic f and the max: v[f] follows exactly
            ranks.append(float(f))
            vals.append(float(np.clip((vk - t * vmax) / (1 - t), vmin, vmax)))
        elif f == 0:  # between the min and order statistic 1: v[1] follows exactly
            ranks.append(1.0)
            vals.append(float(np.clip((vk - (1 - t) * vmin) / t, vmin, vmax)))
        else:
            ranks += [float(f), float(f + 1)]
            vals += [float(vk), float(vk)]
    ranks.append(float(n - 1))
    vals.append(vmax)
    r, x = np.asarray(ranks), np.maximum.accumulate(np.asarray(vals))
    order = np.argsort(r, kind="stable")
    r, x = r[order], x[order]
    grid = np.arange(n, dtype=np.float64)
    out = np.exp(np.interp(grid, r, np.log(x))) if vmin > 0 else np.interp(grid, r, x)
    out = np.clip(out, vmin, vmax)
    # flat stretches (ties: amax values are bf16 numbers) must be exact, not exp(log(v))
    seg = np.clip(np.searchsorted(r, grid, side="right") - 1, 0, len(r) - 2)
    flat = x[seg] == x[seg + 1]
    out[flat] = x[seg][flat]
    for k, val in zip(r, x):
        if float(k).is_integer():
            out[int(k)] = val
    out[0], out[-1] = vmin, vmax
    return out


def summary_to_store(summary: LegacySummary) -> CalibrationStore:
    """An approximate store from a summary (see the module docstring); layers are flagged approximate."""
    store = CalibrationStore()
    for row in summary.rows:
        n = row["count"]
        if not n or row.get("amax_min") is None:
            continue
        sample = rebuild_sample(summary, row)
        st = LayerStats()
        st.add(sample, fmt=summary.format if summary.format != "all" else None)
        st.buckets.clear()
        # exact moments of the summary replace those of the rebuilt sample where available
        mean, std, kurt = row.get("amax_mean"), row.get("amax_std"), row.get("amax_kurtosis")
        if mean is not None and std is not None:
            m2 = n * float(std) ** 2
            m4 = (float(kurt) + 3.0) * m2 * m2 / n if kurt is not None and m2 > 0 else st.moments.m4
            m3 = float(np.sum((sample - float(mean)) ** 3))
            st.moments = Moments(n, float(mean), m2, m3, m4)
        st.approximate = True
        store.layers[row["layer"]] = st
    store.add_source("summary", summary.path, format=summary.format, mode=summary.mode)
    return store


# ---------------------------------------------------------------------------------------------------- export
def _exact_weighted_row(values: np.ndarray, counts: np.ndarray, percentiles: Sequence[float]) -> dict:
    """Exact statistics of a sample given as distinct values with counts (provided scales)."""
    order = np.argsort(values)
    v, c = values[order].astype(np.float64), counts[order].astype(np.int64)
    n = int(c.sum())
    mean = float(np.sum(v * c) / n)
    d = v - mean
    m2 = float(np.sum(c * d * d))
    m4 = float(np.sum(c * d ** 4))
    std = math.sqrt(m2 / n)
    kurt = n * m4 / (m2 * m2) - 3.0 if n >= 2 and m2 > 0 else None
    outl = float(np.sum(c[np.abs(d) > 3 * std]) / n) if n >= 2 and std > 0 else None
    cum = np.cumsum(c)

    def order_stat(k: int) -> float:
        return float(v[np.searchsorted(cum, k, side="right")])

    pct = {}
    for p in percentiles:
        k = (n - 1) * p / 100.0
        f = math.floor(k)
        cc = min(f + 1, n - 1)
        pct[p] = order_stat(f) + (order_stat(cc) - order_stat(f)) * (k - f)
    return {"count": n, "min": float(v[0]), "max": float(v[-1]), "mean": mean, "std": std, "kurtosis": kurt,
            "outlier_frac_3std": outl, "pct": pct}


def _row(layer: str, amax_stats: dict, percentiles: Sequence[float], scale_stats: dict | None = None) -> dict:
    """Build a 24-key-style row; scale_* = amax_*/2688 unless exact scale stats are given (provided mode)."""
    row: dict = {"layer": layer, "count": amax_stats["count"]}
    sc = scale_stats
    for f in STAT_FIELDS:
        a = amax_stats[f]
        if sc is not None:
            row[f"scale_{f}"] = sc[f]
        elif f in ("kurtosis", "outlier_frac_3std"):
            row[f"scale_{f}"] = a
        else:
            row[f"scale_{f}"] = a / NVFP4_SCALE_DENOM if a is not None else None
    for p in percentiles:
        a = amax_stats["pct"][p]
        row[f"scale_{pct_key(p)}"] = sc["pct"][p] if sc is not None else a / NVFP4_SCALE_DENOM
    for f in STAT_FIELDS:
        row[f"amax_{f}"] = amax_stats[f]
    for p in percentiles:
        row[f"amax_{pct_key(p)}"] = amax_stats["pct"][p]
    return {k: (v if v is None or isinstance(v, (int, str)) else (float(v) if math.isfinite(v) else None))
            for k, v in row.items()}


def layer_row(name: str, st: LayerStats, percentiles: Sequence[float], mode: str = "dynamic") -> dict | None:
    """The summary row of one layer (None when the layer has no data for `mode`)."""
    use_provided = mode == "provided" or (mode == "all" and not st.count)
    if use_provided:
        if not st.provided:
            return None
        vals = np.fromiter(st.provided.keys(), float)
        cnts = np.fromiter(st.provided.values(), np.int64)
        sc = _exact_weighted_row(vals, cnts, percentiles)
        am = dict(sc)
        for f in ("min", "max", "mean", "std"):
            am[f] = sc[f] * NVFP4_SCALE_DENOM
        am["pct"] = {p: x * NVFP4_SCALE_DENOM for p, x in sc["pct"].items()}
        return _row(name, am, percentiles, scale_stats=sc)
    if not st.count:
        return None
    pv = st.percentiles(percentiles)
    am = {"count": st.count, "min": st.min, "max": st.max, "mean": st.mean, "std": st.std,
          "kurtosis": st.kurtosis, "outlier_frac_3std": st.outlier_fraction(3.0),
          "pct": {p: float(x) for p, x in zip(percentiles, pv)}}
    return _row(name, am, percentiles)


def _format_ok(st: LayerStats, fmt: str) -> bool:
    return fmt == "all" or not st.formats or fmt in st.formats or (fmt == "nvfp4" and "nvfp4" in st.formats)


def store_summary(store: CalibrationStore, percentiles: Sequence[float] = DEFAULT_PERCENTILES, *,
                  fmt: str = "nvfp4", mode: str = "dynamic") -> dict:
    """The scales_summary document of a store (rows sorted by layer name; standard JSON values)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    percentiles = parse_percentiles(percentiles)
    rows = []
    for name in sorted(store.layers):
        st = store.layers[name]
        if not _format_ok(st, fmt):
            continue
        row = layer_row(name, st, percentiles, mode)
        if row is not None:
            rows.append(row)
    doc: dict = {"format": fmt, "mode": mode, "percentiles": percentiles, "layers": rows}
    if any(v is None for r in rows for v in r.values()):
        doc["nan_as_null"] = True
    approx = sum(1 for name in store.layers if store.layers[name].approximate)
    doc["nvfp4_lab"] = {"source": "calibration store", "provenance": store.provenance,
                        "approximate_layers": approx}
    return doc


def legacy_summary_document(summary: LegacySummary, percentiles: Sequence[float] | None = None) -> dict:
    """Re-export a summary in our standard form: scale_* recomputed as amax_*/2688, NaN -> null, rows sorted.

    Percentiles the summary does not list cannot be produced exactly; they are interpolated (log-linear) between
    the listed ones and the document says so."""
    ps = parse_percentiles(percentiles) if percentiles is not None else list(summary.percentiles)
    missing = [p for p in ps if p not in summary.percentiles and p not in (0.0, 100.0)]
    rows = []
    for row in sorted(summary.rows, key=lambda r: r["layer"]):
        if not row["count"] or row.get("amax_min") is None:
            continue
        q, v = summary.points(row)
        pct = {}
        for p in ps:
            x = summary.amax_percentile(row, p)
            if x is None:
                x = float(np.exp(np.interp(p / 100.0, q, np.log(v)))) if v[0] > 0 else float(np.interp(p / 100, q, v))
            pct[p] = x
        am = {"count": row["count"], "pct": pct}
        for f in STAT_FIELDS:
            am[f] = row.get(f"amax_{f}")
            if am[f] is None and f in ("kurtosis", "outlier_frac_3std"):
                am[f] = row.get(f"scale_{f}")
        rows.append(_row(row["layer"], am, ps))
    doc: dict = {"format": summary.format, "mode": summary.mode, "percentiles": ps, "layers": rows}
    if any(v is None for r in rows for v in r.values()):
        doc["nan_as_null"] = True
    doc["nvfp4_lab"] = {"source": f"scales_summary {Path(summary.path).name}",
                        "interpolated_percentiles": missing}
    return doc


def write_summary(path: str | Path, doc: dict, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Write a summary document atomically as standard JSON (indent 2, like the original)."""
    text = json.dumps(doc, indent=2, allow_nan=False)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def write_csv(path: str | Path, doc: dict, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """The summary rows as CSV with full-precision floats (the original rounded to 6 decimals); null -> empty."""
    keys = summary_fields(doc["percentiles"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for row in doc["layers"]:
        w.writerow(["" if row.get(k) is None else (repr(row[k]) if isinstance(row[k], float) else row[k])
                    for k in keys])
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return Path(path)


# ---------------------------------------------------------------------------------------------------- detection
def detect_kind(path: str | Path) -> str:
    """'store', 'summary' or 'log' for an input file (CalibrationError for missing or unrecognizable files)."""
    p = Path(path)
    head = _head(p, 4096, "a store, summary or log file")
    if _is_compressed(p, head):
        return "log"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CalibrationError(f"{p}: invalid JSON ({exc}); expected a calibration store or a "
                                   "scales_summary") from None
        if isinstance(data, dict) and data.get("format") == STORE_FORMAT:
            return "store"
        if is_summary_dict(data):
            return "summary"
        raise CalibrationError(f"{p}: JSON that is neither an NVFP4 Lab calibration store nor a scales_summary")
    return "log"


def load_any(path: str | Path, *, fmt: str = "all", mode: str = "all", steps: int | None = None,
             cfg_passes: int = 1) -> CalibrationStore | LegacySummary:
    """A store (as is), a summary (as LegacySummary) or a log (imported into a new store)."""
    kind = detect_kind(path)
    if kind == "store":
        return CalibrationStore.load(path)
    if kind == "summary":
        return load_summary(path)
    store, _ = import_log(path, fmt=fmt, mode=mode, steps=steps, cfg_passes=cfg_passes)
    return store


def as_store(obj: CalibrationStore | LegacySummary) -> CalibrationStore:
    return obj if isinstance(obj, CalibrationStore) else summary_to_store(obj)
