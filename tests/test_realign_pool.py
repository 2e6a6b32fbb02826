"""The head re-alignment on a GPU work pool, for real: prefect.yaml's `realign` deployment in a process work pool,
a worker in another process with a work folder and Hub cache of its own, the local Hub as the only thing the two
sides share, and a release side that only calls `choose_head`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtpress.errors import ConfigError, RemoteRunError, TrunkMismatchError
from mtpress.schema import load_release_config
from tests.conftest import TEST_TOKEN
from tests.test_realign import QUICK

REPO_ROOT = Path(__file__).parents[1]
POOL = "mtpress-gpu"
BASE, FINETUNE = "mtpress-demo/Tiny-Qwen3.5-Demo-Base", "mtpress-demo/Tiny-Qwen3.5-Demo-FT"
TARGET = "mtpress-demo/Pool-Test-MTP-GGUF"


@pytest.mark.slow
def test_realign_runs_in_the_gpu_pool_and_comes_back_through_the_hub(local_hub, prefect_harness, demo_pair,
                                                                      toolchain, tmp_path):
    from huggingface_hub import CommitOperationAdd
    from prefect import flow
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    from flows.realign import RESULT_FILE, choose_head
    from mtpress.archs import get_arch
    from mtpress.cache import StageCache
    from mtpress.fsutil import sha256_file
    from mtpress.hub.client import hub_api
    from mtpress.schema import ReleaseConfig
    from mtpress.stages.download import fetch
    from mtpress.stages.inject import HEAD_SHARD, inject

    arch = get_arch("qwen35")
    api = hub_api()
    for repo, folder in ((BASE, demo_pair[0]), (FINETUNE, demo_pair[1])):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="upload")
    # The worker holds the token only in a Secret block.
    Secret(value=TEST_TOKEN).save("hf-token", overwrite=True)

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except ObjectAlreadyExists:
            pass
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    deployed = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--name", "realign"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    gpu_host = tmp_path / "gpu-host"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("realign/realign")
        assert deployment.work_pool_name == POOL and deployment.parameters["token_secret"] == "hf-token"
        # The other host's own disk (the flow's default is releases/.realign-<name> in its checkout).
        client.update_deployment(deployment.id, DeploymentUpdate(
            parameters={**deployment.parameters, "work_dir": str(gpu_host / "work")}))

    def runs():
        only_realign = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(deployment_filter=only_realign)

    release_dir, work = tmp_path / "release", tmp_path / ".work-Pool-Test"
    # Two of the shipped bench prompts: enough for llama.cpp to count drafts of both heads, cheap on two cores.
    bench_prompts = tmp_path / "bench.jsonl"
    shipped = (REPO_ROOT / "src" / "mtpress" / "data" / "bench_prompts.jsonl").read_text().splitlines()
    bench_prompts.write_text("\n".join(shipped[:2]) + "\n")

    @flow
    def release_side(deployment: str | None = "realign/realign", seed: int = QUICK.seed):
        cfg = ReleaseConfig.model_validate({
            "name": "Pool-Test", "finetune": {"repo": FINETUNE}, "donor": {"repo": BASE}, "target": {"repo": TARGET},
            "layouts": ["sidecar"], "quants": [], "quality": {"enabled": False},
            "bench": {"prompts": str(bench_prompts), "n_predict": 8, "repetitions": 1, "warmup": 0,
                      "draft_lengths": [1]},
            "head": {**QUICK.model_dump(), "timeout_s": 600, "deployment": deployment, "seed": seed}})
        finetune = fetch(cfg.finetune, work / "hub-cache")
        injected = inject(finetune, fetch(cfg.donor, work / "hub-cache"), arch, work / "injected")
        return injected, *choose_head(cfg, injected, arch, toolchain, StageCache(release_dir), release_dir, work)

    worker_env = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    worker_env |= {"HF_HOME": str(gpu_host / "hf_home"), "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                                  cwd=tmp_path, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _, _, choice = release_side()
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    worker_log = (tmp_path / "worker.log").read_text()

    [run] = runs()
    assert run.state.is_completed() and run.work_pool_name == POOL, (run.state, worker_log[-3000:])
    # The process worker records "<host>:<pid>" of the process it started for the run.
    assert int(str(run.infrastructure_pid).rsplit(":", 1)[-1]) != os.getpid()
    remote = choice.remote
    assert remote.deployment == "realign/realign" and remote.flow_run_id == str(run.id)
    assert remote.pid != os.getpid() and remote.exchange_repo == f"{TARGET}-realign"
    # The other side fetched its own inputs from the Hub; nothing of this side's work folder was read there.
    assert (gpu_host / "work" / "injected").is_dir() and (gpu_host / "work" / "realigned" / HEAD_SHARD).is_file()

    commits = [c for c in api.list_repo_commits(remote.exchange_repo) if c.title.startswith("mtpress:")]
    assert len(commits) == 1, commits
    assert sorted(f for f in api.list_repo_files(remote.exchange_repo) if f.startswith("heads/")) == \
        [f"{remote.folder}/{HEAD_SHARD}", f"{remote.folder}/{RESULT_FILE}"]
    assert api.model_info(remote.exchange_repo).private

    assert choice.training.head_sha256 == sha256_file(work / "realigned" / HEAD_SHARD)
    assert choice.realigned.head_sha256 != choice.copied.head_sha256  # llama.cpp measured the head that came back

    # Another release run (its re-aligned checkpoint gone) takes the head from the exchange repo: no new flow run.
    shutil.rmtree(work / "realigned")
    _, _, again = release_side()
    assert len(runs()) == 1 and again.training.head_sha256 == choice.training.head_sha256
    assert again.remote == remote

    # A result.json that names another trunk is refused before anything is built from it.
    result = json.loads((work / "realign-exchange" / remote.folder / RESULT_FILE).read_text())
    result["trunk_digest"] = "0" * 64
    api.create_commit(remote.exchange_repo, [CommitOperationAdd(f"{remote.folder}/{RESULT_FILE}",
                                                                json.dumps(result).encode())],
                      commit_message="another trunk's result")
    shutil.rmtree(work / "realigned")
    with pytest.raises(TrunkMismatchError, match="trained on another trunk"):
        release_side()
    assert not (work / "realigned").exists() and len(runs()) == 1

    # The same release without a deployment collects and trains in this process (realign.realign): the pool's head
    # is byte for byte the one an in-process run trains from the same inputs and seed.
    _, _, here = release_side(None)
    assert here.remote is None and len(runs()) == 1
    assert here.training.head_sha256 == choice.training.head_sha256
    assert here.training.loss_curve == choice.training.loss_curve and here.training.steps == choice.training.steps
    assert here.data.trunk_digest == choice.data.trunk_digest and here.data.tokens == choice.data.tokens

    # Another seed is another head, not in the exchange repo; a deployment that does not exist says so.
    with pytest.raises(RemoteRunError, match="there is no Prefect deployment 'realign/nowhere'"):
        release_side("realign/nowhere", seed=QUICK.seed + 1)


def test_a_second_realign_run_on_one_host_is_refused_and_a_killed_ones_leftovers_go(local_hub, prefect_harness,
                                                                                      tmp_path):
    """The pool may hand a retry of the caller's request to the host still running the first: it must not write the
    same work folder. Once the first is gone, what it left (a trainer's partial checkpoint) is removed."""
    from flows.realign import realign_head
    from mtpress.errors import ModelError, ReleaseBusyError
    from tests.test_processes import HOLDER

    work = tmp_path / "gpu-host" / "work"
    leftover = work / "realigned" / ".head.trainer-1.partial"
    leftover.mkdir(parents=True)
    request = dict(release="X", arch="qwen35", finetune={"path": str(tmp_path / "not-fetched")}, donor=None,
                   head={}, trunk_digest="0" * 64, exchange_repo="mtpress-demo/X-realign", folder="heads/x",
                   work_dir=str(work))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(work)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ReleaseBusyError, match=f"{work} is in use by another mtpress run"):
            realign_head(**request)
        assert leftover.exists(), "the running one's partial files are left alone"
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ModelError, match="not-fetched"):  # past the folder, to the fine-tune
        realign_head(**request)
    assert not leftover.exists()


def test_a_head_trained_elsewhere_needs_hub_inputs_and_its_own_exchange_repo(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("name: X\nfinetune: {path: ./ft}\ndonor: {repo: a/base}\ntarget: {repo: a/X-GGUF}\n"
                      "head: {source: best, deployment: realign/realign}\n")
    with pytest.raises(ConfigError, match="head.deployment trains on another machine, which cannot read the local "
                                          "finetune"):
        load_release_config(config)
    config.write_text("name: X\nfinetune: {repo: a/ft}\ndonor: {repo: a/base}\n"
                      "target: {repo: a/X-GGUF, realign_repo: a/X-GGUF-staging}\n")
    with pytest.raises(ConfigError, match="target: realign_repo must differ from repo and staging_repo"):
        load_release_config(config)
    config.write_text("name: X\nfinetune: {repo: a/ft}\ndonor: {repo: a/base}\ntarget: {repo: a/X-GGUF}\n"
                      "head: {source: best, deployment: realign/realign}\n")
    assert load_release_config(config).target.realign.repo == "a/X-GGUF-realign"


def test_the_card_says_where_a_head_trained_elsewhere_was_trained():
    from tests.test_card import card_of

    manifest = json.loads((Path(__file__).parent / "data" / "manifest-sample.json").read_text())
    measured = {"drafted": 100, "accepted": 80, "acceptance": 0.8, "per_repetition": [0.8, 0.8, 0.8]}
    manifest["head_choice"] = {
        "source": "best", "published": "re-aligned", "beyond_spread": True, "copied": measured, "realigned": measured,
        "data": {"tokens": 4208, "sequences": 48, "generated_tokens": 3072, "prompt_set": "mtpress/prompts.jsonl"},
        "training": {"steps": 200, "seed": 0, "wall_seconds": 31.5, "acceptance_before": 0.76, "acceptance_after": 0.94,
                     "hardware": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "cpu": "Xeon"}},
        "remote": {"deployment": "realign/realign", "flow_run_id": "0b6f1c9e-run", "hostname": "gpu-7", "pid": 4242,
                   "exchange_repo": "you/X-realign", "folder": "heads/0123456789abcdef0123"}}
    files = card_of(manifest).files
    for text in files.values():
        assert "NVIDIA H100 80GB HBM3" in text and "`0b6f1c9e-run`" in text and "`realign/realign`" in text
    manifest["head_choice"]["remote"] = None
    assert not any("realign/realign" in text for text in card_of(manifest).files.values())
