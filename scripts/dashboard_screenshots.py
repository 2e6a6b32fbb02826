"""Screenshots of the Prefect dashboard showing what mtpress's flows put there, taken with headless Chromium.

    .venv/bin/python scripts/dashboard_screenshots.py --quick    # a few minutes, no llama.cpp needed
    .venv/bin/python scripts/dashboard_screenshots.py            # the real demo release (needs the toolchain)
    .venv/bin/python scripts/dashboard_screenshots.py --quick --out docs/screenshots

What it does:
1. starts its own `prefect server start` on a free port, with PREFECT_HOME in a temporary directory (your
   Prefect profile and database are never touched) and PREFECT_API_URL in the server's environment (without
   it the UI calls port 4200 and shows "Can't connect to Server API");
2. starts a local Hub endpoint seeded with a few tiny fake fine-tunes of Qwen/Qwen3.5-9B (one eligible, the
   others rejected for a reason each), registers the publish flow as a deployment and runs the watch flow:
   its decision table, and one launched publish run (left scheduled: no worker runs it);
3. full mode: runs the real publish flow on the demo (`mtpress demo`: generate, inject, convert, quantize,
   smoke, card, publish to the local Hub), which creates the progress, files and smoke tables, card and link;
   --quick instead runs a small flow that creates the same kinds of artifacts from the sample manifest
   tests/data/manifest-sample.json (marked as a preview);
4. screenshots every flow run that ran: its page, its Artifacts tab and each artifact's own page, into --out.

Needs Chromium at /usr/bin/chromium (Debian: `apt-get install -y chromium`) or given with --chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MANIFEST = REPO_ROOT / "tests" / "data" / "manifest-sample.json"
DEMO_TOKEN = "hf_mtpressDashboardTokenForTheLocalHub0"  # llama.cpp forwards only tokens shaped like real ones
BASE = "Qwen/Qwen3.5-9B"
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
         "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run",
                  "--virtual-time-budget=15000"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="an artifacts preview from the sample manifest instead of the real demo release")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "releases" / "dashboard",
                        help="folder for the PNGs (default: releases/dashboard)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium executable")
    args = parser.parse_args(argv)
    if shutil.which(args.chromium) is None:
        parser.error(f"{args.chromium} not found: install Chromium (Debian: apt-get install -y chromium)")
    if not args.quick:
        _require_toolchain()
    args.out.mkdir(parents=True, exist_ok=True)

    failure = None
    with tempfile.TemporaryDirectory(prefix="mtpress-dashboard-") as scratch:
        work = Path(scratch)
        with prefect_server(work) as ui:
            os.environ["HF_HUB_DISABLE_XET"] = "1"  # the local Hub speaks LFS; read when huggingface_hub loads
            run_watch(work)
            if args.quick:
                artifacts_preview(json.loads(SAMPLE_MANIFEST.read_text(encoding="utf-8")))
            else:
                from mtpress.demo.run import run_demo

                try:
                    run_demo(work / "demo-release", hub_root=work / "demo-hub",
                             config=REPO_ROOT / "model_configs" / "demo.yaml")
                except Exception as e:  # a failed run's page is worth a screenshot too
                    failure = f"the demo release failed: {type(e).__name__}: {e}"
            shots = screenshot_runs(args.chromium, ui, args.out, work / "chromium")
    print(f"\n{len(shots)} screenshots in {args.out}:")
    for shot in shots:
        print(f"  {shot.name}")
    if failure:
        print(f"\n{failure}", file=sys.stderr)
        return 1
    return 0


def _require_toolchain() -> None:
    from mtpress.errors import ToolchainError
    from mtpress.toolchain import resolve_toolchain

    try:
        resolve_toolchain(build=False)
    except ToolchainError as e:
        sys.exit(f"the full mode runs the real demo release and needs llama.cpp: {e}\n"
                 "  → build it with `make toolchain`, or pass --quick")


# ---------------------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def prefect_server(work: Path) -> Iterator[str]:
    """A private `prefect server start`; this process's flows report to it. Yields the UI's base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    settings = {"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": f"{url}/api", **QUIET}
    log_path = work / "server.log"
    print(f"starting prefect server at {url} (log: {log_path})")
    with log_path.open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env={**os.environ, **settings}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"{url}/api/health", server, log_path)
        os.environ.update(settings)  # before this process first imports prefect
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and whatever it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_healthy(health_url: str, server: subprocess.Popen, log_path: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"prefect server exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(health_url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    sys.exit(f"prefect server did not answer {health_url} within {timeout_s:.0f} s; see {log_path}")


# ---------------------------------------------------------------------------------------------------------
# the flows
# ---------------------------------------------------------------------------------------------------------


def run_watch(work: Path) -> None:
    """The watch flow against a local Hub with one eligible fine-tune and one of each common rejection."""
    from flows.publish import publish
    from flows.watch import watch
    from mtpress.hub.server import LocalHub

    publish.to_deployment(name="publish").apply()
    policy = work / "watch.yaml"
    policy.write_text(json.dumps({"bases": [{"repo": BASE}], "licenses": ["apache-2.0", "mit"],
                                  "target_namespace": "mtpress-bot"}), encoding="utf-8")
    with LocalHub(work / "watch-hub", tokens={DEMO_TOKEN}) as hub:
        os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN=DEMO_TOKEN)
        _seed(BASE, base_model=None, head=True)
        _seed("alice/Qwen3.5-9B-Coder")
        _seed("bob/Qwen3.5-9B-Kept-Its-Head", head=True)
        _seed("carol/Llama-Distilled-From-Qwen", architectures=["LlamaForCausalLM"])
        _seed("dave/Qwen3.5-9B-NonCommercial", license="cc-by-nc-4.0")
        _seed("mtpress-bot/Older-Release-MTP-GGUF", tags=["mtp", "gguf"])
        watch(str(policy), str(work / "watch-state"), launcher="deployment")


def _seed(repo: str, *, base_model: str | None = BASE, license: str = "apache-2.0",
          architectures: list[str] | None = None, head: bool = False, tags: list[str] | None = None) -> None:
    """A tiny fake checkpoint: the watch reads only its card, config.json and safetensors header."""
    import numpy as np
    import yaml
    from huggingface_hub import CommitOperationAdd
    from safetensors.numpy import save

    from mtpress.hub.client import hub_api

    tensors = {"model.embed_tokens.weight": np.zeros((4, 4), dtype=np.float32)}
    if head:
        tensors["mtp.fc.weight"] = np.zeros((4, 8), dtype=np.float32)
    card = {"license": license, "base_model": base_model, "tags": tags}
    card = {key: value for key, value in card.items() if value}
    files = {"model.safetensors": save(tensors),
             "config.json": json.dumps({"architectures": architectures or ["Qwen3_5ForCausalLM"]}).encode(),
             "README.md": f"---\n{yaml.safe_dump(card)}---\n# {repo}\n".encode()}
    api = hub_api()
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd(p, data) for p, data in files.items()], commit_message="seed")


def artifacts_preview(manifest: dict) -> None:
    """The artifacts the publish flow creates, filled from a sample manifest (no toolchain needed)."""
    from prefect import flow
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_progress_artifact,
        create_table_artifact,
        update_progress_artifact,
    )

    from mtpress.manifest import Manifest
    from mtpress.stages.card import render_card

    @flow(name="publish-artifacts-preview", log_prints=True)
    def preview() -> None:
        key = re.sub(r"[^a-z0-9]", "-", manifest["release"].lower()) + "-preview"
        progress = create_progress_artifact(0.0, key=f"{key}-progress", description="release build progress")
        for done, record in enumerate(manifest["files"], start=1):
            print(f"[{done}/{len(manifest['files'])}] {record['path']}")
            update_progress_artifact(progress, 100.0 * done / len(manifest["files"]))
        create_table_artifact(key=f"{key}-files", description="release files (preview: sample manifest)",
                              table=[{"file": f["path"], "role": f["role"], "quant": f["quant"],
                                      "MiB": round(f["size"] / 2**20, 1), "sha256": f["sha256"][:16]}
                                     for f in manifest["files"]])
        create_table_artifact(key=f"{key}-smoke", description="smoke: greedy output with and without draft-mtp "
                                                               "(preview: sample manifest)",
                              table=[{"file": s["model"], "layout": s["layout"], "identical": s["tokens_identical"],
                                      "drafted": s["drafted"], "accepted": s["accepted"],
                                      "acceptance": round(s["acceptance"] or 0, 3)} for s in manifest["smoke"]])
        create_markdown_artifact(render_card(Manifest.model_validate(manifest)).files["README.md"], key=f"{key}-card",
                                 description="model card preview (sample manifest)")
        target = manifest["config"]["target"]["repo"]
        create_link_artifact(f"{os.environ['HF_ENDPOINT']}/{target}", link_text=target, key=f"{key}-repo",
                             description="published repository (preview: not published)")

    preview()


# ---------------------------------------------------------------------------------------------------------
# the screenshots
# ---------------------------------------------------------------------------------------------------------


def screenshot_runs(chromium: str, ui: str, out: Path, profile: Path) -> list[Path]:
    """Each flow run that ran: its page, its Artifacts tab and every artifact's page."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    shots = []
    with get_client(sync_client=True) as client:
        runs = [run for run in client.read_flow_runs() if run.start_time is not None]
        for run in sorted(runs, key=lambda r: r.start_time):
            flow_name = client.read_flow(run.flow_id).name
            stem = f"{flow_name}-{run.name}"
            page = f"{ui}/v2/runs/flow-run/{run.id}"
            shots.append(_screenshot(chromium, page, out / f"{stem}-run.png", profile))
            shots.append(_screenshot(chromium, f"{page}?tab=Artifacts", out / f"{stem}-artifacts.png", profile))
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
            for artifact in artifacts:
                name = artifact.key or f"{artifact.type}-{str(artifact.id)[:8]}"
                shots.append(_screenshot(chromium, f"{ui}/v2/artifacts/artifact/{artifact.id}",
                                         out / f"{stem}-artifact-{name}.png", profile, size=(2000, 1600)))
    return shots


def _screenshot(chromium: str, url: str, path: Path, profile: Path, size: tuple[int, int] = (1400, 1000)) -> Path:
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=180)
    print(f"screenshot {path.name} ← {url}")
    return path


if __name__ == "__main__":
    sys.exit(main())
