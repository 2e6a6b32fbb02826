"""inject: the head arrives as one extra shard, the trunk is never rewritten, bad donors are refused."""

import json
from pathlib import Path

import numpy as np
import pytest

from mtpress.checkpoint import INDEX, ModelDir
from mtpress.errors import CorruptCheckpointError, IncompatibleDonorError, MissingMtpHeadError, ModelError
from mtpress.safetensors_io import bf16_bytes_to_f32, read_header, read_tensor_bytes
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


@pytest.mark.parametrize("key, value", [("hidden_size", 128), ("num_hidden_layers", 3), ("num_attention_heads", 4)])
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


@pytest.mark.parametrize("multimodal", [False, True])
def test_stale_config_without_a_donor_is_released_without_a_head(tmp_path, multimodal):
    """No mtp.* tensors, config still claims one layer, no donor: never the GGUF that fails to load."""
    stale = make_checkpoint(tmp_path / "stale", with_head=False, seed=1, multimodal=multimodal)
    result = inject(stale, None, ARCH, tmp_path / "out")

    assert result.action == "no-head" and result.head is None
    assert "--no-mtp" in result.reason and "#26916" in result.reason and "`donor:`" in result.reason
    out = result.model.path
    assert ARCH.mtp_layers(result.model.config) == 0 and ARCH.mtp_layers(stale.config) == 1
    reconciled = json.loads((out / "config.json").read_text())
    assert reconciled == ARCH.set_mtp_layers(stale.config, 0)
    assert ("text_config" in reconciled) == multimodal, "the key is reconciled where the checkpoint keeps it"
    for shard in stale.shard_files():
        assert (out / shard).stat().st_ino == (stale.path / shard).stat().st_ino
    assert (out / INDEX).read_bytes() == (stale.path / INDEX).read_bytes()
    assert (stale.path / "config.json").read_text() != (out / "config.json").read_text(), "the input is untouched"
    assert result.bytes_written == (out / "config.json").stat().st_size


# Lossy or exact is judged on the values: N(0, 1) BF16 values all fit F16, F32 and F16 ones do not fit BF16.
@pytest.mark.parametrize("source, target, cast", [("BF16", "BF16", "none"), ("BF16", "F32", "exact"),
                                                  ("F16", "F32", "exact"), ("BF16", "F16", "exact"),
                                                  ("F32", "BF16", "lossy"), ("F16", "BF16", "lossy")])
def test_head_is_cast_to_the_finetune_dtype_and_a_lossy_cast_is_said(tmp_path, source, target, cast):
    donor = make_checkpoint(tmp_path / "donor", with_head=True, seed=2, dtype=source)
    finetune = make_checkpoint(tmp_path / "ft", with_head=False, seed=6, dtype=target)
    result = inject(finetune, donor, ARCH, tmp_path / "out")
    head, _ = read_header(result.model.path / HEAD_SHARD)
    assert {i.dtype for i in head.values()} == {target}
    assert (result.head.source_dtype, result.head.dtype, result.head.cast) == (source, target, cast)
    assert ("lossy" in result.reason) == (cast == "lossy") and ("exact" in result.reason) == (cast == "exact")
    name = "mtp.fc.weight"
    donor_values = _as_f32(read_tensor_bytes(donor.shard_of(name), donor.tensors[name]), source)
    values = _as_f32(read_tensor_bytes(result.model.path / HEAD_SHARD, head[name]), target)
    if cast == "lossy":
        assert not np.array_equal(values, donor_values) and np.allclose(values, donor_values, rtol=1e-2, atol=1e-3)
    else:
        assert np.array_equal(values, donor_values)


def _as_f32(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_bytes_to_f32(raw, (len(raw) // 2,))
    return np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[dtype]).astype(np.float32)


def test_single_file_finetune_gets_an_index_covering_file_and_head(donor, tmp_path):
    single = make_checkpoint(tmp_path / "single", with_head=False, seed=8, single_file=True)
    assert not (single.path / INDEX).exists()
    result = inject(single, donor, ARCH, tmp_path / "out")
    out = result.model.path
    index = json.loads((out / INDEX).read_text())["weight_map"]
    assert set(index.values()) == {"model.safetensors", HEAD_SHARD}
    assert {n for n, f in index.items() if f == "model.safetensors"} == set(single.tensors)
    assert (out / "model.safetensors").stat().st_ino == (single.path / "model.safetensors").stat().st_ino
    assert ModelDir(out, "reread").tensors.keys() == index.keys()


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings_record_what_the_head_shares(donor, tmp_path, tied):
    finetune = make_checkpoint(tmp_path / "ft", with_head=False, seed=9, tie_word_embeddings=tied)
    assert ("lm_head.weight" in finetune.tensors) != tied
    result = inject(finetune, donor, ARCH, tmp_path / "out")
    vocabulary = result.vocabulary
    assert vocabulary.tied == tied and vocabulary.embedding == "model.embed_tokens.weight"
    assert vocabulary.output == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert ARCH.describe(result.model.config, result.model.tensors)["tie_word_embeddings"] == tied


def test_resized_vocabulary_is_accepted_with_both_sizes_recorded(donor, tmp_path):
    """The head has no vocabulary-sized tensor: it shares the fine-tune's embedding and output."""
    resized = make_checkpoint(tmp_path / "resized", with_head=False, seed=10, vocab_size=352)
    result = inject(resized, donor, ARCH, tmp_path / "out")
    vocabulary = result.vocabulary
    assert (vocabulary.finetune_rows, vocabulary.donor_rows) == (352, SMALL["vocab_size"])
    assert vocabulary.decision.startswith("accepted: the vocabulary was resized")
    assert "352" in vocabulary.decision and str(SMALL["vocab_size"]) in vocabulary.decision
    assert "lm_head.weight" in vocabulary.decision


def test_resized_vocabulary_is_refused_when_the_donor_head_has_its_own_vocabulary_tensor(tmp_path):
    donor = make_checkpoint(tmp_path / "donor", with_head=True, seed=2,
                            extra_head={"mtp.embed_tokens.weight": (SMALL["vocab_size"], SMALL["hidden_size"])})
    resized = make_checkpoint(tmp_path / "resized", with_head=False, seed=10, vocab_size=352)
    with pytest.raises(IncompatibleDonorError) as err:
        inject(resized, donor, ARCH, tmp_path / "out")
    message = str(err.value)
    assert "mtp.embed_tokens.weight" in message and "352" in message and str(SMALL["vocab_size"]) in message
    assert not (tmp_path / "out").exists()


def test_multimodal_layout_is_injected_with_nested_config_and_prefixes(tmp_path):
    finetune = make_checkpoint(tmp_path / "ft", with_head=False, seed=1, multimodal=True)
    donor = make_checkpoint(tmp_path / "donor", with_head=True, seed=2, multimodal=True)
    assert "hidden_size" not in finetune.config and ARCH.has_vision(finetune.config)
    result = inject(finetune, donor, ARCH, tmp_path / "out")
    assert result.action == "injected"
    assert result.vocabulary.embedding == "model.language_model.embed_tokens.weight"
    index = json.loads((result.model.path / INDEX).read_text())["weight_map"]
    assert index["model.visual.blocks.0.norm1.weight"] == "model-00001-of-00002.safetensors"
    assert {n for n, f in index.items() if f == HEAD_SHARD} == set(ARCH.expected_head(finetune.config))
    assert ARCH.describe(result.model.config, result.model.tensors)["parameters_vision"] == 16


def test_multimodal_donor_of_another_size_is_refused_from_the_nested_config(tmp_path):
    finetune = make_checkpoint(tmp_path / "ft", with_head=False, seed=1, multimodal=True)
    other = make_checkpoint(tmp_path / "other", with_head=True, seed=2, multimodal=True, intermediate_size=256)
    with pytest.raises(IncompatibleDonorError, match="intermediate_size must match; fine-tune has 128, donor has 256"):
        inject(finetune, other, ARCH, tmp_path / "out")


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
