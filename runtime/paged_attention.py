"""Native kernels over the paged KV cache: decode attention that reads it in place
(csrc/paged_attention.c), and RoPE with the cache write of a layer's fused q/k/v (csrc/rope_cache.c).

The torch path gathers each decode row's whole context from the cache at every layer, pads it, and
runs batched GEMMs whose overhead dominates at one query row per sequence (bf16 oneDNN matmul of 3
query heads over 1024 keys: ~50 us a call). vLLM's CPU backend reads the cache in place with one
C++ op per layer; this is the same idea in ~300 lines of C.

The per-layer torch ops around the cache (RoPE, slicing queries from keys, two index_copy_ writes:
about fifteen dispatches a layer) become one call of `rope_and_cache`, with torch's rounding.

Both are built and loaded with the other native kernels (runtime/native.py). CPU only; fp32 and bf16
caches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from runtime import native

available = native.available  # whether these kernels run for a cache of a dtype on a device


def int64(t: Tensor) -> Tensor:
    """t as contiguous int64, with no op where it is already (these run several times a layer)."""
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def paged_decode(q: Tensor, k: Tensor, v: Tensor, tables: Tensor, ctx_lens: Tensor, block_size: int) -> Tensor:
    """q (R, H, D): one query row per sequence; k, v (positions, Hkv, D): one slot of the paged cache;
    tables (R, W) block ids; ctx_lens (R,): row r attends to the first ctx_lens[r] positions of its
    table. Returns (R, H, D) in q's dtype (sums in fp32)."""
    R, H, D = q.shape
    Hkv = k.shape[1]
    if q.dtype != k.dtype or v.dtype != k.dtype or not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"paged_decode needs contiguous k, v of q's dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if H % Hkv or tables.shape[0] != R or ctx_lens.shape != (R,):
        raise ValueError(f"paged_decode: q {tuple(q.shape)}, k {tuple(k.shape)}, tables {tuple(tables.shape)}, "
                         f"ctx_lens {tuple(ctx_lens.shape)} do not fit")
    q, tables, ctx_lens = q.contiguous(), int64(tables), int64(ctx_lens)
    out = torch.empty_like(q)
    fn = native.kernel("paged_decode", q.dtype)
    status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), tables.data_ptr(), tables.shape[1], ctx_lens.data_ptr(),
                out.data_ptr(), R, H, Hkv, D, block_size, k.shape[0] // block_size, 1 / math.sqrt(D),
                torch.get_num_threads())
    if status == -2:  # checked in C: no tensor ops per layer call
        raise ValueError(f"paged_decode: contexts {ctx_lens.tolist()} or block ids outside tables of width "
                         f"{tables.shape[1]} over {k.shape[0] // block_size} blocks of {block_size}")
    if status != 0:
        raise RuntimeError(f"paged_decode failed on {H}/{Hkv} heads of {D} (limits: head dim 256, 16 query heads "
                           "per KV head) or ran out of memory")
    return out


def rope_and_cache(qkv: Tensor, num_heads: int, num_kv_heads: int, cos: Tensor, sin: Tensor, k_cache: Tensor,
                   v_cache: Tensor, index: Tensor) -> Tensor:
    """qkv (n, (H + 2 Hkv) * D): rows of a fused q/k/v projection. Rotates queries and keys by cos, sin
    (n, D) as `runtime.layers.apply_rope` does (the same rounding), writes keys and values to rows
    index (n,) of one cache slot k_cache, v_cache (positions, Hkv, D), and returns the queries (n, H, D)."""
    n, H, Hkv = len(qkv), num_heads, num_kv_heads
    D, dtype = k_cache.shape[-1], qkv.dtype
    if not (cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == dtype and dtype in native.SUFFIX
            and qkv.device.type == "cpu"):
        raise ValueError(f"rope_and_cache needs CPU tensors of one dtype (fp32 or bf16); got qkv {dtype}, "
                         f"cos {cos.dtype}, sin {sin.dtype}, cache {k_cache.dtype}, {v_cache.dtype}")
    if qkv.shape != (n, (H + 2 * Hkv) * D) or cos.shape != (n, D) or sin.shape != (n, D) or index.shape != (n,) \
            or k_cache.shape[1:] != (Hkv, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"rope_and_cache: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, "
                         f"cache {tuple(k_cache.shape)}, index {tuple(index.shape)} do not fit {H}/{Hkv} heads")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_and_cache writes the cache in place: it must be contiguous")
    qkv, cos, sin, index = qkv.contiguous(), cos.contiguous(), sin.contiguous(), int64(index)
    q = qkv.new_empty(n, H, D)
    fn = native.kernel("rope_and_cache", qkv.dtype)
    status = fn(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                index.data_ptr(), n, H, Hkv, D, k_cache.shape[0], torch.get_num_threads())
    if status == -2:
        raise ValueError(f"rope_and_cache: an index outside the cache's {k_cache.shape[0]} positions")
    if status != 0:
        raise RuntimeError(f"rope_and_cache failed on head dim {D} (it must be even)")
    return q

