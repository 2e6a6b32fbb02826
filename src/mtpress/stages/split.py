"""Files over the Hub's per-file limit become llama.cpp split parts.

The Hub refuses a file above its limit (50 GB) after the files before it were sent; llama.cpp's convention
for bigger models is ``llama-gguf-split --split``, whose ``<Name>-<QUANT>-00001-of-0000N.gguf`` parts
``llama-server -m <part 1>`` and ``-hf repo:QUANT`` load whole (common/download.cpp pulls every part with
part 1's prefix and count).

Only a model can be split. llama.cpp's ``-hf`` fetches its siblings (the ``mtp-`` head, the ``mmproj-``
projector) as one file each, so a split head would load as its first part alone: such a file is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from mtpress.errors import FileTooLargeError, QualityGateError
from mtpress.fsutil import sha256_file
from mtpress.naming import split_index, split_part_name
from mtpress.stages.gguf_files import GgufFile, Role, SplitPart, read_gguf_header
from mtpress.toolchain import LlamaCpp, run_tool

SPLIT_TIMEOUT_S = 3 * 3600
GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: gguf-split pads each tensor to it and counts the padding
MB = 1000 * 1000  # gguf-split's --split-max-size unit "M" (split_str_to_n_bytes): decimal megabytes


def check_file_sizes(files: Mapping[str, Path], max_file_size: int, repo: str) -> None:
    """Refuse, before any upload, a release holding a file over the Hub's per-file limit."""
    for path, local in files.items():
        if (size := local.stat().st_size) > max_file_size:
            raise FileTooLargeError(
                f"{path} is {size:,d} bytes, over the {max_file_size:,d}-byte per-file limit of {repo}",
                hint="models above it are published as llama-gguf-split parts (stages/split.py); a head or an "
                     "mmproj that large cannot be split (-hf fetches it as one file): quantize it smaller")


def split_size(path: Path, max_file_size: int) -> int:
    """The ``--split-max-size`` (in MB) whose parts stay under ``max_file_size``: gguf-split counts only tensor
    bytes, and part 1 carries the whole header (the 248k-token vocabulary: megabytes) on top of them."""
    _, tensors = read_gguf_header(path, ())
    padded = {}
    for name, kind, count in tensors:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        padded[name] = -(-(count // block * type_size) // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    header = path.stat().st_size - sum(padded.values())
    size = (max_file_size - header) // MB
    largest = max(padded, key=padded.__getitem__)
    # gguf-split never cuts a tensor: one larger than a part leaves a part empty ("one of splits have 0 tensors").
    if padded[largest] > size * MB:
        raise FileTooLargeError(f"{path.name}: tensor {largest} ({padded[largest]:,d} bytes) and the file's "
                                f"{header:,d}-byte header do not fit the per-file limit {max_file_size:,d}, and "
                                "gguf-split never cuts a tensor", hint="raise target.max_file_size")
    return size


def split_gguf(path: Path, role: Role, max_file_size: int, tools: LlamaCpp) -> list[Path]:
    """``[path]`` when it fits the limit; else its parts, written beside it by the pinned ``llama-gguf-split``,
    with ``path`` removed (the parts are what is published)."""
    if path.stat().st_size <= max_file_size:
        return [path]
    if role != "model":
        check_file_sizes({path.name: path}, max_file_size, "the Hub")
    size = split_size(path, max_file_size)
    argv = [str(tools.tool("llama-gguf-split")), "--split", "--split-max-size", f"{size}M", str(path),
            str(path.with_suffix(""))]
    run_tool(argv, timeout=SPLIT_TIMEOUT_S)
    parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    expected = [path.with_name(split_part_name(path.name, i, len(parts))) for i in range(1, len(parts) + 1)]
    if len(parts) < 2 or parts != expected:
        raise QualityGateError(f"{path.name}: llama-gguf-split wrote {[p.name for p in parts]}, expected "
                               f"{len(expected)} parts named {split_part_name(path.name, 1, len(expected))}…",
                               hint="the toolchain's gguf-split names parts differently; check its version")
    check_file_sizes({p.name: p for p in parts}, max_file_size, "the Hub")
    path.unlink()
    return parts


def check_splittable(files: Iterable[GgufFile], max_file_size: int) -> None:
    """Refuse, from the built files alone, one over the limit that cannot be published: a head or an mmproj, or
    a model whose largest tensor does not fit a part. Run before any upload, so nothing is sent for a release
    that cannot be published."""
    for f in files:
        if f.size > max_file_size:
            if f.role != "model":
                check_file_sizes({f.name: f.path}, max_file_size, "the Hub")
            split_size(f.path, max_file_size)


def split_file(file: GgufFile, max_file_size: int, tools: LlamaCpp) -> GgufFile:
    """``file`` as published: unchanged when it fits the limit, else with the parts that replaced it."""
    if file.size <= max_file_size:
        return file
    # Parts an earlier run left under another limit (another count) would be taken for, or published beside, these.
    for stale in file.path.parent.glob(f"{file.path.stem}-*-of-*.gguf"):
        if (index := split_index(stale.name)) and index[0] == file.path.name:
            stale.unlink()
    parts = split_gguf(file.path, file.role, max_file_size, tools)
    return dataclasses.replace(file, parts=tuple(SplitPart(p.name, p.stat().st_size, sha256_file(p)) for p in parts))
