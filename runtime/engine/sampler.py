"""Batched sampling with per-request parameters: penalties, temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.engine.outputs import PromptScores, Sampled
from runtime.engine.params import SamplingParams


@dataclass
class SampleRow:
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator  # per request, so a seeded request reproduces in any batch
    banned: list[int]  # token ids not allowed yet (EOS/stop ids before min_tokens)
    forced: int | None = None  # the token this row must take (</think> at the thought cap)


def sample(logits: Tensor, rows: list[SampleRow], allowed: tuple[list[int], Tensor] | None = None) -> list[Sampled]:
    """logits: (R, V) float; one row per request that samples this step. allowed: structured outputs'
    (rows, bitmask (len(rows), ceil(V / 32)) int32): only tokens whose bit is set may be chosen there."""
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
    logits = logits.float().clone()
    bias = [(i, t, b) for i, row in enumerate(rows) for t, b in row.params.logit_bias.items()]
    if bias:  # one scatter for the whole batch
        at, ids, values = zip(*bias)
        logits.index_put_((torch.tensor(at, device=logits.device), torch.tensor(ids, device=logits.device)),
                          torch.tensor(values, device=logits.device), accumulate=True)
    for i, row in enumerate(rows):  # penalties need each row's history
        p = row.params
        if row.banned:
            logits[i, row.banned] = float("-inf")
        if p.repetition_penalty != 1.0 and (row.prompt_ids or row.output_ids):
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
            ids, counts = torch.tensor(row.output_ids, device=logits.device).unique(return_counts=True)
            logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
    if allowed is not None:
        apply_bitmask(logits, *allowed)

    greedy = torch.tensor([r.params.greedy for r in rows], device=logits.device)
    temperature = torch.tensor([r.params.temperature or 1.0 for r in rows], device=logits.device)[:, None]
    probs = torch.softmax(_filter(logits / temperature, rows), dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) drawn from each request's own generator.
    # Greedy rows draw nothing, so a seeded request's stream never depends on its neighbours.
    noise = torch.ones_like(probs)
    for i, r in enumerate(rows):
        if not r.params.greedy:
            noise[i] = torch.empty(logits.shape[-1]).exponential_(generator=r.generator).to(probs.device)
    chosen = torch.where(greedy, logits.argmax(-1), (probs / noise).argmax(-1))
    forced = [r.forced for r in rows]
    if any(f is not None for f in forced):
        chosen = torch.where(torch.tensor([f is not None for f in forced], device=chosen.device),
                             torch.tensor([f or 0 for f in forced], device=chosen.device), chosen)
    tokens = chosen.tolist()
    token_logprobs = raw_logprobs.gather(1, chosen[:, None])[:, 0].tolist()  # one transfer for the whole batch

    out = []
    for i, row in enumerate(rows):
        top = []
        if row.params.logprobs:
            values, ids = raw_logprobs[i].topk(row.params.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        out.append(Sampled(tokens[i], token_logprobs[i], top))
    return out


# Byte value -> the 8 logit offsets its bits stand for: 0 where the bit is set (allowed), -inf where not.
_BYTE_OFFSETS = torch.where((torch.arange(256)[:, None] >> torch.arange(8)) & 1 == 1, 0.0, float("-inf"))
_byte_offsets: dict[torch.device, Tensor] = {}


def apply_bitmask(logits: Tensor, rows: list[int], bitmask: Tensor) -> None:
    """Set logits (R, V) to -inf at the tokens the bitmask of `rows` leaves out, in one op for the batch.
    Bit t of a row is bit t % 32 of word t // 32, that is bit t % 8 of byte t // 8 (little-endian)."""
    device = logits.device
    table = _byte_offsets.get(device)
    if table is None:
        table = _byte_offsets[device] = _BYTE_OFFSETS.to(device)
    offsets = table[bitmask.to(device, non_blocking=True).view(torch.uint8).long()]  # (r, 4W, 8)
    logits.index_add_(0, torch.tensor(rows, device=device), offsets.flatten(1)[:, : logits.shape[-1]])


def _filter(logits: Tensor, rows: list[SampleRow]) -> Tensor:
    """Top-k, top-p and min-p per row, on temperature-scaled logits."""
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else logits.shape[-1] for r in rows], device=logits.device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
    if (top_k >= logits.shape[-1]).all() and (top_p >= 1).all() and (min_p <= 0).all():
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    drop = rank >= top_k[:, None]
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]  # keep the smallest prefix reaching top_p
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def score_tokens(logits: Tensor, targets: list[int], depths: list[int], num_top: int) -> PromptScores:
    """Logprobs of `targets` under logits (T, V) (row t scores targets[t]), with the top `num_top` of each row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, device=logprobs.device)
    chosen = logprobs.gather(1, target[:, None])[:, 0].tolist()
    if num_top:
        top = torch.topk(logprobs, num_top)
        tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
    else:
        tops = [[] for _ in targets]
    return PromptScores([Sampled(t, lp, tp) for t, lp, tp in zip(targets, chosen, tops)], depths)
