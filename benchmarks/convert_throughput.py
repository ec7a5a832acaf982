"""Whole-model conversion: time and peak memory of our streaming converter against baselines, same run, same file.

Baselines (each in a fresh process, peak RSS from VmHWM):
  raw_io           safetensors.torch.load_file + save_file of the unchanged model: pure library I/O, whole model
                   in RAM (the floor for time, the ceiling for memory)
  original_method  what the original convert_nvfp4.py does (reference/original-scripts.md §2.3, C1): load the whole
                   source, quantize every planned layer into an output dict, one save_file at the end. Re-implemented
                   with our quantizer so that only the I/O strategy differs.
  ours_<device>    quant.convert.convert: streaming, bounded memory, verification on

    python benchmarks/convert_throughput.py --blocks 30 --dim 3072 --ffn 14336 --devices cpu,cuda --json out.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import textwrap
import time
from pathlib import Path

import safetensors.torch
import torch
from common import machine, run_measured, write_results


def make_model(path: Path, blocks: int, dim: int, ffn: int) -> int:
    """A Wan-shaped bf16 model (self/cross attention + FFN per block), written one block at a time."""
    from nvfp4_lab.quant.safetensors_io import SafetensorsWriter

    shapes: list[tuple[str, tuple[int, ...]]] = []
    for b in range(blocks):
        for att in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes += [(f"blocks.{b}.{att}.{p}.weight", (dim, dim)), (f"blocks.{b}.{att}.{p}.bias", (dim,))]
        shapes += [(f"blocks.{b}.ffn.0.weight", (ffn, dim)), (f"blocks.{b}.ffn.0.bias", (ffn,)),
                   (f"blocks.{b}.ffn.2.weight", (dim, ffn)), (f"blocks.{b}.ffn.2.bias", (dim,))]
    g = torch.Generator().manual_seed(0)
    specs = [(n, torch.bfloat16, s) for n, s in shapes]
    with SafetensorsWriter(path, specs, {"format": "pt"}) as w:
        for n, s in shapes:
            w.write(n, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16))
    return path.stat().st_size


PLAN = """
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.rules import PlanOptions, build_plan
with open_checkpoint(SRC) as ck:
    plan = build_plan(ck, PlanOptions(preset="generic", mode="all", keep_first=0, keep_last=0))
"""

METHODS = {
    "raw_io": """
import safetensors.torch
sd = safetensors.torch.load_file(SRC)
safetensors.torch.save_file(sd, OUT)
""",
    "original_method": PLAN + """
import safetensors.torch, torch
from nvfp4_lab.quant import formats, nvfp4
sd = safetensors.torch.load_file(SRC)
out = {}
for name, t in sd.items():
    layer = name[:-len(".weight")] if name.endswith(".weight") else None
    if layer in plan.layers and plan.layers[layer].format == "nvfp4":
        q = nvfp4.quantize(t.to(DEVICE), name=name)
        out[name], out[layer + ".weight_scale"] = q.qdata.cpu(), q.block_scale.cpu()
        out[layer + ".weight_scale_2"] = q.tensor_scale.cpu()
        out[layer + ".comfy_quant"] = formats.encode_comfy_quant({"format": "nvfp4"})
    else:
        out[name] = t
safetensors.torch.save_file(out, OUT)
""",
    "ours": PLAN + """
from nvfp4_lab.quant.convert import convert
convert(SRC, OUT, plan, device=DEVICE, progress=False)
""",
    # the same without the per-layer error measurement and the verification pass: what they cost
    "ours_unchecked": PLAN + """
from nvfp4_lab.quant.convert import convert
convert(SRC, OUT, plan, device=DEVICE, progress=False, measure=False, verify=False)
""",
}


def measure(method: str, src: Path, out: Path, device: str) -> dict:
    if out.exists():
        out.unlink()
    # Imports first, then the resident size they cost (~0.7 GB for a CUDA torch) is subtracted from the peak.
    header = (f"SRC, OUT, DEVICE = {str(src)!r}, {str(out)!r}, {device!r}\n"
              "import time as _t, torch, safetensors.torch\nimport nvfp4_lab.quant.convert, nvfp4_lab.quant.rules\n"
              "if DEVICE.startswith('cuda'): torch.zeros(1, device=DEVICE)\n"
              "with open('/proc/self/status') as _f:\n"
              "    _base = next(int(l.split()[1]) * 1024 for l in _f if l.startswith('VmRSS'))\n"
              "_t0 = _t.perf_counter()\n")
    footer = "\nimport json as _j\nprint(_j.dumps({'seconds': _t.perf_counter() - _t0, 'base_rss': _base}))\n"
    res = run_measured(header + textwrap.dedent(METHODS[method]) + footer)
    res["output_bytes"] = out.stat().st_size
    res["peak_rss_above_imports"] = res["peak_rss"] - res["base_rss"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nvfp4_bench_"))
    src = work / "model_bf16.safetensors"
    t0 = time.perf_counter()
    size = make_model(src, args.blocks, args.dim, args.ffn)
    results = {"benchmark": "convert_throughput", "machine": machine(), "model_bytes": size,
               "model_shape": {"blocks": args.blocks, "dim": args.dim, "ffn": args.ffn},
               "make_model_s": time.perf_counter() - t0, "runs": {}}
    out = work / "out.safetensors"
    devices = args.devices.split(",")
    for method, device in [("raw_io", "cpu")] + [(m, d) for d in devices for m in ("original_method", "ours", "ours_unchecked")]:
        key = method if method == "raw_io" else f"{method}_{device}"
        results["runs"][key] = measure(method, src, out, device)
        print(key, results["runs"][key], flush=True)
    base = results["runs"]["raw_io"]
    for run in results["runs"].values():
        run["time_vs_raw_io"] = run["seconds"] / base["seconds"]
        run["extra_rss_vs_model"] = run["peak_rss_above_imports"] / size
    write_results(args.json, results)
    for f in (src, out):
        f.unlink(missing_ok=True)
    if not args.workdir:
        os.rmdir(work)


if __name__ == "__main__":
    main()
