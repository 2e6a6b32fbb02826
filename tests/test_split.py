"""Files over the Hub's per-file limit: refused before any upload, or split into llama.cpp parts that the local
Hub (with a small limit) accepts and that `-m part-1` and `-hf repo:QUANT` load whole."""

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi

from mtpress.errors import FileTooLargeError
from mtpress.fsutil import sha256_file
from mtpress.naming import split_index, split_part_name
from mtpress.schema import GateSpec, SmokeSpec, Target
from mtpress.stages.split import check_file_sizes, split_gguf
from tests.conftest import TEST_TOKEN, client_on_local_hub

SMOKE = SmokeSpec(n_predict=16)


def test_part_names_follow_llama_cpp():
    assert split_part_name("T-Q4_K_M.gguf", 2, 3) == "T-Q4_K_M-00002-of-00003.gguf"
    assert split_index("T-Q4_K_M-00002-of-00003.gguf") == ("T-Q4_K_M.gguf", 2, 3)
    assert split_index("T-Q4_K_M.gguf") is None


def test_a_head_over_the_limit_is_refused_not_split(tmp_path):
    """-hf fetches the mtp- sibling as one file (common/download.cpp find_best_sibling): a split head would load
    as its first part alone."""
    head = tmp_path / "mtp-T-Q8_0.gguf"
    head.write_bytes(b"x" * 2000)
    with pytest.raises(FileTooLargeError, match=r"mtp-T-Q8_0\.gguf is 2,000 bytes, over the 1,000-byte per-file"):
        split_gguf(head, "head", 1000, tools=None)
    assert head.exists()


def test_the_target_carries_the_hub_limit_to_staging():
    target = Target(repo="mtpress-demo/X-GGUF", max_file_size=1234)
    assert Target(repo="mtpress-demo/X-GGUF").max_file_size == 50 * 1000**3
    assert target.staging.max_file_size == 1234


@pytest.fixture(scope="module")
def split_model(demo_ggufs, toolchain, tmp_path_factory):
    """The demo Q4_K_M (embedded head, 105 MB: output.weight 52 MB, token_embd 36 MB, an 11 MB header) split
    with a limit of 70% of its size, and the unsplit file's tokens."""
    from mtpress.stages.smoke import generate, server_args

    q4 = demo_ggufs[1]
    plain = generate(toolchain, server_args(q4, None, mtp=False, draft_n_max=SMOKE.draft_n_max), SMOKE)
    folder = tmp_path_factory.mktemp("split")
    copy = folder / q4.path.name
    copy.write_bytes(q4.path.read_bytes())
    limit = q4.size * 7 // 10
    return split_gguf(copy, "model", limit, toolchain), limit, q4, plain.tokens


@pytest.mark.slow
def test_a_limit_below_the_largest_tensor_is_refused_before_splitting(demo_ggufs, tmp_path):
    q4 = demo_ggufs[1]
    copy = tmp_path / q4.path.name
    copy.hardlink_to(q4.path)
    with pytest.raises(FileTooLargeError, match=r"T-Q4_K_M\.gguf: tensor output\.weight \(52,147,200 bytes\) and the "
                                                r"file's .*-byte header do not fit the per-file limit"):
        split_gguf(copy, "model", q4.size // 2, tools=None)
    assert not list(tmp_path.glob("*-of-*"))


@pytest.mark.slow
def test_a_split_model_loads_from_its_first_part(split_model, toolchain):
    from mtpress.stages.gguf_files import GgufFile
    from mtpress.stages.smoke import generate, server_args

    parts, limit, q4, tokens = split_model
    assert [p.name for p in parts] == ["T-Q4_K_M-00001-of-00002.gguf", "T-Q4_K_M-00002-of-00002.gguf"]
    assert all(p.stat().st_size <= limit for p in parts) and not (parts[0].parent / q4.path.name).exists()
    first = GgufFile(**{**q4.__dict__, "path": parts[0]})
    assert generate(toolchain, server_args(first, None, mtp=False, draft_n_max=2), SMOKE).tokens == tokens


@pytest.mark.slow
def test_the_hub_limit_refuses_unsplit_and_hf_loads_the_parts(split_model, toolchain, tmp_path):
    from mtpress.hub.server import LocalHub
    from mtpress.stages.gate import Pairing, gate
    from mtpress.stages.publish import release_files

    parts, limit, q4, tokens = split_model
    mp = pytest.MonkeyPatch()
    with LocalHub(tmp_path / "hub", tokens={TEST_TOKEN}, max_file_size=limit) as local:
        mp.setenv("HF_HOME", str(tmp_path / "hf_home"))
        api = HfApi(endpoint=local.url, token=TEST_TOKEN)
        repo = "mtpress-demo/Split-GGUF"
        api.create_repo(repo, private=True)

        # mtpress's own check: one error naming the file, its size and the limit, before any byte is sent.
        received = local.bytes_received
        with pytest.raises(FileTooLargeError, match=rf"T-Q4_K_M\.gguf is {q4.size:,d} bytes, over the {limit:,d}-byte "
                                                    rf"per-file limit of {repo}"):
            check_file_sizes({q4.path.name: q4.path}, limit, repo)
        assert local.bytes_received == received
        # The Hub's own: the LFS batch refuses the object, nothing is committed.
        head = api.model_info(repo).sha
        with pytest.raises(Exception, match=r"too large: .* the maximum file size is"):
            api.create_commit(repo, [CommitOperationAdd(q4.path.name, str(q4.path))], commit_message="unsplit")
        assert api.model_info(repo).sha == head

        check_file_sizes(release_files(parts[0].parent), limit, repo)
        commit = api.create_commit(repo, [CommitOperationAdd(p.name, str(p)) for p in parts],
                                   commit_message="split").oid
        pairing = Pairing(tag="Q4_K_M", trunk=parts[0].name, head=None, mmproj=None, tokens=tokens)
        result = gate(api, repo, commit, [pairing], {p.name: sha256_file(p) for p in parts}, toolchain, SMOKE,
                      GateSpec(n_predict=8), tmp_path / "gate")
        served = dict(local.bytes_served)
    mp.undo()
    plain, mtp = result.runs
    # -hf repo:Q4_K_M took part 1 as the model, fetched part 2 with it, and gave the unsplit file's tokens.
    assert plain.trunk == mtp.trunk == "T-Q4_K_M-00001-of-00002.gguf"
    assert served == {f"{repo}/{p.name}": p.stat().st_size for p in parts}
    assert plain.tokens_match and mtp.tokens_match and mtp.drafted > 0 and result.snapshot.files_checked == 2


# The demo's sidecar BF16 files: the trunk is 282.1 MB, its head 267.6 MB, and token_embd and output are 127.1 MB
# each. The first limit splits the trunk alone (a head cannot be split); no part can hold the second's.
SPLIT_LIMIT = 275_000_000
UNSPLITTABLE_LIMIT = 100_000_000


def split_config(path, limit: int):
    """The demo release trimmed to its sidecar BF16 files (no quant, bench, quality or MLX: the split is of the
    BF16), under ``limit``; the gate runs `-hf` for BF16, the split trunk, as the only (smallest) quant."""
    import yaml

    from tests.test_publish_flow import DEMO

    cfg = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    cfg.update(layouts=["sidecar"], quants=[], bench={"enabled": False}, quality={"enabled": False},
               gate={"tags": ["BF16"]})
    cfg["target"]["max_file_size"] = limit
    cfg.pop("mlx", None)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def hub_content(hub) -> set[str]:
    """What an upload leaves on the Hub: a verified blob, or a partial one in tmp/. (Request byte counts would not
    do: the donor's paths-info request, a download, sends a JSON body too.)"""
    return {p.name for folder in ("blobs", "tmp") for p in (hub.store.root / folder).rglob("*")}


@pytest.fixture(scope="module")
def split_release(tmp_path_factory, toolchain, demo_pair, prefect_harness):
    """The trimmed demo published through a local Hub with a small per-file limit: first under a limit no part can
    meet (refused), then, in the same release folder (so the build is reused), under one the BF16 trunk is split
    for."""
    from flows.publish import publish
    from mtpress.demo.run import seed_upstream_repos
    from mtpress.hub.client import hub_api
    from mtpress.schema import load_release_config

    root = tmp_path_factory.mktemp("split-release")
    config = split_config(root / "split.yaml", SPLIT_LIMIT)
    unsplittable = split_config(root / "unsplittable.yaml", UNSPLITTABLE_LIMIT)
    target = load_release_config(str(config)).target
    with client_on_local_hub(root, max_file_size=SPLIT_LIMIT) as hub:
        seed_upstream_repos(config)
        api = hub_api()
        before = hub_content(hub)
        with pytest.raises(FileTooLargeError) as refused:
            publish(str(unsplittable), str(root / "release"))
        stored_by_refused_run = sorted(hub_content(hub) - before)
        repos_after_refusal = [api.repo_exists(t.repo) for t in (target, target.staging)]
        release_dir = Path(publish(str(config), str(root / "release")))
        yield {"dir": release_dir, "manifest": json.loads((release_dir / "manifest.json").read_text()),
               "api": api, "repo": target.repo, "refused": refused.value, "stored": stored_by_refused_run,
               "repos": repos_after_refusal}


@pytest.mark.slow
def test_a_file_no_part_can_hold_fails_the_run_before_any_upload(split_release):
    """A BF16 trunk whose 127 MB tensors exceed a 100 MB limit: gguf-split never cuts a tensor. The run fails in
    the uploads lane, before its first byte is sent, and neither the target nor the staging repo exists."""
    assert re.search(r"BF16\.gguf: tensor (token_embd|output)\.weight \(127,139,840 bytes\) and the file's .*-byte "
                     r"header do not fit the per-file limit 100,000,000", str(split_release["refused"]))
    assert split_release["stored"] == [] and split_release["repos"] == [False, False]


@pytest.mark.slow
def test_the_bf16_trunk_is_published_as_parts_the_manifest_lists_with_their_sha256(split_release):
    release, api = split_release["dir"], split_release["api"]
    split = [f for f in split_release["manifest"]["files"] if f.get("parts")]
    assert [(f["role"], f["quant"]) for f in split] == [("model", "BF16")]
    [trunk] = split
    stem = trunk["path"].removesuffix(".gguf")
    assert [p["path"] for p in trunk["parts"]] == [f"{stem}-00001-of-00002.gguf", f"{stem}-00002-of-00002.gguf"]
    assert not (release / trunk["path"]).exists()  # the parts replace it; size and sha256 stay the tested file's
    assert trunk["size"] > SPLIT_LIMIT and sum(p["size"] for p in trunk["parts"]) > trunk["size"]
    for part in trunk["parts"]:
        assert part["size"] == (release / part["path"]).stat().st_size <= SPLIT_LIMIT
        assert part["sha256"] == sha256_file(release / part["path"])
    # The Hub holds the parts, with the sha256 the manifest lists, and every other file whole.
    hub = {s.rfilename: s.lfs.sha256 for s in api.model_info(split_release["repo"], files_metadata=True).siblings
           if s.rfilename.endswith(".gguf")}
    expected = {p["path"]: p["sha256"] for f in split_release["manifest"]["files"] for p in f.get("parts") or [f]}
    assert hub == expected


@pytest.mark.slow
def test_the_card_shows_the_split_file_once_with_its_parts(split_release):
    release = split_release["dir"]
    [trunk] = [f for f in split_release["manifest"]["files"] if f.get("parts")]
    english, chinese = ((release / name).read_text(encoding="utf-8") for name in ("README.md", "README_zh.md"))
    assert english.count(f"| `{trunk['path']}` (2 parts) |") == 1
    assert chinese.count(f"| `{trunk['path']}` (2 个分片) |") == 1
    for part in trunk["parts"]:  # `sha256sum -c` checks what a download holds: the parts
        assert f"{part['sha256']}  {part['path']}" in english
    assert f"{trunk['sha256']}  {trunk['path']}" not in english


@pytest.mark.slow
def test_the_gate_loaded_the_split_trunk_with_hf_and_checked_every_part(split_release):
    gate = split_release["manifest"]["gate_details"]
    [trunk] = [f for f in split_release["manifest"]["files"] if f.get("parts")]
    bf16 = [r for r in gate["runs"] if r["tag"] == "BF16"]
    assert [r["mtp"] for r in bf16] == [False, True]
    assert all(r["trunk"] == trunk["parts"][0]["path"] and r["tokens_match"] for r in bf16)
    assert bf16[1]["drafted"] > 0
    assert set(gate["sha256"]) >= {p["path"] for p in trunk["parts"]} and trunk["path"] not in gate["sha256"]
