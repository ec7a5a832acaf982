"""Socket types of the pack, the small objects that travel on them, and the file lists our combos show.

Sockets (`io.Custom`): values on them are plain Python objects that only our nodes read.

============================  ==================================================================================
socket                        value
============================  ==================================================================================
``NVFP4_SOURCE``              `ModelSource`: where a model file is and what its header says (no tensor data)
``NVFP4_PLAN``                `quant.plan.Plan`
``NVFP4_LAYER_REPORT``        `LayerReport`: rows of `quant.inspect` plus totals, architecture and preset
``NVFP4_SENSITIVITY``         `calibration.sensitivity.SensitivityReport`
``NVFP4_CALIBRATION``         a calibration session: whatever Calibrate (NVFP4) emits; readers go through
                              `calibration_path()` which accepts a path, a `CalibrationStore` bound to a file, or an
                              object with a ``path`` / ``store_path`` / ``session_path`` attribute
============================  ==================================================================================

File lists (ComfyUI's `folder_paths` decides the folders; nothing here writes):
- models: every file `folder_paths.get_filename_list("diffusion_models")` shows, plus every
  ``*.safetensors.index.json`` below those folders (sharded models); shard files of an indexed folder are hidden.
- GGUF references: ``*.gguf`` below the diffusion_models (unet) folders.
- calibration sessions: ``<output>/nvfp4_calibration/**/*.json``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from ..quant.errors import CalibrationError, CheckpointError, NVFP4Error

Source = io.Custom("NVFP4_SOURCE")
PlanSocket = io.Custom("NVFP4_PLAN")
LayerReportSocket = io.Custom("NVFP4_LAYER_REPORT")
Sensitivity = io.Custom("NVFP4_SENSITIVITY")
Calibration = io.Custom("NVFP4_CALIBRATION")

CATEGORY = "NVFP4"
NONE = "none"
_SHARD_RE = re.compile(r"-\d+-of-\d+\.safetensors$")


# --------------------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """A model file the nodes read weights from (the saver streams the original tensors from it).

    Only header facts are kept; `open()` returns a fresh `quant.checkpoint.Checkpoint` (close it after use).
    """

    path: str                      # absolute path: .safetensors, *.safetensors.index.json, folder or .gguf
    name: str                      # what the user picked (relative to a diffusion_models folder) or the file name
    kind: str                      # "safetensors" | "sharded" | "gguf"
    header_sha256: str
    family: str                    # architecture family ("flux", "wan", ... "generic")
    variant: str
    architecture: str              # one line: variant, block groups, default preset
    preset: str | None             # default preset of the architecture (None for diffusers naming)
    tensors: int
    linear_layers: int
    metadata_keys: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def open(self):
        from ..quant.checkpoint import open_checkpoint

        return open_checkpoint(self.path)

    def describe(self) -> str:
        return (f"{self.name} ({self.kind}, {self.tensors} tensors, {self.linear_layers} Linear layers): "
                f"{self.architecture}")


def describe_source(path: str | os.PathLike, name: str | None = None) -> ModelSource:
    """Read a model's header and describe it (CheckpointError for unreadable files)."""
    from ..quant.architecture import detect_architecture

    with _open(path) as ckpt:
        arch = detect_architecture({n: tuple(ckpt.info(n).shape) for n in ckpt.names()})
        linear = sum(1 for lay in ckpt.layers().values() if lay.linear)
        return ModelSource(
            path=str(Path(path).resolve()), name=name or Path(path).name, kind=ckpt.kind,
            header_sha256=ckpt.header_hash(), family=arch.family, variant=arch.variant,
            architecture=arch.describe(), preset=None if arch.naming == "diffusers" else arch.preset,
            tensors=len(ckpt.names()), linear_layers=linear, metadata_keys=tuple(sorted(ckpt.metadata)),
            notes=tuple(ckpt.notes))


def _open(path: str | os.PathLike):
    from ..quant.checkpoint import open_checkpoint

    return open_checkpoint(path)


def source_from_model(model: Any) -> ModelSource:
    """The file a MODEL was loaded from (`comfy_glue.model_file`: UNETLoader, the checkpoint loaders and Load Model
    (NVFP4) set it). NVFP4Error when the MODEL has no file behind it."""
    from .comfy_glue import model_file

    path = model_file(model)
    if path is None:
        raise NVFP4Error("this MODEL does not say which file it was loaded from (no cached_patcher_init path); "
                         "connect the SOURCE output of Load Model (NVFP4) instead")
    return describe_source(path)


def resolve_source(source: ModelSource | None, model: Any = None) -> ModelSource:
    """SOURCE if connected, else the MODEL's file; NVFP4Error if neither is connected."""
    if source is not None:
        if not isinstance(source, ModelSource):
            raise NVFP4Error(f"the SOURCE input carries a {type(source).__name__}, not a model source")
        return source
    if model is not None:
        return source_from_model(model)
    raise NVFP4Error("connect a SOURCE (Load Model (NVFP4)) or a MODEL loaded from a file")


@dataclass
class LayerReport:
    """What Inspect Layers found: one `quant.inspect` row per layer, totals per format, architecture and preset."""

    source: str
    rows: list[dict]
    totals: dict[str, dict[str, int]]
    architecture: str
    preset: str | None
    origin: str = "file"           # "file" | "live model" (module tree of a MODEL without a file)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# file lists
# --------------------------------------------------------------------------------------------------------------

def model_folders() -> list[Path]:
    import folder_paths

    return [Path(p) for p in folder_paths.get_folder_paths("diffusion_models")]


def list_models() -> list[str]:
    """Names Load Model (NVFP4) offers: ComfyUI's diffusion_models list plus sharded indexes (relative paths).

    Uses ComfyUI's cached file list; only folders holding shard files (`*-00001-of-00003.safetensors`) are looked
    into for a `*.safetensors.index.json`, whose shards are then hidden (pick the index instead)."""
    import folder_paths

    names = list(folder_paths.get_filename_list("diffusion_models"))
    shard_dirs = {Path(n).parent.as_posix() for n in names if _SHARD_RE.search(n)}
    indexes: set[str] = set()
    indexed_dirs: set[str] = set()
    for rel_dir in shard_dirs:
        for root in model_folders():
            folder = root / rel_dir
            if folder.is_dir():
                for idx in folder.glob("*.safetensors.index.json"):
                    indexes.add(idx.relative_to(root).as_posix())
                    indexed_dirs.add(rel_dir)
    shown = [n for n in names if not (_SHARD_RE.search(n) and Path(n).parent.as_posix() in indexed_dirs)]
    return sorted(set(shown) | indexes)


def resolve_model(name: str) -> Path:
    """Absolute path of a name from `list_models()` (CheckpointError naming the folders when absent)."""
    rel = _safe_relative(name, "model")
    for root in model_folders():
        p = root / rel
        if p.exists():
            return p
    folders = ", ".join(str(p) for p in model_folders())
    raise CheckpointError(f"model {name!r} not found in the diffusion_models folders ({folders})")


def inside_model_folders(path: str | os.PathLike) -> Path:
    """`path` resolved, if it lies inside a diffusion_models folder (NVFP4Error otherwise): nodes that take a path
    from another node only read model files ComfyUI could list."""
    p = Path(path).expanduser().resolve()
    for root in model_folders():
        try:
            p.relative_to(root.resolve())
            return p
        except ValueError:
            continue
    raise NVFP4Error(f"{p} is not inside a diffusion_models folder; only files ComfyUI lists can be loaded this way")


def list_gguf() -> list[str]:
    """`none` plus every *.gguf below the diffusion_models/unet folders (relative paths)."""
    found: set[str] = set()
    for root in model_folders():
        if root.is_dir():
            found.update(p.relative_to(root).as_posix() for p in root.rglob("*.gguf") if p.is_file())
    return [NONE, *sorted(found)]


def calibration_dir() -> Path:
    from .comfy_glue import calibration_dir as glue_calibration_dir

    return glue_calibration_dir()


def list_sessions(with_none: bool = True) -> list[str]:
    """Calibration sessions: every *.json below <output>/nvfp4_calibration (relative paths), `none` first."""
    root = calibration_dir()
    found: list[str] = []
    if root.is_dir():
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.json") if p.is_file())
    return ([NONE] if with_none else []) + found


def resolve_session(name: str) -> Path | None:
    """Path of a session from `list_sessions()`; None for `none`/empty. CalibrationError when it vanished."""
    if not name or name == NONE:
        return None
    p = calibration_dir() / _safe_relative(name, "calibration session")
    if not p.is_file():
        raise CalibrationError(f"calibration session {name!r} not found in {calibration_dir()}; run Calibrate "
                               "(NVFP4) in a sampling workflow first, or pick another session")
    return p


def calibration_path(obj: Any) -> Path | None:
    """The store file behind a NVFP4_CALIBRATION value (None when nothing is connected).

    Accepts a path, a `CalibrationStore` bound to a file, or an object with `path` / `store_path` /
    `session_path`. CalibrationError when the session has not been written yet (the sampler did not run before
    the consuming node: connect the sampler's output to the node's `run_after` input).
    """
    if obj is None:
        return None
    cand: Any = obj
    if not isinstance(obj, (str, os.PathLike)):
        cand = None
        for attr in ("store_path", "session_path", "path"):
            value = getattr(obj, attr, None)
            if callable(value):
                value = value()
            if isinstance(value, (str, os.PathLike)):
                cand = value
                break
        if cand is None:
            raise CalibrationError(f"the calibration input carries a {type(obj).__name__} without a store path; "
                                   "connect the calibration output of Calibrate (NVFP4)")
    p = Path(cand)
    if not p.is_file():
        raise CalibrationError(f"calibration session {p.name} has no data yet ({p} does not exist): the sampler "
                               "that feeds Calibrate (NVFP4) must run first; connect its output to `run_after`")
    return p


def pick_calibration(obj: Any, session: str | None) -> Path | None:
    """The calibration store to use: the connected session object wins over the combo choice."""
    return calibration_path(obj) if obj is not None else resolve_session(session or NONE)


def _safe_relative(name: str, what: str) -> Path:
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise NVFP4Error(f"{what} {name!r} must be a name relative to its folder (no '..', not absolute)")
    return rel


def file_stamp(path: str | os.PathLike | None) -> tuple | None:
    """(path, mtime_ns, size) of a file, None when absent: `fingerprint_inputs` values, so a node re-runs when a
    file it reads (or writes) changed on disk although its widgets did not."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None, None)
    return (str(path), st.st_mtime_ns, st.st_size)


def stamp_of(resolve, name: str | None) -> tuple | None:
    """file_stamp of `resolve(name)`, None when the name does not resolve (validation reports that)."""
    if not name or name == NONE:
        return None
    try:
        return file_stamp(resolve(name))
    except Exception:  # noqa: BLE001 - a fingerprint never fails the prompt
        return None


def refresh_model_lists() -> None:
    """Forget ComfyUI's cached diffusion_models file list, so a file written now is listed without a restart.

    ComfyUI 0.29 caches `get_filename_list` per folder name and revalidates by folder mtime; renaming a file into
    a folder updates its mtime, but coarse file-system timestamps can hide a write made within the same tick, so
    the entry is dropped explicitly."""
    import folder_paths

    folder_paths.filename_list_cache.pop("diffusion_models", None)
    folder_paths.filename_list_cache.pop("unet", None)
