"""The mixture-of-experts family (qwen35moe): head shapes from the config in both expert layouts, donor checks on
every key the head depends on, the stages' refusals, and one release of the tiny MoE fine-tune end to end."""

import json
from pathlib import Path

import pytest

from mtpress.archs import arch_for_config, get_arch
from mtpress.checkpoint import ModelDir
from mtpress.demo.models import write_demo_model
from mtpress.demo.moe import MoeDemoSpec, MoeMultimodalSpec
from mtpress.demo.multimodal import write_multimodal_model
from mtpress.errors import IncompatibleDonorError, MissingMtpHeadError, UnsupportedArchitectureError
from tests.conftest import client_on_local_hub

ROOT = Path(__file__).resolve().parent.parent
ARCH = get_arch("qwen35moe")
DEMO_MOE = ROOT / "model_configs" / "demo-moe.yaml"
# A vocabulary this small suits everything but the converter (the tokenizer has 248,077 tokens).
SMALL = MoeDemoSpec(vocab_size=1000)


def small_model(path: Path, spec: MoeDemoSpec = SMALL, *, with_mtp: bool = True, multimodal: bool = False
                ) -> ModelDir:
    if multimodal:
        write_multimodal_model(path, MoeMultimodalSpec(text=spec), with_mtp=with_mtp, repo_id="t/" + path.name)
    else:
        write_demo_model(path, spec, with_mtp=with_mtp, repo_id="t/" + path.name)
    return ModelDir(path, path.name)


@pytest.mark.parametrize("multimodal", [False, True])
@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_the_head_is_read_in_either_expert_layout_from_the_config(tmp_path, layout, multimodal):
    model = small_model(tmp_path / "m", MoeDemoSpec(vocab_size=1000, expert_layout=layout, head_layout=layout),
                        multimodal=multimodal)
    assert arch_for_config(model.config, where="t") is ARCH
    head = {n: tuple(t.shape) for n, t in model.tensors.items() if ARCH.is_head_tensor(n)}
    assert ARCH.expected_head(model.config, model.tensors) == head
    mlp = "mtp.layers.0.mlp."
    e, ff, h = SMALL.num_experts, SMALL.moe_intermediate_size, SMALL.hidden_size
    assert head[mlp + "gate.weight"] == (e, h) and head[mlp + "shared_expert_gate.weight"] == (1, h)
    if layout == "fused":  # transformers 5's names: no .weight suffix
        assert head[mlp + "experts.gate_up_proj"] == (e, 2 * ff, h) and head[mlp + "experts.down_proj"] == (e, h, ff)
        assert len(head) == 19
    else:
        assert head[mlp + "experts.3.down_proj.weight"] == (h, ff) and len(head) == 17 + 3 * e
    # Without names, the layout Qwen's own releases use for the head: per expert.
    assert mlp + "experts.0.gate_proj.weight" in ARCH.expected_head(model.config)


def test_describe_counts_experts_and_the_parameters_one_token_runs_through(tmp_path):
    model = small_model(tmp_path / "m")
    facts = ARCH.describe(model.config, model.tensors)
    e, used, ff, h = SMALL.num_experts, SMALL.num_experts_per_tok, SMALL.moe_intermediate_size, SMALL.hidden_size
    routed_per_layer = e * 3 * ff * h
    assert facts["experts"] == e and facts["experts_per_token"] == used and facts["intermediate_size"] is None
    assert facts["moe_intermediate_size"] == ff and facts["shared_expert_intermediate_size"] == 256
    trunk = facts["parameters_total"] - facts["parameters_head"]
    inactive = routed_per_layer * (e - used) // e
    assert facts["parameters_active"] == trunk - SMALL.num_hidden_layers * inactive
    assert facts["parameters_head_active"] == facts["parameters_head"] - inactive
    assert facts["expert_layout"] == facts["head_expert_layout"] == "per-expert"


@pytest.mark.parametrize("key, value", [("num_experts", 8), ("num_experts_per_tok", 1),
                                        ("moe_intermediate_size", 32), ("intermediate_size", 512)])
def test_a_donor_with_other_experts_is_refused_naming_the_key(tmp_path, key, value):
    from mtpress.stages.inject import inject

    finetune = small_model(tmp_path / "ft", SMALL.finetune(), with_mtp=False)
    # intermediate_size is the shared expert's width in the demo spec (shared_expert_intermediate_size).
    donor = small_model(tmp_path / "donor", MoeDemoSpec(vocab_size=1000, **{key: value}))
    config_key = "shared_expert_intermediate_size" if key == "intermediate_size" else key
    with pytest.raises(IncompatibleDonorError, match=rf"\b{config_key}\b"):
        inject(finetune, donor, ARCH, tmp_path / "out")


@pytest.mark.parametrize("head_layout", ["per-expert", "fused"])
def test_a_same_shaped_donor_restores_the_moe_head(tmp_path, head_layout):
    """The donor's own tensor names decide its head's expert layout (a fused donor head is not 'missing' the
    per-expert tensors)."""
    from mtpress.stages.inject import inject

    finetune = small_model(tmp_path / "ft", SMALL.finetune(), with_mtp=False)
    donor = small_model(tmp_path / "donor", MoeDemoSpec(vocab_size=1000, head_layout=head_layout))
    result = inject(finetune, donor, ARCH, tmp_path / "out")
    out = result.model
    assert result.action == "injected" and ARCH.expected_head(out.config, out.tensors) == {
        n: tuple(t.shape) for n, t in out.tensors.items() if ARCH.is_head_tensor(n)}


def test_a_donor_whose_head_lacks_experts_is_refused(tmp_path):
    """A dense head offered to an MoE fine-tune: the expert tensors are missing."""
    from mtpress.stages.inject import inject

    finetune = small_model(tmp_path / "ft", SMALL.finetune(), with_mtp=False)
    donor = small_model(tmp_path / "donor", MoeDemoSpec(vocab_size=1000, num_experts=3))
    donor_config = json.loads((donor.path / "config.json").read_text()) | {"num_experts": SMALL.num_experts}
    (donor.path / "config.json").write_text(json.dumps(donor_config))
    with pytest.raises(MissingMtpHeadError, match="experts.3"):
        inject(finetune, ModelDir(donor.path, "donor"), ARCH, tmp_path / "out")


def test_mlx_export_and_realign_refuse_moe_naming_the_architecture(tmp_path):
    from mtpress.schema import HeadSpec, MlxSpec
    from mtpress.stages.export_mlx import export_mlx
    from mtpress.stages.realign import HiddenStates, realign

    model = small_model(tmp_path / "m")
    with pytest.raises(UnsupportedArchitectureError, match="qwen35moe"):
        export_mlx(model, ARCH, MlxSpec(), tools=None, out_dir=tmp_path / "pack")
    # Refused before the hidden states are even read: these name nothing on disk.
    data = HiddenStates(tmp_path / "none", "", "", "", "", 0, 0, 0, SMALL.hidden_size, ())
    with pytest.raises(UnsupportedArchitectureError, match="qwen35moe"):
        realign(model, data, ARCH, HeadSpec(), tools=None, out=tmp_path / "r")
    assert not (tmp_path / "pack").exists() and not (tmp_path / "r").exists()


def test_the_35b_a3b_config_validates(tmp_path):
    from typer.testing import CliRunner

    from mtpress.cli import app

    configs = sorted(str(p) for p in (ROOT / "model_configs").glob("*35b-a3b*.yaml")) + [str(DEMO_MOE)]
    result = CliRunner().invoke(app, ["check-config", *configs])
    assert result.exit_code == 0 and result.output.count(": ok (") == len(configs) >= 2, result.output


@pytest.fixture(scope="module")
def moe_release(tmp_path_factory, toolchain, prefect_harness):
    """The tiny MoE fine-tune released through the publish flow onto a local Hub (both layouts, two quants)."""
    from flows.publish import publish
    from mtpress.demo.run import seed_upstream_repos

    root = tmp_path_factory.mktemp("moe")
    with client_on_local_hub(root, "hf_" + "mtpressMoeTestToken0123456789abcdefgh"):
        seed_upstream_repos(DEMO_MOE, MoeDemoSpec())
        release_dir = Path(publish(str(DEMO_MOE), str(root / "release")))
        yield {"dir": release_dir, "manifest": json.loads((release_dir / "manifest.json").read_text())}


@pytest.mark.slow
def test_the_moe_finetune_is_released_with_smoke_gate_and_card(moe_release):
    from mtpress.stages.gguf_files import read_facts

    manifest, folder = moe_release["manifest"], moe_release["dir"]
    models = [f for f in manifest["files"] if f["role"] == "model"]
    assert {(f["layout"], f["quant"]) for f in models} == {
        (layout, quant) for layout in ("sidecar", "embedded") for quant in ("BF16", "Q8_0", "Q4_K_M")}
    assert manifest["inject"]["action"] == "injected" and len(manifest["inject"]["head"]["tensors"]) == 17 + 3 * 4
    for result in manifest["smoke"]:
        assert result["passed"] and result["tokens_identical"] and result["accepted"] > 0, result
    # The release gate (the real clients on the staged repo): everything matched, and llama.cpp's -hf with
    # draft-mtp fetched the MoE head and had its drafts accepted.
    assert manifest["gate"] and all(check["matches"] != "no" for check in manifest["gate"]), manifest["gate"]
    assert any("draft-mtp" in c["request"] and c["accepted"] > 0 for c in manifest["gate"]), manifest["gate"]
    # The head's whole MoE block (router, experts, shared expert) is pinned to Q8_0 in the Q4_K_M files.
    head_block = SMALL.num_hidden_layers
    for record in manifest["files"]:
        if record["quant"] == "Q4_K_M" and record["nextn_layers"]:
            facts = read_facts(folder / record["path"], head_block=head_block)
            experts = {n: t for n, t in facts.head_block_tensors.items() if "exps" in n or "gate_inp" in n}
            assert len(experts) >= 4 and set(experts.values()) <= {"Q8_0", "F32"}, experts
    arch = manifest["architecture"]
    assert arch["experts"] == 4 and arch["experts_per_token"] == 2
    card = (folder / "README.md").read_text()
    assert f"{arch['parameters_active']:,}" in card and "4 routed experts, 2 per token" in card
    assert f"{arch['parameters_active']:,}" in (folder / "README_zh.md").read_text()


@pytest.mark.slow
def test_fused_experts_in_the_multimodal_layout_convert_load_and_draft(tmp_path, toolchain):
    """Fused expert weights (trunk and head) under Qwen3_5MoeForConditionalGeneration: the real converter stacks
    them into the head's GGUF block, llama.cpp loads the MoE head and its drafts are accepted, tokens unchanged."""
    from mtpress.schema import SmokeSpec
    from mtpress.stages.convert import convert
    from mtpress.stages.gguf_files import read_facts
    from mtpress.stages.smoke import smoke

    spec = MoeMultimodalSpec(text=MoeDemoSpec(expert_layout="fused", head_layout="fused"))
    model = ModelDir(write_multimodal_model(tmp_path / "vl", spec, with_mtp=True, repo_id="t/vl"), "vl")
    assert ARCH.describe(model.config, model.tensors)["head_expert_layout"] == "fused"
    [bf16] = convert(model, ARCH, "embedded", name="VL", tools=toolchain, out_dir=tmp_path / "gguf")
    facts = read_facts(bf16.path, head_block=ARCH.head_gguf_block(model.config))
    assert facts.arch == "qwen35moe" and facts.nextn_layers == 1
    assert {"blk.8.ffn_gate_exps.weight", "blk.8.ffn_up_exps.weight", "blk.8.ffn_down_exps.weight",
            "blk.8.ffn_gate_inp.weight", "blk.8.ffn_gate_inp_shexp.weight"} <= set(facts.head_block_tensors)
    result = smoke(bf16, None, SmokeSpec(n_predict=32, draft_n_max=2), toolchain)
    assert result.tokens_identical and result.accepted > 0


@pytest.mark.parametrize("architectures, reason, arch", [
    (("Qwen3_5MoeForConditionalGeneration",), "eligible", "qwen35moe"),
    (("Qwen3MoeForCausalLM",), "unsupported_architecture", None),  # Qwen3-MoE: no MTP head to restore
])
def test_the_watcher_finds_moe_finetunes_of_a_watched_moe_base(architectures, reason, arch):
    from mtpress.watch import Candidate, CandidateInfo, WatchPolicy, decide

    base = "Qwen/Qwen3.6-35B-A3B"
    policy = WatchPolicy.model_validate({"bases": [{"repo": base}], "licenses": ["apache-2.0"],
                                         "target_namespace": "mtpress-bot"})
    info = CandidateInfo(Candidate("alice/MoE-FT", base, base, "finetune", ()), revision="a" * 40,
                         donor_revision="b" * 40, licenses=("apache-2.0",), architectures=architectures,
                         weights=None, head_tensors=(), target_exists=False, error=None)
    decision = decide(info, policy)
    assert decision.reason.value == reason, decision
    assert (decision.release.arch if decision.release else None) == arch
    if arch:
        assert "Qwen3.5-MoE" in decision.detail and decision.release.donor.repo == base


def test_the_card_states_experts_and_active_parameters_only_for_moe(tmp_path):
    from tests.test_card import SAMPLE, card_of

    manifest = json.loads(SAMPLE.read_text(encoding="utf-8"))
    dense = card_of(manifest).files
    model = small_model(tmp_path / "m")
    manifest["architecture"] = ARCH.describe(model.config, model.tensors)
    moe = card_of(manifest).files
    active = f"{manifest['architecture']['parameters_active']:,}"
    assert "| Mixture of experts | 4 routed experts, 2 per token" in moe["README.md"] and active in moe["README.md"]
    assert "| 混合专家 | 4 个路由专家" in moe["README_zh.md"] and active in moe["README_zh.md"]
    assert "Mixture of experts" not in dense["README.md"] and "Active per token" not in dense["README.md"]
    assert "| Hidden size / MLP size |" in dense["README.md"]


@pytest.mark.parametrize("extra, problem", [({"mlx": {}}, "MTPLX has no runtime for the qwen35moe"),
                                            ({"head": {"source": "best"}}, "cannot re-align a qwen35moe head")])
def test_check_config_refuses_what_moe_does_not_support(extra, problem):
    """Refused at validation, before any download, not after the hidden states were collected."""
    from mtpress.errors import ConfigError
    from mtpress.schema import load_release_config

    config = {"name": "M", "arch": "qwen35moe", "finetune": {"repo": "a/b"}, "donor": {"repo": "a/c"},
              "target": {"repo": "me/M-GGUF"}} | extra
    load_release_config(config | {"mlx": None, "head": {"source": "copy"}})
    with pytest.raises(ConfigError, match=problem):
        load_release_config(config)
