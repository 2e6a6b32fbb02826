"""`mtpress demo`: the whole pipeline on the embedded default, offline.

It starts the local Hub endpoint (repos stored under ``releases/hub``), seeds it with a
generated tiny Qwen3.5 base (with its MTP head) and a fine-tune that lost the head, then
runs the publish flow on ``model_configs/demo.yaml``: download → inject → convert →
quantize → smoke → card → publish, back to the local endpoint. Then the same for the
multimodal layout real releases ship (``model_configs/demo-vl.yaml``: a vision tower, an
``mmproj-`` file, a smoke test with an image), published to its own repo.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_CONFIG = Path("model_configs/demo.yaml")
DEMO_VL_CONFIG = Path("model_configs/demo-vl.yaml")
DEMO_REALIGN_CONFIG = Path("model_configs/demo-realign.yaml")  # `mtpress demo --realign`
DEMO_MOE_CONFIG = Path("model_configs/demo-moe.yaml")  # `mtpress demo --moe`, then:
DEMO_MOE_VL_CONFIG = Path("model_configs/demo-moe-vl.yaml")


def run_demos(output: Path, *, hub_root: Path = Path("releases/hub")) -> list[Path]:
    """The text demo into ``output``, then the multimodal one into ``<output>-vl``."""
    from mtpress.demo.multimodal import MultimodalSpec

    return [run_demo(output, hub_root=hub_root),
            run_demo(output.with_name(output.name + "-vl"), hub_root=hub_root, config=DEMO_VL_CONFIG,
                     spec=MultimodalSpec())]


def run_moe_demos(output: Path, *, hub_root: Path = Path("releases/hub")) -> list[Path]:
    """The mixture-of-experts demos: text-only (per-expert weights) into ``<output>-moe``, then multimodal
    (fused expert weights) into ``<output>-moe-vl``."""
    from mtpress.demo.moe import MoeDemoSpec, MoeMultimodalSpec

    return [run_demo(output.with_name(output.name + "-moe"), hub_root=hub_root, config=DEMO_MOE_CONFIG,
                     spec=MoeDemoSpec()),
            run_demo(output.with_name(output.name + "-moe-vl"), hub_root=hub_root, config=DEMO_MOE_VL_CONFIG,
                     spec=MoeMultimodalSpec(text=MoeDemoSpec(expert_layout="fused")))]


def run_demo(output: Path, *, hub_root: Path = Path("releases/hub"), config: Path = DEMO_CONFIG,
             spec=None) -> Path:
    # The local endpoint speaks LFS, not Xet; huggingface_hub reads this switch at import time.
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    from mtpress.hub.server import LocalHub, new_token

    # A write token of this run only, known to this process (the flow runs in it; llama.cpp in the release gate
    # gets it through its environment): the demo's hub serves nobody else's writes or private repos.
    token = new_token()
    with LocalHub(hub_root, tokens={token}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        os.environ["HF_TOKEN"] = token
        seed_upstream_repos(config, spec)
        from flows.runners import publish_flow

        release = Path(publish_flow(str(config))(str(config), str(output)))
        print(f"\nrelease folder: {release}\nlocal Hub: {hub.store.root} (browse with `mtpress hub serve`)")
    return release


def seed_upstream_repos(config: Path, spec=None) -> None:
    """Make the demo's upstream repos on the local endpoint hold the current generator's models
    (``spec``: as for ``write_demo_pair``).

    Generation is cached by the generator's code; uploading unchanged files makes no commit.
    """
    from mtpress.fsutil import cache_root
    from mtpress.hub.client import hub_api
    from mtpress.schema import load_release_config

    cfg = load_release_config(config)
    api = hub_api()
    base_dir, finetune_dir = write_demo_pair(cache_root() / "demo-models", base_repo=cfg.donor.repo,
                                             finetune_repo=cfg.finetune.repo, spec=spec)
    for repo, folder in ((cfg.donor.repo, base_dir), (cfg.finetune.repo, finetune_dir)):
        api.create_repo(repo, exist_ok=True)
        before = api.model_info(repo).sha
        after = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Upload demo checkpoint").oid
        print(f"{'seeded' if after != before else 'up to date:'} {api.endpoint}/{repo}")


def write_demo_pair(root: Path, *, base_repo: str, finetune_repo: str, spec=None) -> tuple[Path, Path]:
    """Generate (or reuse) the demo base and fine-tune; the cache key covers the spec and the generator's code.

    ``spec`` is a ``models.DemoSpec`` (the demo's own when None; scripts/benchmark.py passes a bigger one)
    or a ``multimodal.MultimodalSpec`` (the ``Qwen3_5ForConditionalGeneration`` layout); ``moe.MoeDemoSpec`` /
    ``moe.MoeMultimodalSpec`` for the mixture-of-experts family.
    """
    import hashlib
    import inspect

    from mtpress.demo import models, moe, multimodal, tokenizer

    spec = spec or models.DemoSpec()
    vl = isinstance(spec, multimodal.MultimodalSpec)
    is_moe = isinstance(spec, (moe.MoeDemoSpec, moe.MoeMultimodalSpec))
    sources = [models, tokenizer, *([multimodal] if vl else []), *([moe] if is_moe else [])]
    key = hashlib.sha256("\n".join([repr(spec), base_repo, finetune_repo, *map(inspect.getsource, sources)]
                                   ).encode()).hexdigest()[:16]
    base, finetune = root / key / "base", root / key / "finetune"
    write_base, write_finetune = ((multimodal.write_multimodal_base, multimodal.write_multimodal_finetune) if vl
                                  else (models.write_demo_base, models.write_demo_finetune))
    if not base.is_dir():
        print("generating the demo base model (with its MTP head)")
        write_base(base, spec, repo_id=base_repo)
    if not finetune.is_dir():
        print("generating the demo fine-tune (head lost, config still claims one MTP layer)")
        write_finetune(finetune, spec, base_repo_id=base_repo, repo_id=finetune_repo)
    return base, finetune
