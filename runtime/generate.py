"""Plain generation on the reference forward (no KV cache): the oracle the engine must match.

It recomputes the whole sequence for every new token, so it is slow on long outputs; the
batched engine with paged KV replaces it for serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.model import ExitSpec, PonderModel


@dataclass
class Generation:
    token_ids: list[int]
    exit_depths: list[int]  # core depth of the step that produced each token
    finish_reason: str  # "length" | "stop"


def sample_next(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: PonderModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    exit: ExitSpec,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> Generation:
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    ids, depths = list(prompt_ids), []
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        out = model(torch.tensor([ids[-window:]], device=device), exit)
        depths.append(int(out.depth[0, -1]))
        token = sample_next(out.logits[0, -1].cpu(), temperature, top_k, generator)
        ids.append(token)
        if token in stop_ids:
            return Generation(ids[len(prompt_ids):], depths, "stop")
    return Generation(ids[len(prompt_ids):], depths, "length")
