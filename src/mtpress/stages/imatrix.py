"""The importance matrix: llama-imatrix over a calibration text, once per release, from its BF16 files.

llama-quantize weighs each tensor's rounding error by how strongly the calibration text activates each of its
input columns, which is what lets 2- and 3-bit files stay usable (and what IQ2_M and the other types in
schema.IMATRIX_REQUIRED cannot be made without). The MTP head is covered: ``-md`` runs a sidecar head on the
trunk's hidden states, ``--nextn`` an embedded one, and the head's tensors carry the same names in both layouts,
so one matrix serves every file of the release.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader

from mtpress.errors import ToolchainError
from mtpress.fsutil import sha256_file
from mtpress.naming import imatrix_name
from mtpress.schema import ImatrixSpec
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.quality import run_on_text, shipped_or_own
from mtpress.toolchain import LlamaCpp

CALIBRATION_RESOURCE = "data/imatrix_calibration.txt"
# Each tensor's statistics are stored as these (tools/imatrix/imatrix.cpp, save_imatrix).
STATISTIC_SUFFIXES = (".in_sum2", ".counts", ".in_sum")


@dataclass(frozen=True)
class ImatrixFile:
    """The published ``imatrix-<stem>.gguf`` and what it was computed from."""

    path: Path
    name: str  # its path in the repo
    size: int
    sha256: str
    calibration: str  # the shipped text by its resource name, a publisher's own by its file name
    calibration_sha256: str
    ctx_size: int
    chunks: int | None  # as asked; None: every chunk the text fills
    tensors: int  # weight matrices it holds statistics for
    head_tensors: int  # of which the MTP head's (blk.<head block>.)
    llama_cpp: str


def compute_imatrix(model: GgufFile, head: GgufFile | None, spec: ImatrixSpec, *, name: str, head_block: int,
                    tools: LlamaCpp) -> ImatrixFile:
    """Write ``imatrix-<stem>.gguf`` beside ``model`` (atomically) from the calibration text.

    ``head``: a sidecar head file, run with ``-md``; an embedded head is run with ``--nextn``. Both need one
    sequence per batch (``-b`` = ``-c``). Refuses a matrix that misses the head's tensors: llama-quantize would
    then quantize them blind (or, at the types that need one, refuse after the conversion).
    """
    calibration, calibration_name = shipped_or_own(spec.calibration, CALIBRATION_RESOURCE)
    calibration = calibration.resolve()
    final = model.path.parent / imatrix_name(name)
    partial = final.with_name(f".{final.name}.{os.getpid()}.partial")
    # The imatrix records the text's path as given (imatrix.datasets): run beside the text, so a published
    # imatrix names the file, not this machine's directories.
    argv = [tools.tool("llama-imatrix"), "-m", model.path.resolve(), "-f", calibration.name, "-o", partial.resolve(),
            "--no-ppl", "-c", str(spec.ctx_size), "-b", str(spec.ctx_size),
            "-t", str(spec.threads or os.cpu_count() or 2), *(["--chunks", str(spec.chunks)] if spec.chunks else [])]
    argv += ["-md", head.path.resolve()] if head is not None else ["--nextn"] if model.nextn_layers else []
    try:
        run_on_text(argv, timeout=spec.timeout_s, text=calibration, ctx_key="imatrix.ctx_size", cwd=calibration.parent)
        if not partial.is_file():
            raise ToolchainError(f"llama-imatrix exited without writing {final.name}")
        tensors = {t.name.removesuffix(suffix) for t in GGUFReader(partial).tensors
                   for suffix in STATISTIC_SUFFIXES if t.name.endswith(suffix)}
        head_tensors = sum(t.startswith(f"blk.{head_block}.") for t in tensors)
        if (head is not None or model.nextn_layers) and not head_tensors:
            raise ToolchainError(f"llama-imatrix b{tools.version} recorded nothing for the MTP head (blk.{head_block}) "
                                 f"of {model.name}", hint="check the toolchain's llama-imatrix supports --nextn / -md")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return ImatrixFile(path=final, name=final.name, size=final.stat().st_size, sha256=sha256_file(final),
                       calibration=calibration_name,
                       calibration_sha256=sha256_file(calibration), ctx_size=spec.ctx_size, chunks=spec.chunks,
                       tensors=len(tensors), head_tensors=head_tensors, llama_cpp=tools.version)
