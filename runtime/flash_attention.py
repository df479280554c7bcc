"""Causal flash attention of bf16 prompts and chunks (csrc/flash_attention.c), on AMX tiles where the CPU
has AMX-BF16 and Linux grants the tile state, else in AVX-512 BF16 vectors: over keys and values given as
tensors (`flash_attention`, a candidate of runtime/attention.py's kernel choice), and over one slot of
the paged cache in place for all of a step's sequences (`flash_paged_attention`, which the executor
calls where that kernel was chosen). `flash_unit` says which unit runs it; the library is built with
the other native kernels (runtime/native.py).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from runtime import native, paged_attention

UNITS = {1: "avx512_bf16", 2: "amx"}  # csrc/flash_attention.c: flash_attention_unit


@cache
def flash_unit() -> str | None:
    """The unit that runs the kernel here ("amx" or "avx512_bf16"), or None: the native library not built,
    or built for a CPU with neither AMX-BF16 (granted by Linux) nor AVX-512 BF16. Asked once a process."""
    if not native.available(torch.bfloat16, torch.device("cpu")):
        return None
    return UNITS.get(native.library().flash_attention_unit())


def flash_available(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `flash_attention` runs here: bf16, head dims of 32 or 64, and a unit (`flash_unit`)."""
    return dtype == torch.bfloat16 and head_dim in (32, 64) and flash_unit() is not None


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of q (R, H, M, D) over k, v (R, Hkv, L, D), the queries the last M of the L
    positions (csrc/flash_attention.c; call where `flash_available`). Any strides with
    the head dim contiguous. Returns (R, H, M, D), a view of rows laid out (R, M, H, D)."""
    R, H, M, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if k.shape != (R, Hkv, L, D) or v.shape != k.shape or not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        raise ValueError(f"flash_attention: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, "
                         f"v {tuple(v.shape)} {v.dtype} do not fit")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = q.new_empty(R, M, H, D).transpose(1, 2)
    status = native.kernel("causal_flash_attention", q.dtype)(
        q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3],
        out.data_ptr(), *out.stride()[:3], R, H, Hkv, M, L, D, 1 / math.sqrt(D), torch.get_num_threads())
    if status != 0:
        raise RuntimeError({-1: "flash_attention: out of memory", -3: "flash_attention: no flash attention unit here",
                            -4: f"flash_attention: head dim {D} (32 or 64), {H}/{Hkv} heads, {M} queries over {L} keys"}
                           .get(status, f"flash_attention failed ({status})"))
    return out


def flash_paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, starts: list[int],
                          rows: list[int], ctx: list[int], block_size: int, out: Tensor) -> None:
    """`flash_attention` of several sequences of one step, each over its keys in one slot of the paged cache
    in place: sequence s's rows[s] query rows from row starts[s] of q (n, H, D) are the last of its ctx[s]
    positions, whose keys and values k_cache, v_cache (positions, Hkv, D) hold through its block table
    tables[s]. Writes their outputs to the same rows of out (n, H, D)."""
    S, (n, H, D), Hkv = len(starts), q.shape, k_cache.shape[1]
    if not (q.is_contiguous() and out.is_contiguous() and out.shape == q.shape and k_cache.is_contiguous()
            and v_cache.is_contiguous() and q.dtype == out.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16
            and tables.shape[0] == S and len(rows) == len(ctx) == S
            and all(0 <= a and a + m <= n for a, m in zip(starts, rows))):
        raise ValueError(f"flash_paged_attention: q {tuple(q.shape)} {q.dtype}, cache {tuple(k_cache.shape)} "
                         f"{k_cache.dtype}, {S} sequences of rows {rows} from {starts} do not fit")
    meta = torch.tensor([starts, rows, ctx], dtype=torch.int64)
    tables = paged_attention.int64(tables)
    status = native.kernel("paged_causal_flash_attention", q.dtype)(
        q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
        meta[0].data_ptr(), meta[1].data_ptr(), meta[2].data_ptr(), S, H, Hkv, D, block_size,
        k_cache.shape[0] // block_size, 1 / math.sqrt(D), torch.get_num_threads())
    if status == -2:
        raise ValueError(f"flash_paged_attention: contexts {ctx} (rows {rows}) or block ids outside tables of width "
                         f"{tables.shape[1]} over {k_cache.shape[0] // block_size} blocks of {block_size}")
    if status != 0:
        raise RuntimeError({-1: "flash_paged_attention: out of memory", -3: "flash_paged_attention: no flash attention unit here",
                            -4: f"flash_paged_attention: head dim {D} (32 or 64), {H}/{Hkv} heads"}
                           .get(status, f"flash_paged_attention failed ({status})"))
