"""What a GGUF file is, read back with the ``gguf`` reader rather than trusted from its name."""

from __future__ import annotations

import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from gguf import GGMLQuantizationType

from mtpress.errors import CorruptCheckpointError, QualityGateError

Role = Literal["model", "head", "mmproj"]  # mmproj: the vision encoder llama.cpp loads with --mmproj


@dataclass(frozen=True)
class SplitPart:
    """One ``llama-gguf-split`` part of a file over the Hub's per-file limit, written where the whole file was."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class GgufFile:
    """A produced GGUF. ``name`` is its path inside the release (and the published repo). A file over the Hub's
    per-file limit is built, tested and measured whole, then published as ``parts`` (stages/split.py): its
    ``path`` is then gone, and ``size``/``sha256`` stay the whole file's, which the tests measured."""

    path: Path
    name: str
    layout: str
    role: Role
    quant: str
    size: int
    sha256: str
    nextn_layers: int
    block_count: int
    tensor_count: int
    parameters: int
    head_tensor_types: tuple[str, ...]
    parts: tuple[SplitPart, ...] = ()
    imatrix: str | None = None  # the importance matrix it was quantized with, by its path in the release

    @property
    def published(self) -> list[Path]:
        """The local files the release publishes for it: its parts, or the file itself."""
        return [self.path.with_name(p.name) for p in self.parts] or [self.path]


@dataclass(frozen=True)
class GgufFacts:
    arch: str
    block_count: int
    nextn_layers: int
    tensor_count: int
    parameters: int
    head_block_tensors: dict[str, str]  # name -> ggml type, for the MTP block


def read_facts(path: Path, *, head_block: int) -> GgufFacts:
    arch_key = "general.architecture"
    arch = gguf_metadata(path, (arch_key,)).get(arch_key, "")
    keys = (f"{arch}.block_count", f"{arch}.nextn_predict_layers")
    metadata, tensors = read_gguf_header(path, keys)
    prefix = f"blk.{head_block}."
    head = {name: kind for name, kind, _ in tensors if name.startswith(prefix)}
    return GgufFacts(arch, int(metadata.get(keys[0], 0)), int(metadata.get(keys[1], 0)), len(tensors),
                     sum(n for _, _, n in tensors), head)


def verify_head(path: Path, facts: GgufFacts, *, role: Role, layout: str, mtp_layers: int) -> None:
    """An embedded model or a sidecar head must carry the nextn block; a sidecar trunk must not, nor
    anything converted from a checkpoint that claims no MTP layer."""
    if mtp_layers == 0:
        if facts.nextn_layers or facts.head_block_tensors:
            raise QualityGateError(f"{path.name}: the checkpoint claims no MTP layer, but the file carries one",
                                   hint="convert with --no-mtp")
        return
    carries = facts.nextn_layers == mtp_layers and any(".nextn." in n for n in facts.head_block_tensors)
    if (layout == "embedded" or role == "head") and not carries:
        raise QualityGateError(f"{path.name}: expected {mtp_layers} MTP (nextn) layer(s), found "
                               f"nextn_predict_layers={facts.nextn_layers} and {len(facts.head_block_tensors)} "
                               "head tensors", hint="the converter dropped the head; check the checkpoint's index")
    if layout == "sidecar" and role == "model" and (facts.nextn_layers or facts.head_block_tensors):
        raise QualityGateError(f"{path.name}: a sidecar trunk must not carry the MTP layer, but it does",
                               hint="convert the trunk with --no-mtp")


def verify_mmproj(path: Path) -> None:
    """A vision projector as llama.cpp's mtmd loads it: a ``clip`` GGUF with a vision encoder."""
    keys = ("general.architecture", "clip.has_vision_encoder", "clip.projector_type")
    found = gguf_metadata(path, keys)
    if found.get("general.architecture") != "clip" or not found.get("clip.has_vision_encoder"):
        raise QualityGateError(f"{path.name}: expected a vision projector (general.architecture=clip with a vision "
                               f"encoder), found {found}", hint="convert the checkpoint with --mmproj")


# The GGUF header, read directly: gguf.GGUFReader decodes every field, the 248k-entry vocabulary arrays
# included (~30 s per file on a busy 2-core machine), when we need a few keys and the tensor list.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path, keys: Collection[str]) -> dict[str, Any]:
    """The values of ``keys`` in a GGUF's header (absent keys are left out); other values are skipped unread."""
    return _read_header(path, keys, with_tensors=False)[0]


def read_gguf_header(path: Path, keys: Collection[str]) -> tuple[dict[str, Any], list[tuple[str, str, int]]]:
    """``keys``' values and every tensor as (name, ggml type name, element count)."""
    return _read_header(path, keys, with_tensors=True)


def _read_header(path: Path, keys: Collection[str], *, with_tensors: bool
                 ) -> tuple[dict[str, Any], list[tuple[str, str, int]]]:
    found: dict[str, Any] = {}
    tensors: list[tuple[str, str, int]] = []
    with path.open("rb") as f:
        magic, _version, tensor_count, kv_count = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise CorruptCheckpointError(f"{path} is not a GGUF file", hint="the file is damaged; rerun its stage")
        for _ in range(kv_count):
            key = _gguf_value(f, GGUF_STRING, decode=True)
            value = _gguf_value(f, struct.unpack("<I", f.read(4))[0], decode=key in keys)
            if key in keys:
                found[key] = value
                if len(found) == len(keys) and not with_tensors:
                    break
        for _ in range(tensor_count if with_tensors else 0):
            name = _gguf_value(f, GGUF_STRING, decode=True)
            (n_dims,) = struct.unpack("<I", f.read(4))
            dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            kind, _offset = struct.unpack("<IQ", f.read(12))
            count = 1
            for d in dims:
                count *= d
            tensors.append((name, GGMLQuantizationType(kind).name, count))
    return found, tensors


def _gguf_value(f: BinaryIO, value_type: int, *, decode: bool) -> Any:
    if value_type in GGUF_SCALARS:
        fmt = GGUF_SCALARS[value_type]
        raw = f.read(struct.calcsize(fmt))
        return struct.unpack(fmt, raw)[0] if decode else None
    if value_type == GGUF_STRING:
        (length,) = struct.unpack("<Q", f.read(8))
        if decode:
            return f.read(length).decode("utf-8", errors="replace")
        f.seek(length, os.SEEK_CUR)
        return None
    if value_type == GGUF_ARRAY:
        item_type, count = struct.unpack("<IQ", f.read(12))
        if not decode and item_type in GGUF_SCALARS:
            f.seek(count * struct.calcsize(GGUF_SCALARS[item_type]), os.SEEK_CUR)
            return None
        items = [_gguf_value(f, item_type, decode=decode) for _ in range(count)]
        return items if decode else None
    raise CorruptCheckpointError(f"unknown GGUF value type {value_type}", hint="the file is damaged; rerun its stage")
