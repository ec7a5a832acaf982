"""Helpers shared by the benchmark scripts: timing with warm-up, peak memory of a fresh process, JSON output.

Benchmarks report ratios against a baseline measured in the same run (see benchmarks/README.md), never absolute
numbers alone, and are never run as unit tests.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str = "cpu", *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of `fn` in seconds (device synchronized around every call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_measured(code: str) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON object last. Adds its peak RSS (VmHWM).

    A fresh process per measurement, because a process's peak memory can't be reset (and Linux carries a parent's
    peak into ru_maxrss across exec, so VmHWM is read instead)."""
    wrapper = code + "\nimport json as _j\nwith open('/proc/self/status') as _f:\n" \
        "    _hwm = next(int(l.split()[1]) * 1024 for l in _f if l.startswith('VmHWM'))\n" \
        "print(_j.dumps({'peak_rss': _hwm}))\n"
    res = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{res.stderr[-3000:]}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    out: dict = {}
    for obj in lines:
        out.update(obj)
    return out


def write_results(path: str | Path | None, results: dict) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
