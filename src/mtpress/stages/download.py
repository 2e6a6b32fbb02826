"""Fetch a checkpoint: a local directory as is, or a Hub repo at a pinned revision.

From the Hub only what conversion needs is downloaded (safetensors, configs, tokenizer,
chat template, vision preprocessor), at the commit the revision resolved to, so a rerun
fetches the same bytes. The head's presence is read from remote safetensors headers first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtpress.checkpoint import PICKLE_SUFFIXES, ModelDir
from mtpress.errors import ModelError
from mtpress.hub.client import hub_api
from mtpress.schema import Source

ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                  "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                  "video_preprocessor_config.json", "processor_config.json", "README.md", "LICENSE*")


@dataclass(frozen=True)
class RemoteProbe:
    repo: str
    revision: str  # the commit sha the requested revision resolved to
    has_safetensors: bool
    head_tensors: tuple[str, ...]
    files: tuple[str, ...]


def probe(source: Source) -> RemoteProbe:
    """Resolve the revision and read the safetensors headers remotely: no weights are downloaded."""
    api = hub_api()
    info = api.model_info(source.repo, revision=source.revision)
    files = tuple(sorted(s.rfilename for s in info.siblings or []))
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    if not has_safetensors:
        if any(f.endswith(PICKLE_SUFFIXES) for f in files):
            raise ModelError(f"{source.repo}@{source.revision}: only pickle weights (.bin/.pt), no safetensors",
                             hint="pickle files can run code when loaded; mtpress only reads safetensors")
        raise ModelError(f"{source.repo}@{source.revision}: no safetensors weights in the repo")
    metadata = api.get_safetensors_metadata(source.repo, revision=info.sha)
    head = tuple(sorted(n for n in metadata.weight_map if n.startswith(("mtp.", "model.mtp."))))
    return RemoteProbe(source.repo, info.sha, has_safetensors, head, files)


def fetch(source: Source, cache_dir: Path) -> ModelDir:
    """A ModelDir for ``source``; Hub repos are downloaded into ``cache_dir`` at their resolved commit."""
    if source.path is not None:
        if not source.path.is_dir():
            raise ModelError(f"{source.path}: not a directory", hint="check `path:` in the release config")
        return ModelDir(source.path, source.label)
    from huggingface_hub import snapshot_download

    remote = probe(source)
    api = hub_api()
    path = snapshot_download(repo_id=source.repo, revision=remote.revision, allow_patterns=list(ALLOW_PATTERNS),
                             cache_dir=str(cache_dir), endpoint=api.endpoint, token=api.token)
    return ModelDir(Path(path), f"{source.repo}@{remote.revision[:12]}", remote.revision)
