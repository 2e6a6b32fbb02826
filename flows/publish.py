"""The publish flow: fetch → inject → convert → quantize → smoke → manifest.

Stages are plain functions from ``mtpress.stages``; this file only composes them as
Prefect tasks, adds retries where a retry can help, and reports progress and results
to the terminal and the Prefect UI.
"""

from __future__ import annotations

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

from flows.cache import StageCache, cache_key
from mtpress.archs import get_arch
from mtpress.checkpoint import ModelDir
from mtpress.concurrency import occupy
from mtpress.fsutil import dir_digest, remove_stale_partials, sha256_file
from mtpress.hub.client import hub_api
from mtpress.manifest import hardware, jsonable, read_manifest, write_manifest
from mtpress.schema import ReleaseConfig, Source, load_release_config
from mtpress.stages import bench, convert, download, inject, quality, quantize, smoke
from mtpress.stages.card import render_card, write_card
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.preflight import check_disk_space, planned_output_bytes
from mtpress.stages.publish import publish as publish_stage
from mtpress.toolchain import resolve_toolchain

fetch_task = task(download.fetch, name="fetch", retries=3, retry_delay_seconds=[2, 10, 30])
inject_task = task(inject.inject, name="inject")
convert_task = task(convert.convert, name="convert")
quantize_task = task(quantize.quantize, name="quantize")
smoke_task = task(smoke.smoke, name="smoke", retries=1)
toolchain_task = task(resolve_toolchain, name="toolchain")
render_card_task = task(render_card, name="card")
bench_task = task(bench.bench, name="bench")
quality_task = task(quality.quality, name="quality")
# Retries are safe: a failed commit leaves the repo unchanged and unchanged files are never re-sent.
publish_task = task(publish_stage, name="publish", retries=2, retry_delay_seconds=[10, 60])


@flow(name="publish", log_prints=True)
def publish(config: str = "model_configs/demo.yaml", output: str | None = None, push: bool = True,
            dry_run: bool = False) -> str:
    """Build, test, document and publish the release a YAML file in model_configs/ describes.

    ``push=False`` stops after the card; ``dry_run`` prints the publish plan and commits nothing.
    Returns the release folder.
    """
    log = get_run_logger()
    cfg: ReleaseConfig = load_release_config(Path(config))
    arch = get_arch(cfg.arch)
    release_dir = Path(output or Path("releases") / cfg.name).resolve()
    work = release_dir.parent / f".work-{cfg.name}"
    if release_dir.is_dir() and (stale := remove_stale_partials(release_dir)):
        log.warning("removed %d leftovers of an interrupted run: %s", len(stale), ", ".join(p.name for p in stale))

    tools = toolchain_task()
    log.info("llama.cpp b%s (%s)", tools.version, tools.origin)

    finetune = fetch_task(cfg.finetune, work / "hub-cache")
    donor = fetch_task(cfg.donor, work / "hub-cache") if cfg.donor else None
    injected = inject_task(finetune, donor, arch, work / "injected")
    log.info("inject: %s", injected.reason)

    check_disk_space(release_dir, planned_output_bytes(injected.model, arch, cfg))
    cache = StageCache(release_dir)
    model_digest = dir_digest(injected.model.path)
    steps = len(cfg.layouts) * (1 + len(cfg.quants)) * 2 + int(cfg.quality.enabled)
    if cfg.bench.enabled:
        steps += len([q for q in ("BF16", *cfg.quants) if cfg.bench.quants is None or q in cfg.bench.quants])
    progress = create_progress_artifact(0.0, key=_key(cfg.name, "progress"), description="release build progress")
    done = 0

    def advance(what: str) -> None:
        nonlocal done
        done += 1
        log.info("[%d/%d] %s", done, steps, what)
        update_progress_artifact(progress, 100.0 * done / steps)

    files: list[GgufFile] = []
    for layout in cfg.layouts:
        # The first layout sits at the repo root, where `-hf user/repo:QUANT` looks; others in a subfolder.
        out_dir = release_dir if layout == cfg.layouts[0] else release_dir / layout
        bf16 = cache.run("convert", cache_key(model_digest, layout, cfg.name, tools.version), convert_task,
                         injected.model, arch, layout, name=cfg.name, tools=tools, out_dir=out_dir)
        files += bf16
        advance(f"convert {layout}: {', '.join(f.name for f in bf16)}")
        for quant in cfg.quants:
            quantized = [cache.run("quantize", cache_key(f.sha256, quant, cfg.head_type, cfg.name, tools.version),
                                   _occupying, "quantize-cpu", quantize_task, f, quant, arch,
                                   injected.model.config, name=cfg.name, tools=tools, head_type=cfg.head_type)
                         for f in bf16]
            files += quantized
            advance(f"quantize {layout} {quant}")

    smoke_results = []
    for model, head in pair_models_with_heads(files):
        key = cache_key(model.sha256, head.sha256 if head else None, cfg.smoke.model_dump(), tools.version)
        smoke_results.append(cache.run("smoke", key, smoke_task, model, head, cfg.smoke, tools))
        advance(f"smoke {model.layout}/{model.name}: identical tokens, drafted {smoke_results[-1].drafted}")

    root_layout = [f for f in files if f.layout == cfg.layouts[0]]
    bench_results = []
    if cfg.bench.enabled:
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

    manifest_path = write_manifest(release_dir, {
        "release": cfg.name,
        "config_file": _config_label(Path(config)),
        "mtpress": version("mtpress"),
        "config": cfg.model_dump(mode="json"),
        "toolchain": tools.describe(),
        "hardware": hardware(),
        "inputs": {"finetune": _input_record(finetune, cfg.finetune),
                   "donor": _input_record(donor, cfg.donor) if donor else None},
        "architecture": arch.describe(injected.model.config, injected.model.tensors),
        "inject": {"action": injected.action, "reason": injected.reason, "head": injected.head,
                   "bytes_written": injected.bytes_written},
        "files": [{"path": f.path.relative_to(release_dir).as_posix(), **jsonable(f)} for f in files],
        "smoke": smoke_results,
        "bench": [row for result in bench_results for row in result.table()],
        "quality": quality_result.table() if quality_result else None,
        "bench_details": bench_results,
        "quality_details": quality_result,
        "stage_seconds": cache.seconds,
    })
    create_table_artifact(key=_key(cfg.name, "files"), description="release files",
                          table=[{"file": f.path.relative_to(release_dir).as_posix(), "role": f.role, "quant": f.quant,
                                  "MiB": round(f.size / 2**20, 1), "sha256": f.sha256[:16]} for f in files])
    create_table_artifact(key=_key(cfg.name, "smoke"), description="smoke: greedy output with and without draft-mtp",
                          table=[{"file": s.model, "layout": s.layout, "identical": s.tokens_identical,
                                  "drafted": s.drafted, "accepted": s.accepted,
                                  "acceptance": round(s.acceptance or 0, 3)} for s in smoke_results])
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
        result = publish_task(release_dir, cfg.target, hub_api(), dry_run=dry_run,
                              message=f"mtpress: {cfg.name} (llama.cpp b{tools.version})")
        log.info(result.plan.describe())
        if result.committed:
            log.info("published %s at commit %s (%d bytes uploaded)", result.url, result.commit, result.bytes_uploaded)
        else:
            log.info("%s: nothing committed (%s)", result.url, "dry run" if dry_run else "no changes")
        create_link_artifact(result.url, link_text=result.repo, key=_key(cfg.name, "repo"),
                             description="published repository")
    return str(release_dir)


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


def _input_record(model: ModelDir, source: Source) -> dict:
    card = model.path / "README.md"
    card_data = metadata_load(card) if card.is_file() else None
    return {"label": model.label, "repo": source.repo, "revision": model.revision,
            "license": (card_data or {}).get("license"),
            "files": {name: sha256_file(model.path / name) for name in model.shard_files()}}


def _config_label(path: Path) -> str:
    """The config as a user would name it to rerun: relative to the working directory when inside it."""
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(resolved)


def _key(name: str, what: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in f"{name}-{what}".lower())


if __name__ == "__main__":
    import sys

    publish(*sys.argv[1:2])
