"""Architectures plug in by registration, like llama.cpp's converter registers model classes.

Everything family-specific (tensor names, the MTP layout, which config keys the head
depends on) lives in the family's own module; a new family is a new module that calls
``register``.
"""

from __future__ import annotations

from mtpress.archs.base import ArchSpec
from mtpress.errors import UnsupportedArchitectureError

_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, ArchSpec]:
    return dict(_REGISTRY)


def get_arch(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"no architecture named {name!r} is registered",
            hint=f"registered: {', '.join(sorted(_REGISTRY))}") from None


def arch_for_config(config: dict, *, where: str) -> ArchSpec:
    """The registered architecture that claims a checkpoint's ``architectures`` entry."""
    claimed = config.get("architectures") or []
    for spec in _REGISTRY.values():
        if any(a in spec.hf_architectures for a in claimed):
            return spec
    supported = sorted(a for s in _REGISTRY.values() for a in s.hf_architectures)
    raise UnsupportedArchitectureError(f"{where}: architecture {claimed} is not supported",
                                       hint=f"mtpress handles {', '.join(supported)}")


from mtpress.archs import qwen35, qwen35moe  # noqa: E402,F401  (each registers itself)
