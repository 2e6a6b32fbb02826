"""Qwen3.5 / Qwen3.6 mixture-of-experts (35B-A3B and larger): the ``qwen35`` trunk and head with every MLP a
mixture of experts, the MTP block's included.

From the pinned converter (conversion/qwen.py: ``Qwen3_5MoeTextModel`` on the same ``_QwenMtpMixin``,
``Qwen2MoeModel.modify_tensors`` for the experts) and runtime (src/models/qwen35moe.cpp, which loads the MTP
block's router, experts and shared expert). Each MoE MLP holds:

* the router ``mlp.gate.weight`` [num_experts, hidden];
* the routed experts, in one of two layouts the converter accepts:
  per-expert ``mlp.experts.<e>.{gate,up}_proj.weight`` [moe_intermediate_size, hidden] and
  ``mlp.experts.<e>.down_proj.weight`` [hidden, moe_intermediate_size] (the converter stacks them), or fused
  ``mlp.experts.gate_up_proj`` [num_experts, 2·moe_intermediate_size, hidden] (gate rows first) and
  ``mlp.experts.down_proj`` [num_experts, hidden, moe_intermediate_size], with or without a ``.weight``
  suffix (transformers 5 stores them without);
* the shared expert ``mlp.shared_expert.{gate,up,down}_proj.weight`` (shared_expert_intermediate_size) and
  its sigmoid gate ``mlp.shared_expert_gate.weight`` [1, hidden].

Qwen's own releases store the trunk fused and the MTP block per expert; which layout a head uses is read from
its tensor names. Config keys are the ones the converter reads: ``num_experts``, ``num_experts_per_tok``,
``moe_intermediate_size``, ``shared_expert_intermediate_size``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mtpress.archs import register
from mtpress.archs.qwen35 import Qwen35
from mtpress.safetensors_io import TensorInfo

ROUTED_EXPERTS = ".mlp.experts."  # both layouts; the shared expert is ".mlp.shared_expert."
FUSED_GATE_UP = "experts.gate_up_proj"


def fused_suffix(names: Iterable[str]) -> str | None:
    """The fused layout's name suffix ("" or ".weight") if ``names`` hold fused experts, else None."""
    for name in names:
        if (FUSED_GATE_UP + ".") in name or name.endswith(FUSED_GATE_UP):
            return name.partition(FUSED_GATE_UP)[2]
    return None


@dataclass(frozen=True)
class Qwen35Moe(Qwen35):
    name: str = "qwen35moe"
    family: str = "Qwen3.5-MoE"
    hf_architectures: tuple[str, ...] = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
    gguf_arch: str = "qwen35moe"
    # MTPLX packs the dense head's 15 tensors only; mtpress.realign_trainer implements the dense head's MLP.
    mtplx_arch_id: str | None = None
    head_trainable: bool = False

    def head_mlp(self, c: dict, prefix: str, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
        hidden, experts = c["hidden_size"], c["num_experts"]
        ff, shared = c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
        shapes = {prefix + "gate.weight": (experts, hidden),
                  prefix + "shared_expert.gate_proj.weight": (shared, hidden),
                  prefix + "shared_expert.up_proj.weight": (shared, hidden),
                  prefix + "shared_expert.down_proj.weight": (hidden, shared),
                  prefix + "shared_expert_gate.weight": (1, hidden)}
        suffix = fused_suffix(n for n in names if n.startswith(prefix))
        if suffix is not None:
            return shapes | {prefix + "experts.gate_up_proj" + suffix: (experts, 2 * ff, hidden),
                             prefix + "experts.down_proj" + suffix: (experts, hidden, ff)}
        for e in range(experts):
            p = f"{prefix}experts.{e}."
            shapes |= {p + "gate_proj.weight": (ff, hidden), p + "up_proj.weight": (ff, hidden),
                       p + "down_proj.weight": (hidden, ff)}
        return shapes

    def compatibility_keys(self) -> tuple[str, ...]:
        # The dense MLP size is not the head's (its MLP is the experts); the routing width
        # (num_experts_per_tok) changes no shape, but a head trained to mix 8 experts mixes them differently.
        return tuple(k for k in super().compatibility_keys() if k != "intermediate_size") + (
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size")

    def describe(self, config: dict, tensors: dict[str, TensorInfo]) -> dict:
        c = self.text_config(config)
        experts, used = c["num_experts"], c["num_experts_per_tok"]

        def active(names: list[str]) -> int:
            """Parameters one token runs through: all but the routed experts, and ``used`` of ``experts``."""
            routed = sum(tensors[n].n_elements for n in names if ROUTED_EXPERTS in n)
            return sum(tensors[n].n_elements for n in names) - routed + routed * used // experts

        head = [n for n in tensors if self.is_head_tensor(n)]
        trunk = [n for n in tensors if not self.is_head_tensor(n) and not self.is_vision_tensor(n)]
        return super().describe(config, tensors) | {
            "experts": experts,
            "experts_per_token": used,
            "moe_intermediate_size": c["moe_intermediate_size"],
            "shared_expert_intermediate_size": c["shared_expert_intermediate_size"],
            "expert_layout": "fused" if fused_suffix(tensors) is not None else "per-expert",
            "head_expert_layout": ("fused" if fused_suffix(head) is not None else "per-expert") if head else None,
            # The text model's, without the head (it runs only while drafting) and the vision tower.
            "parameters_active": active(trunk),
            "parameters_head_active": active(head),
        }


QWEN35MOE = register(Qwen35Moe())
