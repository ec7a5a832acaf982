"""Framework-agnostic recorder of Linear input magnitudes, fed by forward pre-hooks.

Why: the static `input_scale` of a W4A4 NVFP4 layer must cover the activations the layer really sees. ComfyUI's
dynamic scale is `amax(|x|) / 2688` over the *whole* call, so that per-call amax is what we record, per layer, per
sampling step and (when the sampler batches cond and uncond together) per cond/uncond chunk.

Design constraints (see docs/DESIGN.md and the reference §3):
- A hook never synchronizes with the device: it launches one reduction and appends the 0-/1-D result to a Python
  list. No `.item()`, `.cpu()`, `.tolist()`, no Python truth test of a tensor.
- `flush()` moves everything recorded since the last flush to the host with **one** transfer per device and writes
  it into a `CalibrationStore` (numpy arrays) — once per sampling run.
- Works under `torch.inference_mode()`; tensors are detached and never kept for autograd.
- Optionally keeps a bounded uniform sample of real input rows per layer (bottom-k of random keys: exactly mergeable
  across runs and files), saved to a safetensors sidecar `<session>.samples.safetensors` for the sensitivity probe.

This module never imports ComfyUI; `nodes/comfy_glue.py` connects it to ComfyUI's sampler wrappers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..quant.errors import CalibrationError

__all__ = [
    "COND_LABELS",
    "RecordContext",
    "Recorder",
    "RunData",
    "RunSummary",
    "cond_label",
    "input_samples_path",
    "load_input_samples",
    "save_input_samples",
]

# ComfyUI's `cond_or_uncond` entries: index of the cond list passed to calc_cond_batch (0 = positive, 1 = negative).
COND_LABELS = {0: "cond", 1: "uncond"}
SAMPLES_FORMAT = "nvfp4_lab.input_samples"
SAMPLES_VERSION = "1"
_KEYS_PREFIX = "__keys__."
# Compact the per-call device results into one device tensor every this many calls (asynchronous; keeps the Python
# list and the number of tiny allocations bounded on very long runs).
_COMPACT_EVERY = 16384


def cond_label(index: int) -> str:
    """Label of one `cond_or_uncond` entry: 'cond', 'uncond', or 'cond<i>' for extra conds of custom guiders."""
    return COND_LABELS.get(int(index), f"cond{int(index)}")


@dataclass
class RecordContext:
    """What the caller knows about the model evaluation in progress; hooks read it at call time.

    step: sampling step index: a Python int, a 0-dim integer tensor (may live on the device: no sync needed), or None.
    cond_or_uncond: order of the cond chunks stacked along dim 0 of the batch (ComfyUI's list), or None.
    """

    step: int | torch.Tensor | None = None
    cond_or_uncond: tuple[int, ...] | None = None


@dataclass
class RunData:
    """Everything one flush moved to the host, as numpy arrays in call order.

    calls[layer]: whole-call amax (float32), one per hook call — the value ComfyUI's dynamic scale would use.
    steps[layer]: step index per call (int64, -1 = unknown).
    conds[layer]: cond label per call: 'cond'/'uncond'/… when the whole call belonged to one cond, None when unknown
        or when the call batched several conds (then its chunks are in `chunks`).
    chunks[layer][label]: (amax per chunk, step per chunk) of the calls that batched several conds.
    """

    calls: dict[str, np.ndarray] = field(default_factory=dict)
    steps: dict[str, np.ndarray] = field(default_factory=dict)
    conds: dict[str, list[str | None]] = field(default_factory=dict)
    chunks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    @property
    def total_calls(self) -> int:
        return int(sum(v.size for v in self.calls.values()))


@dataclass
class RunSummary:
    """What a flush recorded: number of layers and calls, and the run data itself."""

    layers: int
    calls: int
    data: RunData


class _Reservoir:
    """Bottom-k sample of rows by i.i.d. uniform keys: a uniform sample without replacement, mergeable exactly."""

    __slots__ = ("keys", "rows")

    def __init__(self, rows: torch.Tensor, keys: torch.Tensor):
        self.rows = rows
        self.keys = keys


def _bottom_k(rows: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    if keys.shape[0] <= k:
        return rows, keys
    top = torch.topk(keys, k, largest=False, sorted=False)
    return rows.index_select(0, top.indices), top.values


class Recorder:
    """Collects per-call input amax of named modules through forward pre-hooks, on the device, until `flush()`.

    Typical use without ComfyUI::

        rec = Recorder()
        with rec.attached(model.named_modules()):      # or: handles = rec.attach(...)
            rec.set_context(step=i, cond_or_uncond=(0, 1))
            model(x)
        rec.flush(store)                               # one host transfer; store.record(...) per layer/bucket

    `make_hook(name, module)` returns the hook for one module (what `nodes.comfy_glue.install_linear_pre_hooks`
    asks for). One Recorder may be shared by many hooks; it is thread-safe for appends.
    """

    def __init__(self, *, per_chunk: bool = True, sample_rows: int = 0, seed: int | None = None):
        """per_chunk: also record per cond/uncond chunk when the context gives a layout.
        sample_rows: keep up to this many real input rows per layer for the sensitivity probe (0 = off).
        seed: seed of the row sampler's own generator (None = random; the global RNG is never touched)."""
        if sample_rows < 0:
            raise ValueError("sample_rows must be >= 0")
        self.per_chunk = per_chunk
        self.sample_rows = int(sample_rows)
        self.seed = int.from_bytes(os.urandom(7), "little") if seed is None else int(seed)
        self.context = RecordContext()
        self._lock = threading.RLock()
        self._layer_ids: dict[str, int] = {}
        self._layer_names: list[str] = []
        self._layouts: dict[tuple[int, ...] | None, int] = {None: 0}
        self._layout_list: list[tuple[int, ...] | None] = [None]
        self._reset_pending()
        self._reservoirs: dict[str, _Reservoir] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self.total_calls = 0          # host-side counters (no sync): calls recorded over this recorder's life
        self.runs = 0                 # flushes that recorded something

    # ---------------------------------------------------------------- context
    def set_context(self, step: int | torch.Tensor | None = None,
                    cond_or_uncond: Iterable[int] | None = None) -> None:
        """Publish the step and cond layout of the model evaluation about to run (read by the hooks)."""
        self.context = RecordContext(step, tuple(int(c) for c in cond_or_uncond) if cond_or_uncond else None)

    def clear_context(self) -> None:
        self.context = RecordContext()

    # ---------------------------------------------------------------- hooks
    def make_hook(self, name: str, module: torch.nn.Module | None = None) -> Callable[[torch.nn.Module, tuple], None]:
        """Forward-pre-hook for the module called `name`: records the amax of its first positional input."""
        layer_id = self._layer_id(name)

        def hook(mod: torch.nn.Module, args: tuple) -> None:
            if args:
                self.observe(layer_id, args[0])
            return None

        hook.__name__ = f"nvfp4_lab_record[{name}]"
        return hook

    def attach(self, named_modules: Iterable[tuple[str, torch.nn.Module]],
               predicate: Callable[[torch.nn.Module], bool] | None = None) -> list:
        """Register a pre-hook on every (name, module) (filtered by `predicate`); returns the removable handles."""
        handles = []
        for name, mod in named_modules:
            if predicate is None or predicate(mod):
                handles.append(mod.register_forward_pre_hook(self.make_hook(name, mod)))
        return handles

    @contextlib.contextmanager
    def attached(self, named_modules: Iterable[tuple[str, torch.nn.Module]],
                 predicate: Callable[[torch.nn.Module], bool] | None = None) -> Iterator[list]:
        """`attach` as a context manager: every hook is removed on exit, also on error."""
        handles = self.attach(named_modules, predicate)
        try:
            yield handles
        finally:
            for h in handles:
                h.remove()

    def _layer_id(self, name: str) -> int:
        with self._lock:
            if name not in self._layer_ids:
                self._layer_ids[name] = len(self._layer_names)
                self._layer_names.append(name)
            return self._layer_ids[name]

    def _layout_id(self, layout: tuple[int, ...] | None) -> int:
        lid = self._layouts.get(layout)
        if lid is None:
            with self._lock:
                lid = self._layouts.setdefault(layout, len(self._layout_list))
                if lid == len(self._layout_list):
                    self._layout_list.append(layout)
        return lid

    def _step_slot(self, step: int | torch.Tensor | None) -> int:
        """Index into the step list for this call; tensors are kept as they are (no sync) and shared per context."""
        if step is None:
            return -1
        ctx_step = self._pending_step_obj
        if ctx_step is step:
            return self._pending_step_slot
        self._pending_steps.append(step.detach() if isinstance(step, torch.Tensor) else int(step))
        self._pending_step_obj = step
        self._pending_step_slot = len(self._pending_steps) - 1
        return self._pending_step_slot

    def observe(self, layer: int | str, x: object) -> None:
        """Record one call's input `x` for `layer` (id or name). Never synchronizes with the device."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        layer_id = layer if isinstance(layer, int) else self._layer_id(layer)
        x = x.detach()
        if x.element_size() == 1:
            x = x.float()               # float8 inputs: the norm kernels need a wider type (exact)
        ctx = self.context
        layout = ctx.cond_or_uncond if self.per_chunk else None
        k = len(layout) if layout else 1
        if k > 1 and (x.dim() == 0 or x.shape[0] % k != 0):
            layout, k = None, 1         # batch dim does not split into the chunks: whole call only
        elif k == 1 and layout is not None and len(set(layout)) == 1:
            layout = layout[:1]         # one cond only: the whole call belongs to it
        if k > 1:
            v = torch.linalg.vector_norm(x.unflatten(0, (k, x.shape[0] // k)), ord=math.inf,
                                         dim=tuple(range(1, x.dim() + 1)))
        else:
            v = torch.linalg.vector_norm(x, ord=math.inf).reshape(1)
        with self._lock:
            step_slot = self._step_slot(ctx.step)
            self._pending_vals.append(v)
            self._pending_meta.append((layer_id, self._layout_id(layout), step_slot, k))
            self._pending_count += k
            self.total_calls += 1
            if len(self._pending_vals) >= self._compact_at:
                self._compact()
        if self.sample_rows:
            self._sample(self._layer_names[layer_id], x)

    def _compact(self) -> None:
        """Concatenate pending per-call results on their device (asynchronous, no sync); single-device only."""
        devices = {v.device for v in self._pending_vals}
        if len(devices) == 1:
            self._compacted.append(torch.cat(self._pending_vals).float())
            self._compacted_meta.extend(self._pending_meta)
            self._pending_vals, self._pending_meta = [], []
        else:
            self._compact_at = len(self._pending_vals) * 2

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + len(self._generators))
            self._generators[device] = gen
        return gen

    def _sample(self, name: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
        keys = torch.rand(rows.shape[0], device=rows.device, generator=self._generator(rows.device))
        rows, keys = _bottom_k(rows, keys, self.sample_rows)
        rows = rows.clone() if rows.data_ptr() == x.data_ptr() else rows
        with self._lock:
            old = self._reservoirs.get(name)
            if old is not None:
                if old.rows.shape[1] != rows.shape[1]:
                    return      # a module called with another width: keep the first
                rows = torch.cat([old.rows, rows.to(old.rows.device, old.rows.dtype)])
                keys = torch.cat([old.keys, keys.to(old.keys.device)])
                rows, keys = _bottom_k(rows, keys, self.sample_rows)
            self._reservoirs[name] = _Reservoir(rows, keys)

    # ---------------------------------------------------------------- flush
    def _reset_pending(self) -> None:
        self._pending_vals: list[torch.Tensor] = []
        self._pending_meta: list[tuple[int, int, int, int]] = []
        self._compacted: list[torch.Tensor] = []
        self._compacted_meta: list[tuple[int, int, int, int]] = []
        self._pending_steps: list[int | torch.Tensor] = []
        self._pending_step_obj: object = None
        self._pending_step_slot = -1
        self._pending_count = 0
        self._compact_at = _COMPACT_EVERY

    @property
    def pending_calls(self) -> int:
        """Hook calls recorded since the last flush (host-side count, no sync)."""
        return len(self._pending_meta) + len(self._compacted_meta)

    @property
    def layer_names(self) -> list[str]:
        """Names of every layer a hook was made for, in creation order."""
        return list(self._layer_names)

    def discard(self) -> None:
        """Drop what was recorded since the last flush (e.g. a sampling run that failed)."""
        with self._lock:
            self._reset_pending()

    def collect(self) -> RunData:
        """Move everything recorded since the last flush to the host (one transfer per device) and reset."""
        with self._lock:
            vals_list = self._compacted + self._pending_vals
            meta = self._compacted_meta + self._pending_meta
            steps = self._pending_steps
            self._reset_pending()
        data = RunData()
        if not meta:
            return data
        with torch.no_grad():
            host_vals, host_steps = _to_host(vals_list, steps)
        # Per-call offsets into host_vals: each call wrote k values, in meta order.
        ks = np.fromiter((m[3] for m in meta), dtype=np.int64, count=len(meta))
        offsets = np.concatenate([[0], np.cumsum(ks)[:-1]])
        layer_ids = np.fromiter((m[0] for m in meta), dtype=np.int64, count=len(meta))
        layout_ids = np.fromiter((m[1] for m in meta), dtype=np.int64, count=len(meta))
        step_slots = np.fromiter((m[2] for m in meta), dtype=np.int64, count=len(meta))
        call_steps = np.where(step_slots >= 0, host_steps[np.maximum(step_slots, 0)] if host_steps.size else -1, -1)
        # Whole-call amax = max over the call's chunks.
        whole = np.maximum.reduceat(host_vals, offsets) if host_vals.size else np.zeros(0, np.float32)
        # Per layout: the single cond label of the whole call (None if unknown or mixed).
        layout_cond = [None if not lay or len(set(lay)) != 1 else cond_label(lay[0]) for lay in self._layout_list]
        for lid in np.unique(layer_ids):
            name = self._layer_names[lid]
            sel = layer_ids == lid
            data.calls[name] = whole[sel].astype(np.float32)
            data.steps[name] = call_steps[sel].astype(np.int64)
            data.conds[name] = [layout_cond[i] for i in layout_ids[sel]]
            chunks: dict[str, tuple[list[float], list[int]]] = {}
            for i in np.nonzero(sel & (layout_ids > 0))[0]:
                layout = self._layout_list[layout_ids[i]]
                if layout_cond[layout_ids[i]] is not None:
                    continue
                for j, c in enumerate(layout):
                    lv, ls = chunks.setdefault(cond_label(c), ([], []))
                    lv.append(host_vals[offsets[i] + j])
                    ls.append(call_steps[i])
            if chunks:
                data.chunks[name] = {lab: (np.asarray(v, np.float32), np.asarray(s, np.int64))
                                     for lab, (v, s) in chunks.items()}
        return data

    def flush(self, store=None) -> RunSummary:
        """Collect (one host transfer) and, if `store` is given, write the run into it (see `write_run`)."""
        data = self.collect()
        if data.calls:
            self.runs += 1
            if store is not None:
                write_run(store, data)
        return RunSummary(layers=len(data.calls), calls=data.total_calls, data=data)

    # ---------------------------------------------------------------- samples
    def input_samples(self, *, clear: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The row samples kept since the last clear, as host tensors: layer -> (rows [n, in_features], keys [n]).

        With clear=True the recorder forgets them (what `save_input_samples` does after merging them into a file:
        bottom-k of the union equals bottom-k of the per-part bottom-k's, so saving in parts stays exact)."""
        with self._lock:
            res = dict(self._reservoirs)
            if clear:
                self._reservoirs = {}
        return {name: (r.rows.cpu(), r.keys.float().cpu()) for name, r in res.items()}

    def save_input_samples(self, path: str | Path) -> Path | None:
        """Merge the rows sampled since the last save into the sidecar at `path` (locked, atomic) and forget them;
        None when sampling is off or nothing was sampled."""
        if not self.sample_rows:
            return None
        samples = self.input_samples(clear=True)
        if not samples:
            return None
        return save_input_samples(path, samples, max_rows=self.sample_rows)


def _to_host(vals_list: list[torch.Tensor], steps: list[int | torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-call values and step tensors on their device and copy them to the host in one transfer."""
    step_host = np.full(len(steps), -1, dtype=np.int64)
    dev_steps: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for i, s in enumerate(steps):
        if isinstance(s, torch.Tensor):
            dev_steps.setdefault(s.device, []).append((i, s))
        else:
            step_host[i] = int(s)
    # Values must stay in call order; they normally all live on one device.
    devices = []
    for v in vals_list:
        if not devices or devices[-1][0] != v.device:
            devices.append((v.device, []))
        devices[-1][1].append(v)
    parts: list[np.ndarray] = []
    for dev, vs in devices:
        flat = torch.cat([v.reshape(-1) for v in vs]).float()      # cat promotes mixed dtypes exactly
        extra = dev_steps.pop(dev, [])
        if extra:
            st = torch.stack([s.reshape(()).to(dev, torch.float64) for _, s in extra])
            both = torch.cat([flat.double(), st]).cpu().numpy()       # the one sync of this device
            parts.append(both[: flat.numel()].astype(np.float32))
            for (i, _), val in zip(extra, both[flat.numel():]):
                step_host[i] = int(round(float(val)))
        else:
            parts.append(flat.cpu().numpy())
    for dev, extra in dev_steps.items():        # steps on a device that holds no values (unusual)
        st = torch.stack([s.reshape(()).to(dev, torch.float64) for _, s in extra]).cpu().numpy()
        for (i, _), val in zip(extra, st):
            step_host[i] = int(round(float(val)))
    vals = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return vals.astype(np.float32, copy=False), step_host


# ---------------------------------------------------------------------- store bridge
def write_run(store, data: RunData) -> None:
    """Write one run into a CalibrationStore, grouped by (step, cond).

    Whole calls go to `store.record(layer, values, step=, cond=)` with the call's cond label when the call held one
    cond only, else cond=None (they are what ComfyUI's dynamic scale sees); the per-chunk amax of calls that batched
    cond and uncond go to `store.record_cond` (chunk buckets only, never added to the layer totals).
    """
    for name, vals in data.calls.items():
        steps = data.steps[name]
        conds = np.asarray([c if c is not None else "" for c in data.conds.get(name, [None] * vals.size)], dtype=object)
        keys = sorted({(int(s), c) for s, c in zip(steps.tolist(), conds.tolist())})
        for step, cond in keys:
            sel = (steps == step) & (conds == cond)
            store.record(name, vals[sel], step=None if step < 0 else step, cond=cond or None)
        for label, (cv, cs) in data.chunks.get(name, {}).items():
            for step in np.unique(cs).tolist():
                sel = cs == step
                store.record_cond(name, cv[sel], step=None if step < 0 else int(step), cond=label)


# ---------------------------------------------------------------------- sidecar
def input_samples_path(store_path: str | Path) -> Path:
    """Sidecar path of a calibration store: `<dir>/<session>.samples.safetensors` for `<dir>/<session>.json`."""
    p = Path(store_path)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(f"{stem}.samples.safetensors")


def _read_samples_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    rows: dict[str, torch.Tensor] = {}
    keys: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SAMPLES_FORMAT:
                raise CalibrationError(f"{path}: not an NVFP4 Lab input-sample file (metadata format "
                                       f"{meta.get('format')!r}); delete or move it")
            for name in f.keys():
                if name.startswith(_KEYS_PREFIX):
                    keys[name[len(_KEYS_PREFIX):]] = f.get_tensor(name)
                else:
                    rows[name] = f.get_tensor(name)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read input samples ({exc}); delete the file to start over") from None
    return rows, keys, meta


def load_input_samples(path: str | Path) -> dict[str, torch.Tensor]:
    """Real Linear input rows recorded during calibration: layer -> Tensor[rows, in_features] (CPU, recorded dtype).

    `path` is the sidecar (`<session>.samples.safetensors`) or its store (`<session>.json`). Rows are a uniform
    sample without replacement of every input row the layer saw (all prompts, steps, cond/uncond).
    """
    p = Path(path)
    if p.suffix == ".json":
        p = input_samples_path(p)
    if not p.is_file():
        raise CalibrationError(f"{p}: no input samples; run Calibrate (NVFP4) with record_input_samples=True")
    rows, _, _ = _read_samples_file(p)
    return rows


def save_input_samples(path: str | Path, samples: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       max_rows: int = 256) -> Path:
    """Merge `samples` (layer -> (rows, keys)) into the sidecar at `path`: bottom-`max_rows` by key per layer.

    Locked against concurrent writers and written atomically (temp file + rename).
    """
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    from .store import file_lock

    with file_lock(p):
        rows: dict[str, torch.Tensor] = {}
        keys: dict[str, torch.Tensor] = {}
        if p.is_file():
            rows, keys, _ = _read_samples_file(p)
        for name, (r, k) in samples.items():
            r = r.detach().cpu()
            k = k.detach().float().cpu()
            if name in rows and name in keys and rows[name].shape[1:] == r.shape[1:]:
                r = torch.cat([rows[name], r.to(rows[name].dtype)])
                k = torch.cat([keys[name].float(), k])
            r, k = _bottom_k(r, k, max_rows)
            rows[name], keys[name] = r.contiguous(), k.contiguous()
        tensors = {name: rows[name] for name in sorted(rows)}
        tensors.update({_KEYS_PREFIX + name: keys[name] for name in sorted(keys) if name in rows})
        meta = {"format": SAMPLES_FORMAT, "version": SAMPLES_VERSION, "max_rows": str(int(max_rows)),
                "layers": json.dumps(sorted(rows))}
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return p
