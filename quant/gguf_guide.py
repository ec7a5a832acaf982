"""GGUF-guided format choice: copy the precision decisions of a GGUF quant of the same model.

Why: a GGUF K-quant mix (city96 / QuantStack / unsloth) is a proven "which layers matter" prior: attention V and FFN
down-projections get more bits than the rest. We read the tensor types of such a file and map them per layer:

==================  =====================================================================
GGUF type           decision
==================  =====================================================================
Q<n> (n <= max)     nvfp4        (Q4_K, IQ4_XS, Q4_0, Q5_K with max 5, MXFP4 = 4 bits ...)
Q<n> (n > max)      fp8 when fp8 is allowed (``--use-fp8``), else keep (source dtype)
F16 / BF16          keep (source dtype, or the plan's other dtype)
F32 / F64           keep in fp32 (only when the source is fp32: we never up-cast)
anything else       keep, and reported
==================  =====================================================================

Names: city96's convention (ComfyUI-GGUF ``tools/convert.py`` and its loader) keeps the original state-dict key names
for image/video models (Wan, Flux, Qwen-Image, ...); some files carry a ``model.diffusion_model.`` or
``diffusion_model.`` prefix, which we strip. No other renames are applied: a GGUF in llama.cpp naming (``blk.N.*``)
or diffusers naming of a ComfyUI-named source is a different key map and is refused as "a different model" below,
rather than half-matched. Extra rename rules can be passed (``renames``) for one-off files.

Safety (the original silently quantized nothing on a name mismatch): model Linear layers missing from the GGUF and
GGUF tensors missing from the model are counted and reported with examples; a Linear shape mismatch or a name overlap
below 50 % (either direction) raises PlanError: the GGUF is of a different model.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import formats
from .errors import PlanError

GGUF_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
MIN_OVERLAP = 0.5

# Decision kinds (resolved to a concrete dtype by rules.build_plan, which knows the source dtypes).
KEEP = "keep"
KEEP_FP32 = "keep-fp32"

_BITS_RX = re.compile(r"^(?:IQ|TQ|Q)(\d+)", re.IGNORECASE)


def gguf_type_bits(type_name: str) -> int | None:
    """Bits of a quantized GGUF type name (Q5_K -> 5, IQ4_XS -> 4, Q8_0 -> 8, MXFP4 -> 4); None for F16/F32 etc."""
    t = type_name.upper().removeprefix("GGUF:")
    m = _BITS_RX.match(t)
    if m:
        return int(m.group(1))
    if t in ("MXFP4", "NVFP4"):
        return 4
    return None


def strip_gguf_name(name: str, renames: Sequence[tuple[str, str]] = ()) -> str:
    """Source-style bare tensor name of a GGUF tensor name (prefix stripped, optional regex renames applied)."""
    for prefix in GGUF_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    for pattern, repl in renames:
        name = re.sub(pattern, repl, name)
    return name


@dataclass
class GGUFChoice:
    """What a GGUF tensor type means for one Linear layer."""
    layer: str
    kind: str            # formats.NVFP4 | formats.FP8 | KEEP | KEEP_FP32
    gguf_type: str       # e.g. "Q5_K"
    reason: str


@dataclass
class GGUFGuide:
    """Per-layer choices read from a GGUF, plus everything that did not map (for the plan report)."""
    path: str
    choices: dict[str, GGUFChoice] = field(default_factory=dict)
    fp32_tensors: set[str] = field(default_factory=set)       # non-Linear-weight tensors stored F32 in the GGUF
    missing: list[str] = field(default_factory=list)           # model Linear layers with no GGUF tensor
    extra: list[str] = field(default_factory=list)             # GGUF tensors the model lacks (bare names)
    other_types: dict[str, str] = field(default_factory=dict)  # Linear layer -> GGUF type we do not map
    type_counts: dict[str, int] = field(default_factory=dict)  # GGUF type -> matched Linear layers

    def notes(self) -> list[str]:
        """Plan-report lines: type histogram, and every mismatch as count + examples."""
        name = Path(self.path).name
        out = [f"gguf {name}: {len(self.choices)} Linear layers matched ("
               + ", ".join(f"{t} {n}" for t, n in sorted(self.type_counts.items())) + ")"]
        if self.missing:
            out.append(f"gguf {name}: {len(self.missing)} Linear layer(s) of the model are not in the GGUF and are "
                       f"kept: {_examples(self.missing)}")
        if self.extra:
            out.append(f"gguf {name}: {len(self.extra)} GGUF tensor(s) are not in the model (ignored): "
                       f"{_examples(self.extra)}")
        if self.other_types:
            items = [f"{k} ({v})" for k, v in self.other_types.items()]
            out.append(f"gguf {name}: {len(items)} layer(s) have a GGUF type we do not map and are kept: "
                       f"{_examples(items)}")
        return out

    def to_report(self) -> dict:
        return {"file": Path(self.path).name, "matched": len(self.choices), "types": dict(self.type_counts),
                "missing": len(self.missing), "missing_examples": self.missing[:5], "extra": len(self.extra),
                "extra_examples": self.extra[:5], "unmapped_types": dict(list(self.other_types.items())[:20])}


def _examples(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n})" if len(items) > n else "")


def _shape_ok(gguf_shape: Sequence[int], model_shape: Sequence[int]) -> bool:
    # Checkpoint.info() gives GGUF shapes in logical (torch) order, already un-reversed from ggml's order.
    return tuple(int(s) for s in gguf_shape) == tuple(int(s) for s in model_shape)


def guide_from_gguf(gguf: Any, model_tensors: Mapping[str, Sequence[int]], linear_layers: Mapping[str, Sequence[int]],
                    *, max_bits: int = 4, allow_fp8: bool = False,
                    renames: Sequence[tuple[str, str]] = ()) -> GGUFGuide:
    """Read the GGUF (a Checkpoint of kind "gguf", or a path) and choose a format per Linear layer.

    `model_tensors`: bare tensor name -> shape of the source model; `linear_layers`: Linear layer name -> weight shape.
    Raises PlanError for a GGUF of another model (Linear shape mismatch, or < 50 % name overlap in either direction).
    """
    if isinstance(max_bits, bool) or not isinstance(max_bits, int) or max_bits < 1:
        raise PlanError(f"--gguf-max-bits must be an integer >= 1, got {max_bits!r}")
    ckpt, close = _open(gguf)
    try:
        path = str(getattr(ckpt, "path", gguf))
        kind = getattr(ckpt, "kind", "gguf")
        if kind != "gguf":
            raise PlanError(f"{path}: --gguf needs a .gguf file, this is a {kind} checkpoint")
        types: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for raw in ckpt.names():
            info = ckpt.info(raw)
            bare = strip_gguf_name(raw, renames)
            types[bare] = str(info.dtype).removeprefix("gguf:")
            shapes[bare] = tuple(int(s) for s in info.shape)
    finally:
        if close:
            close()

    guide = GGUFGuide(path=path)
    label = Path(path).name
    mismatched = []
    for layer, shape in linear_layers.items():
        key = f"{layer}.weight"
        if key not in types:
            guide.missing.append(layer)
            continue
        if not _shape_ok(shapes[key], shape):
            mismatched.append((layer, shapes[key], tuple(shape)))
            continue
        t = types[key]
        guide.type_counts[t] = guide.type_counts.get(t, 0) + 1
        bits = gguf_type_bits(t)
        if bits is not None:
            if bits <= max_bits:
                guide.choices[layer] = GGUFChoice(layer, formats.NVFP4, t, f"gguf: {t} <= Q{max_bits} ({label})")
            elif allow_fp8:
                guide.choices[layer] = GGUFChoice(layer, formats.FP8, t,
                                                  f"gguf: {t} > Q{max_bits}, fp8 allowed ({label})")
            else:
                guide.choices[layer] = GGUFChoice(layer, KEEP, t, f"gguf: {t} > Q{max_bits}, fp8 not allowed "
                                                                  f"(--use-fp8) ({label})")
        elif t.upper() in ("F16", "BF16"):
            guide.choices[layer] = GGUFChoice(layer, KEEP, t, f"gguf: {t} ({label})")
        elif t.upper() in ("F32", "F64"):
            guide.choices[layer] = GGUFChoice(layer, KEEP_FP32, t, f"gguf: {t} ({label})")
        else:
            guide.other_types[layer] = t
            guide.choices[layer] = GGUFChoice(layer, KEEP, t, f"gguf: unmapped type {t} ({label})")

    if mismatched:
        layer, g, m = mismatched[0]
        raise PlanError(f"{path}: a GGUF of a different model: {len(mismatched)} Linear weight shape(s) differ, e.g. "
                        f"{layer} is {list(g)} in the GGUF but {list(m)} in the model; use a GGUF of the same model")

    n_linear = len(linear_layers)
    matched = len(guide.choices)
    gguf_2d = [k for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    gguf_in_model = sum(1 for k in gguf_2d if k[: -len(".weight")] in linear_layers)
    if n_linear == 0 or matched / n_linear < MIN_OVERLAP or (gguf_2d and gguf_in_model / len(gguf_2d) < MIN_OVERLAP):
        examples = ", ".join(sorted(types)[:3])
        raise PlanError(
            f"{path}: a GGUF of a different model (or another naming): only {matched} of {n_linear} Linear layers of "
            f"the model and {gguf_in_model} of {len(gguf_2d)} GGUF 2-D weights match by name (need >= "
            f"{MIN_OVERLAP:.0%}); GGUF names look like {examples}")

    model_names = set(model_tensors)
    linear_keys = {f"{l}.weight" for l in linear_layers}
    for bare, t in types.items():
        if bare not in model_names:
            guide.extra.append(bare)
            continue
        if bare not in linear_keys and t.upper() in ("F32", "F64"):
            m_shape = model_tensors[bare]
            if math.prod(m_shape) == math.prod(shapes[bare]):
                guide.fp32_tensors.add(bare)
    return guide


def _open(gguf: Any):
    if hasattr(gguf, "names") and hasattr(gguf, "info"):
        return gguf, None
    p = Path(gguf)
    if not p.exists():
        raise PlanError(f"{p}: GGUF file not found")
    from .checkpoint import open_checkpoint
    ck = open_checkpoint(p)
    return ck, getattr(ck, "close", None)


def type_histogram(guide: GGUFGuide) -> Counter:
    """GGUF type -> count of matched Linear layers (for tests and reports)."""
    return Counter(c.gguf_type for c in guide.choices.values())
