"""Shared fixtures: the pinned toolchain, the generated demo models, the local Hub, Prefect's harness.

huggingface_hub reads HF_HUB_DISABLE_XET and HF_ENDPOINT at import time, so they are set here,
before any test module imports it; no test may ever reach huggingface.co.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


import pytest  # noqa: E402

TEST_TOKEN = "hf_" + "mtpressTestSuiteToken0123456789abcdef"


@contextmanager
def client_on_local_hub(root: Path, token: str = TEST_TOKEN, monkeypatch: pytest.MonkeyPatch | None = None,
                        **hub_options) -> Iterator:
    """A LocalHub under ``root`` (``hub_options``: faults, max_file_size, lfs_scope) that accepts ``token``, with
    huggingface_hub pointed at it — endpoint, token, an HF_HOME of its own. A per-test fixture passes the test's
    ``monkeypatch`` (one undo for all the test changed); wider fixtures get their own, undone when the block ends."""
    from mtpress.hub.server import LocalHub

    mp = monkeypatch or pytest.MonkeyPatch()
    try:
        with LocalHub(root / "hub", tokens={token}, **hub_options) as hub:
            mp.setenv("HF_ENDPOINT", hub.url)
            mp.setenv("HF_TOKEN", token)
            mp.setenv("HF_HOME", str(root / "hf_home"))
            yield hub
    finally:
        if monkeypatch is None:
            mp.undo()


@pytest.fixture(scope="session")
def toolchain():
    """The pinned llama.cpp; `make test` builds it before pytest starts."""
    from mtpress.toolchain import resolve_toolchain

    return resolve_toolchain(build=False)


@pytest.fixture(scope="session")
def demo_pair():
    """(base with head, fine-tune without) generated once per machine into the mtpress cache."""
    from mtpress.demo.run import write_demo_pair
    from mtpress.fsutil import cache_root

    return write_demo_pair(cache_root() / "demo-models", base_repo="mtpress-demo/Tiny-Qwen3.5-Demo-Base",
                           finetune_repo="mtpress-demo/Tiny-Qwen3.5-Demo-FT")


@pytest.fixture(scope="session")
def demo_ggufs(tmp_path_factory, toolchain, demo_pair):
    """The demo base (with its own head) as embedded BF16 and Q4_K_M GGUFs, built once per session."""
    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.stages.convert import convert
    from mtpress.stages.quantize import quantize

    arch = get_arch("qwen35")
    base = ModelDir(demo_pair[0], "base")
    [bf16] = convert(base, arch, "embedded", name="T", tools=toolchain, out_dir=tmp_path_factory.mktemp("ggufs"))
    return bf16, quantize(bf16, "Q4_K_M", arch, base.config, name="T", tools=toolchain)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A fresh local Hub endpoint; HF_ENDPOINT and a test token point the code at it. Fault injection is on:
    reliability tests plan failures on it (`local_hub.faults`)."""
    with client_on_local_hub(tmp_path, monkeypatch=monkeypatch, faults=True) as hub:
        yield hub


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                         PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}):
            yield
