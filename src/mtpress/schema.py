"""The release configuration: one YAML file per release in ``model_configs/``.

Defaults live here and nowhere else. ``load_release_config`` turns every
validation problem into one line naming the file (or the event's config, sent as text), the key and what was
expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mtpress.archs import get_arch, registered
from mtpress.errors import ConfigError
from mtpress.hub.client import HUB_MAX_FILE_SIZE
from mtpress.naming import file_stem, realign_repo, staging_repo

# llama-quantize's own type names (tools/quantize/quantize.cpp) that we publish, with the
# nominal bits the -hf downloader reads from a name when pairing siblings.
QUANT_TYPES: dict[str, int] = {
    "BF16": 16, "F16": 16, "Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q5_K_S": 5, "Q5_0": 5, "Q4_K_M": 4, "Q4_K_S": 4,
    "Q4_0": 4, "IQ4_XS": 4, "IQ4_NL": 4, "Q3_K_L": 3, "Q3_K_M": 3, "Q3_K_S": 3, "IQ3_M": 3, "IQ3_S": 3,
    "IQ3_XS": 3, "IQ3_XXS": 3, "Q2_K": 2, "Q2_K_S": 2, "IQ2_M": 2, "IQ2_S": 2, "IQ2_XS": 2, "IQ2_XXS": 2,
    "IQ1_M": 1, "IQ1_S": 1,
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
    # The Hub's per-file limit (50 GB, decimal: "storage limits" in its docs). A GGUF above it is published as
    # llama-gguf-split parts (stages/split.py), which `-m part-1` and `-hf repo:QUANT` load whole.
    max_file_size: Annotated[int, Field(gt=0)] = HUB_MAX_FILE_SIZE

    @model_validator(mode="after")
    def _staging_is_elsewhere(self) -> Target:
        if self.staging_repo == self.repo:
            raise ValueError("staging_repo must differ from repo: the release is verified there before it reaches repo")
        # Not through .realign/.staging: each builds a Target, whose own check would build the next one.
        if (self.realign_repo or realign_repo(self.repo)) in (self.repo, self.staging_repo or staging_repo(self.repo)):
            raise ValueError("realign_repo must differ from repo and staging_repo: it holds training results, "
                             "which are never part of the release")
        return self

    @property
    def realign(self) -> Target:
        """The private repo a re-aligned head trained elsewhere is committed to; the same endpoint as the target."""
        return Target(repo=self.realign_repo or realign_repo(self.repo), private=True)

    @property
    def staging(self) -> Target:
        """The private repo the release gate verifies; the same endpoint as the target."""
        return Target(repo=self.staging_repo or staging_repo(self.repo), private=True, license=self.license,
                      max_file_size=self.max_file_size)


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
    """The release gate against the staged commit, before promotion: every sha256 from the Hub's metadata, and
    llama.cpp's -hf for the recommended quant, the smallest and ``tags``."""

    enabled: bool = True
    tags: tuple[str, ...] = ()  # more root quants to load with -hf (each downloads that quant once more)
    # The smoke tokens are a longer greedy run of the same prompt; the gate compares this many.
    n_predict: Annotated[int, Field(ge=1, le=1024)] = 16


class BenchSpec(StrictModel):
    """How to benchmark; the release config's ``bench:`` section."""

    enabled: bool = True  # the flow runs the stage only when true
    draft_lengths: tuple[Annotated[int, Field(ge=1, le=8)], ...] = (1, 2, 3)
    repetitions: Annotated[int, Field(ge=1, le=50)] = 3
    warmup: Annotated[int, Field(ge=0, le=10)] = 1
    n_predict: Annotated[int, Field(ge=1, le=1024)] = 64
    prompts: Path | None = Field(default=None, description="JSONL of {id, domain, prompt}; default: the shipped set")
    threads: Annotated[int, Field(ge=1)] | None = None  # None: every core, as llama-server's default
    timeout_s: Annotated[float, Field(gt=0)] = 600.0  # per server start and per request
    quants: tuple[str, ...] | None = None  # which model files of the release's first layout; None: all of them
    per_domain: Annotated[int, Field(ge=1)] | None = None  # the first N prompts of each domain; None: every prompt

    @field_validator("draft_lengths")
    @classmethod
    def _distinct(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(value)) != len(value):
            raise ValueError("lists a draft length twice")
        return value


# llama-quantize b11434 refuses these without an importance matrix ("Missing importance matrix for tensor …"):
# tensor_requires_imatrix in src/llama-quant.cpp is true for IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and IQ3_XXS
# tensors, and for Q2_K ones in a Q2_K_S file; these file types give their tensors those types
# (llama_ftype_get_default_type, and IQ3_XS's attn_q/attn_k/ffn_gate/ffn_up). IQ3_S and IQ3_M do not.
# tests/test_imatrix.py checks the set against llama-quantize --dry-run.
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})
# llama-perplexity --kl-divergence prints no statistics at all below this many scored tokens
# (tools/perplexity/perplexity.cpp, kl_divergence: "if (kld.count < 100) return;").
MIN_SCORED_TOKENS = 100


def scored_per_chunk(ctx_size: int) -> int:
    """Tokens llama-perplexity scores in one chunk: the second half, less the last (it has no next token)."""
    return ctx_size - 1 - ctx_size // 2


def fewest_chunks(ctx_size: int) -> int:
    """The fewest chunks of ``ctx_size`` tokens that llama-perplexity summarises."""
    return -(-MIN_SCORED_TOKENS // scored_per_chunk(ctx_size))


class QualitySpec(StrictModel):
    """How to measure quality; the release config's ``quality:`` section."""

    enabled: bool = True  # the flow runs the stage only when true
    calibration: Path | None = Field(default=None, description="plain text; default: the shipped calibration.txt")
    ctx_size: Annotated[int, Field(ge=16, le=8192)] = 128
    chunks: Annotated[int, Field(ge=1)] = 16  # at most; a short text yields fewer (tokens // ctx_size)
    threads: Annotated[int, Field(ge=1)] | None = None  # None: every core
    timeout_s: Annotated[float, Field(gt=0)] = 3 * 3600.0  # per tool run
    @model_validator(mode="after")
    def _enough_chunks(self) -> QualitySpec:
        per_chunk, fewest = scored_per_chunk(self.ctx_size), fewest_chunks(self.ctx_size)
        if self.chunks < fewest:
            raise ValueError(
                f"chunks: {self.chunks} chunk(s) of {self.ctx_size} tokens score {self.chunks * per_chunk} tokens, "
                f"and llama-perplexity prints its KL-divergence statistics only from {MIN_SCORED_TOKENS} (it scores "
                f"{per_chunk} per chunk, the second half less one): set chunks to at least {fewest}, or raise ctx_size")
        return self


def low_bit(quant: str) -> bool:
    """The types an importance matrix helps most, and which `imatrix.quants: auto` selects: every IQ type, and
    everything of at most 4 bits a weight (Q4_K_M and below)."""
    return quant.startswith("IQ") or QUANT_TYPES[quant] <= 4


class ImatrixSpec(StrictModel):
    """The importance matrix (llama-imatrix, computed once per release from its BF16 files, MTP head included);
    the config's ``imatrix:`` section."""

    # "auto": every IQ type and everything at or below 4 bits; "all": every quant; or a list. The types
    # llama-quantize refuses without one (IMATRIX_REQUIRED) are always made with it.
    quants: Literal["auto", "all"] | tuple[str, ...] = "auto"
    # Plain text. The default is not the quality stage's text: KL-divergence is measured on text the
    # importance matrix never saw.
    calibration: Path | None = Field(default=None, description="plain text; default: the shipped "
                                     "imatrix_calibration.txt")
    ctx_size: Annotated[int, Field(ge=16, le=8192)] = 512
    chunks: Annotated[int, Field(ge=1)] | None = None  # at most; None: as many as the text fills
    threads: Annotated[int, Field(ge=1)] | None = None  # None: every core
    timeout_s: Annotated[float, Field(gt=0)] = 3 * 3600.0

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        if isinstance(value, tuple) and (unknown := [q for q in value if q not in QUANT_TYPES or QUANT_TYPES[q] == 16]):
            raise ValueError(f"not quant types that take an importance matrix: {', '.join(unknown)}")
        return value

    def applies_to(self, quant: str) -> bool:
        """Whether ``quant`` is made with the release's importance matrix."""
        if quant in IMATRIX_REQUIRED or self.quants == "all":
            return QUANT_TYPES[quant] < 16
        return low_bit(quant) if self.quants == "auto" else quant in self.quants


HeadSource = Literal["copy", "realign", "best"]


class HeadSpec(StrictModel):
    """Which head the release publishes, and how a re-aligned one is trained; the config's ``head:`` section.

    ``copy``: the donor's head as injected. ``realign``: a head trained on the fine-tune's own output.
    ``best``: both are measured by the bench on the same files and prompts, and the head with the higher
    acceptance by llama.cpp's draft counts is published.
    """

    source: HeadSource = "copy"
    prompts: Path | None = Field(default=None, description="JSONL of {id, domain, prompt}; default: the shipped set")
    per_domain: Annotated[int, Field(ge=1)] | None = None  # the first N prompts of each domain; None: all
    n_predict: Annotated[int, Field(ge=8, le=4096)] = 256  # greedy tokens generated per prompt
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25  # of the sequences; early stopping watches them
    seed: int = 0
    max_steps: Annotated[int, Field(ge=1)] = 400
    batch_sequences: Annotated[int, Field(ge=1)] = 8
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    eval_every: Annotated[int, Field(ge=1)] = 25
    patience: Annotated[int, Field(ge=1)] = 4  # evaluations without a better held-out acceptance before stopping
    # "hidden": match the trunk's hidden state h_q, which decides its next token through the shared lm_head,
    # at every position (no vocabulary-sized product, so CPU-cheap). "cross-entropy": the trunk's generated
    # next token, over ``candidates`` tokens (those the trunk said plus random others; None = the vocabulary).
    loss: Literal["hidden", "cross-entropy"] = "hidden"
    candidates: Annotated[int, Field(ge=2)] | None = 8192
    device: str = "cpu"  # any torch device the converter's torch supports, e.g. "cuda"
    threads: Annotated[int, Field(ge=1)] = 2  # fixed, so results do not depend on the machine's core count
    timeout_s: Annotated[float, Field(gt=0)] = 6 * 3600.0
    # A Prefect deployment ("flow/deployment", e.g. "realign/realign" on a GPU work pool) that collects and trains
    # on another machine, which reads the inputs from the Hub and commits the head to the exchange repo; None: here.
    deployment: str | None = None


class MlxSpec(StrictModel):
    """The release config's ``mlx:`` section: the MTPLX pack beside the GGUFs (absent: no pack)."""

    bits: Literal[2, 3, 4, 5, 6, 8] = 4
    group_size: Literal[32, 64, 128] = 64
    head_dtype: Literal["bf16", "fp16"] = "bf16"
    # None: the GGUF target's repo id with its -GGUF suffix replaced by -MTPLX (or -MTPLX appended).
    repo: RepoId | None = None
    mtp_depth_max: Annotated[int, Field(ge=1, le=8)] = 3
    # MTPLX's head-agreement probe: prompts from the shipped set (first N per domain; None: all of them),
    # each cut to its last max_prompt_tokens tokens.
    probe_per_domain: Annotated[int, Field(ge=1)] | None = None
    probe_max_prompt_tokens: Annotated[int, Field(ge=4, le=4096)] = 256
    # The cross-runtime check: the unquantized checkpoint in MLX must give llama.cpp's BF16 greedy tokens for
    # this many tokens of the smoke prompt. Later, float differences between engines can flip near-ties.
    match_tokens: Annotated[int, Field(ge=1, le=1024)] = 16
    timeout_s: Annotated[float, Field(gt=0)] = 1800.0


class ClusterSpec(StrictModel):
    """The release config's ``cluster:`` section: where the quant matrix runs (flows/runners.py)."""

    # A Dask scheduler, e.g. tcp://10.0.0.5:8786 (MTPRESS_DASK_ADDRESS overrides it); None: this process's threads.
    dask_address: str | None = None


class ReleaseConfig(StrictModel):
    schema_version: Literal[1] = 1
    name: str = Field(description="release name; files are <name less any -MTP>-<QUANT>.gguf (naming.file_stem)")
    arch: str = "qwen35"
    finetune: Source
    donor: Source | None = None
    target: Target
    layouts: tuple[Layout, ...] = ("sidecar", "embedded")  # the first one sits at the repo root
    quants: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
    head_type: str | None = Field(default=None, description="keep the MTP head's tensors at this type (e.g. Q8_0)")
    # A sidecar head file carries its own copies of the token embedding and output matrix (llama.cpp's draft-mtp
    # reads them from the head's model): most of its size. The smallest type measured with no loss of acceptance on
    # the demo (b11434, smoke's figures; the table in tests/test_lean_head.py): the same drafts accepted with the
    # copies at the trunk's type, Q8_0 and Q4_0 on BF16, Q8_0 and Q4_K_M trunks (29 of 35; over 256 tokens 158 of
    # 192 and 160 of 189 on BF16 and Q4_K_M), and the Q4_K_M head file 99.6 → 83.2 MB. None: the quant's own choice.
    head_shared_type: str | None = Field(default="Q4_0", description="type of the sidecar head's own token "
                                         "embedding and output matrix (token_embd, output)")
    mmproj: bool = Field(default=True, description="export a multimodal checkpoint's vision tower once, as "
                         "mmproj-<name>-BF16.gguf (ignored for text-only checkpoints)")
    smoke: SmokeSpec = SmokeSpec()
    bench: BenchSpec = BenchSpec()
    quality: QualitySpec = QualitySpec()
    imatrix: ImatrixSpec = ImatrixSpec()  # which quants are made with an importance matrix, from what text
    head: HeadSpec = HeadSpec()  # copy the donor's head, re-align it on the fine-tune, or publish the better
    gate: GateSpec = GateSpec()
    mlx: MlxSpec | None = None  # the MTPLX pack for Apple Silicon, published to its own repo; absent: none
    cluster: ClusterSpec = ClusterSpec()  # a Dask cluster for the quant matrix; absent: this machine
    # For a disk smaller than the release: each file is measured, committed to the staging repo and deleted here
    # before the next is made, one layout's BF16 kept until its last quant (flows/bounded.py). Same files,
    # manifest and card; slower, since nothing overlaps.
    bounded_disk: bool = Field(default=False, description="build one file at a time, each committed to the "
                               "staging repo and deleted here once it passes (needs the gate)")

    @property
    def imatrix_quants(self) -> tuple[str, ...]:
        """The quants made with the release's importance matrix (none: it is not computed)."""
        return tuple(q for q in self.quants if self.imatrix.applies_to(q))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not RELEASE_NAME.fullmatch(value):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it becomes part of file names)")
        try:
            file_stem(value)
        except ConfigError as e:
            raise ValueError(e.problems[0]) from None
        return value

    @field_validator("arch")
    @classmethod
    def _arch(cls, value: str) -> str:
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

    @field_validator("head_type", "head_shared_type")
    @classmethod
    def _head_type(cls, value: str | None) -> str | None:
        if value is not None and value not in QUANT_TYPES:
            raise ValueError(f"unknown quant type {value!r}; expected one of {', '.join(QUANT_TYPES)}")
        if value in IMATRIX_REQUIRED:  # a head kept apart keeps its drafts; at 2 bits it would not
            raise ValueError(f"{value} is a 2-bit type that needs an importance matrix: the head is kept apart to "
                             "keep its drafts; use Q8_0, Q6_K or Q4_0")
        return value

    @model_validator(mode="after")
    def _arch_supports_what_is_asked(self) -> ReleaseConfig:
        """Refused here, not after hours of work: the MTPLX pack and a re-aligned head exist only for
        architectures whose registration says so."""
        arch = get_arch(self.arch)
        if self.mlx is not None and arch.mtplx_arch_id is None:
            raise ValueError(f"mlx: MTPLX has no runtime for the {self.arch} architecture; remove `mlx:`")
        if self.head.source != "copy" and not arch.head_trainable:
            raise ValueError(f"head.source: {self.head.source} needs a trainable head; mtpress cannot re-align a "
                             f"{self.arch} head yet; use `source: copy`")
        return self

    @model_validator(mode="after")
    def _bounded_disk_has_somewhere_to_go(self) -> ReleaseConfig:
        if self.bounded_disk and not self.gate.enabled:
            raise ValueError("bounded_disk commits each finished file to the staging repo the gate verifies, then "
                             "deletes it here: it needs `gate: {enabled: true}`")
        return self

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


# How an inline config is named in errors: the watcher sends its generated configs as text in an event or a
# flow run's parameters, since the worker that runs the release cannot read the watcher's disk.
INLINE_CONFIG = "the event's config"


def release_config_path(source: Path | str | Mapping) -> Path | None:
    """The file a config source names, or None when the source is the config itself (YAML text or a mapping).

    YAML text is told from a path by a line break or a leading '{': no config file name holds either.
    """
    if isinstance(source, Mapping):
        return None
    if isinstance(source, str) and ("\n" in source or source.lstrip().startswith("{")):
        return None
    return Path(source)


def load_release_config(source: Path | str | Mapping) -> ReleaseConfig:
    """Read and validate a release config: a YAML file's path, YAML text, or a mapping.

    Raises ConfigError naming the file (or "the event's config") and every bad key. Relative local paths in a
    file are relative to the file; in text or a mapping, to the working directory.
    """
    path = release_config_path(source)
    label = str(path) if path is not None else INLINE_CONFIG
    try:
        raw = source if isinstance(source, Mapping) else yaml.safe_load(
            path.read_text(encoding="utf-8") if path is not None else source)
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
    return _resolve_paths(config, path.parent if path is not None else Path.cwd())


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
    for section, key in (("bench", "prompts"), ("quality", "calibration"), ("imatrix", "calibration"),
                         ("smoke", "image"), ("head", "prompts")):
        spec = getattr(config, section)
        if getattr(spec, key) is not None and not getattr(spec, key).is_absolute():
            updates[section] = spec.model_copy(update={key: (base / getattr(spec, key)).resolve()})
    for field in ("finetune", "donor"):
        source = getattr(config, field)
        if source is not None and source.path is not None and not source.path.is_absolute():
            updates[field] = source.model_copy(update={"path": (base / source.path).resolve()})
    return config.model_copy(update=updates) if updates else config
