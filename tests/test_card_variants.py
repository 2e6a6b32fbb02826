"""The card for the checkpoint variants of issue #10: mmproj, resized vocabulary, cast head, no head, own head."""

import copy
import json

import pytest

from mtpress.stages.card import render_card
from tests.test_card import SAMPLE, file_row, split_fences

MMPROJ = {"path": "mmproj-Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf", "name": "mmproj-Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf",
          "layout": "sidecar", "role": "mmproj", "quant": "BF16", "size": 1318944, "parameters": 659000,
          "sha256": "abcdef0123456789" * 4, "nextn_layers": 0, "block_count": 0, "tensor_count": 24,
          "head_tensor_types": []}


@pytest.fixture
def manifest() -> dict:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def render(manifest: dict) -> tuple[str, str]:
    files = render_card(manifest).files
    return files["README.md"], files["README_zh.md"]


def test_mmproj_is_listed_used_and_mtp_is_said_to_be_measured_on_text_only(manifest):
    manifest["files"].append(MMPROJ)
    manifest["architecture"] |= {"architectures": ["Qwen3_5ForConditionalGeneration"], "parameters_vision": 659000}
    for record in manifest["smoke"]:
        record |= {"mmproj": MMPROJ["name"], "image_tokens_identical": True, "image_drafted": 20,
                   "image_accepted": 11, "image_tokens": [1, 2]}
    en, zh = render(manifest)

    row = file_row(en, MMPROJ["path"])
    assert "vision projector (mmproj)" in row and "1.32 MB" in row and MMPROJ["sha256"][:12] in row
    assert "视觉投影器（mmproj）" in file_row(zh, MMPROJ["path"])
    assert f"{MMPROJ['sha256']}  {MMPROJ['path']}" in en
    _, blocks = split_fences(en)
    assert any(f"--mmproj {MMPROJ['path']}" in b and "/mtp-" in b for b in blocks), "sidecar with images"
    assert any(f"--mmproj {MMPROJ['path']}" in b and "-m embedded/" in b for b in blocks), "embedded with images"
    assert "measured on text only" in en and "只在纯文本上测得" in zh
    images = len(manifest["smoke"])
    assert f"identical with and without MTP for {images} of {images} files" in en
    assert f"drafted {20 * images} tokens after the image" in en
    assert "no `mmproj` file" not in en


def test_a_vision_tower_without_mmproj_is_said_to_be_left_out(manifest):
    manifest["architecture"]["parameters_vision"] = 659000
    en, _ = render(manifest)
    assert "there is no `mmproj` file" in en and "measured on text only" not in en


def test_resized_vocabulary_states_the_decision_and_both_sizes(manifest):
    manifest["inject"]["vocabulary"] = {
        "finetune_rows": 248400, "donor_rows": 248320, "embedding": "model.embed_tokens.weight",
        "output": "lm_head.weight", "tied": False, "decision": "accepted: the vocabulary was resized"}
    en, zh = render(manifest)
    assert "vocabulary was resized: 248,400 embedding rows against the donor's 248,320" in en
    assert "`model.embed_tokens.weight`" in en and "`lm_head.weight`" in en and "accepted it" in en
    assert "248,400" in zh and "248,320" in zh


@pytest.mark.parametrize("cast, says", [("lossy", "a lossy cast"), ("exact", "without loss")])
def test_a_cast_head_says_whether_it_was_lossy(manifest, cast, says):
    manifest["inject"]["head"] |= {"source_dtype": "F32", "dtype": "BF16", "cast": cast}
    en, zh = render(manifest)
    assert says in en and "`F32`" in en
    assert ("有损" in zh) == (cast == "lossy")


def test_own_head_passthrough_says_the_head_is_its_own(manifest):
    manifest["inject"] = {"action": "passthrough", "reason": "already carries its own MTP head", "head": None}
    manifest["inputs"]["donor"] = None
    manifest["config"]["donor"] = None
    en, zh = render(manifest)
    assert "The MTP head is the fine-tune's own head" in en and "no donor was needed" in en
    assert "MTP 头是微调模型自带的" in zh


def test_no_head_release_offers_no_mtp_usage(manifest):
    manifest = copy.deepcopy(manifest)
    manifest["inject"] = {"action": "no-head", "head": None, "bytes_written": 2000,
                          "reason": "released without a head (converted with --no-mtp)"}
    manifest["inputs"]["donor"] = None
    manifest["config"]["donor"] = None
    manifest["files"] = [f | {"nextn_layers": 0, "head_tensor_types": []} for f in manifest["files"]
                         if f["role"] == "model" and f["layout"] == "sidecar"]
    manifest["smoke"] = [s | {"head": None, "draft_n_max": 0, "tokens_identical": None, "drafted": 0, "accepted": 0,
                              "acceptance": None, "tokens_per_second_mtp": None}
                         for s in manifest["smoke"] if s["layout"] == "sidecar"]
    en, zh = render(manifest)
    _, blocks = split_fences(en)
    usage = en.split("## Usage", 1)[1].split("## Results", 1)[0]
    assert "draft-mtp" not in "\n".join(blocks) and "draft-mtp" not in usage
    assert "**without** a multi-token-prediction (MTP) head" in en and "**不带**" in zh
    assert "`--no-mtp`" in en and "llama.cpp issue #26916" in en and "`mtp_num_hidden_layers: 0`" in en
    assert "nothing ran with MTP" in en and "draft-mtp was slower" not in en
