"""The model card: every number traceable to the manifest, hostile text inert, both languages intact."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from mtpress.manifest import Manifest, jsonable, write_manifest
from mtpress.stages.bench import (
    BenchResult,
    ConfigResult,
    Sample,
    acceptance_bound,
    figures_for,
    per_position_acceptance,
)
from mtpress.stages.card import (
    CardError,
    RenderedCard,
    check_no_mojibake,
    code_span,
    escape_markdown,
    fenced,
    recommended_model,
    render_card,
    render_card_from_release,
    write_card,
)
from mtpress.stages.quality import Estimate, QualityResult, parse_kl_run
from tests.test_quality import KL_OUTPUT
from tests.test_quality import gguf as quality_gguf

SAMPLE = Path(__file__).parent / "data" / "manifest-sample.json"
HOSTILE_NAME = "{{ 7*7 }}<script>alert(1)</script>|x"
HOSTILE_LICENSE = "apache-2.0\n---\nbase_model: evil/repo\nx: {{ 7*7 }}"

# Damaged strings copied literally from the seed cards as published (shared/seeds/001 and 002):
# UTF-8 read as cp874 (Thai) and as cp1253 (Greek).
SEED_MOJIBAKE = [
    "English | ๐Ÿ“– ไธญๆ–‡ๆ–‡ๆกฃ",  # 001: "📖 中文文档"
    "Total: 4035/5000 (80.7%) โ€” MTP Speculative",  # 001: "—"
    "Agent-Optimized ยท 1.7-4.1ร— Speedup",  # 001: "·", "×"
    "0.65min 15โœ… 0โš\xa0๏ธ",  # 001: "✅", "⚠️"
    "MTP Speculative Decoding Β· Agent-Optimized Β· 1.5–4.1Γ— Speedup",  # 002: "·", "×"
    "πŸ“– δΈζ–‡ζ–‡ζ‘£",  # 002: "📖 中文文档"
    "Q6_Kβœ… Recommended, best value",  # 002: "✅"
    "stripped during QwenPaw fine-tuning β€” only the config",  # 002: "—"
]
# The classic cp1252/latin-1 forms the issue names.
CP1252_MOJIBAKE = ["cafÃ©", "donâ€™t", "ðŸš€ launch", "Î²-test", "â€œquotedâ€\x9d"]
CLEAN_TEXT = ["中文文档：未测量", "café in São Paulo", "1.5–4.1× speedup — honest", "✅ 📖 🚀 ⚠️", "β-test «αβγ»",
              "всё хорошо", "naïve Ünïcödé"]


@pytest.fixture
def manifest() -> dict:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def card_of(manifest: dict, **kwargs) -> RenderedCard:
    """The card of a manifest the tests edit as JSON, read as the flow reads manifest.json."""
    return render_card(Manifest.model_validate(manifest), **kwargs)


def split_fences(text: str) -> tuple[str, list[str]]:
    """(prose, code blocks), parsing fences as CommonMark does; fails if a block is left open."""
    prose, blocks, fence, block = [], [], None, []
    for line in text.split("\n"):
        if fence is None:
            opening = re.match(r"^ {0,3}(`{3,})", line)
            if opening:
                fence, block = opening.group(1), []
            else:
                prose.append(line)
        elif re.match(rf"^ {{0,3}}{fence}`*\s*$", line):
            blocks.append("\n".join(block))
            fence = None
        else:
            block.append(line)
    assert fence is None, "a fenced code block is never closed"
    return "\n".join(prose), blocks


def file_row(text: str, path: str) -> str:
    """The files-table row of ``path`` (that table opens each row with the recommendation mark)."""
    return one_line(text, rf"^\| (?:✅)? \| `{re.escape(path)}` \|")


def smoke_row(text: str, path: str) -> str:
    """The smoke-table row of ``path`` (that table opens each row with the file)."""
    return one_line(text, rf"^\| `{re.escape(path)}`")


def one_line(text: str, pattern: str) -> str:
    matches = re.findall(rf"{pattern}.*$", text, flags=re.M)
    assert len(matches) == 1, f"expected one line matching {pattern}, found {matches}"
    return matches[0]


def outside_code(text: str) -> str:
    """The text a Markdown renderer parses as Markdown/HTML: no fenced blocks, no code spans."""
    prose, _ = split_fences(text)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", prose)


def assert_tables_intact(prose: str) -> None:
    """Every row of every table has as many unescaped pipes as its header."""
    table: list[str] = []
    for line in [*prose.splitlines(), ""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            widths = {len(re.findall(r"(?<!\\)\|", r)) for r in table}
            assert len(widths) == 1, "a table's rows have different numbers of cells:\n" + "\n".join(table)
        table = []


# STRUCTURE AND PLACEHOLDERS


def test_two_files_link_each_other_and_only_readme_carries_front_matter(manifest):
    card = card_of(manifest)
    assert set(card.files) == {"README.md", "README_zh.md"}
    assert "**English** | [中文](README_zh.md)" in card.files["README.md"]
    assert "[English](README.md) | **中文**" in card.files["README_zh.md"]
    assert card.files["README.md"].startswith("---\n")
    assert not card.files["README_zh.md"].startswith("---")
    # The two languages mirror each other section for section.
    headings = {name: re.findall(r"^#{1,3} ", split_fences(text)[0], flags=re.M) for name, text in card.files.items()}
    assert headings["README.md"] == headings["README_zh.md"]


def passthrough_without_measurements(manifest: dict) -> dict:
    bare = copy.deepcopy(manifest)
    del bare["smoke"]
    bare["inject"] = {"action": "passthrough", "reason": "already has its own head", "head": None,
                      "bytes_written": 0}
    bare["inputs"]["donor"] = None
    bare["config"]["donor"] = None
    return bare


@pytest.mark.parametrize("variant", ["sample", "passthrough without measurements"])
def test_no_placeholder_or_raw_value_is_left(manifest, variant):
    if variant != "sample":
        manifest = passthrough_without_measurements(manifest)
    for name, text in card_of(manifest).files.items():
        for leftover in ("{{", "{%", "{#", "TODO", "Undefined"):
            assert leftover not in text, f"{name}: {leftover!r}"
        assert not re.search(r"\bNone\b", text), name
        assert not re.search(r"\bnan\b|\binf\b", text, flags=re.I), name


# NUMBERS ARE THE MANIFEST'S


def test_every_file_row_is_computed_from_the_manifest(manifest):
    card = card_of(manifest)
    arch = manifest["architecture"]
    whole, trunk = arch["parameters_total"], arch["parameters_total"] - arch["parameters_head"]
    sizes = {285_000_000: "285 MB", 105_000_000: "105 MB", 104_000_000: "104 MB", 60_000_000: "60 MB"}
    for text in card.files.values():
        for f in manifest["files"]:
            if f["role"] == "head":  # in its trunk's row, by path and size
                trunk_path = f["path"].replace("/mtp-", "/")
                assert f"| `{f['path']}` ({sizes[f['size']]}) |" in file_row(text, trunk_path)
                assert f["sha256"] in text
                continue
            cells = file_row(text, f["path"])
            assert f"| {sizes[f['size']]} |" in cells
            assert f"`{f['sha256'][:12]}`" in cells
            assert f"`{f['quant']}`" in cells
            if f["role"] == "model":
                parameters = whole if f["layout"] == "embedded" else trunk
                assert f"| {f['size'] * 8 / parameters:.2f} |" in cells
        assert all(f["sha256"] in text for f in manifest["files"])  # full hashes, in the details block
    trunk_file = "sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf"
    assert "| sidecar trunk |" in file_row(card.files["README.md"], trunk_file)
    assert "| 分离式主干 |" in file_row(card.files["README_zh.md"], trunk_file)
    embedded = "embedded/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf"
    assert "| in the file |" in file_row(card.files["README.md"], embedded)
    assert "| 在文件内 |" in file_row(card.files["README_zh.md"], embedded)


def test_changing_the_manifest_changes_the_card(manifest):
    before = card_of(manifest)
    changed = copy.deepcopy(manifest)
    changed["smoke"][0]["accepted"] = 31
    changed["files"][2]["size"] = 123_456_789
    after = card_of(changed)
    trunk = manifest["architecture"]["parameters_total"] - manifest["architecture"]["parameters_head"]
    for name in ("README.md", "README_zh.md"):
        assert "| 26 |" in smoke_row(before.files[name], "embedded/Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf")
        smoke_after = smoke_row(after.files[name], "embedded/Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf")
        assert "| 31 |" in smoke_after and "| 26 |" not in smoke_after
        trunk_row = file_row(after.files[name], "sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf")
        assert "| 123 MB |" in trunk_row and f"| {123_456_789 * 8 / trunk:.2f} |" in trunk_row
        assert "104 MB" not in after.files[name]


def test_architecture_table_and_head_share_are_computed(manifest):
    text = card_of(manifest).files["README.md"]
    assert "| Parameters | 136,881,920 (136.9M) |" in text
    assert f"| … of which the MTP head | 1,180,928 ({100 * 1_180_928 / 136_881_920:.2f}%) |" in text
    assert "in the pattern `LLLF` × 2" in text
    assert "| Attention heads / KV heads / head dim | 2 / 1 / 128 |" in text
    manifest["architecture"]["parameters_head"] = 2_000_000
    manifest["architecture"]["layer_pattern"] = "LLLLLLLF"
    text = card_of(manifest).files["README.md"]
    assert f"| … of which the MTP head | 2,000,000 ({100 * 2_000_000 / 136_881_920:.2f}%) |" in text
    assert "in the pattern `LLLLLLLF` (L = linear" in text


def test_what_was_done_names_donor_revision_and_tensors(manifest):
    text = card_of(manifest).files["README.md"]
    head = manifest["inject"]["head"]
    assert f"at revision `{head['donor_revision']}`: {len(head['tensors'])} tensors, 1,180,928 parameters" in text
    _, blocks = split_fences(text)
    assert "\n".join(head["tensors"]) in blocks


# MISSING MEASUREMENTS


def test_missing_measurements_say_not_measured(manifest):
    card = card_of(passthrough_without_measurements(manifest))
    english, chinese = card.files["README.md"], card.files["README_zh.md"]
    assert "**Smoke test:** not measured." in english
    assert "**Speed benchmark:** not measured." in english
    assert "**冒烟测试：**未测量。" in chinese
    assert "**速度基准测试：**未测量。" in chinese
    assert "The MTP head is the fine-tune's own head (1,180,928 parameters" in english
    assert "MTP 头是微调模型自带的" in chinese
    assert "MTP head donor" not in english and "slower than plain decoding" not in english


def test_speed_notes_follow_the_measured_figures(manifest):
    english = card_of(manifest).files["README.md"]
    assert "draft-mtp was slower than plain decoding for 2 of 2 files" in english
    assert "These figures come from a CPU without a GPU" in english
    assert "These are speeds of a small model (136.9M parameters)" in english

    for s in manifest["smoke"]:
        s["tokens_per_second_plain"], s["tokens_per_second_mtp"] = s["tokens_per_second_mtp"], s[
            "tokens_per_second_plain"]
    english = card_of(manifest).files["README.md"]
    assert "draft-mtp was faster than plain decoding for all 2 files" in english
    assert "slower" not in english and "CPU without a GPU" not in english


def bench_details(model: str, layout: str, configs: list[tuple[int, float, int, int]]) -> BenchResult:
    """A bench result as the stage computes it: per configuration (draft length, generation tok/s, drafted and
    accepted per request), three requests whose median is that speed; plain decoding first."""
    plain = configs[0][1]
    results = []
    for k, speed, drafted, accepted in configs:
        samples = tuple(Sample(prompt_id="code-1", domain="code", repetition=r, prompt_tokens=8,
                               prompt_per_second=150.0 + r, generated_tokens=32,
                               generation_per_second=speed + 0.01 * (r - 1), drafted=drafted, accepted=accepted)
                        for r in range(3))
        results.append(ConfigResult(config=f"mtp-k{k}" if k else "plain", draft_n_max=k,
                                    overall=figures_for("all", samples, k, plain if k else None), by_domain=(),
                                    matches_plain=True if k else None, mismatched_prompts=(), samples=samples))
    return BenchResult(model=model, head=None, quant=model.rsplit("-", 1)[1].removesuffix(".gguf"), layout=layout,
                       size_label="137M", llama_cpp="11434", hardware={"cpu": "test", "cores": 2},
                       prompt_set="mtpress/data/bench_prompts.jsonl", prompt_set_sha256="0" * 64, prompts=1,
                       domains=("code",), n_predict=32, repetitions=3, warmup=1, seed=42, spread="", notes=(),
                       configs=tuple(results))


def measured(manifest: dict) -> dict:
    """The sample manifest with the bench, quality and head-choice records the publish flow writes.

    The speeds are chosen so that a ratio of the unrounded figures contradicts the rounded ones (12.56 / 10.04
    is 1.251, but the card shows 12.6 and 10.0), and the quant's perplexity is llama-perplexity's literal output,
    whose own PPL(Q)/PPL(base) (23.77) contradicts the two perplexities (7.29e+07 against BF16's 8.48e+07)."""
    manifest = copy.deepcopy(manifest)
    q4, bf16 = "Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf", "Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf"
    manifest["bench_details"] = jsonable([
        bench_details(q4, "sidecar", [(0, 10.04, 0, 0), (1, 12.56, 20, 15), (2, 9.96, 20, 10), (3, 14.449, 30, 8)]),
        bench_details(bf16, "embedded", [(0, 3.35, 0, 0), (2, 3.65, 40, 26)])])
    manifest["quality_details"] = jsonable(QualityResult(
        base_model=bf16, base_ppl=Estimate(84800851.3208, 18535953.57564), calibration="mtpress/data/calibration.txt",
        calibration_sha256="0" * 64, ctx_size=128, chunks=8, tokens_scored=8 * 63, base_logits_bytes=1,
        llama_cpp="11434", quants=(parse_kl_run(KL_OUTPUT, quality_gguf(q4, "Q4_K_M")),), notes=()))
    copied = {"drafted": 100, "accepted": 80, "acceptance": 0.75, "per_repetition": [0.8, 0.8, 0.8]}
    manifest["head_choice"] = {
        "source": "best", "published": "copied", "beyond_spread": False, "copied": copied,
        "realigned": {"drafted": 90, "accepted": 61, "acceptance": 0.7, "per_repetition": [0.7, 0.6, 0.7]},
        "data": {"tokens": 4208, "sequences": 48, "generated_tokens": 3072, "prompt_set": "mtpress/prompts.jsonl"},
        "training": {"steps": 200, "seed": 0, "wall_seconds": 31.5, "acceptance_before": 0.76,
                     "acceptance_after": 0.94, "hardware": {"device": "cpu"}}, "remote": None}
    return manifest


HEADERS = {  # (column of the ratio, its parts...) per table, as each language names them
    "README.md": {"smoke": ("with / without", "tokens/s with MTP", "tokens/s without MTP", "Acceptance", "Accepted",
                            "Drafted"),
                  "bench": ("Speedup (generation ÷ plain's)", "Generation tok/s, median (IQR)",
                            "Pooled acceptance (accepted ÷ drafted)", "Accepted", "Drafted",
                            "Per-position α (estimated)", "Bound: tokens per step", "Config", "File"),
                  "quality": ("PPL ÷ BF16's PPL", "Perplexity (PPL)", "Quant"),
                  "head": ("acceptance α", "accepted", "drafted"),
                  "share": ("… of which the MTP head", "Parameters")},
    "README_zh.md": {"smoke": ("开启 / 不开", "开启 MTP（token/s）", "不开 MTP（token/s）", "接受率", "被接受数",
                               "草稿 token 数"),
                     "bench": ("加速比（生成速度 ÷ 普通解码）", "生成速度 token/s，中位数（四分位距）",
                               "汇总接受率（被接受数 ÷ 草稿 token 数）", "被接受数", "草稿 token 数",
                               "单位置接受率 α（估计）", "上限：每步 token 数", "配置", "文件"),
                     "quality": ("PPL ÷ BF16 的 PPL", "困惑度（PPL）", "量化"),
                     "head": ("接受率 α", "被接受数", "草稿 token 数"),
                     "share": ("其中 MTP 头", "参数量")},
}


def table_with(text: str, column: str) -> list[dict[str, str]]:
    """The rows of the one table that has ``column``, as header → cell (code spans unwrapped)."""
    def cells(line: str) -> list[str]:
        return [c.strip().strip("`") for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    lines = split_fences(text)[0].splitlines()
    [start] = [i for i, line in enumerate(lines) if line.startswith("|") and column in cells(line)]
    headers, rows = cells(lines[start]), []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(headers, cells(line), strict=True)))
    return rows


def number(cell: str) -> float:
    """A figure as the card shows it: "1,234.5", "61.8%", "1.26×", "8.48009e+07 ± 1.854e+07"."""
    return float(re.split(r" ± | \(|（", cell)[0].replace(",", "").rstrip("%×"))


def assert_every_ratio_agrees_with_its_parts(text: str, name: str) -> int:
    """Recompute every ratio on the card from the figures shown beside it, as a reader would; returns how many."""
    h, checked = HEADERS[name], 0
    ratio, mtp, plain, acceptance, accepted, drafted = h["smoke"]
    for row in table_with(text, ratio):
        assert row[ratio] == f"{number(row[mtp]) / number(row[plain]):.2f}×", row
        assert row[acceptance] == f"{100 * number(row[accepted]) / number(row[drafted]):.1f}%", row
        checked += 2
    speedup, speed, pooled, accepted, drafted, alpha, bound, config, file = h["bench"]
    rows = table_with(text, speedup)
    plain_speed = {row[file]: number(row[speed]) for row in rows if row[config] == "plain"}
    for row in (row for row in rows if row[config] != "plain"):
        k, rate = int(row[config].removeprefix("mtp-k")), number(row[accepted]) / number(row[drafted])
        assert row[speedup] == f"{number(row[speed]) / plain_speed[row[file]]:.2f}×", row
        assert row[pooled] == f"{100 * rate:.1f}%", row
        assert row[alpha] == f"{100 * per_position_acceptance(rate, k):.1f}%", row
        assert row[bound] == f"{acceptance_bound(per_position_acceptance(rate, k), k):.2f}×", row
        checked += 4
    ratio, ppl, quant = h["quality"]
    rows = table_with(text, ratio)
    [bf16] = [number(row[ppl]) for row in rows if row[quant] == "BF16"]
    for row in rows:
        assert row[ratio] == f"{number(row[ppl]) / bf16:.4f}", row
        checked += 1
    acceptance, accepted, drafted = h["head"]
    for row in table_with(text, acceptance):
        assert row[acceptance] == f"{100 * number(row[accepted]) / number(row[drafted]):.1f}%", row
        checked += 1
    head, total = h["share"]
    shown = {line.split(" | ")[0].strip("| "): line.split(" | ")[1] for line in text.splitlines()
             if line.startswith(f"| {head} |") or line.startswith(f"| {total} |")}
    share = re.search(r"[(（](.*)[)）]", shown[head]).group(1)
    assert share == f"{100 * number(shown[head]) / number(shown[total]):.2f}%"
    return checked + 1


def test_every_ratio_on_the_card_is_computed_from_the_figures_beside_it(manifest):
    card = card_of(measured(manifest))
    for name, text in card.files.items():
        # 2 smoke rows x 2, 4 draft-mtp bench rows x 4, 2 quality rows, 2 heads, the head's share
        assert assert_every_ratio_agrees_with_its_parts(text, name) == 4 + 16 + 2 + 2 + 1, name
        assert "23.77" not in text, "llama-perplexity's own ratio contradicts the perplexities beside it"
    english = card.files["README.md"]
    speedups = [row["Speedup (generation ÷ plain's)"] for row in table_with(english, "Speedup (generation ÷ plain's)")]
    # 12.6 / 10.0 and 3.6 / 3.4 as shown, not 12.56 / 10.04 = 1.25 and 3.65 / 3.35 = 1.09
    assert speedups == ["—", "1.26×", "1.00×", "1.44×", "—", "1.06×"]
    assert "| 61.8% | 2.00× |" in english  # pooled 50% at k = 2 is alpha = 0.618, whose bound is 2.00


def test_a_ratio_that_contradicts_its_parts_is_caught(manifest):
    """The check above fails on the card's old arithmetic: a speedup from unrounded medians."""
    text = card_of(measured(manifest)).files["README.md"].replace("| 1.26× |", "| 1.25× |")
    with pytest.raises(AssertionError, match="1.25×"):
        assert_every_ratio_agrees_with_its_parts(text, "README.md")


def test_bench_names_pooled_and_per_position_acceptance_in_both_languages(manifest):
    card = card_of(measured(manifest))
    english, chinese = card.files["README.md"], card.files["README_zh.md"]
    assert "**Pooled acceptance** is what llama.cpp counts" in english
    assert "(α + α² + … + αᵏ) ÷ k" in english and "**Per-position α (estimated)**" in english
    assert "**汇总接受率**" in chinese and "**单位置接受率 α（估计）**" in chinese
    assert "(α + α² + … + αᵏ) ÷ k" in chinese
    # A manifest from before the estimate holds a bound computed from the pooled rate: not shown.
    old = measured(manifest)
    for result in old["bench_details"]:
        for config in result["configs"]:
            del config["overall"]["acceptance_per_position"]
    row = table_with(card_of(old).files["README.md"], "Bound: tokens per step")[2]
    assert row["Per-position α (estimated)"] == row["Bound: tokens per step"] == "not measured"
    assert row["Pooled acceptance (accepted ÷ drafted)"] == "50.0%"


def test_measurements_of_later_stages_are_shown_with_the_hardware(manifest):
    manifest = measured(manifest)
    manifest["gate"] = [{"client": "llama.cpp -hf", "version": "b11434", "request": "-hf x/y-staging:Q4_K_M",
                         "trunk": "T-Q4_K_M.gguf", "head": "mtp-T-Q4_K_M.gguf", "mmproj": "", "matches": "16/16 tokens",
                         "drafted": 12, "accepted": 8}]  # the release gate's rows (GateResult.table())
    card = card_of(manifest)
    english = card.files["README.md"]
    assert ("| `sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf` | `mtp-k1` | 12.6 (0.0) | 151.0 | 60 | 45 | 75.0% |"
            in english)
    assert "| `embedded/Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf` | `BF16` | 8.48009e+07 ± 1.8536e+07 | 1.0000 |" in english
    gate_row = ("| llama.cpp -hf | b11434 | -hf x/y-staging:Q4\\_K\\_M | T-Q4\\_K\\_M.gguf | mtp-T-Q4\\_K\\_M.gguf |  "
                "| 16/16 tokens | 12 | 8 |")
    assert gate_row in english
    assert "Measured on AMD EPYC 7B13 (2 cores), no GPU, Linux 6.1.0, with llama.cpp build 11434." in english
    assert "8 chunks of 128 tokens, each scored on its second half (504 tokens in all)" in english
    assert gate_row in card.files["README_zh.md"]
    assert "**Quality against the unquantized model:** not measured." in card_of(
        {k: v for k, v in manifest.items() if k != "quality_details"}).files["README.md"]


def test_the_card_links_the_apple_silicon_pack_in_both_languages(manifest):
    assert "MLX / MTPLX build:** not measured." in card_of(manifest).files["README.md"]
    manifest["mlx"] = {"repo": "someone/Model-MTP-GGUF-MTPLX", "bits": 4, "verification": "unverified"}
    card = card_of(manifest)
    link = "[someone/Model-MTP-GGUF-MTPLX](/someone/Model-MTP-GGUF-MTPLX)"
    assert f"published separately: {link}" in card.files["README.md"]
    assert f"单独发布在 {link}" in card.files["README_zh.md"]
    assert "| `bits` | 4 |" in card.files["README.md"]


# USAGE AND RECOMMENDATION


def test_usage_commands_come_from_the_files_and_the_smoke_settings(manifest):
    english = card_of(manifest).files["README.md"]
    _, blocks = split_fences(english)
    commands = "\n".join(blocks)
    repo = manifest["config"]["target"]["repo"]
    assert f"llama-server -hf {repo}:Q4_K_M --spec-type draft-mtp --spec-draft-n-max 2" in commands
    assert f"llama-cli -hf {repo}:Q4_K_M\n" in commands
    assert ("llama-server -m sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf "
            "-md sidecar/mtp-Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf --spec-type draft-mtp") in commands
    assert "Ollama (reported for 0.24) and LM Studio fail" in english

    manifest["config"]["smoke"]["draft_n_max"] = 3
    manifest["files"] = [f for f in manifest["files"] if f["layout"] == "embedded"]
    english = card_of(manifest).files["README.md"]
    assert "--spec-draft-n-max 3" in english and "--spec-draft-n-max 2" not in english
    assert "-md " not in english
    assert "Every file in this release has its MTP layer embedded, so these apps cannot load them" in english


def test_paths_come_from_the_manifest_when_a_layout_sits_at_the_repo_root(manifest):
    for f in manifest["files"]:
        f["path"] = f["path"].removeprefix("sidecar/")
    card = card_of(manifest)
    english, chinese = card.files["README.md"], card.files["README_zh.md"]
    assert "- Sidecar, at the repo root:" in english and "- Embedded, in `embedded/`:" in english
    assert "- 分离式（位于仓库根目录）：" in chinese and "- 内嵌式（位于 `embedded/` 文件夹）：" in chinese
    _, blocks = split_fences(english)
    assert ("llama-server -m Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf -md mtp-Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf "
            "--spec-type draft-mtp --spec-draft-n-max 2") in "\n".join(blocks)
    # Smoke records name files by layout and name; the card shows where they are in the repo.
    assert "| ✅ yes | 38 | 24 |" in smoke_row(english, "Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf")
    assert "| ✅ yes | 40 | 26 |" in smoke_row(english, "embedded/Tiny-Qwen3.5-Demo-FT-MTP-BF16.gguf")


def test_recommendation_rule_prefers_q4_k_m_then_sidecar():
    def file(layout, role, quant):
        return {"path": f"{layout}/x-{quant}.gguf", "layout": layout, "role": role, "quant": quant}

    everything = [file(layout, role, quant) for layout in ("embedded", "sidecar") for quant in ("Q8_0", "Q4_K_M")
                  for role in ("model", "head") if not (layout == "embedded" and role == "head")]
    assert recommended_model(everything) == file("sidecar", "model", "Q4_K_M")
    embedded_only = [f for f in everything if f["layout"] == "embedded"]
    assert recommended_model(embedded_only) == file("embedded", "model", "Q4_K_M")
    no_q4 = [f for f in everything if f["quant"] != "Q4_K_M"]
    assert recommended_model(no_q4) == file("sidecar", "model", "Q8_0")
    assert recommended_model([file("sidecar", "model", "Q2_K"), file("embedded", "model", "BF16")]) is None


def test_the_recommended_pair_is_marked(manifest):
    english = card_of(manifest).files["README.md"]
    [marked] = [line for line in english.splitlines() if line.startswith("| ✅ |")]  # one row: trunk and head
    assert "| `sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf` |" in marked
    assert "| `sidecar/mtp-Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf` (60 MB) |" in marked


# UNTRUSTED TEXT


def hostile(manifest: dict) -> dict:
    evil = copy.deepcopy(manifest)
    evil["release"] = HOSTILE_NAME
    evil["architecture"]["family"] = HOSTILE_NAME
    evil["inputs"]["finetune"]["license"] = HOSTILE_LICENSE
    evil["inputs"]["donor"]["license"] = "<img src=x onerror=alert(2)>"
    evil["config"]["smoke"]["prompt"] = HOSTILE_NAME + "\n```\n<b>out of the fence</b>"
    evil["files"][0]["path"] = f"embedded/{HOSTILE_NAME}.gguf"
    evil["smoke"][0]["model"] = f"{HOSTILE_NAME}.gguf"
    return evil


def test_hostile_upstream_text_is_shown_as_text_never_evaluated(manifest):
    card = card_of(hostile(manifest))
    for name, text in card.files.items():
        prose, blocks = split_fences(text)  # also proves no value closed a code fence
        markdown = outside_code(text)
        assert "<script" not in markdown and "<img" not in markdown and "<b>" not in markdown, name
        assert "{{" not in markdown, name
        assert r"\{\{ 7\*7 \}\}&lt;script&gt;alert(1)&lt;/script&gt;\|x" in prose, name  # shown, escaped
        assert_tables_intact(prose)
        rerun = shlex.join(["mtpress", "publish", f"model_configs/{HOSTILE_NAME}.yaml"])
        assert any(rerun in block for block in blocks), name  # one inert shell word
    assert card.files["README.md"].count("base_model:") == 1


def test_hostile_license_cannot_rewrite_the_front_matter(manifest):
    card = card_of(hostile(manifest))
    assert card.front_matter["license"] == "other"
    assert card.front_matter["base_model"] == manifest["config"]["finetune"]["repo"]
    assert ModelCard(card.files["README.md"]).data.to_dict() == card.front_matter
    assert "This is not a Hub license identifier, so the metadata says `other`." in card.files["README.md"]
    assert r"apache-2.0 --- base\_model: evil/repo x: \{\{ 7\*7 \}\}" in card.files["README.md"]


def test_escaping_helpers():
    assert escape_markdown("a|b<c>`d`\n*e* [f](g)") == r"a\|b&lt;c&gt;\`d\` \*e\* \[f\](g)"
    assert code_span("a`b|c") == r"``a`b\|c``"
    assert fenced("x\n````\ny").startswith("`````\n")


# FRONT MATTER


def test_front_matter_round_trips_through_model_card(manifest):
    card = card_of(manifest)
    assert card.front_matter == {
        "base_model": "mtpress-demo/Tiny-Qwen3.5-Demo-FT", "base_model_relation": "quantized",
        "license": "apache-2.0", "language": ["en", "zh"], "library_name": "gguf",
        "pipeline_tag": "text-generation", "tags": ["gguf", "mtp", "speculative-decoding", "qwen3.5"],
    }
    parsed = ModelCard(card.files["README.md"])
    assert parsed.data.to_dict() == card.front_matter
    assert parsed.data.base_model_relation == "quantized"  # an extra kwarg of ModelCardData
    assert ModelCardData(**card.front_matter).to_dict() == card.front_matter


def test_license_comes_from_the_config_else_upstream_else_is_not_recorded(manifest):
    manifest["config"]["target"]["license"] = "mit"
    card = card_of(manifest)
    assert card.front_matter["license"] == "mit"
    assert "License: mit, as set in the release config." in card.files["README.md"]

    manifest["config"]["target"]["license"] = None
    manifest["inputs"]["finetune"]["license"] = None
    card = card_of(manifest)
    assert "license" not in card.front_matter
    assert "License: not recorded." in card.files["README.md"]
    assert "许可证：未记录。" in card.files["README_zh.md"]


# ENCODING


@pytest.mark.parametrize("damaged", SEED_MOJIBAKE + CP1252_MOJIBAKE)
def test_mojibake_is_detected(damaged):
    with pytest.raises(CardError, match="encoding damage"):
        check_no_mojibake(damaged)


@pytest.mark.parametrize("clean", CLEAN_TEXT)
def test_real_text_is_not_mojibake(clean):
    check_no_mojibake(clean)


def test_render_refuses_a_manifest_with_mojibake(manifest):
    manifest["architecture"]["family"] = "Qwen3.5 β€” MTP"
    with pytest.raises(CardError, match=r"README\.md: encoding damage \(UTF-8 read as cp1253\)"):
        card_of(manifest)


def test_chinese_card_is_written_as_utf8_and_reads_back_intact(manifest, tmp_path):
    write_manifest(tmp_path, Manifest.model_validate(manifest))
    card = render_card_from_release(tmp_path)
    assert card == card_of(manifest)
    written = write_card(tmp_path, card)
    assert sorted(p.name for p in written) == ["README.md", "README_zh.md"]
    raw = (tmp_path / "README_zh.md").read_bytes()
    assert raw.decode("utf-8") == card.files["README_zh.md"]
    for phrase in ("## 做了什么", "## 测试结果", "推荐的默认选择", "未测量", "沿用微调模型的模型卡中声明的许可证"):
        assert phrase.encode("utf-8") in raw
    check_no_mojibake(raw.decode("utf-8"))
    assert not list(tmp_path.glob("*.partial"))


def test_a_release_without_manifest_is_an_error(tmp_path):
    with pytest.raises(CardError, match="no manifest.json"):
        render_card_from_release(tmp_path)


# TEMPLATES FAIL LOUDLY


@pytest.mark.parametrize("template, problem", [
    ("{{ card.no_such_fact }}", "no_such_fact"),  # StrictUndefined: a missing fact is an error
    ("{{ card.smoke[0].acceptance }}", "printed 0.65 as is"),  # a number must be formatted explicitly
    ("{{ card.license_id.__class__.__mro__ }}", "unsafe"),  # the sandbox
])
def test_templates_fail_loudly(manifest, tmp_path, template, problem):
    for name in ("README.md.j2", "README_zh.md.j2"):
        (tmp_path / name).write_text(template, encoding="utf-8")
    with pytest.raises(CardError, match=re.escape(problem)):
        card_of(manifest, templates_dir=tmp_path)


def test_the_files_table_shows_each_models_kld_and_picks_derived_from_the_figures(manifest):
    """Mean KLD beside each model file is the quality table's for its quant; the "pick this if" notes follow from
    sizes and KLDs; the imatrix column says which files were made with the release's importance matrix."""
    manifest = measured(manifest)
    q2 = copy.deepcopy(next(f for f in manifest["files"] if f["quant"] == "Q4_K_M" and f["layout"] == "sidecar"
                            and f["role"] == "model"))
    q2.update(quant="Q2_K", path="Tiny-Qwen3.5-Demo-FT-MTP-Q2_K.gguf", name="Tiny-Qwen3.5-Demo-FT-MTP-Q2_K.gguf",
              size=q2["size"] // 2, imatrix="imatrix-Tiny-Qwen3.5-Demo-FT.gguf")
    manifest["files"].append(q2)
    quality = manifest["quality_details"]
    low = copy.deepcopy(quality["quants"][0])
    low.update(model=q2["name"], quant="Q2_K", kld_mean={"value": 0.04, "error": 0.01, "unit": ""})
    quality["quants"].append(low)
    english = card_of(manifest).files["README.md"]
    rows = {(r["File"], r["Quant"]): r for r in table_with(english, "Pick this if")}
    klds = {r["Quant"]: r["Mean KLD"].split(" ± ")[0] for r in table_with(english, "Median KLD")}
    for (path, quant), row in rows.items():
        if "/mtp-" not in path and not path.startswith("mtp-"):
            assert row["Mean KLD"] == ("0" if quant == "BF16" else klds[quant]), path
    assert rows[(q2["path"], "Q2_K")]["Pick this if"] == "smallest file; smallest with mean KLD ≤ 0.05; closest to BF16"
    assert rows[(q2["path"], "Q2_K")]["imatrix"] == "yes"
    assert rows[("sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf", "Q4_K_M")]["Pick this if"] == "recommended default"
    assert rows[("sidecar/Tiny-Qwen3.5-Demo-FT-MTP-Q4_K_M.gguf", "Q4_K_M")]["imatrix"] == "no"
    chinese = card_of(manifest).files["README_zh.md"]
    assert "文件最小；平均 KLD ≤ 0.05 中最小；最接近 BF16" in chinese
