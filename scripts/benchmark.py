"""mtpress against the seeds' hand recipe, on generated Qwen3.5 models served by a local Hub (issue #7).

    .venv/bin/python scripts/benchmark.py --size demo            # 137M parameters (274 MB), minutes
    .venv/bin/python scripts/benchmark.py --size both --quants Q4_K_M   # + 868M (1.7 GB), generated once
    .venv/bin/python scripts/benchmark.py --size demo --modes normal bounded   # peak disk of each disk mode
    .venv/bin/python scripts/benchmark.py --size 9b --layers 4 --modes normal bounded   # docs/rehearsal-9b.md

For each size it runs, each as a measured process tree:
  (a) the hand recipe as the seed cards describe it: download both repos, merge the head by loading and
      re-saving every safetensors shard (torch, in the converter's environment), convert (embedded BF16,
      sidecar trunk and head), quantize the same matrix one file after another, ``upload_folder`` everything;
  (b) ``mtpress publish`` on the same matrix (bench and quality off: the hand recipe has neither; smoke
      tests stay, they cannot be switched off);
  (c) ``mtpress publish`` again, nothing changed;
  (d) ``mtpress publish`` with one card template changed, from a copy of src/, flows/ and templates/.

How each figure is measured:
  wall      time from start to exit of the process tree
  CPU       user + system time of every process in the tree (RUSAGE_CHILDREN of a wrapper process)
  peak RSS  highest sum over the live tree of /proc/PID/status VmRSS, and of RssAnon, sampled every 0.2 s;
            VmRSS counts mmapped file pages (safetensors, GGUFs) the kernel can drop, RssAnon does not
  written   /proc/PID/io write_bytes of the wrapper after it reaped the tree: bytes every process put into
            the page cache for files, counted when written (files deleted before writeback included)
  uploaded  request body bytes the local Hub received (LocalHub.bytes_received), JSON included
``inject+convert`` (merge+convert for the hand recipe) is what the tree wrote less the bytes downloaded
and the quantized GGUFs (file sizes: llama-quantize writes its output once and nothing else); it also
holds the small writes of Prefect's database, the stage cache, the manifest and the card. The local Hub's
own storage is not counted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# The local Hub speaks LFS, not Xet; huggingface_hub reads the switch at import, in this process and children.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("demo", "large")
MARKER = "<!-- scripts/benchmark.py: a card-only change -->"
SAMPLE_S = 0.2
# llama.cpp only forwards tokens shaped like real ones; this one is only ever shown to the local Hub.
TOKEN = "hf_mtpressBenchmarkTokenLocalHubOnly0"

# Runs the command, reaps it, then reports what the whole tree cost: a reaped child's CPU time and I/O
# counters are added to its parent's, so the wrapper's own counters hold every descendant that exited.
WRAPPER = """\
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "cpu_s": usage.ru_utime + usage.ru_stime,
                                         "io": {k: int(v) for k, v in io.items()}}))
sys.exit(rc)
"""

# The seeds' merge (run with the converter's Python, which has torch): every fine-tune shard is loaded and
# saved again, the donor's mtp.* tensors added to the last one, the index rewritten.
HAND_MERGE = """\
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
finetune, donor, out = map(Path, sys.argv[1:4])
out.mkdir(parents=True)
head = {}
for shard in sorted(donor.glob("*.safetensors")):
    head.update({k: v for k, v in load_file(shard).items() if k.startswith("mtp.")})
shards = sorted(finetune.glob("*.safetensors"))
weight_map = {}
for i, shard in enumerate(shards):
    tensors = load_file(shard)
    if i == len(shards) - 1:
        tensors.update(head)
    save_file(tensors, out / shard.name, metadata={"format": "pt"})
    weight_map.update({k: shard.name for k in tensors})
    del tensors
index = json.loads((finetune / "model.safetensors.index.json").read_text())
index["weight_map"] = weight_map
(out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
for f in finetune.iterdir():
    if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
        shutil.copy(f, out / f.name)
"""


@dataclass
class Usage:
    wall_s: float
    cpu_s: float
    peak_rss: int
    peak_anon: int
    written: int
    uploaded: int
    peak_disk: int = 0  # highest stored_bytes of the ``disk`` folders given to measure(); 0 when none
    peak_own: int = 0  # the same of the ``own`` folders alone: the publisher's, without the pair and the local Hub
    # Per program of the tree (convert, quantize, llama-server, the rest): peak RssAnon and CPU seconds.
    programs: dict | None = None


# MEASUREMENT


def process_tree(root: int) -> set[int]:
    """``root`` and every live descendant, from the parent pids in /proc/*/stat."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            # The command name in parentheses may hold spaces and parentheses; the fields after it do not.
            parents[int(entry.name)] = int(stat[stat.rfind(")") + 2:].split()[1])
    tree, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in parents:
            tree.add(pid)
            frontier += [child for child, parent in parents.items() if parent == pid]
    return tree


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes; (0, 0) once it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values.get("VmRSS", 0), values.get("RssAnon", 0)


# Which program a process of the tree is, by its command line: the stage it serves.
PROGRAMS = (("convert_hf_to_gguf", "convert"), ("llama-quantize", "quantize"), ("llama-server", "llama-server"),
            ("llama-imatrix", "imatrix"))
DISK_EVERY = 10  # samples between two walks of the disk folders


def program_of(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    return next((label for needle, label in PROGRAMS if needle.encode() in cmdline), "python and the rest")


def cpu_ticks(pid: int) -> int:
    """utime + stime of one live process, in clock ticks; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


class TreeSampler(threading.Thread):
    """Samples a process tree every SAMPLE_S seconds until stopped: peak memory, per program too, and disk."""

    def __init__(self, root: int, disk: tuple[Path, ...] = (), own: tuple[Path, ...] = ()) -> None:
        super().__init__(daemon=True)
        self.root, self.disk, self.own = root, disk, own
        self.peak_rss = self.peak_anon = self.peak_disk = self.peak_own = self.samples = 0
        self.program_anon: dict[str, int] = {}
        self.last_ticks: dict[int, tuple[str, int]] = {}  # pid → (program, last CPU ticks seen)
        self._done = threading.Event()

    def sample(self) -> None:
        tree = process_tree(self.root)
        memory = {pid: memory_of(pid) for pid in tree}
        self.peak_rss = max(self.peak_rss, sum(m[0] for m in memory.values()))
        self.peak_anon = max(self.peak_anon, sum(m[1] for m in memory.values()))
        anon: dict[str, int] = {}
        for pid in tree:
            program = self.last_ticks[pid][0] if pid in self.last_ticks else program_of(pid)
            anon[program] = anon.get(program, 0) + memory[pid][1]
            self.last_ticks[pid] = (program, max(cpu_ticks(pid), self.last_ticks.get(pid, ("", 0))[1]))
        for program, value in anon.items():
            self.program_anon[program] = max(self.program_anon.get(program, 0), value)
        if self.disk and self.samples % DISK_EVERY == 0:
            stored = {folder: stored_bytes(folder) for folder in self.disk if folder.exists()}
            self.peak_disk = max(self.peak_disk, sum(stored.values()))
            self.peak_own = max(self.peak_own, sum(stored.get(folder, 0) for folder in self.own))
        self.samples += 1

    def programs(self) -> dict:
        """Peak RssAnon and CPU seconds per program (CPU as last sampled: a process's final 0.2 s may be missed)."""
        tick = os.sysconf("SC_CLK_TCK")
        cpu: dict[str, float] = {}
        for program, ticks in self.last_ticks.values():
            cpu[program] = cpu.get(program, 0.0) + ticks / tick
        return {p: {"peak_anon": self.program_anon.get(p, 0), "cpu_s": round(cpu.get(p, 0.0), 1)} for p in cpu}

    def run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def measure(argv: list[str], *, log: Path, env: dict[str, str] | None = None, hub=None,
            cwd: Path = ROOT, disk: tuple[Path, ...] = (), own: tuple[Path, ...] = ()) -> Usage:
    """Run ``argv`` to completion as a measured process tree; its output goes to ``log``.

    ``disk``: folders whose stored bytes are sampled for the peak (every DISK_EVERY samples); ``own``: those of
    them that are the publisher's machine's (their peak is also reported alone).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    report = log.with_suffix(".usage.json")
    received = hub.bytes_received if hub else 0
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(report), *argv], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
        sampler = TreeSampler(proc.pid, disk, own)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    wall = time.monotonic() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(argv[:3])} … failed with exit code {rc}; last lines of {log}:\n{tail}")
    result = json.loads(report.read_text())
    return Usage(wall_s=round(wall, 1), cpu_s=round(result["cpu_s"], 1), peak_rss=sampler.peak_rss,
                 peak_anon=sampler.peak_anon, written=result["io"]["write_bytes"],
                 uploaded=(hub.bytes_received - received) if hub else 0, peak_disk=sampler.peak_disk,
                 peak_own=sampler.peak_own,
                 programs=sampler.programs())


def stored_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder``, each inode once (hard links and symlinks are not new bytes)."""
    seen, total = set(), 0
    for path in folder.rglob("*"):
        try:  # sampled while a run writes and deletes: a file may vanish between listing and stat
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# THE HAND RECIPE (runs in its own process: `benchmark.py hand-recipe …`)


def hand_recipe(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi, snapshot_download

    from mtpress.toolchain import resolve_toolchain

    tools, work = resolve_toolchain(build=False), Path(args.work)
    finetune, donor = work / "finetune", work / "donor"
    snapshot_download(args.finetune, local_dir=finetune)
    snapshot_download(args.donor, local_dir=donor)
    merged, out = work / "merged", work / "out"
    subprocess.run([str(tools.python), "-c", HAND_MERGE, str(finetune), str(donor), str(merged)], check=True)

    convert = [*tools.converter(), str(merged), "--outtype", "bf16"]
    for folder in (out / "embedded", work / "head"):
        folder.mkdir(parents=True)
    subprocess.run([*convert, "--outfile", str(out / "embedded" / f"{args.name}-BF16.gguf")], check=True)
    subprocess.run([*convert, "--no-mtp", "--outfile", str(out / f"{args.name}-BF16.gguf")], check=True)
    subprocess.run([*convert, "--mtp", "--outfile", str(work / "head") + "/"], check=True)
    [head] = (work / "head").glob("mtp-*.gguf")
    head.rename(out / f"mtp-{args.name}-BF16.gguf")

    head_block = json.loads((merged / "config.json").read_text())["num_hidden_layers"]
    threads = str(os.cpu_count() or 2)
    for quant in args.quants:
        for prefix, pin in (("embedded/", True), ("", False), ("mtp-", True)):
            source = out / f"{prefix}{args.name}-BF16.gguf"
            pinning = ["--tensor-type", rf"blk\.{head_block}\.={args.head_type.lower()}"] if pin else []
            subprocess.run([str(tools.tool("llama-quantize")), *pinning, str(source),
                            str(source).replace("-BF16.gguf", f"-{quant}.gguf"), quant, threads], check=True)

    api = HfApi()
    api.create_repo(args.target, exist_ok=True)
    api.upload_folder(repo_id=args.target, folder_path=out, commit_message="Upload GGUF files")


# THE BENCHMARK


def model_pair(size: str) -> tuple[Path, Path, str, str]:
    from mtpress.demo.models import BENCHMARK_SPEC
    from mtpress.demo.run import write_demo_pair
    from mtpress.fsutil import cache_root

    base_repo, finetune_repo = f"mtpress-bench/Qwen3.5-{size}-Base", f"mtpress-bench/Qwen3.5-{size}-FT"
    base, finetune = write_demo_pair(cache_root() / "demo-models", base_repo=base_repo, finetune_repo=finetune_repo,
                                     spec=BENCHMARK_SPEC if size == "large" else None)
    return base, finetune, base_repo, finetune_repo


def release_config(path: Path, *, name: str, finetune: str, donor: str, target: str, quants: list[str],
                   layouts: list[str] | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": name, "finetune": {"repo": finetune}, "donor": {"repo": donor}, "target": {"repo": target},
        "layouts": layouts or ["sidecar", "embedded"], "quants": quants, "head_type": "Q8_0",
        "bench": {"enabled": False}, "quality": {"enabled": False}}, sort_keys=False))
    return path


def code_snapshot(dest: Path, *, card_change: bool = False) -> dict[str, str]:
    """Copy src/, flows/ and templates/ as they are now; return the environment that runs mtpress from the copy.

    The checkout may change while the benchmark runs, and a no-op rerun must run the cold run's code.
    ``card_change`` adds one line to the English card template: the card module finds its templates beside
    its own source, so that copy renders a changed card while everything else, cache keys included, is equal.
    """
    for part in ("src/mtpress", "flows", "templates"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    if card_change:
        template = dest / "templates" / "card" / "README.md.j2"
        template.write_text(template.read_text(encoding="utf-8") + f"\n{MARKER}\n", encoding="utf-8")
    return {"PYTHONPATH": f"{dest / 'src'}{os.pathsep}{dest}"}


def bench_size(size: str, quants: list[str] | None, work: Path, code: dict[str, dict[str, str]], *,
               keep: bool) -> dict:
    """(a)–(d) at one size; ``code`` holds the environments that run the snapshot ("same") and its card change."""
    from huggingface_hub import HfApi

    from mtpress.hub.server import LocalHub
    from mtpress.schema import ReleaseConfig

    quants = list(quants or ReleaseConfig.model_fields["quants"].default)
    print(f"\n== {size}: generating or reusing the model pair", flush=True)
    base, finetune, base_repo, finetune_repo = model_pair(size)
    model_bytes = sum(p.stat().st_size for p in finetune.glob("*.safetensors"))
    name = f"Qwen3.5-{size}-FT-MTP"
    logs = ROOT / "releases" / "benchmark-logs"  # kept (small), replaced by the next run
    with LocalHub(work / "hub", tokens={TOKEN}) as hub:
        # Prefect's ephemeral API server needs more than its default 20 s to start on a busy 2-core machine.
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "PREFECT_HOME": str(work / "prefect"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        # A machine that runs mtpress has a Prefect database already: create this one before measuring.
        subprocess.run([sys.executable, "-c", "from prefect import flow; flow(lambda: None)()"], check=True,
                       env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        for repo, folder in ((base_repo, base), (finetune_repo, finetune)):
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Upload checkpoint")
        runs = {}

        print(f"== {size}: (a) hand recipe", flush=True)
        hand = work / "hand"
        runs["a"] = measure([sys.executable, __file__, "hand-recipe", "--work", str(hand), "--finetune",
                             finetune_repo, "--donor", base_repo, "--target", f"mtpress-bench/{name}-hand-GGUF",
                             "--name", name, "--quants", *quants],
                            log=logs / f"{size}-a-hand.log", hub=hub,
                            env={**env, **code["same"], "HF_HOME": str(hand / "hf_home")})
        hand_download = stored_bytes(hand / "finetune") + stored_bytes(hand / "donor")
        hand_bf16, hand_quantized = gguf_bytes(hand / "out")
        hand_files = gguf_hashes(hand / "out")
        if not keep:  # the large size needs the room
            shutil.rmtree(hand)

        config = release_config(work / f"{name}.yaml", name=name, finetune=finetune_repo, donor=base_repo,
                                target=f"mtpress-bench/{name}-GGUF", quants=quants)
        release = work / "mtpress" / name
        publish = [str(ROOT / ".venv" / "bin" / "mtpress"), "publish", str(config), "--output", str(release)]
        mtpress_env = {**env, **code["same"], "HF_HOME": str(work / "mtpress" / "hf_home")}
        for label, title in (("b", "mtpress, cold"), ("c", "mtpress, nothing changed")):
            print(f"== {size}: ({label}) {title}", flush=True)
            runs[label] = measure(publish, log=logs / f"{size}-{label}.log", env=mtpress_env, hub=hub)
        print(f"== {size}: (d) mtpress, one card template changed", flush=True)
        runs["d"] = measure(publish, log=logs / f"{size}-d.log", env={**mtpress_env, **code["card"]}, hub=hub)
        if MARKER not in (release / "README.md").read_text(encoding="utf-8"):
            raise SystemExit("(d) did not render the changed template: the copy was not imported")
        mtpress_download = stored_bytes(work / "mtpress" / f".work-{name}" / "hub-cache")
        mtpress_bf16, mtpress_quantized = gguf_bytes(release)
        # The Hub stores content once: a file (a) already sent would cost (b) nothing to upload.
        shared = len(hand_files & gguf_hashes(release))
    return {"size": size, "quants": quants, "model_bytes": model_bytes, "runs": {k: asdict(v) for k, v in runs.items()},
            "hand": {"download": hand_download, "bf16": hand_bf16, "quantized": hand_quantized},
            "mtpress": {"download": mtpress_download, "bf16": mtpress_bf16, "quantized": mtpress_quantized},
            "identical_ggufs": shared,
            "stage_seconds": json.loads((release / "manifest.json").read_text(encoding="utf-8"))["stage_seconds"]}


def bench_rehearsal(layers: int, quants: list[str], work: Path, modes: list[str]) -> dict:
    """The 9B-shaped rehearsal (demo/rehearsal.py) at ``layers`` layers: generate, then one cold ``mtpress publish``
    per disk mode (sidecar layout only, bench and quality off; smoke and release gate run as always)."""
    logs = ROOT / "releases" / "benchmark-logs"
    models, label = work / "models", f"9b-{layers}"
    print(f"\n== 9b × {layers} layers: generating the rehearsal pair", flush=True)
    generator = ("import sys; from pathlib import Path; from mtpress.demo.rehearsal import rehearsal_spec, "
                 "write_rehearsal_pair; write_rehearsal_pair(Path(sys.argv[1]), rehearsal_spec(int(sys.argv[2])))")
    generated = measure([sys.executable, "-c", generator, str(models), str(layers)],
                        log=logs / f"{label}-generate.log", disk=(models,))
    [pair] = models.iterdir()
    from mtpress.demo.rehearsal import BASE_REPO_ID, FINETUNE_REPO_ID

    result = bench_modes(f"9b × {layers} layers", pair / "base", pair / "finetune", BASE_REPO_ID, FINETUNE_REPO_ID,
                         f"Qwen3.5-9B-Rehearsal-{layers}L-FT-MTP", quants, ["sidecar"], work, modes, models)
    result["runs"] = {"generate": asdict(generated), **result["runs"]}
    return {"size": "9b", "layers": layers, "model_bytes": stored_bytes(pair), **result}


def bench_modes(label: str, base: Path, finetune: Path, base_repo: str, finetune_repo: str, name: str,
                quants: list[str], layouts: list[str], work: Path, modes: list[str], models: Path) -> dict:
    """One cold ``mtpress publish`` of the pair per disk mode (normal: all at once; bounded: --bounded-disk), each
    with a fresh local Hub seeded with the pair (so no upload is skipped for the mode before's) and fresh folders.

    Peak disk counts ``models``, the local Hub's storage and the release's work and output folders together;
    "own" counts the release's folders alone: what the publisher's machine holds when the Hub is the real one.
    """
    from huggingface_hub import HfApi

    from mtpress.hub.server import LocalHub

    logs = ROOT / "releases" / "benchmark-logs"
    runs, seconds, sizes, seeded = {}, {}, {}, {}
    for mode in modes:
        hub_dir, out = work / f"hub-{mode}", work / f"mtpress-{mode}"
        with LocalHub(hub_dir, tokens={TOKEN}) as hub:
            env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "PREFECT_HOME": str(work / "prefect"),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "HF_HOME": str(out / "hf_home")}
            subprocess.run([sys.executable, "-c", "from prefect import flow; flow(lambda: None)()"], check=True,
                           env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            api = HfApi(endpoint=hub.url, token=TOKEN)
            start = time.monotonic()
            for repo, folder in ((base_repo, base), (finetune_repo, finetune)):
                api.create_repo(repo, exist_ok=True)
                api.upload_folder(repo_id=repo, folder_path=folder, commit_message="Upload checkpoint")
            seeded[mode] = round(time.monotonic() - start, 1)
            config = release_config(work / f"{name}.yaml", name=name, finetune=finetune_repo, donor=base_repo,
                                    target=f"mtpress-bench/{name}-GGUF", quants=quants, layouts=layouts)
            release = out / name
            print(f"== {label}: mtpress publish, cold, {mode} disk", flush=True)
            runs[f"publish {mode}"] = asdict(measure(
                [str(ROOT / ".venv" / "bin" / "mtpress"), "publish", str(config), "--output", str(release),
                 *(["--bounded-disk"] if mode == "bounded" else [])],
                log=logs / f"{name}-{mode}-publish.log", hub=hub, env=env, disk=(models, hub_dir, out), own=(out,)))
            manifest = json.loads((release / "manifest.json").read_text(encoding="utf-8"))
            seconds[mode] = manifest["stage_seconds"]
            bf16 = sum(f["size"] for f in manifest["files"] if f["quant"] == "BF16")
            sizes[mode] = {"downloaded": stored_bytes(out / f".work-{name}" / "hub-cache"), "bf16": bf16,
                           "quantized": sum(f["size"] for f in manifest["files"]) - bf16}
        shutil.rmtree(hub_dir, ignore_errors=True)  # the next mode starts cold, and needs the room
        shutil.rmtree(out, ignore_errors=True)
    return {"label": label, "quants": quants, "layouts": layouts, "seed_hub_s": seeded, "sizes": sizes,
            "runs": runs, "stage_seconds": seconds}


def rehearsal_report(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += ["", f"{r['label']}: pair {gb(r['model_bytes'])} on disk (fine-tune trunk hard-linked); "
                      f"{', '.join(r['layouts'])}; quants {', '.join(r['quants'])}",
                  f"  {'':16} {'wall s':>8} {'CPU s':>8} {'peak RssAnon':>12} {'peak disk':>10} {'own peak':>10}"
                  f" {'written':>10} {'uploaded':>10}"]
        for key, u in r["runs"].items():
            lines.append(f"  {key:16} {u['wall_s']:8.1f} {u['cpu_s']:8.1f} {gb(u['peak_anon']):>12}"
                         f" {gb(u['peak_disk']):>10} {gb(u.get('peak_own', 0)):>10} {gb(u['written']):>10}"
                         f" {gb(u['uploaded']):>10}")
            for program, p in sorted((u["programs"] or {}).items()):
                lines.append(f"    {program:22} CPU {p['cpu_s']:8.1f} s, peak RssAnon {gb(p['peak_anon'])}")
        for mode, size in r["sizes"].items():
            lines.append(f"  {mode}: downloaded {gb(size['downloaded'])}, BF16 GGUFs {gb(size['bf16'])}, quantized "
                         f"{gb(size['quantized'])}; seconds per stage: "
                         + ", ".join(f"{k} {v:g}" for k, v in r["stage_seconds"][mode].items()))
    return "\n".join(lines)


def bench_disk_modes(size: str, quants: list[str], work: Path, modes: list[str]) -> dict:
    """The demo (or large) pair published cold once per disk mode, both layouts."""
    base, finetune, base_repo, finetune_repo = model_pair(size)
    result = bench_modes(size, base, finetune, base_repo, finetune_repo, f"Qwen3.5-{size}-FT-MTP", quants,
                         ["sidecar", "embedded"], work, modes, base.parent)
    return {"size": size, "model_bytes": stored_bytes(base) + stored_bytes(finetune), **result}


def gguf_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the BF16 GGUFs under ``folder``, and of the quantized ones."""
    sizes = [(p.name.endswith("-BF16.gguf"), p.stat().st_size) for p in folder.rglob("*.gguf")]
    return sum(n for bf16, n in sizes if bf16), sum(n for bf16, n in sizes if not bf16)


def gguf_hashes(folder: Path) -> set[str]:
    from mtpress.fsutil import sha256_file

    return {sha256_file(p) for p in folder.rglob("*.gguf")}


# REPORT


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def report(results: list[dict]) -> str:
    lines = []
    titles = {"a": "(a) hand recipe", "b": "(b) mtpress cold", "c": "(c) mtpress no-op", "d": "(d) card change"}
    for r in results:
        runs = r["runs"]
        lines += ["", f"{r['size']}: fine-tune {gb(r['model_bytes'])} of BF16 safetensors; layouts sidecar + embedded;"
                      f" quants {', '.join(r['quants'])}",
                  f"  {'':20} {'wall s':>8} {'CPU s':>8} {'peak VmRSS':>11} {'peak RssAnon':>12} {'written':>10}"
                  f" {'uploaded':>10}"]
        for key, title in titles.items():
            u = runs[key]
            lines.append(f"  {title:20} {u['wall_s']:8.1f} {u['cpu_s']:8.1f} {gb(u['peak_rss']):>11}"
                         f" {gb(u['peak_anon']):>12} {gb(u['written']):>10} {gb(u['uploaded']):>10}")
        a, b, c, d = (runs[k] for k in "abcd")
        lines.append(f"  (b)/(a): wall {b['wall_s'] / a['wall_s']:.2f}, CPU {b['cpu_s'] / a['cpu_s']:.2f}, "
                     f"written {b['written'] / a['written']:.2f}; (c)/(b): wall {c['wall_s'] / b['wall_s']:.3f}, "
                     f"CPU {c['cpu_s'] / b['cpu_s']:.3f}; (d) uploaded {gb(d['uploaded'])}")
        # What (d) wrote is what any new commit redoes after the build (card, the release gate's -hf downloads).
        r["hand"]["convert_ratio"] = (a["written"] - r["hand"]["download"] - r["hand"]["quantized"]) / r["hand"]["bf16"]
        made = b["written"] - r["mtpress"]["download"] - r["mtpress"]["quantized"] - d["written"]
        r["mtpress"]["convert_ratio"] = made / r["mtpress"]["bf16"]
        lines.append(f"  inject+convert writes / BF16 GGUFs ({gb(r['mtpress']['bf16'])}): mtpress "
                     f"{r['mtpress']['convert_ratio']:.3f} (written − download − quantized GGUFs − (d) written), "
                     f"hand recipe merge+convert {r['hand']['convert_ratio']:.3f} (written − download − quantized)")
        if r.get("stage_seconds"):
            lines.append("  (b) seconds per stage: " + ", ".join(f"{k} {v:g}" for k, v in r["stage_seconds"].items()))
        lines.append(f"  peak of the whole flow / model size: VmRSS {b['peak_rss'] / r['model_bytes']:.2f}, "
                     f"RssAnon {b['peak_anon'] / r['model_bytes']:.2f}; GGUFs identical in (a) and (b): "
                     f"{r['identical_ggufs']}")

    lines += ["", "targets (issue #7):"]
    last = results[-1]
    a, b, c, d = (last["runs"][k] for k in "abcd")

    def target(ok: bool, text: str) -> None:
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {text}")

    target(last["mtpress"]["convert_ratio"] <= 1.05, f"inject+convert writes ≤ 1.05 × BF16 GGUFs ({last['size']}):"
                                                     f" {last['mtpress']['convert_ratio']:.3f}")
    target(b["peak_anon"] <= 0.25 * last["model_bytes"], f"peak RssAnon ≤ 0.25 × model size ({last['size']}): "
                                                         f"{b['peak_anon'] / last['model_bytes']:.2f}")
    if len(results) > 1:
        small, big = results[0], results[-1]
        for field, label in (("peak_anon", "RssAnon"), ("peak_rss", "VmRSS")):
            growth = big["runs"]["b"][field] - small["runs"]["b"][field]
            slope = growth / (big["model_bytes"] - small["model_bytes"])
            target(slope <= 0.25, f"peak {label} growth per model byte, {small['size']} → {big['size']}: {slope:.3f}"
                                  f" ({gb(small['runs']['b'][field])} → {gb(big['runs']['b'][field])})")
    target(c["wall_s"] <= 0.05 * b["wall_s"], f"no-op rerun ≤ 5% of the cold run ({last['size']}): "
                                              f"{100 * c['wall_s'] / b['wall_s']:.1f}%")
    target(d["uploaded"] < 1e6, f"card-only change uploads < 1 MB: {gb(d['uploaded'])}")
    target(b["wall_s"] <= 0.5 * a["wall_s"], f"end-to-end ≤ 0.5 × the hand recipe ({last['size']}): "
                                             f"{b['wall_s'] / a['wall_s']:.2f}")
    return "\n".join(lines)


def machine() -> str:
    from mtpress.manifest import hardware

    hw = hardware()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{hw['cpu']}, {hw['cores']} cores, {memory / 2**30:.0f} GiB RAM, {hw['os']}"


def rehearse(args: argparse.Namespace, work: Path) -> None:
    """``--size 9b``, or ``--modes`` at another size: cold publishes per disk mode, no hand recipe."""
    quants = args.quants.split(",") if args.quants else ["Q8_0", "Q4_K_M"]
    modes = args.modes or ["normal"]
    results = []
    try:
        for layers in args.layers if args.size == "9b" else [None]:
            results.append(bench_rehearsal(layers, quants, work / f"9b-{layers}", modes) if layers
                           else bench_disk_modes(args.size, quants, work / args.size, modes))
            if args.json:
                args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
            if not args.keep:  # the next layer count needs the room
                shutil.rmtree(work / f"9b-{layers}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmachine: {machine()}\n{rehearsal_report(results)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    inner = sub.add_parser("hand-recipe", help="(internal) the hand recipe, run as its own measured process")
    for flag in ("--work", "--finetune", "--donor", "--target", "--name"):
        inner.add_argument(flag, required=True)
    inner.add_argument("--quants", nargs="+", required=True)
    inner.add_argument("--head-type", default="Q8_0")
    parser.add_argument("--size", choices=(*SIZES, "both", "9b"), default="demo",
                        help="9b: the Qwen3.5-9B-shaped rehearsal (docs/rehearsal-9b.md), one cold publish")
    parser.add_argument("--layers", type=int, nargs="+", default=[4],
                        help="with --size 9b: layer counts to rehearse, one after another (multiples of 4)")
    parser.add_argument("--quants", help="comma-separated quant types (default: the release schema's)")
    parser.add_argument("--modes", nargs="+", choices=("normal", "bounded"),
                        help="cold publishes per disk mode (bounded: --bounded-disk), peak disk of each, no hand "
                             "recipe; with --size 9b the default is normal only")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (releases, hub, logs)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new one under releases/)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--report", type=Path, help="print the report of figures written by --json, run nothing")
    args = parser.parse_args()
    if args.command == "hand-recipe":
        return hand_recipe(args)
    if args.report:
        saved = json.loads(args.report.read_text())
        render = rehearsal_report if saved["results"] and "label" in saved["results"][0] else report
        return print(f"machine: {saved['machine']}\n{render(saved['results'])}")

    sizes = SIZES if args.size == "both" else (args.size,)
    (ROOT / "releases").mkdir(exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="benchmark-", dir=ROOT / "releases"))).resolve()
    print(f"work folder: {work}\nmachine: {machine()}", flush=True)
    if args.size == "9b" or args.modes:
        return rehearse(args, work)
    code = {"same": code_snapshot(work / "code"), "card": code_snapshot(work / "code-card", card_change=True)}
    results = []
    try:
        for size in sizes:
            results.append(bench_size(size, args.quants.split(",") if args.quants else None, work / size, code,
                                      keep=args.keep))
            if args.json:  # each size as it completes: a later failure keeps the figures measured so far
                args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
            if not args.keep:  # the large size needs the room
                shutil.rmtree(work / size, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nmachine: {machine()}\n{report(results)}")


if __name__ == "__main__":
    sys.exit(main())
