"""The MTPLX pack's own bilingual card, rendered from the pack's manifest with the GGUF card's machinery
(sandboxed templates, escaping filters, front matter dumped from a dict, encoding-damage check).

Every figure comes from the pack manifest: body bits and group size, head dtype, sizes, the checks
that ran on Linux and their outcomes, MTPLX's probe agreement, and the verification level, which
says "unverified on Apple Silicon" until the release workflow's macOS job records a real one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mtpress.manifest import PackManifest, read_pack_manifest, write_manifest
from mtpress.stages.card import (
    TEMPLATES_DIR,
    RenderedCard,
    _license,
    _source,
    model_tree_front_matter,
    render_card_files,
    write_card,
)
from mtpress.stages.export_mlx import CONTRACT_FILE, verification_level, verified_contract

MLX_TEMPLATES_DIR = TEMPLATES_DIR / "mtplx"


def render_mlx_card(manifest: PackManifest) -> RenderedCard:
    record = manifest.model_dump(mode="json", exclude_unset=True)  # as the file holds it, like the GGUF card
    return render_card_files(MLX_TEMPLATES_DIR, _facts(record), mlx_front_matter(record))


def mlx_front_matter(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Model-tree metadata: the fine-tune is the base model, this pack a quantization of it."""
    return model_tree_front_matter(manifest, library="mlx",
                                   tags=["mlx", "mtplx", "mtp", "speculative-decoding", "apple-silicon"])


def _facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    pack, checks = manifest["pack"], manifest["checks"]
    license_text, license_source = _license(manifest)
    return {
        "title": manifest["repo"].split("/", 1)[1],
        "repo": manifest["repo"],
        "gguf_repo": manifest.get("gguf_repo"),
        "finetune": _source(manifest, "finetune"),
        # The pack's inputs record a donor only when its head was used.
        "donor": _source(manifest, "donor")["name"] if (manifest.get("inputs") or {}).get("donor") else None,
        "pack": pack,
        "head_share": pack["head_bytes"] / pack["total_bytes"],
        "checks": checks,
        "probe_variants": checks["probe_variants"],
        "verified": pack["verification"] != manifest["unverified_level"],
        "verification": manifest.get("verification"),
        "forge_verify": manifest.get("forge_verify") or [],
        "verified_on": manifest.get("verified_on") or {},
        "tools": manifest["mlx_tools"],
        "hardware": manifest["hardware"],
        "license": {"text": license_text, "source": license_source},
    }


def record_verification(folder: Path) -> str:
    """After MTPLX's forge verification stamped ``mtplx_runtime.json`` on Apple Silicon (the release
    workflow's macOS job): accept it only as a real record, put it in the pack's manifest, re-render the
    card. Returns the verification level; raises QualityGateError (changing nothing) for anything less."""
    contract = verified_contract(json.loads((folder / CONTRACT_FILE).read_text(encoding="utf-8")))
    manifest = read_pack_manifest(folder)
    level = verification_level(contract)
    manifest = manifest.model_copy(update={
        "pack": {**manifest.pack, "verification": level},
        "verification": contract["verification"],
        "forge_verify": [{"depth": int(row.get("depth") or 0), "tok_s": row.get("tok_s"),
                          "acceptance_by_position": list(row.get("acceptance_by_position") or [])}
                         for row in contract["speed_evidence"]["forge_verify_rows"]],
        "verified_on": contract["verified_on"]})
    card = render_mlx_card(manifest)
    write_manifest(folder, manifest)
    write_card(folder, card)
    return level
