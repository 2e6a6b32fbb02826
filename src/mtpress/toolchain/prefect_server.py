"""Prefect's temporary API server, started by mtpress so that it ends with mtpress.

Without PREFECT_API_URL, Prefect 3.8.8 starts a temporary server by itself (``SubprocessASGIServer`` in
prefect/server/api/server.py): ``python -m uvicorn`` serving its app in ephemeral mode, a plain subprocess
started by whichever thread first needs a client, with the whole environment (the Hub token included), and
stopped only by an ``atexit`` hook, which neither SIGTERM nor ``kill -9`` runs: it served on for ever.

``prefect_api()`` starts the same server (Prefect's ``create_app(ephemeral=True)``: its API, no UI, only the
services an ephemeral server runs) under uvicorn, on the calling thread (the CLI's main thread), through
``processes.start`` (killed with mtpress, no secrets), and points PREFECT_API_URL at it, Prefect's documented
way to use a server: Prefect then never starts its own. It costs what Prefect's own start costs (≈ 4 s here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from mtpress.errors import ToolchainError
from mtpress.toolchain.processes import start, stop
from mtpress.toolchain.server import free_port

STARTUP_FAILED = 3  # uvicorn's exit code when the app cannot start
_temporary_urls: set[str] = set()  # the API URLs of the temporary servers this process runs


def is_temporary(api_url: str | None) -> bool:
    """Whether ``api_url`` is a temporary server of this process (``prefect_api``): what it keeps in memory,
    such as concurrency slot leases, ends with the process."""
    return api_url in _temporary_urls


def ephemeral_app():
    """uvicorn's app factory (in the server's process): Prefect's API as its temporary server serves it."""
    from prefect.server.api.server import create_app

    return create_app(ephemeral=True, final=True)


@contextmanager
def prefect_api() -> Iterator[str]:
    """The Prefect API this process uses, for the duration of the block: the configured one (PREFECT_API_URL,
    from the environment or the active profile), else a temporary server started here and stopped after."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        yield settings.api.url
        return
    proc, url = _start(settings)
    before = {name: os.environ.get(name) for name in ("PREFECT_API_URL", "PREFECT_UI_URL")}
    try:
        # Prefect reads its settings once, at import: refresh them (subprocesses read the variables). No UI
        # link: this server has none, as Prefect's own temporary server has none (its runs print no link).
        os.environ["PREFECT_API_URL"] = url
        os.environ.setdefault("PREFECT_UI_URL", "")
        refresh_global_settings_context()
        _temporary_urls.add(url)
        yield url
    finally:
        _temporary_urls.discard(url)
        _flush()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh_global_settings_context()
        stop(proc, grace_s=5)


def _start(settings) -> tuple[subprocess.Popen, str]:
    """The server process, serving, and its API URL."""
    deadline = time.monotonic() + settings.server.ephemeral.startup_timeout_seconds
    while True:
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        # The profile's settings travel as variables, as they do to Prefect's own temporary server.
        proc = start([sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:ephemeral_app", "--host",
                      "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
                     env=settings.to_environment_variables(exclude_unset=True), stdin=subprocess.DEVNULL,
                     tool=False)  # it must record the run's end after a termination stopped the tools
        try:
            if _serving(proc, url, deadline):
                return proc, url
        except BaseException:
            stop(proc)
            raise
        # uvicorn's "startup failed": the port was taken since free_port, or another run was creating the same
        # database; Prefect's own server is started again then, and so is this one, until the deadline.
        if proc.returncode != STARTUP_FAILED:
            raise ToolchainError(f"Prefect's temporary server exited with code {proc.returncode} before it served "
                                 f"{url} (its error is printed above)",
                                 hint="run a Prefect server (`prefect server start`) and export PREFECT_API_URL")


def _serving(proc: subprocess.Popen, url: str, deadline: float) -> bool:
    """True once the server answers, False if it exits first; ToolchainError at the deadline."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise ToolchainError(f"Prefect's temporary server did not answer on {url} in time",
                         hint="on a busy machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run a "
                              "Prefect server (`prefect server start`) and export PREFECT_API_URL")


def _flush() -> None:
    """Send what Prefect's background workers still hold (run logs, events) while the server is up, as Prefect's
    test harness does before it stops its server; otherwise they fail at exit ("Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=30)
