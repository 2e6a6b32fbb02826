"""The quant matrix people pick from, which of its types are made with an importance matrix, and the matrix
itself (issue #21 items 1 and 2).

The rule in schema.IMATRIX_REQUIRED is read from llama-quantize's source; these tests hold it against the pinned
llama-quantize itself: a type it refuses without an importance matrix is always made with the release's.
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
    assert set(PUBLISHED) <= set(cfg.quants) and set(cfg.quants) & IMATRIX_REQUIRED == {"IQ2_M"}
    assert cfg.imatrix_quants == ("Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "Q2_K", "IQ2_M")
    out = subprocess.run([sys.executable, "-c", "from mtpress.cli import main; main()", "check-config",
                          str(FULL_MATRIX)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Qwen3.5-9B-MTP: 13 quants" in out.stdout, out.stderr


def test_the_demo_matrix_stays_lean():
    assert len(load_release_config(ROOT / "model_configs" / "demo.yaml").quants) <= 4


def test_which_quants_are_made_with_the_importance_matrix():
    auto = load_release_config(demo_with(quants=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ2_M"],
                                         imatrix={}))  # the schema's default: auto
    assert auto.imatrix_quants == ("Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ2_M")  # IQ types and 4 bits or fewer
    every = load_release_config(demo_with(quants=["Q8_0", "IQ2_M"], imatrix={"quants": "all"}))
    assert every.imatrix_quants == ("Q8_0", "IQ2_M")
    # A type llama-quantize refuses without one is made with it even when the list leaves it out.
    listed = load_release_config(demo_with(quants=["Q4_K_M", "IQ2_M", "Q2_K"], imatrix={"quants": ["Q2_K"]}))
    assert listed.imatrix_quants == ("IQ2_M", "Q2_K")
    assert load_release_config(demo_with(quants=["Q8_0", "Q6_K"])).imatrix_quants == ()  # no matrix is computed
    with pytest.raises(ConfigError, match=r"imatrix\.quants: .*BF16"):
        load_release_config(demo_with(imatrix={"quants": ["BF16"]}))


@pytest.mark.parametrize("quant", sorted(IMATRIX_REQUIRED))
def test_a_type_that_needs_an_imatrix_is_accepted_in_the_matrix_but_not_for_the_head(quant):
    assert quant in load_release_config(demo_with(quants=["Q4_K_M", quant])).imatrix_quants
    with pytest.raises(ConfigError, match=rf"head_type: .*{quant} is a 2-bit type that needs an importance matrix"):
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


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["embedded", "sidecar"])
def test_an_iq_release_made_with_the_imatrix_builds_and_passes_smoke(layout, demo_pair, toolchain, tmp_path):
    """One matrix from the BF16 files covers the MTP head in both layouts (``--nextn`` / ``-md``); IQ3_XXS, which
    llama-quantize refuses without one, then builds, keeps the head at head_type, and passes smoke."""
    from gguf import GGUFReader

    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.naming import pair_trunks_with_heads
    from mtpress.schema import ImatrixSpec, SmokeSpec
    from mtpress.stages.convert import convert
    from mtpress.stages.imatrix import compute_imatrix
    from mtpress.stages.quantize import quantize
    from mtpress.stages.smoke import smoke

    arch, base = get_arch("qwen35"), ModelDir(demo_pair[0], "base")
    bf16 = convert(base, arch, layout, name="T-MTP", tools=toolchain, out_dir=tmp_path)
    [(model, head)] = pair_trunks_with_heads(bf16)
    head_block = arch.head_gguf_block(base.config)
    matrix = compute_imatrix(model, head, ImatrixSpec(ctx_size=128), name="T-MTP", head_block=head_block,
                             tools=toolchain)
    assert matrix.path == tmp_path / "imatrix-T.gguf" and not list(tmp_path.glob(".*partial"))
    assert matrix.head_tensors == 8 and matrix.tensors > matrix.head_tensors  # 4 attention, 3 MLP, eh_proj
    assert GGUFReader(matrix.path).get_field("imatrix.datasets").contents() == ["imatrix_calibration.txt"]
    iq = [quantize(f, "IQ3_XXS", arch, base.config, name="T-MTP", tools=toolchain, head_type="Q8_0",
                   shared_type="Q4_0", imatrix=matrix) for f in bf16]
    assert {f.imatrix for f in iq} == {"imatrix-T.gguf"}
    for f in iq:  # the published file names the matrix and its text, never this machine's directories
        fields = GGUFReader(f.path).fields
        assert fields["quantize.imatrix.file"].contents() == "imatrix-T.gguf"
        assert fields["quantize.imatrix.dataset"].contents() == "imatrix_calibration.txt"
    assert {f.head_tensor_types for f in iq if f.nextn_layers} == {("F32", "Q8_0")}
    [(model, head)] = pair_trunks_with_heads(iq)
    result = smoke(model, head, SmokeSpec(n_predict=48, draft_n_max=2), toolchain)
    assert result.passed and result.tokens_identical and result.accepted > 0


@pytest.mark.slow
def test_a_matrix_without_the_head_is_refused(demo_pair, toolchain, tmp_path):
    """llama-imatrix ``--nextn`` on a file whose MTP block it does not run exits 0 with no statistics for the head
    (what a toolchain without MTP support in llama-imatrix does, llama.cpp PR #23476): refused, nothing left."""
    from dataclasses import replace

    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.errors import ToolchainError
    from mtpress.schema import ImatrixSpec
    from mtpress.stages.convert import convert
    from mtpress.stages.imatrix import compute_imatrix

    arch, base = get_arch("qwen35"), ModelDir(demo_pair[0], "base")
    trunk = next(f for f in convert(base, arch, "sidecar", name="T", tools=toolchain, out_dir=tmp_path)
                 if f.role == "model")
    said_to_embed_a_head = replace(trunk, nextn_layers=1)
    with pytest.raises(ToolchainError, match=r"recorded nothing for the MTP head \(blk\.8\) of T-BF16\.gguf"):
        compute_imatrix(said_to_embed_a_head, None, ImatrixSpec(ctx_size=128, chunks=2), name="T", head_block=8,
                        tools=toolchain)
    assert not list(tmp_path.glob("imatrix-*")) and not list(tmp_path.glob(".*partial"))
