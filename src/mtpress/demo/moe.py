"""Demo Qwen3.5-MoE checkpoints (``Qwen3_5MoeForCausalLM`` / ``...ForConditionalGeneration``) whose head drafts.

The dense demo (models.py) with every MLP, the MTP block's included, a mixture of experts as
src/models/qwen35moe.cpp computes it: a softmax router over ``num_experts`` picks ``num_experts_per_tok``
SwiGLU experts, plus a shared expert scaled by sigmoid(``shared_expert_gate``·x). The planted structure moves
with it:

* routed experts are random with tiny output projections, like the dense demo's MLPs: whichever experts the
  router picks, the residual stays ≈ the token's embedding and the successor cycle holds;
* the memories live in the memory layer's **shared expert** (``intermediate_size`` is its width), whose gate
  is held open (sigmoid(10·x₀) ≈ 1 on the constant bias coordinate), so they fire whatever the routing;
* the head is the dense demo's (``fc = [I | ~0]``, a near-silent block) with an MoE MLP: it predicts the cycle.

``expert_layout`` picks how the routed experts are stored: ``per-expert`` (``mlp.experts.<e>.*_proj.weight``)
or ``fused`` (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``, transformers 5's names), both read by
the pinned converter. The head keeps ``head_layout`` (per-expert by default, as Qwen's releases store it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from mtpress.demo.models import (
    RESIDUAL_WRITE,
    DemoSpec,
    TensorPlan,
    mlp_plans,
    normal_plan,
    to_bf16,
)
from mtpress.demo.multimodal import MultimodalSpec

ExpertLayout = Literal["per-expert", "fused"]
DEFAULT_BASE_REPO_ID = "mtpress-demo/Tiny-Qwen3.5-MoE-Demo-Base"
DEFAULT_FINETUNE_REPO_ID = "mtpress-demo/Tiny-Qwen3.5-MoE-Demo-FT"
SHARED_GATE_OPEN = 10.0  # shared_expert_gate on the bias coordinate: sigmoid(10) ≈ 1


@dataclass(frozen=True)
class MoeDemoSpec(DemoSpec):
    """A ``DemoSpec`` whose MLPs are mixtures of experts; ``intermediate_size`` is the shared expert's width."""

    intermediate_size: int = 256
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    expert_layout: ExpertLayout = "per-expert"
    head_layout: ExpertLayout = "per-expert"

    def block_mlp(self, prefix: str, *, with_memories: bool) -> list[TensorPlan]:
        post_norm, gate, up, down = mlp_plans(self, prefix, with_memories=with_memories)
        # The dense MLP (memories and all) becomes the shared expert: same values, shared-expert names.
        shared = [replace(plan, name=plan.name.replace(".mlp.", ".mlp.shared_expert.")) for plan in (gate, up, down)]
        h, p = self.hidden_size, prefix + "mlp."

        def shared_gate() -> np.ndarray:
            values = np.zeros((1, h), np.float32)
            values[0, 0] = SHARED_GATE_OPEN
            return to_bf16(values)

        layout = self.head_layout if prefix.startswith("mtp.") else self.expert_layout
        return [post_norm, normal_plan(self, p + "gate.weight", (self.num_experts, h), h ** -0.5), *shared,
                TensorPlan(p + "shared_expert_gate.weight", (1, h), 1.0, shared_gate),
                *self.expert_plans(p + "experts.", layout)]

    def expert_plans(self, p: str, layout: ExpertLayout) -> list[TensorPlan]:
        h, ff, n = self.hidden_size, self.moe_intermediate_size, self.num_experts
        down_std = RESIDUAL_WRITE * ff ** -0.5
        if layout == "fused":
            return [normal_plan(self, p + "gate_up_proj", (n, 2 * ff, h), h ** -0.5),
                    normal_plan(self, p + "down_proj", (n, h, ff), down_std)]
        return [plan for e in range(n) for plan in (
            normal_plan(self, f"{p}{e}.gate_proj.weight", (ff, h), h ** -0.5),
            normal_plan(self, f"{p}{e}.up_proj.weight", (ff, h), h ** -0.5),
            normal_plan(self, f"{p}{e}.down_proj.weight", (h, ff), down_std))]

    def config(self) -> dict:
        dense = {k: v for k, v in super().config().items() if k != "intermediate_size"}
        return dense | {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text",
                        "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                        "moe_intermediate_size": self.moe_intermediate_size,
                        "shared_expert_intermediate_size": self.intermediate_size}


@dataclass(frozen=True)
class MoeMultimodalSpec(MultimodalSpec):
    """The multimodal layout (``Qwen3_5MoeForConditionalGeneration``) around an MoE text model."""

    text: MoeDemoSpec = MoeDemoSpec()

    def config(self) -> dict:
        return super().config() | {"architectures": ["Qwen3_5MoeForConditionalGeneration"],
                                   "model_type": "qwen3_5_moe"}

