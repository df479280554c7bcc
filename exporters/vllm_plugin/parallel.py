"""Ponder's blocks, embedding and head on vLLM's tensor-parallel layers, and the weight mapping onto them.

Megatron-style, as vLLM's own Llama: q/k/v and gate/up are column-parallel (each rank holds its own
heads and its slice of d_ff), the attention output and down projections row-parallel (their
all-reduce hands every rank the whole residual stream), the embedding and LM head vocab-parallel.
Norms, step and block embeddings, the router and the exit head are small and replicated: every rank
computes them on the same residual stream, and the exit and routing decisions are broadcast from
rank 0 (`agree`) so that no rounding difference can make ranks take different paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import PPMissingLayer

from exporters.vllm_plugin.pipeline import Stage
from runtime.config import ModelConfig
from runtime.layers import RMSNorm, apply_rope

# A Ponder checkpoint's linear names -> (the parallel layer here, its shard).
STACKED = {"attn.wq": ("qkv", "q"), "attn.wk": ("qkv", "k"), "attn.wv": ("qkv", "v"),
           "mlp.w_gate": ("gate_up", 0), "mlp.w_up": ("gate_up", 1)}
RENAMED = {"attn.wo": "wo", "mlp.w_down": "down"}


class ParallelBlock(nn.Module):
    """A pre-norm block split as the forward needs it: `qkv_rows` (this rank's rotated q, k, v for
    rows), then `finish` (attention output projection, MLP, both residuals) once vLLM attended."""

    def __init__(self, cfg: ModelConfig, prefix: str) -> None:
        super().__init__()
        d, D = cfg.d_model, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.qkv = QKVParallelLinear(d, D, cfg.n_heads, cfg.n_kv_heads, bias=False, prefix=f"{prefix}.qkv")
        self.wo = RowParallelLinear(cfg.n_heads * D, d, bias=False, prefix=f"{prefix}.wo")
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_up = MergedColumnParallelLinear(d, [cfg.d_ff] * 2, bias=False, prefix=f"{prefix}.gate_up")
        self.down = RowParallelLinear(cfg.d_ff, d, bias=False, prefix=f"{prefix}.down")
        self.n_heads, self.n_kv_heads, self.head_dim = self.qkv.num_heads, self.qkv.num_kv_heads, D  # this rank's

    def qkv_rows(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows x (n, d) -> this rank's q (n, H*D) and k, v (n, Hkv*D); q and k rotated."""
        n, H, Hkv, D = len(x), self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(self.attn_norm(x))[0].view(n, H + 2 * Hkv, D)
        qk = apply_rope(qkv[:, : H + Hkv], cos[:, None], sin[:, None])  # one rotation for queries and keys
        return qk[:, :H].reshape(n, -1), qk[:, H:].reshape(n, -1), qkv[:, H + Hkv :].reshape(n, -1)

    def finish(self, x: Tensor, attn_out: Tensor) -> Tensor:
        """Rows x (n, d) given this rank's attention outputs (n, H*D): both halves' residuals added."""
        h = x + self.wo(attn_out)[0]
        gate, up = self.gate_up(self.mlp_norm(h))[0].chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)[0]


def parallel_pieces(cfg: ModelConfig, prefix: str, stage: Stage) -> dict[str, nn.Module]:
    """The modules of a PonderModel that are sharded: embed, head and every block list; the ones this
    pipeline stage does not run are placeholders (PPMissingLayer) that hold no weights."""
    def block(kind: str, i: int) -> nn.Module:
        return ParallelBlock(cfg, f"{prefix}.{kind}.{i}") if stage.holds_block(kind, i) else PPMissingLayer()

    blocks = {kind: nn.ModuleList(block(kind, i) for i in range(n))
              for kind, n in (("prelude", cfg.n_prelude), ("pool", cfg.n_pool), ("coda", cfg.n_coda))}
    embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, prefix=f"{prefix}.embed") if stage.first else PPMissingLayer()
    head = ParallelLMHead(cfg.vocab_size, cfg.d_model, bias=False, prefix=f"{prefix}.head") if stage.last else PPMissingLayer()
    return {"embed": embed, "head": head, **blocks}


def load_into(params: dict[str, nn.Parameter], name: str, tensor: Tensor, elsewhere: tuple[str, ...] = ()) -> str | None:
    """Load one checkpoint tensor by its Ponder name into the parameter that holds it (or this rank's
    shard of it); returns that parameter's name, or None for a module another pipeline stage holds
    (`elsewhere`: their name prefixes, each ending in a dot)."""
    shard = None
    for src, (dst, shard_id) in STACKED.items():
        if f".{src}." in name:
            name, shard = name.replace(f".{src}.", f".{dst}."), shard_id
            break
    else:
        for src, dst in RENAMED.items():
            name = name.replace(f".{src}.", f".{dst}.")
    if name not in params:
        if any(name.startswith(m) for m in elsewhere):
            return None
        raise ValueError(f"unexpected weight {name!r}: is this a `ponder export --format hf` directory?")
    param = params[name]
    loader = getattr(param, "weight_loader", default_weight_loader)
    with torch.no_grad():
        if shard is None:
            loader(param, tensor.to(param.dtype))
        else:
            loader(param, tensor.to(param.dtype), shard)
    return name


def materialize(module: nn.Module) -> None:
    """Parameters and buffers still on the meta device (the replicated pieces, built there so no rank
    ever holds the unsharded blocks) become real, uninitialised tensors; the weights load over them."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(m, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False))
        for name, b in list(m.named_buffers(recurse=False)):
            if b.is_meta:
                m.register_buffer(name, torch.empty(b.shape, dtype=b.dtype))


def tp_size() -> int:
    return get_tensor_model_parallel_world_size()


def agree(*decisions: Tensor) -> list[Tensor]:
    """The same integer decisions (n,) on every rank: rank 0's, broadcast (one call for all of them)."""
    stacked = get_tp_group().broadcast(torch.stack([d.long() for d in decisions]), src=0)
    return list(stacked.unbind(0))
