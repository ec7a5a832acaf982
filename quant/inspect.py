"""Layer reports: what format each layer of a file is in, what it costs, and how two files differ.

Used by `nvfp4 layers` and the inspect node. Rows are plain dicts so they serialize to JSON as they are:

    {"name", "format", "shape", "params", "bytes", "input_scale", "full_precision_matrix_mult", "shape_padded"}

`params` is the logical parameter count (weight + bias, not stored elements: a 64x64 NVFP4 layer with bias is 4,160
parameters, not the 2,626 stored bytes-as-elements), `bytes` the bytes of all of the layer's tensors on disk.
A non-finite `input_scale` is written as None with `"input_scale_nonfinite": True`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from .errors import NVFP4Error

__all__ = [
    "SORT_KEYS",
    "compare",
    "compile_filter",
    "filter_rows",
    "human_bytes",
    "human_count",
    "render_compare",
    "render_table",
    "render_totals",
    "rows",
    "rows_from_layers",
    "sort_rows",
    "totals",
]

SORT_KEYS = ("name", "size", "params")


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB': sizes in tables and messages."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """12_345_678 -> '12.3M': parameter counts in summaries."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return str(n)


def rows_from_layers(layers: Iterable[Any]) -> list[dict]:
    """Report rows from `checkpoint.Layer` objects (anything with the same attributes)."""
    out = []
    for lay in layers:
        scale = lay.input_scale
        row: dict[str, Any] = {
            "name": lay.name,
            "format": lay.format,
            "shape": list(lay.shape),
            "params": int(lay.params),
            "bytes": int(lay.stored_bytes),
            "input_scale": scale if scale is None or math.isfinite(scale) else None,
            "full_precision_matrix_mult": bool(lay.full_precision_matrix_mult),
            "shape_padded": bool(getattr(lay, "shape_padded", False)),
        }
        if scale is not None and not math.isfinite(scale):
            row["input_scale_nonfinite"] = True
        out.append(row)
    return out


def rows(ckpt: Any) -> list[dict]:
    """Report rows for every layer of an open `Checkpoint`, in file order."""
    return rows_from_layers(ckpt.layers().values())


def compile_filter(pattern: str | None) -> re.Pattern | None:
    """Compile a user regex (searched anywhere in the name, case-sensitive); NVFP4Error if it is invalid."""
    if pattern is None or pattern == "":
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise NVFP4Error(f"invalid regular expression {pattern!r}: {exc}") from None


def filter_rows(rows_: list[dict], pattern: str | None = None, formats: Iterable[str] | None = None) -> list[dict]:
    """Rows whose name matches `pattern` (re.search) and, if given, whose format is one of `formats`."""
    rx = compile_filter(pattern)
    wanted = set(formats) if formats else None
    return [
        r for r in rows_
        if (rx is None or rx.search(r["name"])) and (wanted is None or r["format"] in wanted)
    ]


def sort_rows(rows_: list[dict], key: str | None) -> list[dict]:
    """Sort by "name", "size" (bytes, largest first) or "params" (largest first); None keeps file order."""
    if key is None:
        return list(rows_)
    if key == "name":
        return sorted(rows_, key=lambda r: r["name"])
    if key == "size":
        return sorted(rows_, key=lambda r: (-r["bytes"], r["name"]))
    if key == "params":
        return sorted(rows_, key=lambda r: (-r["params"], r["name"]))
    raise NVFP4Error(f"unknown sort key {key!r}; expected one of: {', '.join(SORT_KEYS)}")


def totals(rows_: list[dict]) -> dict[str, dict[str, int]]:
    """{format: {"layers", "params", "bytes"}} in order of first appearance, plus "total" last."""
    out: dict[str, dict[str, int]] = {}
    for r in rows_:
        t = out.setdefault(r["format"], {"layers": 0, "params": 0, "bytes": 0})
        t["layers"] += 1
        t["params"] += r["params"]
        t["bytes"] += r["bytes"]
    out["total"] = {
        "layers": sum(t["layers"] for t in out.values()),
        "params": sum(t["params"] for t in out.values()),
        "bytes": sum(t["bytes"] for t in out.values()),
    }
    return out


def compare(a_rows: list[dict], b_rows: list[dict]) -> list[dict]:
    """Per-layer differences between two reports: format changed, only in A, only in B.

    Returns dicts {"name", "change": "format" | "only_a" | "only_b", "a_format", "b_format", "a_bytes",
    "b_bytes"} (missing side = None); A's order first, then layers only in B in B's order. Layers with the same
    format in both are not listed.
    """
    a = {r["name"]: r for r in a_rows}
    b = {r["name"]: r for r in b_rows}
    diffs: list[dict] = []

    def entry(name: str, change: str) -> dict:
        ra, rb = a.get(name), b.get(name)
        return {
            "name": name,
            "change": change,
            "a_format": ra["format"] if ra else None,
            "b_format": rb["format"] if rb else None,
            "a_bytes": ra["bytes"] if ra else None,
            "b_bytes": rb["bytes"] if rb else None,
        }

    for name, ra in a.items():
        rb = b.get(name)
        if rb is None:
            diffs.append(entry(name, "only_a"))
        elif ra["format"] != rb["format"]:
            diffs.append(entry(name, "format"))
    for name in b:
        if name not in a:
            diffs.append(entry(name, "only_b"))
    return diffs


def _fmt_scale(row: dict) -> str:
    if row.get("input_scale_nonfinite"):
        return "non-finite"
    s = row["input_scale"]
    return "-" if s is None else f"{s:.6g}"


def _align(table: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for r in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_table(rows_: list[dict]) -> str:
    """Aligned text table: name, format, shape, params, size, input_scale, W4A16 flag. '*' marks padded shapes."""
    header = ["name", "format", "shape", "params", "size", "input_scale", "fp_mm"]
    table = [header]
    for r in rows_:
        shape = "x".join(str(d) for d in r["shape"]) or "scalar"
        if r.get("shape_padded"):
            shape += "*"
        table.append([
            r["name"], r["format"], shape, f"{r['params']:,}", human_bytes(r["bytes"]), _fmt_scale(r),
            "yes" if r["full_precision_matrix_mult"] else "",
        ])
    text = _align(table, right={3, 4})
    if any(r.get("shape_padded") for r in rows_):
        text += "\n* NVFP4 storage is padded to multiples of 16; this dim may be up to 15 larger than the real one"
    return text


def render_totals(tot: dict[str, dict[str, int]]) -> str:
    """Aligned per-format totals (layers, params, size, share of bytes)."""
    grand = tot.get("total", {}).get("bytes", 0) or 1
    table = [["format", "layers", "params", "size", "share"]]
    for fmt, t in tot.items():
        table.append([fmt, f"{t['layers']:,}", f"{t['params']:,}", human_bytes(t["bytes"]),
                      f"{100 * t['bytes'] / grand:.1f}%"])
    return _align(table, right={1, 2, 3, 4})


def render_compare(diffs: list[dict], a_rows: list[dict], b_rows: list[dict], a_label: str = "A",
                   b_label: str = "B") -> str:
    """Text report of `compare`: differing layers, then counts and sizes of both files."""
    out = []
    if diffs:
        table = [["name", "change", a_label, b_label]]
        labels = {"format": "format", "only_a": f"only in {a_label}", "only_b": f"only in {b_label}"}
        for d in diffs:
            table.append([d["name"], labels[d["change"]], d["a_format"] or "-", d["b_format"] or "-"])
        out.append(_align(table, right=set()))
    else:
        out.append("no layer differs in format")
    counts = {k: sum(1 for d in diffs if d["change"] == k) for k in ("format", "only_a", "only_b")}
    b_names = {x["name"] for x in b_rows}
    same = sum(1 for r in a_rows if r["name"] in b_names) - counts["format"]
    ta, tb = totals(a_rows)["total"], totals(b_rows)["total"]
    out.append("")
    out.append(
        f"{same} layer(s) same format, {counts['format']} changed, {counts['only_a']} only in {a_label}, "
        f"{counts['only_b']} only in {b_label}"
    )
    out.append(f"{a_label}: {ta['layers']} layers, {human_bytes(ta['bytes'])}; "
               f"{b_label}: {tb['layers']} layers, {human_bytes(tb['bytes'])}")
    return "\n".join(out)
