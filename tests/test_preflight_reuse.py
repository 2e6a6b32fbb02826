"""The disk preflight leaves out what a rerun takes from the stage cache, asking with the flow's own keys."""

import hashlib
import os

from mtpress.archs import get_arch
from mtpress.cache import StageCache
from mtpress.fsutil import dir_digest
from mtpress.naming import gguf_name, imatrix_name
from mtpress.schema import ReleaseConfig
from mtpress.stage_keys import convert_key, imatrix_key, quantize_key, reused_outputs
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.imatrix import ImatrixFile
from mtpress.stages.preflight import check_disk_space, planned_output_bytes
from tests.fixtures import make_checkpoint

ARCH = get_arch("qwen35")
CFG = ReleaseConfig(name="x", finetune={"repo": "a/b"}, target={"repo": "c/d"}, layouts=["sidecar", "embedded"],
                    quants=["Q8_0", "Q4_K_M"])


def produce(out_dir, layout, role, quant, payload: bytes) -> GgufFile:
    """What a convert or quantize stage returns for a file it wrote (the bytes stand in for a GGUF)."""
    path = out_dir / gguf_name(CFG.name, quant, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return GgufFile(path=path, name=path.name, layout=layout, role=role, quant=quant, size=len(payload),
                    sha256=hashlib.sha256(payload).hexdigest(), nextn_layers=int(role == "head"), block_count=3,
                    tensor_count=4, parameters=10, head_tensor_types=())


def convert(out_dir, layout) -> list[GgufFile]:
    roles = ("model", "head") if layout == "sidecar" else ("model",)
    return [produce(out_dir, layout, role, "BF16", f"{layout}{role}".encode()) for role in roles]


def quantize(source: GgufFile, quant) -> GgufFile:
    return produce(source.path.parent, source.layout, source.role, quant, f"{source.name}{quant}".encode())


def make_imatrix(out_dir) -> ImatrixFile:
    path, payload = out_dir / imatrix_name(CFG.name), b"imatrix"
    path.write_bytes(payload)
    return ImatrixFile(path=path, name=path.name, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                       calibration="c.txt", calibration_sha256="0" * 64, ctx_size=512, chunks=None, tensors=1,
                       head_tensors=1, llama_cpp="0")


def first_run(cache: StageCache, release, digest, tools, *, quants) -> None:
    """Convert every layout and quantize ``quants`` through the cache, under the keys the flow uses."""
    imatrix = None  # Q4_K_M is made with the importance matrix of the first layout's BF16 files
    for layout in CFG.layouts:
        out_dir = release if layout == CFG.layouts[0] else release / layout
        bf16 = cache.run("convert", convert_key(digest, layout, CFG, tools), convert, out_dir, layout)
        imatrix = imatrix or cache.run("imatrix", imatrix_key(bf16, CFG, tools), make_imatrix, out_dir).sha256
        for quant in quants:
            for f in bf16:
                cache.run("quantize", quantize_key(f, quant, CFG, tools, imatrix), quantize, f, quant)


def test_a_rerun_that_reuses_every_output_needs_no_free_space(tmp_path, toolchain):
    model = make_checkpoint(tmp_path / "model", with_head=True, seed=0)
    release, digest = tmp_path / "release", dir_digest(model.path)
    cache = StageCache(release)
    full = planned_output_bytes(model, ARCH, CFG, reused_outputs(cache, digest, CFG, toolchain))
    assert full == planned_output_bytes(model, ARCH, CFG) > 0

    first_run(cache, release, digest, toolchain, quants=CFG.quants)
    reused = reused_outputs(StageCache(release), digest, CFG, toolchain)  # as a new process sees it
    assert reused == {(layout, q) for layout in CFG.layouts for q in ("BF16", *CFG.quants)}
    assert planned_output_bytes(model, ARCH, CFG, reused) == 0
    check_disk_space(release, planned_output_bytes(model, ARCH, CFG, reused))


def test_only_intact_outputs_of_the_same_inputs_count_as_reused(tmp_path, toolchain):
    model = make_checkpoint(tmp_path / "model", with_head=True, seed=0)
    release, digest = tmp_path / "release", dir_digest(model.path)
    cache = StageCache(release)
    first_run(cache, release, digest, toolchain, quants=["Q8_0"])  # an earlier run that built less
    assert reused_outputs(cache, digest, CFG, toolchain) == {
        ("sidecar", "BF16"), ("embedded", "BF16"), ("sidecar", "Q8_0"), ("embedded", "Q8_0")}
    q4_only = planned_output_bytes(model, ARCH, CFG, reused_outputs(cache, digest, CFG, toolchain))
    assert q4_only == planned_output_bytes(model, ARCH, CFG.model_copy(update={"quants": ("Q4_K_M",)}),
                                           {(layout, "BF16") for layout in CFG.layouts})

    # A sidecar head damaged since: its quant is redone, so only the embedded Q8_0 stays reused.
    head_q8 = release / gguf_name(CFG.name, "Q8_0", "head")
    head_q8.write_bytes(b"truncated")
    assert ("sidecar", "Q8_0") not in reused_outputs(cache, digest, CFG, toolchain)
    # Another checkpoint (other content, same paths) reuses nothing.
    assert reused_outputs(cache, "0" * 64, CFG, toolchain) == set()
    os.utime(release / "embedded" / gguf_name(CFG.name, "BF16", "model"), ns=(0, 0))
    assert ("embedded", "BF16") not in reused_outputs(cache, digest, CFG, toolchain)
