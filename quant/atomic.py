"""Atomic output files: write to a temp file beside the target, rename on success, delete on failure.

Why: a crash or Ctrl-C must never leave a half-written checkpoint that ComfyUI would list and fail to load, and an
input file must never be overwritten by its own output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import CheckpointError


def check_output_path(output: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an output that is one of the inputs, or that exists without `force`; return it as a Path."""
    out = Path(output)
    for inp in inputs:
        inp = Path(inp)
        if inp.exists() and out.exists() and os.path.samefile(out, inp):
            raise CheckpointError(f"{out}: output is the same file as input {inp}; choose another output path")
        if out.resolve() == inp.resolve():
            raise CheckpointError(f"{out}: output is the same file as input {inp}; choose another output path")
    if out.exists() and not force:
        raise CheckpointError(f"{out} already exists; pass --force (or overwrite=True) to replace it")
    if out.exists() and out.is_dir():
        raise CheckpointError(f"{out} is a directory; give a file path")
    if not out.parent.exists():
        raise CheckpointError(f"{out.parent} does not exist; create the folder first")
    return out


@contextlib.contextmanager
def atomic_output(output: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temp path in the output's folder; on success fsync and rename it to `output`, else delete it."""
    out = check_output_path(output, force=force, inputs=inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
