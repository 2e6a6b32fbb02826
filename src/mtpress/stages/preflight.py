"""Checks that run before any long work: is there room for everything the release will write?"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import ModelDir
from mtpress.errors import InsufficientDiskError
from mtpress.schema import QUANT_TYPES, ReleaseConfig

SAFETY_MARGIN = 1.10


def planned_output_bytes(model: ModelDir, arch: ArchSpec, cfg: ReleaseConfig,
                         reused: Collection[tuple[str, str]] = ()) -> int:
    """An upper estimate of the GGUF bytes a release writes, from the checkpoint's tensor sizes.

    Each layout writes BF16 plus every quant (a quant is about bits/16 of BF16). The sidecar
    head file repeats the vocabulary-sized tensors (embedding, output) next to the head.
    ``reused`` names the (layout, quant) outputs a rerun takes from the stage cache: they write nothing.
    """
    tensors = model.tensors
    bf16 = sum(t.n_elements for t in tensors.values()) * 2
    vocab = arch.text_config(model.config)["vocab_size"]
    vocab_sized = sum(t.n_elements for t in tensors.values() if t.shape and t.shape[0] == vocab) * 2
    per_layout = {"embedded": bf16, "sidecar": bf16 + vocab_sized}
    return int(sum(per_layout[layout] * QUANT_TYPES[quant] / 16 for layout in cfg.layouts
                   for quant in ("BF16", *cfg.quants) if (layout, quant) not in reused))


def check_disk_space(release_dir: Path, required: int) -> None:
    """Refuse to start when the release folder's filesystem cannot hold ``required`` bytes (plus a margin)."""
    existing = next(p for p in (release_dir, *release_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    needed = int(required * SAFETY_MARGIN)
    if needed > free:
        raise InsufficientDiskError(
            f"{existing}: {free / 2**30:.1f} GiB free, the release needs about {needed / 2**30:.1f} GiB "
            "(BF16 and every quant, in each layout)",
            hint="free space, choose another --output on a bigger disk, or trim `quants:`/`layouts:` in the config")
