"""A quantization plan: one decision per Linear layer, with the reason, saved as JSON and loaded back.

Why a separate, editable artefact: the decision of *what* to quantize is cheap and reviewable, the conversion is slow.
A plan is printed as a table before anything is written, can be hand-edited (and is validated on load, with a clear
PlanError for every mistake), and is checked against the model it is applied to.

JSON schema (version 1)::

    {"version": 1,
     "source": {"file": "<name, no folders>", "header_sha256": "...", "architecture": "wan", "variant": "..."},
     "preset": "wan",
     "other_dtype": "keep" | "bf16" | "fp16" | "fp32",
     "options": {...the PlanOptions that produced it...},
     "layers": {"blocks.0.ffn.0": {"format": "nvfp4", "reason": "...", "shape": [out, in],
                                   "input_scale": 0.0004 | null, "input_scale_source": "summary:..." | null}, ...},
     "tensors": {"patch_embedding.weight": "fp32", ...},     # optional: dtype of single non-planned tensors
     "report": {"notes": [...], "input_bytes": n, "output_bytes": n, ...}}   # optional: what the planner reported

`layers` lists every 2-D (Linear) weight of the model, quantized or kept; kept layers name their dtype
(`bf16`/`fp16`/`fp32`). Every other float tensor (biases, norms, convs, modulation) is written in `tensors[name]` if
present, else `other_dtype` (`keep` = its source dtype). A kept layer's bias follows the layer's dtype.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import formats
from .errors import PlanError
from .layer_lists import suggest

log = logging.getLogger("nvfp4_lab.plan")

PLAN_VERSION = 1
OTHER_DTYPES = ("keep", formats.BF16, formats.FP16, formats.FP32)
_TOP_KEYS = {"version", "source", "preset", "other_dtype", "options", "layers", "tensors", "report"}
_REQUIRED_TOP = ("version", "source", "preset", "other_dtype", "layers")
_LAYER_KEYS = {"format", "reason", "shape", "input_scale", "input_scale_source"}
_SCALED_FORMATS = (formats.NVFP4, formats.NVFP4_W4A16, formats.FP8, formats.FP8_E5M2)

# safetensors dtype code -> our plain format name (float codes only)
_CODE_FORMAT = {"BF16": formats.BF16, "F16": formats.FP16, "F32": formats.FP32, "F64": formats.FP32,
                "gguf:BF16": formats.BF16, "gguf:F16": formats.FP16, "gguf:F32": formats.FP32, "gguf:F64": formats.FP32}
_CODE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "I16": 2,
               "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}


def source_plain_format(code: str) -> str:
    """The plain format a kept tensor with safetensors dtype `code` stays in (quantized sources become bf16)."""
    return _CODE_FORMAT.get(code, formats.BF16)


def is_float_code(code: str) -> bool:
    """True for float dtype codes a plan may cast (BF16/F16/F32/F64; any GGUF type dequantizes to float)."""
    return code in _CODE_FORMAT or code.startswith("gguf:")


@dataclass
class LayerDecision:
    """The format of one Linear layer, why, and the static input scale of an NVFP4/FP8 layer (None = dynamic)."""
    layer: str
    format: str
    reason: str
    shape: tuple[int, ...]
    input_scale: float | None = None
    input_scale_source: str | None = None

    @property
    def quantized(self) -> bool:
        return self.format in formats.QUANTIZED_FORMATS

    @property
    def rule(self) -> str:
        """The rule tag the reason starts with (`never_quantize`, `preset.keep`, `gguf`, `include`, ...)."""
        return self.reason.split(":", 1)[0].split(" ", 1)[0]

    def to_json(self) -> dict:
        return {"format": self.format, "reason": self.reason, "shape": list(self.shape),
                "input_scale": self.input_scale, "input_scale_source": self.input_scale_source}


@dataclass
class Plan:
    """Every Linear layer's decision plus the dtype rule for all other tensors; see the module docstring."""
    source: dict
    preset: str
    layers: dict[str, LayerDecision]
    other_dtype: str = "keep"
    options: dict = field(default_factory=dict)
    tensor_dtypes: dict[str, str] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    # ---- summaries -------------------------------------------------------------------------------------------
    @property
    def notes(self) -> list[str]:
        """Human-readable notes of the planner (warnings included); stored in report["notes"]."""
        return self.report.setdefault("notes", [])

    def counts(self) -> dict[str, int]:
        """Number of layers per format, in formats.ALL_FORMATS order."""
        c = Counter(d.format for d in self.layers.values())
        return {f: c[f] for f in formats.ALL_FORMATS if c[f]}

    def by_format(self, *fmts: str) -> list[str]:
        """Layer names whose format is one of `fmts`, in plan order."""
        return [n for n, d in self.layers.items() if d.format in fmts]

    def layers_without_input_scale(self) -> list[str]:
        """W4A4 layers that will quantize their activations dynamically (no static input_scale)."""
        return [n for n, d in self.layers.items() if d.format == formats.NVFP4 and d.input_scale is None]

    # ---- dtype of non-quantized tensors ----------------------------------------------------------------------
    def dtype_for_tensor(self, name: str, source_code: str) -> str:
        """Format (bf16/fp16/fp32, or "keep" for non-float tensors) that a non-quantized tensor is written in.

        Why here: the converter, the size estimate and the report must agree on one rule. Order: explicit
        `tensors[name]`; the weight/bias of a kept layer follow the layer's dtype; otherwise `other_dtype`
        (`keep` = the source dtype; quantized sources become bf16). Non-float tensors are never cast.
        """
        if not is_float_code(source_code):
            return "keep"
        if name in self.tensor_dtypes:
            return self.tensor_dtypes[name]
        base, _, suffix = name.rpartition(".")
        dec = self.layers.get(base)
        if dec is not None and suffix in ("weight", "bias") and dec.format in formats.PLAIN_FORMATS:
            return dec.format
        if self.other_dtype == "keep":
            return source_plain_format(source_code)
        return self.other_dtype

    # ---- sizes -----------------------------------------------------------------------------------------------
    def estimated_bytes(self, ckpt: Any) -> int:
        """Bytes of tensor data the converted file will hold (header excluded, typically < 1 MB).

        Exact per tensor: quantized weights via formats.stored_weight_bytes (codes, scales, marker), plus 4 bytes per
        static input_scale; biases and all other tensors at their planned dtype; non-float tensors as in the source.
        Scales/markers of an already-quantized source layer are regenerated, so they are not counted twice.
        """
        total = 0
        layer_keys: dict[str, str] = {}
        for lname, layer in ckpt.layers().items():
            if lname in self.layers:
                for key in layer.keys:
                    layer_keys[key] = lname
        for name in ckpt.names():
            info = ckpt.info(name)
            numel = math.prod(info.shape)
            owner = layer_keys.get(name)
            if owner is not None:
                dec = self.layers[owner]
                if name == owner + ".weight":
                    total += formats.stored_weight_bytes(dec.format, tuple(dec.shape))
                    if dec.quantized and dec.input_scale is not None:
                        total += 4
                    continue
                if name != owner + ".bias":
                    continue  # weight_scale / input_scale / comfy_quant of a quantized source: regenerated
            fmt = self.dtype_for_tensor(name, info.dtype)
            if fmt == "keep":
                total += _source_bytes(info)
            else:
                total += numel * formats.PLAIN_DTYPES[fmt].itemsize
        return total

    # ---- rendering -------------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        """Short summary: source, preset, counts per format, sizes, notes."""
        src = self.source
        lines = [f"plan for {src.get('file', '?')} ({src.get('architecture', '?')}"
                 f"{' ' + str(src['variant']) if src.get('variant') else ''}), preset {self.preset}, "
                 f"other tensors: {self.other_dtype}"]
        counts = self.counts()
        total = sum(counts.values())
        lines.append("layers: " + ", ".join(f"{fmt} {n}" for fmt, n in counts.items()) + f" (total {total})")
        nv4 = counts.get(formats.NVFP4, 0)
        if nv4 or counts.get(formats.NVFP4_W4A16):
            static = sum(1 for d in self.layers.values() if d.format == formats.NVFP4 and d.input_scale is not None)
            lines.append(f"NVFP4: W4A4 {nv4} ({static} with static input_scale, {nv4 - static} dynamic), "
                         f"W4A16 {counts.get(formats.NVFP4_W4A16, 0)}")
        if self.tensor_dtypes:
            c = Counter(self.tensor_dtypes.values())
            lines.append("other tensors with their own dtype: " + ", ".join(f"{f} {n}" for f, n in c.items())
                         + " (GGUF F32 / preset keep_fp32)")
        inp, out = self.report.get("input_bytes"), self.report.get("output_bytes")
        if inp and out:
            lines.append(f"size: {_human(out)} estimated from {_human(inp)} ({out / inp:.1%})")
        elif out:
            lines.append(f"size: {_human(out)} estimated")
        for note in self.report.get("notes", []):
            lines.append(f"note: {note}")
        return lines

    def table(self, *, layers: bool = True) -> str:
        """Readable table: the summary, then one row per layer (name, shape, format, input_scale, reason)."""
        out = self.summary_lines()
        if layers and self.layers:
            rows = [("layer", "shape", "format", "input_scale", "reason")]
            for name, d in self.layers.items():
                scale = "-" if d.input_scale is None else f"{d.input_scale:.6g}"
                rows.append((name, "x".join(str(s) for s in d.shape), d.format, scale, d.reason))
            widths = [min(max(len(r[i]) for r in rows), 60) for i in range(4)]
            out.append("")
            for r in rows:
                out.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        return "\n".join(out)

    # ---- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"version": PLAN_VERSION, "source": dict(self.source), "preset": self.preset,
             "other_dtype": self.other_dtype, "options": self.options,
             "layers": {n: dec.to_json() for n, dec in self.layers.items()}}
        if self.tensor_dtypes:
            d["tensors"] = dict(self.tensor_dtypes)
        if self.report:
            d["report"] = self.report
        return d

    def to_json(self) -> str:
        """Standard JSON (no NaN/Infinity), indent 1, key order preserved."""
        try:
            return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        except ValueError as exc:
            raise PlanError(f"plan holds a non-finite number and cannot be saved: {exc}") from None

    @classmethod
    def from_json(cls, text: str, *, where: str = "plan") -> Plan:
        """Parse and validate a plan; every hand-edit mistake is a PlanError naming the layer/key and the fix."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                raise PlanError(f"{where}: unknown key {key!r}{_did_you_mean(key, _TOP_KEYS)}")
        for key in _REQUIRED_TOP:
            if key not in data:
                raise PlanError(f"{where}: missing key {key!r}")
        if data["version"] != PLAN_VERSION:
            raise PlanError(f"{where}: plan version {data['version']!r} is not supported (this tool reads "
                            f"version {PLAN_VERSION}); re-create the plan with `nvfp4 plan`")
        source = data["source"]
        if not isinstance(source, dict):
            raise PlanError(f"{where}: 'source' must be an object")
        preset = data["preset"]
        if not isinstance(preset, str):
            raise PlanError(f"{where}: 'preset' must be a string")
        other = data["other_dtype"]
        if other not in OTHER_DTYPES:
            raise PlanError(f"{where}: other_dtype {other!r} is invalid; use one of {', '.join(OTHER_DTYPES)}")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise PlanError(f"{where}: 'options' must be an object")
        raw_layers = data["layers"]
        if not isinstance(raw_layers, dict):
            raise PlanError(f"{where}: 'layers' must be an object mapping layer name -> decision")
        layers = {name: _decision_from_json(name, entry, where) for name, entry in raw_layers.items()}
        tensors = data.get("tensors", {}) or {}
        if not isinstance(tensors, dict):
            raise PlanError(f"{where}: 'tensors' must be an object mapping tensor name -> dtype")
        for tname, fmt in tensors.items():
            if fmt not in formats.PLAIN_FORMATS:
                raise PlanError(f"{where}: tensors[{tname!r}] = {fmt!r}; non-Linear tensors can only be "
                                f"{', '.join(formats.PLAIN_FORMATS)}")
        report = data.get("report", {}) or {}
        if not isinstance(report, dict):
            raise PlanError(f"{where}: 'report' must be an object")
        return cls(source=source, preset=preset, layers=layers, other_dtype=other, options=options,
                   tensor_dtypes=dict(tensors), report=report)

    def save(self, path: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
        """Write the plan atomically; an existing file is replaced only with force=True (project convention), and
        never when it is one of `inputs` (the model, lists, GGUF the plan was made from)."""
        from .atomic import atomic_output
        text = self.to_json()
        with atomic_output(path, force=force, inputs=inputs) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanError(f"{p}: plan file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"{p}: cannot read plan ({exc})") from None
        return cls.from_json(text, where=str(p))

    # ---- model check -----------------------------------------------------------------------------------------
    def check_against(self, ckpt: Any) -> None:
        """Refuse a plan that does not fit `ckpt`; note (report + log) a re-saved file with the same layers.

        PlanError when the plan names layers the model lacks (with suggestions), when a shape differs, when the model
        has Linear layers the plan does not decide, or when a tensor override names an unknown tensor. A different
        header hash alone is not an error: the same names and shapes mean the same model re-saved.
        """
        model = {n: tuple(l.shape) for n, l in ckpt.layers().items() if l.linear}
        all_layers = set(ckpt.layers())
        fname = Path(getattr(ckpt, "path", "model")).name
        unknown = [n for n in self.layers if n not in model]
        if unknown:
            nonlinear = [n for n in unknown if n in all_layers]
            if nonlinear:
                raise PlanError(f"plan decides {len(nonlinear)} layer(s) of {fname} that are not Linear "
                                f"(e.g. {nonlinear[0]!r}); only 2-D weights can be planned; remove them")
            from .layer_lists import describe_unknown
            hash_note = self._hash_note(ckpt)
            raise PlanError(describe_unknown(unknown, list(model), what=f"plan vs {fname}") +
                            f"{hash_note}; was the plan made for another model?")
        bad_shapes = [(n, d.shape, model[n]) for n, d in self.layers.items() if tuple(d.shape) != model[n]]
        if bad_shapes:
            n, want, have = bad_shapes[0]
            raise PlanError(f"plan vs {fname}: {len(bad_shapes)} layer shape(s) differ, e.g. {n!r} is "
                            f"{list(want)} in the plan but {list(have)} in the model{self._hash_note(ckpt)}; "
                            f"the plan was made for another model; re-create it with `nvfp4 plan`")
        missing = [n for n in model if n not in self.layers]
        if missing:
            raise PlanError(f"plan vs {fname}: {len(missing)} Linear layer(s) of the model have no decision, e.g. "
                            f"{', '.join(missing[:3])}; add them to 'layers' (format bf16 to keep) or re-create "
                            f"the plan")
        names = set(ckpt.names())
        bad_t = [t for t in self.tensor_dtypes if t not in names]
        if bad_t:
            close = suggest(bad_t[0], names)
            raise PlanError(f"plan vs {fname}: 'tensors' names {len(bad_t)} tensor(s) the model lacks, e.g. "
                            f"{bad_t[0]!r}{' (did you mean ' + repr(close[0]) + '?)' if close else ''}")
        want_hash = self.source.get("header_sha256")
        if want_hash and want_hash != ckpt.header_hash():
            note = (f"{fname}: header hash differs from the plan's source "
                    f"({self.source.get('file', '?')}), but every layer name and shape matches "
                    f"(e.g. a re-saved file); using the plan")
            log.warning(note)
            if note not in self.notes:
                self.notes.append(note)

    def _hash_note(self, ckpt: Any) -> str:
        want = self.source.get("header_sha256")
        try:
            same = want == ckpt.header_hash()
        except Exception:  # noqa: BLE001 - only used to word the message
            same = False
        return "" if same or not want else f" (the plan was made for {self.source.get('file', '?')}, another file)"


def _did_you_mean(key: str, options: set[str] | list[str]) -> str:
    close = suggest(key, sorted(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(options))})"


def _decision_from_json(name: str, entry: Any, where: str) -> LayerDecision:
    if not isinstance(name, str) or not name:
        raise PlanError(f"{where}: layer names must be non-empty strings")
    if not isinstance(entry, dict):
        raise PlanError(f"{where}: layers[{name!r}] must be an object with format, reason, shape")
    for key in entry:
        if key not in _LAYER_KEYS:
            raise PlanError(f"{where}: layers[{name!r}] has unknown key {key!r}{_did_you_mean(key, _LAYER_KEYS)}")
    fmt = entry.get("format")
    if fmt not in formats.ALL_FORMATS:
        hint = _did_you_mean(str(fmt), list(formats.ALL_FORMATS))
        if fmt == "keep":
            hint = " (a kept layer names its dtype: bf16, fp16 or fp32)"
        raise PlanError(f"{where}: layers[{name!r}].format {fmt!r} is not a format{hint}")
    shape = entry.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise PlanError(f"{where}: layers[{name!r}].shape must be [out_features, in_features] (positive "
                        f"integers), got {shape!r}")
    reason = entry.get("reason", "")
    if not isinstance(reason, str):
        raise PlanError(f"{where}: layers[{name!r}].reason must be a string")
    scale = entry.get("input_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise PlanError(f"{where}: layers[{name!r}].input_scale must be a positive finite number or null, "
                            f"got {scale!r}")
        if fmt not in _SCALED_FORMATS:
            raise PlanError(f"{where}: layers[{name!r}] is {fmt} but has an input_scale; only NVFP4/FP8 layers use "
                            f"one (set it to null)")
        scale = float(scale)
    src = entry.get("input_scale_source")
    if src is not None and not isinstance(src, str):
        raise PlanError(f"{where}: layers[{name!r}].input_scale_source must be a string or null")
    return LayerDecision(layer=name, format=fmt, reason=reason or "hand-edited", shape=tuple(shape),
                         input_scale=scale, input_scale_source=src)


def _source_bytes(info: Any) -> int:
    off = getattr(info, "data_offsets", None)
    if off and len(off) == 2 and off[1] >= off[0]:
        return off[1] - off[0]
    return math.prod(info.shape) * _CODE_BYTES.get(info.dtype, 2)


def source_bytes(ckpt: Any) -> int:
    """Bytes of tensor data in the source checkpoint (from the header offsets)."""
    return sum(_source_bytes(ckpt.info(n)) for n in ckpt.names())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
