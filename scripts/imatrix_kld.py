"""What the importance matrix buys: KL-divergence against BF16 of each quant made with and without it.

    .venv/bin/python scripts/imatrix_kld.py [--quants Q2_K IQ3_M Q3_K_M Q4_K_M] [--chunks 16]

On the demo base (the embedded layout, head at Q8_0 as the demo keeps it): one importance matrix with the
release's defaults (the shipped imatrix_calibration.txt, 512-token chunks, MTP head included), then each quant
twice, and llama-perplexity's KL-divergence of both against the BF16 file on the quality stage's text
(calibration.txt), which the matrix never saw. Prints one line per file. The demo is a tiny synthetic model:
the figures show the mechanism works and how large the effect is at its scale, not what a 9B gains.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from mtpress.archs import get_arch
from mtpress.checkpoint import ModelDir
from mtpress.demo.run import write_demo_pair
from mtpress.fsutil import cache_root
from mtpress.schema import ImatrixSpec, QualitySpec
from mtpress.stages.convert import convert
from mtpress.stages.imatrix import compute_imatrix
from mtpress.stages.quality import quality
from mtpress.stages.quantize import quantize
from mtpress.toolchain import resolve_toolchain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quants", nargs="+", default=["Q2_K", "IQ3_M", "Q3_K_M", "Q4_K_M"])
    parser.add_argument("--chunks", type=int, default=16, help="llama-perplexity chunks of 128 tokens")
    args = parser.parse_args()
    base_dir, _ = write_demo_pair(cache_root() / "demo-models", base_repo="mtpress-demo/Tiny-Qwen3.5-Demo-Base",
                                  finetune_repo="mtpress-demo/Tiny-Qwen3.5-Demo-FT")
    tools, arch, base = resolve_toolchain(), get_arch("qwen35"), ModelDir(base_dir, "base")
    with tempfile.TemporaryDirectory(prefix="imatrix-kld-") as tmp:
        out = Path(tmp)
        [bf16] = convert(base, arch, "embedded", name="T", tools=tools, out_dir=out)
        matrix = compute_imatrix(bf16, None, ImatrixSpec(), name="T", head_block=arch.head_gguf_block(base.config),
                                 tools=tools)
        print(f"{matrix.name}: {matrix.tensors} matrices ({matrix.head_tensors} of the MTP head), from "
              f"{matrix.calibration}, {matrix.ctx_size}-token chunks")
        for quant in args.quants:
            files = []
            for label, used in (("without", None), ("with", matrix)):
                made = quantize(bf16, quant, arch, base.config, name="T", tools=tools, head_type="Q8_0", imatrix=used)
                (out / label).mkdir(exist_ok=True)
                moved = made.path.rename(out / label / made.path.name)
                files.append(replace(made, path=moved, name=f"{label}-imatrix {made.name}"))
            result = quality(bf16, files, QualitySpec(chunks=args.chunks), tools, out / "work")
            for measured, made in zip(result.quants, files, strict=True):
                kld = measured.kld_mean
                print(f"{quant:7} {made.name.split()[0]:16} {made.size / 1e6:7.1f} MB  mean KLD {kld.value:.4f} ± "
                      f"{kld.error or 0:.4f}  same top token {measured.same_top_p.value:.2f}%", flush=True)


if __name__ == "__main__":
    main()
