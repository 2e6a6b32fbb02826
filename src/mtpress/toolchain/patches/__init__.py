"""Fixes mtpress carries on top of the pinned llama.cpp, as patch files the toolchain applies.

Each ``*.patch`` here is a unified diff against the pinned source tree (``patch -p1`` from its root) with
a rationale header, written so it could be proposed upstream as it is. They touch only the converter's
Python files (``CONVERTER_PATHS``), so a cached toolchain gets new or changed patches without a rebuild:
those files are taken afresh from the pinned sdist and every patch applied to them again.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

PATCHES = tuple(sorted(Path(__file__).parent.glob("*.patch")))
# What patches may touch: the converter's script, its model classes and gguf-py (the converter imports
# the gguf-py beside it, not the copy installed in its environment).
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")


def patch_digests() -> dict[str, str]:
    """{patch file name: sha256}: what the toolchain stamp and ``LlamaCpp.describe()`` record."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in PATCHES}


def extract_converter(archive: Path, dest: Path) -> None:
    """The converter's Python files (``CONVERTER_PATHS``), unmodified, from the pinned sdist into ``dest``."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            _, inside, path = member.name.partition("/llama.cpp/")
            if inside and path.split("/")[0] in CONVERTER_PATHS:
                members.append(member.replace(name=path, deep=False))
        tar.extractall(dest, members=members, filter="data")
