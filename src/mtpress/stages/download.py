"""Fetch a checkpoint: a local directory as is, or a Hub repo at a pinned revision.

From the Hub only what conversion needs is downloaded (safetensors, configs, tokenizer,
chat template, vision preprocessor), at the commit the revision resolved to, so a rerun
fetches the same bytes. The head's presence is read from remote safetensors headers first, and a
checkpoint that ships only pickles or asks for remote code is refused from its file listing and
its small files (configs, tokenizer), before any weight is downloaded. Hub failures become
ModelError (the repo or revision does not exist for this token) or HubRequestError (retried when
transient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import SafetensorsRepoMetadata
from huggingface_hub.utils import tqdm as hf_tqdm

from mtpress.checkpoint import PICKLE_SUFFIXES, ModelDir, RemoteShard
from mtpress.errors import AbandonedError, HubRequestError, ModelError
from mtpress.hub.client import hub_api
from mtpress.safetensors_io import TensorInfo
from mtpress.schema import Source
from mtpress.toolchain.processes import abandonment_check

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
    safetensors: SafetensorsRepoMetadata  # every shard's header, read with range requests

    def shards_to_fetch(self, only_tensors: Callable[[str], bool] | None) -> set[str]:
        """The weight files ``fetch`` downloads: all of them, or of a sharded checkpoint those holding a tensor
        ``only_tensors`` accepts."""
        if only_tensors is None or not self.safetensors.sharded:
            return set(self.safetensors.files_metadata)
        return {shard for name, shard in self.safetensors.weight_map.items() if only_tensors(name)}


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
    return RemoteProbe(source.repo, info.sha, has_safetensors, head, files, metadata)


@contextmanager
def hub_errors(source: Source) -> Iterator[None]:
    """Hub failures while reading ``source`` as ModelError (no such repo or revision for this token: not retried)
    or HubRequestError (retried when transient)."""
    api = hub_api()
    try:
        yield
    except RepositoryNotFoundError as e:
        raise ModelError(f"{source.label}: no such model repo on {api.endpoint}, or the token cannot read it",
                         hint="check the repo id in the release config, and HF_TOKEN if the repo is private or "
                              "gated") from e
    except RevisionNotFoundError as e:
        raise ModelError(f"{source.label}: {source.repo} has no revision {source.revision!r}",
                         hint="name a branch, tag or commit of the repo in the release config") from e
    except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.TransportError) as e:
        raise HubRequestError(f"reading {source.label} from {api.endpoint} failed: {str(e).splitlines()[0]}",
                              hint="server errors and dropped connections are retried; if it persists, check "
                                   "HF_ENDPOINT, the network and HF_TOKEN") from e


def local_model(source: Source) -> ModelDir:
    """The checkpoint a ``path:`` source names."""
    if not source.path.is_dir():
        raise ModelError(f"{source.path}: not a directory", hint="check `path:` in the release config")
    model = ModelDir(source.path, source.label)
    model.refuse_remote_code()
    return model


def fetch(source: Source, cache_dir: Path, only_tensors: Callable[[str], bool] | None = None) -> ModelDir:
    """A ModelDir for ``source``; Hub repos are downloaded into ``cache_dir`` at their resolved commit.

    ``only_tensors``: of the weights, download only the shards holding a tensor it accepts (a donor gives its
    head alone: a 9B base's other 17 GB stay on the Hub); the others are known by their remote headers."""
    if source.path is not None:
        return local_model(source)
    from huggingface_hub import snapshot_download

    api = hub_api()
    with hub_errors(source):
        remote = probe(source)  # refuses a pickle-only repo from its file listing
        label = f"{source.repo}@{remote.revision[:12]}"
        if "config.json" not in remote.files:
            raise ModelError(f"{label}: no config.json in the repo", hint="point at a Hugging Face checkpoint repo")
        # The small files first (the weights' download then finds them in the cache): a checkpoint that asks for
        # remote code is refused before a single weight byte moves.
        small = [p for p in ALLOW_PATTERNS if p != "*.safetensors"]
        progress = _stops_when_abandoned(label)
        ModelDir(Path(snapshot_download(repo_id=source.repo, revision=remote.revision, allow_patterns=small,
                                        cache_dir=str(cache_dir), endpoint=api.endpoint, token=api.token,
                                        tqdm_class=progress)), label).refuse_remote_code()
        shards = set(remote.safetensors.files_metadata)
        wanted = remote.shards_to_fetch(only_tensors)
        left = _remote_shards(remote, shards - wanted)
        # The Hub keeps binary files in LFS; a shard that came some other way has no sha256 to record unread.
        wanted = shards - {shard.name for shard in left}
        path = snapshot_download(repo_id=source.repo, revision=remote.revision, allow_patterns=small + sorted(wanted),
                                 cache_dir=str(cache_dir), endpoint=api.endpoint, token=api.token,
                                 tqdm_class=progress)
    return ModelDir(Path(path), label, remote.revision, left)


def _stops_when_abandoned(label: str) -> type[hf_tqdm]:
    """huggingface_hub's progress bars, whose every step first checks that the download is still wanted: on a Dask
    worker a killed flow's fetch would otherwise run to its end (a 9B's 18 GB), as Dask cannot interrupt it. Made
    on the thread that runs the task; the steps come from the download's own threads."""
    abandoned = abandonment_check()

    class StopsWhenAbandoned(hf_tqdm):
        def update(self, n: float | None = 1) -> bool | None:
            if abandoned():
                raise AbandonedError(f"downloading {label} stopped: the flow run that wanted it is gone (its Dask "
                                     "task was cancelled)")
            return super().update(n)

    return StopsWhenAbandoned


def _remote_shards(remote: RemoteProbe, names: set[str]) -> tuple[RemoteShard, ...]:
    """Those of ``names`` the Hub stores in LFS, with their headers from the probe and their sha256 from the Hub's
    listing at the probed commit."""
    if not names:
        return ()
    listing = {f.path: f for f in hub_api().get_paths_info(remote.repo, sorted(names), revision=remote.revision,
                                                           expand=True)}
    shards = []
    for name in sorted(names):
        if (lfs := getattr(listing.get(name), "lfs", None)) is None:
            continue
        header = remote.safetensors.files_metadata[name].tensors
        shards.append(RemoteShard(name, lfs.sha256, tuple(
            TensorInfo(t, info.dtype, tuple(info.shape), *info.data_offsets) for t, info in sorted(header.items()))))
    return tuple(shards)
