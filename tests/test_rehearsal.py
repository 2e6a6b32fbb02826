"""The 9B-shaped rehearsal generator (demo/rehearsal.py): 9B shapes, one-model-of-disk pair, converter round trip."""

from __future__ import annotations

import json
import os

import pytest

from mtpress.demo.models import head_plans, trunk_plans
from mtpress.demo.rehearsal import HEAD_SHARD, rehearsal_spec, write_rehearsal_pair
from mtpress.safetensors_io import read_header
from mtpress.stages.gguf_files import read_gguf_header
from mtpress.toolchain import run_tool

# Small widths for the tests that write files: the layout is what they check, not the 9B figures.
NARROW = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1,
          "linear_num_key_heads": 2, "linear_num_value_heads": 4}


def shapes(plans) -> dict[str, tuple[int, ...]]:
    return {p.name: p.shape for p in plans}


def test_the_spec_has_qwen35_9b_shapes():
    spec = rehearsal_spec()
    trunk = shapes(trunk_plans(spec))
    assert spec.layer_types.count("linear_attention") == 24 and spec.layer_types[3::4] == ("full_attention",) * 8
    assert trunk["model.embed_tokens.weight"] == trunk["lm_head.weight"] == (248320, 4096)
    # As llama.cpp's qwen35 converter derives them: conv dim = 2 × key heads × 128 + value heads × 128.
    assert trunk["model.layers.0.linear_attn.in_proj_qkv.weight"] == (2 * 16 * 128 + 32 * 128, 4096)
    assert trunk["model.layers.0.linear_attn.in_proj_z.weight"] == (32 * 128, 4096)
    assert trunk["model.layers.0.linear_attn.A_log"] == (32,)
    assert trunk["model.layers.3.self_attn.q_proj.weight"] == (2 * 16 * 256, 4096)  # query and gate rows
    assert trunk["model.layers.3.self_attn.k_proj.weight"] == (4 * 256, 4096)
    assert trunk["model.layers.31.mlp.down_proj.weight"] == (4096, 12288)
    assert "model.layers.32.mlp.down_proj.weight" not in trunk
    assert shapes(head_plans(spec))["mtp.fc.weight"] == (4096, 8192)
    # The seed cards: Qwen3.5-9B's MTP head has ~243M parameters.
    assert sum(p.size for p in head_plans(spec)) == pytest.approx(243e6, rel=0.01)
    assert sum(p.size for p in trunk_plans(spec)) == pytest.approx(9.0e9, rel=0.05)


def test_layers_must_keep_the_three_to_one_pattern():
    assert rehearsal_spec(8).layer_types == ("linear_attention",) * 3 + ("full_attention",) + \
        ("linear_attention",) * 3 + ("full_attention",)
    with pytest.raises(ValueError, match="multiple of 4"):
        rehearsal_spec(6)


def test_the_pair_costs_one_model_of_disk(tmp_path):
    spec = rehearsal_spec(4, **NARROW, vocab_size=4096)  # nothing is tokenized here
    base, finetune = write_rehearsal_pair(tmp_path, spec)
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    ft_index = json.loads((finetune / "model.safetensors.index.json").read_text())["weight_map"]
    head = {n for n in base_index if n.startswith("mtp.")}
    assert len(head) == 15 and {base_index[n] for n in head} == {HEAD_SHARD}
    assert ft_index == {n: f for n, f in base_index.items() if n not in head}
    # Every trunk shard of the fine-tune is the base's file (same inode); only the index and card are its own.
    for shard in set(ft_index.values()):
        assert os.stat(finetune / shard).st_ino == os.stat(base / shard).st_ino
    own = {p.name for p in finetune.iterdir() if p.stat().st_nlink == 1}
    assert own == {"model.safetensors.index.json", "README.md"}
    assert not (finetune / HEAD_SHARD).exists()
    assert json.loads((finetune / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    # The headers hold exactly the planned tensors, in BF16.
    written = {}
    for shard in set(base_index.values()):
        infos, _ = read_header(base / shard)
        written |= {name: (info.dtype, info.shape) for name, info in infos.items()}
    assert written == {n: ("BF16", s) for n, s in shapes(trunk_plans(spec) + head_plans(spec)).items()}
    # A second call reuses the pair.
    assert write_rehearsal_pair(tmp_path, spec) == (base, finetune)


@pytest.mark.slow
def test_the_converter_takes_a_layered_rehearsal(toolchain, tmp_path):
    layers = 8
    base, finetune = write_rehearsal_pair(tmp_path / "models", rehearsal_spec(layers, **NARROW))
    out = tmp_path / "gguf"
    out.mkdir()
    run_tool([*toolchain.converter(), str(base), "--outtype", "bf16", "--outfile", str(out / "base.gguf")],
             timeout=600)
    run_tool([*toolchain.converter(), str(finetune), "--outtype", "bf16", "--no-mtp", "--outfile",
              str(out / "finetune.gguf")], timeout=600)
    fields, tensors = read_gguf_header(out / "base.gguf", ["qwen35.block_count", "qwen35.nextn_predict_layers"])
    assert fields == {"qwen35.block_count": layers + 1, "qwen35.nextn_predict_layers": 1}
    assert any(name.startswith(f"blk.{layers}.nextn.") for name, _, _ in tensors)
    fields, tensors = read_gguf_header(out / "finetune.gguf", ["qwen35.block_count"])
    assert fields == {"qwen35.block_count": layers}
    assert not any(name.startswith(f"blk.{layers}.") for name, _, _ in tensors)
