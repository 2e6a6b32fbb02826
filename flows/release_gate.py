"""Stage and verify: the release goes to a private staging repo first, and the real clients must get
exactly what was tested from that commit before the publish flow promotes it to the target.

The staged commit carries the release as built (manifest and cards without a gate section). The gate's
results are then added to the manifest and both cards, which is the only difference between the staged
commit and what reaches the target: every GGUF is byte-identical, and the gate section lists the
staged commit and the sha256 of each file it verified, so the claim can be checked against the target.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.retries import retry_if_transient
from mtpress.cache import StageCache, cache_key
from mtpress.manifest import jsonable, read_manifest, write_manifest
from mtpress.schema import ReleaseConfig
from mtpress.stages.card import render_card, write_card
from mtpress.stages.gate import GateResult, choose_pairings, gate, pairings_from_manifest
from mtpress.stages.publish import publish as publish_stage
from mtpress.stages.publish import stored_elsewhere
from mtpress.toolchain import LlamaCpp

stage_task = task(publish_stage, name="stage", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60],
                  retry_condition_fn=retry_if_transient)
gate_task = task(gate, name="gate", cache_policy=NO_CACHE)


def stage_and_verify(release_dir: Path, cfg: ReleaseConfig, tools: LlamaCpp, api: HfApi, cache: StageCache,
                     work: Path, artifact_key: str) -> GateResult:
    """Commit the release to the staging repo, run the gate on that commit, record the results in the
    manifest and cards. Raises GateError (nothing promoted) when a client gets something else."""
    log = get_run_logger()
    staging = cfg.target.staging
    staged = stage_task(release_dir, staging, api, message=f"mtpress: stage {cfg.name} (llama.cpp b{tools.version})",
                        elsewhere=stored_elsewhere(release_dir))
    log.info("staged %s at commit %s (%s)", staged.repo, staged.commit,
             "new commit" if staged.committed else "unchanged")
    manifest = read_manifest(release_dir)
    # -hf for the recommended quant, the smallest and gate.tags; every file's sha256 from the Hub's metadata.
    pairings = choose_pairings(pairings_from_manifest(manifest), {f.path: f.size for f in manifest.files},
                               cfg.gate.tags)
    sha256 = manifest.sha256_by_path()
    # A commit never changes: the same commit checked by the same llama.cpp with the same settings gives
    # the same result, so a rerun reuses it and the manifest, and the target, stay as they are.
    key = cache_key(staged.repo, staged.commit, pairings, sha256, cfg.smoke.model_dump(mode="json"),
                    cfg.gate.model_dump(mode="json"), tools.version)
    result = cache.run("gate", key, gate_task, api, staged.repo, staged.commit, pairings, sha256, tools, cfg.smoke,
                       cfg.gate, work / "gate")
    for run in (r for r in result.runs if r.mtp):
        log.info("gate: llama-server %s loaded %s + %s; %d tokens as in the smoke test, drafted %d, accepted %d",
                 run.request, run.trunk, run.head or "its own head", run.tokens_compared, run.drafted, run.accepted)
    log.info("gate passed on %s@%s: %d llama.cpp -hf runs, %d files' sha256 as the Hub records them",
             result.repo, result.commit[:12], len(result.runs), result.snapshot.files_checked)
    manifest = manifest.model_copy(update={"gate": result.table(), "gate_details": jsonable(result),
                                           "stage_seconds": cache.seconds})
    write_manifest(release_dir, manifest)
    write_card(release_dir, render_card(manifest))
    create_table_artifact(key=artifact_key, table=result.table(),
                          description=f"release gate on the staged commit {result.commit[:12]}: files each client "
                                      "picked, tokens against the smoke test, drafts")
    return result
