"""The stages as Prefect tasks: each named for what it works on, retried only when its error is transient.

The publish flow's tasks take the run's ``Build`` (flows/release.py) and go through its content cache: a
result reused from an earlier run is a Cached task run in the UI, with the reason. They may run on a Dask
worker (flows/runners.py), so each first checks it can see the files it works on (``visible``).
``fetch_checkpoint`` and the three plain ones below are shared with the re-alignment flow, which composes its
own stages.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.release import Build, lane_threads, visible
from flows.retries import retry_if_transient
from mtpress.archs.base import ArchSpec
from mtpress.cache import cache_key
from mtpress.checkpoint import ModelDir
from mtpress.concurrency import occupy
from mtpress.errors import PublishError
from mtpress.hub.client import hub_api
from mtpress.naming import pair_trunks_with_heads
from mtpress.schema import Source
from mtpress.stage_keys import convert_key, imatrix_key, quantize_key
from mtpress.stages import bench, convert, download, imatrix, inject, quality, quantize, smoke
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.imatrix import ImatrixFile
from mtpress.stages.publish import commit_finished, preupload
from mtpress.stages.split import check_splittable, split_file

inject_task = task(inject.inject, name="inject", cache_policy=NO_CACHE)
convert_task = task(convert.convert, name="convert", cache_policy=NO_CACHE)
bench_task = task(bench.bench, name="bench", cache_policy=NO_CACHE)

# Content-keyed by the stage cache; Prefect's own input hashing would only repeat it, slower.
publish_task_options = {"cache_policy": NO_CACHE}


@task(name="fetch", task_run_name="fetch {role}", retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=retry_if_transient, **publish_task_options)
def fetch_checkpoint(role: str, source: Source, cache_dir: Path, arch: ArchSpec) -> ModelDir:
    """``role`` names the task run; a donor gives only its head, so only the shards holding it are downloaded."""
    return download.fetch(source, cache_dir, arch.is_head_tensor if role == "donor" else None)


@task(name="mmproj", task_run_name="mmproj", **publish_task_options)
def export_mmproj(build: Build) -> GgufFile:
    """One vision encoder (kept at BF16) serves every trunk of both layouts, from the repo root, where
    `-hf user/repo:QUANT` picks it up as the model's mmproj sibling."""
    layout = build.cfg.layouts[0]
    visible(build.model.path)
    return build.cached("mmproj", cache_key(build.model_digest, "mmproj", build.cfg.name, build.tools.version),
                        convert.export_mmproj, build.model, build.release.arch, layout,
                        name=build.cfg.name, tools=build.tools, out_dir=build.out_dir(layout))


@task(name="convert", task_run_name="convert {layout}", **publish_task_options)
def convert_layout(build: Build, layout: str) -> list[GgufFile]:
    """The layout's BF16 files: a model, and in the sidecar layout its head."""
    visible(build.model.path)
    return build.cached("convert", convert_key(build.model_digest, layout, build.cfg, build.tools), convert.convert,
                        build.model, build.release.arch, layout,
                        name=build.cfg.name, tools=build.tools, out_dir=build.out_dir(layout))


@task(name="imatrix", task_run_name="imatrix", **publish_task_options)
def make_imatrix(build: Build, bf16: list[GgufFile]) -> ImatrixFile:
    """One importance matrix for the release, from the first layout's BF16 files (its head included), holding the
    quantize slot: llama-imatrix takes every core too."""
    def compute() -> ImatrixFile:
        with occupy("quantize-cpu"):
            return imatrix.compute_imatrix(model, head, build.cfg.imatrix, name=build.cfg.name, tools=build.tools,
                                           head_block=build.release.arch.head_gguf_block(build.model.config))

    visible(*(f.path for f in bf16))
    [(model, head)] = pair_trunks_with_heads(bf16)
    return build.cached("imatrix", imatrix_key(bf16, build.cfg, build.tools), compute)


@task(name="quantize", task_run_name="quantize {layout}/{quant}", **publish_task_options)
def quantize_layout(build: Build, layout: str, quant: str, bf16: list[GgufFile], matrix: ImatrixFile | None
                    ) -> list[GgufFile]:
    """Each BF16 file of the layout at ``quant`` (each cached on its own: the disk preflight asks per file),
    holding the machine's quantize slot: llama-quantize takes every core, two at once only slow each other.
    ``matrix``: the release's importance matrix, for the quants the config makes with it."""
    used = matrix if matrix is not None and build.cfg.imatrix.applies_to(quant) else None

    def quantize_one(source: GgufFile) -> GgufFile:
        with occupy("quantize-cpu"):
            return quantize.quantize(source, quant, build.release.arch, build.model.config, name=build.cfg.name,
                                     tools=build.tools, head_type=build.cfg.head_type,
                                     shared_type=build.cfg.head_shared_type, imatrix=used)

    visible(*(f.path for f in bf16), *([used.path] if used else []))
    sha256 = used.sha256 if used else None
    done = [build.reuse_or_run("quantize", quantize_key(f, quant, build.cfg, build.tools, sha256), quantize_one, f)
            for f in bf16]
    return build.report([f for f, _ in done], all(reused for _, reused in done))


@task(name="smoke", task_run_name="smoke {layout}/{quant}", retries=1, retry_condition_fn=retry_if_transient,
      **publish_task_options)
def smoke_variant(build: Build, layout: str, quant: str, files: list[GgufFile], mmproj: GgufFile | None
                  ) -> smoke.SmokeResult:
    """Greedy output with and without draft-mtp, drafts accepted above the floor (only a timeout is retried: a
    mismatch or a dead head fails the same way again). Its server takes a few cores beside a quantize."""
    visible(*(f.path for f in files), *([mmproj.path] if mmproj else []))
    [(model, head)] = pair_trunks_with_heads(files)
    key = cache_key(model.sha256, head.sha256 if head else None, mmproj.sha256 if mmproj else None,
                    build.cfg.smoke.model_dump(), build.tools.version)
    return build.cached("smoke", key, smoke.smoke, model, head, build.cfg.smoke,
                        build.tools, mmproj, threads=lane_threads())


@task(name="preupload", task_run_name="preupload {layout}/{quant}", **publish_task_options)
def preupload_variant(build: Build, layout: str, quant: str, files: list[GgufFile]) -> int:
    """Send finished files to the private staging repo while the rest builds; bytes sent. A failure costs
    nothing (the staging commit sends whatever is missing), so it is logged, not raised."""
    limit = build.cfg.target.max_file_size
    check_splittable(files, limit)  # a file that can never be published fails the run before anything is sent
    try:  # a file over the limit is split before the manifest: the staging commit sends its parts
        return preupload([f for f in files if f.size <= limit], build.release.release_dir, build.release.staging,
                         hub_api())
    except PublishError as e:
        get_run_logger().warning("%s", e)
        return 0


@task(name="split", task_run_name="split {layout}/{quant}", **publish_task_options)
def split_variant(build: Build, layout: str, quant: str, files: list[GgufFile]) -> list[GgufFile]:
    """Each file over the Hub's per-file limit replaced by its llama-gguf-split parts, once smoke, bench and
    quality have used it whole. Not cached: the whole file it would be keyed on is gone once split."""
    visible(*(f.path for f in files))
    return [split_file(f, build.cfg.target.max_file_size, build.tools) for f in files]


@task(name="bench", task_run_name="bench {quant}", **publish_task_options)
def bench_variant(build: Build, quant: str, files: list[GgufFile]) -> bench.BenchResult:
    """Plain vs draft-mtp speed of a variant's model (and head), holding the machine's bench slot: timings need the
    machine to themselves."""
    def measure() -> bench.BenchResult:
        with occupy("bench-gpu"):
            return bench.bench(model, head, build.cfg.bench, build.tools)

    visible(*(f.path for f in files))
    [(model, head)] = pair_trunks_with_heads(files)
    key = cache_key(model.sha256, head.sha256 if head else None, build.cfg.bench.model_dump(mode="json"),
                    build.tools.version)
    return build.cached("bench", key, measure)


@task(name="quality", task_run_name="quality", **publish_task_options)
def measure_quality(build: Build, models: list[GgufFile]) -> quality.QualityResult:
    """Perplexity and KL-divergence of every model file against the BF16 one."""
    visible(*(f.path for f in models))
    bf16 = next(f for f in models if f.quant == "BF16")
    key = cache_key([f.sha256 for f in models], build.cfg.quality.model_dump(mode="json"), build.tools.version)
    return build.cached("quality", key, quality.quality, bf16,
                        [f for f in models if f is not bf16], build.cfg.quality, build.tools, build.release.work)


# bounded_disk (flows/build.py, one_at_a_time): each quant is measured, committed and deleted as it is made.

@task(name="kld-base", task_run_name="kld-base", **publish_task_options)
def kld_base_task(build: Build, bf16: list[GgufFile]) -> quality.KldBase:
    """BF16's perplexity and log-probabilities, which each quant is measured against before it is deleted. Not
    cached: the log-probabilities are deleted once the last quant is measured."""
    [model] = [f for f in bf16 if f.role == "model"]
    visible(model.path)
    return quality.kld_base(model, build.cfg.quality, build.tools, build.release.work)


@task(name="kld", task_run_name="kld {quant}", **publish_task_options)
def kld_variant(build: Build, quant: str, files: list[GgufFile], base: quality.KldBase) -> quality.QuantQuality:
    """A quant's perplexity and KL-divergence against BF16, as the quality stage measures it."""
    [model] = [f for f in files if f.role == "model"]
    visible(model.path, base.logits)
    key = cache_key(model.sha256, base.model, build.cfg.quality.model_dump(mode="json"), build.tools.version)
    return build.cached("quality", key, quality.kld, model, base, build.cfg.quality, build.tools)


@task(name="commit", task_run_name="commit {layout}/{quant}", retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=retry_if_transient, **publish_task_options)
def commit_variant(build: Build, layout: str, quant: str, files: list[GgufFile]) -> list[GgufFile]:
    """Commit a variant's files (each split one as its parts) to the staging repo, then delete them here: the
    release's commits plan them from the manifest's sha256 and size (stages/publish.py)."""
    release = build.release
    visible(*(path for f in files for path in f.published))
    commit_finished(files, release.release_dir, release.staging, hub_api(),
                    message=f"mtpress: {build.cfg.name} {layout}/{quant}, tested (bounded disk)")
    for path in (path for f in files for path in f.published):
        path.unlink()
    return files
