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
from dataclasses import replace
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



def smoked(layout: str, quant: str, accepted: int, drafted: int):
    from mtpress.stages.smoke import SmokeResult

    head = f"mtp-T-{quant}.gguf" if layout == "sidecar" else None
    return SmokeResult(model=f"T-{quant}.gguf", head=head, quant=quant, layout=layout, n_predict=48, draft_n_max=2,
                       tokens_identical=True, tokens=(), drafted=drafted, accepted=accepted,
                       acceptance=accepted / drafted, tokens_per_second_plain=1.0, tokens_per_second_mtp=1.0,
                       passed=True)


def heads(*quants: str) -> list:
    from tests.test_preflight_reuse import produce

    return [replace(produce(Path("/x"), "sidecar", "head", q, b"h"), name=f"mtp-T-{q}.gguf", size=100) for q in quants]


def test_each_lean_head_is_checked_against_the_embedded_file_of_its_quant():
    """Per release, from the smoke tests: the same drafts give z = 0; a draft or two fewer is chance; 10 of 50
    against 30 of 50 is a measurable loss, which stops the release and says what to change."""
    from mtpress.errors import QualityGateError
    from mtpress.stages.smoke import check_lean_heads

    same = [smoked("sidecar", "BF16", 29, 35), smoked("embedded", "BF16", 29, 35),
            smoked("sidecar", "Q8_0", 29, 35), smoked("embedded", "Q8_0", 29, 35),
            smoked("sidecar", "Q4_K_M", 28, 35), smoked("embedded", "Q4_K_M", 29, 34)]
    checks = check_lean_heads(same, heads("Q8_0", "Q4_K_M"), "Q4_0")
    assert [(c.quant, c.sidecar_accepted, c.embedded_accepted) for c in checks] == [("Q8_0", 29, 29),
                                                                                   ("Q4_K_M", 28, 29)]
    assert checks[0].z == 0 and 0 < checks[1].z < 2  # the BF16 head keeps BF16 copies: not compared
    lost = [smoked("sidecar", "Q4_K_M", 10, 50), smoked("embedded", "Q4_K_M", 30, 50)]
    with pytest.raises(QualityGateError, match=r"mtp-T-Q4_K_M\.gguf, with its embedding and output copies at Q4_0, "
                                               r"accepted 10 of 50 drafts; the embedded Q4_K_M file.* 30 of 50: 4\.1 "
                                               r"standard errors lower\n.*head_shared_type"):
        check_lean_heads(lost, heads("Q4_K_M"), "Q4_0")
    assert check_lean_heads(lost, heads("Q4_K_M"), None) == []  # the quant's own types: nothing lean to check
    assert check_lean_heads(lost[:1], heads("Q4_K_M"), "Q4_0") == []  # one layout: nothing to compare with


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
