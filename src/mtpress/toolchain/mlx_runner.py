"""MLX conversion and the checks of an MLX/MTPLX pack, run by the MLX tools environment's Python
(never imported by mtpress).

Usage: ``python mlx_runner.py convert|check '<json request>'``; the answer is one JSON line on stdout.
It imports only mlx, mlx-lm and MTPLX, so it runs in that environment alone.

The loaded weights are upcast from bf16 to float32 before anything runs: the cast is exact, and
MLX's CPU backend emulates bf16 arithmetic (a 4-bit matmul with bf16 scales over a 248k-row
vocabulary takes ~1.8 s on CPU instead of ~0.16 s). MTPLX's own probes are called unchanged,
with their ``load`` wrapped to apply that cast.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time


def _f32(model):
    import mlx.core as mx

    model.set_dtype(mx.float32)
    return model


def generate(model_path: str, prompt: str, n_predict: int) -> dict:
    """Greedy continuation of ``prompt`` (no chat template, no special tokens), ``n_predict`` tokens, EOS ignored."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    started = time.perf_counter()
    model, tokenizer = load(model_path)
    load_s = time.perf_counter() - started
    _f32(model)
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)
    started = time.perf_counter()
    tokens = []
    for token, _ in generate_step(mx.array(prompt_tokens), model, max_tokens=n_predict,
                                  sampler=lambda logits: mx.argmax(logits, axis=-1)):
        tokens.append(int(token))
    return {"prompt_tokens": prompt_tokens, "tokens": tokens, "text": tokenizer.decode(tokens),
            "load_s": round(load_s, 2), "generate_s": round(time.perf_counter() - started, 2)}


def inspect(model_path: str) -> dict:
    from mtplx.artifacts import inspect_model

    report = inspect_model(model_path).to_dict()
    mtp = report.get("mtp") or {}
    compat = report.get("compatibility") or {}
    return {
        "passes_primary_gate": report.get("passes_primary_gate"),
        "passes_tensor_gate": mtp.get("passes_tensor_gate"),
        "tensor_count": mtp.get("tensor_count"),
        "expected_tensor_count": mtp.get("expected_tensor_count"),
        "missing_expected_keys": mtp.get("missing_expected_keys"),
        "extra_keys": mtp.get("extra_keys"),
        "sidecar_format": mtp.get("sidecar_format"),
        "can_run": compat.get("can_run"),
        "arch_id": compat.get("arch_id"),
        "tier": compat.get("tier"),
        "unverified_model": compat.get("unverified_model"),
        "runtime_contract_error": compat.get("runtime_contract_error"),
        "message": compat.get("message"),
    }


def _patch_mtplx_load() -> None:
    from mtplx import runtime
    from mtplx.benchmarks.runners import contract_probe, runtime_smoke

    def load(model_path, **kwargs):
        rt = runtime.load(model_path, **kwargs)
        _f32(rt.model)
        return rt

    runtime_smoke.load = load
    contract_probe.load = load


def convert(request: dict) -> dict:
    """``mlx_lm convert`` with affine quantization; mlx-lm's own log goes to stderr."""
    from mlx_lm.convert import convert as mlx_convert

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        mlx_convert(request["hf_path"], request["mlx_path"], quantize=True, q_bits=request["bits"],
                    q_group_size=request["group_size"], q_mode="affine")
    sys.stderr.write(log.getvalue())
    match = re.search(r"with ([0-9.]+) bits per weight", log.getvalue())
    return {"bits_per_weight": float(match.group(1)) if match else None}


def check(request: dict) -> dict:
    model = request["model"]
    answer = {"inspect": inspect(model),
              "generate": generate(model, request["prompt"], request["n_predict"]),
              # The same checkpoint loaded by mlx-lm unquantized: isolates conversion from quantization error.
              "generate_unquantized": generate(request["source"], request["prompt"], request["n_predict"])}
    _patch_mtplx_load()
    from mtplx.benchmarks.runners.contract_probe import run_contract_probe
    from mtplx.benchmarks.runners.runtime_smoke import run_runtime_smoke

    answer["runtime_smoke"] = run_runtime_smoke(model, request["prompt"])
    probe = run_contract_probe(model, request["prompts"], max_prompt_tokens=request["max_prompt_tokens"],
                               chat_template=False)
    answer["probe"] = {"max_prompt_tokens": probe["max_prompt_tokens"], "elapsed_s": probe["probe_elapsed_s"],
                       "variants": [{k: v for k, v in r.items() if k != "rows"} for r in probe["results"]]}
    return answer


if __name__ == "__main__":
    commands = {"convert": convert, "check": check}
    command, raw = sys.argv[1], sys.argv[2]
    if command not in commands:
        sys.exit(f"unknown command {command!r}; expected one of {', '.join(commands)}")
    print(json.dumps(commands[command](json.loads(raw))))
