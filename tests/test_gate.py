"""The release gate against the local Hub with the real llama.cpp -hf downloader and snapshot_download.

The repos here are private and the endpoint accepts one token, so every check also proves that llama.cpp
got the token through its environment (a private repo is a 404 without it).
"""

import json
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from typer.testing import CliRunner

from mtpress.errors import GateError
from mtpress.manifest import Manifest, jsonable
from mtpress.schema import GateSpec, SmokeSpec, Target
from mtpress.stages.gate import check_hub_sha256, choose_pairings, gate, pairings_from_manifest, pairings_from_names
from tests.conftest import TEST_TOKEN, client_on_local_hub

SMOKE = SmokeSpec(n_predict=16)
GATE = GateSpec(n_predict=8)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory, toolchain, demo_pair):
    """The demo base as a sidecar BF16 trunk and head, and its greedy tokens as the smoke stage records them
    (from the run without draft-mtp)."""
    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.stages.convert import convert
    from mtpress.stages.smoke import generate, server_args

    trunk, head = convert(ModelDir(demo_pair[0], "base"), get_arch("qwen35"), "sidecar", name="T", tools=toolchain,
                          out_dir=tmp_path_factory.mktemp("sidecar"))
    plain = generate(toolchain, server_args(trunk, head, mtp=False, draft_n_max=SMOKE.draft_n_max), SMOKE)
    return trunk, head, plain.tokens


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with client_on_local_hub(tmp_path_factory.mktemp("gate-hub")) as local:
        yield HfApi(endpoint=local.url, token=TEST_TOKEN)


def manifest_for(files: dict, tokens: tuple[int, ...]) -> Manifest:
    """The sample release's manifest with the files named as in `files` (repo path → GgufFile) and their smoke."""
    sample = json.loads((Path(__file__).parent / "data" / "manifest-sample.json").read_text(encoding="utf-8"))
    records = [{**jsonable(f), "path": path, "name": path.rsplit("/", 1)[-1], "layout": "sidecar", "quant": "BF16"}
               for path, f in files.items()]
    smoke = [{"model": "T-BF16.gguf", "head": "mtp-T-BF16.gguf", "quant": "BF16", "layout": "sidecar",
              "n_predict": len(tokens), "draft_n_max": SMOKE.draft_n_max, "tokens_identical": True, "tokens": tokens,
              "drafted": 0, "accepted": 0, "acceptance": None, "tokens_per_second_plain": 1.0,
              "tokens_per_second_mtp": None, "passed": True}]
    config = {**sample["config"], "smoke": SMOKE.model_dump(mode="json"), "gate": GATE.model_dump(mode="json")}
    return Manifest.model_validate({**sample, "files": records, "smoke": smoke, "config": config})


def upload(api: HfApi, repo: str, files: dict, manifest: Manifest | None = None) -> str:
    operations = [CommitOperationAdd(path, str(f.path)) for path, f in files.items()]
    if manifest is not None:
        operations.append(CommitOperationAdd("manifest.json", manifest.model_dump_json(exclude_unset=True).encode()))
    api.create_repo(repo, private=True, exist_ok=True)
    return api.create_commit(repo, operations, commit_message="release").oid


def test_a_correctly_named_repo_passes_with_the_smoke_tokens(hub, sidecar, toolchain, tmp_path):
    trunk, head, tokens = sidecar
    files = {"T-BF16.gguf": trunk, "mtp-T-BF16.gguf": head}
    manifest = manifest_for(files, tokens)
    commit = upload(hub, "mtpress-demo/Good-GGUF", files, manifest)

    sha256 = {p: f.sha256 for p, f in files.items()}
    result = gate(hub, "mtpress-demo/Good-GGUF", commit, pairings_from_manifest(manifest), sha256, toolchain,
                  SMOKE, GATE, tmp_path)
    plain, mtp = result.runs
    assert (plain.trunk, plain.head, plain.mtp) == ("T-BF16.gguf", None, False)
    assert (mtp.trunk, mtp.head, mtp.mtp) == ("T-BF16.gguf", "mtp-T-BF16.gguf", True)
    assert plain.commit == mtp.commit == commit and plain.version == "b11434"
    assert plain.tokens_match and mtp.tokens_match and mtp.tokens_compared == GATE.n_predict
    assert 0 < mtp.accepted <= mtp.drafted
    assert result.snapshot.files_checked == 2
    assert [row["client"] for row in result.table()] == ["llama.cpp -hf"] * 2 + ["Hub metadata (LFS sha256)"]
    assert not list(tmp_path.iterdir()), "the clients' downloads are removed"


def test_a_misnamed_head_is_refused_and_nothing_reaches_the_target(hub, sidecar, toolchain, tmp_path):
    """ggml-org/convert's shape: Q8_0 and Q4_0 heads beside a Q4_K_M trunk, where -hf takes the nearest bit
    count. Staged as the flow stages a release; the gate refuses before anything is promoted."""
    from mtpress.stages.publish import publish

    trunk, head, _ = sidecar
    release = tmp_path / "release"
    release.mkdir()
    for name, f in {"T-Q4_K_M.gguf": trunk, "mtp-T-Q8_0.gguf": head, "mtp-T-Q4_0.gguf": head}.items():
        (release / name).hardlink_to(f.path)
    target = Target(repo="mtpress-demo/Misnamed-GGUF")
    staged = publish(release, target.staging, hub, message="stage")
    assert staged.repo == "mtpress-demo/Misnamed-GGUF-staging" and hub.model_info(staged.repo).private
    pairings = pairings_from_names(hub.list_repo_files(staged.repo))
    assert [(p.tag, p.trunk, p.head) for p in pairings] == [("Q4_K_M", "T-Q4_K_M.gguf", "mtp-T-Q4_K_M.gguf")]
    with pytest.raises(GateError, match=r"trunk T-Q4_K_M\.gguf: llama\.cpp -hf .*:Q4_K_M --spec-type draft-mtp .*"
                                        r"picked head mtp-T-Q4_0\.gguf, intended mtp-T-Q4_K_M\.gguf"):
        gate(hub, staged.repo, staged.commit, pairings, {}, toolchain, SMOKE, GATE, tmp_path / "gate")
    assert not hub.repo_exists(target.repo)


def test_a_file_whose_bytes_differ_from_the_manifest_is_caught_without_a_download(sidecar, tmp_path):
    """The Hub holds other bytes under the tested name (here: the head committed as the trunk): its own LFS
    sha256 at the commit says so, and not one byte of the release is downloaded to find out."""
    from mtpress.hub.server import LocalHub

    trunk, head, _ = sidecar
    with LocalHub(tmp_path / "hub", tokens={TEST_TOKEN}) as local:
        api = HfApi(endpoint=local.url, token=TEST_TOKEN)
        commit = upload(api, "mtpress-demo/Sha-GGUF", {"T-BF16.gguf": head})
        with pytest.raises(GateError, match=rf"T-BF16\.gguf: mtpress-demo/Sha-GGUF@{commit[:12]} holds sha256 "
                                            rf"{head.sha256} \(Hub metadata \(LFS sha256\)\), the manifest says "
                                            rf"{trunk.sha256}"):
            check_hub_sha256(api, "mtpress-demo/Sha-GGUF", commit, {"T-BF16.gguf": trunk.sha256})
        with pytest.raises(GateError, match=r"mtp-T-BF16\.gguf: .* has no such file"):
            check_hub_sha256(api, "mtpress-demo/Sha-GGUF", commit, {"mtp-T-BF16.gguf": head.sha256})
        assert check_hub_sha256(api, "mtpress-demo/Sha-GGUF", commit, {"T-BF16.gguf": head.sha256}).files_checked == 1
        assert local.bytes_served == {}


def test_the_gate_loads_only_the_recommended_and_the_smallest_quant(demo_ggufs, sidecar, toolchain, tmp_path):
    """Three root trunks; -hf runs for the recommended tag (Q4_K_M, the card's rule) and the smallest (Q2_K) only.
    The third (a sidecar trunk without a head: draft-mtp would fail on it) is never downloaded."""
    from mtpress.hub.server import LocalHub
    from mtpress.stages.gate import verify_repo

    bf16, q4 = demo_ggufs
    files = {"T-Q4_K_M.gguf": bf16, "T-Q2_K.gguf": q4, "T-BF16.gguf": sidecar[0]}
    repo = "mtpress-demo/Two-GGUF"
    with LocalHub(tmp_path / "hub", tokens={TEST_TOKEN}) as local:
        api = HfApi(endpoint=local.url, token=TEST_TOKEN)
        upload(api, repo, files)
        result = verify_repo(api, repo, toolchain, tmp_path / "work")
        served = dict(local.bytes_served)
    assert [(r.tag, r.mtp) for r in result.runs] == [("Q4_K_M", False), ("Q4_K_M", True), ("Q2_K", False),
                                                     ("Q2_K", True)]
    assert served == {f"{repo}/T-Q4_K_M.gguf": bf16.size, f"{repo}/T-Q2_K.gguf": q4.size}


def test_the_gate_chooses_the_recommended_the_smallest_and_the_named_quants():
    from mtpress.stages.gate import Pairing

    trunks = {"BF16": "X-BF16.gguf", "Q8_0": "X-Q8_0-00001-of-00002.gguf", "Q4_K_M": "X-Q4_K_M.gguf",
              "IQ2_M": "X-IQ2_M.gguf"}
    pairings = [Pairing(tag=t, trunk=trunk, head=None, mmproj=None, tokens=None) for t, trunk in trunks.items()]
    # The split Q8_0 counts both parts (40): else its first part alone (20) would pass for the smallest.
    sizes = {"X-BF16.gguf": 80, "X-Q8_0-00001-of-00002.gguf": 20, "X-Q8_0-00002-of-00002.gguf": 20,
             "mtp-X-Q8_0.gguf": 5, "X-Q4_K_M.gguf": 25, "X-IQ2_M.gguf": 30}
    assert [p.tag for p in choose_pairings(pairings, sizes)] == ["Q4_K_M"]  # recommended and smallest
    assert [p.tag for p in choose_pairings(pairings, {**sizes, "X-IQ2_M.gguf": 10})] == ["Q4_K_M", "IQ2_M"]
    assert [p.tag for p in choose_pairings(pairings, sizes, ["q8_0"])] == ["Q4_K_M", "Q8_0"]
    with pytest.raises(GateError, match="gate.tags names Q6_K, which no root trunk carries"):
        choose_pairings(pairings, sizes, ["Q6_K"])


def test_verify_cli_checks_a_published_repo_and_refuses_a_revision_it_cannot_pin(hub, sidecar, tmp_path):
    from mtpress.cli import app

    trunk, head, tokens = sidecar
    files = {"T-BF16.gguf": trunk, "mtp-T-BF16.gguf": head}
    repo = "mtpress-demo/Verify-GGUF"
    first = upload(hub, repo, files, manifest_for(files, tokens))
    runner = CliRunner()
    result = runner.invoke(app, ["verify", repo, "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "draft-mtp --spec-draft-n-max 2: T-BF16.gguf + mtp-T-BF16.gguf; 8/8 tokens, drafted" in result.output
    assert f"{repo}@{first}: passed" in result.output
    assert TEST_TOKEN not in result.output

    hub.create_commit(repo, [CommitOperationAdd("notes.txt", b"later")], commit_message="later")
    refused = runner.invoke(app, ["verify", repo, "--revision", first, "--work-dir", str(tmp_path)])
    assert isinstance(refused.exception, GateError)
    assert "main is at" in str(refused.exception) and "always reads main" in str(refused.exception)


def test_pairing_from_names_follows_llama_cpp_name_rules():
    names = ["X-Q4_K_M.gguf", "mtp-X-Q4_K_M.gguf", "mmproj-X-F16.gguf", "X-Q8_0-00001-of-00002.gguf",
             "X-Q8_0-00002-of-00002.gguf", "embedded/X-Q4_K_M.gguf", "README.md"]
    pairings = {p.tag: p for p in pairings_from_names(names)}
    assert set(pairings) == {"Q4_K_M", "Q8_0"}
    assert pairings["Q8_0"].trunk == "X-Q8_0-00001-of-00002.gguf" and pairings["Q8_0"].head == "mtp-X-Q8_0.gguf"
    assert pairings["Q4_K_M"].mmproj == "mmproj-X-F16.gguf"
    assert pairings_from_names(["X-Q4_K_M.gguf"])[0].head is None


def test_the_card_pairs_each_trunk_with_its_head_and_reports_the_gate():
    from mtpress.stages.gate import ClientRun, GateResult, SnapshotCheck
    from tests.test_card import card_of

    manifest = json.loads((Path(__file__).parent / "data" / "manifest-sample.json").read_text(encoding="utf-8"))
    for f in manifest["files"]:
        f["path"] = f["path"].removeprefix("sidecar/")  # the sidecar layout at the repo root, as releases have it
    repo, trunk, head = manifest["config"]["target"]["repo"], manifest["files"][2]["path"], manifest["files"][3]["path"]
    row = f"| `{repo}:Q4_K_M` | `{trunk}` | `{head}` |"
    assert f"{row} not measured |" in card_of(manifest).files["README.md"]

    commit = "0123456789abcdef0123456789abcdef01234567"
    runs = tuple(ClientRun(client="llama.cpp -hf", version="b11434", request=f"-hf {repo}-staging:Q4_K_M" + extra,
                           tag="Q4_K_M", mtp=bool(extra), commit=commit, trunk=trunk, head=head if extra else None,
                           mmproj=None, intended_head=head, tokens_compared=16, tokens_match=True,
                           drafted=12 if extra else 0, accepted=8 if extra else 0)
                 for extra in ("", " --spec-type draft-mtp --spec-draft-n-max 2"))
    result = GateResult(f"{repo}-staging", commit, runs, SnapshotCheck("Hub metadata (LFS sha256)", "2.4.0",
                                                                        commit, 4), {})
    card = card_of({**manifest, "gate": result.table(), "gate_details": jsonable(result)}).files
    english, chinese = card["README.md"], card["README_zh.md"]
    assert f"{row} ✅ yes |" in english and f"{row} ✅ 是 |" in chinese
    assert f"staging repo `{repo}-staging` (commit `{commit}`)" in english
    assert "(its LFS SHA-256, read with `huggingface_hub` 2.4.0, nothing downloaded) matched the SHA-256 of all 4 " \
           "GGUF files above" in english
    assert f"暂存仓库 `{repo}-staging`（提交 `{commit}`）" in chinese
    assert "| 16/16 tokens | 12 | 8 |" in english


def test_the_staging_repo_is_private_beside_the_target_and_never_the_target_itself(tmp_path):
    import yaml

    from mtpress.errors import ConfigError
    from mtpress.schema import load_release_config

    assert Target(repo="me/X-GGUF").staging == Target(repo="me/X-GGUF-staging", private=True)
    assert Target(repo="me/X-GGUF", staging_repo="me/elsewhere").staging.repo == "me/elsewhere"
    config = tmp_path / "x.yaml"
    config.write_text(yaml.safe_dump({"name": "X", "finetune": {"repo": "a/b"},
                                      "target": {"repo": "me/X-GGUF", "staging_repo": "me/X-GGUF"}}))
    with pytest.raises(ConfigError, match="target: staging_repo must differ from repo"):
        load_release_config(config)


def test_a_token_llama_cpp_ignores_is_named_as_the_cause(sidecar, toolchain, tmp_path):
    """An OAuth token (`hf_oauth_…`, what a Space's "Sign in with HF" hands out) has an underscore llama.cpp does
    not accept: huggingface_hub reads the private repo, llama.cpp silently goes anonymous and gets a 404. The
    gate's error names that, not llama.cpp's last line ("exiting due to …")."""
    from mtpress.hub.server import LocalHub

    short = "hf_oauth_" + "0123456789abcdef" * 3
    trunk, head, tokens = sidecar
    files = {"T-BF16.gguf": trunk, "mtp-T-BF16.gguf": head}
    manifest = manifest_for(files, tokens)
    with LocalHub(tmp_path / "hub", tokens={short}) as local:
        api = HfApi(endpoint=local.url, token=short)
        commit = upload(api, "mtpress-demo/Short-Token-GGUF", files, manifest)
        with pytest.raises(GateError, match="invalid token, authentication disabled") as raised:
            gate(api, "mtpress-demo/Short-Token-GGUF", commit, pairings_from_manifest(manifest),
                 {p: f.sha256 for p, f in files.items()}, toolchain, SMOKE, GATE, tmp_path / "work")
    assert "is_valid_hf_token" in str(raised.value) and "exiting due to" not in str(raised.value)
