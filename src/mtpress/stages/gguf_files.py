"""What a GGUF file is, read back with the ``gguf`` reader rather than trusted from its name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gguf import GGUFReader

from mtpress.errors import QualityGateError

Role = Literal["model", "head"]


@dataclass(frozen=True)
class GgufFile:
    """A produced GGUF. ``name`` is its path inside the release (and the published repo)."""

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


@dataclass(frozen=True)
class GgufFacts:
    arch: str
    block_count: int
    nextn_layers: int
    tensor_count: int
    parameters: int
    head_block_tensors: dict[str, str]  # name -> ggml type, for the MTP block


def read_facts(path: Path, *, head_block: int) -> GgufFacts:
    reader = GGUFReader(path)
    arch = _string(reader, "general.architecture")
    block_count = _int(reader, f"{arch}.block_count")
    nextn = _int(reader, f"{arch}.nextn_predict_layers")
    prefix = f"blk.{head_block}."
    head = {t.name: t.tensor_type.name for t in reader.tensors if t.name.startswith(prefix)}
    parameters = sum(int(t.n_elements) for t in reader.tensors)
    return GgufFacts(arch, block_count, nextn, len(reader.tensors), parameters, head)


def verify_head(path: Path, facts: GgufFacts, *, role: Role, layout: str, mtp_layers: int) -> None:
    """An embedded model or a sidecar head must carry the nextn block; a sidecar trunk must not."""
    carries = facts.nextn_layers == mtp_layers and any(".nextn." in n for n in facts.head_block_tensors)
    if (layout == "embedded" or role == "head") and not carries:
        raise QualityGateError(f"{path.name}: expected {mtp_layers} MTP (nextn) layer(s), found "
                               f"nextn_predict_layers={facts.nextn_layers} and {len(facts.head_block_tensors)} "
                               "head tensors", hint="the converter dropped the head; check the checkpoint's index")
    if layout == "sidecar" and role == "model" and (facts.nextn_layers or facts.head_block_tensors):
        raise QualityGateError(f"{path.name}: a sidecar trunk must not carry the MTP layer, but it does",
                               hint="convert the trunk with --no-mtp")


def _field(reader: GGUFReader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _string(reader: GGUFReader, key: str) -> str:
    return str(_field(reader, key))


def _int(reader: GGUFReader, key: str) -> int:
    value = _field(reader, key)
    return int(value) if value is not None else 0
