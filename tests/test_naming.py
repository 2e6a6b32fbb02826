"""Every name a release gives, from the one module that holds the rules, byte for byte as releases have them."""

from __future__ import annotations

import json
from pathlib import Path

from mtpress.manifest import Manifest
from mtpress.naming import (
    artifact_key,
    default_mlx_repo,
    gguf_name,
    gguf_repo,
    head_name,
    is_head,
    layout_dir,
    layout_folder,
    mlx_folder,
    mlx_release_name,
    pair_trunks_with_heads,
    realign_repo,
    staging_repo,
    watched_release_name,
)
from mtpress.schema import Target
from mtpress.stages.gguf_files import GgufFile

SAMPLE = Path(__file__).parent / "data" / "manifest-sample.json"
NAME = "Tiny-Qwen3.5-Demo-FT-MTP"


def test_file_names_are_llama_cpp_s_hf_conventions():
    assert gguf_name(NAME, "Q4_K_M", "model") == "Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf"
    assert gguf_name(NAME, "Q4_K_M", "head") == "mtp-Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf"
    assert gguf_name(NAME, "BF16", "mmproj") == "mmproj-Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf"
    assert head_name(gguf_name(NAME, "Q8_0", "model")) == gguf_name(NAME, "Q8_0", "head")
    assert is_head("mtp-X-Q8_0.gguf") and not is_head("X-Q8_0.gguf") and not is_head("mmproj-X-BF16.gguf")


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
