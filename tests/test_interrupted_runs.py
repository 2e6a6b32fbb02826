"""A release killed mid-convert, mid-quantize or mid-upload loses nothing: the rerun finishes with the
same bytes as an uninterrupted run and the target repo gets exactly one release commit.

The flow runs as a real `mtpress publish` process, as a user runs it (no Prefect server: each run starts
its own on a shared SQLite database), against the local Hub; the test kills its whole process tree with
SIGKILL, like a lost machine or an OOM kill, at the moment the converter, llama-quantize (holding the
machine's quantize slot) or an LFS upload is in flight.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtpress.demo.run import seed_upstream_repos
from mtpress.fsutil import sha256_file
from mtpress.hub.client import hub_api

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


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = []
    try:
        direct = [int(c) for c in children.read_text().split()]
    except OSError:
        return found
    for child in direct:
        found += [child, *_descendants(child)]
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class PublishProcess:
    """`mtpress publish` in its own session, with its output kept for the assertion messages."""

    def __init__(self, config: Path, output: Path, env: dict, log: Path, *push: str):
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([str(Path(sys.executable).with_name("mtpress")), "publish", str(config),
                                          "--output", str(output), *push], cwd=REPO_ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, condition, what: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            assert self.proc.poll() is None, f"publish ended (rc {self.proc.returncode}) before {what}:\n{self.output}"
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout} s:\n{self.output}")

    def running_tool(self, fragment: str) -> bool:
        return any(fragment in _cmdline(pid) for pid in _descendants(self.proc.pid))

    def kill_tree(self) -> None:
        """SIGKILL the flow and every process under it (the tools run in sessions of their own)."""
        victims = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in victims[1:]):
            assert time.monotonic() < deadline, "killed tools are still running"
            time.sleep(0.1)

    def finish(self) -> None:
        assert self.proc.wait(timeout=900) == 0, self.output

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    except (OSError, StopIteration):
        return "zombie"


def _ggufs(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*.gguf"))}


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
    release = tmp_path / "release"

    reference = tmp_path / "reference"
    PublishProcess(config, reference, env, tmp_path / "reference.log", "--no-push").finish()
    expected = _ggufs(reference)
    assert set(expected) == {"Interrupted-BF16.gguf", "Interrupted-Q4_K_M.gguf",
                             "mtp-Interrupted-BF16.gguf", "mtp-Interrupted-Q4_K_M.gguf"}

    run = PublishProcess(config, release, env, tmp_path / "convert.log")
    run.wait_for(lambda: run.running_tool("convert_hf_to_gguf"), "converter process")
    time.sleep(1.0)  # let it write part of its output
    run.kill_tree()
    assert not _ggufs(release), "a GGUF appeared before its conversion finished"

    run = PublishProcess(config, release, env, tmp_path / "quantize.log")
    run.wait_for(lambda: run.running_tool("llama-quantize"), "llama-quantize process")
    run.kill_tree()
    assert "Interrupted-Q4_K_M.gguf" not in _ggufs(release)
    assert {n: s for n, s in _ggufs(release).items() if "BF16" in n} == \
        {n: s for n, s in expected.items() if "BF16" in n}, "the converted files are complete and reused"

    # The upload: an LFS PUT is held by the endpoint until the client is gone.
    local_hub.faults.add("PUT", r"^/_mtpress/lfs/", action="stall", seconds=20)
    run = PublishProcess(config, release, env, tmp_path / "upload.log")
    run.wait_for(lambda: not local_hub.faults.pending(), "LFS upload", timeout=900)
    run.kill_tree()
    assert _release_commits(api) == [], "a killed upload must not leave a commit"

    PublishProcess(config, release, env, tmp_path / "final.log").finish()
    assert _ggufs(release) == expected
    assert not [p for p in release.rglob("*") if p.name.endswith(".partial") or p.name.startswith(".convert-")]

    manifest = json.loads((release / "manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == expected
    assert len(_release_commits(api)) == 1
    remote = {f.rfilename: f for f in api.model_info(TARGET, files_metadata=True).siblings}
    for path, sha in expected.items():
        assert remote[path].lfs.sha256 == sha, path
    assert {p for p in remote if not p.startswith(".")} == {*expected, "README.md", "README_zh.md", "manifest.json"}
