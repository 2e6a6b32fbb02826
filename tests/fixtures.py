"""Small hand-built checkpoints for tests that need exact control over tensors and config."""

import json
from pathlib import Path

import numpy as np

from mtpress.archs import get_arch
from mtpress.checkpoint import INDEX, ModelDir
from mtpress.safetensors_io import f32_to_bf16_bytes, write_safetensors

ARCH = get_arch("qwen35")
SMALL = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 32, "vocab_size": 300, "attn_output_gate": True, "mtp_num_hidden_layers": 1,
         "layer_types": ["linear_attention", "full_attention"]}


def make_checkpoint(path: Path, *, with_head: bool, seed: int, dtype: str = "BF16", single_file: bool = False,
                    multimodal: bool = False, extra_head: dict[str, tuple[int, ...]] | None = None,
                    **overrides) -> ModelDir:
    """A small two-shard checkpoint: a few trunk tensors plus (optionally) the exact head the config implies.

    ``single_file``: one ``model.safetensors`` and no index. ``multimodal``: the
    ``Qwen3_5ForConditionalGeneration`` layout (nested ``text_config``, ``model.language_model.`` trunk, a
    vision tensor). ``tie_word_embeddings=True`` leaves ``lm_head`` out. ``extra_head``: more ``mtp.*`` tensors.
    """
    config = SMALL | overrides
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    trunk = "model."
    if multimodal:
        text = {k: v for k, v in config.items() if k not in ("architectures", "tie_word_embeddings")}
        config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                  "tie_word_embeddings": config.get("tie_word_embeddings", False), "text_config": text,
                  "vision_config": {"depth": 1, "hidden_size": 16, "out_hidden_size": config["hidden_size"]}}
        trunk = "model.language_model."
    (path / "config.json").write_text(json.dumps(config))
    config = ARCH.text_config(config)

    def tensor(name, shape):
        values = rng.standard_normal(shape).astype(np.float32)
        raw = f32_to_bf16_bytes(values) if dtype == "BF16" else values.astype(
            {"F16": np.float16, "F32": np.float32}[dtype]).tobytes()
        return name, dtype, shape, raw

    h, v = config["hidden_size"], config["vocab_size"]
    shard1 = [tensor(trunk + "embed_tokens.weight", (v, h)), tensor(trunk + "norm.weight", (h,))]
    if multimodal:
        shard1.append(tensor("model.visual.blocks.0.norm1.weight", (16,)))
    shard2 = [] if config.get("tie_word_embeddings") else [tensor("lm_head.weight", (v, h))]
    if with_head:
        head = ARCH.expected_head(config) | (extra_head or {})
        shard2 += [tensor(name, shape) for name, shape in sorted(head.items())]
    if single_file:
        write_safetensors(path / "model.safetensors", shard1 + shard2)
        return ModelDir(path, path.name)
    weight_map = {}
    for shard_name, tensors in (("model-00001-of-00002.safetensors", shard1),
                                ("model-00002-of-00002.safetensors", shard2)):
        write_safetensors(path / shard_name, tensors)
        weight_map |= {name: shard_name for name, *_ in tensors}
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ModelDir(path, path.name)
