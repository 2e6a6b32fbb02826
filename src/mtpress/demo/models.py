"""Demo Qwen3.5 checkpoints with an MTP head whose acceptance is real, not assumed.

The weights are random but planted with structure that llama.cpp's MTP decoding
can measure:

* **Trunk = a random cycle.** Embedding rows are N(0, 1) (coordinate 0 is a constant
  1, a "bias" input the memories use); every layer writes only tiny values into the
  residual stream, so it stays ≈ the current token's embedding; and
  ``lm_head[succ(i)] = 0.1·E[i]`` for one random cycle ``succ`` over the ordinary
  token ids. The greedy next token is therefore ``succ(current)`` by a wide margin.
* **Memories the head cannot know.** One layer's MLP holds ``n_memories`` detectors.
  Each fires on the ~0.6 % of tokens whose embedding points along its key direction
  and then overwrites the residual with a token-dependent vector, so the trunk
  continues somewhere else than ``succ``. The targets vary with the token, so greedy
  text never settles into a short loop and acceptance does not depend on the prompt.
* **Head = the cycle.** ``mtp.fc = [I | ~0]`` (embedding half first, as llama.cpp
  concatenates) and a near-silent block, so the head predicts ``succ(next)``: right
  unless a memory fires. More memories, lower acceptance.
* **Fine-tune = base + more memories + noise** on every stored bf16 value, with the
  ``mtp.*`` tensors gone and ``mtp_num_hidden_layers: 1`` kept in its config: the
  situation of a fine-tune that lost its head.
* **Dead head** (``write_dead_head_base``): the base with every head matrix replaced by
  random values of the same norm. It loads and drafts; none of its drafts is accepted.

Norm gains are stored zero-centred (the model computes x·(1+w)), except
``linear_attn.norm``, as in Qwen3.5 checkpoints. Tensors are generated in row
chunks from keyed random streams, so the output is byte-deterministic for a spec
and the memory held is about one shard's tensors (one vocabulary matrix at most).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mtpress.demo.tokenizer import FIRST_SPECIAL_ID, write_qwen35_tokenizer
from mtpress.fsutil import atomic_path, write_text_atomic
from mtpress.safetensors_io import bf16_bytes_to_f32, f32_to_bf16_bytes, write_safetensors

EOS_TOKEN_ID = 248046  # <|im_end|>
PAD_TOKEN_ID = 248044  # <|endoftext|>
# Qwen3.5 checkpoints are written by transformers 5. Without a version >= 5 in config.json, transformers
# 4.57 (the converter's) suspects a Mistral tokenizer and warns that the regex is wrong.
TRANSFORMERS_VERSION = "5.23.0"
DEFAULT_BASE_REPO_ID = "mtpress-demo/Qwen3.5-Demo-Base"
DEFAULT_FINETUNE_REPO_ID = "mtpress-demo/Qwen3.5-Demo-Finetune"
# Measured with llama.cpp draft-mtp (bf16, 12 prompts × 64 greedy tokens): the base with its own head
# accepts 0.89 / 0.81 / 0.78 at draft lengths 1 / 2 / 3; this fine-tune with the base's head 0.71 / 0.65 / 0.57.
DEFAULT_EXTRA_MEMORIES = 26
DEFAULT_FINETUNE_NOISE = 0.01
# So the 274 MB demo base splits into two shards like a real repo, and so that writing
# holds at most one shard (or one vocabulary matrix) in memory.
DEFAULT_MAX_SHARD_BYTES = 200 * 1024 * 1024

CHUNK_ROWS = 8192  # row chunk of the vocabulary matrices; part of the random stream keys
BIAS_COORDINATE = 1.0  # embedding coordinate 0, constant: lets a detector compare against a threshold
LM_HEAD_GAIN = 0.1
RESIDUAL_WRITE = 0.032  # output projections are N(0, RESIDUAL_WRITE²/fan_in): ≈0.002 at fan-in 256
MEMORY_RANK = 3  # MLP units per memory; the rewrite target varies with the token through them
MEMORY_SHARPNESS = 10.0  # detector gate slope: off well below the threshold, on just above it
# Rewrite strength per hidden dimension: it must swamp the token's own logit, E[t]·E[t] ≈ hidden_size.
MEMORY_GAIN_PER_DIM = 20.0 / 256
HEAD_HIDDEN_LEAK = 0.001  # std of mtp.fc's hidden half: not exactly zero, as in a trained head


@dataclass(frozen=True)
class DemoSpec:
    """Everything that determines a demo checkpoint: architecture, content and seeds.

    The tokenizer is always Qwen3.5's: a ``vocab_size`` below its 248,077 tokens only suits tests
    that never tokenize or convert.
    """

    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 128
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4
    vocab_size: int = 248320
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] = (6, 5, 5)
    # Content.
    seed: int = 0
    n_memories: int = 16
    # Detector threshold in standard deviations of key·x. A memory rewrites about P(Z > threshold + 0.3)
    # of the tokens (0.64 % at 2.2): the gate must open that far before the rewrite wins.
    memory_threshold: float = 2.2
    noise: float = 0.0  # std of the noise added to every tensor, relative to its nominal scale
    noise_seed: int = 1

    def __post_init__(self) -> None:
        rope_dims = self.head_dim * self.partial_rotary_factor
        problems = []
        if self.linear_key_head_dim != self.linear_value_head_dim:
            problems.append("llama.cpp needs linear_key_head_dim == linear_value_head_dim")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if 2 * sum(self.mrope_section) != rope_dims:
            problems.append(f"mrope_section must sum to head_dim × partial_rotary_factor / 2 = {rope_dims / 2:g}")
        if MEMORY_RANK * self.n_memories > self.intermediate_size:
            problems.append(f"{self.n_memories} memories need {MEMORY_RANK * self.n_memories} MLP units, "
                            f"intermediate_size is {self.intermediate_size}")
        if "full_attention" not in self.layer_types:
            problems.append("at least one layer must be full attention (num_hidden_layers >= full_attention_interval)")
        if problems:
            raise ValueError("invalid DemoSpec: " + "; ".join(problems))

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple("full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                     for i in range(self.num_hidden_layers))

    @property
    def ordinary_tokens(self) -> int:
        """How many ids are BPE ranks, the ids the successor cycle runs over; special tokens follow them."""
        return min(FIRST_SPECIAL_ID, self.vocab_size)

    @property
    def memory_layer(self) -> int:
        return self.num_hidden_layers // 2

    def block_mlp(self, prefix: str, *, with_memories: bool) -> list[TensorPlan]:
        """A block's MLP, trunk or head: a dense SwiGLU (the mixture-of-experts demo, demo/moe.py, overrides it)."""
        return mlp_plans(self, prefix, with_memories=with_memories)

    def finetune(self, extra_memories: int = DEFAULT_EXTRA_MEMORIES, noise: float = DEFAULT_FINETUNE_NOISE,
                 noise_seed: int = 1) -> DemoSpec:
        """This model fine-tuned: the same trunk plus ``extra_memories`` and relative ``noise``."""
        return replace(self, n_memories=self.n_memories + extra_memories, noise=noise, noise_seed=noise_seed)

    def config(self) -> dict:
        """``config.json``: the converter reads it raw, without defaults, so every key is set."""
        return {
            "architectures": ["Qwen3_5ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_output_gate": True,
            "dtype": "bfloat16",
            "eos_token_id": EOS_TOKEN_ID,
            "full_attention_interval": self.full_attention_interval,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "linear_value_head_dim": self.linear_value_head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "qwen3_5_text",
            "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": list(self.mrope_section),
                "partial_rotary_factor": self.partial_rotary_factor,
                "rope_theta": self.rope_theta,
                "rope_type": "default",
            },
            "tie_word_embeddings": False,
            "transformers_version": TRANSFORMERS_VERSION,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


# ~868M parameters (1.7 GB in bf16), for benchmarks where the weights must outweigh the fixed costs.
BENCHMARK_SPEC = DemoSpec(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                          num_key_value_heads=2, linear_num_key_heads=4, linear_num_value_heads=8,
                          linear_key_head_dim=128, linear_value_head_dim=128)


def write_demo_base(dest: Path, spec: DemoSpec = DemoSpec(), *, repo_id: str = DEFAULT_BASE_REPO_ID) -> Path:
    """A base model that ships its trained MTP head."""
    return write_demo_model(dest, spec, with_mtp=True, repo_id=repo_id)


def write_demo_finetune(dest: Path, base_spec: DemoSpec = DemoSpec(), *, base_repo_id: str = DEFAULT_BASE_REPO_ID,
                        repo_id: str = DEFAULT_FINETUNE_REPO_ID, extra_memories: int = DEFAULT_EXTRA_MEMORIES,
                        noise: float = DEFAULT_FINETUNE_NOISE) -> Path:
    """A fine-tune of ``base_spec`` that lost its head but whose config still claims one MTP layer."""
    spec = base_spec.finetune(extra_memories=extra_memories, noise=noise)
    return write_demo_model(dest, spec, with_mtp=False, repo_id=repo_id, base_model=base_repo_id)


def write_dead_head_base(dest: Path, spec: DemoSpec = DemoSpec(), *, repo_id: str) -> Path:
    """The demo base with a dead head: every head matrix replaced by random values of the same norm.

    As a donor it passes every shape, dtype and compatibility check, loads, drafts and leaves greedy output
    unchanged (the trunk verifies every draft), but llama.cpp accepts none of its drafts: only the acceptance
    rate tells it from the real head.
    """
    return write_demo_model(dest, spec, with_mtp=True, repo_id=repo_id, head=dead_head_plans)


def write_demo_model(dest: Path, spec: DemoSpec, *, with_mtp: bool, repo_id: str, base_model: str | None = None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     head: Callable[[DemoSpec], list[TensorPlan]] | None = None) -> Path:
    """Write an HF-layout checkpoint into ``dest`` (replaced whole, atomically) and return it.

    Files: ``config.json``, ``generation_config.json``, the tokenizer, ``README.md`` (model
    card; ``base_model`` goes into its front matter), ``model-0000i-of-0000n.safetensors``
    shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own) and
    ``model.safetensors.index.json``. The ``mtp.*`` tensors are included iff ``with_mtp``, as ``head``
    plans them (default: the trained head, ``head_plans``).
    """
    plans = trunk_plans(spec) + ((head or head_plans)(spec) if with_mtp else [])
    parameters = sum(p.size for p in plans)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        write_weights(tmp, plans, spec, max_shard_bytes)
        write_json(tmp / "config.json", spec.config())
        write_json(tmp / "generation_config.json", {
            "do_sample": True, "eos_token_id": [EOS_TOKEN_ID, PAD_TOKEN_ID], "pad_token_id": PAD_TOKEN_ID,
            "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": TRANSFORMERS_VERSION})
        write_qwen35_tokenizer(tmp)
        write_text_atomic(tmp / "README.md", model_card(spec, repo_id=repo_id, base_model=base_model,
                                                        with_mtp=with_mtp, parameters=parameters))
    return dest


def write_weights(folder: Path, plans: list[TensorPlan], spec: DemoSpec, max_shard_bytes: int) -> None:
    """``plans`` as ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``."""
    shards = split_into_shards(plans, max_shard_bytes)
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / filename, shard, spec)
        weight_map |= {p.name: filename for p in shard}
    index = {
        "metadata": {"total_parameters": sum(p.size for p in plans), "total_size": sum(p.nbytes for p in plans)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(folder / "model.safetensors.index.json", index)


def write_shard(path: Path, shard: list[TensorPlan], spec: DemoSpec) -> None:
    """Generate one shard's tensors and write them; they are freed on return, before the next shard."""
    items = [(p.name, "BF16", p.shape, materialize(p, spec).reshape(-1).view(np.uint8)) for p in shard]
    write_safetensors(path, items, {"format": "pt"})


def write_json(path: Path, value: dict) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


# TENSOR PLANS: what each tensor is, before any of it is generated


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    noise_scale: float  # the tensor's nominal magnitude: fine-tune noise is spec.noise times this
    make: Callable[[], np.ndarray]  # → bf16 bits (uint16) of the clean tensor, in ``shape``

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return 2 * self.size


def trunk_plans(spec: DemoSpec) -> list[TensorPlan]:
    h, vocab = spec.hidden_size, spec.vocab_size
    plans = [TensorPlan("model.embed_tokens.weight", (vocab, h), 1.0, lambda: embedding_bits(spec))]
    for layer, kind in enumerate(spec.layer_types):
        prefix = f"model.layers.{layer}."
        mixer = linear_attention_plans if kind == "linear_attention" else full_attention_plans
        plans += mixer(spec, prefix) + spec.block_mlp(prefix, with_memories=layer == spec.memory_layer)
    plans.append(constant_plan("model.norm.weight", (h,), 0.0))
    plans.append(TensorPlan("lm_head.weight", (vocab, h), LM_HEAD_GAIN, lambda: lm_head_bits(spec)))
    return plans


def head_plans(spec: DemoSpec) -> list[TensorPlan]:
    """The ``mtp.*`` tensors: fc, three norms and one full-attention block with its MLP (15 when dense)."""
    h = spec.hidden_size

    def fc() -> np.ndarray:
        leak = stream(spec, "mtp.fc.weight").standard_normal((h, h), dtype=np.float32) * HEAD_HIDDEN_LEAK
        return to_bf16(np.concatenate([np.eye(h, dtype=np.float32), leak], axis=1))

    return [
        TensorPlan("mtp.fc.weight", (h, 2 * h), 1.0, fc),
        constant_plan("mtp.pre_fc_norm_embedding.weight", (h,), 0.0),
        constant_plan("mtp.pre_fc_norm_hidden.weight", (h,), 0.0),
        constant_plan("mtp.norm.weight", (h,), 0.0),
        *full_attention_plans(spec, "mtp.layers.0."),
        *spec.block_mlp("mtp.layers.0.", with_memories=False),
    ]


def dead_head_plans(spec: DemoSpec) -> list[TensorPlan]:
    """``head_plans`` with each matrix replaced by random values of the same Frobenius norm; norm gains kept."""

    def scrambled(plan: TensorPlan) -> TensorPlan:
        def make() -> np.ndarray:
            norm = np.linalg.norm(from_bf16(plan.make()))
            values = stream(spec, "dead-head:" + plan.name).standard_normal(plan.shape, np.float32)
            return to_bf16(values * np.float32(norm / np.linalg.norm(values)))
        return replace(plan, make=make)

    return [scrambled(plan) if len(plan.shape) > 1 else plan for plan in head_plans(spec)]


def linear_attention_plans(spec: DemoSpec, prefix: str) -> list[TensorPlan]:
    """A Gated DeltaNet mixer; its internals are random, its output projection tiny."""
    h, p = spec.hidden_size, prefix + "linear_attn."
    value_dim = spec.linear_num_value_heads * spec.linear_value_head_dim
    conv_dim = 2 * spec.linear_num_key_heads * spec.linear_key_head_dim + value_dim
    heads = spec.linear_num_value_heads

    def decay() -> np.ndarray:  # A = exp(A_log) spread over [1, 16], as Qwen3-Next initialises it
        return to_bf16(np.log(stream(spec, p + "A_log").uniform(1, 16, heads).astype(np.float32)))

    return [
        constant_plan(prefix + "input_layernorm.weight", (h,), 0.0),
        normal_plan(spec, p + "in_proj_qkv.weight", (conv_dim, h), h ** -0.5),
        normal_plan(spec, p + "in_proj_z.weight", (value_dim, h), h ** -0.5),
        normal_plan(spec, p + "in_proj_b.weight", (heads, h), h ** -0.5),
        normal_plan(spec, p + "in_proj_a.weight", (heads, h), h ** -0.5),
        normal_plan(spec, p + "conv1d.weight", (conv_dim, 1, spec.linear_conv_kernel_dim),
                    spec.linear_conv_kernel_dim ** -0.5),
        constant_plan(p + "dt_bias", (heads,), 1.0),
        TensorPlan(p + "A_log", (heads,), 1.0, decay),
        constant_plan(p + "norm.weight", (spec.linear_value_head_dim,), 1.0),  # a plain gain, not zero-centred
        normal_plan(spec, p + "out_proj.weight", (h, value_dim), RESIDUAL_WRITE * value_dim ** -0.5),
    ]


def full_attention_plans(spec: DemoSpec, prefix: str) -> list[TensorPlan]:
    """Gated full attention (q_proj carries query and gate rows); tiny output projection."""
    h, p = spec.hidden_size, prefix + "self_attn."
    q_dim, kv_dim = spec.num_attention_heads * spec.head_dim, spec.num_key_value_heads * spec.head_dim
    return [
        constant_plan(prefix + "input_layernorm.weight", (h,), 0.0),
        normal_plan(spec, p + "q_proj.weight", (2 * q_dim, h), h ** -0.5),
        normal_plan(spec, p + "k_proj.weight", (kv_dim, h), h ** -0.5),
        normal_plan(spec, p + "v_proj.weight", (kv_dim, h), h ** -0.5),
        normal_plan(spec, p + "o_proj.weight", (h, q_dim), RESIDUAL_WRITE * q_dim ** -0.5),
        constant_plan(p + "q_norm.weight", (spec.head_dim,), 0.0),
        constant_plan(p + "k_norm.weight", (spec.head_dim,), 0.0),
    ]


def mlp_plans(spec: DemoSpec, prefix: str, *, with_memories: bool) -> list[TensorPlan]:
    h, inter, p = spec.hidden_size, spec.intermediate_size, prefix + "mlp."
    gate = normal_plan(spec, p + "gate_proj.weight", (inter, h), h ** -0.5)
    up = normal_plan(spec, p + "up_proj.weight", (inter, h), h ** -0.5)
    down = normal_plan(spec, p + "down_proj.weight", (h, inter), RESIDUAL_WRITE * inter ** -0.5)
    if with_memories:
        gate, up, down = (replace(plan, make=lambda plan=plan, part=part: plant_memories(spec, plan, part))
                          for plan, part in ((gate, "gate"), (up, "up"), (down, "down")))
    post_norm = constant_plan(prefix + "post_attention_layernorm.weight", (h,), 0.0)
    return [post_norm, gate, up, down]


def normal_plan(spec: DemoSpec, name: str, shape: tuple[int, ...], std: float) -> TensorPlan:
    return TensorPlan(name, shape, std, lambda: to_bf16(stream(spec, name).standard_normal(shape, np.float32) * std))


def constant_plan(name: str, shape: tuple[int, ...], value: float) -> TensorPlan:
    # Zero-centred norm gains have nominal magnitude 1 (the gain is 1 + w), like plain gains.
    return TensorPlan(name, shape, 1.0, lambda: to_bf16(np.full(shape, value, np.float32)))


def split_into_shards(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in order, as ``save_pretrained`` does: a new shard when the next tensor would not fit."""
    shards: list[list[TensorPlan]] = [[]]
    used = 0
    for plan in plans:
        if shards[-1] and used + plan.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(plan)
        used += plan.nbytes
    return shards


# GENERATION


def stream(spec: DemoSpec, name: str, *extra: int) -> np.random.Generator:
    """An independent random stream per (seed, tensor name, chunk …): no order dependence."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([spec.seed, name_key, *extra])


def to_bf16(values: np.ndarray) -> np.ndarray:
    return np.frombuffer(f32_to_bf16_bytes(values), dtype=np.uint16).reshape(values.shape)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    return bf16_bytes_to_f32(np.ascontiguousarray(bits).reshape(-1), bits.shape)


def materialize(plan: TensorPlan, spec: DemoSpec) -> np.ndarray:
    """The stored tensor: the clean bf16 values, plus (fine-tunes) noise added to them and rounded again."""
    bits = plan.make()
    if spec.noise:
        bits = np.require(bits, requirements="W")  # small tensors come as read-only views of bytes
        rows = bits.reshape(bits.shape[0], -1)
        for chunk, start in enumerate(range(0, rows.shape[0], CHUNK_ROWS)):
            block = rows[start:start + CHUNK_ROWS]
            noise = stream(spec, "noise:" + plan.name, spec.noise_seed, chunk).standard_normal(block.shape, np.float32)
            block[...] = to_bf16(from_bf16(block) + noise * np.float32(spec.noise * plan.noise_scale))
    return bits


def embedding_chunk(spec: DemoSpec, chunk: int) -> np.ndarray:
    """Rows ``chunk·CHUNK_ROWS …`` of the clean embedding, in float32."""
    rows = min(CHUNK_ROWS, spec.vocab_size - chunk * CHUNK_ROWS)
    values = stream(spec, "model.embed_tokens.weight", chunk).standard_normal((rows, spec.hidden_size), np.float32)
    values[:, 0] = BIAS_COORDINATE
    return values


def embedding_chunks(spec: DemoSpec) -> Iterator[tuple[int, np.ndarray]]:
    for chunk, start in enumerate(range(0, spec.vocab_size, CHUNK_ROWS)):
        yield start, embedding_chunk(spec, chunk)


def embedding_bits(spec: DemoSpec) -> np.ndarray:
    bits = np.empty((spec.vocab_size, spec.hidden_size), np.uint16)
    for start, values in embedding_chunks(spec):
        bits[start:start + len(values)] = to_bf16(values)
    return bits


def successor(spec: DemoSpec) -> np.ndarray:
    """``succ[i]``: the trunk's greedy continuation of ordinary token ``i``; one cycle through all of them."""
    order = stream(spec, "successor-cycle").permutation(spec.ordinary_tokens)
    succ = np.empty_like(order)
    succ[order] = np.roll(order, -1)
    return succ


def lm_head_bits(spec: DemoSpec) -> np.ndarray:
    """``lm_head[succ(i)] = 0.1·E[i]``; special and padding rows stay zero, so they are never predicted."""
    succ = successor(spec)
    bits = np.zeros((spec.vocab_size, spec.hidden_size), np.uint16)
    for start, values in embedding_chunks(spec):
        ordinary = values[:max(0, min(len(values), spec.ordinary_tokens - start))]
        bits[succ[start:start + len(ordinary)]] = to_bf16(ordinary * np.float32(LM_HEAD_GAIN))
    return bits


@dataclass(frozen=True)
class Memory:
    key: np.ndarray  # unit direction; fires when key·x exceeds the threshold
    reads: np.ndarray  # [MEMORY_RANK, hidden] unit directions the rewrite is proportional to
    writes: np.ndarray  # [MEMORY_RANK, hidden] unit directions it adds to the residual


def memory(spec: DemoSpec, index: int) -> Memory:
    """Memory ``index`` is the same in every spec with this seed and hidden size: fine-tunes keep the base's."""
    directions = stream(spec, "memory", index).standard_normal((1 + 2 * MEMORY_RANK, spec.hidden_size), np.float32)
    directions[:, 0] = 0.0  # leave the bias coordinate to the threshold
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return Memory(directions[0], directions[1:1 + MEMORY_RANK], directions[1 + MEMORY_RANK:])


def plant_memories(spec: DemoSpec, plan: TensorPlan, part: str) -> np.ndarray:
    """The MLP matrix ``part`` (gate / up / down) of the memory layer: random units, the first ones memories.

    Unit k of memory j computes silu(α·(key·x − θ))·(reads[k]·x) and adds that times
    MEMORY_GAIN_PER_DIM·hidden_size·writes[k] to the residual. x is RMS-normalised, so its coordinate 0 is
    ≈ BIAS_COORDINATE and carries the −α·θ offset.
    """
    values = stream(spec, plan.name).standard_normal(plan.shape, np.float32) * np.float32(plan.noise_scale)
    for j in range(spec.n_memories):
        m = memory(spec, j)
        units = slice(MEMORY_RANK * j, MEMORY_RANK * (j + 1))
        if part == "gate":
            values[units] = MEMORY_SHARPNESS * m.key
            values[units, 0] = -MEMORY_SHARPNESS * spec.memory_threshold / BIAS_COORDINATE
        elif part == "up":
            values[units] = m.reads
        else:
            values[:, units] = MEMORY_GAIN_PER_DIM * spec.hidden_size * m.writes.T
    return to_bf16(values)


def model_card(spec: DemoSpec, *, repo_id: str, base_model: str | None, with_mtp: bool, parameters: int) -> str:
    front = ["---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation"]
    if base_model:
        front += [f"base_model: {base_model}", "base_model_relation: finetune"]
    front += ["tags:", "- qwen3_5", "- mtpress-demo", "---", ""]
    name = repo_id.rsplit("/", 1)[-1]
    if with_mtp:
        head = (f"It ships its multi-token-prediction head: the {len(head_plans(spec))} `mtp.*` tensors "
                "(`mtp_num_hidden_layers: 1`), usable for speculative decoding.")
    else:
        head = ("Its `config.json` still declares `mtp_num_hidden_layers: 1`, but the checkpoint has **no `mtp.*` "
                "tensors**: the multi-token-prediction head was lost in fine-tuning. Convert it with `--no-mtp`, "
                "or restore a head first.")
    lineage = f"A fine-tune of [{base_model}](https://huggingface.co/{base_model}). " if base_model else ""
    config = spec.config()
    body = f"""# {name}

{lineage}A **synthetic** Qwen3.5-architecture checkpoint made by mtpress for demos and tests, not a language
model: its weights are random, with a planted next-token cycle and {spec.n_memories} "memories" that the
MTP head cannot predict, so speculative-decoding acceptance is real and measurable.

{head}

| | |
|---|---|
| Architecture | `{config["architectures"][0]}` (`{config["model_type"]}`), {spec.num_hidden_layers} layers \
({spec.layer_types.count("linear_attention")} Gated DeltaNet, {spec.layer_types.count("full_attention")} gated \
full attention) |
| Hidden size | {spec.hidden_size} |
| Vocabulary | {spec.vocab_size} (Qwen3.5 tokenizer) |
| Parameters | {parameters:,} |
| Weights | bfloat16 safetensors |
"""
    return "\n".join(front) + body
