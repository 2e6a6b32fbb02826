"""The cache keys of the GGUF-producing stages, shared by the flow and by its disk preflight.

The preflight must ask the cache the very questions the flow will ask, or a rerun's reuse would
be estimated with keys that never match; so both build their keys here.
"""

from __future__ import annotations

from mtpress.cache import StageCache, cache_key
from mtpress.fsutil import sha256_file
from mtpress.schema import ReleaseConfig
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp


def convert_key(model_digest: str, layout: str, cfg: ReleaseConfig, tools: LlamaCpp) -> str:
    return cache_key(model_digest, layout, cfg.name, tools.version)


def imatrix_key(bf16: list[GgufFile], cfg: ReleaseConfig, tools: LlamaCpp) -> str:
    """The importance matrix of the first layout's BF16 files, by its inputs."""
    spec = cfg.imatrix
    return cache_key([f.sha256 for f in bf16], spec.calibration and sha256_file(spec.calibration),
                     spec.model_dump(mode="json", exclude={"quants", "timeout_s"}), cfg.name, tools.version)


def quantize_key(source: GgufFile, quant: str, cfg: ReleaseConfig, tools: LlamaCpp, imatrix: str | None) -> str:
    """``imatrix``: the sha256 of the release's importance matrix, which counts only for the quants made with it."""
    used = imatrix if cfg.imatrix.applies_to(quant) else None
    return cache_key(source.sha256, quant, cfg.head_type, cfg.head_shared_type, used, cfg.name, tools.version)


def reused_outputs(cache: StageCache, model_digest: str, cfg: ReleaseConfig, tools: LlamaCpp) -> set[tuple[str, str]]:
    """The (layout, quant) outputs, BF16 included, whose every file the cache already holds intact."""
    converted = {layout: cache.lookup("convert", convert_key(model_digest, layout, cfg, tools))
                 for layout in cfg.layouts}
    first = converted[cfg.layouts[0]]  # the importance matrix is computed from the first layout's files
    matrix = cache.lookup("imatrix", imatrix_key(first, cfg, tools)) if first else None
    imatrix = matrix.sha256 if matrix else None
    reused = set()
    for layout, bf16 in converted.items():
        if bf16 is None:
            continue
        reused.add((layout, "BF16"))
        reused |= {(layout, quant) for quant in cfg.quants
                   if all(cache.lookup("quantize", quantize_key(f, quant, cfg, tools, imatrix)) for f in bf16)}
    return reused
