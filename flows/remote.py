"""A release run on the maintainer's Prefect server, started and followed from somewhere else (GitHub Actions).

`mtpress release-run` validates the config here, starts a run of the ``publish/publish`` deployment (its workers
clone the repository at the commit passed in ``MTPRESS_COMMIT``: prefect.yaml's pull step), prints its id and UI
address, follows it to a final state with its logs, and writes the release's manifest where the workflow uploads it.

The manifest travels as a Prefect artifact of the run (``record_manifest``), not through the Hub: a dry run and a
run the gate stopped publish nothing, a private target needs a token the workflow must not hold, and the artifact is
readable with the same Prefect API key that started the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTimestamp,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort, LogSort
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.utilities.urls import url_for

from mtpress.errors import RemoteRunError
from mtpress.manifest import MANIFEST
from mtpress.naming import artifact_key

DEPLOYMENT = "publish/publish"
FENCE = "```"


def record_manifest(release_dir: Path, release: str) -> None:
    """The release folder's manifest.json as a markdown artifact of the current flow run (a JSON code block: the
    UI shows it, ``read_manifest`` parses it back)."""
    text = (release_dir / MANIFEST).read_text()
    create_markdown_artifact(f"{FENCE}json\n{text}\n{FENCE}\n", key=artifact_key(release, "manifest"),
                             description=f"{release}: {MANIFEST}")


def read_manifest(flow_run_id: UUID, release: str) -> str | None:
    """The last manifest ``record_manifest`` left in this flow run (the gate's rewrite is recorded again), or None
    when the run did not get that far."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[artifact_key(release, "manifest")]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])), sort=ArtifactSort.CREATED_DESC, limit=1)
    if not found:
        return None
    body = str(found[0].data).strip()
    return body.removeprefix(f"{FENCE}json").removesuffix(FENCE).strip() + "\n"


def start_release(config: str, *, dry_run: bool, commit: str | None, repository: str | None,
                  deployment: str = DEPLOYMENT) -> FlowRun:
    """One flow run of the publish deployment, scheduled now; returns without waiting (``timeout=0``).

    ``commit``/``repository`` become the run's ``MTPRESS_COMMIT``/``MTPRESS_REPOSITORY``, which prefect.yaml's
    git_clone pull step reads, so the worker runs exactly the code of that commit."""
    job_variables = {"env": {"MTPRESS_COMMIT": commit, "MTPRESS_REPOSITORY": repository}} if commit else None
    try:
        return run_deployment(deployment, parameters={"config": config, "dry_run": dry_run}, timeout=0,
                              job_variables=job_variables, tags=["mtpress-release-run"])
    except ObjectNotFound as e:
        raise RemoteRunError(f"there is no Prefect deployment {deployment!r} on this server",
                             hint="deploy prefect.yaml there (prefect --no-prompt deploy --all) and start a worker "
                                  "in its pool; docs/deploy.md") from e


def follow(run: FlowRun, *, timeout_s: float, poll_s: float = 5.0,
           echo: Callable[[str], None] = print) -> FlowRun:
    """Poll the run until it reaches a final state, echoing each state change and each new log line; a run still
    going after ``timeout_s`` raises (it keeps running on the server)."""
    deadline, seen_state, logs_after = time.monotonic() + timeout_s, None, None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            since = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]),
                              timestamp=LogFilterTimestamp(after_=logs_after))
            for log in client.read_logs(log_filter=since, sort=LogSort.TIMESTAMP_ASC, limit=200):
                if logs_after is None or log.timestamp > logs_after:  # `after_` includes the last one seen
                    for line in log.message.splitlines():
                        echo(f"  | {line}")
                    logs_after = log.timestamp
            state = run.state.name if run.state else "no state"
            if state != seen_state:
                echo(f"flow run {run.name}: {state}")
                seen_state = state
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise RemoteRunError(f"{DEPLOYMENT} flow run {run.id} ({run.name}) is still {state} after "
                                     f"{timeout_s:.0f} s", hint=f"it goes on on the server; its logs: "
                                                                f"`prefect flow-run logs {run.id}`")
            time.sleep(poll_s)


def release_run(config: str, release: str, *, dry_run: bool, commit: str | None, repository: str | None,
                timeout_s: float, manifest_out: Path | None, poll_s: float = 5.0,
                echo: Callable[[str], None] = print) -> FlowRun:
    """Start, follow, keep the manifest; raises RemoteRunError unless the run completed."""
    if not PREFECT_API_URL.value():  # else Prefect would start a throwaway local server with no deployments
        raise RemoteRunError("PREFECT_API_URL is not set: no Prefect server to start the release on",
                             hint="set PREFECT_API_URL (and PREFECT_API_KEY) to the server that runs prefect.yaml's "
                                  "deployments; in GitHub Actions, repository secrets of those names")
    run = start_release(config, dry_run=dry_run, commit=commit, repository=repository)
    echo(f"started {DEPLOYMENT} flow run {run.id} ({run.name})" + (f" at commit {commit}" if commit else ""))
    if link := url_for(run):
        echo(f"  {link}")
    run = follow(run, timeout_s=timeout_s, poll_s=poll_s, echo=echo)
    # A run the gate stopped still wrote its manifest: keep it whatever the state.
    manifest = read_manifest(run.id, release) if manifest_out is not None else None
    if manifest is not None:
        manifest_out.parent.mkdir(parents=True, exist_ok=True)
        manifest_out.write_text(manifest)
        echo(f"manifest: {manifest_out} ({len(json.loads(manifest).get('files', []))} files)")
    state = run.state
    if not state.is_completed():
        raise RemoteRunError(f"{DEPLOYMENT} flow run {run.id} ({run.name}) ended {state.name}"
                             + (f": {state.message}" if state.message else ""),
                             hint=f"its logs: `prefect flow-run logs {run.id}`")
    if manifest_out is not None and manifest is None:
        raise RemoteRunError(f"{DEPLOYMENT} flow run {run.id} ({run.name}) completed without a "
                             f"{artifact_key(release, 'manifest')} artifact",
                             hint="its flow must call flows.remote.record_manifest (an older commit's code?)")
    return run
