"""Figures for calibration data, as PNG bytes or files (matplotlib, Agg canvas, imported lazily).

Why PNG bytes: the CLI writes them to a folder, a ComfyUI node can show them as images, tests can check them —
without touching pyplot's global state or the process-wide backend (we draw on ``Figure`` + ``FigureCanvasAgg``).

* :func:`stat_histograms` — histograms across layers of scale CV (std/mean), excess kurtosis and the 3σ outlier
  fraction, with the original analyzer's file names (``scale_cv_hist_N.png``, ``kurtosis_hist_N.png``,
  ``outlier_frac_3std_hist_N.png``; N = number of layers = number of bins, as the original).
* :func:`amax_vs_step` — per-step median (line) and max (dashed) of the per-call amax for the N layers whose
  per-step means vary most (coefficient of variation across steps).
* :func:`ranking_bar` — a generic horizontal bar chart for rankings (sensitivity, CV, ...).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

from ..quant.errors import CalibrationError
from .legacy import LegacySummary, legacy_summary_document, store_summary
from .stats import LayerStats
from .store import CalibrationStore


def _figure(width: float = 8.0, height: float = 5.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a declared dependency
        raise CalibrationError(f"plots need matplotlib ({exc}); pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.canvas.print_png(buf)
    return buf.getvalue()


def _rows(source: CalibrationStore | LegacySummary | dict) -> list[dict]:
    if isinstance(source, CalibrationStore):
        return store_summary(source, fmt="all")["layers"]
    if isinstance(source, LegacySummary):
        return legacy_summary_document(source)["layers"]
    if isinstance(source, dict) and isinstance(source.get("layers"), list):
        return source["layers"]
    raise TypeError("expected a CalibrationStore, a LegacySummary or a summary document")


def _hist_png(values: list[float], bins: int, title: str, xlabel: str) -> bytes:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    if values:
        ax.hist(values, bins=max(1, bins), color="#4c72b0", edgecolor="white", linewidth=0.3)
    else:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layers")
    ax.grid(True, alpha=0.3)
    return _png(fig)


def stat_histograms(source: CalibrationStore | LegacySummary | dict, bins: int | None = None) -> dict[str, bytes]:
    """{file name: PNG} for the scale-CV, kurtosis and outlier-fraction histograms across layers."""
    rows = _rows(source)
    n = len(rows)
    nb = bins or max(n, 1)

    def finite(xs):
        return [float(x) for x in xs if x is not None and math.isfinite(float(x))]

    cv = finite(r["scale_std"] / r["scale_mean"] if r.get("scale_std") is not None and r.get("scale_mean")
                else None for r in rows)
    kurt = finite(r.get("amax_kurtosis") for r in rows)
    outl = finite(r.get("amax_outlier_frac_3std") for r in rows)
    return {
        f"scale_cv_hist_{n}.png": _hist_png(cv, nb, f"scale CV (std/mean) across {n} layers", "scale CV"),
        f"kurtosis_hist_{n}.png": _hist_png(kurt, nb, f"excess kurtosis of per-call amax, {n} layers",
                                            "excess kurtosis"),
        f"outlier_frac_3std_hist_{n}.png": _hist_png(outl, nb, f"share of calls beyond 3σ, {n} layers",
                                                     "outlier fraction (|amax − mean| > 3σ)"),
    }


def step_variability(st: LayerStats) -> float | None:
    """Coefficient of variation of the per-step mean amax (None with fewer than 2 numbered steps)."""
    means = [b.mean for s, b in st.steps().items() if s is not None and b.count]
    if len(means) < 2:
        return None
    m = sum(means) / len(means)
    if m <= 0:
        return None
    return math.sqrt(sum((x - m) ** 2 for x in means) / len(means)) / m


def most_variable_layers(store: CalibrationStore, top_n: int = 8) -> list[tuple[str, float]]:
    """(layer, per-step CV) of the `top_n` layers whose per-step mean amax varies most."""
    scored = [(name, v) for name, st in store.layers.items() if (v := step_variability(st)) is not None]
    scored.sort(key=lambda kv: (-kv[1], kv[0]))
    return scored[:top_n]


def amax_vs_step(store: CalibrationStore, top_n: int = 8, layers: Sequence[str] | None = None) -> bytes:
    """Per-step median (solid) and max (dashed) amax of the most step-variable layers (or the given ones)."""
    if layers is None:
        chosen = [name for name, _ in most_variable_layers(store, top_n)]
    else:
        chosen = [name for name in layers if name in store.layers]
    if not chosen:
        raise CalibrationError("no layer has per-step data (need at least 2 sampler steps recorded with a step "
                               "number); record with the Calibrate node or import a log with --steps")
    fig = _figure(9.0, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    import itertools

    colors = itertools.cycle(["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                              "#8c8c8c", "#ccb974", "#64b5cd"])
    for name in chosen:
        steps = {s: b for s, b in store.layers[name].steps().items() if s is not None and b.count}
        xs = sorted(steps)
        color = next(colors)
        ax.plot(xs, [steps[s].percentile(50.0) for s in xs], color=color, label=name, linewidth=1.4)
        ax.plot(xs, [steps[s].max for s in xs], color=color, linestyle="--", linewidth=0.9)
    ax.set_yscale("log")
    ax.set_xlabel("sampler step")
    ax.set_ylabel("per-call input amax (median solid, max dashed)")
    ax.set_title(f"amax vs step: {len(chosen)} most step-variable layers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def ranking_bar(names: Sequence[str], values: Sequence[float], *, title: str, xlabel: str,
                top_n: int | None = 30, descending: bool = True) -> bytes:
    """Horizontal bar chart of the top-N (name, value) pairs; non-finite values are left out."""
    pairs = [(str(n), float(v)) for n, v in zip(names, values) if v is not None and math.isfinite(float(v))]
    pairs.sort(key=lambda kv: (-kv[1] if descending else kv[1], kv[0]))
    if top_n is not None:
        pairs = pairs[:top_n]
    fig = _figure(8.0, max(2.5, 0.28 * len(pairs) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    if pairs:
        ax.barh(range(len(pairs)), [v for _, v in pairs], color="#4c72b0")
        ax.set_yticks(range(len(pairs)))
        ax.set_yticklabels([n for n, _ in pairs], fontsize=7)
        ax.invert_yaxis()
    else:
        ax.text(0.5, 0.5, "nothing to rank", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)


def write_pngs(figures: dict[str, bytes], out_dir: str | Path) -> list[Path]:
    """Write {name: PNG} into out_dir (created if missing); returns the paths."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in figures.items():
        p = d / name
        p.write_bytes(data)
        paths.append(p)
    return paths


def standard_plots(source: CalibrationStore | LegacySummary, top_n: int = 8) -> dict[str, bytes]:
    """All plots a source supports: the three histograms, plus amax-vs-step and a scale-CV ranking for stores."""
    figs = stat_histograms(source)
    rows = _rows(source)
    cv = {r["layer"]: r["scale_std"] / r["scale_mean"] for r in rows
          if r.get("scale_std") is not None and r.get("scale_mean")}
    figs["scale_cv_ranking.png"] = ranking_bar(list(cv), list(cv.values()), title="layers by scale CV (std/mean)",
                                               xlabel="scale CV", top_n=30)
    if isinstance(source, CalibrationStore) and most_variable_layers(source, 1):
        figs["amax_vs_step.png"] = amax_vs_step(source, top_n)
    return figs
