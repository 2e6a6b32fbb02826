"""The publish flow: fetch → inject → convert → quantize → smoke → manifest.

Stages are plain functions from ``mtpress.stages``; this file only composes them as
Prefect tasks, adds retries where a retry can help, and reports progress and results
to the terminal and the Prefect UI.
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path

from huggingface_hub.repocard import metadata_load
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel

from flows.cache import StageCache, cache_key
from flows.mlx_pack import build_mlx_pack, mlx_target
from flows.realign import choose_head
from flows.release_gate import stage_and_verify
from flows.retries import retry_if_transient
from flows.secrets import use_token_from_secret
from flows.stage_keys import convert_key, quantize_key, reused_outputs
from flows.tasks import bench_task, convert_task, fetch_task, inject_task
from mtpress.archs import get_arch
from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import ModelDir
from mtpress.concurrency import occupy
from mtpress.errors import PublishError
from mtpress.fsutil import dir_digest, hold_folder, remove_stale_partials, sha256_file
from mtpress.hub.client import hub_api
from mtpress.manifest import hardware, jsonable, read_manifest, write_manifest
from mtpress.schema import ReleaseConfig, Source, load_release_config
from mtpress.stages import convert, quality, quantize, smoke
from mtpress.stages.card import render_card, write_card
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.inject import InjectResult
from mtpress.stages.preflight import check_disk_space, planned_output_bytes
from mtpress.stages.publish import check_write_access, preupload
from mtpress.stages.publish import publish as publish_stage
from mtpress.toolchain import resolve_toolchain

mmproj_task = task(convert.export_mmproj, name="mmproj")
quantize_task = task(quantize.quantize, name="quantize")
# Retried only when llama-server ran out of time: a mismatch or a dead head fails the same way again.
smoke_task = task(smoke.smoke, name="smoke", retries=1, retry_condition_fn=retry_if_transient)
toolchain_task = task(resolve_toolchain, name="toolchain")
render_card_task = task(render_card, name="card")
quality_task = task(quality.quality, name="quality")
# Only transient failures are retried (a failed commit leaves the repo unchanged, unchanged files are never
# re-sent); a 412 never is: the retry would plan against another writer's commit and delete their files.
publish_task = task(publish_stage, name="publish", retries=2, retry_delay_seconds=[10, 60],
                    retry_condition_fn=retry_if_transient)
# No retries: a pre-upload that fails costs nothing, the staging commit sends what is missing.
preupload_task = task(preupload, name="preupload")


@flow(name="publish", log_prints=True)
def publish(config: str = "model_configs/demo.yaml", output: str | None = None, push: bool = True,
            dry_run: bool = False, token_secret: str | None = None) -> str:
    """Build, test, document and publish the release a YAML file in model_configs/ describes.

    ``push=False`` stops after the card; ``dry_run`` prints the publish plan and commits nothing.
    ``token_secret`` names a Prefect Secret block holding the Hub token, used when HF_TOKEN is unset.
    Returns the release folder.
    """
    log = get_run_logger()
    use_token_from_secret(token_secret)
    cfg: ReleaseConfig = load_release_config(Path(config))
    if push and not dry_run:  # a token that cannot publish there fails now, not after the build
        check_write_access(hub_api(), cfg.target, *([cfg.target.staging] if cfg.gate.enabled else []),
                           *([mlx_target(cfg)] if cfg.mlx else []))
    arch = get_arch(cfg.arch)
    release_dir = Path(output or Path("releases") / cfg.name).resolve()
    work = release_dir.parent / f".work-{cfg.name}"
    # One run per release folder (and work folder, which other release folders of this name share): what is
    # removed next can only be what a killed run left, never a running one's partial files.
    for folder in (release_dir, work):
        hold_folder(folder)
    if stale := remove_stale_partials(release_dir) + remove_stale_partials(work):
        log.warning("removed %d leftovers of an interrupted run: %s", len(stale), ", ".join(p.name for p in stale))

    tools = toolchain_task()
    log.info("llama.cpp b%s (%s)", tools.version, tools.origin)

    finetune = fetch_task(cfg.finetune, work / "hub-cache")
    donor = fetch_task(cfg.donor, work / "hub-cache") if cfg.donor else None
    injected = inject_task(finetune, donor, arch, work / "injected")
    log.info("inject: %s", injected.reason)

    cache = StageCache(release_dir)
    head_choice = None
    if cfg.head.source != "copy":
        # From here on the release is built from the checkpoint that carries the chosen head.
        injected, head_choice = choose_head(cfg, injected, arch, tools, cache, release_dir, work)
    model_digest = dir_digest(injected.model.path)
    # What the cache already holds writes nothing: a nearly full disk must not refuse a rerun.
    check_disk_space(release_dir, planned_output_bytes(injected.model, arch, cfg,
                                                       reused_outputs(cache, model_digest, cfg, tools)))
    has_vision = cfg.mmproj and arch.has_vision(injected.model.config)
    has_head = injected.action != "no-head"
    # Without a head both layouts would hold the same plain trunk: build the first only, and bench nothing.
    layouts = cfg.layouts if has_head else cfg.layouts[:1]
    steps = len(layouts) * (1 + len(cfg.quants)) * 2 + int(cfg.quality.enabled) + int(has_vision)
    if cfg.bench.enabled and has_head:
        steps += len([q for q in ("BF16", *cfg.quants) if cfg.bench.quants is None or q in cfg.bench.quants])
    progress = create_progress_artifact(0.0, key=_key(cfg.name, "progress"), description="release build progress")
    done = 0
    progress_lock = threading.Lock()

    def advance(what: str) -> None:
        nonlocal done
        with progress_lock:  # the smoke lane reports from its own thread
            done += 1
            log.info("[%d/%d] %s", done, steps, what)
            update_progress_artifact(progress, 100.0 * done / steps)

    mmproj = None
    if has_vision:
        # One vision encoder (kept at BF16) serves every trunk of both layouts: it sits at the repo root,
        # where `-hf user/repo:QUANT` picks it up as the model's mmproj sibling. Built first: every smoke uses it.
        mmproj = cache.run("mmproj", cache_key(model_digest, "mmproj", cfg.name, tools.version), mmproj_task,
                           injected.model, arch, cfg.layouts[0], name=cfg.name, tools=tools, out_dir=release_dir)
        advance(f"mmproj: {mmproj.name}")

    def smoke_one(model: GgufFile, head: GgufFile | None) -> smoke.SmokeResult:
        key = cache_key(model.sha256, head.sha256 if head else None, mmproj.sha256 if mmproj else None,
                        cfg.smoke.model_dump(), tools.version)
        ran = cache.run("smoke", key, smoke_task, model, head, cfg.smoke, tools, mmproj, threads=lane_threads())
        advance(f"smoke {model.layout}/{model.name}: " + (f"identical tokens, drafted {ran.drafted}"
                                                          if ran.tokens_identical else "generated (no MTP head)")
                + (f"; with an image: identical tokens, drafted {ran.image_drafted}" if ran.image_drafted else ""))
        return ran

    # The release gate commits to a private staging repo first: its files can be sent while the rest builds.
    staging = cfg.target.staging if push and cfg.gate.enabled and not dry_run else None
    api = hub_api() if staging else None

    def preupload_quietly(new_files: list[GgufFile]) -> None:
        try:
            sent = preupload_task(new_files, release_dir, staging, api)
            log.info("pre-uploaded %s to %s (%d bytes sent)", ", ".join(f.name for f in new_files), staging.repo, sent)
        except PublishError as e:  # the staging commit sends whatever is missing itself
            log.warning("%s", e)

    def finished(new_files: list[GgufFile]) -> None:
        smokes.extend(_in_run_context(smoke_lane, smoke_one, m, h) for m, h in pair_models_with_heads(new_files))
        if staging and api.token:
            uploads.append(_in_run_context(upload_lane, preupload_quietly, new_files))

    files: list[GgufFile] = []
    # Each finished file is smoke-tested, and sent to the staging repo, on lanes of their own while the next
    # one quantizes. One smoke and one upload at a time and never a second conversion, so memory holds at
    # most one quantize, one llama-server and one upload's buffers beside the converter's peak. Benchmarks
    # wait for all of it: their timings need the machine to themselves.
    smoke_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smoke")
    upload_lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
    smokes: list[Future] = []
    uploads: list[Future] = []
    try:
        if mmproj:
            finished([mmproj])
        for layout in layouts:
            # The first layout sits at the repo root, where `-hf user/repo:QUANT` looks; others in a subfolder.
            out_dir = release_dir if layout == cfg.layouts[0] else release_dir / layout
            bf16 = cache.run("convert", convert_key(model_digest, layout, cfg, tools), convert_task,
                             injected.model, arch, layout, name=cfg.name, tools=tools, out_dir=out_dir)
            files += bf16
            advance(f"convert {layout}: {', '.join(f.name for f in bf16)}")
            finished(bf16)
            for quant in cfg.quants:
                _raise_first_failure(smokes)
                quantized = [cache.run("quantize", quantize_key(f, quant, cfg, tools),
                                       _occupying, "quantize-cpu", quantize_task, f, quant, arch,
                                       injected.model.config, name=cfg.name, tools=tools, head_type=cfg.head_type)
                             for f in bf16]
                files += quantized
                advance(f"quantize {layout} {quant}")
                finished(quantized)
        smoke_results = [future.result() for future in smokes]
        for future in uploads:
            future.result()
    finally:
        smoke_lane.shutdown(wait=True, cancel_futures=True)
        upload_lane.shutdown(wait=True, cancel_futures=True)
    if mmproj:
        files.append(mmproj)

    root_layout = [f for f in files if f.layout == cfg.layouts[0]]
    bench_results = []
    if cfg.bench.enabled and has_head:
        # One layout is enough: both hold the same weights (quality and speed were checked to agree).
        for model, head in pair_models_with_heads(root_layout):
            if cfg.bench.quants is None or model.quant in cfg.bench.quants:
                key = cache_key(model.sha256, head.sha256 if head else None, cfg.bench.model_dump(mode="json"),
                                tools.version)
                bench_results.append(cache.run("bench", key, _occupying, "bench-gpu", bench_task, model, head,
                                               cfg.bench, tools))
                advance(f"bench {model.name}")
    quality_result = None
    if cfg.quality.enabled:
        models = [f for f in root_layout if f.role == "model"]
        bf16 = next(f for f in models if f.quant == "BF16")
        key = cache_key([f.sha256 for f in models], cfg.quality.model_dump(mode="json"), tools.version)
        quality_result = cache.run("quality", key, quality_task, bf16, [f for f in models if f is not bf16],
                                   cfg.quality, tools, work)
        advance("quality: perplexity and KL-divergence against BF16")
    update_progress_artifact(progress, 100.0)
    # The Apple Silicon pack: same checkpoint, after smoke (its checks compare with the BF16 tokens).
    mlx_release = build_mlx_pack(cfg, injected.model, arch, release_dir, model_digest, smoke_results, cache,
                                 _inputs(cfg, arch, finetune, donor, injected)) if cfg.mlx else None

    manifest_path = write_manifest(release_dir, {
        "release": cfg.name,
        "config_file": _config_label(Path(config)),
        "mtpress": version("mtpress"),
        "config": _config_record(cfg),
        "toolchain": tools.describe(),
        "hardware": hardware(),
        "inputs": _inputs(cfg, arch, finetune, donor, injected),
        "architecture": arch.describe(injected.model.config, injected.model.tensors),
        "inject": {"action": injected.action, "reason": injected.reason, "head": injected.head,
                   "bytes_written": injected.bytes_written, "vocabulary": injected.vocabulary},
        "head_choice": head_choice,
        "files": [{"path": f.path.relative_to(release_dir).as_posix(), **jsonable(f)} for f in files],
        "smoke": smoke_results,
        "bench": [row for result in bench_results for row in result.table()],
        "quality": quality_result.table() if quality_result else None,
        "bench_details": bench_results,
        "quality_details": quality_result,
        "mlx": mlx_release.summary if mlx_release else None,
        "stage_seconds": cache.seconds,
    })
    create_table_artifact(key=_key(cfg.name, "files"), description="release files",
                          table=[{"file": f.path.relative_to(release_dir).as_posix(), "role": f.role, "quant": f.quant,
                                  "MiB": round(f.size / 2**20, 1), "sha256": f.sha256[:16]} for f in files])
    create_table_artifact(key=_key(cfg.name, "smoke"), description="smoke: greedy output with and without draft-mtp",
                          table=[{"file": s.model, "layout": s.layout, "identical": s.tokens_identical,
                                  "drafted": s.drafted, "accepted": s.accepted,
                                  "acceptance": round(s.acceptance or 0, 3),
                                  **({"image identical": s.image_tokens_identical, "image drafted": s.image_drafted}
                                     if mmproj else {})} for s in smoke_results])
    if bench_results:
        create_table_artifact(key=_key(cfg.name, "bench"), table=[r for b in bench_results for r in b.table()],
                              description="bench: tokens/s median and IQR, acceptance, speedup, bound")
    if quality_result:
        create_table_artifact(key=_key(cfg.name, "quality"), table=quality_result.table(),
                              description="quality: perplexity and KL-divergence against BF16")
    card = render_card_task(read_manifest(release_dir))
    write_card(release_dir, card)
    create_markdown_artifact(card_preview(card), key=_key(cfg.name, "card"), description="model card preview")
    log.info("release written to %s (manifest %s); stages reused from earlier runs: %s", release_dir,
             manifest_path.name, ", ".join(sorted(set(cache.hits))) or "none")

    if push:
        api = api or hub_api()
        if cfg.gate.enabled and not dry_run:
            # Stage → verify → promote: a GateError here leaves the target untouched.
            stage_and_verify(release_dir, cfg, tools, api, cache, work, _key(cfg.name, "gate"))
            create_markdown_artifact(card_preview(render_card(read_manifest(release_dir))), key=_key(cfg.name, "card"),
                                     description="model card preview, with the release gate")
        result = publish_task(release_dir, cfg.target, api, dry_run=dry_run,
                              message=f"mtpress: {cfg.name} (llama.cpp b{tools.version})")
        log.info(result.plan.describe())
        if result.committed:
            log.info("published %s at commit %s (%d bytes uploaded)", result.url, result.commit, result.bytes_uploaded)
        else:
            log.info("%s: nothing committed (%s)", result.url, "dry run" if dry_run else "no changes")
        create_link_artifact(result.url, link_text=result.repo, key=_key(cfg.name, "repo"),
                             description="published repository")
        if mlx_release:
            pack = publish_task(mlx_release.folder, mlx_release.target, api, dry_run=dry_run,
                                message=f"mtpress: {cfg.name} MTPLX pack ({mlx_release.summary['verification']})")
            log.info(pack.plan.describe())
            create_link_artifact(pack.url, link_text=pack.repo, key=_key(cfg.name, "mtplx-repo"),
                                 description="published MTPLX pack")
    return str(release_dir)


def lane_threads() -> int:
    """llama-server's threads on the smoke lane, beside a quantize that takes every core. llama-quantize's
    workers never wait on each other, but llama-server's spin while they wait: one or a few server threads
    share the cores without waste. Measured on 2 cores (large benchmark model): with both tools at 2 threads
    the cold run's CPU time went from 1.66 × to 2.11 × the hand recipe's; a 1 + 1 split left quantizing, the
    longer job, half the cores (README, "Performance")."""
    return max(1, len(os.sched_getaffinity(0)) // 4)


def _in_run_context(pool: ThreadPoolExecutor, fn, *args) -> Future:
    """``fn(*args)`` on ``pool`` inside this flow run's context, so the Prefect tasks it calls belong to the run."""
    return pool.submit(contextvars.copy_context().run, fn, *args)


def _raise_first_failure(futures: list[Future]) -> None:
    """Stop the build as soon as a background stage has failed, instead of after every quantize."""
    for future in futures:
        if future.done() and future.exception():
            raise future.exception()


def _occupying(limit: str, stage, *args, **kwargs):
    """Run ``stage`` holding one slot of a machine-wide concurrency limit (one quantize per CPU host,
    one bench per GPU host), so parallel flow runs on one worker don't oversubscribe it."""
    with occupy(limit):
        return stage(*args, **kwargs)


def card_preview(card) -> str:
    """The English card for the UI: the YAML front matter shown as a code block, not run into the text."""
    text = card.files["README.md"]
    if text.startswith("---\n"):
        front, body = text[4:].split("\n---\n", 1)
        text = f"```yaml\n{front}\n```\n{body}"
    return text


def pair_models_with_heads(files: list[GgufFile]) -> list[tuple[GgufFile, GgufFile | None]]:
    """Each model file with the sidecar head of the same layout and quant (None when embedded)."""
    heads = {(f.layout, f.quant): f for f in files if f.role == "head"}
    return [(f, heads.get((f.layout, f.quant)) if f.layout == "sidecar" else None)
            for f in files if f.role == "model"]


def _inputs(cfg: ReleaseConfig, arch: ArchSpec, finetune: ModelDir, donor: ModelDir | None,
            injected: InjectResult) -> dict:
    """The checkpoints the release was made from. A donor whose head went unused (the fine-tune kept its own)
    is none of them: it is not recorded, so no card credits it."""
    return {"finetune": _input_record(finetune, cfg.finetune, arch),
            "donor": _input_record(donor, cfg.donor, arch) if donor and injected.action == "injected" else None}


def _input_record(model: ModelDir, source: Source, arch: ArchSpec) -> dict:
    """A Hub repo at its commit, or a local folder by its name (the label) and its content digest: where it sits
    on the publisher's machine is theirs. ``mtp_layers``: what the checkpoint's own config declares."""
    card = model.path / "README.md"
    card_data = metadata_load(card) if card.is_file() else None
    return {"label": model.label, "repo": source.repo, "revision": model.revision,
            "digest": dir_digest(model.path) if source.path else None, "mtp_layers": arch.mtp_layers(model.config),
            "license": (card_data or {}).get("license"),
            "files": {name: sha256_file(model.path / name) for name in model.shard_files()}}


def _config_record(config: BaseModel) -> dict:
    """The release config as the manifest and the card publish it: every local path (a source folder, a prompt
    set, a calibration text, an image) by its name alone, as a config beside those files would give it."""
    record = config.model_dump(mode="json")
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path):
            record[name] = value.name
        elif isinstance(value, BaseModel):
            record[name] = _config_record(value)
    return record


def _config_label(path: Path) -> str:
    """The config as a user would name it to rerun: relative to the working directory when inside it, else its
    name alone (the publisher's directories are theirs)."""
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else resolved.name


def _key(name: str, what: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in f"{name}-{what}".lower())


if __name__ == "__main__":
    import sys

    publish(*sys.argv[1:2])
