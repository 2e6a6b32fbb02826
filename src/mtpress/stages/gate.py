"""The release gate: prove a repo at one commit works as the real Hub clients see it.

Every file's sha256 the manifest lists must be the Hub's own record of that path at the commit (the LFS
sha256 of ``list_repo_tree(expand=True)``, which the Hub computed from the bytes it stores): nothing of the
release is downloaded for it. llama.cpp's own downloader (``llama-server -hf repo:TAG``) then runs, once
without and once with ``--spec-type draft-mtp``, for the quants a user is pointed at (``choose_pairings``: the
card's recommended one and the smallest, plus ``gate.tags``), not every quant: a 9B matrix would be
downloaded again whole. The files it picked (read from the paths it loaded, inside its private cache) must
be the intended trunk (every part of a split one), head and mmproj, at the intended commit; the greedy tokens
must equal the smoke test's; drafts must have been proposed, and accepted at least as often as
``smoke.min_acceptance`` asks (the smoke test's floor, on the gate's shorter run).

llama.cpp b11434's ``-hf`` takes no revision: it resolves the ``main`` branch through
``/api/models/{repo}/refs`` (common/hf-cache.cpp). The gate therefore requires main to point at the
commit under test before it starts, and checks afterwards that every file llama.cpp loaded lies
under ``snapshots/<that commit>/`` in its cache.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import huggingface_hub
import requests
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile

from mtpress.errors import GateError, ToolFailedError
from mtpress.manifest import MANIFEST, Manifest
from mtpress.naming import NOT_A_MODEL, SPLIT_PART, check_indexer_names, head_name, is_head, pair_trunks_with_heads
from mtpress.schema import GateSpec, SmokeSpec
from mtpress.stages.card import DEFAULT_QUANT_PREFERENCE
from mtpress.stages.smoke import Generation, greedy_request, parse_generation, require_acceptance
from mtpress.toolchain import LlamaCpp
from mtpress.toolchain.server import llama_server

LLAMA_CPP_CLIENT = "llama.cpp -hf"
HASH_CLIENT = "Hub metadata (LFS sha256)"
TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
INVALID_TOKEN = "invalid token, authentication disabled"  # common/hf-cache.cpp, then it reads anonymously
CAUSE = re.compile(r"invalid token|error|failed|not found|HTTP [45]\d\d|status[ :]+[45]\d\d", re.IGNORECASE)
GENERIC_EXIT = re.compile(r"exiting due to|srv\s+operator\(\)|^main: ", re.IGNORECASE)
LOADED = re.compile(r"snapshots/([0-9a-f]{40})/(\S+?\.gguf)")  # a file in llama.cpp's cache, at its commit


@dataclass(frozen=True)
class Pairing:
    """What `-hf repo:TAG` must give for one trunk quant (paths in the repo)."""

    tag: str
    trunk: str
    head: str | None  # None: the trunk carries its own head (embedded), no `mtp-` file may be fetched
    mmproj: str | None
    tokens: tuple[int, ...] | None  # the smoke test's greedy tokens; None: compare with vs. without draft-mtp


@dataclass(frozen=True)
class ClientRun:
    """One llama-server run started with `-hf`, and what it picked and produced."""

    client: str
    version: str
    request: str
    tag: str
    mtp: bool
    commit: str
    trunk: str
    head: str | None
    mmproj: str | None
    intended_head: str | None
    tokens_compared: int
    tokens_match: bool
    drafted: int
    accepted: int


@dataclass(frozen=True)
class SnapshotCheck:
    """The sha256 check of every listed file against the Hub's metadata at the commit (no download)."""

    client: str
    version: str
    commit: str
    files_checked: int


@dataclass(frozen=True)
class GateResult:
    repo: str
    commit: str
    runs: tuple[ClientRun, ...]
    snapshot: SnapshotCheck
    sha256: dict[str, str]  # the files whose content was verified, by repo path

    def table(self) -> list[dict]:
        """One row per client run plus the sha256 check: what the manifest, card and UI show."""
        rows = [{"client": r.client, "version": r.version, "request": r.request, "trunk": r.trunk,
                 "head": r.head or "", "mmproj": r.mmproj or "",
                 "matches": f"{r.tokens_compared}/{r.tokens_compared} tokens" if r.tokens_match else "no",
                 "drafted": r.drafted, "accepted": r.accepted}
                for r in self.runs]
        files = self.snapshot.files_checked
        rows.append({"client": self.snapshot.client, "version": self.snapshot.version,
                     "request": f"revision={self.commit}", "trunk": "", "head": "", "mmproj": "",
                     "matches": f"{files}/{files} sha256", "drafted": "", "accepted": ""})
        return rows


def pairings_from_manifest(manifest: Manifest) -> list[Pairing]:
    """Each root trunk with the head the release meant for it and its smoke tokens, from our manifest."""
    root = [f for f in manifest.files if "/" not in f.path]
    mmproj = next((f.path for f in root if f.role == "mmproj"), None)
    smoke = {(s.layout, s.model): s.tokens for s in manifest.smoke}
    # A split trunk is requested by its first part, as -hf picks it (the rest come with it).
    return [Pairing(tag=trunk.quant, trunk=trunk.published[0][0], head=head.path if head else None, mmproj=mmproj,
                    tokens=smoke.get((trunk.layout, trunk.name)) or None)
            for trunk, head in pair_trunks_with_heads(root)]


def pairings_from_names(paths: Sequence[str]) -> list[Pairing]:
    """Without a manifest: each root trunk's intended head is the `mtp-` file named after it
    (``mtp-<stem>.gguf``, i.e. carrying the trunk's tag); tokens are compared with vs. without draft-mtp."""
    root = [p for p in paths if "/" not in p and p.endswith(".gguf")]
    pairings = []
    has_heads = any(is_head(p) for p in root)
    for path in root:
        stem = path.removesuffix(".gguf")
        split = SPLIT_PART.search(stem)
        if any(word in path for word in NOT_A_MODEL) or (split and int(split[1]) != 1):
            continue  # a sibling, or a later part of a split model (-hf fetches those with the first)
        base = SPLIT_PART.sub("", stem)
        if (tag := TAG.search(base)) is None:
            continue
        pairings.append(Pairing(tag=tag.group(1).upper(), trunk=path,
                                head=head_name(f"{base}.gguf") if has_heads else None,
                                mmproj=next((p for p in root if "mmproj" in p), None), tokens=None))
    return pairings


def choose_pairings(pairings: Sequence[Pairing], sizes: Mapping[str, int], tags: Sequence[str] = ()) -> list[Pairing]:
    """The quants the gate runs `-hf` for: the one the card recommends (its rule: the first of
    DEFAULT_QUANT_PREFERENCE present), the smallest trunk (by ``sizes``, the Hub's, all parts of a split one
    counted) and ``tags``. Every file's bytes are checked without a download (``check_hub_sha256``)."""
    by_tag = {p.tag: p for p in pairings}
    chosen = [by_tag[q] for q in DEFAULT_QUANT_PREFERENCE if q in by_tag][:1]

    def trunk_size(pairing: Pairing) -> int:
        prefix = SPLIT_PART.sub("", pairing.trunk.removesuffix(".gguf"))
        return sum(size for p, size in sizes.items() if SPLIT_PART.sub("", p.removesuffix(".gguf")) == prefix)

    chosen += [min(pairings, key=trunk_size)] if pairings else []
    chosen += [by_tag[t.upper()] for t in tags if t.upper() in by_tag]
    if missing := {t.upper() for t in tags} - by_tag.keys():
        raise GateError(f"gate.tags names {', '.join(sorted(missing))}, which no root trunk carries",
                        hint=f"the root trunks carry {', '.join(by_tag) or 'no tag'}")
    return list(dict.fromkeys(chosen))


def check_branch_head(api: HfApi, repo: str, commit: str) -> None:
    """llama.cpp's `-hf` reads `main`: the gate only means something if main is the commit under test."""
    head = api.model_info(repo).sha
    if head != commit:
        raise GateError(f"{repo}: main is at {head}, not at {commit}, the commit to verify",
                        hint="llama.cpp b11434's -hf has no revision option and always reads main: "
                             "verify the branch head, or move main to the commit first")


def gate(api: HfApi, repo: str, commit: str, pairings: Sequence[Pairing], sha256: Mapping[str, str],
         tools: LlamaCpp, smoke: SmokeSpec, spec: GateSpec, work_dir: Path) -> GateResult:
    """Check every sha256 against the Hub's metadata, then run llama.cpp's `-hf` for each of ``pairings`` (see
    ``choose_pairings``) against ``repo`` at ``commit``; raise GateError naming the file and the client, or
    DeadHeadError when llama.cpp accepts fewer drafts than ``smoke.min_acceptance``."""
    if not pairings:
        raise GateError(f"{repo}@{commit[:12]}: no model GGUF at the repo root, so `-hf {repo}:TAG` finds nothing",
                        hint="the first layout of a release sits at the root; check the repo's files")
    check_indexer_names(sha256)  # the Hub's model page reads the names, whatever the clients below load
    check_branch_head(api, repo, commit)
    # First: a file whose bytes differ from what was tested fails before anything is downloaded.
    hashes = check_hub_sha256(api, repo, commit, sha256)
    work_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    # One cache for every run: each file is downloaded once, and a run's picks are read from the paths
    # it loaded, which the shared cache does not blur.
    # Named *.partial, like every scratch folder: what a killed run leaves here, the next run removes.
    with tempfile.TemporaryDirectory(prefix="gate-llama-cache-", suffix=".partial", dir=work_dir) as cache:
        for pairing in pairings:
            plain = _run(tools, api, repo, pairing, smoke, spec, Path(cache), mtp=False)
            want = n_predict(pairing, spec)
            runs.append(_check(repo, commit, pairing, plain, tools.version, want, smoke, reference=None))
            with_mtp = _run(tools, api, repo, pairing, smoke, spec, Path(cache), mtp=True)
            runs.append(_check(repo, commit, pairing, with_mtp, tools.version, want, smoke,
                               reference=plain[0].tokens))
    check_branch_head(api, repo, commit)  # main did not move while the clients read it
    return GateResult(repo, commit, tuple(runs), hashes, dict(sha256))


def _run(tools: LlamaCpp, api: HfApi, repo: str, pairing: Pairing, smoke: SmokeSpec, spec: GateSpec, cache: Path,
         *, mtp: bool) -> tuple[Generation, list[tuple[str, str]], list[str]]:
    request = ["-hf", f"{repo}:{pairing.tag}"]
    if mtp:
        request += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(smoke.draft_n_max)]
    # On the CPU, as the smoke test ran (smoke.server_args says why): its tokens are the reference.
    device = ["-ngl", "0", *(["-ngld", "0"] if mtp else []), *(["--no-mmproj-offload"] if pairing.mmproj else [])]
    env = {"MODEL_ENDPOINT": api.endpoint.rstrip("/") + "/", "LLAMA_CACHE": str(cache)}
    if isinstance(api.token, str):
        env["HF_TOKEN"] = api.token  # the environment only: llama.cpp reads it there, argv is visible to all
    try:
        with llama_server(tools, [*request, "-c", "2048", *device], timeout=smoke.timeout_s, env=env) as server:
            body = server.completion(greedy_request(smoke.prompt, n_predict(pairing, spec)), timeout=smoke.timeout_s)
            # The model's path is only in /props at the default log level; the draft head's and the mmproj's
            # are logged ("loading draft model '…'", "loaded multimodal model, '…'").
            model_path = requests.get(f"{server.url}/props", timeout=30).json().get("model_path", "")
            log = server.log_path.read_text(errors="replace")
    except ToolFailedError as e:
        cause = llama_cpp_cause(e.output_tail)
        hint = ("llama.cpp ignores a token that is not 'hf_' and 34–253 letters or digits (is_valid_hf_token) and "
                "reads anonymously, so a private repo answers 404: use a real Hub token" if INVALID_TOKEN in cause
                else "the repo or a file it should pick is missing, or the token cannot read it")
        raise GateError(f"trunk {pairing.trunk}: {LLAMA_CPP_CLIENT} {' '.join(request[1:])} did not serve: {cause}",
                        hint=hint) from e
    loaded = list(dict.fromkeys(LOADED.findall(f"{model_path}\n{log}")))
    return parse_generation(body), loaded, request


def llama_cpp_cause(output: str) -> str:
    """What llama.cpp said went wrong: its warning and error lines (a refused token, an HTTP status, a missing
    file), not the last line, which is its generic 'exiting due to model loading error'."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    causes = list(dict.fromkeys(line for line in lines if CAUSE.search(line) and not GENERIC_EXIT.search(line)))
    return "; ".join(causes[:3]) if causes else (lines[-1] if lines else "no output")


def n_predict(pairing: Pairing, spec: GateSpec) -> int:
    """The smoke tokens are a longer greedy run of the same prompt: a shorter one must be their prefix."""
    return min(spec.n_predict, len(pairing.tokens)) if pairing.tokens else spec.n_predict


def _check(repo: str, commit: str, pairing: Pairing, run: tuple[Generation, list[tuple[str, str]], list[str]],
           version: str, want: int, smoke: SmokeSpec, *, reference: tuple[int, ...] | None) -> ClientRun:
    generation, loaded, request = run
    mtp = reference is not None
    what = f"trunk {pairing.trunk}: {LLAMA_CPP_CLIENT} {' '.join(request[1:])}"
    commits = {c for c, _ in loaded}
    if commits != {commit}:
        raise GateError(f"{what} read commit(s) {', '.join(sorted(commits)) or 'none'} of {repo}, not {commit}",
                        hint="main moved during the gate, or llama.cpp loaded nothing from the Hub; rerun")
    picked = [p for _, p in loaded]
    trunks = [p for p in picked if not any(w in PurePosixPath(p).name for w in NOT_A_MODEL)]
    heads = [p for p in picked if is_head(PurePosixPath(p).name)]
    mmprojs = [p for p in picked if "mmproj" in PurePosixPath(p).name]
    trunk, head, mmproj = (trunks or [None])[0], (heads or [None])[0], (mmprojs or [None])[0]
    if trunk != pairing.trunk:
        raise GateError(f"{what} picked trunk {trunk or 'none'}, intended {pairing.trunk}",
                        hint="-hf takes the first root file whose name carries the tag: rename so only the "
                             "intended trunk carries it")
    if mtp and head != pairing.head:
        raise GateError(f"{what} picked head {head or 'none'}, intended {pairing.head or 'none (embedded head)'}",
                        hint="-hf prefers a head named with the trunk's exact -TAG., else the nearest bit count: "
                             "name each trunk's head mtp-<trunk name>")
    if mmproj != pairing.mmproj:
        raise GateError(f"{what} picked mmproj {mmproj or 'none'}, intended {pairing.mmproj or 'none'}")
    if len(generation.tokens) != want:
        raise GateError(f"{what}: generated {len(generation.tokens)} tokens, asked for {want}")
    expected = pairing.tokens[:want] if pairing.tokens else reference
    if expected is None:  # the plain run of a repo without recorded tokens is the reference itself
        expected = generation.tokens
    if generation.tokens != expected:
        first = next((i for i, (a, b) in enumerate(zip(generation.tokens, expected)) if a != b),
                     min(len(generation.tokens), len(expected)))
        against = "the smoke test's" if pairing.tokens else "the run without draft-mtp"
        raise GateError(f"{what}: greedy tokens differ from {against} at token {first}",
                        hint="the file served is not the one tested; do not promote this commit")
    if mtp and generation.drafted == 0:
        raise GateError(f"{what}: draft-mtp proposed no drafts with head {head or 'embedded'}",
                        hint="the head did not load or does not fit the trunk")
    if mtp:
        require_acceptance(f"{what} with head {head or 'embedded'}", generation.drafted, generation.accepted, smoke)
    return ClientRun(client=LLAMA_CPP_CLIENT, version=f"b{version}", request=" ".join(request), tag=pairing.tag,
                     mtp=mtp, commit=commit, trunk=trunk, head=head, mmproj=mmproj, intended_head=pairing.head,
                     tokens_compared=len(generation.tokens), tokens_match=True, drafted=generation.drafted,
                     accepted=generation.accepted)


def hub_files(api: HfApi, repo: str, commit: str) -> dict[str, RepoFile]:
    """Every file of ``repo`` at ``commit`` with the Hub's own size and LFS sha256: one listing, no download."""
    return {f.path: f for f in api.list_repo_tree(repo, revision=commit, recursive=True, expand=True)
            if isinstance(f, RepoFile)}


def check_hub_sha256(api: HfApi, repo: str, commit: str, sha256: Mapping[str, str]) -> SnapshotCheck:
    """Every listed sha256 must be the Hub's record of that path at ``commit``. The Hub computes an LFS
    object's sha256 from the bytes it received (and names the object by it), so this proves the commit holds
    the tested bytes without downloading them; the `-hf` runs then read the chosen quants' bytes for real."""
    files = hub_files(api, repo, commit)
    for path, expected in sorted(sha256.items()):
        if (remote := files.get(path)) is None:
            raise GateError(f"{path}: {repo}@{commit[:12]} has no such file ({HASH_CLIENT})",
                            hint="the repo does not hold the files that were tested; do not promote it")
        if remote.lfs is None:
            raise GateError(f"{path}: {repo}@{commit[:12]} stores it as a regular git file, whose id is no sha256",
                            hint="GGUFs are LFS files on the Hub; check the repo's .gitattributes")
        if remote.lfs.sha256 != expected:
            raise GateError(f"{path}: {repo}@{commit[:12]} holds sha256 {remote.lfs.sha256} ({HASH_CLIENT}), "
                            f"the manifest says {expected}",
                            hint="the repo does not hold the files that were tested; do not promote it")
    return SnapshotCheck(HASH_CLIENT, huggingface_hub.__version__, commit, len(sha256))


def verify_repo(api: HfApi, repo: str, tools: LlamaCpp, work_dir: Path, *, revision: str | None = None,
                tags: Sequence[str] | None = None) -> GateResult:
    """The gate, read-only, on any published repo: with its manifest.json when it has one (ours), else
    with the pairing its names imply and tokens compared with vs. without draft-mtp."""
    try:
        commit = api.model_info(repo, revision=revision).sha
    except HfHubHTTPError as e:
        raise GateError(f"{repo}{'@' + revision if revision else ''}: huggingface_hub cannot read it from "
                        f"{api.endpoint}: {str(e).splitlines()[0]}",
                        hint="check the repo id and revision; a private repo needs HF_TOKEN") from e
    files = hub_files(api, repo, commit)
    paths = list(files)
    if MANIFEST in paths:
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gate-manifest-", dir=work_dir) as cache:
            manifest = Manifest.model_validate_json(
                Path(api.hf_hub_download(repo, MANIFEST, revision=commit, cache_dir=cache)).read_bytes())
        pairings = pairings_from_manifest(manifest)
        sha256 = manifest.sha256_by_path()
        config = manifest.config
        smoke = SmokeSpec(**{k: v for k, v in (config.get("smoke") or {}).items() if k in SmokeSpec.model_fields})
        spec = GateSpec(**{k: v for k, v in (config.get("gate") or {}).items() if k in GateSpec.model_fields})
    else:
        pairings = pairings_from_names(paths)
        sha256 = {}  # no record of what was tested: only the -hf runs (with vs. without draft-mtp) check the files
        smoke, spec = SmokeSpec(), GateSpec()
    if not tags:
        pairings = choose_pairings(pairings, {p: f.size for p, f in files.items()}, spec.tags)
    else:
        wanted = {t.upper() for t in tags}
        pairings = [p for p in pairings if p.tag in wanted]
        if missing := wanted - {p.tag for p in pairings}:
            root = ", ".join(p for p in paths if "/" not in p and p.endswith(".gguf"))
            raise GateError(f"{repo}@{commit[:12]}: no root trunk carries {', '.join(sorted(missing))}",
                            hint=f"its root GGUFs: {root or 'none'}")
    return gate(api, repo, commit, pairings, sha256, tools, smoke, spec, work_dir)
