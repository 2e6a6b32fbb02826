"""The ``mtpress`` command line: a thin shell over the flows and stages.

Errors that mtpress raises on purpose print as one message with a hint and exit 1;
set MTPRESS_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from mtpress.errors import MtpressError

app = typer.Typer(help="Restore, convert, quantize, test and publish MTP-capable GGUF releases.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
toolchain_app = typer.Typer(help="The pinned llama.cpp toolchain.", no_args_is_help=True)
hub_app = typer.Typer(help="The local Hub-compatible endpoint.", no_args_is_help=True)
app.add_typer(toolchain_app, name="toolchain")
app.add_typer(hub_app, name="hub")

ConfigArg = Annotated[Path, typer.Argument(help="release config, e.g. model_configs/demo.yaml", exists=False)]


@app.command()
def publish(config: ConfigArg,
            output: Annotated[Path | None, typer.Option(help="release folder (default releases/<name>)")] = None,
            push: Annotated[bool, typer.Option(help="publish to the Hub after building and testing")] = True,
            dry_run: Annotated[bool, typer.Option(help="print the publish plan, commit nothing")] = False,
            token_secret: Annotated[str | None, typer.Option(
                help="name of a Prefect Secret block holding the Hub token, used when HF_TOKEN is unset")] = None,
            bounded_disk: Annotated[bool | None, typer.Option(
                help="build one file at a time, each committed to the staging repo and deleted here once it passes, "
                     "for a disk smaller than the release (default: the config's bounded_disk)")] = None,
            debug: Annotated[bool, typer.Option(help="also print the tracebacks of mtpress's own errors (the "
                                                     "Prefect UI's logs always keep them)")] = False,
            ) -> None:
    """Run the publish flow for one release config: download, inject, convert, quantize, smoke, card, publish.

    The Hub is HF_ENDPOINT (default huggingface.co); the token is HF_TOKEN or the --token-secret block.
    """
    from mtpress.schema import load_release_config

    load_release_config(config)  # a bad config fails here, in a second, before a Prefect server starts
    from flows.runners import publish_flow
    from mtpress.toolchain.prefect_server import prefect_api

    if not debug:
        show_own_errors_once()
    with prefect_api():  # without PREFECT_API_URL, a Prefect server that ends with this process, kill -9 included
        release = publish_flow(str(config))(str(config), str(output) if output else None, push=push,
                                            dry_run=dry_run, token_secret=token_secret, bounded_disk=bounded_disk)
    typer.echo(f"release folder: {release}")


class _OwnErrorsOnce(logging.Filter):
    """Keeps Prefect's console from repeating an mtpress error (with its traceback) for the task, its retries and
    the flow: the CLI prints it once as `error: … → hint`. Only the console is filtered; the records still reach
    the Prefect API, so the run's logs in the UI keep the full trace."""

    def __init__(self) -> None:
        super().__init__()
        # Prefect's state summaries name the class: "Finished in state Failed('… exception ModelError: …')".
        self.names = re.compile(r"\b(?:%s)\b[:(]" % "|".join(sorted(_subclass_names(MtpressError))))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MtpressError):
            return False
        return not self.names.search(record.getMessage())


def _subclass_names(cls: type) -> set[str]:
    return {cls.__name__, *(name for sub in cls.__subclasses__() for name in _subclass_names(sub))}


def show_own_errors_once() -> None:
    own = _OwnErrorsOnce()
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.addFilter(own)


@app.command()
def demo(output: Annotated[Path, typer.Option(help="where the demo writes its release (the multimodal one: "
                                                    "<output>-vl)")] = Path("releases/demo"),
         realign: Annotated[bool, typer.Option(
             help="instead, the release whose head is re-aligned on the fine-tune and measured against the copied "
                  "one (model_configs/demo-realign.yaml, into <output>-realign)")] = False,
         moe: Annotated[bool, typer.Option(
             help="instead, the mixture-of-experts family (Qwen3.5-MoE): model_configs/demo-moe.yaml into "
                  "<output>-moe, then demo-moe-vl.yaml (multimodal, fused experts) into <output>-moe-vl")] = False,
         ) -> None:
    """Run the whole pipeline on generated tiny Qwen3.5 models: text-only, then multimodal (with an mmproj)."""
    from mtpress.demo.run import DEMO_REALIGN_CONFIG, run_demo, run_demos, run_moe_demos
    from mtpress.toolchain.prefect_server import prefect_api

    with prefect_api():
        if realign:
            run_demo(output.with_name(output.name + "-realign"), config=DEMO_REALIGN_CONFIG)
        elif moe:
            run_moe_demos(output)
        else:
            run_demos(output)


@app.command()
def verify(repo: Annotated[str, typer.Argument(help="a published repo, e.g. user/Model-MTP-GGUF")],
           revision: Annotated[str | None, typer.Option(
               help="the commit to verify; llama.cpp's -hf reads only main, so it must be main's head")] = None,
           quant: Annotated[list[str] | None, typer.Option(help="check only this root quant (repeatable)")] = None,
           work_dir: Annotated[Path, typer.Option(help="scratch space for the clients' downloads (emptied after)")
                               ] = Path("releases/.verify")) -> None:
    """Run the release gate read-only on any published repo: every file's sha256 against the Hub's LFS
    metadata (with a manifest), and llama.cpp's -hf with and without draft-mtp for the recommended and the
    smallest root quant (or the --quant ones).

    With the repo's manifest.json (an mtpress release) the intended heads and the smoke tokens come from it;
    otherwise each trunk's head is the `mtp-<trunk name>` file and tokens are compared with vs. without MTP.
    The Hub is HF_ENDPOINT; HF_TOKEN, if set, reaches llama.cpp through its environment only.
    """
    from mtpress.hub.client import hub_api
    from mtpress.stages.gate import verify_repo
    from mtpress.toolchain import resolve_toolchain

    result = verify_repo(hub_api(), repo, resolve_toolchain(build=False), work_dir, revision=revision, tags=quant)
    for row in result.table():
        picked = " + ".join(p for p in (row["trunk"], row["head"], row["mmproj"]) if p)
        drafts = f", drafted {row['drafted']}, accepted {row['accepted']}" if "draft-mtp" in row["request"] else ""
        typer.echo(f"ok  {row['client']} {row['version']}  {row['request']}: {picked or '-'}; {row['matches']}{drafts}")
    typer.echo(f"{repo}@{result.commit}: passed")


@app.command("mtplx-verified")
def mtplx_verified(pack: Annotated[Path, typer.Argument(help="a downloaded MTPLX pack, stamped by "
                                                          "`mtplx forge verify PACK --stamp` on Apple Silicon")],
                   repo: Annotated[str, typer.Option(help="the pack's repo, e.g. user/Model-MTP-MTPLX")],
                   dry_run: Annotated[bool, typer.Option(help="print the publish plan, commit nothing")] = False,
                   ) -> None:
    """Record MTPLX's Apple Silicon verification in the pack's manifest and card and publish them in one
    commit. Refuses a contract that is not a real forge-verification record (run by the release workflow's
    macOS job)."""
    from mtpress.hub.client import hub_api
    from mtpress.schema import Target
    from mtpress.stages.mlx_card import record_verification
    from mtpress.stages.publish import publish as publish_stage

    level = record_verification(pack)
    result = publish_stage(pack, Target(repo=repo), hub_api(), dry_run=dry_run, message=f"mtpress: MTPLX {level}")
    typer.echo(result.plan.describe())
    typer.echo(f"{repo}: {level}; " + (f"committed {result.commit}" if result.committed else "nothing committed"))


@app.command("check-config")
def check_config(configs: Annotated[list[Path], typer.Argument(help="release configs to validate")],
                 preflight: Annotated[bool, typer.Option(
                     help="also read the sources' safetensors headers from the Hub (no weights) and check this "
                          "machine's disk and memory for the whole run")] = False,
                 output: Annotated[Path | None, typer.Option(help="the release folder, for --preflight's disk "
                                                             "check (default releases/<name>)")] = None) -> None:
    """Validate release configs without running anything."""
    from mtpress.schema import load_release_config

    for path in configs:
        cfg = load_release_config(path)
        typer.echo(f"{path}: ok ({cfg.name}: {len(cfg.quants)} quants, layouts {', '.join(cfg.layouts)})")
        if preflight:
            from mtpress.archs import get_arch
            from mtpress.stages.preflight import check_plan, plan_run

            plan = plan_run(cfg, get_arch(cfg.arch))
            typer.echo(f"  needs {plan.disk / 2**30:.2f} GiB of disk ({plan.breakdown()}), "
                       f"{plan.memory / 2**30:.2f} GiB of memory")
            check_plan(plan, (output or Path("releases") / cfg.name).resolve())


@app.command("release-run")
def release_run(config: ConfigArg,
                commit: Annotated[str | None, typer.Option(
                    help="commit the workers clone and run (prefect.yaml's pull step); default: their default branch")]
                = None,
                repository: Annotated[str | None, typer.Option(
                    help="git URL to clone with --commit (in GitHub Actions: $GITHUB_SERVER_URL/$GITHUB_REPOSITORY)")]
                = None,
                dry_run: Annotated[bool, typer.Option(help="build and test there, commit nothing")] = False,
                timeout: Annotated[float, typer.Option(help="seconds to follow the run before giving up")] = 21000,
                manifest_out: Annotated[Path | None, typer.Option(help="where to write the run's manifest.json")]
                = None) -> None:
    """Start the publish/publish deployment on the Prefect server at PREFECT_API_URL and follow it to its end.

    Exits 0 when the run completed, 1 otherwise. The config path is read here (validated) and on the worker,
    relative to the repository root."""
    from mtpress.errors import RemoteRunError
    from mtpress.schema import load_release_config

    cfg = load_release_config(config)  # a bad config fails here, before a run is started
    if commit and not repository:
        raise RemoteRunError("--commit needs --repository: the git URL the workers clone",
                             hint="in GitHub Actions: --repository \"$GITHUB_SERVER_URL/$GITHUB_REPOSITORY\"")
    from flows.remote import release_run as run_release

    run_release(config.as_posix(), cfg.name, dry_run=dry_run, commit=commit, repository=repository,
                timeout_s=timeout, manifest_out=manifest_out, echo=typer.echo)


# The values of flows.watch.Launcher, spelled out so that `mtpress --help` does not import Prefect.
LaunchVia = Literal["deployment", "event", "none"]


@app.command()
def watch(
    policy: Annotated[Path, typer.Option(help="what to watch and how to release it")
                      ] = Path("model_configs/watch.yaml"),
    once: Annotated[bool, typer.Option("--once", help="decide once and exit, instead of watching on a schedule")
                    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the decisions; write, remember and launch nothing")
                       ] = False,
    launch: Annotated[LaunchVia, typer.Option(
        help="how an eligible candidate's release starts: a run of the publish deployment, the "
             "mtpress.candidate.eligible event (for prefect.yaml's trigger), or none (only write its config)")
    ] = "deployment",
    state_dir: Annotated[Path, typer.Option(help="where copies of the generated configs are written")
                         ] = Path("releases/watch"),
    every: Annotated[int, typer.Option(help="seconds between two looks at the Hub, without --once", min=60)] = 21600,
) -> None:
    """Find new fine-tunes of the watched base models on the Hub and start a release for each eligible one.

    Eligible: supported architecture, MTP head missing, license allowed, not released or rejected before.

    Decided from Hub metadata and safetensors headers only (no weights); remembered in Prefect Variables
    (mtpress-watch-*), so two watchers never decide one candidate twice.

    --once: one run, launching the `publish/publish` deployment (docs/deploy.md); or pass --launch none.

    Without --once: serves `watch/local` every EVERY seconds, and `publish/local` to run the releases.
    """
    from mtpress.watch import load_watch_policy

    load_watch_policy(policy)  # a bad policy fails here, in a second, not inside a flow run
    from flows.watch import watch as watch_flow

    parameters = {"policy": str(policy), "state_dir": str(state_dir), "launcher": launch, "dry_run": dry_run}
    if once:
        from mtpress.toolchain.prefect_server import prefect_api

        with prefect_api():
            rows = watch_flow(**parameters)
        typer.echo(f"{len(rows)} new candidates decided" + (" (dry run: nothing remembered)" if dry_run else ""))
        return
    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    from flows.publish import publish as publish_flow

    if not PREFECT_API_URL.value():
        raise MtpressError("watching on a schedule needs a Prefect server, and PREFECT_API_URL is not set",
                           hint="start one (`prefect server start`, docs/deploy.md) and export PREFECT_API_URL, "
                                "or run a single watch with --once")

    # Own deployment names, so serving never replaces the publish/publish and watch/watch of prefect.yaml.
    serve(watch_flow.to_deployment(name="local", interval=every,
                                   parameters={**parameters, "deployment": "publish/local"}),
          publish_flow.to_deployment(name="local"))


@app.command()
def limits() -> None:
    """Create the concurrency limits quantize-cpu and bench-gpu (one slot each) on the Prefect server.

    Limits that exist are left as they are (an operator may give a big host more slots).

    With MTPRESS_LIMIT_SCOPE=<host> set, this machine's own: quantize-cpu-<host>, bench-gpu-<host> (docs/deploy.md).
    """
    from mtpress.concurrency import LIMITS, ensure_limits, limit_name
    from mtpress.toolchain.prefect_server import prefect_api

    with prefect_api():
        created = set(ensure_limits())
    for kind, slots in LIMITS.items():
        name = limit_name(kind)
        typer.echo(f"{name}: {'created' if name in created else 'exists'} ({slots} slot{'s' if slots > 1 else ''})")


@toolchain_app.command("build")
def toolchain_build() -> None:
    """Build (once) or find the pinned llama.cpp with its converter environment, and the MLX tools environment."""
    from mtpress.toolchain import resolve_toolchain
    from mtpress.toolchain.mlx import resolve_mlx_tools

    tools = resolve_toolchain(build=True)
    typer.echo(f"llama.cpp b{tools.version} ({tools.origin}): {tools.bin_dir}")
    mlx = resolve_mlx_tools(build=True)
    typer.echo(f"MLX tools (mlx {mlx.versions['mlx']}, mlx-lm {mlx.versions['mlx_lm']}, "
               f"mtplx {mlx.versions['mtplx']}): {mlx.python}")


@toolchain_app.command("doctor")
def toolchain_doctor() -> None:
    """Check the toolchain without building anything; exit 1 if it is not usable."""
    from mtpress.toolchain import resolve_toolchain
    from mtpress.toolchain.mlx import mlx_tools_status

    tools = resolve_toolchain(build=False)
    for name in ("llama-quantize", "llama-server", "llama-cli", "llama-bench", "llama-imatrix", "llama-perplexity"):
        typer.echo(f"  {name}: {tools.tool(name)}")
    typer.echo(f"  converter: {' '.join(tools.converter())}")
    typer.echo(f"ok: llama.cpp b{tools.version} ({tools.origin}), converter env {tools.describe()['converter_python']}")
    typer.echo(mlx_tools_status())


@hub_app.command("serve")
def hub_serve(root: Annotated[Path, typer.Option(help="where repos are stored")] = Path("releases/hub"),
              host: str = "127.0.0.1", port: Annotated[int, typer.Option(help="0 picks a free port")] = 8765,
              token_file: Annotated[Path | None, typer.Option(
                  help="file holding the write token (default: a new one, printed once)",
                  exists=True, dir_okay=False)] = None,
              allow_faults: Annotated[bool, typer.Option(
                  help="serve the fault-injection route /_mtpress/faults (reliability tests)")] = False) -> None:
    """Serve the local Hub-compatible endpoint (point HF_ENDPOINT at it).

    Writes and private repos need the token; public repos are readable without one, as on the Hub.
    """
    import shlex

    from mtpress.hub.server import LocalHub, new_token, serve

    token = token_file.read_text(encoding="utf-8").strip() if token_file else new_token()
    try:
        hub = LocalHub(root, host=host, port=port, tokens={token}, faults=allow_faults)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--token-file") from None
    hub.bind()  # first, so that the address shown is the real one (with --port 0 too)
    typer.echo(f"local Hub on {hub.url}, repos in {root}{', fault injection on' if allow_faults else ''}")
    # The only place the generated token is ever shown; it is in no log and no file.
    shown = f'"$(cat {shlex.quote(str(token_file))})"' if token_file else token
    typer.echo(f"export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1 HF_TOKEN={shown}")
    if token_file is None:
        typer.echo("(a new write token, shown only this once; --token-file PATH keeps one across restarts)")
    serve(hub)


def main() -> None:
    # Without PREFECT_API_URL a command that runs flows starts a temporary Prefect server (prefect_api); on a
    # busy 2-core machine its first start (database migrations) can take longer than Prefect's default 20 s wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # mtpress runs offline as often as not: Prefect's usage telemetry would only print failed-to-send tracebacks.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    try:
        app()
    except MtpressError as e:
        if os.environ.get("MTPRESS_DEBUG") == "1":
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(1)
