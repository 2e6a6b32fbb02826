"""Restore a fine-tune's MTP head from a donor, without rewriting the trunk.

The fine-tune's files are hard-linked (copied only across filesystems) into the
output; the head becomes one extra shard, ``model-mtp.safetensors``, and the index
is rewritten to cover trunk + head. Only the head's bytes and the index are new.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import INDEX, ModelDir
from mtpress.errors import IncompatibleDonorError, MissingMtpHeadError
from mtpress.fsutil import atomic_path, sha256_file, write_text_atomic
from mtpress.safetensors_io import bf16_bytes_to_f32, f32_to_bf16_bytes, read_tensor_bytes, write_safetensors

HEAD_SHARD = "model-mtp.safetensors"


@dataclass(frozen=True)
class HeadProvenance:
    donor: str
    donor_revision: str | None
    tensors: tuple[str, ...]
    parameters: int
    sha256: str  # of the head shard as written
    source_dtype: str
    dtype: str


@dataclass(frozen=True)
class InjectResult:
    model: ModelDir
    action: Literal["injected", "passthrough"]
    reason: str
    head: HeadProvenance | None
    bytes_written: int


def inject(finetune: ModelDir, donor: ModelDir | None, arch: ArchSpec, out: Path) -> InjectResult:
    """Give ``finetune`` the donor's head; pass it through untouched if it already has one."""
    expected = arch.expected_head(finetune.config)
    own = sorted(n for n in finetune.tensors if arch.is_head_tensor(n))
    if own:
        _check_head(finetune, expected, owner=finetune.label)
        return InjectResult(finetune, "passthrough", f"{finetune.label} already carries its own MTP head "
                            f"({len(own)} tensors); published as is", None, 0)
    if donor is None:
        raise MissingMtpHeadError(
            f"{finetune.label} has no mtp.* tensors although its config claims "
            f"{arch.mtp_layers(finetune.config)} MTP layer(s), and no donor is configured",
            hint="set `donor:` in the release config to the base model the fine-tune was trained from")
    _check_compatible(finetune, donor, arch)
    donor_head = sorted(n for n in donor.tensors if arch.is_head_tensor(n))
    if not donor_head:
        raise MissingMtpHeadError(f"donor {donor.label} has no mtp.* tensors to give",
                                  hint="use the original base model (e.g. Qwen/Qwen3.5-9B) as donor, not a fine-tune")
    _check_head(donor, expected, owner=f"donor {donor.label}")

    target_dtype = _trunk_dtype(finetune)
    head_tensors = []
    for name in sorted(expected):
        info = donor.tensors[name]
        data = read_tensor_bytes(donor.shard_of(name), info)
        head_tensors.append((name, target_dtype, info.shape, _cast(data, info.dtype, target_dtype, info.shape)))

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staging:
        staging.mkdir()
        for entry in finetune.path.iterdir():
            if entry.name != INDEX and entry.is_file():
                _link_or_copy(entry, staging / entry.name)
        write_safetensors(staging / HEAD_SHARD, head_tensors, metadata={"format": "pt"})
        weight_map = dict(finetune.weight_map) | {name: HEAD_SHARD for name, *_ in head_tensors}
        total = sum(finetune.tensors[n].end - finetune.tensors[n].begin for n in finetune.tensors)
        total += sum(len(data) for *_, data in head_tensors)
        index = {"metadata": {"total_size": total, "mtpress_head_donor": donor.label},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomic(staging / INDEX, json.dumps(index, indent=2) + "\n")
    head_path = out / HEAD_SHARD
    provenance = HeadProvenance(
        donor=donor.label, donor_revision=donor.revision, tensors=tuple(n for n, *_ in head_tensors),
        parameters=sum(donor.tensors[n].n_elements for n in expected), sha256=sha256_file(head_path),
        source_dtype=donor.tensors[donor_head[0]].dtype, dtype=target_dtype)
    written = head_path.stat().st_size + (out / INDEX).stat().st_size
    return InjectResult(ModelDir(out, f"{finetune.label} + head from {donor.label}", finetune.revision),
                        "injected", f"MTP head copied from {donor.label}", provenance, written)


def _check_compatible(finetune: ModelDir, donor: ModelDir, arch: ArchSpec) -> None:
    ft, dn = arch.text_config(finetune.config), arch.text_config(donor.config)
    for key in arch.compatibility_keys():
        if ft.get(key) != dn.get(key):
            raise IncompatibleDonorError(key, ft.get(key), dn.get(key), finetune=finetune.label, donor=donor.label)


def _check_head(model: ModelDir, expected: dict[str, tuple[int, ...]], *, owner: str) -> None:
    present = {n: t for n, t in model.tensors.items() if n.startswith("mtp.")}
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    if missing or extra:
        raise MissingMtpHeadError(
            f"{owner}: its MTP head does not match what the config implies "
            f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})",
            hint="the head must have exactly the tensors of mtp_num_hidden_layers layers")
    for name, shape in expected.items():
        if present[name].shape != shape:
            raise MissingMtpHeadError(f"{owner}: {name} has shape {list(present[name].shape)}, the config implies "
                                      f"{list(shape)}", hint="donor and fine-tune must be the same model size")


def _trunk_dtype(model: ModelDir) -> str:
    dtypes = {t.dtype for n, t in model.tensors.items() if t.dtype in ("BF16", "F16", "F32")}
    return "BF16" if "BF16" in dtypes or not dtypes else sorted(dtypes)[0]


def _cast(data: bytes, source: str, target: str, shape: tuple[int, ...]) -> bytes:
    if source == target:
        return data
    values = {"BF16": lambda: bf16_bytes_to_f32(data, shape),
              "F16": lambda: np.frombuffer(data, dtype=np.float16).astype(np.float32),
              "F32": lambda: np.frombuffer(data, dtype=np.float32)}[source]()
    if target == "BF16":
        return f32_to_bf16_bytes(values)
    return values.astype({"F16": np.float16, "F32": np.float32}[target]).tobytes()


def _link_or_copy(src: Path, dst: Path) -> None:
    # Hub caches hold relative symlinks into blobs/: link the blob itself, or the link would dangle.
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

