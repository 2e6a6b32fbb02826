"""Watch the Hub for fine-tunes of the base models we follow and decide which need their MTP head restored.

Plain Python, no Prefect; ``flows/watch.py`` composes these pieces:

- ``load_watch_policy`` reads ``model_configs/watch.yaml`` (what to watch, where the head comes from, which
  licenses we may redistribute, where releases go);
- ``discover`` lists the models whose model tree descends from a watched base (``base_model:`` filters);
- ``inspect_candidate`` reads what a decision needs from the Hub: the repo's metadata, its ``config.json`` (and
  the tokenizer's and processor's, for remote code) and its safetensors *headers* — never weights;
- ``decide`` is a pure function of that, the policy and what was decided before;
- ``release_config_text`` is the eligible decision's release config as YAML text: it travels in the launch
  (event payload or flow run parameter), so the worker that runs the release needs nothing from our disk.

Decisions are remembered by ``flows/watch.py`` in Prefect Variables, which every watcher and worker sees.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mtpress.archs import arch_for_config
from mtpress.checkpoint import CODE_MAPS, ModelDir
from mtpress.errors import ConfigError, MtpressError, UnsupportedArchitectureError
from mtpress.fsutil import write_text_atomic
from mtpress.naming import gguf_repo, watched_release_name
from mtpress.schema import (
    BenchSpec,
    Layout,
    QualitySpec,
    ReleaseConfig,
    RepoId,
    Source,
    StrictModel,
    load_release_config,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
POLICY_EXAMPLE = "model_configs/watch.yaml"

# How a model names its parent on the Hub (the `base_model:<relation>:<parent>` tag). Only fine-tunes and
# merges carry full weights we can convert; adapters and quantized repos do not.
Relation = Literal["finetune", "merge"]


# ---------------------------------------------------------------------------------------------------------
# Policy
# ---------------------------------------------------------------------------------------------------------


class WatchedBase(StrictModel):
    """A base model whose descendants we watch, and the repo that gives them its MTP head."""

    repo: RepoId
    donor: RepoId | None = Field(default=None, description="default: the base itself, which ships the head")

    @property
    def head_donor(self) -> str:
        return self.donor or self.repo


class ReleaseDefaults(StrictModel):
    """The parts of every generated release config that the policy chooses; the rules are the release schema's."""

    layouts: tuple[Layout, ...] = ReleaseConfig.model_fields["layouts"].default
    quants: tuple[str, ...] = ReleaseConfig.model_fields["quants"].default
    head_type: str | None = "Q8_0"
    private: bool = False
    bench: BenchSpec = BenchSpec()
    quality: QualitySpec = QualitySpec()

    # The release schema owns these rules; delegating keeps one definition and one wording.
    _layouts = field_validator("layouts")(lambda cls, value: ReleaseConfig._layouts(value))
    _quants = field_validator("quants")(lambda cls, value: ReleaseConfig._quants(value))
    _head_type = field_validator("head_type")(lambda cls, value: ReleaseConfig._head_type(value))
    _bench_quants_are_built = model_validator(mode="after")(ReleaseConfig._bench_quants_are_built)

    @model_validator(mode="after")
    def _no_local_files(self) -> ReleaseDefaults:
        # The release runs on whichever worker takes it, which cannot read files beside the watcher's policy.
        local = [key for key, value in (("bench.prompts", self.bench.prompts),
                                        ("quality.calibration", self.quality.calibration)) if value is not None]
        if local:
            raise ValueError(f"{', '.join(local)}: a watched release runs on a worker that cannot read the "
                             "watcher's files; leave it unset (the shipped set)")
        return self


class WatchPolicy(StrictModel):
    schema_version: Literal[1] = 1
    bases: Annotated[tuple[WatchedBase, ...], Field(min_length=1)]
    relations: Annotated[tuple[Relation, ...], Field(min_length=1)] = ("finetune",)
    depth: Annotated[int, Field(ge=1, le=3, description="generations below a base to follow")] = 1
    licenses: Annotated[tuple[str, ...], Field(min_length=1, description="SPDX-style ids we may redistribute")]
    target_namespace: str
    exclude_tags: tuple[str, ...] = ("mtp", "gguf")
    release: ReleaseDefaults = ReleaseDefaults()

    @field_validator("bases")
    @classmethod
    def _unique_bases(cls, value: tuple[WatchedBase, ...]) -> tuple[WatchedBase, ...]:
        repos = [b.repo for b in value]
        if len(set(repos)) != len(repos):
            raise ValueError("lists a base repo twice")
        return value

    @field_validator("licenses")
    @classmethod
    def _licenses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # The Hub's license ids are lowercase; comparing lowercase forgives "Apache-2.0" in a card.
        return tuple(dict.fromkeys(v.strip().lower() for v in value))

    @field_validator("target_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not NAMESPACE.match(value):
            raise ValueError(f"{value!r} is not a Hub user or organisation name")
        return value

    def base(self, repo: str) -> WatchedBase:
        return next(b for b in self.bases if b.repo == repo)


def load_watch_policy(path: Path) -> WatchPolicy:
    """Read and validate a watch policy YAML; raise ConfigError naming the file and every bad key."""
    label = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(label, ["file not found"], hint=f"start from {POLICY_EXAMPLE}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(label, [f"not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError(label, ["the top level must be a mapping of keys to values"])
    try:
        return WatchPolicy.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(label, [_describe(err) for err in e.errors()],
                          hint=f"see {POLICY_EXAMPLE} for a complete, valid example") from None


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown key (check its spelling; see {POLICY_EXAMPLE})"
    elif err["type"] == "missing":
        message = "required key is missing"
    return f"{key}: {message}"


# ---------------------------------------------------------------------------------------------------------
# What the Hub tells us about a candidate
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A model found below a watched base, before anything about its files is read."""

    repo: str
    base: str  # the watched base it descends from (its head donor comes from there)
    parent: str  # the model its card names as base_model
    relation: str  # finetune, merge, adapter, quantized, or unknown
    tags: tuple[str, ...]


@dataclass(frozen=True)
class CandidateInfo:
    """Everything ``decide`` looks at; ``error`` is set when the Hub could not be read this time."""

    candidate: Candidate
    revision: str | None = None
    donor_revision: str | None = None  # the head donor's commit, read in the same inspection
    licenses: tuple[str, ...] = ()
    architectures: tuple[str, ...] | None = None  # None: the repo has no config.json
    remote_code: str | None = None  # which of its configs asks for code of its own (never run), and what
    weights: str | None = None  # why there are no safetensors to read; None when there are
    head_tensors: tuple[str, ...] = ()
    target_exists: bool = False
    error: str | None = None


def discover(policy: WatchPolicy, api: HfApi) -> list[Candidate]:
    """Models whose card names a watched base (or, with ``depth`` > 1, one of its full-weight descendants)."""
    found: dict[str, Candidate] = {}
    watched = {b.repo for b in policy.bases}
    for base in policy.bases:
        parents = [base.repo]
        for _generation in range(policy.depth):
            next_parents = []
            for parent in parents:
                for model in api.list_models(filter=f"base_model:{parent}"):
                    if model.id in found or model.id in watched:
                        continue
                    tags = tuple(model.tags or ())
                    found[model.id] = Candidate(model.id, base.repo, parent, _relation(tags, parent), tags)
                    if found[model.id].relation in ("finetune", "merge"):
                        next_parents.append(model.id)
            parents = next_parents
    return list(found.values())


def _relation(tags: tuple[str, ...], parent: str) -> str:
    for tag in tags:
        head, _, rest = tag.partition(":")
        relation, _, named = rest.partition(":")
        if head == "base_model" and named == parent:
            return relation
    return "unknown"


def release_target(repo: str, policy: WatchPolicy) -> tuple[str, str]:
    """(release name, target repo) for a fine-tune: ``<name>-MTP`` in ``<target_namespace>/<name>-MTP-GGUF``."""
    name = watched_release_name(repo)
    return name, gguf_repo(policy.target_namespace, name)


def inspect_candidate(candidate: Candidate, policy: WatchPolicy, api: HfApi) -> CandidateInfo:
    """Read metadata, config.json and the safetensors headers at one pinned revision; never weights.

    Hub errors propagate: the caller retries, or records the candidate as not inspected this time.
    """
    # The Hub client loads here, not at import: validating a policy (`mtpress watch` does first) needs none of it.
    from huggingface_hub import hf_hub_download

    from mtpress.stages.download import probe

    info = api.model_info(candidate.repo)
    files = {s.rfilename for s in info.siblings or []}
    card = info.card_data.to_dict() if info.card_data else {}
    architectures, remote_code = None, None
    # Read once per candidate, ever: a throwaway cache keeps the user's Hub cache free of every candidate seen.
    with tempfile.TemporaryDirectory(prefix="mtpress-watch-") as cache:
        read = [Path(hf_hub_download(candidate.repo, name, revision=info.sha, cache_dir=cache,
                                     endpoint=api.endpoint, token=api.token)) for name in CODE_MAPS if name in files]
        if read:  # one snapshot folder holds them all
            snapshot = ModelDir(read[0].parent, candidate.repo)
            remote_code = snapshot.remote_code()
            if "config.json" in files and remote_code is None:  # with remote code, that is the decision
                architectures = tuple(snapshot.config.get("architectures") or ())
    weights, head = None, ()
    try:
        head = probe(Source(repo=candidate.repo, revision=info.sha)).head_tensors
    except MtpressError as e:  # probe's "no safetensors" / "only pickle weights": a property of the repo
        weights = str(e).splitlines()[0]
    _, target = release_target(candidate.repo, policy)
    donor = api.model_info(policy.base(candidate.base).head_donor).sha
    return CandidateInfo(candidate, revision=info.sha, donor_revision=donor, licenses=_card_licenses(card),
                         architectures=architectures, remote_code=remote_code, weights=weights, head_tensors=head,
                         target_exists=api.repo_exists(target))


def _card_licenses(card: dict) -> tuple[str, ...]:
    value = card.get("license")
    values = value if isinstance(value, list) else [value] if value else []
    return tuple(str(v).strip().lower() for v in values)


# ---------------------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------------------


class Reason(StrEnum):
    """Why a candidate was or was not released; stable codes for logs, the UI table and the Variables."""

    ELIGIBLE = "eligible"
    ALREADY_DECIDED = "already_decided"  # remembered: handled by an earlier or concurrent watch run
    INSPECT_FAILED = "inspect_failed"  # the Hub could not be read; tried again next run
    OWN_OUTPUT = "own_output"  # lives in our target namespace
    EXCLUDED_TAG = "excluded_tag"  # tagged like a release (mtp, gguf, ...)
    RELATION_NOT_WATCHED = "relation_not_watched"  # a quantization, an adapter, ...: no full weights
    NO_SAFETENSORS = "no_safetensors"
    REMOTE_CODE = "remote_code"  # a config or tokenizer that names code of its own (auto_map)
    UNSUPPORTED_ARCHITECTURE = "unsupported_architecture"
    HEAD_PRESENT = "head_present"  # it kept its MTP head: nothing to restore
    LICENSE_NOT_ALLOWED = "license_not_allowed"
    ALREADY_PUBLISHED = "already_published"  # the target repo exists, or another candidate claimed it
    CONFIG_INVALID = "config_invalid"  # the release config we would write does not validate


@dataclass(frozen=True)
class Decision:
    repo: str
    revision: str | None
    reason: Reason
    detail: str
    release: ReleaseConfig | None = None  # the release to launch, when eligible

    @property
    def eligible(self) -> bool:
        return self.reason is Reason.ELIGIBLE

    @property
    def final(self) -> bool:
        """Whether to remember it: a failed inspection is retried, a remembered decision is not re-recorded."""
        return self.reason not in (Reason.INSPECT_FAILED, Reason.ALREADY_DECIDED)


def decide(info: CandidateInfo, policy: WatchPolicy, *, earlier: dict | None = None,
           claimant: str | None = None) -> Decision:
    """Whether to release ``info.candidate``; the first rule that rejects it gives the reason.

    ``earlier``: the remembered decision on this candidate; ``claimant``: the candidate an earlier eligible
    decision gave this candidate's target repo to.
    """
    candidate = info.candidate

    def verdict(reason: Reason, detail: str, release: ReleaseConfig | None = None) -> Decision:
        return Decision(candidate.repo, info.revision, reason, detail, release)

    if earlier is not None:
        return verdict(Reason.ALREADY_DECIDED, f"decided {earlier['decided_at']}: {earlier['reason']}")
    if info.error is not None:
        return verdict(Reason.INSPECT_FAILED, info.error)
    if candidate.repo.split("/", 1)[0] == policy.target_namespace:
        return verdict(Reason.OWN_OUTPUT, f"in our namespace {policy.target_namespace!r}")
    if excluded := sorted(set(candidate.tags) & set(policy.exclude_tags)):
        return verdict(Reason.EXCLUDED_TAG, f"tagged {', '.join(excluded)}")
    if candidate.relation not in policy.relations:
        return verdict(Reason.RELATION_NOT_WATCHED,
                       f"a {candidate.relation} of {candidate.parent}; watching {', '.join(policy.relations)}")
    if info.weights is not None:
        return verdict(Reason.NO_SAFETENSORS, info.weights)
    if info.remote_code is not None:
        return verdict(Reason.REMOTE_CODE, info.remote_code)
    if info.architectures is None:
        return verdict(Reason.UNSUPPORTED_ARCHITECTURE, "no config.json")
    try:
        arch = arch_for_config({"architectures": list(info.architectures)}, where=candidate.repo)
    except UnsupportedArchitectureError as e:
        return verdict(Reason.UNSUPPORTED_ARCHITECTURE, str(e).splitlines()[0])
    if info.head_tensors:
        return verdict(Reason.HEAD_PRESENT, f"{len(info.head_tensors)} MTP tensors already present")
    if not info.licenses:
        return verdict(Reason.LICENSE_NOT_ALLOWED, "the card names no license")
    if disallowed := [lic for lic in info.licenses if lic not in policy.licenses]:
        return verdict(Reason.LICENSE_NOT_ALLOWED,
                       f"license {', '.join(disallowed)} is not in the policy ({', '.join(policy.licenses)})")
    name, target = release_target(candidate.repo, policy)
    if info.target_exists:
        return verdict(Reason.ALREADY_PUBLISHED, f"{target} exists")
    if claimant is not None:
        return verdict(Reason.ALREADY_PUBLISHED, f"{target} is claimed by {claimant}")
    defaults = policy.release
    try:
        release = ReleaseConfig.model_validate({
            "name": name, "arch": arch.name,
            "finetune": {"repo": candidate.repo, "revision": info.revision},
            "donor": {"repo": policy.base(candidate.base).head_donor, "revision": info.donor_revision},
            "target": {"repo": target, "private": defaults.private},
            "layouts": defaults.layouts, "quants": defaults.quants, "head_type": defaults.head_type,
            "bench": defaults.bench, "quality": defaults.quality,
        })
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        return verdict(Reason.CONFIG_INVALID, problems)
    return verdict(Reason.ELIGIBLE, f"{arch.family}, MTP head missing: restore from {release.donor.repo} "
                                    f"into {target}", release)



# ---------------------------------------------------------------------------------------------------------
# Generated release configs and remembered decisions
# ---------------------------------------------------------------------------------------------------------


def release_config_text(decision: Decision, policy_path: Path) -> str:
    """The eligible decision's release config as YAML, validated as the publish flow will read it."""
    if decision.release is None:
        raise ValueError(f"{decision.repo} is not eligible ({decision.reason}): there is no release to write")
    header = (f"# Generated by `mtpress watch` from {policy_path} on {_now()}.\n"
              f"# {decision.repo}@{decision.revision}: {decision.detail}\n")
    text = header + yaml.safe_dump(decision.release.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    load_release_config(text)
    return text


def write_release_config(text: str, name: str, configs_dir: Path) -> Path:
    """A copy of a generated config, for a person to read or to start by hand (``mtpress publish <path>``)."""
    path = (configs_dir / f"{name}.yaml").resolve()
    write_text_atomic(path, text)
    return path


def decision_record(decision: Decision, *, launch: dict | None = None) -> dict:
    """What is remembered of a final decision: small, it is stored in a Prefect Variable (5000 characters)."""
    record = {"repo": decision.repo, "reason": str(decision.reason), "detail": decision.detail[:1000],
              "revision": decision.revision, "decided_at": _now()}
    if decision.release is not None:
        record.update(target=decision.release.target.repo, launch=launch)
    return record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
