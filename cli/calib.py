"""`nvfp4 calib ...`: work with calibration data (stores, original scales summaries, original ComfyUI scale logs).

  summarize  STORE|SUMMARY|LOG -o out.json   the original scales_summary schema (+ --csv, --plots)
  merge      A B ... -o OUT                  exact merge of stores (and logs) from several runs or machines
  import     LOG|SUMMARY -o STORE            original log (.gz/.xz/.bz2 too) or scales_summary -> store
  scales     STORE|SUMMARY|LOG --method ...  per-layer static input_scale and the share of calls it would clip

Other command families add `calib` subcommands in two ways: list a module name in CALIB_EXTENSIONS (the module
`cli/<name>.py` exposes `register_calib(calib_subparsers)`), or call `register_calib_subcommand(fn)` before the
parser is built.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from ..calibration.legacy import (
    DEFAULT_PERCENTILES,
    LegacySummary,
    detect_kind,
    import_log,
    legacy_summary_document,
    load_any,
    load_summary,
    parse_percentiles,
    store_summary,
    summary_to_store,
    write_csv,
    write_summary,
)
from ..calibration.scale_selection import DEFAULT_MODEL, METHODS, scales_document, select_input_scales
from ..calibration.store import CalibrationStore
from ..quant.atomic import check_output_path
from ..quant.errors import CalibrationError
from .common import EXIT_OK, EXIT_USAGE, eprint, print_json

# Modules cli/<name>.py that add `calib` subcommands via register_calib(calib_subparsers); missing ones are skipped.
CALIB_EXTENSIONS: tuple[str, ...] = ("calib_run", "calib_bake")
_EXTRA_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []

EPILOG = """\
examples:
  nvfp4 calib import comfyui_scales.log.xz -o wan22_5b.calib.json
  nvfp4 calib import scales_summary_wan22_5b.json -o wan22_5b.calib.json     (approximate: percentiles only)
  nvfp4 calib merge machine_a.calib.json machine_b.calib.json -o all.calib.json
  nvfp4 calib summarize all.calib.json -o scales_summary.json --csv scales.csv --plots plots/
  nvfp4 calib scales all.calib.json --method percentile --percentile 99.9 --margin 1.08
  nvfp4 calib scales all.calib.json --method mse --json
"""


def register_calib_subcommand(fn: Callable[[argparse._SubParsersAction], None]) -> None:
    """Have `fn(calib_subparsers)` called when the `calib` parser is built (adds a subcommand)."""
    if fn not in _EXTRA_SUBCOMMANDS:
        _EXTRA_SUBCOMMANDS.append(fn)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `calib` and its subcommands."""
    p = subparsers.add_parser("calib", help="calibration data: summarize, merge, import, choose input scales",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="calib_command", metavar="SUBCOMMAND")

    def _no_sub(args: argparse.Namespace) -> int:
        p.print_help()
        return EXIT_USAGE

    p.set_defaults(func=_no_sub)
    _add_summarize(sub)
    _add_merge(sub)
    _add_import(sub)
    _add_scales(sub)
    for name in CALIB_EXTENSIONS:
        importlib.import_module(f".{name}", __package__).register_calib(sub)
    for fn in _EXTRA_SUBCOMMANDS:
        fn(sub)
    from .common import add_debug_argument

    for s in sub.choices.values():
        add_debug_argument(s)


# ---------------------------------------------------------------------------------------------------- shared
def _add_log_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("log input (original ComfyUI ops.py patch TSV)")
    g.add_argument("--log-format", default="all", metavar="FMT",
                   help="keep only lines of this logged format (nvfp4, float8_e4m3fn, ...; default all)")
    g.add_argument("--log-mode", default="all", choices=("dynamic", "provided", "all"),
                   help="keep only dynamic or provided lines (default all)")
    g.add_argument("--steps", type=int, metavar="N",
                   help="assign the i-th logged call of a layer to step (i // cfg-passes) %% N (the log has no step "
                        "column; valid only for unlimited logging with N steps per prompt)")
    g.add_argument("--cfg-passes", type=int, default=1, metavar="K",
                   help="model calls per step when cond and uncond run as separate calls (default 1)")


def _load(path: str, args: argparse.Namespace) -> CalibrationStore | LegacySummary:
    if getattr(args, "steps", None) is not None and args.steps <= 0:
        raise CalibrationError("--steps must be > 0")
    if getattr(args, "cfg_passes", 1) <= 0:
        raise CalibrationError("--cfg-passes must be > 0")
    return load_any(path, fmt=getattr(args, "log_format", "all"), mode=getattr(args, "log_mode", "all"),
                    steps=getattr(args, "steps", None), cfg_passes=getattr(args, "cfg_passes", 1))


def _percentiles(text: str) -> list[float]:
    try:
        return parse_percentiles(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------- summarize
def _add_summarize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summarize", help="write the original scales_summary JSON schema (+ CSV, plots)",
                       description="Per-layer count, min/max/mean/std, excess kurtosis, 3σ outlier fraction and "
                                   "percentiles of the per-call amax, as scale_* (= amax/2688, full precision) and "
                                   "amax_* fields: the schema of the original scales_summary_*.json.")
    p.add_argument("input", metavar="STORE|SUMMARY|LOG")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json")
    p.add_argument("--csv", metavar="OUT.csv", help="also write the rows as CSV (full-precision floats)")
    p.add_argument("--percentiles", type=_percentiles, default=list(DEFAULT_PERCENTILES), metavar="LIST",
                   help="comma-separated percentiles in [0, 100] (default 50,90,95,99,99.9)")
    p.add_argument("--plots", metavar="DIR", help="write PNG histograms (scale CV, kurtosis, outlier fraction), "
                                                  "a CV ranking and amax-vs-step into DIR")
    p.add_argument("--format", default="nvfp4", metavar="FMT",
                   help="layers of this logged format only; 'all' for every layer (default nvfp4; layers whose "
                        "format was not recorded are always kept)")
    p.add_argument("--mode", default="dynamic", choices=("dynamic", "provided", "all"),
                   help="dynamic: amax statistics; provided: the static scales layers already ran with; "
                        "all: dynamic where recorded, else provided (default dynamic)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_log_options(p)
    p.set_defaults(func=run_summarize)


def run_summarize(args: argparse.Namespace) -> int:
    src = _load(args.input, args)
    for out in (args.output, args.csv):
        if out:
            check_output_path(out, force=args.force, inputs=[args.input])
    if isinstance(src, LegacySummary):
        doc = legacy_summary_document(src, args.percentiles)
        missing = doc["nvfp4_lab"]["interpolated_percentiles"]
        if missing:
            eprint(f"note: {args.input} does not list percentiles {', '.join(f'{p:g}' for p in missing)}; they are "
                   "interpolated between the listed ones (approximate)")
    else:
        doc = store_summary(src, args.percentiles, fmt=args.format, mode=args.mode)
        if doc["nvfp4_lab"]["approximate_layers"]:
            eprint(f"note: {doc['nvfp4_lab']['approximate_layers']} layers come from a scales_summary import; their "
                   "percentiles and outlier fractions are approximate")
    if not doc["layers"]:
        raise CalibrationError(f"{args.input}: no layer with {args.mode} data for format {args.format!r}; try "
                               "--format all or --mode all")
    write_summary(args.output, doc, force=args.force, inputs=[args.input])
    if args.csv:
        write_csv(args.csv, doc, force=args.force, inputs=[args.input])
    eprint(f"wrote {args.output}: {len(doc['layers'])} layers, percentiles "
           f"{', '.join(f'{p:g}' for p in doc['percentiles'])}" + (f"; {args.csv}" if args.csv else ""))
    if args.plots:
        from ..calibration.plots import standard_plots, write_pngs

        paths = write_pngs(standard_plots(src), args.plots)
        eprint(f"wrote {len(paths)} plots into {args.plots}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- merge
def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge calibration stores (exact) from several runs or machines",
                       description="Merge stores (and logs, imported on the fly) into one store. Merging is exact: "
                                   "the result equals recording every run into one store.")
    p.add_argument("inputs", nargs="+", metavar="STORE")
    p.add_argument("-o", "--output", required=True, metavar="OUT")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument("--allow-different-models", action="store_true",
                   help="merge stores recorded on different model files (header hashes differ)")
    _add_log_options(p)
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    check_output_path(args.output, force=args.force, inputs=args.inputs)
    merged: CalibrationStore | None = None
    for path in args.inputs:
        src = _load(path, args)
        if isinstance(src, LegacySummary):
            eprint(f"note: {path} is a scales_summary: merged as an approximate distribution (percentiles only)")
            src = summary_to_store(src)
        merged = src if merged is None else merged.merge(src, allow_different_models=args.allow_different_models)
    assert merged is not None
    out = CalibrationStore()
    out.layers, out.provenance = merged.layers, merged.provenance
    out.add_source("merge", None, inputs=[Path(p).name for p in args.inputs])
    out.save(args.output, overwrite=True)
    calls = sum(st.count for st in out.layers.values())
    eprint(f"wrote {args.output}: {len(args.inputs)} inputs, {len(out.layers)} layers, {calls} calls, "
           f"{out.provenance.get('prompts', 0)} prompts")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- import
def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import an original ComfyUI scale log or scales_summary into a store",
                       description="Logs (plain, .gz, .xz, .bz2; dynamic, provided and legacy 5-field lines) keep "
                                   "every call; a scales_summary has only percentiles, so its layers get an "
                                   "approximate distribution (flagged in the store).")
    p.add_argument("input", metavar="LOG_OR_SUMMARY")
    p.add_argument("-o", "--output", required=True, metavar="STORE")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--force", action="store_true", help="replace an existing STORE")
    g.add_argument("--append", action="store_true", help="add to an existing STORE (locked merge)")
    _add_log_options(p)
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    kind = detect_kind(args.input)
    if kind == "store":
        raise CalibrationError(f"{args.input}: already a calibration store; use `nvfp4 calib merge` to combine stores")
    out = Path(args.output)
    if args.append and out.exists():
        check_output_path(out, force=True, inputs=[args.input])
        store = CalibrationStore.load(out)
    else:
        check_output_path(out, force=args.force, inputs=[args.input])
        store = CalibrationStore()
    if kind == "summary":
        approx = summary_to_store(load_summary(args.input))
        store.update(approx)
        eprint(f"note: {args.input} is a scales_summary: {len(approx.layers)} layers imported with an approximate "
               "distribution rebuilt from min/percentiles/max (count, mean, std and kurtosis exact)")
    else:
        if args.steps is not None and args.steps <= 0:
            raise CalibrationError("--steps must be > 0")
        if args.cfg_passes <= 0:
            raise CalibrationError("--cfg-passes must be > 0")
        _, report = import_log(args.input, fmt=args.log_format, mode=args.log_mode, steps=args.steps,
                               cfg_passes=args.cfg_passes, store=store)
        eprint(report.text())
    if args.append and store.path is not None:
        store.save()
    else:
        store.save(out, overwrite=True)
    eprint(f"wrote {out}: {len(store.layers)} layers")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- scales
def _add_scales(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scales", help="per-layer static input_scale and the share of recorded calls it clips",
                       description="Choose a static NVFP4 input_scale per layer. percentile: amax at P × margin "
                                   "(the original author used 99.9 × 1.08); max: the largest recorded amax × margin; "
                                   "mse: minimizes the expected quantization error of an error model over the "
                                   "recorded amax histogram (see docs/input-scale-methods.md).")
    p.add_argument("input", metavar="STORE|SUMMARY|LOG")
    p.add_argument("--method", choices=METHODS, default="percentile")
    p.add_argument("--percentile", type=float, default=99.9, metavar="P", help="for --method percentile (99.9)")
    p.add_argument("--margin", type=float, default=1.08, metavar="M",
                   help="multiply the chosen scale by M (default 1.08, the original author's recipe)")
    p.add_argument("--model", choices=("outliers", "gaussian"), default=DEFAULT_MODEL,
                   help="error model of --method mse and of the E/dyn column (default outliers)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_log_options(p)
    p.set_defaults(func=run_scales)


def run_scales(args: argparse.Namespace) -> int:
    src = _load(args.input, args)
    choices = select_input_scales(src, args.method, args.percentile, args.margin, model=args.model)
    if not choices:
        raise CalibrationError(f"{args.input}: no layer has recorded finite amax values")
    if args.json:
        print_json(scales_document(choices, method=args.method, percentile=args.percentile, margin=args.margin,
                                   model=args.model))
        return EXIT_OK
    what = {"percentile": f"p{args.percentile:g}", "max": "max", "mse": f"mse[{args.model}]"}[args.method]
    width = max(len("layer"), *(len(n) for n in choices))
    print(f"{'layer':<{width}}  {'calls':>7}  {what + ' amax':>14}  {'input_scale':>13}  {'clip %':>8}  {'E/dyn':>9}")
    for c in choices.values():
        err = f"{c.expected_error:9.6f}" if c.expected_error is not None else f"{'-':>9}"
        flag = " ~" if c.approximate else ""
        print(f"{c.layer:<{width}}  {c.count:>7}  {c.amax:>14.6g}  {c.input_scale:>13.6g}  "
              f"{100 * c.clip_fraction:>8.3f}  {err}{flag}")
    clipping = sum(1 for c in choices.values() if c.clip_fraction > 0)
    mean_clip = sum(c.clip_fraction for c in choices.values()) / len(choices)
    errs = [c.expected_error for c in choices.values() if c.expected_error is not None]
    print(f"{len(choices)} layers, {what} × {args.margin:g}: {clipping} layers clip some recorded calls "
          f"(mean clip {100 * mean_clip:.3f} %)" + (f", worst E/dyn {max(errs):.6f}" if errs else ""))
    print("E/dyn: expected relative error of the error model vs dynamic per-call scaling (1 = no loss); "
          "see docs/input-scale-methods.md")
    if any(c.approximate for c in choices.values()):
        print("~ approximate: clip fraction / E/dyn from a distribution rebuilt from a summary's percentiles")
    return EXIT_OK
