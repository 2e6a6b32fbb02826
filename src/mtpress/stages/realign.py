"""Re-align the MTP head to the fine-tune it drafts for.

A copied head learnt the base model's hidden states; fine-tuning moved them. This stage trains only
the head's tensors against the fine-tune's own trunk, in two steps:

1. ``collect_hidden_states``: llama-server (one process, ``--embeddings --pooling none``) serves the
   trunk's BF16 GGUF, greedily continues every prompt of a prompt set (the shipped
   ``data/realign_prompts.jsonl``, disjoint from the bench prompts, or the user's own JSONL), and
   returns the trunk's final hidden state (after the output norm: what draft-mtp feeds the head) at
   every position. Tokens and states are streamed to disk in chunks, so no model is held twice and a
   9B's states never sit in memory at once. The trunk's digest is stored with them.
2. ``realign``: refuses data collected from another trunk, runs ``realign_trainer.py`` under the
   converter's Python (torch; any torch device) on the head tensors, and writes the trained head as
   the extra shard ``model-mtp.safetensors`` of a new model directory whose trunk shards are
   hard-links of the input's, byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import requests

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import INDEX, ModelDir
from mtpress.errors import ModelError, ToolchainError, TrunkMismatchError, UnsupportedArchitectureError
from mtpress.fsutil import atomic_path, link_or_copy, sha256_file, write_text_atomic
from mtpress.manifest import hardware
from mtpress.safetensors_io import read_header
from mtpress.schema import HeadSpec
from mtpress.stages.bench import first_per_domain, load_prompts
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.inject import HEAD_SHARD
from mtpress.toolchain import LlamaCpp, run_tool
from mtpress.toolchain.server import llama_server

PROMPTS_RESOURCE = "data/realign_prompts.jsonl"
DATA_FORMAT = 1
DATA_FILE = "hidden-states.json"
TRAINER = Path(__file__).parents[1] / "realign_trainer.py"  # runs under the converter's Python, which has torch
# The HeadSpec keys the trainer reads: a change to any of them is a different head.
TRAINER_KEYS = {"seed", "max_steps", "batch_sequences", "learning_rate", "eval_every", "patience", "loss",
                "candidates", "device", "threads", "heldout_fraction"}


@dataclass(frozen=True)
class HiddenStates:
    """The trunk's hidden states on a prompt set, on disk in ``path``; ``trunk_digest`` names the trunk."""

    path: Path
    trunk_digest: str
    gguf_sha256: str
    prompt_set: str
    prompt_set_sha256: str
    sequences: int
    tokens: int
    generated_tokens: int
    hidden_size: int
    chunks: tuple[str, ...]

    @property
    def output_files(self) -> tuple[Path, ...]:
        return (self.path / DATA_FILE, *(self.path / f"{c}.{kind}.npy" for c in self.chunks
                                         for kind in ("tokens", "hidden")))


@dataclass(frozen=True)
class RealignResult:
    model: ModelDir
    head_sha256: str
    data_source: str
    data_tokens: int  # every position of the collected sequences (prompt and generated tokens)
    generated_tokens: int  # of which the trunk generated
    train_positions: int
    heldout_positions: int
    steps: int
    best_step: int
    loss_curve: tuple[dict[str, float], ...]
    heldout_curve: tuple[dict[str, float], ...]
    acceptance_before: float  # held-out, draft length 1, full-vocabulary argmax, as the trainer saw it
    acceptance_after: float
    # How often the trunk's argmax over lm_head · h equals the token llama.cpp generated: 1.0 proves the collected
    # states are the ones llama.cpp decodes from (the head is trained on what it will be fed).
    trunk_agreement: float
    seed: int
    wall_seconds: float
    hardware: dict[str, Any]
    parameters: int
    spec: dict[str, Any]

    @property
    def output_files(self) -> tuple[Path, ...]:
        return (Path(self.model.path) / HEAD_SHARD, Path(self.model.path) / INDEX)


def prompt_file(path: Path | None = None) -> Path:
    return path or Path(str(resources.files("mtpress").joinpath(PROMPTS_RESOURCE)))


def trunk_digest(model: ModelDir, arch: ArchSpec) -> str:
    """The trunk's identity: every non-head tensor's name, dtype, shape and shard sha256.

    Raises ModelError when a shard mixes head and trunk tensors: a re-aligned head must live in a shard
    of its own, or replacing it would rewrite trunk bytes.
    """
    head_shards = {model.weight_map[n] for n in model.tensors if arch.is_head_tensor(n)}
    trunk = {n: t for n, t in model.tensors.items() if not arch.is_head_tensor(n)}
    mixed = sorted(head_shards & {model.weight_map[n] for n in trunk})
    if mixed:
        raise ModelError(f"{model.label}: {', '.join(mixed)} holds both MTP head and trunk tensors",
                         hint="realign needs the head in its own shard; it is, after `inject` from a donor")
    h = hashlib.sha256()
    for name in sorted(trunk):
        shard = model.weight_map[name]
        h.update(f"{name}\0{trunk[name].dtype}\0{list(trunk[name].shape)}\0{sha256_file(model.path / shard)}\n"
                 .encode())
    return h.hexdigest()


def collect_hidden_states(model: ModelDir, trunk: GgufFile, arch: ArchSpec, spec: HeadSpec, tools: LlamaCpp,
                          out: Path, *, chunk_tokens: int = 32768) -> HiddenStates:
    """Greedy continuations of the prompt set by ``trunk`` (the BF16 GGUF of ``model``'s trunk) and the
    trunk's hidden state at every position, written to ``out`` (replaced whole, atomically)."""
    source = prompt_file(spec.prompts)
    prompts = first_per_domain(load_prompts(source), spec.per_domain)
    context = 2 * spec.n_predict + 512
    # One ubatch holds a whole sequence: with --pooling none llama-server refuses inputs longer than it.
    args = ["-m", str(trunk.path), "-c", str(context), "-b", str(context), "-ub", str(context), "--embeddings",
            "--pooling", "none"]
    records: list[dict[str, Any]] = []
    tokens_buf: list[np.ndarray] = []
    hidden_buf: list[np.ndarray] = []
    written: list[str] = []
    hidden_size = 0
    with atomic_path(out) as staging:
        staging.mkdir()

        def flush() -> None:
            if tokens_buf:
                name = f"chunk-{len(written):05d}"
                np.save(staging / f"{name}.tokens.npy", np.concatenate(tokens_buf))
                np.save(staging / f"{name}.hidden.npy", np.concatenate(hidden_buf))
                written.append(name)
                tokens_buf.clear()
                hidden_buf.clear()

        with llama_server(tools, args, timeout=spec.timeout_s, threads=spec.threads) as server:
            offset = 0
            for prompt in prompts:
                prompt_tokens = _post(server.url, "tokenize", {"content": prompt.prompt, "add_special": True},
                                      spec.timeout_s)["tokens"][:context - spec.n_predict - 1]
                body = _post(server.url, "completion", {
                    "prompt": prompt_tokens, "n_predict": spec.n_predict, "temperature": 0, "top_k": 1,
                    "samplers": ["top_k"], "seed": spec.seed, "return_tokens": True, "cache_prompt": False,
                    "ignore_eos": True}, spec.timeout_s)
                sequence = [*prompt_tokens, *body["tokens"]]
                [answer] = _post(server.url, "embeddings", {"content": [sequence]}, spec.timeout_s)
                hidden = np.asarray(answer["embedding"], dtype=np.float32)
                if hidden.shape[0] != len(sequence):
                    raise ToolchainError(f"llama-server returned {hidden.shape[0]} hidden states for a "
                                         f"{len(sequence)}-token sequence (prompt {prompt.id!r})",
                                         hint="the realign stage needs --pooling none embeddings of b11434")
                hidden_size = hidden.shape[1]
                records.append({"id": prompt.id, "domain": prompt.domain, "chunk": f"chunk-{len(written):05d}",
                                "offset": offset, "length": len(sequence), "prompt_tokens": len(prompt_tokens)})
                tokens_buf.append(np.asarray(sequence, dtype=np.int32))
                hidden_buf.append(hidden)
                offset += len(sequence)
                if offset >= chunk_tokens:
                    flush()
                    offset = 0
        flush()
        meta = {"format": DATA_FORMAT, "trunk_digest": trunk_digest(model, arch), "gguf": trunk.name,
                "gguf_sha256": trunk.sha256, "prompt_set": _source_label(spec.prompts),
                "prompt_set_sha256": sha256_file(source), "n_predict": spec.n_predict, "seed": spec.seed,
                "hidden_size": hidden_size, "sequences": records}
        write_text_atomic(staging / DATA_FILE, json.dumps(meta, indent=1) + "\n")
    return _describe_data(out)


def load_hidden_states(path: Path) -> HiddenStates:
    """Hidden states collected earlier (``collect_hidden_states``' output directory)."""
    return _describe_data(path)


def realign(model: ModelDir, data: HiddenStates, arch: ArchSpec, spec: HeadSpec, tools: LlamaCpp,
            out: Path) -> RealignResult:
    """Train ``model``'s head on ``data`` and write ``out``: ``model``'s trunk shards hard-linked, the new head
    as ``model-mtp.safetensors``, an index covering both. Raises TrunkMismatchError if ``data`` came from
    another trunk."""
    if not arch.head_trainable:
        raise UnsupportedArchitectureError(
            f"realign implements the dense Qwen3.5 draft-mtp head; {model.label} is {arch.family} "
            f"(architecture {arch.name}), whose head it cannot train",
            hint="use `head: {source: copy}` for this architecture")
    digest = trunk_digest(model, arch)
    if digest != data.trunk_digest:
        raise TrunkMismatchError(
            f"the hidden states in {data.path} were produced by another trunk than {model.label}'s "
            f"(trunk digest {data.trunk_digest[:16]}…, this model's {digest[:16]}…)",
            hint="collect the hidden states again from this model's own BF16 GGUF (collect_hidden_states)")
    head_names = sorted(arch.expected_head(model.config))
    missing = [n for n in head_names if n not in model.tensors]
    if missing:
        raise ModelError(f"{model.label} has no head to start from (missing {', '.join(missing[:3])}…)",
                         hint="inject a donor's head first; realign trains it further")
    meta = json.loads((data.path / DATA_FILE).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    # Named *.partial so that a run killed mid-training leaves nothing remove_stale_partials would keep.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.trainer-", suffix=".partial", dir=out.parent) as scratch:
        trainer_out = Path(scratch) / "out"
        job = {"model": str(model.path), "data": str(data.path), "out": str(trainer_out),
               "config": arch.text_config(model.config), "head_tensors": head_names,
               "sequences": meta["sequences"], **spec.model_dump(mode="json", include=TRAINER_KEYS)}
        job_path = Path(scratch) / "job.json"
        write_text_atomic(job_path, json.dumps(job))
        run_tool([str(tools.python), str(TRAINER), str(job_path)], timeout=spec.timeout_s)
        report = json.loads((trainer_out / "report.json").read_text())
        realigned = write_head_checkpoint(model, arch, trainer_out / "head.safetensors", out,
                                          generated_tokens=data.generated_tokens)
    machine = hardware()
    if report["device"] != "cpu":
        machine["gpu"] = report.get("device_name") or report["device"]
    return RealignResult(
        model=realigned, head_sha256=sha256_file(out / HEAD_SHARD),
        data_source=data.prompt_set, data_tokens=data.tokens, generated_tokens=data.generated_tokens,
        train_positions=report["train_positions"],
        heldout_positions=report["heldout_positions"], steps=report["steps"], best_step=report["best_step"],
        loss_curve=tuple(report["loss_curve"]), heldout_curve=tuple(report["heldout_curve"]),
        acceptance_before=report["acceptance_before"], acceptance_after=report["acceptance_after"],
        trunk_agreement=report["trunk_agreement"], seed=spec.seed,
        wall_seconds=report["seconds"], hardware={**machine, "device": report["device"], "threads": report["threads"],
                                                  "torch": report["torch"]},
        parameters=report["parameters"], spec=spec.model_dump(mode="json", include=TRAINER_KEYS))


def write_head_checkpoint(model: ModelDir, arch: ArchSpec, head: Path, out: Path, *,
                          generated_tokens: int) -> ModelDir:
    """``out`` (replaced whole, atomically): ``model``'s trunk shards hard-linked, ``head`` (a trained head's
    safetensors) as ``model-mtp.safetensors``, an index covering both. Raises ModelError if ``head`` does not hold
    exactly ``model``'s head tensors with their dtypes and shapes."""
    expected = {n: (model.tensors[n].dtype, tuple(model.tensors[n].shape)) for n in arch.expected_head(model.config)}
    tensors, _ = read_header(head)
    got = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))
        raise ModelError(f"{head} is not a head for {model.label}: it differs in {', '.join(n for n, _ in wrong[:3])}",
                         hint="train the head again on this model (the realign stage)")
    with atomic_path(out) as staging:
        staging.mkdir()
        for entry in model.path.iterdir():
            if entry.is_file() and entry.name not in (INDEX, HEAD_SHARD):
                link_or_copy(entry, staging / entry.name)
        link_or_copy(head, staging / HEAD_SHARD)
        weight_map = {n: s for n, s in model.weight_map.items() if not arch.is_head_tensor(n)}
        weight_map |= {n: HEAD_SHARD for n in expected}
        size = sum(t.end - t.begin for n, t in model.tensors.items() if not arch.is_head_tensor(n))
        size += sum(t.end - t.begin for t in tensors.values())
        index = {"metadata": {"total_size": size,
                              "mtpress_head": f"re-aligned on {generated_tokens} tokens of the trunk's output"},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_text_atomic(staging / INDEX, json.dumps(index, indent=2) + "\n")
    return ModelDir(out, f"{model.label}, head re-aligned", model.revision)


def _post(url: str, endpoint: str, payload: dict, timeout: float) -> Any:
    response = requests.post(f"{url}/{endpoint}", json=payload, timeout=timeout)
    response.raise_for_status()
    return response.json()


def _source_label(path: Path | None) -> str:
    return f"mtpress/{PROMPTS_RESOURCE}" if path is None else path.name  # never a path on the publisher's machine


def _describe_data(path: Path) -> HiddenStates:
    meta = json.loads((path / DATA_FILE).read_text())
    records = meta["sequences"]
    return HiddenStates(
        path=path, trunk_digest=meta["trunk_digest"], gguf_sha256=meta["gguf_sha256"], prompt_set=meta["prompt_set"],
        prompt_set_sha256=meta["prompt_set_sha256"], sequences=len(records),
        tokens=sum(r["length"] for r in records),
        generated_tokens=sum(r["length"] - r["prompt_tokens"] for r in records), hidden_size=meta["hidden_size"],
        chunks=tuple(sorted({r["chunk"] for r in records})))
