from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from mtpress.safetensors_io import TensorInfo


class ArchSpec(Protocol):
    """What mtpress needs to know about a model family with an MTP head."""

    name: str
    family: str
    hf_architectures: tuple[str, ...]
    gguf_arch: str
    # MTPLX's ``arch_id`` for this family's pack, None where MTPLX has no pack format for it.
    mtplx_arch_id: str | None
    # Whether mtpress.realign_trainer implements this family's head forward (re-alignment), or only copies it.
    head_trainable: bool

    def text_config(self, config: dict) -> dict:
        """The text model's hyper-parameters (nested ``text_config`` lifted to the top)."""

    def mtp_layers(self, config: dict) -> int:
        """How many MTP layers the config claims."""

    def is_head_tensor(self, name: str) -> bool: ...

    def expected_head(self, config: dict, names: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
        """Every head tensor the config implies, with its shape. Where a family stores its head in more than
        one layout (fused or per-expert MoE weights), ``names`` (a checkpoint's tensor names) picks the one
        that checkpoint uses; without them, the family's default layout."""

    def compatibility_keys(self) -> tuple[str, ...]:
        """Text-config keys on which a head depends: donor and fine-tune must agree on each."""

    def has_vision(self, config: dict) -> bool:
        """Whether the checkpoint carries a vision tower, exported as an ``mmproj-`` GGUF."""

    def is_vision_tensor(self, name: str) -> bool: ...

    def shared_tensors(self, tensors: dict[str, TensorInfo]) -> tuple[str, str]:
        """The trunk tensors the head shares: (input embedding, output matrix), equal when tied."""

    def set_mtp_layers(self, config: dict, layers: int) -> dict:
        """``config`` claiming ``layers`` MTP layers, the key written where the checkpoint keeps it."""

    def head_gguf_block(self, config: dict) -> int:
        """The GGUF block index the first MTP layer becomes."""

    def describe(self, config: dict, tensors: dict[str, TensorInfo]) -> dict:
        """Architecture facts for the card, computed from config and tensors (mixture-of-experts families add
        ``experts``, ``experts_per_token``, ``parameters_active`` and ``parameters_head_active``)."""
