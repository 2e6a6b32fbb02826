"""The publish flow: fetch → inject → head → convert → imatrix → quantize → smoke → bench → quality → split →
manifest → card → gate → publish.

Stages are plain functions (``mtpress.stages``), wrapped as named tasks in ``flows/tasks.py``; ``flows/build.py``
composes the quant matrix (all at once, or one file at a time on a disk smaller than the release), and this file
the rest.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from flows.build import all_at_once, one_at_a_time
from flows.mlx_pack import build_mlx_pack
from flows.realign import choose_head
from flows.record import input_records, write_cards, write_release_manifest
from flows.release import Build, open_release, settle
from flows.release_gate import stage_and_verify
from flows.retries import retry_if_transient
from flows.runners import task_runner
from flows.tasks import export_mmproj, fetch_checkpoint, inject_task
from mtpress.hub.client import hub_api
from mtpress.stages.publish import publish as publish_stage
from mtpress.stages.publish import stored_elsewhere
from mtpress.stages.smoke import check_lean_heads

# Only transient failures are retried (a failed commit leaves the repo unchanged, unchanged files are never
# re-sent); a 412 never is: the retry would plan against another writer's commit and delete their files.
publish_task = task(publish_stage, name="publish", task_run_name="publish {target.repo}", cache_policy=NO_CACHE,
                    retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)


# Threads, or a Dask cluster named in this process's environment; `runners.publish_flow` also reads the config.
@flow(name="publish", log_prints=True, task_runner=task_runner())
def publish(config: str = "model_configs/demo.yaml", output: str | None = None, push: bool = True,
            dry_run: bool = False, token_secret: str | None = None, bounded_disk: bool | None = None) -> str:
    """Build, test, document and publish the release a YAML file in model_configs/ describes.

    ``push=False`` stops after the card; ``dry_run`` prints the publish plan and commits nothing.
    ``token_secret`` names a Prefect Secret block holding the Hub token, used when HF_TOKEN is unset.
    ``bounded_disk`` overrides the config's: build one file at a time, each committed to staging and deleted here.
    Returns the release folder.
    """
    release = open_release(config, output, push=push, dry_run=dry_run, token_secret=token_secret,
                           bounded_disk=bounded_disk)
    cfg, hub_cache = release.cfg, release.work / "hub-cache"
    finetune, donor = settle([
        fetch_checkpoint.submit("fine-tune", cfg.finetune, hub_cache, release.arch),
        fetch_checkpoint.submit("donor", cfg.donor, hub_cache, release.arch) if cfg.donor else None])
    injected = inject_task(finetune, donor, release.arch, release.work / "injected")
    head_choice = None
    if cfg.head.source != "copy":  # from here on the release is built from the checkpoint with the chosen head
        injected, head_choice = choose_head(cfg, injected, release.arch, release.tools, release.cache,
                                            release.release_dir, release.work)
    build = release.building(injected)

    mmproj = build.step(export_mmproj, build) if build.has_vision else None
    built = (one_at_a_time if cfg.bounded_disk else all_at_once)(build, mmproj)
    build.progress.finish()
    # Each lean sidecar head against the embedded file of its quant: a measurable loss of drafts stops the release.
    lean_heads = check_lean_heads(built.smoke, [f for f in built.files if f.role == "head"], cfg.head_shared_type)
    inputs = input_records(cfg, release.arch, finetune, donor, injected)
    # The Apple Silicon pack: same checkpoint, after smoke (its checks compare with the BF16 tokens).
    mlx_release = build_mlx_pack(cfg, build.model, release.arch, release.release_dir, build.model_digest,
                                 built.smoke, release.cache, inputs) if cfg.mlx else None
    write_release_manifest(build, inputs, built.files, built.imatrix, built.smoke, lean_heads, built.bench,
                           built.quality, head_choice, mlx_release)
    write_cards(release.release_dir, release.key("card"))
    if push:
        ship(build, mlx_release)
    return str(release.release_dir)


def ship(build: Build, mlx_release) -> None:
    """Stage → verify → promote: a GateError leaves the target untouched; then the target gets one commit."""
    release, cfg, log, api = build.release, build.cfg, get_run_logger(), hub_api()
    verified = None
    if release.staging:
        gate = stage_and_verify(release.release_dir, cfg, release.tools, api, release.cache, release.work,
                                release.key("gate"))
        verified = (gate.repo, gate.commit)
        write_cards(release.release_dir, release.key("card"), "model card preview, with the release gate")
    pack = [(mlx_release.folder, mlx_release.target, "mtplx-repo",
             f"MTPLX pack ({mlx_release.summary['verification']})", {})] if mlx_release else []
    # A bounded-disk run's files are on the Hub, not here: the target's commit names them by content (and copies
    # any its Hub does not hold from the verified staging commit).
    release_files = (release.release_dir, cfg.target, "repo", "", stored_elsewhere(release.release_dir))
    for folder, target, what, label, elsewhere in [release_files, *pack]:
        result = publish_task(folder, target, api, dry_run=release.dry_run, elsewhere=elsewhere, source=verified,
                              message=f"mtpress: {cfg.name} {label or f'(llama.cpp b{release.tools.version})'}")
        log.info(result.plan.describe())
        if result.committed:
            log.info("published %s at commit %s (%d bytes uploaded)", result.url, result.commit, result.bytes_uploaded)
        else:
            log.info("%s: nothing committed (%s)", result.url, "dry run" if release.dry_run else "no changes")
        create_link_artifact(result.url, link_text=result.repo, key=release.key(what), description=f"published {what}")

if __name__ == "__main__":
    import sys

    publish(*sys.argv[1:2])
