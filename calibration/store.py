"""The calibration store: per-layer amax statistics plus provenance, in one standard-JSON file.

Why this design:
* **Accumulates.** A store is bound to a file (``CalibrationStore.open(path)``). Everything recorded since the last
  save is also kept in a separate *delta*; ``save()`` takes an exclusive lock, re-reads the file, adds only the
  delta and writes the result atomically. Two ComfyUI processes (or a ComfyUI restart) recording into the same file
  therefore never lose or double-count calls, however their saves interleave.
* **Cheap recording.** ``record()`` only queues a copy of the values; queued records are folded into the statistics
  in one grouped, vectorized pass per layer when the statistics are read or saved (or every 2e6 values), so a
  recorder flushing ~10^4 (layer, step) arrays per sampler run spends milliseconds, not seconds.
* **Exact merges.** Every statistic is a mergeable sufficient statistic (see :mod:`.stats`), so
  ``A.merge(B)`` equals recording both runs into one store (integers exactly, moments to float rounding).
* **Standard JSON** (no NaN/Infinity literals; undefined values are ``null``), compact, layers sorted by name.
* **Loud failures.** Bad JSON, a foreign file, a newer schema version, or a ``scales_summary_*.json`` given where a
  store is expected raise :class:`~..quant.errors.CalibrationError` naming the file and saying what to do.

File layout::

    {"format": "nvfp4-lab-calibration", "version": 1,
     "histogram": {"bins_per_octave": 256, "min_exp": -32, "max_exp": 32, "step_bins_per_octave": 16},
     "provenance": {"models": [{"file", "header_sha256", "architecture"}], "comfyui_versions": [...],
                    "prompts": int, "sources": [{"kind", "name", ...}], "created", "updated", "tool"},
     "layers": {"<layer>": LayerStats.to_json()}}

Locking: ``<store>.lock`` beside the store is locked with ``fcntl.flock`` (POSIX) or ``msvcrt.locking`` (Windows);
where neither exists an ``O_EXCL`` lock file is used (a lock older than 10 minutes is considered stale). The lock
file is left in place on purpose: deleting a flock'ed file lets a third process lock a different inode.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..quant.atomic import atomic_output
from ..quant.errors import CalibrationError
from .histogram import BINS_PER_OCTAVE, MAX_EXP, MIN_EXP, STEP_BINS_PER_OCTAVE
from .stats import LayerStats

STORE_FORMAT = "nvfp4-lab-calibration"
STORE_VERSION = 1
LOCK_SUFFIX = ".lock"
PENDING_FOLD_VALUES = 2_000_000  # fold queued records into statistics at least this often (bounds memory)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return f"nvfp4_lab {version('nvfp4-lab')}"
    except Exception:  # noqa: BLE001 - metadata missing in a plain checkout
        return "nvfp4_lab"


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_json_loads(text: str):
    """json.loads that rejects NaN / Infinity literals (we only accept standard JSON)."""
    return json.loads(text, parse_constant=_reject_constant)


def empty_provenance() -> dict:
    return {"models": [], "comfyui_versions": [], "prompts": 0, "sources": [], "created": None, "updated": None,
            "tool": _tool_version()}


def _model_key(m: dict) -> tuple:
    return (m.get("header_sha256"), m.get("file"), m.get("architecture"))


def merge_provenance(a: dict, b: dict, *, allow_different_models: bool = False, where: str = "") -> dict:
    """Union of two provenance dicts: prompts add up, lists are unioned, created = earliest, updated = latest.

    Stores of different models (different header hashes) refuse to merge unless allow_different_models."""
    models = list(a.get("models", []))
    for m in b.get("models", []):
        if all(_model_key(m) != _model_key(x) for x in models):
            models.append(dict(m))
    hashes = {m.get("header_sha256") for m in models if m.get("header_sha256")}
    if len(hashes) > 1 and not allow_different_models:
        names = ", ".join(sorted({str(m.get("file")) for m in models}))
        raise CalibrationError(f"{where or 'stores'}: calibration data of different models ({names}; header hashes "
                               f"{', '.join(h[:12] for h in sorted(hashes))}) would be mixed; merge only stores of "
                               "the same model file, or pass --allow-different-models")
    sources = list(a.get("sources", []))
    for s in b.get("sources", []):
        if s not in sources:
            sources.append(dict(s))
    created = [x for x in (a.get("created"), b.get("created")) if x]
    updated = [x for x in (a.get("updated"), b.get("updated")) if x]
    return {
        "models": models,
        "comfyui_versions": sorted(set(a.get("comfyui_versions", [])) | set(b.get("comfyui_versions", []))),
        "prompts": int(a.get("prompts", 0)) + int(b.get("prompts", 0)),
        "sources": sources,
        "created": min(created) if created else None,
        "updated": max(updated) if updated else None,
        "tool": a.get("tool") or b.get("tool") or _tool_version(),
    }


# ---------------------------------------------------------------------------------------------------- file lock
@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float = 60.0) -> Iterator[Path]:
    """Exclusive inter-process lock on the sidecar ``<path>.lock`` (the `filelock` package: flock / Windows locks)."""
    from filelock import FileLock, Timeout

    lock = Path(str(path) + LOCK_SUFFIX)
    try:
        with FileLock(lock, timeout=timeout):
            yield lock
    except Timeout:
        raise CalibrationError(f"{path}: another process holds {lock} for more than {timeout:.0f} s; "
                               "wait for it to finish saving") from None


# ---------------------------------------------------------------------------------------------------- the store
class CalibrationStore:
    """Per-layer :class:`LayerStats` plus provenance; load/save (atomic, locked merge-on-save), merge."""

    def __init__(self, path: str | Path | None = None) -> None:
        self._layers: dict[str, LayerStats] = {}
        self.provenance: dict = empty_provenance()
        self.path: Path | None = Path(path) if path is not None else None
        self._delta_layers: dict[str, LayerStats] = {}
        self._delta_prov: dict = empty_provenance()
        self._pending: dict[str, list[tuple[np.ndarray, tuple, str | None, bool]]] = {}
        self._pending_values = 0

    @property
    def layers(self) -> dict[str, LayerStats]:
        """Per-layer statistics (everything loaded plus everything recorded; pending records are folded in)."""
        if self._pending:
            self._fold()
        return self._layers

    @layers.setter
    def layers(self, value: dict[str, LayerStats]) -> None:
        self._fold()
        self._layers = value

    # ------------------------------------------------------------------ recording API (used by the recorder)
    def _queue(self, layer: str, values, step, cond, fmt, chunk: bool) -> None:
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer name must be a non-empty string, got {layer!r}")
        if cond is not None and not isinstance(cond, str):
            raise TypeError(f"cond must be a str or None, got {type(cond).__name__}")
        x = np.array(values, dtype=np.float64).ravel()  # a copy: callers may reuse their buffers
        if x.size == 0:
            return
        if np.any(x < 0):
            raise ValueError(f"layer {layer!r}: amax values must be >= 0 (got a negative value)")
        self._pending.setdefault(layer, []).append((x, (cond, None if step is None else int(step)), fmt, chunk))
        self._pending_values += x.size
        if self._pending_values >= PENDING_FOLD_VALUES:
            self._fold()

    def record(self, layer: str, values: np.ndarray | list[float] | float, *, step: int | None = None,
               cond: str | None = None, fmt: str | None = None) -> None:
        """Record per-call amax values of one layer (one value per forward call) for one (step, cond).

        Cheap (the values are queued); everything queued is folded into the statistics in one vectorized pass per
        layer when the statistics are read or saved. It goes to the view and to the unsaved delta."""
        self._queue(layer, values, step, cond, fmt, False)

    def record_cond(self, layer: str, values: np.ndarray | list[float] | float, *, step: int | None = None,
                    cond: str) -> None:
        """Record per cond/uncond *chunk* amax of calls already recorded whole with `record` (chunk buckets only,
        never added to the layer totals)."""
        self._queue(layer, values, step, cond, None, True)

    def _fold(self) -> None:
        """Fold queued records into the view and the delta: one grouped LayerStats.add_grouped per layer."""
        pending, self._pending, self._pending_values = self._pending, {}, 0
        for layer, entries in pending.items():
            batch = LayerStats()
            for chunk in (False, True):
                sel = [e for e in entries if e[3] == chunk]
                if not sel:
                    continue
                keys: dict[tuple, int] = {}
                gids = [np.full(x.size, keys.setdefault(key, len(keys)), np.int64) for x, key, _, _ in sel]
                batch.add_grouped(np.concatenate([e[0] for e in sel]), np.concatenate(gids), list(keys), chunk=chunk)
                if not chunk:
                    for x, _, fmt, _ in sel:
                        if fmt:
                            batch.formats[fmt] = batch.formats.get(fmt, 0) + int(np.count_nonzero(np.isfinite(x)))
            for i, target in enumerate((self._layers, self._delta_layers)):
                st = target.get(layer)
                if st is None:
                    target[layer] = batch if i else batch.copy()
                else:
                    st.update(batch)

    def record_provided(self, layer: str, scale: float, count: int = 1, *, fmt: str | None = None) -> None:
        """Record calls of a layer that already ran with a static input_scale (amax unknown)."""
        for target in (self.layers, self._delta_layers):
            st = target.get(layer)
            if st is None:
                st = target[layer] = LayerStats()
            st.add_provided(scale, count, fmt=fmt)

    def count_prompt(self, n: int = 1) -> None:
        """Count prompts (sampler runs) that fed this store."""
        self.provenance["prompts"] = int(self.provenance.get("prompts", 0)) + n
        self._delta_prov["prompts"] = int(self._delta_prov.get("prompts", 0)) + n

    def set_model(self, *, file: str | None = None, header_sha256: str | None = None,
                  architecture: str | None = None) -> None:
        """Provenance of the calibrated model: file *name* (directories are stripped), header hash, architecture."""
        m = {"file": Path(file).name if file else None, "header_sha256": header_sha256, "architecture": architecture}
        for prov in (self.provenance, self._delta_prov):
            merged = merge_provenance(prov, {"models": [m]}, where=str(self.path or "store"))
            prov["models"] = merged["models"]

    def note_comfyui_version(self, version: str) -> None:
        for prov in (self.provenance, self._delta_prov):
            prov["comfyui_versions"] = sorted(set(prov.get("comfyui_versions", [])) | {str(version)})

    def add_source(self, kind: str, name: str | None = None, **info) -> None:
        """Where data came from (recorder session, imported log or summary, merge input): names only, no paths."""
        src = {"kind": kind, "name": Path(name).name if name else None, **info}
        for prov in (self.provenance, self._delta_prov):
            if src not in prov["sources"]:
                prov["sources"].append(dict(src))

    @property
    def dirty(self) -> bool:
        """True when something was recorded or noted since the last save."""
        p = self._delta_prov
        return bool(self._pending or self._delta_layers or p.get("prompts") or p.get("models") or p.get("sources")
                    or p.get("comfyui_versions"))

    # ------------------------------------------------------------------ merging
    def merge(self, other: CalibrationStore, *, allow_different_models: bool = False) -> CalibrationStore:
        """A new unbound store holding both (exact; see module docstring)."""
        out = CalibrationStore()
        out.provenance = merge_provenance(self.provenance, other.provenance,
                                          allow_different_models=allow_different_models,
                                          where=f"{self.path or 'store'} + {other.path or 'store'}")
        names = sorted(set(self.layers) | set(other.layers))
        for name in names:
            a, b = self.layers.get(name), other.layers.get(name)
            if a is None:
                out.layers[name] = b.copy()
            elif b is None:
                out.layers[name] = a.copy()
            else:
                out.layers[name] = a.merge(b)
        return out

    def update(self, other: CalibrationStore, *, allow_different_models: bool = False) -> None:
        """Add another store's data into this one in place (view and unsaved delta), e.g. an import."""
        self.provenance = merge_provenance(self.provenance, other.provenance,
                                           allow_different_models=allow_different_models,
                                           where=f"{self.path or 'store'} + {other.path or 'store'}")
        self._delta_prov = merge_provenance(self._delta_prov, other.provenance,
                                            allow_different_models=allow_different_models)
        for name, st in other.layers.items():
            for target in (self.layers, self._delta_layers):
                if name in target:
                    target[name].update(st)
                else:
                    target[name] = st.copy()

    def same_as(self, other: CalibrationStore, rtol: float = 1e-9) -> bool:
        """Layers equal up to float rounding of moments, and the same prompt count."""
        return (set(self.layers) == set(other.layers)
                and all(self.layers[k].same_as(other.layers[k], rtol) for k in self.layers)
                and self.provenance.get("prompts") == other.provenance.get("prompts"))

    # ------------------------------------------------------------------ JSON
    def to_json_dict(self) -> dict:
        return {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "histogram": {"bins_per_octave": BINS_PER_OCTAVE, "min_exp": MIN_EXP, "max_exp": MAX_EXP,
                          "step_bins_per_octave": STEP_BINS_PER_OCTAVE},
            "provenance": self.provenance,
            "layers": {name: self.layers[name].to_json() for name in sorted(self.layers)},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json_dict(cls, data: object, source: str | Path = "<memory>") -> CalibrationStore:
        """Validate and build a store; CalibrationError naming `source` for anything foreign or corrupt."""
        where = str(source)
        if isinstance(data, dict) and isinstance(data.get("layers"), list) and "percentiles" in data:
            raise CalibrationError(f"{where}: this is a scales_summary, not a calibration store; import it with "
                                   "`nvfp4 calib import` (percentiles only, approximate histograms)")
        if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
            fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CalibrationError(f"{where}: not an NVFP4 Lab calibration store (format={fmt!r}, expected "
                                   f"{STORE_FORMAT!r})")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CalibrationError(f"{where}: calibration store has no valid version field")
        if version > STORE_VERSION:
            raise CalibrationError(f"{where}: calibration store version {version} is newer than this NVFP4 Lab "
                                   f"supports ({STORE_VERSION}); upgrade nvfp4_lab")
        if version < 1:
            raise CalibrationError(f"{where}: unknown calibration store version {version}")
        grid = data.get("histogram", {})
        expected = {"bins_per_octave": BINS_PER_OCTAVE, "min_exp": MIN_EXP, "max_exp": MAX_EXP,
                    "step_bins_per_octave": STEP_BINS_PER_OCTAVE}
        if grid != expected:
            raise CalibrationError(f"{where}: histogram grid {grid} differs from this version's {expected}; "
                                   "stores with different grids cannot be merged")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise CalibrationError(f"{where}: 'layers' must be an object of layer name -> statistics")
        store = cls()
        prov = data.get("provenance")
        if not isinstance(prov, dict):
            raise CalibrationError(f"{where}: 'provenance' must be an object")
        base = empty_provenance()
        try:
            base.update(prov)
            base["prompts"] = int(base.get("prompts") or 0)
            for key in ("models", "comfyui_versions", "sources"):
                if not isinstance(base.get(key), list):
                    raise TypeError(f"provenance.{key} must be a list")
        except (TypeError, ValueError) as exc:
            raise CalibrationError(f"{where}: corrupt provenance ({exc})") from None
        store.provenance = base
        for name, entry in layers.items():
            try:
                store.layers[name] = LayerStats.from_json(entry)
            except (KeyError, TypeError, ValueError) as exc:
                what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
                raise CalibrationError(f"{where}: corrupt statistics for layer {name!r} ({what}); the file is damaged "
                                       "— re-record or restore it") from None
        return store

    # ------------------------------------------------------------------ files
    @classmethod
    def _read(cls, path: Path) -> CalibrationStore:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CalibrationError(f"{path}: no such calibration store") from None
        except IsADirectoryError:
            raise CalibrationError(f"{path}: is a directory, not a calibration store") from None
        except OSError as exc:
            raise CalibrationError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if raw[:2] in (b"\x1f\x8b", b"BZ") or raw[:6] == b"\xfd7zXZ\x00":
            raise CalibrationError(f"{path}: compressed file, not a calibration store; if it is an input-scale log, "
                                   "import it with `nvfp4 calib import`")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CalibrationError(f"{path}: not a calibration store (binary, not UTF-8 JSON)") from None
        try:
            data = strict_json_loads(text)
        except ValueError as exc:
            first = text.lstrip()[:200]
            hint = ""
            if first and first[0] not in "{[" and "\t" in first:
                hint = "; it looks like an input-scale log: import it with `nvfp4 calib import`"
            raise CalibrationError(f"{path}: not a calibration store (invalid JSON: {exc}){hint}") from None
        return cls.from_json_dict(data, path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStore:
        """Read a store and bind it to `path` (a later save() adds only what was recorded since)."""
        p = Path(path)
        store = cls._read(p)
        store.path = p
        return store

    @classmethod
    def open(cls, path: str | Path) -> CalibrationStore:
        """Load `path` if it exists, else an empty store bound to it: the recorder's entry point."""
        p = Path(path)
        if p.exists():
            return cls.load(p)
        return cls(p)

    def save(self, path: str | Path | None = None, *, overwrite: bool = False,
             lock_timeout: float = 60.0) -> Path:
        """Write the store atomically under an exclusive lock.

        * To the file the store is bound to (loaded from / last saved to): re-read it, add only the delta recorded
          since the last save, write. Concurrent writers lose nothing. If the file vanished, the full view is written.
        * To another path: write the full view; an existing file there is refused unless `overwrite`.
        Afterwards the store is bound to the path and its view includes what other processes had saved.
        """
        if path is None and self.path is None:
            raise ValueError("save() needs a path for a store that was not loaded from a file")
        target = Path(path) if path is not None else self.path
        bound = self.path is not None and (target == self.path or target.resolve() == self.path.resolve())
        if not target.parent.exists():
            raise CalibrationError(f"{target.parent} does not exist; create the folder first")
        self._fold()
        with file_lock(target, lock_timeout):
            if bound and target.exists():
                merged = self._read(target)
                # merge the delta into the freshly read store in place; delta objects are only inserted, never
                # mutated, so a failed write leaves the delta intact for the next save
                merged.provenance = merge_provenance(merged.provenance, self._delta_prov, where=str(target))
                for name, st in self._delta_layers.items():
                    mine = merged._layers.get(name)
                    if mine is None:
                        merged._layers[name] = st
                    else:
                        mine.update(st)
            else:
                if not bound and target.exists() and not overwrite:
                    raise CalibrationError(f"{target} already exists; load it and record into it, merge with "
                                           "`nvfp4 calib merge`, or pass overwrite=True / --force to replace it")
                merged = CalibrationStore()
                merged._layers = self._layers
                merged.provenance = json.loads(json.dumps(self.provenance))
            merged.provenance["created"] = merged.provenance.get("created") or _now()
            merged.provenance["updated"] = _now()
            text = merged.to_json()
            with atomic_output(target, force=True) as tmp:
                tmp.write_text(text, encoding="utf-8")
        self._layers = merged.layers
        self.provenance = merged.provenance
        self._delta_layers = {}
        self._delta_prov = empty_provenance()
        self.path = target
        return target

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return (f"CalibrationStore(path={str(self.path) if self.path else None!r}, layers={len(self.layers)}, "
                f"prompts={self.provenance.get('prompts', 0)})")

    def layer_names(self) -> list[str]:
        return sorted(self.layers)
