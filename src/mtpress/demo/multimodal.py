"""Demo checkpoints in the layout real Qwen3.5 releases ship: ``Qwen3_5ForConditionalGeneration``.

The text trunk and the MTP head are the text demo's (same weights, same planted cycle and
memories), stored under the multimodal prefixes: ``model.language_model.*`` for the trunk,
``lm_head`` and ``mtp.*`` at the top level, and a small vision tower under ``model.visual.*``.
The configuration is nested (``text_config``, ``vision_config``) and ``preprocessor_config.json``
is present, as the converter's ``--mmproj`` mode requires (conversion/qwen3vl.py, base.py
``MmprojModel``). The vision tower is random: it only has to load and run in llama.cpp.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mtpress.demo.models import (
    DEFAULT_EXTRA_MEMORIES,
    DEFAULT_FINETUNE_NOISE,
    DEFAULT_MAX_SHARD_BYTES,
    TRANSFORMERS_VERSION,
    DemoSpec,
    TensorPlan,
    constant_plan,
    head_plans,
    normal_plan,
    trunk_plans,
    write_json,
    write_weights,
)
from mtpress.demo.tokenizer import write_qwen35_tokenizer
from mtpress.fsutil import atomic_path, write_text_atomic

# Qwen3.5's vision special tokens (they exist in the demo tokenizer: it is Qwen3.5's).
VISION_START_TOKEN_ID = 248053
VISION_END_TOKEN_ID = 248054
IMAGE_TOKEN_ID = 248056
VIDEO_TOKEN_ID = 248057
DEFAULT_BASE_REPO_ID = "mtpress-demo/Tiny-Qwen3.5-VL-Demo-Base"
DEFAULT_FINETUNE_REPO_ID = "mtpress-demo/Tiny-Qwen3.5-VL-Demo-FT"
IMAGE_NAME = "demo-image.png"


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: NOTES' proven depth-1, width-64 tower; ``out_hidden_size`` is the text width."""

    depth: int = 1
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 2
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2  # the converter only splits a temporal patch of 2
    spatial_merge_size: int = 2
    # 2304 = 48² positions: the converter derives image_size 768 from it, as for the real 9B.
    num_position_embeddings: int = 2304

    def config(self, out_hidden_size: int) -> dict:
        return {"deepstack_visual_indexes": [], "depth": self.depth, "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": self.hidden_size, "in_channels": self.in_channels, "initializer_range": 0.02,
                "intermediate_size": self.intermediate_size, "model_type": "qwen3_5",
                "num_heads": self.num_heads, "num_position_embeddings": self.num_position_embeddings,
                "out_hidden_size": out_hidden_size, "patch_size": self.patch_size,
                "spatial_merge_size": self.spatial_merge_size, "temporal_patch_size": self.temporal_patch_size}


@dataclass(frozen=True)
class MultimodalSpec:
    text: DemoSpec = field(default_factory=DemoSpec)
    vision: VisionSpec = field(default_factory=VisionSpec)

    def finetune(self, extra_memories: int = DEFAULT_EXTRA_MEMORIES,
                 noise: float = DEFAULT_FINETUNE_NOISE) -> MultimodalSpec:
        return replace(self, text=self.text.finetune(extra_memories=extra_memories, noise=noise))

    def config(self) -> dict:
        """Nested as transformers writes it: the text keys under ``text_config``, the tower's under
        ``vision_config``; ``tie_word_embeddings`` and the vision token ids at the top level."""
        text = {k: v for k, v in self.text.config().items()
                if k not in ("architectures", "tie_word_embeddings", "transformers_version")}
        return {"architectures": ["Qwen3_5ForConditionalGeneration"], "image_token_id": IMAGE_TOKEN_ID,
                "model_type": "qwen3_5", "text_config": text, "tie_word_embeddings": False,
                "transformers_version": TRANSFORMERS_VERSION, "video_token_id": VIDEO_TOKEN_ID,
                "vision_config": self.vision.config(self.text.hidden_size),
                "vision_end_token_id": VISION_END_TOKEN_ID, "vision_start_token_id": VISION_START_TOKEN_ID}

    def preprocessor_config(self) -> dict:
        v = self.vision
        return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Qwen2VLImageProcessorFast",
                "image_std": [0.5, 0.5, 0.5], "merge_size": v.spatial_merge_size, "patch_size": v.patch_size,
                "rescale_factor": 1 / 255, "size": {"longest_edge": 16777216, "shortest_edge": 65536},
                "temporal_patch_size": v.temporal_patch_size}


def text_plans(spec: MultimodalSpec, *, with_mtp: bool) -> list[TensorPlan]:
    """The text demo's tensors under the multimodal prefixes (``lm_head`` and ``mtp.*`` stay on top)."""
    trunk = [replace(p, name="model.language_model." + p.name.removeprefix("model."))
             if p.name.startswith("model.") else p for p in trunk_plans(spec.text)]
    return trunk + (head_plans(spec.text) if with_mtp else [])


def vision_plans(spec: MultimodalSpec) -> list[TensorPlan]:
    """Qwen3-VL's tower (transformers ``Qwen3_5VisionModel``): patch embedding, position table,
    ``depth`` pre-norm blocks with biases, and the 2×2 patch merger into the text width."""
    v, t = spec.vision, spec.text
    w, p = v.hidden_size, "model.visual."
    merged = w * v.spatial_merge_size ** 2

    def linear(name: str, rows: int, cols: int) -> list[TensorPlan]:
        return [normal_plan(t, name + ".weight", (rows, cols), cols ** -0.5),
                constant_plan(name + ".bias", (rows,), 0.0)]

    def layer_norm(name: str, width: int) -> list[TensorPlan]:
        return [constant_plan(name + ".weight", (width,), 1.0), constant_plan(name + ".bias", (width,), 0.0)]

    plans = [normal_plan(t, p + "patch_embed.proj.weight",
                         (w, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
                         (v.in_channels * v.temporal_patch_size * v.patch_size ** 2) ** -0.5),
             constant_plan(p + "patch_embed.proj.bias", (w,), 0.0),
             normal_plan(t, p + "pos_embed.weight", (v.num_position_embeddings, w), 0.02)]
    for block in range(v.depth):
        b = f"{p}blocks.{block}."
        plans += [*layer_norm(b + "norm1", w), *layer_norm(b + "norm2", w), *linear(b + "attn.qkv", 3 * w, w),
                  *linear(b + "attn.proj", w, w), *linear(b + "mlp.linear_fc1", v.intermediate_size, w),
                  *linear(b + "mlp.linear_fc2", w, v.intermediate_size)]
    return plans + [*layer_norm(p + "merger.norm", w), *linear(p + "merger.linear_fc1", merged, merged),
                    *linear(p + "merger.linear_fc2", t.hidden_size, merged)]


def write_multimodal_model(dest: Path, spec: MultimodalSpec, *, with_mtp: bool, repo_id: str,
                           base_model: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A multimodal checkpoint in ``dest`` (replaced whole, atomically); the head iff ``with_mtp``."""
    plans = text_plans(spec, with_mtp=with_mtp) + vision_plans(spec)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        write_weights(tmp, plans, spec.text, max_shard_bytes)
        write_json(tmp / "config.json", spec.config())
        write_json(tmp / "preprocessor_config.json", spec.preprocessor_config())
        write_qwen35_tokenizer(tmp)
        write_text_atomic(tmp / "README.md", _model_card(spec, repo_id=repo_id, base_model=base_model,
                                                         with_mtp=with_mtp, parameters=sum(p.size for p in plans)))
    return dest


def write_multimodal_base(dest: Path, spec: MultimodalSpec = MultimodalSpec(), *,
                          repo_id: str = DEFAULT_BASE_REPO_ID) -> Path:
    return write_multimodal_model(dest, spec, with_mtp=True, repo_id=repo_id)


def write_multimodal_finetune(dest: Path, base_spec: MultimodalSpec = MultimodalSpec(), *,
                              base_repo_id: str = DEFAULT_BASE_REPO_ID,
                              repo_id: str = DEFAULT_FINETUNE_REPO_ID) -> Path:
    """The fine-tune lost its head; its ``text_config`` still claims one MTP layer."""
    return write_multimodal_model(dest, base_spec.finetune(), with_mtp=False, repo_id=repo_id,
                                  base_model=base_repo_id)


def demo_png(width: int = 64, height: int = 64) -> bytes:
    """A deterministic RGB gradient as a PNG, written with zlib and struct alone."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                       (x + y) * 255 // max(1, width + height - 2)], axis=-1).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)  # filter type 0 on every scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _model_card(spec: MultimodalSpec, *, repo_id: str, base_model: str | None, with_mtp: bool,
                parameters: int) -> str:
    front = ["---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if base_model:
        front += [f"base_model: {base_model}", "base_model_relation: finetune"]
    front += ["tags:", "- qwen3_5", "- mtpress-demo", "---", ""]
    head = ("It ships its multi-token-prediction head (the 15 `mtp.*` tensors)." if with_mtp else
            "Its `text_config` still declares `mtp_num_hidden_layers: 1`, but the checkpoint has **no `mtp.*` "
            "tensors**: the head was lost in fine-tuning.")
    lineage = f"A fine-tune of [{base_model}](https://huggingface.co/{base_model}). " if base_model else ""
    return "\n".join(front) + f"""# {repo_id.rsplit("/", 1)[-1]}

{lineage}A **synthetic** `Qwen3_5ForConditionalGeneration` checkpoint made by mtpress for demos and tests:
the text trunk of the mtpress text demo (random weights with a planted next-token cycle) plus a random
{spec.vision.depth}-block, width-{spec.vision.hidden_size} vision tower. It is not a language model.

{head}

Parameters: {parameters:,} (bfloat16 safetensors).
"""
