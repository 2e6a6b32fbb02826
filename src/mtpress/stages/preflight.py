"""Checks that run before any long work: will the whole run fit this machine's disk and memory?

``plan_run`` reads only Hub metadata (safetensors headers by HTTP Range, via ``get_safetensors_metadata``; nothing
else is downloaded) or a local checkpoint's headers, and adds up what the run writes: the checkpoints downloaded,
the injected head shard (the trunk shards are hard-linked), every GGUF at the bits per weight llama-quantize really
writes, and the gate's download of the quants it loads. ``check_plan`` refuses, naming both numbers and what to trim.
``planned_output_bytes`` is the same GGUF estimate from a downloaded checkpoint, for the check after download (which
leaves out what the stage cache already holds).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from mtpress.archs.base import ArchSpec
from mtpress.checkpoint import ModelDir
from mtpress.errors import InsufficientDiskError, InsufficientMemoryError
from mtpress.hub.client import hub_api
from mtpress.safetensors_io import TensorInfo
from mtpress.schema import ReleaseConfig, Source
from mtpress.stages.download import hub_errors, local_model, probe
from mtpress.stages.quality import base_logits_bytes

SAFETY_MARGIN = 1.10
GiB = 2**30

# Bits per weight llama-quantize writes for each file type, as (2-D weights, token_embd, output). Single-type rows
# are ggml's block sizes (ggml-common.h: Q8_0 34 B / 32 weights = 8.5, Q6_K 210 B / 256 = 6.5625, Q5_K 176/256 = 5.5,
# Q4_K 144/256 = 4.5, Q3_K 110/256 = 3.4375, Q2_K 84/256 = 2.625, ...). llama-quant.cpp's rules put `output` in Q6_K
# for every type below it, and the *_M/*_L mixes give attn_v, half of the layers' ffn_down and part of attn_qkv more
# bits: measured on the demo's Q4_K_M (tensor types read back from the GGUF), 18.5% of its 2-D weights are Q6_K
# (4.89 bpw), the share these rows apply to each mix. 1-D tensors and conv kernels stay F32 (32 bits) in every file;
# 3-D ones (a mixture of experts' packed experts) are quantized like 2-D weights.
_MIX = 0.185
BITS_PER_WEIGHT: dict[str, tuple[float, float, float]] = {
    "BF16": (16, 16, 16), "F16": (16, 16, 16), "Q8_0": (8.5, 8.5, 8.5), "Q6_K": (6.5625, 6.5625, 6.5625),
    "Q5_K_M": (5.5 + _MIX * 1.0625, 5.5, 6.5625), "Q5_K_S": (5.5, 5.5, 6.5625), "Q5_0": (5.5, 5.5, 6.5625),
    "Q4_K_M": (4.5 + _MIX * 2.0625, 4.5, 6.5625), "Q4_K_S": (4.5, 4.5, 6.5625), "Q4_0": (4.5, 4.5, 6.5625),
    "IQ4_XS": (4.25, 4.25, 6.5625), "IQ4_NL": (4.5, 4.5, 6.5625),
    "Q3_K_L": (3.4375 + 2 * _MIX * 2.0625, 3.4375, 6.5625), "Q3_K_M": (3.4375 + _MIX * 2.0625, 3.4375, 6.5625),
    "Q3_K_S": (3.4375, 3.4375, 6.5625), "IQ3_M": (3.4375 + _MIX * 1.0625, 3.4375, 6.5625),
    "IQ3_XXS": (3.0625 + _MIX * 0.375, 3.0625, 6.5625), "Q2_K": (2.625 + _MIX * 0.8125, 2.625, 6.5625),
    "IQ2_M": (2.5 + _MIX * 0.9375, 2.5, 6.5625),
}
DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I8": 1, "U8": 1, "BOOL": 1}
# The converter (patched, docs/converter-memory.md) holds ~0.45 GB plus 8 bytes per weight of the largest tensor it
# converts whole: vocabulary-sized ones go in row chunks. llama-quantize holds the largest tensor in float32 plus
# the rows it writes (llama-quant.cpp: f32_conv_buf and work, both sized to the tensor) and its code (~0.1 GB); both
# read their input by mmap.
# Every text GGUF carries the tokenizer in its metadata: 44 bytes per vocabulary entry (tokens, types, merges),
# measured on the demo's files (the tensor data starts at 10.95 MB for 248,320 entries).
METADATA_PER_TOKEN = 44
CONVERTER_BASE, QUANTIZE_BASE = int(0.45 * GiB), int(0.1 * GiB)


def _gguf_bytes(tensors: Iterable[TensorInfo], quant: str, vocab: int) -> int:
    bulk, embd, output = BITS_PER_WEIGHT[quant]
    bits = 0.0
    for t in tensors:
        if len(t.shape) < 2 or "conv1d" in t.name:  # norms, A_log, dt_bias; the linear attention's conv kernel
            bits += 32 * t.n_elements
        elif t.shape[0] == vocab:
            bits += (output if "lm_head" in t.name else embd) * t.n_elements
        else:
            bits += bulk * t.n_elements
    return int(bits / 8)


def _layout_files(tensors: list[TensorInfo], arch: ArchSpec, layout: str, vocab: int) -> list[list[TensorInfo]]:
    """The tensors of each GGUF file a layout writes (the vision tower goes to its own mmproj file)."""
    text = [t for t in tensors if "visual." not in t.name]
    if layout == "embedded":
        return [text]
    head = [t for t in text if arch.is_head_tensor(t.name)]
    # The sidecar head file carries its own copies of the vocabulary matrices and the final norm.
    shared = [t for t in text if (t.shape and t.shape[0] == vocab) or t.name.endswith("model.norm.weight")]
    return [[t for t in text if not arch.is_head_tensor(t.name)], head + shared]


def _gguf_sizes(tensors: list[TensorInfo], arch: ArchSpec, config: dict, cfg: ReleaseConfig,
                reused: Collection[tuple[str, str]] = ()) -> dict[tuple[str, str], int]:
    vocab = arch.text_config(config)["vocab_size"]
    return {(layout, quant): sum(_gguf_bytes(f, quant, vocab) + METADATA_PER_TOKEN * vocab
                                 for f in _layout_files(tensors, arch, layout, vocab))
            for layout in cfg.layouts for quant in ("BF16", *cfg.quants) if (layout, quant) not in reused}


def planned_output_bytes(model: ModelDir, arch: ArchSpec, cfg: ReleaseConfig,
                         reused: Collection[tuple[str, str]] = ()) -> int:
    """The GGUF bytes a release writes from a downloaded checkpoint (at most at once, with bounded_disk);
    ``reused`` names the (layout, quant) outputs a rerun takes from the stage cache: they write nothing."""
    sizes = _gguf_sizes(list(model.tensors.values()), arch, model.config, cfg, reused)
    return bounded_peak(sizes) if cfg.bounded_disk and sizes else sum(sizes.values())


def _source_tensors(source: Source, only: Callable[[str], bool] | None = None) -> tuple[list[TensorInfo], dict, int]:
    """(tensors, config, bytes downloaded) from Hub metadata, or a local checkpoint's headers (used in place).
    ``only``: download just the shards holding a tensor it accepts, as ``download.fetch`` does."""
    if source.path is not None:
        model = local_model(source)
        return list(model.tensors.values()), model.config, 0
    from huggingface_hub import hf_hub_download

    api = hub_api()
    with hub_errors(source):
        remote = probe(source)
        config = json.loads(Path(hf_hub_download(source.repo, "config.json", revision=remote.revision,
                                                 endpoint=api.endpoint, token=api.token)).read_text())
    # Offsets are per shard; only the sizes (end - begin) are read from these.
    by_shard = {shard: [TensorInfo(name, info.dtype, tuple(info.shape), 0,
                                   info.parameter_count * DTYPE_BYTES[info.dtype])
                        for name, info in file.tensors.items()]
                for shard, file in remote.safetensors.files_metadata.items()}
    download = sum(t.end - t.begin for shard in remote.shards_to_fetch(only) for t in by_shard[shard])
    return [t for tensors in by_shard.values() for t in tensors], config, download


@dataclass(frozen=True)
class RunPlan:
    """What a run will write to disk and hold in memory, in bytes."""

    download: int
    injected: int
    ggufs: dict[tuple[str, str], int]
    mmproj: int
    gate: int
    convert_memory: int
    quantize_memory: int
    bounded: bool = False  # bounded_disk: the GGUFs are here one layout's BF16 and one quant at a time
    quality: int = 0  # BF16's log-probabilities, kept until the last quant is measured

    @property
    def disk(self) -> int:
        return self.download + self.injected + self.gguf_peak + self.mmproj + self.gate + self.quality

    @property
    def gguf_peak(self) -> int:
        return bounded_peak(self.ggufs) if self.bounded else sum(self.ggufs.values())

    @property
    def memory(self) -> int:
        return max(self.convert_memory, self.quantize_memory)

    def breakdown(self) -> str:
        per_quant: dict[str, int] = {}
        for (_, quant), size in self.ggufs.items():
            per_quant[quant] = per_quant.get(quant, 0) + size
        quants = ", ".join(f"{q} {s / GiB:.2f}" for q, s in per_quant.items())
        ggufs = (f"at most {self.gguf_peak / GiB:.2f} at once (bounded disk: one layout's BF16 and one quant; all: "
                 if self.bounded else f"{self.gguf_peak / GiB:.2f} (")
        return (f"download {self.download / GiB:.2f} GiB, injected head {self.injected / GiB:.2f}, GGUFs {ggufs}"
                f"{quants}, all layouts), mmproj {self.mmproj / GiB:.2f}, gate's download {self.gate / GiB:.2f}, "
                f"quality's BF16 log-probabilities {self.quality / GiB:.2f}")


def bounded_peak(ggufs: dict[tuple[str, str], int]) -> int:
    """The most GGUF bytes a bounded-disk run holds at once: a layout's BF16 files and its largest quant's (a file
    over the Hub's limit is split beside itself before it is committed: that copy is left to the margin)."""
    return max(ggufs.get((layout, "BF16"), 0) + max((size for (other, quant), size in ggufs.items()
                                                      if other == layout and quant != "BF16"), default=0)
               for layout, _ in ggufs)


def plan_run(cfg: ReleaseConfig, arch: ArchSpec, *, converter_patched: bool = True, gate: bool = True) -> RunPlan:
    """The run's disk and memory from the sources' safetensors headers alone: no weight byte is downloaded.
    ``converter_patched``: the toolchain carries mtpress's bounded-memory patch (a user's own tree does not);
    ``gate``: the run publishes, so the gate downloads what it loads."""
    from mtpress.stages.card import DEFAULT_QUANT_PREFERENCE

    tensors, config, download = _source_tensors(cfg.finetune)
    head = [t for t in tensors if arch.is_head_tensor(t.name)]
    if cfg.donor is not None:
        donor, _, donor_download = _source_tensors(cfg.donor, arch.is_head_tensor)
        download += donor_download
        head = [t for t in donor if arch.is_head_tensor(t.name)]
        tensors = [t for t in tensors if not arch.is_head_tensor(t.name)] + head
    injected = sum(t.end - t.begin for t in head) if cfg.donor is not None else 0
    ggufs = _gguf_sizes(tensors, arch, config, cfg)
    vision = [t for t in tensors if "visual." in t.name] if cfg.mmproj and arch.has_vision(config) else []
    mmproj = _gguf_bytes(vision, "BF16", -1)
    gate_bytes = 0
    if gate and cfg.gate.enabled:  # -hf downloads the recommended quant, the smallest and the tags, of the first layout
        root = {q: s for (layout, q), s in ggufs.items() if layout == cfg.layouts[0]}
        chosen = [q for q in DEFAULT_QUANT_PREFERENCE if q in root][:1] + [min(root, key=root.__getitem__)]
        gate_bytes = sum(root[q] for q in {*chosen, *(t.upper() for t in cfg.gate.tags if t.upper() in root)})
    vocab = arch.text_config(config)["vocab_size"]
    quality = base_logits_bytes(cfg.quality, vocab) if cfg.quality.enabled else 0
    largest = max(t.n_elements for t in tensors)
    whole = max((t.n_elements for t in tensors if not (converter_patched and t.shape and t.shape[0] == vocab)),
                default=0)
    return RunPlan(download, injected, ggufs, mmproj, gate_bytes, convert_memory=CONVERTER_BASE + 8 * whole,
                   quantize_memory=QUANTIZE_BASE + int(largest * (4 + max(
                       (max(BITS_PER_WEIGHT[q]) for q in cfg.quants), default=0) / 8)), bounded=cfg.bounded_disk,
                   quality=quality)


def available_memory() -> int:
    """MemAvailable: what the kernel can give without swapping (page cache included)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


TRIM = ("trim `quants:` or `layouts:` in the config, turn off the gate (`gate: {enabled: false}`), build one file "
        "at a time (`bounded_disk: true`, or --bounded-disk), or choose --output on a bigger disk")


def check_plan(plan: RunPlan, release_dir: Path, *, held: Collection[Path] = (), free: int | None = None,
               memory: int | None = None) -> None:
    """Refuse a run that cannot fit. ``held``: folders of this release an earlier run filled (release, work): a rerun
    reuses or overwrites their files, so their bytes count as free. ``free`` and ``memory`` default to the release
    folder's filesystem and MemAvailable."""
    files = {(st.st_dev, st.st_ino): st.st_size for folder in held if folder.is_dir()  # hard links count once
             for f in folder.rglob("*") if f.is_file() and (st := f.stat())}
    reusable = sum(files.values())
    _check_free(release_dir, max(0, plan.disk - reusable), plan.breakdown(), free)
    memory = available_memory() if memory is None else memory
    if plan.memory > memory:
        raise InsufficientMemoryError(
            f"{memory / GiB:.2f} GiB of memory available, the run needs about {plan.memory / GiB:.2f} GiB "
            f"(converter {plan.convert_memory / GiB:.2f}, llama-quantize {plan.quantize_memory / GiB:.2f}: the "
            "largest tensor in float32)",
            hint="stop other work on this machine, or run on one with more memory; quants and layouts do not "
                 "change it")


def check_disk_space(release_dir: Path, required: int) -> None:
    """After download: refuse when the release folder's filesystem cannot hold ``required`` bytes (plus a margin)."""
    _check_free(release_dir, required, "BF16 and every quant, in each layout", None)


def _check_free(release_dir: Path, required: int, what: str, free: int | None) -> None:
    existing = next(p for p in (release_dir, *release_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free if free is None else free
    needed = int(required * SAFETY_MARGIN)
    if needed > free:
        raise InsufficientDiskError(f"{existing}: {free / GiB:.2f} GiB free, the run needs about {needed / GiB:.2f} "
                                    f"GiB with a {SAFETY_MARGIN - 1:.0%} margin ({what})", hint=TRIM)
