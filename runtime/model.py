"""The Ponder model and its reference forward.

One token: embed -> prelude -> core steps s = 0..max_depth-1 -> coda -> norm -> head.
At core step s, in this order:
  1. the exit head predicts the cross-entropy gain of more steps from h + P(s);
     the token exits when s >= min_depth and that gain is below the price;
  2. the router (or the schedule) picks a block b;
  3. an active token becomes block_b(h + P(s) + B(b)), attending to KV slot s.
An exited token keeps its state; its entries at deeper slots follow `kv_fill`.

The reference forward runs every token of a (B, T) batch densely and masks the update.
It is the oracle every fast path must match, and training uses it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.config import ModelConfig
from runtime.exit_adapters import StackedAdapters
from runtime.layers import Block, Linear, RMSNorm, rope_tables, tensor_version
from runtime.norm_act import EXIT_HEAD_MAX_ROWS, ExitScorer, native_rows

# ExitHead -> (its parameters' addresses and versions, their native kernel call), beside the module so
# that copies and pickles of a model carry no ctypes handle
_scorers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class ExitSpec:
    """How tokens leave the core: a price, explicit depths, or neither (full depth).

    price: exit when the predicted gain < price; a float, or a tensor broadcastable to (B, T).
    depths: (B, T) integer depth per token; overrides price.
    min_depth / max_depth: per-call overrides of the config's bounds.
    """

    price: float | Tensor | None = None
    depths: Tensor | None = None
    min_depth: int | None = None
    max_depth: int | None = None
    confidence: float | None = None  # CALM baseline: exit once the decoded top-1 probability >= this


@dataclass
class ForwardOutput:
    logits: Tensor  # (B, T, V) decoded at each token's exit
    depth: Tensor  # (B, T) core steps each token took
    path: Tensor  # (B, T, max_depth) block applied at each step, -1 where none ran
    exit_scores: Tensor  # (B, T, max_depth) predicted gain at each step
    exit_state: Tensor  # (B, T, d) state each token left the core with
    states: list[Tensor] | None = None  # h entering step s, s = 0..max_depth (if asked)
    router_logits: list[Tensor] | None = None  # per step (B, T, n_pool), routed models only


class ExitHead(nn.Module):
    """Value head: predicts how much cross-entropy more core steps would still remove (>= 0).

    Models with step embeddings see the step in their input; models without them (an imported
    dense model must keep its layers' inputs untouched) get a learned per-step bias instead.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.fc = Linear(cfg.d_model, cfg.exit_hidden)
        self.step_bias = nn.Embedding(max(cfg.max_depth, 1), cfg.exit_hidden) if cfg.exit_step_bias else None
        self.out = Linear(cfg.exit_hidden, 1)

    def forward(self, x: Tensor, s: int) -> Tensor:
        scorer = self.native_scorer(x)
        if scorer is not None:
            return scorer(x, s)
        hidden = self.fc(self.norm(x))
        if self.step_bias is not None:
            hidden = hidden + self.step_bias.weight[s]
        return F.softplus(self.out(F.gelu(hidden))).squeeze(-1)

    def native_scorer(self, x: Tensor) -> ExitScorer | None:
        """The native kernel's call for rows like x (..., d), where it runs them: one call on CPU at inference,
        for at most EXIT_HEAD_MAX_ROWS rows. Built again whenever a parameter was replaced or changed."""
        if not (native_rows(x, self.fc.weight.dtype) and self.norm.weight.dtype == x.dtype
                and x.numel() <= EXIT_HEAD_MAX_ROWS * x.shape[-1]):
            return None
        params = (self.norm.weight, self.fc.weight, self.fc.bias, self.out.weight, self.out.bias,
                  *(() if self.step_bias is None else (self.step_bias.weight,)))
        key = tuple((p.data_ptr(), tensor_version(p)) for p in params)
        entry = _scorers.get(self)
        if entry is None or entry[0] != key:
            step_bias = None if self.step_bias is None else self.step_bias.weight
            entry = _scorers[self] = (key, ExitScorer(self.norm.weight, self.norm.eps, self.fc.weight, self.fc.bias,
                                                      step_bias, self.out.weight, self.out.bias))
        return entry[1]


class ExitAdapter(nn.Module):
    """Tuned-lens translator for one depth: h + up(down(h)), so the final norm and head can decode
    a state that left the core early. Starts as the identity (the plain logit lens)."""

    def __init__(self, d_model: int, rank: int) -> None:
        super().__init__()
        self.down = Linear(d_model, rank, bias=False)
        self.up = Linear(rank, d_model)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.down(h))


class PonderModel(nn.Module):
    _stacked_adapters: StackedAdapters | None = None  # once `stack_exit_adapters` made them

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prelude = nn.ModuleList(Block(cfg) for _ in range(cfg.n_prelude))
        self.pool = nn.ModuleList(Block(cfg) for _ in range(cfg.n_pool))
        self.coda = nn.ModuleList(Block(cfg) for _ in range(cfg.n_coda))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.step_emb = nn.Parameter(torch.zeros(max(cfg.max_depth, 1), cfg.d_model)) if cfg.step_embedding else None
        self.block_emb = nn.Parameter(torch.zeros(cfg.n_pool, cfg.d_model)) if cfg.block_embedding else None
        self.router = Linear(cfg.d_model, cfg.n_pool) if cfg.schedule == "routed" else None
        self.router_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.schedule == "routed" else None
        self.exit_head = ExitHead(cfg)
        self.exit_adapters = (nn.ModuleList(ExitAdapter(cfg.d_model, cfg.exit_adapter_rank) for _ in range(cfg.max_depth))
                              if cfg.exit_adapter_rank else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        n_layers = self.cfg.n_prelude + self.cfg.max_depth + self.cfg.n_coda
        for name, p in self.named_parameters():
            if p.dim() == 2 and "emb" not in name:
                std = 0.02 / (2 * max(n_layers, 1)) ** 0.5 if name.endswith(("wo.weight", "w_down.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.embed.weight, std=0.02)
        for p in (self.step_emb, self.block_emb):
            if p is not None:
                nn.init.normal_(p, std=0.02)
        for adapter in self.exit_adapters or []:
            nn.init.zeros_(adapter.up.weight)

    # ----- pieces the engine and trainers call -----

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def step_input(self, h: Tensor, s: int) -> Tensor:
        return h + self.step_emb[s] if self.step_emb is not None else h

    def block_input(self, h_step: Tensor, b: int) -> Tensor:
        return h_step + self.block_emb[b] if self.block_emb is not None else h_step

    def exit_score(self, h_step: Tensor, s: int) -> Tensor:
        # The value head reads a detached state so its regression never shapes the trunk.
        return self.exit_head(h_step.detach(), s)

    def route_logits(self, h_step: Tensor) -> Tensor:
        assert self.router is not None
        return self.router(self.router_norm(h_step))

    def scheduled_block(self, s: int) -> int:
        """The block a non-routed schedule applies at step s."""
        return s if self.cfg.schedule == "fixed" else 0

    def stack_exit_adapters(self) -> None:
        """Inference: the exit adapters' weights in three stacked tensors, so that a step's rows of every
        depth run in one native call (runtime/exit_adapters.py; no extra memory, state dicts unchanged)."""
        if self.exit_adapters is not None and self._stacked_adapters is None:
            object.__setattr__(self, "_stacked_adapters", StackedAdapters(self.exit_adapters))

    def adapt_exit(self, h: Tensor, depth: Tensor) -> Tensor:
        """Each state through the exit adapter of its depth (..., d); full-depth states pass as they are."""
        if self.exit_adapters is None:
            return h
        if self._stacked_adapters is not None and self._stacked_adapters.runs(h):
            return self._stacked_adapters(h, depth)
        out = h.clone()
        for d in torch.unique(depth).tolist():
            if d < self.cfg.max_depth:
                rows = depth == d
                out[rows] = self.exit_adapters[d](h[rows])
        return out

    def decode(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, depth: Tensor | None = None) -> Tensor:
        """Exit adapters (given each state's depth), coda, final norm and LM head on core states h (B, T, d)."""
        if depth is not None:
            h = self.adapt_exit(h, depth)
        for block in self.coda:
            h = block(h, cos, sin, mask)
        return self.head(self.norm(h))

    def run_prelude(self, ids: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.embed(ids)
        for block in self.prelude:
            h = block(h, cos, sin, mask)
        return h

    # ----- the reference forward -----

    def forward(
        self,
        ids: Tensor,
        exit: ExitSpec | None = None,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        router_mode: str = "argmax",
        gumbel_tau: float = 1.0,
        gumbel_scale: float = 1.0,
        generator: torch.Generator | None = None,
        return_states: bool = False,
    ) -> ForwardOutput:
        """ids (B, T) -> logits at each token's exit, with depths and block paths.

        mask: optional bool (B, 1, T, T) attention mask (True = may attend); default causal.
        router_mode: 'argmax' (serving), or 'gumbel' (training: straight-through Gumbel-softmax,
        every block runs on every token and the one-hot choice carries the router's gradient;
        gumbel_scale < 1 explores less, so blocks see a consistent assignment early on).
        """
        cfg, exit = self.cfg, exit or ExitSpec()
        B, T = ids.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(T, device=ids.device)
        cos, sin = self.rope(positions)
        if cos.dim() == 3:  # per-row positions (B, T, D) -> (B, 1, T, D)
            cos, sin = cos[:, None], sin[:, None]
        min_depth = cfg.min_depth if exit.min_depth is None else exit.min_depth
        max_depth = cfg.max_depth if exit.max_depth is None else min(exit.max_depth, cfg.max_depth)

        h = self.run_prelude(ids, cos, sin, mask)
        active = torch.ones(B, T, dtype=torch.bool, device=ids.device)
        depth = torch.zeros(B, T, dtype=torch.long, device=ids.device)
        path = torch.full((B, T, cfg.max_depth), -1, dtype=torch.long, device=ids.device)
        scores, states, router_logits = [], [], []
        fill: dict[str, tuple[Tensor, Tensor]] = {}
        for s in range(cfg.max_depth):
            if return_states:
                states.append(h)
            h_step = self.step_input(h, s)
            score = self.exit_score(h_step, s)
            scores.append(score)
            if exit.confidence is not None:  # CALM: 1 - top-1 probability of decoding here, exit below 1 - c
                top1 = self.decode(h, cos, sin, mask, depth).float().softmax(-1).amax(-1)
                score, exit_at = 1 - top1, ExitSpec(price=1 - exit.confidence)
            else:
                exit_at = exit
            active = active & ~self._stops(s, score, exit_at, min_depth, max_depth)
            weights, choice = self._route(h_step, router_mode, gumbel_tau, gumbel_scale, generator, router_logits, s)
            h_new = self._core_step(s, h_step, active, weights, choice, cos, sin, mask, fill)
            h = torch.where(active[..., None], h_new, h)
            depth = depth + active.long()
            path[..., s] = torch.where(active, choice, -1)
        if return_states:
            states.append(h)
        return ForwardOutput(
            logits=self.decode(h, cos, sin, mask, depth),
            depth=depth,
            path=path,
            exit_scores=torch.stack(scores, dim=-1) if scores else h.new_zeros(B, T, 0),
            exit_state=h,
            states=states if return_states else None,
            router_logits=router_logits if self.router is not None else None,
        )

    @staticmethod
    def _stops(s: int, score: Tensor, exit: ExitSpec, min_depth: int, max_depth: int) -> Tensor:
        """Which tokens exit at step s (before running it)."""
        if s >= max_depth:
            return torch.ones_like(score, dtype=torch.bool)
        if exit.depths is not None:
            return s >= exit.depths
        if exit.price is None or s < min_depth:
            return torch.zeros_like(score, dtype=torch.bool)
        return score.float() < exit.price  # in fp32 whatever the model dtype, as the engine compares

    def _route(
        self, h_step: Tensor, mode: str, tau: float, scale: float, generator: torch.Generator | None,
        log: list[Tensor], s: int,
    ) -> tuple[Tensor | None, Tensor]:
        """(weights (B, T, n_pool) or None, choice (B, T)). Weights are one-hot in the forward value."""
        B, T, _ = h_step.shape
        if self.router is None:
            return None, torch.full((B, T), self.scheduled_block(s), dtype=torch.long, device=h_step.device)
        logits = self.route_logits(h_step)
        log.append(logits)
        if mode == "argmax":
            choice = logits.argmax(-1)
            return F.one_hot(choice, self.cfg.n_pool).to(h_step.dtype), choice
        if mode != "gumbel":
            raise ValueError(f"router_mode={mode!r} must be 'argmax' or 'gumbel'")
        noise_device = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape, generator=generator, device=noise_device).to(logits.device)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))
        soft = F.softmax((logits + scale * gumbel) / tau, dim=-1)
        choice = soft.argmax(-1)
        hard = F.one_hot(choice, self.cfg.n_pool).to(soft.dtype)
        return hard - soft.detach() + soft, choice

    def _core_step(
        self,
        s: int,
        h_step: Tensor,
        active: Tensor,
        weights: Tensor | None,
        choice: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        fill: dict[str, tuple[Tensor, Tensor]],
    ) -> Tensor:
        """One core step for every token of the batch; the caller keeps only active tokens' results."""
        cfg = self.cfg
        if weights is None:
            blocks = [self.scheduled_block(s)]
        elif weights.requires_grad:  # straight-through training: every block, for the router's gradient
            blocks = list(range(cfg.n_pool))
        else:
            blocks = sorted(set(choice.flatten().tolist()))
        inputs = {b: self.block_input(h_step, b) for b in blocks}

        def mix(per_block: dict[int, Tensor], kv_layout: bool) -> Tensor:
            if weights is None:
                return per_block[blocks[0]]
            total = 0
            for b, x in per_block.items():
                w = weights[..., b]
                total = total + x * (w[:, None, :, None] if kv_layout else w[..., None])
            return total

        # The slot-s entry of every token: its own block's projection. For an exited token that is
        # the `propagate` entry (its exit state through the block it would use at this step).
        if not cfg.kv_fill.writes_slot(s):
            k, v = fill["slot0"]
        else:
            kvs = {b: self.pool[b].kv(x, cos, sin) for b, x in inputs.items()}
            k = mix({b: kv[0] for b, kv in kvs.items()}, kv_layout=True)
            v = mix({b: kv[1] for b, kv in kvs.items()}, kv_layout=True)
            if cfg.kv_fill.reads_slot0:
                fill["slot0"] = (k, v)
            elif cfg.kv_fill.copies_deepest:
                if "latest" in fill:  # exited tokens copy their deepest computed entry
                    keep = active[:, None, :, None]
                    k = torch.where(keep, k, fill["latest"][0])
                    v = torch.where(keep, v, fill["latest"][1])
                fill["latest"] = (k, v)
        outs = {b: self.pool[b].forward_with_kv(x, k, v, cos, sin, mask) for b, x in inputs.items()}
        return mix(outs, kv_layout=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
