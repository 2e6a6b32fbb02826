"""Speed of one model file with and without draft-mtp, measured on llama-server.

One server per configuration (plain decoding, then draft-mtp at each draft length k) receives a
warm-up request and then every prompt of the prompt set, repeatedly, with greedy sampling, a fixed
seed and ``cache_prompt: false`` so each request processes its prompt afresh. The server's own
``timings`` give prompt-processing and generation tokens/s and the drafted/accepted counts.

A benchmark is a measurement, not a gate: this stage never fails a release for being slow. It
raises only when it cannot measure (a server that does not start, a response without timings).
It also records whether draft-mtp reproduced plain decoding's greedy tokens; smoke is the gate
for that, here it is reported.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mtpress.errors import ConfigError, ToolchainError
from mtpress.fsutil import sha256_file
from mtpress.manifest import hardware
from mtpress.schema import BenchSpec
from mtpress.stages.gguf_files import GgufFile, gguf_metadata
from mtpress.stages.smoke import SEED, greedy_request, server_args
from mtpress.toolchain import LlamaCpp, run_tool
from mtpress.toolchain.server import llama_server

PROMPTS_RESOURCE = "data/bench_prompts.jsonl"
SPREAD_METHOD = ("median, min/max and interquartile range (q1, q3: linear interpolation between order "
                 "statistics) over every prompt x repetition sample of the scope; warm-up requests excluded")
ALL_DOMAINS = "all"
DEMO_TAG = "mtpress-demo"  # general.tags of the generated demo models (their model card's tags)


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    domain: str
    prompt: str


@dataclass(frozen=True)
class Spread:
    """A sample's median and spread. ``iqr`` = ``q3 - q1``."""

    n: int
    median: float
    q1: float
    q3: float
    iqr: float
    min: float
    max: float


@dataclass(frozen=True)
class Sample:
    """One measured request (prompt x repetition) as llama-server's ``timings`` report it."""

    prompt_id: str
    domain: str
    repetition: int
    prompt_tokens: int
    prompt_per_second: float
    generated_tokens: int
    generation_per_second: float
    drafted: int
    accepted: int


@dataclass(frozen=True)
class Figures:
    """The summary of one configuration over one scope: a domain, or ``all`` prompts.

    ``acceptance`` is the pooled rate accepted / drafted over every verification step. At draft length
    k >= 2 that is not the per-position rate alpha: ``acceptance_per_position`` estimates alpha from it
    (``per_position_acceptance``). ``acceptance_bound`` is (1 - alpha^(k+1)) / (1 - alpha) for that
    estimate: the tokens each verification step would yield if each drafted position were accepted with
    probability alpha, a ceiling on the speedup that ignores what drafting and verifying cost.
    ``speedup`` is this configuration's median generation tokens/s over plain decoding's median in the
    same scope.
    """

    scope: str
    samples: int
    prompt_per_second: Spread
    generation_per_second: Spread
    drafted: int
    accepted: int
    acceptance: float | None
    acceptance_per_position: float | None
    speedup: float | None
    acceptance_bound: float | None


@dataclass(frozen=True)
class ConfigResult:
    """One server configuration: ``plain`` (draft_n_max 0) or ``mtp-k<N>`` (draft-mtp, draft length N)."""

    config: str
    draft_n_max: int
    overall: Figures
    by_domain: tuple[Figures, ...]
    matches_plain: bool | None  # every prompt and repetition gave plain decoding's greedy tokens; None for plain
    mismatched_prompts: tuple[str, ...]
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class BenchResult:
    model: str
    head: str | None
    quant: str
    layout: str
    size_label: str | None  # the GGUF's general.size_label, e.g. "9B" or "137M"
    llama_cpp: str
    hardware: dict[str, Any]
    prompt_set: str
    prompt_set_sha256: str
    prompts: int
    domains: tuple[str, ...]
    n_predict: int
    repetitions: int
    warmup: int
    seed: int
    spread: str
    configs: tuple[ConfigResult, ...]
    notes: tuple[str, ...]

    def table(self) -> list[dict[str, Any]]:
        """One row per configuration (all prompts), for a Prefect table artifact or the card."""
        return [{"file": self.model, "quant": self.quant, "config": c.config,
                 "tg tok/s (median)": round(c.overall.generation_per_second.median, 2),
                 "tg IQR": round(c.overall.generation_per_second.iqr, 2),
                 "pp tok/s (median)": round(c.overall.prompt_per_second.median, 2),
                 "pp IQR": round(c.overall.prompt_per_second.iqr, 2),
                 "drafted": c.overall.drafted, "accepted": c.overall.accepted,
                 "acceptance (pooled)": _round(c.overall.acceptance),
                 "alpha per position (est.)": _round(c.overall.acceptance_per_position),
                 "bound": _round(c.overall.acceptance_bound), "speedup": _round(c.overall.speedup),
                 "same tokens": c.matches_plain}
                for c in self.configs]


def acceptance_bound(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha), written as the sum 1 + alpha + ... + alpha^k so alpha = 1 gives k + 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate must lie in [0, 1], got {alpha}")
    if k < 0:
        raise ValueError(f"draft length must be >= 0, got {k}")
    return sum(alpha**i for i in range(k + 1))


def per_position_acceptance(pooled: float, k: int) -> float:
    """The per-position acceptance alpha whose pooled rate at draft length ``k`` is ``pooled``.

    llama.cpp counts drafted and accepted tokens over every verification step, and a step keeps the
    longest correct prefix of its k drafted tokens. If each position is accepted with probability alpha
    once the ones before it were, a step accepts alpha + alpha^2 + ... + alpha^k of its k tokens on
    average, so pooled = (alpha + ... + alpha^k) / k: alpha itself only at k = 1. That mean rises strictly
    from 0 to 1 as alpha does, so bisection inverts it. (It assumes every step drafts k tokens; llama-server
    reports the counts only as totals.)
    """
    if not 0.0 <= pooled <= 1.0:
        raise ValueError(f"a pooled acceptance rate must lie in [0, 1], got {pooled}")
    if k < 1:
        raise ValueError(f"draft length must be >= 1, got {k}")
    if k == 1 or pooled in (0.0, 1.0):
        return pooled
    low, high = 0.0, 1.0
    for _ in range(64):  # 2^-64: below a float's resolution on [0, 1]
        middle = (low + high) / 2
        if sum(middle**i for i in range(1, k + 1)) / k < pooled:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def summarize(values: Sequence[float]) -> Spread:
    """Median, quartiles (linear interpolation, as numpy's default), IQR, min and max."""
    if not values:
        raise ValueError("cannot summarize an empty sample")
    ordered = sorted(values)
    q1, q3 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
    return Spread(n=len(ordered), median=statistics.median(ordered), q1=q1, q3=q3, iqr=q3 - q1,
                  min=ordered[0], max=ordered[-1])


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def prompt_file(path: Path | None = None) -> Path:
    """``path``, or the prompt set shipped in ``mtpress/data``."""
    return path or Path(str(resources.files("mtpress").joinpath(PROMPTS_RESOURCE)))


def load_prompts(path: Path | None = None) -> tuple[BenchPrompt, ...]:
    """The prompt set (``path`` or the shipped one). Raises ConfigError naming every bad line."""
    source = prompt_file(path)
    problems: list[str] = []
    prompts: list[BenchPrompt] = []
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(str(source), [f"cannot read the prompt set: {e}"]) from e
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompts.append(BenchPrompt(id=str(record["id"]), domain=str(record["domain"]),
                                       prompt=str(record["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            problems.append(f"line {number}: expected a JSON object with id, domain and prompt ({e})")
    ids = [p.id for p in prompts]
    problems += [f"prompt id {i!r} appears more than once" for i in sorted({i for i in ids if ids.count(i) > 1})]
    problems += [f"prompt {p.id!r} is empty" for p in prompts if not p.prompt]
    if not prompts and not problems:
        problems.append("holds no prompts")
    if problems:
        raise ConfigError(str(source), problems)
    return tuple(prompts)


def first_per_domain(prompts: Sequence[BenchPrompt], limit: int | None) -> tuple[BenchPrompt, ...]:
    """The first ``limit`` prompts of each domain, in file order (all of them when ``limit`` is None)."""
    if limit is None:
        return tuple(prompts)
    taken: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        taken[prompt.domain] = taken.get(prompt.domain, 0) + 1
        if taken[prompt.domain] <= limit:
            kept.append(prompt)
    return tuple(kept)


def bench(model: GgufFile, head: GgufFile | None, spec: BenchSpec, tools: LlamaCpp) -> BenchResult:
    """Measure ``model`` (with its sidecar ``head``, if any) plain and with draft-mtp at each draft length."""

    prompts = first_per_domain(load_prompts(spec.prompts), spec.per_domain)
    requests = [(prompt, greedy_request(prompt.prompt, spec.n_predict)) for prompt in prompts]
    threads = spec.threads or os.cpu_count() or 2
    metadata = gguf_metadata(model.path, ("general.size_label", "general.tags"))
    has_head = head is not None or model.nextn_layers > 0
    draft_lengths = spec.draft_lengths if has_head else ()

    load_before = os.getloadavg()[0]
    plain_samples, plain_tokens = _run_config(tools, server_args(model, head, mtp=False, draft_n_max=0),
                                              requests, spec, threads)
    plain_generation = _generation_medians(plain_samples)
    configs = [_config_result("plain", 0, plain_samples, plain_generation, matches=None, mismatched=())]
    for k in draft_lengths:
        samples, tokens = _run_config(tools, server_args(model, head, mtp=True, draft_n_max=k), requests, spec,
                                      threads)
        mismatched = greedy_mismatches(plain_tokens, tokens)
        configs.append(_config_result(f"mtp-k{k}", k, samples, plain_generation, matches=not mismatched,
                                      mismatched=mismatched))

    load = (round(load_before, 2), round(os.getloadavg()[0], 2))
    devices = _gpu_devices(tools)
    return BenchResult(
        model=model.name, head=head.name if head else None, quant=model.quant, layout=model.layout,
        size_label=metadata.get("general.size_label"), llama_cpp=tools.version,
        hardware={**hardware(), "gpu": ", ".join(devices) or None, "threads": threads,
                  "offload": f"llama-server default onto {', '.join(devices)}" if devices else "none (CPU)",
                  "load_average_1m": load},
        # A prompt set of the publisher's own is named, not located: its path is private.
        prompt_set=f"mtpress/{PROMPTS_RESOURCE}" if spec.prompts is None else spec.prompts.name,
        prompt_set_sha256=sha256_file(prompt_file(spec.prompts)), prompts=len(prompts),
        domains=tuple(dict.fromkeys(p.domain for p in prompts)), n_predict=spec.n_predict,
        repetitions=spec.repetitions, warmup=spec.warmup, seed=SEED, spread=SPREAD_METHOD,
        configs=tuple(configs),
        notes=_notes(devices, DEMO_TAG in metadata.get("general.tags", ()), has_head, threads, load_before))


def _run_config(tools: LlamaCpp, args: list[str], requests: Sequence[tuple[BenchPrompt, dict[str, Any]]],
                spec: BenchSpec, threads: int) -> tuple[list[Sample], dict[str, list[tuple[int, ...]]]]:
    """All prompts x repetitions against one server; returns the samples and each prompt's tokens per repetition.

    Repetitions are the outer loop so slow drift on a shared machine spreads over all prompts alike.
    """
    samples: list[Sample] = []
    tokens: dict[str, list[tuple[int, ...]]] = {prompt.id: [] for prompt, _ in requests}
    with llama_server(tools, args, timeout=spec.timeout_s, threads=threads) as server:
        for _ in range(spec.warmup):
            server.completion(requests[0][1], timeout=spec.timeout_s)
        for repetition in range(spec.repetitions):
            for prompt, payload in requests:
                body = server.completion(payload, timeout=spec.timeout_s)
                samples.append(parse_sample(body, prompt, repetition))
                tokens[prompt.id].append(tuple(body.get("tokens") or ()))
    return samples, tokens


def greedy_mismatches(plain: dict[str, list[tuple[int, ...]]], runs: dict[str, list[tuple[int, ...]]]
                      ) -> tuple[str, ...]:
    """The prompts where any repetition's tokens differ from plain decoding's first repetition."""
    return tuple(sorted(prompt_id for prompt_id, repetitions in runs.items()
                        if any(tokens != plain[prompt_id][0] for tokens in repetitions)))


def parse_sample(body: dict[str, Any], prompt: BenchPrompt, repetition: int) -> Sample:
    """One ``/completion`` response's timings. llama-server omits ``draft_n`` when nothing was drafted."""
    timings = body.get("timings")
    try:
        return Sample(prompt_id=prompt.id, domain=prompt.domain, repetition=repetition,
                      prompt_tokens=int(timings["prompt_n"]), prompt_per_second=float(timings["prompt_per_second"]),
                      generated_tokens=int(timings["predicted_n"]),
                      generation_per_second=float(timings["predicted_per_second"]),
                      drafted=int(timings.get("draft_n", 0)), accepted=int(timings.get("draft_n_accepted", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ToolchainError(f"llama-server answered prompt {prompt.id!r} without usable timings ({e!r}): "
                             f"{json.dumps(timings)[:300]}",
                             hint="the bench needs llama-server's /completion timings; check the llama.cpp build"
                             ) from e


def _generation_medians(samples: Sequence[Sample]) -> dict[str, float]:
    """Plain decoding's median generation tokens/s per scope: the denominators of every speedup."""
    return {scope: summarize([s.generation_per_second for s in group]).median
            for scope, group in _scopes(samples)}


def _scopes(samples: Sequence[Sample]) -> Iterable[tuple[str, list[Sample]]]:
    yield ALL_DOMAINS, list(samples)
    for domain in dict.fromkeys(s.domain for s in samples):
        yield domain, [s for s in samples if s.domain == domain]


def _config_result(config: str, k: int, samples: Sequence[Sample], plain_generation: dict[str, float], *,
                   matches: bool | None, mismatched: tuple[str, ...]) -> ConfigResult:
    figures = [figures_for(scope, group, k, plain_generation.get(scope)) for scope, group in _scopes(samples)]
    return ConfigResult(config=config, draft_n_max=k, overall=figures[0], by_domain=tuple(figures[1:]),
                        matches_plain=matches, mismatched_prompts=mismatched, samples=tuple(samples))


def figures_for(scope: str, samples: Sequence[Sample], k: int, plain_generation_median: float | None) -> Figures:
    """Summarize one scope; acceptance pools the counts (total accepted / total drafted), not per-request
    rates, and the bound takes the per-position rate estimated from that pool."""
    generation = summarize([s.generation_per_second for s in samples])
    drafted = sum(s.drafted for s in samples)
    accepted = sum(s.accepted for s in samples)
    pooled = accepted / drafted if k and drafted else None
    alpha = per_position_acceptance(pooled, k) if pooled is not None else None
    speedup = generation.median / plain_generation_median if k and plain_generation_median else None
    return Figures(scope=scope, samples=len(samples),
                   prompt_per_second=summarize([s.prompt_per_second for s in samples]),
                   generation_per_second=generation, drafted=drafted, accepted=accepted, acceptance=pooled,
                   acceptance_per_position=alpha, speedup=speedup,
                   acceptance_bound=acceptance_bound(alpha, k) if alpha is not None else None)


def _gpu_devices(tools: LlamaCpp) -> list[str]:
    """The accelerators this llama.cpp build can use; the pinned CPU build lists ``(none)``."""
    output = run_tool([tools.tool("llama-server"), "--list-devices"], timeout=60)
    lines = output.split("Available devices:", 1)[-1].splitlines()
    return [line.strip() for line in lines if line.strip() and line.strip() != "(none)"]


def _notes(devices: Sequence[str], demo_model: bool, has_head: bool, threads: int, load_before: float
           ) -> tuple[str, ...]:
    notes = []
    cores = os.cpu_count() or 1
    # The load before our server starts is other work; with our threads on top it oversubscribes the cores.
    if load_before + threads > cores + 0.5:
        notes.append(f"The machine was busy (1-minute load average {load_before:.1f} before measuring, {threads} "
                     f"threads on {cores} cores): other processes competed for the CPU, which widens the spread "
                     "and lowers the medians.")
    if not devices:
        notes.append(f"Measured on CPU only ({threads} threads, no offload). On CPU, verifying k drafted tokens "
                     "costs nearly k decoding steps for quantized weights, so draft-mtp can be slower than plain "
                     "decoding here; speedups need a memory-bound setting (a large model, a GPU).")
    if demo_model:
        notes.append(f"The model is tagged {DEMO_TAG}: a tiny synthetic checkpoint. These figures are real "
                     "measurements of a toy and say nothing about a real model's speed or acceptance.")
    if not has_head:
        notes.append("The file has no MTP head (no nextn layers, no sidecar): only plain decoding was measured.")
    return tuple(notes)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
