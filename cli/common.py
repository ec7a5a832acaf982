"""Helpers shared by every `nvfp4` subcommand: error handling, human sizes, progress bars, output.

Error policy (docs/DESIGN.md): a user error (`NVFP4Error`, a missing file, a permission problem, ...) prints one line
`error: <message>` on stderr and exits 1; argparse usage errors exit 2; a traceback appears only with `--debug`.
Anything else is a bug: it shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from ..quant.errors import NVFP4Error
from ..quant.inspect import human_bytes, human_count

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_debug_argument",
    "eprint",
    "human_bytes",
    "human_count",
    "print_json",
    "progress",
    "run_command",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Exceptions whose message is meaningful to a user on its own (no traceback needed).
USER_ERRORS: tuple[type[BaseException], ...] = (NVFP4Error, OSError)


def eprint(*args: Any) -> None:
    """Print to stderr (notes, warnings, errors) so stdout stays clean for tables and JSON."""
    print(*args, file=sys.stderr)


def add_debug_argument(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """Add `--debug` (show tracebacks). On subparsers the default is suppressed so the top-level value survives."""
    if any("--debug" in a.option_strings for a in parser._actions):
        return
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="show the full traceback on errors",
    )


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}"
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand's `func(args)` and map exceptions to exit codes and one-line messages."""
    debug = bool(getattr(args, "debug", False))
    try:
        rc = func(args)
        return EXIT_OK if rc is None else int(rc)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        eprint("error: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (`nvfp4 layers x | head`): not an error. Silence the flush at exit too.
        try:
            sys.stdout = open("/dev/null", "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_OK
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        eprint(f"error: {_one_line(exc)}")
        return EXIT_FAILURE
    except Exception as exc:  # a bug: keep the traceback
        traceback.print_exc()
        eprint(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); please report it with the "
               "traceback above")
        return EXIT_FAILURE


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", enabled: bool | None = None, **kwargs: Any):
    """A tqdm progress bar on stderr; disabled when stderr is not a TTY unless `enabled=True`."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, **kwargs)


def print_json(obj: Any) -> None:
    """Print standard JSON (no NaN/Infinity) to stdout; a list prints one element per line."""
    if isinstance(obj, list) and obj:
        items = ",\n".join("  " + json.dumps(x, allow_nan=False) for x in obj)
        print(f"[\n{items}\n]")
    else:
        print(json.dumps(obj, indent=2, allow_nan=False))
