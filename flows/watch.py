"""The watch flow: find new fine-tunes of the watched base models and launch a release for each eligible one.

The decisions are ``mtpress.watch.decide`` (plain Python); this file adds the Hub reads as retried tasks,
writes the release configs, remembers decisions in the state file, launches publish runs and shows every
decision with its reason in the log and in a table artifact.

How an eligible candidate's release is launched (``launcher``):
  "deployment"  run_deployment("publish/publish", parameters={"config": path}, timeout=0): a flow run of the
                publish deployment, recorded by id in the state and the table;
  "event"       emit ``mtpress.candidate.eligible`` with the config path in its payload; the publish
                deployment's trigger in prefect.yaml launches the run (use one or the other, never both);
  "none"        write the config and remember the decision, launch nothing: a person starts the release
                (``mtpress publish <config>``) after looking at it.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.retries import retry_if_transient
from mtpress.errors import MtpressError
from mtpress.hub.client import hub_api
from mtpress.watch import (
    Candidate,
    CandidateInfo,
    Decision,
    WatchPolicy,
    WatchState,
    decide,
    discover,
    inspect_candidate,
    load_watch_policy,
    state_lock,
    write_release_config,
)

ELIGIBLE_EVENT = "mtpress.candidate.eligible"
Launcher = Literal["deployment", "event", "none"]


@task(name="discover", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient)
def discover_task(policy: WatchPolicy) -> list[Candidate]:
    return discover(policy, hub_api())


@task(name="inspect", task_run_name="inspect {candidate.repo}", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_if_transient)
def inspect_task(candidate: Candidate, policy: WatchPolicy) -> CandidateInfo:
    return inspect_candidate(candidate, policy, hub_api())


@flow(name="watch", log_prints=True)
def watch(policy: str = "model_configs/watch.yaml", state_dir: str = "releases/watch",
          launcher: Launcher = "deployment", deployment: str = "publish/publish", dry_run: bool = False) -> list[dict]:
    """Decide every new descendant of the watched bases; launch a publish run for each eligible one.

    Decisions are remembered in ``<state_dir>/state.json`` and release configs written to
    ``<state_dir>/configs/``. ``dry_run`` decides and reports but writes, remembers and launches nothing.
    Returns this run's decisions as table rows.
    """
    log = get_run_logger()
    policy_path = Path(policy)
    rules = load_watch_policy(policy_path)
    state_path = Path(state_dir) / "state.json"
    if launcher == "deployment" and not dry_run:
        _require_deployment(deployment)

    # A dry run writes nothing, not even the lock file: it only reads what earlier runs remembered.
    with nullcontext() if dry_run else state_lock(state_path):
        state = WatchState.load(state_path)
        found = discover_task(rules)
        new = [candidate for candidate in found if state.get(candidate.repo) is None]
        log.info("%d models below %s; %d already decided, %d new", len(found),
                 ", ".join(b.repo for b in rules.bases), len(found) - len(new), len(new))
        rows = []
        for candidate in new:
            try:
                info = inspect_task(candidate, rules)
            except Exception as e:  # any Hub failure after the task's retries: not decided now, retried next run
                info = CandidateInfo(candidate, error=f"{type(e).__name__}: {e}")
            decision = decide(info, rules, state)
            launched = "dry run: would launch" if dry_run and decision.eligible else ""
            if not dry_run and decision.final:
                config = launch = None
                if decision.eligible:
                    config = write_release_config(decision, Path(state_dir) / "configs", policy_path)
                    launch = _launch(decision, config, launcher, deployment)
                    launched = _describe_launch(launch, config)
                state.remember(decision, config=config, launch=launch)
            log.info("%s@%s → %s: %s%s", decision.repo, (decision.revision or "?")[:12], decision.reason,
                     decision.detail, f" [{launched}]" if launched else "")
            rows.append({"repo": decision.repo, "decision": str(decision.reason), "detail": decision.detail,
                         "launched": launched, "relation": candidate.relation,
                         "revision": (decision.revision or "")[:12]})

    _report(rows, len(found), state_path, dry_run)
    return rows


def _require_deployment(name: str) -> None:
    """Fail before deciding anything: an eligible candidate remembered but never launched would be lost."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise MtpressError(f"no Prefect deployment named {name!r} to launch releases with",
                               hint="deploy it (`prefect deploy --all`, docs/deploy.md), or choose "
                                    "launcher 'none' to only write configs, or 'event'") from None


def _launch(decision: Decision, config: Path, launcher: Launcher, deployment: str) -> dict:
    if launcher == "deployment":
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters={"config": str(config)}, timeout=0,
                             flow_run_name=decision.release.name, tags=["mtpress-watch"])
        return {"via": "deployment", "deployment": deployment, "flow_run": str(run.id)}
    if launcher == "event":
        from prefect.events import emit_event

        event = emit_event(ELIGIBLE_EVENT, resource={"prefect.resource.id": f"mtpress.candidate.{decision.repo}",
                                                     "prefect.resource.name": decision.repo},
                           payload={"config": str(config), "repo": decision.repo, "revision": decision.revision,
                                    "target": decision.release.target.repo})
        return {"via": "event", "event": ELIGIBLE_EVENT, "event_id": str(event.id) if event else None}
    return {"via": "none"}


def _describe_launch(launch: dict, config: Path) -> str:
    if launch["via"] == "deployment":
        return f"flow run {launch['flow_run']} of {launch['deployment']}"
    if launch["via"] == "event":
        return f"event {launch['event']} (the publish deployment's trigger starts the run)"
    return f"not launched: mtpress publish {config}"


def _report(rows: list[dict], found: int, state_path: Path, dry_run: bool) -> None:
    counts = Counter(row["decision"] for row in rows)
    summary = ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "nothing new"
    where = "dry run: nothing remembered" if dry_run else f"decisions remembered in {state_path}"
    if rows:
        create_table_artifact(rows, key="watch-decisions",
                              description=f"watch: {len(rows)} new of {found} candidates ({summary}); {where}")
    else:
        create_markdown_artifact(f"**watch**: no new candidates among {found} known models; {where}.",
                                 key="watch-decisions", description="watch: nothing new")
