"""Every name a release gives: GGUF file names, layout folders, derived repo and folder names, Prefect
artifact keys, and the one rule that pairs a trunk with its head.

File names follow llama.cpp's ``-hf`` conventions: the downloader takes ``<name>-<QUANT>.gguf`` as the
model for tag ``QUANT`` and pairs it with its siblings by prefix (``mtp-`` for the draft head, ``mmproj-``
for the vision projector), so these strings are a contract with llama.cpp, not a style.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import TypeVar

HEAD_PREFIX = "mtp-"
MMPROJ_PREFIX = "mmproj-"
ROLE_PREFIX = {"head": HEAD_PREFIX, "mmproj": MMPROJ_PREFIX}
GGUF_SUFFIX = ".gguf"
GGUF_REPO_SUFFIX = "-GGUF"
MTPLX_SUFFIX = "-MTPLX"  # the Apple Silicon pack: its folder beside the release's, its repo beside the GGUF one

F = TypeVar("F")


def gguf_name(name: str, quant: str, role: str) -> str:
    """``Name-QUANT.gguf``, ``mtp-Name-QUANT.gguf`` (a head keeps its trunk's tag whatever its tensors' type, so
    ``-hf`` pairs each trunk with the head meant for it) and ``mmproj-Name-QUANT.gguf``."""
    return f"{ROLE_PREFIX.get(role, '')}{name}-{quant}{GGUF_SUFFIX}"


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
