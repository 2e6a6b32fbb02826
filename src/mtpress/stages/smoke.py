"""Load every produced file in llama.cpp and prove the head drafts without changing greedy output.

For each model file: generate greedily without MTP, then with ``--spec-type draft-mtp``; the token
sequences must be identical (the target verifies every draft), drafts must have been proposed, and at
least ``min_acceptance`` of them accepted. Identical output proves the verifier, not the head: a head of
the right shape with useless weights drafts, is never right, and only its acceptance shows it.

With a vision projector (``--mmproj``), each of the two servers also answers a request carrying an
image, under the same rules, and the text request proves text-only use still works on those files.
In this llama.cpp the MTP head never sees image tokens (``draft-mtp`` skips batches of embeddings),
so the draft figures that describe a release, and the acceptance floor, come from the text request.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import resources

from mtpress.errors import DeadHeadError, QualityGateError
from mtpress.schema import SmokeSpec
from mtpress.stages.gguf_files import GgufFile
from mtpress.toolchain import LlamaCpp
from mtpress.toolchain.server import llama_server

SEED = 42
# Pinned through LLAMA_MEDIA_MARKER: by default llama-server draws a random marker per process.
MEDIA_MARKER = "<__media__>"
IMAGE_RESOURCE = "data/smoke_image.png"


@dataclass(frozen=True)
class Generation:
    tokens: tuple[int, ...]
    text: str
    drafted: int
    accepted: int
    predicted_per_second: float


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


def greedy_request(prompt: str | dict, n_predict: int) -> dict:
    """A deterministic completion request. ``samplers: [top_k]`` skips the default chain, which over
    a 248k vocabulary costs more than the model itself on a tiny checkpoint."""
    return {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
            "seed": SEED, "return_tokens": True, "cache_prompt": False, "ignore_eos": True}


def generate(tools: LlamaCpp, server_args: list[str], spec: SmokeSpec) -> Generation:
    return generate_with_image(tools, server_args, spec, None)[0]


def generate_with_image(tools: LlamaCpp, server_args: list[str], spec: SmokeSpec,
                        image: bytes | None, threads: int | None = None) -> tuple[Generation, Generation | None]:
    """The text request and, given ``image``, one that carries it, on one server."""
    env = {"LLAMA_MEDIA_MARKER": MEDIA_MARKER} if image is not None else None
    with llama_server(tools, server_args, timeout=spec.timeout_s, threads=threads, env=env) as server:
        text = parse_generation(server.completion(greedy_request(spec.prompt, spec.n_predict), timeout=spec.timeout_s))
        if image is None:
            return text, None
        return text, parse_generation(server.completion(greedy_request(image_prompt(spec.prompt, image),
                                                                       spec.n_predict), timeout=spec.timeout_s))


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


def _smoke_without_head(model: GgufFile, spec: SmokeSpec, tools: LlamaCpp, mmproj: GgufFile | None,
                        image: bytes | None, threads: int | None) -> SmokeResult:
    plain, plain_image = generate_with_image(
        tools, server_args(model, None, mtp=False, draft_n_max=spec.draft_n_max, mmproj=mmproj), spec, image,
        threads)
    for what, generation in (("text", plain), ("image", plain_image)):
        if generation is not None and len(generation.tokens) != spec.n_predict:
            raise QualityGateError(f"smoke {model.name}: the {what} request generated {len(generation.tokens)} "
                                   f"tokens, asked for {spec.n_predict}")
    return SmokeResult(model=model.name, head=None, quant=model.quant, layout=model.layout, n_predict=spec.n_predict,
                       draft_n_max=0, tokens_identical=None, tokens=plain.tokens, drafted=0, accepted=0,
                       acceptance=None, tokens_per_second_plain=plain.predicted_per_second,
                       tokens_per_second_mtp=None, passed=True, mmproj=mmproj.name if mmproj else None,
                       image_tokens=plain_image.tokens if plain_image else ())


def server_args(model: GgufFile, head: GgufFile | None, *, mtp: bool, draft_n_max: int,
                mmproj: GgufFile | None = None) -> list[str]:
    # Always on the CPU, even with a CUDA build: there the k+1-token verification batch runs other kernels
    # than one-token decoding, and greedy output with draft-mtp differed from plain output in every config
    # measured on an H100 (README, "What can go wrong"); on the CPU it is identical, which is what we prove.
    args = ["-m", str(model.path), "-c", "2048", "-ngl", "0",
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
    plain, plain_image = generate_with_image(
        tools, server_args(model, head, mtp=False, draft_n_max=spec.draft_n_max, mmproj=mmproj), spec, image,
        threads)
    with_mtp, mtp_image = generate_with_image(
        tools, server_args(model, head, mtp=True, draft_n_max=spec.draft_n_max, mmproj=mmproj), spec, image,
        threads)
    identical = plain.tokens == with_mtp.tokens
    acceptance = with_mtp.accepted / with_mtp.drafted if with_mtp.drafted else None
    image_identical = plain_image.tokens == mtp_image.tokens if plain_image and mtp_image else None
    result = SmokeResult(
        model=model.name, head=head.name if head else None, quant=model.quant, layout=model.layout,
        n_predict=spec.n_predict, draft_n_max=spec.draft_n_max, tokens_identical=identical, tokens=plain.tokens,
        drafted=with_mtp.drafted, accepted=with_mtp.accepted,
        acceptance=acceptance,
        tokens_per_second_plain=plain.predicted_per_second, tokens_per_second_mtp=with_mtp.predicted_per_second,
        passed=identical and acceptance is not None and acceptance >= spec.min_acceptance
        and len(plain.tokens) == spec.n_predict
        and (mtp_image is None or (bool(image_identical) and mtp_image.drafted > 0)),
        mmproj=mmproj.name if mmproj else None, image_tokens_identical=image_identical,
        image_tokens=plain_image.tokens if plain_image else (), image_drafted=mtp_image.drafted if mtp_image else None,
        image_accepted=mtp_image.accepted if mtp_image else None)
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
