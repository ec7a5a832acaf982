"""`nvfp4 plan SRC -o PLAN.json`: decide a format for every Linear layer and save the plan (nothing is converted).

The option group built by `add_plan_options` is shared with `nvfp4 convert`, so every rule you can test here is
exactly what a conversion will use. Rule precedence is documented in `quant/rules.py` and docs/flag-mapping.md;
each layer's `reason` in the plan shows which rule decided it.
"""

from __future__ import annotations

import argparse
import sys

from ..quant.errors import PlanError
from ..quant.input_scales import METHODS, InputScaleOptions
from ..quant.plan import OTHER_DTYPES
from ..quant.rules import MODES, W4A16_SHORTCUTS, PlanOptions
from .common import eprint

EPILOG = """\
precedence (later wins; never_quantize always wins):
  never_quantize > [base: --gguf | --mode all | preset] < min size < --keep-first/--keep-last < --min-ffn-fp8 /
  --min-ffn2-keep < --exclude < --include < --fp8 < --keep-high-variance < --sensitivity-threshold /
  --clip-rate-threshold < W4A16 flags < input scales < --budget
regexes: re.search, case-insensitive, on bare layer names (blocks.3.ffn.0); a regex matching no Linear layer is an
error unless --allow-unmatched. Original convert_nvfp4.py flag names are accepted as aliases (docs/flag-mapping.md).

examples:
  nvfp4 plan wan.safetensors -o plan.json --print
  nvfp4 plan wan.safetensors --dry-run --mode all -x 'head' --keep-first 2 --keep-last 2
  nvfp4 plan wan5b.safetensors.index.json -o plan.json --gguf Wan2.2-TI2V-5B-Q5_K_M.gguf --gguf-max-bits 5 \\
      --gguf-keep-edge-blocks --other-dtype fp16 --input-scale-summary scales_summary_wan22_5b.json \\
      --input-scale-percentile 99.9 --input-scale-margin 1.08 --w4a16-file sensitive_layers_wan22_5b.txt \\
      --w4a16-cross-attn-qkvo
"""

_SHORTCUT_FLAGS = {
    "cross-attn-kv": ("--w4a16-cross-attn-kv", "--full-precision-mm-cross-attn-kv"),
    "cross-attn-qkvo": ("--w4a16-cross-attn-qkvo", "--full-precision-mm-cross-attn-qkvo"),
    "self-attn-qkvo": ("--w4a16-self-attn-qkvo", "--full-precision-mm-self-attn-qkvo"),
    "ffn-up": ("--w4a16-ffn-up", "--full-precision-mm-ffn-up"),
    "ffn-down": ("--w4a16-ffn-down", "--full-precision-mm-ffn-down"),
}


def _other_dtype(value: str) -> str:
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    value = aliases.get(value.lower(), value.lower())
    if value not in OTHER_DTYPES:
        raise argparse.ArgumentTypeError(f"invalid dtype {value!r}; choose from {', '.join(OTHER_DTYPES)}")
    return value


def _action(value: str) -> str:
    aliases = {"fp16": "keep", "full_precision_mm": "w4a16", "keep": "keep", "w4a16": "w4a16"}
    if value not in aliases:
        raise argparse.ArgumentTypeError(f"invalid action {value!r}; choose keep or w4a16")
    return aliases[value]


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """Add every planning option (rules, W4A16, GGUF, input scales, hooks) to `parser`; shared with `convert`."""
    g = parser.add_argument_group("layer selection")
    g.add_argument("--preset", "-p", default="auto", metavar="NAME",
                   help="rule preset (default: auto = the preset of the detected architecture; 'none' = no preset)")
    g.add_argument("--mode", "-m", choices=MODES, default="preset",
                   help="preset: preset rules decide; all: every Linear layer nvfp4 except never_quantize")
    g.add_argument("--include", "-i", action="append", default=[], metavar="RE",
                   help="layers matching RE -> nvfp4 (beats exclude, edge blocks, GGUF and preset keeps)")
    g.add_argument("--exclude", "-x", action="append", default=[], metavar="RE", help="layers matching RE -> keep")
    g.add_argument("--fp8", action="append", default=[], metavar="RE", help="layers matching RE -> fp8 (beats include)")
    g.add_argument("--use-fp8", "-F", dest="fp8_instead_of_keep", action="store_true",
                   help="preset fp8 candidates and GGUF types above --gguf-max-bits become fp8 instead of kept")
    g.add_argument("--min-ffn-fp8", action="store_true", help="nvfp4 FFN up/down projections -> fp8")
    g.add_argument("--min-ffn2-keep", "--min-ffn2-fp16", dest="min_ffn2_keep", action="store_true",
                   help="quantized FFN down projections -> keep")
    g.add_argument("--keep-first", type=int, metavar="N",
                   help="keep the first N blocks of every block group (replaces the preset's value; 0 = none)")
    g.add_argument("--keep-last", type=int, metavar="N", help="keep the last N blocks of every block group")
    g.add_argument("--min-params", type=int, default=0, metavar="N", help="keep layers with fewer than N parameters")
    g.add_argument("--min-dim", type=int, default=0, metavar="N", help="keep layers with a dimension below N")
    g.add_argument("--other-dtype", type=_other_dtype, default="keep", metavar="DTYPE",
                   help="dtype of kept layers and every other float tensor: keep (source dtype), bf16, fp16, fp32")
    g.add_argument("--allow-unmatched", action="store_true",
                   help="report (instead of refusing) regexes/list names/data that match nothing in the model")
    g.add_argument("--glued", choices=("split", "error"), default="split",
                   help="list lines that are several names glued together: split them (with a note) or refuse")

    w = parser.add_argument_group("W4A16 (NVFP4 weights, activations in full precision; nvfp4 layers only)")
    w.add_argument("--w4a16", "--full-precision-mm-pattern", dest="w4a16", action="append", default=[], metavar="RE",
                   help="nvfp4 layers matching RE -> nvfp4-w4a16")
    w.add_argument("--w4a16-file", "--full-precision-mm-layers", dest="w4a16_files", action="append", default=[],
                   metavar="PATH", help="file with one layer name per line (# comments); names are validated")
    w.add_argument("--w4a16-all", "--full-precision-mm", dest="w4a16_all", action="store_true",
                   help="every nvfp4 layer -> nvfp4-w4a16")
    for short, flags in _SHORTCUT_FLAGS.items():
        w.add_argument(*flags, dest="w4a16_shortcuts", action="append_const", const=short,
                       help=f"nvfp4 layers matching /{W4A16_SHORTCUTS[short]}/ -> nvfp4-w4a16")

    gg = parser.add_argument_group("GGUF-guided selection")
    gg.add_argument("--gguf", "-g", metavar="PATH", help="copy the precision choices of a GGUF quant of the same model")
    gg.add_argument("--gguf-max-bits", "--gguf-nvfp4-max-bitdepth", dest="gguf_max_bits", type=int, default=4,
                    metavar="N", help="GGUF Q<n> with n <= N -> nvfp4 (default 4)")
    gg.add_argument("--gguf-keep-edge-blocks", "--gguf-keep-edge-blocks-fp16", dest="gguf_keep_edge_blocks",
                    action="store_true", help="keep the first and last 2 blocks of every block group")

    s = parser.add_argument_group("input scales (static activation scale of W4A4 layers)")
    s.add_argument("--no-input-scale", action="store_true", help="no static scale: dynamic amax/2688 per call")
    s.add_argument("--input-scale-from", metavar="PATH", help="copy input_scale from a reference NVFP4/FP8 checkpoint")
    s.add_argument("--input-scale-summary", "--input-scale-summary-json", dest="input_scale_summary", metavar="PATH",
                   help="calibration store or original scales_summary JSON")
    s.add_argument("--input-scale-method", choices=METHODS, default="percentile",
                   help="how calibration data becomes a scale (default percentile)")
    s.add_argument("--input-scale-percentile", "--input-scale-summary-percentile", dest="input_scale_percentile",
                   type=float, default=99.9, metavar="P", help="percentile of the per-call amax (default 99.9)")
    s.add_argument("--input-scale-margin", "--input-scale-summary-multiplier", dest="input_scale_margin", type=float,
                   default=1.0, metavar="M", help="multiply the chosen scale by M (> 0; the author used 1.08)")
    s.add_argument("--input-scale-value", type=float, metavar="F",
                   help="fixed scale (> 0) for nvfp4 layers no other source covers")
    s.add_argument("--fp8-input-scale", action="store_true",
                   help="fp8 layers get input_scale = amax/448 from the calibration (else ComfyUI uses 1.0)")

    s.add_argument("--keep-high-variance", "--input-scale-summary-fp16-std", dest="keep_high_variance",
                   action="store_true", help="keep calibrated layers whose per-call scale spreads widely")
    s.add_argument("--variance-std-threshold", "--input-scale-summary-std-threshold", dest="variance_std_threshold",
                   type=float, metavar="F", help="scale std threshold (default: 90th percentile of the layers' stds)")
    s.add_argument("--variance-cv-threshold", "--input-scale-summary-cv-threshold", dest="variance_cv_threshold",
                   type=float, default=0.4, metavar="F", help="scale std/mean threshold (default 0.4)")

    h = parser.add_argument_group("sensitivity report (`nvfp4 probe`) and budget")
    h.add_argument("--sensitivity", "--sensitivity-json", dest="sensitivity", metavar="REPORT",
                   help="sensitivity report: used by --budget or by the thresholds below")
    h.add_argument("--sensitivity-threshold", type=float, metavar="F",
                   help="quantized layers whose measured output rel_rmse exceeds F -> --sensitivity-action")
    h.add_argument("--sensitivity-action", type=_action, default="keep", metavar="{keep,w4a16}",
                   help="keep (original: fp16) or w4a16 (original: full_precision_mm); default keep")
    h.add_argument("--clip-rate-threshold", type=float, metavar="F",
                   help="quantized layers whose activation clip rate exceeds F -> --clip-rate-action")
    h.add_argument("--clip-rate-action", type=_action, default="keep", metavar="{keep,w4a16}",
                   help="keep or w4a16 (default keep)")
    h.add_argument("--budget", metavar="SPEC",
                   help="file size (9.5GB, 850MiB) or bits per weight (4.8bpw): the budget planner re-decides the "
                        "quantized layers from the sensitivity report")


def plan_options_from_args(args: argparse.Namespace, ckpt: object = None) -> PlanOptions:
    """PlanOptions from a namespace parsed with add_plan_options (validation happens in build_plan).

    `ckpt` is accepted for callers that pass the opened source; options do not depend on it."""
    scales = InputScaleOptions(
        none=bool(args.no_input_scale), value=args.input_scale_value, reference=args.input_scale_from,
        calibration=args.input_scale_summary, method=args.input_scale_method,
        percentile=args.input_scale_percentile, margin=args.input_scale_margin, fp8=bool(args.fp8_input_scale))
    shortcuts: list[str] = []
    for s in args.w4a16_shortcuts or []:
        if s not in shortcuts:
            shortcuts.append(s)
    return PlanOptions(
        preset=args.preset, mode=args.mode, include=list(args.include), exclude=list(args.exclude),
        fp8=list(args.fp8), w4a16=list(args.w4a16), w4a16_files=list(args.w4a16_files), w4a16_shortcuts=shortcuts,
        w4a16_all=bool(args.w4a16_all), keep_first=args.keep_first, keep_last=args.keep_last,
        min_params=args.min_params, min_dim=args.min_dim, min_ffn_fp8=bool(args.min_ffn_fp8),
        min_ffn2_keep=bool(args.min_ffn2_keep), other_dtype=args.other_dtype, gguf=args.gguf,
        gguf_max_bits=args.gguf_max_bits, gguf_keep_edge_blocks=bool(args.gguf_keep_edge_blocks),
        fp8_instead_of_keep=bool(args.fp8_instead_of_keep), input_scale=scales,
        allow_unmatched=bool(args.allow_unmatched), glued=args.glued,
        keep_high_variance=bool(args.keep_high_variance), variance_std_threshold=args.variance_std_threshold,
        variance_cv_threshold=args.variance_cv_threshold, sensitivity=args.sensitivity,
        sensitivity_threshold=args.sensitivity_threshold, sensitivity_action=args.sensitivity_action,
        clip_rate_threshold=args.clip_rate_threshold, clip_rate_action=args.clip_rate_action, budget=args.budget)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plan` subcommand."""
    p = subparsers.add_parser(
        "plan",
        help="decide a format per Linear layer (nvfp4 / nvfp4-w4a16 / fp8 / keep) and save the plan as JSON",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="model: .safetensors, *.safetensors.index.json or a model folder")
    p.add_argument("--output", "-o", metavar="PLAN.json", help="where to save the plan ('-' = print the JSON)")
    p.add_argument("--dry-run", "-n", action="store_true", help="do not save; print the summary (with --print: all)")
    p.add_argument("--print", dest="print_table", action="store_true", help="print one row per layer with its reason")
    p.add_argument("--force", action="store_true", help="overwrite an existing plan file")
    add_plan_options(p)
    p.add_argument("--budget-curve", metavar="PNG", help="with --budget: also write the size vs predicted-error "
                   "trade-off curve as PNG (its points are in the plan's report.budget.curve)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the plan, print it, save it."""
    from ..quant.checkpoint import open_checkpoint
    from ..quant.rules import build_plan

    if not args.output and not args.dry_run:
        raise PlanError("give -o PLAN.json to save the plan, or --dry-run to only print it")
    if getattr(args, "budget_curve", None) and (not args.budget or args.dry_run or args.output == "-"):
        raise PlanError("--budget-curve needs --budget (and --sensitivity) and a plan saved with -o PLAN.json")
    options = plan_options_from_args(args)
    with open_checkpoint(args.source) as ckpt:
        plan = build_plan(ckpt, options)
    out = sys.stdout if args.output != "-" else sys.stderr
    print(plan.table(layers=bool(args.print_table)), file=out)
    if args.dry_run:
        return 0
    if args.output == "-":
        sys.stdout.write(plan.to_json())
        return 0
    inputs = [args.source] + list(options.w4a16_files) + [x for x in (options.gguf,) if x]
    path = plan.save(args.output, force=args.force, inputs=inputs)
    eprint(f"saved plan: {path}")
    if getattr(args, "budget_curve", None):
        from ..calibration.budget import curve_from_plan
        curve = curve_from_plan(plan)
        if curve is None:
            raise PlanError("--budget-curve needs --budget (and --sensitivity)")
        eprint(f"saved trade-off curve: {curve.save_png(args.budget_curve, force=args.force)}")
    return 0
