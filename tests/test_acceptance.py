"""A head must earn its place: the smoke test and the release gate refuse a head llama.cpp rarely accepts.

A donor of the right shape whose head matrices are random (norms kept) passes every shape check, loads,
drafts, and leaves greedy output unchanged, since the trunk verifies every draft. Only its acceptance
(accepted ÷ drafted) tells it from a real head, so that is what these tests hold it to, through the real
converter, llama-server, the local Hub and the publish flow.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mtpress.errors import DeadHeadError
from mtpress.schema import SmokeSpec
from mtpress.stages.smoke import require_acceptance

SPEC = SmokeSpec(n_predict=16)
DEAD_BASE_REPO = "mtpress-test/Dead-Head-Base"
FINETUNE_REPO = "mtpress-demo/Tiny-Qwen3.5-Demo-FT"  # the name the demo_pair fixture generates it under
TARGET = "mtpress-test/Dead-Head-GGUF"
CONFIG = f"""\
name: Dead-Head
arch: qwen35
finetune: {{repo: {FINETUNE_REPO}}}
donor: {{repo: {DEAD_BASE_REPO}}}
target: {{repo: {TARGET}}}
layouts: [sidecar]
quants: []
smoke: {{n_predict: 16}}
bench: {{enabled: false}}
quality: {{enabled: false}}
"""
SAMPLE = Path(__file__).parent / "data" / "manifest-sample.json"


# THE FLOOR (fast)


def test_acceptance_at_the_floor_passes_and_below_it_names_what_and_the_figures():
    spec = SmokeSpec(min_acceptance=0.25, draft_n_max=3)
    require_acceptance("smoke X.gguf", 8, 2, spec)  # exactly the floor
    with pytest.raises(DeadHeadError) as err:
        require_acceptance("smoke X.gguf + mtp-X.gguf", 9, 2, spec)
    assert str(err.value).startswith("smoke X.gguf + mtp-X.gguf: draft-mtp acceptance 0.222 (2 of 9 drafted tokens "
                                     "accepted at draft length 3) is below smoke.min_acceptance 0.25\n")
    assert "another donor" in err.value.hint and "head: {source: realign}" in err.value.hint


def test_the_floor_is_a_share_between_a_dead_heads_and_a_real_ones():
    assert 0 < SmokeSpec().min_acceptance < 0.5  # copied heads on fine-tunes are reported near 0.5 at length 2
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="min_acceptance"):
            SmokeSpec(min_acceptance=bad)


def test_the_card_calls_the_head_working_only_when_every_file_met_the_floor():
    from tests.test_card import card_of

    manifest = json.loads(SAMPLE.read_text(encoding="utf-8"))
    manifest["config"]["smoke"]["min_acceptance"] = 0.6

    def first_lines(m: dict) -> tuple[str, str]:
        files = card_of(m).files
        english = next(line for line in files["README.md"].splitlines() if line.startswith("GGUF files of"))
        chinese = next(line for line in files["README_zh.md"].splitlines() if line.startswith("本仓库提供"))
        return english, chinese

    # Both figures are the manifest's counts: 24 of 38 drafts (63.2 %) is the lower of the two files.
    english, chinese = first_lines(manifest)
    assert "with a working multi-token-prediction (MTP) head" in english
    assert "accepted 63.2% or more of its drafted tokens in every file (the release requires 60.0%)" in english
    assert "可正常工作的" in chinese and "63.2%" in chinese and "60.0%" in chinese

    below = copy.deepcopy(manifest)
    below["smoke"][1]["accepted"] = 22  # 22 of 38: 57.9 %
    english, chinese = first_lines(below)
    assert "working" not in english and "**not known to work**" in english
    assert "accepted only 57.9% of its drafted tokens in `sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf`" in english
    assert "可正常工作" not in chinese and "57.9%" in chinese

    unmeasured = copy.deepcopy(manifest)
    unmeasured["smoke"] = []
    english, chinese = first_lines(unmeasured)
    assert "working" not in english and "not measured" in english and "可正常工作" not in chinese


# THROUGH THE REAL TOOLS (slow)


@pytest.fixture(scope="module")
def dead_base(tmp_path_factory):
    from mtpress.demo.models import write_dead_head_base

    return write_dead_head_base(tmp_path_factory.mktemp("dead-head") / "base", repo_id=DEAD_BASE_REPO)


@pytest.fixture(scope="module")
def dead_embedded(tmp_path_factory, toolchain, dead_base):
    """The dead-head base as one embedded BF16 GGUF."""
    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.stages.convert import convert

    [bf16] = convert(ModelDir(dead_base, "dead"), get_arch("qwen35"), "embedded", name="Dead", tools=toolchain,
                     out_dir=tmp_path_factory.mktemp("dead-gguf"))
    return bf16


@pytest.mark.slow
def test_the_demos_copied_head_passes_the_smoke_test_above_the_floor(toolchain, demo_pair, tmp_path):
    """The demo's own case: the fine-tune that lost its head, with the base's head copied in."""
    from mtpress.archs import get_arch
    from mtpress.checkpoint import ModelDir
    from mtpress.stages.convert import convert
    from mtpress.stages.inject import inject
    from mtpress.stages.smoke import smoke

    arch = get_arch("qwen35")
    injected = inject(ModelDir(demo_pair[1], "finetune"), ModelDir(demo_pair[0], "donor"), arch, tmp_path / "inj")
    [bf16] = convert(injected.model, arch, "embedded", name="Copied", tools=toolchain, out_dir=tmp_path / "gguf")
    result = smoke(bf16, None, SPEC, toolchain)
    assert result.passed and result.tokens_identical and result.drafted > 0
    assert result.acceptance == result.accepted / result.drafted >= SPEC.min_acceptance


@pytest.mark.slow
def test_a_dead_head_drafts_with_identical_output_and_the_smoke_test_refuses_it(toolchain, dead_embedded):
    from mtpress.stages.smoke import smoke

    # Only the floor stops it: with none, every other check passes and nothing is accepted.
    unguarded = smoke(dead_embedded, None, SPEC.model_copy(update={"min_acceptance": 0.0}), toolchain)
    assert unguarded.tokens_identical and unguarded.drafted > 0 and unguarded.accepted == 0
    with pytest.raises(DeadHeadError, match=rf"^smoke Dead-BF16\.gguf: draft-mtp acceptance 0 \(0 of "
                                            rf"{unguarded.drafted} drafted tokens accepted at draft length 2\) is "
                                            rf"below smoke\.min_acceptance {SPEC.min_acceptance:g}\n"):
        smoke(dead_embedded, None, SPEC, toolchain)


@pytest.mark.slow
def test_the_release_gate_refuses_a_dead_head_as_llama_cpp_hf_gets_it(toolchain, dead_embedded, local_hub, tmp_path):
    from huggingface_hub import CommitOperationAdd

    from mtpress.hub.client import hub_api
    from mtpress.schema import GateSpec
    from mtpress.stages.gate import gate, pairings_from_names

    api, repo = hub_api(), "mtpress-test/Dead-Head-Staging"
    api.create_repo(repo, private=True)
    commit = api.create_commit(repo, [CommitOperationAdd("Dead-BF16.gguf", str(dead_embedded.path))],
                               commit_message="stage").oid
    pairings = pairings_from_names(api.list_repo_files(repo))
    with pytest.raises(DeadHeadError, match=r"^trunk Dead-BF16\.gguf: llama\.cpp -hf .*:BF16 --spec-type draft-mtp "
                                            r".* with head embedded: draft-mtp acceptance 0 \(0 of \d+ drafted"):
        gate(api, repo, commit, pairings, {"Dead-BF16.gguf": dead_embedded.sha256}, toolchain, SPEC,
             GateSpec(n_predict=16), tmp_path)


@pytest.mark.slow
def test_publishing_with_a_dead_head_donor_fails_before_any_commit(tmp_path, toolchain, demo_pair, dead_base,
                                                                   local_hub, prefect_harness):
    from flows.publish import publish
    from mtpress.hub.client import hub_api

    api = hub_api()
    for repo, folder in ((DEAD_BASE_REPO, dead_base), (FINETUNE_REPO, demo_pair[1])):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder, commit_message="upload")
    config = tmp_path / "dead-head.yaml"
    config.write_text(CONFIG)
    with pytest.raises(DeadHeadError, match=r"smoke Dead-Head-BF16\.gguf \+ mtp-Dead-Head-BF16\.gguf: draft-mtp "
                                            r"acceptance 0 \(0 of \d+ drafted tokens"):
        publish(str(config), str(tmp_path / "release"))
    assert not api.repo_exists(TARGET)
    staging = f"{TARGET}-staging"
    # Finished files may have been pre-uploaded to the private staging repo, but no commit carries them.
    assert not api.repo_exists(staging) or api.list_repo_files(staging) == [".gitattributes"]
