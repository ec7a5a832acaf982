"""`nvfp4 calib run`: run a calibration workflow on a running ComfyUI once per prompt × seed.

Registered into `nvfp4 calib` by cli/calib.py (CALIB_EXTENSIONS) through `register_calib`.
"""

from __future__ import annotations

import argparse

from ..calibration.batch import DEFAULT_SERVER, load_api_workflow, read_prompts, run_batch
from .common import EXIT_OK, eprint

EPILOG = """\
The workflow must be saved in API format (ComfyUI: Workflow > Export (API)) and contain Calibrate (NVFP4).
Each prompt line replaces the text of the positive CLIPTextEncode (or --prompt-node/--prompt-input); every literal
seed / noise_seed input is set to its workflow value + i for i < --seeds. Prompts run one at a time; the first
failure stops the batch with the node's error; Ctrl-C interrupts the prompt in flight.

Workflows without a text encoder (e.g. the tiny test models) can vary any widget instead: the line is converted to
that input's type, e.g. --prompt-node 5 --prompt-input cfg with lines 2.0, 3.5, 5.0.

examples:
  nvfp4 calib run calibrate_api.json --prompts prompts.txt --seeds 2
  nvfp4 calib run calibrate_api.json --prompts prompts.txt --server http://192.168.1.20:8188 --prompt-node 6
  nvfp4 calib run tiny_api.json --prompts cfgs.txt --prompt-node 5 --prompt-input cfg
"""


def register_calib(sub: argparse._SubParsersAction) -> None:
    """Add `calib run` to the `calib` subparsers."""
    p = sub.add_parser("run", help="submit a calibration workflow to a running ComfyUI per prompt × seed",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workflow", metavar="WORKFLOW_API.json", help="API-format workflow containing Calibrate (NVFP4)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="one prompt per line (blank lines and '#' comments skipped)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per prompt (default 1)")
    p.add_argument("--server", default=DEFAULT_SERVER, metavar="URL", help=f"ComfyUI address (default {DEFAULT_SERVER})")
    p.add_argument("--prompt-node", metavar="ID", help="node id whose input each prompt line replaces")
    p.add_argument("--prompt-input", metavar="NAME",
                   help="input of --prompt-node to replace (default: text); the line is converted to its type")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds to wait for each prompt (default 600)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run_calib_run)


def run_calib_run(args: argparse.Namespace) -> int:
    workflow = load_api_workflow(args.workflow)
    prompts = read_prompts(args.prompts)
    result = run_batch(workflow, prompts, seeds=args.seeds, server=args.server, prompt_node=args.prompt_node,
                       prompt_input=args.prompt_input, timeout=args.timeout, progress=args.progress)
    print(f"{result.completed} prompt(s) recorded ({len(prompts)} prompt line(s) × {args.seeds} seed(s))")
    for s in result.sessions:
        print(f"calibration session: {s}")
    if not result.sessions:
        eprint("note: ComfyUI did not report the session file; look in <ComfyUI output>/nvfp4_calibration/")
    return EXIT_OK
