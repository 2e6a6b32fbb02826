"""A local, file-backed stand-in for the Hugging Face Hub.

The machines mtpress runs on have no internet, so demos and tests publish to this endpoint instead: the
*unmodified* `huggingface_hub` client and llama.cpp's `-hf` downloader talk to it through `HF_ENDPOINT`.
The request/response contract it honours is `shared/HUB-PROTOCOL.md`; only model repos and the LFS upload
path are served (set `HF_HUB_DISABLE_XET=1` before importing `huggingface_hub`).

Storage under `root`:

    blobs/sha256/<hex>                        every file's content, addressed by its sha256
    repos/models/<ns>/<name>/repo.json        {"id", "type", "private", "created_at", "uid"}
    repos/models/<ns>/<name>/refs.json        {"heads": {"main": <commit>}, "tags": {...}}
    repos/models/<ns>/<name>/commits/<id>.json  {"id", "parent", "title", "message", "author", "date", "tree"}
    tmp/                                      uploads in flight (renamed into blobs/ once verified)

A commit's `tree` is a full snapshot `path -> {size, git_oid, sha256, lfs}`. Commit objects are immutable;
a branch moves by atomically replacing `refs.json`, so a commit is either fully recorded or not at all.

Access, as the real Hub answers: every hub has its write tokens (`mtpress hub serve` generates one and prints it
once, or reads `--token-file`). Writes without a valid `Authorization: Bearer` token get 401; private repos are
invisible to such callers (404 `RepoNotFound`, as if they did not exist); public repos are readable by anyone, as
llama.cpp's `-hf` and `snapshot_download` read them anonymously.

Fault injection (`LocalHub.faults`, or `POST /_mtpress/faults` from another process) lets reliability tests
make the next matching requests fail: see `FaultPlan`. It exists only on a hub started with `faults=True`
(`mtpress hub serve --allow-faults`); elsewhere the route answers 404. Its control endpoint needs a write token.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

import yaml

from mtpress.hub.client import HUB_MAX_FILE_SIZE

logger = logging.getLogger("mtpress.hub")

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub's rule: bigger files go through LFS whatever their content
MAX_BUFFERED_BODY = 256 * 1024 * 1024  # JSON/NDJSON bodies are read whole; LFS objects are streamed
MAX_DRAINED_BODY = 64 * 1024 * 1024  # unread body read and dropped before an early answer; beyond it, close
CHUNK_SIZE = 1024 * 1024
UPLOAD_LINK_TTL_S = 3600
DEFAULT_BRANCH = "main"

# What the Hub puts in a new repo's .gitattributes: these patterns are stored through LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy"
        " *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/*"
        " *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REF_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # no "/": see pitfall 1 of the protocol
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_BEARER_RE = re.compile(r"^Bearer\s+(\S+)\s*$", re.IGNORECASE)
_SECRET_QUERY_RE = re.compile(r"(sig=)[^&]*")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
# What a local Hub takes as a token: long enough not to be guessed, and sendable as `Bearer <token>`. Like the real
# Hub it also takes tokens llama.cpp will not send (e.g. OAuth ones, `hf_oauth_...`): the release gate must meet them.
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{20,}$")


class HubError(Exception):
    """An HTTP error answer: status, message, and the `X-Error-Code` the client maps to its exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def _revision_not_found(repo_id: str, revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision} (repo {repo_id})", "RevisionNotFound")


# ---------------------------------------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------------------------------------

FAULT_ACTIONS = ("status", "drop", "abort_commit", "stall")


@dataclass
class Fault:
    """One planned failure, consumed by the next `times` requests that match.

    `method` is an HTTP method or "*"; `path` a regex searched in the raw URL path (no query string).
    Actions:
      - "status": answer `status` (e.g. 500, 503, or 429 with `retry_after` seconds) without doing anything.
      - "drop": close the connection without answering (the client sees a protocol/network error).
      - "abort_commit": let a commit request run until its commit object is written, then fail with 500
        before the branch moves (a crash mid-commit; the head must stay unchanged).
      - "stall": hold the request `seconds` before serving it (a slow upload, long enough to kill the client).
    """

    method: str = "*"
    path: str = ".*"
    action: str = "status"
    status: int = 503
    retry_after: int | None = None
    times: int = 1
    seconds: float = 0.0

    @property
    def stage(self) -> str:
        return "commit" if self.action == "abort_commit" else "request"

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and re.search(self.path, path) is not None


class FaultPlan:
    """Thread-safe list of planned failures, checked by the server on every request.

    A plan that is not `enabled` refuses every fault: a hub serves injected failures only when asked to."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(
        self,
        method: str = "*",
        path: str = ".*",
        *,
        action: str = "status",
        status: int = 503,
        retry_after: int | None = None,
        times: int = 1,
        seconds: float = 0.0,
    ) -> Fault:
        """Plan a failure for the next `times` requests matching `method` and the `path` regex."""
        if not self.enabled:
            raise RuntimeError("Fault injection is off on this local Hub: start it with LocalHub(..., faults=True) "
                               "or `mtpress hub serve --allow-faults`.")
        if action not in FAULT_ACTIONS:
            raise ValueError(f"Unknown fault action {action!r}; expected one of {FAULT_ACTIONS}.")
        if times < 1 or not 100 <= status <= 599:
            raise ValueError(f"A fault needs times >= 1 and an HTTP status, got times={times}, status={status}.")
        re.compile(path)  # fail now on a bad regex, not on the next request
        fault = Fault(method.upper(), path, action, status, retry_after, times, seconds)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[dict]:
        with self._lock:
            return [asdict(fault) for fault in self._faults]

    def take(self, method: str, path: str, stage: str) -> Fault | None:
        """Consume one use of the first fault of `stage` matching this request, if any."""
        with self._lock:
            for fault in self._faults:
                if fault.stage == stage and fault.matches(method, path):
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    return fault
        return None


# ---------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: object) -> None:
    _atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def validate_repo_path(path: object) -> str:
    """Return `path` if it is a safe file path inside a repo, else raise a 400 that says why."""
    if not isinstance(path, str) or not path:
        raise HubError(400, f"Invalid path {path!r}: must be a non-empty string.")
    if path.startswith("/"):
        raise HubError(400, f"Invalid path {path!r}: must be relative (no leading '/').")
    if "\\" in path or any(ord(char) < 0x20 for char in path):
        raise HubError(400, f"Invalid path {path!r}: backslashes and control characters are not allowed.")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise HubError(400, f"Invalid path {path!r}: empty, '.' and '..' segments are not allowed.")
        if segment.lower() == ".git":
            raise HubError(400, f"Invalid path {path!r}: cannot write inside a '.git' folder.")
    return path


def _tree_entry_for_bytes(data: bytes, sha256: str) -> dict:
    return {"size": len(data), "git_oid": _git_blob_oid(data), "sha256": sha256, "lfs": False}


def _tree_entry_for_lfs(sha256: str, size: int) -> dict:
    # In git an LFS file's blob is its pointer, so the tree oid is the pointer's hash (as on the Hub).
    return {"size": size, "git_oid": _git_blob_oid(_lfs_pointer(sha256, size)), "sha256": sha256, "lfs": True}


def _remote_oid(entry: dict) -> str:
    """The id both clients name cache blobs by, and the preupload `oid`: sha256 for LFS, git sha1 otherwise."""
    return entry["sha256"] if entry["lfs"] else entry["git_oid"]


class HubStore:
    """Repos, commits, refs and content-addressed blobs on disk. One lock per repo serialises writers."""

    def __init__(self, root: Path, lfs_scope: str = "hub"):
        self.root = Path(root)
        self.lfs_scope = lfs_scope
        self._granted: dict[str, set[str]] = {}  # lfs_scope "repo": objects uploaded through each repo
        self._blobs = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"
        self._repos = self.root / "repos" / "models"
        for folder in (self._blobs, self._tmp, self._repos):
            folder.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def repo_lock(self, repo_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(repo_id, threading.Lock())

    # -- blobs ------------------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256

    def blob_size(self, sha256: str) -> int | None:
        try:
            return self.blob_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def holds(self, repo_id: str, sha256: str, size: int | None = None) -> bool:
        """Whether a commit to ``repo_id`` may name this LFS object (and the LFS batch need not ask for it): stored,
        of ``size`` when given; with lfs_scope "repo", also uploaded through that repo or committed in it."""
        stored = self.blob_size(sha256)
        if stored is None or (size is not None and stored != size):
            return False
        if self.lfs_scope == "hub" or sha256 in self._granted.get(repo_id, ()):
            return True
        return any(entry["lfs"] and entry["sha256"] == sha256 for head in self.refs(repo_id)["heads"].values()
                   for entry in self.commit_obj(repo_id, head)["tree"].values())

    def grant(self, repo_id: str, sha256: str) -> None:
        with self._locks_guard:
            self._granted.setdefault(repo_id, set()).add(sha256)

    def put_blob_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if self.blob_size(sha256) is None:
            _atomic_write(self.blob_path(sha256), data)
        return sha256

    def put_blob_stream(self, chunks: Iterator[bytes], sha256: str, size: int) -> None:
        """Store an uploaded object after checking it really has this sha256 and size."""
        tmp = self._tmp / f"{sha256}.{uuid.uuid4().hex}"
        digest, received = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise HubError(400, f"Upload of {sha256} is larger than the announced {size} bytes.")
                    digest.update(chunk)
                    f.write(chunk)
            if received != size or digest.hexdigest() != sha256:
                raise HubError(
                    400, f"Upload does not match its oid: got {received} bytes with sha256 {digest.hexdigest()}."
                )
            os.replace(tmp, self.blob_path(sha256))
        finally:
            tmp.unlink(missing_ok=True)

    def read_small_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # -- repos ------------------------------------------------------------------------------------------

    def _repo_dir(self, repo_id: str) -> Path:
        namespace, name = repo_id.split("/")
        return self._repos / namespace / name

    def repo_meta(self, repo_id: str) -> dict | None:
        try:
            return json.loads((self._repo_dir(repo_id) / "repo.json").read_text())
        except FileNotFoundError:
            return None

    def list_repo_ids(self) -> list[str]:
        ids = (f"{p.parent.parent.name}/{p.parent.name}" for p in self._repos.glob("*/*/repo.json"))
        return sorted(repo_id for repo_id in ids if "/." not in repo_id)  # skip repos still being created

    def create_repo(self, repo_id: str, *, private: bool, author: str) -> bool:
        """Create a repo with an initial commit; False if it already exists."""
        final = self._repo_dir(repo_id)
        with self.repo_lock(repo_id):
            if final.exists():
                return False
            # Build the whole repo beside its final place, then rename: a half-created repo is never visible.
            staging = final.with_name(f".{final.name}.{uuid.uuid4().hex}.creating")
            (staging / "commits").mkdir(parents=True)
            now = _now_iso()
            _atomic_write_json(
                staging / "repo.json",
                {"id": repo_id, "type": "model", "private": private, "created_at": now, "uid": uuid.uuid4().hex},
            )
            gitattributes = DEFAULT_GITATTRIBUTES.encode()
            tree = {".gitattributes": _tree_entry_for_bytes(gitattributes, self.put_blob_bytes(gitattributes))}
            initial = self._new_commit(None, "initial commit", "", author, tree)
            _atomic_write_json(staging / "commits" / f"{initial['id']}.json", initial)
            _atomic_write_json(staging / "refs.json", {"heads": {DEFAULT_BRANCH: initial["id"]}, "tags": {}})
            os.replace(staging, final)
            return True

    def set_private(self, repo_id: str, private: bool) -> None:
        with self.repo_lock(repo_id):
            meta = self.repo_meta(repo_id)
            _atomic_write_json(self._repo_dir(repo_id) / "repo.json", {**meta, "private": private})

    def delete_repo(self, repo_id: str) -> bool:
        with self.repo_lock(repo_id):
            folder = self._repo_dir(repo_id)
            if not folder.exists():
                return False
            # Rename first so the repo disappears at once, even if removing the files takes a while.
            doomed = self._tmp / f"deleted-{uuid.uuid4().hex}"
            os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def refs(self, repo_id: str) -> dict:
        return json.loads((self._repo_dir(repo_id) / "refs.json").read_text())

    def commit_obj(self, repo_id: str, commit_id: str) -> dict | None:
        if not _COMMIT_RE.match(commit_id):
            return None
        try:
            return json.loads((self._repo_dir(repo_id) / "commits" / f"{commit_id}.json").read_text())
        except FileNotFoundError:
            return None

    def resolve(self, repo_id: str, revision: str) -> dict:
        """The commit a branch, tag (plain or `refs/...`) or full commit id points at."""
        refs = self.refs(repo_id)
        for prefix, kind in (("", "heads"), ("", "tags"), ("refs/heads/", "heads"), ("refs/tags/", "tags")):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs[kind]:
                return self.commit_obj(repo_id, refs[kind][revision[len(prefix) :]])
        commit = self.commit_obj(repo_id, revision)
        if commit is None:
            raise _revision_not_found(repo_id, revision)
        return commit

    def history(self, repo_id: str, commit: dict) -> list[dict]:
        commits = [commit]
        while commits[-1]["parent"]:
            commits.append(self.commit_obj(repo_id, commits[-1]["parent"]))
        return commits

    def set_tag(self, repo_id: str, tag: str, commit_id: str | None) -> None:
        """Create (commit_id set) or delete (None) a tag: 409 if it exists, 404 if it does not."""
        with self.repo_lock(repo_id):
            refs = self.refs(repo_id)
            if commit_id is not None and tag in refs["tags"]:
                raise HubError(409, f"Tag {tag} already exists.")
            if commit_id is None and tag not in refs["tags"]:
                raise _revision_not_found(repo_id, tag)
            if commit_id is None:
                del refs["tags"][tag]
            else:
                refs["tags"][tag] = commit_id
            _atomic_write_json(self._repo_dir(repo_id) / "refs.json", refs)

    # -- commits ----------------------------------------------------------------------------------------

    @staticmethod
    def _new_commit(parent: str | None, title: str, message: str, author: str, tree: dict) -> dict:
        commit = {"parent": parent, "title": title, "message": message, "author": author, "date": _now_iso()}
        commit["tree"] = tree
        commit["id"] = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        return commit

    def commit(
        self,
        repo_id: str,
        branch: str,
        header: dict,
        operations: list[tuple[str, dict]],
        author: str,
        before_ref_update: Callable[[], None] = lambda: None,
    ) -> dict:
        """Apply `operations` to the head of `branch` as one commit, all or nothing."""
        with self.repo_lock(repo_id):
            refs = self.refs(repo_id)
            head_id = refs["heads"].get(branch)
            if head_id is None:
                raise _revision_not_found(repo_id, branch)
            expected_parent = header.get("parentCommit")
            if expected_parent and expected_parent != head_id:
                raise HubError(
                    412,
                    f"parentCommit {expected_parent} is not the head of '{branch}' ({head_id}): "
                    "the branch moved since you read it.",
                )
            tree = dict(self.commit_obj(repo_id, head_id)["tree"])
            for key, value in operations:
                self._apply(repo_id, tree, key, value)
            _check_no_file_folder_clash(tree)
            title = str(header.get("summary") or "").strip() or "Upload files"
            commit = self._new_commit(head_id, title, str(header.get("description") or ""), author, tree)
            _atomic_write_json(self._repo_dir(repo_id) / "commits" / f"{commit['id']}.json", commit)
            before_ref_update()
            refs["heads"][branch] = commit["id"]
            _atomic_write_json(self._repo_dir(repo_id) / "refs.json", refs)
            return commit

    def _apply(self, repo_id: str, tree: dict, key: str, value: dict) -> None:
        if key == "file":
            path = validate_repo_path(value.get("path"))
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}.")
            try:
                data = base64.b64decode(value.get("content", ""), validate=True)
            except (binascii.Error, TypeError) as err:
                raise HubError(400, f"Content of {path} is not valid base64.") from err
            tree[path] = _tree_entry_for_bytes(data, self.put_blob_bytes(data))
        elif key == "lfsFile":
            path = validate_repo_path(value.get("path"))
            oid = str(value.get("oid", ""))
            if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(oid):
                raise HubError(400, f"lfsFile {path} needs a sha256 oid, got {oid!r}.")
            stored_size = self.blob_size(oid)
            if stored_size is None or not self.holds(repo_id, oid):
                raise HubError(422, f"LFS object {oid} for {path} was never uploaded to {repo_id} and verified.")
            if value.get("size") is not None and value["size"] != stored_size:
                raise HubError(422, f"LFS object {oid} for {path} has {stored_size} bytes, not {value['size']}.")
            tree[path] = _tree_entry_for_lfs(oid, stored_size)
        elif key == "deletedFile":
            path = validate_repo_path(value.get("path"))
            if tree.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            folder = validate_repo_path(str(value.get("path", "")).rstrip("/"))
            doomed = [p for p in tree if p.startswith(folder + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            for path in doomed:
                del tree[path]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}.")


def _check_no_file_folder_clash(tree: dict) -> None:
    folders = {path.rsplit("/", 1)[0] for path in tree if "/" in path}
    folders |= {f.rsplit("/", i)[0] for f in folders for i in range(1, f.count("/") + 1)}
    clash = sorted(folders & tree.keys())
    if clash:
        raise HubError(400, f"Path {clash[0]!r} cannot be both a file and a folder.")


# ---------------------------------------------------------------------------------------------------------
# Model card, tags and upload-mode rules
# ---------------------------------------------------------------------------------------------------------


def _split_front_matter(text: str) -> str | None:
    match = _YAML_BLOCK_RE.search(text)
    return match.group(2) if match else None


def _card_data(store: HubStore, tree: dict) -> dict | None:
    entry = tree.get("README.md")
    if entry is None or entry["size"] > LFS_SIZE_THRESHOLD:
        return None
    front_matter = _split_front_matter(store.read_small_blob(entry["sha256"]).decode("utf-8", "replace"))
    try:
        data = yaml.safe_load(front_matter) if front_matter is not None else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _as_list(value: object) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _base_model_relation(card: dict, base_models: list[str], tree: dict) -> str:
    # Like the Hub: an explicit relation wins, otherwise it is inferred from the repo's content.
    explicit = card.get("base_model_relation")
    if explicit in ("adapter", "merge", "quantized", "finetune"):
        return explicit
    if len(base_models) > 1:
        return "merge"
    if any(path.endswith(".gguf") for path in tree):
        return "quantized"
    if any(path.rsplit("/", 1)[-1] == "adapter_config.json" for path in tree):
        return "adapter"
    return "finetune"


def _derive_tags(card: dict | None, tree: dict) -> list[str]:
    card = card or {}
    tags = _as_list(card.get("library_name")) + _as_list(card.get("tags"))
    if any(path.endswith(".gguf") for path in tree):
        tags.append("gguf")
    tags += _as_list(card.get("pipeline_tag")) + _as_list(card.get("language"))
    tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
    base_models = _as_list(card.get("base_model"))
    if base_models:
        relation = _base_model_relation(card, base_models, tree)
        tags += [f"base_model:{b}" for b in base_models] + [f"base_model:{relation}:{b}" for b in base_models]
    tags += [f"license:{lic}" for lic in _as_list(card.get("license"))]
    return list(dict.fromkeys(tags))


def _lfs_patterns(gitattributes: bytes) -> list[str]:
    patterns = []
    for line in gitattributes.decode("utf-8", "replace").splitlines():
        fields = line.split()
        if len(fields) > 1 and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0].lstrip("/").replace("/**/", "/*"))
    return patterns


def _looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start < len(sample) - 3  # the 512-byte sample may cut the last character in half
    return False


def _upload_mode(path: str, size: int, sample: bytes, lfs_patterns: list[str]) -> str:
    name = path.rsplit("/", 1)[-1]
    tracked = any(fnmatch.fnmatchcase(path if "/" in p else name, p) for p in lfs_patterns)
    return "lfs" if size > LFS_SIZE_THRESHOLD or tracked or _looks_binary(sample) else "regular"


# ---------------------------------------------------------------------------------------------------------
# Tree listings
# ---------------------------------------------------------------------------------------------------------


def _file_json(path: str, entry: dict) -> dict:
    item = {"type": "file", "oid": entry["git_oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return item


def _folder_json(tree: dict, folder: str) -> dict:
    listing = "".join(f"{p} {e['git_oid']}\n" for p, e in sorted(tree.items()) if p.startswith(folder + "/"))
    return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": folder}


def _list_tree(tree: dict, folder: str, recursive: bool) -> list[dict]:
    prefix = folder + "/" if folder else ""
    files, folders = [], set()
    for path in tree:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if recursive:
            files.append(path)
            folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
        elif len(parts) == 1:
            files.append(path)
        else:
            folders.add(prefix + parts[0])
    if folder and not files and not folders:
        raise HubError(404, f"Folder {folder} does not exist.", "EntryNotFound")
    items = [_file_json(p, tree[p]) for p in files] + [_folder_json(tree, f) for f in folders]
    return sorted(items, key=lambda item: item["path"])


# ---------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------


def _redact(target: str) -> str:
    return _SECRET_QUERY_RE.sub(r"\1<redacted>", target)


def _header_safe(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace").decode("latin-1")


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], hub: LocalHub):
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _HubRequestHandler)

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End idle keep-alive connections too, so that a stopped hub answers nothing more."""
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries an exact Content-Length
    timeout = 300  # idle keep-alive connections are closed after this many seconds
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing ---------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self.hub = self.server.hub
        self.raw_path, _, query = self.path.partition("?")
        self.query = parse_qs(query, keep_blank_values=True)
        self._status: int | str = "-"
        self._body_left = 0
        try:
            # Both clients always send Content-Length; without it there is no telling where a body ends.
            if "Transfer-Encoding" in self.headers or not self.headers.get("Content-Length", "0").isdigit():
                self.close_connection = True
                raise HubError(411, "Send request bodies with a valid Content-Length (no chunked encoding).")
            self._body_left = int(self.headers.get("Content-Length", "0"))
            fault = None if self.raw_path == "/_mtpress/faults" else self._take_fault("request")
            if fault is not None and fault.action == "drop":
                self._drop_connection()
            elif fault is not None and fault.action == "stall":
                time.sleep(fault.seconds)
                self._route(self.raw_path.split("/")[1:])
            elif fault is not None:
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                raise HubError(fault.status, f"Injected fault: {fault.status}", headers=headers)
            else:
                self._route(self.raw_path.split("/")[1:])
        except HubError as err:
            self._send_error(err)
        except (ConnectionError, TimeoutError):
            self._client_gone()
        except Exception:
            logger.exception("Internal error on %s %s", self.command, _redact(self.path))
            self._send_error(HubError(500, "Internal server error."))
        finally:
            logger.info("%s %s %s", self.command, _redact(self.path), self._status)

    def _client_gone(self) -> None:
        self.close_connection = True
        self._status = "disconnected"

    def _take_fault(self, stage: str) -> Fault | None:
        return self.hub.faults.take(self.command, self.raw_path, stage)

    def _drop_connection(self) -> None:
        self._settle_request_body()
        self.close_connection = True
        self._status = "dropped"
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, streamed."""
        while self._body_left > 0:
            chunk = self.rfile.read(min(CHUNK_SIZE, self._body_left))
            if not chunk:
                raise ConnectionResetError("request body ended early")
            self._body_left -= len(chunk)
            self.hub.count_received(len(chunk))
            yield chunk

    def _read_body(self) -> bytes:
        if self._body_left > MAX_BUFFERED_BODY:
            raise HubError(413, f"Request body over {MAX_BUFFERED_BODY} bytes; upload big files through LFS.")
        return b"".join(self._body_chunks())

    def _json_body(self) -> dict:
        try:
            body = json.loads(self._read_body() or b"{}")
        except ValueError as err:
            raise HubError(400, f"Request body is not valid JSON: {err}") from err
        if not isinstance(body, dict):
            raise HubError(400, "Request body must be a JSON object.")
        return body

    def _settle_request_body(self) -> None:
        """Before answering, read and drop what is left of the request body: the client reads our answer only
        once it has sent everything, and the next request on this keep-alive connection must start at a
        request line. A body too big to drain gets the answer and then a closed connection."""
        if 0 < self._body_left <= MAX_DRAINED_BODY:
            try:
                for _ in self._body_chunks():
                    pass
            except OSError:
                pass
        if self._body_left > 0:
            self.close_connection = True

    def _start_response(self, status: int, headers: dict) -> None:
        self._settle_request_body()
        self._status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, str(value))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send_bytes(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        all_headers = {"Content-Type": content_type, "Content-Length": len(body), **(headers or {})}
        self._start_response(status, all_headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, obj: object, status: int = 200, headers: dict | None = None, content_type: str | None = None
    ) -> None:
        body = json.dumps(obj).encode()
        self._send_bytes(status, body, content_type or "application/json; charset=utf-8", headers)

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        try:
            self._send_json({"error": err.message}, err.status, headers)
        except (ConnectionError, TimeoutError):
            self._client_gone()

    def log_request(self, code="-", size="-") -> None:
        pass  # `_dispatch` logs one line per request, without headers (they carry the token)

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s: %s", self.address_string(), _redact(format % args))

    # -- auth and repo lookup ---------------------------------------------------------------------------

    def _authenticated(self) -> bool:
        match = _BEARER_RE.match(self.headers.get("Authorization", ""))
        return match is not None and match.group(1) in self.hub.tokens

    def _require_write_access(self) -> None:
        if not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _visible_repo(self, namespace: str, name: str) -> tuple[str, dict]:
        """(repo_id, metadata) of a repo this caller may see; 404 RepoNotFound otherwise."""
        namespace, name = unquote(namespace), unquote(name)
        repo_id = f"{namespace}/{name}"
        if not (_REPO_PART_RE.match(namespace) and _REPO_PART_RE.match(name)):
            raise _repo_not_found(repo_id)
        meta = self.hub.store.repo_meta(repo_id)
        if meta is None or (meta["private"] and not self._authenticated()):
            raise _repo_not_found(repo_id)
        return repo_id, meta

    def _writable_repo(self, namespace: str, name: str) -> tuple[str, dict]:
        self._require_write_access()
        return self._visible_repo(namespace, name)

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or self.hub.url.removeprefix('http://')}"

    def _flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    # -- routing ----------------------------------------------------------------------------------------

    def _route(self, segments: list[str]) -> None:
        method = self.command
        match segments:
            case ["api", "whoami-v2"] if method == "GET":
                self._whoami()
            case ["api", "repos", "create"] if method == "POST":
                self._create_repo()
            case ["api", "repos", "delete"] if method == "DELETE":
                self._delete_repo()
            case ["api", "validate-yaml"] if method == "POST":
                self._validate_yaml()
            case ["api", "models"] if method == "GET":
                self._list_models()
            case ["api", "models", ns, name] if method == "GET":
                self._model_info(ns, name, None)
            case ["api", "models", ns, name, "revision", rev] if method == "GET":
                self._model_info(ns, name, unquote(rev))
            case ["api", "models", ns, name, "tree", rev, *path] if method == "GET":
                self._tree(ns, name, unquote(rev), "/".join(unquote(p) for p in path).strip("/"))
            case ["api", "models", ns, name, "paths-info", rev] if method == "POST":
                self._paths_info(ns, name, unquote(rev))
            case ["api", "models", ns, name, "refs"] if method == "GET":
                self._refs(ns, name)
            case ["api", "models", ns, name, "commits", rev] if method == "GET":
                self._commits(ns, name, unquote(rev))
            case ["api", "models", ns, name, "tag", rev] if method in ("POST", "DELETE"):
                self._tag(ns, name, unquote(rev))
            case ["api", "models", ns, name, "preupload", rev] if method == "POST":
                self._preupload(ns, name, unquote(rev))
            case ["api", "models", ns, name, "commit", rev] if method == "POST":
                self._commit(ns, name, unquote(rev))
            case ["api", "models", ns, name, "settings"] if method == "PUT":
                self._settings(ns, name)
            case [ns, git, "info", "lfs", "objects", "batch"] if method == "POST" and git.endswith(".git"):
                self._lfs_batch(ns, git.removesuffix(".git"))
            case [ns, git, "info", "lfs", "objects", "verify"] if method == "POST" and git.endswith(".git"):
                self._lfs_verify(ns, git.removesuffix(".git"))
            case ["_mtpress", "lfs", oid] if method == "PUT":
                self._lfs_put(oid)
            case ["_mtpress", "faults"] if self.hub.faults.enabled:
                self._faults_control()
            case [ns, name, "resolve", rev, *path] if path and method in ("GET", "HEAD"):
                self._resolve(ns, name, unquote(rev), "/".join(unquote(p) for p in path))
            case _:
                raise HubError(404, f"No route for {method} {self.raw_path}.")

    # -- account and repos ------------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._require_write_access()  # every token of a local Hub is a write token
        user = self.hub.user
        self._send_json({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": None, "emailVerified": False, "canPay": False, "isPro": False,
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in self.hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "mtpress-local", "role": "write"}},
        })  # fmt: skip

    def _create_repo(self) -> None:
        self._require_write_access()
        body = self._json_body()
        if body.get("type", "model") != "model":
            raise HubError(400, f"This local Hub only serves model repos, not {body.get('type')!r}.")
        namespace, name = body.get("organization") or self.hub.user, body.get("name") or ""
        valid = _REPO_PART_RE.match(namespace) and _REPO_PART_RE.match(name)
        if not valid or ".." in name or "--" in name or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name {namespace}/{name}: use letters, digits, '-', '_', '.'.")
        repo_id = f"{namespace}/{name}"
        private = body.get("visibility") == "private" or body.get("private") is True
        url = f"{self._base_url()}/{repo_id}"
        if not self.hub.store.create_repo(repo_id, private=private, author=self.hub.user):
            self._send_json({"error": "You already created this model repo", "url": url}, 409)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _settings(self, ns: str, name: str) -> None:
        """Only the visibility can be changed here (`update_repo_settings(private=…)` sends `visibility`)."""
        repo_id, _ = self._writable_repo(ns, name)
        visibility = self._json_body().get("visibility")
        if visibility not in ("public", "private"):
            raise HubError(400, "This local Hub changes only a repo's visibility: send 'public' or 'private'.")
        self.hub.store.set_private(repo_id, visibility == "private")
        self._send_json({})

    def _delete_repo(self) -> None:
        self._require_write_access()
        body = self._json_body()
        repo_id, _ = self._visible_repo(body.get("organization") or self.hub.user, body.get("name") or "")
        self.hub.store.delete_repo(repo_id)
        self._send_json({})

    def _validate_yaml(self) -> None:
        front_matter = _split_front_matter(str(self._json_body().get("content", "")))
        try:
            metadata = yaml.safe_load(front_matter) if front_matter else {}
        except yaml.YAMLError as err:
            self._send_json({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}, 400)
            return
        if not isinstance(metadata, dict | None):
            self._send_json({"errors": [{"message": "Metadata must be a YAML mapping."}], "warnings": []}, 400)
            return
        self._send_json({"errors": [], "warnings": []})

    # -- reads ------------------------------------------------------------------------------------------

    def _model_json(self, repo_id: str, meta: dict, commit: dict, *, full: bool, blobs: bool) -> dict:
        card = _card_data(self.hub.store, commit["tree"])
        info = {
            "_id": meta["uid"], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "private": meta["private"], "createdAt": meta["created_at"], "lastModified": commit["date"],
            "sha": commit["id"], "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": _derive_tags(card, commit["tree"]),
        }  # fmt: skip
        for key in ("library_name", "pipeline_tag"):
            if card and isinstance(card.get(key), str):
                info[key] = card[key]
        if not full:
            return info
        if card is not None:
            info["cardData"] = card
        siblings = []
        for path, entry in sorted(commit["tree"].items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["git_oid"])
                if entry["lfs"]:
                    lfs = _file_json(path, entry)["lfs"]
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        info["siblings"] = siblings
        return info

    def _model_info(self, ns: str, name: str, revision: str | None) -> None:
        repo_id, meta = self._visible_repo(ns, name)
        commit = self.hub.store.resolve(repo_id, revision or DEFAULT_BRANCH)
        self._send_json(self._model_json(repo_id, meta, commit, full=True, blobs=self._flag("blobs")))

    def _list_models(self) -> None:
        store, models = self.hub.store, []
        author = self.query.get("author", [""])[-1]
        search = self.query.get("search", [""])[-1].lower()
        wanted_tags = set(self.query.get("filter", []))
        full = self._flag("full") or self._flag("cardData")
        for repo_id in store.list_repo_ids():
            if (author and repo_id.split("/")[0] != author) or search not in repo_id.lower():
                continue
            try:
                _, meta = self._visible_repo(*repo_id.split("/"))
                head = store.resolve(repo_id, DEFAULT_BRANCH)
            except (HubError, FileNotFoundError):
                continue  # private to this caller, or deleted while we list
            info = self._model_json(repo_id, meta, head, full=full, blobs=False)
            if wanted_tags <= set(info["tags"]):
                models.append(info)
        sort_key = {"createdAt": "createdAt", "lastModified": "lastModified"}.get(self.query.get("sort", [""])[-1])
        if sort_key:
            models.sort(key=lambda m: m[sort_key], reverse=self.query.get("direction", ["-1"])[-1] == "-1")
        limit = self.query.get("limit", [""])[-1]
        self._send_json(models[: int(limit)] if limit.isdigit() else models)

    def _tree(self, ns: str, name: str, revision: str, folder: str) -> None:
        repo_id, _ = self._visible_repo(ns, name)
        commit = self.hub.store.resolve(repo_id, revision)
        self._send_json(_list_tree(commit["tree"], folder, recursive=self._flag("recursive")))

    def _paths_info(self, ns: str, name: str, revision: str) -> None:
        repo_id, _ = self._visible_repo(ns, name)
        tree = self.hub.store.resolve(repo_id, revision)["tree"]
        form = parse_qs(self._read_body().decode(), keep_blank_values=True)
        items = []
        for path in dict.fromkeys(p.strip("/") for p in form.get("paths", [])):
            if path in tree:
                items.append(_file_json(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                items.append(_folder_json(tree, path))
        self._send_json(items)

    def _refs(self, ns: str, name: str) -> None:
        repo_id, _ = self._visible_repo(ns, name)
        refs = self.hub.store.refs(repo_id)

        def listing(kind: str) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(refs[kind].items())]

        self._send_json({"branches": listing("heads"), "tags": listing("tags"), "converts": [], "pullRequests": []})

    def _commits(self, ns: str, name: str, revision: str) -> None:
        repo_id, _ = self._visible_repo(ns, name)
        history = self.hub.store.history(repo_id, self.hub.store.resolve(repo_id, revision))
        self._send_json([
            {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
             "authors": [{"user": c["author"], "avatar": None}]}
            for c in history
        ])  # fmt: skip

    def _resolve(self, ns: str, name: str, revision: str, path: str) -> None:
        repo_id, _ = self._visible_repo(ns, name)
        commit = self.hub.store.resolve(repo_id, revision)
        entry = commit["tree"].get(path)
        headers = {"X-Repo-Commit": commit["id"]}
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {revision}", "EntryNotFound", headers)
        etag = f'"{_remote_oid(entry)}"'
        headers.update({"ETag": etag, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": entry["size"]})
        size = entry["size"]
        start, end = 0, size - 1
        status = 200
        byte_range = self._requested_range(size)
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = end - start + 1
        blob = self.hub.store.blob_path(entry["sha256"])
        if not blob.exists():
            raise HubError(500, f"Blob {entry['sha256']} of {repo_id}:{path} is missing from the store.")
        self._start_response(status, headers)
        if self.command == "HEAD":
            return
        with open(blob, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK_SIZE, left))
                self.wfile.write(chunk)
                left -= len(chunk)
        self.hub.count_served(f"{repo_id}/{path}", end - start + 1)

    def _requested_range(self, size: int) -> tuple[int, int] | None:
        """The inclusive byte range asked for, None to send the whole file (no or unusable Range); 416 if
        the range cannot be satisfied."""
        match = _RANGE_RE.match(self.headers.get("Range", "").replace(" ", ""))
        if match is None or match.group(1) == match.group(2) == "":
            return None
        first, last = match.groups()
        if first:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            satisfiable = start < size and (not last or int(last) >= start)
        else:
            start, end = max(0, size - int(last)), size - 1
            satisfiable = int(last) > 0 and size > 0
        if not satisfiable:
            raise HubError(416, f"Range {self.headers['Range']} not satisfiable", headers={
                "Content-Range": f"bytes */{size}"})  # fmt: skip
        return start, end

    # -- writes -----------------------------------------------------------------------------------------

    def _tag(self, ns: str, name: str, revision: str) -> None:
        repo_id, _ = self._writable_repo(ns, name)
        if self.command == "DELETE":
            self.hub.store.set_tag(repo_id, revision, None)
        else:
            tag = str(self._json_body().get("tag", ""))
            if not _REF_NAME_RE.match(tag):
                raise HubError(400, f"Invalid tag name {tag!r}.")
            self.hub.store.set_tag(repo_id, tag, self.hub.store.resolve(repo_id, revision)["id"])
        self._send_json({})

    def _preupload(self, ns: str, name: str, revision: str) -> None:
        repo_id, _ = self._writable_repo(ns, name)
        commit = self.hub.store.resolve(repo_id, revision)
        tree = commit["tree"]
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "preupload expects {'files': [{path, sample, size}]}.")
        attributes = tree.get(".gitattributes")
        patterns = _lfs_patterns(self.hub.store.read_small_blob(attributes["sha256"])) if attributes else []
        answers = []
        for item in files:
            path = validate_repo_path(item.get("path") if isinstance(item, dict) else None)
            size = item.get("size")
            try:
                sample = base64.b64decode(item.get("sample", ""))
            except (binascii.Error, TypeError) as err:
                raise HubError(400, f"Sample of {path} is not valid base64.") from err
            if not isinstance(size, int) or size < 0:
                raise HubError(400, f"Size of {path} must be a byte count, got {size!r}.")
            answer = {"path": path, "uploadMode": _upload_mode(path, size, sample, patterns), "shouldIgnore": False}
            if path in tree:
                answer["oid"] = _remote_oid(tree[path])
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": commit["id"]})

    def _commit(self, ns: str, name: str, branch: str) -> None:
        repo_id, _ = self._writable_repo(ns, name)
        if self._flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by this local Hub.")
        lines = [line for line in self._read_body().splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as err:
            raise HubError(400, f"Commit payload is not valid NDJSON: {err}") from err
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise HubError(400, "A commit payload starts with a 'header' line.")
        operations = []
        for item in items[1:]:
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise HubError(400, "Each commit line is {'key': ..., 'value': {...}}.")
            operations.append((item.get("key"), item["value"]))
        header = items[0].get("value") or {}
        if not isinstance(header, dict):
            raise HubError(400, "The commit header's value must be an object.")

        def abort_if_planned() -> None:
            if self._take_fault("commit") is not None:
                raise HubError(500, "Injected fault: commit aborted before the branch moved.")

        commit = self.hub.store.commit(repo_id, branch, header, operations, self.hub.user, abort_if_planned)
        self._send_json({
            "commitOid": commit["id"], "commitUrl": f"{self._base_url()}/{repo_id}/commit/{commit['id']}",
            "success": True, "pullRequestUrl": None,
        })  # fmt: skip

    # -- LFS --------------------------------------------------------------------------------------------

    def _upload_signature(self, oid: str, size: int, expires: int) -> str:
        message = f"{oid}:{size}:{expires}".encode()
        return hmac.new(self.hub.secret, message, hashlib.sha256).hexdigest()

    def _lfs_batch(self, ns: str, name: str) -> None:
        repo_id, _ = self._writable_repo(ns, name)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is served; download through /resolve.")
        base, expires = self._base_url(), int(time.time()) + UPLOAD_LINK_TTL_S
        objects, answered = [], set()
        for obj in body.get("objects") or []:
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if oid in answered:
                # One answer per object: the client maps actions by oid, and two actions for one oid make it
                # upload the same file object from two threads at once.
                continue
            answered.add(oid)
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "oid must be a sha256 hex digest and size a byte count."}
                objects.append({"oid": oid, "size": size if isinstance(size, int) else -1, "error": error})
                continue
            if size > self.hub.max_file_size:
                # As the Hub does: the batch refuses the object itself, so nothing of it is ever sent.
                error = {"code": 422, "message": f"Your file is too large: {size} bytes, the maximum file size is "
                                                 f"{self.hub.max_file_size} bytes. Split it into smaller files."}
                objects.append({"oid": oid, "size": size, "error": error})
                continue
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.store.holds(repo_id, oid, size):  # stored objects get no actions: nothing to send
                signature = self._upload_signature(oid, size, expires)
                answer["actions"] = {
                    "upload": {"href": f"{base}/_mtpress/lfs/{oid}?size={size}&expires={expires}&sig={signature}"},
                    "verify": {"href": f"{base}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        self._send_json({"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str) -> None:
        # The client sends no Authorization here: the signed link is the permission.
        try:
            size, expires = int(self.query["size"][-1]), int(self.query["expires"][-1])
            signature = self.query["sig"][-1]
        except (KeyError, ValueError) as err:
            raise HubError(403, "Upload link is missing its size, expiry or signature.") from err
        valid = hmac.compare_digest(signature, self._upload_signature(oid, size, expires))
        if not valid or expires < time.time() or not _SHA256_RE.match(oid):
            raise HubError(403, "Upload link is invalid or expired; ask the batch endpoint for a new one.")
        if self.hub.store.blob_size(oid) == size:
            for _ in self._body_chunks():
                pass
        else:
            self.hub.store.put_blob_stream(self._body_chunks(), oid, size)
        self._send_bytes(200, b"", "text/plain")

    def _lfs_verify(self, ns: str, name: str) -> None:
        repo_id, _ = self._writable_repo(ns, name)
        body = self._json_body()
        oid, size = str(body.get("oid", "")), body.get("size")
        if not _SHA256_RE.match(oid) or self.hub.store.blob_size(oid) != size:
            raise HubError(404, f"LFS object {oid} of {size} bytes was not uploaded.")
        self.hub.store.grant(repo_id, oid)
        self._send_json({"oid": oid, "size": size}, content_type="application/vnd.git-lfs+json")

    # -- test control -----------------------------------------------------------------------------------

    def _faults_control(self) -> None:
        """GET lists planned faults; DELETE clears them; POST {"clear"?: bool, "faults": [Fault fields]}.
        Every call needs a write token: a planned fault can make any caller's request fail."""
        self._require_write_access()
        if self.command == "POST":
            body = self._json_body()
            if body.get("clear"):
                self.hub.faults.clear()
            for spec in body.get("faults") or []:
                try:
                    self.hub.faults.add(**spec)
                except (TypeError, ValueError, re.error) as err:
                    raise HubError(400, f"Invalid fault {spec!r}: {err}") from err
        elif self.command == "DELETE":
            self.hub.faults.clear()
        elif self.command != "GET":
            raise HubError(404, f"No route for {self.command} {self.raw_path}.")
        self._send_json({"faults": self.hub.faults.pending()})


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def new_token() -> str:
    """A fresh write token for a local Hub, shaped like the Hub's own: llama.cpp's -hf downloader sends only
    `hf_` + 34 to 253 letters or digits (common/hf-cache.cpp, is_valid_hf_token) and drops any other silently."""
    return "hf_" + secrets.token_hex(24)


class LocalHub:
    """A Hub-compatible endpoint serving the repos stored under `root`.

    Writes need one of `tokens` (else 401) and private repos are invisible (404 RepoNotFound) to everyone else;
    public repos are readable without a token. There is no open mode: `new_token()` makes one. `user` is the name
    `whoami` answers, the default namespace of new repos and the author of commits; `orgs` the organisations
    `whoami` lists beside it (the namespaces the tests, the benchmark and the watch demo publish to: mtpress checks
    a target's namespace against them before a run). `faults=True` turns on fault injection (`faults`, and the
    `/_mtpress/faults` route) for reliability tests. `max_file_size` is the per-file limit (the Hub's 50 GB by
    default): an LFS object above it is refused at the batch, as the Hub does. `lfs_scope` says which stored LFS
    objects a repo's commits may name without uploading them: "hub" (default) every one, as content-addressed
    storage; "repo" only those uploaded through that repo or committed in it, like a Hub that does not share
    objects between repos (the tests of promoting a bounded-disk release use it).

        token = new_token()
        with LocalHub(tmp_path, tokens={token}) as hub:
            HfApi(endpoint=hub.url, token=token).create_repo("mtpress-demo/tiny")
    """

    def __init__(
        self,
        root: Path,
        *,
        tokens: set[str],
        host: str = "127.0.0.1",
        port: int = 0,
        user: str = "mtpress-demo",
        orgs: tuple[str, ...] = ("mtpress-test", "mtpress-bench", "mtpress-bot"),
        faults: bool = False,
        max_file_size: int = HUB_MAX_FILE_SIZE,
        lfs_scope: str = "hub",
    ):
        tokens = set(tokens)
        if not tokens or not all(isinstance(t, str) and _TOKEN_RE.match(t) for t in tokens):
            # The message never shows the tokens: they are secrets.
            raise ValueError("A local Hub needs at least one write token, each at least 20 printable characters "
                             "without spaces; new_token() makes one shaped like the Hub's (which llama.cpp sends).")
        if lfs_scope not in ("hub", "repo"):
            raise ValueError(f"lfs_scope must be 'hub' or 'repo', not {lfs_scope!r}")
        self.store = HubStore(Path(root), lfs_scope)
        self.host, self.port = host, port
        self.tokens = tokens
        self.user = user
        self.orgs = orgs
        self.faults = FaultPlan(enabled=faults)
        self.max_file_size = max_file_size  # per file, in bytes: an LFS object above it is refused
        self.secret = secrets.token_bytes(32)  # signs LFS upload links; new on every start of the process
        self.bytes_received = 0  # request body bytes from every client since start: what benchmarks call uploaded
        self.bytes_served: dict[str, int] = {}  # response body bytes of /resolve by "repo/path": what was downloaded
        self._received_lock = threading.Lock()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalHub is not started: call start() (or use it as a context manager) first.")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self._httpd.server_address[1]}"

    def bind(self) -> None:
        """Open the listening socket (start() does it); `url` is known from here on."""
        if self._httpd is None:
            self._httpd = _HubHTTPServer((self.host, self.port), self)

    def start(self) -> LocalHub:
        """Serve in a daemon thread and return at once."""
        self.bind()
        # A short poll interval makes stop() quick: shutdown() waits for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="mtpress-hub", daemon=True
        )
        self._thread.start()
        logger.info("Local Hub serving %s at %s", self.store.root, self.url)
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.close_connections()
        self._httpd.server_close()
        self._httpd = self._thread = None

    def count_received(self, size: int) -> None:
        with self._received_lock:
            self.bytes_received += size

    def count_served(self, key: str, size: int) -> None:
        with self._received_lock:
            self.bytes_served[key] = self.bytes_served.get(key, 0) + size

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve(hub: LocalHub) -> None:
    """Serve `hub` in the foreground until interrupted (for `mtpress hub serve`, which binds it first to show its
    address)."""
    hub.bind()
    logger.info("Local Hub serving %s at %s (Ctrl+C to stop)", hub.store.root, hub.url)
    # Ctrl+C and SIGTERM (a service manager, `docker stop`) both stop it cleanly. Set explicitly: a process
    # started by one that ignores SIGINT inherits the ignoring, and Python would then never raise
    # KeyboardInterrupt.
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.default_int_handler)
    try:
        hub._httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
