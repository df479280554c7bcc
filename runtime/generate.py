"""Greedy generation on the reference forward (no KV cache): the oracle the engine must match.

It recomputes the whole sequence for every new token, so it is slow on long outputs; serving
uses the batched engine (`runtime.engine`), which owns sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.model import ExitSpec, PonderModel


@dataclass
class Generation:
    token_ids: list[int]
    exit_depths: list[int]  # core depth of the position whose logits gave each token


@torch.no_grad()
def generate(model: PonderModel, prompt_ids: list[int], max_new_tokens: int, exit: ExitSpec) -> Generation:
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    device = next(model.parameters()).device
    ids, depths = list(prompt_ids), []
    for _ in range(max_new_tokens):
        out = model(torch.tensor([ids[-model.cfg.max_seq_len :]], device=device), exit)
        depths.append(int(out.depth[0, -1]))
        ids.append(int(out.logits[0, -1].argmax()))
    return Generation(ids[len(prompt_ids) :], depths)
