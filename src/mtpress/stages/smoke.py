"""Load every produced file in llama.cpp and prove the head drafts without changing greedy output.

For each model file: generate greedily without MTP, then with ``--spec-type draft-mtp``; the token
sequences must be identical (the target verifies every draft) and drafts must have been proposed.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtpress.errors import QualityGateError
from mtpress.schema import SmokeSpec
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp
from mtpress.toolchain.server import llama_server

SEED = 42


@dataclass(frozen=True)
class Generation:
    tokens: tuple[int, ...]
    text: str
    drafted: int
    accepted: int
    predicted_per_second: float


@dataclass(frozen=True)
class SmokeResult:
    model: str
    head: str | None
    quant: str
    layout: str
    n_predict: int
    draft_n_max: int
    tokens_identical: bool
    tokens: tuple[int, ...]  # the greedy output, so any later client (the -hf gate) can be compared with it
    drafted: int
    accepted: int
    acceptance: float | None
    tokens_per_second_plain: float
    tokens_per_second_mtp: float
    passed: bool


def greedy_request(prompt: str, n_predict: int) -> dict:
    """A deterministic completion request. ``samplers: [top_k]`` skips the default chain, which over
    a 248k vocabulary costs more than the model itself on a tiny checkpoint."""
    return {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
            "seed": SEED, "return_tokens": True, "cache_prompt": False, "ignore_eos": True}


def generate(tools: LlamaCpp, server_args: list[str], spec: SmokeSpec) -> Generation:
    with llama_server(tools, server_args, timeout=spec.timeout_s) as server:
        body = server.completion(greedy_request(spec.prompt, spec.n_predict), timeout=spec.timeout_s)
    timings = body.get("timings", {})
    return Generation(tuple(body.get("tokens") or ()), body.get("content", ""), int(timings.get("draft_n", 0)),
                      int(timings.get("draft_n_accepted", 0)), float(timings.get("predicted_per_second", 0.0)))


def server_args(model: GgufFile, head: GgufFile | None, *, mtp: bool, draft_n_max: int) -> list[str]:
    args = ["-m", str(model.path), "-c", "2048"]
    if mtp:
        if head is not None:
            args += ["-md", str(head.path)]
        args += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(draft_n_max)]
    return args


def smoke(model: GgufFile, head: GgufFile | None, spec: SmokeSpec, tools: LlamaCpp) -> SmokeResult:
    """Raise QualityGateError naming the file if output differs, is empty, or nothing was drafted."""
    plain = generate(tools, server_args(model, head, mtp=False, draft_n_max=spec.draft_n_max), spec)
    with_mtp = generate(tools, server_args(model, head, mtp=True, draft_n_max=spec.draft_n_max), spec)
    identical = plain.tokens == with_mtp.tokens
    result = SmokeResult(
        model=model.name, head=head.name if head else None, quant=model.quant, layout=model.layout,
        n_predict=spec.n_predict, draft_n_max=spec.draft_n_max, tokens_identical=identical, tokens=plain.tokens,
        drafted=with_mtp.drafted, accepted=with_mtp.accepted,
        acceptance=with_mtp.accepted / with_mtp.drafted if with_mtp.drafted else None,
        tokens_per_second_plain=plain.predicted_per_second, tokens_per_second_mtp=with_mtp.predicted_per_second,
        passed=identical and with_mtp.drafted > 0 and len(plain.tokens) == spec.n_predict)
    if len(plain.tokens) != spec.n_predict:
        raise QualityGateError(f"smoke {model.name}: generated {len(plain.tokens)} tokens, asked for {spec.n_predict}")
    if not identical:
        first = next(i for i, (a, b) in enumerate(zip(plain.tokens + (None,), with_mtp.tokens + (None,))) if a != b)
        raise QualityGateError(f"smoke {model.name}: greedy output with draft-mtp differs from plain decoding at "
                               f"token {first}", hint="the head or the runtime is broken; do not publish this quant")
    if with_mtp.drafted == 0:
        raise QualityGateError(f"smoke {model.name}: draft-mtp proposed no drafts",
                               hint="the MTP head was not loaded; check the file carries it (nextn layers)")
    return result
