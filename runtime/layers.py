"""Transformer pieces: RMSNorm, RoPE, GQA attention over given K/V, SwiGLU, and the block.

A block exposes its K/V projection separately from the rest, because Ponder decides per
token where a KV slot entry comes from (the token's own block, a fill policy, or a cache).
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime import native
from runtime.config import ModelConfig
from runtime.norm_act import native_rows, rms_norm, silu_mul
from runtime.row_buckets import row_bucket, with_room

log = logging.getLogger(__name__)

# ----- linear kernels -----
# On CPU, aten's GEMM (MKL) is not the fastest kernel everywhere: on some CPUs oneDNN with the
# weight reordered once ahead of time ("prepacked") is 1.3-2.3x faster, on others it loses at one
# row. So an inference forward on CPU measures both, once per weight shape, dtype and thread
# count, among the kernels the CPU's capability allows, and keeps the faster. Training (autograd),
# tracing and export always take F.linear. The packed copy is extra memory beside the weight.
# oneDNN builds (and caches) a primitive per row count, about 0.5-1.5 MB each, for the prepacked
# weights and also for aten's bf16 GEMMs (aten's fp32 GEMM is MKL's): past 16 rows the rows are
# padded up to a bucket, so a server sees a few dozen row counts per weight shape, not one per
# prefill length (unbucketed, a bf16 engine grew by 600 MB over 1500 steps of varied traffic;
# runtime/row_buckets.py: inputs made with room for their bucket are read there without a copy).
# The engine core builds them all at start-up (`warm_up_linears`).
# Calls of a few rows (decode steps) must stream every weight from memory, and oneDNN's bf16 GEMM on
# one row read them at a third of the memory's bandwidth on one Zen 4 CPU; a native kernel
# (csrc/linear_rows.c) reads each weight once, in place. It is timed against the kernel above at
# NATIVE_ROWS rows, and takes the calls of up to the largest of those counts at which it, and at
# every smaller one, was 5% faster. A row's result can then depend on whether its call had more
# rows than that (the kernels round alike but sum in other orders); `onednn` forced keeps every
# call on one kernel.

LINEAR_KERNELS = ("auto", "aten", "onednn", "native")
PACK_ROWS = 16  # the reorder's batch hint: the fastest at 1..1024 rows here, and a row's output does not
#                 depend on the other rows of the call (batch invariance), which hint 1 breaks
NATIVE_ROWS = (1, 4, 8, 16)  # the row counts the native kernel is timed at; forced, it takes calls up to the last
COLD_BYTES, COLD_COPIES = 64 * 2**20, 64  # kernels are timed over copies of a weight past the last-level cache
_mode = "auto"  # or the env var's, checked below
_choices: dict[tuple, dict] = {}  # (shape, dtype, threads) -> {"kernel", "aten_us", "onednn_us", "native_rows", ...}
# Linear -> (weight key, packed weight | None, the most rows a call may have to take the native kernel)
_packed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_linear_kernel(mode: str) -> None:
    """`auto` (measure, the default; env PONDER_CPU_LINEAR), or force `aten`, `onednn`, or `native`
    (calls of up to NATIVE_ROWS[-1] rows; larger ones take aten)."""
    global _mode
    if mode not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel {mode!r} must be one of {', '.join(LINEAR_KERNELS)}")
    _mode = mode
    _choices.clear()
    _packed.clear()


try:
    set_linear_kernel(os.environ.get("PONDER_CPU_LINEAR", "auto"))
except ValueError as e:  # a typo (or a kernel's old name) fails at start-up, not as a silent fallback
    raise ValueError(f"PONDER_CPU_LINEAR: {e}") from None


def linear_kernel_mode() -> str:
    """The linear kernel mode set (`set_linear_kernel`): auto, or the kernel forced."""
    return _mode


def linear_kernel_choices() -> list[dict]:
    """What each measured weight shape chose, with the timings behind it (for logs and benchmarks)."""
    return [{"shape": list(k[0]), "dtype": str(k[1]), "threads": k[2], **v} for k, v in _choices.items()]


def onednn_candidate(dtype: torch.dtype) -> bool:
    """Whether oneDNN prepacked linears may run here: an x86 vector ISA torch dispatches to, and
    for bf16 the CPU's native bf16 (avx512_bf16 or AMX)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def _bucketed(gemm, x: Tensor) -> Tensor:
    """gemm(x) on x's rows up to their row bucket: read in place where x's storage has room for them
    (runtime/row_buckets.py), else zero-padded in a copy. The padded rows' outputs are dropped."""
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    bucket = row_bucket(rows)
    if bucket == rows:
        return gemm(x)
    padded = with_room(x, bucket)
    if padded is None:
        padded = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, bucket - rows))
    return gemm(padded)[:rows].reshape(*x.shape[:-1], -1)


def _onednn(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return _bucketed(lambda t: torch.ops.mkldnn._linear_pointwise(t, packed, bias, "none", [], ""), x)


def _native_takes(weight: Tensor) -> bool:
    return native.available(weight.dtype, weight.device) and weight.is_contiguous()


def _native(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., K) times weight (N, K) transposed, plus bias, by csrc/linear_rows.c."""
    K, N = weight.shape[1], weight.shape[0]
    if x.shape[-1] != K or (bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype)):
        raise ValueError(f"linear_rows: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit")
    x = x if x.is_contiguous() else x.contiguous()  # no op where it is: a decode step makes 4 calls a layer
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype)
    native.kernel("linear_rows", x.dtype)(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                                          out.data_ptr(), out.numel() // N if N else 0, K, N, torch.get_num_threads())
    return out


def _cold_copies(weight: Tensor) -> list[Tensor]:
    """The weight and copies of it, COLD_BYTES in all (at most COLD_COPIES): timed in turn, each call reads
    its weight from memory, as a decode step does, which reads every weight of the model once."""
    n = min(COLD_COPIES, -(-COLD_BYTES // max(weight.numel() * weight.element_size(), 1)))
    return [weight] + [weight.clone() for _ in range(n - 1)]


def best_in_turn(calls: dict[str, object], copies: int = 1, repeats: int = 5) -> dict[str, float]:
    """The best time per call of each call(i) run over i = 0 .. copies - 1, repeats times after a warm-up,
    the candidates in turn within each repeat, so that interference from elsewhere meets them alike."""
    best = dict.fromkeys(calls, math.inf)
    for rep in range(repeats + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for i in range(copies):
                call(i)
            if rep:
                best[name] = min(best[name], (time.perf_counter() - t0) / copies)
    return best


def _choose(weight: Tensor, packed: Tensor | None) -> dict:
    """Time aten and oneDNN (where packed) on this weight at 1 and PACK_ROWS rows; oneDNN wins if 5%
    faster in sum. Then the winner against the native kernel at NATIVE_ROWS rows. Every call reads its
    weight from memory (`_cold_copies`): timed on a weight in cache, the native kernel won at 16 rows
    where it lost by 10-25% from memory (one Zen 4 CPU)."""
    ws = _cold_copies(weight)
    packs = [packed] + [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) for w in ws[1:]] if packed is not None else []

    def kernels(x: Tensor) -> dict:
        calls = {"aten": lambda i: F.linear(x, ws[i])}
        if packs:
            calls["onednn"] = lambda i: _onednn(x, packs[i], None)
        if _native_takes(weight):
            calls["native"] = lambda i: _native(x, ws[i], None)
        return best_in_turn(calls, len(ws))

    times = {rows: kernels(torch.randn(rows, weight.shape[1], dtype=weight.dtype)) for rows in sorted({1, PACK_ROWS, *NATIVE_ROWS})}
    aten = sum(times[rows]["aten"] for rows in (1, PACK_ROWS))
    onednn = sum(times[rows]["onednn"] for rows in (1, PACK_ROWS)) if packs else math.inf
    kernel = "onednn" if onednn < 0.95 * aten else "aten"
    choice = {"kernel": kernel, "aten_us": aten * 1e6, "onednn_us": None if packed is None else onednn * 1e6,
              "native_rows": 0}  # None, not inf: the choices go into benchmarks' JSON
    if _native_takes(weight):
        mine, theirs = ([times[rows][k] for rows in NATIVE_ROWS] for k in ("native", kernel))
        for rows, a, b in zip(NATIVE_ROWS, mine, theirs):
            if a >= 0.95 * b:
                break
            choice["native_rows"] = rows
        choice |= {"native_us": [t * 1e6 for t in mine], f"{kernel}_us_at_native_rows": [t * 1e6 for t in theirs]}
    log.info("linear %s %s, %d threads (%s), from memory: aten %.0f us, oneDNN prepacked %s us -> %s; native on "
             "calls of up to %d rows", tuple(weight.shape), weight.dtype, torch.get_num_threads(),
             torch.backends.cpu.get_cpu_capability(), aten * 1e6,
             "(none)" if packed is None else f"{onednn * 1e6:.0f}", kernel, choice["native_rows"])
    return choice


def tensor_version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot change outside inference)
        return -1


def _kernels(linear: nn.Linear) -> tuple[Tensor | None, int]:
    """(the prepacked weight if oneDNN is this weight's kernel, the most rows a call may have to take the
    native kernel instead), measured once per weight shape and repacked whenever the weight changed."""
    w = linear.weight
    key = (w.data_ptr(), tensor_version(w), w.dtype, tuple(w.shape))
    entry = _packed.get(linear)
    if entry is not None and entry[0] == key:
        return entry[1], entry[2]
    packed, native_rows = None, 0
    if _mode == "native":
        native_rows = NATIVE_ROWS[-1] if _native_takes(w) else 0
    elif _mode != "aten" and (onednn_candidate(w.dtype) or (_mode == "auto" and _native_takes(w))):
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS) if onednn_candidate(w.dtype) else None
        if _mode == "auto":
            shape = (tuple(w.shape), w.dtype, torch.get_num_threads())
            if shape not in _choices:
                _choices[shape] = _choose(w.detach(), packed)
            packed = packed if _choices[shape]["kernel"] == "onednn" else None
            native_rows = _choices[shape]["native_rows"] if _native_takes(w) else 0  # measured on another weight
    _packed[linear] = (key, packed, native_rows)
    return packed, native_rows


def kernel_rows(linear: nn.Linear) -> int:
    """The most rows an inference call of this linear on CPU takes the native kernel at (0: never)."""
    return _kernels(linear)[1]


def warm_up_linears(linears: list[nn.Linear], max_rows: int) -> int:
    """Measure every weight's kernel and pack it now, and run each weight shape that runs on oneDNN
    (prepacked, or any bf16 GEMM) once at every row bucket up to max_rows, so that oneDNN builds at
    start-up every kernel a forward of at most max_rows rows asks for, instead of over hours of
    traffic. Returns the number of calls run."""
    calls, seen = 0, set()
    with torch.inference_mode():
        for linear in linears:
            w = linear.weight
            if w.device.type != "cpu" or (tuple(w.shape), w.dtype) in seen:
                continue
            if _kernels(linear)[0] is None and w.dtype == torch.float32:  # MKL: no kernel per shape
                continue
            seen.add((tuple(w.shape), w.dtype))
            for rows in sorted({row_bucket(n) for n in range(1, max_rows + 1)}):
                linear(torch.zeros(rows, w.shape[1], dtype=w.dtype))
                calls += 1
    return calls


class Linear(nn.Linear):
    """nn.Linear whose inference forward on CPU runs the kernel measured fastest for its weight."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or x.dtype != self.weight.dtype or native.traced():
            return F.linear(x, self.weight, self.bias)
        packed, native_rows = _kernels(self)
        if x.numel() <= native_rows * x.shape[-1]:
            return _native(x, self.weight, self.bias)
        if packed is not None:
            return _onednn(x, packed, self.bias)
        if x.dtype == torch.float32:  # MKL
            return F.linear(x, self.weight, self.bias)
        return _bucketed(lambda t: F.linear(t, self.weight, self.bias), x)  # aten runs bf16 on oneDNN too


def fuse_linears(linears: list[nn.Linear]) -> Linear:
    """One bias-free linear for several that read the same input: its weight stacks their rows, and each
    of theirs becomes a view of it, so the fused copy costs no memory and the separate linears (the
    reference forward, exporters) keep reading the same numbers. Not registered as a submodule, so
    state dicts are unchanged; inference only (fuse after loading and placing the weights)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    fused = Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    at = 0
    for linear in linears:
        n = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[at : at + n], requires_grad=False)
        at += n
    return fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # It accumulates in fp32 whatever the activation dtype: one native pass at inference on CPU
        # (runtime/norm_act.py), else torch's op.
        if native_rows(x, self.weight.dtype):
            return rms_norm(x, self.weight, self.eps)[1]
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight

    def add_forward(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """h = x + delta and the norm of h, in one native pass where it runs."""
        if native_rows(x, self.weight.dtype) and delta.dtype == x.dtype:
            return rms_norm(x, self.weight, self.eps, residual=delta)
        h = x + delta
        return h, self(h)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin for the given positions, each (..., T, head_dim), in the Llama (half-split) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or (B, 1, T, D), in x's dtype (as vLLM keeps its cos/sin cache)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    wqkv: Linear | None = None  # q, k and v in one GEMM, once `fuse()` made it

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, d) normed input -> k, v: (B, Hkv, T, D), k rotated."""
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def fuse(self) -> None:
        if self.wqkv is None:
            object.__setattr__(self, "wqkv", fuse_linears([self.wq, self.wk, self.wv]))

    def project_rows(self, x: Tensor, cos: Tensor, sin: Tensor, queries: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows x (n, d) of normed input, cos/sin (n, D) -> k, v (n, Hkv, D) and, if asked, queries q (n, H, D);
        rotated."""
        n, H, Hkv, D = len(x), self.n_heads, self.n_kv_heads, self.head_dim
        if queries and self.wqkv is not None:
            qkv = self.wqkv(x).view(n, H + 2 * Hkv, D)
            qk = apply_rope(qkv[:, : H + Hkv], cos[:, None], sin[:, None])  # one rotation for queries and keys
            return qk[:, H:], qkv[:, H + Hkv :], qk[:, :H]
        v = self.wv(x).view(n, Hkv, D)
        if not queries:
            return apply_rope(self.wk(x).view(n, Hkv, D), cos[:, None], sin[:, None]), v, None
        qk = torch.cat([self.wq(x).view(n, H, D), self.wk(x).view(n, Hkv, D)], dim=1)
        qk = apply_rope(qk, cos[:, None], sin[:, None])  # one rotation for queries and keys
        return qk[:, H:], v, qk[:, :H]

    def out(self, attn: Tensor) -> Tensor:
        """The output projection of attention results (..., H * D)."""
        return self.wo(attn)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """Queries from x (B, T, d) attend to k, v (B, Hkv, S, D). mask: bool (T, S) or (B, 1, T, S),
        True where attention is allowed; None means causal with T == S."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_heads != self.n_kv_heads
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    w_gate_up: Linear | None = None  # gate and up in one GEMM, once `fuse()` made it

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def fuse(self) -> None:
        if self.w_gate_up is None:
            object.__setattr__(self, "w_gate_up", fuse_linears([self.w_gate, self.w_up]))

    def forward(self, x: Tensor) -> Tensor:
        if self.w_gate_up is not None and not torch.is_grad_enabled():
            gate_up = self.w_gate_up(x)
            if native_rows(gate_up, self.w_down.weight.dtype):
                return self.w_down(silu_mul(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer block, split so the caller controls which K/V it attends to."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def fuse(self) -> None:
        """Inference: q/k/v and gate/up each in one GEMM (fewer, larger calls; no extra memory)."""
        self.attn.fuse()
        self.mlp.fuse()

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The K/V entry this block writes for input x (B, T, d)."""
        return self.attn.project_kv(self.attn_norm(x), cos, sin)

    def project_rows(self, x: Tensor, cos: Tensor, sin: Tensor, queries: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """For rows x (n, d): the K/V entry this block writes, (n, Hkv, D) each, and (if asked) the rotated
        queries (n, H, D), from one attention norm."""
        return self.attn.project_rows(self.attn_norm(x), cos, sin, queries)

    def attention(self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """The attention half with its residual: x + attn(norm(x)) over the given K/V."""
        return x + self.attn(self.attn_norm(x), k, v, cos, sin, mask)

    def feedforward(self, h: Tensor, delta: Tensor | None = None) -> Tensor:
        """The MLP half with its residual on h, or on h + delta (the attention half's output, added in
        the norm's pass); position-wise, so callers may batch rows freely."""
        if delta is None:
            return h + self.mlp(self.mlp_norm(h))
        h, normed = self.mlp_norm.add_forward(h, delta)
        return h + self.mlp(normed)

    def forward_with_kv(
        self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None
    ) -> Tensor:
        return self.feedforward(self.attention(x, k, v, cos, sin, mask))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        k, v = self.kv(x, cos, sin)
        return self.forward_with_kv(x, k, v, cos, sin, mask)
