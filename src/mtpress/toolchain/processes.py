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

SIGTERM and Ctrl-C during a flow reach its main thread only, while its tasks wait on tools in other threads;
Prefect then waits for those tasks before it ends the run, so a quantize would finish first (minutes at 9B).
``stop_tools_on_termination`` makes either signal stop every tool first: each task's wait ends at once.

On a Dask worker the tools belong to the worker, which lives on when the flow that wanted the task is killed: the
scheduler then cancels the task, but Dask cannot interrupt the thread running it, which would wait for its tool
(a 9B quantize: minutes). A tool started by a Dask task is watched: once the worker has cancelled that task, it is
killed. Work in Python (a download) asks ``abandonment_check`` as it goes, and stops.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY", re.IGNORECASE)
PR_SET_PDEATHSIG = 1
# Every tool started; one that has ended polls as ended, one no longer referenced drops out.
_tools: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()
# Reentrant: the termination handler runs on the main thread, which may have been inside ``start`` holding it.
_tools_lock = threading.RLock()
# On a Dask worker: each running tool's (worker, task key), and the thread that kills those of cancelled tasks.
_dask_task_of: weakref.WeakKeyDictionary[subprocess.Popen, tuple[Any, str]] = weakref.WeakKeyDictionary()
_dask_watcher: threading.Thread | None = None
DASK_POLL_S = 0.5
# A worker's task states once the scheduler no longer wants the result (its client is gone).
DASK_UNWANTED = frozenset({"cancelled", "released", "forgotten"})


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


def start(argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None, tool: bool = True,
          **popen: object) -> subprocess.Popen:
    """Start ``argv`` with ``tool_env(env)``, in a session of its own, to be killed when mtpress ends.

    Stop it with ``stop``; it must not outlive the call that started it on this thread (module docstring).
    ``tool=False``: not stopped by a termination signal (Prefect's own server, which records the run's end)."""
    proc = subprocess.Popen([str(a) for a in argv], env=tool_env(env), start_new_session=True,
                            preexec_fn=_dies_with(os.getpid()), **popen)
    if tool:
        with _tools_lock:
            _tools.add(proc)
        if (task := _dask_task()) is not None:
            _watch_dask_task(proc, task)
    return proc


def _dask_task() -> tuple[Any, str] | None:
    """(worker, task key) when this thread runs a Dask task: distributed records both per executor thread. Never
    imports distributed: a process that runs Dask tasks has it loaded."""
    utils = sys.modules.get("distributed.utils")
    state = getattr(utils, "thread_state", None)
    key, execution = getattr(state, "key", None), getattr(state, "execution_state", None)
    return (execution["worker"], key) if key is not None and execution else None


def _unwanted(worker: Any, key: str) -> bool:
    state = worker.state.tasks.get(key)
    return state is None or state.state in DASK_UNWANTED


def abandonment_check() -> Callable[[], bool]:
    """Whether the Dask task this thread runs has since been cancelled by its worker (the flow run that wanted it
    was killed), for work this thread hands to other threads (a download's): always False outside Dask."""
    task = _dask_task()
    return (lambda: _unwanted(*task)) if task is not None else (lambda: False)


def _watch_dask_task(proc: subprocess.Popen, task: tuple[Any, str]) -> None:
    global _dask_watcher
    with _tools_lock:
        _dask_task_of[proc] = task
        if _dask_watcher is None:
            _dask_watcher = threading.Thread(target=_kill_tools_of_unwanted_tasks, name="mtpress-dask-tools",
                                             daemon=True)
            _dask_watcher.start()


def _kill_tools_of_unwanted_tasks() -> None:
    """Until no watched tool runs: SIGKILL the session of each whose task the worker no longer runs for anyone."""
    global _dask_watcher
    while True:
        time.sleep(DASK_POLL_S)
        with _tools_lock:
            running = [(proc, task) for proc, task in _dask_task_of.items() if proc.poll() is None]
            if not running:
                _dask_watcher = None
                return
        for proc, task in running:
            if _unwanted(*task):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def stop_tools_on_termination() -> None:
    """From now until the caller's signal handlers are restored, SIGTERM and SIGINT first kill every running tool,
    then do what they did before (Prefect's handlers: record the run as crashed, end the process). A signal the
    process was started ignoring (SIGINT, for a job a script put in the background) stays ignored. Only the main
    thread can set handlers; elsewhere this does nothing."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if getattr(previous, "stops_tools", False):  # armed by an earlier run in this process: no chain of them
            continue
        if previous == signal.SIG_IGN:
            continue

        def stop_tools_then(received: int, frame: object, previous: object = previous) -> None:
            stop_all_tools()
            if callable(previous):
                previous(received, frame)
            else:  # the default action (or ignoring it) as before
                signal.signal(received, previous)
                if previous == signal.SIG_DFL:
                    os.kill(os.getpid(), received)

        stop_tools_then.stops_tools = True  # type: ignore[attr-defined]
        try:
            signal.signal(signum, stop_tools_then)
        except ValueError:
            return


def stop_all_tools() -> int:
    """SIGKILL every running tool's session; their threads reap them. How many were running."""
    with _tools_lock:
        running = [proc for proc in _tools if proc.poll() is None]
    for proc in running:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(running)


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
