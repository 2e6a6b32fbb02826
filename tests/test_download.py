"""download: pinned revisions, remote head detection from headers only, refusals before any weight moves."""

import json

import pytest

from mtpress.errors import HubRequestError, ModelError
from mtpress.fsutil import sha256_file
from mtpress.hub.client import hub_api
from mtpress.schema import Source
from mtpress.stages.download import fetch, probe
from mtpress.stages.inject import inject
from tests.fixtures import ARCH, make_checkpoint


def upload(folder, repo):
    api = hub_api()
    api.create_repo(repo)
    return api.upload_folder(repo_id=repo, folder_path=folder, commit_message="upload").oid


@pytest.fixture
def remote_pair(local_hub, tmp_path):
    upload(make_checkpoint(tmp_path / "base", with_head=True, seed=1).path, "org/base")
    commit = upload(make_checkpoint(tmp_path / "ft", with_head=False, seed=2).path, "org/ft")
    return commit


def test_probe_reads_the_head_from_remote_headers_without_downloading(remote_pair, local_hub, tmp_path):
    base = probe(Source(repo="org/base"))
    finetune = probe(Source(repo="org/ft"))
    assert len(base.head_tensors) == 15 and all(n.startswith("mtp.") for n in base.head_tensors)
    assert finetune.head_tensors == () and finetune.revision == remote_pair
    assert not list((tmp_path / "hf_home").rglob("*.safetensors")), "probing must not download weights"


def test_fetch_pins_the_resolved_commit_and_takes_only_needed_files(remote_pair, local_hub, tmp_path):
    api = hub_api()
    api.upload_file(path_or_fileobj=b"not needed", path_in_repo="notes/training-log.txt", repo_id="org/ft")
    api.upload_file(path_or_fileobj=b"\x80\x04pickle", path_in_repo="optimizer.pt", repo_id="org/ft")
    model = fetch(Source(repo="org/ft", revision=remote_pair), tmp_path / "cache")
    assert model.revision == remote_pair and model.label.endswith(remote_pair[:12])
    names = {p.name for p in model.path.iterdir()}
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert "training-log.txt" not in names and "optimizer.pt" not in names
    assert len(model.tensors) == 3


def test_a_donor_downloads_only_the_shards_holding_its_head(remote_pair, local_hub, tmp_path):
    """The trunk shards of a 9B donor (17 GB) are never read: they stay on the Hub, known by their headers and
    the Hub's sha256, and the head injected from the partial donor is the one a whole download gives."""
    whole = make_checkpoint(tmp_path / "base-again", with_head=True, seed=1)  # the bytes org/base holds
    donor = fetch(Source(repo="org/base"), tmp_path / "cache", only_tensors=ARCH.is_head_tensor)
    head_shards = {whole.weight_map[n] for n in whole.tensors if ARCH.is_head_tensor(n)}
    trunk_only = set(whole.shard_files()) - head_shards
    assert trunk_only and {p.name for p in weight_files(donor.path)} == head_shards
    assert [r.name for r in donor.left_on_hub] == sorted(trunk_only)
    assert {n: (t.dtype, t.shape) for n, t in donor.tensors.items()} == {
        n: (t.dtype, t.shape) for n, t in whole.tensors.items()}
    assert {s: donor.shard_sha256(s) for s in donor.shard_files()} == {
        s: sha256_file(whole.path / s) for s in whole.shard_files()}
    trunk_tensor = next(n for n in whole.tensors if whole.weight_map[n] in trunk_only)
    with pytest.raises(ModelError, match="left on the Hub"):
        donor.shard_of(trunk_tensor)
    finetune = make_checkpoint(tmp_path / "ft-again", with_head=False, seed=2)
    partial = inject(finetune, donor, ARCH, tmp_path / "injected-partial")
    full = inject(finetune, whole, ARCH, tmp_path / "injected-whole")
    assert partial.head.sha256 == full.head.sha256 and partial.head.parameters == full.head.parameters


def test_a_branch_revision_resolves_to_a_commit_sha(remote_pair, local_hub, tmp_path):
    model = fetch(Source(repo="org/ft", revision="main"), tmp_path / "cache")
    assert len(model.revision) == 40 and model.revision == remote_pair


def test_pickle_only_repo_is_refused_before_download(local_hub, tmp_path):
    api = hub_api()
    api.create_repo("org/pickles")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/pickles")
    api.upload_file(path_or_fileobj=b"\x80\x04pickle", path_in_repo="pytorch_model.bin", repo_id="org/pickles")
    with pytest.raises(ModelError, match="only pickle weights"):
        fetch(Source(repo="org/pickles"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_local_directory_sources_are_used_in_place(tmp_path):
    model = make_checkpoint(tmp_path / "local", with_head=False, seed=3)
    assert fetch(Source(path=model.path), tmp_path / "cache").path == model.path
    with pytest.raises(ModelError, match="not a directory"):
        fetch(Source(path=tmp_path / "missing"), tmp_path / "cache")


def weight_files(folder):
    return [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]


@pytest.mark.parametrize("file, auto_map", [
    ("config.json", {"AutoModel": "modeling_x.Model"}),
    # A tokenizer class from another repo, which transformers fetches and imports where it is trusted.
    ("tokenizer_config.json", {"AutoTokenizer": ["someone/else--tokenization_x.Tok", None]}),
])
def test_a_checkpoint_asking_for_remote_code_is_refused_before_any_weight_is_downloaded(local_hub, tmp_path, file,
                                                                                       auto_map):
    checkpoint = make_checkpoint(tmp_path / "custom", with_head=False, seed=4).path
    data = json.loads((checkpoint / file).read_text()) if (checkpoint / file).is_file() else {}
    (checkpoint / file).write_text(json.dumps(data | {"auto_map": auto_map}))
    upload(checkpoint, "org/custom-code")
    with pytest.raises(ModelError, match=rf"{file} asks for remote code \(auto_map: Auto") as err:
        fetch(Source(repo="org/custom-code"), tmp_path / "cache")
    assert not err.value.retryable
    assert any((tmp_path / "cache").rglob(file)), "the small files came first"
    assert not weight_files(tmp_path / "cache") and not weight_files(tmp_path / "hf_home")
    with pytest.raises(ModelError, match=rf"{file} asks for remote code"):  # the same folder given as a path
        fetch(Source(path=checkpoint), tmp_path / "cache")


def test_a_repo_without_config_is_refused_before_any_weight_is_downloaded(local_hub, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "bare", with_head=False, seed=5).path
    (checkpoint / "config.json").unlink()
    upload(checkpoint, "org/bare")
    with pytest.raises(ModelError, match="no config.json in the repo"):
        fetch(Source(repo="org/bare"), tmp_path / "cache")
    assert not weight_files(tmp_path / "cache")


def test_a_wrong_repo_or_revision_is_a_model_error_that_is_not_retried(remote_pair, tmp_path):
    with pytest.raises(ModelError, match="no such model repo") as missing:
        fetch(Source(repo="org/no-such-model"), tmp_path / "cache")
    with pytest.raises(ModelError, match="has no revision 'v9'") as revision:
        fetch(Source(repo="org/ft", revision="v9"), tmp_path / "cache")
    assert not missing.value.retryable and not revision.value.retryable


@pytest.mark.parametrize(("fault", "retryable"), [
    ({"status": 503}, True),
    ({"status": 429, "retry_after": 3}, True),
    ({"status": 429}, False),  # rate-limited without being told when to come back
    ({"status": 403}, False),
    ({"action": "drop"}, True),
])
def test_hub_failures_while_fetching_keep_their_cause_and_say_whether_to_retry(remote_pair, local_hub, tmp_path,
                                                                                fault, retryable):
    local_hub.faults.add("GET", r"^/api/models/org/ft", **fault)
    with pytest.raises(HubRequestError, match=r"reading org/ft@main from http://127\.0\.0\.1:\d+ failed") as err:
        fetch(Source(repo="org/ft"), tmp_path / "cache")
    assert err.value.retryable is retryable
    assert fetch(Source(repo="org/ft"), tmp_path / "cache").revision == remote_pair  # the fault was used up
