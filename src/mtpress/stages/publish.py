"""Publish a release folder to a Hub repo as exactly one commit, or nothing.

The repo is made to match the folder: new and changed files are added, files the
release no longer has are deleted, unchanged files are skipped by comparing content
ids with the remote (sha256 for LFS files, the git blob id for small ones). A run
with nothing changed makes no commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from mtpress.errors import PublishError
from mtpress.fsutil import HASH_CHUNK, sha256_file
from mtpress.schema import Target
from mtpress.stages.gguf_files import GgufFile

Status = Literal["new", "changed", "unchanged", "deleted"]
KEEP_REMOTE = {".gitattributes"}


@dataclass(frozen=True)
class PlannedFile:
    path: str
    size: int
    status: Status


@dataclass(frozen=True)
class PublishPlan:
    repo: str
    parent_commit: str | None  # None: the repo does not exist yet
    files: tuple[PlannedFile, ...]

    @property
    def changes(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if f.status != "unchanged")

    def describe(self) -> str:
        lines = [f"publish plan for {self.repo} (parent {self.parent_commit or 'new repo'}):"]
        lines += [f"  {f.status:9} {f.size:>14,d}  {f.path}" for f in self.files]
        return "\n".join(lines)


@dataclass(frozen=True)
class PublishResult:
    repo: str
    commit: str
    committed: bool
    url: str
    bytes_uploaded: int
    plan: PublishPlan


def release_files(release_dir: Path) -> dict[str, Path]:
    """Repo path → local file for everything the release publishes (hidden and partial files excluded)."""
    files = {}
    for path in sorted(release_dir.rglob("*")):
        relative = path.relative_to(release_dir)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    return files


def plan_publish(release_dir: Path, target: Target, api: HfApi) -> PublishPlan:
    local = release_files(release_dir)
    try:
        info = api.model_info(target.repo, files_metadata=True)
    except RepositoryNotFoundError:
        return PublishPlan(target.repo, None, tuple(PlannedFile(p, f.stat().st_size, "new") for p, f in local.items()))
    remote = {s.rfilename: s for s in info.siblings or []}
    planned = []
    for repo_path, path in local.items():
        sibling = remote.get(repo_path)
        if sibling is None:
            status: Status = "new"
        elif sibling.lfs is not None:
            status = "unchanged" if sibling.lfs.sha256 == sha256_file(path) else "changed"
        else:
            status = "unchanged" if sibling.blob_id == _git_blob_id(path) else "changed"
        planned.append(PlannedFile(repo_path, path.stat().st_size, status))
    planned += [PlannedFile(name, s.size or 0, "deleted") for name, s in remote.items()
                if name not in local and name not in KEEP_REMOTE]
    return PublishPlan(target.repo, info.sha, tuple(planned))


def publish(release_dir: Path, target: Target, api: HfApi, *, message: str, dry_run: bool = False) -> PublishResult:
    """Make ``target.repo`` match ``release_dir`` in one commit; raise PublishError with nothing committed."""
    if not api.token:
        raise PublishError(f"no Hub token to publish {target.repo} with",
                           hint="set HF_TOKEN (a write token) in the environment or a Prefect Secret block")
    try:
        plan = plan_publish(release_dir, target, api)
        url = f"{api.endpoint}/{target.repo}"
        if dry_run or not plan.changes:
            return PublishResult(target.repo, plan.parent_commit or "", False, url, 0, plan)
        if plan.parent_commit is None:
            api.create_repo(target.repo, private=target.private, exist_ok=True)
            plan = plan_publish(release_dir, target, api)
        local = release_files(release_dir)
        operations = [CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=local[f.path])
                      for f in plan.changes if f.status in ("new", "changed")]
        operations += [CommitOperationDelete(path_in_repo=f.path) for f in plan.changes if f.status == "deleted"]
        info = api.create_commit(target.repo, operations, commit_message=message, parent_commit=plan.parent_commit)
    except HfHubHTTPError as e:
        raise PublishError(f"publishing {target.repo} failed, nothing was committed: {_first_line(e)}",
                           hint="check the token's write access and the endpoint (HF_ENDPOINT); rerun to retry") from e
    uploaded = sum(f.size for f in plan.changes if f.status != "deleted")
    return PublishResult(target.repo, info.oid, info.oid != plan.parent_commit, url, uploaded, plan)


def preupload(files: Sequence[GgufFile], release_dir: Path, target: Target, api: HfApi) -> int:
    """Send finished files' LFS objects to the private ``target.repo`` ahead of its commit; return the bytes sent.

    Nothing becomes visible: the objects belong to no commit until ``publish`` commits the folder, which then
    finds them on the Hub and sends only what is still missing. Creates the repo if it does not exist, which
    is why it must be private. Files the repo's main branch already holds with the same sha256 are skipped.
    """
    if not target.private:
        raise PublishError(f"refusing to pre-upload to {target.repo}: it is public, and creating it now would "
                           "show an empty release", hint="pre-upload only to the private staging repo")
    try:
        api.create_repo(target.repo, private=True, exist_ok=True)
        remote = {s.rfilename: s.lfs.sha256 for s in api.model_info(target.repo, files_metadata=True).siblings or []
                  if s.lfs is not None}
        missing = [f for f in files if remote.get(f.path.relative_to(release_dir).as_posix()) != f.sha256]
        if missing:
            api.preupload_lfs_files(target.repo, additions=[
                CommitOperationAdd(path_in_repo=f.path.relative_to(release_dir).as_posix(), path_or_fileobj=f.path)
                for f in missing])
    except HfHubHTTPError as e:
        raise PublishError(f"pre-uploading to {target.repo} failed: {_first_line(e)}",
                           hint="nothing was committed; the commit sends these files itself") from e
    return sum(f.size for f in missing)


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
