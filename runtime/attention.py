"""Attention of queries over gathered keys and values, with the kernel measured fastest on CPU.

torch's CPU SDPA (a flash kernel) is fast in fp32, but in bf16 it can be several times slower than
in fp32: on one AVX-512 CPU, 16 decode rows over 1024 keys took 7.4 ms in bf16 against 1.2 ms in
fp32, and a 1024-token causal prompt 10 ms in both. So for bf16 there are two more kernels:
  - sdpa_fp32: SDPA on fp32 copies of q, k and v;
  - grouped: batched GEMMs in the input dtype, the query heads that share a KV head as the rows
    of one matmul over that head's keys (a 1024-token causal prompt in bf16: 4.8 ms; 16 decode rows
    over 1024 keys: 0.8 ms). oneDNN builds and keeps a kernel per GEMM shape (~0.8 MB each), so the
    shapes are bucketed: a prompt, or a chunk after cached context, runs 128 queries at a time in
    blocks aligned to absolute positions, queries and keys padded to whole blocks; a decode step
    pads its sequences to a power of two and its keys to a multiple of 256, masked. Masked rows (a
    subset of a chunk's) never take it. The engine core runs every bucket once at start-up
    (`warm_up_attention`);
  - paged (decode only, fp32 and bf16): a C kernel that reads the paged cache in place, with no
    gather or padding (runtime/paged_attention.py), where the host can build it;
  - flash (causal prompts and chunks, bf16, head dims 32 and 64): flash attention with both products on
    the AMX tile unit where the CPU has AMX-BF16 (vLLM's CPU backend runs its own AMX attention there),
    else in AVX-512 BF16 vectors (csrc/flash_attention.c). A 1024-token prompt of SmolLM2's 9/3 heads:
    1.6-1.9 ms against SDPA's 2.9 on AMX (2 threads, one Xeon).
On CPU the engine times the candidates once per case (decode; prompt; chunk; masked), dtype, head shape
and thread count, on synthetic tensors at a short and a long context, the candidates taking turns
within each repeat (so that interference from elsewhere meets them alike), and runs at each context
(below or from LONG_CONTEXT keys) the fastest that is 5% faster than SDPA there, else SDPA. The
paged kernel is timed on a cache holding the same keys; the others on gathered keys, plus the time of
the gather they need. On CUDA and MPS SDPA runs.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime import native, paged_attention
from runtime.flash_attention import flash_attention, flash_available
from runtime.layers import best_in_turn
from runtime.norm_act import native_rows

log = logging.getLogger(__name__)

ATTENTION_KERNELS = ("auto", "sdpa", "sdpa_fp32", "grouped", "paged", "flash")
CAUSAL_BLOCK = 128  # query rows per GEMM in a causal prompt, and the bucket queries and keys are padded to
DECODE_KEYS = 256  # a decode step's keys are padded to a multiple of this (its sequences to a power of two)
LONG_CONTEXT = 512  # keys from which the kernel measured at the long context runs, below it the short one
_mode = "auto"  # or the env var's, checked below
_choices: dict[tuple, dict] = {}  # (case, dtype, H, Hkv, D, threads) -> {"kernels": [short, long], "<kernel>_us"}


def set_attention_kernel(mode: str) -> None:
    """`auto` (measure, the default; env PONDER_CPU_ATTENTION), or force a kernel on CPU (`grouped`
    applies to causal prompts and decode steps, `paged` to decode steps, `flash` to causal prompts and
    chunks; other cases then run `sdpa`)."""
    global _mode
    if mode not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {mode!r} must be one of {', '.join(ATTENTION_KERNELS)}")
    _mode = mode
    _choices.clear()


try:
    set_attention_kernel(os.environ.get("PONDER_CPU_ATTENTION", "auto"))
except ValueError as e:  # a typo (or a kernel's old name) fails at start-up, not as a silent fallback
    raise ValueError(f"PONDER_CPU_ATTENTION: {e}") from None


def attention_kernel_choices() -> list[dict]:
    """What each measured case chose, with the timings behind it (for logs and benchmarks)."""
    return [{"case": k[0], "dtype": str(k[1]), "heads": list(k[2:5]), "threads": k[5], **v}
            for k, v in _choices.items()]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """q (R, H, M, D) over k, v (R, Hkv, L, D). mask (R, M, L), True where a query sees a key (for one
    query row per sequence, M == 1, the keys it sees are a prefix); or causal: the queries are the last
    M of the L positions, each over the keys up to itself (M == L: a prompt from position 0; M < L: a
    chunk after L - M cached positions). Returns (R, H, M, D)."""
    if causal and mask is not None:
        raise ValueError("attend takes a mask or causal, not both")
    return _run(_kernel(q, k.shape[1], k.shape[2], causal), q, k, v, mask, causal)


def decode_in_place(q: Tensor, num_kv_heads: int, num_keys: int) -> bool:
    """Whether decode rows q (R, H, D) over up to num_keys keys run `paged_attention.paged_decode` on
    the cache in place (the kernel chosen for them is `paged`), rather than `attend` on gathered keys."""
    return decodes_in_place(q.device, q.dtype, q.shape[1], q.shape[2], num_kv_heads, num_keys)


def decodes_in_place(device: torch.device, dtype: torch.dtype, num_heads: int, head_dim: int, num_kv_heads: int,
                     num_keys: int) -> bool:
    """`decode_in_place` for queries of this device, dtype and shape, before they exist."""
    return _kernel_of(device, dtype, num_heads, 1, head_dim, num_kv_heads, num_keys, causal=False) == "paged"


def causal_kernel(q: Tensor, num_kv_heads: int, num_queries: int, num_keys: int) -> str:
    """The kernel that num_queries causal rows like q (n, H, D), the last of num_keys positions, run (a
    prompt where they are equal, else a chunk after cached context)."""
    return _kernel_of(q.device, q.dtype, q.shape[1], num_queries, q.shape[2], num_kv_heads, num_keys, causal=True)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    M, L = q.shape[2], k.shape[2]
    if causal and M < L:  # SDPA's causal mask is aligned top left; a chunk's is bottom right
        key_pos, query_pos = torch.arange(L, device=q.device), torch.arange(L - M, L, device=q.device)
        mask, causal = (key_pos <= query_pos[:, None])[None], False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                          is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _padded(t: Tensor, R: int, L: int) -> Tensor:
    """t (r, Hkv, l, D), in any layout, zero-padded to (R, Hkv, L, D) and contiguous, so that (R, Hkv)
    folds into one GEMM batch dimension without a copy (F.pad keeps the cache's transposed layout)."""
    out = t.new_zeros(R, t.shape[1], L, t.shape[3])
    out[: t.shape[0], :, : t.shape[2]] = t
    return out


def grouped_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One query per sequence (M == 1) under mask (R, 1, L) (None: every key), as batched GEMMs per
    KV head: sequences padded to a power of two and keys to a multiple of DECODE_KEYS (masked), so
    every GEMM has one of few shapes."""
    R, H, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    g, pad_r, pad_l = H // Hkv, (1 << (R - 1).bit_length()) - R, -L % DECODE_KEYS
    q = F.pad(q.reshape(R, Hkv, g, D), (0, 0, 0, 0, 0, 0, 0, pad_r)) * (1 / math.sqrt(D))
    k, v = (_padded(t, R + pad_r, L + pad_l) for t in (k, v))
    sees = torch.ones(R, L, dtype=torch.bool, device=q.device) if mask is None else mask[:, 0]
    sees = F.pad(sees, (0, pad_l, 0, pad_r))
    sees[R:, 0] = True  # padded sequences see their first (zero) key, so their rows stay finite
    bias = torch.zeros(sees.shape, dtype=q.dtype, device=q.device).masked_fill_(~sees, -math.inf)  # once, not per head
    scores = torch.matmul(q, k.transpose(-1, -2)).add_(bias[:, None, None])
    return torch.matmul(scores.softmax(-1), v)[:R].reshape(R, H, 1, D)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of R chunks whose M queries are the last M of the L keys' positions (a prompt
    from position 0: M == L; a chunk after L - M cached positions) as batched GEMMs: per KV head,
    its query heads' rows against its keys, CAUSAL_BLOCK queries at a time over the keys up to the
    block's end, the blocks aligned to absolute positions. Queries are padded to whole blocks
    (before the first and after the last) and keys to the last block's end (padded keys sit past
    every real query, so the causal mask hides them), and R runs as powers of two, so every GEMM has
    one of few shapes: a chunk after context runs the same shapes as a prompt."""
    R, H, M, D = q.shape
    if R & (R - 1):  # several prompts: as groups of a power of two (bounded shapes, no padded prompts)
        top = 1 << (R.bit_length() - 1)
        return torch.cat([grouped_attention(q[:top], k[:top], v[:top]), grouped_attention(q[top:], k[top:], v[top:])])
    Hkv, g, L = k.shape[1], H // k.shape[1], k.shape[2]
    B, start = CAUSAL_BLOCK, L - M
    first, end = start - start % B, L + -L % B  # the blocks the queries fall in, in absolute positions
    q = F.pad(q, (0, 0, start - first, end - L)).reshape(R, Hkv, g, end - first, D) * (1 / math.sqrt(D))
    k, v = _padded(k, R, end), _padded(v, R, end)
    fused = native_rows(q, q.dtype)  # the causal mask and softmax in one native pass
    future = None if fused else torch.full((B, B), -math.inf, dtype=q.dtype, device=q.device).triu(1)
    out = []
    for s in range(first, end, B):
        e, i = s + B, s - first
        scores = torch.matmul(q[:, :, :, i : i + B].reshape(R, Hkv, g * B, D), k[:, :, :e].transpose(-1, -2))
        if fused:
            p = causal_softmax_(scores, B, s)
        else:
            scores.view(R, Hkv, g, B, e)[..., s:] += future  # added: 2x a masked_fill in bf16
            p = scores.softmax(-1)  # CPU softmax accumulates bf16 in fp32
        out.append(torch.matmul(p, v[:, :, :e]).view(R, Hkv, g, B, D))
    return torch.cat(out, 3)[:, :, :, start - first : start - first + M].reshape(R, H, M, D)


def causal_softmax_(scores: Tensor, block: int, first: int) -> Tensor:
    """Softmax over the last dim of scores (..., rows, keys), in place, where row r is query r % block
    of a block whose first query sits at position `first` and sees the keys up to its own position
    (those after it get 0). Native (csrc/causal_softmax.c): call where `native_rows` says it runs."""
    if not scores.is_contiguous() or scores.shape[-2] % block or scores.shape[-1] <= first:
        raise ValueError(f"causal_softmax_: scores {tuple(scores.shape)} (contiguous: {scores.is_contiguous()}) "
                         f"are not whole blocks of {block} queries from position {first}")
    rows, cols = scores.numel() // scores.shape[-1], scores.shape[-1]
    if native.kernel("causal_softmax", scores.dtype)(scores.data_ptr(), rows, cols, block, first,
                                                      torch.get_num_threads()) != 0:
        raise MemoryError(f"causal_softmax_: no memory for a row buffer of {cols} floats")
    return scores


def warm_up_attention(H: int, Hkv: int, D: int, dtype: torch.dtype, max_seqs: int, max_len: int,
                      max_prompt: int) -> int:
    """Measure the kernel choices now, and run `grouped` at every shape bucket it can take: decode
    steps of up to max_seqs sequences over up to max_len keys, and steps of prompts of up to
    max_prompt tokens in all (one causal call runs every block a shorter prompt does), so that
    oneDNN builds their GEMM kernels at start-up. Every case's choice (decode, prompt, chunk) is made
    here too. Returns the number of calls run."""
    calls = 0
    with torch.inference_mode():
        R = 1
        while True:
            for L in range(DECODE_KEYS, max_len + DECODE_KEYS, DECODE_KEYS):
                q = torch.zeros(R, H, 1, D, dtype=dtype)
                k = torch.zeros(R, L, Hkv, D, dtype=dtype).transpose(1, 2)  # as the paged cache gathers
                shortest = k[:, :, : L - DECODE_KEYS + 1]  # the contexts this bucket pads may fall in another range
                if "grouped" in (_kernel(q, Hkv, shortest.shape[2], causal=False), _kernel(q, Hkv, L, causal=False)):
                    grouped_decode(q, k, k, None)
                    calls += 1
            if R >= max_seqs:
                break
            R *= 2
        B, R = CAUSAL_BLOCK, 1
        while R <= max_seqs:  # R prompts of one length bucket, each longer than the bucket below, fit in a step
            longest = min(-(-max_len // B) * B, (max_prompt // R + B - 1) // B * B)
            if longest < B:
                break
            for T in sorted({min(longest, LONG_CONTEXT - 1), longest}):  # the longest of each context range
                q = torch.zeros(R, H, T, D, dtype=dtype)
                k = torch.zeros(R, T, Hkv, D, dtype=dtype).transpose(1, 2)
                if _kernel(q, Hkv, T, causal=True) == "grouped":
                    grouped_attention(q, k, k)
                    calls += 1
            R *= 2
        # and the choices for chunks after cached context (chunked prefill) and for masked rows (a
        # subset of a chunk's), which would otherwise be measured under the first traffic that has
        # one; a grouped chunk runs a prompt's GEMM shapes, over keys up to max_len
        chunk = torch.zeros(1, H, 2, D, dtype=dtype)
        if "grouped" in (_kernel(chunk, Hkv, 2 * CAUSAL_BLOCK, causal=True), _kernel(chunk, Hkv, max_len, causal=True)):
            T = -(-max_len // B) * B
            k = torch.zeros(1, T, Hkv, D, dtype=dtype).transpose(1, 2)
            grouped_attention(torch.zeros(1, H, T, D, dtype=dtype), k, k)
            calls += 1
        _kernel(chunk, Hkv, max_len, causal=False)
    return calls


def _kernel(q: Tensor, num_kv_heads: int, num_keys: int, causal: bool) -> str:
    """The kernel for queries q (R, H, M, D) over num_keys keys of num_kv_heads heads."""
    return _kernel_of(q.device, q.dtype, q.shape[1], q.shape[2], q.shape[3], num_kv_heads, num_keys, causal)


def _kernel_of(device: torch.device, dtype: torch.dtype, H: int, M: int, D: int, num_kv_heads: int, num_keys: int,
               causal: bool) -> str:
    """`_kernel` from the queries' device, dtype and shape (no tensor: the executor asks once a layer)."""
    if device.type != "cpu":
        return "sdpa"
    case = ("prompt" if M == num_keys else "chunk") if causal else "decode" if M == 1 else "masked"
    if _mode != "auto":
        takes = {"grouped": ("prompt", "chunk", "decode"), "paged": ("decode",), "flash": ("prompt", "chunk")}.get(
            _mode, (case,))
        if _mode == "paged" and not paged_attention.available(dtype, device):
            raise RuntimeError("the paged attention kernel is not built here (see the log), or not for this dtype")
        if _mode == "flash" and case in takes and not flash_available(dtype, D):
            raise RuntimeError("the flash attention kernel does not run here: it needs bf16, head dim 32 or 64 and "
                               "a CPU with AMX-BF16 or AVX-512 BF16 (and the native kernels built)")
        return _mode if case in takes else "sdpa"
    key = (case, dtype, H, num_kv_heads, D, torch.get_num_threads())
    if key not in _choices:
        _choices[key] = _choose(*key)
    return _choices[key]["kernels"][num_keys >= LONG_CONTEXT]


def _cases(case: str, dtype: torch.dtype, H: int, Hkv: int, D: int) -> list[tuple]:
    """`attend` arguments of the case at a short and a long context (16 decode rows over 128 and
    1024 keys; one prompt of 256 and of 1024 tokens; a 64-token chunk after 448 and 960 cached
    tokens, causal, or masked as a subset of a chunk's rows); which kernel wins can change between them."""
    out = []
    for L in (128, 1024) if case == "decode" else (256, 1024) if case == "prompt" else (512, 1024):
        R, M = {"decode": (16, 1), "prompt": (1, L), "chunk": (1, 64), "masked": (1, 64)}[case]
        q = torch.randn(R, H, M, D, dtype=dtype)
        k, v = (torch.randn(R, L, Hkv, D, dtype=dtype).transpose(1, 2) for _ in range(2))  # as the paged cache gathers
        mask = None  # a prompt is causal
        if case == "decode":  # sequences of 3/4 L to L keys
            mask = (torch.arange(L)[None, :] < torch.linspace(L * 3 // 4, L, R)[:, None])[:, None]
        elif case == "masked":  # the last M positions, each over the keys up to itself
            mask = (torch.arange(L)[None, :] <= torch.arange(L - M, L)[:, None])[None]
        out.append((q, k, v, mask, case in ("prompt", "chunk")))
    return out


def _candidates(case: str, dtype: torch.dtype, head_dim: int) -> list[str]:
    """The kernels besides SDPA worth timing: grouped GEMMs where their shapes are bounded, SDPA on
    fp32 copies where the input is not fp32 already, the paged kernel for decode where it is built,
    and flash attention for causal prompts and chunks where the CPU runs it."""
    paged = case == "decode" and paged_attention.available(dtype, torch.device("cpu"))
    flash = case in ("prompt", "chunk") and flash_available(dtype, head_dim)
    return (["grouped"] if case != "masked" else []) + (["sdpa_fp32"] if dtype != torch.float32 else []) + \
        (["paged"] if paged else []) + (["flash"] if flash else [])


def _run(kernel: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    if kernel == "paged":  # decode rows over gathered keys, as a cache of 1-position blocks (a copy unless
        R, Hkv, L, D = k.shape  # k is a view of (R, L, Hkv, D), as the cache gathers); the mask is a prefix
        cache_k, cache_v = (t.transpose(1, 2).reshape(R * L, Hkv, D) for t in (k, v))
        ctx = torch.full((R,), L) if mask is None else mask[:, 0].sum(-1)
        out = paged_attention.paged_decode(q[:, :, 0], cache_k, cache_v, torch.arange(R * L).view(R, L), ctx, 1)
        return out[:, :, None]
    if kernel == "grouped":
        return grouped_attention(q, k, v) if causal else grouped_decode(q, k, v, mask)
    if kernel == "flash":  # causal only (the cases it is a candidate for)
        return flash_attention(q, k, v)
    if kernel == "sdpa_fp32" and q.dtype != torch.float32:
        return _sdpa(q.float(), k.float(), v.float(), mask, causal).to(q.dtype)
    return _sdpa(q, k, v, mask, causal)


def _gather_blocks(k: Tensor, v: Tensor) -> None:
    """The copy `PagedKVCache.gather` makes of k, v (R, Hkv, L, D), as 16-position blocks in order."""
    R, Hkv, L, D = k.shape
    blocks = torch.arange(R * L // 16)
    for t in (k, v):
        t.transpose(1, 2).reshape(R * L // 16, -1).index_select(0, blocks)


def _choose(case: str, dtype: torch.dtype, H: int, Hkv: int, D: int, threads: int) -> dict:
    """Time SDPA and the case's other kernels at its short and long context; at each, the fastest
    kernel that is 5% faster than SDPA there wins, else SDPA."""
    cases, names = _cases(case, dtype, H, Hkv, D), ["sdpa", *_candidates(case, dtype, D)]
    with torch.inference_mode():  # the candidates in turn, so that interference from elsewhere meets them alike
        best = [best_in_turn({k: lambda i, a=a, k=k: _run(k, *a) for k in names} | (
            {"gather": lambda i, a=a: _gather_blocks(a[1], a[2])} if "paged" in names else {}), repeats=3) for a in cases]
    times = {k: [b[k] for b in best] for k in names}
    if "paged" in times:  # the others run on keys the engine gathers from the cache first: a cost of theirs
        times = {k: ts if k == "paged" else [t + b["gather"] for t, b in zip(ts, best)] for k, ts in times.items()}
    kernels = []
    for i in range(len(cases)):
        winners = [k for k in times if k != "sdpa" and times[k][i] < 0.95 * times["sdpa"][i]]
        kernels.append(min(winners, key=lambda k: times[k][i]) if winners else "sdpa")
    log.info("attention (%s, %s, %d/%d heads of %d, %d threads): %s us -> %s (short, long context)", case, dtype, H,
             Hkv, D, threads, {k: [round(t * 1e6) for t in ts] for k, ts in times.items()}, kernels)
    return {"kernels": kernels, **{f"{k}_us": [t * 1e6 for t in ts] for k, ts in times.items()}}
