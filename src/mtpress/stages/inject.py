"""Restore a fine-tune's MTP head from a donor, without rewriting the trunk.

The fine-tune's files are hard-linked (copied only across filesystems) into the
output; the head becomes one extra shard, ``model-mtp.safetensors``, and the index
is rewritten to cover trunk + head. Only the head's bytes and the index are new.

Without a donor, a fine-tune that lost its head is released without one: its config
copy is reconciled to claim no MTP layer, because a GGUF that claims a head it lacks
does not load at all (llama.cpp issue #26916).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import INDEX, ModelDir
from mtpress.errors import IncompatibleDonorError, MissingMtpHeadError
from mtpress.fsutil import atomic_path, link_or_copy, sha256_file, write_text_atomic
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
    cast: Literal["none", "exact", "lossy"]  # lossy: some donor values changed in the cast (rounded or clipped)


@dataclass(frozen=True)
class VocabularyCheck:
    """What the head shares with the fine-tune's trunk, decided from the tensors, not the configs."""

    finetune_rows: int
    donor_rows: int
    embedding: str  # the fine-tune tensor the head reads tokens through
    output: str  # … and predicts through (the embedding itself when tied)
    tied: bool
    decision: str


@dataclass(frozen=True)
class InjectResult:
    model: ModelDir
    action: Literal["injected", "passthrough", "no-head"]
    reason: str
    head: HeadProvenance | None
    bytes_written: int
    vocabulary: VocabularyCheck | None = None


def inject(finetune: ModelDir, donor: ModelDir | None, arch: ArchSpec, out: Path) -> InjectResult:
    """Give ``finetune`` the donor's head; pass it through untouched if it already has one."""
    own = sorted(n for n in finetune.tensors if arch.is_head_tensor(n))
    if own:  # each checkpoint's tensor names pick its head layout (a MoE head: fused or per-expert experts)
        _check_head(finetune, arch, arch.expected_head(finetune.config, finetune.tensors), owner=finetune.label)
        return InjectResult(finetune, "passthrough", f"{finetune.label} already carries its own MTP head "
                            f"({len(own)} tensors); published as is", None, 0)
    if donor is None:
        return _without_head(finetune, arch, out)
    _check_compatible(finetune, donor, arch)
    donor_head = sorted(n for n in donor.tensors if arch.is_head_tensor(n))
    if not donor_head:
        raise MissingMtpHeadError(f"donor {donor.label} has no mtp.* tensors to give",
                                  hint="use the original base model (e.g. Qwen/Qwen3.5-9B) as donor, not a fine-tune")
    vocabulary = check_vocabulary(finetune, donor, arch, donor_head)
    expected = arch.expected_head(finetune.config, donor.tensors)
    _check_head(donor, arch, expected, owner=f"donor {donor.label}")

    target_dtype = _trunk_dtype(finetune)
    head_tensors = []
    lossy = False
    for name in sorted(expected):
        info = donor.tensors[name]
        data = read_tensor_bytes(donor.shard_of(name), info)
        cast = _cast(data, info.dtype, target_dtype, info.shape)
        lossy = lossy or (info.dtype != target_dtype and not np.array_equal(
            _as_f32(cast, target_dtype, info.shape), _as_f32(data, info.dtype, info.shape)))
        head_tensors.append((name, target_dtype, info.shape, cast))

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staging:
        staging.mkdir()
        for entry in finetune.path.iterdir():
            if entry.name != INDEX and entry.is_file():
                link_or_copy(entry, staging / entry.name)
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
        source_dtype=donor.tensors[donor_head[0]].dtype, dtype=target_dtype,
        cast="none" if donor.tensors[donor_head[0]].dtype == target_dtype else "lossy" if lossy else "exact")
    written = head_path.stat().st_size + (out / INDEX).stat().st_size
    reason = f"MTP head copied from {donor.label}"
    if provenance.cast != "none":
        reason += (f", cast from {provenance.source_dtype} to the fine-tune's {target_dtype}"
                   f"{' (lossy: values are rounded)' if provenance.cast == 'lossy' else ' (exact)'}")
    return InjectResult(ModelDir(out, f"{finetune.label} + head from {donor.label}", finetune.revision),
                        "injected", reason, provenance, written, vocabulary)


def _without_head(finetune: ModelDir, arch: ArchSpec, out: Path) -> InjectResult:
    """The fine-tune as is, but with a config copy that claims no MTP layer: converted with ``--no-mtp``
    it loads everywhere, and nothing offers draft-mtp on it."""
    claimed = arch.mtp_layers(finetune.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staging:
        staging.mkdir()
        for entry in finetune.path.iterdir():
            if entry.name != "config.json" and entry.is_file():
                link_or_copy(entry, staging / entry.name)
        config = arch.set_mtp_layers(finetune.config, 0)
        write_text_atomic(staging / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    reason = (f"{finetune.label} has no mtp.* tensors although its config claims {claimed} MTP layer(s), and no "
              "donor is configured: released without a head (converted with --no-mtp, config copy reconciled "
              "to mtp_num_hidden_layers: 0, since a GGUF that claims a missing head fails to load — llama.cpp "
              "issue #26916). Set `donor:` to the fine-tune's base model to restore the head")
    return InjectResult(ModelDir(out, f"{finetune.label} (no MTP head)", finetune.revision), "no-head", reason,
                        None, (out / "config.json").stat().st_size)


def check_vocabulary(finetune: ModelDir, donor: ModelDir, arch: ArchSpec, head: list[str]) -> VocabularyCheck:
    """Accept a resized vocabulary unless the donor's head holds a tensor of the donor's vocabulary size:
    the head reads the fine-tune's embedding and predicts through its output matrix, so those decide."""
    embedding, output = arch.shared_tensors(finetune.tensors)
    rows = finetune.tensors[embedding].shape[0]
    donor_rows = donor.tensors[arch.shared_tensors(donor.tensors)[0]].shape[0]
    if rows != donor_rows:
        own_vocabulary = [n for n in head if donor_rows in donor.tensors[n].shape]
        if own_vocabulary:
            raise IncompatibleDonorError(
                f"vocabulary size (the donor's head tensor {own_vocabulary[0]} has {donor_rows} rows)", rows,
                donor_rows, finetune=finetune.label, donor=donor.label)
        decision = (f"accepted: the vocabulary was resized ({donor_rows} rows in the donor, {rows} in the "
                    f"fine-tune), but the head has no vocabulary-sized tensor; it uses the fine-tune's {embedding} "
                    f"and {output}. Tokens the donor did not have were never seen by the head (lower acceptance "
                    "on them, same output)")
    else:
        decision = f"same vocabulary ({rows} rows); the head uses the fine-tune's {embedding} and {output}"
    return VocabularyCheck(rows, donor_rows, embedding, output, embedding == output, decision)


def _check_compatible(finetune: ModelDir, donor: ModelDir, arch: ArchSpec) -> None:
    ft, dn = arch.text_config(finetune.config), arch.text_config(donor.config)
    for key in arch.compatibility_keys():
        if ft.get(key) != dn.get(key):
            raise IncompatibleDonorError(key, ft.get(key), dn.get(key), finetune=finetune.label, donor=donor.label)


def _check_head(model: ModelDir, arch: ArchSpec, expected: dict[str, tuple[int, ...]], *, owner: str) -> None:
    present = {n: t for n, t in model.tensors.items() if arch.is_head_tensor(n)}
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


def _as_f32(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return {"BF16": lambda: bf16_bytes_to_f32(data, shape),
            "F16": lambda: np.frombuffer(data, dtype=np.float16).astype(np.float32),
            "F32": lambda: np.frombuffer(data, dtype=np.float32)}[dtype]().reshape(-1)


def _cast(data: bytes, source: str, target: str, shape: tuple[int, ...]) -> bytes:
    """``data`` in ``target``'s encoding; whether that lost anything is judged on the values (a BF16 head
    in F16 is exact unless a value is out of F16's range)."""
    if source == target:
        return data
    values = _as_f32(data, source, shape)
    if target == "BF16":
        return f32_to_bf16_bytes(values)
    return values.astype({"F16": np.float16, "F32": np.float32}[target]).tobytes()


