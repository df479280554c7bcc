"""Batched decoding with thoughts on the reference forward (no KV cache): the oracle for the
addition task, and the sampler RL uses.

Every row has the same prompt length, so a batch stays aligned. A row's thought is capped at
`max_thought_tokens` by forcing `</think>`, as the engine does; under 'discard' the reference
forward runs with the thought mask (runtime/thought_mask.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.model import PonderModel
from runtime.thought_mask import thought_attention_mask


@dataclass
class Decoded:
    ids: Tensor  # (N, P + steps) prompt and output, padded with pad_id after a row finished
    num_thought_tokens: Tensor  # (N,) tokens between <think> and </think>
    logprobs: Tensor  # (N, steps) log-prob of each output token under the sampling distribution (0 once done)
    forced: Tensor  # (N, steps) bool: the token was forced (</think> at the cap), not sampled


def decode(model: PonderModel, prompts: Tensor, max_new_tokens: int, max_thought_tokens: int | None,
           discard: bool, temperature: float = 0.0, generator: torch.Generator | None = None,
           stop_at_think_end: bool = False) -> Decoded:
    """Greedy (temperature 0) or sampled decoding of (N, P) prompts. With stop_at_think_end a row
    finishes right after its `</think>` (RL samples thoughts only)."""
    cfg = model.cfg
    start, end, eos, pad = cfg.think_start_id, cfg.think_end_id, cfg.eos_id, cfg.pad_id
    assert start is not None and end is not None and eos is not None
    pad = eos if pad is None else pad
    N = len(prompts)
    ids = prompts
    in_thought = prompts[:, -1] == start  # a prompt that ends with <think> starts in a thought
    count = torch.zeros(N, dtype=torch.long)
    done = torch.zeros(N, dtype=torch.bool)
    logprobs, forced_all = [], []
    for _ in range(max_new_tokens):
        mask = thought_attention_mask(ids, start, end, discard) if discard else None
        logits = model(ids, mask=mask).logits[:, -1].float()
        logp = torch.log_softmax(logits / max(temperature, 1e-6) if temperature > 0 else logits, -1)
        if temperature > 0:
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        forced = in_thought & (max_thought_tokens is not None) & (count >= (max_thought_tokens or 0))
        token = torch.where(forced, end, token)
        token = torch.where(done, pad, token)
        lp = logp.gather(1, token[:, None]).squeeze(1)
        logprobs.append(torch.where(done | forced, 0.0, lp))
        forced_all.append(forced & ~done)
        count += (in_thought & (token != end) & ~done).long()
        opening = (token == start) & ~in_thought & ~done
        closing = (token == end) & in_thought
        in_thought = (in_thought | opening) & ~closing
        ids = torch.cat([ids, token[:, None]], 1)
        done = done | (token == eos) | (closing & stop_at_think_end)
        if bool(done.all()):
            break
    return Decoded(ids, count, torch.stack(logprobs, 1), torch.stack(forced_all, 1))


@torch.no_grad()
def held_out_accuracy(model: PonderModel, task, caps: list[int], discard: bool, num: int) -> dict[int, float]:
    """Greedy exact-match accuracy of a ThoughtTask's held-out problems at each thought cap: the
    visible output after `</think>` must be the answer and then `<eos>`."""
    model.eval()
    cfg = model.cfg
    prompts, _, answer = task.parts(task.test_problems[:num])
    out = {}
    for cap in caps:
        dec = decode(model, prompts, cap + answer.shape[1] + 3, cap, discard)
        correct = 0
        for row, y in zip(dec.ids[:, prompts.shape[1] :].tolist(), answer.tolist()):
            if cfg.think_end_id in row:
                visible = row[row.index(cfg.think_end_id) + 1 :]
                correct += visible[: len(y) + 1] == y + [cfg.eos_id]
        out[cap] = correct / len(prompts)
    return out
