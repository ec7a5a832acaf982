"""End-to-end output comparison: metrics between a reference and a candidate output, and plan emulation on a
plain torch module.

Why: a per-layer probe predicts; only the model's output shows what a plan really costs. The probe node (ComfyUI
side) samples the same seed with the original and the converted/emulated model and calls `compare_outputs` on the
two latents (and decoded images when a VAE is present). Benchmarks and tests run a plain torch model with
`emulate_plan_on_module` and compare with `compare_outputs` too.

Metric definitions
    * ``latent_psnr`` = 10·log10(peak² / MSE) with peak = max(ref) − min(ref) of the reference latent (latents have no
      fixed range, so the reference's own range stands in for the "255" of images). ``None`` when MSE is 0 (identical)
      — reported with ``identical: True``.
    * ``cosine``: cosine similarity of the flattened latents.
    * ``rel_rmse``: ‖cand − ref‖ / ‖ref‖ over the latent.
    * ``image_psnr``: PSNR with peak 1.0 (ComfyUI IMAGE tensors are float in [0, 1]).
    * ``ssim``: mean SSIM over channels and batch, Gaussian window 11×11, σ = 1.5, C1 = (0.01·L)², C2 = (0.03·L)²,
      L = 1 (Wang et al. 2004), valid convolution (no padding).
All numbers are finite floats or None; non-finite candidate outputs give ``status: "non-finite output"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as TF

from ..quant import formats as F

STATUS_OK = "ok"
STATUS_NONFINITE = "non-finite output"


# --------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------

def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, Mapping) and "samples" in x:   # ComfyUI LATENT dict
        x = x["samples"]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor or a LATENT dict with 'samples', got {type(x).__name__}")
    return x.detach()


def _check_pair(ref: torch.Tensor, cand: torch.Tensor, what: str) -> None:
    if ref.shape != cand.shape:
        raise ValueError(f"{what}: reference shape {list(ref.shape)} differs from candidate {list(cand.shape)}; "
                         f"compare outputs of the same prompt, seed and size")


def rel_rmse(ref: torch.Tensor, cand: torch.Tensor) -> float | None:
    r, c = ref.double().flatten(), cand.double().flatten().to(ref.device)
    den = float(torch.linalg.vector_norm(r))
    num = float(torch.linalg.vector_norm(c - r))
    if den == 0:
        return 0.0 if num == 0 else None
    return num / den


def cosine(ref: torch.Tensor, cand: torch.Tensor) -> float | None:
    r, c = ref.double().flatten(), cand.double().flatten().to(ref.device)
    nr, nc = float(torch.linalg.vector_norm(r)), float(torch.linalg.vector_norm(c))
    if nr == 0 or nc == 0:
        return 1.0 if nr == nc else 0.0
    return float(torch.dot(r, c)) / (nr * nc)


def psnr(ref: torch.Tensor, cand: torch.Tensor, data_range: float | None = None) -> float | None:
    """PSNR in dB; `data_range` None = range of the reference. None when identical (infinite PSNR)."""
    r, c = ref.double(), cand.double().to(ref.device)
    mse = float(((c - r) ** 2).mean())
    if data_range is None:
        data_range = float(r.max() - r.min()) if r.numel() else 0.0
    if mse == 0:
        return None
    if data_range <= 0:
        return None
    return 10.0 * math.log10(data_range * data_range / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-(ax ** 2) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :])


def ssim(ref: torch.Tensor, cand: torch.Tensor, *, data_range: float = 1.0, channels_last: bool | None = None,
         window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two image batches. Layout: [B, H, W, C] (ComfyUI IMAGE) or [B, C, H, W]; `channels_last=None`
    guesses (last dim ≤ 4 → channels last). 2-D / 3-D inputs are treated as one image / one batch of gray images."""
    r, c = ref.double(), cand.double().to(ref.device)
    _check_pair(r, c, "ssim")
    if r.dim() == 2:
        r, c = r[None, None], c[None, None]
    elif r.dim() == 3:
        r, c = r[:, None], c[:, None]
    elif r.dim() == 4:
        if channels_last is None:
            channels_last = r.shape[-1] <= 4 and r.shape[1] > 4
        if channels_last:
            r, c = r.permute(0, 3, 1, 2), c.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"ssim expects 2-D to 4-D images, got {r.dim()}-D")
    b, ch, h, w = r.shape
    win = min(window, h, w)
    if win % 2 == 0:
        win -= 1
    if win < 1:
        raise ValueError("ssim: images are empty")
    k = _gaussian_window(win, sigma, r.device).expand(ch, 1, win, win)
    conv = lambda t: TF.conv2d(t, k, groups=ch)  # noqa: E731
    mu_r, mu_c = conv(r), conv(c)
    s_rr = conv(r * r) - mu_r ** 2
    s_cc = conv(c * c) - mu_c ** 2
    s_rc = conv(r * c) - mu_r * mu_c
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_r * mu_c + c1) * (2 * s_rc + c2)) / ((mu_r ** 2 + mu_c ** 2 + c1) * (s_rr + s_cc + c2))
    return float(m.mean())


def compare_outputs(ref_latent: Any, cand_latent: Any, ref_image: torch.Tensor | None = None,
                    cand_image: torch.Tensor | None = None) -> dict:
    """{latent_psnr, cosine, rel_rmse, image_psnr, ssim, status} between a reference and a candidate run.

    Latents may be tensors or ComfyUI LATENT dicts; images are ComfyUI IMAGE tensors [B, H, W, C] in [0, 1] (optional:
    image_psnr / ssim are None without them). Non-finite candidates give status "non-finite output" and None metrics."""
    ref = _as_tensor(ref_latent).float()
    cand = _as_tensor(cand_latent).float()
    _check_pair(ref, cand, "latent")
    out: dict = {"status": STATUS_OK, "latent_psnr": None, "cosine": None, "rel_rmse": None,
                 "image_psnr": None, "ssim": None}
    if not bool(torch.isfinite(cand).all()):
        out["status"] = STATUS_NONFINITE
        return out
    out["latent_psnr"] = psnr(ref, cand)
    out["identical"] = bool(torch.equal(ref, cand))
    out["cosine"] = cosine(ref, cand)
    out["rel_rmse"] = rel_rmse(ref, cand)
    if ref_image is not None and cand_image is not None:
        ri, ci = _as_tensor(ref_image).float(), _as_tensor(cand_image).float()
        _check_pair(ri, ci, "image")
        if not bool(torch.isfinite(ci).all()):
            out["status"] = STATUS_NONFINITE
            return out
        out["image_psnr"] = psnr(ri, ci, data_range=1.0)
        out["ssim"] = ssim(ri, ci, data_range=1.0, channels_last=True if ri.dim() == 4 else None)
    return out


# --------------------------------------------------------------------------------------------------------------
# plan emulation on a plain torch module
# --------------------------------------------------------------------------------------------------------------

def _fp8_act(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    from .sensitivity import fp8_activation_qdq
    return fp8_activation_qdq(x, scale).to(x.dtype)


def emulated_weight(weight: torch.Tensor, fmt: str, *, name: str = "weight",
                    source_dtype: torch.dtype | str | None = "auto") -> torch.Tensor:
    """The weight a layer computes with in `fmt` (quantize → dequantize; plain formats round), in weight's dtype.

    The converter quantizes the *stored* tensor, and the NVFP4/FP8 per-tensor scale is computed in that dtype, so the
    weight is first cast to `source_dtype`: "auto" = bf16 when the values are exactly bf16 (a bf16 checkpoint loaded
    into an fp32 module), else as is; None = as is."""
    from .sensitivity import _WeightVariants
    w = weight.detach()
    if source_dtype == "auto":
        wb = w.to(torch.bfloat16)
        if w.dtype != torch.bfloat16 and torch.equal(wb.to(w.dtype), w):
            w = wb
    elif source_dtype is not None:
        w = w.to(source_dtype)
    fmt_key = F.NVFP4 if F.is_nvfp4(fmt) else fmt
    return _WeightVariants(w, name).get(fmt_key).to(weight.dtype)


def activation_fn(fmt: str, input_scale: float | None, *, w4a4: bool = True) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation transform a layer in `fmt` applies to its input (None = identity):
    nvfp4 → NVFP4 fake-quantize (static `input_scale` or dynamic) when `w4a4`; nvfp4-w4a16 → none;
    fp8 → ComfyUI's W8A8 activation cast (scale 1.0 unless `input_scale`); bf16/fp16 → rounding."""
    if fmt == F.NVFP4 and w4a4:
        from ..quant import nvfp4
        return lambda x: nvfp4.fake_quantize(x, input_scale).to(x.dtype)
    if fmt in F.FP8_DTYPES:
        if fmt == F.FP8_E5M2:
            return None
        return lambda x: _fp8_act(x, input_scale)
    if fmt in (F.BF16, F.FP16):
        dt = F.PLAIN_DTYPES[fmt]
        return lambda x: x.to(dt).to(x.dtype)
    return None


class EmulationHandle:
    """Undo handle of `emulate_plan_on_module`: `.remove()` restores weights and removes hooks; also a context
    manager. `.layers` lists the emulated layer names and their formats."""

    def __init__(self) -> None:
        self._hooks: list[Any] = []
        self._saved: list[tuple[torch.nn.Module, torch.Tensor]] = []
        self.layers: dict[str, str] = {}
        self.unmatched: list[str] = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        with torch.no_grad():
            for mod, w in self._saved:
                mod.weight.data = w
        self._saved.clear()

    def __enter__(self) -> EmulationHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _layer_name(module_name: str, prefixes: tuple[str, ...]) -> str:
    for p in prefixes:
        if module_name.startswith(p):
            return module_name[len(p):]
    return module_name


def emulate_plan_on_module(module_tree: torch.nn.Module, plan: Any, input_scales: Mapping[str, float] | None = None,
                           *, w4a4: bool = True, strict: bool = False,
                           prefixes: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")
                           ) -> EmulationHandle:
    """Make a plain torch module compute as if converted with `plan` (emulation: quantize → dequantize, float math).

    For every `nn.Linear` whose (prefix-stripped) qualified name is a plan layer, the weight is swapped for its
    emulated value and a forward pre-hook transforms the input: NVFP4 W4A4 fake-quantizes it (static scale from the
    plan decision, else `input_scales[layer]`, else dynamic over the call — ComfyUI semantics), NVFP4 W4A16 leaves
    it, FP8 applies ComfyUI's W8A8 activation cast, bf16/fp16 round it. `w4a4=False` emulates a GPU without native
    NVFP4 (every NVFP4 layer runs W4A16, input scales ignored). `plan` may be a `Plan` or a dict
    layer → format / (format, input_scale). Returns an `EmulationHandle`; call `.remove()` (or use `with`) to undo.
    `strict=True` raises KeyError when a plan layer has no matching Linear."""
    handle = EmulationHandle()
    decisions: dict[str, tuple[str, float | None]] = {}
    layers_obj = getattr(plan, "layers", plan)
    for name, dec in layers_obj.items():
        if isinstance(dec, str):
            decisions[name] = (dec, None)
        elif isinstance(dec, tuple):
            decisions[name] = (dec[0], dec[1] if len(dec) > 1 else None)
        else:
            decisions[name] = (dec.format, dec.input_scale)
    seen: set[str] = set()
    try:
        for mname, mod in module_tree.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            lname = _layer_name(mname, prefixes)
            if lname not in decisions:
                continue
            seen.add(lname)
            fmt, scale = decisions[lname]
            F.check_format(fmt)
            if scale is None and input_scales is not None and F.is_nvfp4(fmt):
                scale = input_scales.get(lname)
            if fmt == F.FP32:
                handle.layers[lname] = fmt
                continue
            with torch.no_grad():
                orig = mod.weight.data
                handle._saved.append((mod, orig))
                mod.weight.data = emulated_weight(orig, fmt, name=lname)
            act = activation_fn(fmt, scale, w4a4=w4a4)
            if act is not None:
                handle._hooks.append(mod.register_forward_pre_hook(_make_pre_hook(act)))
            handle.layers[lname] = fmt if (fmt != F.NVFP4 or w4a4) else F.NVFP4_W4A16
    except BaseException:
        handle.remove()
        raise
    handle.unmatched = sorted(set(decisions) - seen)
    if strict and handle.unmatched:
        handle.remove()
        raise KeyError(f"plan layers without a matching nn.Linear: {handle.unmatched[:5]}")
    return handle


def _make_pre_hook(act: Callable[[torch.Tensor], torch.Tensor]):
    def hook(mod: torch.nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (act(args[0]),) + tuple(args[1:])
    return hook


@contextlib.contextmanager
def emulated(module_tree: torch.nn.Module, plan: Any, input_scales: Mapping[str, float] | None = None,
             **kw: Any) -> Iterator[EmulationHandle]:
    """Context-manager form of `emulate_plan_on_module`."""
    handle = emulate_plan_on_module(module_tree, plan, input_scales, **kw)
    try:
        yield handle
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------------
# a synthetic diffusion-like residual network (tests, benchmarks)
# --------------------------------------------------------------------------------------------------------------

class ResidualMLPChain(torch.nn.Module):
    """A plain-torch stand-in for a DiT's Linear stack: `depth` pre-norm residual MLP blocks and a head.

    ``h = x; h = h + ffn.2(gelu(ffn.0(norm(h))))`` per block; ``out = head(norm_out(h))``. Layer names follow the
    Wan convention (``blocks.N.ffn.0`` / ``blocks.N.ffn.2`` / ``head``) so plans, reports and emulation line up. It is
    *not* a diffusion model: no attention, no timestep modulation; it exists to measure how per-layer errors add up
    through residual connections with diffusion-like activation statistics (see `synthetic_chain`)."""

    def __init__(self, dim: int, hidden: int, depth: int, out_dim: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for _ in range(depth):
            blk = torch.nn.Module()
            blk.norm = torch.nn.LayerNorm(dim)
            blk.ffn = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(approximate="tanh"),
                                          torch.nn.Linear(hidden, dim))
            self.blocks.append(blk)
        self.norm_out = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for blk in self.blocks:
            h = h + blk.ffn(blk.norm(h))
        return self.head(self.norm_out(h))


def synthetic_chain(dim: int = 64, hidden: int = 256, depth: int = 6, out_dim: int = 32,
                    sensitive: tuple[int, ...] = (2,), seed: int = 0, outlier_factor: float = 30.0,
                    dtype: torch.dtype = torch.bfloat16) -> tuple[ResidualMLPChain, dict[str, torch.Tensor]]:
    """(fp32 module, state dict in `dtype`) of a `ResidualMLPChain` with diffusion-like statistics.

    * LayerNorm gains carry a few dominant channels (2 channels ×8): the Linear inputs have outlier channels, as
      post-modulation DiT activations do.
    * Weights are normal(0, 1/sqrt(fan_in)).
    * Blocks listed in `sensitive` get a heavy-tailed ``ffn.2`` (Student-t, 3 dof) with one dominant input column per
      16-wide NVFP4 block (×`outlier_factor`), compensated by dividing the matching ``ffn.0`` rows, the same recipe
      as `quant.tiny_models` (sensitive to NVFP4 on real inputs, not on isotropic random ones).
    The module's weights are the `dtype`-rounded values (the reference model is the stored checkpoint)."""
    g = torch.Generator().manual_seed(seed)
    m = ResidualMLPChain(dim, hidden, depth, out_dim)
    sd: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
                v = torch.ones_like(p)
                idx = torch.randperm(p.numel(), generator=g)[:2]
                v[idx] = 8.0
            elif name.endswith("norm.bias") or name.endswith("norm_out.bias"):
                v = torch.zeros_like(p)
            elif name.endswith(".weight"):
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            else:
                v = torch.randn(p.shape, generator=g) * 0.02
            sd[name] = v
        for b in sensitive:
            if not 0 <= b < depth:
                raise ValueError(f"sensitive block {b} is outside 0..{depth - 1}")
            w2 = f"blocks.{b}.ffn.2.weight"
            out_f, in_f = sd[w2].shape
            z = torch.randn(out_f, in_f, generator=g)
            chi2 = torch.randn(3, out_f, in_f, generator=g).pow(2).sum(0)
            t = z / torch.sqrt(chi2 / 3.0) / math.sqrt(3.0) / math.sqrt(in_f)
            nb = (in_f + 15) // 16
            cols = (torch.arange(nb) * 16 + torch.randint(0, 16, (nb,), generator=g)).clamp(max=in_f - 1)
            t[:, cols] *= outlier_factor
            sd[w2] = t
            sd[f"blocks.{b}.ffn.0.weight"][cols] /= outlier_factor
            sd[f"blocks.{b}.ffn.0.bias"][cols] /= outlier_factor
        sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
        m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m, sd


def chain_inputs(batch: int, tokens: int, dim: int, *, seed: int = 0, massive: int = 2,
                 massive_scale: float = 40.0) -> torch.Tensor:
    """Residual-stream inputs [batch, tokens, dim]: Student-t(4) noise plus `massive` channels with a large, token-
    constant offset (the "massive activations" of DiTs/LLMs)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    z = torch.randn(batch, tokens, dim, generator=g)
    chi = torch.randn(4, batch, tokens, dim, generator=g).pow(2).sum(0)
    x = z / torch.sqrt(chi / 4.0)
    ch = torch.randperm(dim, generator=torch.Generator().manual_seed(12345))[:massive]
    x[..., ch] += massive_scale * (1 + 0.1 * torch.randn(batch, 1, massive, generator=g))
    return x


def record_linear_inputs(module: torch.nn.Module, inputs: list[torch.Tensor], *, max_rows: int = 512,
                         seed: int = 0, forward: Callable[[torch.nn.Module, Any], Any] | None = None
                         ) -> dict[str, torch.Tensor]:
    """Run `module` on each input and keep a uniform sample of every Linear's input rows (≤ `max_rows` per layer):
    the in-process equivalent of the calibration recorder's samples sidecar. `forward(module, inp)` defaults to
    `module(inp)`."""
    rows: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def make(name: str):
        def hook(mod: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            rows.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float().cpu())
        return hook

    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(make(name)))
    try:
        with torch.no_grad():
            for inp in inputs:
                if forward is None:
                    module(inp)
                else:
                    forward(module, inp)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, chunks in rows.items():
        x = torch.cat(chunks)
        if x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
        out[name] = x.contiguous()
    return out


__all__ = ["compare_outputs", "psnr", "ssim", "cosine", "rel_rmse", "emulate_plan_on_module", "emulated",
           "EmulationHandle", "emulated_weight", "activation_fn", "ResidualMLPChain", "synthetic_chain",
           "chain_inputs", "record_linear_inputs"]
