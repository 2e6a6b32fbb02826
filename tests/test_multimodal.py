"""The multimodal layout real releases ship: generator, mmproj export, image smoke, a release without a head."""

import json
import struct
import zlib
from importlib import resources
from pathlib import Path

import pytest

from mtpress.archs import get_arch
from mtpress.checkpoint import ModelDir
from mtpress.demo.models import materialize
from mtpress.demo.multimodal import MultimodalSpec, demo_png, text_plans, vision_plans
from mtpress.hub.client import hub_api
from mtpress.stages.gguf_files import gguf_metadata
from tests.conftest import client_on_local_hub

ARCH = get_arch("qwen35")
DEMO_VL = Path(__file__).resolve().parent.parent / "model_configs" / "demo-vl.yaml"
TOKEN = "hf_" + "mtpressMultimodalTestToken0123456789"


@pytest.fixture(scope="session")
def vl_pair():
    """(base with head, fine-tune without) in the multimodal layout, generated once per machine."""
    from mtpress.demo.run import write_demo_pair
    from mtpress.fsutil import cache_root

    return write_demo_pair(cache_root() / "demo-models", base_repo="mtpress-demo/Tiny-Qwen3.5-VL-Demo-Base",
                           finetune_repo="mtpress-demo/Tiny-Qwen3.5-VL-Demo-FT", spec=MultimodalSpec())


def test_generator_writes_the_conditional_generation_layout(vl_pair):
    base, finetune = (ModelDir(p, p.name) for p in vl_pair)
    config = finetune.config
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"] and config["model_type"] == "qwen3_5"
    assert "hidden_size" not in config, "text keys are nested, as transformers writes them"
    assert config["text_config"]["hidden_size"] == config["vision_config"]["out_hidden_size"] == 256
    assert config["text_config"]["mtp_num_hidden_layers"] == 1, "the fine-tune's config still claims the head"
    assert config["vision_config"]["depth"] == 1 and config["vision_config"]["hidden_size"] == 64
    assert {"image_token_id", "vision_start_token_id", "tie_word_embeddings"} <= set(config)
    prefixes = ("model.language_model.", "model.visual.", "lm_head.", "mtp.")
    for model in (base, finetune):
        assert all(name.startswith(prefixes) for name in model.tensors)
        assert "model.visual.patch_embed.proj.weight" in model.tensors
        preprocessor = json.loads((model.path / "preprocessor_config.json").read_text())
        assert {"image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size"} <= set(preprocessor)
    assert len([n for n in base.tensors if n.startswith("mtp.")]) == 15
    assert not [n for n in finetune.tensors if n.startswith("mtp.")]
    assert base.tensors["model.visual.patch_embed.proj.weight"].shape == (64, 3, 2, 16, 16)
    assert ARCH.has_vision(config) and ARCH.describe(config, finetune.tensors)["parameters_vision"] > 0


def test_generator_is_byte_deterministic():
    spec = MultimodalSpec()
    for plan in vision_plans(spec) + [p for p in text_plans(spec, with_mtp=True) if p.name.startswith("mtp.")]:
        assert materialize(plan, spec.text).tobytes() == materialize(plan, spec.text).tobytes(), plan.name


def test_smoke_image_is_the_generated_png():
    png = demo_png()
    assert resources.files("mtpress").joinpath("data/smoke_image.png").read_bytes() == png
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(png):
        (length,), kind = struct.unpack(">I", png[at:at + 4]), png[at + 4:at + 8]
        data, crc = png[at + 8:at + 8 + length], struct.unpack(">I", png[at + 8 + length:at + 12 + length])[0]
        assert zlib.crc32(kind + data) == crc, kind
        chunks[kind] = data
        at += 12 + length
    assert struct.unpack(">IIBBBBB", chunks[b"IHDR"]) == (64, 64, 8, 2, 0, 0, 0)
    assert len(zlib.decompress(chunks[b"IDAT"])) == 64 * (1 + 64 * 3)


def test_stale_finetune_without_donor_converts_without_head_and_serves(tmp_path, toolchain, demo_pair):
    """The GGUF that fails to load (llama.cpp #26916) is never produced: --no-mtp and a reconciled config."""
    from mtpress.schema import SmokeSpec
    from mtpress.stages.convert import convert
    from mtpress.stages.inject import inject
    from mtpress.stages.smoke import smoke

    stale = ModelDir(demo_pair[1], "stale")
    assert ARCH.mtp_layers(stale.config) == 1 and not [n for n in stale.tensors if n.startswith("mtp.")]
    result = inject(stale, None, ARCH, tmp_path / "injected")
    assert result.action == "no-head"
    [trunk] = convert(result.model, ARCH, "embedded", name="T", tools=toolchain, out_dir=tmp_path / "out")
    assert trunk.role == "model" and trunk.nextn_layers == 0 and trunk.block_count == 8
    assert "qwen35.nextn_predict_layers" not in gguf_metadata(trunk.path, ("qwen35.nextn_predict_layers",))
    ran = smoke(trunk, None, SmokeSpec(n_predict=8), toolchain)
    assert ran.passed and len(ran.tokens) == 8 and ran.drafted == 0 and ran.tokens_identical is None


def test_mmproj_export_without_preprocessor_config_is_refused_before_converting(tmp_path, vl_pair, toolchain):
    from mtpress.errors import ModelError
    from mtpress.stages.convert import export_mmproj

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for entry in vl_pair[1].iterdir():
        if entry.name != "preprocessor_config.json":
            (incomplete / entry.name).symlink_to(entry)
    with pytest.raises(ModelError, match="no preprocessor_config.json") as err:
        export_mmproj(ModelDir(incomplete, "ft"), ARCH, "sidecar", name="T", tools=toolchain, out_dir=tmp_path / "out")
    assert "mmproj: false" in err.value.hint and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def vl_release(tmp_path_factory, toolchain, vl_pair, prefect_harness):
    """One run of the multimodal demo release against a local Hub."""
    from flows.publish import publish
    from mtpress.demo.run import seed_upstream_repos

    root = tmp_path_factory.mktemp("vl")
    with client_on_local_hub(root, TOKEN):
        seed_upstream_repos(DEMO_VL, MultimodalSpec())
        release_dir = Path(publish(str(DEMO_VL), str(root / "release")))
        yield {"dir": release_dir, "manifest": json.loads((release_dir / "manifest.json").read_text()),
               "api": hub_api()}


@pytest.mark.slow
def test_multimodal_release_has_trunks_heads_and_one_mmproj(vl_release):
    manifest, release_dir = vl_release["manifest"], vl_release["dir"]
    files = {f["path"]: f for f in manifest["files"]}
    name = "Tiny-Qwen3.5-VL-Demo-FT"  # the release is …-FT-MTP; file names never carry MTP (naming.file_stem)
    assert [p for p, f in files.items() if f["role"] == "mmproj"] == [f"mmproj-{name}-BF16.gguf"]
    for quant in ("BF16", "Q4_K_M"):
        assert files[f"{name}-{quant}.gguf"]["role"] == "model" and files[f"{name}-{quant}.gguf"]["nextn_layers"] == 0
        assert files[f"mtp-{name}-{quant}.gguf"]["role"] == "head"
    mmproj = release_dir / f"mmproj-{name}-BF16.gguf"
    found = gguf_metadata(mmproj, ("general.architecture", "clip.projector_type"))
    assert found == {"general.architecture": "clip", "clip.projector_type": "qwen3vl_merger"}
    assert manifest["inject"]["action"] == "injected" and manifest["architecture"]["parameters_vision"] > 0
    assert manifest["inject"]["head"]["cast"] == "none"
    vocabulary = manifest["inject"]["vocabulary"]
    assert vocabulary["finetune_rows"] == vocabulary["donor_rows"] == 248320
    assert vocabulary["embedding"] == "model.language_model.embed_tokens.weight"
    repo = vl_release["api"].list_repo_files(manifest["config"]["target"]["repo"])
    assert set(files) <= set(repo) and len([p for p in repo if "mmproj" in p]) == 1


@pytest.mark.slow
def test_multimodal_smoke_with_an_image_gives_identical_tokens_and_drafts(vl_release):
    smoke = vl_release["manifest"]["smoke"]
    assert len(smoke) == 2
    for result in smoke:
        assert result["mmproj"] == "mmproj-Tiny-Qwen3.5-VL-Demo-FT-BF16.gguf"
        assert result["passed"] and result["tokens_identical"] and result["drafted"] > 0, result
        assert result["image_tokens_identical"] and result["image_drafted"] > 0, result
        assert len(result["image_tokens"]) == result["n_predict"]


@pytest.mark.slow
def test_multimodal_card_lists_the_mmproj_and_says_mtp_was_measured_on_text(vl_release):
    card = (vl_release["dir"] / "README.md").read_text()
    card_zh = (vl_release["dir"] / "README_zh.md").read_text()
    record = next(f for f in vl_release["manifest"]["files"] if f["role"] == "mmproj")
    row = next(line for line in card.splitlines() if line.startswith("|") and f"`{record['path']}`" in line)
    assert "vision projector (mmproj)" in row and record["sha256"][:12] in row
    assert f"{record['sha256']}  {record['path']}" in card, "the full SHA-256 list includes it"
    assert "measured on text only" in card and "只在纯文本上测得" in card_zh
    assert f"--mmproj {record['path']}" in card and f"--mmproj {record['path']}" in card_zh
    assert "given a request carrying an image" in card
