"""The quant matrix people pick from, and which of its types need an importance matrix (issue #21 item 2).

The rule in schema.IMATRIX_REQUIRED is read from llama-quantize's source; these tests hold it against the pinned
llama-quantize itself, so `check-config` never accepts a type that then fails inside llama-quantize.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtpress.errors import ConfigError
from mtpress.schema import IMATRIX_REQUIRED, QUANT_TYPES, load_release_config

ROOT = Path(__file__).resolve().parent.parent
FULL_MATRIX = ROOT / "model_configs" / "qwen3.5-9b-full-matrix.yaml"
# What GGUF publishers ship and issue #21 asks every release to be able to build.
PUBLISHED = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ3_M", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
             "Q8_0")
NEEDS_IMATRIX = "will require an imatrix"  # llama-quantize --dry-run's warning (src/llama-quant.cpp)


def demo_with(**changes) -> dict:
    return {**yaml.safe_load((ROOT / "model_configs" / "demo.yaml").read_text()), **changes}


def test_the_full_matrix_release_validates_and_builds_every_published_type():
    cfg = load_release_config(FULL_MATRIX)
    assert set(PUBLISHED) <= set(cfg.quants) and not set(cfg.quants) & IMATRIX_REQUIRED
    out = subprocess.run([sys.executable, "-c", "from mtpress.cli import main; main()", "check-config",
                          str(FULL_MATRIX)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Qwen3.5-9B-MTP: 12 quants" in out.stdout, out.stderr


def test_the_demo_matrix_stays_lean():
    assert len(load_release_config(ROOT / "model_configs" / "demo.yaml").quants) <= 4


@pytest.mark.parametrize("quant", sorted(IMATRIX_REQUIRED))
def test_check_config_refuses_a_type_llama_quantize_refuses_without_an_imatrix(quant):
    with pytest.raises(ConfigError, match=rf"quants: .*{quant} need an importance matrix: the release flow computes"):
        load_release_config(demo_with(quants=["Q4_K_M", quant]))
    with pytest.raises(ConfigError, match=rf"head_type: .*{quant} needs an importance matrix"):
        load_release_config(demo_with(head_type=quant))


@pytest.mark.slow
def test_the_imatrix_rule_is_llama_quantize_s(demo_ggufs, toolchain, tmp_path):
    """Every type: llama-quantize --dry-run (0.3 s, nothing written) warns that an imatrix is needed exactly for
    IMATRIX_REQUIRED; and a real run of one of them fails the way check-config now prevents."""
    bf16 = demo_ggufs[0].path
    quantize = str(toolchain.tool("llama-quantize"))
    needs = set()
    for quant in QUANT_TYPES:
        out = subprocess.run([quantize, "--dry-run", str(bf16), quant], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{quant}: {out.stderr[-2000:]}"
        if NEEDS_IMATRIX in out.stdout + out.stderr:
            needs.add(quant)
    assert needs == IMATRIX_REQUIRED
    out = subprocess.run([quantize, str(bf16), str(tmp_path / "x.gguf"), "IQ2_M"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "this quantization requires an importance matrix" in out.stdout + out.stderr
