"""`nvfp4 layers FILE`: one row per layer (format, logical shape, parameters, stored bytes, input_scale), totals per
format, or `--compare B` to see layer by layer how two files differ in format.

Reads headers only (plus the tiny `comfy_quant` markers and `input_scale` scalars), so it is instant on any size of
model. Works on single, sharded and folder safetensors and on GGUF.
"""

from __future__ import annotations

import argparse

from ..quant import formats
from ..quant.checkpoint import open_checkpoint
from ..quant.errors import NVFP4Error
from ..quant.inspect import (
    SORT_KEYS,
    compare,
    compile_filter,
    filter_rows,
    render_compare,
    render_table,
    render_totals,
    rows,
    sort_rows,
    totals,
)
from .common import eprint, print_json

EPILOG = """\
formats: nvfp4 (W4A4), nvfp4-w4a16 (full_precision_matrix_mult), fp8, fp8-e5m2, bf16, fp16, fp32, gguf:<TYPE>
(GGUF files), comfy:<name> (other ComfyUI formats), or the dtype of other tensors.
params counts logical parameters (weight + bias), not stored elements; size is every tensor of the layer on disk.

examples:
  nvfp4 layers model.safetensors
  nvfp4 layers model.safetensors --filter 'blocks\\.0\\.' --sort size
  nvfp4 layers model_nvfp4.safetensors --format nvfp4,nvfp4-w4a16 --json
  nvfp4 layers model_q4_k.gguf
  nvfp4 layers original.safetensors --compare model_nvfp4.safetensors
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `layers` subcommand."""
    p = subparsers.add_parser(
        "layers",
        help="list layers with format, logical shape, parameters, size, input_scale; compare two files",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help=".safetensors, *.safetensors.index.json, a model folder, or .gguf")
    p.add_argument("--filter", metavar="RE",
                   help="only layers whose name matches this regex (searched, case-sensitive)")
    p.add_argument("--format", metavar="FMT", help="only layers in these formats (comma-separated, e.g. nvfp4,fp8)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array instead of a table (with --compare: the differences)")
    p.add_argument("--compare", metavar="B", help="show how layer formats differ between FILE and B")
    p.add_argument("--sort", choices=SORT_KEYS, help="sort by name, size or params (default: file order)")
    p.set_defaults(func=run)


def _wanted_formats(spec: str | None, present: set[str]) -> list[str] | None:
    if not spec:
        return None
    wanted = [f.strip() for f in spec.split(",") if f.strip()]
    for fmt in wanted:
        known = fmt in formats.ALL_FORMATS or fmt in present or fmt.startswith(("gguf:", "comfy:"))
        if not known:
            raise NVFP4Error(
                f"unknown format {fmt!r} for --format; use one of {', '.join(formats.ALL_FORMATS)}, gguf:<TYPE>, "
                f"or a format present in the file ({', '.join(sorted(present))})"
            )
    return wanted


def _load(path: str, args: argparse.Namespace) -> list[dict]:
    with open_checkpoint(path) as ckpt:
        result = rows(ckpt)  # before the notes: listing layers can add some
        for note in ckpt.notes:
            eprint(f"note: {ckpt.path.name}: {note}")
        return result


def run(args: argparse.Namespace) -> int:
    """Print the layer report (or the comparison) for args.file."""
    compile_filter(args.filter)  # validate before opening anything
    a_rows = _load(args.file, args)
    b_rows = _load(args.compare, args) if args.compare else None
    present = {r["format"] for r in a_rows} | {r["format"] for r in (b_rows or [])}
    wanted = _wanted_formats(args.format, present)

    if b_rows is not None:
        a_sel = filter_rows(a_rows, args.filter)
        b_sel = filter_rows(b_rows, args.filter)
        diffs = compare(a_sel, b_sel)
        if wanted:
            diffs = [d for d in diffs if d["a_format"] in wanted or d["b_format"] in wanted]
        if args.sort == "name":
            diffs.sort(key=lambda d: d["name"])
        elif args.sort in ("size", "params"):
            diffs.sort(key=lambda d: -max(d["a_bytes"] or 0, d["b_bytes"] or 0))
        if args.json:
            print_json(diffs)
        else:
            print(render_compare(diffs, a_sel, b_sel, a_label="A", b_label="B"))
            print(f"A = {args.file}\nB = {args.compare}")
        return 0

    selected = sort_rows(filter_rows(a_rows, args.filter, wanted), args.sort)
    if args.json:
        print_json(selected)
        return 0
    if not selected:
        eprint("no layer matches" if (args.filter or wanted) else "the file holds no tensors")
        return 0
    print(render_table(selected))
    print()
    print(render_totals(totals(selected)))
    return 0
