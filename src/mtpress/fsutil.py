"""Filesystem helpers: atomic writes, content hashes, and one run per release folder."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TextIO

from mtpress.errors import ReleaseBusyError

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
    """Delete what an interrupted run left behind in ``root`` (``*.partial`` files and scratch dirs, the
    converter's ``.convert-*`` dirs); nothing else. Only safe while ``hold_folder`` holds ``root``: another
    run's scratch files look the same."""
    stale = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if name.endswith(".partial") or name.startswith(".convert-"):
                stale.append(Path(folder) / name)
        dirs[:] = [d for d in dirs if Path(folder) / d not in stale]  # what is deleted whole is not searched
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def claim_folders(*folders: Path) -> list[Path]:
    """Make this run the only one using ``folders`` (``hold_folder``), then remove what killed runs left in them:
    only once they are held can a partial file be nobody's. What was removed."""
    for folder in folders:
        hold_folder(folder)
    return [path for folder in folders for path in remove_stale_partials(folder)]


RUN_LOCK = ".mtpress-run.lock"
_held: dict[Path, TextIO] = {}  # folder → its open lock file, for as long as this process lives


def hold_folder(folder: Path) -> None:
    """Make this process the only mtpress run using ``folder`` (created if missing) until it exits.

    An exclusive ``flock`` on ``folder/.mtpress-run.lock``, which holds the holder's pid for the message of a
    run that finds it taken: ReleaseBusyError, at once. The kernel releases the lock when the process ends,
    ``kill -9`` included, so a killed run never blocks the next one. It is kept until then, not released at
    the end of a run: a run that fails keeps its frames (and what they hold) alive in its traceback, and runs
    of one folder in one process follow each other (the demo, tests), which holding it again allows.
    """
    folder = folder.resolve()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / RUN_LOCK).open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise ReleaseBusyError(f"{folder} is in use by another mtpress run ({holder})",
                               hint="wait for that run to end, or stop it; two runs of one release would delete "
                                    "each other's partial files. A killed run frees the folder at once, and the "
                                    "next run removes what it left") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    lock.flush()
    _held[folder] = lock


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
