"""Open any model file the tools accept and see it as ComfyUI will: bare layer names, per-layer formats, logical shapes.

`open_checkpoint(path)` accepts a single `.safetensors`, a sharded model (its `*.safetensors.index.json`, or the
folder holding it), a folder with exactly one `.safetensors`, or a `.gguf`. Everything else in the package (planner,
converter, inspection, nodes) goes through the `Checkpoint` it returns, so file-format quirks live here only:

- the `model.diffusion_model.` prefix of full checkpoints / `ModelSave` output is stripped (other components such
  as the VAE or text encoders of a full checkpoint are left out, with a note);
- a layer's format is decided the way ComfyUI 0.29 decides it: a `<layer>.comfy_quant` tensor, else the
  `_quantization_metadata` header, else the legacy `scaled_fp8` marker, else the weight dtype;
- listing layers reads headers only, plus a few bytes per quantized layer (`comfy_quant` markers, `input_scale`
  scalars); tensor data is read only by `tensor()` / `dequantized_weight()`.

NVFP4 logical shapes: the file stores `[roundup(out,16), roundup(in,16)/2]` and ComfyUI takes the real shape from the
module, never from the file. We report `out` = bias length when a bias exists (exact), else the padded rows; `in` =
2 x packed columns. Both are exact whenever the real dims are multiples of 16, which holds for every production
diffusion model. When the file proves a dimension is not a multiple of 16 (a bias whose length is not), the in-dim
may be padded too and the layer gets `shape_padded=True`. A `comfy_quant` entry carrying `orig_shape` (not written by
ComfyUI, but harmless to it) gives the exact shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from . import formats
from .errors import CheckpointError
from .safetensors_io import TensorInfo, header_bytes, read_header, torch_dtype

__all__ = ["DIFFUSION_PREFIX", "Checkpoint", "Layer", "open_checkpoint"]

DIFFUSION_PREFIX = "model.diffusion_model."
LEGACY_MARKER = "scaled_fp8"
QUANT_METADATA_KEY = "_quantization_metadata"

# Suffixes that belong to a layer `L` (`L.weight`, `L.bias`, ...); a key splits at its last dot.
ROLES = ("weight_scale_2", "weight_scale", "input_scale", "comfy_quant", "scale_weight", "scale_input", "weight",
         "bias")

_DTYPE_FORMAT = {
    "BF16": formats.BF16,
    "F16": formats.FP16,
    "F32": formats.FP32,
    "F8_E4M3": formats.FP8,
    "F8_E5M2": formats.FP8_E5M2,
}
# GGUF types whose data tensor() can return as a torch tensor (the rest can only guide format selection).
_GGUF_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
               "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64}
_SHARD_RE = re.compile(r"-\d+-of-\d+\.safetensors$")


@dataclass
class Layer:
    """One layer as ComfyUI sees it: the tensors sharing a name stem, their format and logical size."""

    name: str  # bare layer name (key without `.weight`, without the diffusion-model prefix)
    format: str  # formats.* name, "gguf:<TYPE>", "comfy:<format>" for ComfyUI formats we do not write, else dtype
    shape: tuple[int, ...]  # logical weight shape
    params: int  # logical parameter count of weight (+ bias)
    stored_bytes: int  # bytes of every tensor of this layer on disk
    input_scale: float | None
    full_precision_matrix_mult: bool
    keys: list[str]  # bare tensor names belonging to the layer
    comfy_quant: dict | None
    shape_padded: bool = False  # NVFP4 only: a reported dim may be the padded storage size (see module docstring)
    roles: dict[str, str] = field(default_factory=dict)  # role ("weight", "bias", "weight_scale", ...) -> bare key
    quant_source: str | None = None  # "tensor" | "header" | "legacy" | None: where the format came from

    @property
    def linear(self) -> bool:
        """True for a 2-D weight: the shape NVFP4 / FP8 can quantize (Linear layers)."""
        return "weight" in self.roles and len(self.shape) == 2


def _split_role(name: str) -> tuple[str, str]:
    """(layer, role) of a bare key; keys with no known suffix are their own layer with role "param"."""
    stem, dot, last = name.rpartition(".")
    if dot and stem and last in ROLES:
        return stem, last
    return name, "param"


def _json_str(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class Checkpoint:
    """A read-only view of a model file (single, sharded, folder or GGUF) with bare names. Use `open_checkpoint`."""

    def __init__(
        self,
        *,
        path: Path,
        kind: str,
        files: list[Path],
        infos: dict[str, TensorInfo],
        raw_names: dict[str, str],
        metadata: dict[str, str],
        prefix: str,
        headers: list[bytes],
        notes: list[str],
        gguf: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.files = files
        self.metadata = metadata
        self.prefix = prefix
        self.notes = notes  # human-readable remarks (prefix stripped, components ignored, ...)
        self._infos = infos
        self._raw = raw_names
        self._headers = headers
        self._gguf = gguf  # bare name -> ReaderTensor
        self._handles: dict[Path, Any] = {}
        self._handles_lock = threading.Lock()  # the converter's prefetch thread opens shards too
        # data section start per file (8-byte length + JSON header), for direct reads
        self._data_start = {f: len(h) for f, h in zip(files, headers)} if gguf is None else {}
        self._layers: dict[str, Layer] | None = None

    # -- context manager -------------------------------------------------------------------------------------------
    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release open file handles."""
        for handle in self._handles.values():
            with contextlib.suppress(Exception):
                handle.close()
        self._handles.clear()
        if self._gguf:
            self._gguf = {}  # drop the GGUF memory map (Windows keeps mapped files locked)

    def __repr__(self) -> str:
        return f"<Checkpoint {self.kind} {self.path} ({len(self._infos)} tensors)>"

    # -- tensors ---------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Bare tensor names in file order (shards in order, each in header order)."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        """Header information of one tensor (GGUF: dtype "gguf:<TYPE>", logical shape)."""
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def _file(self, file: Path):
        with self._handles_lock:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = open(file, "rb")  # noqa: SIM115 - kept open until close()
                except OSError as exc:
                    raise CheckpointError(f"{file}: cannot open for reading ({exc.strerror})") from None
                self._handles[file] = handle
            return handle

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load one tensor (dtype as stored). GGUF: plain float/int types only; quantized types raise.

        Safetensors data is read with plain file reads into a fresh tensor, not through a memory map: a map would
        keep every page the converter touched resident (counted in RSS) until the file is closed, so streaming a
        model would still end up "holding" all of it. This way memory is one tensor at a time.
        """
        info = self.info(name)
        if self._gguf is not None:
            return self._gguf_tensor(name, info).to(device)
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            got = _read_at(self._file(info.file), self._data_start[info.file] + info.data_offsets[0], out)
        except OSError as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {self._raw[name]!r} ({exc})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {self._raw[name]!r} is truncated ({got} of {info.nbytes} "
                                  "bytes); the file is incomplete, download or copy it again")
        tensor = out.view(torch_dtype(info.dtype)).reshape(info.shape)
        return tensor if str(device) == "cpu" else tensor.to(device)

    def _gguf_tensor(self, name: str, info: TensorInfo) -> torch.Tensor:
        import numpy as np

        rt = self._gguf.get(name)
        if rt is None:
            raise CheckpointError(f"{self.path}: checkpoint is closed; open it again to read tensors")
        type_name = info.dtype.split(":", 1)[1]
        if type_name not in _GGUF_PLAIN:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} is GGUF {type_name}; quantized GGUF tensors can only guide the "
                "choice of formats, they cannot be converted (use the bf16/fp16 source model)"
            )
        data = np.array(rt.data)  # copy out of the memory map
        if type_name == "BF16":
            t = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(data)
        return t.reshape(info.shape)

    def _scalar(self, layer: str, name: str) -> float:
        t = self.tensor(name)
        if t.numel() != 1:
            raise CheckpointError(
                f"{self.path}: layer {layer!r}: {name} has shape {tuple(t.shape)}; ComfyUI expects a scalar"
            )
        return float(t.reshape(()).float().item())

    def header_hash(self) -> str:
        """sha256 of the raw header bytes of all files, in order: identifies a model without hashing gigabytes."""
        h = hashlib.sha256()
        for raw in self._headers:
            h.update(raw)
        return h.hexdigest()

    # -- layers ----------------------------------------------------------------------------------------------------
    def _header_quant(self) -> dict[str, dict] | None:
        raw = self.metadata.get(QUANT_METADATA_KEY)
        if raw is None:
            return None
        where = f"{self.path}: header {QUANT_METADATA_KEY}"
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise CheckpointError(f"{where} is not valid JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("layers"), dict):
            raise CheckpointError(f"{where} has no \"layers\" object (ComfyUI would fail to load it)")
        out: dict[str, dict] = {}
        for name, conf in obj["layers"].items():
            if not isinstance(conf, dict):
                raise CheckpointError(f"{where}: entry for {name!r} is not an object")
            # Names may carry the diffusion-model prefix whether or not the tensors do (ComfyUI applies the header
            # both before and after stripping the prefix).
            bare = name.removeprefix(DIFFUSION_PREFIX)
            out[bare] = conf
        return out

    def layers(self) -> dict[str, Layer]:
        """Group tensors into layers (ordered by first key) and decide each layer's format, shape and size.

        Reads headers plus tiny scalars only. Raises CheckpointError when the file contradicts itself (a
        `comfy_quant` tensor and the `_quantization_metadata` header disagree, a marker is not JSON, ...).
        """
        if self._layers is not None:
            return self._layers
        groups: dict[str, dict[str, str]] = {}
        for name in self._infos:
            if name == LEGACY_MARKER:
                continue
            stem, role = _split_role(name)  # (stem, role) pairs are unique: each key has exactly one
            groups.setdefault(stem, {})[role] = name

        header_quant = self._header_quant()
        legacy_fpmm: bool | None = None
        if header_quant is None and LEGACY_MARKER in self._infos:
            legacy_fpmm = self.info(LEGACY_MARKER).numel == 2
        if header_quant:
            missing = [n for n in header_quant if n not in groups]
            if missing:
                self.notes.append(
                    f"{QUANT_METADATA_KEY} names {len(missing)} layer(s) the file lacks (first: {missing[0]!r}); "
                    "ignored"
                )

        layers: dict[str, Layer] = {}
        for stem, roles in groups.items():
            layers[stem] = self._make_layer(stem, roles, header_quant, legacy_fpmm)
        unmarked = [
            lay.name for lay in layers.values()
            if lay.comfy_quant is None and {"weight", "weight_scale", "weight_scale_2"} <= set(lay.roles)
            and self._infos[lay.roles["weight"]].dtype == "U8"
        ]
        if unmarked:
            self.notes.append(
                f"{len(unmarked)} layer(s) look like NVFP4 (uint8 weight + weight_scale + weight_scale_2) but have "
                f"no comfy_quant marker or header entry, so ComfyUI will not load them as NVFP4 (first: "
                f"{unmarked[0]!r})"
            )
        self._layers = layers
        return layers

    def _make_layer(self, stem: str, roles: dict[str, str], header_quant: dict[str, dict] | None,
                    legacy_fpmm: bool | None) -> Layer:
        where = f"{self.path}: layer {stem!r}"
        conf: dict | None = None
        source: str | None = None
        if "comfy_quant" in roles and self.kind != "gguf":
            try:
                conf = formats.decode_comfy_quant(self.tensor(roles["comfy_quant"]))
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            source = "tensor"
        if header_quant is not None and stem in header_quant:
            hconf = header_quant[stem]
            if conf is not None and _norm_conf(conf) != _norm_conf(hconf):
                raise CheckpointError(
                    f"{where}: comfy_quant tensor {json.dumps(conf)} disagrees with the {QUANT_METADATA_KEY} header "
                    f"entry {json.dumps(hconf)}; ComfyUI would use the header. Fix or remove one of them"
                )
            if conf is None:
                conf, source = dict(hconf), "header"
        if conf is None and legacy_fpmm is not None and "scale_weight" in roles:
            conf = {"format": "float8_e4m3fn"}
            if legacy_fpmm:
                conf["full_precision_matrix_mult"] = True
            source = "legacy"

        main_key = roles.get("weight") or roles.get("param") or next(iter(roles.values()))
        main = self._infos[main_key]
        bias = self._infos[roles["bias"]] if "bias" in roles else None
        shape: tuple[int, ...] = main.shape
        shape_padded = False

        if conf is not None:
            if "format" not in conf:
                raise CheckpointError(f"{where}: comfy_quant {json.dumps(conf)} has no \"format\" (ComfyUI refuses it)")
            try:
                fmt = formats.format_from_comfy_quant(conf)
            except ValueError:
                fmt = f"comfy:{conf['format']}"
            if source == "legacy" and main.dtype == "F8_E5M2":
                fmt = formats.FP8_E5M2
        elif main.dtype.startswith("gguf:"):
            fmt = main.dtype
        else:
            fmt = _DTYPE_FORMAT.get(main.dtype, main.dtype.lower())

        if formats.is_nvfp4(fmt) and "weight" in roles and len(main.shape) == 2:
            shape, shape_padded = _nvfp4_logical_shape(main.shape, bias.shape if bias is not None else None, conf)

        params = math.prod(shape) + (bias.numel if bias is not None else 0)
        input_scale: float | None = None
        if "input_scale" in roles:
            input_scale = self._scalar(stem, roles["input_scale"])
        elif source == "legacy" and "scale_input" in roles:
            value = self._scalar(stem, roles["scale_input"])
            input_scale = None if value == 1.0 else value  # ComfyUI drops a 1.0 scale_input
        keys = list(roles.values())
        return Layer(
            name=stem,
            format=fmt,
            shape=tuple(shape),
            params=params,
            stored_bytes=sum(self._infos[k].nbytes for k in keys),
            input_scale=input_scale,
            full_precision_matrix_mult=bool(conf.get("full_precision_matrix_mult", False)) if conf else False,
            keys=keys,
            comfy_quant=conf,
            shape_padded=shape_padded,
            roles=dict(roles),
            quant_source=source,
        )

    def layer(self, name: str) -> Layer:
        """One layer by bare name; CheckpointError naming the file if it does not exist."""
        layers = self.layers()
        try:
            return layers[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no layer named {name!r}") from None

    # -- dequantization --------------------------------------------------------------------------------------------
    def dequantized_weight(self, layer: str | Layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The layer's weight as a float tensor of its logical shape, whatever its stored format.

        Handles NVFP4 (W4A4 and W4A16), FP8 with `comfy_quant`, legacy scaled FP8, plain FP8 and plain float
        tensors; GGUF F32/F16/BF16. Raises CheckpointError for quantized GGUF types and formats we do not read.
        """
        lay = layer if isinstance(layer, Layer) else self.layer(layer)
        where = f"{self.path}: layer {lay.name!r}"
        wkey = lay.roles.get("weight") or lay.roles.get("param")
        if wkey is None:
            raise CheckpointError(f"{where} has no weight")
        winfo = self.info(wkey)
        fmt = lay.format
        if formats.is_nvfp4(fmt):
            for role in ("weight_scale", "weight_scale_2"):
                if role not in lay.roles:
                    raise CheckpointError(f"{where}: NVFP4 layer lacks {lay.name}.{role} (ComfyUI refuses it)")
            if winfo.dtype != "U8":
                raise CheckpointError(f"{where}: NVFP4 weight is {winfo.dtype}, expected U8 packed codes")
            out_f, in_f = lay.shape
            (wr, wc), (sr, sc) = formats.nvfp4_storage_shapes(out_f, in_f)
            sinfo = self.info(lay.roles["weight_scale"])
            if winfo.shape != (wr, wc) or sinfo.shape != (sr, sc):
                raise CheckpointError(
                    f"{where}: NVFP4 storage shapes {winfo.shape}/{sinfo.shape} do not match logical {lay.shape} "
                    f"(expected {(wr, wc)}/{(sr, sc)})"
                )
            from . import nvfp4

            block = self.tensor(lay.roles["weight_scale"])
            if block.dtype != torch.float8_e4m3fn:
                if block.dtype != torch.uint8:
                    raise CheckpointError(f"{where}: weight_scale is {block.dtype}, expected float8_e4m3fn")
                block = block.view(torch.float8_e4m3fn)
            ts = self.tensor(lay.roles["weight_scale_2"]).to(torch.float32).reshape(())
            q = nvfp4.NVFP4Tensor(qdata=self.tensor(wkey), block_scale=block, tensor_scale=ts, shape=(out_f, in_f))
            return nvfp4.dequantize(q, dtype)
        if fmt in (formats.FP8, formats.FP8_E5M2):
            weight = self.tensor(wkey)
            if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
                raise CheckpointError(
                    f"{where}: FP8 weight is stored as {winfo.dtype}; ComfyUI converts values, so it must be float8"
                )
            scale_key = lay.roles.get("weight_scale") or lay.roles.get("scale_weight")
            if scale_key is None:
                return weight.to(dtype)  # plain fp8 weight, scale 1
            from . import fp8

            scale = self.tensor(scale_key).to(torch.float32)
            if scale.numel() == 1:
                scale = scale.reshape(())
            return fp8.dequantize_fp8(weight, scale, dtype)
        if fmt.startswith("gguf:") or fmt in formats.PLAIN_FORMATS or (
            lay.comfy_quant is None and winfo.dtype in ("F64", "F16", "BF16", "F32")
        ):
            return self.tensor(wkey).to(dtype)
        raise CheckpointError(f"{where}: cannot dequantize format {fmt!r}")


_READ_LOCK = threading.Lock()


def _read_at(fh, offset: int, out: torch.Tensor) -> int:
    """Fill the uint8 tensor `out` from `fh` at `offset`; positional reads, so threads can share one handle."""
    view = memoryview(out.numpy()).cast("B")
    done = 0
    if hasattr(os, "preadv"):
        while done < len(view):
            n = os.preadv(fh.fileno(), [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done
    with _READ_LOCK:  # no positional reads on this platform: seek + read under a lock
        fh.seek(offset)
        while done < len(view):
            n = fh.readinto(view[done:])
            if not n:
                break
            done += n
    return done


def _norm_conf(conf: dict) -> tuple:
    """The parts of a comfy_quant dict that change how ComfyUI loads the layer (other keys are ignored by it)."""
    return (conf.get("format"), bool(conf.get("full_precision_matrix_mult", False)),
            json.dumps(conf.get("params"), sort_keys=True), conf.get("num_experts"))


def _nvfp4_logical_shape(stored: tuple[int, ...], bias: tuple[int, ...] | None,
                         conf: dict | None) -> tuple[tuple[int, int], bool]:
    """(logical (out, in), shape_padded) from the stored packed shape, bias shape and optional orig_shape."""
    rows, cols = stored[0], stored[1] * 2
    orig = (conf or {}).get("orig_shape")
    if (
        isinstance(orig, (list, tuple))
        and len(orig) == 2
        and all(isinstance(d, int) and d > 0 for d in orig)
        and formats.nvfp4_storage_shapes(orig[0], orig[1])[0] == tuple(stored)
    ):
        return (orig[0], orig[1]), False
    out = rows
    padded = False
    if bias is not None and len(bias) == 1 and 0 < bias[0] <= rows and formats._roundup(bias[0], 16) == rows:
        out = bias[0]
        padded = out % 16 != 0  # the model has a dim that is not a multiple of 16: in may be padded as well
    return (out, cols), padded


# -- opening ---------------------------------------------------------------------------------------------------------
def _strip_prefix(
    path: Path, raw: dict[str, TensorInfo], notes: list[str]
) -> tuple[dict[str, TensorInfo], dict[str, str], str]:
    """(bare infos, bare -> raw key, prefix): keep only diffusion-model keys when the prefix is present."""
    if not any(k.startswith(DIFFUSION_PREFIX) for k in raw):
        return dict(raw), {k: k for k in raw}, ""
    infos: dict[str, TensorInfo] = {}
    names: dict[str, str] = {}
    dropped: dict[str, int] = {}
    for key, info in raw.items():
        if key.startswith(DIFFUSION_PREFIX):
            bare = key[len(DIFFUSION_PREFIX):]
        elif key == LEGACY_MARKER:
            bare = key
        else:
            top = key.split(".", 1)[0] + "." if "." in key else key
            dropped[top] = dropped.get(top, 0) + 1
            continue
        if bare in infos:
            raise CheckpointError(f"{path}: tensor {bare!r} appears both with and without the prefix")
        infos[bare] = info
        names[bare] = key
    notes.append(f"stripped the {DIFFUSION_PREFIX!r} prefix (full checkpoint / ModelSave output)")
    if dropped:
        parts = ", ".join(f"{k} ({n})" for k, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
        notes.append(
            f"kept only the diffusion model's {len(infos)} tensors; ignored {sum(dropped.values())} others: {parts}"
        )
    return infos, names, DIFFUSION_PREFIX


def _open_single(path: Path, notes: list[str]) -> Checkpoint:
    tensors, metadata = read_header(path)
    raw_header = header_bytes(path)
    if _SHARD_RE.search(path.name) and any(path.parent.glob("*.safetensors.index.json")):
        notes.append(f"{path.name} looks like one shard of a sharded model; open its index or folder for all of it")
    infos, names, prefix = _strip_prefix(path, tensors, notes)
    return Checkpoint(path=path, kind="safetensors", files=[path], infos=infos, raw_names=names, metadata=metadata,
                      prefix=prefix, headers=[raw_header], notes=notes)


def _open_index(index: Path, notes: list[str]) -> Checkpoint:
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{index}: no such file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index}: not valid JSON ({exc}); expected a *.safetensors.index.json") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: not a safetensors index (needs a non-empty \"weight_map\" of tensor name -> shard file)"
        )
    shard_names = sorted(set(weight_map.values()))
    files: list[Path] = []
    for shard in shard_names:
        p = index.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index}: shard path {shard!r} must be a file name next to the index")
        if not p.is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing (expected at {p})")
        files.append(p)

    raw: dict[str, TensorInfo] = {}
    headers: list[bytes] = []
    shard_meta: dict[str, str] | None = None
    for shard, p in zip(shard_names, files, strict=True):
        tensors, meta = read_header(p)  # names the shard in its errors
        headers.append(header_bytes(p))
        if shard_meta is None:
            shard_meta = meta
        for name, info in tensors.items():
            if name in raw:
                raise CheckpointError(f"{index}: tensor {name!r} is in both {raw[name].file.name} and {shard}")
            listed = weight_map.get(name)
            if listed is None:
                notes.append(f"{shard} holds tensor {name!r} that the index does not list; included")
            elif listed != shard:
                raise CheckpointError(f"{index}: lists {name!r} in {listed} but it is in {shard}")
            raw[name] = info
    absent = [n for n, s in weight_map.items() if n not in raw]
    if absent:
        raise CheckpointError(
            f"{index}: {len(absent)} tensor(s) listed in the index are missing from their shard "
            f"(first: {absent[0]!r} in {weight_map[absent[0]]}); the shard is incomplete or from another model"
        )
    metadata = {k: _json_str(v) for k, v in (obj.get("metadata") or {}).items()} if isinstance(
        obj.get("metadata"), dict) else {}
    metadata.update(shard_meta or {})
    infos, names, prefix = _strip_prefix(index, raw, notes)
    return Checkpoint(path=index, kind="sharded", files=files, infos=infos, raw_names=names, metadata=metadata,
                      prefix=prefix, headers=headers, notes=notes)


def _open_gguf(path: Path, notes: list[str]) -> Checkpoint:
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise CheckpointError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # the gguf package raises ValueError, IndexError, struct errors ...
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None

    metadata: dict[str, str] = {}
    orig_shapes: dict[str, tuple[int, ...]] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = fld.contents()
        except Exception:
            continue
        if key.startswith("comfy.gguf.orig_shape."):
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                orig_shapes[key[len("comfy.gguf.orig_shape."):]] = tuple(value)
            continue
        if isinstance(value, list) and len(value) > 64:
            continue  # tokenizer vocabularies and the like
        metadata[key] = value if isinstance(value, str) else json.dumps(value, default=str)

    raw: dict[str, TensorInfo] = {}
    tensors: dict[str, Any] = {}
    for rt in reader.tensors:
        type_name = rt.tensor_type.name
        shape = tuple(int(d) for d in reversed(rt.shape.tolist()))  # GGUF stores dims innermost first
        if rt.name in orig_shapes and math.prod(orig_shapes[rt.name]) == math.prod(shape):
            shape = orig_shapes[rt.name]
        raw[rt.name] = TensorInfo(rt.name, f"gguf:{type_name}", shape, path,
                                  (int(rt.data_offset), int(rt.data_offset) + int(rt.n_bytes)))
        tensors[rt.name] = rt
    with open(path, "rb") as fh:
        header = fh.read(int(reader.data_offset))
    infos, names, prefix = _strip_prefix(path, raw, notes)
    bare_tensors = {bare: tensors[key] for bare, key in names.items()}
    return Checkpoint(path=path, kind="gguf", files=[path], infos=infos, raw_names=names, metadata=metadata,
                      prefix=prefix, headers=[header], notes=notes, gguf=bare_tensors)


def _open_folder(folder: Path, notes: list[str]) -> Checkpoint:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _open_index(indexes[0], notes)
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder}: holds several indexes ({', '.join(p.name for p in indexes)}); pass the one you mean"
        )
    singles = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(singles) == 1:
        return _open_single(singles[0], notes)
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if not singles and len(ggufs) == 1:
        return _open_gguf(ggufs[0], notes)
    if singles:
        listing = ", ".join(p.name for p in singles[:8]) + (" ..." if len(singles) > 8 else "")
        raise CheckpointError(
            f"{folder}: holds {len(singles)} .safetensors files and no *.safetensors.index.json ({listing}); "
            "pass one file"
        )
    found = sorted(p.name for p in folder.iterdir())
    listing = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found else "nothing"
    raise CheckpointError(
        f"{folder}: no model here (no *.safetensors.index.json, .safetensors or .gguf); found: {listing}"
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model: .safetensors, sharded index (or its folder), folder with one .safetensors, or .gguf.

    Raises CheckpointError with a one-line message naming the file for anything missing, corrupt or ambiguous.
    """
    p = Path(path).expanduser()
    notes: list[str] = []
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        return _open_folder(p, notes)
    if p.suffix.lower() == ".json":
        return _open_index(p, notes)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except PermissionError:
        raise CheckpointError(f"{p}: permission denied") from None
    if p.suffix.lower() == ".gguf" or magic == b"GGUF":
        return _open_gguf(p, notes)
    return _open_single(p, notes)
