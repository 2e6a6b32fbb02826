"""The Apple Silicon release beside the GGUFs: an MLX body plus the MTP head in MTPLX's pack format.

From the prepared (injected) checkpoint:

* the body goes through ``mlx_lm convert`` (affine quantization, configured bits and group size) from
  a scratch view of the checkpoint whose ``config.json`` names the model type mlx-lm knows
  (``qwen3_5``, not ``qwen3_5_text``); the source is never edited. mlx-lm drops every ``mtp.*``
  tensor, so
* the head is read straight from the checkpoint's safetensors and written as ``mtp.safetensors``:
  MTPLX's 15 key names, bf16 (or fp16), every RMSNorm gain stored **+1.0** (HF stores them
  zero-centred and computes x·(1+w); MLX's RMSNorm computes x·w, as mlx-lm does for the trunk);
* ``config.json`` names the head file (``mlx_lm_extra_tensors.mtp_file``) and ``mtplx_runtime.json``
  is MTPLX's runtime contract. It says "verified" only when built from a real verification record
  (MTPLX's ``forge verify --stamp`` on Apple Silicon, see ``verified_contract``); everything built
  here says "unverified on Apple Silicon".

``check_mlx`` then runs what can run on Linux in the MLX tools environment (``mlx_runner.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import ModelDir
from mtpress.errors import MissingMtpHeadError, QualityGateError, UnsupportedArchitectureError
from mtpress.fsutil import atomic_path, sha256_file
from mtpress.safetensors_io import bf16_bytes_to_f32, f32_to_bf16_bytes, read_tensor_bytes, write_safetensors
from mtpress.schema import MlxSpec
from mtpress.stages.bench import first_per_domain, load_prompts
from mtpress.toolchain.mlx import MTPLX_VERSION, MlxTools

HEAD_FILE = "mtp.safetensors"
CONTRACT_FILE = "mtplx_runtime.json"
# The model_type mlx-lm has a module for (text-only Qwen3.5 checkpoints say qwen3_5_text; mlx-lm only knows
# qwen3_5, which reads both layouts). MTPLX's arch_id is the architecture's (ArchSpec.mtplx_arch_id).
MLX_MODEL_TYPES = {"qwen3_5_text": "qwen3_5"}
# The head's RMSNorm gains (Qwen3.5 stores them zero-centred): stored +1.0 for MTPLX.
NORM_GAIN_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                      "self_attn.k_norm.weight", "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")
NORM_GAIN_KEYS = ("mtp.norm.weight",)
NORM_OFFSET = 1.0
HEAD_DTYPES = {"bf16": "BF16", "fp16": "F16"}
UNVERIFIED = "unverified on Apple Silicon"
# The contract status MTPLX reads as "runs, but unverified" (its registry blocks verified claims on any
# status starting with "unverified").
UNVERIFIED_STATUS = "unverified_apple_silicon"
# MTPLX's default head contract for Qwen3.5 (mtp_patch.MTPContract): the probe figure the card quotes.
DEFAULT_PROBE_VARIANT = ("post_norm", "embedding_hidden")


@dataclass(frozen=True)
class PackFile:
    path: Path
    name: str  # path inside the pack
    size: int
    sha256: str


@dataclass(frozen=True)
class MlxPack:
    """An MTPLX-shaped pack on disk and what it holds."""

    path: Path
    files: tuple[PackFile, ...]
    bits: int
    group_size: int
    bits_per_weight: float  # of the body, as mlx-lm reports it (scales and biases included)
    head_dtype: str
    head_tensors: int
    head_parameters: int
    head_bytes: int
    body_bytes: int
    norm_offset: float
    arch_id: str
    mtp_depth_max: int
    verification: str  # UNVERIFIED, or "verified on Apple Silicon (…)" from a real record
    source_model_type: str
    mlx_model_type: str


def export_mlx(model: ModelDir, arch: ArchSpec, spec: MlxSpec, *, tools: MlxTools, out_dir: Path) -> MlxPack:
    """Write the MTPLX pack of ``model`` to ``out_dir`` (replaced as a whole, atomically)."""
    if arch.mtplx_arch_id is None:
        raise UnsupportedArchitectureError(
            f"{model.label}: no MTPLX pack format is known for {arch.family} (architecture {arch.name})",
            hint="turn `mlx:` off in the release config")
    head = head_tensor_names(model, arch)
    source_type = str(arch.text_config(model.config).get("model_type") or model.config.get("model_type"))
    # What a killed run left beside the pack (its staging folder, its scratch view) goes first; both are
    # named like atomic_path's partials, so nothing else matches.
    for stale in out_dir.parent.glob(f".{out_dir.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch_dir = tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.source-", suffix=".partial", dir=out_dir.parent)
    with scratch_dir as scratch, atomic_path(out_dir) as staging:
        source = _mlx_source_view(model, Path(scratch))
        output = tools.run("convert", {"hf_path": str(source), "mlx_path": str(staging), "bits": spec.bits,
                                       "group_size": spec.group_size}, timeout=spec.timeout_s)
        # mlx-lm's README names an upload it never made; the flow writes the pack's own card.
        (staging / "README.md").unlink(missing_ok=True)
        head_params, head_bytes = write_head(model, head, staging / HEAD_FILE, spec.head_dtype)
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
        config["mlx_lm_extra_tensors"] = {"mtp_file": HEAD_FILE}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / CONTRACT_FILE).write_text(json.dumps(runtime_contract(
            arch.mtplx_arch_id, spec.mtp_depth_max, head_format=spec.head_dtype), indent=2) + "\n",
            encoding="utf-8")
        mlx_type = str(config.get("model_type"))
    files = tuple(PackFile(p, p.relative_to(out_dir).as_posix(), p.stat().st_size, sha256_file(p))
                  for p in sorted(out_dir.rglob("*")) if p.is_file())
    return MlxPack(path=out_dir, files=files, bits=spec.bits, group_size=spec.group_size,
                   bits_per_weight=float(output["bits_per_weight"]), head_dtype=spec.head_dtype,
                   head_tensors=len(head), head_parameters=head_params, head_bytes=head_bytes,
                   body_bytes=sum(f.size for f in files if f.name.startswith("model") and f.name.endswith(
                       ".safetensors")),
                   norm_offset=NORM_OFFSET, arch_id=arch.mtplx_arch_id, mtp_depth_max=spec.mtp_depth_max,
                   verification=UNVERIFIED, source_model_type=source_type, mlx_model_type=mlx_type)


def head_tensor_names(model: ModelDir, arch: ArchSpec) -> list[str]:
    """The head's tensor names as the config implies them; refuse a checkpoint that lacks any."""
    expected = arch.expected_head(model.config)
    if arch.mtp_layers(model.config) < 1 or not expected:
        raise MissingMtpHeadError(f"{model.label}: its config declares no MTP layer, so there is no head to pack",
                                  hint="an MTPLX pack needs a checkpoint with its MTP head (configure a donor)")
    missing = sorted(set(expected) - set(model.tensors))
    if missing:
        raise MissingMtpHeadError(
            f"{model.label}: the MTP head is missing {len(missing)} of {len(expected)} tensors "
            f"(e.g. {', '.join(missing[:3])}); an MTPLX pack without its head would draft nothing",
            hint="export from the injected checkpoint (set `donor:` to the fine-tune's base model)")
    for name, shape in expected.items():
        if model.tensors[name].shape != shape:
            raise MissingMtpHeadError(f"{model.label}: head tensor {name} has shape "
                                      f"{list(model.tensors[name].shape)}, the config implies {list(shape)}",
                                      hint="the head does not belong to this model; re-inject it from the base")
    return sorted(expected)


def is_norm_gain(name: str) -> bool:
    return name in NORM_GAIN_KEYS or name.endswith(NORM_GAIN_SUFFIXES)


def write_head(model: ModelDir, names: list[str], path: Path, head_dtype: str) -> tuple[int, int]:
    """Write the head tensors under MTPLX's names in ``head_dtype``, norm gains +1.0; (parameters, bytes)."""
    out_dtype = HEAD_DTYPES[head_dtype]
    tensors = []
    for name in names:
        info = model.tensors[name]
        data = read_tensor_bytes(model.shard_of(name), info)
        if info.dtype == out_dtype and not is_norm_gain(name):
            tensors.append((name, out_dtype, info.shape, data))  # bit-identical to the checkpoint
            continue
        values = _to_f32(data, info.dtype, info.shape, where=f"{model.label}: {name}")
        if is_norm_gain(name):
            values = values + np.float32(NORM_OFFSET)
        raw = f32_to_bf16_bytes(values) if out_dtype == "BF16" else values.astype(np.float16).tobytes()
        tensors.append((name, out_dtype, info.shape, raw))
    write_safetensors(path, tensors, metadata={"format": "mlx"})
    return sum(model.tensors[n].n_elements for n in names), path.stat().st_size


def _to_f32(data: bytes, dtype: str, shape: tuple[int, ...], *, where: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bytes_to_f32(data, shape)
    if dtype in ("F16", "F32"):
        return np.frombuffer(data, dtype=np.float16 if dtype == "F16" else np.float32).astype(np.float32).reshape(shape)
    raise MissingMtpHeadError(f"{where} is stored as {dtype}; the MTPLX head takes bf16, fp16 or fp32 sources",
                              hint="export from an unquantized checkpoint")


def _mlx_source_view(model: ModelDir, scratch: Path) -> Path:
    """The checkpoint as mlx-lm must see it: every file linked, ``config.json`` rewritten with its model type."""
    view = scratch / "source"
    view.mkdir()
    for item in model.path.iterdir():
        if item.is_file() and item.name not in ("config.json", "README.md"):
            os.symlink(item.resolve(), view / item.name)
    config = dict(model.config)
    config["model_type"] = MLX_MODEL_TYPES.get(config.get("model_type"), config.get("model_type"))
    (view / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return view


# THE RUNTIME CONTRACT


def runtime_contract(arch_id: str, depth_max: int, *, head_format: str,
                     verification: Mapping | None = None) -> dict:
    """MTPLX's ``mtplx_runtime.json``. Without a verification record it says, in the fields MTPLX reads,
    that the pack is unverified; with one, it is that record (see ``verified_contract``)."""
    if verification is not None:
        return verified_contract(verification)
    return {
        "mtplx_version": MTPLX_VERSION,
        "arch_id": arch_id,
        "mtp_depth_max": depth_max,
        "recommended_profile": "stable",
        "mtp_sidecar": head_format,
        "exactness_baseline": {
            "status": UNVERIFIED_STATUS,
            "reason": "built by mtpress on Linux; MTPLX's forge verification (acceptance and speed per draft "
                      "depth) needs Apple Silicon and has not run on this pack",
        },
        "verified_on": {},
        "verification": {"status": "unverified", "level": UNVERIFIED, "full_load_verified": False},
    }


def verified_contract(stamped: Mapping) -> dict:
    """Accept a contract as verified only if it is a real record of MTPLX's forge verification on Apple
    Silicon (``mtplx forge verify --stamp``): a macOS arm64 machine, a timestamp, a full-load verified
    status and speed evidence with MTP depth rows. Anything less raises QualityGateError."""
    verified_on = stamped.get("verified_on") or {}
    verification = stamped.get("verification") or {}
    evidence = stamped.get("speed_evidence") or {}
    problems = []
    if not verified_on.get("macos") or verified_on.get("machine_arch") != "arm64":
        problems.append(f"verified_on names no macOS arm64 machine ({dict(verified_on)!r})")
    if not verified_on.get("timestamp"):
        problems.append("verified_on has no timestamp")
    if verification.get("status") != "verified" or verification.get("full_load_verified") is not True:
        problems.append(f"verification is {dict(verification)!r}, not a full-load 'verified'")
    if not any(int(row.get("depth") or 0) > 0 for row in evidence.get("forge_verify_rows") or []):
        problems.append("its speed_evidence has no forge verify row at an MTP depth (acceptance and speed per depth)")
    if problems:
        raise QualityGateError("the contract is not a record of MTPLX's forge verification on Apple Silicon: "
                               + "; ".join(problems),
                               hint="run `mtplx forge verify PACK --stamp` on an Apple Silicon Mac (the release "
                                    "workflow's macOS job) and pass the contract it wrote")
    return dict(stamped)


def verification_level(contract: Mapping) -> str:
    """What the card says: UNVERIFIED, or the Apple Silicon machine a real verification ran on."""
    try:
        verified_contract(contract)
    except QualityGateError:
        return UNVERIFIED
    on = contract["verified_on"]
    return f"verified on Apple Silicon ({on.get('hardware') or 'arm64'}, macOS {on['macos']}, {on['timestamp']})"


# CHECKS THAT RUN HERE


@dataclass(frozen=True)
class MlxChecks:
    """What was checked on this (Linux, CPU) machine, each with its outcome."""

    compute_dtype: str  # the loaded bf16 weights are upcast exactly; MLX's CPU backend emulates bf16
    load_generate_passed: bool
    prompt_tokens: int
    tokens: tuple[int, ...]
    reference: str | None  # the llama.cpp smoke result compared with (the BF16 GGUF), if any
    # The checkpoint as mlx-lm converts it, before quantization: its first match_tokens greedy tokens equal
    # to llama.cpp's BF16 mean both runtimes read the same model (model type, norms, conv layout, tokenizer).
    match_tokens: int
    unquantized_match_reference: bool | None
    unquantized_tokens_matching_reference: int | None  # leading tokens equal, of the whole smoke run
    # The shipped (quantized) body: how many leading greedy tokens equal llama.cpp's BF16 output.
    pack_tokens_matching_reference: int | None
    inspect_passed: bool
    inspect: dict
    runtime_smoke_passed: bool
    runtime_smoke: dict
    probe_prompts: int
    probe_max_prompt_tokens: int
    probe_agreement: float | None  # MTPLX's default Qwen3.5 contract (post-norm hidden, embedding first)
    probe_variants: tuple[dict, ...]
    apple_silicon: str  # what happened to MTPLX's generating commands here

    @property
    def passed(self) -> tuple[str, ...]:
        names = {"MLX load + greedy generation": self.load_generate_passed,
                 "greedy tokens (unquantized MLX) = llama.cpp BF16": self.unquantized_match_reference,
                 "MTPLX inspect": self.inspect_passed, "MTPLX runtime smoke": self.runtime_smoke_passed}
        return tuple(name for name, ok in names.items() if ok)


def check_mlx(pack: MlxPack, model: ModelDir, spec: MlxSpec, tools: MlxTools, *, prompt: str, n_predict: int,
              reference_tokens: tuple[int, ...] | None, reference: str | None, prompts_path: Path | None = None,
              ) -> MlxChecks:
    """Load and run the pack on CPU in the MLX environment; raise QualityGateError if it is broken."""
    prompts = first_per_domain(load_prompts(prompts_path), spec.probe_per_domain)
    with tempfile.TemporaryDirectory(prefix=".mlx-check-") as scratch:
        # MTPLX's prompt suites name the domain "category".
        suite = Path(scratch) / "prompts.jsonl"
        suite.write_text("".join(json.dumps({"id": p.id, "category": p.domain, "prompt": p.prompt}) + "\n"
                                 for p in prompts), encoding="utf-8")
        answer = tools.run("check", {"model": str(pack.path), "source": str(_mlx_source_view(model, Path(scratch))),
                                     "prompt": prompt, "n_predict": n_predict, "prompts": str(suite),
                                     "max_prompt_tokens": spec.probe_max_prompt_tokens}, timeout=spec.timeout_s)
    generated = answer["generate"]
    tokens = tuple(generated["tokens"])
    inspect, smoke = answer["inspect"], answer["runtime_smoke"]
    inspect_ok = bool(inspect["passes_tensor_gate"] and inspect["can_run"] and inspect["arch_id"] == pack.arch_id
                      and inspect["sidecar_format"] == pack.head_dtype)
    smoke_ok = bool(smoke["mtp_enabled"] and smoke["mtp_valid"])
    if not inspect_ok:
        raise QualityGateError(f"MTPLX rejects the pack {pack.path}: {inspect}",
                               hint="the head file or config.json is malformed; do not publish this pack")
    if not smoke_ok:
        raise QualityGateError(f"MTPLX could not attach and run the head of {pack.path}: {smoke}")
    variants = tuple(answer["probe"]["variants"])
    default = next((v for v in variants if (v["hidden_variant"], v["concat_order"]) == DEFAULT_PROBE_VARIANT), None)
    unquantized = tuple(answer["generate_unquantized"]["tokens"])
    return MlxChecks(
        compute_dtype="float32", load_generate_passed=len(tokens) == n_predict,
        prompt_tokens=len(generated["prompt_tokens"]), tokens=tokens, reference=reference,
        match_tokens=spec.match_tokens,
        unquantized_match_reference=None if reference_tokens is None else (
            common_prefix(unquantized, reference_tokens) >= min(spec.match_tokens, len(reference_tokens))),
        unquantized_tokens_matching_reference=None if reference_tokens is None else common_prefix(unquantized,
                                                                                                  reference_tokens),
        pack_tokens_matching_reference=None if reference_tokens is None else common_prefix(tokens, reference_tokens),
        inspect_passed=inspect_ok, inspect=inspect, runtime_smoke_passed=smoke_ok,
        runtime_smoke={k: smoke[k] for k in ("prompt_tokens", "mtp_enabled", "mtp_valid", "ar_logits_shape",
                                             "mtp_logits_shape", "greedy_next_id")},
        probe_prompts=len(prompts), probe_max_prompt_tokens=spec.probe_max_prompt_tokens,
        probe_agreement=default["agreement"] if default else None, probe_variants=variants,
        apple_silicon=f"not run: MTPLX {MTPLX_VERSION}'s forge verify, run and bench load a macOS system library; "
                      "the release workflow's macOS job runs them")


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pack_manifest(pack: MlxPack, checks: MlxChecks, contract: Mapping) -> dict:
    """The pack's own facts for its manifest and card (sizes, checks passed, verification level)."""
    return {"bits": pack.bits, "group_size": pack.group_size, "bits_per_weight": pack.bits_per_weight,
            "head_dtype": pack.head_dtype, "head_tensors": pack.head_tensors, "head_parameters": pack.head_parameters,
            "head_bytes": pack.head_bytes, "body_bytes": pack.body_bytes, "norm_offset": pack.norm_offset,
            "arch_id": pack.arch_id, "mtp_depth_max": pack.mtp_depth_max,
            "total_bytes": sum(f.size for f in pack.files),
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in pack.files],
            "checks_passed": list(checks.passed), "verification": verification_level(contract)}

