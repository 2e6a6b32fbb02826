"""Retries: one rule (mtpress.errors.is_transient, read by flows/retries.py) decides for every task with retries."""

import pytest

from mtpress.errors import (
    ModelError,
    PublishConflictError,
    PublishError,
    QualityGateError,
    ToolFailedError,
)
from mtpress.hub.client import hub_api
from mtpress.schema import Source, Target
from tests.fixtures import ARCH, make_checkpoint
from tests.test_publish import publish_while_another_writer_commits

TARGET = Target(repo="mtpress-demo/Release-GGUF")  # the repo publish_while_another_writer_commits writes to


def hub_error(local_hub, **fault):
    """The exception huggingface_hub raises when the local Hub answers a model_info with ``fault``."""
    local_hub.faults.add("GET", r"^/api/models/mtpress-demo/", **fault)
    try:
        hub_api().model_info("mtpress-demo/anything")
    except Exception as e:
        return e
    raise AssertionError("the fault was not served")


def test_only_transient_causes_make_an_error_retryable(local_hub):
    server_error, conflict = hub_error(local_hub, status=503), hub_error(local_hub, status=412)
    try:
        raise PublishError("wrapped") from server_error
    except PublishError as e:
        assert e.retryable
    try:
        raise PublishConflictError("wrapped") from conflict
    except PublishConflictError as e:
        assert not e.retryable
    try:  # a failed check stays failed, whatever happened on the way
        raise QualityGateError("tokens differ") from server_error
    except QualityGateError as e:
        assert not e.retryable
    assert not ModelError("only pickle weights").retryable
    assert ToolFailedError(["llama-server"], returncode=None, output="", timed_out=True).retryable
    assert not ToolFailedError(["llama-server"], returncode=1, output="error loading model").retryable


def run_count(state) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(state.state_details.task_run_id).run_count


def test_the_publish_task_retries_a_503_but_never_a_412(local_hub, prefect_harness, tmp_path):
    from flows.publish import publish_task

    task = publish_task.with_options(retry_delay_seconds=0)
    release = tmp_path / "release"
    release.mkdir()
    (release / "README.md").write_text("# Model\n", encoding="utf-8")
    api = hub_api()

    local_hub.faults.add("POST", r"/commit/main$", status=503)
    state = task(release, TARGET, api, message="release", return_state=True)
    assert state.is_completed() and run_count(state) == 2 and state.result().committed

    (release / "README.md").write_text("# Model, reworded\n", encoding="utf-8")
    outcome = publish_while_another_writer_commits(
        local_hub, lambda: task(release, TARGET, api, message="second release", return_state=True))
    state = outcome["result"]
    assert state.is_failed() and run_count(state) == 1
    assert isinstance(state.result(raise_on_failure=False), PublishConflictError)
    assert "other.txt" in api.list_repo_files(TARGET.repo)
    assert [c.title for c in api.list_repo_commits(TARGET.repo)][0] == "Upload other.txt with huggingface_hub"


def test_the_fetch_task_retries_a_dropped_connection_but_not_a_wrong_repo_id(local_hub, prefect_harness, tmp_path):
    from flows.tasks import fetch_checkpoint

    task = fetch_checkpoint.with_options(retry_delay_seconds=0)
    api = hub_api()
    api.create_repo("org/ft")
    api.upload_folder(repo_id="org/ft", folder_path=make_checkpoint(tmp_path / "ft", with_head=False, seed=2).path)

    local_hub.faults.add("GET", r"^/api/models/org/ft", action="drop")
    state = task("fine-tune", Source(repo="org/ft"), tmp_path / "cache", ARCH, return_state=True)
    assert state.is_completed() and run_count(state) == 2

    state = task("fine-tune", Source(repo="org/no-such-model"), tmp_path / "cache", ARCH, return_state=True)
    assert state.is_failed() and run_count(state) == 1
    with pytest.raises(ModelError, match="no such model repo"):
        state.result()
