"""The watch flow: find new fine-tunes of the watched base models and launch a release for each eligible one.

The decisions are ``mtpress.watch.decide`` (plain Python); this file adds the Hub reads as retried tasks,
remembers decisions in Prefect Variables, launches publish runs and shows every decision with its reason in
the log and in a table artifact.

Decisions live in Prefect Variables, where every watcher sees them: ``mtpress-watch-<repo>-<hash>`` per
candidate and ``mtpress-target-<repo>-<hash>`` per target repo an eligible candidate was given. A decision is
taken by *creating* its Variable, which the server refuses when it exists, so two watchers never decide (or
launch) one candidate twice. Delete a candidate's Variable (and its target's) to have it decided again.

How an eligible candidate's release is launched (``launcher``); the release config travels as YAML text, so the
worker that runs it needs nothing from this machine's disk:
  "deployment"  run_deployment("publish/publish", parameters={"config": text}, timeout=0): a flow run of the
                publish deployment, recorded by id in the Variable and the table;
  "event"       emit ``mtpress.candidate.eligible`` with the config text in its payload; the publish
                deployment's trigger in prefect.yaml launches the run (use one or the other, never both);
  "none"        write the config and remember the decision, launch nothing: a person starts the release
                (``mtpress publish <config>``) after looking at it.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.retries import retry_if_transient
from mtpress.errors import MtpressError
from mtpress.hub.client import hub_api
from mtpress.watch import (
    Candidate,
    CandidateInfo,
    Decision,
    Reason,
    WatchPolicy,
    decide,
    decision_record,
    discover,
    inspect_candidate,
    load_watch_policy,
    release_config_text,
    release_target,
    write_release_config,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

ELIGIBLE_EVENT = "mtpress.candidate.eligible"
Launcher = Literal["deployment", "event", "none"]


@task(name="discover", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_if_transient)
def discover_task(policy: WatchPolicy) -> list[Candidate]:
    return discover(policy, hub_api())


@task(name="inspect", task_run_name="inspect {candidate.repo}", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_if_transient)
def inspect_task(candidate: Candidate, policy: WatchPolicy) -> CandidateInfo:
    return inspect_candidate(candidate, policy, hub_api())


class RememberedDecisions:
    """Final decisions in Prefect Variables: read by every watcher, taken by exactly one."""

    def __init__(self, client: SyncPrefectClient) -> None:
        self.client = client

    @staticmethod
    def variable(kind: str, repo: str) -> str:
        # Variable names are lowercase letters, digits, '-' and '_'; the hash keeps 'Org/A.b' and 'org/a-b' apart.
        slug = re.sub(r"[^a-z0-9_-]", "-", repo.lower())
        return f"mtpress-{kind}-{slug}-{hashlib.sha256(repo.encode()).hexdigest()[:8]}"

    def get(self, repo: str) -> dict | None:
        found = self.client.read_variable_by_name(self.variable("watch", repo))
        return found.value if found is not None else None

    def claimant(self, target: str) -> str | None:
        found = self.client.read_variable_by_name(self.variable("target", target))
        return found.value["candidate"] if found is not None else None

    def _create(self, name: str, value: dict) -> bool:
        from prefect.client.schemas.actions import VariableCreate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            self.client.create_variable(VariableCreate(name=name, value=value, tags=["mtpress-watch"]))
        except ObjectAlreadyExists:
            return False
        return True

    def take(self, decision: Decision) -> Decision:
        """Remember a final decision unless another watcher got there first; returns the decision that holds.

        An eligible decision first takes its target repo, so two candidates never get one target.
        """
        taken_target = False
        if decision.eligible:
            target = decision.release.target.repo
            taken_target = self._create(self.variable("target", target), {"candidate": decision.repo})
            if not taken_target:
                holder = self.claimant(target)
                if holder == decision.repo:
                    return _taken_elsewhere(decision)
                decision = replace(decision, reason=Reason.ALREADY_PUBLISHED, release=None,
                                   detail=f"{target} is claimed by {holder}")
        if not self._create(self.variable("watch", decision.repo), decision_record(decision)):
            if taken_target:
                self.forget_target(decision)
            return _taken_elsewhere(decision)
        return decision

    def launched(self, decision: Decision, launch: dict) -> None:
        from prefect.client.schemas.actions import VariableUpdate

        self.client.update_variable(VariableUpdate(name=self.variable("watch", decision.repo),
                                                   value=decision_record(decision, launch=launch)))

    def forget(self, decision: Decision) -> None:
        """Undo ``take``: a decision whose launch failed is decided again next run, not lost."""
        self.client.delete_variable_by_name(self.variable("watch", decision.repo))
        self.forget_target(decision)

    def forget_target(self, decision: Decision) -> None:
        self.client.delete_variable_by_name(self.variable("target", decision.release.target.repo))


def _taken_elsewhere(decision: Decision) -> Decision:
    return replace(decision, reason=Reason.ALREADY_DECIDED, release=None, detail="decided by another watch run")


@flow(name="watch", log_prints=True)
def watch(policy: str = "model_configs/watch.yaml", state_dir: str = "releases/watch",
          launcher: Launcher = "deployment", deployment: str = "publish/publish", dry_run: bool = False) -> list[dict]:
    """Decide every new descendant of the watched bases; launch a publish run for each eligible one.

    Decisions are remembered in Prefect Variables (``mtpress-watch-*``); a copy of each generated release config
    is written to ``<state_dir>/configs/`` for people (the launch carries the config itself). ``dry_run``
    decides and reports but writes, remembers and launches nothing. Returns this run's decisions as table rows.
    """
    from prefect.client.orchestration import get_client

    log = get_run_logger()
    policy_path = Path(policy)
    rules = load_watch_policy(policy_path)
    if launcher == "deployment" and not dry_run:
        _require_deployment(deployment)

    with get_client(sync_client=True) as client:
        memory = RememberedDecisions(client)
        found = discover_task(rules)
        new = [candidate for candidate in found if memory.get(candidate.repo) is None]
        log.info("%d models below %s; %d already decided, %d new", len(found),
                 ", ".join(b.repo for b in rules.bases), len(found) - len(new), len(new))
        rows = []
        for candidate in new:
            try:
                info = inspect_task(candidate, rules)
            except Exception as e:  # any Hub failure after the task's retries: not decided now, retried next run
                info = CandidateInfo(candidate, error=f"{type(e).__name__}: {e}")
            decision = decide(info, rules, earlier=memory.get(candidate.repo),
                              claimant=memory.claimant(release_target(candidate.repo, rules)[1]))
            launched = "dry run: would launch" if dry_run and decision.eligible else ""
            if not dry_run and decision.final:
                decision = memory.take(decision)
                if decision.eligible:
                    text = release_config_text(decision, policy_path)
                    config = write_release_config(text, decision.release.name, Path(state_dir) / "configs")
                    try:
                        launch = _launch(decision, text, launcher, deployment)
                    except BaseException:
                        memory.forget(decision)
                        raise
                    memory.launched(decision, launch)
                    launched = _describe_launch(launch, config)
            log.info("%s@%s → %s: %s%s", decision.repo, (decision.revision or "?")[:12], decision.reason,
                     decision.detail, f" [{launched}]" if launched else "")
            rows.append({"repo": decision.repo, "decision": str(decision.reason), "detail": decision.detail,
                         "launched": launched, "relation": candidate.relation,
                         "revision": (decision.revision or "")[:12]})

    _report(rows, len(found), dry_run)
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


def _launch(decision: Decision, config: str, launcher: Launcher, deployment: str) -> dict:
    if launcher == "deployment":
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters={"config": config}, timeout=0,
                             flow_run_name=decision.release.name, tags=["mtpress-watch"])
        return {"via": "deployment", "deployment": deployment, "flow_run": str(run.id)}
    if launcher == "event":
        from prefect.events import emit_event

        event = emit_event(ELIGIBLE_EVENT, resource={"prefect.resource.id": f"mtpress.candidate.{decision.repo}",
                                                     "prefect.resource.name": decision.repo},
                           payload={"config": config, "repo": decision.repo, "revision": decision.revision,
                                    "target": decision.release.target.repo})
        return {"via": "event", "event": ELIGIBLE_EVENT, "event_id": str(event.id) if event else None}
    return {"via": "none"}


def _describe_launch(launch: dict, config: Path) -> str:
    if launch["via"] == "deployment":
        return f"flow run {launch['flow_run']} of {launch['deployment']}"
    if launch["via"] == "event":
        return f"event {launch['event']} (the publish deployment's trigger starts the run)"
    return f"not launched: mtpress publish {config}"


def _report(rows: list[dict], found: int, dry_run: bool) -> None:
    counts = Counter(row["decision"] for row in rows)
    summary = ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "nothing new"
    where = "dry run: nothing remembered" if dry_run else "decisions remembered in Prefect Variables mtpress-watch-*"
    if rows:
        create_table_artifact(rows, key="watch-decisions",
                              description=f"watch: {len(rows)} new of {found} candidates ({summary}); {where}")
    else:
        create_markdown_artifact(f"**watch**: no new candidates among {found} known models; {where}.",
                                 key="watch-decisions", description="watch: nothing new")
