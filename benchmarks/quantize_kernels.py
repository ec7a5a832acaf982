"""NVFP4 weight quantization: our implementation vs comfy-kitchen, speed and byte identity, CPU and CUDA.

Baseline in the same run: comfy-kitchen's eager backend (the byte reference ComfyUI runs on CPU) on the same
device. Also reports comfy-kitchen's CUDA kernel where it is available (it differs from eager in a few codes, which
is why the converter does not use it) and a device copy of the same bytes as the bandwidth yardstick.

    python benchmarks/quantize_kernels.py [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from common import machine, timed, write_results

from nvfp4_lab.quant import nvfp4

SHAPES = [(3072, 3072), (5120, 13824), (1000, 3080)]


def _kitchen(backend: str):
    try:
        import comfy_kitchen as ck
    except ImportError:
        return None
    try:
        return ck.registry.get_implementation("quantize_nvfp4", backend=backend)
    except Exception:
        return None


def _bytes(q) -> tuple[torch.Tensor, torch.Tensor]:
    return q[0].cpu(), q[1].cpu().view(torch.uint8)


def bench(device: str) -> list[dict]:
    rows = []
    eager, cuda_ck = _kitchen("eager"), _kitchen("cuda") if device.startswith("cuda") else None
    g = torch.Generator().manual_seed(0)
    for rows_, cols in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            x_cpu = (torch.randn(rows_, cols, generator=g) * torch.rand(1, cols, generator=g) * 3).to(dtype)
            x = x_cpu.to(device)
            s = nvfp4.per_tensor_scale(x_cpu).to(device)
            pad = rows_ % 16 != 0 or cols % 16 != 0
            row = {"shape": [rows_, cols], "dtype": str(dtype).removeprefix("torch."), "device": device}
            ours = nvfp4.quantize(x, s)
            ref_cpu = nvfp4.quantize(x_cpu, s.cpu())
            row["ours_s"] = timed(lambda: nvfp4.quantize(x, s), device)
            row["copy_s"] = timed(lambda: x.clone(), device)
            row["ours_equals_cpu"] = bool(torch.equal(ours.qdata.cpu(), ref_cpu.qdata)
                                          and torch.equal(ours.block_scale.cpu().view(torch.uint8),
                                                          ref_cpu.block_scale.view(torch.uint8)))
            if eager is not None:
                row["kitchen_eager_s"] = timed(lambda: eager(x, s, 0.0, pad, True), device)
                q, bs = _bytes(eager(x_cpu, s.cpu(), 0.0, pad, True))
                row["ours_equals_kitchen_eager_cpu"] = bool(torch.equal(q, ref_cpu.qdata)
                                                            and torch.equal(bs, ref_cpu.block_scale.view(torch.uint8)))
                row["speedup_vs_kitchen_eager"] = row["kitchen_eager_s"] / row["ours_s"]
            if cuda_ck is not None and not pad and dtype != torch.float32:  # its kernel takes fp16/bf16 only
                row["kitchen_cuda_s"] = timed(lambda: cuda_ck(x, s, 0.0, False, True), device)
                q, _ = _bytes(cuda_ck(x, s, 0.0, False, True))
                row["kitchen_cuda_code_bytes_differing_from_eager"] = float((q != ref_cpu.qdata).float().mean())
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    write_results(args.json, {"benchmark": "quantize_kernels", "machine": machine(), "rows": bench(args.device)})


if __name__ == "__main__":
    main()
