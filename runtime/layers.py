"""Transformer pieces: RMSNorm, RoPE, GQA attention over given K/V, SwiGLU, and the block.

A block exposes its K/V projection separately from the rest, because Ponder decides per
token where a KV slot entry comes from (the token's own block, a fill policy, or a cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused op, in fp32 whatever the activation dtype.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin for the given positions, each (..., T, head_dim), in the Llama (half-split) layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, D) or (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, d) normed input -> k, v: (B, Hkv, T, D), k rotated."""
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def project_rows(self, x: Tensor, cos: Tensor, sin: Tensor, queries: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """Rows x (n, d) of normed input, cos/sin (n, D) -> k, v (n, Hkv, D) and, if asked, queries q (n, H, D);
        rotated."""
        n, H, Hkv, D = len(x), self.n_heads, self.n_kv_heads, self.head_dim
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
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm transformer block, split so the caller controls which K/V it attends to."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

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

    def feedforward(self, h: Tensor) -> Tensor:
        """The MLP half with its residual; position-wise, so callers may batch rows freely."""
        return h + self.mlp(self.mlp_norm(h))

    def forward_with_kv(
        self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None
    ) -> Tensor:
        return self.feedforward(self.attention(x, k, v, cos, sin, mask))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        k, v = self.kv(x, cos, sin)
        return self.forward_with_kv(x, k, v, cos, sin, mask)
