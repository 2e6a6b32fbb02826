"""inject: the head arrives as one extra shard, the trunk is never rewritten, bad donors are refused."""

import json
from pathlib import Path

import pytest

from mtpress.checkpoint import INDEX, ModelDir
from mtpress.errors import CorruptCheckpointError, IncompatibleDonorError, MissingMtpHeadError, ModelError
from mtpress.safetensors_io import read_header, read_tensor_bytes
from mtpress.stages.inject import HEAD_SHARD, inject
from tests.fixtures import ARCH, SMALL, make_checkpoint


@pytest.fixture
def finetune(tmp_path):
    return make_checkpoint(tmp_path / "finetune", with_head=False, seed=1)


@pytest.fixture
def donor(tmp_path):
    return make_checkpoint(tmp_path / "donor", with_head=True, seed=2)


def test_head_is_added_as_an_extra_shard_and_trunk_is_untouched(finetune, donor, tmp_path):
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in finetune.path.glob("*.safetensors")}
    result = inject(finetune, donor, ARCH, tmp_path / "out")

    assert result.action == "injected"
    out = result.model.path
    for name, (inode, data) in before.items():
        assert (out / name).read_bytes() == data
        assert (out / name).stat().st_ino == inode, "trunk shards are hard-linked, not rewritten"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted([*before, HEAD_SHARD])

    head, _ = read_header(out / HEAD_SHARD)
    assert set(head) == set(ARCH.expected_head(SMALL)) and len(head) == 15
    for name, info in head.items():
        assert read_tensor_bytes(out / HEAD_SHARD, info) == read_tensor_bytes(donor.shard_of(name),
                                                                              donor.tensors[name])
    index = json.loads((out / INDEX).read_text())["weight_map"]
    assert all(index[n] == HEAD_SHARD for n in head)
    assert set(index) == set(finetune.weight_map) | set(head)
    assert result.head.parameters == sum(i.n_elements for i in head.values())
    assert result.bytes_written == (out / HEAD_SHARD).stat().st_size + (out / INDEX).stat().st_size
    assert ModelDir(out, "reread").tensors.keys() == index.keys()


def test_finetune_with_its_own_head_passes_through(donor, tmp_path):
    has_head = make_checkpoint(tmp_path / "own", with_head=True, seed=3)
    result = inject(has_head, donor, ARCH, tmp_path / "out")
    assert result.action == "passthrough" and result.model.path == has_head.path
    assert "already carries its own MTP head" in result.reason
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("hidden_size", 128), ("vocab_size", 400), ("num_hidden_layers", 3),
                                        ("num_attention_heads", 4)])
def test_incompatible_donor_is_refused_naming_the_field(finetune, tmp_path, key, value):
    other = make_checkpoint(tmp_path / "other", with_head=True, seed=4, **{key: value})
    with pytest.raises(IncompatibleDonorError) as err:
        inject(finetune, other, ARCH, tmp_path / "out")
    assert err.value.field == key and f"{key} must match" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_donor_without_head_is_refused(finetune, tmp_path):
    headless = make_checkpoint(tmp_path / "headless", with_head=False, seed=5)
    with pytest.raises(MissingMtpHeadError, match="has no mtp.\\* tensors to give"):
        inject(finetune, headless, ARCH, tmp_path / "out")


def test_missing_donor_for_a_headless_finetune_says_what_to_set(finetune, tmp_path):
    with pytest.raises(MissingMtpHeadError, match="set `donor:`"):
        inject(finetune, None, ARCH, tmp_path / "out")


def test_head_is_cast_to_the_finetune_dtype(tmp_path, donor):
    f32_finetune = make_checkpoint(tmp_path / "f32", with_head=False, seed=6, dtype="F32")
    result = inject(f32_finetune, donor, ARCH, tmp_path / "out")
    head, _ = read_header(result.model.path / HEAD_SHARD)
    assert {i.dtype for i in head.values()} == {"F32"}
    assert result.head.source_dtype == "BF16" and result.head.dtype == "F32"


def test_index_pointing_at_a_missing_tensor_names_file_and_tensor(finetune, donor, tmp_path):
    index = json.loads((finetune.path / INDEX).read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
    (finetune.path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="model.layers.0.ghost.weight in model-00001-of-00002"):
        inject(ModelDir(finetune.path, "ft"), donor, ARCH, tmp_path / "out")


def test_index_with_path_traversal_is_refused(finetune, donor, tmp_path):
    index = json.loads((finetune.path / INDEX).read_text())
    index["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    (finetune.path / INDEX).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="escapes the checkpoint"):
        inject(ModelDir(finetune.path, "ft"), donor, ARCH, tmp_path / "out")


def test_remote_code_and_pickle_only_checkpoints_are_refused(tmp_path, donor):
    remote = make_checkpoint(tmp_path / "remote", with_head=False, seed=7)
    config = json.loads((remote.path / "config.json").read_text()) | {"auto_map": {"AutoModel": "x.Model"}}
    (remote.path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="remote code"):
        inject(ModelDir(remote.path, "remote"), donor, ARCH, tmp_path / "out")

    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text(json.dumps(SMALL))
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="only pickle weights"):
        inject(ModelDir(pickle_only, "pickle"), donor, ARCH, tmp_path / "out2")


def test_a_failed_inject_leaves_no_output(finetune, donor, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mtpress.stages.inject.write_safetensors", boom)
    with pytest.raises(OSError):
        inject(finetune, donor, ARCH, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_finetune_from_a_hub_cache_snapshot_of_relative_symlinks(finetune, donor, tmp_path):
    """snapshot_download leaves snapshots/<rev>/file -> ../../blobs/<id>: the output must not dangle."""
    blobs, snapshot = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, entry in enumerate(sorted(finetune.path.iterdir())):
        entry.rename(blobs / str(i))
        (snapshot / entry.name).symlink_to(Path("../../blobs") / str(i))
    result = inject(ModelDir(snapshot, "cached"), donor, ARCH, tmp_path / "out")
    out = result.model.path
    assert all(p.is_file() and not p.is_symlink() for p in out.iterdir())
    assert json.loads((out / "config.json").read_text())["hidden_size"] == SMALL["hidden_size"]
