"""BF16 GGUF conversion with llama.cpp's own converter, in either layout.

- embedded: one GGUF per quant with the MTP layer inside (what the seeds publish);
- sidecar: the trunk converted with ``--no-mtp`` plus the head exported with ``--mtp``
  as ``mtp-<name>-<QUANT>.gguf``, so runtimes that choke on the extra layer load the trunk.

A multimodal checkpoint's vision tower is exported once, beside the trunks, as
``mmproj-<name>-BF16.gguf`` with the converter's ``--mmproj`` mode: both layouts use the same one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import ModelDir
from mtpress.errors import ModelError
from mtpress.fsutil import sha256_file
from mtpress.naming import gguf_name
from mtpress.stages.gguf_files import GgufFile, Role, read_facts, verify_head, verify_mmproj
from mtpress.toolchain import LlamaCpp, run_tool

CONVERT_TIMEOUT_S = 3 * 3600


def convert(model: ModelDir, arch: ArchSpec, layout: str, *, name: str, tools: LlamaCpp,
            out_dir: Path) -> list[GgufFile]:
    """Convert ``model`` to BF16 GGUF(s) for ``layout`` in ``out_dir``; every file is verified before it appears."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if arch.mtp_layers(model.config) == 0:
        # Released without a head (inject's "no-head"): the plain trunk is all there is, in either layout.
        return [_convert_one(model, arch, layout, "model", ["--no-mtp"], name=name, tools=tools, out_dir=out_dir)]
    if layout == "embedded":
        return [_convert_one(model, arch, layout, "model", [], name=name, tools=tools, out_dir=out_dir)]
    return [_convert_one(model, arch, layout, "model", ["--no-mtp"], name=name, tools=tools, out_dir=out_dir),
            _convert_one(model, arch, layout, "head", ["--mtp"], name=name, tools=tools, out_dir=out_dir)]


def export_mmproj(model: ModelDir, arch: ArchSpec, layout: str, *, name: str, tools: LlamaCpp,
                  out_dir: Path) -> GgufFile:
    """The vision tower as ``mmproj-<name>-BF16.gguf`` in ``out_dir`` (``layout``: the folder's layout)."""
    # The converter reads image_mean/image_std from one of these and dies with a KeyError without them.
    if not any((model.path / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise ModelError(f"{model.label}: it has a vision tower (vision_config) but no preprocessor_config.json, "
                         "which the mmproj export needs (image mean, std and patch sizes)",
                         hint="publish the checkpoint's preprocessor_config.json with it, or set `mmproj: false` "
                              "to release text-only GGUFs")
    out_dir.mkdir(parents=True, exist_ok=True)
    return _convert_one(model, arch, layout, "mmproj", ["--mmproj"], name=name, tools=tools, out_dir=out_dir)


def _convert_one(model: ModelDir, arch: ArchSpec, layout: str, role: Role, flags: list[str], *, name: str,
                 tools: LlamaCpp, out_dir: Path) -> GgufFile:
    final = out_dir / gguf_name(name, "BF16", role)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=out_dir) as work:
        # --mtp and --mmproj name their output (mtp-/mmproj-<dir>-BF16.gguf) only when --outfile is a
        # directory, so always give it a scratch directory and take the one file it wrote.
        run_tool([*tools.converter(), str(model.path), "--outtype", "bf16", "--outfile", work + "/", *flags],
                 timeout=CONVERT_TIMEOUT_S)
        produced = sorted(Path(work).glob("*.gguf"))
        if len(produced) != 1:
            raise RuntimeError(f"converter wrote {[p.name for p in produced]} in {work}, expected one GGUF")
        gguf = describe_gguf(produced[0], arch, model.config, name=final.name, layout=layout, role=role,
                             quant="BF16")
        os.replace(produced[0], final)
    return replace(gguf, path=final)


def describe_gguf(path: Path, arch: ArchSpec, config: dict, *, name: str, layout: str, role: Role,
                  quant: str) -> GgufFile:
    """Read a GGUF back, check it carries (or lacks) the head as its layout demands, and hash it."""
    facts = read_facts(path, head_block=arch.head_gguf_block(config))
    if role == "mmproj":
        verify_mmproj(path)
    else:
        verify_head(path, facts, role=role, layout=layout, mtp_layers=arch.mtp_layers(config))
    return GgufFile(path=path, name=name, layout=layout, role=role, quant=quant, size=path.stat().st_size,
                    sha256=sha256_file(path), nextn_layers=facts.nextn_layers, block_count=facts.block_count,
                    tensor_count=facts.tensor_count, parameters=facts.parameters,
                    head_tensor_types=tuple(sorted(set(facts.head_block_tensors.values()))))

