"""The realign stage on the demo fine-tune: real llama-server hidden states, the real trainer (torch in the
converter's environment), the real converter and bench for the end-to-end comparison."""

import json
import os
import shutil

import pytest

from mtpress.archs import get_arch
from mtpress.checkpoint import INDEX, ModelDir
from mtpress.errors import TrunkMismatchError
from mtpress.fsutil import sha256_file
from mtpress.safetensors_io import read_header
from mtpress.schema import HeadSpec
from mtpress.stages.inject import HEAD_SHARD, inject
from mtpress.stages.realign import collect_hidden_states, realign, trunk_digest

ARCH = get_arch("qwen35")
# A few prompts and steps: enough to move every head tensor, small enough for two CPU cores.
QUICK = HeadSpec(source="realign", per_domain=1, n_predict=8, max_steps=8, eval_every=4, batch_sequences=4,
                 learning_rate=1e-2, heldout_fraction=0.34)


@pytest.fixture(scope="module")
def injected(demo_pair, tmp_path_factory):
    base, finetune = (ModelDir(p, label) for p, label in zip(demo_pair, ("base", "finetune")))
    return inject(finetune, base, ARCH, tmp_path_factory.mktemp("inject") / "injected").model


@pytest.fixture(scope="module")
def embedded(injected, toolchain, tmp_path_factory):
    """One conversion: llama-server computes the trunk alone unless asked to draft, so the embedded GGUF serves
    both the hidden states and the copied head's measurement."""
    from mtpress.stages.convert import convert

    [gguf] = convert(injected, ARCH, "embedded", name="T", tools=toolchain, out_dir=tmp_path_factory.mktemp("gguf"))
    return gguf


@pytest.fixture(scope="module")
def hidden_states(injected, embedded, toolchain, tmp_path_factory):
    return collect_hidden_states(injected, embedded, ARCH, QUICK, toolchain, tmp_path_factory.mktemp("data") / "states")


@pytest.fixture(scope="module")
def realigned(injected, hidden_states, toolchain, tmp_path_factory):
    return realign(injected, hidden_states, ARCH, QUICK, toolchain, tmp_path_factory.mktemp("realign") / "out")


def test_hidden_states_are_the_trunks_own(hidden_states, injected):
    meta = json.loads((hidden_states.path / "hidden-states.json").read_text())
    assert hidden_states.trunk_digest == trunk_digest(injected, ARCH)
    assert hidden_states.sequences == 6 and hidden_states.generated_tokens == 6 * QUICK.n_predict
    assert hidden_states.hidden_size == injected.config["hidden_size"]
    assert all(f.is_file() for f in hidden_states.output_files)
    # Every prompt's tokens and hidden states are stored, one row per position.
    import numpy as np

    tokens = np.load(hidden_states.path / "chunk-00000.tokens.npy")
    hidden = np.load(hidden_states.path / "chunk-00000.hidden.npy")
    assert len(tokens) == len(hidden) == sum(r["length"] for r in meta["sequences"]) == hidden_states.tokens


def test_only_head_tensors_change_and_trunk_shards_are_the_same_files(injected, realigned):
    out = realigned.model
    for entry in injected.path.iterdir():
        if entry.name not in (HEAD_SHARD, INDEX):
            assert os.path.samefile(entry, out.path / entry.name) or \
                sha256_file(entry) == sha256_file(out.path / entry.name), entry.name
    old, _ = read_header(injected.path / HEAD_SHARD)
    new, _ = read_header(out.path / HEAD_SHARD)
    assert set(new) == set(old) == set(ARCH.expected_head(injected.config))
    assert {n: (t.dtype, t.shape) for n, t in new.items()} == {n: (t.dtype, t.shape) for n, t in old.items()}
    trained = [n for n in new if _tensor_bytes(injected.path / HEAD_SHARD, old[n])
               != _tensor_bytes(out.path / HEAD_SHARD, new[n])]
    # Early stopping keeps the step with the best held-out acceptance; at this learning rate the first
    # evaluation already beats the copy, so the head written is a trained one.
    assert realigned.best_step > 0, realigned.heldout_curve
    assert realigned.acceptance_after > realigned.acceptance_before
    assert "mtp.fc.weight" in trained and len(trained) >= 10, trained
    assert trunk_digest(out, ARCH) == trunk_digest(injected, ARCH)
    assert {n: s for n, s in out.weight_map.items() if not ARCH.is_head_tensor(n)} == \
        {n: s for n, s in injected.weight_map.items() if not ARCH.is_head_tensor(n)}
    assert realigned.steps <= QUICK.max_steps and len(realigned.loss_curve) >= 1
    assert 0.0 <= realigned.acceptance_before <= 1.0 and 0.0 <= realigned.acceptance_after <= 1.0
    # The stored states are the ones llama.cpp decoded from: their argmax is the token it generated (up to
    # the rounding of its bf16 products on a near tie).
    assert realigned.trunk_agreement >= 0.99
    assert realigned.head_sha256 == sha256_file(out.path / HEAD_SHARD)


def test_same_seed_same_bytes(injected, hidden_states, realigned, toolchain, tmp_path):
    again = realign(injected, hidden_states, ARCH, QUICK, toolchain, tmp_path / "again")
    assert again.head_sha256 == realigned.head_sha256
    assert again.loss_curve == realigned.loss_curve


def test_refuses_hidden_states_of_another_trunk(injected, hidden_states, demo_pair, toolchain, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(injected.path, other, copy_function=os.link)
    # The base's first shard holds the same tensor names and shapes as the fine-tune's, with other values.
    shard = "model-00001-of-00002.safetensors"
    (other / shard).unlink()
    shutil.copy(demo_pair[0] / shard, other / shard)
    with pytest.raises(TrunkMismatchError, match="another trunk") as caught:
        realign(ModelDir(other, "other"), hidden_states, ARCH, QUICK, toolchain, tmp_path / "never")
    assert "collect the hidden states again" in str(caught.value)
    assert not (tmp_path / "never").exists()


def _tensor_bytes(path, info):
    with path.open("rb") as f:
        f.seek(info.begin)
        return f.read(info.end - info.begin)


@pytest.mark.slow
def test_llama_cpp_accepts_more_drafts_from_the_realigned_head(injected, embedded, toolchain, tmp_path):
    """The issue's claim, measured where it counts: llama.cpp's own draft counts on the bench prompts (none of
    them seen in training), three repetitions, the re-aligned head above the copied one in every repetition."""
    from mtpress.schema import BenchSpec
    from mtpress.stages.bench import bench
    from mtpress.stages.convert import convert

    spec = HeadSpec(source="realign", n_predict=16, max_steps=150, eval_every=25)
    data = collect_hidden_states(injected, embedded, ARCH, spec, toolchain, tmp_path / "states")
    result = realign(injected, data, ARCH, spec, toolchain, tmp_path / "realigned")
    [realigned] = convert(result.model, ARCH, "embedded", name="T", tools=toolchain, out_dir=tmp_path / "gguf")
    measure = BenchSpec(per_domain=1, n_predict=24, repetitions=3, draft_lengths=(1,))

    def per_repetition(gguf):
        configs = [c for c in bench(gguf, None, measure, toolchain).configs if c.draft_n_max]
        assert all(c.matches_plain for c in configs)  # greedy output unchanged, whichever head drafts
        rates = []
        for repetition in range(measure.repetitions):
            samples = [s for c in configs for s in c.samples if s.repetition == repetition]
            rates.append(sum(s.accepted for s in samples) / sum(s.drafted for s in samples))
        return rates

    copied, trained = per_repetition(embedded), per_repetition(realigned)
    assert min(trained) > max(copied), (copied, trained, result.heldout_curve)
