"""What converting an FP8 community checkpoint to NVFP4 costs, against converting the bf16 original.

Weight relative RMSE against the bf16 weight for: FP8 E4M3 alone, NVFP4 from bf16, and NVFP4 from the FP8 file
(dequantize + re-quantize, what `nvfp4 convert` does with FP8 sources). Three weight distributions, 3072x3072.

    python fp8_source_cost.py
"""

from __future__ import annotations

import torch

from nvfp4_lab.quant import fp8, nvfp4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    n = 3072
    weights = {
        "gaussian": torch.randn(n, n, generator=g),
        "student-t(3)": torch.distributions.StudentT(3.0).sample((n, n)),
        "1% outlier channels x20": torch.randn(n, n, generator=g)
        * torch.where(torch.rand(1, n, generator=g) < 0.01, 20.0, 1.0),
    }
    print(f"{'weights':26s} {'fp8 alone':>9s} {'nvfp4':>9s} {'nvfp4 via fp8':>13s} {'ratio':>6s}")
    for name, w in weights.items():
        w = (w * 0.02).to(torch.bfloat16)
        direct = rel(nvfp4.dequantize(nvfp4.quantize(w)), w)
        w8, scale = fp8.quantize_fp8(w)
        via = rel(nvfp4.dequantize(nvfp4.quantize(fp8.dequantize_fp8(w8, scale, torch.float32))), w)
        print(f"{name:26s} {rel(fp8.dequantize_fp8(w8, scale, torch.float32), w):9.4f} {direct:9.4f} {via:13.4f} "
              f"{via / direct:6.3f}")


if __name__ == "__main__":
    main()
