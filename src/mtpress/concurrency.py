"""Global concurrency limits that keep the heavy stages from fighting over one machine.

``llama-quantize`` uses every core it is given and a benchmark needs the GPU to itself, so however many
publish runs a worker starts, each machine quantizes one model at a time and each GPU host runs one
benchmark at a time:

    with occupy("quantize-cpu"):
        quantize(...)

Prefect silently skips a limit that does not exist ("do not exist - skipping acquisition") and then runs
everything in parallel, so ``occupy`` creates its limit first and acquires it strictly.

Without a Prefect server (``PREFECT_API_URL`` unset: ``mtpress publish`` and ``make demo`` on their own),
every process starts a temporary server (``prefect_server.prefect_api``) that keeps slot leases in its memory
and never takes back the slot of a run that was killed: the next run would wait forever. There the machine
is the whole scope, so the limit is a lock file under the mtpress cache, which the kernel releases when its
holder dies.

A limit lives on the Prefect server, so by default it is shared by every machine that talks to that server.
With several machines, set ``MTPRESS_LIMIT_SCOPE`` (e.g. to the host name) in each worker's environment:
``occupy("quantize-cpu")`` then takes ``quantize-cpu-<scope>``, one slot per machine (docs/deploy.md).

A task on a Dask worker (flows/runners.py) runs in another process, usually on another machine: there the
flow's temporary server is not "temporary" (it is another process's), so the limit is the server's, and the
scope defaults to the worker's host name: one quantize per machine of the cluster, however many workers it
runs, never one for the whole cluster.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

# Limit kind → slots. Both are 1: a second quantize on the same cores, or a second benchmark on the same
# GPU, makes both slower and the benchmark's numbers meaningless.
LIMITS: dict[str, int] = {"quantize-cpu": 1, "bench-gpu": 1}
SCOPE_ENV = "MTPRESS_LIMIT_SCOPE"
# A slot is leased, and the holder renews the lease every 45 s. A run that is killed cannot release its
# slot, so the server takes it back once the lease runs out: the shortest lease it accepts (60 s, plus
# up to 15 s until its repossessor looks) instead of Prefect's default 5 minutes of a blocked machine.
LEASE_SECONDS = 60


def limit_name(kind: str) -> str:
    """The server-side name of a limit kind on this machine (scoped by ``MTPRESS_LIMIT_SCOPE`` when set)."""
    if kind not in LIMITS:
        raise ValueError(f"unknown concurrency limit {kind!r}; known: {', '.join(LIMITS)}")
    scope = os.environ.get(SCOPE_ENV, "").strip() or (socket.gethostname() if _in_dask_worker() else "")
    return f"{kind}-{scope}" if scope else kind


def _in_dask_worker() -> bool:
    if "distributed" not in sys.modules:  # never imported: not a worker (and no import cost for the rest)
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def ensure_limits() -> list[str]:
    """Create this machine's limits on the Prefect server where missing; return the names created.

    An existing limit is left as it is, so an operator may give a big host two quantize slots.
    """
    return [limit_name(kind) for kind, slots in LIMITS.items() if _create_if_missing(limit_name(kind), slots)]


@contextmanager
def occupy(kind: str) -> Iterator[None]:
    """Hold one slot of the limit ``kind`` (e.g. "quantize-cpu") for the block; wait while it is full."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    from mtpress.toolchain.prefect_server import is_temporary

    name = limit_name(kind)
    if not PREFECT_API_URL.value() or is_temporary(PREFECT_API_URL.value()):
        with _machine_lock(name):
            yield
        return
    _ensure_once(PREFECT_API_URL.value(), name, LIMITS[kind])
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
        yield


@contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    from mtpress.fsutil import cache_root

    path = cache_root() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@cache
def _ensure_once(api_url: str | None, name: str, slots: int) -> None:
    """Once per process and server (``api_url`` keys the cache); a limit deleted later fails ``strict``ly."""
    _create_if_missing(name, slots)


def _create_if_missing(name: str, slots: int) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:  # another process created it between our read and our create
            return False
    return True
