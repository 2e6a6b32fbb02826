"""The MTPLX pack: head key names, dtype and norm convention, the contract's honesty, refusal of a
checkpoint without a head, and a real export of the tiny demo model run in MLX, MTPLX and llama.cpp."""

import json

import numpy as np
import pytest

from mtpress.archs import get_arch
from mtpress.checkpoint import ModelDir
from mtpress.errors import MissingMtpHeadError, QualityGateError
from mtpress.naming import default_mlx_repo
from mtpress.safetensors_io import bf16_bytes_to_f32, f32_to_bf16_bytes, read_header, read_tensor_bytes
from mtpress.schema import MlxSpec
from mtpress.stages.export_mlx import (
    CONTRACT_FILE,
    HEAD_FILE,
    UNVERIFIED,
    check_mlx,
    export_mlx,
    head_tensor_names,
    runtime_contract,
    verification_level,
    verified_contract,
    write_head,
)

# MTPLX 2.12.2's EXPECTED_MTP_KEYS (mtplx/constants.py): the sidecar its inspection and loader accept.
MTPLX_HEAD_KEYS = {
    "mtp.fc.weight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
    *(f"mtp.layers.0.{k}.weight" for k in (
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}
NORM_GAINS = {k for k in MTPLX_HEAD_KEYS if "norm" in k}

# What `mtplx forge verify --stamp` writes on an Apple Silicon Mac (commands/forge.py _stamp_runtime_metadata).
STAMPED_ON_A_MAC = {
    "mtplx_version": "2.12.2", "arch_id": "qwen3-next-mtp", "mtp_depth_max": 3, "recommended_profile": "turbo",
    "exactness_baseline": {},
    "verified_on": {"timestamp": "2026-11-23T05:00:00+00:00", "hardware": "macOS-15.1-arm64-arm-64bit",
                    "machine_arch": "arm64", "macos": "15.1", "model": "Tiny-MTPLX"},
    "verification": {"mode": "full-load", "status": "verified", "full_load_verified": True},
    "speed_evidence": {"verdict": "mtp_depth_wins", "depth": 2, "forge_verify_rows": [
        {"depth": 0, "tok_s": 41.0}, {"depth": 1, "tok_s": 55.2, "acceptance_by_position": [0.81]},
        {"depth": 2, "tok_s": 60.3, "acceptance_by_position": [0.8, 0.66]}]},
}


@pytest.fixture(scope="session")
def mlx_tools():
    """The pinned MLX environment; `mtpress toolchain build` (make test) installs it before pytest starts."""
    from mtpress.toolchain.mlx import resolve_mlx_tools

    return resolve_mlx_tools(build=False)


def test_head_keys_dtype_and_norm_convention(demo_pair, tmp_path):
    base = ModelDir(demo_pair[0], "base")
    names = head_tensor_names(base, get_arch("qwen35"))
    out = tmp_path / HEAD_FILE
    params, size = write_head(base, names, out, "bf16")

    written, _ = read_header(out)
    assert set(written) == MTPLX_HEAD_KEYS
    assert {t.dtype for t in written.values()} == {"BF16"}
    assert params == sum(base.tensors[n].n_elements for n in names) and size == out.stat().st_size
    for name, info in written.items():
        source = read_tensor_bytes(base.shard_of(name), base.tensors[name])
        stored = read_tensor_bytes(out, info)
        if name in NORM_GAINS:
            gain = bf16_bytes_to_f32(source, info.shape)
            # HF stores x·(1+w) gains zero-centred; MLX's RMSNorm multiplies by the stored value.
            assert stored == f32_to_bf16_bytes(gain + 1.0), name
            assert abs(float(bf16_bytes_to_f32(stored, info.shape).mean()) - float(gain.mean()) - 1.0) < 1e-2
        else:
            assert stored == source, f"{name} must be copied bit for bit"


def test_fp16_head(demo_pair, tmp_path):
    base = ModelDir(demo_pair[0], "base")
    out = tmp_path / HEAD_FILE
    write_head(base, head_tensor_names(base, get_arch("qwen35")), out, "fp16")
    written, _ = read_header(out)
    assert {t.dtype for t in written.values()} == {"F16"}
    info = written["mtp.norm.weight"]
    source = bf16_bytes_to_f32(read_tensor_bytes(base.shard_of("mtp.norm.weight"), base.tensors["mtp.norm.weight"]),
                               info.shape)
    stored = np.frombuffer(read_tensor_bytes(out, info), dtype=np.float16).astype(np.float32)
    np.testing.assert_allclose(stored, source + 1.0, atol=1e-3)


def test_refuses_a_checkpoint_without_head(demo_pair, tmp_path, mlx_tools):
    finetune = ModelDir(demo_pair[1], "fine-tune")
    with pytest.raises(MissingMtpHeadError, match="MTP head is missing 15 of 15 tensors") as error:
        export_mlx(finetune, get_arch("qwen35"), MlxSpec(), tools=mlx_tools, out_dir=tmp_path / "pack")
    assert "donor" in str(error.value)
    assert not (tmp_path / "pack").exists()


def test_contract_is_unverified_without_a_verification_record():
    contract = runtime_contract("qwen3-next-mtp", 3, head_format="bf16")
    # The fields MTPLX's registry reads: a status starting with "unverified" marks the pack unverified.
    assert contract["exactness_baseline"]["status"].startswith("unverified")
    assert contract["verified_on"] == {}
    assert contract["verification"] == {"status": "unverified", "level": UNVERIFIED, "full_load_verified": False}
    assert verification_level(contract) == UNVERIFIED


@pytest.mark.parametrize("forged", [
    {"verified_on": {"timestamp": "2026-11-23T05:00:00", "machine_arch": "x86_64", "macos": "",
                     "hardware": "Linux-6.8-x86_64"}},  # what a Linux run would stamp
    {"verification": {"status": "verified", "full_load_verified": False}},
    {"speed_evidence": {}},
    {"speed_evidence": {"forge_verify_rows": [{"depth": 0, "tok_s": 41.0}]}},  # autoregressive only
    {"verified_on": {}},
])
def test_a_contract_claims_verified_only_from_a_real_record(forged):
    record = {**STAMPED_ON_A_MAC, **forged}
    with pytest.raises(QualityGateError, match="not a record of MTPLX's forge verification on Apple Silicon"):
        runtime_contract("qwen3-next-mtp", 3, head_format="bf16", verification=record)
    assert verification_level(record) == UNVERIFIED


def test_a_real_record_is_accepted():
    assert verified_contract(STAMPED_ON_A_MAC) == STAMPED_ON_A_MAC
    assert verification_level(STAMPED_ON_A_MAC).startswith("verified on Apple Silicon (macOS-15.1-arm64")


def test_default_repo():
    assert default_mlx_repo("me/Model-MTP-GGUF") == "me/Model-MTP-MTPLX"
    assert default_mlx_repo("me/Model") == "me/Model-MTPLX"


@pytest.fixture(scope="module")
def exported(demo_pair, demo_ggufs, toolchain, mlx_tools, tmp_path_factory):
    """The demo base exported once (4-bit body, bf16 head) and checked against llama.cpp's BF16 GGUF."""
    from mtpress.schema import SmokeSpec
    from mtpress.stages.smoke import generate, server_args

    base = ModelDir(demo_pair[0], "base")
    config_before = (base.path / "config.json").read_bytes()
    spec = MlxSpec(probe_per_domain=1, probe_max_prompt_tokens=8)
    out = tmp_path_factory.mktemp("mlx") / "Tiny-MTPLX"
    pack = export_mlx(base, get_arch("qwen35"), spec, tools=mlx_tools, out_dir=out)
    assert (base.path / "config.json").read_bytes() == config_before, "the source checkpoint must not be edited"
    smoke_spec = SmokeSpec(n_predict=12)
    bf16 = generate(toolchain, server_args(demo_ggufs[0], None, mtp=False, draft_n_max=1), smoke_spec)
    checks = check_mlx(pack, base, spec, mlx_tools, prompt=smoke_spec.prompt, n_predict=smoke_spec.n_predict,
                       reference_tokens=bf16.tokens, reference=demo_ggufs[0].name)
    return base, spec, pack, checks


def test_export_of_the_demo_model_is_an_mtplx_pack(exported):
    _, _, pack, _ = exported
    names = {f.name for f in pack.files}
    assert {HEAD_FILE, CONTRACT_FILE, "config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(p.name.endswith(".partial") or p.name.startswith(".mlx-") for p in pack.path.parent.iterdir())
    config = json.loads((pack.path / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["quantization"] == {"group_size": 64, "bits": 4,
                                                                            "mode": "affine"}
    assert config["mlx_lm_extra_tensors"] == {"mtp_file": HEAD_FILE}
    body, _ = read_header(pack.path / "model.safetensors")
    assert not any(k.startswith(("mtp.", "language_model.mtp.")) for k in body), "mlx-lm drops the head"
    assert set(read_header(pack.path / HEAD_FILE)[0]) == MTPLX_HEAD_KEYS
    assert pack.head_tensors == 15 and pack.verification == UNVERIFIED
    assert 4.0 < pack.bits_per_weight < 5.0
    contract = json.loads((pack.path / CONTRACT_FILE).read_text())
    assert verification_level(contract) == UNVERIFIED


def test_the_pack_runs_in_mlx_and_mtplx_and_means_the_same_model_as_llama_cpp(exported):
    _, _, _, checks = exported
    assert checks.load_generate_passed and len(checks.tokens) == 12
    assert checks.unquantized_match_reference is True, "MLX and llama.cpp must read the same model"
    assert 0 <= checks.pack_tokens_matching_reference <= 12
    assert checks.inspect_passed and checks.inspect["tensor_count"] == 15 and checks.inspect["unverified_model"]
    assert checks.runtime_smoke_passed and checks.runtime_smoke["mtp_logits_shape"] == [1, 1, 248320]
    assert checks.probe_prompts == 5 and len(checks.probe_variants) == 4
    assert 0.0 <= checks.probe_agreement <= 1.0


def test_pack_card_publish_and_apple_silicon_verification(exported, local_hub):
    from huggingface_hub import ModelCard

    from flows.mlx_pack import write_pack_documents
    from mtpress.hub.client import hub_api
    from mtpress.schema import Target
    from mtpress.stages.mlx_card import record_verification
    from mtpress.stages.publish import publish

    base, spec, pack, checks = exported
    repo = "me/Tiny-MTP-MTPLX"
    facts = write_pack_documents(pack.path, pack, checks, release="Tiny", repo=repo, gguf_repo="me/Tiny-MTP-GGUF",
                                 license=None, spec=spec, tools={"mlx": "0.32.4", "mlx_lm": "0.32.2",
                                                                 "mtplx": "2.12.2"},
                                 inputs={"finetune": {"repo": "me/Tiny", "label": "me/Tiny@main",
                                                      "revision": "a" * 40, "license": "apache-2.0", "files": {}}},
                                 seconds={})
    assert facts["verification"] == UNVERIFIED and facts["head_dtype"] == "bf16" and facts["bits"] == 4
    readme = (pack.path / "README.md").read_text()
    matter = ModelCard(readme).data.to_dict()
    assert matter["base_model"] == "me/Tiny" and matter["base_model_relation"] == "quantized"
    assert {"mlx", "mtplx", "mtp"} <= set(matter["tags"]) and matter["library_name"] == "mlx"
    assert "**unverified on Apple Silicon**" in readme and "not run: needs Apple Silicon" in readme
    assert "未运行：需要 Apple Silicon" in (pack.path / "README_zh.md").read_text()

    result = publish(pack.path, Target(repo=repo), hub_api(), message="pack")
    assert result.committed
    assert {"mtp.safetensors", "mtplx_runtime.json", "manifest.json", "README.md"} <= set(
        hub_api().list_repo_files(repo))

    contract = pack.path / CONTRACT_FILE
    unverified = contract.read_text()
    linux = {**STAMPED_ON_A_MAC, "verified_on": {**STAMPED_ON_A_MAC["verified_on"], "macos": "",
                                                 "machine_arch": "x86_64"}}
    contract.write_text(json.dumps(linux))
    with pytest.raises(QualityGateError):
        record_verification(pack.path)
    assert (pack.path / "README.md").read_text() == readme, "a refused record changes nothing"
    contract.write_text(json.dumps(STAMPED_ON_A_MAC))
    try:
        level = record_verification(pack.path)
        verified_readme = (pack.path / "README.md").read_text()
    finally:
        contract.write_text(unverified)
    assert level.startswith("verified on Apple Silicon")
    assert "unverified on Apple Silicon" not in verified_readme and "| 2 | 60.3 | 0.8, 0.66 |" in verified_readme


def test_the_release_workflow_verifies_the_pack_on_apple_silicon(tmp_path):
    """The macOS job finds the pack's repo from the config and hands MTPLX's record to a real command."""
    import os
    import subprocess
    from pathlib import Path

    import yaml
    from typer.main import get_command

    from mtpress.cli import app

    root = Path(__file__).resolve().parent.parent
    job = yaml.safe_load((root / ".github/workflows/release.yml").read_text())["jobs"]["verify-mtplx"]
    assert job["runs-on"].startswith("macos") and job["needs"] == ["publish", "publish-self-hosted"]
    steps = {s.get("name"): s for s in job["steps"]}
    output = tmp_path / "github_output"
    subprocess.run(["bash", "-e", "-c", steps["Find the pack's repo"]["run"]], cwd=root, check=True,
                   env={**os.environ, "CONFIG": "demo.yaml", "GITHUB_OUTPUT": str(output)})
    assert output.read_text() == "repo=mtpress-demo/Tiny-Qwen3.5-Demo-FT-MTP-MTPLX\n"
    assert "mtplx forge verify pack" in steps["MTPLX forge verification"]["run"]
    assert "--stamp" in steps["MTPLX forge verification"]["run"]
    assert "HF_TOKEN" not in (steps["MTPLX forge verification"].get("env") or {})
    assert "mtplx-verified" in get_command(app).commands
    assert steps["Record the verification and publish it"]["run"].startswith(".venv/bin/mtpress mtplx-verified pack")
