"""The card for the checkpoint variants of issue #10: mmproj, resized vocabulary, cast head, no head, own head."""

import copy
import json

import pytest

from mtpress.manifest import jsonable
from tests.fixtures import ARCH, make_checkpoint
from tests.test_card import SAMPLE, card_of, file_row, split_fences

MMPROJ = {"path": "mmproj-Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf", "name": "mmproj-Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf",
          "layout": "sidecar", "role": "mmproj", "quant": "BF16", "size": 1318944, "parameters": 659000,
          "sha256": "abcdef0123456789" * 4, "nextn_layers": 0, "block_count": 0, "tensor_count": 24,
          "head_tensor_types": []}


@pytest.fixture
def manifest() -> dict:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def render(manifest: dict) -> tuple[str, str]:
    files = card_of(manifest).files
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
    manifest["inject"] = {"action": "passthrough", "reason": "already carries its own MTP head", "head": None,
                          "bytes_written": 0}
    manifest["inputs"]["donor"] = None
    manifest["config"]["donor"] = None
    en, zh = render(manifest)
    assert "The MTP head is the fine-tune's own head" in en and "no donor was needed" in en
    assert "MTP 头是微调模型自带的" in zh


def no_head(manifest: dict) -> dict:
    """A release of a fine-tune that lost its head, with no donor: what the publish flow records for it."""
    manifest = copy.deepcopy(manifest)
    manifest["inject"] = {"action": "no-head", "head": None, "bytes_written": 2000,
                          "reason": "released without a head (converted with --no-mtp)"}
    manifest["inputs"]["donor"] = None
    manifest["inputs"]["finetune"]["mtp_layers"] = 1  # the fine-tune's own config
    manifest["config"]["donor"] = None
    # Described from the config copy the release was converted from, which claims no MTP layer.
    manifest["architecture"] |= {"mtp_layers": 0, "parameters_head": 0}
    manifest["files"] = [f | {"nextn_layers": 0, "head_tensor_types": []} for f in manifest["files"]
                         if f["role"] == "model" and f["layout"] == "sidecar"]
    manifest["smoke"] = [s | {"head": None, "draft_n_max": 0, "tokens_identical": None, "drafted": 0, "accepted": 0,
                              "acceptance": None, "tokens_per_second_mtp": None}
                         for s in manifest["smoke"] if s["layout"] == "sidecar"]
    return manifest


def test_no_head_release_offers_no_mtp_usage(manifest):
    en, zh = render(no_head(manifest))
    _, blocks = split_fences(en)
    usage = en.split("## Usage", 1)[1].split("## Results", 1)[0]
    assert "draft-mtp" not in "\n".join(blocks) and "draft-mtp" not in usage
    assert "**without** a multi-token-prediction (MTP) head" in en and "**不带**" in zh
    assert "`--no-mtp`" in en and "llama.cpp issue #26916" in en and "`mtp_num_hidden_layers: 0`" in en
    assert "nothing ran with MTP" in en and "draft-mtp was slower" not in en


def test_no_head_release_says_so_everywhere(manifest):
    card = card_of(no_head(manifest))
    en, zh = card.files["README.md"], card.files["README_zh.md"]
    assert "mtp" not in card.front_matter["tags"] and "speculative-decoding" not in card.front_matter["tags"]
    for text in (en, zh):
        assert "mtp-" not in text, "no `mtp-` head file is described"
    # The fine-tune's config declared one MTP layer; the files have none (the copy they came from says 0).
    assert "although its config still declares 1 MTP layer(s)" in en and "仍声明了 1 个 MTP 层" in zh
    assert "| MTP layers | 0 in these files (the fine-tune's config declares 1; its weights hold none) |" in en
    assert "| MTP 层数 | 0（指这些文件；微调模型的配置声明了 1 个，但权重里没有） |" in zh
    trunk = "sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf"
    assert "| model (no MTP head) |" in file_row(en, trunk) and "| 模型（不含 MTP 头） |" in file_row(zh, trunk)
    assert "ordinary GGUFs without an MTP layer, in `sidecar/`" in en and "sidecar trunk" not in en
    assert "These files have none, so these apps load them as they are" in en
    assert f"hf download mtpress-demo/Tiny-Qwen3.5-Demo-FT-MTP-GGUF {trunk} --local-dir ." in en
    assert "- Conversion, smoke test and this card: mtpress." in en and "恢复 MTP 头" not in zh


def test_an_unused_donor_is_not_credited(manifest):
    """A fine-tune that kept its own head: the configured donor gave nothing, so the card names it nowhere
    (a manifest may still list it under inputs, as one written before the flow dropped unused donors did)."""
    manifest["inject"] = {"action": "passthrough", "reason": "already carries its own MTP head", "head": None,
                          "bytes_written": 0}
    card = card_of(manifest)
    donor = manifest["inputs"]["donor"]["repo"]
    for text in card.files.values():
        assert donor not in text.split("<summary>Release config</summary>")[0].split("<summary>发布配置</summary>")[0]
        assert "MTP head donor" not in text and "trained by the authors" not in text and "供体模型 |" not in text
    assert card.front_matter["base_model"] == manifest["inputs"]["finetune"]["repo"]


def test_the_flow_records_no_unused_donor_and_names_local_folders_without_their_paths(tmp_path):
    """The manifest records of the publish flow, built without running it, from real local checkpoints: the
    fine-tune and donor are named by folder name and content digest; no path of this machine reaches the manifest
    or either card; a fine-tune that kept its own head records no donor."""
    from flows.record import _config_label, _config_record, input_records
    from mtpress.fsutil import dir_digest
    from mtpress.schema import load_release_config
    from mtpress.stages.download import fetch
    from mtpress.stages.inject import inject

    private = tmp_path / "home" / "alice" / "models"
    make_checkpoint(private / "My-FT", with_head=False, seed=1)
    make_checkpoint(private / "My-Base", with_head=True, seed=2)
    make_checkpoint(private / "My-Own-Head-FT", with_head=True, seed=3)
    (private / "prompts.jsonl").write_text('{"id": "a", "domain": "code", "prompt": "def f():"}\n')
    config_file = private / "release.yaml"
    config_file.write_text("name: My-FT-MTP\narch: qwen35\nfinetune: {path: My-FT}\ndonor: {path: My-Base}\n"
                           "target: {repo: me/My-FT-MTP-GGUF}\nbench: {prompts: prompts.jsonl}\n")
    cfg = load_release_config(config_file)
    assert cfg.finetune.path == private / "My-FT", "the config resolves local paths to absolute ones"
    finetune, donor = fetch(cfg.finetune, tmp_path / "cache"), fetch(cfg.donor, tmp_path / "cache")
    injected = inject(finetune, donor, ARCH, tmp_path / "work" / "injected")

    manifest = json.loads(SAMPLE.read_text(encoding="utf-8"))
    manifest |= jsonable({
        "config_file": _config_label(config_file), "config": _config_record(cfg),
        "inputs": input_records(cfg, ARCH, finetune, donor, injected),
        "inject": {"action": injected.action, "reason": injected.reason, "head": injected.head,
                   "bytes_written": injected.bytes_written, "vocabulary": injected.vocabulary}})
    card = card_of(manifest)
    published = json.dumps(manifest, ensure_ascii=False) + "".join(card.files.values())
    assert str(tmp_path) not in published and "alice" not in published

    inputs = manifest["inputs"]
    assert (inputs["finetune"]["label"], inputs["donor"]["label"]) == ("My-FT", "My-Base")
    assert inputs["finetune"]["digest"] == dir_digest(private / "My-FT")
    assert inputs["finetune"]["mtp_layers"] == 1 and manifest["config"]["finetune"]["path"] == "My-FT"
    assert manifest["config"]["bench"]["prompts"] == "prompts.jsonl" and manifest["config_file"] == "release.yaml"
    assert "MTP head copied from My-Base" in manifest["inject"]["reason"]
    en, zh = card.files["README.md"], card.files["README_zh.md"]
    digest = inputs["finetune"]["digest"][:12]
    assert f"| Fine-tune | My-FT (a local folder) | content digest `{digest}` |" in en
    assert f"| 微调模型 | My-FT（本地文件夹） | 内容摘要 `{digest}` |" in zh
    assert "- MTP head: trained by the authors of My-Base." in en and "- MTP 头：由 My-Base 的作者训练。" in zh
    assert "GGUF files of My-FT for llama.cpp" in en

    own = fetch(cfg.finetune.model_copy(update={"path": private / "My-Own-Head-FT"}), tmp_path / "cache")
    kept = inject(own, donor, ARCH, tmp_path / "work" / "own")
    assert kept.action == "passthrough" and input_records(cfg, ARCH, own, donor, kept)["donor"] is None


def test_the_mtplx_card_names_a_local_fine_tune_by_folder_and_digest():
    from mtpress.manifest import PackManifest
    from mtpress.stages.mlx_card import render_mlx_card

    pack = {"bits": 4, "bits_per_weight": 4.5, "body_bytes": 10**8, "group_size": 64, "head_bytes": 2 * 10**6,
            "head_dtype": "bf16", "head_parameters": 10**6, "head_tensors": 15, "norm_offset": 1.0,
            "arch_id": "qwen3-next-mtp", "mtp_depth_max": 1, "total_bytes": 102 * 10**6, "verification": "unverified"}
    checks = {"load_generate_passed": True, "tokens": [1, 2, 3], "match_tokens": 3, "reference": "BF16",
              "unquantized_match_reference": True, "unquantized_tokens_matching_reference": 3,
              "pack_tokens_matching_reference": 2, "inspect_passed": True, "runtime_smoke_passed": True,
              "probe_agreement": 0.5, "probe_max_prompt_tokens": 16, "probe_prompts": 2, "probe_variants": []}
    digest = "ab" * 32
    card = render_mlx_card(PackManifest.model_validate({
        "release": "My-FT-MTPLX", "repo": "me/My-FT-MTPLX", "gguf_repo": "me/My-FT-GGUF",
        "config": {"target": {"license": None}}, "mlx_tools": {"mlx": "0.32.4", "mlx_lm": "0.32.2", "mtplx": "2.12.2"},
        "hardware": {"cpu": "x86_64", "cores": 2, "gpu": None, "os": "Linux"},
        "pack": pack, "checks": checks, "unverified_level": "unverified", "verification": None, "stage_seconds": {},
        # A manifest of an older mtpress: the local fine-tune's label was its full path.
        "inputs": {"finetune": {"label": "/home/alice/models/My-FT", "repo": None, "revision": None, "digest": digest,
                                "license": None, "files": {}},
                   "donor": None}}))
    en, zh = card.files["README.md"], card.files["README_zh.md"]
    assert "- Body and head: My-FT (a local folder, content digest `abababababab`), prepared" in en
    assert "- 主体与头：My-FT（本地文件夹，内容摘要 `abababababab`），由 mtpress" in zh
    assert "alice" not in en + zh and "at not recorded" not in en and "head restored from" not in en
