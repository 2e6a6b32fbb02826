"""The quant matrix, built two ways from one checkpoint: all at once (the default), or one file at a time on a disk
smaller than the release (``bounded_disk``). Both return the same ``Built``: the same files, smoke tests, bench and
quality figures, in the same order, so the manifest and card do not tell them apart.

All at once: every finished file is smoke-tested, and sent to the staging repo, by a task of its own while the next
one quantizes. Lanes keep it to one conversion (its memory peak is the run's), one smoke and one upload at a time,
each task waiting for the one before it (``wait_for``); the global limit ``quantize-cpu`` keeps it to one quantize
per machine. The quants wait for the BF16 smoke test, so a head that drafts nothing fails before hours of
quantizing. Benchmarks and quality run after everything: their timings need the machine to themselves.

One at a time: one lane for everything. Each quant is made, smoke-tested, benchmarked, measured against BF16's
log-probabilities, split if over the Hub's limit, committed to the staging repo and deleted here before the next
is made; a layout's BF16 files go last, once every quant is made from them. So the release folder holds at most
one layout's BF16 files and one quant's, and nothing overlaps a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect.futures import PrefectFuture

from flows.release import Build, Lane, bench_quants, settle
from flows.tasks import (
    bench_variant,
    commit_variant,
    convert_layout,
    kld_base_task,
    kld_variant,
    make_imatrix,
    measure_quality,
    preupload_variant,
    quantize_layout,
    smoke_variant,
    split_variant,
)
from mtpress.stages.bench import BenchResult
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.imatrix import ImatrixFile
from mtpress.stages.quality import QualityResult, summarise
from mtpress.stages.smoke import SmokeResult


@dataclass(frozen=True)
class Built:
    files: list[GgufFile]  # as published: a file over the Hub's limit with its parts
    imatrix: ImatrixFile | None
    smoke: list[SmokeResult]
    bench: list[BenchResult]
    quality: QualityResult | None


def all_at_once(build: Build, mmproj: PrefectFuture | None) -> Built:
    """``mmproj``: the vision encoder's export, which the smoke tests wait for."""
    cfg, staging = build.cfg, build.release.staging
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
        if staging:
            uploads.submit(preupload_variant, build, layout, quant, files)
    if mmproj and staging:
        uploads.submit(preupload_variant, build, "", "mmproj", [mmproj])
    smoke_results = settle([smoked[variant] for variant in build.variants()])
    made = dict(zip(variants, settle(list(variants.values()))))
    files = [f for variant in build.variants() for f in made[variant]]
    [imatrix] = settle([matrix])
    settle(uploads.futures)

    root = [f for f in files if f.layout == build.layouts[0]]  # one layout is enough: both hold the same weights
    benches = [build.step(bench_variant, build, quant, [f for f in root if f.quant == quant]).result()
               for quant in bench_quants(cfg) if build.has_head and cfg.bench.enabled]
    quality = (build.step(measure_quality, build, [f for f in root if f.role == "model"]).result()
               if cfg.quality.enabled else None)
    # Built, smoke-tested and measured whole (llama-quantize needs the whole BF16); a file over the Hub's per-file
    # limit is published as its llama-gguf-split parts, which the manifest, card and gate then name.
    files = [published for f in files for published in split_variant(build, f.layout, f.quant, [f])]
    return Built(files + [f for f in settle([mmproj]) if f], imatrix, smoke_results, benches, quality)


def one_at_a_time(build: Build, mmproj: PrefectFuture | None) -> Built:
    cfg, lane, root = build.cfg, Lane(build.progress), build.layouts[0]
    smoked, committed, benches, klds = {}, {}, {}, []
    matrix = base = None
    for layout in build.layouts:
        made = {"BF16": lane.submit(convert_layout, build, layout)}
        smoked[layout, "BF16"] = lane.submit(smoke_variant, build, layout, "BF16", made["BF16"], mmproj)
        if layout == root:
            matrix = lane.submit(make_imatrix, build, made["BF16"]) if cfg.imatrix_quants else None
            base = lane.submit(kld_base_task, build, made["BF16"]) if cfg.quality.enabled else None
        for quant in (*cfg.quants, "BF16"):  # BF16 last: every quant of the layout is made from it
            if quant != "BF16":
                made[quant] = lane.submit(quantize_layout, build, layout, quant, made["BF16"], matrix)
                smoked[layout, quant] = lane.submit(smoke_variant, build, layout, quant, made[quant], mmproj)
            if layout == root and build.has_head and cfg.bench.enabled and quant in bench_quants(cfg):
                benches[quant] = lane.submit(bench_variant, build, quant, made[quant])
            if layout == root and base is not None and quant != "BF16":
                klds.append(lane.submit(kld_variant, build, quant, made[quant], base))
            split = lane.submit(split_variant, build, layout, quant, made[quant])
            committed[layout, quant] = lane.submit(commit_variant, build, layout, quant, split)
    settle(lane.futures)  # the first failure, not the tasks left pending behind it
    made = dict(zip(committed, settle(list(committed.values()))))
    files = [f for variant in build.variants() for f in made[variant]]
    [imatrix, base] = settle([matrix, base])
    quality = summarise(base, settle(klds), cfg.quality, build.tools) if base else None
    return Built(files + [f for f in settle([mmproj]) if f], imatrix, settle([smoked[v] for v in build.variants()]),
                 settle([benches[quant] for quant in bench_quants(cfg) if quant in benches]), quality)
