"""A lean head file: the sidecar `mtp-` file's own copies of the embedding and output matrix, at a measured type.

llama.cpp's draft-mtp reads the token embedding and the output matrix from the model the head is loaded
in (src/models/qwen35.cpp), so a sidecar head file carries copies of both: most of its size. Measured on the
demo (b11434, CPU, smoke's figures: 48 tokens at draft length 2, the copies set with llama-quantize's
`--token-embedding-type` / `--output-tensor-type`):

    trunk    copies at           head file   accepted / drafted   (256 tokens)
    BF16     BF16 (its own)      267.6 MB    29 / 35              158 / 192
    BF16     Q8_0                148.4 MB    29 / 35
    BF16     Q4_0                 84.8 MB    29 / 35              158 / 192
    Q8_0     Q8_0 (its own)      147.3 MB    29 / 35
    Q8_0     Q4_0                 83.7 MB    29 / 35
    Q4_K_M   Q4_K / Q6_K (own)    99.6 MB    29 / 34              160 / 189
    Q4_K_M   Q8_0                146.8 MB    29 / 34
    Q4_K_M   Q4_0                 83.2 MB    29 / 34              160 / 189

The rule: the smallest of the trunk's type, Q8_0 and Q4_0 whose accepted count is not lower than with the
trunk's type on any trunk measured (greedy and on the CPU, the counts are exact: any lost draft shows). Q4_0
met it everywhere, so it is ``head_shared_type``'s default. Measured with /tmp scripts that ran llama-quantize
``--token-embedding-type T --output-tensor-type T`` on ``mtp-…-BF16.gguf`` and ``smoke(trunk, head, SmokeSpec())``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mtpress.schema import ReleaseConfig

SAMPLE = Path(__file__).parent / "data" / "manifest-sample.json"
MINIMAL = {"name": "X", "finetune": {"repo": "a/b"}, "target": {"repo": "a/c"}}


def test_the_measured_type_is_the_default_and_only_quant_types_are_accepted():
    assert ReleaseConfig.model_validate(MINIMAL).head_shared_type == "Q4_0"
    assert ReleaseConfig.model_validate({**MINIMAL, "head_shared_type": None}).head_shared_type is None
    with pytest.raises(ValueError, match="head_shared_type\n.*unknown quant type 'Q4'"):
        ReleaseConfig.model_validate({**MINIMAL, "head_shared_type": "Q4"})


def test_the_card_shows_what_the_head_adds_to_each_sidecar_download():
    from tests.test_card import card_of

    manifest = json.loads(SAMPLE.read_text(encoding="utf-8"))
    manifest["config"]["head_shared_type"] = "Q4_0"
    files = card_of(manifest).files
    # The sample's Q4_K_M pair: a 104 MB trunk and a 60 MB head.
    assert "| `Q4_K_M` | 104 MB | 60 MB | 57.69% |" in files["README.md"]
    assert "as `Q4_0`, the smallest type" in files["README.md"]
    assert "| `Q4_K_M` | 104 MB | 60 MB | 57.69% |" in files["README_zh.md"] and "存为 `Q4_0`" in files["README_zh.md"]
    # An older manifest does not say how its heads were made: the sizes, and no claim about their type.
    older = copy.deepcopy(manifest)
    del older["config"]["head_shared_type"]
    english = card_of(older).files["README.md"]
    assert "| `Q4_K_M` | 104 MB | 60 MB | 57.69% |" in english and "the smallest type" not in english


@pytest.fixture(scope="module")
def demo_sidecar(tmp_path_factory, toolchain, demo_pair):
    """The demo base in the sidecar layout: BF16 trunk and BF16 head file."""
    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.stages.convert import convert

    base = ModelDir(demo_pair[0], "base")
    return base.config, convert(base, get_arch("qwen35"), "sidecar", name="L", tools=toolchain,
                                out_dir=tmp_path_factory.mktemp("lean-head"))


@pytest.mark.slow
def test_the_default_head_file_holds_its_copies_at_the_measured_type_and_still_drafts_above_the_floor(
        toolchain, demo_sidecar):
    from mtpress.archs import get_arch
    from mtpress.schema import SmokeSpec
    from mtpress.stages.gguf_files import read_gguf_header
    from mtpress.stages.quantize import quantize
    from mtpress.stages.smoke import smoke

    config, (trunk_bf16, head_bf16) = demo_sidecar
    arch, shared = get_arch("qwen35"), ReleaseConfig.model_validate(MINIMAL).head_shared_type
    trunk = quantize(trunk_bf16, "Q4_K_M", arch, config, name="L", tools=toolchain, shared_type=shared)
    head = quantize(head_bf16, "Q4_K_M", arch, config, name="L", tools=toolchain, shared_type=shared)
    types = {name: kind for name, kind, _ in read_gguf_header(head.path, ())[1]}
    assert types["token_embd.weight"] == types["output.weight"] == shared
    # The trunk's own matrices are the quant's business: shared_type leaves them alone.
    trunk_types = {name: kind for name, kind, _ in read_gguf_header(trunk.path, ())[1]}
    assert trunk_types["output.weight"] != shared
    # Q4_K_M's own choice for these copies (Q4_K / Q6_K) made a 99.6 MB head file.
    assert head.size < 85e6
    spec = SmokeSpec()
    result = smoke(trunk, head, spec, toolchain)
    assert result.passed and result.acceptance >= spec.min_acceptance
