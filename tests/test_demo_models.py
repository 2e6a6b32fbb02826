"""Demo checkpoints: deterministic, laid out like a real sharded repo, head present only in the base,
planted structure that makes MTP acceptance measurable, and Qwen3.5's real tokenizer."""

import json
import unicodedata
from dataclasses import replace
from hashlib import sha256
from pathlib import Path

import numpy as np
import pytest
import regex
import yaml

from mtpress.archs import get_arch
from mtpress.demo.models import (
    BENCHMARK_SPEC,
    DEFAULT_MAX_SHARD_BYTES,
    DemoSpec,
    head_plans,
    split_into_shards,
    successor,
    trunk_plans,
    write_demo_base,
    write_demo_finetune,
    write_demo_model,
)
from mtpress.demo.tokenizer import byte_to_unicode, write_qwen35_tokenizer
from mtpress.fsutil import sha256_file
from mtpress.safetensors_io import bf16_bytes_to_f32, read_header, read_tensor_bytes

ARCH = get_arch("qwen35")
# Full architecture, small vocabulary: every property but the tokenizer's holds at this size.
SMALL = DemoSpec(vocab_size=4096)
SMALL_SHARD_BYTES = 2 * 1024 * 1024  # forces several shards
BASE_REPO = "mtpress-test/Demo-Base"
# The converter's checksum for Qwen3.5's pre-tokenizer (conversion/base.py, "qwen35", Qwen3.5-9B-Instruct).
QWEN35_CHKHSH = "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4"
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    base = write_demo_model(root / "base", SMALL, with_mtp=True, repo_id=BASE_REPO, max_shard_bytes=SMALL_SHARD_BYTES)
    tune = write_demo_model(root / "ft", SMALL.finetune(), with_mtp=False, repo_id="mtpress-test/Demo-FT",
                            base_model=BASE_REPO, max_shard_bytes=SMALL_SHARD_BYTES)
    return base, tune


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("tokenizer")
    write_qwen35_tokenizer(dest)
    return dest


def tensors_of(model: Path) -> dict[str, tuple[Path, object]]:
    """Every tensor of a checkpoint, read through its index: name → (shard, TensorInfo)."""
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    headers = {shard: read_header(model / shard)[0] for shard in set(weight_map.values())}
    return {name: (model / shard, headers[shard][name]) for name, shard in weight_map.items()}


def load(model: Path, name: str) -> np.ndarray:
    shard, info = tensors_of(model)[name]
    return bf16_bytes_to_f32(read_tensor_bytes(shard, info), info.shape)


def test_same_spec_gives_byte_identical_files(small_pair, tmp_path):
    base, _ = small_pair
    again = write_demo_model(tmp_path / "again", SMALL, with_mtp=True, repo_id=BASE_REPO,
                             max_shard_bytes=SMALL_SHARD_BYTES)
    digests = {p.name: sha256_file(p) for p in base.iterdir()}
    assert {p.name: sha256_file(p) for p in again.iterdir()} == digests
    other_seed = write_demo_model(tmp_path / "seed1", DemoSpec(vocab_size=4096, seed=1), with_mtp=True,
                                  repo_id=BASE_REPO, max_shard_bytes=SMALL_SHARD_BYTES)
    changed = {p.name for p in other_seed.glob("*.safetensors") if sha256_file(p) != digests[p.name]}
    assert changed == {p.name for p in base.glob("*.safetensors")}


def test_config_declares_everything_the_converter_reads(small_pair):
    for model in small_pair:
        config = json.loads((model / "config.json").read_text())
        assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["model_type"] == "qwen3_5_text"
        assert config["mtp_num_hidden_layers"] == 1  # the fine-tune keeps the key although its head is gone
        assert config["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + \
            ["linear_attention"] * 3 + ["full_attention"]
        assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                             "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        assert {k: config[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
            "attn_output_gate", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
            "linear_num_key_heads", "linear_num_value_heads", "full_attention_interval",
            "mtp_use_dedicated_embeddings", "eos_token_id", "dtype")} == {
            "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attn_output_gate": True,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4, "full_attention_interval": 4,
            "mtp_use_dedicated_embeddings": False, "eos_token_id": 248046, "dtype": "bfloat16"}
        generation = json.loads((model / "generation_config.json").read_text())
        assert generation["eos_token_id"][0] == config["eos_token_id"]


def test_index_and_shards_agree(small_pair):
    for model in small_pair:
        index = json.loads((model / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards == sorted(p.name for p in model.glob("model-*.safetensors"))
        assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        in_shards = {}
        for shard in shards:
            header, metadata = read_header(model / shard)
            assert metadata == {"format": "pt"}
            in_shards |= {name: (shard, info) for name, info in header.items()}
        assert {name: shard for name, (shard, _) in in_shards.items()} == index["weight_map"]
        assert {info.dtype for _, info in in_shards.values()} == {"BF16"}
        assert index["metadata"]["total_size"] == sum(info.end - info.begin for _, info in in_shards.values())


def test_default_model_is_two_shards_with_the_head_in_the_last():
    spec = DemoSpec()
    shards = split_into_shards(trunk_plans(spec) + head_plans(spec), DEFAULT_MAX_SHARD_BYTES)
    assert len(shards) == 2
    assert {p.name for p in head_plans(spec)} <= {p.name for p in shards[1]}
    assert 270e6 < sum(p.nbytes for shard in shards for p in shard) < 280e6


def test_base_has_exactly_the_head_the_config_implies_and_the_finetune_none(small_pair):
    base, tune = small_pair
    config = json.loads((base / "config.json").read_text())
    head = {name: info.shape for name, (_, info) in tensors_of(base).items() if name.startswith("mtp.")}
    assert head == ARCH.expected_head(config) and len(head) == 15
    assert not [name for name in tensors_of(tune) if ARCH.is_head_tensor(name)]


def test_finetune_has_the_base_trunk_shapes_with_nearby_weights(small_pair):
    base, tune = small_pair
    base_trunk = {n: (i.dtype, i.shape) for n, (_, i) in tensors_of(base).items() if not n.startswith("mtp.")}
    assert {n: (i.dtype, i.shape) for n, (_, i) in tensors_of(tune).items()} == base_trunk
    before, after = load(base, "model.embed_tokens.weight"), load(tune, "model.embed_tokens.weight")
    relative = np.abs(after - before).mean() / np.abs(before).mean()
    assert 0.003 < relative < 0.03  # ~1 % noise, not a different model


def approximate_next_tokens(model: Path, spec: DemoSpec, tokens: np.ndarray) -> np.ndarray:
    """Greedy next tokens if every layer but the memory layer's MLP wrote nothing (they write ~1 %)."""
    def rms_norm(v):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + spec.rms_norm_eps)

    mlp = f"model.layers.{spec.memory_layer}.mlp."
    gate, up, down = (load(model, mlp + part + "_proj.weight") for part in ("gate", "up", "down"))
    residual = load(model, "model.embed_tokens.weight")[tokens]
    x = rms_norm(residual)
    pre = x @ gate.T
    residual = residual + (pre / (1 + np.exp(-pre)) * (x @ up.T)) @ down.T
    return np.argmax(rms_norm(residual) @ load(model, "lm_head.weight").T, axis=1)


def test_trunk_follows_the_cycle_except_where_memories_fire(small_pair):
    """What the head predicts (the cycle) is right ~90 % of the time for the base, clearly less for the fine-tune."""
    base, tune = small_pair
    tokens = np.arange(SMALL.ordinary_tokens)
    succ = successor(SMALL)
    assert np.array_equal(np.sort(succ), tokens) and not np.any(succ == tokens)
    without_memories = write_demo_model(base.parent / "no-memories", DemoSpec(vocab_size=4096, n_memories=0),
                                        with_mtp=False, repo_id="x/y")
    assert np.array_equal(approximate_next_tokens(without_memories, SMALL, tokens), succ)
    base_rate = np.mean(approximate_next_tokens(base, SMALL, tokens) != succ)
    tune_rate = np.mean(approximate_next_tokens(tune, SMALL.finetune(), tokens) != succ)
    assert 0.06 < base_rate < 0.15 and 0.18 < tune_rate < 0.35


def test_wider_models_keep_the_same_memory_coverage(tmp_path):
    """The benchmark's hidden size must not change how often memories fire, or its acceptance would."""
    spec = replace(BENCHMARK_SPEC, vocab_size=4096, num_hidden_layers=4)
    model = write_demo_model(tmp_path / "wide", spec, with_mtp=False, repo_id="x/wide")
    tokens = np.arange(spec.ordinary_tokens)
    assert 0.06 < np.mean(approximate_next_tokens(model, spec, tokens) != successor(spec)) < 0.15


def test_model_cards_look_like_upstream_repos(small_pair):
    base, tune = small_pair
    for model, base_model in ((base, None), (tune, BASE_REPO)):
        text = (model / "README.md").read_text()
        front = yaml.safe_load(text.split("---\n")[1])
        assert front["license"] == "apache-2.0" and front.get("base_model") == base_model
    assert "no `mtp.*`" in (tune / "README.md").read_text()


def test_wrappers_write_base_with_head_and_finetune_without(tmp_path):
    spec = DemoSpec(vocab_size=2048, hidden_size=64, intermediate_size=256, num_hidden_layers=4, head_dim=64,
                    linear_key_head_dim=32, linear_value_head_dim=32, mrope_section=(4, 2, 2), n_memories=4)
    base = write_demo_base(tmp_path / "base", spec)
    tune = write_demo_finetune(tmp_path / "ft", spec, base_repo_id="someone/base", extra_memories=8)
    assert sum(name.startswith("mtp.") for name in tensors_of(base)) == 15
    assert not any(name.startswith("mtp.") for name in tensors_of(tune))
    assert "base_model: someone/base" in (tune / "README.md").read_text()


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="mrope_section"):
        DemoSpec(head_dim=256)
    with pytest.raises(ValueError, match="linear_key_head_dim"):
        DemoSpec(linear_value_head_dim=128)
    with pytest.raises(ValueError, match="MLP units"):
        DemoSpec(n_memories=400)


def test_tokenizer_is_qwen35s_byte_level_bpe(tokenizer_dir):
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer["model"]
    assert model["type"] == "BPE" and len(model["vocab"]) == 248044 and len(tokenizer["added_tokens"]) == 33
    assert sorted(model["vocab"].values()) == list(range(248044))
    assert [t["id"] for t in tokenizer["added_tokens"]] == list(range(248044, 248077))
    assert 247000 < len(model["merges"]) < 248044 - 256  # a few hundred tokens have no merge
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["added_tokens_decoder"]["248046"]["content"] == "<|im_end|>"
    assert "<|im_start|>assistant" in config["chat_template"]


def test_tokenizer_merges_reproduce_the_converters_qwen35_checksum(tokenizer_dir):
    """HF's BPE on the converter's check text, in Python: the token ids hash to the `qwen35` entry."""
    tokenizer = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    priority = {tuple(pair): i for i, pair in enumerate(tokenizer["model"]["merges"])}
    split = tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    to_char = byte_to_unicode()
    ids = []
    for piece in regex.findall(split, unicodedata.normalize("NFC", CHKTXT)):
        parts = [to_char[b] for b in piece.encode()]
        while len(parts) > 1:
            ranked = [(priority.get(pair, len(priority)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            best, i = min(ranked)
            if best == len(priority):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    assert sha256(str(ids).encode()).hexdigest() == QWEN35_CHKHSH


def test_tokenizer_loads_with_the_tokenizers_package(tokenizer_dir):
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tokenizer.encode(CHKTXT, add_special_tokens=False).ids
    assert sha256(str(ids).encode()).hexdigest() == QWEN35_CHKHSH


def test_tokenizer_rebuild_is_byte_identical(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MTPRESS_CACHE", str(tmp_path / "cache"))
    write_qwen35_tokenizer(tmp_path / "rebuilt")
    assert (tmp_path / "cache" / "tokenizer").is_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert sha256_file(tmp_path / "rebuilt" / name) == sha256_file(tokenizer_dir / name)
