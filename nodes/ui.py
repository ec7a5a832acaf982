"""The table/chart payload our nodes send to the web extension (`web/`), built in one place so every node keeps the
contract exactly:

    io.NodeOutput(..., ui={"nvfp4_table": [payload, ...]})
    payload = {"title": str,
               "columns": [str, ...],
               "rows": [[cell, ...], ...],            # cells: str | int | float | None
               "numeric": [bool, ...],                # one per column
               "sort": {"column": int, "descending": bool} | None,
               "chart": {"label": str, "column": int, "top": int} | None,   # bar chart of a numeric column
               "summary": [str, ...]}

Rows are capped at MAX_ROWS (the rest is dropped, with a summary line saying so). Cells that are not JSON scalars
are turned into text (a shape tuple becomes "3072x768"); non-finite floats become None, because the payload travels
as standard JSON (the history endpoint and the websocket both serialise it).

No ComfyUI import here: the payload is plain data, so tests and other nodes can build it anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

UI_KEY = "nvfp4_table"
MAX_ROWS = 2000

Cell = str | int | float | None


def cell(value: Any) -> Cell:
    """One table cell as a JSON scalar: bools become "yes"/"" text, sequences "AxB", non-finite floats None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value) if value else "scalar"
    try:  # numpy / torch scalars
        as_float = float(value)
    except (TypeError, ValueError):
        return str(value)
    if as_float.is_integer() and "int" in type(value).__name__.lower():
        return int(as_float)
    return as_float if math.isfinite(as_float) else None


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
          numeric: Sequence[bool] | None = None, sort: tuple[int, bool] | None = None,
          chart: tuple[str, int, int] | None = None, summary: Iterable[str] = (),
          max_rows: int = MAX_ROWS) -> dict:
    """Build one payload (see the module docstring).

    `numeric` defaults to "every non-None cell of the column is an int/float". `sort` = (column, descending) is the
    initial sort the web view applies (the rows themselves are sent in the order given). `chart` = (label, column,
    top): bar chart of the `top` largest values of a numeric column.
    """
    columns = [str(c) for c in columns]
    out_rows: list[list[Cell]] = []
    total = 0
    for r in rows:
        total += 1
        if len(out_rows) >= max_rows:
            continue
        cells = [cell(v) for v in r]
        if len(cells) != len(columns):
            raise ValueError(f"table {title!r}: row has {len(cells)} cells, expected {len(columns)}: {cells[:4]}")
        out_rows.append(cells)
    if numeric is None:
        numeric = [
            any(isinstance(row[i], (int, float)) for row in out_rows)
            and all(row[i] is None or isinstance(row[i], (int, float)) for row in out_rows)
            for i in range(len(columns))
        ]
    numeric = [bool(n) for n in numeric]
    if len(numeric) != len(columns):
        raise ValueError(f"table {title!r}: {len(numeric)} numeric flags for {len(columns)} columns")
    lines = [str(s) for s in summary]
    if total > len(out_rows):
        lines.append(f"showing the first {len(out_rows)} of {total} rows (the node output holds all of them)")
    sort_obj = None
    if sort is not None:
        col, desc = sort
        if not 0 <= col < len(columns):
            raise ValueError(f"table {title!r}: sort column {col} out of range")
        sort_obj = {"column": int(col), "descending": bool(desc)}
    chart_obj = None
    if chart is not None:
        label, col, top = chart
        if not 0 <= col < len(columns) or not numeric[col]:
            raise ValueError(f"table {title!r}: chart column {col} is not a numeric column")
        chart_obj = {"label": str(label), "column": int(col), "top": int(top)}
    return {"title": str(title), "columns": columns, "rows": out_rows, "numeric": numeric, "sort": sort_obj,
            "chart": chart_obj, "summary": lines}


def ui(*payloads: dict) -> dict:
    """The `ui=` argument of io.NodeOutput for one or more payloads."""
    return {UI_KEY: list(payloads)}


def text_table(payload: dict, limit: int = 60) -> str:
    """A plain-text rendering of a payload (for the STRING outputs and logs): summary, then aligned rows."""
    lines = [payload["title"], *payload["summary"]]
    rows = payload["rows"][:limit]
    if rows:
        shown = [[("" if c is None else (f"{c:.4g}" if isinstance(c, float) else str(c))) for c in r] for r in rows]
        widths = [min(max(len(h), *(len(r[i]) for r in shown)), 60) for i, h in enumerate(payload["columns"])]
        lines.append("")
        lines.append("  ".join(h.ljust(w) for h, w in zip(payload["columns"], widths, strict=True)).rstrip())
        for r in shown:
            lines.append("  ".join((c.rjust(w) if payload["numeric"][i] else c.ljust(w))
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if len(payload["rows"]) > limit:
            lines.append(f"... {len(payload['rows']) - limit} more rows")
    return "\n".join(lines)
