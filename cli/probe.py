"""`nvfp4 probe SRC -o REPORT.json`: measure, per Linear layer, the output error of every candidate format
(NVFP4 W4A4 dynamic/static, NVFP4 W4A16, FP8 as ComfyUI runs it, bf16) on real recorded inputs.

The report drives `nvfp4 plan SRC --sensitivity REPORT.json --budget 9.5GB` and can be plotted with --plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..quant.errors import NVFP4Error
from .common import eprint

EPILOG = """\
inputs: real rows recorded during calibration (--samples FILE, or the `<session>.samples.safetensors` sidecar found
next to --calibration STORE). Layers without recorded rows get synthetic diffusion-like rows, scaled to the store's
amax when a store is given; the report labels them "synthetic" (less reliable).
candidates: nvfp4 (W4A4, dynamic input scale), nvfp4-static (W4A4 with the store's input scale), nvfp4-w4a16,
fp8 (W8A8, activation scale 1.0 as ComfyUI does without input_scale), fp8-static (activation scale amax/448), bf16.
metrics: rel_rmse, snr_db, cosine, max_abs, clip_rate of the layer OUTPUT against the fp32 unquantized layer.

examples:
  nvfp4 probe wan.safetensors --calibration calib/wan.json -o wan_sens.json --plots plots/
  nvfp4 probe wan.safetensors --samples calib/wan.samples.safetensors --layers 'blocks\\.(0|1)\\.' -o s.json
  nvfp4 plan wan.safetensors --sensitivity wan_sens.json --budget 9.5GB -o plan.json
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `probe` subcommand."""
    p = subparsers.add_parser(
        "probe",
        help="per-layer output error of each candidate format on recorded inputs (sensitivity report)",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="source model (.safetensors, sharded index, folder or .gguf)")
    p.add_argument("-o", "--output", metavar="REPORT.json", required=True, help="where to write the report")
    p.add_argument("--calibration", metavar="STORE", help="calibration store (.json): static input scales, amax "
                   "for synthetic rows, and its samples sidecar when --samples is not given")
    p.add_argument("--samples", metavar="FILE", help="recorded input rows (<session>.samples.safetensors)")
    p.add_argument("--layers", metavar="RE", help="only layers whose name matches this regex (searched)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    p.add_argument("--max-rows", type=int, default=512, metavar="N",
                   help="input rows used per layer (evenly subsampled; default 512)")
    p.add_argument("--candidates", metavar="LIST",
                   help="comma-separated subset of nvfp4,nvfp4-static,nvfp4-w4a16,fp8,fp8-static,bf16 (default all)")
    p.add_argument("--scale-method", default="percentile", choices=("percentile", "max", "mse"),
                   help="how the static input scale is chosen from the store (default percentile)")
    p.add_argument("--percentile", type=float, default=99.9, help="percentile for --scale-method percentile")
    p.add_argument("--margin", type=float, default=1.0, help="multiplier on the chosen amax (default 1.0)")
    p.add_argument("--plots", metavar="DIR", help="write ranking_<format>.png and snr_histogram.png here")
    p.add_argument("--top", type=int, default=15, metavar="N", help="rows of the printed ranking (default 15)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a TTY")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..calibration.sensitivity import ALL_CANDIDATES, probe, write_plots
    from ..quant.atomic import check_output_path

    src = Path(args.src)
    if not src.exists():
        raise NVFP4Error(f"{src}: no such model file or folder")
    check_output_path(args.output, force=args.force, inputs=[src])
    candidates = ALL_CANDIDATES
    if args.candidates:
        candidates = tuple(c.strip() for c in args.candidates.split(",") if c.strip())
        bad = [c for c in candidates if c not in ALL_CANDIDATES]
        if bad:
            raise NVFP4Error(f"--candidates: unknown {', '.join(bad)}; choose among {', '.join(ALL_CANDIDATES)}")
    if args.max_rows is not None and args.max_rows < 1:
        raise NVFP4Error("--max-rows must be at least 1")
    samples = args.samples
    if samples is None and args.calibration:
        from ..calibration.recorder import input_samples_path
        side = input_samples_path(args.calibration)
        if side.is_file():
            samples = side
            eprint(f"note: using recorded input rows from {side}")
        else:
            eprint(f"note: {side} not found: no recorded rows; layers get synthetic inputs scaled to the store's amax")
    elif samples is None:
        eprint("note: no --samples/--calibration: every layer gets SYNTHETIC inputs (arbitrary scale); record "
               "calibration with input samples for a meaningful report")
    show = bool(args.progress) or sys.stderr.isatty()
    report = probe(src, samples=samples, store=args.calibration, device=args.device, layers=args.layers,
                   progress=show, candidates=candidates, scale_method=args.scale_method,
                   percentile=args.percentile, margin=args.margin, max_rows=args.max_rows)
    report.save(args.output, force=args.force)
    print(render_summary(report, top=args.top))
    print(f"wrote {args.output}")
    if args.plots:
        for p in write_plots(report, args.plots, force=args.force):
            print(f"wrote {p}")
    return 0


def render_summary(report, *, top: int = 15) -> str:
    """Text summary: inputs, failures, and the worst layers by NVFP4 W4A4 output error with the other formats."""
    lines = [f"probed {len(report.layers)} layers of {report.source.get('file', '?')} on {report.inputs} inputs"]
    fails = report.failures()
    if fails:
        lines.append(f"{len(fails)} layer(s) not ranked: " + ", ".join(f"{n} ({s})" for n, s in fails[:8])
                     + (" ..." if len(fails) > 8 else ""))
    by = report.by_layer()
    cands = [c for c in report.candidates if any(e.error(c) is not None for e in report.layers)]
    rank = report.ranking(cands[0] if cands else "nvfp4")[:top]
    if rank:
        hdr = ["layer"] + [f"{c} rel" for c in cands] + ["nvfp4 clip", "w kurt", "inputs"]
        rows = [hdr]
        for name, _ in rank:
            e = by[name]
            row = [name] + [_fmt(e.error(c)) for c in cands]
            clip = e.formats.get(cands[0], {}).get("clip_rate")
            kurt = e.weight.get("excess_kurtosis")
            row += [_fmt(clip), _fmt(kurt, 1), e.inputs]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
        lines.append(f"worst {len(rank)} by {cands[0] if cands else 'nvfp4'} output rel_rmse:")
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                                          for i, c in enumerate(r)))
    return "\n".join(lines)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if digits > 1 else f"{v:.1f}"
