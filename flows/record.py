"""What the publish flow writes about a release: the manifest, the cards rendered from it, and the tables and
card preview the Prefect UI shows."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from huggingface_hub.repocard import metadata_load
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.release import Build
from flows.remote import record_manifest
from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import ModelDir
from mtpress.fsutil import dir_digest
from mtpress.manifest import Manifest, hardware, jsonable, read_manifest, write_manifest
from mtpress.schema import ReleaseConfig, Source
from mtpress.stages.bench import BenchResult
from mtpress.stages.card import render_card, write_card
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.imatrix import ImatrixFile
from mtpress.stages.inject import InjectResult
from mtpress.stages.publish import remove_unlisted_ggufs
from mtpress.stages.quality import QualityResult
from mtpress.stages.smoke import LeanHeadCheck, SmokeResult


@task(name="manifest", task_run_name="manifest", cache_policy=NO_CACHE)
def write_release_manifest(build: Build, inputs: dict, files: list[GgufFile], imatrix: ImatrixFile | None,
                           smoke: list[SmokeResult], lean_heads: list[LeanHeadCheck], bench: list[BenchResult],
                           quality: QualityResult | None, head_choice, mlx) -> Path:
    """manifest.json: every input, tool, file and measurement of the release; the UI gets its tables."""
    release, cfg, injected = build.release, build.cfg, build.injected
    manifest = Manifest.model_validate(jsonable({
        "release": cfg.name,
        "config_file": _config_label(release.config_path) if release.config_path else f"{cfg.name} (sent as text)",
        "mtpress": version("mtpress"),
        "config": _config_record(cfg),
        "toolchain": release.tools.describe(),
        "hardware": hardware(),
        "inputs": inputs,
        "architecture": release.arch.describe(build.model.config, build.model.tensors),
        "inject": {"action": injected.action, "reason": injected.reason, "head": injected.head,
                   "bytes_written": injected.bytes_written, "vocabulary": injected.vocabulary},
        "head_choice": head_choice,
        "files": [_file_record(f, release.release_dir) for f in files],
        **({"imatrix": {"path": imatrix.path.relative_to(release.release_dir).as_posix(), **jsonable(imatrix),
                        "quants": cfg.imatrix_quants}} if imatrix else {}),
        "smoke": smoke,
        **({"lean_heads": lean_heads} if lean_heads else {}),
        "bench": [row for result in bench for row in result.table()],
        "quality": quality.table() if quality else None,
        "bench_details": bench,
        "quality_details": quality,
        "mlx": mlx.summary if mlx else None,
        "stage_seconds": release.cache.seconds,
    }))
    if stale := remove_unlisted_ggufs(release.release_dir, set(manifest.sha256_by_path())):
        get_run_logger().warning("removed %d GGUF(s) this release does not list, left by an earlier run: %s",
                                 len(stale), ", ".join(stale))
    path = write_manifest(release.release_dir, manifest)
    create_table_artifact(key=release.key("files"), description="release files",
                          table=[{"file": f.path.relative_to(release.release_dir).as_posix(), "role": f.role,
                                  "quant": f.quant, "MiB": round(f.size / 2**20, 1), "sha256": f.sha256[:16],
                                  "parts": len(f.parts)}
                                 for f in files])
    create_table_artifact(key=release.key("smoke"), description="smoke: greedy output with and without draft-mtp",
                          table=[{"file": s.model, "layout": s.layout, "identical": s.tokens_identical,
                                  "chat identical": s.chat_tokens_identical, "drafted": s.drafted,
                                  "accepted": s.accepted,
                                  "acceptance": round(s.acceptance or 0, 3),
                                  **({"image identical": s.image_tokens_identical, "image drafted": s.image_drafted}
                                     if build.has_vision else {})} for s in smoke])
    if bench:
        create_table_artifact(key=release.key("bench"), table=[r for b in bench for r in b.table()],
                              description="bench: tokens/s median and IQR, acceptance, speedup, bound")
    if quality:
        create_table_artifact(key=release.key("quality"), table=quality.table(),
                              description="quality: perplexity and KL-divergence against BF16")
    return path


@task(name="card", task_run_name="card", cache_policy=NO_CACHE)
def write_cards(release_dir: Path, artifact_key: str, description: str = "model card preview") -> None:
    """Both cards from the manifest alone, the English one as the UI's preview, and the manifest as an artifact
    (what `mtpress release-run` hands back to a CI job that has no access to the worker's disk)."""
    manifest = read_manifest(release_dir)
    card = render_card(manifest)
    write_card(release_dir, card)
    create_markdown_artifact(card_preview(card), key=artifact_key, description=description)
    record_manifest(release_dir, manifest.release)


def _file_record(file: GgufFile, release_dir: Path) -> dict:
    """A file as the manifest lists it, by its path in the repo; a split one with each part's path, size and
    sha256 (what the Hub holds), and no parts key otherwise, so unsplit releases' manifests stay as they were (nor
    an imatrix key for a file made without one)."""
    record = {"path": file.path.relative_to(release_dir).as_posix(), **jsonable(file)}
    record.pop("parts")
    if file.imatrix is None:
        record.pop("imatrix")
    if file.parts:
        folder = file.path.parent.relative_to(release_dir)
        record["parts"] = [{"path": (folder / p.name).as_posix(), "size": p.size, "sha256": p.sha256}
                           for p in file.parts]
    return record


def card_preview(card) -> str:
    """The English card for the UI: the YAML front matter shown as a code block, not run into the text."""
    text = card.files["README.md"]
    if text.startswith("---\n"):
        front, body = text[4:].split("\n---\n", 1)
        text = f"```yaml\n{front}\n```\n{body}"
    return text


def input_records(cfg: ReleaseConfig, arch: ArchSpec, finetune: ModelDir, donor: ModelDir | None,
            injected: InjectResult) -> dict:
    """The checkpoints the release was made from. A donor whose head went unused (the fine-tune kept its own)
    is none of them: it is not recorded, so no card credits it."""
    return {"finetune": _input_record(finetune, cfg.finetune, arch),
            "donor": _input_record(donor, cfg.donor, arch) if donor and injected.action == "injected" else None}


def _input_record(model: ModelDir, source: Source, arch: ArchSpec) -> dict:
    """A Hub repo at its commit, or a local folder by its name (the label) and its content digest: where it sits
    on the publisher's machine is theirs. ``mtp_layers``: what the checkpoint's own config declares."""
    card = model.path / "README.md"
    card_data = metadata_load(card) if card.is_file() else None
    return {"label": model.label, "repo": source.repo, "revision": model.revision,
            "digest": dir_digest(model.path) if source.path else None, "mtp_layers": arch.mtp_layers(model.config),
            "license": (card_data or {}).get("license"),
            "files": {name: model.shard_sha256(name) for name in model.shard_files()}}


def _config_record(config: BaseModel) -> dict:
    """The release config as the manifest and the card publish it: every local path (a source folder, a prompt
    set, a calibration text, an image) by its name alone, as a config beside those files would give it."""
    record = config.model_dump(mode="json")
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, Path):
            record[name] = value.name
        elif isinstance(value, BaseModel):
            record[name] = _config_record(value)
    return record


def _config_label(path: Path) -> str:
    """The config as a user would name it to rerun: relative to the working directory when inside it, else its
    name alone (the publisher's directories are theirs)."""
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else resolved.name
