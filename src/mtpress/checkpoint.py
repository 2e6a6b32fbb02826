"""A Hugging Face checkpoint directory, read without loading any weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mtpress.errors import CorruptCheckpointError, ModelError
from mtpress.fsutil import sha256_file
from mtpress.safetensors_io import TensorInfo, read_header

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The files whose `auto_map` names code for transformers to import, the repo's own or another's
# ("other/repo--module.Class" is fetched from the Hub). Several of llama.cpp's vocabulary readers trust it
# (trust_remote_code=True); Qwen3.5's does not, and a tokenizer that exists only as such code fails to convert.
CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
             "video_preprocessor_config.json")


@dataclass(frozen=True)
class RemoteShard:
    """A shard left on the Hub: its tensors' header entries and its LFS sha256, as the Hub gives them. Offsets
    count from the shard's data section; nothing reads this shard's bytes."""

    name: str
    sha256: str
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ModelDir:
    """A checkpoint on disk. ``label`` says where it came from (repo@revision, or a local folder's name: labels
    reach the manifest, so never a path). ``left_on_hub``: shards not downloaded (a donor gives its head alone),
    known by their headers."""

    path: Path
    label: str
    revision: str | None = None
    left_on_hub: tuple[RemoteShard, ...] = ()

    @cached_property
    def config(self) -> dict:
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelError(f"{self.label}: no config.json in {self.path}",
                             hint="point at a Hugging Face checkpoint directory")
        self.refuse_remote_code()
        return json.loads(config_path.read_text(encoding="utf-8"))

    def remote_code(self) -> str | None:
        """Which of ``CODE_MAPS`` here asks for code of its own (``auto_map``), and for what; None when none does."""
        for name in CODE_MAPS:
            path = self.path / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise CorruptCheckpointError(f"{self.label}: {name} is not valid JSON ({e})") from e
            if isinstance(data, dict) and data.get("auto_map"):
                return f"{name} asks for remote code (auto_map: {', '.join(sorted(data['auto_map']))})"
        return None

    def refuse_remote_code(self) -> None:
        if asked := self.remote_code():
            raise ModelError(f"{self.label}: {asked}",
                             hint="mtpress never runs code from a model repo, and a model or tokenizer that needs "
                                  "its own code does not convert as its author meant; use a checkpoint of a "
                                  "built-in architecture and tokenizer")

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name → shard file name, from the index or the single ``model.safetensors``."""
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{self.label}: {INDEX} is malformed ({e})") from e
            for shard in set(weight_map.values()):
                _check_file_name(shard, self.label)
            return dict(weight_map)
        single = self.path / "model.safetensors"
        if single.is_file():
            return {name: single.name for name in read_header(single)[0]}
        if any(p.suffix in PICKLE_SUFFIXES for p in self.path.iterdir()):
            raise ModelError(f"{self.label}: only pickle weights (.bin/.pt), no safetensors",
                             hint="pickle files can run code when loaded; mtpress only reads safetensors. Ask "
                                  "the publisher for safetensors weights")
        raise ModelError(f"{self.label}: no safetensors weights in {self.path}")

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry, validated against the index."""
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        found: dict[str, TensorInfo] = {}
        remote = {shard.name: shard for shard in self.left_on_hub}
        for shard, names in sorted(by_shard.items()):
            shard_path = self.path / shard
            if shard in remote:
                headers = {t.name: t for t in remote[shard].tensors}
            elif not shard_path.is_file():
                raise CorruptCheckpointError(f"{self.label}: {INDEX} lists shard {shard}, which is missing",
                                             hint="download the complete checkpoint")
            else:
                headers, _ = read_header(shard_path)
            for name in names:
                if name not in headers:
                    raise CorruptCheckpointError(
                        f"{self.label}: {INDEX} puts tensor {name} in {shard}, but {shard} does not contain it",
                        hint="the index and the shards are from different versions; re-download the checkpoint")
                found[name] = headers[name]
        return found

    def shard_of(self, name: str) -> Path:
        """The file holding tensor ``name``'s bytes."""
        shard = self.weight_map[name]
        if any(remote.name == shard for remote in self.left_on_hub):
            raise ModelError(f"{self.label}: tensor {name} is in {shard}, which was left on the Hub",
                             hint="fetch the checkpoint with the tensors it is read for")
        return self.path / shard

    def shard_sha256(self, shard: str) -> str:
        """A shard's sha256: the Hub's LFS record for one left there, else hashed here."""
        for remote in self.left_on_hub:
            if remote.name == shard:
                return remote.sha256
        return sha256_file(self.path / shard)

    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def _check_file_name(name: str, label: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise CorruptCheckpointError(f"{label}: {INDEX} names the file {name!r}, which escapes the checkpoint",
                                     hint="refusing a path with '..', an absolute path or backslashes")
