"""Filesystem helpers: atomic writes and content hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
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


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same bytes as ``src`` without writing them: a hard link, else (another filesystem) a copy."""
    # Hub caches hold relative symlinks into blobs/: link the blob itself, or the link would dangle.
    src = src.resolve()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cache_root() -> Path:
    """Where mtpress keeps what outlives a run: the toolchain, demo models, the file-hash memo, lock files."""
    return Path(os.environ.get("MTPRESS_CACHE") or Path.home() / ".cache" / "mtpress")


def sha256_file(path: Path) -> str:
    """The file's sha256, computed once for a given device, inode, size and modification time.

    A release hashes the same bytes several times (input record, cache key, manifest, publish plan) and
    every rerun hashes them again; files are only ever replaced by renames, which give them a new inode
    and mtime, so a remembered hash cannot go stale. Big files are also remembered across processes
    (an SQLite memo in the cache), which makes an unchanged rerun of a 9B release cheap.
    """
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


MEMO_MIN_BYTES = 1 << 20  # below this, hashing is cheaper than a database round trip


@lru_cache(maxsize=4096)
def _sha256_of(path: str, device: int, inode: int, size: int, mtime_ns: int) -> str:
    key = f"{device}:{inode}:{size}:{mtime_ns}"
    if size >= MEMO_MIN_BYTES and (known := _memo("SELECT sha256 FROM hashes WHERE key = ?", (key,))):
        return known[0]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    if size >= MEMO_MIN_BYTES:
        _memo("INSERT OR REPLACE INTO hashes VALUES (?, ?)", (key, h.hexdigest()))
    return h.hexdigest()


def _memo(sql: str, args: tuple) -> tuple | None:
    """Run one statement on the cross-process hash memo; a memo that cannot be used is simply not used."""
    try:
        path = cache_root() / "file-hashes.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path, timeout=30)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS hashes (key TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
            return db.execute(sql, args).fetchone()
    except (sqlite3.Error, OSError):
        return None


def dir_digest(path: Path) -> str:
    """A content id for a directory: the sha256 of every file's name and sha256, in name order."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()
