"""ComfyUI glue shared by the nodes: which modules are Linears, per-sampling-run forward pre-hooks, paths, versions.

Why a wrapper and not a hook registered in a node's `execute`: `ModelPatcher.clone()` shares the `nn.Module` tree,
so a hook registered there would leak into every branch using that model and outlive the prompt. Instead
`install_linear_pre_hooks` adds, to a *clone* of the patcher, an `OUTER_SAMPLE` wrapper that registers pre-hooks on
every Linear of the diffusion model the sampler really uses (`executor.class_obj.model_patcher`, which may be a
non-dynamic delegate) and removes them in `finally`; and, when asked, an `APPLY_MODEL` wrapper that publishes the
sigma, step index and cond/uncond layout of each model evaluation. No monkeypatching, no hook survives a sampling
run, other clones are unaffected (wrappers live on the patcher), and every forward path is seen (pre-hooks run in
`Module.__call__`: lowvram casting, dynamic VRAM, W4A4 and W4A16 alike). See the reference §3.

ComfyUI is imported lazily (inside functions), so importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..quant.errors import CalibrationError, NVFP4Error

log = logging.getLogger("nvfp4_lab.nodes")

__all__ = [
    "CALIBRATION_EVENT",
    "CHECKPOINT_PREFIX",
    "DM_PREFIX",
    "ModelCall",
    "SamplingRun",
    "attach_recorder",
    "bare_layer_name",
    "calibration_dir",
    "comfyui_version",
    "count_forward_pre_hooks",
    "diffusion_model",
    "install_linear_pre_hooks",
    "is_linear",
    "linear_modules",
    "model_architecture",
    "model_file",
    "model_header_hash",
    "output_dir",
    "sanitize_session",
    "send_event",
    "session_store_path",
]

DM_PREFIX = "diffusion_model."                  # prefix of layer keys in ModelPatcher.model_state_dict()
CHECKPOINT_PREFIX = "model.diffusion_model."    # prefix of layer keys in full checkpoints / ModelSave output
CALIBRATION_EVENT = "nvfp4lab.calibration"      # PromptServer event with live calibration counts
CALIBRATION_SUBDIR = "nvfp4_calibration"
TORCH_COMPILE_KWARGS = "torch_compile_kwargs"   # comfy_api.torch_helpers.torch_compile.TORCH_COMPILE_KWARGS


# ------------------------------------------------------------------------------------------------ module tree
def is_linear(module: Any) -> bool:
    """A Linear ComfyUI may quantize: torch.nn.Linear (incl. comfy.ops Linears) or any comfy.ops CastWeightBiasOp with
    `in_features` that is not an MoE bank. `MixedPrecisionOps.Linear` (every Linear of a mixed NVFP4/FP8 model) is
    *not* an nn.Linear, so an isinstance test alone misses all of them. MoE banks (`num_experts`) are called through
    `expert_linear()`, never `forward`, so pre-hooks could not see them anyway."""
    if isinstance(module, torch.nn.Linear):
        return not hasattr(module, "num_experts")
    try:
        import comfy.ops
    except ImportError:  # pragma: no cover - outside ComfyUI only nn.Linear exists
        return False
    return (isinstance(module, comfy.ops.CastWeightBiasOp) and hasattr(module, "in_features")
            and not hasattr(module, "num_experts"))


def diffusion_model(model: Any) -> torch.nn.Module:
    """The diffusion model `nn.Module` of a ModelPatcher, a BaseModel or the module itself."""
    inner = getattr(model, "model", model)                        # ModelPatcher -> BaseModel
    dm = getattr(inner, "diffusion_model", None)
    if isinstance(dm, torch.nn.Module):
        return dm
    if isinstance(model, torch.nn.Module):
        return model
    raise NVFP4Error(f"{type(model).__name__} has no diffusion_model; connect a MODEL")


def linear_modules(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """(bare layer name, module) of every Linear of the diffusion model, in module order.

    The names are `named_modules()` names of `model.diffusion_model`: the checkpoint key without `.weight` for a
    diffusion-model file, and without the `model.diffusion_model.` prefix for full checkpoints."""
    return [(name, mod) for name, mod in diffusion_model(model).named_modules() if name and is_linear(mod)]


def bare_layer_name(key: str) -> str:
    """Layer name of a checkpoint or state-dict key: strip `model.diffusion_model.` / `diffusion_model.` and a
    trailing `.weight`/`.bias` (the project-wide layer naming, docs/DESIGN.md)."""
    for prefix in (CHECKPOINT_PREFIX, DM_PREFIX):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def count_forward_pre_hooks(model: Any) -> int:
    """Number of forward pre-hooks on every module of the diffusion model (0 after any sampling run of ours)."""
    return sum(len(m._forward_pre_hooks) for m in diffusion_model(model).modules())


# ------------------------------------------------------------------------------------------------ wrappers
@dataclass
class ModelCall:
    """One batched model evaluation (the APPLY_MODEL wrapper's view of it).

    sigma: per-row sigma tensor (device); step: 0-dim int64 device tensor = index of the nearest sigma in the
    schedule (None without a schedule; no host sync is done to compute it); cond_or_uncond: chunk order along the
    batch (0 = positive, 1 = negative), None when unknown."""

    sigma: torch.Tensor | None
    step: torch.Tensor | None
    cond_or_uncond: tuple[int, ...] | None
    sample_sigmas: torch.Tensor | None
    transformer_options: dict


@dataclass
class SamplingRun:
    """What `on_run_end` receives after each sampler run of the patcher (success or failure)."""

    ok: bool
    error: BaseException | None
    patcher: Any                         # the ModelPatcher the sampler really used
    layers: list[str] = field(default_factory=list)     # layers that got a hook
    multigpu: bool = False               # the run used multi-GPU clones (their share was not observed)
    prompt_id: str | None = None


def _step_index(t: Any, schedule: Any) -> torch.Tensor | None:
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or not isinstance(schedule, torch.Tensor) \
            or schedule.numel() == 0:
        return None
    s = schedule.to(device=t.device, dtype=torch.float32)
    return (s - t.reshape(-1)[0].to(torch.float32)).abs().argmin()


def _compile_check(options: dict | None, policy: str, where: str) -> None:
    if options and options.get(TORCH_COMPILE_KWARGS):
        msg = (f"{where}: this MODEL is torch.compile'd (TorchCompileModel); forward pre-hooks would cause graph "
               "breaks and recompiles. Remove TorchCompileModel while calibrating / emulating, or place it after "
               "this node only for final renders")
        if policy == "refuse":
            raise NVFP4Error(msg)
        log.warning(msg)


def _prompt_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # pragma: no cover
        return None
    ctx = get_executing_context()
    return getattr(ctx, "prompt_id", None) if ctx is not None else None


def install_linear_pre_hooks(model_patcher: Any, key: str,
                             make_hook: Callable[[str, torch.nn.Module], Callable | None],
                             on_run_end: Callable[[SamplingRun], None] | None = None, *,
                             on_model_call: Callable[[ModelCall], None] | None = None,
                             on_run_start: Callable[[Any], None] | None = None,
                             torch_compile: str = "refuse") -> Any:
    """A clone of `model_patcher` whose sampler runs see `make_hook(name, module)` as a forward pre-hook on every
    Linear of the diffusion model (name = bare layer name; return None to skip a module).

    The hooks are registered by an OUTER_SAMPLE wrapper on the module tree of the patcher the sampler really uses,
    and removed in its `finally`, after which `on_run_end(SamplingRun)` is called (also after a failed run; an
    exception it raises after a successful run propagates, one raised after a failed run is logged). With
    `on_model_call`, an APPLY_MODEL wrapper calls it with a `ModelCall` before each batched model evaluation.
    `on_run_start(patcher)` runs before the hooks are registered.

    The wrapper key is `key` plus a unique suffix, so several installations (two calibrations, calibration +
    emulation) stack instead of replacing each other. `torch_compile`: "refuse" (NVFP4Error) or "warn" when the
    MODEL is torch.compile'd. The input patcher is never modified.
    """
    from comfy.patcher_extension import WrappersMP

    if torch_compile not in ("refuse", "warn"):
        raise ValueError("torch_compile must be 'refuse' or 'warn'")
    _compile_check(getattr(model_patcher, "model_options", None), torch_compile, key)
    m = model_patcher.clone()
    wkey = f"{key}.{uuid.uuid4().hex[:12]}"

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        patcher = guider.model_patcher
        _compile_check(getattr(guider, "model_options", None), torch_compile, key)
        if on_run_start is not None:
            on_run_start(patcher)
        handles = []
        names: list[str] = []
        run = SamplingRun(ok=False, error=None, patcher=patcher, layers=names, prompt_id=_prompt_id())
        try:
            for name, mod in linear_modules(patcher):
                hook = make_hook(name, mod)
                if hook is not None:
                    handles.append(mod.register_forward_pre_hook(hook))
                    names.append(name)
            out = executor(*args, **kwargs)
            run.ok = True
            return out
        except BaseException as exc:
            run.error = exc
            raise
        finally:
            for h in handles:
                h.remove()
            run.multigpu = bool((getattr(guider, "model_options", None) or {}).get("multigpu_clones"))
            if run.multigpu:
                log.warning("%s: the sampler used multi-GPU clones; only the main device's share of the batch was "
                            "observed. Disable multi-GPU while calibrating", key)
            if on_run_end is not None:
                if run.ok:
                    on_run_end(run)
                else:
                    try:
                        on_run_end(run)
                    except Exception:  # noqa: BLE001 - never mask the sampler's own error
                        log.exception("%s: error while ending a failed sampling run", key)

    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, wkey, outer_sample)

    if on_model_call is not None:
        def apply_model(executor, *args, **kwargs):
            t = args[1] if len(args) > 1 else kwargs.get("t")
            topts = args[5] if len(args) > 5 else kwargs.get("transformer_options", {}) or {}
            schedule = topts.get("sample_sigmas")
            cou = topts.get("cond_or_uncond")
            on_model_call(ModelCall(sigma=t if isinstance(t, torch.Tensor) else None,
                                    step=_step_index(t, schedule),
                                    cond_or_uncond=tuple(int(c) for c in cou) if cou else None,
                                    sample_sigmas=schedule if isinstance(schedule, torch.Tensor) else None,
                                    transformer_options=topts))
            return executor(*args, **kwargs)

        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, wkey, apply_model)
    return m


def attach_recorder(model_patcher: Any, recorder: Any, store: Any = None,
                    on_flush: Callable[[Any, SamplingRun], None] | None = None, *,
                    key: str = "nvfp4_lab.calibrate") -> Any:
    """A clone of `model_patcher` that feeds `recorder` (calibration.recorder.Recorder) during every sampler run.

    Step index and cond/uncond layout are published to the recorder before each model evaluation. After a
    successful run the recorder is flushed once (one host transfer) into `store` (if given) and
    `on_flush(RunSummary, SamplingRun)` is called; a failed run's partial data is discarded. torch.compile'd models
    are refused."""

    def on_call(call: ModelCall) -> None:
        recorder.set_context(step=call.step, cond_or_uncond=call.cond_or_uncond)

    def run_end(run: SamplingRun) -> None:
        recorder.clear_context()
        if not run.ok:
            recorder.discard()
            return
        summary = recorder.flush(store)
        if on_flush is not None:
            on_flush(summary, run)

    return install_linear_pre_hooks(model_patcher, key, recorder.make_hook, run_end, on_model_call=on_call)


# ------------------------------------------------------------------------------------------------ model facts
def model_file(model_patcher: Any) -> Path | None:
    """The file a MODEL was loaded from (UNETLoader / checkpoint loaders set `cached_patcher_init`), else None."""
    init = getattr(model_patcher, "cached_patcher_init", None)
    if isinstance(init, tuple) and len(init) >= 2 and isinstance(init[1], (tuple, list)) and init[1]:
        first = init[1][0]
        if isinstance(first, (str, os.PathLike)) and Path(first).exists():
            return Path(first)
    return None


def model_header_hash(path: str | os.PathLike | None) -> str | None:
    """sha256 of the model file's header (quant.checkpoint), None when unreadable: identifies the model cheaply."""
    if path is None:
        return None
    try:
        from ..quant.checkpoint import open_checkpoint

        with open_checkpoint(path) as ckpt:
            return ckpt.header_hash()
    except Exception as exc:  # noqa: BLE001 - provenance is best effort
        log.warning("nvfp4_lab: cannot hash the header of %s (%s)", path, exc)
        return None


def model_architecture(model_patcher: Any) -> str | None:
    """ComfyUI's detected model class (e.g. `FluxSchnell`, `WAN21_T2V`)."""
    cfg = getattr(getattr(model_patcher, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else None


def comfyui_version() -> str:
    """The running ComfyUI's version (`comfyui_version.__version__`), or 'unknown'."""
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


# ------------------------------------------------------------------------------------------------ paths / UI
def output_dir() -> Path:
    """ComfyUI's output directory (honours --output-directory / --base-directory)."""
    import folder_paths

    return Path(folder_paths.get_output_directory())


def calibration_dir() -> Path:
    """`<output>/nvfp4_calibration`: where calibration sessions live."""
    return output_dir() / CALIBRATION_SUBDIR


_SESSION_RE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_session(name: str) -> str:
    """A session name safe as a file name: [A-Za-z0-9._-] only, no leading dots, no '.json', at most 100 chars;
    empty -> 'default'."""
    s = _SESSION_RE.sub("_", (name or "").strip())
    if s.lower().endswith(".json"):
        s = s[:-5]
    s = s.strip("._")[:100].strip("._")
    return s or "default"


def session_store_path(session: str) -> Path:
    """`<output>/nvfp4_calibration/<sanitized session>.json`."""
    return calibration_dir() / f"{sanitize_session(session)}.json"


def send_event(event: str, data: dict, sid: str | None = None) -> bool:
    """`PromptServer.instance.send_sync(event, data)` when a server runs (False server-less, never raises)."""
    try:
        from server import PromptServer

        inst = getattr(PromptServer, "instance", None)
        if inst is None:
            return False
        inst.send_sync(event, data, sid)
        return True
    except Exception:  # noqa: BLE001 - the UI update is optional
        return False


def check_store_dir(path: Path) -> None:
    """Create the calibration folder; CalibrationError naming it when impossible."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CalibrationError(f"{path.parent}: cannot create the calibration folder ({exc.strerror or exc})") from None
