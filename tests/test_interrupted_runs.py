"""A release killed mid-convert, mid-quantize, mid-upload or mid-gate loses nothing and leaves nothing: no
process it started runs on, the rerun finishes with the same bytes as an uninterrupted run, removes every
leftover, and the target repo gets exactly one release commit.

The flow runs as a real `mtpress publish` process, as a user runs it (no Prefect server: each run starts
its own on a shared SQLite database), against the local Hub; the test kills that one process with SIGKILL,
like an OOM kill (no `finally` runs), at the moment the converter, llama-quantize (holding the machine's
quantize slot), an LFS upload or the release gate's llama-server is in flight. Whatever it started
(tools, llama-servers, Prefect's server) must end by itself within seconds.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest

from mtpress.demo.run import seed_upstream_repos
from mtpress.fsutil import sha256_file
from mtpress.hub.client import hub_api
from tests.conftest import TEST_TOKEN

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET = "mtpress-test/Interrupted-GGUF"
CONFIG = f"""\
name: Interrupted
arch: qwen35
finetune: {{repo: mtpress-demo/Tiny-Qwen3.5-Demo-FT}}
donor: {{repo: mtpress-demo/Tiny-Qwen3.5-Demo-Base}}
target: {{repo: {TARGET}}}
layouts: [sidecar]
quants: [Q4_K_M]
smoke: {{n_predict: 16}}
bench: {{enabled: false}}
quality: {{enabled: false}}
"""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()  # empty for a zombie: it has ended
    except OSError:
        return {}
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)


class PublishProcess:
    """`mtpress publish` in its own session, with its output kept for the assertion messages.

    Every process it starts inherits a variable naming this run, so they are found after the flow process
    is gone, when they no longer descend from it."""

    def __init__(self, config: Path, output: Path, env: dict, log: Path, *push: str):
        self.log = log
        self.run_id = uuid4().hex
        with log.open("w") as out:
            self.proc = subprocess.Popen([str(Path(sys.executable).with_name("mtpress")), "publish", str(config),
                                          "--output", str(output), *push], cwd=REPO_ROOT,
                                         env={**env, "MTPRESS_TEST_RUN": self.run_id}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.proc.poll() is None, f"publish ended (rc {self.proc.returncode}) before {what}:\n{self.output}"
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.output}")

    def started(self) -> dict[int, str]:
        """pid → command line of every live process this run started, at any depth, the flow's own excluded."""
        mark = f"MTPRESS_TEST_RUN={self.run_id}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self.proc.pid:
                try:
                    if mark in (entry / "environ").read_bytes().split(b"\0"):
                        found[int(entry.name)] = _cmdline(int(entry.name))
                except OSError:
                    pass
        return found

    def running_tool(self, fragment: str) -> bool:
        return any(fragment in command for command in self.started().values())

    def only_the_gate_has_the_token(self) -> None:
        """No process this run started sees the Hub token, except the release gate's llama-server (`-hf`)."""
        for pid, command in self.started().items():
            if "HF_TOKEN" in _environ(pid):
                assert "llama-server" in command and " -hf " in command, f"the token reached {command}"

    def kill(self, *expected: str) -> None:
        """SIGKILL the flow process alone; every process it started (``expected`` among them) must end by itself."""
        running = self.started()
        for fragment in expected:
            assert any(fragment in command for command in running.values()), f"no {fragment} in {running}"
        self.proc.kill()
        self.proc.wait()
        deadline = time.monotonic() + 10
        while left := self.started():
            assert time.monotonic() < deadline, f"outlived the run that started them: {left}"
            time.sleep(0.1)

    def finish(self) -> None:
        assert self.proc.wait(timeout=900) == 0, self.output

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _ggufs(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.gguf"))}


def _leftovers(*folders: Path) -> list[str]:
    """What an interrupted run leaves: partial files and scratch folders (the gate's llama.cpp cache among them)."""
    return [p.name for folder in folders for p in folder.rglob("*")
            if p.name.endswith(".partial") or p.name.startswith(".convert-")]


def _release_commits(api) -> list[str]:
    if not api.repo_exists(TARGET):
        return []
    return [c.title for c in api.list_repo_commits(TARGET) if c.title.startswith("mtpress:")]


def test_a_release_killed_at_each_stage_resumes_to_identical_bytes_and_one_commit(
        tmp_path, local_hub, toolchain, demo_pair):
    config = tmp_path / "interrupted.yaml"
    config.write_text(CONFIG)
    seed_upstream_repos(config)
    api = hub_api()
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO"}
    release, work = tmp_path / "release", tmp_path / ".work-Interrupted"
    prefect_server = "prefect_server:ephemeral_app"  # the temporary Prefect server each run starts

    reference = tmp_path / "reference"
    PublishProcess(config, reference, env, tmp_path / "reference.log", "--no-push").finish()
    expected = _ggufs(reference)
    assert set(expected) == {"Interrupted-BF16.gguf", "Interrupted-Q4_K_M.gguf", "mtp-Interrupted-BF16.gguf",
                             "mtp-Interrupted-Q4_K_M.gguf", "imatrix-Interrupted.gguf"}  # Q4_K_M is made with it

    run = PublishProcess(config, release, env, tmp_path / "convert.log")
    run.wait_for(lambda: run.running_tool("convert_hf_to_gguf"), "converter process")
    time.sleep(1.0)  # let it write part of its output
    run.only_the_gate_has_the_token()
    run.kill("convert_hf_to_gguf", prefect_server)
    assert not _ggufs(release), "a GGUF appeared before its conversion finished"

    run = PublishProcess(config, release, env, tmp_path / "quantize.log")
    run.wait_for(lambda: run.running_tool("llama-quantize"), "llama-quantize process")
    run.only_the_gate_has_the_token()
    run.kill("llama-quantize", prefect_server)
    assert "Interrupted-Q4_K_M.gguf" not in _ggufs(release)
    assert {n: s for n, s in _ggufs(release).items() if "BF16" in n} == \
        {n: s for n, s in expected.items() if "BF16" in n}, "the converted files are complete and reused"

    # The upload: an LFS PUT is held by the endpoint until the client is gone.
    local_hub.faults.add("PUT", r"^/_mtpress/lfs/", action="stall", seconds=20)
    run = PublishProcess(config, release, env, tmp_path / "upload.log")
    run.wait_for(lambda: not local_hub.faults.pending(), "LFS upload", timeout=900)
    run.kill(prefect_server)
    assert _release_commits(api) == [], "a killed upload must not leave a commit"

    # The release gate: llama.cpp's downloader is held on the staging repo's first GGUF, its llama-server live.
    local_hub.faults.add("GET", rf"^/{TARGET}-staging/resolve/[^/]+/[^/]+\.gguf$", action="stall", seconds=180)
    run = PublishProcess(config, release, env, tmp_path / "gate.log")
    run.wait_for(lambda: not local_hub.faults.pending() and run.running_tool(" -hf "), "gate download", timeout=900)
    gate_server = next(pid for pid, command in run.started().items() if " -hf " in command)
    assert _environ(gate_server)["HF_TOKEN"] == TEST_TOKEN, "the gate reads the private staging repo with it"
    run.only_the_gate_has_the_token()
    # A second run of the same release folder fails at once, before it could remove the first one's files.
    second = PublishProcess(config, release, env, tmp_path / "second.log")
    assert second.proc.wait(timeout=300) == 1, second.output
    assert f"{release} is in use by another mtpress run (pid {run.proc.pid}, " in second.output
    run.kill("llama-server", prefect_server)
    assert [name for name in _leftovers(work) if name.startswith("gate-llama-cache-")], "the gate's cache is left"

    PublishProcess(config, release, env, tmp_path / "final.log").finish()  # the killed run's lock is free
    assert _ggufs(release) == expected
    assert not _leftovers(release, work), "the rerun removes what the killed runs left"

    manifest = json.loads((release / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} | {manifest["imatrix"]["path"]:
                                                                  manifest["imatrix"]["sha256"]} == expected
    assert len(_release_commits(api)) == 1
    remote = {f.rfilename: f for f in api.model_info(TARGET, files_metadata=True).siblings}
    for path, sha in expected.items():
        assert remote[path].lfs.sha256 == sha, path
    assert {p for p in remote if not p.startswith(".")} == {*expected, "README.md", "README_zh.md", "manifest.json"}


def test_sigterm_stops_the_running_tools_at_once_and_nothing_outlives_the_run(tmp_path, local_hub, toolchain,
                                                                             demo_pair):
    """SIGTERM (a service manager's stop, a cancelled CI job) reaches the flow's main thread while a worker thread
    waits on a tool; Prefect ends the run only once its tasks return. Here the BF16 smoke test asks for 1,024
    tokens three times (about a minute on two cores): the run must end within seconds, its tools with it."""
    config = tmp_path / "terminated.yaml"
    config.write_text(CONFIG.replace("quants: [Q4_K_M]", "quants: [Q8_0]").replace("n_predict: 16", "n_predict: 1024"))
    seed_upstream_repos(config)
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "INFO"}
    run = PublishProcess(config, tmp_path / "release", env, tmp_path / "terminated.log", "--no-push")
    run.wait_for(lambda: run.running_tool("llama-server"), "the smoke test's llama-server")
    time.sleep(3)  # the server is up and generating
    sent = time.monotonic()
    run.proc.terminate()
    returncode = run.proc.wait(timeout=120)
    took = time.monotonic() - sent
    assert took < 15, f"the run took {took:.0f} s to end after SIGTERM:\n{run.output[-3000:]}"
    assert returncode != 0 and "Crashed('Execution was aborted by a termination signal.')" in run.output, run.output
    deadline = time.monotonic() + 10
    while left := run.started():
        assert time.monotonic() < deadline, f"outlived the run that started them: {left}"
        time.sleep(0.1)
