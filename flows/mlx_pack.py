"""The MTPLX pack as part of the publish flow: export, checks, its own manifest and card, its own repo.

The pack is built from the same injected checkpoint as the GGUFs into ``<release>-MTPLX/`` beside
the release folder (a folder of its own, since it is published to a repo of its own in one commit),
after the smoke stage, whose BF16 tokens the MLX checks compare with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mtpress.archs.base import ArchSpec
from mtpress.cache import StageCache, cache_key
from mtpress.checkpoint import ModelDir
from mtpress.manifest import PackManifest, hardware, jsonable, write_manifest
from mtpress.naming import default_mlx_repo, mlx_folder, mlx_release_name
from mtpress.schema import MlxSpec, ReleaseConfig, Target
from mtpress.stages.card import write_card
from mtpress.stages.export_mlx import (
    CONTRACT_FILE,
    UNVERIFIED,
    MlxChecks,
    MlxPack,
    check_mlx,
    export_mlx,
    pack_manifest,
)
from mtpress.stages.mlx_card import render_mlx_card
from mtpress.stages.smoke import SmokeResult
from mtpress.toolchain.mlx import resolve_mlx_tools

mlx_tools_task = task(resolve_mlx_tools, name="mlx-tools", cache_policy=NO_CACHE)
export_mlx_task = task(export_mlx, name="export-mlx", cache_policy=NO_CACHE)
check_mlx_task = task(check_mlx, name="check-mlx", cache_policy=NO_CACHE)


@dataclass(frozen=True)
class MlxRelease:
    folder: Path
    target: Target
    pack: MlxPack
    checks: MlxChecks
    summary: dict  # what the GGUF release's manifest records about the pack


def mlx_target(cfg: ReleaseConfig) -> Target:
    assert cfg.mlx is not None
    return Target(repo=cfg.mlx.repo or default_mlx_repo(cfg.target.repo), private=cfg.target.private,
                  license=cfg.target.license)


def build_mlx_pack(cfg: ReleaseConfig, model: ModelDir, arch: ArchSpec, release_dir: Path, model_digest: str,
                   smoke_results: list[SmokeResult], cache: StageCache, inputs: dict) -> MlxRelease:
    """Export (cached on the checkpoint's content), check (cached on the pack's bytes), write manifest and card."""
    assert cfg.mlx is not None
    tools = mlx_tools_task()
    folder = mlx_folder(release_dir)
    spec = cfg.mlx
    # Only what shapes the pack's bytes: a change to the checks' settings reuses the export.
    shape = spec.model_dump(include={"bits", "group_size", "head_dtype", "mtp_depth_max"})
    pack = cache.run("export_mlx", cache_key(model_digest, shape, tools.versions),
                     export_mlx_task, model, arch, spec, tools=tools, out_dir=folder)
    reference = next((s for s in smoke_results if s.quant == "BF16"), None)
    key = cache_key([f.sha256 for f in pack.files], spec.model_dump(mode="json"), cfg.smoke.model_dump(mode="json"),
                    reference.tokens if reference else None, tools.versions)
    checks = cache.run("check_mlx", key, check_mlx_task, pack, model, spec, tools, prompt=cfg.smoke.prompt,
                       n_predict=cfg.smoke.n_predict, reference_tokens=reference.tokens if reference else None,
                       reference=reference.model if reference else None, prompts_path=cfg.bench.prompts)
    target = mlx_target(cfg)
    facts = write_pack_documents(folder, pack, checks, release=cfg.name, repo=target.repo, gguf_repo=cfg.target.repo,
                                 license=cfg.target.license, spec=spec, tools=tools.describe(), inputs=inputs,
                                 seconds={k: v for k, v in cache.seconds.items() if k in ("export_mlx", "check_mlx")})
    summary = {"repo": target.repo, "folder": folder.name, **{k: v for k, v in facts.items() if k != "files"},
               "probe_agreement": checks.probe_agreement,
               "unquantized_match_reference": checks.unquantized_match_reference,
               "unquantized_tokens_matching_reference": checks.unquantized_tokens_matching_reference,
               "pack_tokens_matching_reference": checks.pack_tokens_matching_reference}
    return MlxRelease(folder, target, pack, checks, summary)


def write_pack_documents(folder: Path, pack: MlxPack, checks: MlxChecks, *, release: str, repo: str,
                         gguf_repo: str, license: str | None, spec: MlxSpec, tools: dict, inputs: dict,
                         seconds: dict) -> dict:
    """The pack's manifest.json and bilingual card; returns the pack's facts."""
    contract = json.loads((folder / CONTRACT_FILE).read_text(encoding="utf-8"))
    facts = pack_manifest(pack, checks, contract)
    manifest = PackManifest(
        release=mlx_release_name(release), repo=repo, gguf_repo=gguf_repo,
        config={"target": {"license": license}, "mlx": spec.model_dump(mode="json")},
        inputs=inputs, mlx_tools=tools, hardware=hardware(), pack=facts, checks=jsonable(checks),
        unverified_level=UNVERIFIED, verification=contract.get("verification"), stage_seconds=seconds)
    write_manifest(folder, manifest)
    write_card(folder, render_mlx_card(manifest))
    return facts
