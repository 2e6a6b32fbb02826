"""The quant matrix on a Dask cluster (flows/runners.py): a local cluster of two worker processes builds the same
release as the flow's own threads — byte for byte, and a manifest and card that differ only in measured figures."""

import hashlib
import importlib.util
import json
import os
import re
import socket
from pathlib import Path

import pytest
from prefect import task
from prefect.cache_policies import NO_CACHE

from mtpress.demo.run import seed_upstream_repos
from tests.conftest import client_on_local_hub

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_workers.py"
TOKEN = "hf_" + "mtpressDaskTestToken0123456789abcdef"
# What a run measures rather than decides: the only values that may differ between the two runs.
MEASURED = {"stage_seconds", "tokens_per_second_plain", "tokens_per_second_mtp", "predicted_per_second"}


def trimmed_config(path: Path) -> Path:
    """The release scripts/bench_workers.py times."""
    spec = importlib.util.spec_from_file_location("bench_workers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.trimmed_config(path)


def files_by_sha256(release: Path) -> dict[str, str]:
    return {str(p.relative_to(release)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(release.rglob("*.gguf"))}


def decided(value):
    """The manifest with every measured figure masked."""
    if isinstance(value, dict):
        return {k: "<measured>" if k in MEASURED else decided(v) for k, v in value.items()}
    return [decided(v) for v in value] if isinstance(value, list) else value


def card_text(release: Path) -> dict[str, str]:
    """Both cards with decimal figures masked (tokens/s, seconds); integers (sizes, counts) and names stay."""
    return {name: re.sub(r"\d+\.\d+", "#", (release / name).read_text(encoding="utf-8"))
            for name in ("README.md", "README_zh.md")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_harness):
    """A local Hub with the demo's upstream repos, and a cluster of two worker processes (one thread each)."""
    from distributed import Client, LocalCluster
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("dask")
    config = trimmed_config(root / "trimmed.yaml")
    mp = pytest.MonkeyPatch()
    # Workers inherit this environment when they are spawned (huggingface_hub reads it at import). Prefect's
    # harness sets its API URL in settings, not here: the flow sends its settings with each task anyway, but a
    # worker's own startup needs the variable.
    with client_on_local_hub(root, TOKEN):
        mp.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
                Client(local) as client:
            yield {"root": root, "config": config, "client": client, "address": local.scheduler_address}
    mp.undo()


@pytest.fixture(scope="module")
def runs(cluster, toolchain, demo_pair, monkeypatch_module):
    """The trimmed demo release built twice: by the flow's threads, then by the cluster."""
    from distributed import get_task_stream

    from flows.runners import DASK_ADDRESS_ENV, publish_flow

    root, config, client = cluster["root"], str(cluster["config"]), cluster["client"]
    seed_upstream_repos(Path(config))
    # Both release folders share one work folder (root/.work-<name>): the second run downloads nothing.
    local = Path(publish_flow(config)(config, str(root / "local"), push=False))
    monkeypatch_module.setenv(DASK_ADDRESS_ENV, cluster["address"])
    with get_task_stream(client) as stream:
        dask = Path(publish_flow(config)(config, str(root / "dask"), push=False))
    workers = client.run(os.getpid)  # worker address → its process id
    return {"local": local, "dask": dask, "stream": stream.data, "workers": workers, "client": client}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@task(task_run_name="echo {n}", cache_policy=NO_CACHE)
def echo(n: int, reused: bool):
    from flows.release import Build

    return Build.report((n, os.getpid()), reused)


def test_progress_and_stage_seconds_are_counted_by_the_flow_whatever_process_ran_the_task(cluster, tmp_path,
                                                                                           caplog):
    from prefect import flow
    from prefect.artifacts import create_progress_artifact
    from prefect_dask import DaskTaskRunner

    from flows.release import Lane, Progress, settle
    from mtpress.cache import StageCache

    @flow(task_runner=DaskTaskRunner(address=cluster["address"]))
    def counted():
        progress = Progress(3, create_progress_artifact(0.0, key="dask-progress"))
        lane = Lane(progress)
        futures = [lane.submit(echo, 1, False), lane.submit(echo, 2, True),
                   progress.track(echo.submit(3, False), "echo 3")]
        results = settle(futures)
        progress.finish()
        return progress.done, results

    done, results = counted()
    assert done == 3 and [n for n, _ in results] == [1, 2, 3]
    assert os.getpid() not in {pid for _, pid in results}  # they ran in the workers
    steps = [m.groups() for r in caplog.records if (m := re.fullmatch(r"\[(\d)/3\] (echo .*)", r.getMessage()))]
    assert [n for n, _ in steps] == ["1", "2", "3"]
    assert sorted(what for _, what in steps) == ["echo 1", "echo 2 (reused)", "echo 3"]

    # A copy of the content cache in a worker counts its seconds where the flow's copy reads them.
    cache = StageCache(tmp_path)
    assert cluster["client"].submit(cache.run, "quantize", "k", os.getpid).result() != os.getpid()
    assert cache.seconds == {"quantize": 0.0} and cache.hits == []


def test_the_cluster_builds_byte_identical_files(runs):
    local, dask = files_by_sha256(runs["local"]), files_by_sha256(runs["dask"])
    assert len(local) == 6  # BF16, Q8_0, Q4_K_M: a trunk and its mtp- head each
    assert dask == local


def test_manifest_and_card_differ_only_in_measured_figures(runs):
    local = json.loads((runs["local"] / "manifest.json").read_text())
    dask = json.loads((runs["dask"] / "manifest.json").read_text())
    assert decided(dask) == decided(local)
    assert card_text(runs["dask"]) == card_text(runs["local"])
    # The comparison is not blind: it sees a changed file or token, and only a measured figure passes.
    tampered = json.loads(json.dumps(local))
    tampered["files"][0]["sha256"] = "0" * 64
    assert decided(tampered) != decided(local)
    tampered = json.loads(json.dumps(local))
    tampered["smoke"][0]["tokens"] = [1, *tampered["smoke"][0]["tokens"][1:]]
    assert decided(tampered) != decided(local)
    tampered = json.loads(json.dumps(local))
    tampered["stage_seconds"]["quantize"] += 1
    tampered["smoke"][0]["tokens_per_second_plain"] += 1
    assert decided(tampered) == decided(local)
    # The stage seconds counted in the workers reached the flow's manifest.
    assert {"convert", "quantize", "smoke"} <= set(dask["stage_seconds"])


def test_the_tasks_ran_in_the_worker_processes(runs):
    """Dask's own record of what ran where, and the quantize slot each worker took for its machine."""
    from prefect.client.orchestration import get_client

    ran = [(task["key"], task["worker"]) for task in runs["stream"]]
    for stage in ("convert", "quantize", "smoke"):
        assert any(stage in str(key) for key, _ in ran), (stage, ran)
    assert {worker for _, worker in ran} <= set(runs["workers"]) and len(runs["workers"]) == 2
    assert os.getpid() not in runs["workers"].values()
    with get_client(sync_client=True) as client:  # `occupy` in a worker scopes the limit by the worker's host
        client.read_global_concurrency_limit_by_name(f"quantize-cpu-{socket.gethostname()}")


def test_a_worker_that_cannot_see_the_release_folder_refuses(cluster, tmp_path):
    from flows.release import visible
    from mtpress.errors import SharedStorageError

    missing = tmp_path / "release" / "X-BF16.gguf"
    future = cluster["client"].submit(visible, missing)
    with pytest.raises(SharedStorageError, match=r"worker .* \(pid \d+\) cannot see .*X-BF16\.gguf") as error:
        future.result()
    assert "shared" in str(error.value) or "Scaling out" in str(error.value)
    assert cluster["client"].submit(visible, cluster["config"]).result() is None
