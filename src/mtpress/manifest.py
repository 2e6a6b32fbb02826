"""The release manifest: every input, tool, file and measurement of a release, as JSON.

The card is rendered from it alone, so everything a card says can be traced here. ``Manifest`` is the
GGUF release's (written by the publish flow, completed by the release gate, read by the card and the
gate); ``PackManifest`` the MTPLX pack's. The parts the card and gate reason about are typed; a stage's
detailed record (bench, quality, gate, the head choice, the pack) is stored as that stage wrote it, and
tables are rows of column → cell, as the UI and the card show them. Field order is the file's key order;
sections a later step adds (the gate's, Apple Silicon's verification) are absent until it has run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any, Literal

from mtpress.fsutil import write_text_atomic
from mtpress.schema import StrictModel

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1

Record = dict[str, Any]  # a stage's own record, as ``jsonable`` gives it
Table = list[dict[str, Any]]  # rows of column → cell


def jsonable(value: Any) -> Any:
    """A stage result as the manifest stores it: a file's absolute ``path`` is the publisher's, never stored."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_") and f.name != "path"}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Hardware(StrictModel):
    cpu: str
    cores: int | None
    gpu: str | None
    os: str


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "os": f"{platform.system()} {platform.release()}"}


class _Document(StrictModel):
    schema_version: Literal[1] = SCHEMA_VERSION


class ManifestPart(StrictModel):
    """One llama-gguf-split part of a file over the Hub's per-file limit: what the repo holds in its place."""

    path: str
    size: int
    sha256: str


class ManifestFile(StrictModel):
    """A GGUF of the release (``GgufFile`` without its local path): ``path`` is its path in the repo; ``size`` and
    ``sha256`` are the whole file's (what smoke, bench and quality measured); a split one lists its ``parts``."""

    path: str
    name: str
    layout: str
    role: str
    quant: str
    size: int
    sha256: str
    nextn_layers: int
    block_count: int
    tensor_count: int
    parameters: int | None = None  # manifests before the mmproj export lack it
    head_tensor_types: tuple[str, ...] = ()
    parts: tuple[ManifestPart, ...] = ()  # empty: published whole
    imatrix: str | None = None  # the importance matrix it was quantized with (Manifest.imatrix)

    @property
    def published(self) -> list[tuple[str, str]]:
        """(path, sha256) of what the repo holds for this file: its parts, or the file itself."""
        return [(p.path, p.sha256) for p in self.parts] or [(self.path, self.sha256)]


class ManifestImatrix(StrictModel):
    """The importance matrix the ``quants`` were made with (``ImatrixFile`` without its local path), published at
    ``path``."""

    path: str
    name: str
    size: int
    sha256: str
    calibration: str
    calibration_sha256: str
    ctx_size: int
    chunks: int | None
    tensors: int
    head_tensors: int
    llama_cpp: str
    quants: tuple[str, ...]


class SmokeRow(StrictModel):
    """One smoke test (``SmokeResult``); older manifests lack the tokens, the image run and the chat request."""

    model: str
    head: str | None
    quant: str
    layout: str
    n_predict: int
    draft_n_max: int
    tokens_identical: bool | None
    tokens: tuple[int, ...] = ()
    drafted: int
    accepted: int
    acceptance: float | None
    tokens_per_second_plain: float
    tokens_per_second_mtp: float | None
    passed: bool
    mmproj: str | None = None
    image_tokens_identical: bool | None = None
    image_tokens: tuple[int, ...] = ()
    image_drafted: int | None = None
    image_accepted: int | None = None
    chat_tokens_identical: bool | None = None  # the chat request (older manifests lack it)
    chat_tokens: tuple[int, ...] = ()
    chat_reasoning: str = ""
    chat_content: str = ""


class Toolchain(StrictModel):
    llama_cpp: str
    origin: str
    converter_python: str
    patches: dict[str, str] | None = None  # manifests before patched builds lack it


class InputRecord(StrictModel):
    """A checkpoint the release was made from: a Hub repo at its commit, or a local folder by its name and digest."""

    label: str
    repo: str | None
    revision: str | None
    digest: str | None = None
    mtp_layers: int | None = None
    license: str | None
    files: dict[str, str]  # shard → sha256


class Inputs(StrictModel):
    finetune: InputRecord
    donor: InputRecord | None = None  # None: no donor, or its head went unused


class InjectedHead(StrictModel):
    donor: str
    donor_revision: str | None
    tensors: tuple[str, ...]
    parameters: int
    sha256: str
    source_dtype: str
    dtype: str
    cast: Literal["none", "exact", "lossy"] | None = None  # manifests before the cast check lack it


class Vocabulary(StrictModel):
    finetune_rows: int
    donor_rows: int
    embedding: str
    output: str
    tied: bool
    decision: str


class Inject(StrictModel):
    action: Literal["injected", "passthrough", "no-head"]
    reason: str
    head: InjectedHead | None
    bytes_written: int
    vocabulary: Vocabulary | None = None


class Manifest(_Document):
    """The GGUF release's manifest.json. ``gate``/``gate_details`` exist once the release gate has run."""

    release: str
    config_file: str | None = None  # older manifests lack these two
    mtpress: str | None = None
    config: Record  # the release config as published: local paths by their names alone
    toolchain: Toolchain
    hardware: Hardware
    inputs: Inputs
    architecture: Record
    inject: Inject
    head_choice: Record | None = None
    files: tuple[ManifestFile, ...]
    imatrix: ManifestImatrix | None = None  # None: no quant was made with one
    smoke: tuple[SmokeRow, ...] = ()
    lean_heads: Table = []  # each quant's sidecar head (lean copies) against the embedded file (smoke.LeanHeadCheck)
    bench: Table = []
    quality: Table | None = None
    bench_details: list[Record] = []
    quality_details: Record | None = None
    mlx: Record | None = None  # what the GGUF release records of its MTPLX pack
    stage_seconds: dict[str, float] = {}
    gate: Table | None = None
    gate_details: Record | None = None

    def sha256_by_path(self) -> dict[str, str]:
        """Each file's sha256 by its path in the repo (each part's, for a split file): what a download of the release
        must reproduce."""
        return {path: sha256 for path, (sha256, _) in self.content_by_path().items()}

    def content_by_path(self) -> dict[str, tuple[str, int]]:
        """(sha256, size) of each file the repo holds for the release, by its path (each part of a split one)."""
        listed = {path: (sha256, size) for f in self.files for path, sha256, size
                  in ([(p.path, p.sha256, p.size) for p in f.parts] or [(f.path, f.sha256, f.size)])}
        return listed | ({self.imatrix.path: (self.imatrix.sha256, self.imatrix.size)} if self.imatrix else {})


class PackManifest(_Document):
    """The MTPLX pack's manifest.json. ``forge_verify``/``verified_on`` exist once Apple Silicon verified it."""

    release: str
    repo: str
    gguf_repo: str | None
    config: Record
    inputs: Inputs
    mlx_tools: dict[str, str]
    hardware: Hardware
    pack: Record
    checks: Record
    unverified_level: str
    verification: Record | None
    stage_seconds: dict[str, float]
    forge_verify: Table | None = None
    verified_on: Record | None = None


def write_manifest(release_dir: Path, manifest: Manifest | PackManifest) -> Path:
    """Write what the manifest's writer stated, and no more: a field left at its default (a later section not yet
    added, a fact an older manifest lacks) is left out, not written as null, so reading and rewriting any
    manifest changes none of its bytes."""
    data = {"schema_version": manifest.schema_version, **manifest.model_dump(mode="json", exclude_unset=True)}
    path = release_dir / MANIFEST
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def read_manifest(release_dir: Path) -> Manifest:
    return Manifest.model_validate_json((release_dir / MANIFEST).read_bytes())


def read_pack_manifest(folder: Path) -> PackManifest:
    return PackManifest.model_validate_json((folder / MANIFEST).read_bytes())
