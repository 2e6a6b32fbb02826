"""publish: one commit or nothing, only what changed, and a plan that says so."""

import time

import pytest
from huggingface_hub import HfApi

from mtpress.errors import PublishConflictError, PublishError
from mtpress.hub.client import hub_api
from mtpress.schema import Target
from mtpress.stages.publish import plan_publish, publish, release_files, remove_unlisted_ggufs

TARGET = Target(repo="mtpress-demo/Release-GGUF")


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "release"
    (root / "embedded").mkdir(parents=True)
    (root / "Model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8192)  # 2 MiB: binary, goes LFS
    (root / "embedded" / "Model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(255 - i for i in range(256)) * 4096)
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Model\n", encoding="utf-8")
    (root / "manifest.json").write_text("{}\n")
    (root / ".work").mkdir()
    (root / ".work" / "scratch").write_text("never published")
    return root


def commits(api: HfApi) -> list[str]:
    return [c.commit_id for c in api.list_repo_commits(TARGET.repo)]


def test_first_publish_is_one_commit_with_every_file(local_hub, release):
    api = hub_api()
    result = publish(release, TARGET, api, message="release")
    assert result.committed and len(result.commit) == 40
    files = set(api.list_repo_files(TARGET.repo))
    assert files == {".gitattributes", "Model-Q4_K_M.gguf", "embedded/Model-Q4_K_M.gguf", "README.md",
                     "manifest.json"}
    assert len(commits(api)) == 2  # the repo's initial commit + the release
    sha = {s.rfilename: s.lfs.sha256 for s in api.model_info(TARGET.repo, files_metadata=True).siblings if s.lfs}
    assert set(sha) == {"Model-Q4_K_M.gguf", "embedded/Model-Q4_K_M.gguf"}


def test_republishing_unchanged_files_makes_no_commit(local_hub, release):
    api = hub_api()
    first = publish(release, TARGET, api, message="release")
    again = publish(release, TARGET, api, message="release")
    assert not again.committed and again.commit == first.commit and again.bytes_uploaded == 0
    assert {f.status for f in again.plan.files} == {"unchanged"}


def test_a_card_change_commits_only_the_card(local_hub, release):
    api = hub_api()
    publish(release, TARGET, api, message="release")
    (release / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Model, reworded\n", encoding="utf-8")
    result = publish(release, TARGET, api, message="card")
    assert result.committed
    assert [(f.path, f.status) for f in result.plan.changes] == [("README.md", "changed")]
    assert result.bytes_uploaded < 1024


def test_files_dropped_from_the_release_are_deleted_in_the_same_commit(local_hub, release):
    api = hub_api()
    publish(release, TARGET, api, message="release")
    (release / "embedded" / "Model-Q4_K_M.gguf").unlink()
    result = publish(release, TARGET, api, message="drop embedded")
    assert [(f.path, f.status) for f in result.plan.changes] == [("embedded/Model-Q4_K_M.gguf", "deleted")]
    assert "embedded/Model-Q4_K_M.gguf" not in api.list_repo_files(TARGET.repo)


def test_dry_run_plans_and_commits_nothing(local_hub, release):
    api = hub_api()
    result = publish(release, TARGET, api, message="release", dry_run=True)
    assert not result.committed
    assert {f.status for f in result.plan.files} == {"new"}
    assert "new" in result.plan.describe() and "Model-Q4_K_M.gguf" in result.plan.describe()
    assert not api.repo_exists(TARGET.repo)


def test_a_failure_mid_commit_leaves_the_repo_unchanged(local_hub, release):
    api = hub_api()
    publish(release, TARGET, api, message="release")
    before = commits(api)
    (release / "Model-Q4_K_M.gguf").write_bytes(b"GGUF changed" * 1000)
    (release / "README.md").write_text("# changed\n", encoding="utf-8")
    local_hub.faults.add("POST", r".*/commit/.*", action="abort_commit")
    with pytest.raises(PublishError, match="nothing was committed"):
        publish(release, TARGET, api, message="broken")
    assert commits(api) == before
    card = api.hf_hub_download(TARGET.repo, "README.md", cache_dir=str(release.parent / "c"))
    assert open(card, encoding="utf-8").read().startswith("---\nlicense"), "the old card is still published"
    retry = publish(release, TARGET, api, message="retry")
    assert retry.committed and len(commits(api)) == len(before) + 1


def test_publishing_without_a_token_is_refused_before_any_request(local_hub, release, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="set HF_TOKEN"):
        publish(release, TARGET, hub_api(), message="release")
    assert not hub_api().repo_exists(TARGET.repo)


def test_plan_skips_hidden_work_files(local_hub, release):
    plan = plan_publish(release, TARGET, hub_api())
    assert all(not f.path.startswith(".") for f in plan.files) and len(plan.files) == 4


def test_an_invalid_token_is_refused_without_echoing_it(tmp_path, release, monkeypatch):
    from mtpress.hub.server import LocalHub

    wrong, valid = "hf_" + "WrongTokenThatMustNotLeak0123456789ab", "hf_" + "TheOnlyValidToken0123456789abcdefgh"
    with LocalHub(tmp_path / "guarded", tokens={valid}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", wrong)
        with pytest.raises(PublishError) as err:
            publish(release, TARGET, hub_api(), message="release")
        assert wrong not in str(err.value) and "nothing was committed" in str(err.value)
        assert not HfApi(endpoint=hub.url, token=valid).repo_exists(TARGET.repo)


# ---------------------------------------------------------------------------------------------------------
# pre-upload: a finished file's bytes go to the private staging repo while the rest builds
# ---------------------------------------------------------------------------------------------------------

STAGING = Target(repo="mtpress-demo/Release-GGUF-staging", private=True)


def as_gguf_files(release):
    from mtpress.fsutil import sha256_file
    from mtpress.stages.gguf_files import GgufFile

    return [GgufFile(path=p, name=p.relative_to(release).as_posix(), layout="sidecar", role="model", quant="Q4_K_M",
                     size=p.stat().st_size, sha256=sha256_file(p), nextn_layers=0, block_count=0, tensor_count=0,
                     parameters=0, head_tensor_types=())
            for p in sorted(release.rglob("*.gguf"))]


def test_preuploaded_files_are_invisible_until_the_commit_which_then_sends_only_the_rest(local_hub, release):
    from mtpress.stages.publish import preupload

    api = hub_api()
    ggufs = as_gguf_files(release)
    before = local_hub.bytes_received
    sent = preupload(ggufs, release, STAGING, api)
    assert sent == sum(f.size for f in ggufs) and local_hub.bytes_received - before >= sent
    assert api.model_info(STAGING.repo).private
    assert set(api.list_repo_files(STAGING.repo)) == {".gitattributes"}  # no commit holds them yet

    before = local_hub.bytes_received
    result = publish(release, STAGING, api, message="stage")
    assert result.committed and {"Model-Q4_K_M.gguf", "embedded/Model-Q4_K_M.gguf"} <= set(
        api.list_repo_files(STAGING.repo))
    # the commit sent the card, the manifest and its own requests, none of the GGUF bytes
    assert local_hub.bytes_received - before < min(f.size for f in ggufs)
    assert preupload(ggufs, release, STAGING, api) == 0  # already on main: skipped without hashing


def test_preupload_refuses_a_public_repo_it_would_create_empty(local_hub, release):
    from mtpress.stages.publish import preupload

    with pytest.raises(PublishError, match="public"):
        preupload(as_gguf_files(release), release, TARGET, hub_api())
    assert not hub_api().repo_exists(TARGET.repo)


# ---------------------------------------------------------------------------------------------------------
# another writer, a new public repo, the token's reach, the bytes a commit really sends
# ---------------------------------------------------------------------------------------------------------


def publish_while_another_writer_commits(hub, publish_call):
    """Run ``publish_call`` while its commit request is held at the Hub; meanwhile another client commits
    other.txt to the target. Returns what the call raised or returned."""
    import os
    import threading

    outcome = {}

    def run():
        try:
            outcome["result"] = publish_call()
        except Exception as e:
            outcome["error"] = e

    hub.faults.add("POST", r"^/api/models/.+/commit/main$", action="stall", seconds=2)
    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while hub.faults.pending() and time.monotonic() < deadline:  # the commit request has reached the Hub
        time.sleep(0.02)
    other = HfApi(endpoint=hub.url, token=os.environ["HF_TOKEN"])
    other.upload_file(path_or_fileobj=b"written by someone else", path_in_repo="other.txt", repo_id=TARGET.repo)
    worker.join()
    return outcome


def test_a_commit_landing_between_plan_and_commit_ends_with_a_conflict_and_deletes_nothing(local_hub, release):
    api = hub_api()
    planned_on = publish(release, TARGET, api, message="release").commit
    (release / "README.md").write_text("# changed\n", encoding="utf-8")
    outcome = publish_while_another_writer_commits(
        local_hub, lambda: publish(release, TARGET, api, message="second release"))
    error = outcome["error"]
    head = api.model_info(TARGET.repo).sha
    assert isinstance(error, PublishConflictError) and not error.retryable
    assert f"{TARGET.repo} changed while publishing" in str(error) and "nothing was committed" in str(error)
    assert planned_on in str(error) and head in str(error)
    assert "other.txt" in api.list_repo_files(TARGET.repo)
    assert [c.title for c in api.list_repo_commits(TARGET.repo)][:2] == ["Upload other.txt with huggingface_hub",
                                                                          "release"]


def test_a_new_public_repo_stays_private_until_its_first_commit_landed(local_hub, release):
    api = hub_api()
    local_hub.faults.add("POST", r"/commit/main$", action="abort_commit")
    with pytest.raises(PublishError, match="nothing was committed"):
        publish(release, TARGET, api, message="release")
    assert api.model_info(TARGET.repo).private, "a failed first commit must not leave an empty public repo"
    assert set(api.list_repo_files(TARGET.repo)) == {".gitattributes"}

    result = publish(release, TARGET, api, message="release")  # the rerun finds its private leftover and opens it
    assert result.committed and not api.model_info(TARGET.repo).private
    assert "README.md" in HfApi(endpoint=local_hub.url, token=False).list_repo_files(TARGET.repo)


def test_a_repo_that_could_not_be_opened_is_opened_by_the_rerun_without_a_commit(local_hub, release):
    api = hub_api()
    local_hub.faults.add("PUT", r"/settings$", status=503)
    with pytest.raises(PublishError, match="the release is committed .* but the repo is still private") as err:
        publish(release, TARGET, api, message="release")
    assert err.value.retryable
    assert api.model_info(TARGET.repo).private
    commits_before = commits(api)
    again = publish(release, TARGET, api, message="release")
    assert not again.committed and commits(api) == commits_before and not api.model_info(TARGET.repo).private


def test_a_private_target_stays_private(local_hub, release):
    api = hub_api()
    publish(release, STAGING, api, message="stage")
    assert api.model_info(STAGING.repo).private


def test_write_access_is_checked_against_the_tokens_user_and_organisations(local_hub):
    from mtpress.stages.publish import check_write_access

    api = hub_api()
    check_write_access(api, TARGET, Target(repo="mtpress-test/Release-GGUF"))
    with pytest.raises(PublishError, match=r"account mtpress-demo cannot publish someone-else/Release-GGUF: it "
                                           r"writes only to mtpress-demo, mtpress-test"):
        check_write_access(api, TARGET, Target(repo="someone-else/Release-GGUF"))


def test_a_bad_or_missing_token_is_refused_by_the_write_check(local_hub, monkeypatch):
    from mtpress.stages.publish import check_write_access

    wrong = "hf_" + "WrongTokenThatMustNotLeak0123456789ab"
    monkeypatch.setenv("HF_TOKEN", wrong)
    with pytest.raises(PublishError, match="refuses the token") as err:
        check_write_access(hub_api(), TARGET)
    assert wrong not in str(err.value) and not err.value.retryable
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="set HF_TOKEN"):
        check_write_access(hub_api(), TARGET)


def test_bytes_uploaded_counts_only_what_the_hub_did_not_have(local_hub, release):
    from mtpress.stages.publish import preupload

    api = hub_api()
    preupload(as_gguf_files(release), release, STAGING, api)
    before = local_hub.bytes_received
    staged = publish(release, STAGING, api, message="stage")
    # the card and the manifest were sent; the pre-uploaded GGUFs were not
    assert staged.bytes_uploaded == sum((release / name).stat().st_size for name in ("README.md", "manifest.json"))
    assert staged.bytes_uploaded <= local_hub.bytes_received - before

    before = local_hub.bytes_received
    promoted = publish(release, TARGET, api, message="release")  # the same bytes, already stored by the Hub
    assert promoted.committed and promoted.bytes_uploaded < 1024
    assert local_hub.bytes_received - before < min(f.size for f in as_gguf_files(release))


def test_the_publish_flow_checks_the_token_before_anything_else(local_hub, prefect_harness, tmp_path):
    from flows.publish import publish as publish_flow

    config = tmp_path / "foreign.yaml"
    config.write_text("name: Foreign\nfinetune: {repo: mtpress-demo/Not-Uploaded-Yet}\n"
                      "target: {repo: someone-else/Foreign-GGUF}\n", encoding="utf-8")
    with pytest.raises(PublishError, match="cannot publish someone-else/Foreign-GGUF, someone-else/Foreign-GGUF-st"):
        publish_flow(str(config), str(tmp_path / "release"))
    assert not (tmp_path / "release").exists() and not (tmp_path / ".work-Foreign").exists()


def test_ggufs_the_release_does_not_list_are_removed_before_they_can_be_published(tmp_path):
    (tmp_path / "embedded").mkdir()
    for path in ("T-Q4_K_M.gguf", "mtp-T-Q4_K_M.gguf", "embedded/T-Q4_K_M.gguf", "embedded/T-Q5_K_M.gguf",
                 "T-Q3_K_M.gguf", "README.md", ".mtpress-cache.gguf"):
        (tmp_path / path).write_bytes(b"x")
    listed = {"T-Q4_K_M.gguf", "mtp-T-Q4_K_M.gguf", "embedded/T-Q4_K_M.gguf"}
    assert remove_unlisted_ggufs(tmp_path, listed) == ["T-Q3_K_M.gguf", "embedded/T-Q5_K_M.gguf"]
    assert set(release_files(tmp_path)) == listed | {"README.md"}


# bounded_disk: each file is committed to staging and deleted here; the release's commits name it by content.

def drop_to_staging(release, api):
    """What a bounded-disk run does with each finished file: commit it to staging, delete it here."""
    from mtpress.stages.publish import commit_finished

    ggufs = as_gguf_files(release)
    sent = commit_finished(ggufs, release, STAGING, api, message="one file, tested")
    for f in ggufs:
        f.path.unlink()
    return {f.name: (f.sha256, f.size) for f in ggufs}, sent


def test_files_committed_to_staging_and_deleted_here_reach_staging_and_target_by_content(local_hub, release):
    api = hub_api()
    elsewhere, sent = drop_to_staging(release, api)
    assert sent == sum(size for _, size in elsewhere.values())
    assert not list(release.rglob("*.gguf"))
    assert set(elsewhere) <= set(api.list_repo_files(STAGING.repo))  # a commit keeps the bytes on the Hub

    # The staging commit of the release finds them there: unchanged, nothing deleted, nothing sent.
    plan = plan_publish(release, STAGING, api, elsewhere)
    assert {f.path: f.status for f in plan.files if f.path.endswith(".gguf")} == dict.fromkeys(elsewhere, "unchanged")
    staged = publish(release, STAGING, api, message="stage", elsewhere=elsewhere)
    assert staged.committed and set(elsewhere) <= set(api.list_repo_files(STAGING.repo))
    # The target gets them in its one commit, by sha256 and size, without a byte of them sent.
    before = local_hub.bytes_received
    result = publish(release, TARGET, api, message="release", elsewhere=elsewhere)
    assert result.committed and result.bytes_uploaded == 0
    assert local_hub.bytes_received - before < min(size for _, size in elsewhere.values())
    sha = {s.rfilename: s.lfs.sha256 for s in api.model_info(TARGET.repo, files_metadata=True).siblings if s.lfs}
    assert sha == {path: sha256 for path, (sha256, _) in elsewhere.items()}
    # Without them in `elsewhere` the same folder would delete them: the plan depends on it.
    assert {f.status for f in plan_publish(release, TARGET, api).files if f.path.endswith(".gguf")} == {"deleted"}


def test_a_file_gone_from_here_that_the_hub_does_not_hold_is_refused_before_any_commit(local_hub, release):
    api = hub_api()
    publish(release, TARGET, api, message="first")
    head = commits(api)[0]
    (release / "Model-Q4_K_M.gguf").unlink()
    never_uploaded = {"Model-Q4_K_M.gguf": ("ab" * 32, 2 * 2**20)}
    plan = plan_publish(release, TARGET, api, never_uploaded)
    assert {f.path: f.status for f in plan.files}["Model-Q4_K_M.gguf"] == "changed"
    with pytest.raises(PublishError, match=r"does not hold Model-Q4_K_M\.gguf, which a bounded-disk run") as error:
        publish(release, TARGET, api, message="second", elsewhere=never_uploaded)
    assert "nothing was committed" in str(error.value) and commits(api)[0] == head


def test_finished_files_are_never_committed_to_a_public_repo(local_hub, release):
    from mtpress.stages.publish import commit_finished

    with pytest.raises(PublishError, match="refusing to commit unverified files to .*: it is public"):
        commit_finished(as_gguf_files(release), release, TARGET, hub_api(), message="x")
    assert all(f.path.is_file() for f in as_gguf_files(release))


def test_a_file_already_in_staging_is_not_committed_again(local_hub, release):
    api = hub_api()
    from mtpress.stages.publish import commit_finished

    ggufs = as_gguf_files(release)
    commit_finished(ggufs, release, STAGING, api, message="first")
    head = api.repo_info(STAGING.repo).sha
    assert commit_finished(ggufs, release, STAGING, api, message="again") == 0
    assert api.repo_info(STAGING.repo).sha == head


@pytest.fixture
def hub_without_sharing(tmp_path, monkeypatch):
    """A local Hub whose repos share no LFS objects: a commit may name only what was uploaded through its repo."""
    from tests.conftest import client_on_local_hub

    with client_on_local_hub(tmp_path, monkeypatch=monkeypatch, lfs_scope="repo") as hub:
        yield hub


def test_files_the_target_does_not_hold_are_copied_from_the_verified_staging_commit(hub_without_sharing, release):
    from huggingface_hub.errors import HfHubHTTPError

    from mtpress.stages.publish import _stored

    api = hub_api()
    elsewhere, _ = drop_to_staging(release, api)
    staged = publish(release, STAGING, api, message="stage", elsewhere=elsewhere)
    # The Hub itself refuses a commit naming bytes its repo never received ...
    path, (sha256, size) = next(iter(elsewhere.items()))
    api.create_repo(TARGET.repo, private=True)
    with pytest.raises(HfHubHTTPError, match="never uploaded to mtpress-demo/Release-GGUF"):
        api.create_commit(TARGET.repo, [_stored(path, sha256, size)], commit_message="by content")
    # ... so without a source the release is refused before its commit,
    head = commits(api)[0]
    with pytest.raises(PublishError, match="does not hold"):
        publish(release, TARGET, api, message="release", elsewhere=elsewhere)
    assert commits(api)[0] == head
    # and with the verified staging commit as the source, each file is copied over, one at a time, and committed.
    before = hub_without_sharing.bytes_received
    result = publish(release, TARGET, api, message="release", elsewhere=elsewhere, source=(STAGING.repo, staged.commit))
    copied = sum(size for _, size in elsewhere.values())
    assert result.committed and copied <= result.bytes_uploaded < copied + 1024  # and the card, the manifest
    assert hub_without_sharing.bytes_received - before >= result.bytes_uploaded
    sha = {s.rfilename: s.lfs.sha256 for s in api.model_info(TARGET.repo, files_metadata=True).siblings if s.lfs}
    assert sha == {p: s for p, (s, _) in elsewhere.items()}
    assert not (release / ".copying").exists() and not list(release.rglob("*.gguf"))


def test_a_copy_whose_bytes_are_not_the_manifests_is_refused(hub_without_sharing, release):
    api = hub_api()
    elsewhere, _ = drop_to_staging(release, api)
    staged = publish(release, STAGING, api, message="stage", elsewhere=elsewhere)
    path, (_, size) = next(iter(elsewhere.items()))
    wrong = {**elsewhere, path: ("cd" * 32, size)}  # what the manifest says is not what staging holds
    with pytest.raises(PublishError, match=f"serves {path} with another sha256 than the manifest's"):
        publish(release, TARGET, api, message="release", elsewhere=wrong, source=(STAGING.repo, staged.commit))
    assert not (release / ".copying").exists()
    assert set(api.list_repo_files(TARGET.repo)) <= {".gitattributes"}
