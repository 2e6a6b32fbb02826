"""What one publish run works with, and its run-wide duties around the stages.

``open_release`` does what must happen before any work: read the config, check the token can publish,
make this run the only one using the release folder, remove what a killed run left, resolve the
toolchain. ``Release.building`` then fixes the checkpoint the files are built from and checks the disk
for them. Tasks get the ``Build`` and go through its content cache (a reused result is a Cached task run that
says why); the flow counts their completions in its ``Progress`` (a line in the terminal, a progress artifact
in the UI). Tasks may run in other processes (flows/runners.py: a Dask cluster), which get copies of the
``Build``: nothing in it may depend on running in the flow's process.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect import Task, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, wait
from prefect.states import Completed, State

from flows.mlx_pack import mlx_target
from flows.secrets import use_token_from_secret
from mtpress.archs import get_arch
from mtpress.archs.base import ArchSpec
from mtpress.cache import StageCache
from mtpress.checkpoint import ModelDir
from mtpress.errors import ConfigError, SharedStorageError
from mtpress.fsutil import claim_folders, dir_digest
from mtpress.hub.client import hub_api
from mtpress.naming import artifact_key, layout_dir
from mtpress.schema import INLINE_CONFIG, ReleaseConfig, Target, load_release_config, release_config_path
from mtpress.stage_keys import reused_outputs
from mtpress.stages.inject import InjectResult
from mtpress.stages.preflight import check_disk_space, check_plan, plan_run, planned_output_bytes
from mtpress.stages.publish import check_write_access
from mtpress.toolchain import LlamaCpp, resolve_toolchain
from mtpress.toolchain.processes import stop_tools_on_termination

T = TypeVar("T")


@dataclass
class Progress:
    """``[done/total] what`` in the log and a progress artifact in the UI, counted on the flow's side as tracked
    task runs complete: a task may run in another process (a Dask worker), whose copy would count for nobody."""

    total: int
    artifact: UUID
    done: int = 0
    _pending: int = 0  # tracked task runs whose completion is not counted yet
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @classmethod
    def start(cls, total: int, key: str) -> Progress:
        return cls(total, create_progress_artifact(0.0, key=key, description="release build progress"))

    def track(self, future: PrefectFuture, what: str) -> PrefectFuture:
        """One step when ``future``'s task run completes ("(reused)" when it is Cached); none if it fails."""
        # The callback runs on another thread: in a copy of the flow run's context, for its logger and its API.
        context = contextvars.copy_context()
        with self._lock:
            self._pending += 1
        future.add_done_callback(lambda done: context.run(self._completed, done, what))
        return future

    def _completed(self, future: PrefectFuture, what: str) -> None:
        with self._lock:
            try:
                state = future.wrapped_future.result()  # the final State (runners run tasks for their state)
                if isinstance(state, State) and state.is_completed():
                    self.done += 1
                    reused = " (reused)" if state.name == "Cached" else ""
                    get_run_logger().info("[%d/%d] %s%s", self.done, self.total, what, reused)
                    update_progress_artifact(self.artifact, 100.0 * min(self.done, self.total) / self.total)
            finally:
                self._pending -= 1
                self._lock.notify_all()

    def finish(self) -> None:
        with self._lock:  # the last callbacks may still be running after the flow saw their futures finish
            self._lock.wait_for(lambda: self._pending == 0)
        update_progress_artifact(self.artifact, 100.0)

    def __getstate__(self) -> dict[str, Any]:  # travels to workers with the Build, without the flow's lock
        return {name: value for name, value in vars(self).items() if name != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state, _lock=threading.Condition())


@dataclass(frozen=True)
class Release:
    cfg: ReleaseConfig
    config_path: Path | None  # None: the config came as text (the watcher's event)
    arch: ArchSpec
    tools: LlamaCpp
    release_dir: Path
    work: Path
    cache: StageCache
    push: bool
    dry_run: bool

    @property
    def staging(self) -> Target | None:
        """The private repo the gate verifies; finished files are pre-uploaded there while the rest builds."""
        return self.cfg.target.staging if self.push and self.cfg.gate.enabled and not self.dry_run else None

    def key(self, what: str) -> str:
        return artifact_key(self.cfg.name, what)

    def building(self, injected: InjectResult) -> Build:
        """The build of ``injected``'s checkpoint, once the disk is known to hold what it will write."""
        cfg, model = self.cfg, injected.model
        digest = dir_digest(model.path)
        # What the cache already holds writes nothing: a nearly full disk must not refuse a rerun.
        check_disk_space(self.release_dir, planned_output_bytes(model, self.arch, cfg,
                                                                reused_outputs(self.cache, digest, cfg, self.tools)))
        has_head = injected.action != "no-head"
        # Without a head both layouts would hold the same plain trunk: build the first only, and bench nothing.
        layouts = cfg.layouts if has_head else cfg.layouts[:1]
        has_vision = cfg.mmproj and self.arch.has_vision(model.config)
        variants = len(layouts) * (1 + len(cfg.quants))
        benches = len(bench_quants(cfg)) if cfg.bench.enabled and has_head else 0
        # Each variant is made and smoke-tested; one at a time (flows/build.py) also splits and commits it, and
        # measures each quant against BF16 as it goes, after BF16's own run.
        per_variant, quality = (4, 1 + len(cfg.quants)) if cfg.bounded_disk else (2, 1)
        steps = (per_variant * variants + benches + quality * int(cfg.quality.enabled) + int(has_vision)
                 + int(bool(cfg.imatrix_quants)))
        return Build(self, injected, model, digest, has_head, tuple(layouts), has_vision,
                     Progress.start(steps, self.key("progress")))


@dataclass(frozen=True)
class Build:
    """A release built from one checkpoint: what every publish task gets."""

    release: Release
    injected: InjectResult
    model: ModelDir
    model_digest: str
    has_head: bool
    layouts: tuple[str, ...]
    has_vision: bool
    progress: Progress

    @property
    def cfg(self) -> ReleaseConfig:
        return self.release.cfg

    @property
    def tools(self) -> LlamaCpp:
        return self.release.tools

    def variants(self) -> list[tuple[str, str]]:
        """Each (layout, quant) the release builds, in the order the manifest lists them: every layout's BF16 files,
        then each layout's quants."""
        return [(layout, "BF16") for layout in self.layouts] + [(layout, quant) for layout in self.layouts
                                                                for quant in self.cfg.quants]

    def out_dir(self, layout: str) -> Path:
        """The first layout sits at the repo root, where `-hf user/repo:QUANT` looks; others in a subfolder."""
        return layout_dir(self.release.release_dir, layout, self.cfg.layouts)

    def reuse_or_run(self, stage: str, key: str, compute: Callable[..., T], *args: Any, **kwargs: Any
                     ) -> tuple[T, bool]:
        """``compute(*args, **kwargs)`` through the content cache; and whether an earlier run's result was reused."""
        reused = self.release.cache.lookup(stage, key) is not None
        return self.release.cache.run(stage, key, compute, *args, **kwargs), reused

    @staticmethod
    def report(result: T, reused: bool) -> T | State:
        """A result reused from an earlier run comes back as a Cached state, so the task run shows it in the UI,
        and why (and the flow's progress line says "reused")."""
        if reused:
            return Completed(name="Cached", data=result,
                             message="reused: an earlier run made it from the same inputs with the same code, "
                                     "and its outputs are intact")
        return result

    def cached(self, stage: str, key: str, compute: Callable[..., T], *args: Any, **kwargs: Any) -> T | State:
        return self.report(*self.reuse_or_run(stage, key, compute, *args, **kwargs))

    def step(self, task: Task, *args: Any, **kwargs: Any) -> PrefectFuture:
        """``task.submit(*args, **kwargs)``, counted as a progress step under its task run's name."""
        return self.progress.track(task.submit(*args, **kwargs), run_name(task, *args, **kwargs))


class Lane:
    """Tasks submitted to a lane run one at a time, in order: each waits for the one before (``wait_for``); with
    ``progress``, each is a progress step."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.futures: list[PrefectFuture] = []
        self.progress = progress

    def submit(self, task: Task, *args: Any, **kwargs: Any) -> PrefectFuture:
        future = task.submit(*args, wait_for=self.futures[-1:], **kwargs)
        self.futures.append(future)
        return self.progress.track(future, run_name(task, *args, **kwargs)) if self.progress else future


def run_name(task: Task, *args: Any, **kwargs: Any) -> str:
    """The name the UI gives the task run of ``task.submit(*args, **kwargs)``: its ``task_run_name`` filled in."""
    kwargs.pop("wait_for", None)
    if not isinstance(task.task_run_name, str):
        return task.name
    return task.task_run_name.format(**inspect.signature(task.fn).bind(*args, **kwargs).arguments)


def visible(*paths: Path) -> None:
    """Refuse to work on a machine that cannot see the files this run wrote on another one: with a Dask cluster
    the release folder and its work folder must be on storage every worker mounts at the same path."""
    if missing := [path for path in paths if not path.exists()]:
        raise SharedStorageError(f"worker {socket.gethostname()} (pid {os.getpid()}) cannot see {missing[0]}"
                                 + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                 + ", which this run wrote",
                                 hint="put the release folder (--output) and its .work-<name> sibling on storage "
                                      "every Dask worker mounts at the same path (docs/deploy.md, Scaling out)")


def settle(futures: Sequence[PrefectFuture | None]) -> list:
    """Every result (None for None), once all have finished. The first failure is raised: the task that failed,
    not the ones left NotReady behind it (a lane, or the matrix waiting for the BF16 smoke test)."""
    submitted = [future for future in futures if future is not None]
    wait(submitted)
    for future in submitted:
        if future.state.is_failed() or future.state.is_crashed():
            future.result()
    return [future.result() if future is not None else None for future in futures]


def bench_quants(cfg: ReleaseConfig) -> list[str]:
    return [q for q in ("BF16", *cfg.quants) if cfg.bench.quants is None or q in cfg.bench.quants]


def open_release(config: str, output: str | None, *, push: bool, dry_run: bool, token_secret: str | None,
                 bounded_disk: bool | None = None) -> Release:
    """Everything that must hold before any download: fails at once, with nothing half-done."""
    log = get_run_logger()
    stop_tools_on_termination()  # SIGTERM and Ctrl-C stop the tools at once, not after the running task ends
    use_token_from_secret(token_secret)
    cfg = load_release_config(config)  # a path, or the config's own text (as the watcher's event sends it)
    if bounded_disk is not None:
        cfg = cfg.model_copy(update={"bounded_disk": bounded_disk})
    if cfg.bounded_disk and not (push and not dry_run and cfg.gate.enabled):
        raise ConfigError(str(release_config_path(config) or INLINE_CONFIG), [
            "bounded_disk commits each finished file to the staging repo and deletes it here: it needs a run that "
            "publishes, with the gate"], hint="drop --no-push/--dry-run, or build without bounded_disk")
    if push and not dry_run:  # a token that cannot publish there fails now, not after the build
        check_write_access(hub_api(), cfg.target, *([cfg.target.staging] if cfg.gate.enabled else []),
                           *([mlx_target(cfg)] if cfg.mlx else []))
    release_dir = Path(output or Path("releases") / cfg.name).resolve()
    work = release_dir.parent / f".work-{cfg.name}"
    # One run per release folder (and work folder, which other release folders of this name share): what is
    # removed next can only be what a killed run left, never a running one's partial files.
    if stale := claim_folders(release_dir, work):
        log.warning("removed %d leftovers of an interrupted run: %s", len(stale), ", ".join(p.name for p in stale))
    tools = resolve_toolchain()
    log.info("llama.cpp b%s (%s)", tools.version, tools.origin)
    arch = get_arch(cfg.arch)
    # From Hub metadata: a run that cannot fit is refused before any weight is downloaded.
    plan = plan_run(cfg, arch, converter_patched=bool(tools.patches), gate=push and not dry_run)
    log.info("preflight: %.2f GiB of disk (%s), %.2f GiB of memory", plan.disk / 2**30, plan.breakdown(),
             plan.memory / 2**30)
    check_plan(plan, release_dir, held=(release_dir, work))
    cache = StageCache(release_dir)
    cache.forget_earlier_counts()
    return Release(cfg, release_config_path(config), arch, tools, release_dir, work, cache, push, dry_run)


def lane_threads() -> int:
    """llama-server's threads for a smoke test, beside a quantize that takes every core. llama-quantize's
    workers never wait on each other, but llama-server's spin while they wait: one or a few server threads
    share the cores without waste. Measured on 2 cores (large benchmark model): with both tools at 2 threads
    the cold run's CPU time went from 1.66 × to 2.11 × the hand recipe's; a 1 + 1 split left quantizing, the
    longer job, half the cores (README, "Performance")."""
    return max(1, len(os.sched_getaffinity(0)) // 4)
