"""Budget planner vs presets vs the original scripts' input-only ranking, at equal file size, on END-TO-END error.

Question: given a file-size budget, does choosing formats from measured per-layer OUTPUT error (calibration.budget)
give a better model than (a) name-based presets and (b) the original scripts' method (rank layers by the error of
quantizing their *input* alone, keep the worst in bf16 until the size is reached)?

Models (all plain torch, CPU, seconds):
  A. "tiny Wan": the `quant.tiny_models.tiny_wan` checkpoint (8 blocks, dim 256, ffn 512, with `sensitive`
     outlier layers) run through `WanLite`, a pure-torch re-implementation of ComfyUI's Wan 2.1 T2V forward on the
     same state dict (patch embedding, text/time embeddings, adaLN modulation, self/cross attention with RMS q/k norms,
     GELU FFN, modulated head). Simplification, stated honestly: no RoPE (attention is position-agnostic here) and no
     unpatchify (metrics are taken on the token outputs). Context = synthetic heavy-tailed text embeddings.
  B. "synthetic chain": `calibration.end_to_end.synthetic_chain` (12 pre-norm residual GELU-MLP blocks, dim 256,
     hidden 1024; LayerNorm gains with dominant channels; massive-activation residual inputs; 3 sensitive layers).
     It is not a diffusion model: it shows how per-layer errors add up through residuals.

Procedure per model: record real Linear inputs on calibration inputs (seeds 0-3) → `probe` → plans → emulate each
plan on the module (`emulate_plan_on_module`: W4A4 NVFP4 with dynamic activation scale, FP8 W8A8 with ComfyUI's
activation scale 1.0, bf16 rounding) → compare with the unquantized fp32 module on held-out inputs (other seeds).
End-to-end metrics: relative RMSE of one forward's output (mean over held-out inputs) and, for tiny Wan, the latent
PSNR / cosine after a 4-step Euler flow sampler run from the same noise.

For each reference plan of size S (presets; for B an edge-keeping "preset"):
  planner      = calibration.budget.plan_for_budget(base = every non-never_quantize layer free, budget S)
  planner-4/16 = the same restricted to nvfp4/bf16 (isolates the ranking from the availability of FP8)
  input-only   = start all-NVFP4, keep layers in bf16 by descending input-quantization rel_rmse (on the same
                 recorded inputs; the originals even used random inputs) while the size stays <= S
All three never exceed S (Plan.estimated_bytes).

Usage: python benchmarks/budget_vs_presets.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as TF

from nvfp4_lab.calibration import budget as B
from nvfp4_lab.calibration import end_to_end as E
from nvfp4_lab.calibration.sensitivity import probe
from nvfp4_lab.quant import formats as F
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.plan import LayerDecision, Plan
from nvfp4_lab.quant.rules import PlanOptions, build_plan
from nvfp4_lab.quant.tiny_models import save_tiny, tiny_wan

torch.set_num_threads(1)   # small matmuls: one thread avoids oversubscription on shared CPUs


# ------------------------------------------------------------------------------------------------- WanLite (pure torch)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attn(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x, ctx=None):
        src = x if ctx is None else ctx
        b, n, d = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.k(src)).view(b, src.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(src).view(b, src.shape[1], self.heads, -1).transpose(1, 2)
        y = TF.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.o(y)


class Block(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn, self.cross_attn = Attn(dim, heads), Attn(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def forward(self, x, e0, ctx):
        m = (self.modulation + e0).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + m[1]) + m[0]) * m[2]
        x = x + self.cross_attn(self.norm3(x), ctx)
        return x + self.ffn(self.norm2(x) * (1 + m[4]) + m[3]) * m[5]


class Head(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.head = nn.Linear(dim, out)

    def forward(self, x, e):
        m = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + m[1]) + m[0])


class WanLite(nn.Module):
    """ComfyUI's Wan 2.1 T2V forward on the same state-dict keys, minus RoPE and unpatchify (see module doc)."""

    def __init__(self, dim: int, ffn: int, layers: int, text_dim: int, in_dim: int, out_dim: int,
                 freq_dim: int = 256):
        super().__init__()
        self.dim, self.freq_dim = dim, freq_dim
        heads = dim // 128
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, ffn, heads) for _ in range(layers))
        self.head = Head(dim, out_dim * 4)

    def forward(self, x, t, context):
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        half = self.freq_dim // 2
        freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float32) / half)
        sinus = torch.outer(t.float(), freqs)
        e = self.time_embedding(torch.cat([torch.cos(sinus), torch.sin(sinus)], dim=1))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))
        ctx = self.text_embedding(context)
        for blk in self.blocks:
            x = blk(x, e0, ctx)
        return self.head(x, e)


def wan_inputs(seed: int, *, batch: int = 2, frames: int = 2, hw: int = 16, text_tokens: int = 16,
               text_dim: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise latent [B,16,T,H,W], heavy-tailed text context [B,L,text_dim]) for one prompt/seed."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, 16, frames, hw, hw, generator=g)
    ch = torch.exp(torch.randn(text_dim, generator=torch.Generator().manual_seed(7)) * 0.6) * 0.15
    dom = torch.randperm(text_dim, generator=torch.Generator().manual_seed(8))[:8]
    ch[dom] *= 25
    z = torch.randn(batch, text_tokens, text_dim, generator=g)
    chi = torch.randn(4, batch, text_tokens, text_dim, generator=g).pow(2).sum(0)
    ctx = z / torch.sqrt(chi / 4) * ch
    return noise, ctx


def wan_sample(model: nn.Module, noise: torch.Tensor, ctx: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """A 4-step Euler flow-matching sampler (sigma 1 → 0, t = 1000·sigma) on the token outputs."""
    x = noise
    sig = torch.linspace(1.0, 0.0, steps + 1)
    b, c, f, h, w = x.shape
    for i in range(steps):
        v = model(x, torch.full((b,), float(sig[i]) * 1000), ctx)        # [B, tokens, c*4]
        v = v.view(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


# ------------------------------------------------------------------------------------------------- plan helpers

def input_only_plan(base: Plan, report, ck, size: int, keep: str = F.BF16) -> Plan:
    """The original scripts' method: rank by input-quantization rel_rmse, keep the worst in bf16 while size <= S."""
    entries = report.by_layer()
    rank = sorted((n for n, d in base.layers.items() if d.quantized and n in entries
                   and entries[n].input_error.get("nvfp4", {}).get("rel_rmse") is not None),
                  key=lambda n: -entries[n].input_error["nvfp4"]["rel_rmse"])
    plan = Plan(source=dict(base.source), preset="input-only", other_dtype=base.other_dtype,
                layers={n: LayerDecision(n, d.format, d.reason, d.shape) for n, d in base.layers.items()})
    for n in rank:
        old = plan.layers[n].format
        plan.layers[n].format = keep
        if plan.estimated_bytes(ck) > size:
            plan.layers[n].format = old
        else:
            plan.layers[n].reason = f"input-only rank: input rel_rmse {entries[n].input_error['nvfp4']['rel_rmse']:.3g}"
    return plan


def counts(plan: Plan) -> str:
    c = plan.counts()
    return " ".join(f"{k}:{v}" for k, v in c.items())


def evaluate(model, plan, evals, fwd, sample=None) -> dict:
    rel, cos, psnr, lcos = [], [], [], []
    with torch.no_grad():
        for inp in evals:
            ref = fwd(model, inp)
            with E.emulated(model, plan):
                out = fwd(model, inp)
                samp = sample(model, inp) if sample else None
            m = E.compare_outputs(ref, out)
            rel.append(m["rel_rmse"])
            cos.append(m["cosine"])
            if sample:
                ref_s = sample(model, inp)
                ms = E.compare_outputs(ref_s, samp)
                psnr.append(ms["latent_psnr"])
                lcos.append(ms["cosine"])
    out = {"rel_rmse": sum(rel) / len(rel), "cosine": sum(cos) / len(cos)}
    if psnr:
        out["latent_psnr"] = sum(psnr) / len(psnr)
        out["latent_cosine"] = sum(lcos) / len(lcos)
    return out


def compare_at(label: str, ref_plan: Plan, base: Plan, report, ck, model, evals, fwd, sample=None) -> list[dict]:
    size = ref_plan.estimated_bytes(ck)
    allowance = B.header_allowance(base, ck)
    rows = []
    planner, _ = B.plan_for_budget(base, report, size + allowance, ck)
    planner416, _ = B.plan_for_budget(base, report, size + allowance, ck, candidates=(F.NVFP4, F.BF16))
    inonly = input_only_plan(base, report, ck, size)
    for name, plan in ((label, ref_plan), ("planner", planner), ("planner nvfp4/bf16", planner416),
                       ("input-only (original)", inonly)):
        est = plan.estimated_bytes(ck)
        assert est <= size, (name, est, size)
        r = {"reference": label, "method": name, "bytes": est, "formats": counts(plan),
             "predicted_error": B.predicted_error(plan, report)}
        r.update(evaluate(model, plan, evals, fwd, sample))
        rows.append(r)
    return rows


def table(rows: list[dict], with_latent: bool) -> str:
    hdr = "| size budget | method | size (KB) | formats | pred. err | e2e rel RMSE | e2e cosine |"
    sep = "|---|---|---:|---|---:|---:|---:|"
    if with_latent:
        hdr += " 4-step latent PSNR (dB) | latent cos |"
        sep += "---:|---:|"
    out = [hdr, sep]
    for r in rows:
        line = (f"| {r['reference']} | {r['method']} | {r['bytes'] / 1e3:.1f} | {r['formats']} | "
                f"{r['predicted_error']:.4f} | {r['rel_rmse']:.4f} | {r['cosine']:.5f} |")
        if with_latent:
            line += f" {r['latent_psnr']:.2f} | {r['latent_cosine']:.5f} |"
        out.append(line)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- benchmarks

def bench_wan(out: Path, quick: bool) -> tuple[list[dict], str]:
    layers = 6 if quick else 8
    sens = [r"blocks\.2\.ffn\.2", r"blocks\.3\.self_attn\.o", r"blocks\.4\.cross_attn\.o", r"blocks\.5\.ffn\.2"]
    sd, meta = tiny_wan(dim=256, ffn_dim=512, num_layers=layers, sensitive=sens, seed=0)
    path = save_tiny(out / "tiny_wan.safetensors", sd, meta, force=True)
    model = WanLite(256, 512, layers, 1024, 16, 16)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.eval()

    def fwd(m, inp):
        noise, ctx, t = inp
        return m(noise, torch.full((noise.shape[0],), t), ctx)

    def sample(m, inp):
        noise, ctx, _ = inp
        return wan_sample(m, noise, ctx)

    ts = (999.0, 750.0, 500.0, 250.0)
    calib = [(*wan_inputs(s), t) for s in range(2 if quick else 4) for t in ts]
    evals = [(*wan_inputs(100 + s), t) for s in range(1 if quick else 2) for t in ts[:2]]
    samples = E.record_linear_inputs(model, calib, max_rows=512, forward=fwd)
    report = probe(path, samples=samples, progress=False)
    report.save(out / "tiny_wan_sensitivity.json", force=True)
    rows: list[dict] = []
    with open_checkpoint(path) as ck:
        base = build_plan(ck, PlanOptions(mode="all"))         # never_quantize respected, everything else free
        refs = [("preset wan", build_plan(ck, PlanOptions())),
                ("preset wan, no edge blocks", build_plan(ck, PlanOptions(keep_first=0, keep_last=0))),
                ("preset wan + fp8 FFN", build_plan(ck, PlanOptions(min_ffn_fp8=True)))]
        for label, ref in refs:
            rows += compare_at(label, ref, base, report, ck, model, evals, fwd, sample)
        plan, curve = B.plan_for_budget(base, report, refs[0][1].estimated_bytes(ck) + B.header_allowance(base, ck),
                                        ck)
        curve.reference_points = [{"label": lab, "bytes": p.estimated_bytes(ck) + B.header_allowance(base, ck),
                                   "predicted_error": B.predicted_error(p, report)} for lab, p in refs]
        curve.save_png(out / "tiny_wan_tradeoff.png", force=True, title="tiny Wan: size vs predicted error")
        curve.save_json(out / "tiny_wan_tradeoff.json", force=True)
        sens_rank = [n for n, _ in report.ranking("nvfp4")[:6]]
        in_rank = sorted(report.by_layer(), key=lambda n: -(report.by_layer()[n].input_error["nvfp4"]["rel_rmse"]))[:6]
    note = (f"probe ranking (nvfp4 output rel_rmse), top 6: {', '.join(sens_rank)}\n"
            f"input-only ranking (original method), top 6: {', '.join(in_rank)}")
    return rows, note


def bench_chain(out: Path, quick: bool) -> tuple[list[dict], str]:
    depth = 8 if quick else 12
    sens = (3, 5) if quick else (3, 7, 9)
    model, sd = E.synthetic_chain(dim=256, hidden=1024, depth=depth, out_dim=64, sensitive=sens, seed=3)
    model.eval()
    from safetensors.torch import save_file
    path = out / "chain.safetensors"
    save_file(sd, str(path))
    calib = [E.chain_inputs(2, 128, 256, seed=s) for s in range(2 if quick else 4)]
    evals = [E.chain_inputs(2, 128, 256, seed=100 + s) for s in range(2)]
    samples = E.record_linear_inputs(model, calib, max_rows=512)
    report = probe(path, samples=samples, progress=False)
    rows: list[dict] = []

    def fwd(m, x):
        return m(x)

    with open_checkpoint(path) as ck:
        lin = {n: l for n, l in ck.layers().items() if l.linear}
        src = {"file": path.name, "header_sha256": ck.header_hash()}
        base = Plan(source=src, preset="all", layers={n: LayerDecision(n, F.NVFP4, "all", tuple(l.shape))
                                                      for n, l in lin.items()})
        last = f"blocks.{depth - 1}."

        def preset(keep_edges: bool, fp8_down: bool) -> Plan:
            layers = {}
            for n, l in lin.items():
                fmt = F.NVFP4
                if keep_edges and (n.startswith("blocks.0.") or n.startswith(last) or n == "head"):
                    fmt = F.BF16
                elif fp8_down and n.endswith("ffn.2"):
                    fmt = F.FP8
                layers[n] = LayerDecision(n, fmt, "preset-like", tuple(l.shape))
            return Plan(source=src, preset="edge", layers=layers)

        refs = [("edge blocks kept (preset-like)", preset(True, False)),
                ("edge kept + fp8 FFN-down (preset-like)", preset(True, True))]
        for label, ref in refs:
            rows += compare_at(label, ref, base, report, ck, model, evals, fwd)
    sens_names = [f"blocks.{b}.ffn.2" for b in sens]
    return rows, f"sensitive layers: {', '.join(sens_names)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for files (default: a temp folder)")
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer inputs (CI smoke run)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="nvfp4_budget_bench_"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    wan_rows, wan_note = bench_wan(out, args.quick)
    chain_rows, chain_note = bench_chain(out, args.quick)
    text = ["### A. tiny Wan (WanLite forward, 8 blocks, dim 256; 4 sensitive layers)", "", table(wan_rows, True), "",
            wan_note, "", "### B. synthetic residual chain (12 blocks, dim 256, hidden 1024; 3 sensitive layers)", "",
            table(chain_rows, False), "", chain_note, "",
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {time.perf_counter() - t0:.0f} s total"]
    print("\n".join(text))
    (out / "results.json").write_text(json.dumps({"wan": wan_rows, "chain": chain_rows}, indent=1,
                                                 allow_nan=False) + "\n")
    print(f"\nfiles in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
