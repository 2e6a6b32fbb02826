"""Wall time of the trimmed demo matrix on a local Dask cluster of 1 and 2 worker processes (one thread each).

    .venv/bin/python scripts/bench_workers.py [--workers 1 2]

The trimmed demo release: one layout (sidecar), BF16 + Q8_0 + Q4_K_M, smoke-tested, no bench, quality or MLX
pack, push=False. Each run builds into a fresh release folder (nothing reused from the content cache); the
work folder is shared, so only the first run downloads the demo models from the local Hub (a few seconds).
The time runs from the flow's start to its end, with the cluster already up. Measures what the flow does on
this machine: with as many cores as workers, the figure shows the cluster's overhead and how much of the
matrix overlaps, not what more machines would gain.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parent.parent / "model_configs" / "demo.yaml"


def trimmed_config(path: Path) -> Path:
    """The demo release, trimmed to what the matrix needs: one layout, two quants, no bench, quality or MLX."""
    cfg = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    cfg.update(layouts=["sidecar"], quants=["Q8_0", "Q4_K_M"], bench={"enabled": False},
               quality={"enabled": False})
    cfg.pop("mlx", None)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes to time, in order")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local Hub speaks LFS; read by huggingface_hub at import
    from distributed import LocalCluster

    from flows.runners import DASK_ADDRESS_ENV, publish_flow
    from mtpress.demo.run import seed_upstream_repos
    from mtpress.hub.server import LocalHub, new_token
    from mtpress.toolchain.prefect_server import prefect_api

    seconds: dict[int, float] = {}
    token = new_token()
    with tempfile.TemporaryDirectory(prefix="mtpress-bench-workers-") as tmp, prefect_api(), \
            LocalHub(Path(tmp) / "hub", tokens={token}) as hub:
        root = Path(tmp)
        os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN=token)  # before the workers start: they inherit it
        config = str(trimmed_config(root / "trimmed.yaml"))
        seed_upstream_repos(Path(config))
        for workers in args.workers:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster:
                os.environ[DASK_ADDRESS_ENV] = cluster.scheduler_address
                start = time.monotonic()
                publish_flow(config)(config, str(root / f"workers-{workers}"), push=False)
                seconds[workers] = round(time.monotonic() - start, 1)
            print(f"{workers} worker(s): {seconds[workers]} s", flush=True)
    print(f"cores: {len(os.sched_getaffinity(0))}; " + ", ".join(f"{n} worker(s) {s} s" for n, s in seconds.items()))
    return seconds


if __name__ == "__main__":
    main()
