"""Which MTP head the release publishes: the donor's copy, one re-aligned on the fine-tune, or the better one.

Runs between inject and convert when the config's ``head.source`` is ``realign`` or ``best``:

1. the injected checkpoint (donor's head) is converted to the sidecar layout (BF16 trunk + head) in the
   work folder, and the bench measures that copied head;
2. llama-server collects the trunk's hidden states on the realign prompt set (``collect``);
3. the head is trained (``realign``) and its checkpoint converted as the release's own sidecar conversion would
   be; with ``head.deployment`` steps 2–3 run instead as the flow ``realign_head`` on another machine (a GPU work
   pool), which reads its inputs from the Hub and commits the head to the private exchange repo
   (``target.realign_repo``) under ``heads/<train key>/``, where this side finds it without any result passing;
4. the bench measures the re-aligned head as it measured the copy: the release's bench settings, the same
   BF16 trunk file and prompts; ``best`` keeps the head llama.cpp accepted more drafts of, ``realign`` the
   re-aligned one.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment as current_deployment
from prefect.runtime import flow_run as current_flow_run

from flows.secrets import use_token_from_secret
from flows.tasks import bench_task, convert_task, fetch_checkpoint, inject_task
from mtpress.archs import get_arch
from mtpress.archs.base import ArchSpec
from mtpress.cache import StageCache, cache_key
from mtpress.checkpoint import ModelDir
from mtpress.concurrency import occupy
from mtpress.errors import ModelError, PublishError, RemoteRunError, TrunkMismatchError
from mtpress.fsutil import claim_folders, dir_digest, sha256_file
from mtpress.hub.client import hub_api
from mtpress.manifest import jsonable
from mtpress.naming import layout_dir
from mtpress.schema import BenchSpec, HeadSpec, ReleaseConfig, Source
from mtpress.stage_keys import convert_key
from mtpress.stages import realign
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.inject import HEAD_SHARD, InjectResult
from mtpress.stages.realign import HiddenStates, RealignResult
from mtpress.toolchain import LlamaCpp, resolve_toolchain

collect_task = task(realign.collect_hidden_states, name="collect-hidden-states", cache_policy=NO_CACHE)
# The one stage that wants an accelerator; `head.deployment` moves it (with the collection) to a GPU work pool.
realign_task = task(realign.realign, name="realign", tags=["gpu"], cache_policy=NO_CACHE)

EXCHANGE_FOLDER = "heads"
RESULT_FILE = "result.json"
RESULT_FORMAT = 1


@dataclass(frozen=True)
class HeadMeasurement:
    """One head on the BF16 trunk, by llama.cpp's draft counts over every draft length and prompt."""

    head_file: str
    head_sha256: str
    drafted: int
    accepted: int
    acceptance: float | None
    by_draft_length: dict[str, float | None]  # "k1": alpha, …
    per_repetition: tuple[float, ...]  # alpha of each repetition (all draft lengths and prompts pooled)


@dataclass(frozen=True)
class RemoteTraining:
    """Where a head trained by the ``realign`` deployment came from (hardware: the training's own record)."""

    deployment: str
    flow_run_id: str
    hostname: str
    pid: int  # of the flow run's process on that host
    exchange_repo: str
    folder: str


@dataclass(frozen=True)
class HeadChoice:
    source: str  # the config's head.source
    published: str  # "copied" or "re-aligned"
    description: str  # what the card says about the head
    copied: HeadMeasurement
    realigned: HeadMeasurement
    beyond_spread: bool  # every repetition of the winner beat every repetition of the other
    training: RealignResult
    data: HiddenStates
    remote: RemoteTraining | None = None  # where the head was trained, when head.deployment sent it elsewhere


def choose_head(cfg: ReleaseConfig, injected: InjectResult, arch: ArchSpec, tools: LlamaCpp, cache: StageCache,
                release_dir: Path, work: Path) -> tuple[InjectResult, HeadChoice]:
    """The inject result the release continues with (its model carries the chosen head) and the record of why."""
    log = get_run_logger()
    spec = cfg.head
    if injected.action == "no-head":
        raise ModelError(f"head.source: {spec.source} re-aligns a head, and {injected.model.label} has none",
                         hint="set `donor:` to the fine-tune's base model; its head is the starting point")
    out_dir = layout_dir(release_dir, "sidecar", cfg.layouts) if "sidecar" in cfg.layouts else work / "sidecar"

    trunk, copied_head = _convert_copied(cfg.name, injected.model, arch, tools, cache, work)
    copied = _measure(cfg, cache, tools, trunk, copied_head)
    keys = realign_keys(injected.model, trunk, arch, spec, tools)
    remote = None
    if spec.deployment:
        training, data, remote = _realign_on_pool(cfg, injected, arch, keys[1], work)
    else:
        data, training = _collect_and_train(injected.model, trunk, arch, spec, tools, cache, work, keys)
    log.info("realign: held-out acceptance (trainer, draft length 1) %.3f → %.3f after %d steps, %.0f s",
             training.acceptance_before, training.acceptance_after, training.steps, training.wall_seconds)
    # Where and under the key the release's own sidecar conversion uses, so the release reuses it.
    _, realigned_head = cache.run("convert", convert_key(dir_digest(training.model.path), "sidecar", cfg,
                                                                       tools),
                                                convert_task, training.model, arch, "sidecar", name=cfg.name,
                                                tools=tools, out_dir=out_dir)

    # On the copy's trunk file: the two conversions hold the same trunk tensors but not the same bytes (the
    # converter names the model after its folder), and the comparison must differ in the head alone.
    realigned = _measure(cfg, cache, tools, trunk, realigned_head)
    better = (realigned.acceptance or 0.0) > (copied.acceptance or 0.0)
    published = "re-aligned" if spec.source == "realign" or better else "copied"
    winner, other = (realigned, copied) if published == "re-aligned" else (copied, realigned)
    beyond = min(winner.per_repetition, default=0.0) > max(other.per_repetition, default=0.0)
    donor = injected.head.donor if injected.head else "the donor"
    description = (f"re-aligned on {data.tokens} tokens of the fine-tune's own output" if published == "re-aligned"
                   else f"copied from {donor}")
    log.info("head: copied α=%s, re-aligned α=%s (llama.cpp draft counts, BF16); publishing the %s head",
             _fmt(copied.acceptance), _fmt(realigned.acceptance), published)
    choice = HeadChoice(spec.source, published, description, copied, realigned, beyond, training, data, remote)
    return (replace(injected, model=training.model) if published == "re-aligned" else injected), choice


COLLECT_KEYS = {"prompts", "per_domain", "n_predict", "seed"}


@flow(name="realign", log_prints=True)
def realign_head(release: str, arch: str, finetune: dict[str, Any], donor: dict[str, Any] | None,
                 head: dict[str, Any], trunk_digest: str, exchange_repo: str, folder: str,
                 work_dir: str | None = None, token_secret: str | None = None) -> str:
    """Collect the fine-tune's hidden states and train its head here, for a release built on another machine.

    Everything comes from the parameters and the Hub: ``finetune``/``donor`` are Sources pinned to commits,
    ``head`` the release's HeadSpec. The fine-tune is fetched, injected and converted as the caller did; a trunk
    whose digest is not ``trunk_digest`` is refused. The head shard and ``result.json`` (training record, data
    summary, trunk digest, this run) are committed in one commit to ``exchange_repo`` under ``folder``; a folder
    already there is left as it is. ``work_dir`` (default ``releases/.realign-<release>``) keeps this host's
    inputs and stage cache; ``token_secret`` names a Secret block read when HF_TOKEN is unset. Returns the commit.
    """
    log = get_run_logger()
    use_token_from_secret(token_secret)
    api = hub_api()
    if existing := _exchange_commit(api, exchange_repo, folder):
        log.info("realign: %s already holds %s (commit %s); nothing to train", exchange_repo, folder, existing[:12])
        return existing
    spec = HeadSpec.model_validate(head)
    arch_spec = get_arch(arch)
    work = Path(work_dir or Path("releases") / f".realign-{release}").resolve()
    # A second run for this release on this host (a retry of the caller's) is refused rather than writing the same
    # files; what a killed one left goes.
    if stale := claim_folders(work):
        log.warning("removed %d leftovers of an interrupted run: %s", len(stale), ", ".join(p.name for p in stale))
    tools = resolve_toolchain()
    cache = StageCache(work)
    cache.forget_earlier_counts()
    # The caller's layout (hub-cache/, injected/, copied-head/): the converter names the model after its folder.
    hub_cache = work / "hub-cache"
    finetune_dir = fetch_checkpoint("fine-tune", Source.model_validate(finetune), hub_cache, arch_spec)
    donor_dir = fetch_checkpoint("donor", Source.model_validate(donor), hub_cache, arch_spec) if donor else None
    injected = inject_task(finetune_dir, donor_dir, arch_spec, work / "injected")
    digest = realign.trunk_digest(injected.model, arch_spec)
    if digest != trunk_digest:
        raise TrunkMismatchError(f"{injected.model.label} fetched here has trunk digest {digest[:16]}…, not the "
                                 f"{trunk_digest[:16]}… of the release that asked for its head",
                                 hint="the caller pins finetune and donor to commits: check that the Hub still "
                                      "serves those commits, and this host's HF_ENDPOINT")
    trunk, _ = _convert_copied(release, injected.model, arch_spec, tools, cache, work)
    data, training = _collect_and_train(injected.model, trunk, arch_spec, spec, tools, cache, work,
                                        realign_keys(injected.model, trunk, arch_spec, spec, tools))
    result = {"format": RESULT_FORMAT, "trunk_digest": data.trunk_digest,
              "training": {k: v for k, v in jsonable(training).items() if k != "model"}, "data": jsonable(data),
              "trained_by": {"deployment": f"{current_flow_run.flow_name}/{current_deployment.name}",
                             "flow_run_id": current_flow_run.id, "hostname": socket.gethostname(),
                             "pid": os.getpid()}}
    operations = [CommitOperationAdd(f"{folder}/{HEAD_SHARD}", training.model.path / HEAD_SHARD),
                  CommitOperationAdd(f"{folder}/{RESULT_FILE}", (json.dumps(result, indent=1) + "\n").encode())]
    try:
        api.create_repo(exchange_repo, private=True, exist_ok=True)
        commit = api.create_commit(exchange_repo, operations, commit_message=f"mtpress: {release} head re-aligned "
                                   f"({training.steps} steps on {data.tokens} tokens)").oid
    except HfHubHTTPError as e:
        raise PublishError(f"committing the re-aligned head to {exchange_repo} failed, nothing was committed: "
                           f"{str(e).splitlines()[0]}", hint="check this worker's token (HF_TOKEN or the Secret "
                           "block) can write to that namespace; rerunning reuses the trained head") from e
    log.info("realign: committed %s/%s to %s at %s", folder, HEAD_SHARD, exchange_repo, commit[:12])
    return commit


def realign_keys(model: ModelDir, trunk: GgufFile, arch: ArchSpec, spec: HeadSpec, tools: LlamaCpp
                 ) -> tuple[str, str]:
    """The collect and train cache keys: inputs' digests, the settings each stage reads, the trainer's source."""
    collect_key = cache_key(trunk.sha256, realign.trunk_digest(model, arch),
                            sha256_file(realign.prompt_file(spec.prompts)),
                            spec.model_dump(mode="json", include=COLLECT_KEYS), tools.version)
    train_key = cache_key(dir_digest(model.path), collect_key, spec.model_dump(mode="json",
                          include=realign.TRAINER_KEYS), sha256_file(realign.TRAINER))
    return collect_key, train_key


def _convert_copied(name: str, model: ModelDir, arch: ArchSpec, tools: LlamaCpp, cache: StageCache, work: Path
                    ) -> list[GgufFile]:
    # The copy's files go to the work folder (under a key of their own): in the release folder the re-aligned
    # conversion would replace them, and every rerun would convert both again.
    return cache.run("convert", cache_key(dir_digest(model.path), "sidecar", "copied head", name, tools.version),
                     convert_task, model, arch, "sidecar", name=name, tools=tools, out_dir=work / "copied-head")


def _collect_and_train(model: ModelDir, trunk: GgufFile, arch: ArchSpec, spec: HeadSpec, tools: LlamaCpp,
                       cache: StageCache, work: Path, keys: tuple[str, str]) -> tuple[HiddenStates, RealignResult]:
    collect_key, train_key = keys
    data = cache.run("collect", collect_key, collect_task, model, trunk, arch, spec, tools,
                     work / "realign-data" / collect_key)
    get_run_logger().info("realign: %d sequences, %d tokens (%d generated) of %s's hidden states", data.sequences,
                          data.tokens, data.generated_tokens, trunk.name)
    return data, cache.run("realign", train_key, realign_task, model, data, arch, spec, tools, work / "realigned")


def _realign_on_pool(cfg: ReleaseConfig, injected: InjectResult, arch: ArchSpec, train_key: str, work: Path
                     ) -> tuple[RealignResult, HiddenStates, RemoteTraining]:
    """The head trained by ``head.deployment``, from the exchange repo: run there only if the repo lacks it."""
    log = get_run_logger()
    spec = cfg.head
    exchange = cfg.target.realign.repo
    folder = f"{EXCHANGE_FOLDER}/{train_key[:20]}"
    digest = realign.trunk_digest(injected.model, arch)
    api = hub_api()
    commit = _exchange_commit(api, exchange, folder)
    if commit:
        log.info("realign: %s already holds %s (commit %s): no remote run", exchange, folder, commit[:12])
    else:
        # Pinned to the commits this run fetched, so the other host trains on the very same checkpoint.
        parameters = {
            "release": cfg.name, "arch": cfg.arch, "trunk_digest": digest, "exchange_repo": exchange, "folder": folder,
            "finetune": {"repo": cfg.finetune.repo, "revision": injected.model.revision or cfg.finetune.revision},
            "donor": {"repo": cfg.donor.repo, "revision": injected.head.donor_revision or cfg.donor.revision}
            if cfg.donor and injected.head else None,
            "head": spec.model_dump(mode="json", exclude={"deployment"})}
        log.info("realign: running deployment %s for %s/%s", spec.deployment, exchange, folder)
        try:
            run = run_deployment(spec.deployment, parameters=parameters, timeout=spec.timeout_s, poll_interval=2)
        except ObjectNotFound as e:
            raise RemoteRunError(f"head.deployment: there is no Prefect deployment {spec.deployment!r}",
                                 hint="deploy prefect.yaml's `realign` (prefect --no-prompt deploy --name realign) "
                                      "and start a worker in its pool; docs/deploy.md") from e
        state = run.state
        if state is None or not state.is_completed():
            raise RemoteRunError(
                f"realign deployment {spec.deployment}: flow run {run.id} ({run.name}) ended "
                f"{state.name if state else 'without a state'} in work pool {run.work_pool_name}"
                + (f": {state.message}" if state and state.message else ""),
                hint=f"see its logs (`prefect flow-run logs {run.id}` or the run's page in the Prefect UI); "
                     "Scheduled or Pending after the timeout means no worker polls that pool")
        commit = _exchange_commit(api, exchange, folder)
        if commit is None:
            raise RemoteRunError(f"flow run {run.id} of {spec.deployment} completed, but {exchange} holds no {folder}",
                                 hint=f"its logs say where it committed: `prefect flow-run logs {run.id}`")
    local = work / "realign-exchange"
    files = {name: Path(hf_hub_download(exchange, f"{folder}/{name}", revision=commit, local_dir=local,
                                        endpoint=api.endpoint, token=api.token))
             for name in (RESULT_FILE, HEAD_SHARD)}
    result = json.loads(files[RESULT_FILE].read_text())
    where = f"{exchange}@{commit[:12]}/{folder}"
    if result.get("format") != RESULT_FORMAT:
        raise ModelError(f"{where}/{RESULT_FILE} has format {result.get('format')!r}, this mtpress reads "
                         f"{RESULT_FORMAT}", hint="run the same mtpress version on both machines")
    if result["trunk_digest"] != digest:
        raise TrunkMismatchError(f"the head in {where} was trained on another trunk than {injected.model.label}'s "
                                 f"(trunk digest {result['trunk_digest'][:16]}…, this model's {digest[:16]}…)",
                                 hint=f"delete {folder} from {exchange} and rerun: the deployment trains it again")
    if sha256_file(files[HEAD_SHARD]) != result["training"]["head_sha256"]:
        raise ModelError(f"{where}/{HEAD_SHARD} is not the head its {RESULT_FILE} describes (sha256 differs)",
                         hint=f"delete {folder} from {exchange} and rerun: the deployment trains it again")
    model = realign.write_head_checkpoint(injected.model, arch, files[HEAD_SHARD], work / "realigned",
                                          generated_tokens=result["data"]["generated_tokens"])
    training = RealignResult(model=model, **{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in result["training"].items()})
    data = HiddenStates(path=files[RESULT_FILE].parent, **{k: tuple(v) if isinstance(v, list) else v
                                                           for k, v in result["data"].items()})
    return training, data, RemoteTraining(**result["trained_by"], exchange_repo=exchange, folder=folder)


def _exchange_commit(api: HfApi, repo: str, folder: str) -> str | None:
    """The exchange repo's current commit if it holds ``folder``'s head and result, else None."""
    try:
        info = api.model_info(repo)
    except RepositoryNotFoundError:
        return None
    names = {s.rfilename for s in info.siblings or []}
    return info.sha if {f"{folder}/{RESULT_FILE}", f"{folder}/{HEAD_SHARD}"} <= names else None


def _measure(cfg: ReleaseConfig, cache: StageCache, tools: LlamaCpp, trunk: GgufFile, head: GgufFile
             ) -> HeadMeasurement:
    key = cache_key(trunk.sha256, head.sha256, cfg.bench.model_dump(mode="json"), tools.version)
    result = cache.run("bench", key, _bench_occupying, trunk, head, cfg.bench, tools)
    mtp = [c for c in result.configs if c.draft_n_max > 0]
    drafted = sum(c.overall.drafted for c in mtp)
    accepted = sum(c.overall.accepted for c in mtp)
    per_repetition = []
    for repetition in range(result.repetitions):
        samples = [s for c in mtp for s in c.samples if s.repetition == repetition]
        rep_drafted = sum(s.drafted for s in samples)
        per_repetition.append(sum(s.accepted for s in samples) / rep_drafted if rep_drafted else 0.0)
    return HeadMeasurement(head_file=head.name, head_sha256=head.sha256, drafted=drafted, accepted=accepted,
                           acceptance=accepted / drafted if drafted else None,
                           by_draft_length={f"k{c.draft_n_max}": c.overall.acceptance for c in mtp},
                           per_repetition=tuple(per_repetition))


def _bench_occupying(trunk: GgufFile, head: GgufFile, spec: BenchSpec, tools: LlamaCpp) -> Any:
    with occupy("bench-gpu"):
        return bench_task(trunk, head, spec, tools)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
