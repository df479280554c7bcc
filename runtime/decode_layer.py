"""A whole layer on the rows of a decode step in one native call (csrc/decode_layer.c).

On a few rows a layer's kernels take ~240 us (bf16, one row, one Zen 5 CPU), and calling them one by
one from Python, with their checks, allocations and module dispatch, added ~120 us more: a third of a
batch-1 decode step. `decode_layer` runs the same kernels in the same order in C, so its result is the
unfused path's bit for bit where each of the layer's linears takes the native kernel at its row count
anyway (runtime/layers.py). Between that count and NATIVE_ROWS[-1] rows, one call may still win (the
native kernel loses ~10% to oneDNN's on 16 rows of the MLP's weights, less than the call saves), so
the engine's warm-up times the layer both ways (`measure_whole_layers`) and one call takes the steps
of up to the most rows at which it won. Elsewhere (prompts, other devices, torch's kernels forced) the
executor keeps the layer's separate calls (`runs_whole`).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from runtime import native
from runtime.layers import NATIVE_ROWS, Block, best_in_turn, kernel_rows, linear_kernel_mode, rope_tables
from runtime.norm_act import native_rows
from runtime.paged_attention import int64, paged_decode, rope_and_cache

log = logging.getLogger(__name__)

MEASURE_CONTEXT = 256  # keys each decode row attends over while the two ways are timed
_measured: dict[tuple, int] = {}  # the layer's shapes, dtype and threads -> the most rows one call takes


def runs_whole(block: Block, x: Tensor, cache_dtype: torch.dtype) -> bool:
    """Whether `decode_layer` runs this block on decode rows x (n, d): q/k/v and gate/up fused, every
    linear bias-free and contiguous, the norms native, the cache in x's dtype, and n rows at most
    `whole_rows`."""
    attn, mlp = block.attn, block.mlp
    if attn.wqkv is None or mlp.w_gate_up is None or cache_dtype != x.dtype or not native_rows(x, x.dtype):
        return False
    if block.attn_norm.weight.dtype != x.dtype or block.mlp_norm.weight.dtype != x.dtype:
        return False
    if not all(lin.bias is None and lin.weight.dtype == x.dtype and lin.weight.is_contiguous() for lin in _linears(block)):
        return False
    return len(x) <= whole_rows(block)


def whole_rows(block: Block) -> int:
    """The most rows of a decode step that `decode_layer` takes for this block: measured at warm-up
    (`measure_whole_layers`), else as many as every linear of the layer takes the native kernel for."""
    measured = _measured.get(_key(block)) if linear_kernel_mode() == "auto" else None
    return measured if measured is not None else min(kernel_rows(lin) for lin in _linears(block))


def _linears(block: Block) -> list:
    return [block.attn.wqkv, block.attn.wo, block.mlp.w_gate_up, block.mlp.w_down]


def _key(block: Block) -> tuple:
    w = block.attn.wqkv.weight
    return (tuple(w.shape), tuple(block.mlp.w_gate_up.weight.shape), block.attn.n_heads, block.attn.n_kv_heads,
            w.dtype, torch.get_num_threads())


def measure_whole_layers(blocks: list[Block], block_size: int = 16, repeats: int = 3) -> int | None:
    """Time the blocks as one call each (`decode_layer`) and as separate calls (each linear on its
    measured kernel), on NATIVE_ROWS decode rows over MEASURE_CONTEXT keys, all blocks in turn so that
    their weights stream from memory as in a decode step. One call then takes steps of up to the most
    rows at which it was faster, and faster at every fewer rows. Only with the measured linear kernels
    (`auto`): a forced kernel keeps every linear on it. Returns that row count (None: not measured)."""
    blocks = [b for b in blocks if b.attn.wqkv is not None and b.mlp.w_gate_up is not None]
    if not blocks or linear_kernel_mode() != "auto" or not native.available(blocks[0].attn.wqkv.weight.dtype,
                                                                           blocks[0].attn.wqkv.weight.device):
        return None
    attn, dtype = blocks[0].attn, blocks[0].attn.wqkv.weight.dtype
    H, Hkv, D, d = attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.wqkv.weight.shape[1]
    width = MEASURE_CONTEXT // block_size + 1  # each row's context and its new entry
    rows_done, times = 0, {}
    with torch.inference_mode():
        for n in NATIVE_ROWS:
            k = torch.zeros(n * width * block_size, Hkv, D, dtype=dtype)
            v = torch.zeros_like(k)
            tables = torch.arange(n * width).view(n, width)
            ctx = torch.full((n,), MEASURE_CONTEXT + 1)
            index = tables[:, -1] * block_size + MEASURE_CONTEXT % block_size
            cos, sin = (t.to(dtype) for t in rope_tables(ctx - 1, D, 10000.0))
            x = torch.randn(n, d).to(dtype)

            def whole(_: int) -> None:
                for b in blocks:
                    decode_layer(b, x, cos, sin, k, v, index, None, tables, ctx, block_size)

            def separate(_: int) -> None:
                for b in blocks:
                    q = rope_and_cache(b.attn.wqkv(b.attn_norm(x)), H, Hkv, cos, sin, k, v, index)
                    b.feedforward(x, b.attn.out(paged_decode(q, k, v, tables, ctx, block_size).flatten(1)))

            times[n] = best_in_turn({"whole": whole, "separate": separate}, repeats=repeats)
            if times[n]["whole"] >= times[n]["separate"]:
                break
            rows_done = n
    _measured[_key(blocks[0])] = rows_done
    log.info("decode layers in one call on steps of up to %d rows (%s)", rows_done,
             ", ".join(f"{n} rows: {t['whole'] * 1e3:.2f} against {t['separate'] * 1e3:.2f} ms" for n, t in times.items()))
    return rows_done


def decode_layer(block: Block, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor,
                 live: Tensor | None, tables: Tensor, ctx_lens: Tensor, block_size: int) -> Tensor:
    """The block on decode rows x (n, d) with RoPE tables cos, sin (n, D): every row writes its key and value
    to rows index (n,) of the cache slot k_cache, v_cache (positions, Hkv, D); the rows live (m,) of them
    (all where None) attend, row i over the first ctx_lens[i] positions of its block table tables[i], and
    run the MLP. Returns their outputs (m, d); with m = 0, the rows only write (keys and values only, as
    `Attention.project_rows` without queries). Check `runs_whole` first."""
    attn, mlp = block.attn, block.mlp
    n, d = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    F = mlp.w_down.weight.shape[1]
    m = n if live is None else len(live)
    if (cos.shape != (n, D) or sin.shape != (n, D) or index.shape != (n,) or k_cache.shape[1:] != (Hkv, D)
            or v_cache.shape != k_cache.shape or tables.shape[0] != m or ctx_lens.shape != (m,)):
        raise ValueError(f"decode_layer: rows {tuple(x.shape)}, cos {tuple(cos.shape)}, index {tuple(index.shape)}, "
                         f"cache {tuple(k_cache.shape)}, tables {tuple(tables.shape)}, contexts {tuple(ctx_lens.shape)} "
                         f"and {m} live rows do not fit {H}/{Hkv} heads of {D}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_layer writes the cache in place: it must be contiguous")
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    index, tables, ctx_lens = int64(index), int64(tables), int64(ctx_lens)
    live = None if live is None else int64(live)
    out = x.new_empty(m, d)
    work = x.new_empty(n * ((H + 2 * Hkv) * D + H * D + d) + m * (H * D + 3 * d + 3 * F))
    status = native.kernel("decode_layer", x.dtype)(
        x.data_ptr(), block.attn_norm.weight.data_ptr(), block.attn_norm.eps, attn.wqkv.weight.data_ptr(),
        cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), index.data_ptr(), k_cache.shape[0],
        None if live is None else live.data_ptr(), m, tables.data_ptr(), tables.shape[1], ctx_lens.data_ptr(),
        block_size, attn.wo.weight.data_ptr(), block.mlp_norm.weight.data_ptr(), block.mlp_norm.eps,
        mlp.w_gate_up.weight.data_ptr(), mlp.w_down.weight.data_ptr(), out.data_ptr(), work.data_ptr(), n, d, H, Hkv,
        D, F, 1 / math.sqrt(D), torch.get_num_threads())
    if status in (8, 18):  # rope_and_cache's or paged_decode's -2: checked in C, nothing read past the cache
        raise ValueError(f"decode_layer: a cache index, context {ctx_lens.tolist()} or block id outside the cache's "
                         f"{k_cache.shape[0]} positions")
    if status != 0:
        raise RuntimeError(f"decode_layer failed (status {status}) on {H}/{Hkv} heads of {D}")
    return out
