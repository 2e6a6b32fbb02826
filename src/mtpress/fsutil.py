"""Filesystem helpers: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

HASH_CHUNK = 8 * 1024 * 1024


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``final`` only if the block succeeds.

    A reader never sees a half-written ``final``; a crash leaves only a ``.partial`` file,
    which nothing ever reuses.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.partial")
    try:
        yield tmp
        if tmp.is_dir():
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        else:
            with tmp.open("rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def remove_stale_partials(root: Path) -> list[Path]:
    """Delete what an interrupted run left behind (``*.partial`` files, scratch dirs); nothing else."""
    stale = [p for p in root.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".convert-")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    """The file's sha256, computed once per process for a given inode, size and modification time.

    A release hashes the same bytes several times (input record, cache key, manifest, publish plan);
    files are only ever replaced by renames, which give them a new inode, so the memo cannot go stale.
    """
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _sha256_of(path: str, device: int, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dir_digest(path: Path) -> str:
    """A content id for a directory: the sha256 of every file's name and sha256, in name order."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()
