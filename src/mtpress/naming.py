"""Every name a release gives: GGUF file names, layout folders, derived repo and folder names, Prefect
artifact keys, and the one rule that pairs a trunk with its head.

File names follow llama.cpp's ``-hf`` conventions: the downloader takes ``<name>-<QUANT>.gguf`` as the
model for tag ``QUANT`` and pairs it with its siblings by prefix (``mtp-`` for the draft head, ``mmproj-``
for the vision projector), so these strings are a contract with llama.cpp, not a style.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter
from pathlib import Path, PurePosixPath
from typing import TypeVar

from mtpress.errors import ConfigError, GateError

HEAD_PREFIX = "mtp-"
MMPROJ_PREFIX = "mmproj-"
ROLE_PREFIX = {"head": HEAD_PREFIX, "mmproj": MMPROJ_PREFIX}
GGUF_SUFFIX = ".gguf"
GGUF_REPO_SUFFIX = "-GGUF"
MTPLX_SUFFIX = "-MTPLX"  # the Apple Silicon pack: its folder beside the release's, its repo beside the GGUF one

F = TypeVar("F")


# llama.cpp's rules (common/download.cpp): names with these words are siblings, never the model.
NOT_A_MODEL = ("mmproj", "imatrix", HEAD_PREFIX, "eagle3-", "dflash-", "dspark-")
MTP_COMPONENT = "mtp"


def file_stem(name: str) -> str:
    """The release name as its files carry it: every ``-``-separated component that is ``MTP`` (any case) dropped
    (``Qwen3.5-9B-Code-MTP`` → ``Qwen3.5-9B-Code``). The Hub's GGUF indexer shows the ``mmproj-`` file as the model
    when the model files' names contain MTP (huggingface.js #2400), and a leading ``MTP-`` would read as a head's
    ``mtp-`` prefix to llama.cpp. The repo name keeps MTP; two releases whose names differ only by it still never
    share a file: each has its own repo, release folder and cache keys, all from the full name."""
    stem = "-".join(part for part in name.split("-") if part.lower() != MTP_COMPONENT)
    if not stem:
        raise ConfigError("name", [f"{name!r} is nothing but MTP, which file names drop: its files would have no name"],
                          hint="name the release after the model, e.g. Qwen3.5-9B-Code-MTP")
    return stem


def gguf_name(name: str, quant: str, role: str) -> str:
    """``Stem-QUANT.gguf``, ``mtp-Stem-QUANT.gguf`` (a head keeps its trunk's tag whatever its tensors' type, so
    ``-hf`` pairs each trunk with the head meant for it) and ``mmproj-Stem-QUANT.gguf``; Stem is ``file_stem(name)``."""
    return f"{ROLE_PREFIX.get(role, '')}{file_stem(name)}-{quant}{GGUF_SUFFIX}"


def imatrix_name(name: str) -> str:
    """``imatrix-Stem.gguf``: the importance matrix the low-bit files were made with. llama.cpp's ``-hf`` never takes a
    name containing ``imatrix`` as the model (NOT_A_MODEL), and it carries no quant tag for a ``:TAG`` to match."""
    return f"imatrix-{file_stem(name)}{GGUF_SUFFIX}"


def is_model_name(path: str) -> bool:
    """A GGUF llama.cpp's ``-hf`` may take as the model (not a head, projector, imatrix or other sibling)."""
    return path.endswith(GGUF_SUFFIX) and not any(word in PurePosixPath(path).name for word in NOT_A_MODEL)


def check_indexer_names(paths: Iterable[str]) -> None:
    """Refuse a file list the Hub's GGUF indexer misreads: a root model file whose name contains MTP beside a root
    ``mmproj-`` file makes the model page show the projector (``clip``, 0.5B) as the model (huggingface.js #2400)."""
    root = [p for p in paths if "/" not in p and p.endswith(GGUF_SUFFIX)]
    mmproj = [p for p in root if p.startswith(MMPROJ_PREFIX)]
    misread = [p for p in root if is_model_name(p) and MTP_COMPONENT in p.lower()]
    if mmproj and misread:
        raise GateError(f"the Hub's model page would show {mmproj[0]} (the vision projector) as the model: "
                        f"model files named with MTP beside it: {', '.join(misread)}",
                        hint="name model files without MTP (naming.gguf_name does; keep MTP in the repo name), "
                             "see huggingface.js issue #2400")


# llama.cpp's split parts (common/download.cpp get_gguf_split_info): ``<prefix>-00001-of-00003.gguf``; `-hf` takes
# part 1 as the model and fetches every part with the same prefix and count.
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$", re.IGNORECASE)


def split_part_name(filename: str, index: int, count: int) -> str:
    """Part ``index`` (from 1) of ``count`` of a GGUF: ``X-Q8_0.gguf`` → ``X-Q8_0-00001-of-00003.gguf``, the name
    ``llama-gguf-split --split`` writes and ``-hf repo:Q8_0`` matches (its tag is followed by ``-``)."""
    return f"{filename.removesuffix(GGUF_SUFFIX)}-{index:05d}-of-{count:05d}{GGUF_SUFFIX}"


def split_index(filename: str) -> tuple[str, int, int] | None:
    """(the unsplit name, part index, part count) of a part's name; None for a file that is not a part."""
    match = SPLIT_PART.search(filename.removesuffix(GGUF_SUFFIX))
    if match is None:
        return None
    return f"{filename.removesuffix(GGUF_SUFFIX)[:match.start()]}{GGUF_SUFFIX}", int(match[1]), int(match[2])


def head_name(trunk: str) -> str:
    """The head file ``-hf`` looks for beside a trunk file (``X-Q4_K_M.gguf`` → ``mtp-X-Q4_K_M.gguf``)."""
    return f"{HEAD_PREFIX}{trunk}"


def is_head(filename: str) -> bool:
    return filename.startswith(HEAD_PREFIX)


def layout_folder(layout: str, layouts: Sequence[str]) -> str:
    """The repo folder of a layout: the first listed sits at the root, where ``-hf user/repo:QUANT`` looks;
    the others in a folder named after the layout (``embedded/``)."""
    return "" if layout == layouts[0] else layout


def layout_dir(release_dir: Path, layout: str, layouts: Sequence[str]) -> Path:
    return release_dir / layout_folder(layout, layouts)


def staging_repo(repo: str) -> str:
    """The private repo the release gate verifies before promotion to ``repo``."""
    return f"{repo}-staging"


def realign_repo(repo: str) -> str:
    """The private repo a head re-aligned on another machine is exchanged through."""
    return f"{repo}-realign"


def watched_release_name(finetune_repo: str) -> str:
    """The release the watcher makes of a fine-tune: ``owner/Name`` → ``Name-MTP``."""
    return f"{finetune_repo.split('/', 1)[1]}-MTP"


def gguf_repo(namespace: str, release: str) -> str:
    return f"{namespace}/{release}{GGUF_REPO_SUFFIX}"


def default_mlx_repo(repo: str) -> str:
    """The MTPLX pack's repo beside the GGUF ``repo``: ``owner/Name-GGUF`` → ``owner/Name-MTPLX``; a name without
    the suffix gets ``-MTPLX`` appended."""
    owner, name = repo.split("/", 1)
    return f"{owner}/{name.removesuffix(GGUF_REPO_SUFFIX)}{MTPLX_SUFFIX}"


def mlx_release_name(release: str) -> str:
    return f"{release}{MTPLX_SUFFIX}"


def mlx_folder(release_dir: Path) -> Path:
    """The pack's folder beside the release folder: it is published to a repo of its own, in one commit."""
    return release_dir.with_name(mlx_release_name(release_dir.name))


def artifact_key(release: str, what: str) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    return "".join(c if c.isalnum() else "-" for c in f"{release}-{what}".lower())


def pair_trunks_with_heads(files: Iterable[F], facts: Callable[[F], tuple[str, str, str]] = attrgetter(
        "role", "layout", "quant")) -> list[tuple[F, F | None]]:
    """Each trunk (role ``model``) with its head: the ``head`` file of the same layout and quant. An embedded
    trunk carries its own head (there is no head file in that layout): None. ``facts`` reads (role, layout,
    quant) from a file; the default reads attributes (GgufFile, the manifest's files)."""
    files = list(files)
    heads = {(layout, quant): f for f in files for role, layout, quant in [facts(f)] if role == "head"}
    return [(f, heads.get((layout, quant))) for f in files for role, layout, quant in [facts(f)] if role == "model"]
