"""llama-server is always cleaned up: a crash and a hang both end in ToolFailedError, no process left."""

import subprocess

import pytest

from mtpress.errors import ToolFailedError
from mtpress.toolchain.server import llama_server


def running(marker: str) -> bool:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0


def test_a_server_that_crashes_on_load_is_reported_with_its_output(toolchain, tmp_path):
    broken = tmp_path / "crash-marker-model.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 4096)
    with pytest.raises(ToolFailedError) as err:
        with llama_server(toolchain, ["-m", str(broken)], timeout=120):
            pass
    assert err.value.returncode not in (None, 0) and "crash-marker-model.gguf" in err.value.output_tail
    assert not running("crash-marker-model")


def test_a_server_that_never_becomes_healthy_is_killed_at_the_timeout(toolchain, tmp_path):
    model = tmp_path / "hang-marker-model.gguf"
    model.write_bytes(b"GGUF" + b"\xff" * 4096)
    # The deadline passes before the server can even fail: the wait ends by timeout, and the group is killed.
    with pytest.raises(ToolFailedError) as err:
        with llama_server(toolchain, ["-m", str(model)], timeout=0.001):
            pass
    assert "timed out" in str(err.value)
    assert not running("hang-marker-model")
