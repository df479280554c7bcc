"""Attention masks for thought tokens, for the reference forward and training.

A thought span is `<think>` and the tokens after it, up to (not including) the matching `</think>`.
Under thought KV 'keep' attention is plain causal. Under 'discard' the span is dropped from the
context once the first visible token after `</think>` is out: every position after `</think>`
(the first visible token and everything later) no longer sees the span. `</think>` itself still
attends to the thoughts, so its KV carries what the thought worked out (a Quiet-STaR / gist-token
pattern); the engine keeps it and frees the span's KV blocks (runtime/engine/scheduler.py).

    position:      p p p <think> t t t </think> a a a
    key <think>..t  visible to positions up to and including </think>; hidden from every a.
"""

from __future__ import annotations

import torch
from torch import Tensor


def thought_span_ends(ids: Tensor, think_start_id: int, think_end_id: int) -> Tensor:
    """(B, T) ids -> (B, T) long: for a position inside a thought span, the position of the
    `</think>` that closes it; T (never reached) for positions outside spans or in an unclosed span."""
    B, T = ids.shape
    idx = torch.arange(T, device=ids.device).expand(B, T)
    starts, ends = ids == think_start_id, ids == think_end_id
    # inside a span: more <think> than </think> seen so far, the current </think> excluded
    depth = torch.cumsum(starts.long(), 1) - (torch.cumsum(ends.long(), 1) - ends.long())
    inside = (depth > 0) & ~ends
    # the next </think> at or after each position (reverse cumulative min)
    end_pos = torch.where(ends, idx, torch.full_like(idx, T))
    next_end = torch.flip(torch.cummin(torch.flip(end_pos, [1]), 1).values, [1])
    return torch.where(inside, next_end, torch.full_like(idx, T))


def thought_attention_mask(ids: Tensor, think_start_id: int, think_end_id: int, discard: bool | Tensor) -> Tensor:
    """(B, T) ids -> (B, 1, T, T) bool mask, True where query t may attend key s.

    discard: a bool for the whole batch, or a (B,) bool tensor per row ('discard' where True,
    'keep' where False)."""
    B, T = ids.shape
    q = torch.arange(T, device=ids.device)
    causal = q[None, :] <= q[:, None]  # (T, T): key <= query
    span_end = thought_span_ends(ids, think_start_id, think_end_id)  # (B, T) per key
    hidden = q[None, :, None] > span_end[:, None, :]  # (B, Tq, Tk): the query is past the key's </think>
    if not isinstance(discard, Tensor):
        discard = torch.full((B,), bool(discard), device=ids.device)
    hidden = hidden & discard.to(ids.device)[:, None, None]
    return (causal[None] & ~hidden)[:, None]
