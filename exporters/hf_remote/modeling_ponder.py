"""Ponder, an adaptive-depth language model, for Hugging Face transformers (trust_remote_code).

This file is self-contained (torch and transformers only); `ponder export --format hf` copies
it beside config.json and model.safetensors.

One token runs: embed -> prelude blocks -> core steps s = 0..max_depth-1 -> coda blocks -> norm -> head.
At core step s the exit head predicts how much cross-entropy more steps would still remove; the
token exits when s >= min_depth and that gain is below the exit price. Otherwise the schedule
(fixed: block s; recurrent: block 0; routed: the router's argmax) picks block b and the token
becomes block_b(h + P(s) + B(b)), attending to the KV slot of step s. An exited token keeps its
state; its entries at deeper slots follow `kv_fill` (propagate | latest | shared).

The price comes from, in order: the `exit_price` or `compute_budget` keyword of forward() and
generate(), then the same fields of the config. No price means full depth. A budget maps to a
price through the calibration table measured in training (no per-request feedback here).
Every slot keeps a full-size KV cache (no memory saving from exits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast


class PonderConfig(PretrainedConfig):
    model_type = "ponder"

    def __init__(
        self,
        vocab_size: int = 4096,
        d_model: int = 256,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        d_ff: int = 704,
        n_prelude: int = 1,
        n_coda: int = 1,
        n_pool: int = 4,
        max_depth: int = 4,
        min_depth: int = 0,
        schedule: str = "fixed",
        kv_fill: str = "propagate",  # propagate | latest | shared: the values of Ponder's runtime KVFill
        step_embedding: bool = True,
        block_embedding: bool = True,
        exit_hidden: int = 64,
        exit_step_bias: bool = False,  # the exit head adds a learned bias per step
        exit_adapter_rank: int = 0,  # > 0: a low-rank translator per exit depth, before the coda
        max_seq_len: int = 512,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        exit_price: float | None = None,  # default price for every token; None: full depth
        compute_budget: float | None = None,  # default target depth fraction, mapped by `calibration`
        calibration: dict | None = None,  # {"prices": [...ascending], "depth_fractions": [...]}
        **kwargs,
    ) -> None:
        if schedule not in ("fixed", "recurrent", "routed"):
            raise ValueError(f"schedule={schedule!r} must be fixed, recurrent or routed")
        if kv_fill not in ("propagate", "latest", "shared"):
            raise ValueError(f"kv_fill={kv_fill!r} must be propagate, latest or shared")
        self.vocab_size, self.d_model, self.n_heads, self.n_kv_heads, self.d_ff = vocab_size, d_model, n_heads, n_kv_heads, d_ff
        self.n_prelude, self.n_coda, self.n_pool, self.max_depth, self.min_depth = n_prelude, n_coda, n_pool, max_depth, min_depth
        self.schedule, self.kv_fill, self.step_embedding, self.block_embedding = schedule, kv_fill, step_embedding, block_embedding
        self.exit_hidden, self.max_seq_len, self.rope_theta, self.norm_eps = exit_hidden, max_seq_len, rope_theta, norm_eps
        self.exit_step_bias, self.exit_adapter_rank = bool(exit_step_bias), int(exit_adapter_rank or 0)
        self.exit_price, self.compute_budget, self.calibration = exit_price, compute_budget, calibration
        # Standard names, for generate() and its cache: one cache layer per prelude layer, core slot and coda layer.
        self.hidden_size, self.num_attention_heads, self.num_key_value_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.num_hidden_layers = n_prelude + (1 if kv_fill == "shared" else max_depth) + n_coda
        self.max_position_embeddings = max_seq_len
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs["tie_word_embeddings"] = False  # the export writes the head's weight explicitly
        super().__init__(**kwargs)


# ----- layers (names match Ponder's, so the state dict maps one to one) -----


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions (B, T) -> cos, sin (B, 1, T, head_dim), half-split layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: PonderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def project_kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        if self.n_heads != self.n_kv_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: PonderConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: PonderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return self.attn.project_kv(self.attn_norm(x), cos, sin)

    def forward_with_kv(self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attn(self.attn_norm(x), k, v, cos, sin, mask)
        return h + self.mlp(self.mlp_norm(h))


class ExitHead(nn.Module):
    def __init__(self, cfg: PonderConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.exit_hidden)
        self.step_bias = nn.Embedding(max(cfg.max_depth, 1), cfg.exit_hidden) if cfg.exit_step_bias else None
        self.out = nn.Linear(cfg.exit_hidden, 1)

    def forward(self, x: Tensor, s: int) -> Tensor:
        hidden = self.fc(self.norm(x))
        if self.step_bias is not None:
            hidden = hidden + self.step_bias.weight[s]
        return F.softplus(self.out(F.gelu(hidden))).squeeze(-1)


class ExitAdapter(nn.Module):
    """The translator of one exit depth: h + up(down(h)), so the head can decode an early state."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=False)
        self.up = nn.Linear(rank, d_model)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.down(h))


def price_for_budget(calibration: dict | None, budget: float) -> float:
    """The price whose calibrated mean depth fraction is `budget` (log-linear interpolation)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"compute_budget={budget} must be in (0, 1]")
    if budget >= 1.0:
        return 0.0
    if not calibration:
        raise ValueError("this export has no calibration table; pass exit_price instead of compute_budget")
    prices, fracs = calibration["prices"], list(calibration["depth_fractions"])
    for i in range(1, len(fracs)):
        fracs[i] = min(fracs[i], fracs[i - 1])
    points = [(0.0, 1.0)] + list(zip(prices, fracs))
    for (p0, f0), (p1, f1) in zip(points, points[1:]):
        if f0 >= budget >= f1 and f0 > f1:
            t = (f0 - budget) / (f0 - f1)
            return p1 * t if p0 <= 0.0 else math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
    return prices[-1] if budget < fracs[-1] else 0.0


@dataclass
class PonderCausalLMOutput(CausalLMOutputWithPast):
    exit_depths: Tensor | None = None  # (B, T) core steps each new token took


class PonderPreTrainedModel(PreTrainedModel):
    config_class = PonderConfig
    base_model_prefix = "ponder"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint


class PonderForCausalLM(PonderPreTrainedModel, GenerationMixin):
    def __init__(self, config: PonderConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.pool = nn.ModuleList(Block(cfg) for _ in range(cfg.n_pool))
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.step_emb = nn.Parameter(torch.zeros(max(cfg.max_depth, 1), cfg.d_model)) if cfg.step_embedding else None
        self.block_emb = nn.Parameter(torch.zeros(cfg.n_pool, cfg.d_model)) if cfg.block_embedding else None
        routed = cfg.schedule == "routed"
        self.router = nn.Linear(cfg.d_model, cfg.n_pool) if routed else None
        self.router_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if routed else None
        self.exit_head = ExitHead(cfg)
        self.exit_adapters = (nn.ModuleList(ExitAdapter(cfg.d_model, cfg.exit_adapter_rank) for _ in range(cfg.max_depth))
                              if cfg.exit_adapter_rank else None)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def _price(self, exit_price: float | None, compute_budget: float | None) -> float | None:
        cfg = self.config
        if exit_price is not None:
            return float(exit_price)
        if compute_budget is not None:
            return price_for_budget(cfg.calibration, compute_budget)
        if cfg.exit_price is not None:
            return float(cfg.exit_price)
        if cfg.compute_budget is not None:
            return price_for_budget(cfg.calibration, cfg.compute_budget)
        return None

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        exit_price: float | None = None,
        compute_budget: float | None = None,
        min_depth: int | None = None,
        max_depth: int | None = None,
        **kwargs,
    ) -> PonderCausalLMOutput:
        cfg = self.config
        B, T = input_ids.shape
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # left padding: count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past : past + T]
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta)
        q_pos = past + torch.arange(T, device=input_ids.device)
        k_pos = torch.arange(past + T, device=input_ids.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None] & attention_mask.bool()[:, None, :]
        mask = (mask | (k_pos[None, :] == q_pos[:, None])[None])[:, None]  # a padding row still sees itself
        price = self._price(exit_price, compute_budget)
        lo = cfg.min_depth if min_depth is None else min_depth
        hi = cfg.max_depth if max_depth is None else min(max_depth, cfg.max_depth)

        def cached(layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            """The new tokens' entries appended to cache layer `layer`: all keys and values to attend to."""
            return past_key_values.update(k, v, layer) if past_key_values is not None else (k, v)

        h = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            k, v = cached(i, *block.kv(h, cos, sin))
            h = block.forward_with_kv(h, k, v, cos, sin, mask)
        h, depth = self._core(h, cos, sin, mask, price, lo, hi, cached)
        h = self._adapt(h, depth)
        for i, block in enumerate(self.coda):
            layer = cfg.num_hidden_layers - cfg.n_coda + i
            k, v = cached(layer, *block.kv(h, cos, sin))
            h = block.forward_with_kv(h, k, v, cos, sin, mask)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return PonderCausalLMOutput(logits=self.head(self.norm(h)), past_key_values=past_key_values, exit_depths=depth)

    def _core(self, h, cos, sin, mask, price, lo, hi, cached):
        """Core steps for every new token, densely; exited tokens keep their state."""
        cfg = self.config
        B, T, _ = h.shape
        active = torch.ones(B, T, dtype=torch.bool, device=h.device)
        depth = torch.zeros(B, T, dtype=torch.long, device=h.device)
        latest = slot0 = None
        for s in range(cfg.max_depth):
            h_step = h + self.step_emb[s] if self.step_emb is not None else h
            if s >= hi:
                active = torch.zeros_like(active)
            elif price is not None and s >= lo:
                active = active & ~(self.exit_head(h_step, s) < price)
            if self.router is not None:
                choice = self.router(self.router_norm(h_step)).argmax(-1)
            else:
                choice = torch.full((B, T), s if cfg.schedule == "fixed" else 0, dtype=torch.long, device=h.device)
            blocks = sorted(set(choice.flatten().tolist()))
            inputs = {b: h_step + self.block_emb[b] if self.block_emb is not None else h_step for b in blocks}
            pick = lambda per_block, kv: sum(  # noqa: E731  the chosen block's tensor for each token
                x * (choice == b).to(x.dtype)[(slice(None), None, slice(None), None) if kv else (..., None)]
                for b, x in per_block.items()
            )
            if cfg.kv_fill == "shared" and s > 0:
                k, v = slot0
            else:
                # New tokens' slot-s entries: their own block's projection (for an exited token, the
                # `propagate` entry), or with `latest` a copy of their deepest computed entry.
                kvs = {b: self.pool[b].kv(x, cos, sin) for b, x in inputs.items()}
                k, v = pick({b: kv[0] for b, kv in kvs.items()}, True), pick({b: kv[1] for b, kv in kvs.items()}, True)
                if cfg.kv_fill == "latest":
                    if latest is not None:
                        keep = active[:, None, :, None]
                        k, v = torch.where(keep, k, latest[0]), torch.where(keep, v, latest[1])
                    latest = (k, v)
                k, v = cached(cfg.n_prelude + (0 if cfg.kv_fill == "shared" else s), k, v)
                slot0 = (k, v) if s == 0 else slot0
            outs = {b: self.pool[b].forward_with_kv(x, k, v, cos, sin, mask) for b, x in inputs.items()}
            h = torch.where(active[..., None], pick(outs, False), h)
            depth = depth + active.long()
        return h, depth

    def _adapt(self, h: Tensor, depth: Tensor) -> Tensor:
        """Each exit state through its depth's adapter; full-depth states pass as they are."""
        if self.exit_adapters is None:
            return h
        out = h.clone()
        for d in torch.unique(depth).tolist():
            if d < self.config.max_depth:
                rows = depth == d
                out[rows] = self.exit_adapters[d](h[rows])
        return out

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        inputs = {"input_ids": input_ids[:, past:], "attention_mask": attention_mask, "past_key_values": past_key_values,
                  "use_cache": kwargs.get("use_cache", True)}
        for name in ("exit_price", "compute_budget", "min_depth", "max_depth"):
            if kwargs.get(name) is not None:
                inputs[name] = kwargs[name]
        return inputs
