"""End to end: the publish flow on the demo models, through the real llama.cpp, local Hub and Prefect."""

import json
from pathlib import Path

import pytest
from gguf import GGUFReader

from mtpress.demo.run import seed_upstream_repos
from mtpress.fsutil import sha256_file
from mtpress.hub.client import hub_api
from mtpress.naming import file_stem
from mtpress.stages.bench import per_position_acceptance
from mtpress.stages.gguf_files import read_facts
from tests.conftest import client_on_local_hub

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parent.parent / "model_configs" / "demo.yaml"
TOKEN = "hf_" + "mtpressLeakCanary7f3a9c1e5b2d8f4a6c0e"  # recognisable, and shaped like a real token


@pytest.fixture(scope="module")
def release(tmp_path_factory, toolchain, demo_pair, prefect_harness):
    """One full run of the demo release, shared by the assertions below (it takes minutes)."""
    from flows.publish import publish

    root = tmp_path_factory.mktemp("e2e")
    with client_on_local_hub(root, TOKEN) as hub:
        seed_upstream_repos(DEMO)
        release_dir = Path(publish(str(DEMO), str(root / "release")))
        yield {"dir": release_dir, "root": root, "manifest": json.loads((release_dir / "manifest.json").read_text()),
               "hub": hub, "api": hub_api()}


def test_every_layout_has_bf16_and_four_quants(release):
    files = release["manifest"]["files"]
    for layout in ("embedded", "sidecar"):
        models = {f["quant"] for f in files if f["layout"] == layout and f["role"] == "model"}
        assert models == {"BF16", "Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M"}
    heads = {f["quant"] for f in files if f["role"] == "head"}
    assert heads == {"BF16", "Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M"}


def test_the_low_bit_quants_are_made_with_the_published_importance_matrix(release):
    """IQ4_XS was made with the one importance matrix, computed from the root BF16 files with the head; it is
    published, verified by the gate, and the card names it, its calibration text and which files used it."""
    manifest, release_dir = release["manifest"], release["dir"]
    imatrix = manifest["imatrix"]
    assert imatrix["path"] == "imatrix-Tiny-Qwen3.5-Demo-FT.gguf" and (release_dir / imatrix["path"]).is_file()
    assert imatrix["sha256"] == sha256_file(release_dir / imatrix["path"])
    assert imatrix["quants"] == ["IQ4_XS"] and imatrix["head_tensors"] == 8
    assert imatrix["calibration"] == "mtpress/data/imatrix_calibration.txt"
    assert {(f["quant"], f.get("imatrix")) for f in manifest["files"]} == {
        ("BF16", None), ("Q8_0", None), ("Q6_K", None), ("Q4_K_M", None), ("IQ4_XS", imatrix["path"])}
    target = manifest["config"]["target"]["repo"]
    assert imatrix["path"] in release["api"].list_repo_files(target)
    card = (release_dir / "README.md").read_text(encoding="utf-8")
    assert f"`{imatrix['path']}`" in card and "`mtpress/data/imatrix_calibration.txt`" in card
    assert "8 of them the MTP head's" in card and "Made with it: `IQ4_XS`." in card
    zh = (release_dir / "README_zh.md").read_text(encoding="utf-8")
    assert f"`{imatrix['path']}`" in zh and "用它量化的有：`IQ4_XS`。" in zh


def test_files_carry_the_head_as_their_layout_demands(release):
    for record in release["manifest"]["files"]:
        facts = read_facts(release["dir"] / record["path"], head_block=8)
        nextn_tensors = [n for n in facts.head_block_tensors if ".nextn." in n]
        if record["layout"] == "sidecar" and record["role"] == "model":
            assert facts.nextn_layers == 0 and not facts.head_block_tensors
            assert (release["dir"] / record["path"]).with_name("mtp-" + record["name"]).is_file()
        else:
            assert facts.nextn_layers == 1 and len(nextn_tensors) == 4, record["path"]


@pytest.mark.parametrize("path", ["embedded/Tiny-Qwen3.5-Demo-FT-Q4_K_M.gguf",
                                  "Tiny-Qwen3.5-Demo-FT-Q4_K_M.gguf"])
def test_the_gguf_library_agrees_with_our_header_reader(release, path):
    """An independent check with llama.cpp's own gguf-py reader (slow at this vocabulary, so two files)."""
    reader = GGUFReader(release["dir"] / path)
    record = next(f for f in release["manifest"]["files"] if f["path"] == path)
    nextn = reader.get_field("qwen35.nextn_predict_layers")
    assert (nextn.contents() if nextn else 0) == record["nextn_layers"]
    assert len(reader.tensors) == record["tensor_count"]
    assert sum(int(t.n_elements) for t in reader.tensors) == record["parameters"]


def test_head_kept_at_q8_0_in_low_bit_quants(release):
    q4 = [f for f in release["manifest"]["files"] if f["quant"] == "Q4_K_M" and f["nextn_layers"]]
    assert q4 and all("Q8_0" in f["head_tensor_types"] for f in q4)


def test_every_model_file_passed_smoke_with_identical_tokens_and_drafts(release):
    smoke = release["manifest"]["smoke"]
    models = [f for f in release["manifest"]["files"] if f["role"] == "model"]
    assert len(smoke) == len(models) == 10
    for result in smoke:
        assert result["passed"] and result["tokens_identical"] and result["drafted"] > 0, result
        assert 0 < result["accepted"] <= result["drafted"]


def test_the_manifest_reads_typed_and_writes_back_byte_for_byte(release, tmp_path):
    from mtpress.manifest import MANIFEST, read_manifest, write_manifest

    write_manifest(tmp_path, read_manifest(release["dir"]))
    assert (tmp_path / MANIFEST).read_bytes() == (release["dir"] / MANIFEST).read_bytes()


def test_manifest_records_inputs_toolchain_and_head_provenance(release):
    manifest = release["manifest"]
    assert manifest["toolchain"]["llama_cpp"] == "11434"
    assert len(manifest["inputs"]["finetune"]["revision"]) == 40
    head = manifest["inject"]["head"]
    assert manifest["inject"]["action"] == "injected" and len(head["tensors"]) == 15
    assert head["parameters"] == manifest["architecture"]["parameters_head"]
    for record in manifest["files"]:
        assert (release["dir"] / record["path"]).stat().st_size == record["size"]


def test_the_release_is_published_as_one_commit_with_every_file(release):
    api, manifest = release["api"], release["manifest"]
    repo = manifest["config"]["target"]["repo"]
    remote = {s.rfilename: s for s in api.model_info(repo, files_metadata=True).siblings}
    for record in manifest["files"]:
        assert remote[record["path"]].lfs.sha256 == record["sha256"]
    assert {"README.md", "README_zh.md", "manifest.json"} <= set(remote)
    assert len(api.list_repo_commits(repo)) == 2  # the repo's creation + the release


def test_rerunning_the_flow_reuses_every_stage_and_makes_no_commit(release):
    from flows.publish import publish

    api, before = release["api"], (release["dir"] / "manifest.json").read_bytes()
    repo = release["manifest"]["config"]["target"]["repo"]
    commits = api.list_repo_commits(repo)
    # A GGUF an earlier run of another config left (a quant since dropped) would be published untested: removed.
    stale = release["dir"] / "embedded" / "Tiny-Qwen3.5-Demo-FT-Q5_K_M.gguf"
    stale.write_bytes(b"GGUF from an earlier config")
    rerun = publish(str(DEMO), str(release["dir"]), return_state=True)
    assert not stale.exists()
    assert (release["dir"] / "manifest.json").read_bytes() == before
    assert api.list_repo_commits(repo) == commits
    # In the UI, every stage still shows as a task run named for what it works on, Cached and saying why.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = {t.name: t.state for t in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[rerun.state_details.flow_run_id])), limit=200)}
    stages = [f"{kind} {layout}/{quant}" for kind in ("quantize", "smoke") for layout in ("sidecar", "embedded")
              for quant in ("Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M")] + ["convert sidecar", "convert embedded", "imatrix",
                                                                     "quality"]
    for name in stages:
        assert runs[name].name == "Cached" and "same inputs with the same code" in runs[name].message, name
    assert {"fetch fine-tune", "fetch donor", "bench Q4_K_M"} <= set(runs)


def test_republishing_makes_no_commit_and_a_template_change_touches_only_the_card(release, tmp_path):
    import shutil

    from mtpress.schema import Target
    from mtpress.stages.card import write_card
    from mtpress.stages.publish import publish
    from tests.test_card import card_of

    api, manifest = release["api"], release["manifest"]
    target = Target(**manifest["config"]["target"])
    again = publish(release["dir"], target, api, message="again")
    assert not again.committed and not again.plan.changes

    templates = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parent.parent / "templates" / "card", templates)
    english = templates / "README.md.j2"
    english.write_text(english.read_text(encoding="utf-8") + "\nReworded footer.\n", encoding="utf-8")
    write_card(release["dir"], card_of(manifest, templates_dir=templates))
    result = publish(release["dir"], target, api, message="card only")
    assert result.committed
    assert [f.path for f in result.plan.changes] == ["README.md"]
    assert result.bytes_uploaded < 1_000_000


def test_llama_cpp_hf_downloader_fetches_the_published_pair_and_drafts(release, toolchain, tmp_path):
    """`llama-server -hf repo:Q4_K_M --spec-type draft-mtp` against the local endpoint picks the trunk and the
    head named for it, and reproduces the smoke run's greedy tokens."""
    from mtpress.stages.smoke import greedy_request
    from mtpress.toolchain.server import llama_server

    manifest = release["manifest"]
    repo = manifest["config"]["target"]["repo"]
    smoke = next(s for s in manifest["smoke"] if s["layout"] == "sidecar" and s["quant"] == "Q4_K_M")
    env = {"MODEL_ENDPOINT": release["hub"].url + "/", "LLAMA_CACHE": str(tmp_path / "llama-cache")}
    args = ["-hf", f"{repo}:Q4_K_M", "--spec-type", "draft-mtp", "--spec-draft-n-max", "2", "-c", "2048"]
    with llama_server(toolchain, args, timeout=300, env=env) as server:
        body = server.completion(greedy_request(manifest["config"]["smoke"]["prompt"], smoke["n_predict"]),
                                 timeout=300)
    fetched = sorted(p.name for p in (tmp_path / "llama-cache").rglob("*.gguf"))
    stem = file_stem(manifest["release"])
    assert fetched == [f"{stem}-Q4_K_M.gguf", f"mtp-{stem}-Q4_K_M.gguf"]
    assert body["tokens"] == smoke["tokens"]
    assert body["timings"]["draft_n"] > 0


def test_the_token_appears_in_no_output_log_or_stored_file(release):
    """Every file the run wrote (release, hub storage, caches) and every log line Prefect stored."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    needle = TOKEN.encode()
    scanned = 0
    for path in release["root"].rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert not _contains(path, needle), f"token found in {path}"
            scanned += 1
    assert scanned > 20

    async def all_logs():
        logs, page = [], 200  # the API's maximum page size
        async with get_client() as client:
            while batch := await client.read_logs(LogFilter(), limit=page, offset=len(logs)):
                logs += batch
        return logs

    logs = asyncio.run(all_logs())
    assert any("published" in log.message for log in logs), "the flow's own INFO lines were stored and read"
    assert not [log.message for log in logs if TOKEN in log.message]


def _contains(path: Path, needle: bytes, chunk: int = 64 * 2**20) -> bool:
    tail = b""
    with path.open("rb") as f:
        while block := f.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle):]
    return False


def test_bench_and_quality_are_measured_with_spread_and_hardware(release):
    manifest = release["manifest"]
    rows = manifest["bench"]
    assert {(r["quant"], r["config"]) for r in rows} == {
        (q, c) for q in ("BF16", "Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M") for c in ("plain", "mtp-k1", "mtp-k2", "mtp-k3")}
    for detail in manifest["bench_details"]:
        assert detail["repetitions"] == 3 and detail["hardware"]["cores"] and detail["hardware"]["threads"]
        for config in detail["configs"]:
            spread = config["overall"]["generation_per_second"]
            assert spread["n"] >= 3 and spread["min"] <= spread["median"] <= spread["max"]
            if config["draft_n_max"]:
                pooled = config["overall"]["acceptance"]
                assert 0 < pooled <= 1 and config["matches_plain"] is True
                k = config["draft_n_max"]
                alpha = config["overall"]["acceptance_per_position"]
                assert alpha == pytest.approx(per_position_acceptance(pooled, k))
                assert config["overall"]["acceptance_bound"] == pytest.approx(sum(alpha**i for i in range(k + 1)))
    quality = {r["quant"]: r for r in manifest["quality"]}
    assert set(quality) == {"BF16", "Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M"}
    card = (release["dir"] / "README.md").read_text(encoding="utf-8")
    assert "mtp-k2" in card and "Speed benchmark:** not measured" not in card


def test_the_release_was_staged_and_verified_with_the_real_clients_before_promotion(release):
    """Stage → verify → promote: the recommended and the smallest root trunk (both Q4_K_M here) were loaded by
    llama.cpp's -hf with their own head from the private staging repo's commit, every file's sha256 was checked
    against the Hub's metadata, and the target holds the same GGUF bytes."""
    api, manifest = release["api"], release["manifest"]
    target = manifest["config"]["target"]["repo"]
    gate = manifest["gate_details"]
    assert gate["repo"] == f"{target}-staging" and api.model_info(gate["repo"]).private
    assert [c.commit_id for c in api.list_repo_commits(gate["repo"])][0] == gate["commit"]
    roots = {f["quant"]: f["path"] for f in manifest["files"] if "/" not in f["path"] and f["role"] == "model"}
    loaded = {r["tag"]: r for r in gate["runs"] if r["mtp"]}
    assert set(roots) == {"BF16", "Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M"} and set(loaded) == {"Q4_K_M", "IQ4_XS"}
    for tag, run in loaded.items():
        assert run["trunk"] == roots[tag] and run["head"] == f"mtp-{roots[tag]}" == run["intended_head"]
        assert run["tokens_match"] and run["drafted"] > 0 and run["commit"] == gate["commit"]
    assert gate["snapshot"]["files_checked"] == len(manifest["files"]) + 1  # and the importance matrix
    staged = {s.rfilename: s.lfs.sha256 for s in api.model_info(gate["repo"], files_metadata=True).siblings if s.lfs}
    promoted = {s.rfilename: s.lfs.sha256 for s in api.model_info(target, files_metadata=True).siblings if s.lfs}
    assert staged == promoted
    card = (release["dir"] / "README.md").read_text(encoding="utf-8")
    assert "watched llama.cpp load the pairs marked checked" in card


def test_smoke_tests_and_uploads_ran_per_finished_file_and_benches_after_everything(release):
    """The cold run smoke-tested and pre-uploaded each finished file (one task run per file, none before the
    first conversion ended) and benched only after every quantize, smoke and pre-upload had ended (bench
    timings need the machine to themselves). Whether a smoke overlaps a quantize in wall-clock time depends on
    how fast the machine quantizes a toy, so that is not asserted: the ordering is what the flow guarantees."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        # The module's first run of this release computed everything; later ones reuse it from the cache.
        cold = min((r for r in client.read_flow_runs(limit=200) if r.start_time
                    and r.parameters.get("output") == str(release["root"] / "release")), key=lambda r: r.start_time)
        runs = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[cold.id])),
                                                 limit=200) if t.start_time and t.end_time]
    spans = {kind: [(t.start_time, t.end_time) for t in runs if t.name.startswith(f"{kind} ")]
             for kind in ("convert", "quantize", "smoke", "preupload", "bench")}
    # Each layout's BF16 variant and 4 quants: 8 quantize runs (the sidecar's trunk and head in one), 10 smokes
    # and 10 pre-uploads.
    assert len(spans["quantize"]) == 8 and len(spans["smoke"]) == len(spans["preupload"]) == 10
    # The matrix waits for the head to prove itself on BF16: no quantize before the first smoke test ended.
    first_smoke = next(t for t in runs if t.name == "smoke sidecar/BF16")
    assert all(start >= first_smoke.end_time for start, _ in spans["quantize"])
    first_convert_end = min(end for _, end in spans["convert"])
    assert all(start >= first_convert_end for start, _ in spans["smoke"] + spans["preupload"])
    busy_until = max(end for _, end in spans["quantize"] + spans["smoke"] + spans["preupload"])
    assert spans["bench"] and all(start >= busy_until for start, _ in spans["bench"])
