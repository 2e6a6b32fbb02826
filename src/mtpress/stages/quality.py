"""Perplexity and KL-divergence of every quant against the BF16 file, with llama-perplexity.

The BF16 model runs once over the calibration text with ``--kl-divergence-base FILE``, which
records its perplexity and writes its log-probabilities; each quant then runs with
``--kl-divergence`` against that file. The file is large (about ctx/2 x vocabulary x 2 bytes per
chunk: ~500 MB for 16 chunks of 128 tokens at Qwen3.5's 248k vocabulary), so it lives in
``work_dir`` only for the duration of the stage.

``run_on_text`` also runs llama-imatrix (stages/imatrix.py), which fails the same way on a short text.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mtpress.errors import ConfigError, ToolchainError
from mtpress.fsutil import sha256_file
from mtpress.schema import MIN_SCORED_TOKENS, QualitySpec, fewest_chunks, scored_per_chunk
from mtpress.stages.bench import DEMO_TAG, gguf_metadata
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp, run_tool

CALIBRATION_RESOURCE = "data/calibration.txt"
@dataclass(frozen=True)
class Estimate:
    """A figure as llama-perplexity prints it: value, its ± uncertainty (None where it prints none), unit."""

    value: float
    error: float | None = None
    unit: str = ""


@dataclass(frozen=True)
class QuantQuality:
    """One quant against BF16. ``statistics`` holds every line of llama-perplexity's summary, by label."""

    model: str
    quant: str
    layout: str
    ppl: Estimate  # Mean PPL(Q)
    ppl_ratio: Estimate  # Mean PPL(Q)/PPL(base)
    kld_mean: Estimate
    kld_median: float
    kld_p99: float
    kld_max: float
    same_top_p: Estimate  # % of tokens where the quant's top token is BF16's
    rms_delta_p: Estimate  # RMS of the change in the correct token's probability, %
    chunks: int
    statistics: dict[str, Estimate]


@dataclass(frozen=True)
class QualityResult:
    base_model: str
    base_ppl: Estimate  # BF16's own perplexity, from its full-precision logits
    calibration: str
    calibration_sha256: str
    ctx_size: int
    chunks: int
    tokens_scored: int  # llama-perplexity scores the second half of each chunk
    base_logits_bytes: int
    llama_cpp: str
    quants: tuple[QuantQuality, ...]
    notes: tuple[str, ...]

    def table(self) -> list[dict[str, Any]]:
        """One row per file, BF16 first, for a Prefect table artifact and the manifest.

        The ratio is the quant's PPL over BF16's PPL as this table shows them. llama-perplexity's own
        ``Mean PPL(Q)/PPL(base)`` (``ppl_ratio``) divides by BF16's perplexity recomputed from its 16-bit copy of
        the log-probabilities, so it need not agree with the two PPLs beside it; it stays in the details.
        """
        rows = [{"file": self.base_model, "quant": "BF16", "PPL": _fmt(self.base_ppl), "PPL / BF16 PPL": "1",
                 "mean KLD": "0", "median KLD": "0", "99% KLD": "0", "same top p %": "100"}]
        return rows + [{"file": q.model, "quant": q.quant, "PPL": _fmt(q.ppl),
                        "PPL / BF16 PPL": f"{q.ppl.value / self.base_ppl.value:.6g}",
                        "mean KLD": _fmt(q.kld_mean), "median KLD": f"{q.kld_median:.6f}",
                        "99% KLD": f"{q.kld_p99:.6f}", "same top p %": _fmt(q.same_top_p)}
                       for q in self.quants]


def shipped_or_own(own: Path | None, resource: str) -> tuple[Path, str]:
    """The text a config names, else the one mtpress ships as ``resource``; and how records name it: a publisher's
    own by its file name alone (its path is private), the shipped one as ``mtpress/<resource>``."""
    if own is not None:
        return own, own.name
    return Path(str(resources.files("mtpress").joinpath(resource))), f"mtpress/{resource}"


def calibration_file(spec: QualitySpec) -> Path:
    return shipped_or_own(spec.calibration, CALIBRATION_RESOURCE)[0]


@dataclass(frozen=True)
class KldBase:
    """BF16's run over the calibration text: its perplexity, and the log-probabilities each quant is compared with
    (``logits``, deleted by ``summarise``)."""

    model: str
    logits: Path
    ppl: Estimate
    chunks: int
    logits_bytes: int
    demo: bool  # the model is tagged DEMO_TAG


def quality(bf16: GgufFile, quants: list[GgufFile], spec: QualitySpec, tools: LlamaCpp,
            work_dir: Path) -> QualityResult:
    """Measure each model file in ``quants`` against ``bf16``; the base-logits file is deleted afterwards."""
    _check_models([bf16, *quants])
    base = kld_base(bf16, spec, tools, work_dir)
    try:
        results = [kld(q, base, spec, tools) for q in quants]
    finally:
        base.logits.unlink(missing_ok=True)
    return summarise(base, results, spec, tools)


def base_logits_bytes(spec: QualitySpec, vocab_size: int) -> int:
    """The most ``kld_base``'s file can hold: llama-perplexity's ``--kl-divergence-base`` writes a 20-byte header,
    each chunk's tokens (int32) and, for each scored token, its log-probabilities as uint16 over the vocabulary
    rounded up to even plus 4 (tools/perplexity/perplexity.cpp) — 0.5 GB at Qwen3.5's 248320 and the defaults."""
    per_token = 2 * (2 * ((vocab_size + 1) // 2) + 4)
    return 20 + spec.chunks * (4 * spec.ctx_size + scored_per_chunk(spec.ctx_size) * per_token)


def kld_base(bf16: GgufFile, spec: QualitySpec, tools: LlamaCpp, work_dir: Path) -> KldBase:
    """BF16's perplexity and its log-probabilities, in ``work_dir`` until ``summarise`` (or the end of ``quality``)
    deletes them: a bounded-disk run measures each quant as it is made, and keeps only this file."""
    _check_models([bf16])
    calibration = calibration_file(spec)
    work_dir.mkdir(parents=True, exist_ok=True)
    logits = work_dir / f"{bf16.path.stem}.kld-base.partial"  # a killed run's copy is removed by the rerun
    try:
        output = run_on_text([tools.tool("llama-perplexity"), "-m", bf16.path, "-f", calibration, "--chunks",
                              str(spec.chunks), "--kl-divergence-base", logits, *_window(spec)],
                             **_on_text(spec, calibration))
        ppl, chunks = parse_base_run(output)
        _check_enough_text(chunks, spec, calibration)
    except BaseException:
        logits.unlink(missing_ok=True)
        raise
    demo = DEMO_TAG in gguf_metadata(bf16.path, ("general.tags",)).get("general.tags", ())
    return KldBase(bf16.name, logits, ppl, chunks, logits.stat().st_size, demo)


def kld(quant: GgufFile, base: KldBase, spec: QualitySpec, tools: LlamaCpp) -> QuantQuality:
    """One model file's perplexity and KL-divergence against BF16's log-probabilities."""
    _check_models([quant])
    output = run_on_text([tools.tool("llama-perplexity"), "-m", quant.path, "--kl-divergence-base", base.logits,
                          "--kl-divergence", *_window(spec)], **_on_text(spec, calibration_file(spec)))
    return parse_kl_run(output, quant)


def summarise(base: KldBase, quants: list[QuantQuality], spec: QualitySpec, tools: LlamaCpp) -> QualityResult:
    """The quality stage's result from the base run and each quant's; deletes the base's log-probabilities."""
    base.logits.unlink(missing_ok=True)
    calibration, calibration_name = shipped_or_own(spec.calibration, CALIBRATION_RESOURCE)
    notes = ["KL-divergence compares each quant's token distributions with BF16's over the second half of each "
             f"{spec.ctx_size}-token chunk ({base.chunks} chunks). llama-perplexity stores BF16's log-probabilities "
             "in 16 bits, floored at 16 nats below the top token's: statistics printed as PPL(base) come from that "
             "copy, while base_ppl is BF16's own."]
    if base.demo:
        notes.append(f"The model is tagged {DEMO_TAG}: a tiny synthetic checkpoint whose perplexity on real text is "
                     "astronomically high; these figures exercise the pipeline and mean nothing for a real model.")
    return QualityResult(base_model=base.model, base_ppl=base.ppl, calibration=calibration_name,
                         calibration_sha256=sha256_file(calibration), ctx_size=spec.ctx_size, chunks=base.chunks,
                         tokens_scored=base.chunks * scored_per_chunk(spec.ctx_size),
                         base_logits_bytes=base.logits_bytes, llama_cpp=tools.version, quants=tuple(quants),
                         notes=tuple(notes))


def _check_models(files: list[GgufFile]) -> None:
    if heads := [f.name for f in files if f.role == "head"]:
        raise ValueError(f"quality compares model files, not MTP heads: {', '.join(heads)}")


def _window(spec: QualitySpec) -> list[str]:
    # One sequence per batch (-b = -c): the default batch of 2048 would hold 16 sequences of logits at once,
    # 2 GB at a 248k vocabulary.
    return ["-c", str(spec.ctx_size), "-b", str(spec.ctx_size), "-t", str(spec.threads or os.cpu_count() or 2)]


def _on_text(spec: QualitySpec, calibration: Path) -> dict[str, Any]:
    return {"timeout": spec.timeout_s, "text": calibration, "ctx_key": "quality.ctx_size"}


def _check_enough_text(chunks: int, spec: QualitySpec, calibration: Path) -> None:
    """The schema guarantees enough chunks are asked for; a short text yields fewer (tokens // ctx_size), and
    below MIN_SCORED_TOKENS every quant's run would end without statistics. Said before any quant runs."""
    if chunks < fewest_chunks(spec.ctx_size):
        raise ConfigError(str(calibration), [
            f"too short for quality.ctx_size {spec.ctx_size}: it fills only {chunks} chunk(s) of {spec.ctx_size} "
            f"tokens ({chunks * scored_per_chunk(spec.ctx_size)} scored tokens), and llama-perplexity summarises "
            f"KL-divergence only from {MIN_SCORED_TOKENS} scored tokens ({fewest_chunks(spec.ctx_size)} chunks)"],
            hint="use a longer calibration text, or raise quality.ctx_size")


def run_on_text(argv: list[Any], *, timeout: float, text: Path, ctx_key: str, cwd: Path | None = None) -> str:
    """A llama.cpp tool over a text; a text too short for one context window is the config's error, said so."""
    output = run_tool(argv, timeout=timeout, cwd=cwd)
    if match := re.search(r"you need at least (\d+) tokens", output):
        raise ConfigError(str(text), [f"too short for {ctx_key}: llama.cpp needs at least {match.group(1)} tokens"],
                          hint=f"lower {ctx_key} or use a longer text")
    return output


# PARSING llama-perplexity's output (tools/perplexity/perplexity.cpp)

BASE_PPL = re.compile(r"Final estimate: PPL = ([-\d.eE+]+|nan|inf) \+/- ([-\d.eE+]+|nan|inf)")
CHUNKS = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)")
STATISTICS_START = "====== Perplexity statistics ======"
NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"
# "Mean    KLD:   1.543355 ±   0.145239", "99.9%   KLD:  14.184122", "Same top p: 61.310 ± 2.172 %",
# "Cor(ln(PPL(Q)), ln(PPL(base))):  59.72%"; labels end at the last ':' of the line.
STATISTIC = re.compile(rf"^(?P<label>.+?)\s*:\s*(?P<value>{NUMBER})\s*(?P<unit>%?)"
                       rf"(?:\s*±\s*(?P<error>{NUMBER})\s*(?P<error_unit>%?))?\s*$")


def parse_base_run(output: str) -> tuple[Estimate, int]:
    """BF16's perplexity (``Final estimate: PPL = X +/- Y``) and the number of chunks it covered."""
    ppl = BASE_PPL.search(output)
    chunks = CHUNKS.search(output)
    if not ppl or not chunks:
        raise ToolchainError("llama-perplexity printed no final perplexity estimate for the BF16 model; output "
                             f"tail:\n{output[-1500:]}")
    return Estimate(float(ppl.group(1)), float(ppl.group(2))), int(chunks.group(1))


def parse_statistics(output: str) -> dict[str, Estimate]:
    """Every ``label: value [± error] [%]`` line from the statistics sections, labels with spaces collapsed."""
    start = output.find(STATISTICS_START)
    if start < 0:
        return {}
    statistics: dict[str, Estimate] = {}
    for line in output[start:].splitlines():
        if match := STATISTIC.match(line.strip()):
            label = " ".join(match["label"].split())
            unit = match["unit"] or match["error_unit"] or ""
            statistics[label] = Estimate(float(match["value"]),
                                         float(match["error"]) if match["error"] is not None else None, unit)
    return statistics


def parse_kl_run(output: str, quant: GgufFile) -> QuantQuality:
    statistics = parse_statistics(output)
    chunks = CHUNKS.search(output)
    wanted = ("Mean PPL(Q)", "Mean PPL(Q)/PPL(base)", "Mean KLD", "Median KLD", "99.0% KLD", "Maximum KLD",
              "Same top p", "RMS Δp")
    missing = [label for label in wanted if label not in statistics]
    if missing or not chunks:
        raise ToolchainError(f"llama-perplexity --kl-divergence on {quant.name} printed no "
                             f"{', '.join(missing) or 'chunk count'}; output tail:\n{output[-1500:]}")
    return QuantQuality(model=quant.name, quant=quant.quant, layout=quant.layout, ppl=statistics["Mean PPL(Q)"],
                        ppl_ratio=statistics["Mean PPL(Q)/PPL(base)"], kld_mean=statistics["Mean KLD"],
                        kld_median=statistics["Median KLD"].value, kld_p99=statistics["99.0% KLD"].value,
                        kld_max=statistics["Maximum KLD"].value, same_top_p=statistics["Same top p"],
                        rms_delta_p=statistics["RMS Δp"], chunks=int(chunks.group(1)), statistics=statistics)


def _fmt(estimate: Estimate) -> str:
    error = f" ± {estimate.error:.4g}" if estimate.error is not None else ""
    return f"{estimate.value:.6g}{error}"
