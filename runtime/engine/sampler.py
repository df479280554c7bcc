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
    raw = logits.float()
    log_norm = torch.logsumexp(raw, dim=-1)  # logprobs are raw - log_norm, formed only where needed
    bias = [(i, t, b) for i, row in enumerate(rows) for t, b in row.params.logit_bias.items()]
    edits = bias or allowed is not None or any(_edits(row) for row in rows)
    logits = raw.clone() if edits else raw  # the penalties below write in place
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

    if all(r.params.greedy for r in rows):
        chosen = logits.argmax(-1)
    else:
        temperature = torch.tensor([r.params.temperature or 1.0 for r in rows], device=logits.device)[:, None]
        probs = torch.softmax(_filter(logits / temperature, rows), dim=-1)
        chosen = logits.argmax(-1)
        # Inverse CDF: one uniform per sampled row from its request's own generator (an exponential
        # race, as torch.multinomial runs, draws one per vocabulary entry: 11 ms for 16 rows of
        # 49,152 here). Greedy rows draw nothing, so a seeded stream never depends on its neighbours.
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        u = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(probs.device)
        cdf = probs[sampled].cumsum(-1)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # never a 0-probability token
        chosen[sampled] = picks.clamp(max=probs.shape[-1] - 1)
    forced = [r.forced for r in rows]
    if any(f is not None for f in forced):
        chosen = torch.where(torch.tensor([f is not None for f in forced], device=chosen.device),
                             torch.tensor([f or 0 for f in forced], device=chosen.device), chosen)
    tokens = chosen.tolist()
    token_logprobs = (raw.gather(1, chosen[:, None])[:, 0] - log_norm).tolist()  # one transfer for the whole batch

    out = []
    for i, row in enumerate(rows):
        top = []
        if row.params.logprobs:
            values, ids = raw[i].topk(row.params.logprobs)
            top = list(zip(ids.tolist(), (values - log_norm[i]).tolist()))
        out.append(Sampled(tokens[i], token_logprobs[i], top))
    return out


def _edits(row: SampleRow) -> bool:
    """Whether the row's logits change before sampling (bans and penalties; bias and masks aside)."""
    p = row.params
    return bool(row.banned) or (p.repetition_penalty != 1.0 and bool(row.prompt_ids or row.output_ids)) or \
        bool((p.presence_penalty or p.frequency_penalty) and row.output_ids)


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
    """Top-k, top-p and min-p per row, on temperature-scaled logits. Each keeps a prefix of the row's
    tokens in descending order, so the survivors are the shortest of those prefixes; they are found
    among the row's top k tokens, k = 64, else 1024, else the whole vocabulary: the first k inside
    which every filtered row's prefix ends, instead of sorting the whole vocabulary (a sort of 16 rows
    of 49,152 took ~35 ms here)."""
    V = logits.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in rows], device=logits.device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
    filtered = (top_k < V) | (top_p < 1) | (min_p > 0)
    if not filtered.any():
        return logits
    probs = logits.softmax(-1)
    for k in (min(V, 64), min(V, 1024), V):
        values, order = probs.topk(k, dim=-1)  # descending
        ends_inside = (top_k <= k) | ((top_p < 1) & (values.sum(-1) >= top_p)) | (
            (min_p > 0) & (values[:, -1] < min_p * values[:, 0]))
        if bool((ends_inside | ~filtered).all()):
            break
    rank = torch.arange(k, device=logits.device)[None]
    drop = rank >= top_k[:, None]
    drop |= ((values.cumsum(-1) - values) >= top_p[:, None]) & (top_p < 1)[:, None]  # the smallest prefix reaching
    #   top_p (at 1.0 none: a float cumsum reaches 1 before the tail, which must stay)
    drop |= values < min_p[:, None] * values[:, :1]
    drop[:, 0] = False
    kept = torch.full_like(logits, float("-inf")).scatter(
        -1, order, logits.gather(-1, order).masked_fill(drop, float("-inf")))
    return torch.where(filtered[:, None], kept, logits)


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
