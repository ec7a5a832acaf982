"""Build a quantization Plan from a model, a preset and the user's rules.

Every Linear layer (2-D weight) gets exactly one format: ``nvfp4`` (W4A4), ``nvfp4-w4a16``, ``fp8`` or a kept dtype
(``bf16``/``fp16``/``fp32``). Non-2-D weights (convs, modulation, norms) are never planned; they follow the plan's
``other_dtype`` (or a per-tensor fp32 keep). Each decision carries a ``reason`` that names the rule that decided it and,
in brackets, the earlier decisions it overrode, e.g. ``w4a16: shortcut cross-attn-qkvo [over gguf: Q5_K <= Q5]``.

Precedence (later steps override earlier ones; step 1 cannot be overridden)
---------------------------------------------------------------------------
1. ``never_quantize`` (preset): kept, final. An include/fp8/w4a16/override that hits such a layer is reported.
2. Base decision, one of:
   * ``--gguf``: the GGUF's tensor types (gguf_guide): Q<=N -> nvfp4, Q>N -> fp8 (with ``fp8_instead_of_keep``) or
     keep, F16/BF16 -> keep, F32 -> keep fp32; layers missing from the GGUF -> keep (reported).
   * ``mode="all"``: nvfp4 for every Linear (the preset's keep/fp8/edge/w4a16 rules are not used).
   * ``mode="preset"``: preset ``keep_fp32`` -> keep fp32, ``keep`` -> keep, edge blocks (preset
     ``keep_first_blocks``/``keep_last_blocks``) -> keep, ``fp8`` -> fp8 (with ``fp8_instead_of_keep``) or keep,
     otherwise nvfp4.
3. Minimum size: a quantized layer with fewer than ``min_params`` parameters or a dimension below ``min_dim`` -> keep.
4. Edge blocks: ``keep_first``/``keep_last`` (first/last N blocks of *every* block group, via architecture.block_of;
   an explicit value replaces the preset's; ``gguf_keep_edge_blocks`` = 2/2 with ``--gguf``) -> keep.
5. ``min_ffn_fp8``: nvfp4 FFN up/down -> fp8 (explicit, so no ``fp8_instead_of_keep`` needed);
   then ``min_ffn2_keep``: nvfp4/fp8 FFN down -> keep.
6. ``exclude`` regexes -> keep.
7. ``include`` regexes -> nvfp4 (so include beats exclude, as in the original converter, and also the GGUF base,
   which the original let override ``-i``/``-x``).
8. ``fp8`` regexes -> fp8.
   8b. ``keep_high_variance`` (the original's ``--input-scale-summary-fp16-std``): quantized layers whose calibrated
       per-call scale has std >= ``variance_std_threshold`` (default: 90th percentile of the positive stds) or
       std/mean >= ``variance_cv_threshold`` -> keep.
   8c. ``sensitivity_threshold`` / ``clip_rate_threshold`` on a ``sensitivity`` report (``nvfp4 probe``): quantized
       layers whose measured error / clip rate exceeds it -> keep, or -> W4A16 candidate (``*_action="w4a16"``).
9. W4A16 (only turns nvfp4 into nvfp4-w4a16; hits on other formats are reported, never promoted): preset ``w4a16``
   patterns, ``w4a16`` regexes, ``w4a16_files`` lists, ``w4a16_shortcuts`` (cross-attn-kv, cross-attn-qkvo,
   self-attn-qkvo, ffn-up, ffn-down), ``w4a16_all``.
10. Input scales (input_scales.assign_input_scales): reference > calibration > value > dynamic.
11. Sensitivity / budget (``PlanOptions.sensitivity`` = a sensitivity report, ``PlanOptions.budget`` = a size or
    bits-per-weight budget): calibration.budget.plan_for_budget re-decides the layers this plan quantizes (kept and
    never_quantize layers stay). Other external planners use :func:`apply_overrides` with
    ``{layer: (format, reason)}``.

Matching: user regexes (include/exclude/fp8/w4a16) use ``re.search``, case-insensitive, on bare layer names (the
original's ``-i``/``-x`` semantics; its W4A16 patterns were case-sensitive, ours are not). Preset patterns use
``re.fullmatch``. Every user regex must match at least one Linear layer (PlanError naming it; ``allow_unmatched``
turns that into a report note). Names in lists are validated with close-match suggestions (quant.layer_lists).

Keep dtype: ``other_dtype`` when it is not ``keep``, else the source dtype; fp32-keep rules keep fp32 only when the
source is fp32 (never up-cast).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import formats
from .errors import PlanError
from .gguf_guide import KEEP, KEEP_FP32, guide_from_gguf
from .input_scales import InputScaleOptions, assign_input_scales
from .input_scales import load_calibration as load_calibration_any
from .layer_lists import describe_unknown, match_regexes, resolve_layer_list
from .plan import OTHER_DTYPES, LayerDecision, Plan, source_bytes, source_plain_format

MODES = ("preset", "all")
ACTIONS = ("keep", "w4a16")

# Architecture-independent shortcut patterns (re.search, case-sensitive): Wan names as in the original flags, plus
# the Flux (img/txt_attn, *_mlp.N) and Qwen-Image (attn.to_*, *_mlp.net.N) equivalents where they exist.
W4A16_SHORTCUTS: dict[str, str] = {
    "cross-attn-kv": r"\.cross_attn\.[kv]\b",
    "cross-attn-qkvo": r"\.cross_attn\.[qkvo]\b",
    "self-attn-qkvo": (r"\.self_attn\.[qkvo]\b|\.(img|txt)_attn\.(qkv|proj)$"
                       r"|\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)$"),
    "ffn-up": r"\.ffn\.0\b|_mlp\.0$|_mlp\.net\.0\.proj$",
    "ffn-down": r"\.ffn\.2\b|_mlp\.2$|_mlp\.net\.2$",
}
FFN_UP_DOWN = f"(?:{W4A16_SHORTCUTS['ffn-up']})|(?:{W4A16_SHORTCUTS['ffn-down']})"
FFN_DOWN = W4A16_SHORTCUTS["ffn-down"]
GGUF_EDGE_BLOCKS = 2
_QUANT = (formats.NVFP4, formats.FP8)  # working formats before W4A16 is applied


@dataclass
class PlanOptions:
    """Everything that decides a plan; see the module docstring for the precedence of the option families."""
    preset: str = "auto"                 # preset name, "auto" (preset_for(architecture)) or "none"
    mode: str = "preset"                 # "preset" | "all"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    fp8: list[str] = field(default_factory=list)
    w4a16: list[str] = field(default_factory=list)
    w4a16_files: list[str] = field(default_factory=list)
    w4a16_shortcuts: list[str] = field(default_factory=list)
    w4a16_all: bool = False
    cross_attn_w4a16: str | None = None  # "kv" | "qkvo": same as w4a16_shortcuts "cross-attn-kv"/"cross-attn-qkvo"
    keep_first: int | None = None        # None = the preset's keep_first_blocks
    keep_last: int | None = None
    min_params: int = 0
    min_dim: int = 0
    min_ffn_fp8: bool = False
    min_ffn2_keep: bool = False
    other_dtype: str = "keep"
    gguf: str | None = None
    gguf_max_bits: int = 4
    gguf_keep_edge_blocks: bool = False
    fp8_instead_of_keep: bool = False
    input_scale: InputScaleOptions = field(default_factory=InputScaleOptions)
    allow_unmatched: bool = False
    glued: str = "split"                 # glued list lines: "split" (with a note) or "error"
    keep_high_variance: bool = False     # calibrated layers with a high scale spread -> keep
    variance_std_threshold: float | None = None   # scale std (amax/2688 units); None = auto (90th percentile)
    variance_cv_threshold: float = 0.4   # std/mean of the per-call scale
    sensitivity: Any = None              # sensitivity report (`nvfp4 probe`): thresholds below, or the budget
    sensitivity_threshold: float | None = None    # nvfp4 output rel_rmse above this -> sensitivity_action
    sensitivity_action: str = "keep"     # "keep" | "w4a16"
    clip_rate_threshold: float | None = None      # activation clip rate above this -> clip_rate_action
    clip_rate_action: str = "keep"
    budget: Any = None                   # size / bpw budget: calibration.budget.plan_for_budget

    @property
    def sensitivity_report(self) -> Any:
        """Alias used by docs/DESIGN.md."""
        return self.sensitivity

    def shortcuts(self) -> list[str]:
        """The W4A16 shortcut names in effect (cross_attn_w4a16 folded in)."""
        out = list(self.w4a16_shortcuts)
        if self.cross_attn_w4a16:
            name = f"cross-attn-{self.cross_attn_w4a16}"
            if name not in out:
                out.append(name)
        return out

    def validate(self) -> None:
        """PlanError for values that cannot work (checked before the model is read)."""
        if self.mode not in MODES:
            raise PlanError(f"mode {self.mode!r} is unknown; use one of {', '.join(MODES)} (the original 'safe' mode "
                            f"is --mode preset --min-dim 256)")
        if self.other_dtype not in OTHER_DTYPES:
            raise PlanError(f"other dtype {self.other_dtype!r} is unknown; use one of {', '.join(OTHER_DTYPES)}")
        if self.cross_attn_w4a16 not in (None, "kv", "qkvo"):
            raise PlanError(f"cross_attn_w4a16 must be 'kv' or 'qkvo', not {self.cross_attn_w4a16!r}")
        for s in self.shortcuts():
            if s not in W4A16_SHORTCUTS:
                raise PlanError(f"W4A16 shortcut {s!r} is unknown; use one of {', '.join(W4A16_SHORTCUTS)}")
        for name in ("keep_first", "keep_last"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise PlanError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        for name in ("min_params", "min_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PlanError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if isinstance(self.gguf_max_bits, bool) or not isinstance(self.gguf_max_bits, int) or self.gguf_max_bits < 1:
            raise PlanError(f"--gguf-max-bits must be an integer >= 1, got {self.gguf_max_bits!r}")
        if self.gguf_keep_edge_blocks and not self.gguf:
            raise PlanError("--gguf-keep-edge-blocks needs --gguf (without a GGUF use --keep-first 2 --keep-last 2)")
        if self.gguf and self.mode == "all":
            raise PlanError("--gguf and --mode all both choose the base formats; use one of them")
        for name in ("sensitivity_action", "clip_rate_action"):
            if getattr(self, name) not in ACTIONS:
                raise PlanError(f"--{name.replace('_', '-')} must be one of {', '.join(ACTIONS)}, "
                                f"not {getattr(self, name)!r}")
        for name, low in (("sensitivity_threshold", 0.0), ("clip_rate_threshold", 0.0),
                          ("variance_std_threshold", 0.0), ("variance_cv_threshold", 0.0)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < low or (name == "sensitivity_threshold" and v == 0)):
                raise PlanError(f"--{name.replace('_', '-')} must be a finite number "
                                f"{'> 0' if name == 'sensitivity_threshold' else '>= 0'}, got {v!r}")
        thresholds = self.sensitivity_threshold is not None or self.clip_rate_threshold is not None
        if thresholds and self.sensitivity is None:
            raise PlanError("--sensitivity-threshold / --clip-rate-threshold need --sensitivity REPORT "
                            "(made by `nvfp4 probe`)")
        if self.budget is not None and self.sensitivity is None:
            raise PlanError("--budget needs --sensitivity REPORT: the budget planner chooses formats from measured "
                            "errors (`nvfp4 probe`)")
        if self.sensitivity is not None and self.budget is None and not thresholds:
            raise PlanError("--sensitivity needs --budget (size/bpw) or --sensitivity-threshold / "
                            "--clip-rate-threshold to say what to do with the report")
        if self.keep_high_variance and not self.input_scale.calibration:
            raise PlanError("--keep-high-variance needs calibration data (--input-scale-summary)")
        if self.glued not in ("split", "error"):
            raise PlanError(f"glued must be 'split' or 'error', not {self.glued!r}")
        self.input_scale.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("sensitivity", "budget"):
            v = d.get(key)
            if v is not None and not isinstance(v, (str, int, float, bool, list, dict)):
                d[key] = str(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanOptions:
        """Inverse of to_dict (unknown keys are a PlanError) - lets a saved plan's options be re-run."""
        d = dict(d)
        known = set(cls.__dataclass_fields__)
        bad = [k for k in d if k not in known]
        if bad:
            raise PlanError(f"unknown plan option(s): {', '.join(bad)}")
        if isinstance(d.get("input_scale"), Mapping):
            d["input_scale"] = InputScaleOptions(**d["input_scale"])
        return cls(**d)


class _NoPreset:
    """Stand-in for `--preset none`: no preset rules at all."""
    name = "none"
    family = ""
    description = "no preset rules"
    never_quantize = keep = keep_fp32 = fp8 = w4a16 = ()
    keep_first_blocks = keep_last_blocks = 0


# ---- helpers -------------------------------------------------------------------------------------------------

class _Work:
    """Per-layer working state: the current format token and the chain of rules that set it."""
    __slots__ = ("name", "shape", "fmt", "steps", "locked", "fp32")

    def __init__(self, name: str, shape: tuple[int, ...]):
        self.name, self.shape = name, shape
        self.fmt = formats.NVFP4
        self.steps: list[tuple[str, str]] = []   # (reason, format token)
        self.locked = False
        self.fp32 = False

    def set(self, fmt: str, reason: str) -> None:
        self.fmt = fmt
        self.fp32 = fmt == KEEP_FP32
        self.steps.append((reason, fmt))

    def reason(self) -> str:
        final = self.steps[-1][0]
        earlier = [r for r, _ in self.steps[:-1]]
        if earlier:
            final += " [over " + " < ".join(reversed([_short(r) for r in earlier])) + "]"
        return final


def _short(reason: str) -> str:
    return reason.split(" (", 1)[0]


def _rule_hits(rules: Any, name: str) -> Any:
    """First preset Rule whose pattern fullmatches `name`, else None."""
    for rule in rules or ():
        pattern = getattr(rule, "pattern", rule)
        if re.fullmatch(pattern, name):
            return rule
    return None


def _why(rule: Any, limit: int = 72) -> str:
    pattern = getattr(rule, "pattern", rule)
    why = " ".join(str(getattr(rule, "why", "") or "").split())
    if len(why) > limit:
        why = why[: limit - 3].rstrip() + "..."
    return f"/{pattern}/" + (f" ({why})" if why else "")


def _resolve_arch_and_preset(ckpt: Any, options: PlanOptions, arch: Any, preset: Any) -> tuple[Any, Any]:
    if arch is None:
        from .architecture import detect_architecture
        arch = detect_architecture({n: tuple(ckpt.info(n).shape) for n in ckpt.names()})
    if getattr(arch, "naming", "comfyui") == "diffusers":
        raise PlanError(f"this checkpoint uses diffusers key names ({getattr(arch, 'variant', '?')}); ComfyUI loads "
                        f"quantized models only under its own names. Use the ComfyUI-format release as the source")
    if preset is None:
        from .presets import load_preset, preset_for, preset_names
        names = list(preset_names())
        if options.preset == "none":
            preset = _NoPreset()
        elif options.preset == "auto":
            wanted = getattr(arch, "preset", None)
            if wanted not in names:
                raise PlanError(f"no preset for this architecture ({getattr(arch, 'family', '?')}, "
                                f"{getattr(arch, 'variant', '?')}); pass --preset NAME ({', '.join(names)}), or "
                                f"--preset none to decide every Linear layer with your own rules")
            preset = preset_for(arch)
            if isinstance(preset, str):
                preset = load_preset(preset)
        elif options.preset in names or str(options.preset).endswith(".json"):
            preset = load_preset(options.preset)
        else:
            from .layer_lists import suggest
            close = suggest(options.preset, names, n=1)
            raise PlanError(f"preset {options.preset!r} is unknown"
                            f"{' (did you mean ' + repr(close[0]) + '?)' if close else ''}; "
                            f"available: {', '.join(names)}, none, or the path of a preset .json file")
    return arch, preset


def _block_positions(names: list[str], arch: Any,
                     block_of: Callable[[str, Any], Any] | None) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """layer -> (group, index) and group -> block count, for every block group of the architecture."""
    pos: dict[str, tuple[str, int]] = {}
    if block_of is None:
        from .architecture import block_of as _bo
        block_of = _bo
    for n in names:
        b = block_of(n, arch)
        if b is not None:
            pos[n] = (b[0], int(b[1]))
    counts: dict[str, int] = {}
    for group, idx in pos.values():
        counts[group] = max(counts.get(group, 0), idx + 1)
    for group, n in (getattr(arch, "block_groups", None) or {}).items():
        counts[group] = max(counts.get(group, 0), int(n))
    return pos, counts


def _edge(pos: tuple[str, int] | None, counts: Mapping[str, int], first: int, last: int) -> str | None:
    if pos is None:
        return None
    group, idx = pos
    n = counts.get(group, idx + 1)
    if idx < first:
        return f"{group}.{idx} is among the first {first} of {n} {group}"
    if idx >= n - last:
        return f"{group}.{idx} is among the last {last} of {n} {group}"
    return None


# ---- main entry ----------------------------------------------------------------------------------------------

def build_plan(ckpt: Any, options: PlanOptions, *, arch: Any = None, preset: Any = None,
               block_of: Callable[[str, Any], Any] | None = None) -> Plan:
    """Decide a format for every Linear layer of `ckpt` (see the module docstring for the rules and precedence).

    `arch`, `preset` and `block_of` default to architecture.detect_architecture / presets.preset_for or load_preset /
    architecture.block_of; callers that already have them (nodes, tests) may pass them in.
    """
    options.validate()
    all_layers = ckpt.layers()
    linear = {n: l for n, l in all_layers.items() if l.linear}
    if not linear:
        raise PlanError(f"{Path(getattr(ckpt, 'path', 'model')).name}: no Linear (2-D) weights; nothing to plan")
    arch, preset = _resolve_arch_and_preset(ckpt, options, arch, preset)
    non_linear = [n for n in all_layers if n not in linear]
    names = list(linear)
    notes: list[str] = []
    warnings: list[str] = []
    family = getattr(arch, "family", None)
    pfam = getattr(preset, "family", "")
    if pfam and family and pfam != family and options.preset != "auto":
        warnings.append(f"preset {preset.name!r} is for {pfam} models but this model looks like {family}")

    work = {n: _Work(n, tuple(l.shape)) for n, l in linear.items()}

    # 1. never_quantize
    for n, w in work.items():
        rule = _rule_hits(preset.never_quantize, n)
        if rule is not None:
            w.set(KEEP, f"never_quantize: preset {preset.name} {_why(rule)}")
            w.locked = True
    free = [w for w in work.values() if not w.locked]

    # 2. base decision
    guide = None
    pos, counts = _block_positions(names, arch, block_of)
    if options.gguf:
        model_tensors = {t: tuple(ckpt.info(t).shape) for t in ckpt.names()}
        guide = guide_from_gguf(options.gguf, model_tensors, {n: tuple(l.shape) for n, l in linear.items()},
                                max_bits=options.gguf_max_bits, allow_fp8=options.fp8_instead_of_keep)
        notes.extend(guide.notes())
        gname = Path(options.gguf).name
        for w in free:
            c = guide.choices.get(w.name)
            if c is None:
                w.set(KEEP, f"gguf: not in {gname}")
            else:
                w.set(c.kind, c.reason)
    elif options.mode == "all":
        for w in free:
            w.set(formats.NVFP4, "mode all: every Linear layer")
    else:
        pfirst = preset.keep_first_blocks if options.keep_first is None else 0
        plast = preset.keep_last_blocks if options.keep_last is None else 0
        fp8_ok = options.fp8_instead_of_keep
        for w in free:
            r = _rule_hits(preset.keep_fp32, w.name)
            if r is not None:
                w.set(KEEP_FP32, f"preset.keep_fp32: {_why(r)}")
                continue
            r = _rule_hits(preset.keep, w.name)
            if r is not None:
                w.set(KEEP, f"preset.keep: {_why(r)}")
                continue
            e = _edge(pos.get(w.name), counts, pfirst or 0, plast or 0)
            if e is not None:
                w.set(KEEP, f"preset.edge_blocks: {e}")
                continue
            r = _rule_hits(preset.fp8, w.name)
            if r is not None:
                if fp8_ok:
                    w.set(formats.FP8, f"preset.fp8: {_why(r)} (fp8 allowed)")
                else:
                    w.set(KEEP, f"preset.fp8: {_why(r)} (kept: fp8 not allowed, --use-fp8)")
                continue
            w.set(formats.NVFP4, f"preset {preset.name}: default nvfp4")

    # 3. minimum size
    if options.min_params or options.min_dim:
        for w in free:
            if w.fmt in _QUANT:
                params = math.prod(w.shape)
                if params < options.min_params:
                    w.set(KEEP, f"min_params: {params} params < {options.min_params}")
                elif min(w.shape) < options.min_dim:
                    w.set(KEEP, f"min_dim: dimension {min(w.shape)} < {options.min_dim}")

    # 4. edge blocks (explicit, or the GGUF 2/2 shortcut)
    first, last = options.keep_first, options.keep_last
    if options.gguf and options.gguf_keep_edge_blocks:
        first = GGUF_EDGE_BLOCKS if first is None else first
        last = GGUF_EDGE_BLOCKS if last is None else last
    if (first or last) and not pos:
        raise PlanError("--keep-first/--keep-last: the architecture has no numbered blocks "
                        f"({getattr(arch, 'family', '?')}); nothing to keep")
    if first or last:
        tag = "gguf_keep_edge_blocks" if options.gguf_keep_edge_blocks and options.keep_first is None else "keep_edge"
        for w in free:
            if w.fmt in _QUANT:
                e = _edge(pos.get(w.name), counts, first or 0, last or 0)
                if e is not None:
                    w.set(KEEP, f"{tag}: {e}")

    # 5. FFN shortcuts of the original
    if options.min_ffn_fp8:
        rx = re.compile(FFN_UP_DOWN)
        hit = [w for w in free if w.fmt == formats.NVFP4 and rx.search(w.name)]
        if not hit:
            _unmatched(options, notes, "--min-ffn-fp8 matches no nvfp4 FFN layer")
        for w in hit:
            w.set(formats.FP8, "min_ffn_fp8: FFN up/down -> fp8")
    if options.min_ffn2_keep:
        rx = re.compile(FFN_DOWN)
        hit = [w for w in free if w.fmt in _QUANT and rx.search(w.name)]
        if not hit:
            _unmatched(options, notes, "--min-ffn2-keep matches no quantized FFN down-projection")
        for w in hit:
            w.set(KEEP, "min_ffn2_keep: FFN down -> keep")

    # 6-8. user regexes
    def user_rule(patterns: list[str], what: str, fmt: str) -> None:
        hits = match_regexes(patterns, names, what=what, allow_unmatched=options.allow_unmatched,
                             other_names=non_linear, notes=notes)
        for pattern, layers in hits.items():
            locked = [n for n in layers if work[n].locked]
            if locked and fmt != KEEP:
                warnings.append(f"{what} /{pattern}/ hits {len(locked)} never_quantize layer(s) (kept): "
                                f"{', '.join(locked[:5])}")
            for n in layers:
                if not work[n].locked:
                    work[n].set(fmt, f"{what}: /{pattern}/")

    user_rule(options.exclude, "exclude", KEEP)
    user_rule(options.include, "include", formats.NVFP4)
    user_rule(options.fp8, "fp8", formats.FP8)

    # 8b. high-variance keep (calibration statistics), 8c. sensitivity thresholds (probe report)
    cal_obj = None
    if options.input_scale.calibration:
        from .input_scales import load_calibration
        cal_obj = load_calibration(options.input_scale.calibration)
    w4_from_report: list[tuple[str, list[str]]] = []
    if options.keep_high_variance:
        _high_variance(work, free, cal_obj, options, notes)
    if options.sensitivity_threshold is not None or options.clip_rate_threshold is not None:
        w4_from_report = _sensitivity_thresholds(work, free, options, notes, all_layers)

    # 9. W4A16
    w4_reasons: dict[str, str] = {}    # layer -> first W4A16 rule that hit it (any format)
    w4_sources: list[tuple[str, list[str]]] = []
    for rule in preset.w4a16 or ():
        hits = [n for n in names if re.fullmatch(getattr(rule, "pattern", rule), n)]
        if hits:
            w4_sources.append((f"preset.w4a16: {_why(rule)}", hits))
    if options.w4a16:
        for pattern, hits in match_regexes(options.w4a16, names, what="w4a16", allow_unmatched=options.allow_unmatched,
                                           other_names=non_linear, notes=notes).items():
            w4_sources.append((f"w4a16: /{pattern}/", hits))
    all_names = set(all_layers)
    for path in options.w4a16_files:
        lst = resolve_layer_list(path, all_names, glued=options.glued, allow_unknown=options.allow_unmatched)
        notes.extend(lst.notes)
        label = Path(path).name
        nonlin = [e.name for e in lst.entries if e.name not in linear]
        if nonlin:
            notes.append(f"w4a16 list {label}: {len(nonlin)} name(s) are not Linear layers (no W4A16 effect): "
                         f"{', '.join(nonlin[:5])}{' ...' if len(nonlin) > 5 else ''}")
        lin = [e for e in lst.entries if e.name in linear]
        if not lin and not options.allow_unmatched:
            raise PlanError(f"w4a16 list {path}: none of its {len(lst.entries)} names is a Linear layer of the model")
        for e in lin:
            w4_sources.append((f"w4a16: list {label} line {e.line}" + (" (glued line split)" if e.glued else ""),
                               [e.name]))
    for short in options.shortcuts():
        rx = re.compile(W4A16_SHORTCUTS[short])
        hits = [n for n in names if rx.search(n)]
        if not hits:
            _unmatched(options, notes, f"W4A16 shortcut {short} matches no Linear layer of this "
                                       f"{family or 'model'} (/{W4A16_SHORTCUTS[short]}/)")
        w4_sources.append((f"w4a16: shortcut {short}", hits))
    w4_sources.extend(w4_from_report)
    if options.w4a16_all:
        w4_sources.append(("w4a16: all nvfp4 layers", list(names)))

    not_nvfp4: dict[str, list[tuple[str, str]]] = {}
    for reason, hits in w4_sources:
        src = reason.split(" line ", 1)[0]
        for n in hits:
            w = work[n]
            if w.fmt == formats.NVFP4:
                w.set(formats.NVFP4_W4A16, reason)
                w4_reasons[n] = reason
            elif n not in w4_reasons and w.fmt != formats.NVFP4_W4A16 and not src.startswith("w4a16: all"):
                not_nvfp4.setdefault(src, []).append((n, _label(w.fmt)))
    for src, items in not_nvfp4.items():
        c = Counter(f for _, f in items)
        parts = ", ".join(f"{fmt} {k}" for fmt, k in c.items())
        ex = ", ".join(f"{n} ({f})" for n, f in items[:4]) + (" ..." if len(items) > 4 else "")
        notes.append(f"{src}: {len(items)} matched layer(s) are not nvfp4 here ({parts}), left as they are (W4A16 "
                     f"applies only to nvfp4 weights): {ex}")

    # finalize formats
    layers: dict[str, LayerDecision] = {}
    for n, w in work.items():
        fmt = _concrete(w.fmt, ckpt, linear[n], options.other_dtype)
        layers[n] = LayerDecision(layer=n, format=fmt, reason=w.reason(), shape=tuple(w.shape))

    # non-planned tensors that stay fp32
    tensor_dtypes: dict[str, str] = {}
    fp32_names = set(guide.fp32_tensors) if guide is not None else set()
    for lname, layer in all_layers.items():
        if lname not in linear and _rule_hits(preset.keep_fp32, lname) is not None:
            fp32_names.update(layer.keys)
    for t in sorted(fp32_names):
        if ckpt.info(t).dtype in ("F32", "F64", "gguf:F32") and options.other_dtype not in ("keep", formats.FP32):
            tensor_dtypes[t] = formats.FP32

    src_codes = Counter(ckpt.info(_weight_key(l)).dtype for l in linear.values())
    plan = Plan(
        source={"file": Path(getattr(ckpt, "path", "model")).name, "header_sha256": ckpt.header_hash(),
                "architecture": family, "variant": getattr(arch, "variant", None),
                "dtype": source_plain_format(src_codes.most_common(1)[0][0]) if src_codes else None},
        preset=getattr(preset, "name", str(options.preset)),
        layers=layers, other_dtype=options.other_dtype, options=options.to_dict(), tensor_dtypes=tensor_dtypes,
        report={"notes": [], "warnings": warnings},
    )
    plan.notes.extend(getattr(ckpt, "notes", []))  # e.g. a full checkpoint's VAE / text encoders are left out
    plan.notes.extend(warnings)
    plan.notes.extend(notes)
    if guide is not None:
        plan.report["gguf"] = guide.to_report()

    # 10. input scales (before the budget planner: it reads the base plan's static scales)
    assign_input_scales(plan, options.input_scale, known_layers=all_names, allow_unmatched=options.allow_unmatched,
                        load_calibration_fn=(lambda _p: cal_obj) if cal_obj is not None else load_calibration_any)

    # 11. sensitivity / budget planner (calibration/budget.py) re-decides the quantized layers
    if options.budget is not None:
        plan = _run_budget(plan, ckpt, options)

    plan.report["input_bytes"] = source_bytes(ckpt)
    plan.report["output_bytes"] = plan.estimated_bytes(ckpt)
    if not plan.report.get("warnings", True):
        del plan.report["warnings"]
    return plan


def _label(fmt: str) -> str:
    return {KEEP: "kept", KEEP_FP32: "kept fp32"}.get(fmt, fmt)


def _unmatched(options: PlanOptions, notes: list[str], msg: str) -> None:
    if not options.allow_unmatched:
        raise PlanError(msg + " (pass allow_unmatched / --allow-unmatched to ignore)")
    notes.append(msg + "; ignored (allow_unmatched)")


def _concrete(token: str, ckpt: Any, layer: Any, other_dtype: str) -> str:
    """Resolve KEEP / KEEP_FP32 into bf16/fp16/fp32; quantized formats pass through."""
    if token not in (KEEP, KEEP_FP32):
        return token
    code = ckpt.info(_weight_key(layer)).dtype
    src = source_plain_format(code) if layer.format not in formats.QUANTIZED_FORMATS else formats.BF16
    if token == KEEP_FP32 and src == formats.FP32:
        return formats.FP32
    return src if other_dtype == "keep" else other_dtype


def _high_variance(work: Mapping[str, _Work], free: list[_Work], cal: Any, options: PlanOptions,
                   notes: list[str]) -> None:
    """The original's --input-scale-summary-fp16-std: layers whose per-call scale spreads widely are kept.

    Flag = scale std >= std threshold (default: the positive stds' value at index int((n-1)*0.9), as the original)
    or std/mean >= cv threshold; rows with mean <= 0 are skipped. Statistics come from the calibration data the
    input scales use (a summary's own scale_std/scale_mean columns, or a store's amax moments / 2688)."""
    stats = _scale_stats(cal)
    if not stats:
        raise PlanError(f"{options.input_scale.calibration}: no per-layer spread statistics for --keep-high-variance")
    stds = sorted(s for s, _ in stats.values() if s > 0)
    thr = options.variance_std_threshold
    auto = thr is None
    if auto:
        thr = stds[int((len(stds) - 1) * 0.9)] if stds else math.inf
    cv_thr = options.variance_cv_threshold
    flagged = [n for n, (std, mean) in stats.items() if mean > 0 and (std >= thr or std / mean >= cv_thr)]
    moved = 0
    for n in flagged:
        w = work.get(n)
        if w is not None and not w.locked and w.fmt in _QUANT:
            cv = stats[n][0] / stats[n][1]
            w.set(KEEP, f"high_variance: scale std {stats[n][0]:.3g}, cv {cv:.3g} (std >= {thr:.4g} or cv >= "
                        f"{cv_thr:g})")
            moved += 1
    notes.append(f"high variance: {len(flagged)} calibrated layer(s) flagged (scale std >= {thr:.4g}"
                 f"{' (auto, 90th percentile)' if auto else ''} or cv >= {cv_thr:g}); {moved} quantized -> keep")


def _scale_stats(cal: Any) -> dict[str, tuple[float, float]]:
    """layer -> (std, mean) of the per-call input scale (amax/2688)."""
    out: dict[str, tuple[float, float]] = {}
    rows = getattr(cal, "rows", None)
    if rows is not None:   # LegacySummary: its own columns, exactly what the original thresholded
        for row in rows:
            std, mean = row.get("scale_std"), row.get("scale_mean")
            if std is None and row.get("amax_std") is not None:
                std = row["amax_std"] / formats.NVFP4_SCALE_DENOM
            if mean is None and row.get("amax_mean") is not None:
                mean = row["amax_mean"] / formats.NVFP4_SCALE_DENOM
            if std is not None and mean is not None and math.isfinite(std) and math.isfinite(mean):
                out[row["layer"]] = (float(std), float(mean))
        return out
    for name, st in getattr(cal, "layers", {}).items():
        std, mean = getattr(st, "std", None), getattr(st, "mean", None)
        if std is not None and mean is not None and math.isfinite(std) and math.isfinite(mean):
            out[name] = (std / formats.NVFP4_SCALE_DENOM, mean / formats.NVFP4_SCALE_DENOM)
    return out


def _sensitivity_thresholds(work: Mapping[str, _Work], free: list[_Work], options: PlanOptions, notes: list[str],
                            all_layers: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """The original's --sensitivity-threshold / --clip-rate-threshold with their actions, on an `nvfp4 probe`
    report (measured output error; the original's input-only, random-input JSON is refused by its loader)."""
    from ..calibration.sensitivity import FP8_STATIC, NVFP4_STATIC, SensitivityReport
    rep = options.sensitivity
    report = rep if isinstance(rep, SensitivityReport) else SensitivityReport.load(rep)
    entries = report.by_layer()
    unknown = [n for n in entries if n not in all_layers]
    if unknown:
        msg = describe_unknown(unknown, list(all_layers), what=f"sensitivity report {options.sensitivity}")
        if not options.allow_unmatched:
            raise PlanError(msg + "; was it made for another model?")
        notes.append(msg + "; ignored (allow_unmatched)")
    static = bool(options.input_scale.calibration or options.input_scale.reference or options.input_scale.value)
    w4: list[tuple[str, list[str]]] = []
    unjudged = []
    counts = {"keep": 0, "w4a16": 0}
    for w in free:
        entry = entries.get(w.name)
        if entry is None or w.fmt not in _QUANT:
            continue
        if w.fmt == formats.NVFP4:
            cands = (NVFP4_STATIC, formats.NVFP4) if static else (formats.NVFP4, NVFP4_STATIC)
        else:
            cands = (FP8_STATIC, formats.FP8) if options.input_scale.fp8 else (formats.FP8, FP8_STATIC)
        for metric, thr, action, label in (("rel_rmse", options.sensitivity_threshold, options.sensitivity_action,
                                            "sensitivity"),
                                           ("clip_rate", options.clip_rate_threshold, options.clip_rate_action,
                                            "clip_rate")):
            if thr is None:
                continue
            value = next((v for c in cands if (v := entry.error(c, metric)) is not None), None)
            if value is None:
                unjudged.append(w.name)
                continue
            if value > thr:
                reason = f"{label}: {metric} {value:.3g} > {thr:g}"
                if action == "keep":
                    w.set(KEEP, reason)
                    counts["keep"] += 1
                    break
                w4.append((f"w4a16: {reason}", [w.name]))
                counts["w4a16"] += 1
    notes.append(f"sensitivity report {Path(str(options.sensitivity)).name}: {counts['keep']} layer(s) -> keep, "
                 f"{counts['w4a16']} -> W4A16 candidates")
    if unjudged:
        u = sorted(set(unjudged))
        notes.append(f"sensitivity report: {len(u)} quantized layer(s) have no finite measurement and were not "
                     f"judged: {', '.join(u[:5])}{' ...' if len(u) > 5 else ''}")
    return w4


def _weight_key(layer: Any) -> str:
    roles = getattr(layer, "roles", None)
    return roles["weight"] if roles and "weight" in roles else f"{layer.name}.weight"


def _run_budget(plan: Plan, ckpt: Any, options: PlanOptions) -> Plan:
    """Extension point: hand the rule-based plan to calibration.budget.plan_for_budget (sensitivity + budget)."""
    try:
        from ..calibration.budget import plan_for_budget
    except ImportError as exc:  # pragma: no cover - only in a broken install
        raise PlanError(f"the budget planner is not available ({exc})") from None
    new_plan, _curve = plan_for_budget(plan, options.sensitivity, options.budget, ckpt)
    return new_plan


def _family(fmt: str) -> str:
    return "nvfp4" if formats.is_nvfp4(fmt) else ("fp8" if fmt in formats.FP8_DTYPES else "plain")


def apply_overrides(plan: Plan, overrides: Mapping[str, tuple[str, str]], *, source: str = "override") -> list[str]:
    """Set layer formats from an external planner (sensitivity report, budget): `{layer: (format, reason)}`.

    The extension point for calibration/budget.py. Validates every name (unknown -> PlanError with suggestions) and
    format; `"keep"` means the plan's other dtype or, with other_dtype "keep", the source's dominant dtype. Layers under
    `never_quantize` are not changed (reported). Static input scales of layers leaving their format family are
    cleared; re-run input_scales.assign_input_scales to give new NVFP4 layers a scale. Returns the changed layers.
    """
    unknown = [n for n in overrides if n not in plan.layers]
    if unknown:
        raise PlanError(describe_unknown(unknown, list(plan.layers), what=f"{source} overrides (apply_overrides)"))
    changed: list[str] = []
    refused: list[str] = []
    for name, value in overrides.items():
        try:
            fmt, reason = value
        except (TypeError, ValueError):
            raise PlanError(f"{source} override for {name!r} must be (format, reason), got {value!r}") from None
        if fmt == "keep":
            fmt = plan.other_dtype if plan.other_dtype != "keep" else (plan.source.get("dtype") or formats.BF16)
        if fmt not in formats.ALL_FORMATS:
            raise PlanError(f"{source} override for {name!r}: {fmt!r} is not a format "
                            f"({', '.join(formats.ALL_FORMATS)}, keep)")
        dec = plan.layers[name]
        if dec.rule == "never_quantize":
            if fmt != dec.format:
                refused.append(name)
            continue
        if fmt == dec.format:
            continue
        old = dec.format
        dec.reason = f"{source}: {reason} [over {_short(dec.reason)} -> {old}]"
        dec.format = fmt
        if _family(old) != _family(fmt):
            dec.input_scale = None
            dec.input_scale_source = None
        changed.append(name)
    if refused:
        plan.notes.append(f"{source}: {len(refused)} override(s) hit never_quantize layers and were not applied: "
                          f"{', '.join(refused[:5])}")
    if changed:
        plan.notes.append(f"{source}: {len(changed)} layer(s) changed by overrides")
    return changed
