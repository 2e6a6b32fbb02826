"""bounded_disk: the demo release built one file at a time, each committed to the staging repo and deleted here,
publishes the same files, manifest and card as the release built all at once, while never holding more than one
layout's BF16 files and one quant's."""

import json
import re
import threading
from pathlib import Path

import pytest
import yaml

from mtpress.demo.run import seed_upstream_repos
from mtpress.hub.client import hub_api
from tests.conftest import client_on_local_hub

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parent.parent / "model_configs" / "demo.yaml"
TOKEN = "hf_" + "mtpressBoundedDiskTestToken0123456789"
# What a run measures rather than decides: timings (each bench's whole record, whose counts the bench table keeps),
# the machine's load, seconds.
MEASURED = {"stage_seconds", "tokens_per_second_plain", "tokens_per_second_mtp", "bench_details",
            "tg tok/s (median)", "tg IQR", "pp tok/s (median)", "pp IQR", "speedup"}


def config(root: Path, repo: str) -> Path:
    """The demo, trimmed: both layouts (so the lean heads are compared), one quant made with the importance matrix
    and one without, one benchmarked, quality on."""
    cfg = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    cfg.pop("mlx")
    cfg.update(quants=["Q8_0", "IQ4_XS"], target={"repo": repo})
    cfg["bench"].update(quants=["Q8_0"], draft_lengths=[2])
    path = root / f"{repo.split('/')[1]}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


class PeakGguf(threading.Thread):
    """The most GGUF bytes (partial ones included) a folder held at once, sampled every 20 ms."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True)
        self.folder, self.peak, self.done = folder, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            total = 0
            for path in self.folder.rglob("*.gguf*") if self.folder.is_dir() else ():
                try:
                    total += path.stat().st_size
                except FileNotFoundError:  # renamed or deleted between listing and stat
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toolchain, demo_pair, prefect_harness):
    from flows.publish import publish

    root = tmp_path_factory.mktemp("bounded")
    with client_on_local_hub(root, TOKEN):
        seed_upstream_repos(DEMO)
        runs = {}
        for mode, repo in (("normal", "mtpress-demo/Normal-GGUF"), ("bounded", "mtpress-demo/Bounded-GGUF")):
            with PeakGguf(root / mode) as peak:
                folder = Path(publish(str(config(root, repo)), str(root / mode), bounded_disk=mode == "bounded"))
            runs[mode] = {"dir": folder, "repo": repo, "peak": peak.peak,
                          "manifest": json.loads((folder / "manifest.json").read_text())}
        yield runs


def normalised(run: dict, text: str) -> str:
    """A run's document with what must differ masked: its repo names and commit ids."""
    text = text.replace(run["repo"], "<repo>").replace(run["repo"].split("/")[1], "<repo>")
    return re.sub(r"\b[0-9a-f]{40}\b", "<commit>", text)


# The card's sentence on which files draft-mtp was slower in, from the smoke tests' timings: a measured figure.
SLOWER = re.compile(r"slower than plain decoding for \d+ of \d+ files \([^)]*\)"
                    r"|\d+ 个文件里有 \d+ 个在开启 draft-mtp 后比普通解码更慢（[^）]*）")


def card(run: dict, name: str) -> str:
    """A card with its repo names, commit ids and measured figures (decimals, the slower-files sentence) masked."""
    text = normalised(run, (run["dir"] / name).read_text(encoding="utf-8"))
    return re.sub(r"\d[\d,]*\.\d+", "#", SLOWER.sub("<slower files>", text))


def decided(value):
    if isinstance(value, dict):
        return {k: "<measured>" if k in MEASURED else decided(v) for k, v in value.items()}
    return [decided(v) for v in value] if isinstance(value, list) else value


def manifest_decided(run: dict) -> dict:
    manifest = json.loads(normalised(run, json.dumps(run["manifest"])))
    manifest["config"].pop("bounded_disk")
    return decided(manifest)


def test_the_release_is_the_same_file_for_file_on_the_hub(runs):
    api = hub_api()
    on_hub = {}
    for mode, run in runs.items():
        siblings = api.model_info(run["repo"], files_metadata=True).siblings
        on_hub[mode] = {s.rfilename: s.lfs.sha256 for s in siblings if s.lfs and s.rfilename.endswith(".gguf")}
    assert on_hub["bounded"] == on_hub["normal"]
    assert len(on_hub["normal"]) == 10  # 3 variants × (an embedded file, a sidecar trunk and head) + the imatrix
    manifest = runs["bounded"]["manifest"]
    assert on_hub["bounded"] == ({f["path"]: f["sha256"] for f in manifest["files"]}
                                 | {manifest["imatrix"]["path"]: manifest["imatrix"]["sha256"]})


def test_manifest_and_card_differ_only_in_measured_figures_and_names(runs):
    normal, bounded = runs["normal"], runs["bounded"]
    assert bounded["manifest"]["config"]["bounded_disk"] and not normal["manifest"]["config"]["bounded_disk"]
    assert manifest_decided(bounded) == manifest_decided(normal)
    for name in ("README.md", "README_zh.md"):
        texts = [card(run, name) for run in (normal, bounded)]
        # The card's config block says how it was built; nothing else may differ.
        assert "\nbounded_disk: false\n" in texts[0] and "\nbounded_disk: true\n" in texts[1]
        assert texts[0] == texts[1].replace("\nbounded_disk: true\n", "\nbounded_disk: false\n")
    # Everything the release measures is there in both: lean heads, bench, quality of each quant, the gate.
    for key in ("lean_heads", "bench", "quality", "gate", "imatrix"):
        assert bounded["manifest"][key], key
    assert [row["quant"] for row in bounded["manifest"]["quality"]] == ["BF16", "Q8_0", "IQ4_XS"]
    # The masking is not blind: a changed sha256 or a changed quality figure is seen.
    tampered = json.loads(json.dumps(bounded["manifest"]))
    tampered["quality"][1]["mean KLD"] = "9"
    assert manifest_decided({**bounded, "manifest": tampered}) != manifest_decided(normal)


def test_files_are_deleted_here_once_committed_and_the_folder_never_held_more_than_one_quant(runs):
    normal, bounded = runs["normal"], runs["bounded"]
    files = bounded["manifest"]["files"]
    assert [p.name for p in bounded["dir"].rglob("*.gguf")] == [bounded["manifest"]["imatrix"]["path"]]
    assert len(list(normal["dir"].rglob("*.gguf"))) == 10
    size = {}
    for f in files:
        size[f["layout"], f["quant"]] = size.get((f["layout"], f["quant"]), 0) + f["size"]
    bound = max(size[layout, "BF16"] + max(s for (other, q), s in size.items() if other == layout and q != "BF16")
                for layout, _ in size) + bounded["manifest"]["imatrix"]["size"]
    assert bounded["peak"] <= bound < sum(size.values())
    assert normal["peak"] > bound  # the sampler sees a folder that holds it all
    # Each variant went to staging in a commit of its own, before the release's staging commit.
    staging = bounded["manifest"]["gate_details"]["repo"]
    messages = [c.title for c in hub_api().list_repo_commits(staging)]
    assert sum("tested (bounded disk)" in m for m in messages) == 6
