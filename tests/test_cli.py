"""The command line: exit codes and one-line messages, no tracebacks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mtpress(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", "from mtpress.cli import main; main()", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_help_lists_the_commands():
    out = mtpress("--help")
    assert out.returncode == 0
    for command in ("publish", "demo", "check-config", "toolchain", "hub"):
        assert command in out.stdout


def test_check_config_accepts_the_shipped_configs():
    out = mtpress("check-config", *sorted(str(p) for p in (ROOT / "model_configs").glob("*.y*ml")
                                          if p.name != "watch.yaml"))
    assert out.returncode == 0 and "demo.yaml: ok" in out.stdout


def test_a_bad_config_exits_1_with_file_and_key_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfinetune: {repo: a/b}\ntarget: {repo: c/d}\nquants: [Q9_K]\n")
    out = mtpress("check-config", str(bad))
    assert out.returncode == 1
    assert f"{bad}: quants: unknown quant type 'Q9_K'" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_wrong_llama_cpp_checkout_is_named(tmp_path):
    out = mtpress("toolchain", "doctor", env={"MTPRESS_LLAMA_CPP": str(tmp_path)})
    assert out.returncode == 1
    assert "is not a llama.cpp checkout with a build" in out.stderr and "Traceback" not in out.stderr


def test_doctor_reports_the_pinned_version(toolchain):
    out = mtpress("toolchain", "doctor")
    assert out.returncode == 0 and "llama.cpp b11434" in out.stdout


def test_a_llama_cpp_of_another_version_is_refused(tmp_path):
    """A checkout whose llama-server reports another build number (here a script standing in for it)."""
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    server = tmp_path / "build" / "bin" / "llama-server"
    server.parent.mkdir(parents=True)
    server.write_text("#!/bin/sh\necho 'version: 0.5.0 (build 9999, commit deadbeef)' >&2\n")
    server.chmod(0o755)
    out = mtpress("toolchain", "doctor", env={"MTPRESS_LLAMA_CPP": str(tmp_path)})
    assert out.returncode == 1
    assert "is llama.cpp b9999; mtpress is pinned to b11434" in out.stderr


def test_publish_refuses_a_bad_config_in_a_second_before_prefect_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfinetune: {repo: a/b}\ntarget: {repo: c/d}\nquants: [Q9_K]\n")
    out = mtpress("publish", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {bad}: quants: unknown quant type 'Q9_K'")
    assert "prefect" not in out.stderr.lower()


def test_an_error_inside_the_flow_is_printed_once_and_its_trace_only_with_debug(tmp_path, toolchain):
    """A stage's error passes through the task, its retries and the flow: the terminal shows it once."""
    config = tmp_path / "missing.yaml"
    config.write_text(f"name: Missing\nfinetune: {{path: {tmp_path / 'nowhere'}}}\ntarget: {{repo: c/d}}\n")
    quiet = mtpress("publish", str(config), "--no-push", "--output", str(tmp_path / "release"),
                    env={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert quiet.returncode == 1, quiet.stderr
    assert quiet.stderr.count("nowhere: not a directory") == 1 and "Traceback" not in quiet.stderr
    assert [line for line in quiet.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path / 'nowhere'}: not a directory"]
    loud = mtpress("publish", str(config), "--no-push", "--debug", "--output", str(tmp_path / "release"),
                   env={"PREFECT_HOME": str(tmp_path / "prefect")})
    assert loud.returncode == 1 and "Traceback" in loud.stderr
