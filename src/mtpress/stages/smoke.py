"""Load every produced file in llama.cpp and prove the head drafts without changing greedy output.

For each model file: generate greedily without MTP, then with ``--spec-type draft-mtp``; the token
sequences must be identical (the target verifies every draft), drafts must have been proposed, and at
least ``min_acceptance`` of them accepted. Identical output proves the verifier, not the head: a head of
the right shape with useless weights drafts, is never right, and only its acceptance shows it.

With a vision projector (``--mmproj``), each of the two servers also answers a request carrying an
image, under the same rules, and the text request proves text-only use still works on those files.
In this llama.cpp the MTP head never sees image tokens (``draft-mtp`` skips batches of embeddings),
so the draft figures that describe a release, and the acceptance floor, come from the text request.

Each server also answers one chat request (``/v1/chat/completions``) rendered with the GGUF's own chat
template (``--jinja``): both must answer with identical tokens, and the reply must be split into reasoning and
content as llama.cpp's ``deepseek`` reasoning format does with the generated text. A template llama.cpp cannot
parse or render stops the server at start; smoke reports it as ChatTemplateError with llama.cpp's words.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import resources

from mtpress.errors import ChatTemplateError, DeadHeadError, QualityGateError, ToolFailedError
from mtpress.schema import SmokeSpec
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp
from mtpress.toolchain.server import llama_server

SEED = 42
# Pinned through LLAMA_MEDIA_MARKER: by default llama-server draws a random marker per process.
MEDIA_MARKER = "<__media__>"
IMAGE_RESOURCE = "data/smoke_image.png"
# The chat request: short (it proves the template and the reasoning parser, the text request measures the head).
CHAT_N_PREDICT = 16
CHAT_ENDPOINT = "/v1/chat/completions"
# Pinned rather than llama-server's "auto": the reasoning block goes to message.reasoning_content, the rest to content.
REASONING_FORMAT = "deepseek"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Generation:
    tokens: tuple[int, ...]
    text: str
    drafted: int
    accepted: int
    predicted_per_second: float


@dataclass(frozen=True)
class Chat:
    """One chat reply: the tokens generated, their text, and how the server split that text."""

    tokens: tuple[int, ...]
    text: str
    reasoning: str
    content: str
    template_opened_think: bool  # the rendered prompt ends inside a think block (a thinking template's default)


@dataclass(frozen=True)
class SmokeResult:
    model: str
    head: str | None
    quant: str
    layout: str
    n_predict: int
    draft_n_max: int
    tokens_identical: bool | None  # None: the file has no head, nothing ran with MTP
    tokens: tuple[int, ...]  # the greedy output, so any later client (the -hf gate) can be compared with it
    drafted: int
    accepted: int
    acceptance: float | None
    tokens_per_second_plain: float
    tokens_per_second_mtp: float | None
    passed: bool
    mmproj: str | None = None
    # The image request (only with an mmproj): plain vs. draft-mtp, as for text.
    image_tokens_identical: bool | None = None
    image_tokens: tuple[int, ...] = ()
    image_drafted: int | None = None
    image_accepted: int | None = None
    # The chat request (the GGUF's own template): plain vs. draft-mtp; the reply split as llama.cpp splits it.
    chat_tokens_identical: bool | None = None
    chat_tokens: tuple[int, ...] = ()
    chat_reasoning: str = ""
    chat_content: str = ""


def greedy_request(prompt: str | dict, n_predict: int) -> dict:
    """A deterministic completion request. ``samplers: [top_k]`` skips the default chain, which over
    a 248k vocabulary costs more than the model itself on a tiny checkpoint."""
    return {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
            "seed": SEED, "return_tokens": True, "cache_prompt": False, "ignore_eos": True}


def chat_request(prompt: str, n_predict: int) -> dict:
    """A deterministic chat request. ``n_probs`` with ``post_sampling_probs`` returns each generated token's id
    and bytes (the OpenAI reply has only text); after ``top_k: 1`` that is one candidate, so it costs nothing."""
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": n_predict, "temperature": 0,
            "top_k": 1, "samplers": ["top_k"], "seed": SEED, "n_probs": 1, "post_sampling_probs": True,
            "cache_prompt": False, "ignore_eos": True}


def generate(tools: LlamaCpp, server_args: list[str], spec: SmokeSpec) -> Generation:
    return generate_with_image(tools, server_args, spec, None)[0]


def generate_with_image(tools: LlamaCpp, server_args: list[str], spec: SmokeSpec, image: bytes | None,
                        threads: int | None = None, *, chat: bool = False
                        ) -> tuple[Generation, Generation | None, Chat | None]:
    """The text request and, given ``image``, one that carries it, and with ``chat`` one chat request, on one
    server."""
    env = {"LLAMA_MEDIA_MARKER": MEDIA_MARKER} if image is not None else None
    with llama_server(tools, server_args, timeout=spec.timeout_s, threads=threads, env=env) as server:
        text = parse_generation(server.completion(greedy_request(spec.prompt, spec.n_predict), timeout=spec.timeout_s))
        with_image = None if image is None else parse_generation(server.completion(
            greedy_request(image_prompt(spec.prompt, image), spec.n_predict), timeout=spec.timeout_s))
        if not chat:
            return text, with_image, None
        request = chat_request(spec.prompt, CHAT_N_PREDICT)
        rendered = server.post("/apply-template", request, timeout=spec.timeout_s)["prompt"]
        return text, with_image, parse_chat(server.post(CHAT_ENDPOINT, request, timeout=spec.timeout_s), rendered)


def parse_chat(body: dict, rendered_prompt: str) -> Chat:
    """A chat reply to ``chat_request``; ``rendered_prompt``: the template's output for it (``/apply-template``)."""
    message = body["choices"][0]["message"]
    generated = (body["choices"][0].get("logprobs") or {}).get("content") or []
    # Bytes, not the token strings: a token may end inside a multi-byte character.
    text = b"".join(bytes(token["bytes"]) for token in generated).decode("utf-8", errors="replace")
    return Chat(tuple(token["id"] for token in generated), text, message.get("reasoning_content") or "",
                message.get("content") or "", rendered_prompt.rstrip().endswith(THINK_OPEN))


def expected_split(chat: Chat) -> tuple[str, str]:
    """(reasoning, content) as llama.cpp's ``deepseek`` reasoning format makes them of the generated text: a think
    block, opened by the rendered prompt (Qwen3.5's template ends the prompt with ``<think>``) or by the model,
    is reasoning up to ``</think>``; the rest is content. Compared without surrounding whitespace."""
    text = chat.text
    opened = chat.template_opened_think or text.lstrip().startswith(THINK_OPEN)
    if not opened:
        return "", text.strip()
    reasoning, _, content = text.lstrip().removeprefix(THINK_OPEN).partition(THINK_CLOSE)
    return reasoning.strip(), content.strip()


def check_chat(what: str, plain: Chat, with_mtp: Chat | None, n_predict: int) -> None:
    """QualityGateError naming ``what`` if a chat reply is short or empty, differs with draft-mtp, or is not split
    into reasoning and content as llama.cpp's reasoning format splits its text."""
    for label, chat in (("plain", plain), ("draft-mtp", with_mtp)):
        if chat is None:
            continue
        if len(chat.tokens) != n_predict or not (chat.reasoning or chat.content).strip():
            raise QualityGateError(f"{what}: the chat request ({label}) generated {len(chat.tokens)} tokens, asked "
                                   f"for {n_predict}, reasoning {chat.reasoning!r}, content {chat.content!r}",
                                   hint="the chat template renders but the model does not answer through it")
        reasoning, content = expected_split(chat)
        if (chat.reasoning.strip(), chat.content.strip()) != (reasoning, content):
            raise QualityGateError(
                f"{what}: the chat reply ({label}) is not split as llama.cpp's {REASONING_FORMAT} reasoning format "
                f"splits its text {chat.text!r}: expected reasoning {reasoning!r} and content {content!r}, got "
                f"{chat.reasoning!r} and {chat.content!r}",
                hint="the chat template's thinking markers are not the ones llama.cpp parses for this model; check "
                     "tokenizer.chat_template against the base model's")
    if with_mtp is not None and plain.tokens != with_mtp.tokens:
        first = next(i for i, (a, b) in enumerate(zip(plain.tokens + (None,), with_mtp.tokens + (None,))) if a != b)
        raise QualityGateError(f"{what}: greedy output of the chat request with draft-mtp differs from plain decoding "
                               f"at token {first}", hint="the head or the runtime is broken; do not publish this quant")


def template_error(log: str) -> str | None:
    """llama.cpp's words when it could not parse or render the GGUF's chat template at start, else None."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if "common_chat_templates_init: error" in line or "chat template parsing error" in line), None)
    if start is None:
        return None
    quoted = []
    for line in lines[start:]:
        if "please consider" in line or "failed to initialize chat template" in line:
            break
        quoted.append(line)
    return "\n".join(quoted)


def image_prompt(prompt: str, image: bytes) -> dict:
    """llama-server's multimodal prompt: the marker stands where the image's tokens go."""
    return {"prompt_string": f"Picture: {MEDIA_MARKER}\n{prompt}",
            "multimodal_data": [base64.b64encode(image).decode()]}


def smoke_image(spec: SmokeSpec) -> bytes:
    return spec.image.read_bytes() if spec.image else resources.files("mtpress").joinpath(IMAGE_RESOURCE).read_bytes()


def parse_generation(body: dict) -> Generation:
    """A /completion response of ``greedy_request`` as tokens, text and draft counts."""
    timings = body.get("timings", {})
    return Generation(tuple(body.get("tokens") or ()), body.get("content", ""), int(timings.get("draft_n", 0)),
                      int(timings.get("draft_n_accepted", 0)), float(timings.get("predicted_per_second", 0.0)))


def _serve(model: GgufFile, args: list[str], spec: SmokeSpec, tools: LlamaCpp, image: bytes | None,
           threads: int | None) -> tuple[Generation, Generation | None, Chat]:
    """The smoke requests on one server; ChatTemplateError if it would not start for the GGUF's chat template."""
    try:
        text, with_image, chat = generate_with_image(tools, args, spec, image, threads, chat=True)
    except ToolFailedError as err:
        if (quoted := template_error(err.output_tail)) is None:
            raise
        raise ChatTemplateError(
            f"smoke {model.name}: llama-server (--jinja) cannot use the file's chat template "
            f"(tokenizer.chat_template) and exits: {quoted}",
            hint="fix the chat template in the fine-tune's tokenizer_config.json or chat_template.jinja (the "
                 "converter copies it into every GGUF), e.g. take the base model's, and rerun") from err
    assert chat is not None  # asked for with chat=True
    return text, with_image, chat


def _smoke_without_head(model: GgufFile, spec: SmokeSpec, tools: LlamaCpp, mmproj: GgufFile | None,
                        image: bytes | None, threads: int | None) -> SmokeResult:
    plain, plain_image, chat = _serve(
        model, server_args(model, None, mtp=False, draft_n_max=spec.draft_n_max, mmproj=mmproj), spec, tools, image,
        threads)
    check_chat(f"smoke {model.name}", chat, None, CHAT_N_PREDICT)
    for what, generation in (("text", plain), ("image", plain_image)):
        if generation is not None and len(generation.tokens) != spec.n_predict:
            raise QualityGateError(f"smoke {model.name}: the {what} request generated {len(generation.tokens)} "
                                   f"tokens, asked for {spec.n_predict}")
    return SmokeResult(model=model.name, head=None, quant=model.quant, layout=model.layout, n_predict=spec.n_predict,
                       draft_n_max=0, tokens_identical=None, tokens=plain.tokens, drafted=0, accepted=0,
                       acceptance=None, tokens_per_second_plain=plain.predicted_per_second,
                       tokens_per_second_mtp=None, passed=True, mmproj=mmproj.name if mmproj else None,
                       image_tokens=plain_image.tokens if plain_image else (), chat_tokens=chat.tokens,
                       chat_reasoning=chat.reasoning, chat_content=chat.content)


def server_args(model: GgufFile, head: GgufFile | None, *, mtp: bool, draft_n_max: int,
                mmproj: GgufFile | None = None) -> list[str]:
    # Always on the CPU, even with a CUDA build: there the k+1-token verification batch runs other kernels
    # than one-token decoding, and greedy output with draft-mtp differed from plain output in every config
    # measured on an H100 (README, "What can go wrong"); on the CPU it is identical, which is what we prove.
    args = ["-m", str(model.path), "-c", "2048", "-ngl", "0", "--jinja", "--reasoning-format", REASONING_FORMAT,
            *(["--mmproj", str(mmproj.path), "--no-mmproj-offload"] if mmproj else [])]
    if mtp:
        if head is not None:
            args += ["-md", str(head.path), "-ngld", "0"]
        args += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(draft_n_max)]
    return args


def smoke(model: GgufFile, head: GgufFile | None, spec: SmokeSpec, tools: LlamaCpp,
          mmproj: GgufFile | None = None, threads: int | None = None) -> SmokeResult:
    """Raise QualityGateError naming the file if output differs, is empty, or nothing was drafted, and
    DeadHeadError if fewer drafts than ``spec.min_acceptance`` were accepted.

    A file without a head (released without one) only has to generate: draft-mtp would refuse to start.
    ``threads``: llama-server's (default: every core); greedy tokens do not depend on it.
    """
    image = smoke_image(spec) if mmproj else None
    if head is None and model.nextn_layers == 0:
        return _smoke_without_head(model, spec, tools, mmproj, image, threads)
    plain, plain_image, plain_chat = _serve(
        model, server_args(model, head, mtp=False, draft_n_max=spec.draft_n_max, mmproj=mmproj), spec, tools, image,
        threads)
    with_mtp, mtp_image, mtp_chat = _serve(
        model, server_args(model, head, mtp=True, draft_n_max=spec.draft_n_max, mmproj=mmproj), spec, tools, image,
        threads)
    identical = plain.tokens == with_mtp.tokens
    acceptance = with_mtp.accepted / with_mtp.drafted if with_mtp.drafted else None
    image_identical = plain_image.tokens == mtp_image.tokens if plain_image and mtp_image else None
    chat_identical = plain_chat.tokens == mtp_chat.tokens
    result = SmokeResult(
        model=model.name, head=head.name if head else None, quant=model.quant, layout=model.layout,
        n_predict=spec.n_predict, draft_n_max=spec.draft_n_max, tokens_identical=identical, tokens=plain.tokens,
        drafted=with_mtp.drafted, accepted=with_mtp.accepted,
        acceptance=acceptance,
        tokens_per_second_plain=plain.predicted_per_second, tokens_per_second_mtp=with_mtp.predicted_per_second,
        passed=identical and acceptance is not None and acceptance >= spec.min_acceptance
        and len(plain.tokens) == spec.n_predict and chat_identical
        and (mtp_image is None or (bool(image_identical) and mtp_image.drafted > 0)),
        mmproj=mmproj.name if mmproj else None, image_tokens_identical=image_identical,
        image_tokens=plain_image.tokens if plain_image else (), image_drafted=mtp_image.drafted if mtp_image else None,
        image_accepted=mtp_image.accepted if mtp_image else None, chat_tokens_identical=chat_identical,
        chat_tokens=plain_chat.tokens, chat_reasoning=plain_chat.reasoning, chat_content=plain_chat.content)
    if len(plain.tokens) != spec.n_predict:
        raise QualityGateError(f"smoke {model.name}: generated {len(plain.tokens)} tokens, asked for {spec.n_predict}")
    if not identical:
        first = next(i for i, (a, b) in enumerate(zip(plain.tokens + (None,), with_mtp.tokens + (None,))) if a != b)
        raise QualityGateError(f"smoke {model.name}: greedy output with draft-mtp differs from plain decoding at "
                               f"token {first}", hint="the head or the runtime is broken; do not publish this quant")
    if with_mtp.drafted == 0:
        raise QualityGateError(f"smoke {model.name}: draft-mtp proposed no drafts",
                               hint="the MTP head was not loaded; check the file carries it (nextn layers)")
    require_acceptance(f"smoke {model.name}" + (f" + {head.name}" if head else ""), with_mtp.drafted,
                       with_mtp.accepted, spec)
    check_chat(f"smoke {model.name}" + (f" + {head.name}" if head else ""), plain_chat, mtp_chat, CHAT_N_PREDICT)
    # The image request's acceptance has no floor: in this llama.cpp the head never sees image tokens.
    if plain_image and mtp_image:
        if len(plain_image.tokens) != spec.n_predict:
            raise QualityGateError(f"smoke {model.name} with {mmproj.name}: the image request generated "
                                   f"{len(plain_image.tokens)} tokens, asked for {spec.n_predict}")
        if not image_identical:
            raise QualityGateError(f"smoke {model.name} with {mmproj.name}: greedy output for the image request "
                                   "differs with draft-mtp", hint="do not publish this quant with the mmproj")
        if mtp_image.drafted == 0:
            raise QualityGateError(f"smoke {model.name} with {mmproj.name}: draft-mtp proposed no drafts after "
                                   "the image", hint="the head was not loaded beside the vision projector")
    return result


def require_acceptance(what: str, drafted: int, accepted: int, spec: SmokeSpec) -> None:
    """DeadHeadError naming ``what`` when ``accepted ÷ drafted`` (at ``spec.draft_n_max``) is below
    ``spec.min_acceptance``.

    ``drafted`` must be > 0: no drafts at all is another fault (the head did not load), refused before this.
    """
    acceptance = accepted / drafted
    if acceptance < spec.min_acceptance:
        raise DeadHeadError(
            f"{what}: draft-mtp acceptance {acceptance:.3g} ({accepted} of {drafted} drafted tokens accepted at "
            f"draft length {spec.draft_n_max}) is below smoke.min_acceptance {spec.min_acceptance:g}",
            hint="the head loads but does not predict this model, so it would only cost time: take it from "
                 "another donor (the fine-tune's own base model), or re-align it on the fine-tune "
                 "(head: {source: realign} or {source: best})")


@dataclass(frozen=True)
class LeanHeadCheck:
    """One quant's sidecar head, whose embedding and output copies are at ``shared_type``, against the embedded
    file of the same quant, whose head reads the trunk's own matrices: same trunk weights, same greedy prompt."""

    quant: str
    shared_type: str
    head: str
    head_size: int
    sidecar_accepted: int
    sidecar_drafted: int
    embedded_accepted: int
    embedded_drafted: int
    z: float | None  # how many standard errors the sidecar's acceptance is below the embedded one's


# A lower acceptance counts as a loss beyond this many standard errors of the difference of two proportions:
# greedy drafts on another file's numerics differ by a draft or two either way, which is no loss.
LEAN_HEAD_LOSS_Z = 2.0


def check_lean_heads(results: list[SmokeResult], heads: list[GgufFile], shared_type: str | None
                     ) -> list[LeanHeadCheck]:
    """Compare each quantized sidecar head with the embedded file of its quant (both smoke-tested); raise
    QualityGateError when the lean copies cost measurable acceptance. Nothing to compare without both layouts."""
    if shared_type is None:
        return []
    embedded = {r.quant: r for r in results if r.layout == "embedded" and r.drafted}
    size = {h.name: h.size for h in heads}
    checks = []
    for r in results:
        if r.layout != "sidecar" or r.head is None or r.quant == "BF16" or r.quant not in embedded:
            continue  # the BF16 head keeps BF16 copies
        base = embedded[r.quant]
        checks.append(LeanHeadCheck(r.quant, shared_type, r.head, size[r.head], r.accepted, r.drafted,
                                    base.accepted, base.drafted, _z_below(r.accepted, r.drafted, base.accepted,
                                                                          base.drafted)))
    if lost := [c for c in checks if c.z is not None and c.z > LEAN_HEAD_LOSS_Z]:
        c = lost[0]
        raise QualityGateError(
            f"smoke: the sidecar head {c.head}, with its embedding and output copies at {c.shared_type}, accepted "
            f"{c.sidecar_accepted} of {c.sidecar_drafted} drafts; the embedded {c.quant} file, with the trunk's own "
            f"types, {c.embedded_accepted} of {c.embedded_drafted}: {c.z:.1f} standard errors lower",
            hint="set head_shared_type to a larger type (Q8_0), or to null for the quant's own types")
    return checks


def _z_below(accepted: int, drafted: int, base_accepted: int, base_drafted: int) -> float | None:
    """(base's acceptance − this acceptance) ÷ the standard error of the difference (pooled); None when both are
    all or nothing, where no difference can be told from chance."""
    if not drafted or not base_drafted:
        return None
    pooled = (accepted + base_accepted) / (drafted + base_drafted)
    error = (pooled * (1 - pooled) * (1 / drafted + 1 / base_drafted)) ** 0.5
    return (base_accepted / base_drafted - accepted / drafted) / error if error else None
