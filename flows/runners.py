"""Where the publish flow's tasks run: threads of the flow's process, or a Dask cluster (prefect-dask).

With a Dask scheduler address (``MTPRESS_DASK_ADDRESS``, else the config's ``cluster.dask_address``) the flow
runs with Prefect's ``DaskTaskRunner``, which sends every task the flow submits to the cluster: fetch, convert,
quantize, smoke, preupload, bench and quality. That is kept on purpose: they all read and write only the
release folder and its work folder (hub-cache, injected checkpoint), which must be on storage every worker
mounts at the same path anyway (docs/deploy.md, "Scaling out"), and a fetch or convert on a worker spares the
flow's machine their memory. What the flow calls directly (inject, the head choice, manifest, card, gate,
publish) stays in its process.
"""

from __future__ import annotations

import os

from prefect import Flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from mtpress.schema import ReleaseConfig, load_release_config

DASK_ADDRESS_ENV = "MTPRESS_DASK_ADDRESS"


def task_runner(cfg: ReleaseConfig | None = None) -> TaskRunner:
    """A ``DaskTaskRunner`` on the scheduler the environment (first) or ``cfg`` names, else threads."""
    address = os.environ.get(DASK_ADDRESS_ENV, "").strip() or (cfg.cluster.dask_address if cfg else None)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    # Threads wait on files, lanes and the quantize slot rather than work: many may wait, few ever run.
    return ThreadPoolTaskRunner(max_workers=64)


def publish_flow(config: str) -> Flow:
    """The publish flow with the task runner ``config`` (a path, or the config's text) asks for. A deployment
    runs ``flows/publish.py:publish`` itself, which takes its runner from the worker's environment only."""
    from flows.publish import publish

    return publish.with_options(task_runner=task_runner(load_release_config(config)))
