"""Cost of recording every Linear's input amax during sampling: forward passes of a DiT-shaped stack with and
without the recorder, same run, same inputs.

The stack has the Linear shapes of a Wan 2.x 14B block (dim 5120, ffn 13824, 40 blocks by default) with attention
replaced by a cheap token mix, so the Linears dominate as in the real model. Each "sampling run" is `--steps`
forward passes (cond+uncond batched, 2 x tokens rows) followed by one `Recorder.flush()` into a CalibrationStore
(the single device sync per run). The baseline is the same loop with no hooks. For contrast, the original ops.py
patch's per-call `.item()` (one device sync per Linear call) is measured too, without its file writes.

    python benchmarks/calibration_overhead.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine, sync, write_results

from nvfp4_lab.calibration.recorder import Recorder
from nvfp4_lab.calibration.store import CalibrationStore


class Block(torch.nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.ffn0, self.ffn2 = torch.nn.Linear(dim, ffn), torch.nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        x = x + self.o(torch.tanh(q) * torch.sigmoid(k) + v)  # stand-in for attention: same Linear calls
        return x + self.ffn2(torch.nn.functional.gelu(self.ffn0(x)))


def run(model: torch.nn.Module, x: torch.Tensor, steps: int, device: str, flush=None) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            model(x)
        if flush is not None:
            flush()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per cond chunk (batch holds cond + uncond)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(args.device):  # build on the device: a 14B-shaped stack would take minutes to init on CPU
        model = torch.nn.Sequential(*(Block(args.dim, args.ffn) for _ in range(args.blocks)))
    x = torch.randn(2, args.tokens, args.dim, device=args.device, dtype=dtype)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    run(model, x, 1, args.device)  # warm-up
    results = {"benchmark": "calibration_overhead", "machine": machine(), "config": vars(args),
               "linear_calls_per_run": len(linears) * args.steps, "runs": {}}
    store = CalibrationStore()
    recorder = Recorder()
    recorder.set_context(step=0, cond_or_uncond=(0, 1))

    def with_item_sync() -> list:
        def hook(_m, a):  # what the original patch did per call (minus its file write)
            float(a[0].abs().amax().item())
        return [m.register_forward_pre_hook(hook) for _, m in linears]

    for name in ("baseline", "recorder", "item_per_call"):
        times = []
        for _ in range(args.repeat):
            if name == "recorder":
                with recorder.attached(linears):
                    times.append(run(model, x, args.steps, args.device, flush=lambda: recorder.flush(store)))
            elif name == "item_per_call":
                handles = with_item_sync()
                try:
                    times.append(run(model, x, args.steps, args.device))
                finally:
                    for h in handles:
                        h.remove()
            else:
                times.append(run(model, x, args.steps, args.device))
        results["runs"][name] = {"seconds": sorted(times)[len(times) // 2], "all": times}
    base = results["runs"]["baseline"]["seconds"]
    for r in results["runs"].values():
        r["ratio_vs_baseline"] = r["seconds"] / base
    layer = linears[0][0]
    results["recorded_calls_first_layer"] = int(store.layers[layer].count) if layer in store.layers else 0
    write_results(args.json, results)


if __name__ == "__main__":
    main()
