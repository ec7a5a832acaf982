"""Emulate W4A4 (NVFP4): a MODEL that computes the way a plan's NVFP4 layers compute on Blackwell, on any device.

Why: CPU, Hopper and Ada never quantize activations (NVFP4 layers run W4A16 there), so the cost of W4A4 — and of a
static `input_scale` — is invisible until the model runs on a Blackwell GPU. This node makes it visible anywhere:

* **Activations** of every W4A4 layer (plan format ``nvfp4``) are fake-quantized exactly as ComfyUI's native path
  quantizes them (`quant.nvfp4.fake_quantize`: per-call dynamic amax/2688, or the static input_scale), and FP8
  layers get ComfyUI's W8A8 activation cast (`calibration.end_to_end.activation_fn`). This is done by forward
  pre-hooks that **return** the replaced input; they exist only while this MODEL samples
  (`nodes.comfy_glue.install_linear_pre_hooks`: an OUTER_SAMPLE wrapper installs and removes them), so no hook
  outlives a prompt and other clones of the model are never affected.
* **Weights**: a layer already loaded quantized (the MODEL came from an NVFP4/FP8 file) keeps its real quantized
  weight; it just runs W4A16 off Blackwell, and only its activations need emulating. A layer the plan quantizes but
  that is still a plain weight (the MODEL is the bf16 source) gets its weight replaced by quantize→dequantize
  (`calibration.end_to_end.emulated_weight`) through ComfyUI's weight-wrapper mechanism
  (`ModelPatcher.add_weight_wrapper`), which applies per patcher while it is loaded and is wiped when another clone
  loads. With `cache_weights` (default) the emulated weight is computed once per layer and kept on the compute
  device: memory cost = one extra copy of the planned layers' weights in the compute dtype (on a GPU, about the size
  of those layers in bf16). Without it, it is recomputed on every forward (no extra memory, slower).
* Layers that already run native W4A4 (Blackwell, not flagged W4A16) are left alone: the hardware does it.

Static scale per W4A4 layer (first that exists): the loaded file's own `input_scale` (what the GPU would use), the
connected calibration session (chosen with the plan's method/percentile/margin), the plan's `input_scale`; else
dynamic. `activation_scale = "dynamic"` ignores all static scales.
"""

from __future__ import annotations

import logging
from typing import Any

from comfy_api.latest import io

from ..quant import formats
from ..quant.errors import NVFP4Error
from ..quant.plan import Plan
from . import ui
from .types import CATEGORY, Calibration, PlanSocket, calibration_path

log = logging.getLogger("nvfp4_lab.nodes")

KEY = "nvfp4_lab.emulate_w4a4"
SCALE_CHOICES = ["plan", "dynamic"]
EMULATE_COLUMNS = ["layer", "plan format", "runs as", "weight", "activation", "input_scale"]
_DM_PREFIX = "diffusion_model."


class WeightEmulator:
    """Weight function (ModelPatcher.add_weight_wrapper): returns the layer's quantize→dequantize weight, computed
    once from the weight ComfyUI casts for the forward and cached per (device, dtype)."""

    def __init__(self, layer: str, fmt: str, cache: bool = True):
        self.layer, self.fmt, self.cache = layer, fmt, cache
        self._cache: dict[tuple[str, Any], Any] = {}

    def __call__(self, weight):
        key = (str(weight.device), weight.dtype)
        out = self._cache.get(key)
        if out is None:
            from ..calibration.end_to_end import emulated_weight

            out = emulated_weight(weight, self.fmt, name=self.layer)
            if self.cache:
                self._cache[key] = out
        return out


def _module_format(mod: Any) -> str | None:
    """Our format name of a module loaded quantized (None for plain weights or formats we do not emulate)."""
    qf = getattr(mod, "quant_format", None)
    if qf is None:
        return None
    try:
        return formats.format_from_comfy_quant(
            {"format": qf, "full_precision_matrix_mult": bool(getattr(mod, "_full_precision_mm_config", False))})
    except ValueError:
        return None


def _module_scale(mod: Any) -> float | None:
    s = getattr(mod, "input_scale", None)
    if s is None:
        return None
    try:
        return float(s.float().reshape(-1)[0])
    except Exception:  # noqa: BLE001 - a malformed parameter: treat as absent
        return None


def calibration_scales(plan: Plan, calibration: Any) -> dict[str, float]:
    """Static NVFP4 input scales from a calibration session, chosen with the plan's method/percentile/margin."""
    path = calibration_path(calibration)
    if path is None:
        return {}
    from ..calibration.scale_selection import select_input_scales
    from ..quant.input_scales import load_calibration

    saved = plan.options.get("input_scale") or {}
    choices = select_input_scales(load_calibration(path), method=saved.get("method", "percentile"),
                                  percentile=float(saved.get("percentile", 99.9)),
                                  margin=float(saved.get("margin", 1.0)))
    return {n: float(c.input_scale) for n, c in choices.items()}


def emulation_specs(model: Any, plan: Plan, *, activation_scale: str = "plan", emulate_weights: bool = True,
                    cal_scales: dict[str, float] | None = None, cache_weights: bool = True
                    ) -> tuple[dict, dict, list[list]]:
    """(activation fn per layer, weight emulator per layer, table rows) for `model`'s diffusion model."""
    from ..calibration.end_to_end import activation_fn

    dm = model.model.diffusion_model
    acts: dict[str, Any] = {}
    weights: dict[str, WeightEmulator] = {}
    rows: list[list] = []
    found = set()
    for name, mod in dm.named_modules():
        dec = plan.layers.get(name)
        if dec is None or getattr(mod, "weight", None) is None:
            continue
        found.add(name)
        loaded = _module_format(mod)
        if loaded is not None:                       # weight already quantized in the MODEL
            fmt, weight_note = loaded, f"{loaded} (loaded)"
            native = not getattr(mod, "_full_precision_mm", True)
            file_scale = _module_scale(mod)
        else:
            fmt, native, file_scale = dec.format, False, None
            if dec.format in formats.QUANTIZED_FORMATS and emulate_weights:
                weights[name] = WeightEmulator(name, dec.format, cache_weights)
                weight_note = f"{dec.format} (emulated)"
            else:
                weight_note = "as loaded"
        scale = None
        if activation_scale != "dynamic" and fmt in (formats.NVFP4, formats.FP8):
            scale = file_scale if file_scale is not None else (cal_scales or {}).get(name, dec.input_scale)
            if fmt == formats.FP8 and file_scale is None and name in (cal_scales or {}):
                # calibration scales are NVFP4's (amax/2688); FP8's is amax/448 = 6 x that, whether the FP8 weight
                # is emulated or was loaded from a file without its own input_scale
                scale = cal_scales[name] * formats.F4_E2M1_MAX
        act = None if native else (activation_fn(fmt, scale) if fmt in (formats.NVFP4, formats.FP8) else None)
        if act is not None:
            acts[name] = act
        runs = "native (hardware)" if native else ("W4A4 emulated" if fmt == formats.NVFP4 else
                                                     "W8A8 emulated" if fmt == formats.FP8 else
                                                     "W4A16" if fmt == formats.NVFP4_W4A16 else fmt)
        activation = ("none" if act is None else
                      (f"static {scale:.4g}" if scale is not None else "dynamic amax/2688" if fmt == formats.NVFP4
                       else "scale 1.0 (ComfyUI default)"))
        rows.append([name, dec.format, runs, weight_note, activation, scale])
    missing = [n for n in plan.layers if n not in found]
    if len(missing) == len(plan.layers):
        raise NVFP4Error(f"the plan (for {plan.source.get('file', '?')}) names no layer of this MODEL "
                         f"(e.g. {missing[0]!r}); was it made for another model?")
    if missing:
        rows.append([f"{len(missing)} plan layer(s) not in the MODEL, e.g. {missing[0]}", None, "not emulated",
                     None, None, None])
    return acts, weights, rows


def _pre_hook(act):
    def hook(module, args):
        if not args or not hasattr(args[0], "dtype"):
            return None
        return (act(args[0]),) + tuple(args[1:])
    return hook


def emulate(model: Any, plan: Plan, *, calibration: Any = None, activation_scale: str = "plan",
            emulate_weights: bool = True, cache_weights: bool = True):
    """(emulating clone of `model`, table rows). The input MODEL is never modified."""
    from . import comfy_glue

    if not isinstance(plan, Plan):
        raise NVFP4Error(f"the PLAN input carries a {type(plan).__name__}, not a plan")
    cal = calibration_scales(plan, calibration) if activation_scale != "dynamic" else {}
    acts, weights, rows = emulation_specs(model, plan, activation_scale=activation_scale,
                                          emulate_weights=emulate_weights, cal_scales=cal, cache_weights=cache_weights)
    m = model.clone()
    for name, fn in weights.items():
        m.add_weight_wrapper(f"{_DM_PREFIX}{name}.weight", fn)

    def make_hook(name: str, module: Any = None):
        act = acts.get(name.removeprefix(_DM_PREFIX))
        return None if act is None else _pre_hook(act)

    m = comfy_glue.install_linear_pre_hooks(m, KEY, make_hook, None)
    return m, rows


class NVFP4EmulateW4A4(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4EmulateW4A4",
            display_name="Emulate W4A4 (NVFP4)",
            category=CATEGORY,
            description="Returns a MODEL whose W4A4 NVFP4 layers quantize their inputs exactly as a Blackwell GPU "
                        "would (static input_scale or dynamic), on any device. With the bf16 source MODEL the "
                        "planned weights are quantized too; with a MODEL loaded from an NVFP4 file only activations "
                        "are emulated. Hooks exist only while this MODEL samples; other clones are unaffected.",
            inputs=[
                io.Model.Input("model", tooltip="The bf16 source MODEL, or a MODEL loaded from the converted file."),
                PlanSocket.Input("plan", tooltip="From Build Plan (NVFP4): which layers are W4A4 / W4A16 / FP8."),
                Calibration.Input("calibration", optional=True,
                                  tooltip="Optional calibration session: static input scales (plan's method)."),
                io.Combo.Input("activation_scale", options=SCALE_CHOICES, default="plan",
                               tooltip="plan: static input_scale where the file, calibration or plan has one, else "
                                       "dynamic; dynamic: always amax/2688 per call."),
                io.Boolean.Input("emulate_weights", default=True,
                                 tooltip="Quantize→dequantize planned weights that are still plain in the MODEL."),
                io.Boolean.Input("cache_weights", default=True, advanced=True,
                                 tooltip="Keep each emulated weight after its first use (one extra copy of the "
                                         "planned layers on the compute device); off = recompute every forward."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, model: Any, plan: Plan, calibration: Any = None, activation_scale: str = "plan",
                emulate_weights: bool = True, cache_weights: bool = True) -> io.NodeOutput:
        m, rows = emulate(model, plan, calibration=calibration, activation_scale=activation_scale,
                          emulate_weights=emulate_weights, cache_weights=cache_weights)
        n_act = sum(1 for r in rows if r[4] not in (None, "none"))
        n_w = sum(1 for r in rows if isinstance(r[3], str) and r[3].endswith("(emulated)"))
        payload = ui.table("Emulate W4A4", EMULATE_COLUMNS, rows,
                           numeric=[False, False, False, False, False, True], sort=None, chart=None,
                           summary=[f"{n_act} layer(s) get emulated activations, {n_w} emulated weights",
                                    "hooks are installed only while this MODEL samples"])
        return io.NodeOutput(m, ui=ui.ui(payload))
