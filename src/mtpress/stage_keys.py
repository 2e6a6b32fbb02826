"""The cache keys of the GGUF-producing stages, shared by the flow and by its disk preflight.

The preflight must ask the cache the very questions the flow will ask, or a rerun's reuse would
be estimated with keys that never match; so both build their keys here.
"""

from __future__ import annotations

from mtpress.cache import StageCache, cache_key
from mtpress.schema import ReleaseConfig
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp


def convert_key(model_digest: str, layout: str, cfg: ReleaseConfig, tools: LlamaCpp) -> str:
    return cache_key(model_digest, layout, cfg.name, tools.version)


def quantize_key(source: GgufFile, quant: str, cfg: ReleaseConfig, tools: LlamaCpp) -> str:
    return cache_key(source.sha256, quant, cfg.head_type, cfg.head_shared_type, cfg.name, tools.version)


def reused_outputs(cache: StageCache, model_digest: str, cfg: ReleaseConfig, tools: LlamaCpp) -> set[tuple[str, str]]:
    """The (layout, quant) outputs, BF16 included, whose every file the cache already holds intact."""
    reused = set()
    for layout in cfg.layouts:
        bf16 = cache.lookup("convert", convert_key(model_digest, layout, cfg, tools))
        if bf16 is None:
            continue
        reused.add((layout, "BF16"))
        reused |= {(layout, quant) for quant in cfg.quants
                   if all(cache.lookup("quantize", quantize_key(f, quant, cfg, tools)) for f in bf16)}
    return reused
