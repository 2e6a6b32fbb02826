"""Quantize a BF16 GGUF with llama-quantize, optionally keeping the MTP head at a higher precision."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from mtpress.archs.base import ArchSpec
from mtpress.naming import gguf_name
from mtpress.stages.convert import describe_gguf
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.imatrix import ImatrixFile
from mtpress.toolchain import LlamaCpp, run_tool

QUANTIZE_TIMEOUT_S = 3 * 3600


def quantize(src: GgufFile, quant: str, arch: ArchSpec, config: dict, *, name: str, tools: LlamaCpp,
             head_type: str | None = None, shared_type: str | None = None, imatrix: ImatrixFile | None = None
             ) -> GgufFile:
    """Write ``<name>-<quant>.gguf`` (or its ``mtp-`` head) beside ``src``.

    ``shared_type``: a sidecar head file's own token embedding and output matrix at this type (the config's
    ``head_shared_type``); the trunk's copies are the trunk's business.

    ``imatrix``: weigh each tensor's rounding error by it (stages/imatrix.py); the result names it.

    A head file keeps the trunk's tag in its name whatever precision its tensors got, so llama.cpp's
    ``-hf`` pairs each trunk with the head meant for it.
    """
    final = src.path.parent / gguf_name(name, quant, src.role)
    partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
    argv = [str(tools.tool("llama-quantize"))]
    if head_type and src.nextn_layers:
        argv += ["--tensor-type", rf"blk\.{arch.head_gguf_block(config)}\.={head_type.lower()}"]
    if shared_type and src.role == "head":
        argv += ["--token-embedding-type", shared_type.lower(), "--output-tensor-type", shared_type.lower()]
    if imatrix is not None:
        # llama-quantize records the path as given (quantize.imatrix.file): from beside the matrix, a published file
        # names the matrix, not this machine's directories.
        argv += ["--imatrix", imatrix.path.name]
    argv += [str(src.path.resolve()), str(partial.resolve()), quant, str(os.cpu_count() or 2)]
    try:
        run_tool(argv, timeout=QUANTIZE_TIMEOUT_S, cwd=imatrix.path.parent if imatrix else None)
        gguf = describe_gguf(partial, arch, config, name=final.name, layout=src.layout, role=src.role, quant=quant)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return replace(gguf, path=Path(final), imatrix=imatrix.name if imatrix else None)
