"""The streaming converter: a source checkpoint plus a plan become one ComfyUI-loadable mixed-precision file.

Why it is built this way:
- **Bounded memory.** The output header is computed from the plan before any tensor is read (every output shape and
  dtype is known in advance), then tensors are produced and written one layer at a time. Peak memory is one layer's
  source weight plus its quantization temporaries (chunked inside `nvfp4.quantize`), never the model.
- **Atomic.** `SafetensorsWriter` writes a temp file that is renamed only when every tensor was written; a failed
  verification deletes the output. The input is opened read-only and can never be the output.
- **One rule for dtypes.** Every non-quantized tensor is written in `plan.dtype_for_tensor(...)`, the same rule the
  size estimate uses, so the estimate and the file agree.
- **Quantized sources.** NVFP4 layers already in the source that stay NVFP4 are copied byte for byte (only the
  `comfy_quant` marker follows the plan, so W4A4 <-> W4A16 is free). Every other quantized layer (FP8 with
  `comfy_quant`, legacy scaled FP8, NVFP4 re-planned to another format) is dequantized to fp32 and re-quantized.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import formats, fp8, nvfp4
from .atomic import atomic_output, check_output_path
from .checkpoint import LEGACY_MARKER, QUANT_METADATA_KEY, Checkpoint, Layer, open_checkpoint
from .errors import CheckpointError, NVFP4Error
from .plan import LayerDecision, Plan
from .safetensors_io import SafetensorsWriter, torch_dtype

PROVENANCE_KEY = "nvfp4_lab"
QUANT_DTYPES = {"source": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LayerResult:
    """What happened to one planned layer: its new format, where it came from and the weight error it costs."""

    layer: str
    format: str
    source_format: str
    rel_rmse: float | None = None  # ||W - deq(Q(W))|| / ||W|| of the weight; None for plain casts
    action: str = "quantized"  # quantized | requantized | copied | cast
    digest: str | None = None  # sha256 of the weight (+ scale) bytes as written, checked by verify_output


@dataclass
class ConvertReport:
    output: Path
    input_bytes: int
    output_bytes: int
    seconds: float
    layers: list[LayerResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verified: bool = False

    def error_table(self, limit: int | None = None) -> str:
        """Per-layer weight error of the quantized layers, worst first."""
        rows = sorted((r for r in self.layers if r.rel_rmse is not None), key=lambda r: -r.rel_rmse)
        if limit is not None:
            rows = rows[:limit]
        if not rows:
            return "no quantized layers"
        width = max(len(r.layer) for r in rows)
        lines = [f"{'layer'.ljust(width)}  {'format':<12} {'rel_rmse':>9} {'SNR dB':>7}  from"]
        for r in rows:
            snr = -20 * math.log10(r.rel_rmse) if r.rel_rmse > 0 else math.inf
            lines.append(f"{r.layer.ljust(width)}  {r.format:<12} {r.rel_rmse:9.4f} {snr:7.2f}  {r.source_format}"
                         f" ({r.action})")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Output layout: (name, dtype, shape) of every output tensor plus how to make it
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Output:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


class _LayerJob:
    """Produces all output tensors of one planned layer from a single read + quantization of its weight."""

    def __init__(self, ckpt: Checkpoint, layer: Layer, decision: LayerDecision, plan: Plan, device: str,
                 quant_dtype: torch.dtype | None, measure: bool):
        self.ckpt, self.layer, self.dec, self.plan = ckpt, layer, decision, plan
        self.device, self.quant_dtype, self.measure = device, quant_dtype, measure
        self._tensors: dict[str, torch.Tensor] | None = None
        self._future: Future | None = None
        self.next: _LayerJob | None = None  # produced in the background while this one is written
        self.pool: ThreadPoolExecutor | None = None
        self.check = False  # keep a digest of the written bytes for verify_output
        self.result = LayerResult(decision.layer, decision.format, layer.format)

    # The order in which the layer's tensors are written (must match `outputs()`).
    def outputs(self) -> list[_Output]:
        fmt, name = self.dec.format, self.dec.layer
        outs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        if formats.is_nvfp4(fmt):
            wshape, sshape = formats.nvfp4_storage_shapes(*self._logical_shape())
            outs += [("weight", torch.uint8, wshape), ("weight_scale", torch.float8_e4m3fn, sshape),
                     ("weight_scale_2", torch.float32, ())]
        elif fmt in formats.FP8_DTYPES:
            outs += [("weight", formats.FP8_DTYPES[fmt], self._logical_shape()), ("weight_scale", torch.float32, ())]
        else:
            outs.append(("weight", formats.PLAIN_DTYPES[fmt], self._logical_shape()))
        if fmt in formats.QUANTIZED_FORMATS:
            if self._input_scale() is not None:
                outs.append(("input_scale", torch.float32, ()))
            outs.append(("comfy_quant", torch.uint8, (len(json.dumps(formats.comfy_quant_config(fmt))),)))
        if "bias" in self.layer.roles:
            info = self.ckpt.info(self.layer.roles["bias"])
            outs.append(("bias", _plain_dtype(self.plan, name + ".bias", info.dtype), info.shape))
        return [_Output(f"{name}.{role}", dt, tuple(shape), lambda role=role: self._take(role))
                for role, dt, shape in outs]

    def _logical_shape(self) -> tuple[int, int]:
        shape = tuple(self.dec.shape)
        if not same_weight_shape(self.layer.format, self.layer.shape, shape):
            raise CheckpointError(f"{self.ckpt.path}: layer {self.dec.layer!r} has shape {self.layer.shape}, the plan "
                                  f"says {shape}; re-create the plan for this model")
        return shape  # type: ignore[return-value]

    def _input_scale(self) -> float | None:
        if self.dec.input_scale is not None:
            return float(self.dec.input_scale)
        if self._copies_nvfp4():
            return self.layer.input_scale  # an NVFP4 layer kept as it is keeps its calibrated scale
        return None

    def _copies_nvfp4(self) -> bool:
        return formats.is_nvfp4(self.dec.format) and formats.is_nvfp4(self.layer.format)

    def prefetch(self) -> None:
        if self.pool is not None and self._future is None and self._tensors is None:
            self._future = self.pool.submit(self._produce)

    def _take(self, role: str) -> torch.Tensor:
        if self._tensors is None:
            self._tensors = self._future.result() if self._future is not None else self._produce()
            self._future = None
            if self.check:
                self.result.digest = weight_digest(self._tensors["weight"], self._tensors.get("weight_scale"))
            if self.next is not None:
                self.next.prefetch()  # read + quantize the next layer while this one is written
        return self._tensors.pop(role)

    def _produce(self) -> dict[str, torch.Tensor]:
        fmt, lay, name = self.dec.format, self.layer, self.dec.layer
        out: dict[str, torch.Tensor] = {}
        if self._copies_nvfp4():
            out["weight"] = self.ckpt.tensor(lay.roles["weight"])
            block = self.ckpt.tensor(lay.roles["weight_scale"])
            out["weight_scale"] = block.view(torch.float8_e4m3fn) if block.dtype == torch.uint8 else block
            out["weight_scale_2"] = self.ckpt.tensor(lay.roles["weight_scale_2"]).to(torch.float32).reshape(())
            self.result.action = "copied"
        else:
            ref = self._source_weight()
            weight = ref if self.quant_dtype is None else ref.to(self.quant_dtype)
            if formats.is_nvfp4(fmt):
                q = nvfp4.quantize(weight, name=f"{name}.weight")
                out.update(weight=q.qdata.cpu(), weight_scale=q.block_scale.cpu(), weight_scale_2=q.tensor_scale.cpu())
                if self.measure:
                    self.result.rel_rmse = _rel_rmse(ref, nvfp4.dequantize(q, torch.float32))
            elif fmt in formats.FP8_DTYPES:
                w8, scale = fp8.quantize_fp8(weight, formats.FP8_DTYPES[fmt], name=f"{name}.weight")
                out.update(weight=w8.cpu(), weight_scale=scale.cpu())
                if self.measure:
                    self.result.rel_rmse = _rel_rmse(ref, fp8.dequantize_fp8(w8, scale, torch.float32))
            else:
                out["weight"] = _cast(ref.cpu(), formats.PLAIN_DTYPES[fmt], f"{name}.weight")
                self.result.action = "cast"
            del ref, weight
        if fmt in formats.QUANTIZED_FORMATS:
            scale = self._input_scale()
            if scale is not None:
                if not (math.isfinite(scale) and scale > 0):
                    raise NVFP4Error(f"layer {name!r}: input_scale {scale!r} must be a positive finite number")
                out["input_scale"] = torch.tensor(scale, dtype=torch.float32)
            out["comfy_quant"] = formats.encode_comfy_quant(formats.comfy_quant_config(fmt))
        if "bias" in lay.roles:
            bias_key = lay.roles["bias"]
            bias = self.ckpt.tensor(bias_key)
            out["bias"] = _cast(bias, _plain_dtype(self.plan, name + ".bias", self.ckpt.info(bias_key).dtype), bias_key)
        return out

    def _source_weight(self) -> torch.Tensor:
        """The source weight on the conversion device: as stored for plain sources (so the per-tensor scale is
        computed in the source dtype, exactly like ComfyUI), dequantized to fp32 for quantized sources."""
        lay = self.layer
        if lay.format in formats.PLAIN_FORMATS:
            return self.ckpt.tensor(lay.roles["weight"], device=self.device)
        self.result.action = "requantized"
        return self.ckpt.dequantized_weight(lay, torch.float32).to(self.device)


def same_weight_shape(fmt: str, stored: tuple[int, ...], planned: tuple[int, ...]) -> bool:
    """Shapes agree; for an NVFP4 layer read from a file the reader may only know the padded dims, so compare the
    storage shapes (what ComfyUI reads) instead."""
    if formats.is_nvfp4(fmt) and len(stored) == len(planned) == 2:
        return formats.nvfp4_storage_shapes(*stored) == formats.nvfp4_storage_shapes(*planned)
    return tuple(stored) == tuple(planned)


def _plain_dtype(plan: Plan, name: str, code: str) -> torch.dtype:
    fmt = plan.dtype_for_tensor(name, code)
    return torch_dtype(code) if fmt == "keep" else formats.PLAIN_DTYPES[fmt]


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Cast a plain tensor, refusing to turn finite values into Inf (fp16 overflow above 65504)."""
    if tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    if dtype.is_floating_point and tensor.is_floating_point() and dtype.itemsize < tensor.dtype.itemsize:
        if bool(torch.isinf(out).any()) and not bool(torch.isinf(tensor).any()):
            raise NVFP4Error(f"tensor {name!r}: values overflow {str(dtype).removeprefix('torch.')} "
                             f"(|x| up to {float(tensor.abs().max()):.4g}); keep it in bf16 or fp32 instead")
    return out


def weight_digest(weight: torch.Tensor, scale: torch.Tensor | None) -> str:
    """sha256 of a layer's stored weight (and scale) bytes: verification compares the file with what was computed."""
    h = hashlib.sha256()
    for t in (weight, scale):
        if t is not None:
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rel_rmse(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref = ref.to(torch.float32)
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(ref - approx.to(ref.device)))
    return num / den if den > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Planning the output file
# --------------------------------------------------------------------------------------------------------------------
def _layout(ckpt: Checkpoint, plan: Plan, device: str, quant_dtype: torch.dtype | None,
            measure: bool) -> tuple[list[_Output], list[_LayerJob], dict[str, dict]]:
    """Every output tensor in write order, the layer jobs, and the comfy_quant config of every quantized layer."""
    layers = ckpt.layers()
    key_owner = {key: lname for lname, lay in layers.items() for key in lay.keys}
    outputs: list[_Output] = []
    jobs: list[_LayerJob] = []
    quant: dict[str, dict] = {}
    done: set[str] = set()
    for name in ckpt.names():
        if name == LEGACY_MARKER:
            continue  # legacy scaled-fp8 marker: its layers are re-quantized with comfy_quant markers
        owner = key_owner.get(name)
        lay = layers.get(owner) if owner is not None else None
        if owner in plan.layers:
            if owner not in done:
                job = _LayerJob(ckpt, lay, plan.layers[owner], plan, device, quant_dtype, measure)
                jobs.append(job)
                outputs += job.outputs()
                if job.dec.format in formats.QUANTIZED_FORMATS:
                    quant[owner] = formats.comfy_quant_config(job.dec.format)
                done.add(owner)
            continue
        if lay is not None and lay.comfy_quant is not None:
            _copy_quantized_layer(ckpt, lay, name, outputs, quant, done)
            continue
        info = ckpt.info(name)
        dtype = _plain_dtype(plan, name, info.dtype)
        outputs.append(_Output(name, dtype, info.shape,
                               lambda name=name, dtype=dtype: _cast(ckpt.tensor(name), dtype, name)))
    return outputs, jobs, quant


def _copy_quantized_layer(ckpt: Checkpoint, lay: Layer, name: str, outputs: list[_Output],
                          quant: dict[str, dict], done: set[str]) -> None:
    """A quantized layer the plan does not cover (not a Linear the planner knows): copied verbatim."""
    if lay.name not in done:
        quant[lay.name] = dict(lay.comfy_quant)
        done.add(lay.name)
        if lay.quant_source != "tensor" and "comfy_quant" not in lay.roles:
            marker = formats.encode_comfy_quant(lay.comfy_quant)
            outputs.append(_Output(f"{lay.name}.comfy_quant", torch.uint8, tuple(marker.shape), lambda m=marker: m))
    info = ckpt.info(name)
    outputs.append(_Output(name, torch_dtype(info.dtype), info.shape, lambda: ckpt.tensor(name)))


def _metadata(ckpt: Checkpoint, plan: Plan, quant: dict[str, dict]) -> dict[str, str]:
    meta = {k: v for k, v in ckpt.metadata.items() if k not in (QUANT_METADATA_KEY, PROVENANCE_KEY)}
    if quant:
        meta[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": quant})
    from .. import __version__

    static = sum(1 for d in plan.layers.values() if d.input_scale is not None and d.quantized)
    meta[PROVENANCE_KEY] = json.dumps({
        "tool": "nvfp4-lab", "version": __version__,
        "source": {"file": Path(ckpt.path).name, "header_sha256": ckpt.header_hash()},
        "plan": {"preset": plan.preset, "other_dtype": plan.other_dtype, "counts": plan.counts(),
                 "static_input_scales": static, "architecture": plan.source.get("architecture")},
    })
    return meta


def _refuse_unconvertible(ckpt: Checkpoint) -> None:
    if ckpt.kind == "gguf":
        raise CheckpointError(f"{ckpt.path}: GGUF files can guide a plan (--gguf) but cannot be converted; "
                              "convert the model's safetensors release")
    from .architecture import detect_architecture

    arch = detect_architecture({n: ckpt.info(n).shape for n in ckpt.names()})
    if arch.naming == "diffusers":
        raise CheckpointError(
            f"{ckpt.path}: this is a diffusers-format {arch.family} checkpoint ({arch.variant}); ComfyUI loads its "
            "native naming. Use the ComfyUI repackaged release of the model (or save it once with ComfyUI's "
            "ModelSave node) and convert that")


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------
def convert(source: str | Path, output: str | Path, plan: Plan, *, device: str = "cpu", force: bool = False,
            verify: bool = True, progress: bool = True, quant_dtype: str = "source", measure: bool = True,
            shard_bytes: int | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> ConvertReport:
    """Write `output` from `source` following `plan`; return what was done and the per-layer weight error.

    `quant_dtype` casts plain weights before quantizing ("source" keeps them: byte-identical to quantizing the
    stored tensor in ComfyUI). `shard_bytes` splits the output into shards of at most that size (a layer is never
    split) named `<stem>-00001-of-0000N.safetensors` plus `<stem>.safetensors.index.json`; `output` then names the
    index. `on_progress(done, total)` is called after every tensor (for ComfyUI's progress bar).
    """
    if quant_dtype not in QUANT_DTYPES:
        raise NVFP4Error(f"quant_dtype {quant_dtype!r} must be one of {', '.join(QUANT_DTYPES)}")
    if shard_bytes is not None and shard_bytes <= 0:
        raise NVFP4Error(f"shard size {shard_bytes!r} must be a positive number of bytes")
    _check_device(device)
    start = time.perf_counter()
    with open_checkpoint(source) as ckpt:
        _refuse_unconvertible(ckpt)
        plan.check_against(ckpt)
        outputs, jobs, quant = _layout(ckpt, plan, device, QUANT_DTYPES[quant_dtype], measure)
        metadata = _metadata(ckpt, plan, quant)
        files = _output_files(Path(output), outputs, metadata, quant, shard_bytes)
        writers = [SafetensorsWriter(path, [(o.name, o.dtype, o.shape) for o in outs], meta, force=force,
                                     inputs=ckpt.files) for path, outs, meta in files]
        index = _index_path(Path(output)) if shard_bytes is not None else None
        if index is not None:
            check_output_path(index, force=force, inputs=ckpt.files)
        for job in _verification_picks(jobs) if verify else ():
            job.check = True
        bar = _progress_bar(len(outputs), progress, Path(output).name)
        # One worker thread reads and quantizes layer i+1 while layer i is written: I/O overlaps compute, and at
        # most two layers are in memory.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4-prefetch")
        for job, nxt in zip(jobs, jobs[1:]):
            job.next, nxt.pool = nxt, pool
        written: list[Path] = []
        done = 0
        try:
            for writer, (path, outs, _meta) in zip(writers, files):
                with writer:
                    for out in outs:
                        writer.write(out.name, out.make())
                        done += 1
                        bar.update(1)
                        if on_progress is not None:
                            on_progress(done, len(outputs))
                written.append(path)
            if index is not None:
                _write_index(index, files, metadata)
                written.append(index)
        except BaseException:
            for path in written:  # a sharded output is all or nothing
                path.unlink(missing_ok=True)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        result = index or Path(output)
        report = ConvertReport(output=result, input_bytes=sum(f.stat().st_size for f in ckpt.files),
                               output_bytes=sum(p.stat().st_size for p, _, _ in files), seconds=0.0,
                               layers=[j.result for j in jobs], notes=list(ckpt.notes))
        if verify:
            try:
                verify_output(ckpt, result, plan, report)
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
    report.seconds = time.perf_counter() - start
    return report


def _index_path(output: Path) -> Path:
    name = output.name
    for suffix in (".safetensors.index.json", ".index.json", ".safetensors"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + ".safetensors.index.json")


def _output_files(output: Path, outputs: list[_Output], metadata: dict[str, str], quant: dict[str, dict],
                  shard_bytes: int | None) -> list[tuple[Path, list[_Output], dict[str, str]]]:
    """(path, tensors, header metadata) of every file to write: one file, or shards that never split a layer.

    Every shard is self-describing: the source metadata, the provenance, and a `_quantization_metadata` naming the
    quantized layers it holds (their `comfy_quant` markers travel with them)."""
    if shard_bytes is None:
        return [(output, outputs, metadata)]
    groups: list[list[_Output]] = []
    for out in outputs:  # a layer's tensors share its name stem and are contiguous
        stem = out.name.rsplit(".", 1)[0]
        if groups and groups[-1][-1].name.rsplit(".", 1)[0] == stem and stem in quant:
            groups[-1].append(out)
        else:
            groups.append([out])
    shards: list[list[_Output]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(math.prod(o.shape) * o.dtype.itemsize for o in group)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    stem = _index_path(output).name[: -len(".safetensors.index.json")]
    files = []
    for i, outs in enumerate(shards, 1):
        meta = {k: v for k, v in metadata.items() if k != QUANT_METADATA_KEY}
        layers = {o.name[: -len(".comfy_quant")] for o in outs if o.name.endswith(".comfy_quant")}
        if layers:
            meta[QUANT_METADATA_KEY] = json.dumps({"format_version": "1.0",
                                                   "layers": {n: quant[n] for n in quant if n in layers}})
        files.append((output.with_name(f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"), outs, meta))
    return files


def _write_index(index: Path, files: list[tuple[Path, list[_Output], dict[str, str]]],
                 metadata: dict[str, str]) -> None:
    weight_map = {o.name: path.name for path, outs, _ in files for o in outs}
    total = sum(math.prod(o.shape) * o.dtype.itemsize for _, outs, _ in files for o in outs)
    meta = {k: v for k, v in metadata.items() if k != QUANT_METADATA_KEY}  # each shard names its own layers
    doc = {"metadata": {**meta, "total_size": total}, "weight_map": weight_map}
    with atomic_output(index, force=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _check_device(device: str) -> None:
    """One-line errors for a device this converter cannot use (instead of a torch traceback mid-conversion)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise NVFP4Error(f"--device {device!r} is not a device this tool uses; use cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NVFP4Error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NVFP4Error(f"--device {device!r}: torch sees only {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def _verification_picks(jobs: list[_LayerJob], samples: int = 3) -> list[_LayerJob]:
    """First, middle and last quantized layer: the ones whose bytes verify_output re-reads."""
    quantized = [j for j in jobs if j.dec.format in formats.QUANTIZED_FORMATS]
    if len(quantized) <= samples:
        return quantized
    return [quantized[round(i * (len(quantized) - 1) / (samples - 1))] for i in range(samples)]


def _progress_bar(total: int, enabled: bool, label: str):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only on a terminal (no log spam in CI or ComfyUI's console capture)
    return tqdm(total=total, unit="tensor", desc=f"writing {label}", disable=None if enabled else True,
                dynamic_ncols=True)


def verify_output(source: Checkpoint, output: Path, plan: Plan, report: ConvertReport) -> None:
    """Re-open the written file and check it is what the plan asked for; raise CheckpointError otherwise.

    Checks every planned layer's format and storage shapes, that the source's `config` metadata survived, and for
    the layers picked by `_verification_picks` that the bytes on disk are the bytes that were computed (sha256) and
    that they dequantize to the weight error measured during conversion."""
    with open_checkpoint(output) as out:
        layers = out.layers()
        for name, dec in plan.layers.items():
            lay = layers.get(name)
            if lay is None:
                raise CheckpointError(f"{output}: verification failed: layer {name!r} is missing")
            if lay.format != dec.format:
                raise CheckpointError(f"{output}: verification failed: layer {name!r} is {lay.format}, "
                                      f"the plan says {dec.format}")
            if not same_weight_shape(lay.format, lay.shape, dec.shape):
                raise CheckpointError(f"{output}: verification failed: layer {name!r} has shape {lay.shape}, "
                                      f"expected {tuple(dec.shape)}")
        if "config" in source.metadata and out.metadata.get("config") != source.metadata["config"]:
            raise CheckpointError(f"{output}: verification failed: the source's `config` metadata was not kept")
        for res in (r for r in report.layers if r.digest is not None):
            lay = layers[res.layer]
            scale = out.tensor(lay.roles["weight_scale"]) if "weight_scale" in lay.roles else None
            if weight_digest(out.tensor(lay.roles["weight"]), scale) != res.digest:
                raise CheckpointError(f"{output}: verification failed: the bytes of layer {res.layer!r} in the file "
                                      "differ from the bytes that were computed")
            if res.rel_rmse is None:
                continue
            ref = source.dequantized_weight(res.layer, torch.float32)
            err = _rel_rmse(ref, out.dequantized_weight(res.layer, torch.float32))
            # loose: the in-memory figure may come from a GPU reduction; this catches layout mistakes, not rounding
            if not math.isclose(err, res.rel_rmse, rel_tol=1e-2, abs_tol=1e-4):
                raise CheckpointError(f"{output}: verification failed: layer {res.layer!r} dequantizes with error "
                                      f"{err:.6f} from the file but {res.rel_rmse:.6f} in memory")
    report.verified = True
