"""Publish a release folder to a Hub repo as exactly one commit, or nothing.

The repo is made to match the folder: new and changed files are added, files the
release no longer has are deleted, unchanged files are skipped by comparing content
ids with the remote (sha256 for LFS files, the git blob id for small ones). A run
with nothing changed makes no commit.

A release file that is not in the folder (``elsewhere``: committed to the staging repo and deleted here by a
bounded-disk run, flows/build.py) is planned by the manifest's sha256 and size, and committed as content the Hub
already stores, which it must then hold (``commit_finished`` put it there).

The commit names the head it was planned on: when another writer moves the branch in between, the Hub answers
412, nothing is committed and the run ends (PublishConflictError, never retried: a new plan would delete what
they added). A public target is created private and opened by the step after its commit landed, so no failure
leaves an empty public repo. ``check_write_access`` refuses a token that cannot publish before anything is built.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

from mtpress.errors import PublishConflictError, PublishError
from mtpress.fsutil import HASH_CHUNK, sha256_file
from mtpress.manifest import read_manifest
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
    private: bool = True  # the repo's visibility now; one that does not exist yet is created private

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
    bytes_uploaded: int  # what the commit sent: content the Hub already stored (pre-uploaded, deduplicated) is not
    plan: PublishPlan


def release_files(release_dir: Path) -> dict[str, Path]:
    """Repo path → local file for everything the release publishes (hidden and partial files excluded)."""
    files = {}
    for path in sorted(release_dir.rglob("*")):
        relative = path.relative_to(release_dir)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path
    return files


def remove_unlisted_ggufs(release_dir: Path, listed: set[str]) -> list[str]:
    """Delete every GGUF in the release folder that this release does not list (a quant an earlier run of another
    config built, a file since split): the commit publishes the whole folder, and nothing untested may reach it.
    Returns their repo paths."""
    unlisted = [path for path in release_files(release_dir) if path.endswith(".gguf") and path not in listed]
    for path in unlisted:
        (release_dir / path).unlink()
    return unlisted


def stored_elsewhere(release_dir: Path) -> dict[str, tuple[str, int]]:
    """(sha256, size) by repo path of each file the release's manifest lists that is not in the folder: committed
    to the staging repo and deleted here by a bounded-disk run. What ``publish`` takes as ``elsewhere``."""
    return {path: content for path, content in read_manifest(release_dir).content_by_path().items()
            if not (release_dir / path).is_file()}


def plan_publish(release_dir: Path, target: Target, api: HfApi,
                 elsewhere: Mapping[str, tuple[str, int]] | None = None) -> PublishPlan:
    """``elsewhere``: files of the release not in the folder, by repo path: (sha256, size) of bytes the Hub holds."""
    local, elsewhere = release_files(release_dir), elsewhere or {}
    sizes = {p: f.stat().st_size for p, f in local.items()} | {p: size for p, (_, size) in elsewhere.items()}
    try:
        info = api.model_info(target.repo, files_metadata=True)
    except RepositoryNotFoundError:
        return PublishPlan(target.repo, None, tuple(PlannedFile(p, size, "new") for p, size in sizes.items()))
    remote = {s.rfilename: s for s in info.siblings or []}
    planned = []
    for repo_path, size in sizes.items():
        sibling = remote.get(repo_path)
        if sibling is None:
            status: Status = "new"
        elif repo_path in elsewhere:
            status = "unchanged" if sibling.lfs is not None and sibling.lfs.sha256 == elsewhere[repo_path][0] \
                else "changed"
        elif sibling.lfs is not None:
            status = "unchanged" if sibling.lfs.sha256 == sha256_file(local[repo_path]) else "changed"
        else:
            status = "unchanged" if sibling.blob_id == _git_blob_id(local[repo_path]) else "changed"
        planned.append(PlannedFile(repo_path, size, status))
    planned += [PlannedFile(name, s.size or 0, "deleted") for name, s in remote.items()
                if name not in sizes and name not in KEEP_REMOTE]
    return PublishPlan(target.repo, info.sha, tuple(planned), bool(info.private))


def check_write_access(api: HfApi, *targets: Target) -> None:
    """Refuse, before anything is downloaded or built, a token that cannot publish every target: none, one the Hub
    refuses, or one whose account (its user and organisations) does not hold the targets' namespaces."""
    _require_token(api, ", ".join(t.repo for t in targets))
    try:
        me = api.whoami()
    except HfHubHTTPError as e:
        raise PublishError(f"the Hub at {api.endpoint} refuses the token: {_first_line(e)}",
                           hint="set HF_TOKEN to a valid write token of the account the target belongs to; "
                                "nothing was built or published") from e
    namespaces = [me["name"], *(org["name"] for org in me.get("orgs") or [])]
    if foreign := [t.repo for t in targets if t.repo.split("/")[0] not in namespaces]:
        raise PublishError(f"the token's account {me['name']} cannot publish {', '.join(foreign)}: it writes only to "
                           f"{', '.join(namespaces)}",
                           hint="set target.repo under one of those namespaces, or use a token of an account that "
                                "may write there; nothing was built or published")


def publish(release_dir: Path, target: Target, api: HfApi, *, message: str, dry_run: bool = False,
            elsewhere: Mapping[str, tuple[str, int]] | None = None, source: tuple[str, str] | None = None
            ) -> PublishResult:
    """Make ``target.repo`` match ``release_dir`` in one commit; raise PublishError with nothing committed (or,
    when only opening the repo failed, naming the commit that landed).

    A public target is made public only once its release is in it. One found private here is the leftover of a
    run stopped between its commit and that step, and is opened after this commit (or at once if nothing changed).
    ``elsewhere``: files of the release that are not in the folder (``stored_elsewhere``), committed by content;
    one the target's Hub does not hold for it is copied over from ``source`` (repo, commit: the staging repo at
    the verified commit), one file at a time through a folder it is deleted from once sent.
    """
    elsewhere = elsewhere or {}
    _require_token(api, target.repo)
    url = f"{api.endpoint}/{target.repo}"
    try:
        plan = plan_publish(release_dir, target, api, elsewhere)
        commit, sent = plan.parent_commit, 0
        if not dry_run and plan.changes:
            if plan.parent_commit is None:
                api.create_repo(target.repo, private=True, exist_ok=True)
                plan = plan_publish(release_dir, target, api, elsewhere)
            local = release_files(release_dir)
            additions = [_addition(f.path, local[f.path]) if f.path in local else _stored(f.path, *elsewhere[f.path])
                         for f in plan.changes if f.status in ("new", "changed")]
            sent = _bytes_to_send(api, target.repo, additions, release_dir, source)
            deletions = [CommitOperationDelete(path_in_repo=f.path) for f in plan.changes if f.status == "deleted"]
            commit = api.create_commit(target.repo, [*additions, *deletions], commit_message=message,
                                       parent_commit=plan.parent_commit).oid
    except HfHubHTTPError as e:
        if e.response.status_code == 412:  # only the commit can answer it: the branch is no longer at the parent
            raise PublishConflictError(
                f"{target.repo} changed while publishing: the release was planned on commit {plan.parent_commit}, "
                f"the branch is now at {_head(api, target.repo) or 'another commit'}; nothing was committed",
                hint="another writer committed to the repo: look at what they changed, then rerun (with --dry-run "
                     "first: the new plan deletes every file the release does not have)") from e
        raise PublishError(f"publishing {target.repo} failed, nothing was committed: {_first_line(e)}",
                           hint="check the token's write access and the endpoint (HF_ENDPOINT); rerun to retry") from e
    except httpx2.TransportError as e:
        raise PublishError(f"publishing {target.repo}: the connection to {api.endpoint} failed ({_first_line(e)}); a "
                           "commit under way may or may not have landed",
                           hint="rerun: it commits only what the repo still lacks") from e
    if not dry_run and commit is not None and plan.private and not target.private:
        _make_public(api, target.repo, commit)
    return PublishResult(target.repo, commit or "", commit != plan.parent_commit, url, sent, plan)


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


def commit_finished(files: Sequence[GgufFile], release_dir: Path, target: Target, api: HfApi, *, message: str
                    ) -> int:
    """Commit finished files to the private ``target.repo`` (the staging repo) now, so a bounded-disk run may delete
    them here: a commit keeps their bytes on the Hub; nothing relies on it keeping an upload no commit names. Each
    split file goes as its parts; files the repo holds with the same sha256 are skipped. Returns the bytes sent."""
    if not target.private:
        raise PublishError(f"refusing to commit unverified files to {target.repo}: it is public",
                           hint="commit finished files only to the private staging repo")
    published = {path.relative_to(release_dir).as_posix(): path for f in files for path in f.published}
    try:
        api.create_repo(target.repo, private=True, exist_ok=True)
        info = api.model_info(target.repo, files_metadata=True)
        remote = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
        additions = [_addition(repo_path, path) for repo_path, path in published.items()
                     if remote.get(repo_path) != sha256_file(path)]
        if not additions:
            return 0
        sent = _bytes_to_send(api, target.repo, additions, release_dir, None)
        api.create_commit(target.repo, additions, commit_message=message, parent_commit=info.sha)
    except HfHubHTTPError as e:
        raise PublishError(f"committing {', '.join(published)} to {target.repo} failed: {_first_line(e)}",
                           hint="nothing of it was deleted here; rerun to retry") from e
    return sent


def _require_token(api: HfApi, repo: str) -> None:
    if not api.token:
        raise PublishError(f"no Hub token to publish {repo} with",
                           hint="set HF_TOKEN (a write token) in the environment or a Prefect Secret block")


def _addition(repo_path: str, path: Path) -> CommitOperationAdd:
    operation = CommitOperationAdd(path_in_repo=repo_path, path_or_fileobj=path)
    operation.upload_info.sha256 = bytes.fromhex(sha256_file(path))  # memoised: huggingface_hub need not read it again
    return operation


def _stored(repo_path: str, sha256: str, size: int) -> CommitOperationAdd:
    """A file whose bytes are not here but on the Hub: the operation in the state huggingface_hub leaves one in
    after ``preupload_lfs_files(free_memory=True)`` (content dropped, uploaded), which its ``create_commit`` then
    commits by sha256 and size alone."""
    operation = CommitOperationAdd(path_in_repo=repo_path, path_or_fileobj=b"")
    operation.upload_info = UploadInfo(sha256=bytes.fromhex(sha256), size=size, sample=b"")
    operation._upload_mode, operation._is_uploaded = "lfs", True
    return operation


def _bytes_to_send(api: HfApi, repo: str, additions: list[CommitOperationAdd], release_dir: Path,
                   source: tuple[str, str] | None) -> int:
    """What the commit will send: every added file except those whose content the Hub already stores (pre-uploaded
    to this repo, or the same bytes elsewhere), which its LFS batch endpoint answers without an upload action.
    A small text file travels inside the commit even when the Hub has its bytes: such a file is not counted.
    A file that is no longer here and that the Hub lacks for ``repo`` is sent now from ``source`` (``publish``);
    without one, PublishError, before anything is committed."""
    if not additions:
        return 0
    answers, _, _ = post_lfs_batch_info([a.upload_info for a in additions], token=api.token, repo_type="model",
                                        repo_id=repo, endpoint=api.endpoint)
    missing = {answer["oid"] for answer in answers if answer.get("actions")}
    lost = [a for a in additions if a._is_uploaded and a.upload_info.sha256.hex() in missing]
    if lost and source is None:
        raise PublishError(f"{repo}: the Hub at {api.endpoint} does not hold {', '.join(a.path_in_repo for a in lost)},"
                           " which a bounded-disk run committed to the staging repo and deleted here; nothing was "
                           "committed", hint="rerun without bounded_disk to rebuild them here, or copy them from the "
                                             "staging repo into the release folder and rerun")
    for operation in lost:
        _copy_from(source, operation, repo, api, release_dir / ".copying")
    return sum(a.upload_info.size for a in additions if a.upload_info.sha256.hex() in missing)


def _copy_from(source: tuple[str, str], operation: CommitOperationAdd, repo: str, api: HfApi, folder: Path) -> None:
    """Download ``operation``'s file from ``source`` (repo, commit), check its sha256, upload it to ``repo`` and
    delete it here; ``operation`` is then uploaded (``create_commit`` names it by content)."""
    from huggingface_hub import hf_hub_download

    path, sha256 = operation.path_in_repo, operation.upload_info.sha256.hex()
    try:
        local = Path(hf_hub_download(source[0], path, revision=source[1], local_dir=folder, token=api.token,
                                     endpoint=api.endpoint))
        if sha256_file(local) != sha256:
            raise PublishError(f"{source[0]}@{source[1][:12]} serves {path} with another sha256 than the manifest's "
                               f"{sha256}; nothing was committed", hint="rerun: the release is built again")
        api.preupload_lfs_files(repo, additions=[CommitOperationAdd(path_in_repo=path, path_or_fileobj=local)])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _make_public(api: HfApi, repo: str, commit: str) -> None:
    try:
        api.update_repo_settings(repo, private=False)
    except (HfHubHTTPError, httpx2.TransportError) as e:
        raise PublishError(f"{repo}: the release is committed (commit {commit}) but the repo is still private: "
                           f"{_first_line(e)}", hint="rerun to make it public (an unchanged release commits nothing), "
                                                     "or make it public on the Hub") from e


def _head(api: HfApi, repo: str) -> str | None:
    try:
        return api.repo_info(repo).sha
    except (HfHubHTTPError, httpx2.TransportError):
        return None  # the conflict is reported without it


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _git_blob_id(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
