"""The watch: policy validation, the decision rules, decisions in Prefect Variables, and the flow against a local
Hub and Prefect.

Candidates are tiny fake repos on the local Hub endpoint: a safetensors file (with or without `mtp.*`
tensors), a config.json naming the architecture and a README whose front matter carries `base_model` and
`license`, which is all the watch ever reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import CommitOperationAdd
from safetensors.numpy import save as safetensors_bytes

from mtpress.errors import ConfigError, MtpressError
from mtpress.hub.client import hub_api
from mtpress.schema import load_release_config
from mtpress.watch import (
    Candidate,
    CandidateInfo,
    Reason,
    WatchPolicy,
    decide,
    discover,
    inspect_candidate,
    load_watch_policy,
    release_config_text,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE = "Qwen/Qwen3.5-9B"
NAMESPACE = "mtpress-bot"
QWEN = ("Qwen3_5ForCausalLM",)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def policy(**overrides) -> WatchPolicy:
    raw = {"bases": [{"repo": BASE}], "licenses": ["apache-2.0", "mit"], "target_namespace": NAMESPACE,
           "release": {"quants": ["Q8_0", "Q4_K_M"]}, **overrides}
    return WatchPolicy.model_validate(raw)


def write_policy(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump(policy(**overrides).model_dump(mode="json")), encoding="utf-8")
    return path


def info(repo="alice/Good-FT", *, relation="finetune", tags=(), licenses=("apache-2.0",), architectures=QWEN,
         remote_code=None, weights=None, head=(), target_exists=False, error=None) -> CandidateInfo:
    candidate = Candidate(repo, BASE, BASE, relation, tuple(tags))
    return CandidateInfo(candidate, revision="a" * 40, donor_revision="b" * 40, licenses=tuple(licenses),
                         architectures=architectures, remote_code=remote_code, weights=weights,
                         head_tensors=tuple(head), target_exists=target_exists, error=error)


def seed(repo: str, *, base_model: str | None = BASE, license: str | None = "apache-2.0", architectures=QWEN,
         head: bool = False, tags=(), relation: str | None = None, weights: bool = True,
         extra: dict[str, bytes] | None = None) -> None:
    """Upload a tiny fake checkpoint to the local Hub: only its metadata and tensor names matter."""
    tensors = {"model.embed_tokens.weight": np.zeros((4, 4), dtype=np.float32)}
    if head:
        tensors["mtp.fc.weight"] = np.zeros((4, 8), dtype=np.float32)
    card = {key: value for key, value in (("base_model", base_model), ("license", license),
                                          ("base_model_relation", relation), ("tags", list(tags) or None))
            if value is not None}
    files = {"config.json": json.dumps({"architectures": list(architectures), "mtp_num_hidden_layers": 1}).encode(),
             "README.md": f"---\n{yaml.safe_dump(card)}---\n# {repo}\n".encode()}
    if weights:
        files["model.safetensors"] = safetensors_bytes(tensors)
    files.update(extra or {})
    api = hub_api()
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd(path, data) for path, data in files.items()], commit_message="seed")


def publish_runs(tmp_path: Path) -> list:
    """Flow runs of the publish deployment whose config was generated from a policy under this test's tmp_path."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("publish/publish")
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    return [run for run in runs if f"from {tmp_path}" in str(run.parameters.get("config", ""))]


@pytest.fixture
def fresh_decisions(prefect_harness):
    """The harness's server lives for the session: forget what earlier tests' watch runs decided."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for variable in client.read_variables():
            if "mtpress-watch" in variable.tags:
                client.delete_variable_by_name(variable.name)


def remembered(repo: str) -> dict | None:
    from prefect.client.orchestration import get_client

    from flows.watch import RememberedDecisions

    with get_client(sync_client=True) as client:
        return RememberedDecisions(client).get(repo)


@pytest.fixture
def publish_deployment(fresh_decisions):
    """The real publish flow registered as a deployment; nothing runs its flow runs, they stay scheduled."""
    from flows.publish import publish

    return publish.to_deployment(name="publish").apply()


# ---------------------------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------------------------


def test_the_shipped_policy_is_valid():
    rules = load_watch_policy(REPO_ROOT / "model_configs" / "watch.yaml")
    assert [b.repo for b in rules.bases] == [BASE] and rules.base(BASE).head_donor == BASE
    assert "apache-2.0" in rules.licenses and rules.relations == ("finetune",)


def test_policy_errors_name_the_file_and_every_bad_key(tmp_path):
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump({"bases": [{"repo": "not-a-repo-id"}], "licenses": [], "colour": "blue",
                                    "release": {"quants": ["Q9_X"]}, "relations": ["quantized"]}))
    with pytest.raises(ConfigError) as raised:
        load_watch_policy(path)
    problems = raised.value.problems
    assert str(raised.value).startswith(f"{path}: ")
    assert any(p.startswith("bases.0.repo: 'not-a-repo-id' is not a Hub repo id") for p in problems)
    assert any(p.startswith("licenses: ") for p in problems)
    assert "target_namespace: required key is missing" in problems
    assert any(p.startswith("colour: unknown key") for p in problems)
    assert any(p.startswith("release.quants: unknown quant type 'Q9_X'") for p in problems)
    assert any(p.startswith("relations.0: ") for p in problems)


def test_policy_bench_and_quality_are_checked_by_the_release_rules(tmp_path):
    path = tmp_path / "watch.yaml"

    def problems(bench: dict, quality: dict) -> list[str]:
        path.write_text(yaml.safe_dump({"bases": [{"repo": BASE}], "licenses": ["mit"], "target_namespace": NAMESPACE,
                                        "release": {"quants": ["Q4_K_M"], "bench": bench, "quality": quality}}))
        with pytest.raises(ConfigError) as raised:
            load_watch_policy(path)
        assert str(raised.value).startswith(f"{path}: ")
        return raised.value.problems

    found = problems({"draft_lengths": [2, 2]}, {"chunks": 1})
    assert "release.bench.draft_lengths: lists a draft length twice" in found
    assert any(p.startswith("release.quality: chunks: 1 chunk(s) of 128 tokens") for p in found)
    assert problems({"quants": ["Q8_0"]}, {}) == [
        "release: bench.quants names Q8_0, which the release does not build"]
    assert problems({"prompts": "my-prompts.jsonl"}, {}) == [
        "release: bench.prompts: a watched release runs on a worker that cannot read the watcher's files; "
        "leave it unset (the shipped set)"]
    assert problems({}, {"calibration": "mine.txt"})[0].startswith("release: quality.calibration: a watched")


def test_policy_file_missing_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_watch_policy(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_watch_policy(tmp_path / "list.yaml")


# ---------------------------------------------------------------------------------------------------------
# decide
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("candidate", "reason", "detail"), [
    (info(error="HfHubHTTPError: 503"), Reason.INSPECT_FAILED, "503"),
    (info(f"{NAMESPACE}/Good-FT-MTP-GGUF"), Reason.OWN_OUTPUT, NAMESPACE),
    (info("someone/Good-FT-GGUF", tags=("gguf", "text-generation")), Reason.EXCLUDED_TAG, "gguf"),
    (info(relation="quantized"), Reason.RELATION_NOT_WATCHED, "quantized"),
    (info(relation="adapter"), Reason.RELATION_NOT_WATCHED, "adapter"),
    (info(weights="only pickle weights (.bin/.pt)"), Reason.NO_SAFETENSORS, "pickle"),
    (info(remote_code="tokenizer_config.json asks for remote code"), Reason.REMOTE_CODE, "tokenizer_config.json"),
    (info(architectures=None), Reason.UNSUPPORTED_ARCHITECTURE, "no config.json"),
    (info(architectures=("LlamaForCausalLM",)), Reason.UNSUPPORTED_ARCHITECTURE, "LlamaForCausalLM"),
    (info(head=("mtp.fc.weight", "mtp.norm.weight")), Reason.HEAD_PRESENT, "2 MTP tensors"),
    (info(licenses=()), Reason.LICENSE_NOT_ALLOWED, "no license"),
    (info(licenses=("cc-by-nc-4.0",)), Reason.LICENSE_NOT_ALLOWED, "cc-by-nc-4.0"),
    (info(licenses=("apache-2.0", "other")), Reason.LICENSE_NOT_ALLOWED, "other"),
    (info(target_exists=True), Reason.ALREADY_PUBLISHED, f"{NAMESPACE}/Good-FT-MTP-GGUF exists"),
    (info("alice/" + "x" * 94), Reason.CONFIG_INVALID, "name"),
])
def test_decide_rejects_with_a_reason(candidate, reason, detail):
    decision = decide(candidate, policy())
    assert (decision.reason, decision.eligible, decision.release) == (reason, False, None)
    assert detail in decision.detail
    assert decision.final is (reason is not Reason.INSPECT_FAILED)


def test_decide_eligible_carries_the_release_to_launch():
    rules = policy(bases=[{"repo": BASE, "donor": "Qwen/Qwen3.5-9B-Base"}],
                   release={"quants": ["Q8_0", "Q4_K_M"], "bench": {"draft_lengths": [2], "quants": ["Q4_K_M"]},
                            "quality": {"enabled": False}})
    decision = decide(info(), rules)
    assert decision.eligible and decision.final
    release = decision.release
    assert release.name == "Good-FT-MTP" and release.arch == "qwen35"
    assert (release.finetune.repo, release.finetune.revision) == ("alice/Good-FT", "a" * 40)  # the decided commit
    assert (release.donor.repo, release.donor.revision) == ("Qwen/Qwen3.5-9B-Base", "b" * 40)  # pinned too
    assert (release.bench.draft_lengths, release.bench.quants, release.quality.enabled) == ((2,), ("Q4_K_M",), False)
    assert release.target.repo == f"{NAMESPACE}/Good-FT-MTP-GGUF"
    assert release.quants == ("Q8_0", "Q4_K_M") and release.head_type == "Q8_0"


def test_decide_never_redecides_and_never_gives_one_target_twice():
    rules = policy()
    again = decide(info("alice/Good-FT"), rules, earlier={"decided_at": "2026-01-01T00:00:00+00:00",
                                                           "reason": "eligible"})
    assert again.reason is Reason.ALREADY_DECIDED and not again.final
    namesake = decide(info("bob/Good-FT"), rules, claimant="alice/Good-FT")
    assert namesake.reason is Reason.ALREADY_PUBLISHED and "claimed by alice/Good-FT" in namesake.detail


# ---------------------------------------------------------------------------------------------------------
# generated configs travel as text
# ---------------------------------------------------------------------------------------------------------


def test_a_generated_config_is_text_the_publish_flow_reads(tmp_path):
    text = release_config_text(decide(info(), policy()), tmp_path / "watch.yaml")
    assert "\n" in text and load_release_config(text) == decide(info(), policy()).release
    assert load_release_config(yaml.safe_load(text)).name == "Good-FT-MTP"  # a mapping, as an event may carry
    (tmp_path / "Good-FT-MTP.yaml").write_text(text)
    assert load_release_config(str(tmp_path / "Good-FT-MTP.yaml")).name == "Good-FT-MTP"  # a path, as before


@pytest.mark.parametrize(("sent", "problem"), [
    ("name: X\nfinetune: {repo: a/b}\ntarget: {repo: c/d}\ncolour: blue\n", "colour: unknown key"),
    ("name: X\nfinetune: [\n", "not valid YAML"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ({"name": "X", "target": {"repo": "c/d"}}, "finetune: required key is missing"),
])
def test_an_inline_config_is_named_in_its_errors(sent, problem):
    with pytest.raises(ConfigError) as raised:
        load_release_config(sent)
    assert str(raised.value).startswith("the event's config: ") and problem in str(raised.value)


# ---------------------------------------------------------------------------------------------------------
# decisions in Prefect Variables
# ---------------------------------------------------------------------------------------------------------


def test_two_watchers_deciding_at_once_take_a_candidate_and_a_target_once(fresh_decisions):
    """Two threads, each with its own client (as two watch runs on two machines), take the same decisions."""
    from prefect.client.orchestration import get_client

    from flows.watch import RememberedDecisions

    rules = policy()
    decisions = [decide(info("alice/Good-FT"), rules), decide(info("bob/Good-FT"), rules),  # one target
                 decide(info("carol/Headful-FT", head=("mtp.fc.weight",)), rules)]
    start = threading.Barrier(2)
    taken: list[list] = [[], []]

    def watcher(index: int) -> None:
        with get_client(sync_client=True) as client:
            memory = RememberedDecisions(client)
            start.wait(timeout=30)
            order = decisions if index == 0 else decisions[::-1]
            taken[index] = [memory.take(decision) for decision in order]

    threads = [threading.Thread(target=watcher, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    outcomes = sorted((d.repo, str(d.reason)) for d in taken[0] + taken[1])
    by_repo = {repo: [reason for r, reason in outcomes if r == repo] for repo, _ in outcomes}
    # each candidate was decided by exactly one watcher; the other one was told so
    assert all(sorted(reasons)[0] == "already_decided" and len(reasons) == 2 for reasons in by_repo.values()), outcomes
    final = {repo: remembered(repo)["reason"] for repo in by_repo}
    assert sorted(final.values()) == ["already_published", "eligible", "head_present"], final
    holder = next(repo for repo, reason in final.items() if reason == "eligible")
    other = next(repo for repo, reason in final.items() if reason == "already_published")
    assert remembered(other)["detail"] == f"{NAMESPACE}/Good-FT-MTP-GGUF is claimed by {holder}"


def test_a_forgotten_decision_and_its_target_can_be_taken_again(fresh_decisions):
    """What the flow does when a launch fails: the candidate is decided again next run, not lost."""
    from prefect.client.orchestration import get_client

    from flows.watch import RememberedDecisions

    eligible = decide(info("alice/Good-FT"), policy())
    with get_client(sync_client=True) as client:
        memory = RememberedDecisions(client)
        assert memory.take(eligible).eligible
        assert memory.take(eligible).reason is Reason.ALREADY_DECIDED
        memory.forget(eligible)
        assert (memory.get("alice/Good-FT"), memory.claimant(f"{NAMESPACE}/Good-FT-MTP-GGUF")) == (None, None)
        assert memory.take(eligible).eligible


# ---------------------------------------------------------------------------------------------------------
# discovery and inspection against the local Hub
# ---------------------------------------------------------------------------------------------------------


def test_discover_follows_the_model_tree(local_hub):
    seed(BASE, base_model=None, head=True)
    seed("alice/Good-FT")
    seed("alice/Good-FT-Q4", base_model="alice/Good-FT", relation="quantized")
    seed("carol/Grandchild-FT", base_model="alice/Good-FT")
    seed("someone/Good-FT-GGUF", relation="quantized")
    seed("unrelated/Other", base_model="meta-llama/Llama-3-8B")

    direct = {c.repo: (c.relation, c.parent) for c in discover(policy(), hub_api())}
    assert direct == {"alice/Good-FT": ("finetune", BASE), "someone/Good-FT-GGUF": ("quantized", BASE)}
    deep = {c.repo: (c.relation, c.parent, c.base) for c in discover(policy(depth=2), hub_api())}
    assert deep["carol/Grandchild-FT"] == ("finetune", "alice/Good-FT", BASE)
    assert deep["alice/Good-FT-Q4"] == ("quantized", "alice/Good-FT", BASE)


def test_inspection_pins_the_finetune_and_the_donor_at_their_commits(local_hub):
    seed(BASE, base_model=None, head=True)
    seed("alice/Good-FT")
    rules = policy()
    (candidate,) = discover(rules, hub_api())
    inspected = inspect_candidate(candidate, rules, hub_api())
    assert inspected.revision == hub_api().model_info("alice/Good-FT").sha
    assert inspected.donor_revision == hub_api().model_info(BASE).sha
    release = decide(inspected, rules).release
    assert (release.donor.repo, release.donor.revision) == (BASE, inspected.donor_revision)


def test_a_finetune_whose_tokenizer_names_code_of_its_own_is_not_released(local_hub):
    """A tokenizer whose class is code (here another repo's): mtpress never runs it, and without it the vocabulary
    would not convert as its author meant. Decided from the small files, before any release is launched."""
    seed(BASE, base_model=None, head=True)
    code = {"auto_map": {"AutoTokenizer": ["mallory/tok--tokenization_x.Tok", None]}}
    seed("mallory/Custom-Tok-FT", extra={"tokenizer_config.json": json.dumps(code).encode()})
    rules = policy()
    (candidate,) = discover(rules, hub_api())
    inspected = inspect_candidate(candidate, rules, hub_api())
    assert inspected.remote_code == "tokenizer_config.json asks for remote code (auto_map: AutoTokenizer)"
    decision = decide(inspected, rules)
    assert (decision.reason, decision.release) == (Reason.REMOTE_CODE, None)


# ---------------------------------------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------------------------------------


def test_watch_launches_one_publish_per_new_eligible_finetune_and_only_once(local_hub, publish_deployment,
                                                                           tmp_path):
    from flows.watch import watch

    seed(BASE, base_model=None, head=True)
    seed("alice/Good-FT")
    seed("bob/Headful-FT", head=True)
    seed("carol/Llama-FT", architectures=("LlamaForCausalLM",))
    seed("dave/Closed-FT", license="cc-by-nc-4.0")
    seed(f"{NAMESPACE}/Older-FT-MTP-GGUF", tags=("mtp", "gguf"))
    policy_path, state_dir = write_policy(tmp_path), tmp_path / "watch"

    rows = watch(str(policy_path), str(state_dir))

    decisions = {row["repo"]: row["decision"] for row in rows}
    assert decisions == {"alice/Good-FT": "eligible", "bob/Headful-FT": "head_present",
                         "carol/Llama-FT": "unsupported_architecture", "dave/Closed-FT": "license_not_allowed",
                         f"{NAMESPACE}/Older-FT-MTP-GGUF": "own_output"}
    runs = publish_runs(tmp_path)
    assert len(runs) == 1
    sent = runs[0].parameters["config"]  # the config itself: the worker needs nothing from the watcher's disk
    assert runs[0].parameters == {"config": sent} and sent == (state_dir / "configs" / "Good-FT-MTP.yaml").read_text()
    release = load_release_config(sent)
    assert (release.finetune.repo, release.donor.repo) == ("alice/Good-FT", BASE)
    assert release.finetune.revision == hub_api().model_info("alice/Good-FT").sha
    assert release.donor.revision == hub_api().model_info(BASE).sha
    assert {repo: remembered(repo)["reason"] for repo in decisions} == decisions
    assert remembered("alice/Good-FT")["launch"]["flow_run"] == str(runs[0].id)
    assert "MTP tensors already present" in remembered("bob/Headful-FT")["detail"]

    assert watch(str(policy_path), str(state_dir)) == []  # nothing new: nothing decided, nothing launched
    assert len(publish_runs(tmp_path)) == 1

    seed("erin/Another-FT", license="mit")
    rows = watch(str(policy_path), str(state_dir))
    assert [(row["repo"], row["decision"]) for row in rows] == [("erin/Another-FT", "eligible")]
    runs = publish_runs(tmp_path)
    assert len(runs) == 2
    assert {load_release_config(run.parameters["config"]).finetune.repo for run in runs} == {
        "alice/Good-FT", "erin/Another-FT"}


def test_dry_run_remembers_nothing_and_launcher_none_writes_the_config_only(local_hub, publish_deployment, tmp_path):
    from flows.watch import watch

    seed(BASE, base_model=None, head=True)  # the head donor, whose commit the config pins
    seed("alice/Good-FT")
    policy_path, state_dir = write_policy(tmp_path), tmp_path / "watch"

    rows = watch(str(policy_path), str(state_dir), dry_run=True)
    assert [(row["decision"], row["launched"]) for row in rows] == [("eligible", "dry run: would launch")]
    assert not state_dir.exists() and remembered("alice/Good-FT") is None

    rows = watch(str(policy_path), str(state_dir), launcher="none")
    config = state_dir.resolve() / "configs" / "Good-FT-MTP.yaml"
    assert rows[0]["launched"] == f"not launched: mtpress publish {config}"
    assert load_release_config(config).target.repo == f"{NAMESPACE}/Good-FT-MTP-GGUF"
    assert remembered("alice/Good-FT")["launch"] == {"via": "none"}
    assert publish_runs(tmp_path) == []


def test_a_missing_publish_deployment_stops_the_watch_before_deciding(local_hub, fresh_decisions, tmp_path):
    from flows.watch import watch

    seed("alice/Good-FT")
    with pytest.raises(MtpressError, match="no Prefect deployment named 'publish/nowhere'"):
        watch(str(write_policy(tmp_path)), str(tmp_path / "watch"), deployment="publish/nowhere")
    assert remembered("alice/Good-FT") is None


# ---------------------------------------------------------------------------------------------------------
# concurrency limits
# ---------------------------------------------------------------------------------------------------------


def test_limits_are_created_once_and_serialise_their_holders(prefect_harness, monkeypatch):
    from prefect.client.orchestration import get_client

    from mtpress.concurrency import ensure_limits, limit_name, occupy

    monkeypatch.setenv("MTPRESS_LIMIT_SCOPE", f"test-{time.monotonic_ns()}")
    assert ensure_limits() == [limit_name("quantize-cpu"), limit_name("bench-gpu")]
    assert ensure_limits() == []
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit_name("bench-gpu")).limit == 1

    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with occupy("quantize-cpu"):
            start = time.monotonic()
            time.sleep(0.5)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    (first_start, first_end), (second_start, _) = sorted(spans)
    assert len(spans) == 2 and second_start >= first_end, spans


# ---------------------------------------------------------------------------------------------------------
# prefect.yaml: the deployments, the schedule and the trigger from watch to publish
# ---------------------------------------------------------------------------------------------------------


def test_prefect_yaml_deploys_and_an_eligible_event_starts_publish(local_hub, fresh_decisions, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    from flows.watch import watch

    with get_client(sync_client=True) as client:
        for pool in ("mtpress", "mtpress-gpu"):  # prefect.yaml's pools: deploy refuses a pool that does not exist
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=REPO_ROOT,
                              env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    with get_client(sync_client=True) as client:
        watcher = client.read_deployment_by_name("watch/watch")
        publisher = client.read_deployment_by_name("publish/publish")
        automations = [a for a in client.read_automations()
                       if any(getattr(action, "deployment_id", None) == publisher.id for action in a.actions)]
    assert watcher.schedules[0].schedule.interval.total_seconds() == 6 * 3600
    assert watcher.parameters["launcher"] == "event" and watcher.work_pool_name == "mtpress"
    assert [a.trigger.expect for a in automations] == [{"mtpress.candidate.eligible"}]

    seed(BASE, base_model=None, head=True)  # the head donor, whose commit the config pins
    seed("alice/Good-FT")
    rows = watch(str(write_policy(tmp_path)), str(tmp_path / "watch"), launcher="event")
    assert rows[0]["launched"].startswith("event mtpress.candidate.eligible")
    config = tmp_path.resolve() / "watch" / "configs" / "Good-FT-MTP.yaml"
    deadline = time.monotonic() + 60
    while not (runs := publish_runs(tmp_path)) and time.monotonic() < deadline:
        time.sleep(1)
    # the trigger's template hands the multi-line YAML over unchanged (Prefect renders it through tojson)
    assert [run.parameters["config"] for run in runs] == [config.read_text()]
    assert runs[0].parameters["push"] is True  # the deployment's defaults still apply


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------


def test_cli_watch_once_dry_run_shows_the_decisions(local_hub, fresh_decisions, tmp_path):
    from typer.testing import CliRunner

    from mtpress.cli import app

    seed(BASE, base_model=None, head=True)  # the head donor, whose commit the config pins
    seed("alice/Good-FT")
    seed("bob/Headful-FT", head=True)
    result = CliRunner().invoke(app, ["watch", "--policy", str(write_policy(tmp_path)), "--once", "--dry-run",
                                      "--state-dir", str(tmp_path / "watch")])
    assert result.exit_code == 0, result.output
    assert "2 new candidates decided (dry run: nothing remembered)" in result.output
    assert not (tmp_path / "watch").exists()


def test_cli_names_the_bad_policy_file_and_key_without_a_traceback(tmp_path):
    policy_path = tmp_path / "watch.yaml"
    policy_path.write_text("bases: [{repo: Qwen/Qwen3.5-9B}]\nlicenses: [mit]\ntarget_namespace: me\n"
                           "release: {quants: [Q9_X]}\n")
    result = subprocess.run([str(Path(sys.executable).with_name("mtpress")), "watch", "--policy", str(policy_path),
                             "--once"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {policy_path}: release.quants: unknown quant type 'Q9_X'")
    assert "Traceback" not in result.stderr


def test_cli_limits_creates_then_reports_existing(prefect_harness, monkeypatch):
    from typer.testing import CliRunner

    from mtpress.cli import app

    monkeypatch.setenv("MTPRESS_LIMIT_SCOPE", f"cli-{time.monotonic_ns()}")
    first = CliRunner().invoke(app, ["limits"])
    assert first.exit_code == 0 and first.output.count(": created (1 slot)") == 2, first.output
    second = CliRunner().invoke(app, ["limits"])
    assert second.output.count(": exists (1 slot)") == 2, second.output


def test_without_a_server_the_limit_is_a_lock_the_kernel_frees_when_its_holder_dies(tmp_path, monkeypatch):
    """No PREFECT_API_URL: a killed holder must not block the next run (an in-memory lease would, forever)."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mtpress.concurrency import occupy

    monkeypatch.setenv("MTPRESS_CACHE", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom mtpress.concurrency import occupy\n"
                               "with occupy('quantize-cpu'):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    entered = threading.Event()

    def take() -> None:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):  # even inside another test's harness
            with occupy("quantize-cpu"):
                entered.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    assert not entered.wait(1.0), "the slot was taken twice"
    holder.kill()
    holder.wait()
    assert entered.wait(10), "the slot of a killed holder was not freed"
    waiter.join()
