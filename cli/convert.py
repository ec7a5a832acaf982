"""`nvfp4 convert SRC OUT`: plan (or load a plan) and write a ComfyUI-loadable mixed-precision checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..calibration.budget import parse_budget
from ..quant.checkpoint import open_checkpoint
from ..quant.convert import QUANT_DTYPES, ConvertReport, convert
from ..quant.errors import NVFP4Error, PlanError
from ..quant.plan import Plan
from ..quant.rules import build_plan
from .common import eprint, human_bytes
from .plan import add_plan_options, plan_options_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a model to a mixed-precision NVFP4 checkpoint",
        description="Convert SRC (a .safetensors file, a sharded *.index.json, or a folder) to one .safetensors "
                    "file that stock ComfyUI loads with UNETLoader. Without --plan the plan is built from the "
                    "options below (default: the auto-detected preset). Streams one tensor at a time.")
    p.add_argument("source", help="source model: .safetensors, *.safetensors.index.json or a folder")
    p.add_argument("output", help="output .safetensors file (never overwritten without --force)")
    p.add_argument("--plan", metavar="PLAN.json",
                   help="use a saved plan (from `nvfp4 plan`); cannot be combined with the rule options below")
    p.add_argument("--device", default="cpu", help="where to quantize: cpu (default) or cuda[:N]")
    p.add_argument("--quant-dtype", choices=sorted(QUANT_DTYPES), default="source",
                   help="cast weights to this dtype before quantizing (default: as stored, byte-identical to "
                        "quantizing that tensor in ComfyUI)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--dry-run", "-n", action="store_true", help="print the plan and the estimated size; write nothing")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading and checking the written file")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no per-layer error table")
    p.add_argument("--shard-size", metavar="SIZE",
                   help="write shards of at most SIZE (e.g. 5GB, 4GiB; a layer is never split), each a complete "
                        "self-describing .safetensors, plus OUTPUT's .safetensors.index.json. Load Model (NVFP4) "
                        "reads sharded models; stock UNETLoader needs a single file (the default)")
    add_plan_options(p)
    p.set_defaults(func=run)


def shard_size(text: str) -> int:
    """Bytes of a --shard-size value (the same units as --budget, without bits per weight)."""
    size = parse_budget(text)
    if size.kind != "bytes":
        raise NVFP4Error(f"--shard-size {text!r} must be a size such as 5GB or 4GiB")
    return int(size.value)


def _rule_options_given(args: argparse.Namespace) -> list[str]:
    """The planning options (as flags) set to a non-default value: with --plan they would be silently ignored."""
    probe = argparse.ArgumentParser(add_help=False)
    add_plan_options(probe)
    given = []
    for action in probe._actions:
        if action.dest in vars(args) and getattr(args, action.dest) != action.default and action.option_strings:
            flag = next(o for o in action.option_strings if o.startswith("--"))
            if action.dest == "w4a16_shortcuts":
                flag = "the W4A16 shortcut flags"
            if flag not in given:
                given.append(flag)
    return given


def run(args: argparse.Namespace) -> int:
    if args.plan:
        given = _rule_options_given(args)
        if given:
            raise PlanError(f"--plan takes every decision from {args.plan}; {', '.join(given)} would be ignored: "
                            "drop them, or edit the plan / re-create it with `nvfp4 plan`")
    with open_checkpoint(args.source) as ckpt:
        if args.plan:
            plan = Plan.load(args.plan)
            plan.check_against(ckpt)
        else:
            plan = build_plan(ckpt, plan_options_from_args(args, ckpt))
    print(plan.table(layers=args.dry_run))
    if args.dry_run:
        return 0
    report = convert(args.source, args.output, plan, device=args.device, force=args.force,
                     shard_bytes=shard_size(args.shard_size) if args.shard_size else None,
                     verify=not args.no_verify, progress=not args.quiet, quant_dtype=args.quant_dtype)
    print_report(report, quiet=args.quiet)
    return 0


def print_report(report: ConvertReport, *, quiet: bool = False, worst: int = 15) -> None:
    """The closing summary: sizes, time, verification, and the layers whose weights lost the most."""
    ratio = report.output_bytes / report.input_bytes if report.input_bytes else 0.0
    print(f"\nwrote {report.output} ({human_bytes(report.output_bytes)}, {ratio:.1%} of "
          f"{human_bytes(report.input_bytes)}) in {report.seconds:.1f} s"
          f"{'; verified' if report.verified else ''}")
    for note in report.notes:
        eprint(f"note: {note}")
    if not quiet:
        print(f"\nweight error of the quantized layers (worst {worst}):")
        print(report.error_table(limit=worst))
    print(f"\nload it in ComfyUI: put {Path(report.output).name} in ComfyUI/models/diffusion_models/ and use "
          "'Load Diffusion Model' (UNETLoader) or 'Load Model (NVFP4)'.")
