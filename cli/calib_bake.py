"""`nvfp4 calib bake`: write calibrated input scales into an existing NVFP4/FP8 checkpoint.

Registered into `nvfp4 calib` by cli/calib.py (CALIB_EXTENSIONS) through `register_calib`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..calibration.legacy import load_any
from ..calibration.scale_selection import METHODS, select_input_scales
from ..quant.bake import bake_input_scales
from .common import eprint


def register_calib(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bake", help="write calibrated input_scales into an NVFP4/FP8 checkpoint",
        description="Copy CHECKPOINT to -o OUT with a static input_scale on every NVFP4 (W4A4) and FP8 layer the "
                    "calibration covers; every other tensor keeps its bytes. Layers the calibration names but the "
                    "file lacks, and W4A4 layers without calibration, are reported.")
    p.add_argument("checkpoint", help="an NVFP4 checkpoint (ours or third-party), single .safetensors")
    p.add_argument("calibration", help="a calibration store (.json from Calibrate (NVFP4) / calib import), an "
                                       "original scales_summary JSON, or an ops.py scale log")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (never the input)")
    p.add_argument("--method", choices=METHODS, default="percentile", help="input-scale method (default percentile)")
    p.add_argument("--percentile", type=float, default=99.9, help="percentile for --method percentile (default 99.9)")
    p.add_argument("--margin", type=float, default=1.08,
                   help="multiply the chosen amax by this headroom factor (default 1.08, the original recipe)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    calibration = load_any(args.calibration)
    choices = select_input_scales(calibration, method=args.method, percentile=args.percentile, margin=args.margin)
    amax = {layer: choice.threshold for layer, choice in choices.items()}
    provenance = {"calibration": Path(args.calibration).name, "method": args.method,
                  "percentile": args.percentile, "margin": args.margin}
    report = bake_input_scales(args.checkpoint, args.output, amax, force=args.force, provenance=provenance)
    print(report.summary())
    clipping = sorted(choices.values(), key=lambda c: -c.clip_fraction)[:5]
    if clipping and clipping[0].clip_fraction > 0:
        eprint("most clipped layers (share of recorded calls above the scale): "
               + ", ".join(f"{c.layer} {c.clip_fraction:.2%}" for c in clipping if c.clip_fraction > 0))
    return 0
