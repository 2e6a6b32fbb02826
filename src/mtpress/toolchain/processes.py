"""How mtpress starts every external process: none outlives mtpress, and none sees a secret it does not need.

A process is started in a session of its own (stopping it stops everything it started) with a parent-death
signal (Linux's ``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the kernel kills it when mtpress ends, however it ends.
``finally`` blocks stop tools on errors and Ctrl-C, but ``kill -9`` (or an OOM kill, or SIGTERM, whose default
action skips them) runs none: without the signal a llama-server, a llama-quantize or Prefect's server would run
on, holding memory, ports and, for the release gate's llama-server, the Hub token.

The kernel sends the signal when the *thread* that started the process exits, not the process. So no process
may outlive the call that started it on its thread: ``run_tool`` waits for its tool, ``llama_server`` stops its
server when its ``with`` block ends (a with-statement enters and exits on one thread; the flow's smoke lane runs
each smoke wholly on its worker thread), and the CLI starts Prefect's server on the main thread, which lives as
long as the process. On other systems there is no such signal and only the ``finally`` blocks stop tools.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY", re.IGNORECASE)
PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, here: the child must not load libraries between fork and exec.
PRCTL = _prctl()


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment external tools get: ours minus anything secret-looking, plus ``extra``.

    Only a caller that passes a secret in ``extra`` hands it on: the release gate's llama-server, which reads
    the private staging repo with the Hub token; no other tool gets it."""
    env = {k: v for k, v in os.environ.items() if not SECRET_ENV.search(k)}
    env.update(extra or {})
    return env


def start(argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None, **popen: object) -> subprocess.Popen:
    """Start ``argv`` with ``tool_env(env)``, in a session of its own, to be killed when mtpress ends.

    Stop it with ``stop``; it must not outlive the call that started it on this thread (module docstring)."""
    return subprocess.Popen([str(a) for a in argv], env=tool_env(env), start_new_session=True,
                            preexec_fn=_dies_with(os.getpid()), **popen)


def _dies_with(parent: int) -> Callable[[], None] | None:
    if PRCTL is None:
        return None

    def arm() -> None:
        # Runs in the child between fork and exec: one system call and a pid check, no lock, import or
        # allocation that another thread of mtpress could have held at the fork.
        PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # mtpress died before the signal was armed: it will never come
            os._exit(1)

    return arm


def stop(proc: subprocess.Popen, *, grace_s: float = 0) -> None:
    """End ``proc`` and everything in its session, and reap it: SIGTERM first when ``grace_s`` > 0, then
    SIGKILL if it is still running after that long."""
    if proc.poll() is None:
        if grace_s:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait(proc: subprocess.Popen) -> int:
    """``proc``'s exit status; if the wait ends otherwise (Ctrl-C, an error), ``proc`` is stopped first."""
    try:
        return proc.wait()
    except BaseException:
        stop(proc)
        raise
