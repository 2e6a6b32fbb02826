"""Train a Qwen3.5 MTP head on its own trunk's hidden states: the torch half of the realign stage.

This file runs as a script under the llama.cpp converter's Python (which has torch), never inside
mtpress's own environment, so it imports nothing from mtpress. ``python realign_trainer.py JOB.json``
reads the job (paths and hyperparameters), writes ``head.safetensors`` (the 15 ``mtp.*`` tensors in
the trunk's dtype) and ``report.json`` into the job's ``out`` directory, and prints one progress line
per evaluation.

The head's forward is llama.cpp's draft-mtp graph (src/models/qwen35.cpp, ``graph_mtp``), in HF
terms: at position q it sees the embedding of token x_q and the trunk's final hidden state h_{q-1}
(after the output norm; zeros at q = 0, as common/speculative.cpp pads the first row), computes
``fc · [RMSNorm(e; pre_fc_norm_embedding), RMSNorm(h; pre_fc_norm_hidden)]`` (embedding half first),
one gated full-attention decoder layer with its own causal attention and partial (neox-style) rope
at position q, then ``RMSNorm(·; mtp.norm)`` and the trunk's own ``lm_head``, to predict x_{q+1}:
the token the trunk itself says after x_q. Every norm gain is stored zero-centred (x·(1+w)), as
the converter's +1 on ``*norm.weight`` shows. The embedding and ``lm_head`` are frozen.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

VOCAB_SLICE = 32768  # rows of lm_head per product when taking a full-vocabulary argmax


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    torch.manual_seed(job["seed"])
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    started = time.monotonic()

    config = job["config"]
    weights = Weights(Path(job["model"]), job["head_tensors"], device)
    head = Head(config, weights.head, device)
    data = Sequences(Path(job["data"]), job["sequences"], device)
    train, heldout = data.split(job["heldout_fraction"])
    candidates = (candidate_tokens(train, weights.vocab_size, job["candidates"], job["seed"], device)
                  if job["loss"] == "cross-entropy" else None)
    lm_candidates = weights.lm_head[candidates] if candidates is not None else weights.lm_head
    target_index = candidate_index(candidates, weights.vocab_size, device)

    choices, agreement = trunk_choices(weights, heldout, job["batch_sequences"])

    def evaluate() -> float:
        return acceptance(head, weights, heldout, choices, job["batch_sequences"])

    before = evaluate()
    optimizer = torch.optim.AdamW(head.parameters(), lr=job["learning_rate"], weight_decay=0.0)
    rng = np.random.default_rng(job["seed"])
    order: list[int] = []
    best = (before, 0, head.state())
    curve, heldout_curve = [], [{"step": 0, "acceptance": round(before, 4)}]
    stale = 0
    step = 0
    running = []
    progress(f"held-out acceptance before: {before:.4f} ({heldout.positions} positions scored, "
             f"{train.positions} to train on; the trunk's argmax agrees with its generated tokens at "
             f"{agreement:.4f})")
    while step < job["max_steps"]:
        if len(order) < job["batch_sequences"]:
            order += rng.permutation(len(train)).tolist()
        batch, order = order[:job["batch_sequences"]], order[job["batch_sequences"]:]
        b = train.batch(batch)
        y = head(weights.embed(b.tokens), b.previous)
        if job["loss"] == "hidden":
            # The trunk's logits are lm_head · h_q and the head's lm_head · y: matching h_q matches them all,
            # from every position (prompt ones too), without a vocabulary-sized product.
            loss = F.mse_loss(y[b.real], b.state[b.real]) * y.shape[-1]
        else:
            logits = y[b.generated] @ lm_candidates.T
            loss = F.cross_entropy(logits.float(), target_index[b.next_token[b.generated]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        running.append(loss.item())
        if step % job["eval_every"] == 0 or step == job["max_steps"]:
            curve.append({"step": step, "loss": round(sum(running) / len(running), 5)})
            running = []
            score = evaluate()
            heldout_curve.append({"step": step, "acceptance": round(score, 4)})
            progress(f"step {step}: loss {curve[-1]['loss']:.4f}, held-out acceptance {score:.4f}")
            if score > best[0]:
                best, stale = (score, step, head.state()), 0
            else:
                stale += 1
                if stale >= job["patience"]:
                    break
    head.load(best[2])
    tensors = head.export(weights.head_dtypes)
    # The head is judged as it will be stored: rounded to the checkpoint's dtype.
    head.load({name: t.to(torch.float32) for name, t in tensors.items()})
    after = evaluate()
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.contiguous().cpu() for name, t in sorted(tensors.items())}, str(out / "head.safetensors"),
              metadata={"format": "pt"})
    report = {
        "steps": step, "best_step": best[1], "stopped_early": step < job["max_steps"],
        "loss_curve": curve, "heldout_curve": heldout_curve,
        "acceptance_before": round(before, 4), "acceptance_after": round(after, 4),
        "train_sequences": len(train), "heldout_sequences": len(heldout),
        "train_positions": train.positions, "train_generated": train.generated, "heldout_positions": heldout.positions,
        "trunk_agreement": round(agreement, 4),
        "loss": job["loss"],
        "candidates": None if candidates is None else int(candidates.numel()),
        "parameters": sum(p.numel() for p in head.parameters()),
        "seconds": round(time.monotonic() - started, 1),
        "device": str(device), "threads": job["threads"], "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "processor": platform.processor() or platform.machine(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def progress(line: str) -> None:
    print(line, flush=True)


class Weights:
    """The frozen trunk tensors the head uses (embedding, lm_head) and the head's own, from the checkpoint."""

    def __init__(self, model: Path, head_names: list[str], device: torch.device) -> None:
        index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
        # Frozen matrices stay in float32 on CPU (bf16 matmuls are slow there) and in bf16 on accelerators.
        frozen_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self.embedding = self._read(model, index, "model.embed_tokens.weight").to(device, frozen_dtype)
        self.lm_head = self._read(model, index, "lm_head.weight").to(device, frozen_dtype)
        self.vocab_size = self.lm_head.shape[0]
        raw = {name: self._read(model, index, name) for name in head_names}
        self.head_dtypes = {name: t.dtype for name, t in raw.items()}
        self.head = {name: t.to(device, torch.float32) for name, t in raw.items()}

    @staticmethod
    def _read(model: Path, index: dict, name: str) -> torch.Tensor:
        with safe_open(str(model / index[name]), framework="pt") as f:
            return f.get_tensor(name)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[tokens].float()


class Sequences:
    """Token sequences with the trunk's hidden state at every position, read from the collected chunks."""

    def __init__(self, data: Path, records: list[dict], device: torch.device) -> None:
        self.records = records
        self.device = device
        self.tokens, self.hidden = [], []
        chunks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for record in records:
            if record["chunk"] not in chunks:
                # Memory-mapped: a batch reads its sequences' rows from disk, so a 9B's states need not fit in RAM.
                chunks[record["chunk"]] = (np.load(data / f"{record['chunk']}.tokens.npy"),
                                           np.load(data / f"{record['chunk']}.hidden.npy", mmap_mode="r"))
            tokens, hidden = chunks[record["chunk"]]
            span = slice(record["offset"], record["offset"] + record["length"])
            self.tokens.append(torch.from_numpy(tokens[span].astype(np.int64)))
            self.hidden.append(hidden[span])

    def __len__(self) -> int:
        return len(self.records)

    @property
    def positions(self) -> int:
        return sum(r["length"] for r in self.records)

    @property
    def generated(self) -> int:
        """Positions whose next token the trunk generated (the rest are prompt text)."""
        return sum(r["length"] - r["prompt_tokens"] for r in self.records)

    def split(self, heldout_fraction: float) -> tuple[Sequences, Sequences]:
        """Every k-th sequence held out (k from the fraction), so each domain of an ordered set is represented."""
        every = max(2, round(1 / heldout_fraction))
        held = [i for i in range(len(self)) if i % every == every - 1]
        return self._subset([i for i in range(len(self)) if i not in held]), self._subset(held)

    def _subset(self, indices: list[int]) -> Sequences:
        subset = object.__new__(Sequences)
        subset.records = [self.records[i] for i in indices]
        subset.device = self.device
        subset.tokens = [self.tokens[i] for i in indices]
        subset.hidden = [self.hidden[i] for i in indices]
        return subset

    def batch(self, indices: list[int]) -> Batch:
        """These sequences, padded. The head at position q gets x_q and h_{q-1} (zeros at q = 0) and must say
        x_{q+1}: the token the trunk computes from h_q. Only where the trunk generated x_{q+1} is that token
        known without a vocabulary-sized product; h_q itself is known everywhere."""
        length = max(len(self.tokens[i]) for i in indices)
        width = self.hidden[indices[0]].shape[1]
        b = Batch(tokens=torch.zeros(len(indices), length, dtype=torch.long),
                  previous=torch.zeros(len(indices), length, width), state=torch.zeros(len(indices), length, width),
                  next_token=torch.zeros(len(indices), length, dtype=torch.long),
                  real=torch.zeros(len(indices), length, dtype=torch.bool),
                  generated=torch.zeros(len(indices), length, dtype=torch.bool))
        for row, i in enumerate(indices):
            n, first = len(self.tokens[i]), self.records[i]["prompt_tokens"]
            b.tokens[row, :n] = self.tokens[i]
            hidden = torch.from_numpy(np.array(self.hidden[i], dtype=np.float32))  # a copy: the map is read-only
            b.previous[row, 1:n] = hidden[:n - 1]
            b.state[row, :n] = hidden
            b.next_token[row, :n - 1] = self.tokens[i][1:]
            b.real[row, :n] = True
            b.generated[row, first - 1:n - 1] = True
        return Batch(*(t.to(self.device) for t in b))


class Batch(NamedTuple):
    tokens: torch.Tensor  # [B, T] x_q
    previous: torch.Tensor  # [B, T, H] h_{q-1}
    state: torch.Tensor  # [B, T, H] h_q, the trunk's state that decides x_{q+1}
    next_token: torch.Tensor  # [B, T] x_{q+1}
    real: torch.Tensor  # [B, T] not padding
    generated: torch.Tensor  # [B, T] x_{q+1} was generated greedily by the trunk


def candidate_tokens(train: Sequences, vocab_size: int, count: int | None, seed: int,
                     device: torch.device) -> torch.Tensor | None:
    """The vocabulary the loss normalises over: every token the trunk said in training plus random others.

    A full-vocabulary softmax costs vocab × hidden per position (63M multiply-adds at the demo's 248k
    × 256), which a CPU cannot afford for every step; the sampled set keeps the trunk's own choices as
    positives and enough other tokens as negatives. None (or a count ≥ the vocabulary) uses all of it.
    """
    if count is None or count >= vocab_size:
        return None
    said = torch.unique(torch.cat([t for t in train.tokens]))
    others = torch.ones(vocab_size, dtype=torch.bool)
    others[said] = False
    pool = torch.nonzero(others).squeeze(1)
    generator = torch.Generator().manual_seed(seed)
    extra = pool[torch.randperm(len(pool), generator=generator)[:max(0, count - len(said))]]
    return torch.sort(torch.cat([said, extra])).values.to(device)


def candidate_index(candidates: torch.Tensor | None, vocab_size: int, device: torch.device) -> torch.Tensor:
    """token id → its row in the candidate matrix."""
    if candidates is None:
        return torch.arange(vocab_size, device=device)
    index = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
    index[candidates] = torch.arange(len(candidates), device=device)
    return index


@torch.no_grad()
def argmax_tokens(vectors: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """The greedy token for each row of ``vectors`` over the full vocabulary, in slices of the vocabulary."""
    best_score = torch.full((len(vectors),), -math.inf, device=vectors.device)
    best_token = torch.zeros(len(vectors), dtype=torch.long, device=vectors.device)
    for row in range(0, lm_head.shape[0], VOCAB_SLICE):
        scores, tokens = (vectors.to(lm_head.dtype) @ lm_head[row:row + VOCAB_SLICE].T).float().max(dim=1)
        better = scores > best_score
        best_score = torch.where(better, scores, best_score)
        best_token = torch.where(better, tokens + row, best_token)
    return best_token


@torch.no_grad()
def trunk_choices(weights: Weights, data: Sequences, batch_sequences: int) -> tuple[list[torch.Tensor], float]:
    """The trunk's own greedy token after every position (argmax of lm_head · h_q), per sequence, and how often it
    equals the token llama.cpp generated there: 1.0 unless the hidden states are not the ones it decoded from."""
    choices, agree, generated = [], 0, 0
    for start in range(0, len(data), batch_sequences):
        indices = list(range(start, min(start + batch_sequences, len(data))))
        b = data.batch(indices)
        chosen = torch.zeros_like(b.next_token)
        chosen[b.real] = argmax_tokens(b.state[b.real], weights.lm_head)
        agree += int((chosen[b.generated] == b.next_token[b.generated]).sum())
        generated += int(b.generated.sum())
        choices += [chosen[row] for row in range(len(indices))]
    return choices, agree / generated if generated else 1.0


@torch.no_grad()
def acceptance(head: Head, weights: Weights, data: Sequences, choices: list[torch.Tensor],
               batch_sequences: int) -> float:
    """Share of held-out positions where the head's full-vocabulary argmax is the trunk's own next token:
    draft-length-1 acceptance, as llama.cpp's draft-mtp would count it on these sequences."""
    hits = total = 0
    for start in range(0, len(data), batch_sequences):
        indices = list(range(start, min(start + batch_sequences, len(data))))
        b = data.batch(indices)
        y = head(weights.embed(b.tokens), b.previous)[b.real]
        wanted = torch.stack([choices[i] for i in indices])[b.real]
        hits += int((argmax_tokens(y, weights.lm_head) == wanted).sum())
        total += len(y)
    return hits / total if total else 0.0


class Head(torch.nn.Module):
    """The MTP head as llama.cpp runs it; parameters keep the checkpoint's names (dots as double underscores)."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        super().__init__()
        self.eps = config["rms_norm_eps"]
        self.heads, self.kv_heads, self.head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                                                    config["head_dim"])
        rope = config.get("rope_parameters") or config
        self.rot = int(self.head_dim * rope.get("partial_rotary_factor", 0.25))
        self.theta = rope.get("rope_theta", 1e7)
        self.names = sorted(tensors)
        for name in self.names:
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(tensors[name].clone()))
        self.to(device)

    def w(self, name: str) -> torch.Tensor:
        return getattr(self, ("mtp." + name).replace(".", "__"))

    def norm(self, x: torch.Tensor, gain: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.w(gain))

    def forward(self, embedding: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = embedding.shape
        x = torch.cat([self.norm(embedding, "pre_fc_norm_embedding.weight"),
                       self.norm(hidden, "pre_fc_norm_hidden.weight")], dim=-1) @ self.w("fc.weight").T
        a = self.norm(x, "layers.0.input_layernorm.weight")
        q_gate = (a @ self.w("layers.0.self_attn.q_proj.weight").T).view(batch, length, self.heads, 2 * self.head_dim)
        q, gate = q_gate[..., :self.head_dim], q_gate[..., self.head_dim:]
        k = (a @ self.w("layers.0.self_attn.k_proj.weight").T).view(batch, length, self.kv_heads, self.head_dim)
        v = (a @ self.w("layers.0.self_attn.v_proj.weight").T).view(batch, length, self.kv_heads, self.head_dim)
        q = self.rope(self.norm(q, "layers.0.self_attn.q_norm.weight"))
        k = self.rope(self.norm(k, "layers.0.self_attn.k_norm.weight"))
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=2)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
        attended = (attended * torch.sigmoid(gate)).reshape(batch, length, self.heads * self.head_dim)
        x = x + attended @ self.w("layers.0.self_attn.o_proj.weight").T
        m = self.norm(x, "layers.0.post_attention_layernorm.weight")
        x = x + (F.silu(m @ self.w("layers.0.mlp.gate_proj.weight").T) * (m @ self.w("layers.0.mlp.up_proj.weight").T)
                 ) @ self.w("layers.0.mlp.down_proj.weight").T
        return self.norm(x, "norm.weight")

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """Neox-style rotation of the first ``rot`` dims: text-only positions make Qwen3.5's interleaved
        multi-section rope (every section at the same position) exactly this."""
        length = x.shape[1]
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rot, 2, device=x.device, dtype=torch.float32) / self.rot))
        angles = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        half = self.rot // 2
        x1, x2, rest = x[..., :half], x[..., half:self.rot], x[..., self.rot:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: self.w(name.removeprefix("mtp.")).detach().clone() for name in self.names}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, value in state.items():
                self.w(name.removeprefix("mtp.")).copy_(value)

    def export(self, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        return {name: value.to(dtypes[name]) for name, value in self.state().items()}


if __name__ == "__main__":
    main(sys.argv[1])
