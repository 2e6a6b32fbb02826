"""The release configuration: one YAML file per release in ``model_configs/``.

Defaults live here and nowhere else. ``load_release_config`` turns every
validation problem into one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtpress.errors import ConfigError
from mtpress.stages.bench import BenchSpec
from mtpress.stages.export_mlx import MlxSpec
from mtpress.stages.quality import QualitySpec
from mtpress.stages.realign import HeadSpec

# llama-quantize's own type names (tools/quantize/quantize.cpp) that we publish, with the
# nominal bits the -hf downloader reads from a name when pairing siblings.
QUANT_TYPES: dict[str, int] = {
    "BF16": 16, "F16": 16, "Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q5_K_S": 5, "Q5_0": 5, "Q4_K_M": 4, "Q4_K_S": 4,
    "Q4_0": 4, "IQ4_XS": 4, "IQ4_NL": 4, "Q3_K_L": 3, "Q3_K_M": 3, "Q3_K_S": 3, "IQ3_M": 3, "IQ3_XXS": 3,
    "Q2_K": 2, "IQ2_M": 2,
}
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

Layout = Literal["embedded", "sidecar"]


def _repo_id(value: str) -> str:
    if not REPO_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a Hub repo id of the form 'owner/name'")
    return value


RepoId = Annotated[str, AfterValidator(_repo_id)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(StrictModel):
    """Where a checkpoint comes from: a Hub repo at a revision, or a local directory."""

    repo: RepoId | None = None
    revision: str = "main"
    path: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of 'repo' (a Hub repo id) or 'path' (a local directory)")
        return self

    @property
    def label(self) -> str:
        """repo@revision, or a local folder's name: labels reach the manifest and the card, and where the folder
        sits on the publisher's machine is theirs (the manifest adds the folder's content digest)."""
        return f"{self.repo}@{self.revision}" if self.repo else self.path.resolve().name


class Target(StrictModel):
    repo: RepoId
    private: bool = False
    license: str | None = None  # None: inherited from the fine-tune's card
    # Where the release is committed and verified with the real clients before it reaches `repo`.
    staging_repo: RepoId | None = None  # None: <repo>-staging
    # Where a head re-aligned on another machine (head.deployment) is exchanged: private, never published.
    realign_repo: RepoId | None = None  # None: <repo>-realign

    @model_validator(mode="after")
    def _staging_is_elsewhere(self) -> Target:
        if self.staging_repo == self.repo:
            raise ValueError("staging_repo must differ from repo: the release is verified there before it reaches repo")
        if (self.realign_repo or f"{self.repo}-realign") in (self.repo, self.staging_repo or f"{self.repo}-staging"):
            raise ValueError("realign_repo must differ from repo and staging_repo: it holds training results, "
                             "which are never part of the release")
        return self

    @property
    def realign(self) -> Target:
        """The private repo a re-aligned head trained elsewhere is committed to; the same endpoint as the target."""
        return Target(repo=self.realign_repo or f"{self.repo}-realign", private=True)

    @property
    def staging(self) -> Target:
        """The private repo the release gate verifies; the same endpoint as the target."""
        return Target(repo=self.staging_repo or f"{self.repo}-staging", private=True, license=self.license)


class SmokeSpec(StrictModel):
    prompt: str = "The quick brown fox jumps over the lazy dog. Once upon a time"
    n_predict: Annotated[int, Field(ge=8, le=1024)] = 48
    draft_n_max: Annotated[int, Field(ge=1, le=8)] = 2
    timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # Sent with --mmproj when the release has a vision projector; None: the shipped test image.
    image: Path | None = None
    # The least share of drafted tokens llama.cpp must accept (accepted ÷ drafted, text request, at draft_n_max)
    # for a head to ship, in the smoke test and the release gate. Identical output only proves the verifier: a
    # dead head drafts and is never right. Measured at draft length 2 (b11434, CPU): the demo's copied head 0.59 to
    # 0.85 over 48 tokens and 0.73 to 0.75 over the gate's 16, on BF16 to Q4_K_M in both layouts; a head of the
    # same shape with random matrices 0/91 and 0/27 on every one. Copied heads on real fine-tunes are reported
    # near 0.5. Pooled acceptance falls with the draft length ((α + … + α^k) / k): a long draft_n_max needs a lower one.
    min_acceptance: Annotated[float, Field(ge=0, le=1)] = 0.2


class GateSpec(StrictModel):
    """The release gate: llama.cpp's -hf and snapshot_download against the staged commit, before promotion."""

    enabled: bool = True
    # The smoke tokens are a longer greedy run of the same prompt; the gate compares this many.
    n_predict: Annotated[int, Field(ge=1, le=1024)] = 16


class ReleaseConfig(StrictModel):
    schema_version: Literal[1] = 1
    name: str = Field(description="release name, used in file names: <name>-<QUANT>.gguf")
    arch: str = "qwen35"
    finetune: Source
    donor: Source | None = None
    target: Target
    layouts: tuple[Layout, ...] = ("sidecar", "embedded")  # the first one sits at the repo root
    quants: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
    head_type: str | None = Field(default=None, description="keep the MTP head's tensors at this type (e.g. Q8_0)")
    mmproj: bool = Field(default=True, description="export a multimodal checkpoint's vision tower once, as "
                         "mmproj-<name>-BF16.gguf (ignored for text-only checkpoints)")
    smoke: SmokeSpec = SmokeSpec()
    bench: BenchSpec = BenchSpec()
    quality: QualitySpec = QualitySpec()
    head: HeadSpec = HeadSpec()  # copy the donor's head, re-align it on the fine-tune, or publish the better
    gate: GateSpec = GateSpec()
    mlx: MlxSpec | None = None  # the MTPLX pack for Apple Silicon, published to its own repo; absent: none

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not RELEASE_NAME.fullmatch(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it becomes part of file names)")
        return value

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
        from mtpress.archs import registered

        if value not in registered():
            raise ValueError(f"unknown architecture {value!r}; registered: {', '.join(sorted(registered()))}")
        return value

    @field_validator("quants")
    @classmethod
    def _quants(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for quant in value:
            if quant not in QUANT_TYPES or quant == "BF16":
                raise ValueError(f"unknown quant type {quant!r}; expected one of "
                                 f"{', '.join(q for q in QUANT_TYPES if q != 'BF16')} (BF16 is always built)")
        if len(set(value)) != len(value):
            raise ValueError("lists a quant type twice")
        return value

    @field_validator("head_type")
    @classmethod
    def _head_type(cls, value: str | None) -> str | None:
        if value is not None and value not in QUANT_TYPES:
            raise ValueError(f"unknown quant type {value!r}; expected one of {', '.join(QUANT_TYPES)}")
        return value

    @model_validator(mode="after")
    def _bench_quants_are_built(self) -> ReleaseConfig:
        unknown = sorted(set(self.bench.quants or ()) - {"BF16", *self.quants})
        if unknown:
            raise ValueError(f"bench.quants names {', '.join(unknown)}, which the release does not build")
        return self

    @model_validator(mode="after")
    def _remote_head_reads_the_hub(self) -> ReleaseConfig:
        # The machine behind head.deployment shares no disk with this one: it can only read what the Hub holds.
        if self.head.deployment is not None and self.head.source != "copy":
            local = [key for key, value in (("finetune", self.finetune.path), ("donor", self.donor and self.donor.path),
                                            ("head.prompts", self.head.prompts)) if value is not None]
            if local:
                raise ValueError(f"head.deployment trains on another machine, which cannot read the local "
                                 f"{', '.join(local)}: give finetune and donor as Hub repos and leave head.prompts "
                                 "unset (the shipped prompt set)")
        return self

    @field_validator("layouts")
    @classmethod
    def _layouts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("list each of 'embedded' and 'sidecar' at most once, and at least one")
        return value


def load_release_config(path: Path) -> ReleaseConfig:
    """Read and validate a release YAML; raise ConfigError naming the file and every bad key."""
    label = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(label, ["file not found"], hint="release configs live in model_configs/") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(label, [f"not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError(label, ["the top level must be a mapping of keys to values"])
    try:
        config = ReleaseConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(label, [_describe(err) for err in e.errors()],
                          hint="see model_configs/demo.yaml for a complete, valid example") from None
    return _resolve_paths(config, path.parent)


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key (check its spelling; see model_configs/demo.yaml)"
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{key}: {message}"


def _resolve_paths(config: ReleaseConfig, base: Path) -> ReleaseConfig:
    """Local source paths are relative to the config file, so configs work from any directory."""
    updates = {}
    for section, key in (("bench", "prompts"), ("quality", "calibration"), ("smoke", "image"), ("head", "prompts")):
        spec = getattr(config, section)
        if getattr(spec, key) is not None and not getattr(spec, key).is_absolute():
            updates[section] = spec.model_copy(update={key: (base / getattr(spec, key)).resolve()})
    for field in ("finetune", "donor"):
        source = getattr(config, field)
        if source is not None and source.path is not None and not source.path.is_absolute():
            updates[field] = source.model_copy(update={"path": (base / source.path).resolve()})
    return config.model_copy(update=updates) if updates else config
