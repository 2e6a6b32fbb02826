"""The publish flow: fetch → inject → head → convert → imatrix → quantize → smoke → bench → quality → split →
manifest → card → gate → publish.

Stages are plain functions (``mtpress.stages``), wrapped as named tasks in ``flows/tasks.py``; this file only
composes them. Concurrency is Prefect's own. Every finished file is smoke-tested, and sent to the staging
repo, by a task of its own while the next one quantizes. Lanes keep it to one conversion (its memory peak is
the run's), one smoke and one upload at a time, each task waiting for the one before it (``wait_for``); the
global limit ``quantize-cpu`` keeps it to one quantize per machine. The quant matrix waits for the BF16 smoke
test, so a head that drafts nothing fails before hours of quantizing. Benchmarks and quality run after
everything: their timings need the machine to themselves.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from flows.mlx_pack import build_mlx_pack
from flows.realign import choose_head
from flows.record import input_records, write_cards, write_release_manifest
from flows.release import Build, Lane, bench_quants, open_release, settle
from flows.release_gate import stage_and_verify
from flows.retries import retry_if_transient
from flows.runners import task_runner
from flows.tasks import (
    bench_variant,
    convert_layout,
    export_mmproj,
    fetch_checkpoint,
    inject_task,
    make_imatrix,
    measure_quality,
    preupload_variant,
    quantize_layout,
    smoke_variant,
    split_variant,
)
from mtpress.hub.client import hub_api
from mtpress.naming import pair_trunks_with_heads
from mtpress.stages.publish import publish as publish_stage
from mtpress.stages.smoke import check_lean_heads

# Only transient failures are retried (a failed commit leaves the repo unchanged, unchanged files are never
# re-sent); a 412 never is: the retry would plan against another writer's commit and delete their files.
publish_task = task(publish_stage, name="publish", task_run_name="publish {target.repo}", cache_policy=NO_CACHE,
                    retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient)


# Threads, or a Dask cluster named in this process's environment; `runners.publish_flow` also reads the config.
@flow(name="publish", log_prints=True, task_runner=task_runner())
def publish(config: str = "model_configs/demo.yaml", output: str | None = None, push: bool = True,
            dry_run: bool = False, token_secret: str | None = None) -> str:
    """Build, test, document and publish the release a YAML file in model_configs/ describes.

    ``push=False`` stops after the card; ``dry_run`` prints the publish plan and commits nothing.
    ``token_secret`` names a Prefect Secret block holding the Hub token, used when HF_TOKEN is unset.
    Returns the release folder.
    """
    release = open_release(config, output, push=push, dry_run=dry_run, token_secret=token_secret)
    cfg, hub_cache = release.cfg, release.work / "hub-cache"
    finetune, donor = settle([fetch_checkpoint.submit("fine-tune", cfg.finetune, hub_cache),
                              fetch_checkpoint.submit("donor", cfg.donor, hub_cache) if cfg.donor else None])
    injected = inject_task(finetune, donor, release.arch, release.work / "injected")
    head_choice = None
    if cfg.head.source != "copy":  # from here on the release is built from the checkpoint with the chosen head
        injected, head_choice = choose_head(cfg, injected, release.arch, release.tools, release.cache,
                                            release.release_dir, release.work)
    build = release.building(injected)

    mmproj = build.step(export_mmproj, build) if build.has_vision else None
    converts, smokes, uploads = Lane(build.progress), Lane(build.progress), Lane()
    variants, smoked = {}, {}  # (layout, quant) → its files (a model and, in the sidecar layout, its head); smoke
    for layout in build.layouts:
        variants[layout, "BF16"] = converts.submit(convert_layout, build, layout)
        smoked[layout, "BF16"] = smokes.submit(smoke_variant, build, layout, "BF16", variants[layout, "BF16"], mmproj)
    # Everything below waits for the head to prove itself on BF16: a dead head fails before the matrix.
    matrix = (build.step(make_imatrix, build, variants[build.layouts[0], "BF16"], wait_for=smokes.futures[:1])
              if cfg.imatrix_quants else None)  # one importance matrix, from the first layout, serves both
    for layout in build.layouts:
        for quant in cfg.quants:
            variants[layout, quant] = build.step(quantize_layout, build, layout, quant, variants[layout, "BF16"],
                                                 matrix, wait_for=smokes.futures[:1])
    for (layout, quant), files in variants.items():
        if quant != "BF16":
            smoked[layout, quant] = smokes.submit(smoke_variant, build, layout, quant, files, mmproj)
        if release.staging:
            uploads.submit(preupload_variant, build, layout, quant, files)
    if mmproj and release.staging:
        uploads.submit(preupload_variant, build, "", "mmproj", [mmproj])
    smoke_results = settle([smoked[variant] for variant in variants])
    files = [f for built in settle(list(variants.values())) for f in built] + settle([mmproj] if mmproj else [])
    [imatrix] = settle([matrix])
    settle(uploads.futures)
    # Each lean sidecar head against the embedded file of its quant: a measurable loss of drafts stops the release.
    lean_heads = check_lean_heads(smoke_results, [f for f in files if f.role == "head"], cfg.head_shared_type)

    root = [f for f in files if f.layout == cfg.layouts[0]]  # one layout is enough: both hold the same weights
    bench_results = [build.step(bench_variant, build, trunk.quant, trunk, head).result()
                     for trunk, head in pair_trunks_with_heads(root)
                     if build.has_head and cfg.bench.enabled and trunk.quant in bench_quants(cfg)]
    quality_result = (build.step(measure_quality, build, [f for f in root if f.role == "model"]).result()
                      if cfg.quality.enabled else None)
    build.progress.finish()
    # Built, smoke-tested and measured whole (llama-quantize needs the whole BF16); a file over the Hub's per-file
    # limit is published as its llama-gguf-split parts, which the manifest, card and gate then name.
    limit = cfg.target.max_file_size
    files = [published for f in files
             for published in (split_variant(build, f.layout, f.quant, [f]) if f.size > limit else [f])]
    inputs = input_records(cfg, release.arch, finetune, donor, injected)
    # The Apple Silicon pack: same checkpoint, after smoke (its checks compare with the BF16 tokens).
    mlx_release = build_mlx_pack(cfg, build.model, release.arch, release.release_dir, build.model_digest,
                                 smoke_results, release.cache, inputs) if cfg.mlx else None
    write_release_manifest(build, inputs, files, imatrix, smoke_results, lean_heads, bench_results, quality_result,
                           head_choice, mlx_release)
    write_cards(release.release_dir, release.key("card"))
    if push:
        ship(build, mlx_release)
    return str(release.release_dir)


def ship(build: Build, mlx_release) -> None:
    """Stage → verify → promote: a GateError leaves the target untouched; then the target gets one commit."""
    release, cfg, log, api = build.release, build.cfg, get_run_logger(), hub_api()
    if release.staging:
        stage_and_verify(release.release_dir, cfg, release.tools, api, release.cache, release.work,
                         release.key("gate"))
        write_cards(release.release_dir, release.key("card"), "model card preview, with the release gate")
    pack = [(mlx_release.folder, mlx_release.target, "mtplx-repo",
             f"MTPLX pack ({mlx_release.summary['verification']})")] if mlx_release else []
    for folder, target, what, label in [(release.release_dir, cfg.target, "repo", ""), *pack]:
        result = publish_task(folder, target, api, dry_run=release.dry_run,
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
