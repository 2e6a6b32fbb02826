"""Every name a release gives, from the one module that holds the rules, byte for byte as releases have them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mtpress.errors import ConfigError, GateError
from mtpress.manifest import Manifest
from mtpress.naming import (
    NOT_A_MODEL,
    artifact_key,
    check_indexer_names,
    default_mlx_repo,
    file_stem,
    gguf_name,
    gguf_repo,
    head_name,
    is_head,
    is_model_name,
    layout_dir,
    layout_folder,
    mlx_folder,
    mlx_release_name,
    pair_trunks_with_heads,
    realign_repo,
    staging_repo,
    watched_release_name,
)
from mtpress.schema import Target, load_release_config
from mtpress.stage_keys import convert_key
from mtpress.stages.gate import pairings_from_names
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp

SAMPLE = Path(__file__).parent / "data" / "manifest-sample.json"
CONFIGS = Path(__file__).parent.parent / "model_configs"
NAME = "Tiny-Qwen3.5-Demo-FT-MTP"


def test_file_names_are_llama_cpp_s_hf_conventions():
    assert gguf_name(NAME, "Q4_K_M", "model") == "Tiny-Qwen3.5-Demo-FT-Q4_K_M.gguf"
    assert gguf_name(NAME, "Q4_K_M", "head") == "mtp-Tiny-Qwen3.5-Demo-FT-Q4_K_M.gguf"
    assert gguf_name(NAME, "BF16", "mmproj") == "mmproj-Tiny-Qwen3.5-Demo-FT-BF16.gguf"
    assert head_name(gguf_name(NAME, "Q8_0", "model")) == gguf_name(NAME, "Q8_0", "head")
    assert is_head("mtp-X-Q8_0.gguf") and not is_head("X-Q8_0.gguf") and not is_head("mmproj-X-BF16.gguf")


def test_file_names_drop_mtp_as_a_name_component_only():
    assert file_stem("Qwen3.5-9B-Code-MTP") == "Qwen3.5-9B-Code"
    assert file_stem("mtp-Qwen3.5-mTp-9B-MTP") == "Qwen3.5-9B"  # any case, anywhere: a leading one reads as a head
    assert file_stem("Tiny-Qwen3.5-Demo-FT-MTP-Realigned") == "Tiny-Qwen3.5-Demo-FT-Realigned"
    assert file_stem("Qwen3.5-MTPX-9B") == "Qwen3.5-MTPX-9B"  # not a component: kept, and the gate refuses it
    with pytest.raises(ConfigError, match="nothing but MTP"):
        file_stem("MTP")


def test_a_name_that_is_only_mtp_is_refused_by_check_config():
    with pytest.raises(ConfigError, match="nothing but MTP"):
        load_release_config({**yaml.safe_load((CONFIGS / "demo.yaml").read_text()), "name": "mtp-MTP"})


def test_two_releases_differing_only_by_mtp_never_share_a_file():
    """``X`` and ``X-MTP`` name their files alike; what holds files (repo, cache keys) is keyed by the full name."""
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    plain, mtp = (load_release_config({**raw, "name": name, "target": {"repo": gguf_repo("me", name)}})
                  for name in ("X", "X-MTP"))
    assert gguf_name(plain.name, "Q4_K_M", "model") == gguf_name(mtp.name, "Q4_K_M", "model")
    assert plain.target.repo != mtp.target.repo
    tools = LlamaCpp(source_dir=Path("s"), bin_dir=Path("b"), python=Path("p"), version="11434", origin="cache")
    assert convert_key("d", "sidecar", plain, tools) != convert_key("d", "sidecar", mtp, tools)


def release_files(config: Path) -> list[str]:
    """Every GGUF path a release publishes, with a vision projector at the root (the indexer's worst case)."""
    cfg = load_release_config(config)
    paths = [gguf_name(cfg.name, "BF16", "mmproj")]
    for layout in cfg.layouts:
        folder = layout_folder(layout, cfg.layouts)
        roles = ("model", "head") if layout == "sidecar" else ("model",)
        paths += [f"{folder}/{gguf_name(cfg.name, q, r)}".lstrip("/") for q in ("BF16", *cfg.quants) for r in roles]
    return paths


def hf_pick(paths: list[str], tag: str) -> list[str]:
    """llama.cpp's `-hf repo:TAG` (common/download.cpp): a root `.gguf` whose name carries `-TAG.`, no sibling."""
    return [p for p in paths if "/" not in p and f"-{tag}." in p and not any(w in p for w in NOT_A_MODEL)]


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("demo*.yaml")), ids=lambda p: p.stem)
def test_every_demo_release_is_read_right_by_the_hub_and_by_hf(config):
    paths = release_files(config)
    assert not [p for p in paths if is_model_name(p) and "mtp" in p.lower()]
    check_indexer_names(paths)
    cfg = load_release_config(config)
    pairings = {p.tag: p for p in pairings_from_names(paths)}
    for quant in ("BF16", *cfg.quants):
        trunk = gguf_name(cfg.name, quant, "model")
        assert hf_pick(paths, quant) == [trunk]  # exactly the trunk, never a head or the projector
        if cfg.layouts[0] == "sidecar":
            assert pairings[quant].head == head_name(trunk) == gguf_name(cfg.name, quant, "head") and pairings[
                quant].head in paths


def test_the_gate_refuses_model_files_named_mtp_beside_a_projector():
    """The names releases had before: huggingface.js #2400's reproduction, the model page shows `clip`."""
    old = ["Tiny-Qwen3.5-VL-Demo-FT-MTP-Q4_K_M.gguf", "mtp-Tiny-Qwen3.5-VL-Demo-FT-MTP-Q4_K_M.gguf",
           "mmproj-Tiny-Qwen3.5-VL-Demo-FT-MTP-BF16.gguf", "embedded/Tiny-Qwen3.5-VL-Demo-FT-MTP-Q4_K_M.gguf"]
    with pytest.raises(GateError, match=r"show mmproj-Tiny-Qwen3.5-VL-Demo-FT-MTP-BF16.gguf .* as the model: model "
                                        r"files named with MTP beside it: Tiny-Qwen3.5-VL-Demo-FT-MTP-Q4_K_M.gguf\n"):
        check_indexer_names(old)
    with pytest.raises(GateError, match="Qwen3.5-MTPX-9B-Q4_K_M.gguf"):  # not stripped by the naming rule
        check_indexer_names(["Qwen3.5-MTPX-9B-Q4_K_M.gguf", "mmproj-Qwen3.5-MTPX-9B-BF16.gguf"])
    check_indexer_names(old[:2] + old[3:])  # without a projector the indexer reads MTP-named files right


def test_the_first_layout_sits_at_the_root_and_the_others_in_their_folder(tmp_path):
    assert layout_folder("sidecar", ("sidecar", "embedded")) == ""
    assert layout_folder("embedded", ("sidecar", "embedded")) == "embedded"
    assert layout_dir(tmp_path, "sidecar", ("sidecar", "embedded")) == tmp_path
    assert layout_dir(tmp_path, "embedded", ("sidecar", "embedded")) == tmp_path / "embedded"
    assert layout_dir(tmp_path, "sidecar", ("embedded", "sidecar")) == tmp_path / "sidecar"


def test_derived_repos_and_folders(tmp_path):
    assert staging_repo("me/X-GGUF") == "me/X-GGUF-staging" and realign_repo("me/X-GGUF") == "me/X-GGUF-realign"
    target = Target(repo="me/X-GGUF")
    assert (target.staging.repo, target.realign.repo) == ("me/X-GGUF-staging", "me/X-GGUF-realign")
    assert default_mlx_repo("me/Model-MTP-GGUF") == "me/Model-MTP-MTPLX"
    assert default_mlx_repo("me/Model") == "me/Model-MTPLX"
    assert mlx_release_name(NAME) == "Tiny-Qwen3.5-Demo-FT-MTP-MTPLX"
    assert mlx_folder(tmp_path / "release") == tmp_path / "release-MTPLX"
    assert watched_release_name("someone/Qwen3.5-9B-Code") == "Qwen3.5-9B-Code-MTP"
    assert gguf_repo("me", "Qwen3.5-9B-Code-MTP") == "me/Qwen3.5-9B-Code-MTP-GGUF"


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("Tiny-Qwen3.5-Demo-FT-MTP", "mtplx-repo") == "tiny-qwen3-5-demo-ft-mtp-mtplx-repo"
    assert artifact_key("A_B.c", "files") == "a-b-c-files"


def gguf(layout: str, role: str, quant: str) -> GgufFile:
    return GgufFile(path=Path(f"{layout}/{gguf_name(NAME, quant, role)}"), name=gguf_name(NAME, quant, role),
                    layout=layout, role=role, quant=quant, size=1, sha256="0" * 64, nextn_layers=0, block_count=8,
                    tensor_count=1, parameters=1, head_tensor_types=())


def test_a_trunk_pairs_with_the_head_of_its_layout_and_quant_only():
    files = [gguf("sidecar", "model", "Q8_0"), gguf("sidecar", "head", "Q4_K_M"), gguf("sidecar", "model", "Q4_K_M"),
             gguf("embedded", "model", "Q4_K_M"), gguf("sidecar", "mmproj", "BF16"), gguf("sidecar", "head", "Q8_0")]
    pairs = [(trunk.layout, trunk.quant, head and head.name) for trunk, head in pair_trunks_with_heads(files)]
    assert pairs == [("sidecar", "Q8_0", gguf_name(NAME, "Q8_0", "head")),
                     ("sidecar", "Q4_K_M", gguf_name(NAME, "Q4_K_M", "head")),
                     ("embedded", "Q4_K_M", None)]  # an embedded trunk carries its own head
    # A head of another quant is never taken: without its own head the trunk is unpaired.
    assert pair_trunks_with_heads(files[:1] + files[1:2])[0][1] is None


def test_the_manifest_s_files_pair_by_the_same_rule():
    """The flow (GgufFile), the gate (the typed manifest) and the card (its JSON rows) pair by this one rule."""
    manifest = Manifest.model_validate_json(SAMPLE.read_bytes())
    typed = [(t.path, h and h.path) for t, h in pair_trunks_with_heads(manifest.files)]
    rows = json.loads(SAMPLE.read_text())["files"]
    as_rows = [(t["path"], h and h["path"]) for t, h in pair_trunks_with_heads(
        rows, lambda f: (f["role"], f["layout"], f["quant"]))]
    assert typed == as_rows and ("sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf",
                                 "sidecar/mtp-Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf") in typed
    assert ("embedded/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf", None) in typed
