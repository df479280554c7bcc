"""A `fixed` schedule with no early exit and no step/block embeddings is a plain transformer."""

import torch
import torch.nn.functional as F

from runtime.config import ModelConfig
from runtime.model import ExitSpec, PonderModel


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta):
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos[:, None].float() * freqs
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def plain_transformer(model: PonderModel, ids: torch.Tensor) -> torch.Tensor:
    """A hand-written Llama-style decoder reading the same weights."""
    cfg = model.cfg
    T = ids.shape[1]
    pos = torch.arange(T)
    x = model.embed.weight[ids]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for blk in model.pool:
        a = blk.attn
        h = rms(x, blk.attn_norm.weight, cfg.norm_eps)
        q = (h @ a.wq.weight.T).view(1, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = (h @ a.wk.weight.T).view(1, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = (h @ a.wv.weight.T).view(1, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / cfg.head_dim**0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + ((att @ v).transpose(1, 2).reshape(1, T, -1) @ a.wo.weight.T)
        h = rms(x, blk.mlp_norm.weight, cfg.norm_eps)
        m = blk.mlp
        x = x + (F.silu(h @ m.w_gate.weight.T) * (h @ m.w_up.weight.T)) @ m.w_down.weight.T
    return rms(x, model.norm.weight, cfg.norm_eps) @ model.head.weight.T


def test_dense_config_matches_hand_written_transformer():
    torch.manual_seed(0)
    model = PonderModel(ModelConfig.from_name("dense-tiny")).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 24))
    with torch.no_grad():
        out = model(ids, ExitSpec(price=10.0))  # min_depth == max_depth: the price cannot cut depth
        expected = plain_transformer(model, ids)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert (out.depth == model.cfg.max_depth).all()
    assert (out.path == torch.arange(model.cfg.max_depth)).all()
