"""Attention of queries over gathered keys and values, with the kernel measured fastest on CPU.

torch's CPU SDPA (a flash kernel) is fast in fp32, but in bf16 it can be several times slower
than in fp32: on one AVX-512 CPU, 16 decode rows over 1024 keys took 7.4 ms in bf16 against
1.2 ms in fp32. Grouped GEMMs do better there: the query heads that share a KV head become the
rows of one batched matmul over that head's keys (0.8 ms in bf16; but 2.1 ms in fp32, where SDPA
wins). So on CPU the engine times both once per case (a decode step: one query per sequence; a
prompt: a causal chunk), dtype, head shape and thread count, on synthetic tensors at a short and a
long context, and takes grouped GEMMs only where they win at both. On CUDA and MPS SDPA runs."""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

ATTENTION_KERNELS = ("auto", "sdpa", "grouped")
CAUSAL_BLOCK = 128  # query rows per GEMM in a causal prompt: keys past the block's last row are never read
_mode = os.environ.get("PONDER_CPU_ATTENTION", "auto")
_choices: dict[tuple, dict] = {}  # (case, dtype, H, Hkv, D, threads) -> {"kernel", "sdpa_us", "grouped_us"}


def set_attention_kernel(mode: str) -> None:
    """`auto` (measure, the default; env PONDER_CPU_ATTENTION), or force `sdpa` or `grouped` on CPU."""
    global _mode
    if mode not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {mode!r} must be one of {', '.join(ATTENTION_KERNELS)}")
    _mode = mode
    _choices.clear()


def attention_kernel_choices() -> list[dict]:
    """What each measured case chose, with the timings behind it (for logs and benchmarks)."""
    return [{"case": k[0], "dtype": str(k[1]), "heads": list(k[2:5]), "threads": k[5], **v} for k, v in _choices.items()]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """q (R, H, M, D) over k, v (R, Hkv, L, D). mask (R, M, L), True where a query sees a key; or
    causal: M == L, the chunk runs from position 0. Returns (R, H, M, D)."""
    if _kernel(q, k) == "grouped":
        return grouped_attention(q, k, v, mask, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                          is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """`attend` as batched GEMMs: per KV head, its query heads' rows against its keys. A causal chunk
    runs CAUSAL_BLOCK queries at a time over the keys up to the block's end."""
    R, H, M, D = q.shape
    Hkv, g = k.shape[1], H // k.shape[1]
    k, v = k.contiguous(), v.contiguous()  # folds (R, Hkv) into one batch dimension without copies below
    q = q.reshape(R, Hkv, g, M, D)
    out = []
    for s in range(0, M, CAUSAL_BLOCK) if causal else [0]:
        e = min(M, s + CAUSAL_BLOCK) if causal else M
        n, L = e - s, e if causal else k.shape[2]
        qb = q[:, :, :, s:e].reshape(R, Hkv, g * n, D) * (1 / math.sqrt(D))  # scaled here: fewer elements than the scores
        scores = torch.matmul(qb, k[:, :, :L].transpose(-1, -2)).view(R, Hkv, g, n, L)
        if causal:
            scores[..., s:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        elif mask is not None:
            scores.masked_fill_(~mask[:, None, None], -math.inf)
        p = scores.softmax(-1).view(R, Hkv, g * n, L)  # CPU softmax accumulates bf16 in fp32
        out.append(torch.matmul(p, v[:, :, :L]).view(R, Hkv, g, n, D))
    return (out[0] if len(out) == 1 else torch.cat(out, 3)).view(R, H, M, D)


def _kernel(q: Tensor, k: Tensor) -> str:
    if q.device.type != "cpu":
        return "sdpa"
    if _mode != "auto":
        return _mode
    case = "decode" if q.shape[2] == 1 else "prompt"
    key = (case, q.dtype, q.shape[1], k.shape[1], q.shape[3], torch.get_num_threads())
    if key not in _choices:
        _choices[key] = _choose(*key)
    return _choices[key]["kernel"]


def _best_of(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _cases(case: str, dtype: torch.dtype, H: int, Hkv: int, D: int) -> list[tuple]:
    """`attend` arguments of the case at a short and a long context: 16 decode rows over 128 and 1024
    keys, or one prompt of 256 and of 1024 tokens; which kernel wins can change between them."""
    out = []
    for L in (128, 1024) if case == "decode" else (256, 1024):
        R, M = (16, 1) if case == "decode" else (1, L)
        q = torch.randn(R, H, M, D, dtype=dtype)
        k, v = (torch.randn(R, L, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))  # as the paged cache gathers
        mask = (torch.arange(L)[None, :] < torch.linspace(L * 3 // 4, L, R)[:, None])[:, None] if case == "decode" else None
        out.append((q, k, v, mask, case != "decode"))
    return out


def _choose(case: str, dtype: torch.dtype, H: int, Hkv: int, D: int, threads: int) -> dict:
    """Time SDPA and grouped GEMMs on the case's shapes; grouped wins if 5% faster at every one."""
    def sdpa(q, k, v, mask, causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                              is_causal=causal, enable_gqa=Hkv != H)

    with torch.inference_mode():
        times = [(_best_of(lambda a=a: sdpa(*a)), _best_of(lambda a=a: grouped_attention(*a)))
                 for a in _cases(case, dtype, H, Hkv, D)]
    kernel = "grouped" if all(g < 0.95 * s for s, g in times) else "sdpa"
    log.info("attention (%s, %s, %d/%d heads of %d, %d threads): SDPA %s us, grouped GEMMs %s us -> %s", case,
             dtype, H, Hkv, D, threads, [round(s * 1e6) for s, _ in times], [round(g * 1e6) for _, g in times], kernel)
    return {"kernel": kernel, "sdpa_us": [s * 1e6 for s, _ in times], "grouped_us": [g * 1e6 for _, g in times]}
