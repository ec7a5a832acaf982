"""Bake calibrated `input_scale`s into an existing NVFP4/FP8 checkpoint (ours or third-party).

Why a separate step: calibration runs on a converted model inside ComfyUI, so the scales exist only after the file
does. Baking rewrites just the scale tensors: every other tensor is copied byte for byte (same names, dtypes, order
of appearance) and the header metadata is kept, so nothing else changes meaning. Streaming and atomic like the
converter; the input is never touched.

Scale meaning (comfyui-format-and-hooks.md §1.5): NVFP4 `input_scale = amax/2688`; FP8 `input_scale = amax/448`
(ComfyUI uses 1.0 when an FP8 layer has none). The chosen amax comes from `calibration.scale_selection`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import formats
from .checkpoint import open_checkpoint
from .errors import CheckpointError
from .safetensors_io import SafetensorsWriter, read_header, torch_dtype

BAKE_KEY = "nvfp4_lab_bake"


@dataclass
class BakeReport:
    output: Path
    baked: dict[str, float] = field(default_factory=dict)  # layer -> input_scale written
    replaced: int = 0  # of those, layers that already had an input_scale
    unmatched_scales: list[str] = field(default_factory=list)  # scales for layers the file lacks / not quantized
    without_scale: list[str] = field(default_factory=list)  # W4A4 layers of the file that got no scale

    def summary(self) -> str:
        lines = [f"baked {len(self.baked)} input_scale(s) into {self.output} ({self.replaced} replaced)"]
        if self.unmatched_scales:
            lines.append(f"{len(self.unmatched_scales)} calibrated layer(s) are not NVFP4/FP8 layers of this file "
                         f"(first: {', '.join(self.unmatched_scales[:5])})")
        if self.without_scale:
            lines.append(f"{len(self.without_scale)} W4A4 layer(s) had no calibration and stay dynamic "
                         f"(first: {', '.join(self.without_scale[:5])})")
        return "\n".join(lines)


def bake_input_scales(source: str | Path, output: str | Path, amax: dict[str, float], *, force: bool = False,
                      provenance: dict | None = None) -> BakeReport:
    """Write `output` = `source` with `input_scale` set from the calibrated activation `amax` per layer.

    `amax[layer]` is the activation magnitude the static scale must cover (e.g. p99.9 x margin); NVFP4 layers get
    amax/2688, FP8 layers amax/448. Layers of `amax` that are not quantized layers of the file are reported, never
    silently dropped. Only single-file checkpoints are supported (bake each shard's index first with convert).
    """
    source, output = Path(source), Path(output)
    with open_checkpoint(source) as ckpt:
        if ckpt.kind != "safetensors":
            raise CheckpointError(f"{source}: bake works on a single .safetensors file, not a {ckpt.kind} model")
        layers = ckpt.layers()
        prefix = ckpt.prefix
    infos, metadata = read_header(source)

    report = BakeReport(output=output)
    scales: dict[str, float] = {}
    for layer, value in amax.items():
        lay = layers.get(layer)
        if lay is None or lay.format not in formats.QUANTIZED_FORMATS or not lay.linear:
            report.unmatched_scales.append(layer)
            continue
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"calibration for layer {layer!r} gives amax {value!r}; it must be positive")
        denom = formats.NVFP4_SCALE_DENOM if formats.is_nvfp4(lay.format) else formats.F8_E4M3_MAX
        scales[layer] = value / denom
    report.without_scale = [n for n, lay in layers.items()
                            if lay.format == formats.NVFP4 and n not in scales and lay.input_scale is None]

    # Output order: the source's tensors; a layer's new input_scale goes right after its weight.
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    plan: list[tuple[str, str | float]] = []  # (output name, raw source name | scale value)
    replaced_keys = {prefix + layer + ".input_scale" for layer in scales}
    for raw, info in infos.items():
        if raw in replaced_keys:
            report.replaced += 1
            continue
        specs.append((raw, torch_dtype(info.dtype), info.shape))
        plan.append((raw, raw))
        layer = raw[len(prefix):-len(".weight")] if raw.startswith(prefix) and raw.endswith(".weight") else None
        if layer in scales:
            specs.append((prefix + layer + ".input_scale", torch.float32, ()))
            plan.append((prefix + layer + ".input_scale", scales[layer]))
            report.baked[layer] = scales[layer]

    meta = dict(metadata)
    meta[BAKE_KEY] = json.dumps({"layers": len(report.baked), **(provenance or {})})
    from safetensors import safe_open

    with safe_open(str(source), framework="pt", device="cpu") as fh, \
            SafetensorsWriter(output, specs, meta, force=force, inputs=[source]) as writer:
        for name, what in plan:
            tensor = fh.get_tensor(what) if isinstance(what, str) else torch.tensor(what, dtype=torch.float32)
            writer.write(name, tensor)
    return report
