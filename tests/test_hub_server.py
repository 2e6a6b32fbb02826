"""The local Hub endpoint, driven through the real, unmodified huggingface_hub client (and `mtpress hub serve`)."""

import os

# The client reads both at import time: LFS uploads instead of Xet, and no call may leak to huggingface.co
# (every call below also passes the local endpoint explicitly).
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")

import base64  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from mtpress.hub.server import LocalHub, new_token  # noqa: E402

TOKEN = "hf_" + "mtpressLocalHubTestToken0123456789"  # the shape llama.cpp agrees to send
REPO = "mtpress-demo/tiny-mtp"
BASE_MODEL = "Qwen/Qwen3.5-9B"
CARD = f"""---
license: apache-2.0
base_model: {BASE_MODEL}
tags:
- mtp
- gguf-release
---
# Tiny MTP
"""
BIG_TEXT = b"0123456789abcdef\n" * (11 * 1024 * 1024 // 17)  # > 10 MB of text: LFS by size alone
HUB_GITATTRIBUTES_OID = "a6344aac8c09253b3b630fb776ae94478aa0275b"  # the Hub's default .gitattributes


@pytest.fixture(autouse=True)
def isolated_client(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # in case another module imported it first
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def hub(tmp_path):
    # Fault injection on: the reliability tests at the end plan failures on this hub.
    with LocalHub(tmp_path / "hub", tokens={TOKEN}, faults=True) as hub:
        yield hub


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = {"model.embed_tokens.weight": np.ones((8, 4), np.float32), "mtp.fc.weight": np.zeros((4, 8), np.float16)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def release_operations(weights, config=b'{"model_type": "qwen3_5"}\n'):
    return [
        CommitOperationAdd("README.md", CARD.encode()),
        CommitOperationAdd("config.json", config),
        CommitOperationAdd("big.txt", BIG_TEXT),
        CommitOperationAdd("model.safetensors", str(weights)),
        CommitOperationAdd("sub/dir/notes.txt", b"nested\n"),
    ]


@pytest.fixture
def release(api, weights):
    api.create_repo(REPO)
    return api.create_commit(REPO, operations=release_operations(weights), commit_message="Release v1")


def head(api, repo_id=REPO):
    return api.model_info(repo_id).sha


def git_blob_oid(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def raw_commit(hub, lines, repo_id=REPO):
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return requests.post(
        f"{hub.url}/api/models/{repo_id}/commit/main",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
    )


# -- repos, commits, metadata --------------------------------------------------------------------------


def test_create_repo_starts_with_an_initial_commit_and_409s_when_it_exists(hub, api):
    url = api.create_repo(REPO)
    assert url == f"{hub.url}/{REPO}"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True) == url

    info = api.model_info(REPO, files_metadata=True)
    assert re.fullmatch("[0-9a-f]{40}", info.sha)
    assert [(s.rfilename, s.blob_id) for s in info.siblings] == [(".gitattributes", HUB_GITATTRIBUTES_OID)]
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == [info.sha]


def test_one_commit_carries_lfs_and_regular_files(hub, api, weights, release):
    assert release.oid == head(api)
    assert [c.title for c in api.list_repo_commits(REPO)] == ["Release v1", "initial commit"]

    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["big.txt"].lfs.sha256 == hashlib.sha256(BIG_TEXT).hexdigest()
    assert siblings["big.txt"].lfs.size == siblings["big.txt"].size == len(BIG_TEXT)
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert siblings["config.json"].lfs is None and siblings["sub/dir/notes.txt"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_oid(b'{"model_type": "qwen3_5"}\n')
    assert (hub.store.root / "blobs" / "sha256" / hashlib.sha256(BIG_TEXT).hexdigest()).stat().st_size == len(BIG_TEXT)


def test_model_info_reads_card_data_and_derives_tags_like_the_hub(api, release):
    info = api.model_info(REPO)
    assert info.card_data.base_model == BASE_MODEL
    assert info.card_data.license == "apache-2.0"
    for tag in ("mtp", "gguf-release", f"base_model:{BASE_MODEL}", f"base_model:finetune:{BASE_MODEL}"):
        assert tag in info.tags
    assert "license:apache-2.0" in info.tags
    assert api.model_info(REPO, revision=release.oid).sha == release.oid


def test_list_models_filters_by_author_search_and_tags(api, release):
    api.create_repo("someone-else/tiny-other")
    api.create_repo("mtpress-demo/unrelated")

    assert {m.id for m in api.list_models(author="mtpress-demo")} == {REPO, "mtpress-demo/unrelated"}
    assert {m.id for m in api.list_models(search="tiny")} == {REPO, "someone-else/tiny-other"}
    assert [m.id for m in api.list_models(filter=f"base_model:{BASE_MODEL}")] == [REPO]
    assert [m.id for m in api.list_models(filter=["mtp", "license:apache-2.0"])] == [REPO]
    assert list(api.list_models(filter=["mtp", "license:mit"])) == []
    assert len(list(api.list_models(sort="created_at", limit=2))) == 2
    full = next(iter(api.list_models(search="tiny-mtp", full=True, cardData=True)))
    assert full.card_data.base_model == BASE_MODEL and len(full.siblings) == 6


def test_tree_listing_and_refs(api, release):
    tree = {item.path: item for item in api.list_repo_tree(REPO, recursive=True)}
    assert isinstance(tree["sub"], RepoFolder) and isinstance(tree["sub/dir"], RepoFolder)
    assert isinstance(tree["big.txt"], RepoFile) and tree["big.txt"].lfs.sha256 == hashlib.sha256(BIG_TEXT).hexdigest()
    assert tree["config.json"].lfs is None

    top = {item.path for item in api.list_repo_tree(REPO)}
    assert top == {".gitattributes", "README.md", "config.json", "big.txt", "model.safetensors", "sub"}
    assert [item.path for item in api.list_repo_tree(REPO, path_in_repo="sub/dir")] == ["sub/dir/notes.txt"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="missing"))

    api.create_tag(REPO, tag="v1")
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", release.oid)]
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", release.oid)]
    assert refs.converts == []
    assert api.model_info(REPO, revision="v1").sha == release.oid


def test_delete_repo(api, release):
    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)
    api.delete_repo(REPO, missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)


def test_state_survives_a_restart(hub, api, release, tmp_path):
    hub.stop()
    with LocalHub(hub.store.root, tokens={TOKEN}) as restarted:
        again = HfApi(endpoint=restarted.url, token=TOKEN)
        assert again.model_info(REPO).sha == release.oid
        assert len(again.list_repo_commits(REPO)) == 2
        path = hf_hub_download(REPO, "big.txt", endpoint=restarted.url, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == BIG_TEXT


# -- downloads -----------------------------------------------------------------------------------------


def test_hf_hub_download_follows_main_and_pins_a_revision(hub, api, release, tmp_path):
    api.upload_file(path_or_fileobj=b'{"model_type": "v2"}\n', path_in_repo="config.json", repo_id=REPO)

    def download(filename="config.json", repo_id=REPO, **kwargs):
        path = hf_hub_download(repo_id, filename, endpoint=hub.url, cache_dir=tmp_path / "cache", **kwargs)
        return Path(path).read_bytes()

    assert download() == b'{"model_type": "v2"}\n'
    assert download(revision=release.oid) == b'{"model_type": "qwen3_5"}\n'
    assert download("big.txt") == BIG_TEXT

    with pytest.raises(EntryNotFoundError):
        download("nope.json")
    with pytest.raises(RevisionNotFoundError):
        download(revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        download(repo_id="mtpress-demo/missing")


def test_resolve_etags_match_the_tree_oids(hub, api, release):
    tree = {item.path: item for item in api.list_repo_tree(REPO, recursive=True)}
    regular = get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=hub.url))
    assert regular.etag == tree["config.json"].blob_id and regular.commit_hash == release.oid
    lfs = get_hf_file_metadata(hf_hub_url(REPO, "big.txt", endpoint=hub.url))
    assert lfs.etag == tree["big.txt"].lfs.sha256 and lfs.size == len(BIG_TEXT)

    head = requests.head(f"{hub.url}/{REPO}/resolve/main/big.txt")
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(BIG_TEXT))
    assert head.headers["Accept-Ranges"] == "bytes" and "X-Xet-Hash" not in head.headers
    missing = requests.head(f"{hub.url}/{REPO}/resolve/main/nope.bin")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.headers["X-Repo-Commit"] == release.oid


def test_snapshot_download_with_allow_patterns(hub, release, tmp_path):
    folder = snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache", allow_patterns=["*.json", "sub/*"])
    files = {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}
    assert files == {"config.json", "sub/dir/notes.txt"}
    assert folder.endswith(release.oid)


def test_range_requests(hub, release):
    url = f"{hub.url}/{REPO}/resolve/main/big.txt"
    part = requests.get(url, headers={"Range": "bytes=17-33"})
    assert part.status_code == 206 and part.content == BIG_TEXT[17:34]
    assert part.headers["Content-Range"] == f"bytes 17-33/{len(BIG_TEXT)}"
    assert requests.get(url, headers={"Range": "bytes=-5"}).content == BIG_TEXT[-5:]
    tail = requests.get(url, headers={"Range": f"bytes={len(BIG_TEXT) - 3}-"})
    assert tail.status_code == 206 and tail.content == BIG_TEXT[-3:]
    too_far = requests.get(url, headers={"Range": f"bytes={len(BIG_TEXT)}-"})
    assert too_far.status_code == 416 and too_far.headers["Content-Range"] == f"bytes */{len(BIG_TEXT)}"


def test_get_safetensors_metadata_reads_the_header_by_range(api, release):
    metadata = api.get_safetensors_metadata(REPO)
    tensors = metadata.files_metadata["model.safetensors"].tensors
    assert set(tensors) == {"model.embed_tokens.weight", "mtp.fc.weight"}
    assert tensors["mtp.fc.weight"].dtype == "F16" and tensors["mtp.fc.weight"].shape == [4, 8]


def test_the_requests_llama_cpp_makes(hub, api, release):
    """llama.cpp's -hf downloader: refs, one recursive tree listing at the commit, then HEAD and GET of each
    file with the path not percent-encoded. Checked by hand against llama-cli 11434 as well."""
    refs = requests.get(f"{hub.url}/api/models/{REPO}/refs").json()
    commit = next(b["targetCommit"] for b in refs["branches"] if b["name"] == "main")
    files = requests.get(f"{hub.url}/api/models/{REPO}/tree/{commit}?recursive=true").json()
    ids = {e["path"]: e.get("lfs", {}).get("oid", e["oid"]) for e in files if e["type"] == "file"}
    assert all(len(oid) in (40, 64) for oid in ids.values()) and len(ids["big.txt"]) == 64

    url = f"{hub.url}/{REPO}/resolve/{commit}/sub/dir/notes.txt"
    head = requests.head(url)
    assert head.status_code == 200 and head.headers["ETag"] == f'"{ids["sub/dir/notes.txt"]}"'
    assert head.headers["Content-Length"] == "7" and head.headers["Accept-Ranges"] == "bytes"
    assert requests.get(url).content == b"nested\n"


# -- commit semantics ----------------------------------------------------------------------------------


def test_recommitting_the_same_files_makes_no_new_commit(api, weights, release):
    again = api.create_commit(REPO, operations=release_operations(weights), commit_message="Release v1 again")
    assert again.oid == release.oid == head(api)
    assert len(api.list_repo_commits(REPO)) == 2


def test_changing_one_small_file_touches_only_it(hub, api, weights, release, caplog):
    caplog.set_level(logging.INFO, logger="mtpress.hub")
    changed = api.create_commit(
        REPO, operations=release_operations(weights, config=b'{"model_type": "changed"}\n'), commit_message="cfg"
    )
    assert changed.oid != release.oid
    assert "/_mtpress/lfs/" not in caplog.text  # no LFS object was sent again

    before = {s.rfilename: s.blob_id for s in api.model_info(REPO, revision=release.oid, files_metadata=True).siblings}
    after = {s.rfilename: s.blob_id for s in api.model_info(REPO, files_metadata=True).siblings}
    assert before.keys() == after.keys()
    assert {path for path in after if after[path] != before[path]} == {"config.json"}


def test_delete_operations(api, release):
    api.create_commit(
        REPO,
        operations=[CommitOperationDelete("sub/"), CommitOperationDelete("big.txt")],
        commit_message="Prune",
    )
    assert set(api.list_repo_files(REPO)) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, operations=[CommitOperationDelete("big.txt")], commit_message="Again")


def test_same_content_under_two_paths_is_uploaded_once(hub, api, weights, caplog):
    caplog.set_level(logging.INFO, logger="mtpress.hub")
    api.create_repo(REPO)
    with weights.open("rb") as opened:
        api.create_commit(
            REPO,
            operations=[CommitOperationAdd("a.safetensors", str(weights)), CommitOperationAdd("b.safetensors", opened)],
            commit_message="twins",
        )
    assert caplog.text.count("PUT /_mtpress/lfs/") == 1
    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["a.safetensors"].lfs.sha256 == siblings["b.safetensors"].lfs.sha256


def test_copy_operations(api, release):
    api.create_commit(
        REPO,
        operations=[
            CommitOperationCopy(src_path_in_repo="big.txt", path_in_repo="copy/big.txt"),
            CommitOperationCopy(src_path_in_repo="config.json", path_in_repo="copy/config.json"),
        ],
        commit_message="Copy",
    )
    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["copy/big.txt"].lfs.sha256 == siblings["big.txt"].lfs.sha256
    assert siblings["copy/config.json"].blob_id == siblings["config.json"].blob_id


def test_parent_commit_mismatch_is_refused(api, release):
    first_commit = api.list_repo_commits(REPO)[-1].commit_id
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(
            REPO,
            operations=[CommitOperationAdd("late.txt", b"too late\n")],
            commit_message="stale",
            parent_commit=first_commit,
        )
    assert err.value.response.status_code == 412
    assert head(api) == release.oid
    ok = api.create_commit(
        REPO, operations=[CommitOperationAdd("late.txt", b"on time\n")], commit_message="ok", parent_commit=release.oid
    )
    assert head(api) == ok.oid


def test_concurrent_writers_are_serialised(api, release):
    def write(i):
        api.upload_file(path_or_fileobj=f"writer {i}\n".encode(), path_in_repo=f"w/{i}.txt", repo_id=REPO)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(8)))
    assert {f for f in api.list_repo_files(REPO) if f.startswith("w/")} == {f"w/{i}.txt" for i in range(8)}
    assert len(api.list_repo_commits(REPO)) == 2 + 8


@pytest.mark.parametrize(
    "path", ["../evil", "a/../../etc/passwd", "./a", "a//b", "/abs", "a\\b", "a\x00b", ".git/config", "x/.GIT/y", ""]
)
def test_unsafe_paths_are_rejected(hub, api, release, path):
    content = base64.b64encode(b"pwned").decode()
    answer = raw_commit(
        hub,
        [
            {"key": "header", "value": {"summary": "evil"}},
            {"key": "file", "value": {"path": "fine.txt", "content": content, "encoding": "base64"}},
            {"key": "file", "value": {"path": path, "content": content, "encoding": "base64"}},
        ],
    )
    assert answer.status_code == 400 and "Invalid path" in answer.json()["error"]
    assert head(api) == release.oid  # nothing of the commit was recorded, not even the valid file


def test_lfs_file_must_reference_an_uploaded_object(hub, api, release):
    answer = raw_commit(
        hub,
        [
            {"key": "header", "value": {"summary": "ghost"}},
            {"key": "lfsFile", "value": {"path": "ghost.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}},
        ],
    )
    assert answer.status_code == 422 and head(api) == release.oid
    big_oid = hashlib.sha256(BIG_TEXT).hexdigest()
    wrong_size = {"path": "x.bin", "algo": "sha256", "oid": big_oid, "size": 3}
    assert raw_commit(hub, [{"key": "header", "value": {}}, {"key": "lfsFile", "value": wrong_size}]).status_code == 422


def test_lfs_upload_links_are_signed_and_content_is_verified(hub, release):
    data = b"some object bytes"
    oid = hashlib.sha256(data).hexdigest()
    batch = requests.post(
        f"{hub.url}/{REPO}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}], "hash_algo": "sha256"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert requests.put(href.replace("sig=", "sig=0"), data=data).status_code == 403
    assert requests.put(href, data=data.upper()).status_code == 400  # same size, wrong sha256
    assert requests.put(href, data=data + b"!").status_code == 400  # more bytes than announced
    assert hub.store.blob_size(oid) is None
    assert requests.put(href, data=data).status_code == 200
    assert hub.store.blob_size(oid) == len(data)
    again = requests.post(
        f"{hub.url}/{REPO}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).json()
    assert "actions" not in again["objects"][0]  # already stored: nothing to send


def test_invalid_card_yaml_is_rejected_before_upload(api, release):
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.create_commit(
            REPO, operations=[CommitOperationAdd("README.md", b"---\nlicense: [unclosed\n---\n")], commit_message="x"
        )
    assert head(api) == release.oid


# -- auth ----------------------------------------------------------------------------------------------

STRANGER = "hf_" + "x" * 34  # well shaped, but not this hub's
ANONYMOUS = {}


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def alice_hub(tmp_path):
    with LocalHub(tmp_path / "alice", tokens={TOKEN}, user="alice") as hub:
        yield hub


@pytest.fixture
def alice_repos(alice_hub):
    """alice/secret (private, with a.txt) and alice/open (public), created by the token's owner."""
    owner = HfApi(endpoint=alice_hub.url, token=TOKEN)
    owner.create_repo("alice/secret", private=True)
    owner.create_repo("alice/open")
    owner.upload_file(path_or_fileobj=b"hidden\n", path_in_repo="a.txt", repo_id="alice/secret")
    return owner


@pytest.mark.parametrize("tokens", [set(), {"secret"}, {"hf_" + "short"}, {TOKEN, "a space 0123456789 abcdef"}, TOKEN])
def test_a_hub_always_has_write_tokens_that_cannot_be_guessed(tmp_path, tokens):
    # There is no open mode; a short token, one that cannot be a bearer token, or a str mistaken for a set is refused.
    with pytest.raises(ValueError, match="needs at least one write token") as err:
        LocalHub(tmp_path / "hub", tokens=tokens)
    assert not re.search("secret|short|0123456789|" + TOKEN, str(err.value))  # a token is a secret, even a bad one
    assert not (tmp_path / "hub").exists()
    generated = new_token()
    assert re.fullmatch(r"hf_[A-Za-z0-9]{34,253}", generated) and generated != new_token()  # llama.cpp sends it
    LocalHub(tmp_path / "ok", tokens={generated, "hf_oauth_" + "0123456789abcdef" * 3})  # the Hub takes OAuth ones


def test_whoami(alice_hub):
    assert HfApi(endpoint=alice_hub.url, token=TOKEN).whoami()["name"] == "alice"
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=alice_hub.url, token=STRANGER).whoami()
    assert requests.get(f"{alice_hub.url}/api/whoami-v2").status_code == 401


def test_private_repos_are_invisible_and_writes_need_a_valid_token(alice_hub, alice_repos, tmp_path):
    owner = alice_repos
    anonymous = HfApi(endpoint=alice_hub.url, token=False)
    stranger = HfApi(endpoint=alice_hub.url, token=STRANGER)

    assert owner.model_info("alice/secret").private is True
    for caller in (anonymous, stranger):
        with pytest.raises(RepositoryNotFoundError):
            caller.model_info("alice/secret")
        with pytest.raises(RepositoryNotFoundError):
            list(caller.list_repo_tree("alice/secret"))
        assert {m.id for m in caller.list_models(author="alice")} == {"alice/open"}
        assert caller.model_info("alice/open").private is False  # public reads stay open
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "a.txt", endpoint=alice_hub.url, token=False, cache_dir=tmp_path / "c")

    for caller in (anonymous, stranger):
        with pytest.raises(HfHubHTTPError) as err:
            caller.create_repo("alice/intruder")
        assert err.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as err:
            caller.upload_file(path_or_fileobj=b"x\n", path_in_repo="x.txt", repo_id="alice/open")
        assert err.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as err:
            caller.delete_repo("alice/open")
        assert err.value.response.status_code == 401
    assert [c.title for c in owner.list_repo_commits("alice/open")] == ["initial commit"]
    assert {m.id for m in owner.list_models(author="alice")} == {"alice/open", "alice/secret"}


def write_requests():
    """(method, path, keyword arguments of requests.request) of every write route, aimed at alice/open."""
    oid, data = hashlib.sha256(b"intruder").hexdigest(), b"intruder"
    commit = b"".join(json.dumps(line).encode() + b"\n" for line in [
        {"key": "header", "value": {"summary": "intrusion"}},
        {"key": "file", "value": {"path": "x.txt", "content": base64.b64encode(data).decode(), "encoding": "base64"}},
    ])  # fmt: skip
    return {
        "create repo": ("POST", "/api/repos/create", {"json": {"name": "intruder", "organization": "alice"}}),
        "delete repo": ("DELETE", "/api/repos/delete", {"json": {"name": "open", "organization": "alice"}}),
        "preupload": ("POST", "/api/models/alice/open/preupload/main",
                      {"json": {"files": [{"path": "x.txt", "size": 8, "sample": base64.b64encode(data).decode()}]}}),
        "commit": ("POST", "/api/models/alice/open/commit/main",
                   {"data": commit, "headers": {"Content-Type": "application/x-ndjson"}}),
        "LFS batch": ("POST", "/alice/open.git/info/lfs/objects/batch",
                      {"json": {"operation": "upload", "objects": [{"oid": oid, "size": 8}]}}),
        "LFS verify": ("POST", "/alice/open.git/info/lfs/objects/verify", {"json": {"oid": oid, "size": 8}}),
        "tag": ("POST", "/api/models/alice/open/tag/main", {"json": {"tag": "v1"}}),
    }


@pytest.mark.parametrize("credentials", [ANONYMOUS, bearer(STRANGER), {"Authorization": TOKEN}],
                         ids=["no token", "wrong token", "not a bearer header"])
@pytest.mark.parametrize("route", list(write_requests()))
def test_every_write_without_a_valid_token_is_401(alice_hub, alice_repos, route, credentials):
    method, path, kwargs = write_requests()[route]
    before = alice_repos.list_repo_refs("alice/open")
    headers = {**kwargs.pop("headers", {}), **credentials}
    answer = requests.request(method, alice_hub.url + path, headers=headers, **kwargs)
    # The real Hub's answer; huggingface_hub raises it as an HTTP error, not as RepositoryNotFoundError.
    assert answer.status_code == 401 and answer.json()["error"] == "Invalid credentials in Authorization header"
    assert alice_repos.list_repo_refs("alice/open") == before
    assert {m.id for m in alice_repos.list_models(author="alice")} == {"alice/open", "alice/secret"}
    assert alice_hub.store.blob_size(hashlib.sha256(b"intruder").hexdigest()) is None


def test_the_same_writes_with_the_token_go_through(alice_hub, alice_repos):
    """The counterpart of the 401s above: each request is a valid write once it carries the token (in this order
    the LFS verify finds the object, which the commit before it stored)."""
    for route, (method, path, kwargs) in write_requests().items():
        headers = {**kwargs.pop("headers", {}), **bearer(TOKEN)}
        answer = requests.request(method, alice_hub.url + path, headers=headers, **kwargs)
        assert answer.status_code == 200, (route, answer.text)
        if route == "delete repo":
            alice_repos.create_repo("alice/open")


PRIVATE_READS = [
    ("GET", "/api/models/alice/secret", {}),
    ("GET", "/api/models/alice/secret/revision/main", {}),
    ("GET", "/api/models/alice/secret/tree/main?recursive=true", {}),
    ("POST", "/api/models/alice/secret/paths-info/main", {"data": {"paths": "a.txt"}}),
    ("GET", "/api/models/alice/secret/refs", {}),
    ("GET", "/api/models/alice/secret/commits/main", {}),
    ("GET", "/alice/secret/resolve/main/a.txt", {}),
    ("HEAD", "/alice/secret/resolve/main/a.txt", {}),
]


@pytest.mark.parametrize("method,path,kwargs", PRIVATE_READS, ids=[f"{m} {p}" for m, p, _ in PRIVATE_READS])
def test_a_private_repo_is_404_repo_not_found_without_the_token(alice_hub, alice_repos, method, path, kwargs):
    for credentials in (ANONYMOUS, bearer(STRANGER)):
        answer = requests.request(method, alice_hub.url + path, headers=credentials, **kwargs)
        # What the Hub answers for a repo the caller may not see: as if it did not exist.
        assert answer.status_code == 404 and answer.headers["X-Error-Code"] == "RepoNotFound"
        assert b"hidden" not in answer.content
    assert requests.request(method, alice_hub.url + path, headers=bearer(TOKEN), **kwargs).status_code == 200
    public = path.replace("alice/secret", "alice/open").replace("a.txt", ".gitattributes")
    assert requests.request(method, alice_hub.url + public, **kwargs).status_code == 200


def test_logs_never_show_the_token_or_upload_signatures(alice_hub, weights, caplog):
    caplog.set_level(logging.DEBUG, logger="mtpress.hub")
    api = HfApi(endpoint=alice_hub.url, token=TOKEN)
    api.create_repo("alice/logged")
    api.create_commit(
        "alice/logged", operations=[CommitOperationAdd("model.safetensors", str(weights))], commit_message="w"
    )
    api.whoami()
    assert "PUT /_mtpress/lfs/" in caplog.text and "sig=<redacted>" in caplog.text
    assert TOKEN not in caplog.text and TOKEN[3:] not in caplog.text


# -- mtpress hub serve ---------------------------------------------------------------------------------


def hub_serve_command(root, *args):
    return [str(Path(sys.executable).with_name("mtpress")), "hub", "serve", "--root", str(root), "--port", "0", *args]


class ServedHub:
    """`mtpress hub serve` in a subprocess on a free port; `lines` are the first lines it printed."""

    def __init__(self, root, *args):
        # Started with SIGINT ignored, as a child of a process that ignores it (a test runner, a shell's background
        # job) inherits: Ctrl+C must stop it all the same.
        self.proc = subprocess.Popen(hub_serve_command(root, *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        self.lines = [self.proc.stdout.readline() for _ in range(2)]
        self.url = re.search(r"HF_ENDPOINT=(\S+)", self.lines[1]).group(1)

    def stop(self) -> str:
        """Ctrl+C, then everything it printed (stdout and stderr)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # a failing test must not leave a server behind
            raise
        # Read through the same file object: readline() above may have buffered more than two lines already.
        return "".join(self.lines) + self.proc.stdout.read()


def test_hub_serve_prints_a_new_token_once_and_only_it_works(tmp_path):
    served = ServedHub(tmp_path / "hub")
    try:
        token = re.search(r"HF_TOKEN=(\S+)", served.lines[1]).group(1)
        assert re.fullmatch(r"hf_[A-Za-z0-9]{34,253}", token) and token != TOKEN
        owner = HfApi(endpoint=served.url, token=token)
        assert owner.whoami()["name"] == "mtpress-demo"
        owner.create_repo("mtpress-demo/private", private=True)
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=served.url, token=False).model_info("mtpress-demo/private")
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=served.url, token=STRANGER).create_repo("mtpress-demo/intruder")
        assert err.value.response.status_code == 401
        assert requests.get(f"{served.url}/_mtpress/faults", headers=bearer(token)).status_code == 404
    finally:
        out = served.stop()
    assert served.proc.returncode == 0, out
    assert out.count(token) == 1  # shown once, in the export line
    assert not any(token.encode() in p.read_bytes() for p in (tmp_path / "hub").rglob("*") if p.is_file())


def test_hub_serve_takes_the_token_from_a_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    served = ServedHub(tmp_path / "hub", "--token-file", str(token_file), "--allow-faults")
    try:
        assert f'HF_TOKEN="$(cat {token_file})"' in served.lines[1] and "fault injection on" in served.lines[0]
        HfApi(endpoint=served.url, token=TOKEN).create_repo("mtpress-demo/from-file")
        with pytest.raises(HfHubHTTPError) as err:
            HfApi(endpoint=served.url, token=STRANGER).create_repo("mtpress-demo/intruder")
        assert err.value.response.status_code == 401
        assert requests.get(f"{served.url}/_mtpress/faults", headers=bearer(TOKEN)).json() == {"faults": []}
    finally:
        out = served.stop()
    assert served.proc.returncode == 0, out
    assert TOKEN not in out


@pytest.mark.parametrize("content", ["", "not-a-token\n", "hf_tooShort\n", "two tokens-0123456789abcdef\n"])
def test_hub_serve_refuses_a_token_file_without_a_hub_token(tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    # A subprocess with a timeout: were the token accepted, the command would serve forever.
    result = subprocess.run(hub_serve_command(tmp_path / "hub", "--token-file", str(token_file)), capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2 and "--token-file" in result.stderr and "at least 20 printable" in result.stderr
    assert not re.search("not-a-token|tooShort|two tokens", result.stderr)
    assert not (tmp_path / "hub").exists()  # refused before anything was served or created


# -- fault injection -----------------------------------------------------------------------------------


def test_client_retries_through_two_503s(hub, api, release):
    hub.faults.add("POST", r"/preupload/", status=503, times=2)
    commit = api.upload_file(path_or_fileobj=b"after outage\n", path_in_repo="retry.txt", repo_id=REPO)
    assert head(api) == commit.oid
    assert hub.faults.pending() == []


def test_client_honours_retry_after_on_429(hub, api, release):
    hub.faults.add("GET", r"/tree/", status=429, retry_after=1)
    started = time.monotonic()
    files = api.list_repo_files(REPO)
    assert "config.json" in files and hub.faults.pending() == []
    assert time.monotonic() - started >= 2  # Retry-After 1 s, plus the client's own 1 s margin


def test_dropped_connection_is_recovered_by_retry(hub, api, weights, caplog):
    caplog.set_level(logging.INFO, logger="mtpress.hub")
    api.create_repo(REPO)
    hub.faults.add("POST", r"\.git/info/lfs/objects/batch$", action="drop")
    commit = api.create_commit(REPO, operations=[CommitOperationAdd("w.safetensors", str(weights))], commit_message="w")
    assert head(api) == commit.oid and "dropped" in caplog.text
    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    assert siblings["w.safetensors"].lfs is not None


@pytest.mark.parametrize("action", ["status", "abort_commit"])
def test_failed_commit_leaves_the_head_unchanged(hub, api, release, action):
    hub.faults.add("POST", r"/commit/main$", action=action, status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"lost\n", path_in_repo="lost.txt", repo_id=REPO)
    assert err.value.response.status_code == 500
    assert head(api) == release.oid
    assert "lost.txt" not in api.list_repo_files(REPO)
    assert len(api.list_repo_commits(REPO)) == 2
    retried = api.upload_file(path_or_fileobj=b"lost\n", path_in_repo="lost.txt", repo_id=REPO)
    assert head(api) == retried.oid


def test_faults_can_be_planned_over_http(hub, api, release):
    plan = {"faults": [{"method": "GET", "path": "^/api/models/", "status": 500, "times": 1}]}
    control, auth = f"{hub.url}/_mtpress/faults", bearer(TOKEN)
    assert requests.post(control, json=plan, headers=auth).json()["faults"][0]["status"] == 500
    failed = requests.get(f"{hub.url}/api/models/{REPO}")
    assert failed.status_code == 500 and "Injected" in failed.json()["error"]
    assert requests.get(f"{hub.url}/api/models/{REPO}").status_code == 200

    requests.post(control, json=plan, headers=auth)
    assert requests.get(control, headers=auth).json()["faults"][0]["path"] == "^/api/models/"
    assert requests.delete(control, headers=auth).json() == {"faults": []}
    bad = requests.post(control, json={"faults": [{"action": "explode"}]}, headers=auth)
    assert bad.status_code == 400


@pytest.mark.parametrize("credentials", [ANONYMOUS, bearer(STRANGER)], ids=["no token", "wrong token"])
def test_the_fault_control_needs_the_write_token(hub, release, credentials):
    control = f"{hub.url}/_mtpress/faults"
    plan = {"faults": [{"method": "GET", "path": "^/api/models/", "status": 500}]}
    for method, kwargs in (("POST", {"json": plan}), ("GET", {}), ("DELETE", {})):
        answer = requests.request(method, control, headers=credentials, **kwargs)
        assert answer.status_code == 401, method
    assert hub.faults.pending() == []
    assert requests.get(f"{hub.url}/api/models/{REPO}").status_code == 200


def test_fault_injection_is_off_unless_asked_for(alice_hub, alice_repos):
    control = f"{alice_hub.url}/_mtpress/faults"
    plan = {"faults": [{"method": "GET", "path": "^/api/models/", "status": 500}]}
    for method, kwargs in (("POST", {"json": plan}), ("GET", {}), ("DELETE", {})):
        answer = requests.request(method, control, headers=bearer(TOKEN), **kwargs)
        assert answer.status_code == 404 and "No route" in answer.json()["error"], method
    with pytest.raises(RuntimeError, match="Fault injection is off.*--allow-faults"):
        alice_hub.faults.add("GET", "^/api/models/", status=500)
    assert requests.get(f"{alice_hub.url}/api/models/alice/open").status_code == 200
