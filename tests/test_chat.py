"""The chat path: smoke sends one chat request with the GGUF's own template, with and without draft-mtp.

A GGUF can generate perfectly through ``/completion`` and still be unusable in every chat client: its
template may not parse or render in llama.cpp's Jinja engine (the server then refuses to start), or its
thinking markers may not be the ones llama.cpp's reasoning parser splits on (the reasoning leaks into the
answer). These tests hold smoke to both, through the real llama-server.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtpress.errors import ChatTemplateError, QualityGateError
from mtpress.schema import SmokeSpec
from mtpress.stages.smoke import CHAT_N_PREDICT, Chat, check_chat, expected_split, template_error

SPEC = SmokeSpec(n_predict=16)
# What llama-server b11434 logged for a template with a syntax error (`{{ message.content }` unclosed).
PARSE_ERROR_LOG = """\
0.05.803.099 I srv    load_model: initializing, n_slots = 1, n_ctx_slot = 2048, kv_unified = 'false'
0.05.803.543 E common_chat_templates_init: error: parser: Parser Error: Expected }} (Got })
...essage in messages %}{{ message.content }...
                                           ^
0.05.803.543 E common_chat_templates_init: failed to initialize chat template
0.05.803.544 E common_chat_templates_init: please consider disabling jinja via --no-jinja, or using another \
chat template
0.05.803.577 E srv          init: init: chat template parsing error: std::exception
0.05.805.151 E srv  llama_server: exiting due to model loading error
"""
# Renders (the server starts), but raises as soon as llama.cpp renders a conversation to build its parser.
UNRENDERABLE = "{{ raise_exception('this template refuses to render') }}"


def reply(text: str, reasoning: str, content: str, *, opened: bool = True, n: int = CHAT_N_PREDICT) -> Chat:
    return Chat(tuple(range(n)), text, reasoning, content, opened)


# THE CHECKS (fast)


def test_the_reasoning_split_is_llama_cpps_deepseek_format():
    # Qwen3.5's template opens the think block in the prompt: the text up to </think> is reasoning.
    assert expected_split(reply("a plan\n</think>\n\nThe answer.", "", "")) == ("a plan", "The answer.")
    assert expected_split(reply("still thinking", "", "")) == ("still thinking", "")
    # A template that opens none: the model's own <think> block, or nothing, is reasoning.
    assert expected_split(reply("<think>\nhm</think>Yes.", "", "", opened=False)) == ("hm", "Yes.")
    assert expected_split(reply("Yes.", "", "", opened=False)) == ("", "Yes.")


def test_a_chat_reply_whose_reasoning_leaks_into_the_content_fails():
    good = reply("a plan\n</think>\n\nThe answer.", "a plan", "The answer.")
    check_chat("smoke X.gguf", good, good, CHAT_N_PREDICT)
    # What a client sees when the template's markers are not the ones the parser splits on.
    leaked = reply("a plan\n</think>\n\nThe answer.", "", "a plan\n</think>\n\nThe answer.")
    with pytest.raises(QualityGateError, match=r"^smoke X\.gguf: the chat reply \(plain\) is not split as llama\.cpp's "
                                               r"deepseek reasoning format splits its text 'a plan\\n</think>"):
        check_chat("smoke X.gguf", leaked, good, CHAT_N_PREDICT)


def test_a_chat_reply_that_is_short_or_differs_with_draft_mtp_fails():
    good = reply("a plan", "a plan", "")
    with pytest.raises(QualityGateError, match=r"chat request \(draft-mtp\) generated 3 tokens, asked for 16"):
        check_chat("smoke X.gguf", good, reply("a plan", "a plan", "", n=3), CHAT_N_PREDICT)
    other = Chat((0, 1, 2, 9) + tuple(range(4, CHAT_N_PREDICT)), "a plan", "a plan", "", True)
    with pytest.raises(QualityGateError, match=r"chat request with draft-mtp differs from plain decoding at token 3"):
        check_chat("smoke X.gguf", good, other, CHAT_N_PREDICT)


def test_the_template_error_is_quoted_from_llama_servers_log():
    quoted = template_error(PARSE_ERROR_LOG)
    assert quoted.startswith("0.05.803.543 E common_chat_templates_init: error: parser: Parser Error: Expected }}")
    assert "{{ message.content }..." in quoted and "failed to initialize" not in quoted
    assert template_error("0.01 E llama_model_load: error loading model: tensor data is not within bounds") is None


# THROUGH THE REAL SERVER (slow)


@pytest.fixture(scope="module")
def unrenderable_gguf(tmp_path_factory, demo_ggufs):
    """The demo's Q4_K_M GGUF (the smaller one) with tokenizer.chat_template replaced, copied with gguf-py's own
    metadata tool."""
    path = tmp_path_factory.mktemp("broken-template") / "Broken-Q4_K_M.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(demo_ggufs[1].path), str(path),
                    "--chat-template", UNRENDERABLE, "--force"], check=True, capture_output=True)
    from dataclasses import replace

    return replace(demo_ggufs[1], path=path, name=path.name)


@pytest.mark.slow
def test_smoke_chats_through_the_ggufs_template_with_identical_tokens_and_parsed_reasoning(toolchain, demo_ggufs):
    from mtpress.manifest import SmokeRow
    from mtpress.stages.smoke import smoke

    result = smoke(demo_ggufs[0], None, SPEC, toolchain)
    assert result.passed and result.chat_tokens_identical and len(result.chat_tokens) == CHAT_N_PREDICT
    # The demo carries Qwen3.5's template, which opens a think block: 16 tokens of a tiny model never close it,
    # so llama.cpp puts all of them in reasoning_content and nothing in the answer.
    assert result.chat_reasoning and result.chat_content == ""
    row = SmokeRow.model_validate(result.__dict__)
    assert row.chat_tokens == result.chat_tokens and row.chat_reasoning == result.chat_reasoning


@pytest.mark.slow
def test_a_gguf_whose_chat_template_does_not_render_fails_smoke_with_llama_cpps_error(toolchain, unrenderable_gguf):
    from mtpress.stages.smoke import smoke

    with pytest.raises(ChatTemplateError, match=r"^smoke Broken-Q4_K_M\.gguf: llama-server \(--jinja\) cannot use "
                                                r"the file's chat template \(tokenizer\.chat_template\) and exits: "
                                                r"(.|\n)*Jinja Exception: this template refuses to render") as err:
        smoke(unrenderable_gguf, None, SPEC, toolchain)
    assert "base model's" in err.value.hint
