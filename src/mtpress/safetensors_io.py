"""Read and write safetensors files at the byte level.

mtpress never round-trips weights through a framework (transformers and mlx-lm
drop ``mtp.*`` on load): tensors are copied as raw bytes, so a head injected
from a donor is bit-identical to the donor's, and no torch is needed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpress.errors import CorruptCheckpointError
from mtpress.fsutil import atomic_path

DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # U32: MLX's packed quantized weights
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors by name, ``__metadata__``).

    Checks what a truncated or hand-edited file gets wrong: header length, JSON,
    dtypes, offsets inside the file, sizes matching shapes, no overlaps.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CorruptCheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)",
                                         hint="re-download the file; it is truncated")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CorruptCheckpointError(f"{path}: header length {header_len} does not fit a {size}-byte file",
                                         hint="re-download the file; it is truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e})",
                                         hint="re-download the file") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object", hint="re-download the file")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has a malformed header entry",
                                         hint="re-download the file") from e
        if dtype not in DTYPE_SIZES:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
        if not (0 <= begin <= end) or info.end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has offsets [{begin}, {end}) outside the file's "
                f"{size - data_start} data bytes",
                hint="re-download the file; it is truncated or its header was edited")
        if end - begin != info.n_elements * DTYPE_SIZES[dtype]:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs "
                f"{info.n_elements * DTYPE_SIZES[dtype]}", hint="re-download the file")
        tensors[name] = info
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CorruptCheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap")
    return tensors, metadata


def read_tensor_bytes(path: Path, info: TensorInfo) -> bytes:
    with path.open("rb") as f:
        f.seek(info.begin)
        data = f.read(info.end - info.begin)
    if len(data) != info.end - info.begin:
        raise CorruptCheckpointError(f"{path}: tensor {info.name!r} is cut short", hint="re-download the file")
    return data


def write_safetensors(path: Path, tensors: Iterable[tuple[str, str, tuple[int, ...], bytes | np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``(name, dtype, shape, raw bytes)`` tensors atomically, in the given order.

    The data may also be a 1-D uint8 array (the demo generator's vocabulary matrices), written without a copy.
    """
    items = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, data in items:
        expected = DTYPE_SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
        if len(data) != expected:
            raise ValueError(f"tensor {name}: {len(data)} bytes, {dtype}{list(shape)} needs {expected}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format recommends 8-byte aligned data
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, _, _, data in items:
            f.write(data)


def f32_to_bf16_bytes(array: np.ndarray) -> bytes:
    """Round float32 values to bfloat16 (nearest, ties to even) and return the raw bytes."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def bf16_bytes_to_f32(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)


