"""A Qwen3.5-9B-shaped rehearsal pair: exact 9B widths and vocabulary, random weights, any number of layers.

The demo generator (``models.py``) already writes every Qwen3.5 tensor from a ``DemoSpec``; this module only sets
the 9B configuration and lays the pair out so it costs one model of disk:

* the base's trunk shards hold no ``mtp.*`` tensor; its head has a shard of its own (``model-mtp.safetensors``);
* the fine-tune is the base that lost its head: its trunk shards are hard links of the base's, only its index and
  model card are its own (the config still claims ``mtp_num_hidden_layers: 1``), its other files are hard links.

Writing holds one shard at a time (``SHARD_BYTES``), or one vocabulary matrix (248320 × 4096 BF16 = 2.03 GB) plus a
float32 row chunk. The tokenizer is the demo's: it is Qwen3.5's own vocabulary, and 248320 is its padded size.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from mtpress.demo import models, tokenizer
from mtpress.demo.models import DemoSpec, head_plans, split_into_shards, trunk_plans, write_json, write_shard
from mtpress.fsutil import atomic_path, write_text_atomic

BASE_REPO_ID = "mtpress-rehearsal/Qwen3.5-9B-Rehearsal-Base"
FINETUNE_REPO_ID = "mtpress-rehearsal/Qwen3.5-9B-Rehearsal-FT"
HEAD_SHARD = "model-mtp.safetensors"
# 1 GB shards: writing holds one of them, and no vocabulary matrix shares a shard with anything else.
SHARD_BYTES = 1_000_000_000

# Qwen3.5-9B's text config: 32 layers, 3 Gated DeltaNet to 1 gated full attention, one MTP layer. Linear
# attention: 16 key heads and 32 value heads of 128 (conv dim 8192, value dim 4096), as llama.cpp's qwen35
# converter reads them (ssm_d_inner = value heads × head dim, ssm_n_group = key heads).
QWEN35_9B = DemoSpec(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                     num_key_value_heads=4, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                     linear_key_head_dim=128, linear_value_head_dim=128, mrope_section=(11, 11, 10))


def rehearsal_spec(layers: int = 32, **overrides) -> DemoSpec:
    """The 9B configuration with ``layers`` layers (a multiple of 4: the 3:1 pattern stays whole).

    ``overrides`` (e.g. a smaller ``hidden_size``) only suit tests that check the layout, not the 9B figures.
    """
    if layers < 4 or layers % 4:
        raise ValueError(f"layers must be a positive multiple of 4 (3 linear + 1 full attention), got {layers}")
    return replace(QWEN35_9B, num_hidden_layers=layers, **overrides)


def write_rehearsal_pair(root: Path, spec: DemoSpec | None = None, *, base_repo: str = BASE_REPO_ID,
                         finetune_repo: str = FINETUNE_REPO_ID) -> tuple[Path, Path]:
    """Generate (or reuse) the base and fine-tune under ``root``; keyed by the spec and the generator's code."""
    spec = spec or rehearsal_spec()
    sources = "\n".join(inspect.getsource(m) for m in (models, tokenizer, sys.modules[__name__]))
    key = hashlib.sha256("\n".join([repr(spec), base_repo, finetune_repo, sources]).encode()).hexdigest()[:16]
    base, finetune = root / key / "base", root / key / "finetune"
    if not base.is_dir():
        write_rehearsal_base(base, spec, repo_id=base_repo)
    if not finetune.is_dir():
        link_finetune(base, finetune, spec, base_repo=base_repo, repo_id=finetune_repo)
    return base, finetune


def write_rehearsal_base(dest: Path, spec: DemoSpec, *, repo_id: str) -> Path:
    """The base: trunk shards of at most SHARD_BYTES, the 15 ``mtp.*`` tensors in HEAD_SHARD, index, config, card."""
    trunk, head = trunk_plans(spec), head_plans(spec)
    shards = split_into_shards(trunk, SHARD_BYTES)
    weight_map = {}
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for number, shard in enumerate(shards, start=1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            write_shard(tmp / filename, shard, spec)
            weight_map |= {p.name: filename for p in shard}
        write_shard(tmp / HEAD_SHARD, head, spec)
        weight_map |= {p.name: HEAD_SHARD for p in head}
        write_index(tmp, weight_map, {p.name: p.size for p in trunk + head})
        write_json(tmp / "config.json", spec.config())
        write_json(tmp / "generation_config.json", {
            "do_sample": True, "eos_token_id": [models.EOS_TOKEN_ID, models.PAD_TOKEN_ID],
            "pad_token_id": models.PAD_TOKEN_ID, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
            "transformers_version": models.TRANSFORMERS_VERSION})
        tokenizer.write_qwen35_tokenizer(tmp)
        write_text_atomic(tmp / "README.md", models.model_card(
            spec, repo_id=repo_id, base_model=None, with_mtp=True, parameters=sum(p.size for p in trunk + head)))
    return dest


def link_finetune(base: Path, dest: Path, spec: DemoSpec, *, base_repo: str, repo_id: str) -> Path:
    """The base without its head: every file a hard link of the base's except the index (no ``mtp.*``) and card."""
    trunk = trunk_plans(spec)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map = {name: file for name, file in index["weight_map"].items() if not name.startswith("mtp.")}
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for path in base.iterdir():
            if path.name not in (HEAD_SHARD, "model.safetensors.index.json", "README.md"):
                os.link(path, tmp / path.name)
        write_index(tmp, weight_map, {p.name: p.size for p in trunk})
        write_text_atomic(tmp / "README.md", models.model_card(
            spec, repo_id=repo_id, base_model=base_repo, with_mtp=False, parameters=sum(p.size for p in trunk)))
    return dest


def write_index(folder: Path, weight_map: dict[str, str], sizes: dict[str, int]) -> None:
    parameters = sum(sizes.values())
    write_json(folder / "model.safetensors.index.json", {
        "metadata": {"total_parameters": parameters, "total_size": 2 * parameters},
        "weight_map": dict(sorted(weight_map.items()))})
