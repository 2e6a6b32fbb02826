"""The quality stage: parsing llama-perplexity's literal output, then one real run on the demo model."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mtpress.errors import ConfigError, ToolchainError
from mtpress.manifest import jsonable
from mtpress.schema import QualitySpec, fewest_chunks, load_release_config
from mtpress.stages import quality as quality_stage
from mtpress.stages.gguf_files import GgufFile
from mtpress.stages.quality import (
    STATISTICS_START,
    Estimate,
    base_logits_bytes,
    parse_base_run,
    parse_kl_run,
    parse_statistics,
    quality,
)
from mtpress.toolchain import LlamaCpp, run_tool

DEMO_CONFIG = Path(__file__).parents[1] / "model_configs" / "demo.yaml"

# llama-perplexity b11434, --kl-divergence-base with the demo BF16 model (-c 128 -b 128 --chunks 8).
BASE_OUTPUT = """\
0.05.506.215 I perplexity: saving all logits to base.kld
0.05.544.942 I perplexity: calculating perplexity over 8 chunks, n_ctx=128, batch_size=128, n_seq=1
0.09.869.702 I perplexity: 4.22 seconds per pass - ETA 0.55 minutes
[1]261823743.8075,[2]97439300.9686,[3]155373704.8814,[4]99240287.8794,[5]89590597.5170,[6]79097465.2447,[7]71240048.9425,[8]84800851.3208,
0.36.894.856 I Final estimate: PPL = 84800851.3208 +/- 18535953.57564
"""  # noqa: E501

# The same with --kl-divergence and a Q4_K_M quant (chunk table shortened to two rows).
KL_OUTPUT = """\
0.06.284.516 I kl_divergence: computing over 8 chunks, n_ctx=128, batch_size=128, n_seq=1
0.09.708.028 I kl_divergence: 3.42 seconds per pass - ETA 0.45 minutes

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1    264704131.2012 ± 174474669.5319       4.24621 ±    0.55427       1.02850 ±    0.30791     0.000 ±  0.000 %    76.190 ±  5.409 %
   8    72855115.9043 ± 16339795.5436       3.16858 ±    0.19194       1.54335 ±    0.14524     0.000 ±  0.000 %    61.310 ±  2.172 %

====== Perplexity statistics ======
Mean PPL(Q)                   : 72855115.904251 ± 16339795.543648
Mean PPL(base)                : 3064526.423606 ± 205362.233201
Cor(ln(PPL(Q)), ln(PPL(base))):  59.72%
Mean ln(PPL(Q)/PPL(base))     :   3.168580 ±   0.191940
Mean PPL(Q)/PPL(base)         :  23.773695 ±   4.563119
Mean PPL(Q)-PPL(base)         : 69790589.480645 ± 16217995.225150

====== KL divergence statistics ======
Mean    KLD:   1.543355 ±   0.145239
Maximum KLD:  14.474905
99.9%   KLD:  14.184122
99.0%   KLD:  13.130358
95.0%   KLD:  10.351322
90.0%   KLD:   7.339325
Median  KLD:   0.038085
10.0%   KLD:  -0.000003
 5.0%   KLD:  -0.000080
 1.0%   KLD:  -0.000574
 0.1%   KLD:  -0.000753
Minimum KLD:  -0.000798

====== Token probability statistics ======
Mean    Δp:  0.000 ± 0.000 %
Maximum Δp:  0.002%
99.9%   Δp:  0.002%
99.0%   Δp:  0.001%
95.0%   Δp:  0.000%
90.0%   Δp:  0.000%
75.0%   Δp:  0.000%
Median  Δp: -0.000%
25.0%   Δp: -0.000%
10.0%   Δp: -0.000%
 5.0%   Δp: -0.000%
 1.0%   Δp: -0.001%
 0.1%   Δp: -0.002%
Minimum Δp: -0.002%
RMS Δp    :  0.000 ± 0.000 %
Same top p: 61.310 ± 2.172 %

llama_perf_context_print:        load time =    1581.15 ms
"""  # noqa: E501

# A calibration text shorter than two contexts: llama-perplexity says so and still exits 0.
TOO_SHORT_OUTPUT = """\
0.04.968.828 E perplexity: you need at least 4096 tokens to evaluate perplexity with a context of 2048
0.04.968.846 E perplexity: the data file you provided tokenizes to only 2168 tokens
"""


def gguf(name: str, quant: str, *, role: str = "model") -> GgufFile:
    return GgufFile(path=Path(name), name=name, layout="embedded", role=role, quant=quant, size=0, sha256="",
                    nextn_layers=1, block_count=9, tensor_count=0, parameters=0, head_tensor_types=())


def test_parse_base_run():
    assert parse_base_run(BASE_OUTPUT) == (Estimate(84800851.3208, 18535953.57564), 8)
    with pytest.raises(ToolchainError, match="no final perplexity"):
        parse_base_run(TOO_SHORT_OUTPUT)


def test_parse_statistics_reads_every_summary_line():
    stats = parse_statistics(KL_OUTPUT)
    assert len(stats) == 6 + 12 + 16
    assert stats["Mean PPL(Q)"] == Estimate(72855115.904251, 16339795.543648)
    assert stats["Cor(ln(PPL(Q)), ln(PPL(base)))"] == Estimate(59.72, None, "%")
    assert stats["Mean KLD"] == Estimate(1.543355, 0.145239)
    assert stats["10.0% KLD"] == Estimate(-0.000003)
    assert stats["Maximum Δp"] == Estimate(0.002, None, "%")
    assert stats["Median Δp"] == Estimate(-0.0, None, "%")
    assert stats["Same top p"] == Estimate(61.31, 2.172, "%")
    assert "chunk" not in " ".join(stats) and "llama_perf_context_print" not in stats


def test_parse_kl_run_picks_the_headline_figures():
    result = parse_kl_run(KL_OUTPUT, gguf("T-Q4_K_M.gguf", "Q4_K_M"))
    assert (result.model, result.quant, result.chunks) == ("T-Q4_K_M.gguf", "Q4_K_M", 8)
    assert result.ppl == Estimate(72855115.904251, 16339795.543648)
    assert result.ppl_ratio == Estimate(23.773695, 4.563119)
    assert result.kld_mean == Estimate(1.543355, 0.145239)
    assert (result.kld_median, result.kld_p99, result.kld_max) == (0.038085, 13.130358, 14.474905)
    assert result.same_top_p == Estimate(61.31, 2.172, "%")
    assert result.rms_delta_p == Estimate(0.0, 0.0, "%")
    assert json.loads(json.dumps(jsonable(result), ensure_ascii=False))["statistics"]["Mean KLD"]["value"] == 1.543355


def test_parse_kl_run_without_statistics_cannot_measure():
    with pytest.raises(ToolchainError, match="printed no Mean PPL"):
        parse_kl_run(KL_OUTPUT.split("====== Perplexity statistics")[0], gguf("T-Q4_K_M.gguf", "Q4_K_M"))


def test_too_short_calibration_is_a_config_error_and_the_logits_file_goes(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-perplexity").touch()
    tools = LlamaCpp(tmp_path, bin_dir, Path("python"), "11434", "cache")

    def fake_run_tool(argv, *, timeout, cwd=None):
        Path(argv[argv.index("--kl-divergence-base") + 1]).write_bytes(b"_logits_\x00\x08\x00\x00")
        return TOO_SHORT_OUTPUT

    monkeypatch.setattr(quality_stage, "run_tool", fake_run_tool)
    with pytest.raises(ConfigError, match="at least 4096 tokens"):
        quality(gguf("T-BF16.gguf", "BF16"), [gguf("T-Q4_K_M.gguf", "Q4_K_M")], QualitySpec(ctx_size=2048),
                tools, tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == []


def test_quality_refuses_head_files(tmp_path):
    with pytest.raises(ValueError, match="not MTP heads"):
        quality(gguf("T-BF16.gguf", "BF16"), [gguf("mtp-T-Q4_K_M.gguf", "Q4_K_M", role="head")], QualitySpec(),
                None, tmp_path)


def test_quality_spec_defaults():
    spec = QualitySpec()
    assert (spec.enabled, spec.ctx_size, spec.chunks) == (True, 128, 16)
    assert quality_stage.calibration_file(spec).read_text(encoding="utf-8").strip()
    for bad in ({"imatrix_quants": ("Q4_K_M",)}, {"ctx_size": 8}, {"kld": True}):
        with pytest.raises(ValidationError):
            QualitySpec(**bad)


@pytest.mark.parametrize(("ctx_size", "fewest"), [(128, 2), (256, 1), (64, 4), (16, 15), (8192, 1)])
def test_quality_spec_refuses_fewer_chunks_than_llama_perplexity_summarises(ctx_size, fewest):
    """llama-perplexity scores ctx - 1 - ctx/2 tokens per chunk and prints no KL statistics below 100 of them."""
    assert fewest_chunks(ctx_size) == fewest
    assert QualitySpec(ctx_size=ctx_size, chunks=fewest).chunks == fewest
    if fewest > 1:
        with pytest.raises(ValidationError, match=rf"set chunks to at least {fewest}, or raise ctx_size"):
            QualitySpec(ctx_size=ctx_size, chunks=fewest - 1)


def test_quality_chunks_1_in_a_release_config_names_the_key_and_the_floor(tmp_path):
    config = tmp_path / "release.yaml"
    config.write_text(DEMO_CONFIG.read_text(encoding="utf-8").replace("chunks: 4", "chunks: 1"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"quality: chunks: 1 chunk\(s\) of 128 tokens score 63 tokens.*from 100"):
        load_release_config(config)


@pytest.mark.slow
def test_quality_on_the_demo_model(demo_ggufs, toolchain, tmp_path):
    """Real llama-perplexity runs on BF16 and Q4_K_M; the toy's figures mean nothing."""
    bf16, q4 = demo_ggufs
    spec = QualitySpec(chunks=2)
    result = quality(bf16, [q4], spec, toolchain, tmp_path / "work")
    assert list((tmp_path / "work").iterdir()) == [], "the base-logits file must be deleted"
    assert (result.chunks, result.ctx_size, result.tokens_scored) == (2, 128, 2 * 63)
    # Preflight's estimate of the file, from the format llama-perplexity writes, to the byte.
    assert result.base_logits_bytes == base_logits_bytes(spec, 248_320) > 2 * 63 * 248_000 * 2
    [q] = result.quants
    assert (q.quant, q.chunks) == ("Q4_K_M", 2)
    assert q.kld_mean.value >= 0 and 0 <= q.same_top_p.value <= 100 and q.ppl.value > 1
    assert {"Mean PPL(base)", "Minimum KLD", "RMS Δp"} <= q.statistics.keys()
    assert any("mtpress-demo" in note for note in result.notes)


@pytest.mark.slow
def test_the_chunk_floor_is_llama_perplexitys_and_a_short_text_is_refused_before_the_quants(demo_ggufs, toolchain,
                                                                                            tmp_path):
    bf16, q4 = demo_ggufs
    # Below the floor, run as the stage runs it: one chunk of 128 scores 63 tokens, and the KL run ends without
    # any statistics (two chunks, 126 tokens, summarise: test_quality_on_the_demo_model).
    perplexity, base, window = toolchain.tool("llama-perplexity"), tmp_path / "base.kld", ["-c", "128", "-b", "128"]
    run_tool([perplexity, "-m", bf16.path, "-f", quality_stage.calibration_file(QualitySpec()), "--chunks", "1",
              "--kl-divergence-base", base, *window], timeout=600)
    output = run_tool([perplexity, "-m", q4.path, "--kl-divergence-base", base, "--kl-divergence", *window],
                      timeout=600)
    assert "computing over 1 chunks" in output and STATISTICS_START not in output
    # Enough chunks asked for, but a text of ~150 tokens fills only 4 chunks of 32 (60 scored tokens, 7 needed).
    short = tmp_path / "short.txt"
    short.write_text(quality_stage.calibration_file(QualitySpec()).read_text(encoding="utf-8")[:600], encoding="utf-8")
    with pytest.raises(ConfigError, match=r"short\.txt: too short for quality\.ctx_size 32: it fills only \d chunk"):
        quality(bf16, [q4], QualitySpec(ctx_size=32, chunks=7, calibration=short), toolchain, tmp_path / "short")
    assert list((tmp_path / "short").iterdir()) == [], "the base-logits file must be deleted"
