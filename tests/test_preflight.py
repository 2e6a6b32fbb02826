"""Preflight: the run's disk and memory from Hub metadata alone, refused before any download when they do not fit."""

import json
import shutil
import struct
from pathlib import Path

import pytest

from mtpress.archs import get_arch
from mtpress.errors import InsufficientDiskError, InsufficientMemoryError
from mtpress.hub.client import hub_api
from mtpress.schema import ReleaseConfig
from mtpress.stages.preflight import check_disk_space, check_plan, plan_run, planned_output_bytes
from mtpress.stages.quality import base_logits_bytes
from tests.fixtures import SMALL, make_checkpoint
from tests.test_cli import mtpress

ARCH = get_arch("qwen35")


def config(**overrides) -> ReleaseConfig:
    return ReleaseConfig(name="x", target={"repo": "c/d"}, **{"finetune": {"repo": "a/b"}, **overrides})


@pytest.fixture
def remote_demo_pair(local_hub, demo_pair):
    """The demo base (with head) and fine-tune (without) published on the local Hub."""
    api = hub_api()
    for folder, repo in zip(demo_pair, ("org/base", "org/ft")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="upload")
    local_hub.bytes_served.clear()
    return demo_pair


def test_preflight_reads_headers_only_and_adds_up_the_whole_run(remote_demo_pair, local_hub, tmp_path):
    cfg = config(finetune={"repo": "org/ft"}, donor={"repo": "org/base"}, quants=["Q8_0", "Q4_K_M"])
    plan = plan_run(cfg, ARCH)
    weights = {f"org/{repo}/{f.name}": f.stat().st_size for folder, repo in zip(remote_demo_pair, ("base", "ft"))
               for f in folder.glob("*.safetensors")}
    served = {key: n for key, n in local_hub.bytes_served.items() if key.endswith(".safetensors")}
    # One Range request per shard for its header (huggingface_hub asks for bytes 0-100000): no weight bytes move.
    assert served.keys() == weights.keys() and all(n <= 100_001 for n in served.values())
    # The donor gives its head alone: of its shards only those holding a head tensor are downloaded.
    index = json.loads((remote_demo_pair[0] / "model.safetensors.index.json").read_text())["weight_map"]
    head_shards = {shard for name, shard in index.items() if ARCH.is_head_tensor(name)}
    downloaded = sum(n for key, n in weights.items() if key.startswith("org/ft/") or key.rsplit("/")[-1] in head_shards)
    assert downloaded < sum(weights.values())
    assert abs(plan.download - downloaded) < 0.01 * downloaded
    assert 0 < plan.injected < 0.02 * plan.download  # the head shard; trunk shards are hard-linked
    assert set(plan.ggufs) == {(layout, q) for layout in cfg.layouts for q in ("BF16", "Q8_0", "Q4_K_M")}
    assert plan.gate == plan.ggufs[("sidecar", "Q4_K_M")]  # recommended and smallest: the same root quant
    assert plan_run(cfg, ARCH, gate=False).gate == 0  # a run that does not publish stages nothing to verify
    # Quality keeps BF16's log-probabilities (uint16 over the 248320-token vocabulary) until the last quant.
    assert plan.quality == base_logits_bytes(cfg.quality, 248_320) > 0.45e9
    assert plan_run(cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"enabled": False})}),
                    ARCH).quality == 0
    assert plan.disk == plan.download + plan.injected + sum(plan.ggufs.values()) + plan.gate + plan.quality
    # Measured on the demo release's sidecar files (2026-12-04): BF16 549.7 MB, Q8_0 302.3 MB, Q4_K_M 204.1 MB.
    for quant, real in (("BF16", 549_689_152), ("Q8_0", 302_320_192), ("Q4_K_M", 204_112_960)):
        assert abs(plan.ggufs[("sidecar", quant)] / real - 1) < 0.02, quant


@pytest.mark.slow
def test_the_gguf_estimate_is_within_a_few_percent_of_the_real_files(demo_ggufs, demo_pair):
    bf16, q4 = demo_ggufs  # the demo base, embedded, converted and quantized by the pinned toolchain
    plan = plan_run(config(finetune={"path": str(demo_pair[0])}, layouts=["embedded"], quants=["Q4_K_M"]), ARCH)
    assert abs(plan.ggufs[("embedded", "BF16")] / bf16.size - 1) < 0.02
    assert abs(plan.ggufs[("embedded", "Q4_K_M")] / q4.size - 1) < 0.02
    assert plan.download == 0  # a local checkpoint is used in place


def local_demo_plan(demo_pair):
    return plan_run(config(finetune={"path": str(demo_pair[1])}, donor={"path": str(demo_pair[0])}), ARCH)


def test_refuses_a_disk_too_small_for_the_run_naming_both_numbers(demo_pair, tmp_path):
    plan = local_demo_plan(demo_pair)
    with pytest.raises(InsufficientDiskError) as err:
        check_plan(plan, tmp_path / "release", free=plan.disk, memory=plan.memory)  # no room for the margin
    message = str(err.value)
    assert f"{plan.disk / 2**30:.2f} GiB free" in message and f"needs about {plan.disk * 1.1 / 2**30:.2f}" in message
    assert "GGUFs" in message and "trim `quants:`" in message
    check_plan(plan, tmp_path / "release", free=int(plan.disk * 1.2), memory=plan.memory)
    # A rerun's earlier outputs are reused or overwritten: what they hold counts as free.
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "x-BF16.gguf").write_bytes(b"\0" * 2**20)
    check_plan(plan, tmp_path / "release", held=[tmp_path / "release"], free=int(plan.disk * 1.1) - 2**20 + 1,
               memory=plan.memory)


def test_refuses_too_little_memory_naming_the_largest_tensor(demo_pair, tmp_path):
    plan = local_demo_plan(demo_pair)
    vocab_matrix = 248320 * 256  # the demo's embedding: llama-quantize holds it in float32
    assert plan.quantize_memory > 4 * vocab_matrix and plan.memory == max(plan.convert_memory, plan.quantize_memory)
    with pytest.raises(InsufficientMemoryError) as err:
        check_plan(plan, tmp_path, free=2**50, memory=plan.memory - 1)
    assert f"needs about {plan.memory / 2**30:.2f} GiB" in str(err.value) and "float32" in str(err.value)


def test_the_post_download_estimate_counts_each_layouts_files(tmp_path):
    model = make_checkpoint(tmp_path / "m", with_head=True, seed=0)
    embedded = planned_output_bytes(model, ARCH, config(layouts=["embedded"], quants=["Q8_0"]))
    both = planned_output_bytes(model, ARCH, config(layouts=["sidecar", "embedded"], quants=["Q8_0"]))
    sidecar = both - embedded
    assert sidecar > embedded  # the head file repeats the vocabulary matrices
    assert planned_output_bytes(model, ARCH, config(layouts=["embedded"], quants=["Q8_0", "Q4_K_M"])) > embedded


def test_refuses_when_the_disk_is_too_small(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(InsufficientDiskError) as err:
        check_disk_space(tmp_path / "release", required=free)
    assert "GiB free" in str(err.value) and "trim `quants:`" in str(err.value)
    check_disk_space(tmp_path / "release", required=1024)


def publish_huge(tmp_path) -> Path:
    """A fine-tune whose header declares a 2 TiB tensor (its body is 2 bytes) on the local Hub, and its config."""
    repo = tmp_path / "huge"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({**SMALL, "dtype": "bfloat16"}))
    header = json.dumps({"model.layers.0.mlp.down_proj.weight": {
        "dtype": "BF16", "shape": [2**20, 2**20], "data_offsets": [0, 2]}}).encode()
    (repo / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    api = hub_api()
    api.create_repo("org/huge")
    api.upload_folder(repo_id="org/huge", folder_path=repo, commit_message="upload")
    config = tmp_path / "huge.yaml"
    config.write_text("name: Huge\nfinetune: {repo: org/huge}\ntarget: {repo: org/huge-gguf}\n")
    return config


def test_the_flow_refuses_a_run_too_big_for_the_disk_before_downloading_anything(local_hub, prefect_harness,
                                                                                  tmp_path):
    from flows.publish import publish

    config = publish_huge(tmp_path)
    local_hub.bytes_served.clear()
    with pytest.raises(InsufficientDiskError) as err:
        publish(str(config), str(tmp_path / "release"), push=False)
    assert "GiB free, the run needs about" in str(err.value)
    assert local_hub.bytes_served.get("org/huge/model.safetensors", 0) <= 100_001  # the header only
    assert not (tmp_path / ".work-Huge" / "hub-cache").exists()


def test_check_config_preflight_prints_the_plan_or_refuses_once(remote_demo_pair, tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: Ok\nfinetune: {repo: org/ft}\ndonor: {repo: org/base}\ntarget: {repo: org/ok-gguf}\n")
    out = mtpress("check-config", str(ok), "--preflight", "--output", str(tmp_path / "release"))
    assert out.returncode == 0 and "GiB of disk (download 0.37 GiB" in out.stdout, out.stderr
    out = mtpress("check-config", str(publish_huge(tmp_path)), "--preflight", "--output", str(tmp_path / "release"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("GiB free, the run needs about") == 1 and "trim `quants:`" in out.stderr


def test_a_bounded_disk_run_plans_one_layouts_bf16_and_one_quant_at_a_time(demo_pair, tmp_path):
    """The plan a disk-limited machine gets: it fits where the whole release does not, and the refusal says so."""
    quants = {"finetune": {"path": str(demo_pair[1])}, "donor": {"path": str(demo_pair[0])},
              "quants": ["Q8_0", "Q6_K", "Q4_K_M"]}
    whole, bounded = plan_run(config(**quants), ARCH), plan_run(config(**quants, bounded_disk=True), ARCH)
    assert bounded.ggufs == whole.ggufs and sum(whole.ggufs.values()) == whole.gguf_peak
    # The sidecar layout's BF16 files (its head repeats the vocabulary matrices) and its Q8_0: the largest pair.
    assert bounded.gguf_peak == whole.ggufs["sidecar", "BF16"] + whole.ggufs["sidecar", "Q8_0"]
    assert bounded.disk == whole.disk - sum(whole.ggufs.values()) + bounded.gguf_peak < 0.6 * whole.disk
    assert "at most" in bounded.breakdown() and "one layout's BF16 and one quant" in bounded.breakdown()
    free = int(bounded.disk * 1.2)
    with pytest.raises(InsufficientDiskError, match="bounded_disk: true"):
        check_plan(whole, tmp_path / "release", free=free, memory=whole.memory)
    check_plan(bounded, tmp_path / "release", free=free, memory=bounded.memory)
    # The same rule after download, with what the cache already holds left out.
    model = make_checkpoint(tmp_path / "m", with_head=True, seed=0)
    one_at_a_time = config(layouts=["embedded"], quants=["Q8_0", "Q4_K_M"], bounded_disk=True)
    assert planned_output_bytes(model, ARCH, one_at_a_time) == planned_output_bytes(
        model, ARCH, config(layouts=["embedded"], quants=["Q8_0"]))
    assert planned_output_bytes(model, ARCH, one_at_a_time, reused=[("embedded", "BF16")]) == planned_output_bytes(
        model, ARCH, config(layouts=["embedded"], quants=["Q8_0"]), reused=[("embedded", "BF16")])


def test_bounded_disk_needs_the_staging_repo_it_commits_to(local_hub, prefect_harness, tmp_path):
    """Refused before anything is downloaded: without the gate, or in a run that publishes nothing, the files
    deleted here would be lost."""
    from flows.publish import publish
    from mtpress.errors import ConfigError

    with pytest.raises(ValueError, match="bounded_disk commits each finished file to the staging repo"):
        config(bounded_disk=True, gate={"enabled": False})
    path = publish_huge(tmp_path)
    local_hub.bytes_served.clear()
    for run in ({"push": False}, {"push": True, "dry_run": True}):
        with pytest.raises(ConfigError, match="bounded_disk .* needs a run that publishes, with the gate"):
            publish(str(path), str(tmp_path / "release"), bounded_disk=True, **run)
    assert not local_hub.bytes_served and not (tmp_path / ".work-Huge").exists()
