"""Time and memory of the realign trainer at Qwen3.5-9B's head shape, on synthetic weights and hidden states.

The trainer's cost depends on shapes, not values: the frozen 248,320 x 4,096 embedding and lm_head, the
243 M-parameter head with AdamW state, batches of 8 sequences. Random values make the acceptance it prints
meaningless; its wall time and peak memory are what a real 9B head costs on the same schedule. Needs only
torch, numpy and safetensors (the converter's environment, or any torch install with a GPU):

    python scripts/realign_at_scale.py WORKDIR DEVICE MAX_STEPS THREADS    # e.g. /tmp/r9 cuda 400 4

It prints one JSON line (docs/measurements/h100-realign-9b-shape.json holds the H100 figures). The
synthetic model (4 GB) and states (250 MB) are generated once into WORKDIR.
"""
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path[:0] = ["src", "src/mtpress"]  # the trainer runs as a script, outside mtpress's environment
import realign_trainer  # noqa: E402

from mtpress.archs.qwen35 import Qwen35  # noqa: E402

VOCAB, HIDDEN = 248320, 4096
CONFIG = {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text", "vocab_size": VOCAB,
          "hidden_size": HIDDEN, "intermediate_size": 12288, "num_hidden_layers": 32, "num_attention_heads": 16,
          "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6, "attn_output_gate": True,
          "mtp_num_hidden_layers": 1, "tie_word_embeddings": False,
          "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                              "mrope_section": [11, 11, 10], "mrope_interleaved": True}}
SEQUENCES, LENGTH, PROMPT_TOKENS = 48, 320, 64  # the shipped prompt set with the default 256 generated tokens


def generate(model: Path, data: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A checkpoint with the tensors the trainer reads (embedding, lm_head, head) and collected-state chunks."""
    model.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).bfloat16()
               for name in ("model.embed_tokens.weight", "lm_head.weight")}
    for name, shape in shapes.items():
        values = torch.randn(*shape, generator=g) * 0.02 if len(shape) > 1 else torch.zeros(shape)
        tensors[name] = values.bfloat16()
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    index = {"weight_map": {name: "model.safetensors" for name in tensors}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(data / "c0.tokens.npy", rng.integers(0, VOCAB - 320, SEQUENCES * LENGTH).astype(np.int32))
    np.save(data / "c0.hidden.npy", rng.standard_normal((SEQUENCES * LENGTH, HIDDEN)).astype(np.float32))


def main(work: Path, device: str, max_steps: int, threads: int) -> dict:
    shapes = Qwen35().expected_head(CONFIG)
    model, data = work / "model", work / "data"
    if not (model / "model.safetensors.index.json").exists():
        generate(model, data, shapes)
    records = [{"chunk": "c0", "offset": i * LENGTH, "length": LENGTH, "prompt_tokens": PROMPT_TOKENS}
               for i in range(SEQUENCES)]
    out = work / f"out-{device}"
    job = {"model": str(model), "data": str(data), "out": str(out), "config": CONFIG, "head_tensors": sorted(shapes),
           "sequences": records, "heldout_fraction": 0.25, "seed": 0, "max_steps": max_steps, "batch_sequences": 8,
           "learning_rate": 1e-3, "eval_every": 25, "patience": 10**6,  # the whole schedule, never stopped early
           "loss": "hidden", "candidates": 8192, "device": device, "threads": threads}
    (work / "job.json").write_text(json.dumps(job))
    started = time.time()
    realign_trainer.main(str(work / "job.json"))
    report = json.loads((out / "report.json").read_text())
    figures = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": threads,
               "steps": report["steps"], "train_positions": report["train_positions"],
               "heldout_positions": report["heldout_positions"], "parameters": report["parameters"],
               "wall_s": round(time.time() - started, 1), "trainer_seconds": report["seconds"],
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    if device == "cuda":
        figures["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        figures["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
    return figures


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
