"""Safetensors without loading tensors: a validating header parser and a streaming, atomic writer.

Why our own code instead of `safetensors.safe_open` / `save_file`:
- Inspection, planning and hashing need every tensor's name, dtype, shape and byte range but none of its data.
  `read_header` reads exactly the 8-byte length and the JSON header, checks it the way the safetensors library does
  (so a file we accept is one ComfyUI can load) and reports a truncated or corrupt file as a one-line
  `CheckpointError` naming the file and the problem, instead of a Rust panic message.
- `save_file` needs the whole state dict in memory. `SafetensorsWriter` takes the list of tensor specs up front,
  writes the header, then each tensor as it is produced, so converting a 14B model needs one tensor of memory.

File layout written (see the safetensors spec): `u64 little-endian N`, `N` bytes of JSON padded with spaces to a
multiple of 8, then the data section. Tensors are placed in the data section ordered by decreasing item size (as
`safetensors` itself does), so every tensor starts at an offset aligned to its element size; the JSON lists them in
spec order, which is the order `read_header` and `Checkpoint.names()` report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from .atomic import atomic_output, check_output_path
from .errors import CheckpointError

__all__ = [
    "MAX_HEADER_SIZE",
    "SafetensorsWriter",
    "TensorInfo",
    "dtype_bits",
    "dtype_code",
    "header_bytes",
    "read_header",
    "torch_dtype",
]

# The safetensors library refuses headers above 100 MB (`MAX_HEADER_SIZE` in safetensors/src/tensor.rs).
MAX_HEADER_SIZE = 100_000_000

# safetensors dtype code -> bits per element. Sub-byte codes (F4, F6_*) are valid safetensors but have no torch dtype.
_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _TORCH[_code] = getattr(torch, _attr)
_CODE: dict[torch.dtype, str] = {dt: code for code, dt in _TORCH.items()}


def torch_dtype(code: str) -> torch.dtype:
    """torch dtype of a safetensors dtype code ("BF16" -> torch.bfloat16); CheckpointError for codes torch lacks."""
    try:
        return _TORCH[code]
    except KeyError:
        if code in _BITS:
            raise CheckpointError(f"safetensors dtype {code} has no torch equivalent in this torch build") from None
        raise CheckpointError(f"unknown safetensors dtype {code!r}") from None


def dtype_code(dtype: torch.dtype) -> str:
    """safetensors dtype code of a torch dtype (torch.float8_e4m3fn -> "F8_E4M3"); ValueError if it has none."""
    try:
        return _CODE[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} cannot be stored in safetensors") from None


def dtype_bits(code: str) -> int:
    """Bits per element of a safetensors dtype code; CheckpointError for an unknown code."""
    try:
        return _BITS[code]
    except KeyError:
        raise CheckpointError(f"unknown safetensors dtype {code!r}") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a header without touching the data.

    `dtype` is the safetensors code ("BF16", "F8_E4M3", "U8", ...) or "gguf:<TYPE>" for GGUF tensors.
    `data_offsets` are relative to the start of the data section for safetensors (as in the header) and absolute
    file offsets for GGUF. `shape` is the shape as stored (logical shape for GGUF, whose dims are stored reversed).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes on disk."""
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        """Stored element count (for NVFP4 weights: packed bytes, not logical parameters)."""
        return math.prod(self.shape)


def _raw_header(path: Path) -> tuple[bytes, int]:
    """(8-byte prefix + JSON header bytes, file size), with the length checks the safetensors library does."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise CheckpointError(f"{path}: is a folder, not a safetensors file")
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short for a safetensors header; it is truncated or not a "
                    "safetensors file"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_SIZE:
                raise CheckpointError(
                    f"{path}: header length {n} is absurd (limit {MAX_HEADER_SIZE}); not a safetensors file "
                    "(a .ckpt/.pt/.gguf renamed?) or corrupt"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header says {n} bytes but the file has only {size - 8} after the length field; "
                    "the file is truncated (incomplete download?)"
                )
            body = fh.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied") from None
    return prefix + body, size


def header_bytes(path: str | Path) -> bytes:
    """The raw header region (8-byte length + JSON) of a safetensors file, e.g. to hash it."""
    return _raw_header(Path(path))[0]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo} in header order, __metadata__). No data is read.

    Checks what the safetensors library checks before it loads anything: header length within the file and below
    100 MB, UTF-8 JSON object, known dtypes, byte ranges that match dtype x shape, tensors that exactly tile the data
    section with no gap or overlap, and a data section that ends exactly at the end of the file. Every failure is a
    CheckpointError naming the file and the problem.
    """
    path = Path(path)
    raw, size = _raw_header(path)
    n = len(raw) - 8
    body = raw[8:]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: header is not UTF-8 text; not a safetensors file or corrupt") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{path}: header does not start with '{{'; not a safetensors file or corrupt")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:  # JSONDecodeError is a ValueError; so is a duplicate key
        raise CheckpointError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")

    metadata_raw = header.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if metadata_raw is not None:
        if not isinstance(metadata_raw, dict) or not all(isinstance(v, str) for v in metadata_raw.values()):
            raise CheckpointError(f"{path}: __metadata__ must map strings to strings; the header is corrupt")
        metadata = dict(metadata_raw)

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: header entry for tensor {name!r} is not an object")
        code = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(code, str):
            raise CheckpointError(f"{path}: tensor {name!r} has no dtype in the header")
        if code not in _BITS:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        bits = math.prod(shape) * _BITS[code]
        if bits % 8:
            raise CheckpointError(f"{path}: tensor {name!r} ({code} {shape}) does not fill whole bytes")
        if offsets[1] - offsets[0] != bits // 8:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({code} {shape}) needs {bits // 8} bytes but its data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]}; the header is corrupt"
            )
        tensors[name] = TensorInfo(name, code, tuple(shape), path, (offsets[0], offsets[1]))

    data_size = size - 8 - n
    end = 0
    for info in sorted(tensors.values(), key=lambda t: t.data_offsets):
        start, stop = info.data_offsets
        if start < end:
            raise CheckpointError(f"{path}: tensor {info.name!r} overlaps the previous tensor; the header is corrupt")
        if start > end:
            raise CheckpointError(
                f"{path}: gap of {start - end} bytes before tensor {info.name!r}; the header is corrupt"
            )
        end = stop
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensors need {end} bytes of data but the file holds {data_size}; the file is truncated "
            "(incomplete download?)"
        )
    if end < data_size:
        raise CheckpointError(
            f"{path}: {data_size - end} bytes after the last tensor are not described by the header; the file is "
            "corrupt or was appended to"
        )
    return tensors, metadata


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in little-endian order as a zero-copy view (one copy if non-contiguous or on a device)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: header from `specs` first, data as `write()` is called; atomic.

    Usage::

        with SafetensorsWriter(out, specs, {"config": cfg}, inputs=[src]) as w:
            for name, dtype, shape in specs:
                w.write(name, make(name))

    The file appears at `path` only when the block exits without an exception and every spec was written; otherwise
    the temp file is deleted. `path` must not be one of `inputs` and must not exist unless `force`. Memory use is one
    tensor (the caller's), nothing is buffered here.
    """

    def __init__(
        self,
        path: str | Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str],
        *,
        force: bool = False,
        inputs: Sequence[Path] = (),
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - no big-endian targets
            raise CheckpointError("writing safetensors needs a little-endian machine")
        self.path = Path(path)
        self._force = force
        self._inputs = tuple(inputs)
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str; {key!r} -> {type(value).__name__}")

        self._specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        seen: set[str] = set()
        for name, dtype, shape in specs:
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"invalid tensor name {name!r}")
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the specs")
            seen.add(name)
            dtype_code(dtype)  # raises for unsupported dtypes
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension {shape}")
            self._specs.append((name, dtype, shape))

        # Data layout: decreasing item size (stable), so every tensor is aligned to its element size.
        nbytes = [math.prod(s) * dtype_bits(dtype_code(d)) // 8 for _, d, s in self._specs]
        order = sorted(range(len(self._specs)), key=lambda i: (-self._specs[i][1].itemsize, i))
        self._offsets: list[tuple[int, int]] = [(0, 0)] * len(self._specs)
        pos = 0
        for i in order:
            self._offsets[i] = (pos, pos + nbytes[i])
            pos += nbytes[i]
        self._data_size = pos

        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        for (name, dtype, shape), offs in zip(self._specs, self._offsets, strict=True):
            header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": list(offs)}
        body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        body += b" " * (-len(body) % 8)
        if len(body) > MAX_HEADER_SIZE:
            raise CheckpointError(f"{self.path}: header would be {len(body)} bytes, above the safetensors limit")
        self._header = struct.pack("<Q", len(body)) + body

        # Refuse a bad output path now, before the caller does any expensive work.
        check_output_path(self.path, force=force, inputs=self._inputs)
        self._next = 0
        self._cm: contextlib.AbstractContextManager[Path] | None = None
        self._fh = None
        self.tmp_path: Path | None = None

    @property
    def header_bytes(self) -> bytes:
        """The exact header region this writer puts at the start of the file (e.g. to hash it)."""
        return self._header

    def __enter__(self) -> SafetensorsWriter:
        self._cm = atomic_output(self.path, force=self._force, inputs=self._inputs)
        self.tmp_path = self._cm.__enter__()
        try:
            # mkstemp creates 0600 files; give the output the permissions a normal new file would get.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp_path, 0o666 & ~umask)
            self._fh = open(self.tmp_path, "wb")
            self._fh.write(self._header)
            self._fh.truncate(len(self._header) + self._data_size)
        except BaseException:
            self._abort(*sys.exc_info())
            raise
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the next spec's name, dtype and shape."""
        if self._fh is None:
            raise CheckpointError(f"{self.path}: write({name!r}) outside the writer's `with` block")
        if self._next >= len(self._specs):
            raise CheckpointError(f"{self.path}: tensor {name!r} written but all {len(self._specs)} specs are done")
        exp_name, exp_dtype, exp_shape = self._specs[self._next]
        if name != exp_name:
            raise CheckpointError(f"{self.path}: expected tensor {exp_name!r} next (spec order), got {name!r}")
        if tensor.dtype != exp_dtype:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {tensor.dtype}, the header says {exp_dtype}")
        if tuple(tensor.shape) != exp_shape:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, the header says {exp_shape}"
            )
        start, stop = self._offsets[self._next]
        data = _tensor_bytes(tensor)
        assert data.nbytes == stop - start
        if data.nbytes:
            self._fh.seek(len(self._header) + start)
            self._fh.write(data)
        del data
        self._next += 1

    @property
    def remaining(self) -> list[str]:
        """Names still to be written, in order."""
        return [s[0] for s in self._specs[self._next :]]

    def _abort(self, exc_type, exc, tb) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._cm is not None:
            cm, self._cm = self._cm, None
            if exc is None:
                exc_type, exc = CheckpointError, CheckpointError(f"{self.path}: write aborted")
            with contextlib.suppress(BaseException):
                cm.__exit__(exc_type, exc, tb)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc_type is not None:
            self._abort(exc_type, exc, tb)
            return False
        if self._next != len(self._specs):
            missing = self.remaining
            err = CheckpointError(
                f"{self.path}: {len(missing)} of {len(self._specs)} tensors were never written "
                f"(first: {missing[0]!r}); output discarded"
            )
            self._abort(CheckpointError, err, None)
            raise err
        try:
            self._fh.flush()
            self._fh.close()
            self._fh = None
        except BaseException:
            self._abort(*sys.exc_info())
            raise
        cm, self._cm = self._cm, None
        cm.__exit__(None, None, None)  # fsync + rename
        return False
