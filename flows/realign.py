"""Which MTP head the release publishes: the donor's copy, one re-aligned on the fine-tune, or the better one.

Runs between inject and convert when the config's ``head.source`` is ``realign`` or ``best``:

1. the injected checkpoint (donor's head) is converted to the sidecar layout (BF16 trunk + head) in the
   work folder, and the bench measures that copied head;
2. llama-server collects the trunk's hidden states on the realign prompt set (``collect``);
3. the head is trained (``realign``; tagged ``gpu``, see docs/deploy.md for GPU routing) and its checkpoint
   converted as the release's own sidecar conversion would be;
4. the bench measures the re-aligned head as it measured the copy: the release's bench settings, the same
   BF16 trunk file and prompts; ``best`` keeps the head llama.cpp accepted more drafts of, ``realign`` the
   re-aligned one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from flows.cache import StageCache, cache_key
from flows.stage_keys import convert_key
from mtpress.archs.base import ArchSpec
from mtpress.concurrency import occupy
from mtpress.errors import ModelError
from mtpress.fsutil import dir_digest, sha256_file
from mtpress.schema import ReleaseConfig
from mtpress.stages import bench, convert, realign
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.inject import InjectResult
from mtpress.toolchain import LlamaCpp

collect_task = task(realign.collect_hidden_states, name="collect-hidden-states")
# The one stage that wants an accelerator: a work pool with GPUs can pick it by this tag.
realign_task = task(realign.realign, name="realign", tags=["gpu"])
convert_task = task(convert.convert, name="convert")
bench_task = task(bench.bench, name="bench")


@dataclass(frozen=True)
class HeadMeasurement:
    """One head on the BF16 trunk, by llama.cpp's draft counts over every draft length and prompt."""

    head_file: str
    head_sha256: str
    drafted: int
    accepted: int
    acceptance: float | None
    by_draft_length: dict[str, float | None]  # "k1": alpha, …
    per_repetition: tuple[float, ...]  # alpha of each repetition (all draft lengths and prompts pooled)


@dataclass(frozen=True)
class HeadChoice:
    source: str  # the config's head.source
    published: str  # "copied" or "re-aligned"
    description: str  # what the card says about the head
    copied: HeadMeasurement
    realigned: HeadMeasurement
    beyond_spread: bool  # every repetition of the winner beat every repetition of the other
    training: realign.RealignResult
    data: realign.HiddenStates


def choose_head(cfg: ReleaseConfig, injected: InjectResult, arch: ArchSpec, tools: LlamaCpp, cache: StageCache,
                release_dir: Path, work: Path) -> tuple[InjectResult, HeadChoice]:
    """The inject result the release continues with (its model carries the chosen head) and the record of why."""
    log = get_run_logger()
    spec = cfg.head
    if injected.action == "no-head":
        raise ModelError(f"head.source: {spec.source} re-aligns a head, and {injected.model.label} has none",
                         hint="set `donor:` to the fine-tune's base model; its head is the starting point")
    out_dir = release_dir if cfg.layouts[0] == "sidecar" else release_dir / "sidecar" if "sidecar" in cfg.layouts \
        else work / "sidecar"

    # The copy's files go to the work folder (under a key of their own): in the release folder the re-aligned
    # conversion would replace them, and every rerun would convert both again.
    trunk, copied_head = cache.run("convert", cache_key(dir_digest(injected.model.path), "sidecar", "copied head",
                                                        cfg.name, tools.version),
                                   convert_task, injected.model, arch, "sidecar", name=cfg.name, tools=tools,
                                   out_dir=work / "copied-head")
    copied = _measure(cfg, cache, tools, trunk, copied_head)
    collect_key = cache_key(trunk.sha256, realign.trunk_digest(injected.model, arch),
                            sha256_file(realign.prompt_file(spec.prompts)),
                            spec.model_dump(mode="json", include=COLLECT_KEYS), tools.version)
    data = cache.run("collect", collect_key, collect_task, injected.model, trunk, arch, spec, tools,
                     work / "realign-data" / collect_key)
    log.info("realign: %d sequences, %d tokens (%d generated) of %s's hidden states", data.sequences, data.tokens,
             data.generated_tokens, trunk.name)
    train_key = cache_key(dir_digest(injected.model.path), collect_key, spec.model_dump(mode="json",
                          include=realign.TRAINER_KEYS), sha256_file(realign.TRAINER))
    training = cache.run("realign", train_key, realign_task, injected.model, data, arch, spec, tools,
                         work / "realigned")
    log.info("realign: held-out acceptance (trainer, draft length 1) %.3f → %.3f after %d steps, %.0f s",
             training.acceptance_before, training.acceptance_after, training.steps, training.wall_seconds)
    # Where and under the key the release's own sidecar conversion uses, so the release reuses it.
    _, realigned_head = cache.run("convert", convert_key(dir_digest(training.model.path), "sidecar", cfg,
                                                                       tools),
                                                convert_task, training.model, arch, "sidecar", name=cfg.name,
                                                tools=tools, out_dir=out_dir)

    # On the copy's trunk file: the two conversions hold the same trunk tensors but not the same bytes (the
    # converter names the model after its folder), and the comparison must differ in the head alone.
    realigned = _measure(cfg, cache, tools, trunk, realigned_head)
    better = (realigned.acceptance or 0.0) > (copied.acceptance or 0.0)
    published = "re-aligned" if spec.source == "realign" or better else "copied"
    winner, other = (realigned, copied) if published == "re-aligned" else (copied, realigned)
    beyond = min(winner.per_repetition, default=0.0) > max(other.per_repetition, default=0.0)
    donor = injected.head.donor if injected.head else "the donor"
    description = (f"re-aligned on {data.tokens} tokens of the fine-tune's own output" if published == "re-aligned"
                   else f"copied from {donor}")
    log.info("head: copied α=%s, re-aligned α=%s (llama.cpp draft counts, BF16); publishing the %s head",
             _fmt(copied.acceptance), _fmt(realigned.acceptance), published)
    choice = HeadChoice(spec.source, published, description, copied, realigned, beyond, training, data)
    return (replace(injected, model=training.model) if published == "re-aligned" else injected), choice


COLLECT_KEYS = {"prompts", "per_domain", "n_predict", "seed"}


def _measure(cfg: ReleaseConfig, cache: StageCache, tools: LlamaCpp, trunk: GgufFile, head: GgufFile
             ) -> HeadMeasurement:
    key = cache_key(trunk.sha256, head.sha256, cfg.bench.model_dump(mode="json"), tools.version)
    result = cache.run("bench", key, _bench_occupying, trunk, head, cfg.bench, tools)
    mtp = [c for c in result.configs if c.draft_n_max > 0]
    drafted = sum(c.overall.drafted for c in mtp)
    accepted = sum(c.overall.accepted for c in mtp)
    per_repetition = []
    for repetition in range(result.repetitions):
        samples = [s for c in mtp for s in c.samples if s.repetition == repetition]
        rep_drafted = sum(s.drafted for s in samples)
        per_repetition.append(sum(s.accepted for s in samples) / rep_drafted if rep_drafted else 0.0)
    return HeadMeasurement(head_file=head.name, head_sha256=head.sha256, drafted=drafted, accepted=accepted,
                           acceptance=accepted / drafted if drafted else None,
                           by_draft_length={f"k{c.draft_n_max}": c.overall.acceptance for c in mtp},
                           per_repetition=tuple(per_repetition))


def _bench_occupying(trunk: GgufFile, head: GgufFile, spec: bench.BenchSpec, tools: LlamaCpp) -> Any:
    with occupy("bench-gpu"):
        return bench_task(trunk, head, spec, tools)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
