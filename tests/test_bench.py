"""The bench stage: statistics and parsing on literal llama-server output, then one real run on the demo model."""

import json
import math

import pytest
from pydantic import ValidationError

from mtpress.errors import ConfigError, ToolchainError
from mtpress.manifest import jsonable
from mtpress.schema import BenchSpec
from mtpress.stages.bench import (
    BenchPrompt,
    Sample,
    acceptance_bound,
    figures_for,
    gguf_metadata,
    greedy_mismatches,
    load_prompts,
    parse_sample,
    per_position_acceptance,
    summarize,
)

# A /completion response from llama-server b11434 (demo model, Q4_K_M, --spec-type draft-mtp
# --spec-draft-n-max 2), trimmed to the fields the bench reads.
MTP_RESPONSE = {
    "content": "[F骚扰 والب디아", "tokens": [35843, 120929, 178327, 204094], "tokens_predicted": 32,
    "tokens_evaluated": 4, "stop_type": "limit",
    "timings": {"cache_n": 0, "prompt_n": 4, "prompt_ms": 25.004, "prompt_per_token_ms": 6.251,
                "prompt_per_second": 159.97440409534474, "predicted_n": 32, "predicted_ms": 1633.691,
                "predicted_per_token_ms": 52.69970967741936, "predicted_per_second": 18.975436603372362,
                "draft_n": 26, "draft_n_accepted": 17},
}
PROMPT = BenchPrompt(id="code-1", domain="code", prompt="def fib(n):")


def sample(domain: str, generation: float, *, prompt_speed: float = 100.0, drafted: int = 0, accepted: int = 0,
           repetition: int = 0) -> Sample:
    return Sample(prompt_id=f"{domain}-1", domain=domain, repetition=repetition, prompt_tokens=10,
                  prompt_per_second=prompt_speed, generated_tokens=32, generation_per_second=generation,
                  drafted=drafted, accepted=accepted)


@pytest.mark.parametrize(("alpha", "k", "expected"), [
    (0.5, 2, 1.75), (0.5, 1, 1.5), (0.0, 3, 1.0), (1.0, 1, 2.0), (1.0, 3, 4.0), (0.8, 0, 1.0),
])
def test_acceptance_bound_values(alpha, k, expected):
    assert acceptance_bound(alpha, k) == pytest.approx(expected)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_acceptance_bound_matches_the_closed_form_and_its_limit(k):
    for alpha in (0.1, 0.37, 0.9, 0.999):
        assert acceptance_bound(alpha, k) == pytest.approx((1 - alpha ** (k + 1)) / (1 - alpha))
    assert acceptance_bound(1 - 1e-12, k) == pytest.approx(k + 1)


@pytest.mark.parametrize(("alpha", "k"), [(-0.1, 2), (1.01, 2), (0.5, -1)])
def test_acceptance_bound_rejects_impossible_inputs(alpha, k):
    with pytest.raises(ValueError):
        acceptance_bound(alpha, k)


def test_summarize_median_quartiles_and_range():
    spread = summarize([4.0, 1.0, 3.0, 2.0])  # unsorted on purpose
    assert (spread.n, spread.median, spread.min, spread.max) == (4, 2.5, 1.0, 4.0)
    # linear interpolation between order statistics (numpy's default): positions 0.75 and 2.25
    assert (spread.q1, spread.q3, spread.iqr) == (1.75, 3.25, 1.5)


def test_summarize_odd_count_and_single_value():
    spread = summarize([10.0, 30.0, 20.0])
    assert (spread.median, spread.q1, spread.q3, spread.iqr) == (20.0, 15.0, 25.0, 10.0)
    single = summarize([7.5])
    assert (single.median, single.q1, single.q3, single.iqr, single.min, single.max) == (7.5, 7.5, 7.5, 0.0, 7.5, 7.5)
    with pytest.raises(ValueError):
        summarize([])


def test_parse_sample_reads_llama_server_timings():
    parsed = parse_sample(MTP_RESPONSE, PROMPT, repetition=2)
    assert parsed == Sample(prompt_id="code-1", domain="code", repetition=2, prompt_tokens=4,
                            prompt_per_second=159.97440409534474, generated_tokens=32,
                            generation_per_second=18.975436603372362, drafted=26, accepted=17)


def test_parse_sample_without_drafts_counts_zero():
    """llama-server leaves draft_n out of timings when nothing was drafted (plain decoding)."""
    timings = {k: v for k, v in MTP_RESPONSE["timings"].items() if not k.startswith("draft")}
    parsed = parse_sample({"timings": timings}, PROMPT, repetition=0)
    assert (parsed.drafted, parsed.accepted) == (0, 0)


@pytest.mark.parametrize("body", [{}, {"timings": None}, {"timings": {"prompt_n": 4}}])
def test_parse_sample_without_timings_cannot_measure(body):
    with pytest.raises(ToolchainError, match="without usable timings"):
        parse_sample(body, PROMPT, repetition=0)


@pytest.mark.parametrize("pooled", [0.0, 0.05, 0.375, 0.5, 0.9, 1.0])
def test_per_position_acceptance_at_draft_length_1_is_the_pooled_rate(pooled):
    assert per_position_acceptance(pooled, 1) == pooled


@pytest.mark.parametrize(("pooled", "alpha"), [
    (0.375, 0.5),  # (0.5 + 0.25) / 2
    (0.5, (5**0.5 - 1) / 2),  # alpha + alpha^2 = 1: the golden ratio's inverse
    (0.1, ((1 + 8 * 0.1) ** 0.5 - 1) / 2),  # the quadratic's root in general
])
def test_per_position_acceptance_at_draft_length_2_solves_the_quadratic(pooled, alpha):
    assert per_position_acceptance(pooled, 2) == pytest.approx(alpha, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_per_position_acceptance_inverts_the_pooled_mean_and_keeps_the_edges(k):
    assert per_position_acceptance(0.0, k) == 0.0 and per_position_acceptance(1.0, k) == 1.0
    for alpha in (0.01, 0.3, 0.62, 0.97):
        pooled = sum(alpha**i for i in range(1, k + 1)) / k
        assert per_position_acceptance(pooled, k) == pytest.approx(alpha, abs=1e-12)
        assert per_position_acceptance(pooled, k) > pooled  # pooling over later positions only lowers the rate


@pytest.mark.parametrize(("pooled", "k"), [(-0.01, 2), (1.01, 2), (0.5, 0)])
def test_per_position_acceptance_rejects_impossible_inputs(pooled, k):
    with pytest.raises(ValueError):
        per_position_acceptance(pooled, k)


def test_figures_pool_acceptance_and_compare_medians_with_plain():
    samples = [sample("code", 30.0, drafted=20, accepted=10), sample("code", 10.0, drafted=10, accepted=9),
               sample("code", 20.0, drafted=10, accepted=1)]
    figures = figures_for("code", samples, k=2, plain_generation_median=40.0)
    assert (figures.drafted, figures.accepted) == (40, 20)
    assert figures.acceptance == 0.5  # 20/40 pooled, not the mean of per-request rates (0.5, 0.9, 0.1)
    assert figures.speedup == 0.5  # median 20 over plain's 40: slower, and reported as such
    # The bound takes the per-position rate (0.618 at k = 2), not the pooled 0.5 (which would give 1.75).
    alpha = (5**0.5 - 1) / 2
    assert figures.acceptance_per_position == pytest.approx(alpha)
    assert figures.acceptance_bound == pytest.approx(1 + alpha + alpha**2) == pytest.approx(2.0)
    assert figures.generation_per_second.median == 20.0


def test_figures_at_draft_length_1_use_the_pooled_rate_as_alpha():
    figures = figures_for("all", [sample("code", 30.0, drafted=20, accepted=15)], k=1, plain_generation_median=30.0)
    assert figures.acceptance == figures.acceptance_per_position == 0.75
    assert figures.acceptance_bound == pytest.approx(1.75)


def test_figures_for_plain_decoding_have_no_acceptance_or_speedup():
    figures = figures_for("all", [sample("math", 12.0), sample("math", 14.0)], k=0, plain_generation_median=13.0)
    assert (figures.acceptance, figures.acceptance_per_position, figures.speedup, figures.acceptance_bound) == (
        None, None, None, None)


def test_greedy_mismatches_names_prompts_whose_tokens_differ_in_any_repetition():
    plain = {"a": [(1, 2, 3), (1, 2, 3)], "b": [(4, 5)], "c": [(6,)]}
    runs = {"a": [(1, 2, 3), (1, 2, 3)], "b": [(4, 5), (4, 6)], "c": [(7,)]}
    assert greedy_mismatches(plain, runs) == ("b", "c")
    assert greedy_mismatches(plain, {"a": [(1, 2, 3)]}) == ()


def test_shipped_prompt_set_covers_every_domain():
    prompts = load_prompts()
    domains = {p.domain for p in prompts}
    assert domains == {"code", "math", "reasoning", "devops-prose", "edge"}
    assert all(sum(p.domain == d for p in prompts) >= 3 for d in domains)
    assert len({p.id for p in prompts}) == len(prompts)
    assert any("\u4e00" <= ch <= "\u9fff" for p in prompts for ch in p.prompt), "one Chinese prompt"


def test_bad_prompt_file_names_every_problem(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "domain": "code", "prompt": "x"}\nnot json\n{"id": "a", "domain": "code", '
                    '"prompt": ""}\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_prompts(path)
    problems = "\n".join(caught.value.problems)
    assert "line 2" in problems and "line 4" in problems
    assert "'a' appears more than once" in problems and "'a' is empty" in problems


def test_bench_spec_defaults_and_validation():
    spec = BenchSpec()
    assert (spec.draft_lengths, spec.repetitions, spec.warmup, spec.enabled) == ((1, 2, 3), 3, 1, True)
    for bad in ({"draft_lengths": (1, 1)}, {"draft_lengths": (0,)}, {"repetitions": 0}, {"speed": "fast"}):
        with pytest.raises(ValidationError):
            BenchSpec(**bad)


def test_gguf_metadata_reads_only_the_asked_keys(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(path, "qwen35")
    writer.add_tags(["qwen3_5", "mtpress-demo"])
    writer.add_size_label("137M")
    writer.add_token_list(["a", "bb", "ccc"] * 1000)  # skipped string by string
    writer.add_token_scores([0.5] * 3000)  # skipped in one seek
    writer.add_uint32("test.after_the_vocabulary", 7)
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    keys = ("general.tags", "general.size_label", "test.after_the_vocabulary", "tokenizer.ggml.scores", "absent")
    found = gguf_metadata(path, keys)
    assert found == {"general.tags": ["qwen3_5", "mtpress-demo"], "general.size_label": "137M",
                     "test.after_the_vocabulary": 7, "tokenizer.ggml.scores": [0.5] * 3000}
    reader = gguf.GGUFReader(path)
    assert all(reader.get_field(k).contents() == v for k, v in found.items())
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("x" * 32)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_metadata(not_gguf, keys)


@pytest.mark.slow
def test_bench_on_the_demo_model(demo_ggufs, toolchain, tmp_path):
    """Real llama-server runs: mechanics and arithmetic only; a toy's speed means nothing."""
    from mtpress.stages.bench import bench

    prompts = [p for p in load_prompts() if p.id in ("code-binary-search", "edge-count")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p.__dict__) + "\n" for p in prompts), encoding="utf-8")
    spec = BenchSpec(draft_lengths=(1, 2), repetitions=2, warmup=1, n_predict=16, prompts=path)
    _, q4 = demo_ggufs
    result = bench(q4, None, spec, toolchain)

    assert [c.config for c in result.configs] == ["plain", "mtp-k1", "mtp-k2"]
    assert result.hardware["offload"] == "none (CPU)" and result.hardware["threads"] >= 1
    assert any("mtpress-demo" in note for note in result.notes) and any("CPU" in note for note in result.notes)
    for config in result.configs:
        assert len(config.samples) == 4 and config.overall.samples == 4
        assert {f.scope for f in config.by_domain} == {"code", "edge"}
        assert all(s.generated_tokens == 16 and s.generation_per_second > 0 for s in config.samples)
        assert config.overall.generation_per_second.min <= config.overall.generation_per_second.median
        if config.draft_n_max:
            overall = config.overall
            assert overall.drafted > 0 and 0 < overall.acceptance <= 1
            assert overall.acceptance == overall.accepted / overall.drafted
            assert overall.acceptance_per_position == pytest.approx(
                per_position_acceptance(overall.acceptance, config.draft_n_max))
            assert overall.acceptance_bound == pytest.approx(acceptance_bound(overall.acceptance_per_position,
                                                                              config.draft_n_max))
            plain = result.configs[0].overall.generation_per_second.median
            assert overall.speedup == pytest.approx(overall.generation_per_second.median / plain)
            assert config.matches_plain is True, config.mismatched_prompts
    assert json.loads(json.dumps(jsonable(result)))["configs"][1]["config"] == "mtp-k1"
    assert not any(math.isnan(row["tg tok/s (median)"]) for row in result.table())
