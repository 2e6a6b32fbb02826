"""The GitHub release through a Prefect deployment, for real: release.yml's own step script runs `mtpress release-run`
against a local Prefect server, where prefect.yaml's publish deployment is served by a process worker whose pull step
git-clones a local bare repository at the workflow's commit. The publish flow in that repository is a stand-in
(seconds, not hours); everything around it — the deployment, the pull step, the worker, the command — is the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.test_cli import mtpress
from tests.test_workflows import steps

REPO_ROOT = Path(__file__).resolve().parent.parent
POOL = "mtpress-release-run-test"
CONFIG = "qwenpaw-flash-9b-mtp.yaml"
RUN_STEP = "Run publish/publish on the Prefect server"

# The repository's flows/publish.py, replaced by a flow of the same name and parameters that writes a manifest
# naming the commit its worker checked out, and hands it back the way the real flow does (flows.remote).
STANDIN = '''
import json, subprocess
from pathlib import Path

from prefect import flow

from flows.remote import record_manifest
from mtpress.schema import load_release_config


@flow(name="publish")
def publish(config: str = "model_configs/demo.yaml", output: str | None = None, push: bool = True,
            dry_run: bool = False, token_secret: str | None = None) -> str:
    FAIL
    name = load_release_config(Path(config)).name
    release = Path("release")
    release.mkdir()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    manifest = {"release": name, "commit": commit, "dry_run": dry_run, "files": [], "gate": None}
    for gate in (None, "passed"):  # like the real flow: recorded once built, again after the gate rewrote it
        (release / "manifest.json").write_text(json.dumps(manifest | {"gate": gate}))
        RECORD
    return str(release.resolve())
'''


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()


def bare_repository(root: Path) -> tuple[str, str, str, str]:
    """A bare repository at root/owner/mtpress.git (file:// URL) with three commits on main: `good`, whose stand-in
    publishes; `silent`, whose stand-in completes without recording its manifest (older code); then `broken`,
    whose stand-in raises. Returns (url, good, silent, broken)."""
    work = root / "checkout"
    (work / "flows").mkdir(parents=True)
    for source in (REPO_ROOT / "flows").glob("*.py"):
        (work / "flows" / source.name).write_text(source.read_text())
    (work / "model_configs").mkdir()
    (work / "model_configs" / CONFIG).write_text((REPO_ROOT / "model_configs" / CONFIG).read_text())
    git("init", "--quiet", "--initial-branch", "main", cwd=work)
    commits = []
    for what, fail, record in (("good", "pass", "record_manifest(release, name)"), ("silent", "pass", "pass"),
                               ("broken", 'raise RuntimeError("the stand-in at this commit is broken")', "pass")):
        (work / "flows" / "publish.py").write_text(STANDIN.replace("FAIL", fail).replace("RECORD", record))
        git("add", "-A", cwd=work)
        git("commit", "--quiet", "-m", what, cwd=work)
        commits.append(git("rev-parse", "HEAD", cwd=work))
    bare = root / "owner" / "mtpress.git"
    git("clone", "--quiet", "--bare", str(work), str(bare), cwd=root)
    return bare.as_uri(), *commits


def publish_pull_steps() -> list[dict]:
    document = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    [publish] = [d for d in document["deployments"] if d["name"] == "publish"]
    return publish["pull"]


@pytest.mark.parametrize("which", ["good", "broken", None])
def test_the_pull_step_clones_the_commit_in_mtpress_commit(tmp_path, monkeypatch, which):
    """prefect.yaml's pull steps as a worker's flow-run process runs them: the repository and commit come from its
    environment (the run's job variables); without a commit, the default branch."""
    from prefect.deployments.steps.core import run_steps

    url, good, _, broken = bare_repository(tmp_path)
    commit = {"good": good, "broken": broken, None: None}[which]
    monkeypatch.setenv("MTPRESS_REPOSITORY", url)
    if commit:
        monkeypatch.setenv("MTPRESS_COMMIT", commit)
    else:
        monkeypatch.delenv("MTPRESS_COMMIT", raising=False)
    run_dir = tmp_path / "flow-run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    output = asyncio.run(run_steps(publish_pull_steps()))
    assert git("rev-parse", "HEAD", cwd=run_dir / output["directory"]) == (commit or broken)


def test_the_pull_step_fails_on_a_commit_the_repository_does_not_have(tmp_path, monkeypatch):
    from prefect.deployments.steps.core import StepExecutionError, run_steps

    url, *_ = bare_repository(tmp_path)
    monkeypatch.setenv("MTPRESS_REPOSITORY", url)
    monkeypatch.setenv("MTPRESS_COMMIT", "0" * 40)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StepExecutionError, match="git_clone"):
        asyncio.run(run_steps(publish_pull_steps()))


def test_release_run_refuses_without_a_server_or_with_a_commit_but_no_repository(tmp_path):
    no_server = mtpress("release-run", f"model_configs/{CONFIG}", env={"PREFECT_API_URL": ""})
    assert no_server.returncode == 1 and "error: PREFECT_API_URL is not set" in no_server.stderr
    no_repo = mtpress("release-run", f"model_configs/{CONFIG}", "--commit", "abc1234")
    assert no_repo.returncode == 1 and "error: --commit needs --repository" in no_repo.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    invalid = mtpress("release-run", str(bad), env={"PREFECT_API_URL": ""})  # the config is checked first
    assert invalid.returncode == 1 and f"error: {bad}" in invalid.stderr


@contextmanager
def worker(pool: str, cwd: Path, env: dict):
    """A process worker polling every second; stopped with SIGINT (after SIGTERM it keeps submitting runs)."""
    with (cwd / "worker.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                                   cwd=cwd, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield cwd / "worker.log"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def no_publish_deployment(prefect_harness):
    """No publish/publish on the session's server before or after the test (other tests deploy the real flow under
    that name; this one the stand-in), nor its trigger."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    def forget() -> None:
        with get_client(sync_client=True) as client:
            try:
                deployment = client.read_deployment_by_name("publish/publish")
            except ObjectNotFound:
                return
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            client.delete_deployment(deployment.id)

    forget()
    yield
    forget()


@pytest.mark.slow
def test_the_release_workflow_runs_the_deployment_and_fails_when_it_fails(no_publish_deployment, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    step = steps("release.yml", "publish")[RUN_STEP]
    url, good, silent, broken = bare_repository(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"PREFECT_API_URL": PREFECT_API_URL.value()}
    script = tmp_path / "step.sh"
    script.write_text(step["run"])

    def workflow_step(commit: str) -> subprocess.CompletedProcess:
        """The step as GitHub runs it (`bash --noprofile --norc -eo pipefail {0}`), with the runner's variables."""
        runner = {"CONFIG": CONFIG, "DRY_RUN": "true", "GITHUB_SHA": commit, "RUNNER_TEMP": str(tmp_path / "runner"),
                  "GITHUB_SERVER_URL": url.removesuffix("/owner/mtpress.git"), "GITHUB_REPOSITORY": "owner/mtpress"}
        return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=REPO_ROOT,
                              env=env | runner, capture_output=True, text=True, timeout=300)

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except ObjectAlreadyExists:  # the session's server, this test run twice
            pass
    missing = workflow_step(good)  # before prefect.yaml was deployed
    assert missing.returncode == 1 and "error: there is no Prefect deployment 'publish/publish'" in missing.stderr

    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "publish",
                               "--pool", POOL], cwd=REPO_ROOT, env=env | {"MTPRESS_REPOSITORY": url},
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("publish/publish")
    assert deployment.job_variables["env"]["MTPRESS_REPOSITORY"] == url  # baked in from the deployer's environment

    # No worker yet: the run stays Scheduled; the command gives up after --timeout and says the run goes on.
    waited = mtpress("release-run", f"model_configs/{CONFIG}", "--commit", good, "--repository", url,
                     "--timeout", "3", env=env)
    assert waited.returncode == 1 and "is still Scheduled after 3 s" in waited.stderr, waited.stderr[-2000:]

    host = tmp_path / "worker-host"  # no checkout of the repository here: the pull step brings the code
    host.mkdir()
    with worker(POOL, host, env) as log:
        completed = workflow_step(good)
        failed = workflow_step(broken)
        unrecorded = workflow_step(silent)
    worker_log = log.read_text()[-3000:]

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:] + worker_log
    run_id = completed.stdout.split("flow run ", 1)[1].split()[0]
    assert f"at commit {good}" in completed.stdout and f"/runs/flow-run/{run_id}" in completed.stdout
    assert "Completed" in completed.stdout and "Running 1 deployment pull step" in completed.stdout  # its logs
    manifest = json.loads((tmp_path / "runner" / "release" / "manifest.json").read_text())
    assert manifest == {"release": "QwenPaw-Flash-9B-MTP", "commit": good, "dry_run": True, "files": [],
                        "gate": "passed"}  # the last one recorded

    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:] + worker_log
    run_id = failed.stdout.split("flow run ", 1)[1].split()[0]
    [error] = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert f"publish/publish flow run {run_id}" in error and "ended Failed" in error
    assert f"prefect flow-run logs {run_id}" in failed.stderr and "Traceback" not in failed.stderr
    assert "the stand-in at this commit is broken" in failed.stdout  # the run's own log, followed here

    assert unrecorded.returncode == 1 and "completed without a qwenpaw-flash-9b-mtp-manifest artifact" in \
        unrecorded.stderr, unrecorded.stderr[-2000:]
