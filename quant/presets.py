"""Presets: per-family defaults for which layers stay high precision, as data (`quant/presets/<name>.json`).

Why data and not code: the lists are what users most want to read, diff and copy; each rule carries the reason it
exists, and the reasons for `never_quantize` cite the line of ComfyUI 0.29's `comfy/model_detection.py` that reads
the layer's shape.

File format (every key required, no others)::

    {"name": "wan", "family": "wan", "description": "...",
     "never_quantize": [{"pattern": "head\\\\.head", "why": "..."}],
     "keep": [...], "keep_fp32": [...], "fp8": [...], "w4a16": [...],
     "keep_first_blocks": 1, "keep_last_blocks": 1}

A pattern is matched with `re.fullmatch` against the bare layer name (checkpoint key without `.weight`, without the
`model.diffusion_model.` prefix). A pattern may match nothing in a given variant (one file serves all Wan variants).

Meaning of the lists (the plan engine, `quant/rules.py`, applies them in this order, first hit wins):

1. `never_quantize`: layers ComfyUI's model detection reads the in- or out-dimension of (NVFP4 packs two values per
   byte in the in-dim and pads the out-dim to 16, so the detected config changes and the file no longer loads), and
   2-D weights that are not `Linear` modules (Embeddings, raw Parameters, custom `EqualLinear`) which ComfyUI's
   mixed-precision ops cannot load quantized. Always kept; nothing overrides these, not even mode "all". (They are
   not repeated in `keep`.)
2. `keep_fp32`: kept in fp32 when the source is fp32 (never up-cast).
3. `keep`: kept in the source precision (embeddings, in/out projections, modulation, norms, time/text embedders).
4. the first `keep_first_blocks` and last `keep_last_blocks` blocks of every block group
   (`Architecture.block_groups`, located with `architecture.block_of`) are kept.
5. `fp8`: FP8 E4M3 rather than NVFP4 — when the user allows FP8 (`fp8_instead_of_keep`, the original `--use-fp8`);
   otherwise kept.
6. everything else: NVFP4; `w4a16` patterns turn those into NVFP4 W4A16.

Rules may name non-Linear tensors (convs, modulation Parameters, norms) for documentation: the planner only plans
2-D Linear weights and ignores the rest.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .architecture import FAMILIES, Architecture
from .errors import PlanError

PRESET_DIR = Path(__file__).resolve().parent / "presets"
RULE_LISTS = ("never_quantize", "keep", "keep_fp32", "fp8", "w4a16")
_KEYS = ("name", "family", "description", *RULE_LISTS, "keep_first_blocks", "keep_last_blocks")
_RULE_KEYS = ("pattern", "why")


@dataclass(frozen=True)
class Rule:
    """One layer-name pattern (`re.fullmatch` on the bare layer name) and the reason it exists."""

    pattern: str
    why: str

    def matches(self, layer: str) -> bool:
        """True if the whole layer name matches (re caches the compiled pattern)."""
        return re.fullmatch(self.pattern, layer) is not None


@dataclass(frozen=True)
class Preset:
    """A validated preset file. See the module docstring for what each list means."""

    name: str
    family: str
    description: str
    never_quantize: tuple[Rule, ...]
    keep: tuple[Rule, ...]
    keep_fp32: tuple[Rule, ...]
    fp8: tuple[Rule, ...]
    w4a16: tuple[Rule, ...]
    keep_first_blocks: int
    keep_last_blocks: int

    def first_match(self, kind: str, layer: str) -> Rule | None:
        """The first rule of list `kind` ("never_quantize", "keep", ...) matching `layer`, or None."""
        if kind not in RULE_LISTS:
            raise ValueError(f"unknown rule list {kind!r}; expected one of: {', '.join(RULE_LISTS)}")
        for rule in getattr(self, kind):
            if rule.matches(layer):
                return rule
        return None

    def protected_by(self, layer: str) -> Rule | None:
        """The `never_quantize` rule protecting `layer`, or None (shortcut used by mode "all" and by tests)."""
        return self.first_match("never_quantize", layer)

    def to_dict(self) -> dict:
        """The JSON object this preset was loaded from (round trip with `parse_preset`)."""
        out: dict = {"name": self.name, "family": self.family, "description": self.description}
        for kind in RULE_LISTS:
            out[kind] = [{"pattern": r.pattern, "why": r.why} for r in getattr(self, kind)]
        out["keep_first_blocks"] = self.keep_first_blocks
        out["keep_last_blocks"] = self.keep_last_blocks
        return out


def preset_names() -> list[str]:
    """Names of the built-in presets (the `quant/presets/*.json` file stems), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def parse_preset(data: object, source: str, *, expected_name: str | None = None) -> Preset:
    """Validate a decoded preset object; every problem raises `PlanError` naming `source` (the file)."""

    def fail(msg: str) -> PlanError:
        return PlanError(f"preset {source}: {msg}")

    if not isinstance(data, dict):
        raise fail(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise fail(f"missing key(s) {', '.join(map(repr, missing))}")
    for key in ("name", "family", "description"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise fail(f"{key!r} must be a non-empty string")
    if expected_name is not None and data["name"] != expected_name:
        raise fail(f"'name' is {data['name']!r} but the file is {expected_name}.json; they must agree")
    if data["family"] not in FAMILIES:
        raise fail(f"unknown family {data['family']!r}; expected one of: {', '.join(FAMILIES)}")
    lists: dict[str, tuple[Rule, ...]] = {}
    for kind in RULE_LISTS:
        rules = data[kind]
        if not isinstance(rules, list):
            raise fail(f"{kind!r} must be a list of {{\"pattern\", \"why\"}} objects")
        parsed: list[Rule] = []
        seen: set[str] = set()
        for i, rule in enumerate(rules):
            where = f"{kind}[{i}]"
            if not isinstance(rule, dict):
                raise fail(f"{where} must be an object with 'pattern' and 'why'")
            bad = sorted(set(rule) - set(_RULE_KEYS))
            if bad:
                raise fail(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; allowed: pattern, why")
            pattern, why = rule.get("pattern"), rule.get("why")
            if not isinstance(pattern, str) or not pattern:
                raise fail(f"{where}: 'pattern' must be a non-empty string")
            if not isinstance(why, str) or not why.strip():
                raise fail(f"{where} ({pattern!r}): 'why' must be a non-empty string saying why the rule exists")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise fail(f"{where}: bad regular expression {pattern!r}: {exc}") from None
            if pattern in seen:
                raise fail(f"{where}: pattern {pattern!r} appears twice in {kind!r}")
            seen.add(pattern)
            parsed.append(Rule(pattern=pattern, why=why))
        lists[kind] = tuple(parsed)
    counts = {}
    for key in ("keep_first_blocks", "keep_last_blocks"):
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(f"{key!r} must be a non-negative integer, got {value!r}")
        counts[key] = value
    return Preset(name=data["name"], family=data["family"], description=data["description"], **lists, **counts)


def _read(path: Path, expected_name: str | None) -> Preset:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"preset {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"preset {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    return parse_preset(data, str(path), expected_name=expected_name)


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> Preset:
    return _read(PRESET_DIR / f"{name}.json", expected_name=name)


def load_preset(name: str) -> Preset:
    """Load and validate a preset: a built-in name (`quant/presets/<name>.json`) or a path to a `.json` file.

    Raises `PlanError` listing the valid names when `name` is neither.
    """
    if name in preset_names():
        return _load_builtin(name)
    path = Path(name).expanduser()
    if name.endswith(".json") and path.is_file():
        return _read(path, expected_name=None)
    raise PlanError(f"unknown preset {name!r}; valid presets: {', '.join(preset_names())} "
                    "(or the path of a preset .json file)")


def preset_for(arch: Architecture) -> Preset:
    """The default preset of a detected architecture.

    Raises `PlanError` for diffusers-named checkpoints: ComfyUI 0.29 cannot load a quantized one (it either does not
    know the names or renames the keys on load and drops `weight_scale` / `comfy_quant`), so converting it would
    produce a file that does not load.
    """
    if arch.naming == "diffusers":
        raise PlanError(
            f"this checkpoint is a diffusers-format {arch.variant} ({arch.family}); ComfyUI loads quantized models "
            "only under its own key names. Use the ComfyUI-format release of this model (e.g. the Comfy-Org "
            "repackaged file) as the source")
    return load_preset(arch.preset)
