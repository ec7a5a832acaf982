"""`nvfp4 demo`: build a tiny model ComfyUI detects, plan it, convert it, show what it cost. No downloads."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..quant.checkpoint import open_checkpoint
from ..quant.convert import convert
from ..quant.rules import PlanOptions, build_plan
from ..quant.tiny_models import write_tiny_model
from .convert import print_report

# Enough blocks that the preset's protected first/last blocks leave real layers to quantize.
DEMO_MODELS = {
    "flux": {"depth": 4, "depth_single": 6, "hidden": 256},
    "wan": {"num_layers": 6, "dim": 256, "ffn_dim": 512},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="convert a tiny built-in model end to end (no downloads)",
        description="Builds a tiny random Flux- or Wan-shaped model that stock ComfyUI detects, plans it with the "
                    "auto-detected preset, converts it to mixed NVFP4, and prints the plan, the size saving and the "
                    "measured per-layer weight error.")
    p.add_argument("--model", choices=sorted(DEMO_MODELS), default="flux", help="which tiny model (default flux)")
    p.add_argument("--out", default="nvfp4-demo", help="folder for the demo files (default ./nvfp4-demo)")
    p.add_argument("--force", action="store_true", help="rebuild the tiny model too (a re-run reuses it and "
                   "replaces the demo's plan and converted file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = out / f"tiny_{args.model}_bf16.safetensors"
    target = out / f"tiny_{args.model}_nvfp4.safetensors"
    # A re-run reuses the tiny model and replaces what the demo derived from it (its plan and converted file), so
    # the README's run command works every time.
    reuse = source.exists() and not args.force
    if reuse:
        print(f"using the tiny model from an earlier run: {source}")
    else:
        write_tiny_model(args.model, source, **DEMO_MODELS[args.model])
        print(f"built a tiny {args.model} model: {source}")
    with open_checkpoint(source) as ckpt:
        plan = build_plan(ckpt, PlanOptions())
    plan.save(out / f"tiny_{args.model}_plan.json", force=args.force or reuse)
    print()
    print(plan.table())
    report = convert(source, target, plan, force=args.force or reuse)
    print_report(report, worst=10)
    return 0
