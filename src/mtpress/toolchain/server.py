"""Run llama-server for one job and always clean it up."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from mtpress.errors import ToolFailedError
from mtpress.toolchain.llama_cpp import LlamaCpp
from mtpress.toolchain.processes import start, stop


@dataclass(frozen=True)
class RunningServer:
    url: str
    log_path: Path
    pid: int

    def completion(self, payload: dict, *, timeout: float) -> dict:
        return self.post("/completion", payload, timeout=timeout)

    def post(self, path: str, payload: dict, *, timeout: float) -> dict:
        """POST ``payload`` to one of the server's endpoints (``/v1/chat/completions``, ``/apply-template``…)."""
        response = requests.post(f"{self.url}{path}", json=payload, timeout=timeout)
        response.raise_for_status()
        return response.json()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(tools: LlamaCpp, args: Sequence[str], *, timeout: float, threads: int | None = None,
                 env: Mapping[str, str] | None = None) -> Iterator[RunningServer]:
    """Start ``llama-server`` with ``args``, wait until it is healthy, yield it, stop it and its process group.

    ``env`` adds to the server's environment, which otherwise holds no secret (``processes.tool_env``).
    Started and stopped on the calling thread, inside the ``with`` block: its parent-death signal is tied to
    this thread (``processes``)."""
    port = free_port()
    threads = threads or os.cpu_count() or 2
    argv = [str(tools.tool("llama-server")), *map(str, args), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "--no-webui", "-np", "1"]
    with tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with log_path.open("w") as log:
        proc = start(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", argv, log_path, timeout)
        yield RunningServer(f"http://127.0.0.1:{port}", log_path, proc.pid)
    finally:
        stop(proc, grace_s=10)
        log_path.unlink(missing_ok=True)


def _wait_healthy(proc: subprocess.Popen, url: str, argv: list[str], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ToolFailedError(argv, returncode=proc.returncode, output=log_path.read_text(errors="replace"))
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise ToolFailedError(argv, returncode=None, output=log_path.read_text(errors="replace"), timed_out=True)
