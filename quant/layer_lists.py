"""User layer lists and layer-name validation: every name a user gives must be a layer of the model.

Why: the original converter read its `--full-precision-mm-layers` files without checking them, so glued lines
(`blocks.8.ffn.0blocks.0.cross_attn.k`, a lost newline), typos, norms and kept layers were all silently ignored and
intended layers lost their W4A16 flag. Here an unknown name is an error that suggests the closest real names, a glued
line is detected and split (with a note) or refused with the fix, and regexes that match nothing are reported.

Name normalisation (silent, because the meaning is unambiguous): surrounding whitespace, a `model.diffusion_model.` /
`diffusion_model.` prefix and a trailing `.weight` are removed. Blank lines and lines starting with `#` are skipped; a
`#` after a name starts a comment.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PlanError

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
GLUED_POLICIES = ("split", "error")


def normalize_name(name: str) -> str:
    """Bare layer name: strip whitespace, a diffusion-model prefix and a trailing `.weight`."""
    name = name.strip()
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name


def suggest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The closest real names to `name` (difflib), best first; empty when nothing is reasonably close."""
    known = list(known)
    hits = difflib.get_close_matches(name, known, n=n, cutoff=0.6)
    if not hits:
        # Long names differ mostly in their block index: compare the tail after the last block number too.
        tail = re.sub(r"^.*?\d+\.", "", name)
        if tail != name:
            hits = [k for k in known if k.endswith("." + tail)][:n]
    return hits


def describe_unknown(names: Sequence[str], known: Collection[str], *, what: str, limit: int = 5) -> str:
    """One message for unknown names, each with its closest suggestions."""
    parts = []
    for name in names[:limit]:
        close = suggest(name, known)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else " (no similar layer name)"
        parts.append(f"{name!r}{hint}")
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{what}: {len(names)} name(s) are not layers of the model: {'; '.join(parts)}{more}"


def validate_names(names: Iterable[str], known: Collection[str], *, what: str) -> None:
    """Raise PlanError naming every unknown name (with suggestions); `what` says where the names came from."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PlanError(describe_unknown(unknown, known, what=what) + "; fix the names or remove them")


@dataclass(frozen=True)
class ListEntry:
    """One name of a list file, with where it came from."""
    name: str
    line: int
    raw: str           # the line as written (stripped)
    glued: bool = False  # True when this name was split out of a glued line


@dataclass
class LayerList:
    """A parsed and resolved list file: names (in file order, deduplicated), notes for the plan report."""
    path: str
    entries: list[ListEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unknown: list[ListEntry] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, normalised name) for every non-blank, non-comment line of a list file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PlanError(f"{p}: layer list file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{p}: cannot read layer list ({exc})") from None
    out = []
    for no, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append((no, normalize_name(line)))
    return out


def split_glued(text: str, known: Collection[str]) -> list[str] | None:
    """Split `text` into a concatenation of known names (fewest pieces); None if impossible or ambiguous."""
    n = len(text)
    # best[i] = (pieces, split list) for text[:i]; count distinct optimal splits to detect ambiguity.
    best: list[tuple[int, list[str], int] | None] = [None] * (n + 1)
    best[0] = (0, [], 1)
    for i in range(n):
        if best[i] is None:
            continue
        pieces, parts, ways = best[i]
        for j in range(i + 1, n + 1):
            piece = text[i:j]
            if piece in known:
                cand = (pieces + 1, parts + [piece], ways)
                cur = best[j]
                if cur is None or cand[0] < cur[0]:
                    best[j] = cand
                elif cand[0] == cur[0]:
                    best[j] = (cur[0], cur[1], cur[2] + ways)
    end = best[n]
    if end is None or end[0] < 2 or end[2] > 1:
        return None
    return end[1]


def resolve_layer_list(path: str | Path, known: Collection[str], *, glued: str = "split",
                       allow_unknown: bool = False) -> LayerList:
    """Read a list file and resolve its names against the model's layer names.

    `known` is every layer name of the model (Linear or not: a norm is a real layer, merely not a Linear one).
    Glued lines are split when `glued="split"` (a note is added), refused with the fix when `glued="error"`.
    Unknown names raise PlanError with suggestions unless `allow_unknown` (then they are listed in the notes).
    """
    if glued not in GLUED_POLICIES:
        raise ValueError(f"glued must be one of {GLUED_POLICIES}, not {glued!r}")
    known = known if isinstance(known, (set, frozenset, Mapping)) else set(known)
    result = LayerList(path=str(path))
    seen: set[str] = set()
    label = Path(path).name

    def add(entry: ListEntry) -> None:
        if entry.name not in seen:
            seen.add(entry.name)
            result.entries.append(entry)

    for no, name in read_lines(path):
        if name in known:
            add(ListEntry(name, no, name))
            continue
        parts = split_glued(name, known)
        if parts is not None:
            if glued == "error":
                raise PlanError(
                    f"{path} line {no}: {name!r} is {len(parts)} names glued together (a missing newline): "
                    f"{', '.join(parts)}; put each name on its own line (or use glued='split' / --glued split)")
            result.notes.append(
                f"{label} line {no}: {name!r} is {len(parts)} names glued together (a missing newline); "
                f"using {', '.join(parts)}")
            for part in parts:
                add(ListEntry(part, no, name, glued=True))
            continue
        result.unknown.append(ListEntry(name, no, name))

    if result.unknown:
        msg = describe_unknown([e.name for e in result.unknown], known, what=str(path))
        lines = ", ".join(str(e.line) for e in result.unknown[:10])
        if not allow_unknown:
            raise PlanError(f"{msg} (line {lines}); fix the list or pass allow_unmatched")
        result.notes.append(f"{msg} (line {lines}); ignored (allow_unmatched)")
    return result


def compile_regex(pattern: str, *, what: str, flags: int = re.IGNORECASE) -> re.Pattern:
    """Compile a user regex; a syntax error becomes a PlanError naming the option and the pattern."""
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise PlanError(f"{what} regex /{pattern}/ is invalid: {exc}") from None


def match_regexes(patterns: Sequence[str], names: Sequence[str], *, what: str, allow_unmatched: bool = False,
                  other_names: Collection[str] = (), notes: list[str] | None = None,
                  flags: int = re.IGNORECASE) -> dict[str, list[str]]:
    """pattern -> the names it hits (re.search, case-insensitive by default).

    A pattern hitting nothing raises PlanError naming it (or, with `allow_unmatched`, adds a note). When it hits only
    `other_names` (e.g. non-Linear layers that are never planned) the message says so.
    """
    out: dict[str, list[str]] = {}
    for pattern in patterns:
        rx = compile_regex(pattern, what=what, flags=flags)
        hits = [n for n in names if rx.search(n)]
        out[pattern] = hits
        if hits:
            continue
        others = [n for n in other_names if rx.search(n)]
        detail = (f"; it matches only {len(others)} non-Linear layer(s) such as {others[0]!r}, which are never "
                  f"quantized" if others else "")
        msg = f"{what} regex /{pattern}/ matches no Linear layer of the model{detail}"
        if not allow_unmatched:
            raise PlanError(msg + " (check the pattern; re.search, case-insensitive; or pass allow_unmatched)")
        if notes is not None:
            notes.append(msg + "; ignored (allow_unmatched)")
    return out
