"""Qwen3.5 / Qwen3.6 (hybrid Gated DeltaNet + gated full attention) with one MTP layer.

Tensor names and the head layout follow the pinned converter (conversion/qwen.py,
``_QwenMtpMixin``): ``mtp.fc`` / ``mtp.pre_fc_norm_*`` / ``mtp.norm`` and
``mtp.layers.N.*`` become GGUF block ``num_hidden_layers + N`` with nextn naming.

Two checkpoint layouts are registered: ``Qwen3_5ForCausalLM`` (text keys at the top of
config.json, trunk under ``model.``) and ``Qwen3_5ForConditionalGeneration``, what the
releases ship: text keys nested under ``text_config``, trunk under ``model.language_model.``,
a vision tower under ``model.visual.`` described by ``vision_config`` (exported by the
converter's ``--mmproj`` mode, conversion/qwen3vl.py), and ``lm_head`` / ``mtp.*`` at the
top level in both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mtpress.archs import register
from mtpress.errors import CorruptCheckpointError
from mtpress.safetensors_io import TensorInfo

HEAD_PREFIX = "mtp."
LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "model.")
VISION_PREFIX = "model.visual."


@dataclass(frozen=True)
class Qwen35:
    name: str = "qwen35"
    family: str = "Qwen3.5"
    hf_architectures: tuple[str, ...] = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
    gguf_arch: str = "qwen35"
    mtplx_arch_id: str | None = "qwen3-next-mtp"
    head_trainable: bool = True

    def text_config(self, config: dict) -> dict:
        return {**config, **config.get("text_config", {})}

    def mtp_layers(self, config: dict) -> int:
        return int(self.text_config(config).get("mtp_num_hidden_layers", 0))

    def is_head_tensor(self, name: str) -> bool:
        return name.startswith(HEAD_PREFIX) or name.startswith("model.mtp.")

    def expected_head(self, config: dict, names: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
        c = self.text_config(config)
        hidden, head_dim = c["hidden_size"], c["head_dim"]
        q_rows = c["num_attention_heads"] * head_dim * (2 if c.get("attn_output_gate", True) else 1)
        kv_rows = c["num_key_value_heads"] * head_dim
        shapes = {
            "mtp.fc.weight": (hidden, 2 * hidden),
            "mtp.pre_fc_norm_embedding.weight": (hidden,),
            "mtp.pre_fc_norm_hidden.weight": (hidden,),
            "mtp.norm.weight": (hidden,),
        }
        for layer in range(self.mtp_layers(config)):
            p = f"mtp.layers.{layer}."
            shapes |= {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (q_rows, hidden),
                p + "self_attn.k_proj.weight": (kv_rows, hidden),
                p + "self_attn.v_proj.weight": (kv_rows, hidden),
                p + "self_attn.o_proj.weight": (hidden, c["num_attention_heads"] * head_dim),
                p + "self_attn.q_norm.weight": (head_dim,),
                p + "self_attn.k_norm.weight": (head_dim,),
            } | self.head_mlp(c, p + "mlp.", names)
        return shapes

    def head_mlp(self, c: dict, prefix: str, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        """The head block's MLP tensors (``names``: the checkpoint's tensor names, for families whose MLP is
        stored in more than one layout); a dense SwiGLU here."""
        hidden, inter = c["hidden_size"], c["intermediate_size"]
        return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
                prefix + "down_proj.weight": (hidden, inter)}

    def compatibility_keys(self) -> tuple[str, ...]:
        # Not vocab_size: the head has no vocabulary-sized tensor (it reads the trunk's embedding and
        # predicts through the trunk's output matrix), so a resized vocabulary is decided from the tensors.
        return ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "mtp_num_hidden_layers")

    def has_vision(self, config: dict) -> bool:
        return "vision_config" in config

    def is_vision_tensor(self, name: str) -> bool:
        return name.startswith(VISION_PREFIX)

    def shared_tensors(self, tensors: dict[str, TensorInfo]) -> tuple[str, str]:
        """The trunk tensors the head uses: (input embedding, output matrix); the same when tied."""
        embedding = next((p + "embed_tokens.weight" for p in LANGUAGE_MODEL_PREFIXES
                          if p + "embed_tokens.weight" in tensors), None)
        if embedding is None:
            raise CorruptCheckpointError(
                f"no token embedding ({' or '.join(p + 'embed_tokens.weight' for p in LANGUAGE_MODEL_PREFIXES)})",
                hint="the checkpoint is incomplete; re-download it")
        return embedding, "lm_head.weight" if "lm_head.weight" in tensors else embedding

    def set_mtp_layers(self, config: dict, layers: int) -> dict:
        if "text_config" in config:
            return {**config, "text_config": {**config["text_config"], "mtp_num_hidden_layers": layers}}
        return {**config, "mtp_num_hidden_layers": layers}

    def head_gguf_block(self, config: dict) -> int:
        return int(self.text_config(config)["num_hidden_layers"])

    def describe(self, config: dict, tensors: dict[str, TensorInfo]) -> dict:
        c = self.text_config(config)
        layer_types = c.get("layer_types") or []
        head = sum(t.n_elements for n, t in tensors.items() if self.is_head_tensor(n))
        total = sum(t.n_elements for t in tensors.values())
        vision = sum(t.n_elements for n, t in tensors.items() if self.is_vision_tensor(n))
        return {
            "family": self.family,
            "architectures": config.get("architectures", []),
            "layers": c["num_hidden_layers"],
            "linear_attention_layers": sum(t == "linear_attention" for t in layer_types),
            "full_attention_layers": sum(t == "full_attention" for t in layer_types),
            "layer_pattern": "".join("L" if t == "linear_attention" else "F" for t in layer_types),
            "hidden_size": c["hidden_size"],
            "intermediate_size": c.get("intermediate_size"),
            "attention_heads": c["num_attention_heads"],
            "kv_heads": c["num_key_value_heads"],
            "head_dim": c["head_dim"],
            "vocab_size": c["vocab_size"],
            "context_length": c.get("max_position_embeddings"),
            "mtp_layers": self.mtp_layers(config),
            "parameters_total": total,
            "parameters_head": head,
            "parameters_vision": vision,
            "tie_word_embeddings": bool(config.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
        }


QWEN35 = register(Qwen35())
