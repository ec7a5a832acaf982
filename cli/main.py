"""`nvfp4` entry point: one argparse subcommand per module `cli/<name>.py` listed in COMMANDS.

Each command module exposes `register(subparsers) -> None`, which adds its parser and sets `func` (called with the
parsed namespace, returns an exit code or None). To add a command, write `cli/<name>.py` and append its name here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from .common import EXIT_OK, EXIT_USAGE, add_debug_argument, run_command

COMMANDS: tuple[str, ...] = ("layers", "plan", "convert", "demo", "probe", "calib")


def build_parser() -> argparse.ArgumentParser:
    """The full `nvfp4` parser with every registered subcommand (each also accepts --debug)."""
    parser = argparse.ArgumentParser(
        prog="nvfp4",
        description="NVFP4 Lab: inspect, plan, calibrate and write mixed-precision NVFP4 checkpoints for ComfyUI.",
    )
    parser.add_argument("--version", action="version", version=f"nvfp4 {__version__}")
    add_debug_argument(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".{name}", __package__)
        module.register(subparsers)
    for sub in subparsers.choices.values():
        add_debug_argument(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `nvfp4` with `argv` (default sys.argv[1:]); returns the exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        parser.print_help()
        return EXIT_OK
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_OK
    return run_command(func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
