"""The pinned MLX tools (mlx, mlx-lm, MTPLX) in their own Python environment.

mlx-lm needs transformers 5 and MTPLX's dependencies, neither of which may live beside the
project's own, so they get a virtual environment under ``$MTPRESS_CACHE`` built once per
machine, like the llama.cpp converter's: a file lock against concurrent builds, a stamp with
the versions it holds. Every tool runs as a subprocess of that environment through
``run_tool`` (no Hub token in its environment).

On Linux ``mlx[cpu]`` runs arrays, conversion and generation; MTPLX's generating commands
(``run``, ``bench``, ``forge verify``) load a macOS system library and need Apple Silicon.
"""

from __future__ import annotations

import fcntl
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mtpress.errors import ToolchainError
from mtpress.fsutil import cache_root
from mtpress.toolchain.llama_cpp import _run_logged, _say, run_tool

MLX_VERSION = "0.32.4"
MLX_LM_VERSION = "0.32.2"
MTPLX_VERSION = "2.12.2"
# Everything pip resolved for the three pins on Linux x86_64 / Python 3.11 (2026-11-23), pinned so a
# later release of a dependency cannot change what the checks run. MTPLX's own mlx/mlx-lm/transformers
# pins apply only on macOS arm64; on Linux mlx-lm 0.32.2 with transformers 5.23 ran all of its checks.
REQUIREMENTS = (f"mlx[cpu]=={MLX_VERSION}", f"mlx-lm=={MLX_LM_VERSION}", f"mtplx=={MTPLX_VERSION}")
CONSTRAINTS = (
    "annotated-doc==0.0.7", "annotated-types==0.8.0", "anyio==4.16.0", "click==8.5.1", "fastapi==0.165.0",
    "filelock==4.2.11", "fsspec==2026.9.0", "h11==0.16.0", "hf-xet==1.8.0", "httpcore2==2.16.2", "httpx2==2.16.2",
    "huggingface_hub==2.4.0", "idna==3.20", "Jinja2==3.1.6", "markdown-it-py==4.3.0", "MarkupSafe==3.0.4",
    "mdurl==0.1.2", f"mlx=={MLX_VERSION}", f"mlx-cpu=={MLX_VERSION}", f"mlx-lm=={MLX_LM_VERSION}",
    f"mtplx=={MTPLX_VERSION}", "numpy==2.4.6", "opentelemetry-api==1.45.2", "packaging==26.3", "pillow==13.0.0",
    "protobuf==7.36.2", "pydantic==2.14.3", "pydantic_core==2.50.4", "Pygments==2.21.0", "PyYAML==6.0.3",
    "regex==2026.11.15", "rich==15.0.0", "safetensors==0.8.0", "sentencepiece==0.2.3", "shellingham==1.5.4",
    "starlette==1.10.0", "tokenizers==0.23.3", "tqdm==4.70.1", "transformers==5.23.0", "truststore==0.10.5",
    "typer==0.29.2", "typing-inspection==0.4.5", "typing_extensions==4.16.0", "uvicorn==0.54.0",
)
STAMP = "mlx-tools.json"
RUNNER = Path(__file__).with_name("mlx_runner.py")


@dataclass(frozen=True)
class MlxTools:
    """A resolved MLX environment. ``describe()`` is what every output records."""

    home: Path
    python: Path
    versions: dict[str, str]

    def run(self, command: str, request: dict, *, timeout: float) -> dict:
        """One command of ``mlx_runner.py`` in this environment: a JSON request in, a JSON answer out."""
        # -P: the runner's own folder (this package, with a module named mlx) must not shadow the real mlx.
        output = run_tool([str(self.python), "-P", str(RUNNER), command, json.dumps(request)], timeout=timeout,
                          env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        # The runner prints its answer last, on one line; libraries may log above it.
        return json.loads(output.strip().splitlines()[-1])

    def describe(self) -> dict[str, str]:
        return dict(self.versions)


def resolve_mlx_tools(*, build: bool = True) -> MlxTools:
    home = cache_root() / f"mlx-{MLX_VERSION}-mlx-lm-{MLX_LM_VERSION}-mtplx-{MTPLX_VERSION}"
    tools = _cached(home)
    if tools:
        return tools
    if not build:
        raise ToolchainError(f"the MLX tools (mlx {MLX_VERSION}, mlx-lm {MLX_LM_VERSION}, mtplx {MTPLX_VERSION}) "
                             f"are not installed yet (looked in {home})",
                             hint="run `mtpress toolchain build` once (it installs them in about a minute), or "
                                  "let a release with `mlx:` build them on demand")
    return build_mlx_tools(home)


def _cached(home: Path) -> MlxTools | None:
    stamp = home / STAMP
    python = home / "venv" / "bin" / "python"
    if not stamp.is_file() or not python.is_file():
        return None
    return MlxTools(home, python, json.loads(stamp.read_text())["versions"])


def build_mlx_tools(home: Path) -> MlxTools:
    """Create the environment from the registry with exact pins; safe against concurrent builds."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tools = _cached(home)
        if tools:
            return tools
        log = home / "install.log"
        venv = home / "venv"
        _say(f"creating the MLX tools environment (mlx {MLX_VERSION}, mlx-lm {MLX_LM_VERSION}, "
             f"mtplx {MTPLX_VERSION}; once per machine)")
        _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log)
        constraints = home / "constraints.txt"
        constraints.write_text("\n".join(CONSTRAINTS) + "\n")
        _run_logged([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "-c", str(constraints), *REQUIREMENTS], log)
        versions = _installed_versions(venv / "bin" / "python")
        if versions.get("mtplx") != MTPLX_VERSION or versions.get("mlx_lm") != MLX_LM_VERSION:
            raise ToolchainError(f"the MLX tools environment in {home} holds {versions}, not the pinned versions",
                                 hint=f"delete {home} and rerun `mtpress toolchain build`")
        (home / STAMP).write_text(json.dumps({"versions": versions}, indent=2))
    tools = _cached(home)
    assert tools is not None
    return tools


def _installed_versions(python: Path) -> dict[str, str]:
    out = run_tool([str(python), "-c", "import sys, json, importlib.metadata as m; print(json.dumps({"
                    "'python': sys.version.split()[0], 'mlx': m.version('mlx'), 'mlx_lm': m.version('mlx-lm'), "
                    "'mtplx': m.version('mtplx'), 'transformers': m.version('transformers')}))"], timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def mlx_tools_status() -> str:
    """One line for ``toolchain doctor``: the environment and its versions, or why it is not usable."""
    try:
        tools = resolve_mlx_tools(build=False)
    except ToolchainError as e:
        return f"MLX tools: not installed ({str(e).splitlines()[0]}); built on demand when a release enables mlx"
    try:
        run_tool([str(tools.python), "-c", "import mlx.core, mlx_lm, mtplx"], timeout=120)
        state = "ok"
    except ToolchainError as e:
        state = f"broken ({str(e).strip().splitlines()[-1]})"
    return f"MLX tools: {state}: " + ", ".join(f"{k} {v}" for k, v in tools.versions.items()) + f" ({tools.python})"
